//! Authentication inside the startup of a replication connection: cleartext, MD5 and
//! SCRAM-SHA-256 (without channel binding).
//!
//! It must never put the password in an error, a log line or `Debug` output, and never accepts a
//! SCRAM server that cannot prove it knows the password. GSS, SSPI and Kerberos are refused by
//! name.

use std::io;

use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::backend::{AuthenticationSaslBody, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::fallible_iterator::FallibleIterator;

use super::error::ReplicationError;
use super::session::ReplicationConnection;
use super::wire::{BackendMessage, ServerFields, message_name};

impl<S> ReplicationConnection<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    pub(super) async fn authenticate(
        &mut self,
        user: &str,
        password: Option<&[u8]>,
    ) -> Result<(), ReplicationError> {
        let need_password = |method: &str| {
            password.ok_or_else(|| {
                ReplicationError::Auth(format!(
                    "the server requires {method} authentication for user {user:?} but no \
                     password is configured; set PGPASSWORD or a passfile"
                ))
            })
        };
        loop {
            let message = match self.read_message().await? {
                BackendMessage::Message(message) => message,
                BackendMessage::CopyBothResponse(_) => {
                    return Err(ReplicationError::Protocol(
                        "unexpected CopyBothResponse during authentication".into(),
                    ));
                }
            };
            match message {
                Message::AuthenticationOk => return Ok(()),
                Message::AuthenticationCleartextPassword => {
                    let password = need_password("password")?;
                    frontend::password_message(password, &mut self.write_buf).map_err(|_| {
                        ReplicationError::Auth("the password contains a NUL byte".into())
                    })?;
                    self.send().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let password = need_password("md5")?;
                    let hash = md5_hash(user.as_bytes(), password, body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.write_buf).map_err(
                        |e| ReplicationError::Protocol(format!("cannot encode md5 response: {e}")),
                    )?;
                    self.send().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let password = need_password("SCRAM-SHA-256")?;
                    self.authenticate_scram(&body, password).await?;
                }
                Message::ErrorResponse(body) => {
                    return Err(ServerFields::parse(body.fields())?.into_error());
                }
                Message::AuthenticationKerberosV5
                | Message::AuthenticationScmCredential
                | Message::AuthenticationGss
                | Message::AuthenticationGssContinue(_)
                | Message::AuthenticationSspi => {
                    return Err(ReplicationError::Auth(format!(
                        "the server asks for {}, which is not supported; use scram-sha-256, md5 \
                         or password in pg_hba.conf",
                        message_name(&message)
                    )));
                }
                other => {
                    return Err(ReplicationError::Protocol(format!(
                        "unexpected {} during authentication",
                        message_name(&other)
                    )));
                }
            }
        }
    }

    /// SCRAM-SHA-256 without channel binding (not implemented here). Leaves AuthenticationOk (or
    /// the server's error) for the caller to read.
    async fn authenticate_scram(
        &mut self,
        offer: &AuthenticationSaslBody,
        password: &[u8],
    ) -> Result<(), ReplicationError> {
        let mut offered = Vec::new();
        let mut mechanisms = offer.mechanisms();
        while let Some(mechanism) = mechanisms
            .next()
            .map_err(|e| ReplicationError::Protocol(format!("malformed AuthenticationSASL: {e}")))?
        {
            offered.push(mechanism.to_owned());
        }
        if !offered.iter().any(|m| m == sasl::SCRAM_SHA_256) {
            return Err(ReplicationError::Auth(
                if offered.iter().any(|m| m == sasl::SCRAM_SHA_256_PLUS) {
                    "the server only offers SCRAM-SHA-256-PLUS (channel binding to TLS), which \
                     the replication connection does not implement; let it offer SCRAM-SHA-256"
                        .to_owned()
                } else {
                    format!(
                        "the server offers no supported SASL mechanism (offered: {})",
                        offered.join(", ")
                    )
                },
            ));
        }

        let scram_error = |e: io::Error| ReplicationError::Auth(format!("SCRAM-SHA-256: {e}"));
        // "n": this client does not do channel binding, with or without TLS. PostgreSQL accepts
        // it even when it offered SCRAM-SHA-256-PLUS ("y" would claim the server could not).
        let mut scram = sasl::ScramSha256::new(password, sasl::ChannelBinding::unsupported());
        frontend::sasl_initial_response(sasl::SCRAM_SHA_256, scram.message(), &mut self.write_buf)
            .map_err(scram_error)?;
        self.send().await?;

        match self.read_message().await? {
            BackendMessage::Message(Message::AuthenticationSaslContinue(body)) => {
                scram.update(body.data()).map_err(scram_error)?;
            }
            BackendMessage::Message(Message::ErrorResponse(body)) => {
                return Err(ServerFields::parse(body.fields())?.into_error());
            }
            _ => {
                return Err(ReplicationError::Protocol(
                    "expected AuthenticationSASLContinue".into(),
                ));
            }
        }
        frontend::sasl_response(scram.message(), &mut self.write_buf).map_err(scram_error)?;
        self.send().await?;

        match self.read_message().await? {
            // Verifies the server's signature: a server that does not know the password (an
            // impostor) is refused here even though it would accept our proof.
            BackendMessage::Message(Message::AuthenticationSaslFinal(body)) => {
                scram.finish(body.data()).map_err(scram_error)
            }
            BackendMessage::Message(Message::ErrorResponse(body)) => {
                Err(ServerFields::parse(body.fields())?.into_error())
            }
            _ => Err(ReplicationError::Protocol(
                "expected AuthenticationSASLFinal".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::mock::{authentication, config, cstrs, error_response, ready, with_server};
    use super::*;
    use crate::retry::Classify as _;

    #[tokio::test]
    async fn md5_answers_with_the_salted_hash() {
        let mut config = config();
        config.password("s3cret");
        let (connection, server) = with_server(4096, &config, |mut server| async move {
            server.read_startup().await;
            let salt = [1, 2, 3, 4];
            server.send(&[authentication(5, &salt)]).await;
            let (tag, body) = server.read_message().await;
            assert_eq!(tag, b'p');
            let expected = md5_hash(b"alice", b"s3cret", salt);
            assert_eq!(body, cstrs(&[&expected]));
            server.send(&[authentication(0, b""), ready()]).await;
            server
        })
        .await;
        connection.expect("md5 authentication");
        server.await.expect("server script");
    }

    #[tokio::test]
    async fn cleartext_sends_the_password() {
        let mut config = config();
        config.password("s3cret");
        let (connection, server) = with_server(4096, &config, |mut server| async move {
            server.read_startup().await;
            server.send(&[authentication(3, b"")]).await;
            let (tag, body) = server.read_message().await;
            assert_eq!((tag, body), (b'p', cstrs(&["s3cret"])));
            server.send(&[authentication(0, b""), ready()]).await;
            server
        })
        .await;
        connection.expect("password authentication");
        server.await.expect("server script");
    }

    #[tokio::test]
    async fn a_missing_password_says_how_to_give_one() {
        for (code, extra) in [
            (3, b"".as_slice()),
            (5, b"\x01\x02\x03\x04".as_slice()),
            (10, b"SCRAM-SHA-256\0\0".as_slice()),
        ] {
            let (connection, _server) =
                with_server(4096, &config(), move |mut server| async move {
                    server.read_startup().await;
                    server.send(&[authentication(code, extra)]).await;
                    server
                })
                .await;
            let err = connection.expect_err("no password");
            assert!(matches!(err, ReplicationError::Auth(_)), "{err:?}");
            assert!(err.to_string().contains("PGPASSWORD"), "{err}");
            assert!(!err.class().is_transient());
        }
    }

    #[tokio::test]
    async fn scram_plus_only_is_refused_clearly() {
        let mut config = config();
        config.password("s3cret");
        let (connection, _server) = with_server(4096, &config, |mut server| async move {
            server.read_startup().await;
            server
                .send(&[authentication(10, b"SCRAM-SHA-256-PLUS\0\0")])
                .await;
            server
        })
        .await;
        let err = connection.expect_err("PLUS needs TLS");
        assert!(matches!(err, ReplicationError::Auth(_)), "{err:?}");
        assert!(err.to_string().contains("TLS"), "{err}");
    }

    #[tokio::test]
    async fn a_failed_scram_exchange_never_shows_the_password() {
        let mut config = config();
        config.password("hunter2-very-secret");
        let (connection, server) = with_server(4096, &config, |mut server| async move {
            server.read_startup().await;
            server
                .send(&[authentication(10, b"SCRAM-SHA-256\0SCRAM-SHA-256-PLUS\0\0")])
                .await;
            let (tag, body) = server.read_message().await;
            assert_eq!(tag, b'p');
            assert!(body.starts_with(b"SCRAM-SHA-256\0"));
            // "n,,": no channel binding, as there is no TLS.
            assert!(body.windows(3).any(|w| w == b"n,,"));
            // A nonce that does not extend the client's: an impostor or a broken server.
            server
                .send(&[authentication(11, b"r=not-your-nonce,s=c2FsdA==,i=4096")])
                .await;
            server
        })
        .await;
        let err = connection.expect_err("bad nonce");
        assert!(matches!(err, ReplicationError::Auth(_)), "{err:?}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");
        server.await.expect("server script");
    }

    #[tokio::test]
    async fn unsupported_methods_are_named() {
        let (connection, _server) = with_server(4096, &config(), |mut server| async move {
            server.read_startup().await;
            server.send(&[authentication(7, b"")]).await;
            server
        })
        .await;
        let err = connection.expect_err("GSS");
        assert!(err.to_string().contains("AuthenticationGSS"), "{err}");
    }

    #[tokio::test]
    async fn a_rejected_password_is_a_server_error_with_its_sqlstate() {
        let mut config = config();
        config.password("wrong");
        let (connection, _server) = with_server(4096, &config, |mut server| async move {
            server.read_startup().await;
            server.send(&[authentication(3, b"")]).await;
            server.read_message().await;
            server
                .send(&[error_response(
                    "FATAL",
                    "28P01",
                    "password authentication failed for user \"alice\"",
                    None,
                )])
                .await;
            server
        })
        .await;
        let err = connection.expect_err("rejected");
        assert_eq!(err.code(), Some("28P01"));
        assert!(!err.class().is_transient());
        assert!(!err.to_string().contains("wrong"), "{err}");
    }
}
