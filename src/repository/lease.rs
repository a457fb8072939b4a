//! `locks/daemon.json`: which daemon instance is active. Advisory — the PostgreSQL advisory lock
//! is the real mutual exclusion — but an active instance that finds another name here stops
//! capturing at once.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Repository, RepositoryError, keys};
use crate::storage::{PutMode, StorageError};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lease {
    pub instance: String,
    pub slot: String,
    pub acquired_at: DateTime<Utc>,
    pub renewed_at: DateTime<Utc>,
}

/// A lease renewed within this long names a running daemon: the daemon renews it every 10 s
/// (`daemon::leader`), so three missed renewals mean it is gone (or cut off from the store).
pub const LEASE_FRESH: std::time::Duration = std::time::Duration::from_secs(30);

/// What the repository tells of the capture: who renewed the lease when, and when
/// `changes/progress.json` was last written. For messages that must say whether waiting helps.
#[derive(Debug, Clone, Serialize)]
pub struct CaptureSeen {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daemon: Option<Lease>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress_updated_at: Option<DateTime<Utc>>,
}

impl CaptureSeen {
    /// A daemon renewed the lease recently.
    pub fn running(&self, now: DateTime<Utc>) -> bool {
        self.daemon.as_ref().is_some_and(|l| {
            (now - l.renewed_at)
                .to_std()
                .map_or(true, |age| age <= LEASE_FRESH)
        })
    }

    /// One sentence, standing alone or after a semicolon: whether the daemon runs, when it was
    /// last seen and when it last stored progress.
    pub fn describe(&self, now: DateTime<Utc>) -> String {
        let stored = self.progress_updated_at.map(|t| {
            format!(
                "last stored progress at {} ({} ago)",
                rfc3339(t),
                ago(now - t)
            )
        });
        match (&self.daemon, stored) {
            (Some(lease), stored) if self.running(now) => format!(
                "the daemon ({}) was last seen {} ago{}",
                lease.instance,
                ago(now - lease.renewed_at),
                stored.map(|s| format!(" and {s}")).unwrap_or_default()
            ),
            (Some(lease), _) => format!(
                "capture is not running since {} ({} ago): the daemon ({}) has not renewed its lease (locks/daemon.json) since",
                rfc3339(lease.renewed_at),
                ago(now - lease.renewed_at),
                lease.instance
            ),
            (None, Some(stored)) => format!(
                "capture is not running: no daemon holds the lease (locks/daemon.json), and the stream {stored}"
            ),
            (None, None) => "no daemon has stored anything yet".into(),
        }
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// "4 s", "12 min", "3 h", "2 d": how long ago, to the unit that matters.
fn ago(d: chrono::TimeDelta) -> String {
    let s = d.num_seconds().max(0);
    match s {
        0..120 => format!("{s} s"),
        120..7200 => format!("{} min", s / 60),
        7200..172_800 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    }
}

impl Repository {
    /// The lease and the stream progress's last write.
    pub async fn capture_seen(&self) -> Result<CaptureSeen, RepositoryError> {
        Ok(CaptureSeen {
            daemon: self.lease().await?,
            progress_updated_at: self.stream_progress().await?.map(|p| p.updated_at),
        })
    }

    /// The lease, `None` when absent or unreadable (a half-written lease names nobody).
    pub async fn lease(&self) -> Result<Option<Lease>, RepositoryError> {
        match self.store().get_bytes(keys::LEASE, None).await {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(StorageError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn put_lease(&self, lease: &Lease) -> Result<(), RepositoryError> {
        let json = serde_json::to_vec_pretty(lease).expect("a lease always serializes");
        self.store()
            .put_bytes(keys::LEASE, json.into(), PutMode::Overwrite)
            .await?;
        Ok(())
    }

    pub async fn delete_lease(&self) -> Result<(), RepositoryError> {
        self.store().delete(keys::LEASE).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(renewed_at: DateTime<Utc>) -> Lease {
        Lease {
            instance: "host:42".into(),
            slot: "s".into(),
            acquired_at: renewed_at,
            renewed_at,
        }
    }

    #[test]
    fn capture_seen_says_whether_waiting_helps() {
        let now = Utc::now();
        let fresh = CaptureSeen {
            daemon: Some(lease(now - chrono::TimeDelta::seconds(4))),
            progress_updated_at: Some(now - chrono::TimeDelta::seconds(2)),
        };
        assert!(fresh.running(now));
        let text = fresh.describe(now);
        assert!(
            text.contains("last seen 4 s ago") && text.contains("(2 s ago)"),
            "{text}"
        );
        let stale = CaptureSeen {
            daemon: Some(lease(now - chrono::TimeDelta::minutes(30))),
            ..fresh.clone()
        };
        assert!(!stale.running(now));
        assert!(
            stale.describe(now).contains("capture is not running since"),
            "{}",
            stale.describe(now)
        );
        assert!(stale.describe(now).contains("30 min ago"));
        let stopped = CaptureSeen {
            daemon: None,
            progress_updated_at: Some(now - chrono::TimeDelta::hours(5)),
        };
        assert!(!stopped.running(now));
        assert!(stopped.describe(now).contains("no daemon holds the lease"));
        assert!(stopped.describe(now).contains("5 h ago"));
    }
}
