//! The stream index, `changes/index/<start_lsn>-<end_lsn>.idx`: one object per window of
//! consecutive packs, so that a reader of one tenant learns which of a window's packs hold its
//! sections in one or two requests, instead of one footer read per pack. A day of packs every
//! 5 s is 17,280 footers; with windows of 256 packs it is 68 index reads, made concurrently.
//!
//! ```text
//! "UPDOGIX\x01"
//! block*       one per tenant: zstd (with its checksum) of JSON [IndexedSection]
//! directory    zstd of JSON Directory: the packs, the global sections, each tenant's block
//! trailer      directory length (u32 LE) | SHA-256 of the directory (32 bytes) | "UPDOGIX\x01"
//! ```
//!
//! An index holds exactly what its packs' footers say (a reader may use either), so it is
//! plain, like the footers, and readable without the identity. Windows come in two sizes:
//! small ones as packs are stored (so the packs after the last large window cost a few index
//! reads, not one footer each), and a large one over them once it is whole; readers take the
//! large ones where they exist ([`covering`]). It only accelerates: a pack
//! no index covers, or one whose index is missing or damaged, is read through its footer.
//! What a reader trusts an index for is checked against what it can see for free: the packs it
//! names must be listed with the sizes it records, and every section read is still checked
//! against its digest and its sealed header (pack, tenant, position).

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::pack::{PackFooter, Region, SectionEntry, malformed};
use super::stream::{PackRef, StreamState};
use super::{Repository, RepositoryError, Result};
use crate::pg::Lsn;
use crate::storage::{ObjectStore, PutMode, StorageError};

pub const INDEX_PREFIX: &str = "changes/index/";
const MAGIC: &[u8; 8] = b"UPDOGIX\x01";
const TRAILER_LEN: u64 = 4 + 32 + 8;
/// One read of an index's tail usually holds its whole directory.
const TAIL_READ: u64 = 256 * 1024;
/// Readers refuse a directory or block that is larger, stored or decompressed, so a damaged
/// length cannot make them allocate wildly.
const MAX_PART: usize = 64 << 20;
/// How many sections a writer gathers at most before it writes the index, whatever its window:
/// a bound on the memory held and on the size of a tenant's block.
pub const MAX_SECTIONS: usize = 65_536;

/// An index object as listed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct IndexRef {
    pub start: Lsn,
    pub end: Lsn,
    pub key: String,
    pub size: u64,
}

impl IndexRef {
    /// The index names `pack` (which need not exist any more: retention deletes packs first).
    pub fn covers(&self, pack: &PackRef) -> bool {
        self.start <= pack.start && pack.end <= self.end
    }
}

/// The indexes a reader of `packs` (in order) reads: for each pack no chosen index covers yet,
/// the index that covers it and reaches furthest. The daemon writes small windows as packs come
/// and a large one over them once it is whole, so readers take the large windows and the small
/// ones only after the last large one.
pub fn covering<'a>(indexes: &'a [IndexRef], packs: &[PackRef]) -> Vec<&'a IndexRef> {
    let mut chosen: Vec<&IndexRef> = Vec::new();
    for p in packs {
        if chosen.last().is_some_and(|i| i.covers(p)) {
            continue;
        }
        if let Some(best) = indexes.iter().filter(|i| i.covers(p)).max_by_key(|i| i.end) {
            chosen.push(best);
        }
    }
    chosen
}

pub fn key(start: Lsn, end: Lsn) -> String {
    format!("{INDEX_PREFIX}{}-{}.idx", start.to_key(), end.to_key())
}

/// The LSN range an index key names.
pub fn range_of(key: &str) -> Option<(Lsn, Lsn)> {
    let rest = key.strip_prefix(INDEX_PREFIX)?.strip_suffix(".idx")?;
    let (start, end) = rest.split_once('-')?;
    let (start, end) = (Lsn::from_key(start).ok()?, Lsn::from_key(end).ok()?);
    (start < end).then_some((start, end))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Directory {
    format_version: u32,
    start_lsn: Lsn,
    end_lsn: Lsn,
    /// The packs, in order; they tile `[start_lsn, end_lsn)`.
    packs: Vec<IndexedPack>,
    /// Every global section of the packs.
    global: Vec<IndexedSection>,
    /// Each tenant's block, sorted by tenant.
    tenants: Vec<TenantBlock>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IndexedPack {
    start_lsn: Lsn,
    end_lsn: Lsn,
    /// The pack's stored size.
    size: u64,
    covered_until: DateTime<Utc>,
    /// Sections in its footer.
    sections: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    routes: Option<Region>,
}

/// A section as its pack's footer has it, and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IndexedSection {
    /// Position of the pack in the directory.
    pack: u32,
    /// Position of the section in the pack's footer.
    index: u32,
    section: SectionEntry,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantBlock {
    tenant: String,
    offset: u64,
    length: u64,
}

/// What one reader needs of a pack: where it is, how far it covers, and the sections that
/// reader reads (one tenant's and the global ones, or the global ones alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackView {
    pub pack: PackRef,
    pub covered_until: DateTime<Utc>,
    pub routes: Option<Region>,
    /// `(position in the footer, section)`, in footer order.
    pub sections: Vec<(usize, SectionEntry)>,
}

impl PackView {
    /// The view of `footer` for `tenant` (`None`: the global sections alone).
    pub fn of_footer(pack: PackRef, footer: &PackFooter, tenant: Option<&str>) -> Self {
        Self {
            pack,
            covered_until: footer.covered_until,
            routes: footer.routes.clone(),
            sections: footer
                .sections
                .iter()
                .enumerate()
                .filter(|(_, s)| s.tenant.is_none() || s.tenant.as_deref() == tenant)
                .map(|(i, s)| (i, s.clone()))
                .collect(),
        }
    }

    /// The sections of one owner (`None`: global), in footer order.
    pub fn sections_of<'a>(
        &'a self,
        owner: Option<&'a str>,
    ) -> impl Iterator<Item = &'a (usize, SectionEntry)> {
        self.sections
            .iter()
            .filter(move |(_, s)| s.tenant.as_deref() == owner)
    }
}

fn compress(plain: &[u8]) -> Vec<u8> {
    let mut encoder =
        zstd::stream::write::Encoder::new(Vec::new(), 3).expect("a zstd encoder in memory");
    encoder
        .include_checksum(true)
        .expect("setting a zstd parameter");
    encoder.write_all(plain).expect("compressing in memory");
    encoder.finish().expect("compressing in memory")
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("an index always serializes")
}

/// The index object of `packs`, which must tile the stream in order.
pub fn encode(packs: &[(PackRef, PackFooter)]) -> Vec<u8> {
    let mut directory = Directory {
        // Restating the footers, it has their layout (format 3's sections name their key).
        format_version: packs
            .iter()
            .map(|p| p.1.format_version)
            .max()
            .unwrap_or(super::FORMAT_2),
        start_lsn: packs.first().map_or(Lsn(0), |p| p.0.start),
        end_lsn: packs.last().map_or(Lsn(0), |p| p.0.end),
        packs: Vec::with_capacity(packs.len()),
        global: Vec::new(),
        tenants: Vec::new(),
    };
    let mut by_tenant = BTreeMap::<&str, Vec<IndexedSection>>::new();
    for (i, (pack, footer)) in packs.iter().enumerate() {
        debug_assert!(i == 0 || packs[i - 1].0.end == pack.start, "packs tile");
        directory.packs.push(IndexedPack {
            start_lsn: pack.start,
            end_lsn: pack.end,
            size: pack.size,
            covered_until: footer.covered_until,
            sections: u32::try_from(footer.sections.len()).expect("sections fit u32"),
            routes: footer.routes.clone(),
        });
        for (index, section) in footer.sections.iter().enumerate() {
            let entry = IndexedSection {
                pack: i as u32,
                index: index as u32,
                section: section.clone(),
            };
            match &section.tenant {
                None => directory.global.push(entry),
                Some(t) => by_tenant.entry(t).or_default().push(entry),
            }
        }
    }
    let mut out = MAGIC.to_vec();
    for (tenant, entries) in by_tenant {
        let block = compress(&json(&entries));
        directory.tenants.push(TenantBlock {
            tenant: tenant.to_string(),
            offset: out.len() as u64,
            length: block.len() as u64,
        });
        out.extend_from_slice(&block);
    }
    let stored = compress(&json(&directory));
    out.extend_from_slice(&stored);
    out.extend_from_slice(
        &u32::try_from(stored.len())
            .expect("a directory below 4 GiB")
            .to_le_bytes(),
    );
    out.extend_from_slice(&Sha256::digest(&stored));
    out.extend_from_slice(MAGIC);
    out
}

/// An index's directory, read and checked.
async fn read_directory(store: &Arc<dyn ObjectStore>, index: &IndexRef) -> Result<Directory> {
    let key = &index.key;
    let size = index.size;
    if size < MAGIC.len() as u64 + TRAILER_LEN {
        return Err(malformed(
            key,
            format!("{size} bytes is too short for a stream index"),
        ));
    }
    let tail_start = size.saturating_sub(TAIL_READ);
    let tail = store.get_bytes(key, Some(tail_start..size)).await?;
    let trailer = &tail[tail.len() - TRAILER_LEN as usize..];
    if &trailer[36..] != MAGIC {
        return Err(malformed(
            key,
            "no stream index trailer at its end (truncated?)",
        ));
    }
    let len = u64::from(u32::from_le_bytes(
        trailer[..4].try_into().expect("4 bytes"),
    ));
    if len > MAX_PART as u64 || len + TRAILER_LEN + MAGIC.len() as u64 > size {
        return Err(malformed(
            key,
            format!("directory length {len} does not fit the index"),
        ));
    }
    let directory_start = size - TRAILER_LEN - len;
    let stored: Bytes = if directory_start >= tail_start {
        tail.slice((directory_start - tail_start) as usize..tail.len() - TRAILER_LEN as usize)
    } else {
        store
            .get_bytes(key, Some(directory_start..size - TRAILER_LEN))
            .await?
    };
    if Sha256::digest(&stored).as_slice() != &trailer[4..36] {
        return Err(malformed(
            key,
            "the directory does not match its digest (damaged)",
        ));
    }
    let plain = super::routes::decompress(&stored, MAX_PART).map_err(|m| malformed(key, m))?;
    let directory: Directory =
        serde_json::from_slice(&plain).map_err(|e| malformed(key, e.to_string()))?;
    if !super::readable(directory.format_version) {
        return Err(RepositoryError::UnknownFormat {
            key: key.clone(),
            found: directory.format_version,
        });
    }
    check(key, &directory, index, directory_start)?;
    Ok(directory)
}

/// The directory is hostile input: it must name the range its key names, its packs must tile
/// it, and every reference must stay inside the object (no arithmetic that can overflow).
fn check(key: &str, d: &Directory, index: &IndexRef, blocks_end: u64) -> Result<()> {
    if (d.start_lsn, d.end_lsn) != (index.start, index.end) {
        return Err(malformed(
            key,
            format!(
                "says {}..{}: the index was renamed or swapped",
                d.start_lsn, d.end_lsn
            ),
        ));
    }
    let mut at = d.start_lsn;
    for p in &d.packs {
        if p.start_lsn != at || p.end_lsn <= p.start_lsn {
            return Err(malformed(key, "its packs do not tile its range"));
        }
        at = p.end_lsn;
    }
    if at != d.end_lsn {
        return Err(malformed(key, "its packs do not tile its range"));
    }
    if let Some(s) = d.global.iter().find(|s| !names(d, s, None)) {
        return Err(malformed(
            key,
            format!("a global section out of place: {s:?}"),
        ));
    }
    let mut offset = MAGIC.len() as u64;
    let mut previous: Option<&str> = None;
    for b in &d.tenants {
        if b.offset != offset || b.length > blocks_end - offset {
            return Err(malformed(key, "its tenant blocks do not tile the index"));
        }
        if previous.is_some_and(|p| p >= b.tenant.as_str()) {
            return Err(malformed(key, "its tenants are not sorted"));
        }
        previous = Some(&b.tenant);
        offset += b.length;
    }
    if offset != blocks_end {
        return Err(malformed(key, "its tenant blocks do not tile the index"));
    }
    Ok(())
}

/// `s` names a pack of `d` and a position in its footer, and belongs to `owner`.
fn names(d: &Directory, s: &IndexedSection, owner: Option<&str>) -> bool {
    d.packs
        .get(s.pack as usize)
        .is_some_and(|p| s.index < p.sections)
        && s.section.tenant.as_deref() == owner
}

async fn read_block(
    store: &Arc<dyn ObjectStore>,
    index: &IndexRef,
    d: &Directory,
    block: &TenantBlock,
) -> Result<Vec<IndexedSection>> {
    let key = &index.key;
    if block.length > MAX_PART as u64 {
        return Err(malformed(
            key,
            format!("block of tenant {} is too large", block.tenant),
        ));
    }
    let stored = store
        .get_bytes(key, Some(block.offset..block.offset + block.length))
        .await?;
    let plain = super::routes::decompress(&stored, MAX_PART).map_err(|m| malformed(key, m))?;
    let entries: Vec<IndexedSection> =
        serde_json::from_slice(&plain).map_err(|e| malformed(key, e.to_string()))?;
    if let Some(s) = entries.iter().find(|s| !names(d, s, Some(&block.tenant))) {
        return Err(malformed(
            key,
            format!(
                "a section out of place in the block of tenant {}: {s:?}",
                block.tenant
            ),
        ));
    }
    Ok(entries)
}

/// The views of an index's packs for `tenant` (`None`: the global sections alone).
async fn read_views(
    store: &Arc<dyn ObjectStore>,
    index: &IndexRef,
    tenant: Option<&str>,
) -> Result<Vec<PackView>> {
    let d = read_directory(store, index).await?;
    let mut sections: Vec<IndexedSection> = d.global.clone();
    if let Some(t) = tenant
        && let Ok(i) = d.tenants.binary_search_by(|b| b.tenant.as_str().cmp(t))
    {
        sections.extend(read_block(store, index, &d, &d.tenants[i]).await?);
    }
    sections.sort_by_key(|s| (s.pack, s.index));
    let mut views: Vec<PackView> = d
        .packs
        .iter()
        .map(|p| PackView {
            pack: PackRef {
                start: p.start_lsn,
                end: p.end_lsn,
                key: super::pack::key(p.start_lsn, p.end_lsn),
                size: p.size,
            },
            covered_until: p.covered_until,
            routes: p.routes.clone(),
            sections: Vec::new(),
        })
        .collect();
    for s in sections {
        views[s.pack as usize]
            .sections
            .push((s.index as usize, s.section));
    }
    Ok(views)
}

/// The footers an index holds, whole (every block read): what `verify` compares with the
/// packs' own footers.
async fn read_footers(
    store: &Arc<dyn ObjectStore>,
    index: &IndexRef,
) -> Result<Vec<(PackRef, PackFooter)>> {
    let d = read_directory(store, index).await?;
    let mut sections: Vec<IndexedSection> = d.global.clone();
    for block in &d.tenants {
        sections.extend(read_block(store, index, &d, block).await?);
    }
    sections.sort_by_key(|s| (s.pack, s.index));
    let mut out: Vec<(PackRef, PackFooter)> = d
        .packs
        .iter()
        .map(|p| {
            (
                PackRef {
                    start: p.start_lsn,
                    end: p.end_lsn,
                    key: super::pack::key(p.start_lsn, p.end_lsn),
                    size: p.size,
                },
                PackFooter {
                    format_version: d.format_version,
                    start_lsn: p.start_lsn,
                    end_lsn: p.end_lsn,
                    covered_until: p.covered_until,
                    sections: Vec::new(),
                    routes: p.routes.clone(),
                },
            )
        })
        .collect();
    for s in sections {
        let footer = &mut out[s.pack as usize].1;
        if s.index as usize != footer.sections.len() {
            return Err(malformed(
                &index.key,
                format!(
                    "pack {} lacks a section before position {}",
                    footer.start_lsn, s.index
                ),
            ));
        }
        footer.sections.push(s.section);
    }
    if let Some((p, _)) = out
        .iter()
        .zip(&d.packs)
        .find(|((_, footer), p)| footer.sections.len() != p.sections as usize)
    {
        return Err(malformed(
            &index.key,
            format!("pack {} has fewer sections than it says", p.0.start),
        ));
    }
    Ok(out)
}

/// Whether an error reading an index is the index's own fault (absent, damaged): readers then
/// fall back to the packs' footers. A store that fails is an error of the read.
fn unusable(e: &RepositoryError) -> bool {
    matches!(
        e,
        RepositoryError::Storage(StorageError::NotFound { .. })
            | RepositoryError::Malformed { .. }
            | RepositoryError::UnknownFormat { .. }
    )
}

impl Repository {
    /// Stores the index of `packs` (consecutive, tiling the stream). An index already stored
    /// under the same key (by an earlier run that stopped before it knew) holds the same.
    pub async fn put_stream_index(&self, packs: &[(PackRef, PackFooter)]) -> Result<IndexRef> {
        let (start, end) = match (packs.first(), packs.last()) {
            (Some(first), Some(last)) => (first.0.start, last.0.end),
            _ => return Err(malformed(INDEX_PREFIX, "an index of no packs")),
        };
        let key = key(start, end);
        let bytes = encode(packs);
        let size = bytes.len() as u64;
        match self
            .store()
            .put_bytes(&key, bytes.into(), PutMode::CreateNew)
            .await
        {
            Ok(_) | Err(StorageError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(IndexRef {
            start,
            end,
            key,
            size,
        })
    }

    /// Footers of `packs`, read concurrently, in order.
    pub async fn pack_footers(&self, packs: &[PackRef]) -> Result<Vec<PackFooter>> {
        // The futures are made eagerly: a closure inside the stream's type would make the
        // daemon's task future not provably `Send`, a known limit of the compiler's
        // reasoning about higher-ranked lifetimes.
        let reads: Vec<_> = packs.iter().map(|p| self.pack_footer(p)).collect();
        futures::stream::iter(reads)
            .buffered(self.concurrency())
            .try_collect()
            .await
    }

    /// The footers an index holds (for `verify`, which compares them with the packs').
    pub async fn stream_index_footers(
        &self,
        index: &IndexRef,
    ) -> Result<Vec<(PackRef, PackFooter)>> {
        read_footers(self.store(), index).await
    }

    /// What a reader of `tenant` (`None`: the global sections alone, as the routing state
    /// needs) needs of each pack of `chain`, in order: through the stream index where an index
    /// covers a pack, through the pack's footer where none does (or the index is unusable).
    /// Indexes and footers are read concurrently; a pack whose listed size differs from the
    /// one its index recorded was replaced, and is an error.
    pub async fn pack_views(
        &self,
        state: &StreamState,
        chain: &[PackRef],
        tenant: Option<&str>,
    ) -> Result<Vec<PackView>> {
        let reads: Vec<_> = covering(&state.indexes, chain)
            .into_iter()
            .map(|index| async move {
                match read_views(self.store(), index, tenant).await {
                    Ok(views) => Ok(Some(views)),
                    Err(e) if unusable(&e) => {
                        tracing::warn!(index = %index.key, error = %e, "stream index unusable: reading its packs' footers instead (`updog-backup verify` checks it)");
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            })
            .collect();
        let read: Vec<Option<Vec<PackView>>> = futures::stream::iter(reads)
            .buffered(self.concurrency())
            .try_collect()
            .await?;
        let mut indexed: BTreeMap<Lsn, PackView> = read
            .into_iter()
            .flatten()
            .flatten()
            .map(|v| (v.pack.start, v))
            .collect();
        let mut views: Vec<Option<PackView>> = Vec::with_capacity(chain.len());
        let mut unindexed = Vec::new();
        for p in chain {
            match indexed.remove(&p.start) {
                Some(v) if v.pack.end == p.end => {
                    if v.pack.size != p.size {
                        return Err(malformed(
                            &p.key,
                            format!(
                                "is {} bytes, but the stream index recorded {} when it was stored: it was replaced (`updog-backup verify` checks it)",
                                p.size, v.pack.size
                            ),
                        ));
                    }
                    views.push(Some(v));
                }
                _ => {
                    unindexed.push(p.clone());
                    views.push(None);
                }
            }
        }
        let footers = self.pack_footers(&unindexed).await?;
        let mut from_footers = unindexed
            .into_iter()
            .zip(footers)
            .map(|(p, f)| PackView::of_footer(p, &f, tenant));
        Ok(views
            .into_iter()
            .map(|v| v.unwrap_or_else(|| from_footers.next().expect("one per unindexed pack")))
            .collect())
    }

    /// Whether any pack of the stream holds a section of `tenant`: the directories of the
    /// indexes, and the footers of the packs no index covers.
    pub async fn stream_mentions(&self, state: &StreamState, tenant: &str) -> Result<bool> {
        let chosen = covering(&state.indexes, &state.packs);
        let reads: Vec<_> = chosen
            .iter()
            .map(|&index| async move {
                match read_directory(self.store(), index).await {
                    Ok(d) => Ok(Some(
                        d.tenants
                            .binary_search_by(|b| b.tenant.as_str().cmp(tenant))
                            .is_ok(),
                    )),
                    Err(e) if unusable(&e) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .collect();
        let found: Vec<Option<bool>> = futures::stream::iter(reads)
            .buffered(self.concurrency())
            .try_collect()
            .await?;
        if found.contains(&Some(true)) {
            return Ok(true);
        }
        let usable: Vec<&IndexRef> = chosen
            .into_iter()
            .zip(&found)
            .filter(|(_, f)| f.is_some())
            .map(|(i, _)| i)
            .collect();
        let rest: Vec<PackRef> = state
            .packs
            .iter()
            .filter(|p| !usable.iter().any(|i| i.covers(p)))
            .cloned()
            .collect();
        for chunk in rest.chunks(self.concurrency() * 4) {
            let footers = self.pack_footers(chunk).await?;
            if footers.iter().any(|f| {
                f.sections
                    .iter()
                    .any(|s| s.tenant.as_deref() == Some(tenant))
            }) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests;
