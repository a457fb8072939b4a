//! Opening SQL connections: the URL's target, its TLS policy, and errors that say what to do.

use tokio_postgres::Client;

use super::conninfo::{InvalidUrl, pg_config, redact_url};
use super::tls::{ClientConnectError, TlsError, connect_client};
use crate::retry::{Classify, ErrorClass};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Url(#[from] InvalidUrl),
    #[error(
        "cannot connect to {target}: {source}. Is the server running and the URL right? (password: PGPASSWORD or a passfile)"
    )]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// The TLS policy could not be met; the message says what to change, and "is the server
    /// running?" would mislead.
    #[error("cannot connect to {target}: {source}")]
    Tls {
        target: String,
        #[source]
        source: TlsError,
    },
}

impl ConnectError {
    /// A failed connection to `target` (already redacted).
    pub fn connecting(target: String, error: ClientConnectError) -> ConnectError {
        match error {
            ClientConnectError::Tls(source) => ConnectError::Tls { target, source },
            ClientConnectError::Postgres(source) => ConnectError::Connect { target, source },
        }
    }
}

impl Classify for ConnectError {
    fn class(&self) -> ErrorClass {
        match self {
            ConnectError::Url(_) | ConnectError::Tls { .. } => ErrorClass::Usage,
            ConnectError::Connect { source, .. } => super::sqlstate::class_of(source),
        }
    }
}

/// A connected client, over TLS as the URL's `sslmode` says; the connection runs on its own task
/// until the client is dropped.
pub async fn connect(url: &str) -> Result<Client, ConnectError> {
    let target = pg_config(url)?;
    let (client, connection) = connect_client(&target.config, &target.tls)
        .await
        .map_err(|e| ConnectError::connecting(redact_url(url), e))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "database connection ended");
        }
    });
    Ok(client)
}
