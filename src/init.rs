//! `init`: the repository, the publication, and the change stream's start — a replication
//! slot created together with the first snapshot, taken from the slot's exported snapshot so
//! that the stream continues exactly where the snapshot ends. What it did is an [`InitReport`];
//! the CLI prints it.
//!
//! It never drops anything on the source: a slot it did not make for this repository is an
//! error that says how to resolve it.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::codec::{CodecError, parse_recipients, recipient_fingerprint};
use crate::config::Config;
use crate::pg::Lsn;
use crate::repository::stream::EarlierStream;
use crate::repository::{RepoInfo, Repository, RepositoryError};
use crate::retry::{Classify, ErrorClass};
use crate::snapshot::{SnapshotError, SnapshotRequest};
use crate::source::SourceError;
use crate::source::identity::IdentifyError;
use crate::source::publication::PublicationError;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Identify(#[from] IdentifyError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error(transparent)]
    Publication(#[from] PublicationError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(
        "replication slot {slot} exists but this repository's change stream does not come from it: \
         drop it (SELECT pg_drop_replication_slot('{slot}')) or set source.slot to a new name, then run init again"
    )]
    ForeignSlot { slot: String },
}

impl Classify for InitError {
    fn class(&self) -> ErrorClass {
        match self {
            InitError::Identify(e) => e.class(),
            InitError::Source(e) => e.class(),
            InitError::Codec(e) => e.class(),
            InitError::Repository(e) => e.class(),
            InitError::Publication(e) => e.class(),
            InitError::Snapshot(e) => e.class(),
            InitError::ForeignSlot { .. } => ErrorClass::Usage,
        }
    }
}

/// What `init` found and did.
#[derive(Debug, Serialize)]
pub struct InitReport {
    /// Where the repository is.
    pub repository: String,
    /// The source database (`database` on system `system_identifier`).
    pub source: String,
    /// Whether `repo.json` was written now (false: it existed, for the same source).
    pub repository_created: bool,
    pub publication_created: bool,
    /// Whether schema changes reach the stream (the event triggers of `source::ddl`).
    pub schema_changes: crate::source::ddl::Capture,
    pub stream: StreamStart,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamStart {
    /// The slot and the repository's stream exist already: nothing to do.
    Existing { durable_lsn: Lsn },
    /// A new slot and its first snapshot; the stream it replaced, if any, stays restorable.
    New {
        snapshot: FirstSnapshot,
        earlier: Option<EarlierStream>,
    },
}

#[derive(Debug, Serialize)]
pub struct FirstSnapshot {
    pub id: String,
    pub tenants: usize,
    pub consistent_time: DateTime<Utc>,
    pub consistent_lsn: Lsn,
}

/// `format_version`: of the repository if it is created now (an existing one keeps its own).
pub async fn run(
    config: &Config,
    repo: &Repository,
    format_version: u32,
) -> Result<InitReport, InitError> {
    let (client, identity) = crate::source::identity::identify(&config.source.url).await?;
    // The catalog must classify every table before the first backup can work.
    let catalog = crate::source::catalog::Catalog::load(&client, &config.source)
        .await
        .map_err(SourceError::from)?;
    // Before anything exists: a published table the source then refuses UPDATEs on, or a
    // slot holding WAL for a stream that stops at its first change, harms the application.
    crate::source::check::refuse_identity_problems(&catalog).map_err(SourceError::from)?;
    let info = RepoInfo {
        format_version,
        system_identifier: identity.system_identifier,
        database: identity.database,
        tenant_column: config.source.tenant_column.clone(),
        recipients: parse_recipients(&config.encryption.recipients)?
            .iter()
            .map(recipient_fingerprint)
            .collect(),
        created_at: Utc::now(),
    };
    let repository_created = repo.init(&info).await?;
    if !repository_created {
        crate::codec::check_recipients(
            &config.encryption.recipients,
            &repo.info().await?.recipients,
        )?;
    }
    let publication_created =
        crate::source::publication::ensure(&client, &config.source.publication, &catalog).await?;
    // Before the slot: a migration right after the first snapshot is in the stream.
    let schema_changes = crate::source::ddl::ensure(&client, &catalog).await?;
    let report = |stream| InitReport {
        repository: repo.location(),
        source: info.source_label(),
        repository_created,
        publication_created,
        schema_changes: schema_changes.clone(),
        stream,
    };

    let slot = &config.source.slot;
    let slot_exists = client
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[slot],
        )
        .await
        .map_err(crate::source::query_context(
            "looking up the replication slot",
        ))?
        .is_some();
    let stream = repo.stream_state().await?;
    match (slot_exists, &stream.progress) {
        (true, Some(p)) if &p.slot == slot => {
            return Ok(report(StreamStart::Existing {
                durable_lsn: p.durable_lsn,
            }));
        }
        (true, _) => return Err(InitError::ForeignSlot { slot: slot.clone() }),
        (false, _) => {}
    }
    let manifest = crate::snapshot::take(
        config,
        repo,
        &SnapshotRequest {
            tenants: Vec::new(),
            stream_slot: Some(slot.clone()),
        },
    )
    .await?;
    // A stream this repository already holds lost its slot (the daemon stopped saying to run
    // init): it stays in the progress as an earlier stream, so what it covered stays
    // restorable.
    let progress = stream.restart(slot, manifest.consistent_lsn);
    repo.put_stream_progress(&progress).await?;
    Ok(report(StreamStart::New {
        snapshot: FirstSnapshot {
            id: manifest.id.to_string(),
            tenants: manifest.tenants.len(),
            consistent_time: manifest.consistent_time,
            consistent_lsn: manifest.consistent_lsn,
        },
        earlier: progress.earlier.last().cloned(),
    }))
}
