//! The PostgreSQL side: connections, the catalog, preflight checks and snapshot export.
//! It reads the source and never writes to it (the only thing it creates there is the
//! backup's own replication slot).

pub mod catalog;
pub mod check;
pub mod pg_tools;
pub mod snapshot;

use tokio_postgres::{Client, NoTls};

use crate::config::redact_url;

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

/// A connected client; the connection runs on its own task until the client is dropped.
pub async fn connect(url: &str) -> Result<Client, SourceError> {
    let config = crate::config::pg_config(url)?;
    let (client, connection) =
        config
            .connect(NoTls)
            .await
            .map_err(|source| SourceError::Connect {
                target: redact_url(url),
                source,
            })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection ended");
        }
    });
    Ok(client)
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
