//! The `pgoutput` logical replication message format: bytes → typed messages, and back.
//!
//! Owns one thing: the byte layout of the messages PostgreSQL's built-in output plugin writes
//! into each XLogData payload (and into each row of `pg_logical_slot_*_binary_changes`), for
//! protocol versions 1 and 2 as written by PostgreSQL 14 to 17. [`decode`] turns one payload into
//! a [`Message`]; [`encode`] writes a [`Message`] back, byte for byte as PostgreSQL would. The
//! encoder exists for tests, fuzzing and fake servers: `decode(encode(m)) == m` for every message
//! valid in its context, and `encode(decode(b)) == b` for every payload that decodes.
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

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
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
    fn from_byte(byte: u8) -> Option<ReplicaIdentity> {
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

/// Decodes one pgoutput message (one XLogData payload).
///
/// Values and message contents in the result share `buf`'s memory; nothing is copied but
/// names.
///
/// # Errors
/// [`DecodeError`] when the payload is empty, truncated, has an unknown tag or a bad byte in a
/// field with fixed values, a name that is not UTF-8, bytes left over, or is a message that
/// cannot appear in `ctx` (a StreamStop outside a streamed block, anything under protocol 1
/// with `in_stream` set, …).
pub fn decode(buf: &Bytes, ctx: Context) -> Result<Message, DecodeError> {
    let Some(&tag) = buf.first() else {
        return Err(DecodeError {
            tag: None,
            offset: 0,
            kind: DecodeErrorKind::Empty,
        });
    };
    let mut r = Reader { buf, pos: 1, tag };
    if !is_known_tag(tag) {
        return Err(r.error(0, DecodeErrorKind::UnknownTag));
    }
    if let Some(reason) = ctx.refuses(tag) {
        return Err(r.error(0, DecodeErrorKind::NotInContext(reason)));
    }
    let streamed_xid = |r: &mut Reader<'_>| -> Result<Option<Xid>, DecodeError> {
        if ctx.carries_xid() {
            r.u32("xid").map(Some)
        } else {
            Ok(None)
        }
    };
    let message = match tag {
        b'B' => Message::Begin(Begin {
            final_lsn: r.lsn("final LSN")?,
            commit_time: r.timestamp("commit time")?,
            xid: r.u32("xid")?,
        }),
        b'C' => Message::Commit(Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit LSN")?,
            end_lsn: r.lsn("end LSN")?,
            commit_time: r.timestamp("commit time")?,
        }),
        b'O' => Message::Origin(Origin {
            lsn: r.lsn("origin LSN")?,
            name: r.cstring("origin name")?,
        }),
        b'R' => Message::Relation(Relation {
            xid: streamed_xid(&mut r)?,
            oid: r.u32("relation oid")?,
            namespace: r.cstring("namespace")?,
            name: r.cstring("relation name")?,
            replica_identity: {
                let at = r.pos;
                let byte = r.u8("replica identity")?;
                ReplicaIdentity::from_byte(byte).ok_or_else(|| {
                    r.bad_byte(at, "replica identity", byte, "'d', 'n', 'f' or 'i'")
                })?
            },
            columns: r.columns()?,
        }),
        b'Y' => Message::Type(Type {
            xid: streamed_xid(&mut r)?,
            oid: r.u32("type oid")?,
            namespace: r.cstring("namespace")?,
            name: r.cstring("type name")?,
        }),
        b'I' => {
            let xid = streamed_xid(&mut r)?;
            let relation = r.u32("relation oid")?;
            r.expect(b'N', "tuple marker", "'N'")?;
            Message::Insert(Insert {
                xid,
                relation,
                new: r.tuple()?,
            })
        }
        b'U' => {
            let xid = streamed_xid(&mut r)?;
            let relation = r.u32("relation oid")?;
            let at = r.pos;
            let old = match r.u8("tuple marker")? {
                b'K' => Some(OldTuple::Key(r.tuple()?)),
                b'O' => Some(OldTuple::Full(r.tuple()?)),
                b'N' => None,
                found => return Err(r.bad_byte(at, "tuple marker", found, "'K', 'O' or 'N'")),
            };
            if old.is_some() {
                r.expect(b'N', "new tuple marker", "'N'")?;
            }
            Message::Update(Update {
                xid,
                relation,
                old,
                new: r.tuple()?,
            })
        }
        b'D' => {
            let xid = streamed_xid(&mut r)?;
            let relation = r.u32("relation oid")?;
            let at = r.pos;
            let old = match r.u8("tuple marker")? {
                b'K' => OldTuple::Key(r.tuple()?),
                b'O' => OldTuple::Full(r.tuple()?),
                found => return Err(r.bad_byte(at, "tuple marker", found, "'K' or 'O'")),
            };
            Message::Delete(Delete { xid, relation, old })
        }
        b'T' => {
            let xid = streamed_xid(&mut r)?;
            let count_at = r.pos;
            let count = r.length("relation count")?;
            let options_at = r.pos;
            let options = r.u8("truncate options")?;
            if options & !(TRUNCATE_CASCADE | TRUNCATE_RESTART_IDENTITY) != 0 {
                return Err(r.bad_byte(
                    options_at,
                    "truncate options",
                    options,
                    "bits 1 (CASCADE) and 2 (RESTART IDENTITY) only",
                ));
            }
            // Each oid is 4 bytes: check them all are there before allocating for them.
            r.ensure_at(count_at, count.saturating_mul(4), "relation oids")?;
            let mut relations = Vec::with_capacity(count);
            for _ in 0..count {
                relations.push(r.u32("relation oid")?);
            }
            Message::Truncate(Truncate {
                xid,
                cascade: options & TRUNCATE_CASCADE != 0,
                restart_identity: options & TRUNCATE_RESTART_IDENTITY != 0,
                relations,
            })
        }
        b'M' => {
            let xid = streamed_xid(&mut r)?;
            let at = r.pos;
            let transactional = match r.u8("message flags")? {
                0 => false,
                1 => true,
                found => return Err(r.bad_byte(at, "message flags", found, "0 or 1")),
            };
            let lsn = r.lsn("message LSN")?;
            let prefix = r.cstring("message prefix")?;
            let length = r.length("content length")?;
            Message::LogicalMessage(LogicalMessage {
                xid,
                transactional,
                lsn,
                prefix,
                content: r.bytes(length, "content")?,
            })
        }
        b'S' => {
            let xid = r.u32("xid")?;
            let at = r.pos;
            let first_segment = match r.u8("first segment")? {
                0 => false,
                1 => true,
                found => return Err(r.bad_byte(at, "first segment", found, "0 or 1")),
            };
            Message::StreamStart(StreamStart { xid, first_segment })
        }
        b'E' => Message::StreamStop,
        b'c' => Message::StreamCommit(StreamCommit {
            xid: r.u32("xid")?,
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit LSN")?,
            end_lsn: r.lsn("end LSN")?,
            commit_time: r.timestamp("commit time")?,
        }),
        b'A' => Message::StreamAbort(StreamAbort {
            xid: r.u32("xid")?,
            subxid: r.u32("subtransaction xid")?,
        }),
        _ => return Err(r.error(0, DecodeErrorKind::UnknownTag)),
    };
    r.finish()?;
    Ok(message)
}

const TRUNCATE_CASCADE: u8 = 1;
const TRUNCATE_RESTART_IDENTITY: u8 = 2;

fn is_known_tag(tag: u8) -> bool {
    matches!(
        tag,
        b'B' | b'C'
            | b'O'
            | b'R'
            | b'Y'
            | b'I'
            | b'U'
            | b'D'
            | b'T'
            | b'M'
            | b'S'
            | b'E'
            | b'c'
            | b'A'
    )
}

/// A cursor over one payload. Every read checks the remaining length first.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    tag: u8,
}

impl Reader<'_> {
    fn error(&self, offset: usize, kind: DecodeErrorKind) -> DecodeError {
        DecodeError {
            tag: Some(self.tag),
            offset,
            kind,
        }
    }

    fn bad_byte(
        &self,
        offset: usize,
        field: &'static str,
        found: u8,
        expected: &'static str,
    ) -> DecodeError {
        self.error(
            offset,
            DecodeErrorKind::BadByte {
                field,
                found,
                expected,
            },
        )
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Fails unless `needed` bytes remain after `from` (a position at or before `pos`, so that
    /// the error points at the count that promised them).
    fn ensure_at(
        &self,
        from: usize,
        needed: usize,
        field: &'static str,
    ) -> Result<(), DecodeError> {
        let remaining = self.remaining();
        if needed > remaining {
            return Err(self.error(
                from,
                DecodeErrorKind::Truncated {
                    field,
                    needed,
                    remaining,
                },
            ));
        }
        Ok(())
    }

    /// Consumes `N` bytes.
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        self.ensure_at(self.pos, N, field)?;
        let mut out = [0; N];
        out.copy_from_slice(&self.buf[self.pos..self.pos + N]);
        self.pos += N;
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_be_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        self.array(field).map(i32::from_be_bytes)
    }

    fn lsn(&mut self, field: &'static str) -> Result<Lsn, DecodeError> {
        self.array(field).map(|b| Lsn(u64::from_be_bytes(b)))
    }

    fn timestamp(&mut self, field: &'static str) -> Result<PgTimestamp, DecodeError> {
        self.array(field)
            .map(|b| PgTimestamp(i64::from_be_bytes(b)))
    }

    /// An `int32` length or count, which PostgreSQL never sends negative.
    fn length(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let at = self.pos;
        let value = self.i32(field)?;
        usize::try_from(value)
            .map_err(|_| self.error(at, DecodeErrorKind::NegativeLength { field, value }))
    }

    fn expect(
        &mut self,
        wanted: u8,
        field: &'static str,
        expected: &'static str,
    ) -> Result<(), DecodeError> {
        let at = self.pos;
        let found = self.u8(field)?;
        if found == wanted {
            Ok(())
        } else {
            Err(self.bad_byte(at, field, found, expected))
        }
    }

    /// `len` bytes as a zero-copy slice of the input.
    fn bytes(&mut self, len: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        self.ensure_at(self.pos, len, field)?;
        let out = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(out)
    }

    /// A NUL-terminated UTF-8 string (the walsender converts names to the client encoding,
    /// which a replication session sets to UTF-8).
    fn cstring(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let start = self.pos;
        let rest = &self.buf[start..];
        let Some(len) = rest.iter().position(|&b| b == 0) else {
            return Err(self.error(start, DecodeErrorKind::Unterminated { field }));
        };
        let text = std::str::from_utf8(&rest[..len]).map_err(|e| {
            self.error(
                start + e.valid_up_to(),
                DecodeErrorKind::InvalidUtf8 { field },
            )
        })?;
        self.pos = start + len + 1;
        Ok(text.to_owned())
    }

    /// A column count: at most [`MAX_COLUMNS`], and at least `min_bytes_each` bytes per column
    /// must remain, so that the vector sized from it is never larger than the input justifies.
    fn column_count(&mut self, min_bytes_each: usize) -> Result<usize, DecodeError> {
        let at = self.pos;
        let count = usize::from(self.u16("column count")?);
        if count > MAX_COLUMNS {
            return Err(self.error(at, DecodeErrorKind::TooManyColumns { count }));
        }
        self.ensure_at(at, count * min_bytes_each, "columns")?;
        Ok(count)
    }

    fn columns(&mut self) -> Result<Vec<Column>, DecodeError> {
        // flags, an empty name's NUL, type oid, typmod.
        let count = self.column_count(1 + 1 + 4 + 4)?;
        let mut columns = Vec::with_capacity(count);
        for _ in 0..count {
            let at = self.pos;
            let part_of_key = match self.u8("column flags")? {
                0 => false,
                1 => true,
                found => {
                    return Err(self.bad_byte(at, "column flags", found, "0 or 1 (part of key)"));
                }
            };
            columns.push(Column {
                part_of_key,
                name: self.cstring("column name")?,
                type_oid: self.u32("column type oid")?,
                type_modifier: self.i32("column type modifier")?,
            });
        }
        Ok(columns)
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let count = self.column_count(1)?;
        let mut values = Vec::with_capacity(count);
        for _ in 0..count {
            let at = self.pos;
            let value = match self.u8("column kind")? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => {
                    let len = self.length("value length")?;
                    Value::Text(self.bytes(len, "text value")?)
                }
                b'b' => {
                    let len = self.length("value length")?;
                    Value::Binary(self.bytes(len, "binary value")?)
                }
                found => return Err(self.error(at, DecodeErrorKind::BadTupleKind { found })),
            };
            values.push(value);
        }
        Ok(Tuple(values))
    }

    fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(self.error(self.pos, DecodeErrorKind::TrailingBytes { count })),
        }
    }
}

/// Encodes `message` exactly as PostgreSQL would send it in `ctx`.
///
/// # Panics
/// If `message` cannot be sent in `ctx` — the mistakes [`decode`] would reject: an xid present
/// outside a streamed block or missing inside one, a message the context refuses, more than
/// [`MAX_COLUMNS`] columns, a name containing NUL, a value longer than `i32::MAX` bytes.
/// These are bugs in the caller (a test or a fake server), never a property of input data.
#[must_use]
pub fn encode(message: &Message, ctx: Context) -> BytesMut {
    let tag = message.tag();
    if let Some(reason) = ctx.refuses(tag) {
        panic!("cannot encode {} in {ctx:?}: {reason}", TagName(Some(tag)));
    }
    let mut out = BytesMut::with_capacity(64);
    out.put_u8(tag);
    let streamed_xid = |out: &mut BytesMut, xid: Option<Xid>| {
        assert_eq!(
            xid.is_some(),
            ctx.carries_xid(),
            "{}: an xid is present exactly inside a streamed block of protocol 2 ({ctx:?})",
            TagName(Some(tag))
        );
        if let Some(xid) = xid {
            out.put_u32(xid);
        }
    };
    match message {
        Message::Begin(m) => {
            out.put_u64(m.final_lsn.0);
            out.put_i64(m.commit_time.0);
            out.put_u32(m.xid);
        }
        Message::Commit(m) => {
            out.put_u8(m.flags);
            out.put_u64(m.commit_lsn.0);
            out.put_u64(m.end_lsn.0);
            out.put_i64(m.commit_time.0);
        }
        Message::Origin(m) => {
            out.put_u64(m.lsn.0);
            put_cstring(&mut out, &m.name);
        }
        Message::Relation(m) => {
            streamed_xid(&mut out, m.xid);
            out.put_u32(m.oid);
            put_cstring(&mut out, &m.namespace);
            put_cstring(&mut out, &m.name);
            out.put_u8(m.replica_identity.to_byte());
            put_column_count(&mut out, m.columns.len());
            for column in &m.columns {
                out.put_u8(u8::from(column.part_of_key));
                put_cstring(&mut out, &column.name);
                out.put_u32(column.type_oid);
                out.put_i32(column.type_modifier);
            }
        }
        Message::Type(m) => {
            streamed_xid(&mut out, m.xid);
            out.put_u32(m.oid);
            put_cstring(&mut out, &m.namespace);
            put_cstring(&mut out, &m.name);
        }
        Message::Insert(m) => {
            streamed_xid(&mut out, m.xid);
            out.put_u32(m.relation);
            out.put_u8(b'N');
            put_tuple(&mut out, &m.new);
        }
        Message::Update(m) => {
            streamed_xid(&mut out, m.xid);
            out.put_u32(m.relation);
            if let Some(old) = &m.old {
                out.put_u8(old.kind_byte());
                put_tuple(&mut out, old.tuple());
            }
            out.put_u8(b'N');
            put_tuple(&mut out, &m.new);
        }
        Message::Delete(m) => {
            streamed_xid(&mut out, m.xid);
            out.put_u32(m.relation);
            out.put_u8(m.old.kind_byte());
            put_tuple(&mut out, m.old.tuple());
        }
        Message::Truncate(m) => {
            streamed_xid(&mut out, m.xid);
            put_length(&mut out, m.relations.len(), "relation count");
            let mut options = 0;
            if m.cascade {
                options |= TRUNCATE_CASCADE;
            }
            if m.restart_identity {
                options |= TRUNCATE_RESTART_IDENTITY;
            }
            out.put_u8(options);
            for oid in &m.relations {
                out.put_u32(*oid);
            }
        }
        Message::LogicalMessage(m) => {
            streamed_xid(&mut out, m.xid);
            out.put_u8(u8::from(m.transactional));
            out.put_u64(m.lsn.0);
            put_cstring(&mut out, &m.prefix);
            put_length(&mut out, m.content.len(), "content length");
            out.put_slice(&m.content);
        }
        Message::StreamStart(m) => {
            out.put_u32(m.xid);
            out.put_u8(u8::from(m.first_segment));
        }
        Message::StreamStop => {}
        Message::StreamCommit(m) => {
            out.put_u32(m.xid);
            out.put_u8(m.flags);
            out.put_u64(m.commit_lsn.0);
            out.put_u64(m.end_lsn.0);
            out.put_i64(m.commit_time.0);
        }
        Message::StreamAbort(m) => {
            out.put_u32(m.xid);
            out.put_u32(m.subxid);
        }
    }
    out
}

fn put_cstring(out: &mut BytesMut, s: &str) {
    assert!(
        !s.contains('\0'),
        "a pgoutput name cannot contain NUL: {s:?}"
    );
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

fn put_length(out: &mut BytesMut, len: usize, field: &str) {
    let len = i32::try_from(len).unwrap_or_else(|_| panic!("{field} {len} exceeds i32::MAX"));
    out.put_i32(len);
}

fn put_column_count(out: &mut BytesMut, count: usize) {
    assert!(
        count <= MAX_COLUMNS,
        "{count} columns, more than PostgreSQL's maximum of {MAX_COLUMNS}"
    );
    out.put_u16(u16::try_from(count).expect("MAX_COLUMNS fits in a u16"));
}

fn put_tuple(out: &mut BytesMut, tuple: &Tuple) {
    put_column_count(out, tuple.0.len());
    for value in &tuple.0 {
        match value {
            Value::Null => out.put_u8(b'n'),
            Value::UnchangedToast => out.put_u8(b'u'),
            Value::Text(bytes) => put_value(out, b't', bytes),
            Value::Binary(bytes) => put_value(out, b'b', bytes),
        }
    }
}

fn put_value(out: &mut BytesMut, kind: u8, bytes: &[u8]) {
    out.put_u8(kind);
    put_length(out, bytes.len(), "value length");
    out.put_slice(bytes);
}

impl crate::retry::Classify for DecodeError {
    fn class(&self) -> crate::retry::ErrorClass {
        crate::retry::ErrorClass::Permanent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: Context = Context::new(ProtocolVersion::V1);
    const V2: Context = Context::new(ProtocolVersion::V2);
    const V2_STREAM: Context = Context {
        proto: ProtocolVersion::V2,
        in_stream: true,
    };

    /// Hand-written bytes, built field by field so each test reads like the protocol docs.
    #[derive(Default)]
    struct Wire(Vec<u8>);

    impl Wire {
        fn tag(tag: u8) -> Wire {
            Wire(vec![tag])
        }
        fn u8(mut self, v: u8) -> Wire {
            self.0.push(v);
            self
        }
        fn i16(mut self, v: i16) -> Wire {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Wire {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Wire {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Wire {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i64(mut self, v: i64) -> Wire {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn str(mut self, s: &str) -> Wire {
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(0);
            self
        }
        fn raw(mut self, b: &[u8]) -> Wire {
            self.0.extend_from_slice(b);
            self
        }
        fn text(self, s: &str) -> Wire {
            let len = i32::try_from(s.len()).unwrap();
            self.u8(b't').i32(len).raw(s.as_bytes())
        }
        fn bytes(self) -> Bytes {
            Bytes::from(self.0)
        }
    }

    /// Decodes, checks re-encoding gives the same bytes, and returns the message.
    fn decode_exact(wire: Wire, ctx: Context) -> Message {
        let bytes = wire.bytes();
        let message = decode(&bytes, ctx).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            encode(&message, ctx).freeze(),
            bytes,
            "re-encoding {message:?}"
        );
        message
    }

    fn decode_err(wire: Wire, ctx: Context) -> DecodeError {
        let bytes = wire.bytes();
        match decode(&bytes, ctx) {
            Ok(m) => panic!("decoded {m:?} from {bytes:?}"),
            Err(e) => e,
        }
    }

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn begin() {
        let wire = Wire::tag(b'B')
            .u64(0x16_B374_D848)
            .i64(777_000_000)
            .u32(4242);
        assert_eq!(
            decode_exact(wire, V1),
            Message::Begin(Begin {
                final_lsn: Lsn(0x16_B374_D848),
                commit_time: PgTimestamp(777_000_000),
                xid: 4242,
            })
        );
    }

    #[test]
    fn commit() {
        let wire = Wire::tag(b'C').u8(0).u64(10).u64(20).i64(-5);
        assert_eq!(
            decode_exact(wire, V2),
            Message::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(10),
                end_lsn: Lsn(20),
                commit_time: PgTimestamp(-5),
            })
        );
    }

    #[test]
    fn origin_with_and_without_stream() {
        // Origin never carries an xid, even inside a streamed block.
        for ctx in [V1, V2, V2_STREAM] {
            let wire = Wire::tag(b'O').u64(99).str("upstream_é");
            assert_eq!(
                decode_exact(wire, ctx),
                Message::Origin(Origin {
                    lsn: Lsn(99),
                    name: "upstream_é".into(),
                })
            );
        }
    }

    fn relation_wire(xid: Option<u32>) -> Wire {
        let mut w = Wire::tag(b'R');
        if let Some(xid) = xid {
            w = w.u32(xid);
        }
        w.u32(16_384)
            .str("app")
            .str("funds")
            .u8(b'd')
            .i16(2)
            .u8(1)
            .str("id")
            .u32(2950)
            .i32(-1)
            .u8(0)
            .str("name")
            .u32(1043)
            .i32(68)
    }

    fn relation(xid: Option<u32>) -> Message {
        Message::Relation(Relation {
            xid,
            oid: 16_384,
            namespace: "app".into(),
            name: "funds".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                Column {
                    part_of_key: true,
                    name: "id".into(),
                    type_oid: 2950,
                    type_modifier: -1,
                },
                Column {
                    part_of_key: false,
                    name: "name".into(),
                    type_oid: 1043,
                    type_modifier: 68,
                },
            ],
        })
    }

    #[test]
    fn relation_outside_and_inside_a_stream() {
        assert_eq!(decode_exact(relation_wire(None), V1), relation(None));
        assert_eq!(decode_exact(relation_wire(None), V2), relation(None));
        assert_eq!(
            decode_exact(relation_wire(Some(731)), V2_STREAM),
            relation(Some(731))
        );
    }

    #[test]
    fn relation_replica_identities() {
        for (byte, identity) in [
            (b'd', ReplicaIdentity::Default),
            (b'n', ReplicaIdentity::Nothing),
            (b'f', ReplicaIdentity::Full),
            (b'i', ReplicaIdentity::Index),
        ] {
            let wire = Wire::tag(b'R').u32(1).str("").str("t").u8(byte).i16(0);
            let Message::Relation(r) = decode_exact(wire, V1) else {
                panic!("not a relation")
            };
            assert_eq!(r.replica_identity, identity);
            assert_eq!(r.namespace, "", "pg_catalog is sent as an empty namespace");
        }
        let err = decode_err(Wire::tag(b'R').u32(1).str("").str("t").u8(b'x').i16(0), V1);
        assert_eq!(err.offset, 8);
        assert!(matches!(
            err.kind,
            DecodeErrorKind::BadByte {
                field: "replica identity",
                found: b'x',
                ..
            }
        ));
    }

    #[test]
    fn type_message() {
        let wire = Wire::tag(b'Y').u32(3).u32(16_400).str("app").str("mood");
        assert_eq!(
            decode_exact(wire, V2_STREAM),
            Message::Type(Type {
                xid: Some(3),
                oid: 16_400,
                namespace: "app".into(),
                name: "mood".into(),
            })
        );
    }

    #[test]
    fn insert_with_every_column_kind() {
        let wire = Wire::tag(b'I')
            .u32(16_384)
            .u8(b'N')
            .i16(4)
            .u8(b'n')
            .u8(b'u')
            .text("héllo")
            .u8(b'b')
            .i32(3)
            .raw(&[0, 1, 2]);
        assert_eq!(
            decode_exact(wire, V1),
            Message::Insert(Insert {
                xid: None,
                relation: 16_384,
                new: Tuple(vec![
                    Value::Null,
                    Value::UnchangedToast,
                    text("héllo"),
                    Value::Binary(Bytes::from_static(&[0, 1, 2])),
                ]),
            })
        );
    }

    #[test]
    fn values_are_slices_of_the_input() {
        let bytes = Wire::tag(b'I')
            .u32(1)
            .u8(b'N')
            .i16(1)
            .text("a large value")
            .bytes();
        let Message::Insert(insert) = decode(&bytes, V1).unwrap() else {
            panic!("not an insert")
        };
        let Value::Text(value) = &insert.new.0[0] else {
            panic!("not text")
        };
        // Same memory, not a copy: the pointer lies inside the input buffer.
        let input = bytes.as_ptr_range();
        assert!(input.contains(&value.as_ptr()));
    }

    #[test]
    fn update_without_old_with_key_and_with_full_old() {
        let new = || Wire::default().u8(b'N').i16(2).text("1").u8(b'u');
        let new_tuple = Tuple(vec![text("1"), Value::UnchangedToast]);

        let plain = Wire::tag(b'U').u32(7).raw(&new().0);
        assert_eq!(
            decode_exact(plain, V1),
            Message::Update(Update {
                xid: None,
                relation: 7,
                old: None,
                new: new_tuple.clone(),
            })
        );

        let key = Wire::tag(b'U')
            .u32(9)
            .u32(7)
            .u8(b'K')
            .i16(2)
            .text("0")
            .u8(b'n')
            .raw(&new().0);
        assert_eq!(
            decode_exact(key, V2_STREAM),
            Message::Update(Update {
                xid: Some(9),
                relation: 7,
                old: Some(OldTuple::Key(Tuple(vec![text("0"), Value::Null]))),
                new: new_tuple.clone(),
            })
        );

        let full = Wire::tag(b'U')
            .u32(7)
            .u8(b'O')
            .i16(2)
            .text("1")
            .text("old")
            .raw(&new().0);
        assert_eq!(
            decode_exact(full, V2),
            Message::Update(Update {
                xid: None,
                relation: 7,
                old: Some(OldTuple::Full(Tuple(vec![text("1"), text("old")]))),
                new: new_tuple,
            })
        );
    }

    #[test]
    fn update_needs_new_tuple_after_old() {
        let wire = Wire::tag(b'U').u32(7).u8(b'K').i16(0).u8(b'K').i16(0);
        let err = decode_err(wire, V1);
        assert_eq!(err.offset, 8);
        assert!(matches!(
            err.kind,
            DecodeErrorKind::BadByte {
                field: "new tuple marker",
                found: b'K',
                ..
            }
        ));
    }

    #[test]
    fn delete_key_and_full() {
        let key = Wire::tag(b'D').u32(7).u8(b'K').i16(1).text("42");
        assert_eq!(
            decode_exact(key, V1),
            Message::Delete(Delete {
                xid: None,
                relation: 7,
                old: OldTuple::Key(Tuple(vec![text("42")])),
            })
        );
        let full = Wire::tag(b'D').u32(5).u32(7).u8(b'O').i16(1).text("42");
        assert_eq!(
            decode_exact(full, V2_STREAM),
            Message::Delete(Delete {
                xid: Some(5),
                relation: 7,
                old: OldTuple::Full(Tuple(vec![text("42")])),
            })
        );
        let err = decode_err(Wire::tag(b'D').u32(7).u8(b'N').i16(0), V1);
        assert!(matches!(
            err.kind,
            DecodeErrorKind::BadByte { found: b'N', .. }
        ));
    }

    #[test]
    fn truncate_with_options() {
        for (options, cascade, restart_identity) in [
            (0, false, false),
            (1, true, false),
            (2, false, true),
            (3, true, true),
        ] {
            let wire = Wire::tag(b'T').i32(2).u8(options).u32(10).u32(11);
            assert_eq!(
                decode_exact(wire, V2),
                Message::Truncate(Truncate {
                    xid: None,
                    cascade,
                    restart_identity,
                    relations: vec![10, 11],
                })
            );
        }
        let streamed = Wire::tag(b'T').u32(77).i32(1).u8(0).u32(10);
        assert_eq!(decode_exact(streamed, V2_STREAM).streamed_xid(), Some(77));
        let err = decode_err(Wire::tag(b'T').i32(0).u8(4), V1);
        assert_eq!(err.offset, 5);
    }

    #[test]
    fn truncate_count_is_checked_before_allocating() {
        // A count of two billion relations with four bytes behind it.
        let err = decode_err(Wire::tag(b'T').i32(i32::MAX).u8(0).u32(1), V1);
        assert_eq!(err.offset, 1);
        assert!(matches!(
            err.kind,
            DecodeErrorKind::Truncated {
                field: "relation oids",
                remaining: 4,
                ..
            }
        ));
        let err = decode_err(Wire::tag(b'T').i32(-1).u8(0), V1);
        assert!(matches!(
            err.kind,
            DecodeErrorKind::NegativeLength { value: -1, .. }
        ));
    }

    #[test]
    fn logical_message() {
        let wire = Wire::tag(b'M')
            .u8(1)
            .u64(0x1_0000_0000)
            .str("updog")
            .i32(4)
            .raw(b"\0\xffok");
        assert_eq!(
            decode_exact(wire, V1),
            Message::LogicalMessage(LogicalMessage {
                xid: None,
                transactional: true,
                lsn: Lsn(0x1_0000_0000),
                prefix: "updog".into(),
                content: Bytes::from_static(b"\0\xffok"),
            })
        );
        let streamed = Wire::tag(b'M').u32(12).u8(0).u64(1).str("").i32(0);
        assert_eq!(decode_exact(streamed, V2_STREAM).streamed_xid(), Some(12));
        let err = decode_err(Wire::tag(b'M').u8(2).u64(1).str("").i32(0), V1);
        assert!(matches!(
            err.kind,
            DecodeErrorKind::BadByte {
                field: "message flags",
                found: 2,
                ..
            }
        ));
    }

    #[test]
    fn stream_start_stop_commit_abort() {
        assert_eq!(
            decode_exact(Wire::tag(b'S').u32(900).u8(1), V2),
            Message::StreamStart(StreamStart {
                xid: 900,
                first_segment: true,
            })
        );
        assert_eq!(
            decode_exact(Wire::tag(b'S').u32(900).u8(0), V2),
            Message::StreamStart(StreamStart {
                xid: 900,
                first_segment: false,
            })
        );
        assert_eq!(
            decode_exact(Wire::tag(b'E'), V2_STREAM),
            Message::StreamStop
        );
        assert_eq!(
            decode_exact(Wire::tag(b'c').u32(900).u8(0).u64(30).u64(40).i64(50), V2),
            Message::StreamCommit(StreamCommit {
                xid: 900,
                flags: 0,
                commit_lsn: Lsn(30),
                end_lsn: Lsn(40),
                commit_time: PgTimestamp(50),
            })
        );
        assert_eq!(
            decode_exact(Wire::tag(b'A').u32(900).u32(901), V2),
            Message::StreamAbort(StreamAbort {
                xid: 900,
                subxid: 901,
            })
        );
        // Protocol 4 appends abort_lsn and abort_time; we never ask for it.
        let err = decode_err(Wire::tag(b'A').u32(900).u32(901).u64(1).i64(2), V2);
        assert_eq!(err.kind, DecodeErrorKind::TrailingBytes { count: 16 });
        assert_eq!(err.offset, 9);
        let err = decode_err(Wire::tag(b'S').u32(1).u8(2), V2);
        assert!(matches!(
            err.kind,
            DecodeErrorKind::BadByte { found: 2, .. }
        ));
    }

    #[test]
    fn context_rules() {
        let refused = |wire: Wire, ctx| {
            let err = decode_err(wire, ctx);
            assert_eq!(err.offset, 0);
            assert!(
                matches!(err.kind, DecodeErrorKind::NotInContext(_)),
                "{err}"
            );
        };
        refused(Wire::tag(b'S').u32(1).u8(1), V1);
        refused(Wire::tag(b'E'), V1);
        refused(Wire::tag(b'c').u32(1).u8(0).u64(1).u64(2).i64(3), V1);
        refused(Wire::tag(b'A').u32(1).u32(1), V1);
        refused(Wire::tag(b'S').u32(1).u8(1), V2_STREAM);
        refused(Wire::tag(b'E'), V2);
        refused(Wire::tag(b'B').u64(1).i64(1).u32(1), V2_STREAM);
        refused(Wire::tag(b'C').u8(0).u64(1).u64(2).i64(3), V2_STREAM);
        refused(Wire::tag(b'A').u32(1).u32(1), V2_STREAM);
        refused(
            Wire::tag(b'O').u64(1).str("o"),
            Context {
                proto: ProtocolVersion::V1,
                in_stream: true,
            },
        );
    }

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
    fn errors_name_tag_offset_and_problem() {
        let err = decode_err(Wire::default(), V1);
        assert_eq!(err.kind, DecodeErrorKind::Empty);

        let err = decode_err(Wire::tag(b'Z'), V1);
        assert_eq!(err.kind, DecodeErrorKind::UnknownTag);
        assert_eq!(
            err.to_string(),
            "pgoutput message with tag 'Z', at byte 0: unknown message tag"
        );
        let err = decode_err(Wire::tag(0x05), V1);
        assert!(err.to_string().contains("0x05"), "{err}");

        let err = decode_err(Wire::tag(b'B').u64(1).i64(2), V1);
        assert_eq!(
            err.to_string(),
            "pgoutput 'B' (Begin) message, at byte 17: truncated: xid needs 4 bytes, 0 left"
        );

        let err = decode_err(Wire::tag(b'O').u64(1).raw(b"no nul"), V1);
        assert_eq!(
            err.kind,
            DecodeErrorKind::Unterminated {
                field: "origin name"
            }
        );
        assert_eq!(err.offset, 9);

        let err = decode_err(Wire::tag(b'O').u64(1).raw(b"ab\xffc\0"), V1);
        assert_eq!(
            err.kind,
            DecodeErrorKind::InvalidUtf8 {
                field: "origin name"
            }
        );
        assert_eq!(err.offset, 11, "points at the first invalid byte");

        let err = decode_err(Wire::tag(b'I').u32(1).u8(b'N').i16(1).u8(b'x'), V1);
        assert_eq!(err.kind, DecodeErrorKind::BadTupleKind { found: b'x' });
        assert_eq!(err.offset, 8);
        assert!(err.to_string().contains("Insert"), "{err}");

        let err = decode_err(Wire::tag(b'E').u8(0), V2_STREAM);
        assert_eq!(err.kind, DecodeErrorKind::TrailingBytes { count: 1 });
        assert_eq!(err.offset, 1);
    }

    #[test]
    fn column_counts_are_bounded() {
        let err = decode_err(Wire::tag(b'I').u32(1).u8(b'N').i16(1665), V1);
        assert_eq!(err.kind, DecodeErrorKind::TooManyColumns { count: 1665 });
        // u16 on the wire: PostgreSQL writes uint16, so 0xFFFF is 65535 columns, not -1.
        let err = decode_err(Wire::tag(b'I').u32(1).u8(b'N').i16(-1), V1);
        assert_eq!(err.kind, DecodeErrorKind::TooManyColumns { count: 65_535 });
        // Within the maximum but more columns than bytes left.
        let err = decode_err(Wire::tag(b'I').u32(1).u8(b'N').i16(1000).u8(b'n'), V1);
        assert!(matches!(
            err.kind,
            DecodeErrorKind::Truncated {
                field: "columns",
                ..
            }
        ));
        let err = decode_err(
            Wire::tag(b'R')
                .u32(1)
                .str("")
                .str("t")
                .u8(b'f')
                .i16(3)
                .raw(&[0; 25]),
            V1,
        );
        assert!(matches!(
            err.kind,
            DecodeErrorKind::Truncated {
                field: "columns",
                ..
            }
        ));
    }

    #[test]
    fn value_lengths_are_checked() {
        let err = decode_err(
            Wire::tag(b'I')
                .u32(1)
                .u8(b'N')
                .i16(1)
                .u8(b't')
                .i32(i32::MAX)
                .raw(b"abc"),
            V1,
        );
        assert_eq!(
            err.kind,
            DecodeErrorKind::Truncated {
                field: "text value",
                needed: i32::MAX as usize,
                remaining: 3,
            }
        );
        let err = decode_err(Wire::tag(b'I').u32(1).u8(b'N').i16(1).u8(b'b').i32(-2), V1);
        assert!(matches!(
            err.kind,
            DecodeErrorKind::NegativeLength { value: -2, .. }
        ));
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

    #[test]
    #[should_panic(expected = "xid is present exactly inside a streamed block")]
    fn encoding_a_streamed_xid_outside_a_stream_is_a_bug() {
        let _ = encode(&relation(Some(1)), V2);
    }

    #[test]
    #[should_panic(expected = "StreamStop outside a streamed block")]
    fn encoding_a_message_the_context_refuses_is_a_bug() {
        let _ = encode(&Message::StreamStop, V2);
    }

    mod properties {
        use proptest::collection::vec;
        use proptest::prelude::*;

        use super::*;

        /// Bounded so every `cargo test` runs them: about 0.3 s for all four in a debug build.
        /// Open-ended searching is the fuzz target's job (fuzz/).
        fn config() -> ProptestConfig {
            ProptestConfig {
                cases: 2048,
                // Minimal failing cases are printed; no regression files land in src/.
                failure_persistence: None,
                ..ProptestConfig::default()
            }
        }

        fn contexts() -> impl Strategy<Value = Context> {
            prop_oneof![Just(V1), Just(V2), Just(V2_STREAM)]
        }

        fn name() -> impl Strategy<Value = String> {
            "[^\\x00]{0,12}"
        }

        fn payload() -> impl Strategy<Value = Bytes> {
            vec(any::<u8>(), 0..48).prop_map(Bytes::from)
        }

        fn value() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(Value::Null),
                Just(Value::UnchangedToast),
                payload().prop_map(Value::Text),
                payload().prop_map(Value::Binary),
            ]
        }

        fn tuple() -> impl Strategy<Value = Tuple> {
            vec(value(), 0..6).prop_map(Tuple)
        }

        fn old_tuple() -> impl Strategy<Value = OldTuple> {
            prop_oneof![
                tuple().prop_map(OldTuple::Key),
                tuple().prop_map(OldTuple::Full)
            ]
        }

        fn lsn() -> impl Strategy<Value = Lsn> {
            any::<u64>().prop_map(Lsn)
        }

        fn time() -> impl Strategy<Value = PgTimestamp> {
            any::<i64>().prop_map(PgTimestamp)
        }

        fn column() -> impl Strategy<Value = Column> {
            (any::<bool>(), name(), any::<u32>(), any::<i32>()).prop_map(
                |(part_of_key, name, type_oid, type_modifier)| Column {
                    part_of_key,
                    name,
                    type_oid,
                    type_modifier,
                },
            )
        }

        fn replica_identity() -> impl Strategy<Value = ReplicaIdentity> {
            prop_oneof![
                Just(ReplicaIdentity::Default),
                Just(ReplicaIdentity::Nothing),
                Just(ReplicaIdentity::Full),
                Just(ReplicaIdentity::Index),
            ]
        }

        /// Messages that can appear in `ctx`, with an xid exactly where `ctx` carries one.
        fn message(ctx: Context) -> BoxedStrategy<Message> {
            let xid = if ctx.carries_xid() {
                any::<u32>().prop_map(Some).boxed()
            } else {
                Just(None).boxed()
            };
            let data = prop_oneof![
                (lsn(), name()).prop_map(|(lsn, name)| Message::Origin(Origin { lsn, name })),
                (
                    xid.clone(),
                    any::<u32>(),
                    name(),
                    name(),
                    replica_identity(),
                    vec(column(), 0..5)
                )
                    .prop_map(
                        |(xid, oid, namespace, name, replica_identity, columns)| {
                            Message::Relation(Relation {
                                xid,
                                oid,
                                namespace,
                                name,
                                replica_identity,
                                columns,
                            })
                        }
                    ),
                (xid.clone(), any::<u32>(), name(), name()).prop_map(
                    |(xid, oid, namespace, name)| Message::Type(Type {
                        xid,
                        oid,
                        namespace,
                        name,
                    })
                ),
                (xid.clone(), any::<u32>(), tuple()).prop_map(|(xid, relation, new)| {
                    Message::Insert(Insert { xid, relation, new })
                }),
                (
                    xid.clone(),
                    any::<u32>(),
                    proptest::option::of(old_tuple()),
                    tuple()
                )
                    .prop_map(|(xid, relation, old, new)| {
                        Message::Update(Update {
                            xid,
                            relation,
                            old,
                            new,
                        })
                    }),
                (xid.clone(), any::<u32>(), old_tuple()).prop_map(|(xid, relation, old)| {
                    Message::Delete(Delete { xid, relation, old })
                }),
                (
                    xid.clone(),
                    any::<bool>(),
                    any::<bool>(),
                    vec(any::<u32>(), 0..6)
                )
                    .prop_map(|(xid, cascade, restart_identity, relations)| {
                        Message::Truncate(Truncate {
                            xid,
                            cascade,
                            restart_identity,
                            relations,
                        })
                    }),
                (xid, any::<bool>(), lsn(), name(), payload()).prop_map(
                    |(xid, transactional, lsn, prefix, content)| {
                        Message::LogicalMessage(LogicalMessage {
                            xid,
                            transactional,
                            lsn,
                            prefix,
                            content,
                        })
                    }
                ),
            ];
            let begin_commit = prop_oneof![
                (lsn(), time(), any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| {
                    Message::Begin(Begin {
                        final_lsn,
                        commit_time,
                        xid,
                    })
                }),
                (any::<u8>(), lsn(), lsn(), time()).prop_map(
                    |(flags, commit_lsn, end_lsn, commit_time)| Message::Commit(Commit {
                        flags,
                        commit_lsn,
                        end_lsn,
                        commit_time,
                    })
                ),
            ];
            let stream_boundaries = prop_oneof![
                (any::<u32>(), any::<bool>()).prop_map(|(xid, first_segment)| {
                    Message::StreamStart(StreamStart { xid, first_segment })
                }),
                (any::<u32>(), any::<u8>(), lsn(), lsn(), time()).prop_map(
                    |(xid, flags, commit_lsn, end_lsn, commit_time)| {
                        Message::StreamCommit(StreamCommit {
                            xid,
                            flags,
                            commit_lsn,
                            end_lsn,
                            commit_time,
                        })
                    }
                ),
                (any::<u32>(), any::<u32>())
                    .prop_map(|(xid, subxid)| Message::StreamAbort(StreamAbort { xid, subxid })),
            ];
            match (ctx.proto, ctx.in_stream) {
                (ProtocolVersion::V1, _) => prop_oneof![data, begin_commit].boxed(),
                (ProtocolVersion::V2, false) => {
                    prop_oneof![data, begin_commit, stream_boundaries].boxed()
                }
                (ProtocolVersion::V2, true) => {
                    prop_oneof![4 => data, 1 => Just(Message::StreamStop)].boxed()
                }
            }
        }

        fn context_and_message() -> impl Strategy<Value = (Context, Message)> {
            contexts().prop_flat_map(|ctx| (Just(ctx), message(ctx)))
        }

        /// Decoding any bytes either fails or yields a message that encodes to those bytes.
        fn decodes_canonically_or_fails(bytes: &Bytes, ctx: Context) -> Result<(), TestCaseError> {
            if let Ok(message) = decode(bytes, ctx) {
                prop_assert_eq!(&encode(&message, ctx).freeze(), bytes);
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn encode_then_decode_is_identity((ctx, message) in context_and_message()) {
                let bytes = encode(&message, ctx).freeze();
                let decoded = decode(&bytes, ctx);
                prop_assert_eq!(decoded.as_ref(), Ok(&message));
                prop_assert_eq!(encode(&message, ctx).freeze(), bytes);
            }

            #[test]
            fn every_strict_prefix_fails((ctx, message) in context_and_message()) {
                let bytes = encode(&message, ctx).freeze();
                for len in 0..bytes.len() {
                    prop_assert!(decode(&bytes.slice(..len), ctx).is_err());
                }
            }

            #[test]
            fn arbitrary_bytes_never_panic(
                ctx in contexts(),
                tag in prop_oneof![
                    Just(b'B'), Just(b'C'), Just(b'O'), Just(b'R'), Just(b'Y'), Just(b'I'),
                    Just(b'U'), Just(b'D'), Just(b'T'), Just(b'M'), Just(b'S'), Just(b'E'),
                    Just(b'c'), Just(b'A'), any::<u8>()
                ],
                rest in vec(any::<u8>(), 0..128),
            ) {
                // A known tag first, most of the time, so the bodies get exercised.
                let mut raw = vec![tag];
                raw.extend_from_slice(&rest);
                decodes_canonically_or_fails(&Bytes::from(raw), ctx)?;
                decodes_canonically_or_fails(&Bytes::from(rest), ctx)?;
            }

            #[test]
            fn mutated_messages_never_panic(
                (ctx, message) in context_and_message(),
                edits in vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..4),
            ) {
                // Valid messages with a few bytes overwritten, inserted or removed reach far
                // deeper into the decoder than random bytes do.
                let mut raw = encode(&message, ctx).to_vec();
                for (at, byte, how) in edits {
                    match how {
                        0 if !raw.is_empty() => {
                            let i = at.index(raw.len());
                            raw[i] = byte;
                        }
                        1 => {
                            let i = at.index(raw.len() + 1);
                            raw.insert(i, byte);
                        }
                        _ if !raw.is_empty() => {
                            let i = at.index(raw.len());
                            raw.remove(i);
                        }
                        _ => {}
                    }
                }
                for ctx in [V1, V2, V2_STREAM] {
                    decodes_canonically_or_fails(&Bytes::from(raw.clone()), ctx)?;
                }
            }
        }
    }
}
