//! The stream index read back as restores and the daemon read it: the same views as the
//! packs' footers give, in a bounded number of requests, and the footers again whenever an
//! index cannot be used.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::*;
use crate::repository::pack::{self, PackFooter, SectionEntry};
use crate::storage::{CountedStore, MemoryStore, ObjectStore, PutMode};

const PACKS: u64 = 40;

fn section(tenant: Option<&str>, offset: u64, lsn: u64) -> SectionEntry {
    let time = DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::seconds(lsn as i64);
    SectionEntry {
        tenant: tenant.map(str::to_string),
        offset,
        length: 10,
        sha256: format!("{lsn:064x}"),
        first_lsn: Lsn(lsn),
        last_lsn: Lsn(lsn),
        first_time: time,
        last_time: time,
        transactions: 1,
        changes: 3,
        sealed_to: None,
    }
}

/// Pack `i` covers `[100 i + 100, 100 i + 200)`; tenant "busy" is in every pack, "rare" in
/// every tenth, the global section in every fifth; "idle" in none.
fn footer(i: u64) -> PackFooter {
    let start = 100 * i + 100;
    let mut owners = vec![Some("busy")];
    if i % 10 == 3 {
        owners.push(Some("rare"));
    }
    if i % 5 == 0 {
        owners.insert(0, None);
    }
    let sections = owners
        .into_iter()
        .enumerate()
        .map(|(k, owner)| section(owner, 10 * k as u64, start + k as u64))
        .collect();
    PackFooter {
        format_version: crate::repository::FORMAT_VERSION,
        start_lsn: Lsn(start),
        end_lsn: Lsn(start + 100),
        covered_until: DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::seconds(start as i64),
        sections,
        routes: None,
    }
}

struct Fixture {
    store: Arc<CountedStore>,
    memory: Arc<MemoryStore>,
    repo: Repository,
    footers: Vec<(PackRef, PackFooter)>,
}

/// PACKS packs in a store, and an index of the first `indexed` of them in windows of `window`.
async fn fixture(indexed: usize, window: usize) -> Fixture {
    let memory = Arc::new(MemoryStore::new());
    let store = Arc::new(CountedStore::new(memory.clone()));
    let repo = Repository::new(store.clone());
    let mut footers = Vec::new();
    for i in 0..PACKS {
        let footer = footer(i);
        let mut bytes = vec![0u8; 10 * footer.sections.len()];
        bytes.extend_from_slice(&footer.encode());
        let key = pack::key(footer.start_lsn, footer.end_lsn);
        let size = bytes.len() as u64;
        memory
            .put_bytes(&key, bytes.into(), PutMode::CreateNew)
            .await
            .unwrap();
        let pack = PackRef {
            start: footer.start_lsn,
            end: footer.end_lsn,
            key,
            size,
        };
        footers.push((pack, footer));
    }
    for chunk in footers[..indexed].chunks(window) {
        repo.put_stream_index(chunk).await.unwrap();
    }
    Fixture {
        store,
        memory,
        repo,
        footers,
    }
}

impl Fixture {
    fn chain(&self) -> Vec<PackRef> {
        self.footers.iter().map(|(p, _)| p.clone()).collect()
    }

    /// The views through the index, and the requests they took.
    async fn views(&self, tenant: Option<&str>) -> (Vec<PackView>, u64) {
        let state = self.repo.stream_state().await.unwrap();
        let before = self.store.requests().get;
        let views = self
            .repo
            .pack_views(&state, &self.chain(), tenant)
            .await
            .unwrap();
        (views, self.store.requests().get - before)
    }

    /// What the footers alone say.
    fn expected(&self, tenant: Option<&str>) -> Vec<PackView> {
        self.footers
            .iter()
            .map(|(p, f)| PackView::of_footer(p.clone(), f, tenant))
            .collect()
    }
}

#[tokio::test]
async fn the_index_says_what_the_footers_say_in_a_request_per_window() {
    // 32 packs in 4 windows of 8, then 8 packs no index covers yet.
    let f = fixture(32, 8).await;
    for tenant in [Some("busy"), Some("rare"), Some("idle"), None] {
        let (views, gets) = f.views(tenant).await;
        assert_eq!(views, f.expected(tenant), "{tenant:?}");
        // One directory read per window (plus a block read for a tenant the window holds),
        // and one footer read per unindexed pack.
        let blocks = match tenant {
            Some("busy") => 4,
            Some("rare") => 3, // packs 3, 13 and 23; 33 is not indexed yet
            _ => 0,
        };
        assert_eq!(gets, 4 + blocks + 8, "{tenant:?}");
    }
}

#[tokio::test]
async fn a_damaged_or_missing_index_falls_back_to_the_footers() {
    let f = fixture(40, 20).await;
    let state = f.repo.stream_state().await.unwrap();
    let (first, second) = (&state.indexes[0], &state.indexes[1]);
    let mut bytes = f.memory.get_bytes(&first.key, None).await.unwrap().to_vec();
    let at = bytes.len() - TRAILER_LEN as usize - 3;
    bytes[at] ^= 0x40;
    f.memory.delete(&first.key).await.unwrap();
    f.memory
        .put_bytes(&first.key, bytes.into(), PutMode::CreateNew)
        .await
        .unwrap();
    f.memory.delete(&second.key).await.unwrap();
    // The listing still names the deleted one: it went after the state was read.
    let views = f
        .repo
        .pack_views(&state, &f.chain(), Some("rare"))
        .await
        .unwrap();
    assert_eq!(views, f.expected(Some("rare")));
}

#[tokio::test]
async fn a_pack_replaced_after_it_was_indexed_is_refused() {
    let f = fixture(40, 40).await;
    let (victim, footer) = &f.footers[7];
    let mut bytes = vec![1u8; 10 * footer.sections.len() + 5];
    bytes.extend_from_slice(&footer.encode());
    f.memory.delete(&victim.key).await.unwrap();
    f.memory
        .put_bytes(&victim.key, bytes.into(), PutMode::CreateNew)
        .await
        .unwrap();
    let state = f.repo.stream_state().await.unwrap();
    let refused = f
        .repo
        .pack_views(&state, &state.packs, Some("idle"))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("it was replaced"), "{refused}");
}

#[tokio::test]
async fn whether_the_stream_mentions_a_tenant_is_read_from_the_directories() {
    let f = fixture(30, 10).await;
    let state = f.repo.stream_state().await.unwrap();
    for (tenant, expected) in [("rare", true), ("busy", true), ("idle", false)] {
        let before = f.store.requests().get;
        assert_eq!(
            f.repo.stream_mentions(&state, tenant).await.unwrap(),
            expected
        );
        // Never more than the directories and the 10 unindexed packs.
        assert!(f.store.requests().get - before <= 3 + 10);
    }
}

#[tokio::test]
async fn the_index_holds_the_footers_whole() {
    let f = fixture(40, 16).await;
    let state = f.repo.stream_state().await.unwrap();
    assert_eq!(state.indexes.len(), 3);
    let mut read = Vec::new();
    for index in &state.indexes {
        read.extend(f.repo.stream_index_footers(index).await.unwrap());
    }
    assert_eq!(read, f.footers);
}

#[test]
fn a_hostile_directory_is_refused_not_trusted() {
    let footers: Vec<(PackRef, PackFooter)> = (0..3)
        .map(|i| {
            let footer = footer(i);
            let pack = PackRef {
                start: footer.start_lsn,
                end: footer.end_lsn,
                key: pack::key(footer.start_lsn, footer.end_lsn),
                size: 100,
            };
            (pack, footer)
        })
        .collect();
    let index = IndexRef {
        start: Lsn(100),
        end: Lsn(400),
        key: key(Lsn(100), Lsn(400)),
        size: 0,
    };
    let honest = Directory {
        format_version: crate::repository::FORMAT_VERSION,
        start_lsn: Lsn(100),
        end_lsn: Lsn(400),
        packs: footers
            .iter()
            .map(|(p, f)| IndexedPack {
                start_lsn: p.start,
                end_lsn: p.end,
                size: p.size,
                covered_until: f.covered_until,
                sections: f.sections.len() as u32,
                routes: None,
            })
            .collect(),
        global: vec![IndexedSection {
            pack: 0,
            index: 0,
            section: footers[0].1.sections[0].clone(),
        }],
        tenants: vec![TenantBlock {
            tenant: "busy".into(),
            offset: 8,
            length: 10,
        }],
    };
    assert!(check("k", &honest, &index, 18).is_ok());
    let mut gap = honest.clone();
    gap.packs.remove(1);
    let mut beyond = honest.clone();
    beyond.tenants[0].length = u64::MAX;
    let mut stray = honest.clone();
    stray.global[0].pack = 7;
    let mut renamed = honest.clone();
    renamed.end_lsn = Lsn(500);
    for hostile in [gap, beyond, stray, renamed] {
        assert!(check("k", &hostile, &index, 18).is_err(), "{hostile:?}");
    }
}

#[tokio::test]
async fn readers_take_the_large_windows_and_the_small_ones_after_them() {
    // Small windows of 4 over all 40 packs, as the daemon writes them, and a large one over
    // the first 32 once they were all stored.
    let f = fixture(40, 4).await;
    f.repo.put_stream_index(&f.footers[..32]).await.unwrap();
    let state = f.repo.stream_state().await.unwrap();
    let chosen: Vec<(Lsn, Lsn)> = covering(&state.indexes, &state.packs)
        .iter()
        .map(|i| (i.start, i.end))
        .collect();
    let bounds = |from: usize, to: usize| (f.footers[from].0.start, f.footers[to - 1].0.end);
    assert_eq!(chosen, vec![bounds(0, 32), bounds(32, 36), bounds(36, 40)]);
    let (views, gets) = f.views(Some("idle")).await;
    assert_eq!(views, f.expected(Some("idle")));
    assert_eq!(gets, 3);
}
