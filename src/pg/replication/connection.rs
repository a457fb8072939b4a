//! A walsender connection (`replication=database`) spoken directly with `postgres-protocol`.
//!
//! Upstream tokio-postgres refuses `replication=database` and cannot enter CopyBoth mode, so this
//! module does the frontend/backend protocol itself: startup, authentication (cleartext, MD5,
//! SCRAM-SHA-256) and simple queries for the replication commands. It owns the byte stream and the
//! message framing, which the CopyBoth stream of `START_REPLICATION` (`super::stream`) reuses; it
//! never interprets WAL payloads (that is the pgoutput decoder's job) and never chooses slots,
//! positions or tables (that is the caller's).
//!
//! The connection is generic over its byte stream, so TLS does not touch the protocol code:
//! [`ReplicationConnection::connect_tls`] opens a [`Socket`] (TCP, TCP with TLS after the
//! SSLRequest, or Unix, which never uses TLS) as the `sslmode` policy of [`crate::pg::tls`] says, and
//! [`ReplicationConnection::connect_stream`] runs the same startup over any stream.

use std::collections::HashMap;
use std::fmt;
use std::io;
#[cfg(unix)]
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::backend::{
    AuthenticationSaslBody, DataRowBody, ErrorFields, Message, RowDescriptionBody,
};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
#[cfg(unix)]
use tokio::net::UnixStream;
use tokio_postgres::config::{ChannelBinding, Config, Host, SslNegotiation};
use tokio_postgres::fallible_iterator::FallibleIterator;

use crate::pg::Lsn;
use crate::pg::quote_ident;
use crate::pg::tls::{TlsError, TlsSettings};

/// `application_name` sent when the config does not set one, so that the walsender is
/// recognisable in `pg_stat_replication` and `pg_stat_activity`.
pub const DEFAULT_APPLICATION_NAME: &str = "updog-backup";

const DEFAULT_PORT: u16 = 5432;

/// Tag of CopyBothResponse, which `postgres_protocol`'s `Message::parse` does not know.
const COPY_BOTH_RESPONSE_TAG: u8 = b'W';

/// Upper bound on a backend message's declared length.
///
/// PostgreSQL builds every message in a `StringInfo`, which cannot exceed 1 GiB (`MaxAllocSize`);
/// the margin covers message headers. The bound exists to fail fast on garbage — a non-PostgreSQL
/// server on the port answering `HTTP/1.1 …` reads as tag `H` with a 1.4 GB length — instead of
/// reserving that much memory and waiting forever.
const MAX_MESSAGE_LEN: u32 = (1 << 30) + (1 << 20);

/// How much room to make in the read buffer before each read. Small enough to be irrelevant next
/// to one connection's other memory, large enough that streaming does not read in dribbles.
const READ_CHUNK: usize = 64 * 1024;

/// Slot names PostgreSQL accepts: `ReplicationSlotValidateName`, NAMEDATALEN - 1.
const MAX_SLOT_NAME_LEN: usize = 63;

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

/// One row of a simple-query result, in text format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    columns: Arc<[String]>,
    values: Vec<Option<String>>,
}

impl Row {
    /// Column names, in order.
    #[must_use]
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// Values in text format, in column order; `None` is SQL NULL.
    #[must_use]
    pub fn values(&self) -> &[Option<String>] {
        &self.values
    }

    /// The value of the first column named `column`; `None` if it is NULL or there is no such
    /// column.
    #[must_use]
    pub fn get(&self, column: &str) -> Option<&str> {
        let index = self.columns.iter().position(|c| c == column)?;
        self.values.get(index)?.as_deref()
    }
}

/// `IDENTIFY_SYSTEM`'s answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's system identifier (`pg_control_system().system_identifier`), as text because
    /// it is an unsigned 64-bit number that only ever gets compared.
    pub system_id: String,
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlogpos: Lsn,
    /// The database this walsender is connected to.
    pub dbname: Option<String>,
}

/// What `CREATE_REPLICATION_SLOT` does with the slot's initial snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotSnapshot {
    /// Export it under a name that other sessions can adopt with `SET TRANSACTION SNAPSHOT`.
    Export,
    /// Do not export it.
    NoExport,
    /// Make it the snapshot of the transaction open on this (walsender) connection.
    Use,
}

impl SlotSnapshot {
    fn option_value(self) -> &'static str {
        match self {
            SlotSnapshot::Export => "export",
            SlotSnapshot::NoExport => "nothing",
            SlotSnapshot::Use => "use",
        }
    }
}

/// `CREATE_REPLICATION_SLOT`'s answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    pub slot_name: String,
    /// The LSN from which the slot streams: every transaction committing after it comes through
    /// the slot, every transaction committed before it is in the snapshot.
    pub consistent_point: Lsn,
    /// The exported snapshot's name, with [`SlotSnapshot::Export`] only.
    pub snapshot_name: Option<String>,
}

/// A backend message as this connection sees it: `postgres_protocol`'s messages plus the ones it
/// does not know.
pub(super) enum BackendMessage {
    /// `'W'`: the server entered CopyBoth mode (the answer to `START_REPLICATION`).
    CopyBothResponse(CopyBothResponse),
    Message(Message),
}

/// Body of a CopyBothResponse. For replication the server always sends format 0 and no columns;
/// the fields are kept to report anything else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CopyBothResponse {
    pub(super) format: u8,
    pub(super) column_formats: Vec<u16>,
}

impl CopyBothResponse {
    fn parse(mut body: Bytes) -> Result<CopyBothResponse, ReplicationError> {
        let malformed = || ReplicationError::Protocol("malformed CopyBothResponse".into());
        if body.remaining() < 3 {
            return Err(malformed());
        }
        let format = body.get_u8();
        let count = usize::from(body.get_u16());
        if body.remaining() != count * 2 {
            return Err(malformed());
        }
        let column_formats = (0..count).map(|_| body.get_u16()).collect();
        Ok(CopyBothResponse {
            format,
            column_formats,
        })
    }
}

/// Incremental framing of backend messages.
///
/// Bytes are appended as they arrive, in whatever pieces the socket delivers; complete messages
/// come out one at a time and partial ones wait for more bytes. Parsing is synchronous, so reading
/// from a socket into this buffer and parsing from it is cancel-safe — which the CopyBoth loop
/// needs, as it waits for the next message and a status-update timer at the same time.
#[derive(Default)]
pub(super) struct MessageReader {
    buf: BytesMut,
}

impl MessageReader {
    /// The buffer to read into, with room for at least one chunk.
    fn buffer_for_read(&mut self) -> &mut BytesMut {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        &mut self.buf
    }

    #[cfg(test)]
    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, or `None` if more bytes are needed.
    fn next_message(&mut self) -> Result<Option<BackendMessage>, ReplicationError> {
        let Some(header) = self.buf.get(..5) else {
            return Ok(None);
        };
        let tag = header[0];
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        if !(4..=MAX_MESSAGE_LEN).contains(&len) {
            return Err(ReplicationError::Protocol(format!(
                "backend message {} declares an impossible length {len}; is this a PostgreSQL \
                 server?",
                tag_name(tag)
            )));
        }
        // `len` counts itself but not the tag byte.
        let total = len as usize + 1;
        if self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        if tag == COPY_BOTH_RESPONSE_TAG {
            let mut frame = self.buf.split_to(total).freeze();
            frame.advance(5);
            return CopyBothResponse::parse(frame)
                .map(|r| Some(BackendMessage::CopyBothResponse(r)));
        }
        match Message::parse(&mut self.buf) {
            Ok(Some(message)) => Ok(Some(BackendMessage::Message(message))),
            Ok(None) => Err(ReplicationError::Protocol(format!(
                "backend message {} was complete but not parsed",
                tag_name(tag)
            ))),
            Err(e) => Err(ReplicationError::Protocol(format!(
                "malformed or unknown backend message {}: {e}",
                tag_name(tag)
            ))),
        }
    }
}

pub(super) fn tag_name(tag: u8) -> String {
    if tag.is_ascii_graphic() {
        format!("'{}'", char::from(tag))
    } else {
        format!("0x{tag:02x}")
    }
}

/// The fields of an ErrorResponse or NoticeResponse that this client uses.
#[derive(Debug, Default)]
pub(super) struct ServerFields {
    severity: String,
    code: String,
    message: String,
    detail: Option<String>,
    hint: Option<String>,
}

impl ServerFields {
    pub(super) fn parse(mut fields: ErrorFields<'_>) -> Result<ServerFields, ReplicationError> {
        let mut out = ServerFields::default();
        let mut localized_severity = None;
        while let Some(field) = fields.next().map_err(|e| {
            ReplicationError::Protocol(format!("malformed error or notice fields: {e}"))
        })? {
            // Lossy: before client_encoding takes effect the server may send its own encoding.
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                b'V' => out.severity = value,
                b'S' => localized_severity = Some(value),
                b'C' => out.code = value,
                b'M' => out.message = value,
                b'D' => out.detail = Some(value),
                b'H' => out.hint = Some(value),
                _ => {}
            }
        }
        // 'V' (never localized) exists since 9.6; fall back to 'S' for older servers.
        if out.severity.is_empty() {
            out.severity = localized_severity.unwrap_or_default();
        }
        Ok(out)
    }

    /// The server ends the session after these.
    pub(super) fn is_fatal(&self) -> bool {
        matches!(self.severity.as_str(), "FATAL" | "PANIC")
    }

    pub(super) fn into_error(self) -> ReplicationError {
        ReplicationError::Server {
            code: self.code,
            message: self.message,
            detail: self.detail,
            hint: self.hint,
        }
    }
}

/// The cancel key the server hands out at startup.
#[derive(Clone, Copy)]
struct BackendKey {
    process_id: i32,
    // Kept for a future CancelRequest; never printed.
    #[allow(dead_code)]
    secret_key: i32,
}

/// A walsender session in logical (`replication=database`) mode.
///
/// One command at a time: every method takes `&mut self`. If a call fails halfway through an
/// exchange or its future is dropped before it finishes, the connection no longer knows where the
/// server is in the protocol and every later call returns [`ReplicationError::Closed`]; open a new
/// connection.
pub struct ReplicationConnection<S = Socket> {
    // The CopyBoth stream (`super::stream`) takes the connection over and speaks on these.
    pub(super) stream: S,
    pub(super) reader: MessageReader,
    pub(super) write_buf: BytesMut,
    parameters: HashMap<String, String>,
    backend_key: Option<BackendKey>,
    /// False from the start of each exchange until it completes cleanly.
    pub(super) in_sync: bool,
}

impl<S> fmt::Debug for ReplicationConnection<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationConnection")
            .field("backend_pid", &self.backend_key.map(|k| k.process_id))
            .field("server_version", &self.parameters.get("server_version"))
            .field("in_sync", &self.in_sync)
            .finish_non_exhaustive()
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
    match crate::pg::tls::handshake(client_config, tls_name, tcp).await? {
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

impl<S> ReplicationConnection<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// Runs startup and authentication over an already open stream — the way in for a TLS stream
    /// negotiated by the caller. Reads the same config fields as [`ReplicationConnection::connect`]
    /// except the address ones.
    ///
    /// # Errors
    /// As [`ReplicationConnection::connect`].
    pub async fn connect_stream(stream: S, config: &Config) -> Result<Self, ReplicationError> {
        let user = config.get_user().ok_or_else(|| {
            ReplicationError::Config("no user given; set one in the source URL".into())
        })?;
        if config.get_channel_binding() == ChannelBinding::Require {
            return Err(ReplicationError::Config(
                "channel_binding=require is not supported by the replication connection (it \
                 authenticates with SCRAM-SHA-256, over TLS too); use channel_binding=prefer"
                    .into(),
            ));
        }
        let mut connection = ReplicationConnection {
            stream,
            reader: MessageReader::default(),
            write_buf: BytesMut::new(),
            parameters: HashMap::new(),
            backend_key: None,
            in_sync: false,
        };

        let application_name = config
            .get_application_name()
            .unwrap_or(DEFAULT_APPLICATION_NAME);
        let mut parameters = vec![("user", user)];
        if let Some(dbname) = config.get_dbname() {
            parameters.push(("database", dbname));
        }
        parameters.extend([
            ("replication", "database"),
            ("application_name", application_name),
            ("client_encoding", "UTF8"),
        ]);
        if let Some(options) = config.get_options() {
            parameters.push(("options", options));
        }
        frontend::startup_message(parameters, &mut connection.write_buf).map_err(|e| {
            ReplicationError::Config(format!("cannot encode startup parameters: {e}"))
        })?;
        connection.send().await?;

        connection.authenticate(user, config.get_password()).await?;
        connection.wait_until_ready().await?;
        connection.in_sync = true;
        Ok(connection)
    }

    /// The server's process id for this session (`pg_stat_replication.pid`).
    #[must_use]
    pub fn backend_pid(&self) -> Option<i32> {
        self.backend_key.map(|k| k.process_id)
    }

    /// A parameter the server reported (ParameterStatus), e.g. `server_version`.
    #[must_use]
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.parameters.get(name).map(String::as_str)
    }

    /// Runs `sql` with the simple-query protocol and returns every row of every result, values in
    /// text format.
    ///
    /// On a walsender this accepts the replication commands and, with `replication=database`,
    /// plain SQL. Rows are collected in memory, which suits the one-row answers of replication
    /// commands and small catalog queries, nothing bigger. COPY is not supported here.
    ///
    /// # Errors
    /// [`ReplicationError::Server`] if the server rejects the command (the connection stays usable
    /// unless the error was FATAL), [`ReplicationError::Closed`] if an earlier call left the
    /// connection unusable, I/O and protocol errors otherwise.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Row>, ReplicationError> {
        self.begin_exchange()?;
        frontend::query(sql, &mut self.write_buf).map_err(|e| {
            self.write_buf.clear();
            self.in_sync = true;
            ReplicationError::Protocol(format!("cannot encode query: {e}"))
        })?;
        self.send().await?;

        let mut rows = Vec::new();
        let mut columns: Option<Arc<[String]>> = None;
        let mut error: Option<ReplicationError> = None;
        loop {
            let message = match self.read_message().await {
                Ok(message) => message,
                // A server that reported an error and then hung up: its error says more.
                Err(e) => return Err(error.unwrap_or(e)),
            };
            let message = match message {
                BackendMessage::Message(message) => message,
                BackendMessage::CopyBothResponse(response) => {
                    // The server now expects CopyData from us; there is no way back to idle.
                    return Err(ReplicationError::Protocol(format!(
                        "simple_query got CopyBothResponse (format {}, {} columns); \
                         START_REPLICATION needs the streaming API",
                        response.format,
                        response.column_formats.len()
                    )));
                }
            };
            match message {
                Message::RowDescription(body) => columns = Some(parse_columns(&body)?),
                Message::DataRow(body) => {
                    let columns = columns.clone().ok_or_else(|| {
                        ReplicationError::Protocol("DataRow before RowDescription".into())
                    })?;
                    rows.push(parse_row(columns, &body)?);
                }
                Message::CommandComplete(_) | Message::EmptyQueryResponse => columns = None,
                Message::ErrorResponse(body) => {
                    let fields = ServerFields::parse(body.fields())?;
                    if fields.is_fatal() {
                        return Err(fields.into_error());
                    }
                    // Keep the first error; the server skips the rest of the query string.
                    error.get_or_insert_with(|| fields.into_error());
                }
                Message::ReadyForQuery(_) => {
                    self.in_sync = true;
                    return match error {
                        Some(error) => Err(error),
                        None => Ok(rows),
                    };
                }
                Message::CopyInResponse(_) | Message::CopyOutResponse(_) => {
                    return Err(ReplicationError::Protocol(
                        "simple_query does not support COPY".into(),
                    ));
                }
                other => {
                    return Err(ReplicationError::Protocol(format!(
                        "unexpected {} during a simple query",
                        message_name(&other)
                    )));
                }
            }
        }
    }

    /// `IDENTIFY_SYSTEM`: which cluster, timeline and WAL position this is.
    ///
    /// # Errors
    /// As [`ReplicationConnection::simple_query`], and [`ReplicationError::Protocol`] if the
    /// answer does not have the documented shape.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        const COMMAND: &str = "IDENTIFY_SYSTEM";
        let rows = self.simple_query(COMMAND).await?;
        let row = single_row(COMMAND, &rows)?;
        let timeline = required(row, COMMAND, "timeline")?;
        let xlogpos = required(row, COMMAND, "xlogpos")?;
        Ok(SystemIdentity {
            system_id: required(row, COMMAND, "systemid")?.to_owned(),
            timeline: timeline.parse().map_err(|_| {
                ReplicationError::Protocol(format!("{COMMAND}: invalid timeline {timeline:?}"))
            })?,
            xlogpos: xlogpos
                .parse()
                .map_err(|e| ReplicationError::Protocol(format!("{COMMAND}: {e}")))?,
            dbname: row.get("dbname").map(str::to_owned),
        })
    }

    /// Creates a logical slot for `pgoutput`:
    /// `CREATE_REPLICATION_SLOT "name" [TEMPORARY] LOGICAL pgoutput (SNAPSHOT '…')`
    /// (PostgreSQL 15 syntax).
    ///
    /// A temporary slot disappears when this connection ends. With [`SlotSnapshot::Export`] the
    /// exported snapshot stays valid only until the next command on this connection (or its end):
    /// import it elsewhere (`SET TRANSACTION SNAPSHOT`) before calling anything else here. The
    /// command may wait for transactions running at the time to finish.
    ///
    /// # Errors
    /// [`ReplicationError::InvalidSlotName`] before anything is sent; `42710` if the slot exists;
    /// otherwise as [`ReplicationConnection::simple_query`].
    pub async fn create_logical_slot(
        &mut self,
        name: &str,
        temporary: bool,
        snapshot: SlotSnapshot,
    ) -> Result<CreatedSlot, ReplicationError> {
        const COMMAND: &str = "CREATE_REPLICATION_SLOT";
        validate_slot_name(name)?;
        let sql = format!(
            "{COMMAND} {} {}LOGICAL pgoutput (SNAPSHOT '{}')",
            quote_ident(name),
            if temporary { "TEMPORARY " } else { "" },
            snapshot.option_value()
        );
        let rows = self.simple_query(&sql).await?;
        let row = single_row(COMMAND, &rows)?;
        let consistent_point = required(row, COMMAND, "consistent_point")?;
        let created = CreatedSlot {
            slot_name: required(row, COMMAND, "slot_name")?.to_owned(),
            consistent_point: consistent_point
                .parse()
                .map_err(|e| ReplicationError::Protocol(format!("{COMMAND}: {e}")))?,
            snapshot_name: row.get("snapshot_name").map(str::to_owned),
        };
        if snapshot == SlotSnapshot::Export && created.snapshot_name.is_none() {
            return Err(ReplicationError::Protocol(format!(
                "{COMMAND}: the server exported no snapshot"
            )));
        }
        Ok(created)
    }

    /// `DROP_REPLICATION_SLOT "name" [WAIT]`. Without `wait`, a slot in use by another
    /// connection is an error (`55006`); with it, the command waits until the slot is free.
    ///
    /// # Errors
    /// [`ReplicationError::InvalidSlotName`] before anything is sent; `42704` if there is no such
    /// slot; otherwise as [`ReplicationConnection::simple_query`].
    pub async fn drop_slot(&mut self, name: &str, wait: bool) -> Result<(), ReplicationError> {
        validate_slot_name(name)?;
        let sql = format!(
            "DROP_REPLICATION_SLOT {}{}",
            quote_ident(name),
            if wait { " WAIT" } else { "" }
        );
        self.simple_query(&sql).await.map(drop)
    }

    /// Ends the session politely: Terminate, then shut the stream down. The server drops the
    /// session's temporary slots and exported snapshots when it sees either.
    ///
    /// # Errors
    /// [`ReplicationError::Io`] if the stream was already broken; the session ends either way,
    /// so callers usually only log it.
    pub async fn close(mut self) -> Result<(), ReplicationError> {
        self.write_buf.clear();
        frontend::terminate(&mut self.write_buf);
        let sent = self.send().await;
        let shut = self
            .stream
            .shutdown()
            .await
            .map_err(|e| ReplicationError::io("shutting down the replication stream", e));
        sent.and(shut)
    }

    /// Marks the start of a request/response exchange; refuses if the previous one did not end.
    pub(super) fn begin_exchange(&mut self) -> Result<(), ReplicationError> {
        if !self.in_sync {
            return Err(ReplicationError::Closed);
        }
        self.in_sync = false;
        self.write_buf.clear();
        Ok(())
    }

    /// Writes out `write_buf`.
    pub(super) async fn send(&mut self) -> Result<(), ReplicationError> {
        self.stream
            .write_all(&self.write_buf)
            .await
            .map_err(|e| ReplicationError::io("writing to the server", e))?;
        self.stream
            .flush()
            .await
            .map_err(|e| ReplicationError::io("writing to the server", e))?;
        self.write_buf.clear();
        Ok(())
    }

    /// The next message that needs an answer. Asynchronous messages the server may send at any
    /// time are dealt with here: notices are logged, parameter changes remembered.
    pub(super) async fn read_message(&mut self) -> Result<BackendMessage, ReplicationError> {
        loop {
            match self.read_frame().await? {
                BackendMessage::Message(Message::NoticeResponse(body)) => {
                    log_notice(&ServerFields::parse(body.fields())?);
                }
                BackendMessage::Message(Message::ParameterStatus(body)) => {
                    let (name, value) =
                        body.name()
                            .and_then(|n| Ok((n, body.value()?)))
                            .map_err(|e| {
                                ReplicationError::Protocol(format!(
                                    "malformed ParameterStatus: {e}"
                                ))
                            })?;
                    self.parameters.insert(name.to_owned(), value.to_owned());
                }
                // LISTEN/NOTIFY does not exist on a walsender; ignore rather than fail.
                BackendMessage::Message(Message::NotificationResponse(_)) => {}
                other => return Ok(other),
            }
        }
    }

    /// The next message off the wire, reading as much as needed. Cancel-safe.
    async fn read_frame(&mut self) -> Result<BackendMessage, ReplicationError> {
        loop {
            if let Some(message) = self.reader.next_message()? {
                return Ok(message);
            }
            let read = self
                .stream
                .read_buf(self.reader.buffer_for_read())
                .await
                .map_err(|e| ReplicationError::io("reading from the server", e))?;
            if read == 0 {
                return Err(ReplicationError::Closed);
            }
        }
    }

    async fn authenticate(
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

    /// After AuthenticationOk: ParameterStatus, BackendKeyData, then ReadyForQuery.
    async fn wait_until_ready(&mut self) -> Result<(), ReplicationError> {
        loop {
            match self.read_message().await? {
                BackendMessage::Message(Message::BackendKeyData(body)) => {
                    self.backend_key = Some(BackendKey {
                        process_id: body.process_id(),
                        secret_key: body.secret_key(),
                    });
                }
                BackendMessage::Message(Message::ReadyForQuery(_)) => return Ok(()),
                BackendMessage::Message(Message::ErrorResponse(body)) => {
                    return Err(ServerFields::parse(body.fields())?.into_error());
                }
                BackendMessage::Message(other) => {
                    return Err(ReplicationError::Protocol(format!(
                        "unexpected {} during startup",
                        message_name(&other)
                    )));
                }
                BackendMessage::CopyBothResponse(_) => {
                    return Err(ReplicationError::Protocol(
                        "unexpected CopyBothResponse during startup".into(),
                    ));
                }
            }
        }
    }
}

fn log_notice(notice: &ServerFields) {
    let ServerFields {
        severity,
        code,
        message,
        detail,
        hint,
    } = notice;
    let detail = detail.as_deref().unwrap_or("");
    let hint = hint.as_deref().unwrap_or("");
    match severity.as_str() {
        "WARNING" => tracing::warn!(severity, code, detail, hint, "postgres: {message}"),
        "DEBUG" => tracing::debug!(severity, code, detail, hint, "postgres: {message}"),
        _ => tracing::info!(severity, code, detail, hint, "postgres: {message}"),
    }
}

fn parse_columns(body: &RowDescriptionBody) -> Result<Arc<[String]>, ReplicationError> {
    let mut columns = Vec::new();
    let mut fields = body.fields();
    while let Some(field) = fields
        .next()
        .map_err(|e| ReplicationError::Protocol(format!("malformed RowDescription: {e}")))?
    {
        columns.push(field.name().to_owned());
    }
    Ok(columns.into())
}

fn parse_row(columns: Arc<[String]>, body: &DataRowBody) -> Result<Row, ReplicationError> {
    let malformed = |what: String| ReplicationError::Protocol(format!("malformed DataRow: {what}"));
    let buffer = body.buffer();
    let mut values = Vec::with_capacity(columns.len());
    let mut ranges = body.ranges();
    while let Some(range) = ranges.next().map_err(|e| malformed(e.to_string()))? {
        let value = match range {
            None => None,
            Some(range) => {
                let bytes = buffer
                    .get(range)
                    .ok_or_else(|| malformed("value out of bounds".into()))?;
                let text = std::str::from_utf8(bytes)
                    .map_err(|_| malformed("value is not UTF-8".into()))?;
                Some(text.to_owned())
            }
        };
        values.push(value);
    }
    if values.len() != columns.len() {
        return Err(malformed(format!(
            "{} values for {} columns",
            values.len(),
            columns.len()
        )));
    }
    Ok(Row { columns, values })
}

fn single_row<'r>(command: &str, rows: &'r [Row]) -> Result<&'r Row, ReplicationError> {
    match rows {
        [row] => Ok(row),
        _ => Err(ReplicationError::Protocol(format!(
            "{command} returned {} rows, expected 1",
            rows.len()
        ))),
    }
}

fn required<'r>(row: &'r Row, command: &str, column: &str) -> Result<&'r str, ReplicationError> {
    row.get(column).ok_or_else(|| {
        ReplicationError::Protocol(format!("{command} returned no value for {column}"))
    })
}

/// Refuses what PostgreSQL's `ReplicationSlotValidateName` refuses, before anything is sent.
pub(super) fn validate_slot_name(name: &str) -> Result<(), ReplicationError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_SLOT_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(ReplicationError::InvalidSlotName {
            // Bounded, so that a garbage name cannot flood a log line.
            name: name.chars().take(80).collect(),
        })
    }
}

pub(super) fn message_name(message: &Message) -> &'static str {
    match message {
        Message::AuthenticationCleartextPassword => "AuthenticationCleartextPassword",
        Message::AuthenticationGss => "AuthenticationGSS",
        Message::AuthenticationKerberosV5 => "AuthenticationKerberosV5",
        Message::AuthenticationMd5Password(_) => "AuthenticationMD5Password",
        Message::AuthenticationOk => "AuthenticationOk",
        Message::AuthenticationScmCredential => "AuthenticationSCMCredential",
        Message::AuthenticationSspi => "AuthenticationSSPI",
        Message::AuthenticationGssContinue(_) => "AuthenticationGSSContinue",
        Message::AuthenticationSasl(_) => "AuthenticationSASL",
        Message::AuthenticationSaslContinue(_) => "AuthenticationSASLContinue",
        Message::AuthenticationSaslFinal(_) => "AuthenticationSASLFinal",
        Message::BackendKeyData(_) => "BackendKeyData",
        Message::BindComplete => "BindComplete",
        Message::CloseComplete => "CloseComplete",
        Message::CommandComplete(_) => "CommandComplete",
        Message::CopyData(_) => "CopyData",
        Message::CopyDone => "CopyDone",
        Message::CopyInResponse(_) => "CopyInResponse",
        Message::CopyOutResponse(_) => "CopyOutResponse",
        Message::DataRow(_) => "DataRow",
        Message::EmptyQueryResponse => "EmptyQueryResponse",
        Message::ErrorResponse(_) => "ErrorResponse",
        Message::NoData => "NoData",
        Message::NoticeResponse(_) => "NoticeResponse",
        Message::NotificationResponse(_) => "NotificationResponse",
        Message::ParameterDescription(_) => "ParameterDescription",
        Message::ParameterStatus(_) => "ParameterStatus",
        Message::ParseComplete => "ParseComplete",
        Message::PortalSuspended => "PortalSuspended",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::RowDescription(_) => "RowDescription",
        _ => "an unknown message",
    }
}

#[cfg(test)]
// The stream's tests (`super::stream`) drive the same scripted server.
pub(super) mod tests {
    use std::time::Duration;

    use tokio::io::{DuplexStream, duplex};
    use tokio::task::JoinHandle;

    use super::*;
    use crate::retry::Classify as _;

    // ---- backend messages, built by hand as a server would send them ----

    pub(in crate::pg::replication) fn backend(tag: u8, body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(body.len() + 4).expect("test message fits");
        let mut out = vec![tag];
        out.extend(len.to_be_bytes());
        out.extend(body);
        out
    }

    fn authentication(code: i32, extra: &[u8]) -> Vec<u8> {
        let mut body = code.to_be_bytes().to_vec();
        body.extend(extra);
        backend(b'R', &body)
    }

    pub(in crate::pg::replication) fn cstrs(parts: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for part in parts {
            out.extend(part.as_bytes());
            out.push(0);
        }
        out
    }

    fn parameter_status(name: &str, value: &str) -> Vec<u8> {
        backend(b'S', &cstrs(&[name, value]))
    }

    fn backend_key_data(pid: i32, secret: i32) -> Vec<u8> {
        let mut body = pid.to_be_bytes().to_vec();
        body.extend(secret.to_be_bytes());
        backend(b'K', &body)
    }

    pub(in crate::pg::replication) fn ready() -> Vec<u8> {
        backend(b'Z', b"I")
    }

    pub(in crate::pg::replication) fn server_fields(
        tag: u8,
        severity: &str,
        code: &str,
        message: &str,
        hint: Option<&str>,
    ) -> Vec<u8> {
        let mut body = Vec::new();
        for (field, value) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', code),
            (b'M', message),
        ]
        .into_iter()
        .chain(hint.map(|h| (b'H', h)))
        {
            body.push(field);
            body.extend(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        backend(tag, &body)
    }

    pub(in crate::pg::replication) fn error_response(
        severity: &str,
        code: &str,
        message: &str,
        hint: Option<&str>,
    ) -> Vec<u8> {
        server_fields(b'E', severity, code, message, hint)
    }

    fn row_description(columns: &[&str]) -> Vec<u8> {
        let mut body = u16::try_from(columns.len())
            .expect("few")
            .to_be_bytes()
            .to_vec();
        for column in columns {
            body.extend(cstrs(&[column]));
            body.extend(0u32.to_be_bytes()); // table oid
            body.extend(0i16.to_be_bytes()); // column number
            body.extend(25u32.to_be_bytes()); // text
            body.extend((-1i16).to_be_bytes());
            body.extend((-1i32).to_be_bytes());
            body.extend(0i16.to_be_bytes()); // text format
        }
        backend(b'T', &body)
    }

    fn data_row(values: &[Option<&str>]) -> Vec<u8> {
        let mut body = u16::try_from(values.len())
            .expect("few")
            .to_be_bytes()
            .to_vec();
        for value in values {
            match value {
                None => body.extend((-1i32).to_be_bytes()),
                Some(v) => {
                    body.extend(i32::try_from(v.len()).expect("short").to_be_bytes());
                    body.extend(v.as_bytes());
                }
            }
        }
        backend(b'D', &body)
    }

    pub(in crate::pg::replication) fn command_complete(tag: &str) -> Vec<u8> {
        backend(b'C', &cstrs(&[tag]))
    }

    pub(in crate::pg::replication) fn copy_both_response(columns: u16) -> Vec<u8> {
        let mut body = vec![0u8];
        body.extend(columns.to_be_bytes());
        for _ in 0..columns {
            body.extend(0u16.to_be_bytes());
        }
        backend(b'W', &body)
    }

    // ---- a scripted server on the other end of an in-memory pipe ----

    pub(in crate::pg::replication) struct MockServer {
        pub(in crate::pg::replication) stream: DuplexStream,
    }

    impl MockServer {
        async fn read_startup(&mut self) -> HashMap<String, String> {
            let len = self.stream.read_u32().await.expect("startup length");
            let mut body = vec![0; len as usize - 4];
            self.stream
                .read_exact(&mut body)
                .await
                .expect("startup body");
            assert_eq!(&body[..4], &0x0003_0000u32.to_be_bytes(), "protocol 3.0");
            let strings: Vec<String> = body[4..]
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8(s.to_vec()).expect("utf-8"))
                .collect();
            strings
                .chunks(2)
                .map(|kv| (kv[0].clone(), kv[1].clone()))
                .collect()
        }

        pub(in crate::pg::replication) async fn read_message(&mut self) -> (u8, Vec<u8>) {
            let tag = self.stream.read_u8().await.expect("tag");
            let len = self.stream.read_u32().await.expect("length");
            let mut body = vec![0; len as usize - 4];
            self.stream.read_exact(&mut body).await.expect("body");
            (tag, body)
        }

        pub(in crate::pg::replication) async fn send(&mut self, messages: &[Vec<u8>]) {
            for message in messages {
                self.stream.write_all(message).await.expect("server write");
            }
            self.stream.flush().await.expect("server flush");
        }

        pub(in crate::pg::replication) async fn accept_trust(&mut self) {
            self.read_startup().await;
            self.send(&[authentication(0, b""), backend_key_data(42, 7), ready()])
                .await;
        }
    }

    pub(in crate::pg::replication) fn config() -> Config {
        let mut config = Config::new();
        config.user("alice").dbname("updog");
        config
    }

    /// Runs `script` as the server and connects a client to it. `pipe` is the in-memory buffer
    /// size: 1 forces every message, both ways, to cross in one-byte reads.
    pub(in crate::pg::replication) async fn with_server<F, Fut>(
        pipe: usize,
        config: &Config,
        script: F,
    ) -> (
        Result<ReplicationConnection<DuplexStream>, ReplicationError>,
        JoinHandle<MockServer>,
    )
    where
        F: FnOnce(MockServer) -> Fut + Send + 'static,
        Fut: Future<Output = MockServer> + Send + 'static,
    {
        let (client, server) = duplex(pipe);
        let server = tokio::spawn(script(MockServer { stream: server }));
        let connection = ReplicationConnection::connect_stream(client, config).await;
        (connection, server)
    }

    #[tokio::test]
    async fn startup_and_query_survive_one_byte_reads() {
        let (connection, server) = with_server(1, &config(), |mut server| async move {
            let params = server.read_startup().await;
            assert_eq!(params.get("user").map(String::as_str), Some("alice"));
            assert_eq!(params.get("database").map(String::as_str), Some("updog"));
            assert_eq!(
                params.get("replication").map(String::as_str),
                Some("database")
            );
            assert_eq!(
                params.get("application_name").map(String::as_str),
                Some("updog-backup")
            );
            assert_eq!(
                params.get("client_encoding").map(String::as_str),
                Some("UTF8")
            );
            server
                .send(&[
                    authentication(0, b""),
                    parameter_status("server_version", "15.18"),
                    backend_key_data(4242, 99),
                    server_fields(b'N', "WARNING", "01000", "just saying", None),
                    ready(),
                ])
                .await;
            let (tag, body) = server.read_message().await;
            assert_eq!(
                (tag, body.as_slice()),
                (b'Q', b"IDENTIFY_SYSTEM\0".as_slice())
            );
            server
                .send(&[
                    row_description(&["systemid", "timeline", "xlogpos", "dbname"]),
                    data_row(&[
                        Some("7312345678901234567"),
                        Some("1"),
                        Some("16/B374D848"),
                        Some("updog"),
                    ]),
                    command_complete("IDENTIFY_SYSTEM"),
                    ready(),
                ])
                .await;
            server
        })
        .await;
        let mut connection = connection.expect("connects");
        assert_eq!(connection.backend_pid(), Some(4242));
        assert_eq!(connection.parameter("server_version"), Some("15.18"));
        let identity = connection.identify_system().await.expect("identify");
        assert_eq!(
            identity,
            SystemIdentity {
                system_id: "7312345678901234567".into(),
                timeline: 1,
                xlogpos: Lsn(0x16_B374_D848),
                dbname: Some("updog".into()),
            }
        );
        server.await.expect("server script");
    }

    #[tokio::test]
    async fn application_name_and_options_come_from_the_config() {
        let mut config = config();
        config
            .application_name("custom")
            .options("-c wal_sender_timeout=0");
        let (connection, server) = with_server(4096, &config, |mut server| async move {
            let params = server.read_startup().await;
            assert_eq!(
                params.get("application_name").map(String::as_str),
                Some("custom")
            );
            assert_eq!(
                params.get("options").map(String::as_str),
                Some("-c wal_sender_timeout=0")
            );
            server.send(&[authentication(0, b""), ready()]).await;
            server
        })
        .await;
        connection.expect("connects");
        server.await.expect("server script");
    }

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

    #[tokio::test]
    async fn a_query_error_drains_to_ready_and_keeps_the_connection() {
        let (connection, server) = with_server(4096, &config(), |mut server| async move {
            server.accept_trust().await;
            server.read_message().await;
            server
                .send(&[
                    error_response(
                        "ERROR",
                        "42601",
                        "syntax error",
                        Some("check the replication grammar"),
                    ),
                    ready(),
                ])
                .await;
            let (_, body) = server.read_message().await;
            assert_eq!(body, cstrs(&["SELECT 1"]));
            server
                .send(&[
                    row_description(&["?column?", "nothing"]),
                    data_row(&[Some("1"), None]),
                    command_complete("SELECT 1"),
                    ready(),
                ])
                .await;
            server
        })
        .await;
        let mut connection = connection.expect("connects");
        let err = connection.simple_query("BOGUS").await.expect_err("syntax");
        assert_eq!(err.code(), Some("42601"));
        assert!(!err.class().is_transient());
        assert!(
            err.to_string()
                .contains("hint: check the replication grammar"),
            "{err}"
        );
        let rows = connection
            .simple_query("SELECT 1")
            .await
            .expect("usable after error");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].columns(), ["?column?", "nothing"]);
        assert_eq!(rows[0].values(), [Some("1".to_owned()), None]);
        assert_eq!(rows[0].get("?column?"), Some("1"));
        assert_eq!(rows[0].get("nothing"), None);
        assert_eq!(rows[0].get("absent"), None);
        server.await.expect("server script");
    }

    #[tokio::test]
    async fn a_fatal_error_is_reported_even_though_the_server_hangs_up() {
        let (connection, server) = with_server(4096, &config(), |mut server| async move {
            server.accept_trust().await;
            server.read_message().await;
            server
                .send(&[error_response(
                    "FATAL",
                    "57P01",
                    "terminating connection due to administrator command",
                    None,
                )])
                .await;
            drop(server.stream);
            MockServer {
                stream: duplex(1).0,
            }
        })
        .await;
        let mut connection = connection.expect("connects");
        let err = connection.identify_system().await.expect_err("fatal");
        assert_eq!(err.code(), Some("57P01"));
        assert!(err.class().is_transient());
        let err = connection.identify_system().await.expect_err("unusable");
        assert!(matches!(err, ReplicationError::Closed), "{err:?}");
        server.await.expect("server script");
    }

    #[tokio::test]
    async fn a_cancelled_call_leaves_the_connection_unusable() {
        let (connection, server) = with_server(4096, &config(), |mut server| async move {
            server.accept_trust().await;
            server.read_message().await;
            // Never answers; keeps the stream open until the client gives up.
            let _ = server.stream.read_u8().await;
            server
        })
        .await;
        let mut connection = connection.expect("connects");
        let call = tokio::time::timeout(Duration::from_millis(50), connection.identify_system());
        assert!(call.await.is_err(), "the server never answers");
        let err = connection.identify_system().await.expect_err("out of sync");
        assert!(matches!(err, ReplicationError::Closed), "{err:?}");
        assert!(err.class().is_transient());
        connection.close().await.expect("terminate");
        server.await.expect("server script");
    }

    #[tokio::test]
    async fn close_sends_terminate() {
        let (connection, server) = with_server(4096, &config(), |mut server| async move {
            server.accept_trust().await;
            assert_eq!(server.read_message().await, (b'X', Vec::new()));
            server
        })
        .await;
        connection.expect("connects").close().await.expect("close");
        server.await.expect("server script");
    }

    #[tokio::test]
    async fn create_slot_sends_the_pg15_command_and_reads_the_answer() {
        let (connection, server) = with_server(4096, &config(), |mut server| async move {
            server.accept_trust().await;
            let (_, body) = server.read_message().await;
            assert_eq!(
                body,
                cstrs(&[
                    "CREATE_REPLICATION_SLOT \"updog_backup\" TEMPORARY LOGICAL pgoutput \
                     (SNAPSHOT 'export')"
                ])
            );
            server
                .send(&[
                    row_description(&[
                        "slot_name",
                        "consistent_point",
                        "snapshot_name",
                        "output_plugin",
                    ]),
                    data_row(&[
                        Some("updog_backup"),
                        Some("0/1A2B3C4"),
                        Some("00000003-00000002-1"),
                        Some("pgoutput"),
                    ]),
                    command_complete("CREATE_REPLICATION_SLOT"),
                    ready(),
                ])
                .await;
            let (_, body) = server.read_message().await;
            assert_eq!(
                body,
                cstrs(&["DROP_REPLICATION_SLOT \"updog_backup\" WAIT"])
            );
            server
                .send(&[command_complete("DROP_REPLICATION_SLOT"), ready()])
                .await;
            server
        })
        .await;
        let mut connection = connection.expect("connects");
        let slot = connection
            .create_logical_slot("updog_backup", true, SlotSnapshot::Export)
            .await
            .expect("slot");
        assert_eq!(
            slot,
            CreatedSlot {
                slot_name: "updog_backup".into(),
                consistent_point: Lsn(0x1A2_B3C4),
                snapshot_name: Some("00000003-00000002-1".into()),
            }
        );
        connection
            .drop_slot("updog_backup", true)
            .await
            .expect("drop");
        server.await.expect("server script");
    }

    #[tokio::test]
    async fn copy_both_in_a_simple_query_is_refused() {
        let (connection, _server) = with_server(4096, &config(), |mut server| async move {
            server.accept_trust().await;
            server.read_message().await;
            server.send(&[copy_both_response(0)]).await;
            server
        })
        .await;
        let mut connection = connection.expect("connects");
        let err = connection
            .simple_query("START_REPLICATION SLOT \"s\" LOGICAL 0/0")
            .await
            .expect_err("not here");
        assert!(err.to_string().contains("CopyBothResponse"), "{err}");
        let err = connection
            .simple_query("SELECT 1")
            .await
            .expect_err("copy mode");
        assert!(matches!(err, ReplicationError::Closed), "{err:?}");
    }

    #[tokio::test]
    async fn invalid_slot_names_are_refused_before_sending() {
        // No server script: any byte sent would be an error on its side, and it never answers.
        let (connection, _server) = with_server(4096, &config(), |mut server| async move {
            server.accept_trust().await;
            let _ = server.stream.read_u8().await;
            server
        })
        .await;
        let mut connection = connection.expect("connects");
        let err = connection
            .create_logical_slot("Bad-Name", false, SlotSnapshot::NoExport)
            .await
            .expect_err("invalid");
        assert!(
            matches!(err, ReplicationError::InvalidSlotName { .. }),
            "{err:?}"
        );
        let err = connection
            .drop_slot("x\"; DROP", false)
            .await
            .expect_err("invalid");
        assert!(
            matches!(err, ReplicationError::InvalidSlotName { .. }),
            "{err:?}"
        );
    }

    // ---- framing ----

    fn drain(reader: &mut MessageReader) -> Vec<&'static str> {
        let mut names = Vec::new();
        while let Some(message) = reader.next_message().expect("well-formed") {
            names.push(match message {
                BackendMessage::CopyBothResponse(_) => "CopyBothResponse",
                BackendMessage::Message(m) => message_name(&m),
            });
        }
        names
    }

    #[test]
    fn messages_split_at_every_byte_boundary_come_out_whole() {
        let mut copy_data = b"w".to_vec();
        copy_data.extend([0u8; 24]);
        copy_data.extend(b"payload");
        let stream: Vec<u8> = [
            command_complete("IDENTIFY_SYSTEM"),
            copy_both_response(0),
            backend(b'd', &copy_data),
            backend(b'c', b""),
            ready(),
        ]
        .concat();
        let expected = [
            "CommandComplete",
            "CopyBothResponse",
            "CopyData",
            "CopyDone",
            "ReadyForQuery",
        ];
        for split in 0..=stream.len() {
            let mut reader = MessageReader::default();
            reader.push(&stream[..split]);
            let mut names = drain(&mut reader);
            reader.push(&stream[split..]);
            names.extend(drain(&mut reader));
            assert_eq!(names, expected, "split at {split}");
            assert!(reader.buf.is_empty());
        }
        let mut reader = MessageReader::default();
        let mut names = Vec::new();
        for byte in &stream {
            reader.push(std::slice::from_ref(byte));
            names.extend(drain(&mut reader));
        }
        assert_eq!(names, expected, "one byte at a time");
    }

    #[test]
    fn copy_both_response_is_parsed_here() {
        let mut reader = MessageReader::default();
        reader.push(&copy_both_response(2));
        match reader.next_message().expect("parses") {
            Some(BackendMessage::CopyBothResponse(response)) => assert_eq!(
                response,
                CopyBothResponse {
                    format: 0,
                    column_formats: vec![0, 0]
                }
            ),
            _ => panic!("expected CopyBothResponse"),
        }
        // Declares 3 columns but carries 1.
        let mut body = vec![0u8];
        body.extend(3u16.to_be_bytes());
        body.extend(0u16.to_be_bytes());
        let mut reader = MessageReader::default();
        reader.push(&backend(b'W', &body));
        assert!(matches!(
            reader.next_message(),
            Err(ReplicationError::Protocol(_))
        ));
    }

    #[test]
    fn impossible_lengths_fail_fast() {
        for bytes in [
            b"HTTP/1.1 400 Bad Request\r\n".to_vec(),
            vec![b'Z', 0, 0, 0, 3],
            vec![b'd', 0xFF, 0xFF, 0xFF, 0xFF],
        ] {
            let mut reader = MessageReader::default();
            reader.push(&bytes);
            let err = reader.next_message().err().expect("refused");
            assert!(matches!(err, ReplicationError::Protocol(_)), "{err:?}");
        }
    }

    #[test]
    fn unknown_and_malformed_messages_are_protocol_errors() {
        for bytes in [
            backend(b'v', b"\0\0\0\0"),
            backend(b'Z', b""),
            backend(b'K', b"\0\0"),
        ] {
            let mut reader = MessageReader::default();
            reader.push(&bytes);
            let err = reader.next_message().err().expect("refused");
            assert!(matches!(err, ReplicationError::Protocol(_)), "{err:?}");
        }
    }

    // ---- small pieces ----

    #[test]
    fn slot_names_follow_postgres_rules() {
        for good in ["a", "updog_backup", "slot_123", "_", &"a".repeat(63)] {
            assert!(validate_slot_name(good).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            "A",
            "a-b",
            "a b",
            "a\"b",
            "é",
            "slot.1",
            &"a".repeat(64),
        ] {
            assert!(validate_slot_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(quote_ident("select"), "\"select\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

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

    #[tokio::test]
    async fn a_user_is_required() {
        let (client, _server) = duplex(64);
        let err = ReplicationConnection::connect_stream(client, &Config::new())
            .await
            .expect_err("no user");
        assert!(matches!(err, ReplicationError::Config(_)), "{err:?}");
    }
}
