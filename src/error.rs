//! The crate's error at the command boundary: every module error, and the exit code its
//! class earns (README.md: 0 success, 1 operational failure, 2 usage or configuration error).
//! Which class each error has is its module's answer ([`Classify`]); this type only carries it.

use crate::retry::{Classify, ErrorClass};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Url(#[from] crate::pg::InvalidUrl),
    #[error(transparent)]
    Connect(#[from] crate::pg::ConnectError),
    #[error(transparent)]
    Replication(#[from] crate::pg::replication::ReplicationError),
    #[error(transparent)]
    Codec(#[from] crate::codec::CodecError),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error(transparent)]
    Repository(#[from] crate::repository::RepositoryError),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error(transparent)]
    Restore(#[from] crate::restore::RestoreError),
    #[error(transparent)]
    Plan(#[from] crate::restore::PlanError),
    #[error(transparent)]
    Capture(#[from] crate::capture::CaptureError),
    #[error(transparent)]
    Publication(#[from] crate::source::publication::PublicationError),
    #[error(transparent)]
    Daemon(#[from] crate::daemon::DaemonError),
    #[error(transparent)]
    Init(#[from] crate::init::InitError),
    #[error(transparent)]
    List(#[from] crate::listing::ListError),
    #[error(transparent)]
    Verify(#[from] crate::verify::VerifyError),
    #[error("{0}")]
    Failed(String),
}

impl Classify for Error {
    fn class(&self) -> ErrorClass {
        match self {
            Error::Usage(_) => ErrorClass::Usage,
            Error::Config(e) => e.class(),
            Error::Url(e) => e.class(),
            Error::Connect(e) => e.class(),
            Error::Replication(e) => e.class(),
            Error::Codec(e) => e.class(),
            Error::Storage(e) => e.class(),
            Error::Repository(e) => e.class(),
            Error::Source(e) => e.class(),
            Error::Snapshot(e) => e.class(),
            Error::Restore(e) => e.class(),
            Error::Plan(e) => e.class(),
            Error::Capture(e) => e.class(),
            Error::Publication(e) => e.class(),
            Error::Daemon(e) => e.class(),
            Error::Init(e) => e.class(),
            Error::List(e) => e.class(),
            Error::Verify(e) => e.class(),
            Error::Failed(_) => ErrorClass::Permanent,
        }
    }
}

impl Error {
    /// The process exit code: the class's (2 for usage, 1 otherwise).
    pub fn exit_code(&self) -> u8 {
        self.class().exit_code()
    }
}
