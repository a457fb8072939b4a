//! Fuzzes the parsers of the repository's plain JSON descriptions: snapshot manifests
//! (`Manifest::parse`) and `repo.json` (`RepoInfo::parse`).
//!
//! Both are read from the object store, unencrypted, by `list`, `verify`, `restore` and the
//! daemon: any bytes must parse or fail, never panic. What parses must also write back
//! (`to_json`) to JSON that parses again to the same thing (compared as `to_json` bytes), so a
//! repository never holds a manifest its own reader refuses or reads differently.
//!
//! Each input is parsed as a manifest under
//! `snapshots/20261126T120000Z-0000000016B3748A/manifest.json`, again under the key its `id`
//! field names when that differs (so inputs need not guess the fixed id to be accepted), and as
//! `repo.json`. A manifest carries a SHA-256 of its own content, which mutations break: each
//! JSON object input is also parsed with its `digest` recomputed, so that the checks behind it
//! (fields, key, id against the consistent point) are fuzzed too.
//!
//! Run from the repository root (stable toolchain; see scripts/fuzz.sh for why the environment
//! variable, and to install cargo-fuzz):
//!
//! ```text
//! scripts/fuzz.sh 60                                                # every target, 60 s each
//! RUSTC_BOOTSTRAP=1 cargo fuzz run manifest fuzz/corpus/manifest fuzz/seeds/manifest \
//!     -- -dict=fuzz/dicts/manifest.dict -max_total_time=600 -malloc_limit_mb=256
//! ```
//!
//! A crash is saved under fuzz/artifacts/manifest/; replay it with
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run manifest fuzz/artifacts/manifest/<file>`, and turn it into
//! a unit test in src/repository/manifest.rs (or info.rs) once fixed.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use updog_backup::repository::manifest::content_digest;
use updog_backup::repository::{Manifest, RepoInfo, SnapshotId, keys};

const KEY: &str = "snapshots/20261126T120000Z-0000000016B3748A/manifest.json";

fn check_manifest(key: &str, bytes: &[u8]) {
    match Manifest::parse(key, bytes) {
        Ok(manifest) => {
            assert_eq!(
                keys::manifest(&manifest.id),
                key,
                "accepted under another key"
            );
            let json = manifest.to_json();
            let again = Manifest::parse(key, &json).unwrap_or_else(|e| {
                panic!(
                    "to_json of an accepted manifest does not parse ({e}):\n{}",
                    String::from_utf8_lossy(&json)
                )
            });
            assert_eq!(
                String::from_utf8_lossy(&again.to_json()),
                String::from_utf8_lossy(&json),
                "a manifest changed by writing and reading it"
            );
        }
        // The error must render without panicking too (it may quote input).
        Err(error) => drop(error.to_string()),
    }
}

/// The manifest key of the snapshot the input's `id` field names, if it names one.
fn key_named_by(bytes: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let id: SnapshotId = value.get("id")?.as_str()?.parse().ok()?;
    Some(keys::manifest(&id))
}

/// The input with the `digest` its other fields call for, if it is a JSON object.
fn resealed(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut value: Value = serde_json::from_slice(bytes).ok()?;
    value.as_object_mut()?.remove("digest");
    let digest = content_digest(&value);
    value
        .as_object_mut()?
        .insert("digest".into(), digest.into());
    serde_json::to_vec(&value).ok()
}

fn check_manifest_keys(bytes: &[u8]) {
    check_manifest(KEY, bytes);
    if let Some(key) = key_named_by(bytes).filter(|k| k != KEY) {
        check_manifest(&key, bytes);
    }
}

fn check_repo_info(bytes: &[u8]) {
    match RepoInfo::parse(bytes) {
        Ok(info) => {
            let json = info.to_json();
            let again = RepoInfo::parse(&json).unwrap_or_else(|e| {
                panic!(
                    "to_json of accepted repo info does not parse ({e}):\n{}",
                    String::from_utf8_lossy(&json)
                )
            });
            assert_eq!(again, info, "repo info changed by writing and reading it");
            assert_eq!(again.to_json(), json);
        }
        Err(error) => drop(error.to_string()),
    }
}

fuzz_target!(|data: &[u8]| {
    check_manifest_keys(data);
    if let Some(resealed) = resealed(data) {
        check_manifest_keys(&resealed);
    }
    check_repo_info(data);
});
