//! `verify`: every object the repository holds, checked without the identity (stored bytes
//! against their digests, the chain of packs, routing checkpoints) or, with it, decrypted and
//! parsed. It reads only; what it finds is a [`VerifyReport`] for the caller to print.

use std::sync::Arc;

use serde::Serialize;

use crate::codec::Identities;
use crate::progress::{Progress, Unit};
use crate::repository::{PackRef, Part, Repository, RepositoryError};
use crate::restore::{PlanError, plan};
use crate::retry::{Classify, ErrorClass};
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error(transparent)]
    Plan(#[from] PlanError),
}

impl Classify for VerifyError {
    fn class(&self) -> ErrorClass {
        match self {
            VerifyError::Repository(e) => e.class(),
            VerifyError::Plan(e) => e.class(),
        }
    }
}

/// What `verify` checked, and every failure, each naming its object.
#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub checked: usize,
    pub failures: Vec<String>,
}

impl VerifyReport {
    fn record(&mut self, result: Result<(), RepositoryError>) {
        self.checked += 1;
        if let Err(e) = result {
            self.failures.push(e.to_string());
        }
    }
}

/// Checks the snapshots (of `org` only, with the global objects, when given), the change
/// stream's packs and the routing checkpoints. With `identities`, decrypts and parses too.
pub async fn run(
    repo: &Repository,
    org: Option<&str>,
    identities: Option<&Arc<Identities>>,
) -> Result<VerifyReport, VerifyError> {
    let mut report = VerifyReport::default();
    snapshots(repo, org, identities, &mut report).await?;
    stream(repo, org, identities, &mut report).await?;
    checkpoints(repo, &mut report).await?;
    Ok(report)
}

/// Every snapshot's manifest (its own digest and id), then its objects.
async fn snapshots(
    repo: &Repository,
    org: Option<&str>,
    identities: Option<&Arc<Identities>>,
    report: &mut VerifyReport,
) -> Result<(), VerifyError> {
    let ids = match org {
        Some(o) => plan::tenant_snapshots(repo, o)
            .await?
            .0
            .into_iter()
            .filter(|m| m.tenants.contains_key(o))
            .map(|m| m.id)
            .collect(),
        None => repo.snapshots().await?,
    };
    for id in ids {
        let manifest = match repo.manifest(&id).await {
            Ok(m) => m,
            Err(e) => {
                report.record(Err(e));
                continue;
            }
        };
        let wanted = |part: &Part<'_>| match (part, org) {
            (Part::Tenant(t), Some(o)) => *t == o,
            _ => true,
        };
        let parts: Vec<Part<'_>> = manifest.parts().filter(wanted).collect();
        let progress = Progress::new("verify", "objects", Unit::StoredBytes, parts.len() as u64);
        for part in parts {
            let result = repo.check_part(&manifest, part, identities.cloned()).await;
            report.record(result);
            progress.advance(manifest.object(part).map_or(0, |o| o.bytes));
        }
        progress.finish();
    }
    Ok(())
}

/// The change stream: that its packs tile it without a gap, then every pack.
async fn stream(
    repo: &Repository,
    org: Option<&str>,
    identities: Option<&Arc<Identities>>,
    report: &mut VerifyReport,
) -> Result<(), VerifyError> {
    let state = repo.stream_state().await?;
    // From where the kept chain starts: retention deletes the packs before it on purpose.
    if let Some(start) = state.start()
        && let Err(gap) = state.chain_from(start)
    {
        report.failures.push(format!("change stream: {gap}"));
    }
    let progress = Progress::new(
        "verify",
        "packs",
        Unit::StoredBytes,
        state.packs.len() as u64,
    );
    for p in &state.packs {
        report.record(pack(repo, p, org, identities).await);
        progress.advance(p.size);
    }
    progress.finish();
    Ok(())
}

/// One pack: its footer, its sections (the tenant's and the global ones with `org`; with
/// identities decrypted and parsed), and its routing region, which restores never read but a
/// restarted daemon rebuilds its routing state from.
async fn pack(
    repo: &Repository,
    p: &PackRef,
    org: Option<&str>,
    identities: Option<&Arc<Identities>>,
) -> Result<(), RepositoryError> {
    let footer = repo.pack_footer(p).await?;
    for (index, entry) in footer.sections.iter().enumerate() {
        if org.is_some() && entry.tenant.is_some() && entry.tenant.as_deref() != org {
            continue;
        }
        match identities {
            None => repo.verify_pack_section(&p.key, index, entry).await?,
            Some(ids) => {
                let mut rx = repo.pack_section(&p.key, index, entry, ids.clone()).await?;
                while let Some(m) = rx.recv().await {
                    m?;
                }
            }
        }
    }
    if let Some(region) = &footer.routes {
        repo.pack_routes(&p.key, region).await?;
    }
    Ok(())
}

/// Every routing checkpoint: a daemon restarts from the newest one before its durable LSN.
async fn checkpoints(repo: &Repository, report: &mut VerifyReport) -> Result<(), VerifyError> {
    for (_, key) in repo.routing_checkpoints().await? {
        match repo.routing_checkpoint(&key).await {
            // Retention deleted it since the listing.
            Err(RepositoryError::Storage(StorageError::NotFound { .. })) => {}
            result => report.record(result.map(drop)),
        }
    }
    Ok(())
}
