//! Retention: keep the newest `schedule.keep_snapshots` snapshots and exactly what their
//! restore windows need.
//!
//! A restore at T starts from the newest snapshot at or before T and replays packs from that
//! snapshot's consistent LSN, so once the oldest kept snapshot is at LSN L, every older
//! snapshot and every pack that ends at or before L serves no kept window. Packs are cut a
//! little earlier, at the newest routing checkpoint at or before L: a daemon restart rebuilds
//! its routing maps from a checkpoint plus the packs after it.
//!
//! Deletion order keeps every reader consistent: a snapshot's manifest goes first (it stops
//! being visible before any of its objects disappear); `changes/retained.json` is written
//! before the first pack goes (readers see where the kept chain starts, not a gap); the
//! routing checkpoints the kept packs no longer need go last. The newest snapshot and every
//! pack after the oldest kept one are never touched.

use futures::{StreamExt, TryStreamExt};

use crate::pg::Lsn;
use crate::repository::{IndexRef, PackRef};
use crate::repository::{Repository, RepositoryError, SnapshotId, keys};
use crate::storage::ObjectMeta;

/// What a prune deletes, in the order it deletes it.
#[derive(Debug, Default)]
pub struct PrunePlan {
    /// Snapshots kept, oldest first.
    pub kept: Vec<SnapshotId>,
    /// Complete snapshots to delete, with their objects (manifest first).
    pub snapshots: Vec<(SnapshotId, Vec<ObjectMeta>)>,
    /// Objects of snapshots that never got a manifest and started before the oldest kept one.
    pub abandoned: Vec<ObjectMeta>,
    pub packs: Vec<PackRef>,
    /// Where the kept chain of packs starts once `packs` are gone.
    pub packs_from: Option<Lsn>,
    /// Stream index objects of deleted packs only.
    pub indexes: Vec<IndexRef>,
    pub checkpoints: Vec<String>,
}

impl PrunePlan {
    pub fn objects(&self) -> usize {
        self.snapshots.iter().map(|(_, o)| o.len()).sum::<usize>()
            + self.abandoned.len()
            + self.packs.len()
            + self.indexes.len()
            + self.checkpoints.len()
    }

    pub fn bytes(&self) -> u64 {
        self.snapshots
            .iter()
            .flat_map(|(_, o)| o)
            .chain(&self.abandoned)
            .map(|o| o.size)
            .sum::<u64>()
            + self.packs.iter().map(|p| p.size).sum::<u64>()
            + self.indexes.iter().map(|i| i.size).sum::<u64>()
    }
}

/// What `keep` snapshots leave to delete. Reads only listings and one manifest.
pub async fn plan(repo: &Repository, keep: usize) -> Result<PrunePlan, RepositoryError> {
    let keep = keep.max(1);
    let by_snapshot = repo.snapshot_objects().await?;
    let complete: Vec<SnapshotId> = by_snapshot
        .iter()
        .filter(|(id, objects)| objects.iter().any(|o| o.key == keys::manifest(id)))
        .map(|(id, _)| id.clone())
        .collect();
    let mut plan = PrunePlan::default();
    if complete.len() <= keep {
        plan.kept = complete;
        return Ok(plan);
    }
    plan.kept = complete[complete.len() - keep..].to_vec();
    let oldest_kept = plan.kept[0].clone();
    for (id, mut objects) in by_snapshot {
        if id >= oldest_kept {
            break;
        }
        let manifest = keys::manifest(&id);
        if objects.iter().any(|o| o.key == manifest) {
            objects.sort_by_key(|o| o.key != manifest); // the manifest first
            plan.snapshots.push((id, objects));
        } else {
            plan.abandoned.extend(objects);
        }
    }

    let horizon = repo.manifest(&oldest_kept).await?.consistent_lsn;
    let checkpoints = repo.routing_checkpoints().await?;
    let Some(cut) = checkpoints
        .iter()
        .map(|(lsn, _)| *lsn)
        .filter(|lsn| *lsn <= horizon)
        .max()
    else {
        return Ok(plan); // no checkpoint to rebuild routing from: keep every pack
    };
    let stream = repo.stream_state().await?;
    plan.packs = stream.packs.into_iter().filter(|p| p.end <= cut).collect();
    plan.packs_from = plan.packs.iter().map(|p| p.end).max();
    plan.indexes = stream
        .indexes
        .into_iter()
        .filter(|i| i.end <= cut)
        .collect();
    plan.checkpoints = checkpoints
        .into_iter()
        .filter(|(lsn, _)| *lsn < cut)
        .map(|(_, key)| key)
        .collect();
    Ok(plan)
}

/// Deletes what `plan` lists, in its order; `deleted` is told each object (key, size) as it
/// goes.
/// Returns the number of objects deleted.
pub async fn apply(
    repo: &Repository,
    plan: &PrunePlan,
    mut deleted: impl FnMut(&str, u64),
) -> Result<usize, RepositoryError> {
    let mut count = 0;
    // Every old manifest before any other object: no reader sees a half-deleted snapshot.
    let snapshots = plan
        .snapshots
        .iter()
        .map(|(_, objects)| &objects[0])
        .chain(plan.snapshots.iter().flat_map(|(_, objects)| &objects[1..]))
        .chain(&plan.abandoned)
        .map(|o| (o.key.as_str(), o.size));
    for (key, size) in snapshots {
        repo.delete_object(key).await?;
        deleted(key, size);
        count += 1;
    }
    if let Some(from) = plan.packs_from {
        repo.put_retained(from).await?;
    }
    // Nothing reads these packs any more (the kept chain starts after them): a day of packs is
    // thousands of requests, made concurrently.
    let deletes: Vec<_> = plan
        .packs
        .iter()
        .map(|p| (p.key.as_str(), p.size))
        .chain(plan.indexes.iter().map(|i| (i.key.as_str(), i.size)))
        .map(|(key, size)| async move { repo.delete_object(key).await.map(|()| (key, size)) })
        .collect();
    let mut done = futures::stream::iter(deletes).buffer_unordered(repo.concurrency());
    while let Some((key, size)) = done.try_next().await? {
        deleted(key, size);
        count += 1;
    }
    for key in &plan.checkpoints {
        repo.delete_object(key).await?;
        deleted(key, 0);
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::repository::StreamProgress;
    use crate::repository::manifest::ArchiveEntry;
    use crate::repository::pack;
    use crate::repository::routes;
    use crate::repository::{Manifest, StoredObject};
    use crate::storage::{MemoryStore, ObjectStore, PutMode};

    async fn put(store: &Arc<dyn ObjectStore>, key: &str) {
        store
            .put_bytes(key, bytes::Bytes::from_static(b"x"), PutMode::Overwrite)
            .await
            .unwrap();
    }

    async fn snapshot(repo: &Repository, hour: u32, lsn: u64, complete: bool) -> SnapshotId {
        let time = Utc.with_ymd_and_hms(2026, 11, 26, hour, 0, 0).unwrap();
        let id = SnapshotId::new(time, Lsn(lsn));
        put(repo.store(), &keys::schema(&id)).await;
        put(repo.store(), &keys::tenant(&id, "t1")).await;
        if complete {
            let object = |key: String| StoredObject {
                key,
                bytes: 1,
                sha256: String::new(),
                sealed_to: None,
            };
            let manifest = Manifest {
                format_version: crate::repository::FORMAT_VERSION,
                id: id.clone(),
                system_identifier: "1".into(),
                database: "d".into(),
                server_version_num: 150000,
                tenant_column: "organization_id".into(),
                tenant_type: "uuid".into(),
                consistent_lsn: Lsn(lsn),
                consistent_time: time,
                started_at: time,
                finished_at: time,
                all_tenants: true,
                tables: vec![],
                sequences: vec![],
                schema: object(keys::schema(&id)),
                global: ArchiveEntry {
                    object: object(keys::global(&id)),
                    rows: Default::default(),
                },
                tenants: Default::default(),
                depends_on: Default::default(),
            };
            repo.put_manifest(&manifest).await.unwrap();
        }
        id
    }

    #[tokio::test]
    async fn keeps_the_newest_snapshots_and_the_packs_their_windows_need() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let repo = Repository::new(store.clone());
        repo.put_stream_progress(&StreamProgress {
            format_version: crate::repository::FORMAT_VERSION,
            slot: "s".into(),
            since_lsn: Lsn(100),
            durable_lsn: Lsn(1000),
            last_pack_end: Some(Lsn(1000)),
            covered_until: Utc::now(),
            updated_at: Utc::now(),
            earlier: vec![],
        })
        .await
        .unwrap();
        let s1 = snapshot(&repo, 1, 100, true).await;
        let abandoned = snapshot(&repo, 2, 250, false).await;
        let s2 = snapshot(&repo, 3, 300, true).await;
        let s3 = snapshot(&repo, 4, 600, true).await;
        let s4 = snapshot(&repo, 5, 900, true).await;
        let in_progress = snapshot(&repo, 6, 950, false).await;
        for (a, b) in [(100, 200), (200, 400), (400, 500), (500, 700), (700, 1000)] {
            put(&store, &pack::key(Lsn(a), Lsn(b))).await;
        }
        for lsn in [100, 400, 550, 800] {
            put(&store, &routes::checkpoint_key(Lsn(lsn))).await;
        }

        let plan = plan(&repo, 2).await.unwrap();
        assert_eq!(plan.kept, vec![s3.clone(), s4.clone()]);
        let gone: Vec<_> = plan.snapshots.iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(gone, vec![s1.clone(), s2.clone()]);
        assert!(
            plan.snapshots
                .iter()
                .all(|(id, o)| o[0].key == keys::manifest(id))
        );
        assert!(
            plan.abandoned
                .iter()
                .all(|o| o.key.contains(&abandoned.to_string()))
        );
        // Oldest kept snapshot at 600; newest checkpoint at or before it 550: packs ending
        // at or before 550 go, the one spanning it stays.
        let packs: Vec<_> = plan.packs.iter().map(|p| (p.start.0, p.end.0)).collect();
        assert_eq!(packs, vec![(100, 200), (200, 400), (400, 500)]);
        assert_eq!(plan.packs_from, Some(Lsn(500)));
        assert_eq!(
            plan.checkpoints,
            vec![
                routes::checkpoint_key(Lsn(100)),
                routes::checkpoint_key(Lsn(400))
            ]
        );

        let n = apply(&repo, &plan, |_, _| {}).await.unwrap();
        assert_eq!(n, plan.objects());
        assert_eq!(repo.snapshots().await.unwrap(), vec![s3.clone(), s4]);
        assert!(
            !store
                .list(&keys::snapshot_prefix(&in_progress))
                .await
                .unwrap()
                .is_empty()
        );
        let state = repo.stream_state().await.unwrap();
        assert_eq!(state.start(), Some(Lsn(500)));
        let chain = state.chain_from(Lsn(600)).unwrap();
        assert_eq!(chain.first().map(|p| p.start), Some(Lsn(500)));
        assert!(state.chain_from(Lsn(300)).is_err());

        // Nothing more to do.
        let again = super::plan(&repo, 2).await.unwrap();
        assert_eq!(again.objects(), 0);
    }

    /// Two streams (`init` restarted it after its slot was lost): retention deletes by LSN
    /// across both, and every stream's reference to packs it deleted stays harmless: each kept
    /// snapshot still finds the packs it replays, and no stream shows a gap.
    #[tokio::test]
    async fn streams_replaced_by_init_are_pruned_like_the_current_one() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let repo = Repository::new(store.clone());
        let mut progress = StreamProgress {
            format_version: crate::repository::FORMAT_VERSION,
            slot: "old".into(),
            since_lsn: Lsn(100),
            durable_lsn: Lsn(300),
            last_pack_end: Some(Lsn(300)),
            covered_until: Utc::now(),
            updated_at: Utc::now(),
            earlier: vec![],
        };
        repo.put_stream_progress(&progress).await.unwrap();
        progress = repo.stream_state().await.unwrap().restart("new", Lsn(500));
        (progress.durable_lsn, progress.last_pack_end) = (Lsn(700), Some(Lsn(700)));
        repo.put_stream_progress(&progress).await.unwrap();
        for (a, b) in [(100, 200), (200, 300), (500, 600), (600, 700)] {
            put(&store, &pack::key(Lsn(a), Lsn(b))).await;
        }
        // Every snapshot writes a routing checkpoint at its consistent LSN.
        let mut snapshots = Vec::new();
        for (hour, lsn) in [(1, 100), (2, 250), (4, 500), (5, 650)] {
            snapshot(&repo, hour, lsn, true).await;
            put(&store, &routes::checkpoint_key(Lsn(lsn))).await;
            snapshots.push(Lsn(lsn));
        }

        // Each kept snapshot replays within its own stream; every stream's kept packs tile it.
        let restorable = async |kept: &[Lsn]| {
            let state = repo.stream_state().await.unwrap();
            let spans = state.spans();
            for span in &spans {
                state.chain_in(span, span.start).unwrap();
            }
            for lsn in kept {
                let span = spans.iter().find(|s| s.follows(*lsn)).unwrap();
                state.chain_in(span, *lsn).unwrap();
            }
            state
        };

        // The oldest kept snapshot is in the old stream: the packs before it go.
        let pruned = plan(&repo, 3).await.unwrap();
        let packs: Vec<_> = pruned.packs.iter().map(|p| (p.start.0, p.end.0)).collect();
        assert_eq!(packs, vec![(100, 200)]);
        apply(&repo, &pruned, |_, _| {}).await.unwrap();
        let state = restorable(&snapshots[1..]).await;
        assert_eq!(state.spans()[0].start, Lsn(200));

        // Then in the new one: the old stream's packs are all gone, and with its snapshots no
        // restore can reach it any more.
        let pruned = plan(&repo, 2).await.unwrap();
        let packs: Vec<_> = pruned.packs.iter().map(|p| (p.start.0, p.end.0)).collect();
        assert_eq!(packs, vec![(200, 300)]);
        apply(&repo, &pruned, |_, _| {}).await.unwrap();
        let state = restorable(&snapshots[2..]).await;
        assert!(state.chain_from(Lsn(250)).is_err());
        assert!(
            state
                .spans()
                .iter()
                .all(|s| s.next.is_none() || !s.follows(Lsn(250)))
        );
    }

    #[tokio::test]
    async fn never_deletes_when_no_more_snapshots_than_kept() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let repo = Repository::new(store.clone());
        snapshot(&repo, 1, 100, true).await;
        put(&store, &pack::key(Lsn(100), Lsn(200))).await;
        put(&store, &routes::checkpoint_key(Lsn(150))).await;
        let plan = plan(&repo, 1).await.unwrap();
        assert_eq!(plan.objects(), 0);
        assert_eq!(plan.kept.len(), 1);
    }
}
