//! What we ask the source database: the catalog (tables and how each reaches its tenant),
//! what its schemas depend on outside themselves, preflight checks, the publication and
//! pg_dump; and what a server can create of the extensions they need (asked of the restore
//! target too).
//! It reads the source and never writes to it (the only things it creates there are the
//! backup's own replication slot and, when allowed, its publication and the event triggers that
//! put schema changes into the stream).

pub mod catalog;
pub mod check;
pub mod ddl;
pub mod dependencies;
pub mod extensions;
pub mod identity;
pub mod moves;
pub mod pg_tools;
pub mod publication;

use crate::retry::{Classify, ErrorClass};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Connect(#[from] crate::pg::ConnectError),
    #[error(transparent)]
    Url(#[from] crate::pg::InvalidUrl),
    #[error(transparent)]
    Catalog(#[from] catalog::CatalogError),
    #[error(transparent)]
    ReplicaIdentity(#[from] check::ReplicaIdentityError),
    #[error("{context}: {source}")]
    Query {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// Adds context to a query error.
pub fn query_context(
    context: impl Into<String>,
) -> impl FnOnce(tokio_postgres::Error) -> SourceError {
    let context = context.into();
    move |source| SourceError::Query { context, source }
}

impl Classify for SourceError {
    fn class(&self) -> ErrorClass {
        match self {
            SourceError::Connect(e) => e.class(),
            SourceError::Url(_) => ErrorClass::Usage,
            SourceError::Catalog(e) => e.class(),
            SourceError::ReplicaIdentity(e) => e.class(),
            SourceError::Query { source, .. } => crate::pg::sqlstate::class_of(source),
        }
    }
}
