//! `verify`: every object the repository holds, checked without the identity (stored bytes
//! against their digests, the chain of packs, the stream index against the packs' footers,
//! routing checkpoints) or, with it, decrypted and parsed. It reads only; what it finds is a [`VerifyReport`] for the caller to print.

use std::collections::BTreeMap;

use futures::StreamExt;
use serde::Serialize;

use crate::progress::{Progress, Unit};
use crate::repository::pack::PackFooter;
use crate::repository::tenant_keys::Keyring;
use crate::repository::{PackRef, Part, Repository, RepositoryError, StreamState, index};
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
    /// `checked` by kind of object, so that the total adds up to what the progress bars
    /// showed (snapshot objects, packs) plus what they do not (manifests, checkpoints). The
    /// stream index objects are the checks counted without a kind: see [`Self::breakdown`].
    pub kinds: BTreeMap<Kind, usize>,
    pub failures: Vec<String>,
    /// Forgotten tenant → its objects (archives, sections) that no key opens any more, on
    /// purpose: their digests are checked, they are not decrypted.
    pub forgotten: BTreeMap<String, Forgotten>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Forgotten {
    pub at: chrono::DateTime<chrono::Utc>,
    pub by: String,
    pub objects: usize,
}

/// What kind of object a check was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Manifest,
    SnapshotObject,
    Pack,
    StreamIndex,
    RoutingCheckpoint,
}

impl Kind {
    fn name(self, n: usize) -> String {
        let (one, many) = match self {
            Kind::Manifest => ("manifest", "manifests"),
            Kind::SnapshotObject => ("snapshot object", "snapshot objects"),
            Kind::Pack => ("pack", "packs"),
            Kind::StreamIndex => ("stream index", "stream indexes"),
            Kind::RoutingCheckpoint => ("routing checkpoint", "routing checkpoints"),
        };
        format!("{n} {}", if n == 1 { one } else { many })
    }
}

impl VerifyReport {
    /// A check of a stream index object (the one kind counted without [`Kind`]).
    fn record(&mut self, result: Result<(), RepositoryError>) {
        self.checked += 1;
        if let Err(e) = result {
            self.failures.push(e.to_string());
        }
    }

    fn record_kind(&mut self, kind: Kind, result: Result<(), RepositoryError>) {
        self.count(kind);
        if let Err(e) = result {
            self.failures.push(e.to_string());
        }
    }

    fn forgotten_object(&mut self, keyring: &Keyring, sealed_to: Option<&str>) {
        if let Some(record) = keyring.forgotten(sealed_to) {
            let last = record.last();
            self.forgotten
                .entry(record.tenant.clone())
                .or_insert_with(|| Forgotten {
                    at: last.at,
                    by: last.by.clone(),
                    objects: 0,
                })
                .objects += 1;
        }
    }

    fn count(&mut self, kind: Kind) {
        self.checked += 1;
        *self.kinds.entry(kind).or_default() += 1;
    }

    /// `checked` by kind, e.g. "1 manifest, 22 snapshot objects, 1 pack".
    pub fn breakdown(&self) -> String {
        let mut kinds = self.kinds.clone();
        let indexes = self.checked - kinds.values().sum::<usize>();
        if indexes > 0 {
            kinds.insert(Kind::StreamIndex, indexes);
        }
        if kinds.is_empty() {
            return "nothing stored yet".into();
        }
        kinds
            .iter()
            .map(|(k, n)| k.name(*n))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Checks the snapshots (of `org` only, with the global objects, when given), the change
/// stream's packs and the routing checkpoints. With `identities`, decrypts and parses too.
pub async fn run(
    repo: &Repository,
    org: Option<&str>,
    keyring: Option<&Keyring>,
) -> Result<VerifyReport, VerifyError> {
    let mut report = VerifyReport::default();
    snapshots(repo, org, keyring, &mut report).await?;
    stream(repo, org, keyring, &mut report).await?;
    checkpoints(repo, &mut report).await?;
    Ok(report)
}

/// Every snapshot's manifest (its own digest and id), then its objects.
async fn snapshots(
    repo: &Repository,
    org: Option<&str>,
    keyring: Option<&Keyring>,
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
            Ok(m) => {
                report.count(Kind::Manifest);
                m
            }
            Err(e) => {
                report.record_kind(Kind::Manifest, Err(e));
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
            let sealed_to = manifest.object(part).and_then(|o| o.sealed_to.as_deref());
            let result = match keyring {
                Some(k) if k.forgotten(sealed_to).is_some() => {
                    report.forgotten_object(k, sealed_to);
                    repo.check_part(&manifest, part, None).await
                }
                Some(k) => {
                    repo.check_part(&manifest, part, Some(k.identities_for(sealed_to)))
                        .await
                }
                None => repo.check_part(&manifest, part, None).await,
            };
            report.record_kind(Kind::SnapshotObject, result);
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
    keyring: Option<&Keyring>,
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
    // Window by window (the large windows, and the small ones after them): the footers of a
    // window's packs are checked, then every index within the window is compared with them, so
    // memory holds one window. Packs no index covers come last.
    let chosen = index::covering(&state.indexes, &state.packs);
    let mut rest: Vec<&PackRef> = state.packs.iter().collect();
    for window in &chosen {
        let (covered, others): (Vec<&PackRef>, Vec<&PackRef>) =
            rest.into_iter().partition(|p| window.covers(p));
        rest = others;
        let footers = packs(repo, &covered, org, keyring, report, &progress).await;
        let within = state
            .indexes
            .iter()
            .filter(|i| window.start <= i.start && i.end <= window.end);
        for index in within {
            report.checked += 1;
            match repo.stream_index_footers(index).await {
                Ok(recorded) => {
                    for problem in disagreements(&state, &covered, &footers, &recorded) {
                        report
                            .failures
                            .push(format!("stream index {}: {problem}", index.key));
                    }
                }
                Err(e) => report.failures.push(e.to_string()),
            }
        }
    }
    // Indexes outside every chosen window (only overlapping leftovers of a failed write) are
    // still read: a damaged one is reported.
    for index in state
        .indexes
        .iter()
        .filter(|i| !chosen.iter().any(|w| w.start <= i.start && i.end <= w.end))
    {
        report.record(repo.stream_index_footers(index).await.map(drop));
    }
    packs(repo, &rest, org, keyring, report, &progress).await;
    progress.finish();
    Ok(())
}

/// How an index's record of its packs differs from the packs as listed and their footers as
/// read (`None`: the pack failed its own check, reported already).
fn disagreements(
    state: &StreamState,
    listed: &[&PackRef],
    footers: &[Option<PackFooter>],
    recorded: &[(PackRef, PackFooter)],
) -> Vec<String> {
    let kept_from = state.start().unwrap_or_default();
    recorded
        .iter()
        .filter_map(|(pack, footer)| {
            let found = listed.iter().position(|p| p.start == pack.start);
            match found.map(|i| (listed[i], &footers[i])) {
                // Retention deleted it.
                None if pack.end <= kept_from => None,
                None => Some(format!(
                    "names pack {}, which is missing (deleted?)",
                    pack.key
                )),
                Some((p, _)) if p.size != pack.size || p.end != pack.end => Some(format!(
                    "recorded {} bytes for {}, which has {}: the pack was replaced",
                    pack.size, p.key, p.size
                )),
                Some((p, Some(f))) if f != footer => {
                    Some(format!("disagrees with the footer of {}", p.key))
                }
                Some(_) => None,
            }
        })
        .collect()
}

/// Checks `list` concurrently; returns each pack's footer (`None` where it failed).
async fn packs(
    repo: &Repository,
    list: &[&PackRef],
    org: Option<&str>,
    keyring: Option<&Keyring>,
    report: &mut VerifyReport,
    progress: &Progress,
) -> Vec<Option<PackFooter>> {
    let checks: Vec<_> = list
        .iter()
        .map(|p| async move { (p.size, pack(repo, p, org, keyring).await) })
        .collect();
    let results: Vec<_> = futures::stream::iter(checks)
        .buffered(repo.concurrency())
        .collect()
        .await;
    results
        .into_iter()
        .map(|(size, result)| {
            progress.advance(size);
            let result = result.map(|(footer, forgotten)| {
                for sealed_to in forgotten {
                    report.forgotten_object(keyring.expect("only with keys"), Some(&sealed_to));
                }
                footer
            });
            let footer = result.as_ref().ok().cloned();
            report.record_kind(Kind::Pack, result.map(drop));
            footer
        })
        .collect()
}

/// One pack: its footer, its sections (the tenant's and the global ones with `org`; with
/// keys decrypted and parsed), and its routing region, which restores never read but a
/// restarted daemon rebuilds its routing state from. Also returns the keys of the sections
/// left sealed because their tenant was forgotten.
async fn pack(
    repo: &Repository,
    p: &PackRef,
    org: Option<&str>,
    keyring: Option<&Keyring>,
) -> Result<(PackFooter, Vec<String>), RepositoryError> {
    let footer = repo.pack_footer(p).await?;
    let mut forgotten = Vec::new();
    for (index, entry) in footer.sections.iter().enumerate() {
        if org.is_some() && entry.tenant.is_some() && entry.tenant.as_deref() != org {
            continue;
        }
        let sealed_to = entry.sealed_to.as_deref();
        match keyring {
            Some(k) if k.forgotten(sealed_to).is_none() => {
                let ids = k.identities_for(sealed_to);
                let mut rx = repo.pack_section(&p.key, index, entry, ids).await?;
                while let Some(m) = rx.recv().await {
                    m?;
                }
            }
            _ => {
                repo.verify_pack_section(&p.key, index, entry).await?;
                if keyring.is_some() {
                    forgotten.extend(sealed_to.map(str::to_string));
                }
            }
        }
    }
    if let Some(region) = &footer.routes {
        repo.pack_routes(&p.key, region).await?;
    }
    Ok((footer, forgotten))
}

/// Every routing checkpoint: a daemon restarts from the newest one before its durable LSN.
async fn checkpoints(repo: &Repository, report: &mut VerifyReport) -> Result<(), VerifyError> {
    for (_, key) in repo.routing_checkpoints().await? {
        match repo.routing_checkpoint(&key).await {
            // Retention deleted it since the listing.
            Err(RepositoryError::Storage(StorageError::NotFound { .. })) => {}
            result => report.record_kind(Kind::RoutingCheckpoint, result.map(drop)),
        }
    }
    Ok(())
}
