//! Which source this is: its system identifier (from the walsender's `IDENTIFY_SYSTEM`), its
//! database and server version. A repository serves one source database; every command that
//! writes to it checks this first.

use tokio_postgres::Client;

use super::{SourceError, query_context};
use crate::pg::replication::{ReplicationConnection, ReplicationError};
use crate::pg::{ConnectError, InvalidUrl, redact_url};
use crate::retry::{Classify, ErrorClass};

#[derive(Debug, thiserror::Error)]
pub enum IdentifyError {
    #[error(transparent)]
    Url(#[from] InvalidUrl),
    #[error("replication connection to {target}: {source}")]
    Replication {
        target: String,
        #[source]
        source: ReplicationError,
    },
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Source(#[from] SourceError),
}

impl Classify for IdentifyError {
    fn class(&self) -> ErrorClass {
        match self {
            IdentifyError::Url(e) => e.class(),
            IdentifyError::Replication { source, .. } => source.class(),
            IdentifyError::Connect(e) => e.class(),
            IdentifyError::Source(e) => e.class(),
        }
    }
}

/// Source facts a snapshot records, read once per run.
#[derive(Debug, Clone)]
pub struct SourceIdentity {
    pub system_identifier: String,
    pub database: String,
    pub server_version_num: u32,
}

pub async fn source_identity(
    client: &Client,
    system_identifier: String,
) -> Result<SourceIdentity, SourceError> {
    let row = client
        .query_one(
            "SELECT current_database(), current_setting('server_version_num')::int",
            &[],
        )
        .await
        .map_err(query_context("reading the source's identity"))?;
    Ok(SourceIdentity {
        system_identifier,
        database: row.get(0),
        server_version_num: row.get::<_, i32>(1) as u32,
    })
}

/// Connects to the source at `url` and says which it is; the SQL connection stays open for the
/// caller.
pub async fn identify(url: &str) -> Result<(Client, SourceIdentity), IdentifyError> {
    let target = crate::pg::pg_config(url)?;
    let replication_error = |source| IdentifyError::Replication {
        target: redact_url(url),
        source,
    };
    let mut replication = ReplicationConnection::connect_tls(&target.config, &target.tls)
        .await
        .map_err(replication_error)?;
    let system = replication
        .identify_system()
        .await
        .map_err(replication_error)?;
    let _ = replication.close().await;
    let client = crate::pg::connect(url).await?;
    let identity = source_identity(&client, system.system_id).await?;
    Ok((client, identity))
}
