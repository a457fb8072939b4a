//! Packs: the captured change stream, `changes/<start_lsn>-<end_lsn>.pack`.
//!
//! ```text
//! section*                     each one zstd frame inside one age stream (sealed like archives)
//! footer                       JSON PackFooter: the index (tenant → offset, length, digest, …)
//! trailer (44 bytes)           footer length (u32 LE) | SHA-256 of the footer | "UPDOGPK\x01"
//! ```
//! A restore of one tenant reads the trailer, the footer, then only that tenant's sections and
//! the global ones (ranged reads): never another tenant's bytes.
//!
//! A section's plaintext is records framed like archives (tag, u32 big-endian length, payload):
//! ```text
//! "UPDOGCS\x01" 'H' JSON SectionHeader    binds the section to its pack (start LSN), tenant, index
//! 'M' pgoutput message (protocol 1 encoding, no xids): Relation, Begin, Insert, Update,
//!     Delete, Truncate, Commit — whole transactions in commit order
//! 'Z' JSON {"messages": n}
//! ```
//! One tenant may have several sections in a pack (a large transaction is sealed in pieces so
//! memory stays bounded); its messages are the concatenation of its sections in footer order.
//! The pgoutput encoding is PostgreSQL's own, so restore reuses the stream decoder.

use std::io::Read;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::archive::{MAX_RECORD, json_record, record_prefix};
use super::stream::PackRef;
use super::{Repository, RepositoryError, Result};
use crate::codec::{HashingReader, Identities, classify_read_error, open_recorded};
use crate::pg::Lsn;
use crate::pg::pgoutput::{self, Context, Message, ProtocolVersion};
use crate::storage::ObjectStore;

pub const SECTION_MAGIC: &[u8; 8] = b"UPDOGCS\x01";
pub const TRAILER_MAGIC: &[u8; 8] = b"UPDOGPK\x01";
pub const TRAILER_LEN: u64 = 4 + 32 + 8;
/// Readers refuse larger footers, so a damaged length cannot make them allocate wildly.
const MAX_FOOTER: u32 = 64 << 20;
const TAG_HEADER: u8 = b'H';
const TAG_MESSAGE: u8 = b'M';
const TAG_END: u8 = b'Z';
/// Decoded messages in flight between the blocking reader and the restore.
const MESSAGES_IN_FLIGHT: usize = 1024;

/// Sections hold protocol-1 encodings: transactions are whole, so no xids are needed.
pub const CONTEXT: Context = Context::new(ProtocolVersion::V1);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SectionHeader {
    /// The pack's start LSN (unique per pack; its end is not known while sections are sealed).
    pub pack_start: Lsn,
    /// `None` for the global section (global tables, TRUNCATE of tenants absent from a
    /// transaction).
    pub tenant: Option<String>,
    /// Position of the section in the footer.
    pub index: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SectionEntry {
    pub tenant: Option<String>,
    pub offset: u64,
    pub length: u64,
    pub sha256: String,
    /// Commit LSN and time of the first and last transaction the section holds (part of).
    pub first_lsn: Lsn,
    pub last_lsn: Lsn,
    pub first_time: DateTime<Utc>,
    pub last_time: DateTime<Utc>,
    pub transactions: u64,
    pub changes: u64,
    /// Fingerprint of the key the section is sealed to (format 3; FORMAT.md "Keys").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_to: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackFooter {
    pub format_version: u32,
    /// Transactions whose commit LSN is in `[start_lsn, end_lsn)`.
    pub start_lsn: Lsn,
    pub end_lsn: Lsn,
    /// Every transaction that committed at or before this time is in this pack or an
    /// earlier one.
    pub covered_until: DateTime<Utc>,
    pub sections: Vec<SectionEntry>,
    /// The routing-state changes of this pack's transactions (after the sections).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Region>,
}

/// A byte range of a pack with its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub offset: u64,
    pub length: u64,
    pub sha256: String,
}

impl PackFooter {
    /// Footer and trailer bytes, appended after the sections.
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("a footer always serializes");
        let mut out = json.clone();
        let len = u32::try_from(json.len()).expect("footers are far below 4 GiB");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&Sha256::digest(&json));
        out.extend_from_slice(TRAILER_MAGIC);
        out
    }

    /// The sections a restore of `tenant` reads: the tenant's and the global ones, in order.
    pub fn sections_for<'a>(&'a self, tenant: &'a str) -> impl Iterator<Item = &'a SectionEntry> {
        self.sections
            .iter()
            .filter(move |s| s.tenant.as_deref().is_none_or(|t| t == tenant))
    }
}

/// Key of a pack.
pub fn key(start: Lsn, end: Lsn) -> String {
    format!(
        "{}{}-{}.pack",
        super::keys::CHANGES_PREFIX,
        start.to_key(),
        end.to_key()
    )
}

/// The LSN range a pack key names.
pub fn range_of(key: &str) -> Option<(Lsn, Lsn)> {
    let rest = key
        .strip_prefix(super::keys::CHANGES_PREFIX)?
        .strip_suffix(".pack")?;
    let (start, end) = rest.split_once('-')?;
    let (start, end) = (Lsn::from_key(start).ok()?, Lsn::from_key(end).ok()?);
    (start < end).then_some((start, end))
}

pub fn section_header(header: &SectionHeader) -> Vec<u8> {
    let mut out = SECTION_MAGIC.to_vec();
    out.extend_from_slice(&json_record(TAG_HEADER, header));
    out
}

/// Appends one message record to `out`.
pub fn push_message(out: &mut Vec<u8>, message: &Message) {
    let encoded = pgoutput::encode(message, CONTEXT);
    out.extend_from_slice(&record_prefix(TAG_MESSAGE, encoded.len()));
    out.extend_from_slice(&encoded);
}

#[derive(Debug, Serialize, Deserialize)]
struct SectionEnd {
    messages: u64,
}

pub fn section_end(messages: u64) -> Vec<u8> {
    json_record(TAG_END, &SectionEnd { messages })
}

pub(super) fn malformed(key: &str, message: impl Into<String>) -> RepositoryError {
    RepositoryError::Malformed {
        key: key.into(),
        message: message.into(),
    }
}

/// Reads a pack's footer with ranged reads of its tail (`size` from the listing).
async fn read_footer(store: &Arc<dyn ObjectStore>, key: &str, size: u64) -> Result<PackFooter> {
    if size < TRAILER_LEN {
        return Err(malformed(
            key,
            format!("{size} bytes is too short for a pack (truncated?)"),
        ));
    }
    // One read usually covers the footer too.
    let tail_start = size.saturating_sub(64 * 1024);
    let tail = store.get_bytes(key, Some(tail_start..size)).await?;
    let trailer = &tail[tail.len() - TRAILER_LEN as usize..];
    if &trailer[36..] != TRAILER_MAGIC {
        return Err(malformed(
            key,
            "no pack trailer at its end (truncated or not a pack)",
        ));
    }
    let len = u32::from_le_bytes(trailer[..4].try_into().expect("4 bytes"));
    if len > MAX_FOOTER || u64::from(len) + TRAILER_LEN > size {
        return Err(malformed(
            key,
            format!("footer length {len} does not fit the pack"),
        ));
    }
    let footer_start = size - TRAILER_LEN - u64::from(len);
    let json: Bytes = if footer_start >= tail_start {
        tail.slice((footer_start - tail_start) as usize..tail.len() - TRAILER_LEN as usize)
    } else {
        store
            .get_bytes(key, Some(footer_start..size - TRAILER_LEN))
            .await?
    };
    if Sha256::digest(&json).as_slice() != &trailer[4..36] {
        return Err(malformed(
            key,
            "the footer does not match its digest (modified or damaged)",
        ));
    }
    let footer: PackFooter =
        serde_json::from_slice(&json).map_err(|e| malformed(key, e.to_string()))?;
    if !super::readable(footer.format_version) {
        return Err(RepositoryError::UnknownFormat {
            key: key.into(),
            found: footer.format_version,
        });
    }
    if range_of(key) != Some((footer.start_lsn, footer.end_lsn)) {
        return Err(malformed(
            key,
            format!(
                "footer says {}..{}: the pack was renamed or swapped",
                footer.start_lsn, footer.end_lsn
            ),
        ));
    }
    check_tiling(key, &footer, footer_start)?;
    Ok(footer)
}

/// Sections, then the routing region, must cover `[0, footer_start)` exactly, in order.
/// The footer is hostile input: offsets and lengths can be anything up to `u64::MAX`, so every
/// comparison is written so that it cannot overflow.
fn check_tiling(key: &str, footer: &PackFooter, footer_start: u64) -> Result<()> {
    // `offset <= footer_start` holds throughout: each length was checked to fit before adding.
    let fits = |offset: u64, region_offset: u64, length: u64| {
        region_offset == offset && length <= footer_start - offset
    };
    let mut offset = 0;
    for s in &footer.sections {
        if !fits(offset, s.offset, s.length) {
            return Err(malformed(key, "section offsets do not tile the pack"));
        }
        offset += s.length;
    }
    if let Some(r) = &footer.routes {
        if !fits(offset, r.offset, r.length) {
            return Err(malformed(
                key,
                "the routing region does not follow the sections",
            ));
        }
        offset += r.length;
    }
    if offset != footer_start {
        return Err(malformed(key, "section offsets do not tile the pack"));
    }
    Ok(())
}

/// A region's bytes, checked against its digest.
async fn read_region(store: &Arc<dyn ObjectStore>, key: &str, region: &Region) -> Result<Bytes> {
    let bytes = store
        .get_bytes(key, Some(region.offset..region.offset + region.length))
        .await?;
    if hex::encode(Sha256::digest(&bytes)) != region.sha256 {
        return Err(RepositoryError::DigestMismatch {
            key: format!("{key} routing region"),
            expected: region.sha256.clone(),
            found: hex::encode(Sha256::digest(&bytes)),
            expected_bytes: region.length,
            found_bytes: bytes.len() as u64,
        });
    }
    Ok(bytes)
}

/// Decodes one section's stored bytes from `reader` on a blocking thread. The channel's last
/// item is an error if anything is wrong (digest, decryption, framing, identity), so a consumer
/// treats what it applied as provisional until the channel closes cleanly.
fn decode_section(
    reader: impl Read + Send + 'static,
    key: &str,
    index: usize,
    entry: &SectionEntry,
    identities: Arc<Identities>,
) -> Result<mpsc::Receiver<Result<Message>>> {
    let (tx, rx) = mpsc::channel(MESSAGES_IN_FLIGHT);
    let (pack_start, _) = range_of(key).ok_or_else(|| malformed(key, "not a pack key"))?;
    let expect = SectionHeader {
        pack_start,
        tenant: entry.tenant.clone(),
        index: u32::try_from(index).unwrap_or(u32::MAX),
    };
    let (key, entry) = (key.to_string(), entry.clone());
    tokio::task::spawn_blocking(move || {
        if let Err(e) = read_section(reader, &key, &entry, &expect, &identities, &tx) {
            let _ = tx.blocking_send(Err(e));
        }
    });
    Ok(rx)
}

fn read_section(
    reader: impl Read,
    key: &str,
    entry: &SectionEntry,
    expect: &SectionHeader,
    identities: &Identities,
    tx: &mpsc::Sender<Result<Message>>,
) -> Result<()> {
    let damaged = |message: String| RepositoryError::Archive {
        key: format!("{key} section {}", expect.index),
        message,
    };
    let mut hashing = HashingReader::new(reader);
    {
        let mut plain = open_recorded(&mut hashing, identities, entry.sealed_to.as_deref())
            .map_err(|source| RepositoryError::Object {
                key: format!("{key} section {}", expect.index),
                source,
            })?;
        let io = |e: std::io::Error| {
            damaged(format!(
                "{} (damaged, truncated or tampered object)",
                classify_read_error(e)
            ))
        };
        let mut magic = [0u8; 8];
        plain.read_exact(&mut magic).map_err(io)?;
        if &magic != SECTION_MAGIC {
            return Err(damaged("not a change section".into()));
        }
        let mut messages = 0u64;
        let mut first = true;
        loop {
            let mut prefix = [0u8; 5];
            plain.read_exact(&mut prefix).map_err(io)?;
            let len = u32::from_be_bytes(prefix[1..].try_into().expect("4 bytes"));
            if len > MAX_RECORD {
                return Err(damaged(format!("record of {len} bytes is too large")));
            }
            let mut payload = vec![0u8; len as usize];
            plain.read_exact(&mut payload).map_err(io)?;
            match (prefix[0], first) {
                (TAG_HEADER, true) => {
                    let header: SectionHeader =
                        serde_json::from_slice(&payload).map_err(|e| damaged(e.to_string()))?;
                    if &header != expect {
                        return Err(damaged(format!(
                            "section says it is {header:?}, the footer expects {expect:?}: it was swapped"
                        )));
                    }
                    first = false;
                }
                (TAG_MESSAGE, false) => {
                    let message = pgoutput::decode(&Bytes::from(payload), CONTEXT)
                        .map_err(|e| damaged(e.to_string()))?;
                    messages += 1;
                    if tx.blocking_send(Ok(message)).is_err() {
                        return Ok(()); // the consumer stopped
                    }
                }
                (TAG_END, false) => {
                    let end: SectionEnd =
                        serde_json::from_slice(&payload).map_err(|e| damaged(e.to_string()))?;
                    if end.messages != messages {
                        return Err(damaged(format!(
                            "holds {messages} messages, its end record says {}",
                            end.messages
                        )));
                    }
                    let mut rest = [0u8; 1];
                    if plain.read(&mut rest).map_err(io)? != 0 {
                        return Err(damaged("bytes after the end record".into()));
                    }
                    break;
                }
                (tag, _) => {
                    return Err(damaged(format!("unexpected record {:?}", tag as char)));
                }
            }
        }
    }
    check_digest(hashing, &format!("{key} section {}", expect.index), entry)
}

/// Reads what is left and compares every byte read with the footer's digest.
fn check_digest(
    mut hashing: HashingReader<impl Read>,
    name: &str,
    entry: &SectionEntry,
) -> Result<()> {
    std::io::copy(&mut hashing, &mut std::io::sink()).map_err(|e| RepositoryError::Object {
        key: name.into(),
        source: classify_read_error(e),
    })?;
    let (bytes, sha256) = hashing.digest();
    if bytes != entry.length || sha256 != entry.sha256 {
        return Err(RepositoryError::DigestMismatch {
            key: name.into(),
            expected: entry.sha256.clone(),
            found: sha256,
            expected_bytes: entry.length,
            found_bytes: bytes,
        });
    }
    Ok(())
}

/// Checks one section's stored bytes against the footer's digest, without decrypting.
async fn verify_section_digest(
    store: &Arc<dyn ObjectStore>,
    key: &str,
    index: usize,
    entry: &SectionEntry,
) -> Result<()> {
    let reader =
        super::object::fetch_reader(store, key, Some(entry.offset..entry.offset + entry.length))
            .await?;
    let name = format!("{key} section {index}");
    let entry = entry.clone();
    tokio::task::spawn_blocking(move || check_digest(HashingReader::new(reader), &name, &entry))
        .await
        .map_err(|e| RepositoryError::Archive {
            key: "(reader)".into(),
            message: e.to_string(),
        })?
}

impl Repository {
    /// Stores a whole pack — sections, footer, trailer — as `[start, end)`. It becomes visible
    /// at once and is never rewritten (an existing key is an error); returns its key.
    pub async fn put_pack(
        &self,
        start: Lsn,
        end: Lsn,
        body: crate::storage::ByteStream,
    ) -> Result<String> {
        let key = key(start, end);
        self.store()
            .put(&key, body, crate::storage::PutMode::CreateNew)
            .await?;
        Ok(key)
    }

    /// A pack's footer, read with ranged reads of its tail and checked (digest, version, its
    /// key's range, the tiling of its regions).
    pub async fn pack_footer(&self, pack: &PackRef) -> Result<PackFooter> {
        read_footer(self.store(), &pack.key, pack.size).await
    }

    /// A pack region's bytes (the routing region), checked against the footer's digest.
    pub async fn pack_region(&self, pack_key: &str, region: &Region) -> Result<Bytes> {
        read_region(self.store(), pack_key, region).await
    }

    /// Streams the decoded messages of one section. The channel's last item is an error if
    /// anything is wrong (digest, decryption, framing, identity), so a consumer treats what it
    /// applied as provisional until the channel closes cleanly.
    pub async fn pack_section(
        &self,
        pack_key: &str,
        index: usize,
        entry: &SectionEntry,
        identities: Arc<Identities>,
    ) -> Result<mpsc::Receiver<Result<Message>>> {
        let range = entry.offset..entry.offset + entry.length;
        let reader = super::object::fetch_reader(self.store(), pack_key, Some(range)).await?;
        decode_section(reader, pack_key, index, entry, identities)
    }

    /// Decodes a section whose stored bytes were fetched before ([`Self::fetch_section`]):
    /// every check of [`Self::pack_section`] applies.
    pub fn decode_section(
        &self,
        stored: impl Read + Send + 'static,
        pack_key: &str,
        index: usize,
        entry: &SectionEntry,
        identities: Arc<Identities>,
    ) -> Result<mpsc::Receiver<Result<Message>>> {
        decode_section(stored, pack_key, index, entry, identities)
    }

    /// Copies a section's stored bytes (ciphertext) into `file` at `at`, as they arrive:
    /// nothing is held whole. Returns the bytes written, which must be the section's length.
    pub async fn fetch_section(
        &self,
        pack_key: &str,
        entry: &SectionEntry,
        file: &std::fs::File,
        at: u64,
    ) -> Result<()> {
        use futures::TryStreamExt;
        use std::os::unix::fs::FileExt;
        let range = entry.offset..entry.offset + entry.length;
        let mut body = self.store().get(pack_key, Some(range)).await?;
        let mut written = 0u64;
        let io = |source| crate::storage::StorageError::Io {
            key: pack_key.to_string(),
            source,
        };
        while let Some(chunk) = body.try_next().await.map_err(io)? {
            if written + chunk.len() as u64 > entry.length {
                break;
            }
            file.write_all_at(&chunk, at + written).map_err(io)?;
            written += chunk.len() as u64;
        }
        if written != entry.length {
            return Err(malformed(
                pack_key,
                format!(
                    "a section read {written} bytes where the footer says {}: truncated?",
                    entry.length
                ),
            ));
        }
        Ok(())
    }

    /// Checks one section's stored bytes against the footer's digest, without decrypting.
    pub async fn verify_pack_section(
        &self,
        pack_key: &str,
        index: usize,
        entry: &SectionEntry,
    ) -> Result<()> {
        verify_section_digest(self.store(), pack_key, index, entry).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{MemoryStore, PutMode};

    const START: Lsn = Lsn(0x100);
    const END: Lsn = Lsn(0x200);

    fn section(offset: u64, length: u64) -> SectionEntry {
        let time = DateTime::<Utc>::UNIX_EPOCH;
        SectionEntry {
            tenant: None,
            offset,
            length,
            sha256: String::new(),
            first_lsn: START,
            last_lsn: START,
            first_time: time,
            last_time: time,
            transactions: 1,
            changes: 1,
            sealed_to: None,
        }
    }

    fn footer(sections: Vec<SectionEntry>, routes: Option<Region>) -> PackFooter {
        PackFooter {
            format_version: super::super::FORMAT_VERSION,
            start_lsn: START,
            end_lsn: END,
            covered_until: DateTime::<Utc>::UNIX_EPOCH,
            sections,
            routes,
        }
    }

    /// Stores `body` followed by `footer` and reads the footer back the way restores do.
    async fn read_back(body: &[u8], footer: &PackFooter) -> Result<PackFooter> {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let mut pack = body.to_vec();
        pack.extend_from_slice(&footer.encode());
        let size = pack.len() as u64;
        let key = key(START, END);
        store
            .put_bytes(&key, pack.into(), PutMode::CreateNew)
            .await
            .unwrap();
        read_footer(&store, &key, size).await
    }

    #[tokio::test]
    async fn regions_that_tile_the_pack_are_accepted() {
        let routes = Region {
            offset: 5,
            length: 2,
            sha256: String::new(),
        };
        let honest = footer(vec![section(0, 3), section(3, 2)], Some(routes));
        assert_eq!(read_back(b"abcdefg", &honest).await.unwrap(), honest);
    }

    /// Found by fuzzing: `offset + length` overflowed (a panic in debug builds, wrapping
    /// arithmetic in release builds).
    #[tokio::test]
    async fn lengths_near_u64_max_are_an_error_not_an_overflow() {
        let huge_section = footer(vec![section(0, 3), section(3, u64::MAX)], None);
        let huge_routes = footer(
            vec![section(0, 3)],
            Some(Region {
                offset: 3,
                length: u64::MAX - 2,
                sha256: String::new(),
            }),
        );
        let past_the_end = footer(vec![section(u64::MAX, 1)], None);
        for hostile in [huge_section, huge_routes, past_the_end] {
            let error = read_back(b"abc", &hostile).await.unwrap_err();
            assert!(
                matches!(error, RepositoryError::Malformed { .. }),
                "{error}"
            );
        }
    }
}
