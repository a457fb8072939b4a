//! One active instance per slot. The active daemon holds a PostgreSQL advisory lock on a
//! connection of its own; a second daemon finds the lock taken and waits as a hot standby,
//! polling each second, so it takes over within seconds of the active one's connection
//! closing (a killed process's sockets close with it). A lease object in the repository says
//! who is active — for the standby's `/status`, and as a check that no other instance
//! believes it is active on the same repository.
//!
//! The lock is per database and slot: two daemons capturing different slots of one database
//! do not exclude each other. It needs a session (not a transaction-pooled connection).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sha2::{Digest, Sha256};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::repository::{Lease, Repository};
use crate::source::query_context;
use crate::telemetry::{Role, Task, Telemetry};

use super::DaemonError;

const POLL: Duration = Duration::from_secs(1);
const CHECK_EVERY: Duration = Duration::from_secs(2);
const RENEW_EVERY: Duration = Duration::from_secs(10);
/// A lock-holding connection that does not answer in this long is taken as lost.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The advisory lock key of a slot: the first 8 bytes of SHA-256("updog-backup/slot/<slot>").
pub fn lock_key(slot: &str) -> i64 {
    let digest = Sha256::digest(format!("updog-backup/slot/{slot}").as_bytes());
    i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// Why an active instance stopped being active.
#[derive(Debug)]
pub enum Lost {
    /// The lock's connection failed: another instance may hold the lock now.
    Connection(String),
    /// The lease names another instance.
    Lease(String),
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::Connection(e) => write!(f, "the connection holding the lock failed: {e}"),
            Lost::Lease(holder) => {
                write!(f, "the repository's lease names another instance, {holder}")
            }
        }
    }
}

/// The lock, held.
pub struct Leadership {
    /// Also the active daemon's SQL connection for capture and slot health: one connection
    /// less against the role's connection limit, and if it fails the lock is gone anyway.
    client: Arc<Client>,
    key: i64,
    lease: Lease,
}

/// Waits until this instance holds the lock (`None` if `stop` came first). Meanwhile the
/// role is `standby` (or `starting` while the source cannot be reached).
pub async fn acquire(
    config: &Config,
    repo: &Repository,
    telemetry: &Telemetry,
    stop: &CancellationToken,
) -> Result<Option<Leadership>, DaemonError> {
    let key = lock_key(&config.source.slot);
    let mut announced = false;
    loop {
        let client = match crate::pg::connect(&config.source.url).await {
            Ok(c) => c,
            Err(e) => {
                telemetry.set_role(Role::Starting);
                telemetry.error(Task::Capture, e.to_string());
                tracing::warn!(error = %e, "cannot reach the source to take the lock; retrying");
                if sleep_or_stop(Duration::from_secs(5), stop).await {
                    return Ok(None);
                }
                continue;
            }
        };
        loop {
            let taken = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
                .await
                .map(|row| row.get::<_, bool>(0));
            match taken {
                Ok(true) => {
                    let now = Utc::now();
                    let lease = Lease {
                        instance: telemetry.instance(),
                        slot: config.source.slot.clone(),
                        acquired_at: now,
                        renewed_at: now,
                    };
                    let previous = repo.lease().await?;
                    repo.put_lease(&lease).await?;
                    tracing::info!(
                        instance = %lease.instance,
                        previous = previous.as_ref().map(|l| l.instance.as_str()).unwrap_or("none"),
                        previous_renewed_at = previous.as_ref().map(|l| l.renewed_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
                        "lock taken: this instance is active"
                    );
                    telemetry.update(|s| s.active_instance = None);
                    return Ok(Some(Leadership {
                        client: Arc::new(client),
                        key,
                        lease,
                    }));
                }
                Ok(false) => {
                    let holder = repo.lease().await.ok().flatten();
                    let name = holder.map(|l| l.instance);
                    if !announced {
                        tracing::info!(
                            active = name.as_deref().unwrap_or("unknown"),
                            "another instance holds the lock: standing by"
                        );
                        announced = true;
                    }
                    telemetry.set_role(Role::Standby);
                    telemetry.update(|s| s.active_instance = name);
                    if sleep_or_stop(POLL, stop).await {
                        return Ok(None);
                    }
                }
                Err(e) => {
                    let e = query_context("taking the advisory lock")(e);
                    telemetry.error(Task::Capture, e.to_string());
                    tracing::warn!(error = %e, "lost the connection while waiting for the lock");
                    break;
                }
            }
        }
    }
}

impl Leadership {
    pub fn client(&self) -> Arc<Client> {
        self.client.clone()
    }

    /// Keeps the lock and renews the lease until `stop`; returns why it was lost otherwise.
    pub async fn hold(&mut self, repo: &Repository, stop: &CancellationToken) -> Option<Lost> {
        let mut renewed = tokio::time::Instant::now();
        loop {
            if sleep_or_stop(CHECK_EVERY, stop).await {
                return None;
            }
            match tokio::time::timeout(CHECK_TIMEOUT, self.client.simple_query("SELECT 1")).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Some(Lost::Connection(e.to_string())),
                Err(_) => return Some(Lost::Connection("no answer in 10 s".into())),
            }
            if renewed.elapsed() < RENEW_EVERY {
                continue;
            }
            // A failing store is the capture's problem (it retries); the lease is advisory.
            match repo.lease().await {
                Ok(Some(lease)) if lease.instance != self.lease.instance => {
                    return Some(Lost::Lease(lease.instance));
                }
                Ok(_) => {
                    self.lease.renewed_at = Utc::now();
                    if let Err(e) = repo.put_lease(&self.lease).await {
                        tracing::warn!(error = %e, "could not renew the lease");
                    }
                    renewed = tokio::time::Instant::now();
                }
                Err(e) => tracing::warn!(error = %e, "could not read the lease"),
            }
        }
    }

    /// Lets go of the lock and the lease (a standby takes over at once).
    pub async fn release(self, repo: &Repository) {
        if let Ok(Some(lease)) = repo.lease().await
            && lease.instance == self.lease.instance
            && let Err(e) = repo.delete_lease().await
        {
            tracing::warn!(error = %e, "could not delete the lease");
        }
        let _ = self
            .client
            .query_one("SELECT pg_advisory_unlock($1)", &[&self.key])
            .await;
    }
}

/// Sleeps, unless `stop` comes first: then true.
pub async fn sleep_or_stop(duration: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(duration) => false,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn lock_keys_differ_by_slot_and_are_stable() {
        assert_eq!(
            super::lock_key("updog_backup"),
            super::lock_key("updog_backup")
        );
        assert_ne!(super::lock_key("a"), super::lock_key("b"));
    }
}
