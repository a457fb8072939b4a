//! Persisted routing state: the router's key maps, so that a restarted daemon routes exactly
//! as the one that stopped — even a change to a row whose parent was deleted while it was down.
//!
//! A checkpoint (`changes/routes-<lsn>.zst`) holds every map at an LSN: `init` writes the first
//! from inside the first snapshot, the daemon one every [`CHECKPOINT_EVERY`] and when it stops.
//! Each pack carries the changes its transactions made to the maps. Capture resumes from the
//! newest checkpoint at or before the durable LSN plus the deltas of the packs after it.
//!
//! The daemon must read this back without the decryption identity (it holds only
//! recipients), so it is compressed, not encrypted: it holds salted hashes of key values and
//! tenant values, never a key or column value (FORMAT.md).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::router::{Delta, KeyHash, Router};
use crate::replication::Lsn;
use crate::repository::RepositoryError;
use crate::repository::keys::CHANGES_PREFIX;
use crate::storage::{ObjectStore, PutMode};

pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(600);
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
}

const SET: u8 = b'S';
const REMOVE: u8 = b'R';
const CLEAR: u8 = b'C';

/// Encodes deltas: magic, JSON header (map and tenant tables), operations, then a SHA-256 of
/// everything before it; zstd-compressed.
pub fn encode(deltas: &[Delta]) -> Vec<u8> {
    let mut maps: Vec<String> = Vec::new();
    let mut tenants: Vec<String> = Vec::new();
    let index = |list: &mut Vec<String>, v: &str| -> u32 {
        match list.iter().position(|x| x == v) {
            Some(i) => i as u32,
            None => {
                list.push(v.to_string());
                (list.len() - 1) as u32
            }
        }
    };
    let mut ops = Vec::new();
    for d in deltas {
        match d {
            Delta::Set { map, key, tenant } => {
                ops.push(SET);
                ops.extend_from_slice(&index(&mut maps, map).to_le_bytes());
                ops.extend_from_slice(key);
                ops.extend_from_slice(&index(&mut tenants, tenant).to_le_bytes());
            }
            Delta::Remove { map, key } => {
                ops.push(REMOVE);
                ops.extend_from_slice(&index(&mut maps, map).to_le_bytes());
                ops.extend_from_slice(key);
            }
            Delta::Clear { map } => {
                ops.push(CLEAR);
                ops.extend_from_slice(&index(&mut maps, map).to_le_bytes());
            }
        }
    }
    let header = serde_json::to_vec(&Header {
        maps,
        tenants,
        operations: deltas.len() as u64,
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

/// The inverse of [`encode`]; any damage is an error.
pub fn decode(key: &str, bytes: &[u8]) -> Result<Vec<Delta>, RepositoryError> {
    let bad = |m: &str| RepositoryError::Malformed {
        key: key.into(),
        message: format!("routing state: {m}"),
    };
    let plain = zstd::stream::decode_all(bytes).map_err(|e| bad(&e.to_string()))?;
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
    let maps: Vec<Arc<str>> = header.maps.iter().map(|m| Arc::from(m.as_str())).collect();
    let tenants: Vec<Arc<str>> = header
        .tenants
        .iter()
        .map(|t| Arc::from(t.as_str()))
        .collect();
    let mut ops = &body[12 + hlen..];
    let mut out = Vec::with_capacity(header.operations as usize);
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
                Delta::Set { map, key, tenant }
            }
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

pub async fn write_checkpoint(
    store: &Arc<dyn ObjectStore>,
    lsn: Lsn,
    router: &Router,
) -> Result<(), RepositoryError> {
    let bytes = encode(&router.checkpoint());
    store
        .put_bytes(&checkpoint_key(lsn), bytes.into(), PutMode::Overwrite)
        .await?;
    Ok(())
}

/// Every checkpoint, oldest first.
pub async fn checkpoints(
    store: &Arc<dyn ObjectStore>,
) -> Result<Vec<(Lsn, String)>, RepositoryError> {
    let mut keys: Vec<(Lsn, String)> = store
        .list(ROUTES_PREFIX)
        .await?
        .into_iter()
        .filter_map(|o| lsn_of(&o.key).map(|l| (l, o.key)))
        .collect();
    keys.sort();
    Ok(keys)
}

/// The newest checkpoint in `[since, at]`.
pub async fn newest_checkpoint(
    store: &Arc<dyn ObjectStore>,
    since: Lsn,
    at: Lsn,
) -> Result<Option<(Lsn, Vec<Delta>)>, RepositoryError> {
    let mut keys = checkpoints(store).await?;
    keys.retain(|(l, _)| *l >= since && *l <= at);
    let Some((lsn, key)) = keys.pop() else {
        return Ok(None);
    };
    let bytes = store.get_bytes(&key, None).await?;
    Ok(Some((lsn, decode(&key, &bytes)?)))
}

/// Whether `key` is a routing checkpoint (for listings that skip them).
pub fn is_checkpoint(key: &str) -> bool {
    key.starts_with(CHANGES_PREFIX) && lsn_of(key).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_round_trip_and_damage_is_refused() {
        let m: Arc<str> = Arc::from("app.funds(id)");
        let deltas = vec![
            Delta::Clear { map: m.clone() },
            Delta::Set {
                map: m.clone(),
                key: [7; 16],
                tenant: Arc::from("t1"),
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
