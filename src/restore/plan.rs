//! Restore planning: which snapshot and which packs serve `--org X --at T`, and the
//! restorable window.
//!
//! The base is the newest snapshot holding the tenant whose consistent time is at or before
//! T; the change stream then replays every transaction after its consistent LSN that committed
//! at or before T (PostgreSQL's inclusive `recovery_target_time`). The window runs from the
//! earliest snapshot to the stream's covered-until time. A repository without a change stream
//! (only `backup` was ever run) restores snapshots as they are, up to the newest one.

use chrono::{DateTime, SecondsFormat, Utc};

use crate::replication::Lsn;
use crate::repository::pack::{PackRef, StreamProgress, StreamState};
use crate::repository::{Manifest, Repository, RepositoryError, SnapshotId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreTarget {
    Latest,
    At(DateTime<Utc>),
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error("the repository has no snapshot yet: run `updog-backup backup` first")]
    NoSnapshots,
    #[error(
        "tenant {tenant} is in none of the {snapshots} snapshot(s): check the value (`updog-backup list` shows each snapshot's tenants)"
    )]
    UnknownTenant { tenant: String, snapshots: usize },
    #[error("{at} is outside the restorable window of tenant {tenant}: {window}")]
    OutsideWindow {
        tenant: String,
        at: String,
        window: Window,
    },
    #[error("the change stream cannot replay after snapshot {snapshot}: {reason}")]
    Stream { snapshot: String, reason: String },
}

/// The span a tenant can be restored to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Window {
    pub earliest: DateTime<Utc>,
    pub covered_until: DateTime<Utc>,
    pub snapshots: usize,
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} .. {} ({} snapshot(s))",
            self.earliest.to_rfc3339_opts(SecondsFormat::Micros, true),
            self.covered_until
                .to_rfc3339_opts(SecondsFormat::Micros, true),
            self.snapshots
        )
    }
}

#[derive(Debug)]
pub struct RestorePlan {
    pub manifest: Manifest,
    pub window: Window,
    /// Packs to replay after the snapshot, and up to when (`None`: the snapshot as it is).
    pub changes: Option<(Vec<PackRef>, DateTime<Utc>)>,
}

/// The change stream's reach, as far as planning needs it.
struct Stream {
    state: StreamState,
    since: Lsn,
    durable: Lsn,
    covered_until: DateTime<Utc>,
}

impl Stream {
    async fn read(repo: &Repository) -> Result<Option<Stream>, PlanError> {
        let state = StreamState::read(repo.store()).await?;
        let Some(progress) = state.progress.clone() else {
            return Ok(None);
        };
        let durable = state.durable().unwrap_or(progress.durable_lsn);
        Ok(Some(Stream {
            state,
            since: progress.since_lsn,
            durable,
            covered_until: progress.covered_until,
        }))
    }

    /// The stream continues this snapshot.
    fn follows(&self, manifest: &Manifest) -> bool {
        manifest.consistent_lsn >= self.since && manifest.consistent_lsn <= self.durable
    }
}

/// Manifests of every snapshot holding `tenant`, oldest first.
pub async fn tenant_snapshots(
    repo: &Repository,
    tenant: &str,
) -> Result<(Vec<Manifest>, usize), PlanError> {
    let ids: Vec<SnapshotId> = repo.snapshots().await?;
    let total = ids.len();
    let mut out = Vec::new();
    for id in ids {
        let manifest = repo.manifest(&id).await?;
        if manifest.tenants.contains_key(tenant) {
            out.push(manifest);
        }
    }
    Ok((out, total))
}

pub async fn plan(
    repo: &Repository,
    tenant: &str,
    target: RestoreTarget,
) -> Result<RestorePlan, PlanError> {
    let (mut manifests, total) = tenant_snapshots(repo, tenant).await?;
    if total == 0 {
        return Err(PlanError::NoSnapshots);
    }
    if manifests.is_empty() {
        return Err(PlanError::UnknownTenant {
            tenant: tenant.into(),
            snapshots: total,
        });
    }
    let stream = Stream::read(repo).await?;
    let window = window(&manifests, stream.as_ref());
    let at = match target {
        RestoreTarget::Latest => window.covered_until,
        RestoreTarget::At(at) => {
            if at < window.earliest || at > window.covered_until {
                return Err(PlanError::OutsideWindow {
                    tenant: tenant.into(),
                    at: at.to_rfc3339_opts(SecondsFormat::Micros, true),
                    window,
                });
            }
            at
        }
    };
    let chosen = manifests
        .iter()
        .rposition(|m| m.consistent_time <= at)
        .expect("at >= earliest");
    let manifest = manifests.swap_remove(chosen);
    let changes = match &stream {
        Some(s) if s.follows(&manifest) && at <= s.covered_until => {
            let packs = s
                .state
                .chain_from(manifest.consistent_lsn)
                .map_err(|reason| PlanError::Stream {
                    snapshot: manifest.id.to_string(),
                    reason,
                })?;
            Some((packs, at))
        }
        // Between this snapshot and `at` no stream was captured: only its own instant is exact.
        _ if at > manifest.consistent_time && stream.is_some() => {
            return Err(PlanError::Stream {
                snapshot: manifest.id.to_string(),
                reason: format!(
                    "no captured change stream follows it up to {} (restorable window: {window})",
                    at.to_rfc3339_opts(SecondsFormat::Micros, true)
                ),
            });
        }
        _ => None,
    };
    Ok(RestorePlan {
        manifest,
        window,
        changes,
    })
}

/// From the earliest snapshot to the stream's covered-until (when it follows a snapshot the
/// tenant is in), else to the newest snapshot.
pub fn window_of(
    manifests: &[Manifest],
    progress: Option<&StreamProgress>,
    durable: Option<Lsn>,
) -> Window {
    let newest = manifests[manifests.len() - 1].consistent_time;
    let streamed = progress.and_then(|p| {
        let durable = durable.unwrap_or(p.durable_lsn);
        manifests
            .iter()
            .any(|m| m.consistent_lsn >= p.since_lsn && m.consistent_lsn <= durable)
            .then_some(p.covered_until)
    });
    Window {
        earliest: manifests[0].consistent_time,
        covered_until: streamed.map_or(newest, |c| c.max(newest)),
        snapshots: manifests.len(),
    }
}

fn window(manifests: &[Manifest], stream: Option<&Stream>) -> Window {
    let progress = stream.and_then(|s| s.state.progress.as_ref());
    window_of(manifests, progress, stream.map(|s| s.durable))
}
