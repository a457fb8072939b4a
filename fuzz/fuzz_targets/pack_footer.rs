//! Fuzzes the pack footer reader (`repository::pack::read_footer`) with hostile pack tails.
//!
//! A pack comes from the object store, which a restore or a restarted daemon must not trust: the
//! trailer's footer length, the footer JSON and every offset in it can be anything. Reading must
//! return the footer or an error, never panic, never allocate more than the pack justifies. An
//! accepted footer must also be one the reader could have been given honestly: the repository's
//! format version, the LSN range of its key, and sections (then the routing region) tiling every
//! byte before the footer exactly — checked here with overflow-proof arithmetic — and it must
//! read back equal after encoding it again.
//!
//! The first input byte chooses how the rest becomes a pack (stored in a `MemoryStore` under
//! `changes/0000000000000100-0000000000000200.pack` and read with its real size):
//! - `% 3 == 0`: the bytes are the whole pack (trailer parsing: magic, length, digest).
//! - `% 3 == 1`: the next byte is a number of filler bytes, the rest is footer JSON; the target
//!   appends a valid trailer (length, SHA-256, magic) so the fuzzer reaches the JSON checks.
//! - `% 3 == 2`: the rest drives a structured footer (sections with plausible or wild offsets
//!   and lengths, an optional routing region, sometimes over 64 KiB of sections so the
//!   reader's second ranged read is exercised too), encoded with `PackFooter::encode`.
//!
//! Run from the repository root (stable toolchain; see scripts/fuzz.sh for why the environment
//! variable, and to install cargo-fuzz):
//!
//! ```text
//! scripts/fuzz.sh 60                                                # every target, 60 s each
//! RUSTC_BOOTSTRAP=1 cargo fuzz run pack_footer fuzz/corpus/pack_footer fuzz/seeds/pack_footer \
//!     -- -dict=fuzz/dicts/pack_footer.dict -max_total_time=600 -malloc_limit_mb=256
//! ```
//!
//! A crash is saved under fuzz/artifacts/pack_footer/; replay it with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run pack_footer fuzz/artifacts/pack_footer/<file>`, and turn it
//! into a unit test in src/repository/pack.rs once fixed.

#![no_main]

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use libfuzzer_sys::arbitrary::{Result as ArbitraryResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use updog_backup::pg::Lsn;
use updog_backup::repository::pack::{
    self, PackFooter, Region, SectionEntry, TRAILER_LEN, TRAILER_MAGIC,
};
use updog_backup::repository::{FORMAT_2, FORMAT_VERSION, PackRef, Repository, readable};
use updog_backup::storage::{MemoryStore, ObjectStore, PutMode};

const START: Lsn = Lsn(0x100);
const END: Lsn = Lsn(0x200);
/// The reader's first ranged read covers this much of the tail; larger packs need a second one.
const TAIL: usize = 64 * 1024;

struct Env {
    runtime: tokio::runtime::Runtime,
    store: Arc<dyn ObjectStore>,
    key: String,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| Env {
        runtime: tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime"),
        store: Arc::new(MemoryStore::new()),
        key: pack::key(START, END),
    })
}

/// Stores `pack` and reads its footer the way restores do; checks what an accepted footer says.
fn read(pack: Vec<u8>) -> Option<PackFooter> {
    let env = env();
    let size = pack.len() as u64;
    // Where the footer starts if the trailer is to be believed (checked only if accepted).
    let footer_start = pack.len().checked_sub(TRAILER_LEN as usize).and_then(|t| {
        let len = u32::from_le_bytes(pack[t..t + 4].try_into().expect("4 bytes"));
        (t as u64).checked_sub(len.into())
    });
    let result = env.runtime.block_on(async {
        env.store
            .put_bytes(&env.key, Bytes::from(pack), PutMode::Overwrite)
            .await
            .expect("the memory store takes any bytes");
        let pack = PackRef {
            start: START,
            end: END,
            key: env.key.clone(),
            size,
        };
        Repository::new(env.store.clone()).pack_footer(&pack).await
    });
    match result {
        Ok(footer) => {
            let footer_start =
                footer_start.unwrap_or_else(|| panic!("accepted {footer:?} from {size} bytes"));
            check_accepted(&footer, footer_start);
            check_round_trip(&footer, footer_start);
            Some(footer)
        }
        // The error must render without panicking too (it may quote input).
        Err(error) => {
            drop(error.to_string());
            None
        }
    }
}

/// What an honest writer could have produced: a format version it reads, the key's range, regions that
/// tile `[0, footer_start)` exactly.
fn check_accepted(footer: &PackFooter, footer_start: u64) {
    assert!(readable(footer.format_version), "accepted {footer:?}");
    assert_eq!(
        (footer.start_lsn, footer.end_lsn),
        (START, END),
        "accepted a footer for another key: {footer:?}"
    );
    let mut cursor = 0u64;
    let regions = footer
        .sections
        .iter()
        .map(|s| (s.offset, s.length))
        .chain(footer.routes.iter().map(|r| (r.offset, r.length)));
    for (offset, length) in regions {
        assert_eq!(offset, cursor, "regions do not tile: {footer:?}");
        cursor = cursor
            .checked_add(length)
            .unwrap_or_else(|| panic!("region lengths overflow: {footer:?}"));
        assert!(cursor <= footer_start, "region past the footer: {footer:?}");
    }
    assert_eq!(
        cursor, footer_start,
        "regions do not cover the bytes before the footer: {footer:?}"
    );
}

/// An accepted footer must survive being encoded and read again, in front of the same bytes
/// (only checked once: the second read does not recurse).
fn check_round_trip(footer: &PackFooter, footer_start: u64) {
    thread_local!(static NESTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    if NESTED.replace(true) {
        return;
    }
    let mut pack = vec![0u8; footer_start as usize];
    pack.extend_from_slice(&footer.encode());
    let again = read(pack);
    NESTED.set(false);
    let again = again.unwrap_or_else(|| panic!("{footer:?} does not read back once re-encoded"));
    assert_eq!(
        &again, footer,
        "the footer changed by encoding and reading it"
    );
}

/// Filler, then `json` as the footer, then a valid trailer for it.
fn wrap(filler: usize, json: &[u8]) -> Vec<u8> {
    let mut pack = vec![0u8; filler];
    pack.extend_from_slice(json);
    pack.extend_from_slice(&(json.len() as u32).to_le_bytes());
    pack.extend_from_slice(&Sha256::digest(json));
    pack.extend_from_slice(TRAILER_MAGIC);
    pack
}

fn lsn(u: &mut Unstructured<'_>, honest: Lsn) -> ArbitraryResult<Lsn> {
    Ok(if u.ratio(7, 8)? {
        honest
    } else {
        Lsn(u.arbitrary()?)
    })
}

fn time(u: &mut Unstructured<'_>) -> ArbitraryResult<DateTime<Utc>> {
    // Mostly 1970..2100; sometimes anything chrono can represent (years before 0 or after 9999
    // are valid timestamps too, and must not break the reader either).
    let secs = if u.ratio(7, 8)? {
        u.int_in_range(0i64..=4_102_444_800)?
    } else {
        u.int_in_range(-8_300_000_000_000i64..=8_300_000_000_000)?
    };
    let nanos = u.int_in_range(0u32..=999_999_999)?;
    Ok(DateTime::from_timestamp(secs, nanos).unwrap_or_default())
}

/// An offset and length: usually the honest next piece, sometimes a near miss, sometimes wild.
fn extent(u: &mut Unstructured<'_>, cursor: u64) -> ArbitraryResult<(u64, u64)> {
    // Mostly small, so that most packs are cheap to build; a few large lengths add up to packs
    // past the reader's first read.
    let length = match u.int_in_range(0u8..=15)? {
        0 => u.arbitrary::<u64>()?,
        1 => u64::MAX - u.int_in_range(0u64..=0x10000)?,
        2 => u.int_in_range(0u64..=40 * 1024)?,
        _ => u.int_in_range(0u64..=256)?,
    };
    let offset = match u.int_in_range(0u8..=15)? {
        0 => u.arbitrary::<u64>()?,
        1 => cursor.wrapping_add(u.int_in_range(1u64..=2)?),
        2 => cursor.wrapping_sub(1),
        _ => cursor,
    };
    Ok((offset, length))
}

fn structured(u: &mut Unstructured<'_>) -> ArbitraryResult<(PackFooter, usize)> {
    let mut cursor = 0u64;
    let mut sections = Vec::new();
    for _ in 0..u.int_in_range(0u8..=6)? {
        let (offset, length) = extent(u, cursor)?;
        cursor = offset.wrapping_add(length);
        sections.push(SectionEntry {
            tenant: if u.ratio(1, 4)? {
                None
            } else {
                Some(u.arbitrary()?)
            },
            offset,
            length,
            sha256: u.arbitrary()?,
            first_lsn: Lsn(u.arbitrary()?),
            last_lsn: Lsn(u.arbitrary()?),
            first_time: time(u)?,
            last_time: time(u)?,
            transactions: u.arbitrary()?,
            changes: u.arbitrary()?,
            sealed_to: if u.ratio(1, 2)? {
                None
            } else {
                Some(u.arbitrary()?)
            },
        });
    }
    let routes = if u.ratio(1, 3)? {
        let (offset, length) = extent(u, cursor)?;
        cursor = offset.wrapping_add(length);
        Some(Region {
            offset,
            length,
            sha256: u.arbitrary()?,
        })
    } else {
        None
    };
    let footer = PackFooter {
        format_version: match u.int_in_range(0u8..=15)? {
            0 => u.arbitrary()?,
            1..=4 => FORMAT_2,
            _ => FORMAT_VERSION,
        },
        start_lsn: lsn(u, START)?,
        end_lsn: lsn(u, END)?,
        covered_until: time(u)?,
        sections,
        routes,
    };
    // Bytes before the footer: usually exactly what the regions claim (when that is small
    // enough to allocate), otherwise a little more or less.
    let honest = usize::try_from(cursor).ok().filter(|&n| n <= 100 * 1024);
    let filler = match (honest, u.int_in_range(0u8..=7)?) {
        (Some(n), 0) => n.saturating_sub(1),
        (Some(n), 1) => n + 1,
        (Some(n), _) => n,
        (None, 0) => u.int_in_range(0usize..=2 * TAIL)?,
        (None, _) => u.int_in_range(0usize..=1024)?,
    };
    Ok((footer, filler))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => drop(read(rest.to_vec())),
        1 => {
            if let Some((&filler, json)) = rest.split_first() {
                drop(read(wrap(filler.into(), json)));
            }
        }
        _ => {
            let mut u = Unstructured::new(rest);
            let Ok((footer, filler)) = structured(&mut u) else {
                return;
            };
            let mut pack = vec![0u8; filler];
            pack.extend_from_slice(&footer.encode());
            if let Some(accepted) = read(pack) {
                assert_eq!(accepted, footer, "read a different footer than was written");
            }
        }
    }
});
