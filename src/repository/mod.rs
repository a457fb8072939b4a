//! The repository: the self-describing set of objects that restore needs, and nothing else.
//!
//! Owns the whole format (FORMAT.md, [`FORMAT_VERSION`]): every key, object and record —
//! `repo.json`, snapshot manifests and archives, packs, the stream's state, routing
//! checkpoints, gaps, restore records, the daemon's lease — read and written through
//! [`Repository`] methods, so that a format change is this module's change. It never talks to
//! PostgreSQL and never decides policy (what to snapshot, capture, keep or delete).
//! Visibility rule: a snapshot exists only once its manifest — written last — exists; a pack
//! only once it is stored whole.

pub mod archive;
pub mod copy_binary;
pub mod erasure;
mod gaps;
pub mod index;
pub mod info;
pub mod keys;
mod lease;
pub mod manifest;
pub mod object;
pub mod pack;
pub mod reader;
mod restores;
pub mod rotation;
pub mod routes;
pub mod stream;
pub mod tenant_keys;

use std::sync::Arc;

use crate::codec::CodecError;
use crate::retry::{Classify, ErrorClass};
use crate::storage::{ObjectStore, PutMode, StorageError};

pub use gaps::Gap;
pub use index::{IndexRef, PackView};
pub use info::RepoInfo;
pub use lease::{CaptureSeen, Lease};
pub use manifest::{Manifest, Part, SnapshotId, StoredObject};
pub use restores::{RestorePoint, RestoreRecord, RewindRecord};
pub use stream::{PackRef, Span, StreamProgress, StreamState};

/// The newest format this build reads and writes, the one `init` creates (FORMAT.md). 2:
/// manifests carry a digest of their own, routing checkpoints the LSN they hold the state at.
/// 3: per-tenant keys ([`tenant_keys`]).
pub const FORMAT_VERSION: u32 = 3;
/// Format 2, still read, and written into repositories created in it. Objects format 3 left
/// unchanged (stream progress, gaps, retention's mark) say 2 in both.
pub const FORMAT_2: u32 = 2;

/// Whether this build reads an object of format `version`.
pub fn readable(version: u32) -> bool {
    (FORMAT_2..=FORMAT_VERSION).contains(&version)
}

#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(
        "no repository at {location}: for a new set-up, run `updog-backup init` first; if backups exist, storage.url (or the configuration file: --config, UPDOG_BACKUP_CONFIG) points elsewhere"
    )]
    NotInitialized { location: String },
    #[error(
        "{key} has format version {found}; this build reads versions {FORMAT_2} to {FORMAT_VERSION}: {}",
        format_advice(*found)
    )]
    UnknownFormat { key: String, found: u32 },
    #[error("{key}: {source}")]
    Object {
        key: String,
        #[source]
        source: CodecError,
    },
    #[error("{key} is not valid: {message}")]
    Malformed { key: String, message: String },
    #[error(
        "{key}: stored bytes do not match the manifest (expected {expected_bytes} bytes sha256 {expected}, found {found_bytes} bytes sha256 {found}): the object was modified or truncated"
    )]
    DigestMismatch {
        key: String,
        expected: String,
        found: String,
        expected_bytes: u64,
        found_bytes: u64,
    },
    #[error("{key}: {message}")]
    Archive { key: String, message: String },
    #[error(
        "the repository at {location} belongs to database {found}, not {expected}: use another storage.url"
    )]
    ForeignRepository {
        location: String,
        expected: String,
        found: String,
    },
    #[error(
        "tenant {tenant} was forgotten on {at} by {by}: its backups were erased on purpose (`updog-backup forget`) and cannot be restored{}",
        if *.reappeared { "; it appeared again since, and instants after that restore from the first snapshot taken after it was forgotten" } else { "" }
    )]
    Forgotten {
        tenant: String,
        at: String,
        by: String,
        reappeared: bool,
    },
    #[error(
        "the repository at {location} is in format 2, where every tenant is encrypted to the repository's recipients: it cannot {what}. \
         A repository created by this release's `updog-backup init` (format 3, at another storage.url) gives every tenant its own key; restores keep reading this one"
    )]
    Unkeyed {
        location: String,
        what: &'static str,
    },
    #[error(
        "tenant {0} has no key in this repository: nothing of it was ever stored (`updog-backup list --tenants` shows the tenants)"
    )]
    UnknownTenant(String),
    #[error("snapshot {0} not found (see `updog-backup list`)")]
    NoSuchSnapshot(String),
}

pub type Result<T, E = RepositoryError> = std::result::Result<T, E>;

/// What to do about an object of another format version.
fn format_advice(found: u32) -> &'static str {
    if found > FORMAT_VERSION {
        "upgrade updog-backup"
    } else {
        "it was written by an older updog-backup; read it with that version, or start a new repository (another storage.url) with `updog-backup init`"
    }
}

/// A handle on the repository's objects.
#[derive(Debug, Clone)]
pub struct Repository {
    store: Arc<dyn ObjectStore>,
    /// Independent reads (footers, indexes, manifests, sections) in flight at once.
    concurrency: usize,
}

impl Repository {
    pub fn new(store: Arc<dyn ObjectStore>) -> Self {
        Self {
            store,
            concurrency: crate::config::DEFAULT_CONCURRENCY,
        }
    }

    /// At most `concurrency` (at least 1) independent reads in flight at once.
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// The store, for the format's own modules and for writers that stream to it.
    pub(crate) fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Where the repository is (`file:///…`, `s3://…`), for messages.
    pub fn location(&self) -> String {
        self.store.describe()
    }

    /// `repo.json`, or [`RepositoryError::NotInitialized`].
    pub async fn info(&self) -> Result<RepoInfo> {
        let bytes = match self.store.get_bytes(keys::REPO_INFO, None).await {
            Ok(b) => b,
            Err(StorageError::NotFound { .. }) => {
                return Err(RepositoryError::NotInitialized {
                    location: self.store.describe(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        RepoInfo::parse(&bytes)
    }

    /// Writes `repo.json` if absent. If present, it must describe the same source database;
    /// returns whether it was created now.
    pub async fn init(&self, info: &RepoInfo) -> Result<bool> {
        match self
            .store
            .put_bytes(keys::REPO_INFO, info.to_json().into(), PutMode::CreateNew)
            .await
        {
            Ok(_) => Ok(true),
            Err(StorageError::AlreadyExists { .. }) => {
                let existing = self.info().await?;
                existing.check_source(
                    &info.system_identifier,
                    &info.database,
                    &self.store.describe(),
                )?;
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Rewrites `repo.json` (`rotate`: its recipients).
    pub async fn put_info(&self, info: &RepoInfo) -> Result<()> {
        self.store
            .put_bytes(keys::REPO_INFO, info.to_json().into(), PutMode::Overwrite)
            .await?;
        Ok(())
    }

    /// Snapshots that are complete (their manifest exists), oldest first.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotId>> {
        let mut ids: Vec<SnapshotId> = self
            .store
            .list(keys::SNAPSHOTS_PREFIX)
            .await?
            .into_iter()
            .filter_map(|o| keys::snapshot_of_manifest(&o.key))
            .collect();
        ids.sort();
        Ok(ids)
    }

    pub async fn manifest(&self, id: &SnapshotId) -> Result<Manifest> {
        let key = keys::manifest(id);
        let bytes = match self.store.get_bytes(&key, None).await {
            Ok(b) => b,
            Err(StorageError::NotFound { .. }) => {
                return Err(RepositoryError::NoSuchSnapshot(id.to_string()));
            }
            Err(e) => return Err(e.into()),
        };
        Manifest::parse(&key, &bytes)
    }

    /// Makes the snapshot visible. Must be the last write of a snapshot.
    pub async fn put_manifest(&self, manifest: &Manifest) -> Result<()> {
        let key = keys::manifest(&manifest.id);
        self.store
            .put_bytes(&key, manifest.to_json().into(), PutMode::CreateNew)
            .await?;
        Ok(())
    }

    /// Every object under `snapshots/`, by snapshot (complete or not): what retention weighs.
    pub async fn snapshot_objects(
        &self,
    ) -> Result<std::collections::BTreeMap<SnapshotId, Vec<crate::storage::ObjectMeta>>> {
        let mut by_snapshot = std::collections::BTreeMap::<SnapshotId, Vec<_>>::new();
        for object in self.store.list(keys::SNAPSHOTS_PREFIX).await? {
            let id = object
                .key
                .strip_prefix(keys::SNAPSHOTS_PREFIX)
                .and_then(|rest| rest.split('/').next())
                .and_then(|id| id.parse::<SnapshotId>().ok());
            if let Some(id) = id {
                by_snapshot.entry(id).or_default().push(object);
            }
        }
        Ok(by_snapshot)
    }

    /// Deletes one object (retention, which decides what may go and in which order).
    pub async fn delete_object(&self, key: &str) -> Result<()> {
        self.store.delete(key).await?;
        Ok(())
    }

    /// Best-effort removal of the objects of a snapshot that never got its manifest.
    pub async fn discard_incomplete(&self, id: &SnapshotId) {
        let prefix = keys::snapshot_prefix(id);
        match self.store.list(&prefix).await {
            Ok(objects) => {
                for o in objects {
                    if let Err(e) = self.store.delete(&o.key).await {
                        tracing::warn!(key = %o.key, error = %e, "could not delete object of a failed snapshot");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(snapshot = %id, error = %e, "could not list objects of a failed snapshot")
            }
        }
    }
}

impl Classify for RepositoryError {
    fn class(&self) -> ErrorClass {
        match self {
            RepositoryError::Storage(e) => e.class(),
            RepositoryError::Codec(e) | RepositoryError::Object { source: e, .. } => e.class(),
            RepositoryError::NotInitialized { .. }
            | RepositoryError::ForeignRepository { .. }
            | RepositoryError::NoSuchSnapshot(_)
            | RepositoryError::Unkeyed { .. }
            | RepositoryError::UnknownTenant(_) => ErrorClass::Usage,
            RepositoryError::UnknownFormat { .. }
            | RepositoryError::Malformed { .. }
            | RepositoryError::DigestMismatch { .. }
            | RepositoryError::Archive { .. }
            | RepositoryError::Forgotten { .. } => ErrorClass::Permanent,
        }
    }
}
