//! What can go wrong on a replication connection, and what each failure means for a retry.
//!
//! Owns [`ReplicationError`] and its [`crate::retry::Classify`] answer. It must never carry the
//! password, in a message or in `Debug`: authentication failures say which method failed and why.

use std::io;

use crate::pg::tls::TlsError;

/// Errors of the replication connection.
///
/// No variant ever carries the password: authentication failures say which method failed and
/// why, never with what.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicationError {
    /// The network or the socket failed (connection refused, reset, timed out…). `context` says
    /// what was being done and with which server.
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The server sent something this client does not understand or did not expect.
    #[error("replication protocol error: {0}")]
    Protocol(String),
    /// Authentication failed on the client side (no password configured, unsupported method,
    /// SCRAM exchange not verifiable). Rejections by the server are [`ReplicationError::Server`].
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The server answered with an ErrorResponse.
    #[error("{}", display_server_error(.code, .message, .detail.as_deref(), .hint.as_deref()))]
    Server {
        /// SQLSTATE, e.g. `28P01` (invalid password) or `42710` (slot already exists).
        code: String,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },
    /// The server closed the connection, or the connection is unusable because an earlier call
    /// failed or was cancelled halfway through a message exchange. Reconnect.
    #[error("replication connection closed or unusable; reconnect")]
    Closed,
    /// The connection config cannot be used for a replication connection.
    #[error("replication connection config: {0}")]
    Config(String),
    /// A slot name PostgreSQL would reject.
    #[error("invalid replication slot name {name:?}: use 1 to 63 characters of a-z, 0-9 and _")]
    InvalidSlotName { name: String },
    /// An output plugin option that cannot be sent (empty name, NUL byte), refused before sending.
    #[error("invalid replication option: {0}")]
    InvalidOption(String),
    /// The TLS policy (`sslmode`, `sslrootcert`) could not be met: no TLS on the server, a
    /// certificate that does not verify, an unreadable root certificate. The message says what to
    /// change; retrying the same settings will not help.
    #[error("{0}")]
    Tls(#[from] TlsError),
}

impl crate::retry::Classify for ReplicationError {
    /// Network failures and closed connections are transient; server errors by their SQLSTATE
    /// ([`crate::pg::sqlstate`]); settings the server cannot take (slot names, options, TLS
    /// policy) are the user's to change; a protocol violation or a refused authentication meets
    /// the same answer next time.
    fn class(&self) -> crate::retry::ErrorClass {
        use crate::retry::ErrorClass;
        match self {
            ReplicationError::Io { .. } | ReplicationError::Closed => ErrorClass::Transient,
            ReplicationError::Server { code, .. } => crate::pg::sqlstate::class_of_code(code),
            ReplicationError::Config(_)
            | ReplicationError::InvalidSlotName { .. }
            | ReplicationError::InvalidOption(_)
            | ReplicationError::Tls(_) => ErrorClass::Usage,
            ReplicationError::Protocol(_) | ReplicationError::Auth(_) => ErrorClass::Permanent,
        }
    }
}

impl ReplicationError {
    /// The SQLSTATE of a server error.
    #[must_use]
    pub fn code(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { code, .. } => Some(code),
            _ => None,
        }
    }

    pub(super) fn io(context: impl Into<String>, source: io::Error) -> ReplicationError {
        ReplicationError::Io {
            context: context.into(),
            source,
        }
    }
}

fn display_server_error(
    code: &str,
    message: &str,
    detail: Option<&str>,
    hint: Option<&str>,
) -> String {
    let mut out = format!("server error {code}: {message}");
    if let Some(detail) = detail {
        out.push_str("; detail: ");
        out.push_str(detail);
    }
    if let Some(hint) = hint {
        out.push_str("; hint: ");
        out.push_str(hint);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::Classify as _;

    #[test]
    fn retryability_follows_the_error_class() {
        let server = |code: &str| ReplicationError::Server {
            code: code.into(),
            message: String::new(),
            detail: None,
            hint: None,
        };
        for code in [
            "08006", "40001", "53300", "57P01", "57P03", "58030", "55006",
        ] {
            assert!(server(code).class().is_transient(), "{code}");
        }
        for code in [
            "28P01", "28000", "42501", "42710", "42704", "22023", "0A000", "55000",
        ] {
            assert!(!server(code).class().is_transient(), "{code}");
        }
        let refused = ReplicationError::io("connecting", io::ErrorKind::ConnectionRefused.into());
        assert!(refused.class().is_transient());
        assert!(ReplicationError::Closed.class().is_transient());
        assert!(!ReplicationError::Auth("x".into()).class().is_transient());
        assert!(
            !ReplicationError::Protocol("x".into())
                .class()
                .is_transient()
        );
        assert!(!ReplicationError::Config("x".into()).class().is_transient());
    }

    #[test]
    fn server_errors_display_detail_and_hint() {
        let err = ReplicationError::Server {
            code: "42710".into(),
            message: "replication slot \"s\" already exists".into(),
            detail: Some("d".into()),
            hint: Some("h".into()),
        };
        assert_eq!(
            err.to_string(),
            "server error 42710: replication slot \"s\" already exists; detail: d; hint: h"
        );
    }
}
