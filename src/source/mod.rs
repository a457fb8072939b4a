//! The PostgreSQL side: connections, the catalog, preflight checks and snapshot export.
//! It reads the source and never writes to it (the only things it creates there are the
//! backup's own replication slot and, when allowed, its publication).

pub mod catalog;
pub mod check;
pub mod pg_tools;
pub mod publication;
pub mod snapshot;

use tokio_postgres::Client;

use crate::config::redact_url;
use crate::tls::ClientConnectError;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "cannot connect to {target}: {source}. Is the server running and the URL right? (password: PGPASSWORD or a passfile)"
    )]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("cannot connect to {target}: {source}")]
    Tls {
        target: String,
        #[source]
        source: crate::tls::TlsError,
    },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Catalog(#[from] catalog::CatalogError),
    #[error("{context}: {source}")]
    Query {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl SourceError {
    /// A failed connection to `target` (already redacted): TLS policy failures apart, because
    /// their message says what to change and "is the server running?" would mislead.
    pub fn connecting(target: String, error: ClientConnectError) -> SourceError {
        match error {
            ClientConnectError::Tls(source) => SourceError::Tls { target, source },
            ClientConnectError::Postgres(source) => SourceError::Connect { target, source },
        }
    }
}

/// A connected client, over TLS as the URL's `sslmode` says; the connection runs on its own task
/// until the client is dropped.
pub async fn connect(url: &str) -> Result<Client, SourceError> {
    let target = crate::config::pg_config(url)?;
    let (client, connection) = crate::tls::connect_client(&target.config, &target.tls)
        .await
        .map_err(|e| SourceError::connecting(redact_url(url), e))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection ended");
        }
    });
    Ok(client)
}

/// Whether `e` is the connection going away (server restart, network, administrator
/// command) rather than something a retry would meet again (permissions, a missing object).
pub fn connection_lost(e: &tokio_postgres::Error) -> bool {
    match e.as_db_error() {
        Some(db) => matches!(db.code().code().get(..2), Some("08" | "57" | "53")),
        None => true,
    }
}

/// The message of a database error including its detail and hint, which `Display` of
/// tokio-postgres leaves out.
pub fn describe_db_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{}: {}", db.severity(), db.message());
            if let Some(d) = db.detail() {
                s.push_str(&format!(" (detail: {d})"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!(" (hint: {h})"));
            }
            s
        }
        None => e.to_string(),
    }
}

/// Adds context to a query error.
pub fn query_context(
    context: impl Into<String>,
) -> impl FnOnce(tokio_postgres::Error) -> SourceError {
    let context = context.into();
    move |source| SourceError::Query { context, source }
}
