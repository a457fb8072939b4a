//! Fuzzes the routing-state decoder (`capture::routes::decode` and `decode_checkpoint`):
//! checkpoints (`changes/routes-<lsn>.zst`, whose header must name their key's LSN) and the
//! `routes` regions of packs.
//!
//! They are stored compressed but not encrypted, and their digest is a plain SHA-256 anyone can
//! recompute, so a hostile repository can feed the daemon any bytes here. Decoding must return
//! the deltas or an error, never panic, and never allocate more than the input justifies: run
//! with `-malloc_limit_mb` (scripts/fuzz.sh does), which turns one oversized allocation — a
//! capacity taken from a count in the header, a decompression bomb — into a crash. Whatever was
//! encoded must decode to the same deltas.
//!
//! The first input byte chooses how the rest is used:
//! - `% 4 == 0`: the bytes are the stored object (zstd frame parsing, magic, digest).
//! - `% 4 == 1`: the bytes are the plaintext (magic, header length, JSON header, operations);
//!   the target appends its SHA-256 and compresses it, so the fuzzer gets past the digest.
//! - `% 4 == 2`: the same, but the target also writes the magic and the header length: the
//!   bytes are a JSON header followed by operations (the length is that of the first JSON value
//!   in them, or of all of them), so mutating the header never breaks its framing.
//! - `% 4 == 3`: the bytes drive a list of deltas that is encoded with `routes::encode` (and
//!   `encode_checkpoint`) and must decode back to itself.
//!
//! Run from the repository root (stable toolchain; see scripts/fuzz.sh for why the environment
//! variable, and to install cargo-fuzz):
//!
//! ```text
//! scripts/fuzz.sh 60                                                # every target, 60 s each
//! RUSTC_BOOTSTRAP=1 cargo fuzz run routes fuzz/corpus/routes fuzz/seeds/routes \
//!     -- -dict=fuzz/dicts/routes.dict -max_total_time=600 -malloc_limit_mb=256
//! ```
//!
//! A crash is saved under fuzz/artifacts/routes/; replay it with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run routes fuzz/artifacts/routes/<file>`, and turn it into a
//! unit test in src/repository/routes.rs once fixed.

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::arbitrary::{Result as ArbitraryResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use updog_backup::pg::Lsn;
use updog_backup::repository::routes::{
    Delta, checkpoint_key, decode, decode_checkpoint, encode, encode_checkpoint,
};

const MAGIC: &[u8; 8] = b"UPDOGRT\x01";

/// What a writer stores for `plain`: plain, its SHA-256, zstd-compressed.
fn seal(mut plain: Vec<u8>) -> Vec<u8> {
    let digest = Sha256::digest(&plain);
    plain.extend_from_slice(&digest);
    zstd::bulk::compress(&plain, 1).expect("compressing in memory")
}

const KEY_LSN: Lsn = Lsn(0x16_B374_8A00);

fn key() -> String {
    checkpoint_key(KEY_LSN)
}

fn check(bytes: &[u8]) -> Option<Vec<Delta>> {
    // The same bytes read as a checkpoint: one more header check on the same decoder.
    if let Err(error) = decode_checkpoint(&key(), bytes) {
        drop(error.to_string());
    }
    match decode(&key(), bytes) {
        Ok(deltas) => Some(deltas),
        // The error must render without panicking too.
        Err(error) => {
            drop(error.to_string());
            None
        }
    }
}

/// A short name from a small alphabet, so that deltas share maps and tenants.
fn name(u: &mut Unstructured<'_>, names: &[&str]) -> ArbitraryResult<Arc<str>> {
    Ok(if u.ratio(3, 4)? {
        Arc::from(*u.choose(names)?)
    } else {
        Arc::from(u.arbitrary::<String>()?)
    })
}

fn deltas(u: &mut Unstructured<'_>) -> ArbitraryResult<Vec<Delta>> {
    const MAPS: [&str; 3] = [
        "app.funds(id)",
        "app.investments(id)",
        "app.notes(org_id, id)",
    ];
    const TENANTS: [&str; 3] = ["6f1c2a52-0b8e-4d4e-9a1f-1d2c3b4a5f60", "t1", ""];
    let mut out = Vec::new();
    while !u.is_empty() {
        let map = name(u, &MAPS)?;
        out.push(match u.int_in_range(0u8..=2)? {
            0 => Delta::Set {
                map,
                key: u.arbitrary()?,
                // None: a row of no tenant.
                tenant: if u.ratio(1, 8)? {
                    None
                } else {
                    Some(name(u, &TENANTS)?)
                },
            },
            1 => Delta::Remove {
                map,
                key: u.arbitrary()?,
            },
            _ => Delta::Clear { map },
        });
    }
    Ok(out)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => drop(check(rest)),
        1 => drop(check(&seal(rest.to_vec()))),
        2 => {
            // Where the first JSON value ends (all of it when there is none).
            let mut values =
                serde_json::Deserializer::from_slice(rest).into_iter::<serde_json::Value>();
            let header_len = match values.next() {
                Some(Ok(_)) => values.byte_offset(),
                _ => rest.len(),
            };
            let mut plain = MAGIC.to_vec();
            plain.extend_from_slice(&(header_len as u32).to_le_bytes());
            plain.extend_from_slice(rest);
            drop(check(&seal(plain)));
        }
        _ => {
            let Ok(deltas) = deltas(&mut Unstructured::new(rest)) else {
                return;
            };
            let decoded = check(&encode(&deltas))
                .unwrap_or_else(|| panic!("encoded deltas do not decode: {deltas:?}"));
            assert_eq!(
                decoded, deltas,
                "deltas changed by encoding and decoding them"
            );
            let checkpoint = decode_checkpoint(&key(), &encode_checkpoint(KEY_LSN, &deltas))
                .unwrap_or_else(|e| {
                    panic!("an encoded checkpoint does not decode ({e}): {deltas:?}")
                });
            assert_eq!(
                checkpoint, deltas,
                "a checkpoint changed by encoding and decoding it"
            );
        }
    }
});
