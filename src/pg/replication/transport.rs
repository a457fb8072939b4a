//! The byte stream under a replication connection: which socket to open (TCP, or a Unix socket,
//! from the config's first host), the SSLRequest, and the TLS handshake that follows it.
//!
//! Owns [`Socket`], the connection target, [`ReplicationConnection::connect`] and
//! [`ReplicationConnection::connect_tls`], which apply the `sslmode` policy of [`crate::pg::tls`]
//! before handing the stream to the startup (`super::session`). It must never read a byte of the
//! plaintext protocol after the SSLRequest's answer (that belongs to TLS), and never fall back to
//! a plain connection unless the mode is `prefer`.

use std::fmt;
use std::io;
#[cfg(unix)]
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
#[cfg(unix)]
use tokio::net::UnixStream;
use tokio_postgres::config::{Config, Host, SslNegotiation};

use super::error::ReplicationError;
use super::session::ReplicationConnection;
use super::wire::tag_name;
use crate::pg::tls::{TlsError, TlsSettings, describe_rustls, rustls_cause};

const DEFAULT_PORT: u16 = 5432;

/// The byte streams [`ReplicationConnection::connect_tls`] can open.
#[derive(Debug)]
pub enum Socket {
    Tcp(TcpStream),
    /// TCP after the server accepted the SSLRequest. Boxed: the TLS state is large, and the enum
    /// is moved around by value.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    #[cfg(unix)]
    Unix(UnixStream),
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            #[cfg(unix)]
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            #[cfg(unix)]
            Socket::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            #[cfg(unix)]
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            #[cfg(unix)]
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Where [`ReplicationConnection::connect`] connects: the config's first host.
#[derive(Debug, Clone)]
enum Target {
    Tcp {
        host: String,
        port: u16,
        /// The name the server certificate must carry: `host` even when `hostaddr` says where to
        /// connect, as in libpq.
        tls_name: String,
    },
    #[cfg(unix)]
    Unix { path: PathBuf },
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp { host, port, .. } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Target::Tcp { host, port, .. } => write!(f, "{host}:{port}"),
            #[cfg(unix)]
            Target::Unix { path } => write!(f, "{}", path.display()),
        }
    }
}

impl Target {
    fn from_config(config: &Config) -> Result<Target, ReplicationError> {
        let port = config.get_ports().first().copied().unwrap_or(DEFAULT_PORT);
        // hostaddr wins over host for the socket address, as in libpq and tokio-postgres.
        if let Some(addr) = config.get_hostaddrs().first() {
            let tls_name = match config.get_hosts().first() {
                Some(Host::Tcp(host)) => host.clone(),
                _ => addr.to_string(),
            };
            return Ok(Target::Tcp {
                host: addr.to_string(),
                port,
                tls_name,
            });
        }
        match config.get_hosts().first() {
            Some(Host::Tcp(host)) => Ok(Target::Tcp {
                host: host.clone(),
                port,
                tls_name: host.clone(),
            }),
            #[cfg(unix)]
            Some(Host::Unix(dir)) => Ok(Target::Unix {
                path: dir.join(format!(".s.PGSQL.{port}")),
            }),
            None => Err(ReplicationError::Config(
                "no host given; set a host (or a Unix socket directory) in the source URL".into(),
            )),
        }
    }

    async fn open(&self) -> Result<Socket, ReplicationError> {
        match self {
            Target::Tcp { host, port, .. } => {
                let stream = TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|e| ReplicationError::io(format!("connecting to {self}"), e))?;
                // Standby status updates are small and latency matters to the server's
                // wal_sender_timeout: do not let Nagle hold them back.
                stream.set_nodelay(true).map_err(|e| {
                    ReplicationError::io(format!("configuring socket to {self}"), e)
                })?;
                Ok(Socket::Tcp(stream))
            }
            #[cfg(unix)]
            Target::Unix { path } => {
                let stream = UnixStream::connect(path)
                    .await
                    .map_err(|e| ReplicationError::io(format!("connecting to {self}"), e))?;
                Ok(Socket::Unix(stream))
            }
        }
    }
}

impl ReplicationConnection<Socket> {
    /// Opens a replication connection as described by `config`, with the TLS policy its own
    /// `sslmode` can express: `disable`, `prefer` or `require`, none of which checks the server
    /// certificate. For `verify-ca`/`verify-full` or a root certificate use
    /// [`ReplicationConnection::connect_tls`] with the settings `config::pg_config` resolved.
    ///
    /// # Errors
    /// As [`ReplicationConnection::connect_tls`].
    pub async fn connect(config: &Config) -> Result<Self, ReplicationError> {
        let tls = TlsSettings::from_tokio_postgres(config.get_ssl_mode())?;
        Self::connect_tls(config, &tls).await
    }

    /// Opens a replication connection as described by `config`, with TLS as `tls` says.
    ///
    /// Uses the config's first host (a TCP host or a Unix socket directory; `hostaddr` wins over
    /// `host` for the address, `host` stays the name the certificate is checked against), its
    /// first port (default 5432), `user` (required), `dbname`, `options`, `application_name`
    /// (default [`DEFAULT_APPLICATION_NAME`]) and the password from `get_password()` —
    /// tokio-postgres does not read `PGPASSWORD` or a passfile, whoever builds the config must.
    /// Its `sslmode` is ignored in favour of `tls`. `connect_timeout` bounds the whole
    /// establishment: socket, TLS and authentication.
    ///
    /// Over TCP, unless the mode is `disable`, it sends PostgreSQL's SSLRequest; a server that
    /// declines is an error when the mode requires TLS and a plain connection with `prefer`.
    /// Unix sockets never use TLS.
    ///
    /// # Errors
    /// [`ReplicationError::Config`] for an unusable config, [`ReplicationError::Tls`] if the TLS
    /// policy cannot be met, [`ReplicationError::Io`] if the server cannot be reached or the
    /// timeout expires, [`ReplicationError::Auth`] or [`ReplicationError::Server`] if
    /// authentication fails.
    pub async fn connect_tls(config: &Config, tls: &TlsSettings) -> Result<Self, ReplicationError> {
        if config.get_ssl_negotiation() == SslNegotiation::Direct {
            return Err(ReplicationError::Config(
                "sslnegotiation=direct is not supported; remove it (TLS is negotiated with the \
                 standard SSLRequest)"
                    .into(),
            ));
        }
        let target = Target::from_config(config)?;
        // Built before connecting: an unreadable sslrootcert is a configuration error, reported
        // without touching the network.
        let client_config = match (&target, tls.mode) {
            (_, crate::pg::tls::SslMode::Disable) => None,
            (Target::Tcp { tls_name, .. }, _) => Some((tls.client_config()?, tls_name.as_str())),
            #[cfg(unix)]
            (Target::Unix { .. }, _) => None,
        };
        let establish = async {
            let socket = match (target.open().await?, client_config) {
                (Socket::Tcp(tcp), Some((client_config, tls_name))) => {
                    start_tls(tcp, &target, tls, client_config, tls_name).await?
                }
                (socket, _) => socket,
            };
            Self::connect_stream(socket, config)
                .await
                .map_err(|e| match &e {
                    ReplicationError::Server { code, message, .. } => {
                        crate::pg::tls::plain_refused(tls.mode, code, message).map_or(e, Into::into)
                    }
                    _ => e,
                })
        };
        let connection = match config.get_connect_timeout() {
            Some(limit) => tokio::time::timeout(*limit, establish)
                .await
                .map_err(|_| {
                    ReplicationError::io(
                        format!("connecting to {target} timed out after {limit:?}"),
                        io::ErrorKind::TimedOut.into(),
                    )
                })??,
            None => establish.await?,
        };
        tracing::debug!(
            server = %target,
            backend_pid = connection.backend_pid(),
            tls = tls.mode.as_str(),
            "replication connection established"
        );
        Ok(connection)
    }
}

/// SSLRequest, then the TLS handshake if the server agrees. A refusal falls back to the plain
/// socket only when the mode allows it (`prefer`).
async fn start_tls(
    mut tcp: TcpStream,
    target: &Target,
    tls: &TlsSettings,
    client_config: Arc<rustls::ClientConfig>,
    tls_name: &str,
) -> Result<Socket, ReplicationError> {
    if !request_tls(&mut tcp)
        .await
        .map_err(|e| ReplicationError::io(format!("requesting TLS from {target}"), e))?
    {
        if tls.mode.requires_tls() {
            return Err(TlsError::NotSupportedByServer { mode: tls.mode }.into());
        }
        tracing::debug!(
            server = %target,
            "the server declined TLS; sslmode=prefer goes on unencrypted"
        );
        return Ok(Socket::Tcp(tcp));
    }
    match handshake(client_config, tls_name, tcp).await? {
        Ok(stream) => Ok(Socket::Tls(Box::new(stream))),
        Err(e) => Err(ReplicationError::io(
            format!("TLS handshake with {target}"),
            e,
        )),
    }
}

/// Sends the SSLRequest and reads the one-byte answer: `true` for `S` (go ahead with TLS), `false`
/// for `N`. Exactly one byte is read: anything the server sent after it belongs to the TLS
/// handshake, never to the plaintext protocol (CVE-2021-23222 was a client that buffered such
/// bytes and read them as if they had been encrypted).
async fn request_tls<S>(stream: &mut S) -> io::Result<bool>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    stream.write_all(&buf).await?;
    stream.flush().await?;
    match stream.read_u8().await? {
        b'S' => Ok(true),
        b'N' => Ok(false),
        // An ErrorResponse: servers before protocol 3 (7.4), or a non-PostgreSQL service.
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the server answered the SSLRequest with {} instead of S or N; is this a \
                 PostgreSQL server (7.4 or later)?",
                tag_name(other)
            ),
        )),
    }
}

/// The TLS handshake over an open stream whose server agreed to TLS (it answered `S` to the
/// SSLRequest). `host` is the name the certificate is checked against (verify-full) and sent as
/// SNI when it is a DNS name.
///
/// # Errors
/// [`TlsError::Handshake`] if TLS refused (as `Ok(Err)`), an I/O error if the network failed.
async fn handshake<S>(
    config: Arc<ClientConfig>,
    host: &str,
    stream: S,
) -> Result<io::Result<tokio_rustls::client::TlsStream<S>>, TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(host.to_owned()).map_err(|_| TlsError::ServerName {
        host: host.to_owned(),
    })?;
    match tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
    {
        Ok(stream) => Ok(Ok(stream)),
        Err(e) => match rustls_cause(&e) {
            Some(cause) => Err(TlsError::Handshake(describe_rustls(cause))),
            None => Ok(Err(e)),
        },
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::duplex;

    use super::*;
    use crate::retry::Classify as _;

    #[test]
    fn targets_come_from_the_first_host() {
        let config: Config = "host=/run/postgresql,db2 port=6543 user=u"
            .parse()
            .expect("config");
        let target = Target::from_config(&config).expect("target");
        assert_eq!(target.to_string(), "/run/postgresql/.s.PGSQL.6543");

        let config: Config = "postgres://u@db1:7000,db2/x".parse().expect("config");
        assert_eq!(
            Target::from_config(&config).expect("target").to_string(),
            "db1:7000"
        );

        let config: Config = "host=db1 hostaddr=::1 user=u".parse().expect("config");
        assert_eq!(
            Target::from_config(&config).expect("target").to_string(),
            "[::1]:5432"
        );

        let mut config = Config::new();
        config.user("u");
        assert!(matches!(
            Target::from_config(&config),
            Err(ReplicationError::Config(_))
        ));
    }

    #[tokio::test]
    async fn the_ssl_request_reads_exactly_one_answer_byte() {
        for (answer, expected) in [(b'S', Some(true)), (b'N', Some(false)), (b'E', None)] {
            let (mut client, mut server) = duplex(64);
            let script = tokio::spawn(async move {
                let mut request = [0u8; 8];
                server.read_exact(&mut request).await.expect("request");
                // Length 8, then the magic code 1234.5679.
                assert_eq!(request, [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
                // A byte after the answer must stay unread: it belongs to the TLS handshake.
                server.write_all(&[answer, 0x16]).await.expect("answer");
                server
            });
            let result = request_tls(&mut client).await;
            match expected {
                Some(expected) => assert_eq!(result.expect("answered"), expected),
                None => {
                    let err = result.expect_err("not S or N").to_string();
                    assert!(err.contains("'E'") && err.contains("PostgreSQL"), "{err}");
                }
            }
            let _server = script.await.expect("server script");
            assert_eq!(client.read_u8().await.expect("left unread"), 0x16);
        }
    }

    #[tokio::test]
    async fn tls_settings_come_from_the_config_or_are_refused() {
        // What tokio-postgres's sslmode can say maps one to one; nothing is weakened.
        for (text, mode) in [
            ("sslmode=disable", crate::pg::tls::SslMode::Disable),
            ("sslmode=prefer", crate::pg::tls::SslMode::Prefer),
            ("sslmode=require", crate::pg::tls::SslMode::Require),
        ] {
            let config: Config = format!("host=h user=u {text}").parse().expect("config");
            let tls = TlsSettings::from_tokio_postgres(config.get_ssl_mode()).expect("known");
            assert_eq!(tls.mode, mode);
            assert!(!tls.verifies_chain());
        }

        let config: Config = "host=127.0.0.1 port=1 user=u sslmode=require sslnegotiation=direct"
            .parse()
            .expect("config");
        let err = ReplicationConnection::connect(&config)
            .await
            .expect_err("direct");
        assert!(matches!(err, ReplicationError::Config(_)), "{err:?}");

        // An unreadable root certificate is reported before connecting (port 1 is closed).
        let config: Config = "host=127.0.0.1 port=1 user=u".parse().expect("config");
        let tls = TlsSettings {
            mode: crate::pg::tls::SslMode::VerifyCa,
            root_cert: Some("/nonexistent/updog-ca.pem".into()),
        };
        let err = ReplicationConnection::connect_tls(&config, &tls)
            .await
            .expect_err("no root certificate");
        assert!(matches!(err, ReplicationError::Tls(_)), "{err:?}");
        assert!(!err.class().is_transient());
        assert!(err.to_string().contains("updog-ca.pem"), "{err}");

        let config: Config = "user=u channel_binding=require".parse().expect("config");
        let (client, _server) = duplex(64);
        let err = ReplicationConnection::connect_stream(client, &config)
            .await
            .expect_err("no channel binding");
        assert!(matches!(err, ReplicationError::Config(_)), "{err:?}");
    }

    #[test]
    fn the_certificate_name_is_the_host_not_the_hostaddr() {
        let config: Config = "host=db.example hostaddr=127.0.0.1 user=u"
            .parse()
            .expect("config");
        match Target::from_config(&config).expect("target") {
            Target::Tcp { host, tls_name, .. } => {
                assert_eq!(host, "127.0.0.1");
                assert_eq!(tls_name, "db.example");
            }
            #[cfg(unix)]
            Target::Unix { .. } => panic!("TCP expected"),
        }
    }
}
