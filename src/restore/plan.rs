//! Restore planning: which snapshot and which packs serve `--org X --at T`, and the
//! restorable window.
//!
//! The base is the newest snapshot holding the tenant whose consistent time is at or before
//! T; the change stream that follows it then replays every transaction after its consistent
//! LSN that committed at or before T (PostgreSQL's inclusive `recovery_target_time`).
//!
//! A repository can hold several streams: when the slot is lost, `init` starts a new one from
//! a new snapshot, and the earlier streams' packs stay. A replay never crosses from one stream
//! into the next (nothing between them was captured), so the window is a list of ranges: from
//! each snapshot to the covered-until time of the stream that follows it, or only the
//! snapshot's own instant when none does. A repository without a change stream (only `backup`
//! was ever run) restores snapshots as they are, up to the newest one.

use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;

use crate::pg::Lsn;
use crate::repository::{Manifest, Repository, RepositoryError, SnapshotId};
use crate::repository::{PackRef, PackView, Span, StreamState};
use crate::retry::{Classify, ErrorClass};

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
        "tenant {tenant} is in none of the {snapshots} snapshot(s), and the change stream holds none of its changes: check the value (`updog-backup list --tenants` shows every tenant)"
    )]
    UnknownTenant { tenant: String, snapshots: usize },
    #[error(
        "{at} is outside the restorable window of tenant {tenant}: restorable instants are {window}; choose one of them with --at"
    )]
    OutsideWindow {
        tenant: String,
        at: String,
        window: Window,
    },
    #[error(
        "{at} is not stored yet (tenant {tenant}): the change stream covers until {covered_until}; {capture}"
    )]
    NotStoredYet {
        tenant: String,
        at: String,
        covered_until: String,
        /// Whether the daemon runs and what to do: wait, or start it.
        capture: String,
    },
    #[error("the change stream cannot replay after snapshot {snapshot}: {reason}")]
    Stream { snapshot: String, reason: String },
    #[error(
        "snapshot {snapshot} is at {}, but the change stream holds a transaction after its consistent LSN that committed at {} (LSN {lsn}), and covers only until {}: restoring the snapshot alone would leave it out. \
         Retry once the daemon covers {} (`updog-backup list` shows covered-until); if this persists, the snapshot's time disagrees with the stream: check the repository with `updog-backup verify`, and restore an earlier instant with --at",
        .at.to_rfc3339_opts(SecondsFormat::Micros, true),
        .committed.to_rfc3339_opts(SecondsFormat::Micros, true),
        .covered_until.to_rfc3339_opts(SecondsFormat::Micros, true),
        .at.to_rfc3339_opts(SecondsFormat::Micros, true)
    )]
    LeftOut {
        snapshot: String,
        at: DateTime<Utc>,
        lsn: Lsn,
        committed: DateTime<Utc>,
        covered_until: DateTime<Utc>,
    },
    #[error(
        "the definition of {} changed after {} (the last instant the backup knows it had the old one), and the stream does not say when: schema changes are not captured (`updog-backup check`); restore a point before that, or from a snapshot taken after the change (`updog-backup backup`)",
        .tables.join(", "),
        .from.to_rfc3339_opts(SecondsFormat::Micros, true)
    )]
    Reshaped {
        tables: Vec<String>,
        from: DateTime<Utc>,
    },
    #[error(
        "the change stream lacks the changes of {} after {} (a stream gap: they were not in the publication{}); restore a point before that, or from a snapshot taken after the publication covered them again (`updog-backup backup`)",
        .tables.join(", "),
        .from.map_or("the repository's start".to_string(), |t| t.to_rfc3339_opts(SecondsFormat::Micros, true)),
        .resolved.map_or(" and still are not".to_string(), |t| format!(" until {}", t.to_rfc3339_opts(SecondsFormat::Micros, true)))
    )]
    StreamGap {
        tables: Vec<String>,
        from: Option<DateTime<Utc>>,
        resolved: Option<DateTime<Utc>>,
    },
}

/// The instants a tenant can be restored to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Window {
    /// The first restorable instant.
    pub earliest: DateTime<Utc>,
    /// The last restorable instant (what `--latest` restores).
    pub covered_until: DateTime<Utc>,
    pub snapshots: usize,
    /// Every restorable instant, in disjoint ranges, oldest first: between two ranges no
    /// change stream was captured.
    pub ranges: Vec<Restorable>,
}

/// The instants from `from` to `to`, both included (the same instant: a snapshot alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Restorable {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

impl Window {
    pub fn contains(&self, at: DateTime<Utc>) -> bool {
        self.ranges.iter().any(|r| r.from <= at && at <= r.to)
    }
}

impl std::fmt::Display for Restorable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let time = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Micros, true);
        if self.from == self.to {
            write!(f, "{}", time(self.from))
        } else {
            write!(f, "{} .. {}", time(self.from), time(self.to))
        }
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, range) in self.ranges.iter().enumerate() {
            write!(f, "{}{range}", if i == 0 { "" } else { ", " })?;
        }
        write!(f, " ({} snapshot(s)", self.snapshots)?;
        if self.ranges.len() > 1 {
            write!(f, "; nothing was captured between these ranges")?;
        }
        write!(f, ")")
    }
}

#[derive(Debug)]
pub struct RestorePlan {
    pub manifest: Manifest,
    pub window: Window,
    /// What the tenant reads of each pack to replay after the snapshot, and up to when
    /// (`None`: the snapshot as it is).
    pub changes: Option<(Vec<PackView>, DateTime<Utc>)>,
}

/// Restoring `manifest` alone at `at` (its own instant, which `span`, the stream that follows
/// it, does not cover yet) is exact only if no transaction the stream holds after its
/// consistent LSN committed at or before `at`. One that did shows a snapshot time that
/// disagrees with the stream: briefly after a snapshot of a busy source, or for good if the
/// manifest is wrong.
async fn check_nothing_left_out(
    repo: &Repository,
    state: &StreamState,
    span: &Span,
    manifest: &Manifest,
    tenant: &str,
    at: DateTime<Utc>,
) -> Result<(), PlanError> {
    let from = manifest.consistent_lsn;
    let packs: Vec<PackRef> = state
        .packs
        .iter()
        .filter(|p| p.end > from && span.holds(p))
        .cloned()
        .collect();
    for view in repo.pack_views(state, &packs, Some(tenant)).await? {
        let left_out = view.sections.iter().map(|(_, s)| s).find_map(|s| {
            [(s.first_lsn, s.first_time), (s.last_lsn, s.last_time)]
                .into_iter()
                .find(|&(lsn, time)| lsn >= from && time <= at)
        });
        if let Some((lsn, committed)) = left_out {
            return Err(PlanError::LeftOut {
                snapshot: manifest.id.to_string(),
                at,
                lsn,
                committed,
                covered_until: span.covered_until,
            });
        }
    }
    Ok(())
}

/// Manifests a restore of `tenant` can start from, oldest first: those holding it, and
/// snapshots of all tenants without it (it had no rows then: a tenant created after a snapshot
/// starts empty there and its changes follow). None when no snapshot holds the tenant and the
/// change stream never saw it either: a mistyped tenant is an error, not an empty restore.
/// Also returns the number of snapshots in the repository.
pub async fn tenant_snapshots(
    repo: &Repository,
    tenant: &str,
) -> Result<(Vec<Manifest>, usize), PlanError> {
    let ids: Vec<SnapshotId> = repo.snapshots().await?;
    let total = ids.len();
    let mut out = Vec::new();
    let mut held = false;
    let reads: Vec<_> = ids.iter().map(|id| repo.manifest(id)).collect();
    let manifests: Vec<_> = futures::stream::iter(reads)
        .buffered(repo.concurrency())
        .collect()
        .await;
    for manifest in manifests {
        let manifest = match manifest {
            Ok(m) => m,
            // Retention (of a running daemon) deleted it since the listing.
            Err(RepositoryError::NoSuchSnapshot(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let holds = manifest.tenants.contains_key(tenant);
        held |= holds;
        if holds || manifest.all_tenants {
            out.push(manifest);
        }
    }
    // Asked only for a tenant no snapshot holds: the stream index's directories, and the
    // footers of the packs no index covers.
    if !held
        && !repo
            .stream_mentions(&repo.stream_state().await?, tenant)
            .await?
    {
        out.clear();
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
    let state = repo.stream_state().await?;
    let spans = state.spans();
    let window = window_of(&manifests, &spans);
    let at = match target {
        RestoreTarget::Latest => window.covered_until,
        RestoreTarget::At(at) if window.contains(at) => at,
        // Just after covered-until is a question of time (or of a stopped daemon), not a
        // wrong instant: say which, from the lease and progress.json.
        RestoreTarget::At(at)
            if state.progress.is_some()
                && at > window.covered_until
                && at <= Utc::now() + NOT_YET_SKEW =>
        {
            return Err(not_stored_yet(repo, tenant, at, &window).await?);
        }
        RestoreTarget::At(at) => {
            return Err(PlanError::OutsideWindow {
                tenant: tenant.into(),
                at: at.to_rfc3339_opts(SecondsFormat::Micros, true),
                window,
            });
        }
    };
    let chosen = manifests
        .iter()
        .rposition(|m| m.consistent_time <= at)
        .expect("every restorable instant is at or after the earliest snapshot");
    let manifest = manifests.swap_remove(chosen);
    // `window_of` makes every restorable instant after the base's own one covered by the
    // stream that follows the base.
    let changes = match spans.iter().find(|s| s.follows(manifest.consistent_lsn)) {
        Some(s) if at <= s.covered_until => {
            let packs = state
                .chain_in(s, manifest.consistent_lsn)
                .map_err(|reason| PlanError::Stream {
                    snapshot: manifest.id.to_string(),
                    reason,
                })?;
            let mut views = repo.pack_views(&state, &packs, Some(tenant)).await?;
            // A section whose every transaction the snapshot holds already (the first pack
            // after it begins before it) is not read at all.
            for view in &mut views {
                view.sections
                    .retain(|(_, s)| s.last_lsn >= manifest.consistent_lsn);
            }
            Some((views, at))
        }
        // The snapshot's own instant, which the stream does not cover yet: the snapshot alone.
        Some(s) => {
            check_nothing_left_out(repo, &state, s, &manifest, tenant, at).await?;
            None
        }
        // No stream follows the snapshot: only its own instant is in the window.
        None => None,
    };
    if changes.is_some()
        && let Some(gap) = repo
            .gaps()
            .await?
            .into_iter()
            .find(|g| g.breaks(manifest.consistent_lsn, at))
    {
        if gap.reshaped {
            return Err(PlanError::Reshaped {
                tables: gap.tables,
                from: gap.from_time.unwrap_or_default(),
            });
        }
        return Err(PlanError::StreamGap {
            tables: gap.tables,
            from: gap.from_time,
            resolved: gap.resolved_at,
        });
    }
    Ok(RestorePlan {
        manifest,
        window,
        changes,
    })
}

/// An instant this far after now still counts as "not stored yet" rather than outside the
/// window: clocks of hosts differ by seconds.
const NOT_YET_SKEW: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

async fn not_stored_yet(
    repo: &Repository,
    tenant: &str,
    at: DateTime<Utc>,
    window: &Window,
) -> Result<PlanError, PlanError> {
    let seen = repo.capture_seen().await?;
    let now = Utc::now();
    let advice = if seen.running(now) {
        "retry in a few seconds (the daemon stores what the source committed every stream.flush_interval)"
    } else {
        "start `updog-backup daemon` (if it stopped on an error, its log says which) and retry, or restore up to covered-until with --latest"
    };
    Ok(PlanError::NotStoredYet {
        tenant: tenant.into(),
        at: at.to_rfc3339_opts(SecondsFormat::Micros, true),
        covered_until: window
            .covered_until
            .to_rfc3339_opts(SecondsFormat::Micros, true),
        capture: format!("{}: {advice}", seen.describe(now)),
    })
}

/// The instants `plan` restores: from each snapshot (oldest first) to the covered-until time
/// of the stream that follows it, or its own instant alone when none does; from the next
/// snapshot's instant on, that snapshot is the base instead. Without any stream, each snapshot
/// stands as it is until the next one.
pub fn window_of(manifests: &[Manifest], spans: &[Span]) -> Window {
    let mut ranges: Vec<Restorable> = Vec::new();
    for (i, m) in manifests.iter().enumerate() {
        let from = m.consistent_time;
        let next = manifests.get(i + 1);
        let mut to = match spans.iter().find(|s| s.follows(m.consistent_lsn)) {
            Some(s) => s.covered_until.max(from),
            None if spans.is_empty() => next.map_or(from, |n| n.consistent_time),
            None => from,
        };
        if let Some(next) = next {
            to = to.min(next.consistent_time).max(from);
        }
        match ranges.last_mut() {
            Some(last) if from <= last.to => last.to = last.to.max(to),
            _ => ranges.push(Restorable { from, to }),
        }
    }
    Window {
        earliest: ranges[0].from,
        covered_until: ranges[ranges.len() - 1].to,
        snapshots: manifests.len(),
        ranges,
    }
}

impl Classify for PlanError {
    fn class(&self) -> ErrorClass {
        match self {
            PlanError::Repository(e) => e.class(),
            // The stream has not reached the instant yet: asking again shortly succeeds.
            PlanError::LeftOut { .. } | PlanError::NotStoredYet { .. } => ErrorClass::Transient,
            // The instant or the tenant asked for: the message says which ones exist.
            PlanError::NoSnapshots
            | PlanError::UnknownTenant { .. }
            | PlanError::OutsideWindow { .. }
            | PlanError::Stream { .. }
            | PlanError::StreamGap { .. }
            | PlanError::Reshaped { .. } => ErrorClass::Usage,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use chrono::{Duration, TimeZone};

    use super::*;
    use crate::repository::StreamProgress;
    use crate::repository::keys;
    use crate::repository::manifest::{ArchiveEntry, StoredObject};
    use crate::repository::pack::{self, PackFooter, SectionEntry};
    use crate::storage::{MemoryStore, ObjectStore, PutMode};

    const TENANT: &str = "t1";
    const SNAPSHOT_LSN: Lsn = Lsn(0x100);
    const DURABLE: Lsn = Lsn(0x300);

    fn snapshot_time() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 26, 12, 0, 0).unwrap()
    }

    fn manifest(time: DateTime<Utc>, lsn: Lsn) -> Manifest {
        let id = SnapshotId::new(time, lsn);
        let object = |key| StoredObject {
            key,
            bytes: 1,
            sha256: String::new(),
            sealed_to: None,
        };
        let archive = |key| ArchiveEntry {
            object: object(key),
            rows: BTreeMap::new(),
        };
        Manifest {
            format_version: crate::repository::FORMAT_VERSION,
            id: id.clone(),
            system_identifier: "1".into(),
            database: "d".into(),
            server_version_num: 150_000,
            tenant_column: "organization_id".into(),
            tenant_type: "text".into(),
            consistent_lsn: lsn,
            consistent_time: time,
            started_at: time,
            finished_at: time,
            all_tenants: true,
            tables: vec![],
            sequences: vec![],
            schema: object(keys::schema(&id)),
            global: archive(keys::global(&id)),
            tenants: BTreeMap::from([(TENANT.to_string(), archive(keys::tenant(&id, TENANT)))]),
            depends_on: Default::default(),
        }
    }

    /// The progress of a stream that began at `since` and stored everything before `durable`.
    fn progress(since: Lsn, durable: Lsn, covered_until: DateTime<Utc>) -> StreamProgress {
        StreamProgress {
            format_version: crate::repository::FORMAT_VERSION,
            slot: "s".into(),
            since_lsn: since,
            durable_lsn: durable,
            last_pack_end: Some(durable),
            covered_until,
            updated_at: Utc::now(),
            earlier: vec![],
        }
    }

    /// Stores the pack `[start, end)` holding one transaction of the tenant.
    async fn put_pack(
        store: &Arc<dyn ObjectStore>,
        start: Lsn,
        end: Lsn,
        (lsn, committed): (Lsn, DateTime<Utc>),
    ) {
        let section = SectionEntry {
            tenant: Some(TENANT.into()),
            offset: 0,
            length: 4,
            sha256: String::new(),
            first_lsn: lsn,
            last_lsn: lsn,
            first_time: committed,
            last_time: committed,
            transactions: 1,
            changes: 1,
            sealed_to: None,
        };
        let footer = PackFooter {
            format_version: crate::repository::FORMAT_VERSION,
            start_lsn: start,
            end_lsn: end,
            covered_until: committed,
            sections: vec![section],
            routes: None,
        };
        let mut bytes = b"sect".to_vec();
        bytes.extend_from_slice(&footer.encode());
        store
            .put_bytes(&pack::key(start, end), bytes.into(), PutMode::CreateNew)
            .await
            .unwrap();
    }

    /// A repository with one snapshot, and a stream that holds it and one transaction of the
    /// tenant after it, committed at `committed`, but covers only until 10 s before it.
    async fn repository(committed: DateTime<Utc>) -> Repository {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let repo = Repository::new(store.clone());
        repo.put_manifest(&manifest(snapshot_time(), SNAPSHOT_LSN))
            .await
            .unwrap();
        let covered = snapshot_time() - Duration::seconds(10);
        repo.put_stream_progress(&progress(SNAPSHOT_LSN, DURABLE, covered))
            .await
            .unwrap();
        put_pack(&store, SNAPSHOT_LSN, DURABLE, (Lsn(0x150), committed)).await;
        repo
    }

    /// The snapshot's own instant is restored from the snapshot alone while the stream has not
    /// covered it: right when what the stream holds after the snapshot committed after it.
    #[tokio::test]
    async fn the_snapshot_alone_serves_its_own_instant() {
        let later = snapshot_time() + Duration::seconds(1);
        let plan = plan(&repository(later).await, TENANT, RestoreTarget::Latest)
            .await
            .unwrap();
        assert!(plan.changes.is_none());
        assert_eq!(plan.window.covered_until, snapshot_time());
    }

    /// A stored transaction after the snapshot's LSN that committed before its time (a
    /// manifest whose time is wrong) would be left out without a word: refused.
    #[tokio::test]
    async fn what_the_snapshot_alone_would_leave_out_is_refused() {
        let earlier = snapshot_time() - Duration::seconds(5);
        let refused = plan(&repository(earlier).await, TENANT, RestoreTarget::Latest)
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, PlanError::LeftOut { lsn, committed, .. }
                if *lsn == Lsn(0x150) && *committed == earlier),
            "{refused}"
        );
        assert!(
            refused.to_string().contains("would leave it out"),
            "{refused}"
        );
    }

    /// `init` restarted the stream (its slot was lost): the old stream's instants replay from
    /// the old snapshot with the old packs only, the new stream's from the new snapshot, and
    /// an instant between them (nothing captured) is refused with both ranges.
    #[tokio::test]
    async fn an_earlier_stream_stays_restorable_and_is_never_crossed() {
        let t = |seconds| snapshot_time() + Duration::seconds(seconds);
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let repo = Repository::new(store.clone());
        repo.put_manifest(&manifest(t(0), Lsn(0x100)))
            .await
            .unwrap();
        repo.put_stream_progress(&progress(Lsn(0x100), Lsn(0x200), t(60)))
            .await
            .unwrap();
        put_pack(&store, Lsn(0x100), Lsn(0x200), (Lsn(0x150), t(30))).await;
        // Stored just before the slot was lost, after the last rewrite of the progress.
        put_pack(&store, Lsn(0x200), Lsn(0x300), (Lsn(0x250), t(50))).await;

        // What `init` does: a new snapshot, a new stream, the old one kept.
        let old = repo.stream_state().await.unwrap();
        let mut new = old.restart("s2", Lsn(0x500));
        assert_eq!(new.earlier.len(), 1);
        assert_eq!(new.earlier[0].durable_lsn, Lsn(0x300));
        assert_eq!(new.earlier[0].last_pack_end, Some(Lsn(0x300)));
        repo.put_manifest(&manifest(t(120), Lsn(0x500)))
            .await
            .unwrap();
        put_pack(&store, Lsn(0x500), Lsn(0x600), (Lsn(0x550), t(150))).await;
        (new.durable_lsn, new.last_pack_end, new.covered_until) =
            (Lsn(0x600), Some(Lsn(0x600)), t(180));
        repo.put_stream_progress(&new).await.unwrap();

        let replays = async |at| {
            let plan = plan(&repo, TENANT, RestoreTarget::At(at)).await.unwrap();
            let (packs, _) = plan.changes.expect("changes to replay");
            let packs: Vec<_> = packs
                .iter()
                .map(|v| (v.pack.start.0, v.pack.end.0))
                .collect();
            (plan.manifest.consistent_lsn, packs, plan.window)
        };
        let (base, packs, window) = replays(t(55)).await;
        assert_eq!(base, Lsn(0x100));
        assert_eq!(packs, vec![(0x100, 0x200), (0x200, 0x300)]);
        let ranges: Vec<_> = window.ranges.iter().map(|r| (r.from, r.to)).collect();
        assert_eq!(ranges, vec![(t(0), t(60)), (t(120), t(180))]);
        let (base, packs, _) = replays(t(150)).await;
        assert_eq!(base, Lsn(0x500));
        assert_eq!(packs, vec![(0x500, 0x600)]);

        let refused = plan(&repo, TENANT, RestoreTarget::At(t(90)))
            .await
            .unwrap_err();
        assert!(
            matches!(refused, PlanError::OutsideWindow { .. }),
            "{refused}"
        );
        let message = refused.to_string();
        for range in &window.ranges {
            assert!(message.contains(&range.to_string()), "{message}");
        }
        assert!(
            message.contains("nothing was captured between"),
            "{message}"
        );
    }
}
