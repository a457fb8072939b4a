//! Object keys of the repository format (FORMAT.md; [`super::FORMAT_VERSION`]). LSNs are 16
//! hex digits so that keys sort.

use super::SnapshotId;

pub const REPO_INFO: &str = "repo.json";
pub const SNAPSHOTS_PREFIX: &str = "snapshots/";
pub const CHANGES_PREFIX: &str = "changes/";
/// Where the stream's durable position stands when no pack was needed to say it.
pub const STREAM_PROGRESS: &str = "changes/progress.json";
/// Where retention left the chain of packs.
pub const STREAM_RETAINED: &str = "changes/retained.json";
/// Stream gaps: tables whose changes the stream lacks.
pub const GAPS_PREFIX: &str = "changes/gaps/";
/// Restores run, one small record each (no tenant data).
pub const RESTORES_PREFIX: &str = "restores/";
/// Rewinds applied to the source, one small record each (no tenant data).
pub const REWINDS_PREFIX: &str = "rewinds/";
/// Per-tenant keys (format 3), wrapped to the repository's recipients.
pub const KEYS_PREFIX: &str = "keys/";
/// Records of the tenants `forget` erased.
pub const FORGOTTEN_PREFIX: &str = "forgotten/";
/// The active daemon's lease.
pub const LEASE: &str = "locks/daemon.json";
const MANIFEST: &str = "manifest.json";

pub fn snapshot_prefix(id: &SnapshotId) -> String {
    format!("{SNAPSHOTS_PREFIX}{id}/")
}

pub fn manifest(id: &SnapshotId) -> String {
    format!("{SNAPSHOTS_PREFIX}{id}/{MANIFEST}")
}

pub fn schema(id: &SnapshotId) -> String {
    format!("{SNAPSHOTS_PREFIX}{id}/schema.sql.zst.age")
}

pub fn global(id: &SnapshotId) -> String {
    format!("{SNAPSHOTS_PREFIX}{id}/global.zst.age")
}

pub fn tenant(id: &SnapshotId, tenant: &str) -> String {
    format!(
        "{SNAPSHOTS_PREFIX}{id}/tenants/{}.zst.age",
        encode_tenant(tenant)
    )
}

/// The snapshot a `…/manifest.json` key belongs to.
pub fn snapshot_of_manifest(key: &str) -> Option<SnapshotId> {
    let rest = key
        .strip_prefix(SNAPSHOTS_PREFIX)?
        .strip_suffix(MANIFEST)?
        .strip_suffix('/')?;
    rest.parse().ok()
}

/// Tenant values become one key segment: uuids and other plain values stay as they are,
/// anything else is percent-encoded (so a text tenant value can never escape its folder).
pub fn encode_tenant(tenant: &str) -> String {
    let mut out = String::with_capacity(tenant.len());
    for b in tenant.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The inverse of [`encode_tenant`]; `None` for a segment it could not have written.
pub fn decode_tenant(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let text = String::from_utf8(out).ok()?;
    (encode_tenant(&text) == segment).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_keys_stay_in_their_folder() {
        assert_eq!(
            encode_tenant("0b1f9a4e-7c1d-4d4a-9f67-000000000001"),
            "0b1f9a4e-7c1d-4d4a-9f67-000000000001"
        );
        assert_eq!(encode_tenant("../x/y z"), "%2E%2E%2Fx%2Fy%20z");
        assert_eq!(
            decode_tenant("%2E%2E%2Fx%2Fy%20z").as_deref(),
            Some("../x/y z")
        );
        assert_eq!(decode_tenant("%2e"), None, "not what encode_tenant writes");
    }

    #[test]
    fn manifest_keys_round_trip() {
        let id: SnapshotId = "20261126T120000Z-0000000016B3748A".parse().unwrap();
        assert_eq!(snapshot_of_manifest(&manifest(&id)), Some(id.clone()));
        assert_eq!(snapshot_of_manifest(&schema(&id)), None);
    }
}
