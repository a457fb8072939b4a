//! Fuzzes the pgoutput decoder with arbitrary payloads in every context.
//!
//! The decoder reads what a database server sends, so it must hold for any bytes: decode or
//! fail, never panic, never allocate more than the input justifies (libFuzzer's `-rss_limit_mb`
//! and `-malloc_limit_mb` catch the latter). What decodes must also encode back to exactly the
//! input, which catches fields the decoder reads loosely and the encoder writes canonically.
//!
//! Run from the repository root (stable toolchain; see scripts/fuzz.sh for why the environment
//! variable, and to install cargo-fuzz):
//!
//! ```text
//! scripts/fuzz.sh 60                                                # every target, 60 s each
//! RUSTC_BOOTSTRAP=1 cargo fuzz run pgoutput                         # until stopped
//! RUSTC_BOOTSTRAP=1 cargo fuzz run pgoutput -- -max_total_time=600 -malloc_limit_mb=64
//! ```
//!
//! A crash is saved under fuzz/artifacts/pgoutput/; replay it with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run pgoutput fuzz/artifacts/pgoutput/<file>`, and turn it into
//! a unit test in src/pg/pgoutput/ once fixed.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use updog_backup::pg::pgoutput::{Context, ProtocolVersion, decode, encode};

/// Protocol 1 and 2, in and out of a streamed block. Protocol 1 inside a streamed block cannot
/// happen and must always be refused, which is also worth checking on every input.
const CONTEXTS: [Context; 4] = [
    Context {
        proto: ProtocolVersion::V1,
        in_stream: false,
    },
    Context {
        proto: ProtocolVersion::V1,
        in_stream: true,
    },
    Context {
        proto: ProtocolVersion::V2,
        in_stream: false,
    },
    Context {
        proto: ProtocolVersion::V2,
        in_stream: true,
    },
];

fuzz_target!(|data: &[u8]| {
    let payload = Bytes::copy_from_slice(data);
    for ctx in CONTEXTS {
        match decode(&payload, ctx) {
            Ok(message) => {
                assert!(
                    ctx.proto == ProtocolVersion::V2 || !ctx.in_stream,
                    "{ctx:?} accepted {message:?}"
                );
                assert_eq!(
                    encode(&message, ctx).freeze(),
                    payload,
                    "{ctx:?}: {message:?} does not encode back to its input"
                );
            }
            // The error must render without panicking too (it formats input bytes).
            Err(error) => drop(error.to_string()),
        }
    }
});
