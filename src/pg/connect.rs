//! Opening SQL connections: the URL's target, its TLS policy, and errors that say what to do.
//!
//! Owns the tokio-postgres connection ([`connect_client`], over rustls as [`TlsSettings`] says)
//! and the turning of its failures into messages that say what to change. It must never weaken
//! the TLS policy to get a connection through: a refusal is reported, not retried in plain.

use std::io;
use std::sync::Arc;

use tokio_postgres::Client;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::conninfo::{InvalidUrl, pg_config, redact_url};
use super::tls::{TlsError, TlsSettings, describe_rustls, plain_refused, rustls_cause};
use crate::retry::{Classify, ErrorClass};

/// The TLS stream of a tokio-postgres connection made by [`connect_client`].
pub type ClientTlsStream = <MakeRustlsConnect as MakeTlsConnect<tokio_postgres::Socket>>::Stream;
/// The connection half of [`connect_client`]: spawn it, it runs until the client is dropped.
pub type ClientConnection = tokio_postgres::Connection<tokio_postgres::Socket, ClientTlsStream>;

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

/// Why [`connect_client`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientConnectError {
    /// The TLS policy could not be met; the message says what to change.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Anything else: unreachable server, authentication, the server's own refusal.
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

/// Connects a tokio-postgres client as `config` and `tls` say. `config` must have gone through
/// [`TlsSettings::configure`] (`config::pg_config` does it).
pub async fn connect_client(
    config: &tokio_postgres::Config,
    tls: &TlsSettings,
) -> Result<(tokio_postgres::Client, ClientConnection), ClientConnectError> {
    let connector = MakeRustlsConnect::new(Arc::unwrap_or_clone(tls.client_config()?));
    config
        .connect(connector)
        .await
        .map_err(|e| explain_client_error(e, tls))
}

/// Turns the TLS failures tokio-postgres reports into [`TlsError`]s that say what to do.
fn explain_client_error(error: tokio_postgres::Error, tls: &TlsSettings) -> ClientConnectError {
    use std::error::Error as _;
    if let Some(db) = error.as_db_error() {
        return match plain_refused(tls.mode, db.code().code(), db.message()) {
            Some(refused) => refused.into(),
            None => error.into(),
        };
    }
    let Some(cause) = error.source() else {
        return error.into();
    };
    // tokio-postgres reports a refused SSLRequest only as this text (connect_tls.rs); the e2e
    // test against a server without TLS notices if that ever changes.
    if tls.mode.requires_tls() && cause.to_string() == "server does not support TLS" {
        return TlsError::NotSupportedByServer { mode: tls.mode }.into();
    }
    let rustls = cause
        .downcast_ref::<io::Error>()
        .and_then(rustls_cause)
        .or_else(|| cause.downcast_ref::<rustls::Error>());
    match rustls {
        Some(cause) => TlsError::Handshake(describe_rustls(cause)).into(),
        None => error.into(),
    }
}
