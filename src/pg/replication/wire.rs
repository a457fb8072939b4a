//! Backend messages on the wire: framing, the messages `postgres-protocol` does not know, the
//! fields of errors and notices, and the rows of a simple query.
//!
//! Owns the bytes between the socket and a parsed message, both ways ([`MessageReader`] and the
//! connection's `send`/`read_message`). It must never trust a declared length before checking it
//! (a non-PostgreSQL server on the port must cost an error, not a gigabyte) and never interprets
//! what a message means for the session: that is `super::session`'s and `super::stream`'s.

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::message::backend::{DataRowBody, ErrorFields, Message, RowDescriptionBody};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::fallible_iterator::FallibleIterator;

use super::error::ReplicationError;
use super::session::ReplicationConnection;

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

impl<S> ReplicationConnection<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
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

pub(super) fn parse_columns(body: &RowDescriptionBody) -> Result<Arc<[String]>, ReplicationError> {
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

pub(super) fn parse_row(
    columns: Arc<[String]>,
    body: &DataRowBody,
) -> Result<Row, ReplicationError> {
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
mod tests {
    use super::super::mock::{backend, command_complete, copy_both_response, ready};
    use super::*;

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
}
