//! `list`: the repository's snapshots, its change stream, and a tenant's restorable window, as
//! a [`ListReport`]; `list --tenants`: every tenant with its window, as a [`TenantsReport`]
//! (the CLI prints them, or their JSON). It reads manifests, listings and the lease only.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::repository::{CaptureSeen, Manifest, Repository, RepositoryError, StreamState};
use crate::restore::{PlanError, plan};
use crate::retry::{Classify, ErrorClass};

#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(
        "tenant {tenant} is in no snapshot of {repository}: check the value (`updog-backup list --tenants` shows every tenant)"
    )]
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
    /// When `changes/progress.json` was last written.
    pub updated_at: DateTime<Utc>,
    /// Whether a daemon renewed its lease lately (`locks/daemon.json`).
    pub capturing: bool,
    /// The same, with when the daemon was last seen, in a sentence.
    pub capture: String,
    /// The lease of the daemon last active, if it still holds one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daemon: Option<crate::repository::Lease>,
}

/// `list --tenants`.
#[derive(Debug, Serialize)]
pub struct TenantsReport {
    pub repository: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamLine>,
    pub snapshots: usize,
    /// Every tenant a snapshot holds, by id.
    pub tenants: Vec<TenantLine>,
}

#[derive(Debug, Serialize)]
pub struct TenantLine {
    pub tenant: String,
    /// Rows and stored bytes in the newest snapshot holding the tenant.
    pub rows: u64,
    pub bytes: u64,
    pub snapshot: String,
    pub window: crate::restore::Window,
    /// When `forget` erased the tenant, if its newest archive is sealed to an erased key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forgotten_at: Option<chrono::DateTime<chrono::Utc>>,
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
    let stream = stream_line(repo, &state).await?;
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

async fn stream_line(
    repo: &Repository,
    state: &StreamState,
) -> Result<Option<StreamLine>, ListError> {
    let Some(p) = state.progress.as_ref() else {
        return Ok(None);
    };
    let seen = CaptureSeen {
        daemon: repo.lease().await?,
        progress_updated_at: Some(p.updated_at),
    };
    let spans = state.spans();
    Ok(Some(StreamLine {
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
        updated_at: p.updated_at,
        capturing: seen.running(Utc::now()),
        capture: seen.describe(Utc::now()),
        daemon: seen.daemon,
    }))
}

/// Every tenant the snapshots hold: its size in the newest snapshot holding it, and its
/// window, computed as a restore would (`plan::tenant_snapshots` for a tenant some snapshot
/// holds: the snapshots holding it and those of all tenants), from one read of each manifest.
pub async fn tenants(repo: &Repository) -> Result<TenantsReport, ListError> {
    let mut manifests: Vec<Manifest> = Vec::new();
    for id in repo.snapshots().await? {
        match repo.manifest(&id).await {
            Ok(m) => manifests.push(m),
            // Retention (of a running daemon) deleted it since the listing.
            Err(RepositoryError::NoSuchSnapshot(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let state = repo.stream_state().await?;
    let spans = state.spans();
    let mut erased = std::collections::HashMap::new();
    for record in crate::repository::tenant_keys::all_forgotten(repo).await? {
        let at = record.last().at;
        erased.extend(record.keys().map(|key| (key, at)));
    }
    let mut ids: Vec<&String> = manifests.iter().flat_map(|m| m.tenants.keys()).collect();
    ids.sort();
    ids.dedup();
    // Tenants with the same bases have the same window: most share every snapshot, so the
    // windows are computed once per set of bases, from manifests without their tenant maps.
    let skeletons: Vec<Manifest> = manifests
        .iter()
        .map(|m| Manifest {
            tenants: Default::default(),
            ..m.clone()
        })
        .collect();
    let mut windows: std::collections::HashMap<Vec<usize>, crate::restore::Window> =
        Default::default();
    let mut tenants = Vec::with_capacity(ids.len());
    for tenant in ids {
        let bases: Vec<usize> = (0..manifests.len())
            .filter(|&i| manifests[i].all_tenants || manifests[i].tenants.contains_key(tenant))
            .collect();
        let window = windows
            .entry(bases)
            .or_insert_with_key(|bases| {
                let chosen: Vec<Manifest> = bases.iter().map(|&i| skeletons[i].clone()).collect();
                plan::window_of(&chosen, &spans)
            })
            .clone();
        let (newest, archive) = manifests
            .iter()
            .rev()
            .find_map(|m| m.tenants.get(tenant).map(|a| (m, a)))
            .expect("the tenant came from a manifest");
        tenants.push(TenantLine {
            tenant: tenant.clone(),
            rows: archive.total_rows(),
            bytes: archive.object.bytes,
            snapshot: newest.id.to_string(),
            window,
            forgotten_at: archive
                .object
                .sealed_to
                .as_ref()
                .and_then(|key| erased.get(key).copied()),
        });
    }
    Ok(TenantsReport {
        repository: repo.location(),
        stream: stream_line(repo, &state).await?,
        snapshots: manifests.len(),
        tenants,
    })
}
