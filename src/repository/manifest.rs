//! Snapshot manifests: `snapshots/<id>/manifest.json`, written last. Plain JSON (no tenant
//! data, no secrets) so that `list` and `verify` work without the decryption identity.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::RepositoryError;
use super::archive::{ArchiveHeader, ArchiveKind};
use crate::pg::Lsn;

/// One object of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part<'a> {
    Schema,
    Global,
    Tenant(&'a str),
}

/// `<UTC time>-<consistent LSN as 16 hex digits>`: sorts by time, unique per snapshot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotId(String);

impl SnapshotId {
    pub fn new(time: DateTime<Utc>, lsn: Lsn) -> Self {
        Self(format!(
            "{}-{}",
            time.format("%Y%m%dT%H%M%SZ"),
            lsn.to_key()
        ))
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for SnapshotId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let ok = s.len() == 33
            && s.as_bytes()[8] == b'T'
            && s.as_bytes()[15] == b'Z'
            && s.as_bytes()[16] == b'-'
            && s[..8]
                .bytes()
                .chain(s[9..15].bytes())
                .all(|b| b.is_ascii_digit())
            && s[17..].bytes().all(|b| b.is_ascii_hexdigit());
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(format!("{s:?} is not a snapshot id"))
        }
    }
}

impl Serialize for SnapshotId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SnapshotId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// An encrypted object as stored: enough to check it without decrypting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredObject {
    pub key: String,
    pub bytes: u64,
    pub sha256: String,
    /// Fingerprint of the key the object is sealed to (format 3; FORMAT.md "Keys").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_to: Option<String>,
}

/// A stored archive (global or one tenant) with its rows per table (`schema.table`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveEntry {
    #[serde(flatten)]
    pub object: StoredObject,
    pub rows: BTreeMap<String, u64>,
}

impl ArchiveEntry {
    pub fn total_rows(&self) -> u64 {
        self.rows.values().sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Tenant,
    Global,
    Excluded,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableEntry {
    pub schema: String,
    pub name: String,
    pub scope: Scope,
    /// How rows reach their tenant, for people reading the manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// Columns in archive order (generated columns are left out: PostgreSQL recomputes them).
    pub columns: Vec<String>,
    /// The table's oid and its columns' numbers at the snapshot (generated ones included): a
    /// schema change in the stream names them, so a restore can follow it (a rename keeps its
    /// number). Absent in snapshots taken before schema changes were captured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oid: Option<u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attnums: BTreeMap<String, i16>,
}

impl TableEntry {
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// A sequence's state at the snapshot, so a restored database hands out no used value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SequenceState {
    pub schema: String,
    pub name: String,
    pub last_value: i64,
    pub is_called: bool,
}

/// What the configured schemas depend on outside themselves, read from the source's catalog in
/// the snapshot's transaction. `pg_dump --schema` dumps none of it (not even an extension
/// installed inside a dumped schema), so a restore has to provide it before the schema.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dependencies {
    /// Extensions, in creation order (each after the extensions it requires).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extensions: Vec<ExtensionDependency>,
    /// Objects that are neither in a configured schema nor part of an extension: no restore
    /// of this snapshot can recreate what uses them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objects: Vec<ObjectDependency>,
    /// Roles named in grants and policies (cluster-wide: a target without them skips those
    /// grants and policies, and says so).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
}

impl Dependencies {
    pub fn is_empty(&self) -> bool {
        self.extensions.is_empty() && self.objects.is_empty() && self.roles.is_empty()
    }
}

/// An extension as the source has it installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtensionDependency {
    pub name: String,
    /// `extversion`, e.g. `1.6`: the version a restore creates.
    pub version: String,
    /// The schema its objects live in.
    pub schema: String,
}

/// An object outside the configured schemas that is not part of an extension.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectDependency {
    /// `pg_identify_object`'s type: `type`, `function`, `operator`, `collation`, `table` …
    pub kind: String,
    /// Its schema; absent for objects that belong to no schema (a cast, a foreign server…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// `pg_identify_object`'s identity, e.g. `util.money_amount`.
    pub identity: String,
    /// One object of the configured schemas that uses it, for people.
    pub used_by: String,
}

impl fmt::Display for ObjectDependency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} (used by {})",
            self.kind, self.identity, self.used_by
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub id: SnapshotId,
    pub system_identifier: String,
    pub database: String,
    /// `server_version_num` of the source, e.g. 150018.
    pub server_version_num: u32,
    pub tenant_column: String,
    /// The tenant column's type (`uuid`, `text`, …), to validate tenant arguments.
    pub tenant_type: String,
    pub consistent_lsn: Lsn,
    /// Server time just after the consistent point: every transaction in the snapshot
    /// committed before it.
    pub consistent_time: DateTime<Utc>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// False when the snapshot was limited to some tenants (`backup --org`).
    pub all_tenants: bool,
    pub tables: Vec<TableEntry>,
    pub sequences: Vec<SequenceState>,
    pub schema: StoredObject,
    pub global: ArchiveEntry,
    pub tenants: BTreeMap<String, ArchiveEntry>,
    /// Absent when empty, so that manifests written before it keep their bytes and digest.
    #[serde(default, skip_serializing_if = "Dependencies::is_empty")]
    pub depends_on: Dependencies,
}

/// The manifest's own field: the SHA-256 of the rest of it.
const DIGEST_FIELD: &str = "digest";
/// What to do about a manifest that cannot be trusted. Every restore reads every manifest (to
/// choose its base), so a damaged one stops them all until it is dealt with.
const DAMAGED_MANIFEST: &str = "put back an intact copy, or move it aside so that restores \
     use the other snapshots (this one then no longer exists)";

impl Manifest {
    /// Parses and checks a manifest read from `key`: its format version, its digest, that it
    /// is the manifest of the snapshot its key names, and that its consistent point is the
    /// one its id names. Plain JSON is not authenticated by age like the objects are; without
    /// these checks one flipped bit (a digit of `consistent_time` or of a sequence's value)
    /// would restore wrong data without a word.
    pub fn parse(key: &str, bytes: &[u8]) -> Result<Self, RepositoryError> {
        let malformed = |message: String| RepositoryError::Malformed {
            key: key.into(),
            message,
        };
        let mut value: Value =
            serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
        let version = value
            .get("format_version")
            .and_then(Value::as_u64)
            .ok_or_else(|| malformed("no format_version".into()))?;
        if !u32::try_from(version).is_ok_and(super::readable) {
            return Err(RepositoryError::UnknownFormat {
                key: key.into(),
                found: u32::try_from(version).unwrap_or(u32::MAX),
            });
        }
        let recorded = match value.as_object_mut().and_then(|o| o.remove(DIGEST_FIELD)) {
            Some(Value::String(digest)) => digest,
            _ => return Err(malformed(format!("no {DIGEST_FIELD} of its own"))),
        };
        let computed = content_digest(&value);
        if computed != recorded {
            return Err(malformed(format!(
                "its content does not match its digest (sha256 {computed}, the manifest records \
                 {recorded}): it was modified or damaged; {DAMAGED_MANIFEST}"
            )));
        }
        let manifest: Manifest =
            serde_json::from_value(value).map_err(|e| malformed(e.to_string()))?;
        if super::keys::manifest(&manifest.id) != key {
            return Err(malformed(format!("names snapshot {}", manifest.id)));
        }
        manifest.check_id().map_err(malformed)?;
        Ok(manifest)
    }

    /// The id is `<consistent time>-<consistent LSN>`, and every archive's header carries it:
    /// a consistent point that disagrees with it is not the point the archives were taken at.
    fn check_id(&self) -> Result<(), String> {
        let named = SnapshotId::new(self.consistent_time, self.consistent_lsn);
        if named != self.id {
            return Err(format!(
                "its consistent point ({} at {}) is not the one its id {} names: it was modified \
                 or damaged; {DAMAGED_MANIFEST}",
                self.consistent_lsn,
                self.consistent_time
                    .to_rfc3339_opts(SecondsFormat::Micros, true),
                self.id
            ));
        }
        Ok(())
    }

    /// The manifest as stored: its fields, then its digest.
    pub fn to_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Stored<'a> {
            #[serde(flatten)]
            manifest: &'a Manifest,
            digest: String,
        }
        let value = serde_json::to_value(self).expect("a manifest always serializes");
        let stored = Stored {
            manifest: self,
            digest: content_digest(&value),
        };
        serde_json::to_vec_pretty(&stored).expect("a manifest always serializes")
    }

    /// Every object of the snapshot, schema first.
    pub fn objects(&self) -> impl Iterator<Item = &StoredObject> {
        std::iter::once(&self.schema)
            .chain(std::iter::once(&self.global.object))
            .chain(self.tenants.values().map(|t| &t.object))
    }

    /// The parts of the snapshot, schema first.
    pub fn parts(&self) -> impl Iterator<Item = Part<'_>> {
        [Part::Schema, Part::Global]
            .into_iter()
            .chain(self.tenants.keys().map(|t| Part::Tenant(t)))
    }

    pub fn object(&self, part: Part<'_>) -> Option<&StoredObject> {
        match part {
            Part::Schema => Some(&self.schema),
            _ => self.archive(part).map(|(entry, _)| &entry.object),
        }
    }

    /// An archive's entry, and the header its plaintext must carry.
    pub fn archive(&self, part: Part<'_>) -> Option<(&ArchiveEntry, ArchiveHeader)> {
        let (entry, kind, tenant) = match part {
            Part::Schema => return None,
            Part::Global => (&self.global, ArchiveKind::Global, None),
            Part::Tenant(t) => (
                self.tenants.get(t)?,
                ArchiveKind::Tenant,
                Some(t.to_string()),
            ),
        };
        Some((
            entry,
            ArchiveHeader {
                kind,
                snapshot: self.id.to_string(),
                tenant,
            },
        ))
    }

    pub fn table(&self, qualified: &str) -> Option<&TableEntry> {
        self.tables.iter().find(|t| t.qualified() == qualified)
    }
}

/// A manifest's `digest` for its other fields (`value`, without `digest`): SHA-256 (hex) of
/// their canonical JSON, so that it depends on the content only, never on layout: object keys
/// sorted by their UTF-8 bytes, no whitespace, strings escaped only where JSON requires it
/// (serde_json's escaping, which `jq -c` shares).
pub fn content_digest(value: &Value) -> String {
    let mut canonical = Vec::new();
    write_canonical(value, &mut canonical);
    hex::encode(Sha256::digest(&canonical))
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_compact(key, out);
                out.push(b':');
                write_canonical(item, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => write_compact(scalar, out),
    }
}

/// A string or a number as serde_json writes it compactly.
fn write_compact<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    serde_json::to_writer(out, value).expect("writing JSON to memory");
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::repository::keys;

    fn object(key: String) -> StoredObject {
        StoredObject {
            key,
            bytes: 10,
            sha256: "ab".repeat(32),
            sealed_to: None,
        }
    }

    fn sample() -> Manifest {
        let time = Utc.with_ymd_and_hms(2026, 11, 26, 12, 0, 0).unwrap()
            + chrono::Duration::microseconds(123_456);
        let lsn = Lsn(0x16_B374_8A00);
        let id = SnapshotId::new(time, lsn);
        let archive = |key| ArchiveEntry {
            object: object(key),
            rows: BTreeMap::from([("app.funds".to_string(), 3)]),
        };
        Manifest {
            format_version: crate::repository::FORMAT_2,
            id: id.clone(),
            system_identifier: "7441".into(),
            database: "updog".into(),
            server_version_num: 150_018,
            tenant_column: "organization_id".into(),
            tenant_type: "uuid".into(),
            consistent_lsn: lsn,
            consistent_time: time,
            started_at: time,
            finished_at: time,
            all_tenants: true,
            tables: vec![],
            sequences: vec![SequenceState {
                schema: "app".into(),
                name: "events_id_seq".into(),
                last_value: 1234,
                is_called: true,
            }],
            schema: object(keys::schema(&id)),
            global: archive(keys::global(&id)),
            tenants: BTreeMap::from([(
                "t\u{e9}\"1\n".to_string(),
                archive(keys::tenant(&id, "t1")),
            )]),
            depends_on: Dependencies::default(),
        }
    }

    fn parse(manifest: &Manifest, json: &[u8]) -> Result<Manifest, RepositoryError> {
        Manifest::parse(&keys::manifest(&manifest.id), json)
    }

    fn refusal(manifest: &Manifest, json: &[u8]) -> String {
        match parse(manifest, json) {
            Ok(_) => panic!("accepted {}", String::from_utf8_lossy(json)),
            Err(RepositoryError::Malformed { message, .. }) => message,
            Err(e) => panic!("not a Malformed error: {e}"),
        }
    }

    /// The JSON of `manifest` after `edit`, with its digest recomputed as a writer would.
    fn edited(manifest: &Manifest, edit: impl Fn(&mut Value)) -> Vec<u8> {
        let mut value: Value = serde_json::from_slice(&manifest.to_json()).unwrap();
        edit(&mut value);
        let object = value.as_object_mut().unwrap();
        object.remove(DIGEST_FIELD);
        let digest = content_digest(&Value::Object(object.clone()));
        object.insert(DIGEST_FIELD.into(), digest.into());
        serde_json::to_vec_pretty(&value).unwrap()
    }

    #[test]
    fn written_manifests_read_back_whatever_their_layout() {
        let m = sample();
        let json = m.to_json();
        assert_eq!(parse(&m, &json).unwrap().to_json(), json);
        // Layout is not content: compact JSON with another key order is the same manifest.
        let value: Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(
            parse(&m, value.to_string().as_bytes()).unwrap().to_json(),
            json
        );
    }

    #[test]
    fn one_flipped_bit_is_refused() {
        let m = sample();
        let json = m.to_json();
        let text = String::from_utf8(json.clone()).unwrap();
        // Each flip turns a digit into another digit: the JSON stays valid.
        for needle in [
            "\"last_value\": 1234",
            "\"consistent_time\": \"2026",
            "\"bytes\": 10",
        ] {
            let at = text.find(needle).unwrap() + needle.len() - 1;
            let mut damaged = json.clone();
            damaged[at] ^= 0x01;
            let message = refusal(&m, &damaged);
            assert!(message.contains("does not match its digest"), "{message}");
        }
    }

    #[test]
    fn a_manifest_without_its_digest_is_refused() {
        let m = sample();
        let mut value: Value = serde_json::from_slice(&m.to_json()).unwrap();
        value.as_object_mut().unwrap().remove(DIGEST_FIELD);
        let message = refusal(&m, value.to_string().as_bytes());
        assert!(message.contains("no digest"), "{message}");
    }

    /// Even with a digest recomputed, the consistent point must be the one the id names (the
    /// archives' headers carry the id).
    #[test]
    fn a_consistent_point_other_than_the_ids_is_refused() {
        let m = sample();
        for edit in [
            |v: &mut Value| v["consistent_lsn"] = "0/1".into(),
            |v: &mut Value| v["consistent_time"] = "2027-11-26T12:00:00.123456Z".into(),
        ] {
            let message = refusal(&m, &edited(&m, edit));
            assert!(message.contains("is not the one its id"), "{message}");
        }
        // Below the id's one-second resolution only the digest guards the time.
        let sub_second = edited(&m, |v| {
            v["consistent_time"] = "2026-11-26T12:00:00.5Z".into()
        });
        assert!(parse(&m, &sub_second).is_ok());
    }

    /// A snapshot that depends on nothing outside its schemas writes no `depends_on`: its
    /// manifest is byte for byte what builds before the field wrote, digest included.
    #[test]
    fn dependencies_are_absent_when_empty_and_read_back_when_present() {
        let m = sample();
        let json = m.to_json();
        let value: Value = serde_json::from_slice(&json).unwrap();
        assert!(value.get("depends_on").is_none());
        assert_eq!(value["digest"], PINNED_DIGEST);

        let mut with = sample();
        with.depends_on = Dependencies {
            extensions: vec![ExtensionDependency {
                name: "citext".into(),
                version: "1.6".into(),
                schema: "app".into(),
            }],
            objects: vec![],
            roles: vec!["updog_app".into()],
        };
        let json = with.to_json();
        let back = parse(&with, &json).unwrap();
        assert_eq!(back.depends_on, with.depends_on);
        assert_eq!(back.to_json(), json);
        let value: Value = serde_json::from_slice(&json).unwrap();
        assert!(value["depends_on"].get("objects").is_none(), "{value}");
        assert_ne!(value["digest"], PINNED_DIGEST);
        // What an unknown field inside it meets: refusal, not a silent drop.
        let extra = edited(&with, |v| v["depends_on"]["tablespaces"] = "x".into());
        assert!(refusal(&with, &extra).contains("unknown field"));
    }

    /// The digest of [`sample`], whose layout predates `depends_on`.
    const PINNED_DIGEST: &str = "e3e5f0b1c87fe0079fe521b0081c1d028abe093a4d921b97af767e98dd7a9fc5";

    #[test]
    fn another_format_version_is_named() {
        let m = sample();
        let json = edited(&m, |v| v["format_version"] = 1.into());
        assert!(matches!(
            parse(&m, &json),
            Err(RepositoryError::UnknownFormat { found: 1, .. })
        ));
    }
}
