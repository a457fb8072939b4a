//! `list`: the repository's snapshots, its change stream, and a tenant's restorable window, as
//! a [`ListReport`] (the CLI prints it, or its JSON). It reads manifests and listings only.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::repository::{Repository, RepositoryError};
use crate::restore::{PlanError, plan};
use crate::retry::{Classify, ErrorClass};

#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("tenant {tenant} is in no snapshot of {repository}")]
    UnknownTenant { tenant: String, repository: String },
}

impl Classify for ListError {
    fn class(&self) -> ErrorClass {
        match self {
            ListError::Repository(e) => e.class(),
            ListError::Plan(e) => e.class(),
            ListError::UnknownTenant { .. } => ErrorClass::Usage,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SnapshotLine {
    pub id: String,
    pub consistent_time: DateTime<Utc>,
    pub consistent_lsn: String,
    pub tenants: usize,
    pub all_tenants: bool,
    pub bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_rows: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct ListReport {
    pub repository: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<crate::restore::Window>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamLine>,
    pub snapshots: Vec<SnapshotLine>,
}

#[derive(Debug, Serialize)]
pub struct StreamLine {
    pub slot: String,
    pub since_lsn: String,
    pub durable_lsn: String,
    pub covered_until: DateTime<Utc>,
    pub packs: usize,
    pub bytes: u64,
    /// Packs a stream index object covers (the rest are read through their footers).
    pub indexed_packs: usize,
    /// Streams `init` replaced whose packs retention has not deleted yet, oldest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub earlier: Vec<EarlierStreamLine>,
}

#[derive(Debug, Serialize)]
pub struct EarlierStreamLine {
    pub slot: String,
    pub since_lsn: String,
    pub durable_lsn: String,
    pub covered_until: DateTime<Utc>,
}

/// Every snapshot (those holding `org` only, when given), the stream, and `org`'s window.
pub async fn run(repo: &Repository, org: Option<String>) -> Result<ListReport, ListError> {
    let mut snapshots = Vec::new();
    for id in repo.snapshots().await? {
        let m = match repo.manifest(&id).await {
            Ok(m) => m,
            // Retention (of a running daemon) deleted it since the listing.
            Err(crate::repository::RepositoryError::NoSuchSnapshot(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let tenant = org.as_ref().and_then(|o| m.tenants.get(o));
        if org.is_some() && tenant.is_none() {
            continue;
        }
        snapshots.push(SnapshotLine {
            id: m.id.to_string(),
            consistent_time: m.consistent_time,
            consistent_lsn: m.consistent_lsn.to_string(),
            tenants: m.tenants.len(),
            all_tenants: m.all_tenants,
            bytes: m.objects().map(|o| o.bytes).sum(),
            tenant_rows: tenant.map(|t| t.total_rows()),
            tenant_bytes: tenant.map(|t| t.object.bytes),
        });
    }
    let state = repo.stream_state().await?;
    let spans = state.spans();
    let stream = state.progress.as_ref().map(|p| StreamLine {
        slot: p.slot.clone(),
        since_lsn: p.since_lsn.to_string(),
        durable_lsn: state.durable().unwrap_or(p.durable_lsn).to_string(),
        covered_until: p.covered_until,
        packs: state.packs.len(),
        bytes: state.packs.iter().map(|p| p.size).sum(),
        indexed_packs: state
            .packs
            .iter()
            .filter(|p| state.indexes.iter().any(|i| i.covers(p)))
            .count(),
        earlier: spans
            .iter()
            .filter(|s| s.next.is_some() && s.start <= s.durable) // retention left some of it
            .map(|s| EarlierStreamLine {
                slot: s.slot.clone(),
                since_lsn: s.since.to_string(),
                durable_lsn: s.durable.to_string(),
                covered_until: s.covered_until,
            })
            .collect(),
    });
    let window = match &org {
        Some(o) => {
            let (manifests, _) = plan::tenant_snapshots(repo, o).await?;
            (!manifests.is_empty()).then(|| plan::window_of(&manifests, &spans))
        }
        None => None,
    };
    if let (Some(o), None) = (&org, &window) {
        return Err(ListError::UnknownTenant {
            tenant: o.clone(),
            repository: repo.location(),
        });
    }
    Ok(ListReport {
        repository: repo.location(),
        tenant: org,
        window,
        stream,
        snapshots,
    })
}
