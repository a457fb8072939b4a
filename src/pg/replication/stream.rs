//! The CopyBoth half of the walsender protocol: `START_REPLICATION … LOGICAL` and the stream that
//! follows it.
//!
//! Owns the `START_REPLICATION` command (slot, start position, output plugin options, each quoted
//! for the replication grammar), the framing inside CopyData of XLogData (`'w'`), primary
//! keepalives (`'k'`) and standby status updates (`'r'`), and the CopyDone handshake that ends
//! streaming cleanly.
//!
//! It must never decide what is durable. It does not answer keepalives, never sends a status
//! update on its own and does not remember which payloads it handed out: the `flushed` position
//! of a status update lets the server advance the slot and discard the WAL before it, so only the
//! caller — which knows which packs are stored — may choose it (ARCHITECTURE.md, invariant 1).
//! Payloads pass through undecoded; the pgoutput decoder reads them.
//!
//! The stream is generic over its byte stream like [`ReplicationConnection`], so a TLS stream
//! fits without changes here.

use std::fmt;
use std::io;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::error::ReplicationError;
use super::session::{ReplicationConnection, validate_slot_name};
use super::transport::Socket;
use super::wire::{BackendMessage, ServerFields, message_name, tag_name};
use crate::pg::Lsn;
use crate::pg::quote::{quote_ident, quote_literal};

/// How often a consumer should send a status update even when nothing new is durable.
///
/// The server ends a session it has not heard from for `wal_sender_timeout` (60 s by default)
/// and asks for a reply (a keepalive with `reply_requested`) after half of it; 10 s keeps well
/// clear of both, as PostgreSQL's own `wal_receiver_status_interval` does.
pub const STATUS_UPDATE_INTERVAL: Duration = Duration::from_secs(10);

/// CopyData sub-message tags of the streaming replication protocol.
const XLOG_DATA_TAG: u8 = b'w';
const KEEPALIVE_TAG: u8 = b'k';
const STATUS_UPDATE_TAG: u8 = b'r';

/// `'w'`, walStart, walEnd, sendTime; the payload follows.
const XLOG_DATA_HEADER_LEN: usize = 1 + 8 + 8 + 8;
/// `'k'`, walEnd, sendTime, replyRequested.
const KEEPALIVE_LEN: usize = 1 + 8 + 8 + 1;
/// `'r'`, written, flushed, applied, clientTime, replyRequested.
const STATUS_UPDATE_LEN: usize = 1 + 8 + 8 + 8 + 8 + 1;

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00:00 UTC), the origin of
/// every timestamp in the protocol.
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// What [`ReplicationStream::next`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// One output plugin message (XLogData). For pgoutput, one Begin, Relation, Insert, Commit,
    /// StreamStart… message per event; its first byte is the pgoutput tag.
    XLogData {
        /// The WAL position the message belongs to, as the walsender reports it. For logical
        /// decoding it is the LSN of the decoded record, and `0/0` for messages that come from
        /// no record (pgoutput's Relation and Type). Never acknowledge it: acknowledge commit
        /// end LSNs taken from the decoded Commit / StreamCommit.
        wal_start: Lsn,
        /// The server's WAL position as of sending (for logical decoding, the same as
        /// `wal_start`).
        wal_end: Lsn,
        /// When the server sent it, in µs since 2000-01-01 00:00:00 UTC.
        server_time: i64,
        /// The payload, a slice of the connection's read buffer (no copy). A payload kept alive
        /// keeps the whole buffer allocation it was read into alive (64 KiB, more for larger
        /// messages): copy what must outlive the handling of one message, or memory grows with
        /// what is held rather than with its size.
        data: Bytes,
    },
    /// A primary keepalive.
    Keepalive {
        /// How far the server has read the WAL: every transaction that committed before it has
        /// been sent (or skipped as irrelevant). Once every Commit / StreamCommit received
        /// before this keepalive is durable, it is a safe `flushed` too, and acknowledging it
        /// lets the slot advance over WAL that decoded to nothing (other databases, unpublished
        /// tables). A streamed transaction still open at that point commits later, so a restart
        /// sends it again in full.
        wal_end: Lsn,
        /// When the server sent it, in µs since 2000-01-01 00:00:00 UTC.
        server_time: i64,
        /// The server wants a status update now; without one it ends the session once
        /// `wal_sender_timeout` has passed since the last one.
        reply_requested: bool,
    },
    /// The server ended the copy (CopyDone, or CommandComplete when it shuts down). Nothing more
    /// will come; call [`ReplicationStream::finish`]. Every later `next` returns `End` again.
    End,
}

/// Where the CopyBoth exchange stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyState {
    /// Both directions open.
    Streaming,
    /// The server sent CopyDone: it sends no more data and waits for ours.
    ServerDone,
    /// The server left copy mode with CommandComplete and no CopyDone, which a walsender does
    /// only when it is about to exit (server shutdown).
    ServerEnded,
    /// The server reported a (non-fatal) error, which ends copy mode; ReadyForQuery follows.
    Failed,
    /// An I/O or protocol failure or a fatal error: nothing more can be said on this connection.
    Broken,
}

/// A logical replication stream: the connection after `START_REPLICATION`, in CopyBoth mode.
///
/// Created by [`ReplicationConnection::start_logical`]. Reading ([`ReplicationStream::next`])
/// and writing ([`ReplicationStream::send_status`]) are independent halves of the protocol; the
/// caller interleaves them, typically in a `tokio::select!` with a status timer and a shutdown
/// token. Dropping the stream closes the socket, which the server treats like a lost client: the
/// slot is released and streams again from its confirmed position on the next start.
pub struct ReplicationStream<S = Socket> {
    connection: ReplicationConnection<S>,
    state: CopyState,
    last_status_sent: Instant,
}

impl<S> fmt::Debug for ReplicationStream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("connection", &self.connection)
            .field("state", &self.state)
            .field("last_status_sent", &self.last_status_sent.elapsed())
            .finish()
    }
}

impl<S> ReplicationConnection<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// Starts logical replication from `slot`:
    /// `START_REPLICATION SLOT "slot" LOGICAL X/Y ("name" 'value', …)`.
    ///
    /// `start` is where to resume: the server never sends a transaction that committed before
    /// the slot's confirmed position or before `start`, whichever is later (`0/0` means "from the
    /// confirmed position"). `options` go to the output plugin in order; names are quoted as
    /// identifiers and values as string literals here, so pass them raw — except that pgoutput
    /// reads `publication_names` as a list of identifiers, which
    /// [`quote_publication_names`] spells. For pgoutput with streamed large transactions:
    /// `[("proto_version", "2"), ("publication_names", &pubs), ("streaming", "on"),
    /// ("messages", "true")]`.
    ///
    /// The connection becomes the stream; on failure it is terminated.
    ///
    /// # Errors
    /// [`ReplicationError::InvalidSlotName`] or [`ReplicationError::InvalidOption`] before
    /// anything is sent; [`ReplicationError::Server`] if the server refuses (`42704` no such slot,
    /// `55006` slot in use, `42601` bad syntax, `22023` unknown or invalid option); otherwise as
    /// [`ReplicationConnection::simple_query`].
    pub async fn start_logical(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, &str)],
    ) -> Result<ReplicationStream<S>, ReplicationError> {
        let command = start_logical_command(slot, start, options)?;
        self.begin_exchange()?;
        frontend::query(&command, &mut self.write_buf)
            .map_err(|e| ReplicationError::Protocol(format!("cannot encode the command: {e}")))?;
        self.send().await?;
        match self.read_message().await? {
            BackendMessage::CopyBothResponse(_) => {
                tracing::debug!(
                    slot,
                    %start,
                    backend_pid = self.backend_pid(),
                    "logical replication started"
                );
                Ok(ReplicationStream {
                    connection: self,
                    state: CopyState::Streaming,
                    // The server starts its wal_sender_timeout clock here too.
                    last_status_sent: Instant::now(),
                })
            }
            BackendMessage::Message(Message::ErrorResponse(body)) => {
                let error = ServerFields::parse(body.fields())?.into_error();
                // Terminate rather than just drop the socket, so that the server ends the
                // session without logging an unexpected EOF. Its failure changes nothing.
                let _ = self.close().await;
                Err(error)
            }
            BackendMessage::Message(other) => Err(ReplicationError::Protocol(format!(
                "unexpected {} in answer to START_REPLICATION",
                message_name(&other)
            ))),
        }
    }
}

impl<S> ReplicationStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// The next message from the server.
    ///
    /// Cancel-safe: if the future is dropped before it completes (a `tokio::select!` branch that
    /// lost), no message is lost; bytes already read stay buffered for the next call. Notices and
    /// parameter changes are dealt with underneath and never returned.
    ///
    /// # Errors
    /// [`ReplicationError::Server`] if the server reports an error (copy mode ends with it);
    /// [`ReplicationError::Closed`] if the server hung up — what `wal_sender_timeout` looks
    /// like — or an earlier call failed; I/O and protocol errors otherwise. After any error the
    /// stream is finished: reconnect.
    pub async fn next(&mut self) -> Result<StreamEvent, ReplicationError> {
        match self.state {
            CopyState::Streaming => {}
            CopyState::ServerDone | CopyState::ServerEnded => return Ok(StreamEvent::End),
            CopyState::Failed | CopyState::Broken => return Err(ReplicationError::Closed),
        }
        // Every state change below happens after the only await, so cancelling cannot leave the
        // state half-updated.
        let message = match self.connection.read_message().await {
            Ok(BackendMessage::Message(message)) => message,
            Ok(BackendMessage::CopyBothResponse(_)) => {
                return Err(self.broken(ReplicationError::Protocol(
                    "unexpected CopyBothResponse while streaming".into(),
                )));
            }
            Err(e) => return Err(self.broken(e)),
        };
        match message {
            Message::CopyData(body) => {
                parse_copy_data(body.into_bytes()).map_err(|e| self.broken(e))
            }
            Message::CopyDone => {
                self.state = CopyState::ServerDone;
                Ok(StreamEvent::End)
            }
            Message::CommandComplete(_) => {
                self.state = CopyState::ServerEnded;
                Ok(StreamEvent::End)
            }
            Message::ErrorResponse(body) => {
                let fields = match ServerFields::parse(body.fields()) {
                    Ok(fields) => fields,
                    Err(e) => return Err(self.broken(e)),
                };
                self.state = if fields.is_fatal() {
                    CopyState::Broken
                } else {
                    CopyState::Failed
                };
                Err(fields.into_error())
            }
            other => Err(self.broken(ReplicationError::Protocol(format!(
                "unexpected {} while streaming",
                message_name(&other)
            )))),
        }
    }

    /// Sends a standby status update and flushes it.
    ///
    /// - `written`: the last position received. Shown as `write_lsn` in `pg_stat_replication`;
    ///   it never moves the slot.
    /// - `flushed`: **the server may discard everything before it.** It becomes the slot's
    ///   `confirmed_flush_lsn`, the position the next `START_REPLICATION` resumes from, and lets
    ///   the server recycle older WAL. Pass only an LSN whose changes are durably stored (for this
    ///   project: a commit end LSN whose pack is stored, or a keepalive's `wal_end` once all
    ///   earlier data is stored), never less than a value sent before, and `0/0` while nothing is
    ///   durable yet (the server then keeps the slot where it is).
    /// - `applied`: shown as `replay_lsn`; pass the same as `flushed`.
    /// - `reply_requested`: ask the server for an immediate keepalive (for measuring lag).
    ///
    /// The update goes out in one write, immediately ([`ReplicationConnection::connect`]
    /// disables Nagle on TCP). A server shutting down keeps the stream open until `flushed`
    /// (`written` if `flushed` is `0/0`) reaches the position it has sent — the `wal_end` of
    /// its keepalives, which then ask for a reply — or until `wal_sender_timeout` passes: a
    /// consumer that makes its data durable and acknowledges promptly lets it stop sooner.
    ///
    /// Cancel-safe in the sense that matters: if the future is dropped mid-write, the unwritten
    /// rest stays queued and goes out first on the next `send_status`, [`Self::stop`] or
    /// [`Self::finish`]. Until then the server waits for the rest of the message, so call one
    /// of them soon.
    ///
    /// # Errors
    /// [`ReplicationError::Io`] if the write fails (the stream is then finished);
    /// [`ReplicationError::Closed`] if the copy has ended or an earlier call failed.
    pub async fn send_status(
        &mut self,
        written: Lsn,
        flushed: Lsn,
        applied: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        match self.state {
            // After the server's CopyDone it still reads our updates until our own CopyDone.
            CopyState::Streaming | CopyState::ServerDone => {}
            CopyState::ServerEnded | CopyState::Failed | CopyState::Broken => {
                return Err(ReplicationError::Closed);
            }
        }
        encode_status_update(
            &mut self.connection.write_buf,
            written,
            flushed,
            applied,
            pg_now(),
            reply_requested,
        );
        self.write_pending().await?;
        self.last_status_sent = Instant::now();
        Ok(())
    }

    /// When the last status update was sent (or streaming started, if none was). Send one at
    /// least every [`STATUS_UPDATE_INTERVAL`].
    #[must_use]
    pub fn last_status_sent(&self) -> Instant {
        self.last_status_sent
    }

    /// The server's process id for this session (`pg_stat_replication.pid`).
    #[must_use]
    pub fn backend_pid(&self) -> Option<i32> {
        self.connection.backend_pid()
    }

    /// Ends streaming and returns the connection, ready for more replication commands (dropping
    /// the slot, starting again…).
    ///
    /// Sends CopyDone (after any status update still queued), then reads until the server's
    /// ReadyForQuery. Data the server had already sent is read and discarded: it was never
    /// acknowledged, so the slot sends it again next time. With a transaction being decoded this
    /// can take a while; bound it with a timeout.
    ///
    /// # Errors
    /// [`ReplicationError::Closed`] if an earlier call broke the stream or the server hung up;
    /// [`ReplicationError::Server`] if the server reports an error while ending; I/O and protocol
    /// errors otherwise.
    pub async fn stop(mut self) -> Result<ReplicationConnection<S>, ReplicationError> {
        match self.state {
            CopyState::Streaming | CopyState::ServerDone => {
                frontend::copy_done(&mut self.connection.write_buf);
                self.write_pending().await?;
            }
            // The server is out of copy mode already; only ReadyForQuery is left to read.
            CopyState::ServerEnded | CopyState::Failed => {}
            CopyState::Broken => return Err(ReplicationError::Closed),
        }
        let mut error = None;
        loop {
            let message = match self.connection.read_message().await {
                Ok(BackendMessage::Message(message)) => message,
                Ok(BackendMessage::CopyBothResponse(_)) => {
                    return Err(ReplicationError::Protocol(
                        "unexpected CopyBothResponse while ending the stream".into(),
                    ));
                }
                // A server that reported an error and hung up: its error says more.
                Err(e) => return Err(error.unwrap_or(e)),
            };
            match message {
                Message::CopyData(_) | Message::CopyDone | Message::CommandComplete(_) => {}
                Message::ErrorResponse(body) => {
                    let fields = ServerFields::parse(body.fields())?;
                    if fields.is_fatal() {
                        return Err(fields.into_error());
                    }
                    error.get_or_insert_with(|| fields.into_error());
                }
                Message::ReadyForQuery(_) => {
                    if let Some(error) = error {
                        return Err(error);
                    }
                    self.connection.in_sync = true;
                    return Ok(self.connection);
                }
                other => {
                    return Err(ReplicationError::Protocol(format!(
                        "unexpected {} while ending the stream",
                        message_name(&other)
                    )));
                }
            }
        }
    }

    /// Ends streaming and the session cleanly: [`Self::stop`], then Terminate.
    ///
    /// # Errors
    /// As [`Self::stop`] and [`ReplicationConnection::close`]. A server that ended the stream
    /// itself because it is shutting down ([`StreamEvent::End`]) and then hung up is not an
    /// error.
    pub async fn finish(self) -> Result<(), ReplicationError> {
        let server_ended = self.state == CopyState::ServerEnded;
        match self.stop().await {
            Ok(connection) => connection.close().await,
            Err(ReplicationError::Closed) if server_ended => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Writes out everything queued in the write buffer, then flushes.
    ///
    /// Cancel-safe: each `write_buf` either writes some bytes and consumes them from the buffer
    /// in the same poll, or writes nothing, so a dropped future leaves exactly the unwritten rest
    /// queued.
    async fn write_pending(&mut self) -> Result<(), ReplicationError> {
        let result = async {
            let connection = &mut self.connection;
            while connection.write_buf.has_remaining() {
                if connection
                    .stream
                    .write_buf(&mut connection.write_buf)
                    .await?
                    == 0
                {
                    return Err(io::Error::from(io::ErrorKind::WriteZero));
                }
            }
            connection.stream.flush().await
        }
        .await;
        result.map_err(|e| self.broken(ReplicationError::io("writing to the server", e)))
    }

    /// Marks the stream unusable and passes `error` through.
    fn broken(&mut self, error: ReplicationError) -> ReplicationError {
        self.state = CopyState::Broken;
        error
    }
}

/// Spells publication names as pgoutput's `publication_names` option expects them: a
/// comma-separated list of identifiers. pgoutput splits the list like SQL identifiers
/// (`SplitIdentifierString`), downcasing unquoted names, so each is double-quoted here and keeps
/// its case, spaces, commas and quotes. [`ReplicationConnection::start_logical`] then quotes the
/// whole list as a string literal.
#[must_use]
pub fn quote_publication_names<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for (i, name) in names.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&quote_ident(name));
    }
    out
}

/// `START_REPLICATION SLOT "slot" LOGICAL X/Y ("name" 'value', …)`, refusing before anything is
/// sent what the server could not read.
fn start_logical_command(
    slot: &str,
    start: Lsn,
    options: &[(&str, &str)],
) -> Result<String, ReplicationError> {
    validate_slot_name(slot)?;
    let mut command = format!(
        "START_REPLICATION SLOT {} LOGICAL {start}",
        quote_ident(slot)
    );
    for (i, (name, value)) in options.iter().enumerate() {
        if name.is_empty() {
            return Err(ReplicationError::InvalidOption(
                "an option name is empty".into(),
            ));
        }
        // The query string is NUL-terminated on the wire.
        if name.contains('\0') || value.contains('\0') {
            return Err(ReplicationError::InvalidOption(format!(
                "option {:?} contains a NUL byte",
                name.chars().take(80).collect::<String>()
            )));
        }
        command.push_str(if i == 0 { " (" } else { ", " });
        command.push_str(&quote_ident(name));
        command.push(' ');
        command.push_str(&quote_literal(value));
    }
    if !options.is_empty() {
        command.push(')');
    }
    Ok(command)
}

/// Splits a CopyData payload into an event, without copying the XLogData payload.
fn parse_copy_data(mut data: Bytes) -> Result<StreamEvent, ReplicationError> {
    match data.first().copied() {
        Some(XLOG_DATA_TAG) if data.len() >= XLOG_DATA_HEADER_LEN => {
            data.advance(1);
            let wal_start = Lsn(data.get_u64());
            let wal_end = Lsn(data.get_u64());
            let server_time = data.get_i64();
            Ok(StreamEvent::XLogData {
                wal_start,
                wal_end,
                server_time,
                data,
            })
        }
        // Exact length: a longer keepalive would be a protocol this client does not know.
        Some(KEEPALIVE_TAG) if data.len() == KEEPALIVE_LEN => {
            data.advance(1);
            let wal_end = Lsn(data.get_u64());
            let server_time = data.get_i64();
            let reply_requested = data.get_u8() != 0;
            Ok(StreamEvent::Keepalive {
                wal_end,
                server_time,
                reply_requested,
            })
        }
        Some(tag @ (XLOG_DATA_TAG | KEEPALIVE_TAG)) => Err(ReplicationError::Protocol(format!(
            "malformed {} message in the replication stream ({} bytes)",
            tag_name(tag),
            data.len()
        ))),
        Some(tag) => Err(ReplicationError::Protocol(format!(
            "unknown message {} in the replication stream",
            tag_name(tag)
        ))),
        None => Err(ReplicationError::Protocol(
            "empty CopyData in the replication stream".into(),
        )),
    }
}

/// Appends a standby status update, CopyData header included, to `buf`.
fn encode_status_update(
    buf: &mut bytes::BytesMut,
    written: Lsn,
    flushed: Lsn,
    applied: Lsn,
    client_time: i64,
    reply_requested: bool,
) {
    buf.reserve(1 + 4 + STATUS_UPDATE_LEN);
    buf.put_u8(b'd');
    // The length counts itself, not the tag. 38: fits.
    #[allow(clippy::cast_possible_truncation)]
    buf.put_u32((4 + STATUS_UPDATE_LEN) as u32);
    buf.put_u8(STATUS_UPDATE_TAG);
    buf.put_u64(written.0);
    buf.put_u64(flushed.0);
    buf.put_u64(applied.0);
    buf.put_i64(client_time);
    buf.put_u8(u8::from(reply_requested));
}

/// Now, in µs since 2000-01-01 00:00:00 UTC. The server only displays it (`reply_time`), so a
/// clock before 1970 reads as the Unix epoch rather than failing.
fn pg_now() -> i64 {
    let since_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_unix.as_micros())
        .unwrap_or(i64::MAX)
        .saturating_sub(PG_EPOCH_UNIX_MICROS)
}

#[cfg(test)]
mod tests;
