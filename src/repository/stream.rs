//! The change stream's state in the repository: `changes/progress.json` (how far the stream
//! is stored), `changes/retained.json` (where retention left the chain of packs), and the
//! packs as listed — and what readers derive from them: each stream's reach ([`Span`]) and
//! the chain of packs a replay needs, checked to tile the stream without a gap.
//!
//! It never writes a pack (the capture's writer does) and never decides what to delete
//! (retention does); it says what the objects mean.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::index::IndexRef;
use super::pack::{malformed, range_of};
use super::{Repository, RepositoryError, Result};
use crate::pg::Lsn;
use crate::storage::{ObjectStore, StorageError};

/// `changes/progress.json`: how far the stream is durable, rewritten after every pack and
/// while the source is idle (so covered-until advances without empty packs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamProgress {
    pub format_version: u32,
    pub slot: String,
    /// Where this stream began (the slot's consistent point): packs tile `[since, durable)`.
    pub since_lsn: Lsn,
    /// Every transaction that committed before it is stored.
    pub durable_lsn: Lsn,
    /// End of the newest pack when this was written: packs tile `[since, last_pack_end)`, so a
    /// missing pack is a gap readers can see.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_pack_end: Option<Lsn>,
    /// Every transaction that committed at or before it is stored.
    pub covered_until: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The streams `init` replaced (their slot was lost), oldest first. Their packs stay in the
    /// repository, so the instants they covered stay restorable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier: Vec<EarlierStream>,
}

/// A stream that ended when `init` started a new one: what it had stored, frozen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlierStream {
    pub slot: String,
    pub since_lsn: Lsn,
    pub durable_lsn: Lsn,
    /// Its packs tile `[since_lsn, last_pack_end)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_pack_end: Option<Lsn>,
    pub covered_until: DateTime<Utc>,
}

/// A small JSON object rewritten in place, `None` when absent; its version is checked.
async fn read_state<T: serde::de::DeserializeOwned>(
    store: &Arc<dyn ObjectStore>,
    key: &str,
    version: impl Fn(&T) -> u32,
) -> Result<Option<T>> {
    let bytes = match store.get_bytes(key, None).await {
        Ok(b) => b,
        Err(StorageError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let value: T = serde_json::from_slice(&bytes).map_err(|e| malformed(key, e.to_string()))?;
    if !super::readable(version(&value)) {
        return Err(RepositoryError::UnknownFormat {
            key: key.into(),
            found: version(&value),
        });
    }
    Ok(Some(value))
}

async fn write_state<T: Serialize>(
    store: &Arc<dyn ObjectStore>,
    key: &str,
    value: &T,
) -> Result<()> {
    let json = serde_json::to_vec_pretty(value).expect("a state object always serializes");
    store
        .put_bytes(key, json.into(), crate::storage::PutMode::Overwrite)
        .await?;
    Ok(())
}

async fn read_progress(store: &Arc<dyn ObjectStore>) -> Result<Option<StreamProgress>> {
    read_state(store, super::keys::STREAM_PROGRESS, |p: &StreamProgress| {
        p.format_version
    })
    .await
}

async fn write_progress(store: &Arc<dyn ObjectStore>, progress: &StreamProgress) -> Result<()> {
    write_state(store, super::keys::STREAM_PROGRESS, progress).await
}

/// `changes/retained.json`: retention deleted the packs before `packs_from` (a pack boundary).
/// Written before the first of them is deleted, so that readers see where the kept chain
/// starts rather than a gap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retained {
    pub format_version: u32,
    pub packs_from: Lsn,
    pub updated_at: DateTime<Utc>,
}

async fn read_retained(store: &Arc<dyn ObjectStore>) -> Result<Option<Retained>> {
    read_state(store, super::keys::STREAM_RETAINED, |r: &Retained| {
        r.format_version
    })
    .await
}

async fn write_retained(store: &Arc<dyn ObjectStore>, packs_from: Lsn) -> Result<()> {
    let retained = Retained {
        format_version: super::FORMAT_2,
        packs_from,
        updated_at: Utc::now(),
    };
    write_state(store, super::keys::STREAM_RETAINED, &retained).await
}

/// A pack as listed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PackRef {
    pub start: Lsn,
    pub end: Lsn,
    pub key: String,
    pub size: u64,
}

/// What the repository says about the change stream.
#[derive(Debug, Clone)]
pub struct StreamState {
    pub progress: Option<StreamProgress>,
    /// Where retention left the chain of packs (packs before it are deleted).
    pub retained_from: Option<Lsn>,
    pub packs: Vec<PackRef>,
    /// The stream index's objects, by start LSN.
    pub indexes: Vec<IndexRef>,
}

/// One stream's reach, as readers use it: the current stream's, or an earlier one's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub slot: String,
    /// Where the stream began.
    pub since: Lsn,
    /// Where its kept packs start: `since`, or where retention left the chain.
    pub start: Lsn,
    /// Every transaction that committed before it, and after `since`, is stored.
    pub durable: Lsn,
    /// Its packs tile `[start, last_pack_end)` at least.
    pub last_pack_end: Option<Lsn>,
    pub covered_until: DateTime<Utc>,
    /// Where the next stream began (`None` for the current one): packs from there on are not
    /// this stream's.
    pub next: Option<Lsn>,
}

impl Span {
    /// A snapshot at `lsn` can be continued by this stream's kept packs. A restore never
    /// replays across from one stream into the next: nothing between them was captured.
    pub fn follows(&self, lsn: Lsn) -> bool {
        self.start <= lsn && lsn <= self.durable
    }

    /// `pack` belongs to this stream.
    pub fn holds(&self, pack: &PackRef) -> bool {
        pack.end > self.since && self.next.is_none_or(|next| pack.start < next)
    }
}

impl StreamState {
    async fn read(store: &Arc<dyn ObjectStore>) -> Result<Self> {
        // Progress first: a pack stored after it was read is then merely not counted yet.
        let progress = read_progress(store).await?;
        let retained_from = read_retained(store).await?.map(|r| r.packs_from);
        let (packs, indexes) = list(store).await?;
        Ok(Self {
            progress,
            retained_from,
            packs,
            indexes,
        })
    }

    /// Where a stream that began at `since` keeps its packs from.
    fn kept_from(&self, since: Lsn) -> Lsn {
        self.retained_from.map_or(since, |r| r.max(since))
    }

    /// Where the current stream's kept chain of packs starts.
    pub fn start(&self) -> Option<Lsn> {
        Some(self.kept_from(self.progress.as_ref()?.since_lsn))
    }

    /// Follows the packs that tile a stream from `start`, leaving out those from `next` on
    /// (a later stream's). Returns the packs that end after `from`, where the tiling ended,
    /// and the start of the first pack past a gap, if there is one.
    fn walk(&self, start: Lsn, next: Option<Lsn>, from: Lsn) -> (Vec<PackRef>, Lsn, Option<Lsn>) {
        let mut at = start;
        let mut chain = Vec::new();
        for p in self
            .packs
            .iter()
            .filter(|p| next.is_none_or(|next| p.start < next))
        {
            if p.start > at {
                return (chain, at, Some(p.start));
            }
            if p.start == at {
                at = p.end;
                if p.end > from {
                    chain.push(p.clone());
                }
            }
        }
        (chain, at, None)
    }

    /// End of the packs that tile the current stream from its start without a gap: where the
    /// next pack starts.
    pub fn chain_end(&self) -> Option<Lsn> {
        Some(self.walk(self.start()?, None, Lsn(u64::MAX)).1)
    }

    /// The current stream's packs after the last index object that covers any of them, in
    /// order (all of them in a repository written before the stream index existed): what the
    /// daemon indexes next. They tile the stream up to [`Self::chain_end`].
    pub fn unindexed_tail(&self) -> Vec<PackRef> {
        let Some(start) = self.start() else {
            return Vec::new();
        };
        let (chain, _, _) = self.walk(start, None, Lsn(0));
        let indexed_until = self
            .indexes
            .iter()
            .filter(|i| chain.iter().any(|p| i.covers(p)))
            .map(|i| i.end)
            .max();
        chain
            .into_iter()
            .filter(|p| indexed_until.is_none_or(|end| p.start >= end))
            .collect()
    }

    /// The current stream's durable LSN: the progress object's, or the end of the packs if a
    /// crash came between storing a pack and rewriting the progress.
    pub fn durable(&self) -> Option<Lsn> {
        Some(self.progress.as_ref()?.durable_lsn.max(self.chain_end()?))
    }

    /// Every stream's reach, oldest first; the current stream is the last.
    pub fn spans(&self) -> Vec<Span> {
        let Some(p) = &self.progress else {
            return Vec::new();
        };
        let nexts = p.earlier.iter().skip(1).map(|e| e.since_lsn);
        let mut spans: Vec<Span> = p
            .earlier
            .iter()
            .zip(nexts.chain([p.since_lsn]))
            .map(|(e, next)| Span {
                slot: e.slot.clone(),
                since: e.since_lsn,
                start: self.kept_from(e.since_lsn),
                durable: e.durable_lsn,
                last_pack_end: e.last_pack_end,
                covered_until: e.covered_until,
                next: Some(next),
            })
            .collect();
        spans.push(Span {
            slot: p.slot.clone(),
            since: p.since_lsn,
            start: self.kept_from(p.since_lsn),
            durable: self.durable().unwrap_or(p.durable_lsn),
            last_pack_end: p.last_pack_end,
            covered_until: p.covered_until,
            next: None,
        });
        spans
    }

    /// The progress of a new stream that begins at `since` from slot `slot` (what `init`
    /// writes): the current stream, if any, joins the earlier ones with what it stored.
    pub fn restart(&self, slot: &str, since: Lsn) -> StreamProgress {
        let mut earlier = Vec::new();
        if let Some(p) = &self.progress {
            earlier.clone_from(&p.earlier);
            earlier.push(EarlierStream {
                slot: p.slot.clone(),
                since_lsn: p.since_lsn,
                durable_lsn: self.durable().unwrap_or(p.durable_lsn),
                // Packs stored after the last rewrite of the progress count too.
                last_pack_end: p.last_pack_end.max(self.chain_end()),
                covered_until: p.covered_until,
            });
        }
        StreamProgress {
            format_version: super::FORMAT_2,
            slot: slot.into(),
            since_lsn: since,
            durable_lsn: since,
            last_pack_end: None,
            covered_until: DateTime::<Utc>::UNIX_EPOCH,
            updated_at: Utc::now(),
            earlier,
        }
    }

    /// The packs a replay from `from` needs, from the stream `from` is in, checked to tile it
    /// without a gap.
    pub fn chain_from(&self, from: Lsn) -> std::result::Result<Vec<PackRef>, String> {
        if self.progress.is_none() {
            return Err("no change stream has been captured yet (is the daemon running?)".into());
        }
        let spans = self.spans();
        let Some(span) = spans.iter().rev().find(|s| s.since <= from) else {
            return Err(format!(
                "{from} precedes the change stream, which begins at {}",
                spans[0].since
            ));
        };
        if from < span.start {
            return Err(format!(
                "the change stream's kept packs start at {}, after {from} (earlier ones were deleted by retention)",
                span.start
            ));
        }
        if let Some(next) = span.next
            && from > span.durable
        {
            return Err(format!(
                "the change stream of slot {} stored changes up to {}, and the next one (`updog-backup init`) begins at {next}: nothing between was captured",
                span.slot, span.durable
            ));
        }
        self.chain_in(span, from)
    }

    /// The packs of `span` that a replay from `from` needs, checked to tile the span's kept
    /// packs without a gap.
    pub fn chain_in(&self, span: &Span, from: Lsn) -> std::result::Result<Vec<PackRef>, String> {
        let missing = |at: Lsn, to: Lsn| {
            format!("changes between {at} and {to} are missing (a pack was deleted?)")
        };
        let (chain, at, gap) = self.walk(span.start, span.next, from);
        if let Some(to) = gap {
            return Err(missing(at, to));
        }
        match span.last_pack_end {
            Some(last) if at < last => Err(missing(at, last)),
            _ => Ok(chain),
        }
    }
}

/// Packs and index objects in the repository, by start LSN: one listing of `changes/`.
async fn list(store: &Arc<dyn ObjectStore>) -> Result<(Vec<PackRef>, Vec<IndexRef>)> {
    let (mut packs, mut indexes) = (Vec::new(), Vec::new());
    for o in store.list(super::keys::CHANGES_PREFIX).await? {
        if let Some((start, end)) = range_of(&o.key) {
            packs.push(PackRef {
                start,
                end,
                key: o.key,
                size: o.size,
            });
        } else if let Some((start, end)) = super::index::range_of(&o.key) {
            indexes.push(IndexRef {
                start,
                end,
                key: o.key,
                size: o.size,
            });
        }
    }
    packs.sort();
    indexes.sort();
    Ok((packs, indexes))
}

impl Repository {
    /// Progress, retention's mark and the packs, read in that order: a pack stored after the
    /// progress was read is then merely not counted yet.
    pub async fn stream_state(&self) -> Result<StreamState> {
        StreamState::read(self.store()).await
    }

    pub async fn stream_progress(&self) -> Result<Option<StreamProgress>> {
        read_progress(self.store()).await
    }

    /// Rewrites `changes/progress.json` (after every pack, and while the source is idle).
    pub async fn put_stream_progress(&self, progress: &StreamProgress) -> Result<()> {
        write_progress(self.store(), progress).await
    }

    /// Writes `changes/retained.json`: must come before the first pack it leaves out is deleted.
    pub async fn put_retained(&self, packs_from: Lsn) -> Result<()> {
        write_retained(self.store(), packs_from).await
    }

    /// Every pack in the repository, by start LSN.
    pub async fn packs(&self) -> Result<Vec<PackRef>> {
        Ok(list(self.store()).await?.0)
    }
}
