//! Persisted routing state: the capture router's key maps, so that a restarted daemon routes
//! exactly as the one that stopped — even a change to a row whose parent was deleted while it
//! was down.
//!
//! A checkpoint (`changes/routes-<lsn>.zst`) holds every map at an LSN: `init` writes the first
//! from inside the first snapshot, the daemon one every few minutes and when it stops.
//! Each pack carries the changes its transactions made to the maps. Capture resumes from the
//! newest checkpoint at or before the durable LSN plus the deltas of the packs after it.
//!
//! The daemon must read this back without the decryption identity (it holds only
//! recipients), so it is compressed, not encrypted: it holds salted hashes of key values and
//! tenant values, never a key or column value (FORMAT.md).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::keys::CHANGES_PREFIX;
use super::pack::Region;
use super::{Repository, RepositoryError};
use crate::pg::Lsn;
use crate::storage::PutMode;

/// A key as the maps hold it: a salted SHA-256 of the key's text values, truncated. Fixed
/// size keeps the maps small, and the persisted routing state (FORMAT.md) carries no key value.
pub type KeyHash = [u8; 16];

/// One change to the key maps, as persisted in packs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    Set {
        map: Arc<str>,
        key: KeyHash,
        /// `None`: the row belongs to no tenant.
        tenant: Option<Arc<str>>,
    },
    Remove {
        map: Arc<str>,
        key: KeyHash,
    },
    Clear {
        map: Arc<str>,
    },
}

const MAGIC: &[u8; 8] = b"UPDOGRT\x01";
const ROUTES_PREFIX: &str = "changes/routes-";

pub fn checkpoint_key(lsn: Lsn) -> String {
    format!("{ROUTES_PREFIX}{}.zst", lsn.to_key())
}

fn lsn_of(key: &str) -> Option<Lsn> {
    Lsn::from_key(key.strip_prefix(ROUTES_PREFIX)?.strip_suffix(".zst")?).ok()
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    maps: Vec<String>,
    tenants: Vec<String>,
    operations: u64,
    /// A checkpoint's LSN, which its key must name: the state of an older checkpoint stored
    /// under a newer key would route changes with maps from before them. `None` in a pack's
    /// routing region, which its pack's footer binds to the pack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lsn: Option<Lsn>,
}

const SET: u8 = b'S';
/// A Set to no tenant (the row's route is NULL): no entry in the tenant table.
const SET_NONE: u8 = b'N';
const REMOVE: u8 = b'R';
const CLEAR: u8 = b'C';

/// The smallest operation: Clear, a tag and a map index.
const MIN_OPERATION: usize = 1 + 4;
/// How much larger than its stored bytes a routing object's plaintext may be. It is mostly
/// 16-byte hashes, which do not compress (a few times smaller at most); anything beyond this is
/// a decompression bomb, which must not make the daemon or `verify` allocate without bound.
const MAX_EXPANSION: usize = 64;
/// Plaintext always allowed whatever the stored size: long runs of Clear operations (a table
/// truncated over and over) compress far better than hashes.
const MIN_PLAINTEXT_LIMIT: usize = 64 << 20;
/// zstd windows this large are refused (level 3, which [`encode`] uses, needs 2^21 at most):
/// a frame may ask the decoder for a window of any size before giving any data.
const MAX_WINDOW_LOG: u32 = 24;

/// Encodes the deltas of a pack's transactions, for the pack's routing region.
pub fn encode(deltas: &[Delta]) -> Vec<u8> {
    seal(None, deltas)
}

/// Encodes a checkpoint: the whole state after every transaction committed before `lsn`.
pub fn encode_checkpoint(lsn: Lsn, deltas: &[Delta]) -> Vec<u8> {
    seal(Some(lsn), deltas)
}

/// The names (maps, tenants) an object's operations refer to by number, numbered in order of
/// first use. By hash: a checkpoint of thousands of tenants names one in each of hundreds of
/// thousands of operations.
#[derive(Debug, Default)]
struct Names {
    list: Vec<String>,
    index: HashMap<String, u32>,
}

impl Names {
    fn index_of(&mut self, name: &str) -> u32 {
        if let Some(i) = self.index.get(name) {
            return *i;
        }
        let i = self.list.len() as u32;
        self.list.push(name.to_string());
        self.index.insert(name.to_string(), i);
        i
    }
}

fn encode_set(ops: &mut Vec<u8>, map: u32, key: &KeyHash, tenant: Option<u32>) {
    ops.push(if tenant.is_some() { SET } else { SET_NONE });
    ops.extend_from_slice(&map.to_le_bytes());
    ops.extend_from_slice(key);
    if let Some(tenant) = tenant {
        ops.extend_from_slice(&tenant.to_le_bytes());
    }
}

fn encode_clear(ops: &mut Vec<u8>, map: u32) {
    ops.push(CLEAR);
    ops.extend_from_slice(&map.to_le_bytes());
}

/// Magic, JSON header (map and tenant tables), operations, then a SHA-256 of everything
/// before it; zstd-compressed.
fn seal(lsn: Option<Lsn>, deltas: &[Delta]) -> Vec<u8> {
    let mut maps = Names::default();
    let mut tenants = Names::default();
    let index = |names: &mut Names, v: &str| names.index_of(v);
    let mut ops = Vec::new();
    for d in deltas {
        match d {
            Delta::Set { map, key, tenant } => {
                let map = index(&mut maps, map);
                let tenant = tenant.as_deref().map(|t| index(&mut tenants, t));
                encode_set(&mut ops, map, key, tenant);
            }
            Delta::Remove { map, key } => {
                ops.push(REMOVE);
                ops.extend_from_slice(&index(&mut maps, map).to_le_bytes());
                ops.extend_from_slice(key);
            }
            Delta::Clear { map } => encode_clear(&mut ops, index(&mut maps, map)),
        }
    }
    let header = serde_json::to_vec(&Header {
        maps: maps.list,
        tenants: tenants.list,
        operations: deltas.len() as u64,
        lsn,
    })
    .expect("a header always serializes");
    let mut plain = MAGIC.to_vec();
    plain.extend_from_slice(&(header.len() as u32).to_le_bytes());
    plain.extend_from_slice(&header);
    plain.extend_from_slice(&ops);
    let digest = Sha256::digest(&plain);
    plain.extend_from_slice(&digest);
    zstd::bulk::compress(&plain, 3).expect("compressing in memory")
}

/// The inverse of [`encode`] (a pack's routing region); any damage is an error.
pub fn decode(key: &str, bytes: &[u8]) -> Result<Vec<Delta>, RepositoryError> {
    open(key, bytes, None)
}

/// The inverse of [`encode_checkpoint`]: the checkpoint must hold the state at the LSN its
/// key names.
pub fn decode_checkpoint(key: &str, bytes: &[u8]) -> Result<Vec<Delta>, RepositoryError> {
    let lsn = lsn_of(key).ok_or_else(|| RepositoryError::Malformed {
        key: key.into(),
        message: "not a routing checkpoint key".into(),
    })?;
    open(key, bytes, Some(lsn))
}

fn open(key: &str, bytes: &[u8], lsn: Option<Lsn>) -> Result<Vec<Delta>, RepositoryError> {
    let bad = |m: &str| RepositoryError::Malformed {
        key: key.into(),
        message: format!("routing state: {m}"),
    };
    let plain = decompress(bytes, plaintext_limit(bytes.len())).map_err(|m| bad(&m))?;
    if plain.len() < MAGIC.len() + 4 + 32 || &plain[..8] != MAGIC {
        return Err(bad("not a routing state object"));
    }
    let (body, digest) = plain.split_at(plain.len() - 32);
    if Sha256::digest(body).as_slice() != digest {
        return Err(bad("digest mismatch (damaged or modified)"));
    }
    let hlen = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes")) as usize;
    let header: Header =
        serde_json::from_slice(body.get(12..12 + hlen).ok_or_else(|| bad("short"))?)
            .map_err(|e| bad(&e.to_string()))?;
    if let Some(m) = lsn_mismatch(header.lsn, lsn) {
        return Err(bad(&m));
    }
    let maps: Vec<Arc<str>> = header.maps.iter().map(|m| Arc::from(m.as_str())).collect();
    let tenants: Vec<Arc<str>> = header
        .tenants
        .iter()
        .map(|t| Arc::from(t.as_str()))
        .collect();
    let mut ops = &body[12 + hlen..];
    // The count comes from the object: never reserve more than its bytes can hold.
    let fit = ops.len() / MIN_OPERATION;
    let mut out =
        Vec::with_capacity(usize::try_from(header.operations).map_or(fit, |n| n.min(fit)));
    let take = |ops: &mut &[u8], n: usize| -> Result<Vec<u8>, RepositoryError> {
        if ops.len() < n {
            return Err(bad("truncated operation"));
        }
        let (head, rest) = ops.split_at(n);
        *ops = rest;
        Ok(head.to_vec())
    };
    let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize;
    while !ops.is_empty() {
        let tag = take(&mut ops, 1)?[0];
        let map = maps
            .get(u32_at(&take(&mut ops, 4)?))
            .ok_or_else(|| bad("map index"))?
            .clone();
        let mut key = || -> Result<KeyHash, RepositoryError> {
            Ok(take(&mut ops, 16)?.try_into().expect("16 bytes"))
        };
        out.push(match tag {
            SET => {
                let key = key()?;
                let tenant = tenants
                    .get(u32_at(&take(&mut ops, 4)?))
                    .ok_or_else(|| bad("tenant index"))?
                    .clone();
                Delta::Set {
                    map,
                    key,
                    tenant: Some(tenant),
                }
            }
            SET_NONE => Delta::Set {
                map,
                key: key()?,
                tenant: None,
            },
            REMOVE => Delta::Remove { map, key: key()? },
            CLEAR => Delta::Clear { map },
            _ => return Err(bad("unknown operation")),
        });
    }
    if out.len() as u64 != header.operations {
        return Err(bad("operation count"));
    }
    Ok(out)
}

/// The most plaintext a routing object of `stored` bytes can hold.
fn plaintext_limit(stored: usize) -> usize {
    stored
        .saturating_mul(MAX_EXPANSION)
        .max(MIN_PLAINTEXT_LIMIT)
}

/// The stored bytes, decompressed, if they stay within `limit` bytes.
pub(super) fn decompress(bytes: &[u8], limit: usize) -> Result<Vec<u8>, String> {
    let mut decoder = zstd::stream::read::Decoder::with_buffer(bytes).map_err(|e| e.to_string())?;
    decoder
        .window_log_max(MAX_WINDOW_LOG)
        .map_err(|e| e.to_string())?;
    let mut plain = Vec::new();
    decoder
        .take(limit as u64 + 1)
        .read_to_end(&mut plain)
        .map_err(|e| e.to_string())?;
    if plain.len() > limit {
        return Err(format!(
            "decompresses to more than {limit} bytes, the most {} stored bytes of routing state \
             can hold (it is mostly hashes, which do not compress): damaged or not a routing state",
            bytes.len()
        ));
    }
    Ok(plain)
}

/// Why the LSN a routing object holds its state at is not the one expected, if it is not.
fn lsn_mismatch(found: Option<Lsn>, expected: Option<Lsn>) -> Option<String> {
    if found == expected {
        return None;
    }
    Some(match (found, expected) {
        (Some(found), Some(expected)) => format!(
            "holds the state at {found}, not at {expected} as its key says (an older checkpoint \
             stored under a newer key?): delete it, and the daemon resumes from the checkpoint \
             before it and the packs after that"
        ),
        (Some(found), None) => {
            format!("is a checkpoint (at {found}) where a pack's routing region belongs")
        }
        (None, _) => "does not say which LSN it holds the state at".into(),
    })
}

/// A checkpoint written as its state is read, never held whole: the operations wait in an
/// unlinked scratch file, encrypted to a key held in memory, until the names they use are
/// known for the header; then the object is compressed and uploaded as it is read back.
/// Memory holds the names (maps and tenants) only, whatever the number of keys.
pub struct CheckpointWriter {
    lsn: Lsn,
    maps: Names,
    tenants: Names,
    operations: u64,
    spill: age::stream::StreamWriter<BufWriter<File>>,
    identity: age::x25519::Identity,
    op: Vec<u8>,
}

impl std::fmt::Debug for CheckpointWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointWriter")
            .field("lsn", &self.lsn)
            .field("operations", &self.operations)
            .finish()
    }
}

impl CheckpointWriter {
    /// The checkpoint at `lsn`, its operations waiting in a scratch file in `dir`.
    pub fn new(lsn: Lsn, dir: &Path) -> io::Result<Self> {
        let identity = age::x25519::Identity::generate();
        let recipient = identity.to_public();
        let file = crate::scratch::anonymous_file(dir, "routes")?;
        let spill =
            age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
                .map_err(io::Error::other)?
                .wrap_output(BufWriter::with_capacity(1 << 20, file))?;
        Ok(Self {
            lsn,
            maps: Names::default(),
            tenants: Names::default(),
            operations: 0,
            spill,
            identity,
            op: Vec::with_capacity(32),
        })
    }

    /// Empties `map` (before its keys: a checkpoint replaces whatever state it is applied to).
    pub fn clear(&mut self, map: &str) -> Result<(), RepositoryError> {
        self.op.clear();
        encode_clear(&mut self.op, self.maps.index_of(map));
        self.push()
    }

    /// `key` of `map` belongs to `tenant` (`None`: to no tenant).
    pub fn set(
        &mut self,
        map: &str,
        key: &KeyHash,
        tenant: Option<&str>,
    ) -> Result<(), RepositoryError> {
        self.op.clear();
        let map = self.maps.index_of(map);
        let tenant = tenant.map(|t| self.tenants.index_of(t));
        encode_set(&mut self.op, map, key, tenant);
        self.push()
    }

    fn push(&mut self) -> Result<(), RepositoryError> {
        self.spill
            .write_all(&self.op)
            .map_err(|source| crate::storage::StorageError::Io {
                key: "the routing checkpoint's scratch file".into(),
                source,
            })?;
        self.operations += 1;
        Ok(())
    }

    /// Stores the checkpoint (replacing one at the same LSN), as [`encode_checkpoint`] would
    /// have encoded the same operations.
    pub async fn store(self, repo: &Repository) -> Result<(), RepositoryError> {
        let Self {
            lsn,
            maps,
            tenants,
            operations,
            spill,
            identity,
            ..
        } = self;
        let header = serde_json::to_vec(&Header {
            maps: maps.list,
            tenants: tenants.list,
            operations,
            lsn: Some(lsn),
        })
        .expect("a header always serializes");
        let key = checkpoint_key(lsn);
        let scratch = |e: io::Error| RepositoryError::Malformed {
            key: key.clone(),
            message: format!("writing the routing checkpoint through a scratch file: {e}"),
        };
        let mut file = spill
            .finish()
            .and_then(|w| w.into_inner().map_err(io::IntoInnerError::into_error))
            .map_err(scratch)?;
        file.seek(SeekFrom::Start(0)).map_err(scratch)?;
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
        // Read back, compressed and handed to the upload on a blocking thread; a failure
        // reaches the upload as an error, so no truncated checkpoint is ever stored.
        let producer = tokio::task::spawn_blocking(move || {
            let result = (|| -> io::Result<()> {
                let ops = age::Decryptor::new(BufReader::with_capacity(1 << 16, file))
                    .map_err(io::Error::other)?
                    .decrypt(std::iter::once(&identity as &dyn age::Identity))
                    .map_err(io::Error::other)?;
                let mut out = zstd::stream::write::Encoder::new(
                    Chunks {
                        tx: tx.clone(),
                        buf: Vec::new(),
                    },
                    3,
                )?;
                let mut hasher = Sha256::new();
                let mut write = |bytes: &[u8]| -> io::Result<()> {
                    hasher.update(bytes);
                    out.write_all(bytes)
                };
                write(MAGIC)?;
                write(&(header.len() as u32).to_le_bytes())?;
                write(&header)?;
                let mut ops = BufReader::with_capacity(1 << 16, ops);
                loop {
                    let chunk = ops.fill_buf()?;
                    if chunk.is_empty() {
                        break;
                    }
                    let n = chunk.len();
                    write(chunk)?;
                    ops.consume(n);
                }
                let digest = hasher.finalize();
                out.write_all(&digest)?;
                out.finish()?.flush()
            })();
            if let Err(e) = result {
                let _ = tx.blocking_send(Err(e));
            }
        });
        let body: crate::storage::ByteStream =
            Box::pin(futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|item| (item, rx))
            }));
        let stored = repo.store().put(&key, body, PutMode::Overwrite).await;
        producer.await.map_err(|e| RepositoryError::Malformed {
            key: key.clone(),
            message: format!("writing the routing checkpoint: {e}"),
        })?;
        stored?;
        Ok(())
    }
}

/// Bytes handed to a channel in pieces of [`crate::codec::OUTPUT_CHUNK`].
struct Chunks {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl Write for Chunks {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= crate::codec::OUTPUT_CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::other("the upload ended early"))
    }
}

impl Repository {
    /// Stores the routing state after every transaction committed before `lsn`.
    pub async fn put_routing_checkpoint(
        &self,
        lsn: Lsn,
        state: &[Delta],
    ) -> Result<(), RepositoryError> {
        let bytes = encode_checkpoint(lsn, state);
        self.store()
            .put_bytes(&checkpoint_key(lsn), bytes.into(), PutMode::Overwrite)
            .await?;
        Ok(())
    }

    /// Every checkpoint, oldest first.
    pub async fn routing_checkpoints(&self) -> Result<Vec<(Lsn, String)>, RepositoryError> {
        let mut keys: Vec<(Lsn, String)> = self
            .store()
            .list(ROUTES_PREFIX)
            .await?
            .into_iter()
            .filter_map(|o| lsn_of(&o.key).map(|l| (l, o.key)))
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// The newest checkpoint in `[since, at]`.
    pub async fn newest_routing_checkpoint(
        &self,
        since: Lsn,
        at: Lsn,
    ) -> Result<Option<(Lsn, Vec<Delta>)>, RepositoryError> {
        let mut keys = self.routing_checkpoints().await?;
        keys.retain(|(l, _)| *l >= since && *l <= at);
        let Some((lsn, key)) = keys.pop() else {
            return Ok(None);
        };
        Ok(Some((lsn, self.routing_checkpoint(&key).await?)))
    }

    /// One checkpoint's state, checked (digest, and the LSN its key names).
    pub async fn routing_checkpoint(&self, key: &str) -> Result<Vec<Delta>, RepositoryError> {
        let bytes = self.store().get_bytes(key, None).await?;
        decode_checkpoint(key, &bytes)
    }

    /// The deltas of a pack's routing region, checked (the footer's digest, then its content).
    pub async fn pack_routes(
        &self,
        pack_key: &str,
        region: &Region,
    ) -> Result<Vec<Delta>, RepositoryError> {
        let bytes = self.pack_region(pack_key, region).await?;
        decode(&format!("{pack_key} routing region"), &bytes)
    }
}

/// Whether `key` is a routing checkpoint (for listings that skip them).
pub fn is_checkpoint(key: &str) -> bool {
    key.starts_with(CHANGES_PREFIX) && lsn_of(key).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkpoint_written_as_read_is_the_checkpoint_of_the_same_state() {
        let store: Arc<dyn crate::storage::ObjectStore> =
            Arc::new(crate::storage::MemoryStore::new());
        let repo = Repository::new(store);
        let dir = tempfile::tempdir().unwrap();
        let (funds, lots): (Arc<str>, Arc<str>) =
            (Arc::from("app.funds(id)"), Arc::from("app.lots(id)"));
        let mut deltas = vec![
            Delta::Clear { map: funds.clone() },
            Delta::Clear { map: lots.clone() },
        ];
        // Enough keys for several compressed chunks, a tenant per key of a few thousand.
        for i in 0..200_000u32 {
            let mut key = [0u8; 16];
            key[..4].copy_from_slice(&i.to_le_bytes());
            deltas.push(Delta::Set {
                map: if i % 3 == 0 {
                    lots.clone()
                } else {
                    funds.clone()
                },
                key,
                tenant: (i % 7 != 0).then(|| Arc::from(format!("t{}", i % 5000))),
            });
        }
        let lsn = Lsn(0x1234);
        let mut writer = CheckpointWriter::new(lsn, dir.path()).unwrap();
        for d in &deltas {
            match d {
                Delta::Clear { map } => writer.clear(map).unwrap(),
                Delta::Set { map, key, tenant } => writer.set(map, key, tenant.as_deref()).unwrap(),
                Delta::Remove { .. } => unreachable!(),
            }
        }
        writer.store(&repo).await.unwrap();
        assert_eq!(
            repo.routing_checkpoint(&checkpoint_key(lsn)).await.unwrap(),
            deltas
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "nothing left on disk"
        );
    }

    #[test]
    fn deltas_round_trip_and_damage_is_refused() {
        let m: Arc<str> = Arc::from("app.funds(id)");
        let deltas = vec![
            Delta::Clear { map: m.clone() },
            Delta::Set {
                map: m.clone(),
                key: [7; 16],
                tenant: Some(Arc::from("t1")),
            },
            Delta::Set {
                map: m.clone(),
                key: [8; 16],
                tenant: None,
            },
            Delta::Remove {
                map: m.clone(),
                key: [7; 16],
            },
        ];
        let bytes = encode(&deltas);
        assert_eq!(decode("k", &bytes).unwrap(), deltas);
        let mut plain = zstd::stream::decode_all(&bytes[..]).unwrap();
        let n = plain.len();
        plain[n - 40] ^= 1;
        let damaged = zstd::bulk::compress(&plain, 3).unwrap();
        assert!(decode("k", &damaged).is_err());
        assert!(decode("k", b"garbage").is_err());
    }
}

#[cfg(test)]
mod hostile_input {
    use super::*;

    fn clear(map: &str) -> Delta {
        Delta::Clear {
            map: Arc::from(map),
        }
    }

    /// What a writer stores for a hand-made plaintext: it, its SHA-256, compressed.
    fn stored(mut plain: Vec<u8>) -> Vec<u8> {
        let digest = Sha256::digest(&plain);
        plain.extend_from_slice(&digest);
        zstd::bulk::compress(&plain, 3).unwrap()
    }

    fn message(result: Result<Vec<Delta>, RepositoryError>) -> String {
        match result {
            Ok(deltas) => panic!("accepted {deltas:?}"),
            Err(RepositoryError::Malformed { message, .. }) => message,
            Err(e) => panic!("not a Malformed error: {e}"),
        }
    }

    /// Found by fuzzing: the capacity was taken from the header's operation count as it was.
    #[test]
    fn a_huge_operation_count_reserves_nothing_it_cannot_fill() {
        let header = br#"{"maps":["m"],"tenants":[],"operations":18446744073709551615}"#;
        let mut plain = MAGIC.to_vec();
        plain.extend_from_slice(&(header.len() as u32).to_le_bytes());
        plain.extend_from_slice(header);
        plain.extend_from_slice(&[CLEAR, 0, 0, 0, 0]);
        let m = message(decode("k", &stored(plain)));
        assert!(m.contains("operation count"), "{m}");
    }

    /// Found by fuzzing: a few stored bytes decompressed without bound (a zstd bomb).
    #[test]
    fn decompression_stops_at_the_limit() {
        let bomb = zstd::bulk::compress(&vec![0u8; 1 << 20], 3).unwrap();
        assert!(bomb.len() < 1 << 10);
        let m = decompress(&bomb, 1 << 16).unwrap_err();
        assert!(m.contains("more than 65536 bytes"), "{m}");
        assert_eq!(decompress(&bomb, 1 << 20).unwrap().len(), 1 << 20);
        // Hashes do not compress: a real checkpoint is never near the limit.
        assert_eq!(plaintext_limit(1 << 10), MIN_PLAINTEXT_LIMIT);
        assert_eq!(plaintext_limit(1 << 30), (1 << 30) * MAX_EXPANSION);
    }

    #[test]
    fn a_checkpoint_holds_the_state_at_the_lsn_of_its_key() {
        let deltas = vec![clear("app.funds(id)")];
        let at = |lsn| checkpoint_key(Lsn(lsn));
        let checkpoint = encode_checkpoint(Lsn(0x500), &deltas);
        assert_eq!(decode_checkpoint(&at(0x500), &checkpoint).unwrap(), deltas);
        // An older checkpoint stored under a newer key.
        let m = message(decode_checkpoint(&at(0x900), &checkpoint));
        assert!(m.contains("holds the state at 0/500, not at 0/900"), "{m}");
        // A checkpoint where a region belongs, and the other way round.
        let m = message(decode(&at(0x500), &checkpoint));
        assert!(m.contains("where a pack's routing region belongs"), "{m}");
        let m = message(decode_checkpoint(&at(0x500), &encode(&deltas)));
        assert!(m.contains("does not say which LSN"), "{m}");
    }
}
