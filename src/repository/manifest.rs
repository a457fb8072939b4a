//! Snapshot manifests: `snapshots/<id>/manifest.json`, written last. Plain JSON (no tenant
//! data, no secrets) so that `list` and `verify` work without the decryption identity.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::archive::{ArchiveHeader, ArchiveKind};
use super::{FORMAT_VERSION, RepositoryError};
use crate::replication::Lsn;

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
}

impl Manifest {
    pub fn parse(key: &str, bytes: &[u8]) -> Result<Self, RepositoryError> {
        #[derive(Deserialize)]
        struct Version {
            format_version: u32,
        }
        let malformed = |e: serde_json::Error| RepositoryError::Malformed {
            key: key.into(),
            message: e.to_string(),
        };
        let version: Version = serde_json::from_slice(bytes).map_err(malformed)?;
        if version.format_version != FORMAT_VERSION {
            return Err(RepositoryError::UnknownFormat {
                key: key.into(),
                found: version.format_version,
            });
        }
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(malformed)?;
        if super::keys::manifest(&manifest.id) != key {
            return Err(RepositoryError::Malformed {
                key: key.into(),
                message: format!("names snapshot {}", manifest.id),
            });
        }
        Ok(manifest)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a manifest always serializes")
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
