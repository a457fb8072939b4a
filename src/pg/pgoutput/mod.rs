//! The `pgoutput` logical replication message format: bytes → typed messages, and back.
//!
//! Owns one thing: the byte layout of the messages PostgreSQL's built-in output plugin writes
//! into each XLogData payload (and into each row of `pg_logical_slot_*_binary_changes`), for
//! protocol versions 1 and 2 as written by PostgreSQL 14 to 17. [`decode`] turns one payload into
//! a [`Message`]; [`encode`] writes a [`Message`] back, byte for byte as PostgreSQL would (for
//! packs, the spool, tests, fuzzing and fake servers): `decode(encode(m)) == m` for every message
//! valid in its context, and `encode(decode(b)) == b` for every payload that decodes. The message
//! types are here, the decoder in `decode.rs`, the encoder in `encode.rs`.
//!
//! What it must never do:
//! - panic, whatever the input: every length and count is checked against the bytes that are
//!   actually left before it is used, and nothing is allocated from an unchecked length (a
//!   hostile or corrupt `i32` length must cost an error, not gigabytes);
//! - copy column values or message contents: they are [`Bytes`] slices of the input, because a
//!   single TOASTed value can be a gigabyte and the daemon's memory must stay bounded;
//! - know about tenants, relations' meaning, or transaction state beyond the one bit the format
//!   itself needs ([`Context::in_stream`]): routing and buffering are the stream's business.
//!
//! Protocol version 2 adds streamed transactions (`streaming 'on'`): a transaction larger than
//! `logical_decoding_work_mem` arrives in blocks between StreamStart and StreamStop, and inside
//! such a block Relation, Type, Insert, Update, Delete, Truncate and Message carry the
//! (sub)transaction id right after their tag. Nothing in the message says so, which is why
//! decoding needs a [`Context`]; [`Context::next`] tracks it across a stream of messages.
//! Protocol 3's two-phase messages and protocol 4's longer StreamAbort are refused as unknown,
//! since we never ask for them.

mod decode;
mod encode;
#[cfg(test)]
mod testing;

pub use decode::decode;
pub use encode::encode;

use std::fmt;

use bytes::Bytes;
use chrono::{DateTime, Utc};

use super::Lsn;

/// A PostgreSQL object id (`oid`): relations and types.
pub type Oid = u32;

/// A PostgreSQL transaction id (`xid`, 32 bits, unsigned).
pub type Xid = u32;

/// PostgreSQL's `MaxTupleAttributeNumber`: no tuple, so no Relation or TupleData, has more
/// columns. Checked before allocating so that a corrupt count cannot ask for a huge vector.
pub const MAX_COLUMNS: usize = 1664;

/// A timestamp as PostgreSQL sends it: microseconds since 2000-01-01 00:00:00 UTC.
///
/// Kept as the raw integer so that encoding gives back the exact bytes (and PostgreSQL's
/// `infinity`, `i64::MAX`, survives); convert with [`PgTimestamp::to_datetime`] for display
/// and comparison with user-given times.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    /// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
    const UNIX_TO_POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

    /// The instant, or `None` if chrono cannot represent it (PostgreSQL's `±infinity`, or a
    /// value more than about 262,000 years away — neither is a real commit time).
    #[must_use]
    pub fn to_datetime(self) -> Option<DateTime<Utc>> {
        let unix_micros = self.0.checked_add(Self::UNIX_TO_POSTGRES_EPOCH_MICROS)?;
        DateTime::from_timestamp_micros(unix_micros)
    }
}

/// Sub-microsecond precision is dropped (rounded towards the past), as PostgreSQL stores none.
impl From<DateTime<Utc>> for PgTimestamp {
    fn from(time: DateTime<Utc>) -> PgTimestamp {
        // Cannot overflow: chrono's range (±262,143 years) is well inside i64 microseconds.
        PgTimestamp(time.timestamp_micros() - Self::UNIX_TO_POSTGRES_EPOCH_MICROS)
    }
}

/// The pgoutput protocol version asked for with `proto_version`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProtocolVersion {
    /// PostgreSQL 10+: whole transactions only.
    V1,
    /// PostgreSQL 14+: adds streamed transactions (StreamStart/Stop/Commit/Abort).
    V2,
}

impl ProtocolVersion {
    /// The value of the `proto_version` option for `START_REPLICATION` or the SQL functions.
    #[must_use]
    pub fn option_value(self) -> &'static str {
        match self {
            ProtocolVersion::V1 => "1",
            ProtocolVersion::V2 => "2",
        }
    }
}

/// What the decoder must know that the bytes do not say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Context {
    /// The negotiated protocol version.
    pub proto: ProtocolVersion,
    /// Between a StreamStart and its StreamStop: data messages then carry an xid.
    pub in_stream: bool,
}

impl Context {
    /// The context at the start of a replication session (outside any streamed block).
    #[must_use]
    pub const fn new(proto: ProtocolVersion) -> Context {
        Context {
            proto,
            in_stream: false,
        }
    }

    /// The context for the message that follows `message`: StreamStart opens a streamed block,
    /// StreamStop closes it, nothing else changes it.
    #[must_use]
    pub fn next(self, message: &Message) -> Context {
        match message {
            Message::StreamStart(_) => Context {
                in_stream: true,
                ..self
            },
            Message::StreamStop => Context {
                in_stream: false,
                ..self
            },
            _ => self,
        }
    }

    /// True when Relation, Type, Insert, Update, Delete, Truncate and Message carry an xid.
    #[must_use]
    pub fn carries_xid(self) -> bool {
        self.in_stream && self.proto >= ProtocolVersion::V2
    }

    /// Why a message with `tag` cannot appear here, if it cannot. Shared by the decoder and the
    /// encoder so that everything one accepts the other does too.
    fn refuses(self, tag: u8) -> Option<&'static str> {
        let streaming_message = matches!(tag, b'S' | b'E' | b'c' | b'A');
        if self.proto == ProtocolVersion::V1 {
            if self.in_stream {
                return Some("protocol version 1 has no streamed blocks");
            }
            if streaming_message {
                return Some("streaming messages need protocol version 2");
            }
        }
        match tag {
            b'S' if self.in_stream => Some("StreamStart inside a streamed block"),
            b'E' if !self.in_stream => Some("StreamStop outside a streamed block"),
            b'B' | b'C' | b'c' | b'A' if self.in_stream => {
                Some("transaction boundary inside a streamed block (before StreamStop)")
            }
            _ => None,
        }
    }
}

/// One pgoutput message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// `'B'`: a (non-streamed) transaction starts.
    Begin(Begin),
    /// `'C'`: the transaction opened by the last Begin committed.
    Commit(Commit),
    /// `'O'`: the transaction came from a replication origin (after Begin or StreamStart).
    Origin(Origin),
    /// `'R'`: a relation's schema, sent before its first change in a session and after changes.
    Relation(Relation),
    /// `'Y'`: a non-built-in type used by a column.
    Type(Type),
    /// `'I'`.
    Insert(Insert),
    /// `'U'`.
    Update(Update),
    /// `'D'`.
    Delete(Delete),
    /// `'T'`.
    Truncate(Truncate),
    /// `'M'`: `pg_logical_emit_message` output (only with the `messages` option).
    LogicalMessage(LogicalMessage),
    /// `'S'`: a block of a streamed transaction starts (protocol 2).
    StreamStart(StreamStart),
    /// `'E'`: the current streamed block ends (protocol 2).
    StreamStop,
    /// `'c'`: a streamed transaction committed (protocol 2).
    StreamCommit(StreamCommit),
    /// `'A'`: a streamed transaction or one of its subtransactions aborted (protocol 2).
    StreamAbort(StreamAbort),
}

impl Message {
    /// The message's tag byte.
    #[must_use]
    pub fn tag(&self) -> u8 {
        match self {
            Message::Begin(_) => b'B',
            Message::Commit(_) => b'C',
            Message::Origin(_) => b'O',
            Message::Relation(_) => b'R',
            Message::Type(_) => b'Y',
            Message::Insert(_) => b'I',
            Message::Update(_) => b'U',
            Message::Delete(_) => b'D',
            Message::Truncate(_) => b'T',
            Message::LogicalMessage(_) => b'M',
            Message::StreamStart(_) => b'S',
            Message::StreamStop => b'E',
            Message::StreamCommit(_) => b'c',
            Message::StreamAbort(_) => b'A',
        }
    }

    /// The xid a data message carries inside a streamed block, `None` elsewhere and for
    /// messages that never carry one.
    #[must_use]
    pub fn streamed_xid(&self) -> Option<Xid> {
        match self {
            Message::Relation(m) => m.xid,
            Message::Type(m) => m.xid,
            Message::Insert(m) => m.xid,
            Message::Update(m) => m.xid,
            Message::Delete(m) => m.xid,
            Message::Truncate(m) => m.xid,
            Message::LogicalMessage(m) => m.xid,
            _ => None,
        }
    }
}

/// `'B'`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Begin {
    /// The LSN of the commit record: the transaction's position in commit order.
    pub final_lsn: Lsn,
    pub commit_time: PgTimestamp,
    pub xid: Xid,
}

/// `'C'`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    /// Unused by PostgreSQL 14–17 (always 0); kept raw so a future value round-trips.
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// The end of the commit record: the position to acknowledge once the transaction is durable.
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
}

/// `'O'`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The commit LSN on the origin server.
    pub lsn: Lsn,
    pub name: String,
}

/// `'R'`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    /// Present inside a streamed block (protocol 2).
    pub xid: Option<Xid>,
    pub oid: Oid,
    /// The schema; PostgreSQL sends an empty string for `pg_catalog` (kept as sent).
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    /// The published columns (dropped and generated columns are not sent), in table order:
    /// the order of every TupleData for this relation.
    pub columns: Vec<Column>,
}

/// A relation's `REPLICA IDENTITY`: what an Update or Delete says about the old row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// `'d'`: the primary key (old key sent only when it changes).
    Default,
    /// `'n'`: nothing.
    Nothing,
    /// `'f'`: every column (old row always sent, as an `'O'` tuple).
    Full,
    /// `'i'`: a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    pub fn from_byte(byte: u8) -> Option<ReplicaIdentity> {
        match byte {
            b'd' => Some(ReplicaIdentity::Default),
            b'n' => Some(ReplicaIdentity::Nothing),
            b'f' => Some(ReplicaIdentity::Full),
            b'i' => Some(ReplicaIdentity::Index),
            _ => None,
        }
    }

    fn to_byte(self) -> u8 {
        match self {
            ReplicaIdentity::Default => b'd',
            ReplicaIdentity::Nothing => b'n',
            ReplicaIdentity::Full => b'f',
            ReplicaIdentity::Index => b'i',
        }
    }
}

/// One column of a Relation message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity (flag bit 1): present in `'K'` old tuples.
    pub part_of_key: bool,
    pub name: String,
    pub type_oid: Oid,
    /// `atttypmod` (-1 when the type has none).
    pub type_modifier: i32,
}

/// `'Y'`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Type {
    /// Present inside a streamed block (protocol 2).
    pub xid: Option<Xid>,
    pub oid: Oid,
    /// Empty for `pg_catalog`, as for relations.
    pub namespace: String,
    pub name: String,
}

/// `'I'`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Insert {
    /// Present inside a streamed block (protocol 2).
    pub xid: Option<Xid>,
    pub relation: Oid,
    pub new: Tuple,
}

/// `'U'`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    /// Present inside a streamed block (protocol 2).
    pub xid: Option<Xid>,
    pub relation: Oid,
    /// `'O'` with REPLICA IDENTITY FULL; `'K'` when the key changed; absent otherwise.
    pub old: Option<OldTuple>,
    /// Unchanged TOASTed columns are [`Value::UnchangedToast`]: keep the old value.
    pub new: Tuple,
}

/// `'D'`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delete {
    /// Present inside a streamed block (protocol 2).
    pub xid: Option<Xid>,
    pub relation: Oid,
    pub old: OldTuple,
}

/// The old row of an Update or Delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OldTuple {
    /// `'K'`: the replica identity columns; the others are [`Value::Null`].
    Key(Tuple),
    /// `'O'`: the whole old row (REPLICA IDENTITY FULL).
    Full(Tuple),
}

impl OldTuple {
    /// The tuple, whichever kind.
    #[must_use]
    pub fn tuple(&self) -> &Tuple {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }

    fn kind_byte(&self) -> u8 {
        match self {
            OldTuple::Key(_) => b'K',
            OldTuple::Full(_) => b'O',
        }
    }
}

/// TupleData: one value per column of the relation, in the Relation message's order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tuple(pub Vec<Value>);

/// One column of a TupleData.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// `'n'`.
    Null,
    /// `'u'`: a TOASTed value the change did not modify; PostgreSQL does not resend it.
    UnchangedToast,
    /// `'t'`: the type's text output, in the client encoding. A slice of the input buffer.
    Text(Bytes),
    /// `'b'`: the type's binary send format (only with the `binary` option).
    Binary(Bytes),
}

/// `'T'`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncate {
    /// Present inside a streamed block (protocol 2).
    pub xid: Option<Xid>,
    pub cascade: bool,
    pub restart_identity: bool,
    pub relations: Vec<Oid>,
}

/// `'M'`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Present inside a streamed block (protocol 2).
    pub xid: Option<Xid>,
    /// Part of the enclosing transaction; non-transactional messages arrive on their own.
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    /// A slice of the input buffer.
    pub content: Bytes,
}

/// `'S'`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamStart {
    pub xid: Xid,
    /// The first block of this transaction.
    pub first_segment: bool,
}

/// `'c'`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamCommit {
    pub xid: Xid,
    /// Unused by PostgreSQL 14–17 (always 0); kept raw so a future value round-trips.
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: PgTimestamp,
}

/// `'A'`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamAbort {
    /// The top-level transaction.
    pub xid: Xid,
    /// The aborted subtransaction; equal to `xid` when the whole transaction aborted.
    pub subxid: Xid,
}

/// A payload that is not a valid pgoutput message in its context.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("pgoutput {}, at byte {offset}: {kind}", TagName(*.tag))]
pub struct DecodeError {
    /// The tag byte, `None` for an empty payload.
    pub tag: Option<u8>,
    /// Where in the payload the problem starts.
    pub offset: usize,
    pub kind: DecodeErrorKind,
}

/// What was wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeErrorKind {
    #[error("empty payload")]
    Empty,
    #[error("unknown message tag")]
    UnknownTag,
    #[error("not allowed here: {0}")]
    NotInContext(&'static str),
    #[error("truncated: {field} needs {needed} bytes, {remaining} left")]
    Truncated {
        field: &'static str,
        needed: usize,
        remaining: usize,
    },
    #[error("{field} is not NUL-terminated")]
    Unterminated { field: &'static str },
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    #[error("bad tuple column kind {}, expected 'n', 'u', 't' or 'b'", ByteName(*.found))]
    BadTupleKind { found: u8 },
    #[error("bad {field} {}, expected {expected}", ByteName(*.found))]
    BadByte {
        field: &'static str,
        found: u8,
        expected: &'static str,
    },
    #[error("negative {field} {value}")]
    NegativeLength { field: &'static str, value: i32 },
    #[error("{count} columns, more than PostgreSQL's maximum of {MAX_COLUMNS}")]
    TooManyColumns { count: usize },
    #[error("{count} unexpected bytes after the message")]
    TrailingBytes { count: usize },
}

/// Renders a tag for error messages: `'I' (Insert) message`.
struct TagName(Option<u8>);

impl fmt::Display for TagName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(tag) = self.0 else {
            return f.write_str("message");
        };
        let name = match tag {
            b'B' => "Begin",
            b'C' => "Commit",
            b'O' => "Origin",
            b'R' => "Relation",
            b'Y' => "Type",
            b'I' => "Insert",
            b'U' => "Update",
            b'D' => "Delete",
            b'T' => "Truncate",
            b'M' => "Message",
            b'S' => "StreamStart",
            b'E' => "StreamStop",
            b'c' => "StreamCommit",
            b'A' => "StreamAbort",
            _ => return write!(f, "message with tag {}", ByteName(tag)),
        };
        write!(f, "{} ({name}) message", ByteName(tag))
    }
}

/// A byte as a quoted character when printable, else in hexadecimal.
struct ByteName(u8);

impl fmt::Display for ByteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}'", char::from(self.0))
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}

/// Truncate option bits, as both directions read and write them.
const TRUNCATE_CASCADE: u8 = 1;
const TRUNCATE_RESTART_IDENTITY: u8 = 2;

impl crate::retry::Classify for DecodeError {
    fn class(&self) -> crate::retry::ErrorClass {
        crate::retry::ErrorClass::Permanent
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{V2, V2_STREAM, relation};
    use super::*;

    #[test]
    fn context_follows_stream_start_and_stop() {
        let start = Message::StreamStart(StreamStart {
            xid: 1,
            first_segment: true,
        });
        assert_eq!(V2.next(&start), V2_STREAM);
        assert_eq!(V2_STREAM.next(&relation(Some(1))), V2_STREAM);
        assert_eq!(V2_STREAM.next(&Message::StreamStop), V2);
        assert!(V2_STREAM.carries_xid());
        assert!(!V2.carries_xid());
    }

    #[test]
    fn timestamps_convert_to_utc() {
        assert_eq!(
            PgTimestamp(0).to_datetime().unwrap().to_rfc3339(),
            "2000-01-01T00:00:00+00:00"
        );
        let t = PgTimestamp(-946_684_800_000_000 + 1_500_000);
        assert_eq!(
            t.to_datetime().unwrap().to_rfc3339(),
            "1970-01-01T00:00:01.500+00:00"
        );
        assert_eq!(PgTimestamp::from(t.to_datetime().unwrap()), t);
        // PostgreSQL's infinities.
        assert_eq!(PgTimestamp(i64::MAX).to_datetime(), None);
        assert_eq!(PgTimestamp(i64::MIN).to_datetime(), None);
        let nanos = DateTime::from_timestamp(946_684_800, 999).unwrap();
        assert_eq!(PgTimestamp::from(nanos), PgTimestamp(0));
    }
}
