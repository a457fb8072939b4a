//! Restore planning: which snapshot serves `--org X --at T`, and the restorable window.
//!
//! Until the change stream exists, a tenant is restorable at the consistent time of each
//! snapshot that holds it; the window runs from the earliest such snapshot to the newest
//! (covered-until). `--at T` takes the newest snapshot at or before T (PostgreSQL's inclusive
//! `recovery_target_time` semantics).

use chrono::{DateTime, SecondsFormat, Utc};

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
    let window = Window {
        earliest: manifests[0].consistent_time,
        covered_until: manifests[manifests.len() - 1].consistent_time,
        snapshots: manifests.len(),
    };
    let chosen = match target {
        RestoreTarget::Latest => manifests.len() - 1,
        RestoreTarget::At(at) => {
            if at < window.earliest || at > window.covered_until {
                return Err(PlanError::OutsideWindow {
                    tenant: tenant.into(),
                    at: at.to_rfc3339_opts(SecondsFormat::Micros, true),
                    window,
                });
            }
            manifests
                .iter()
                .rposition(|m| m.consistent_time <= at)
                .expect("at >= earliest")
        }
    };
    Ok(RestorePlan {
        manifest: manifests.swap_remove(chosen),
        window,
    })
}
