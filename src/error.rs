//! The crate's error at the command boundary: every module error, and which exit code it
//! earns (DESIGN.md: 1 operational failure, 2 usage or configuration error).

use crate::codec::CodecError;
use crate::config::ConfigError;
use crate::repository::RepositoryError;
use crate::restore::{PlanError, RestoreError};
use crate::source::SourceError;
use crate::source::snapshot::SnapshotError;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Capture(#[from] crate::capture::CaptureError),
    #[error(transparent)]
    Publication(#[from] crate::source::publication::PublicationError),
    #[error(transparent)]
    Daemon(#[from] crate::daemon::DaemonError),
    #[error("{0}")]
    Failed(String),
}

impl Error {
    /// 2 when the user can fix it by changing arguments or configuration, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        let usage = match self {
            Self::Usage(_) | Self::Config(_) => true,
            Self::Codec(e) => codec_is_usage(e),
            Self::Repository(e) => repository_is_usage(e),
            Self::Snapshot(SnapshotError::Tenant { .. }) => true,
            Self::Snapshot(SnapshotError::Repository(e)) => repository_is_usage(e),
            Self::Snapshot(SnapshotError::Catalog(_)) => true,
            Self::Daemon(e) => {
                e.is_usage()
                    || matches!(e, crate::daemon::DaemonError::Repository(r) if repository_is_usage(r))
            }
            Self::Source(SourceError::Config(_) | SourceError::Catalog(_)) => true,
            Self::Restore(e) => match e {
                RestoreError::Plan(PlanError::Repository(r)) | RestoreError::Repository(r) => {
                    repository_is_usage(r)
                }
                RestoreError::Plan(_)
                | RestoreError::TargetExists(_)
                | RestoreError::TargetName(_)
                | RestoreError::NoTarget => true,
                _ => false,
            },
            _ => false,
        };
        if usage { 2 } else { 1 }
    }
}

fn codec_is_usage(e: &CodecError) -> bool {
    matches!(
        e,
        CodecError::Recipient(_)
            | CodecError::RecipientMismatch { .. }
            | CodecError::Identity { .. }
            | CodecError::WrongIdentity
    )
}

fn repository_is_usage(e: &RepositoryError) -> bool {
    match e {
        RepositoryError::NotInitialized { .. }
        | RepositoryError::ForeignRepository { .. }
        | RepositoryError::NoSuchSnapshot(_) => true,
        RepositoryError::Codec(c) | RepositoryError::Object { source: c, .. } => codec_is_usage(c),
        _ => false,
    }
}
