//! Replay: applies a tenant's captured logical-replication changes to its recovery database.
//!
//! Point-in-time restore loads the snapshot, then replays the changes committed after it. This
//! module is the engine that applies them; which changes (and transaction boundaries) is the
//! caller's business. The caller opens the transaction and commits it, so a replay either lands
//! whole or not at all, and no trigger or other session can see a half-replayed tenant.
//!
//! Why it looks the way it does:
//! - Values arrive as each type's *text output* (pgoutput without `binary`), so they go back in
//!   as text: bound parameters in text format, or COPY text rows. The server then parses each one
//!   with the target column's own input function, which is what makes every type (arrays, jsonb,
//!   enums, domains, ranges, user types whose oids differ between clusters) round-trip exactly
//!   without this module knowing any of them. Nothing is ever interpolated into SQL but
//!   identifiers.
//! - Speed comes from not waiting: consecutive inserts into one table stream into a single
//!   `COPY … FROM STDIN` (short runs, where COPY's own round trips would cost more than they save,
//!   become pipelined INSERTs), and updates and deletes are pipelined — up to
//!   [`MAX_IN_FLIGHT`] executes on the wire before the first answer is awaited.
//! - Pipelining keeps stream order without any per-key bookkeeping: each request is sent at the
//!   moment it is created (its future is polled once right away, which is when tokio-postgres
//!   writes it to the connection's queue), and PostgreSQL executes the requests of one connection
//!   strictly in the order they arrive. So a later change to the same row, a key swap through a
//!   temporary value, or a unique value moved from one row to another, all behave exactly as
//!   they did on the source. The one rule that matters is never to await *another* request while
//!   pipelined ones are unanswered: tokio-postgres stops reading the socket while an answer waits
//!   for a future nobody polls. Every catalog query, prepare, COPY and TRUNCATE therefore drains
//!   the pipeline first.
//! - An update or delete must hit exactly one row. In an exact restore the row is there; a miss
//!   means the stream does not continue this snapshot, and silently skipping it would hand back a
//!   database that looks restored but is not (DESIGN.md, invariant 2).
//! - Memory is bounded whatever the transaction size (invariant 6): a COPY run is streamed in
//!   ~1 MiB chunks, and the pipeline holds at most [`MAX_IN_FLIGHT`] changes and
//!   [`MAX_IN_FLIGHT_BYTES`] of values.
//! - Sequences are not part of the change stream, so [`Replayer::finish`] moves each sequence
//!   owned by a written column past every value the stream used — including values of rows that
//!   were deleted again, which a plain `max(column)` would miss — and never backwards.

use std::collections::{HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use bytes::{BufMut, Bytes, BytesMut};
use futures::stream::FuturesOrdered;
use futures::{SinkExt, StreamExt};
use tokio_postgres::types::{Format, IsNull, Kind, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, CopyInSink, Statement};

use crate::pg::pgoutput::{
    Delete, Insert, Message, Oid, OldTuple, Relation, ReplicaIdentity, Truncate, Tuple, Update,
    Value,
};
use crate::pg::quote_ident;
use crate::pg::sqlstate;

/// Most pipelined executes awaiting their answer.
pub const MAX_IN_FLIGHT: usize = 256;
/// Most bytes of values held by pipelined executes awaiting their answer.
pub const MAX_IN_FLIGHT_BYTES: usize = 16 << 20;
/// COPY data is sent to the server in chunks of about this size.
const COPY_CHUNK_BYTES: usize = 1 << 20;
/// Runs of at most this many inserts become pipelined INSERTs instead of a COPY: a COPY waits
/// for two answers (its start, its end), a pipelined INSERT for none.
const SMALL_RUN_ROWS: usize = 8;
/// Prepared statements kept; beyond this the cache is emptied (update column sets vary with
/// which TOASTed columns were left unchanged, so their number is not bounded by the schema).
const MAX_STATEMENTS: usize = 1024;
/// Longest key value shown in an error message.
const MAX_SHOWN_VALUE: usize = 64;

/// Changes applied so far. `truncates` counts truncated tables.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ReplayStats {
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
    pub truncates: u64,
}

/// Why a change could not be applied. After any error the transaction is unusable: the caller
/// rolls it back (and drops the recovery database) and drops the [`Replayer`].
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(
        "a change refers to relation oid {oid}, which no earlier Relation message defines: the change stream is incomplete or out of order; check the repository with `updog-backup verify --deep`"
    )]
    UnknownRelation { oid: Oid },
    #[error(
        "table {table} does not exist in the recovery database: it was created (or renamed) after the snapshot was taken; restore to a time after a later snapshot"
    )]
    MissingTable { table: String },
    #[error(
        "table {table}: {message}; the table was altered after the snapshot was taken: restore to a time after a later snapshot"
    )]
    ColumnMismatch { table: String, message: String },
    #[error(
        "table {table}: {op} carries {found} column values but the table's Relation message defines {expected} columns: the change stream is corrupt; check the repository with `updog-backup verify --deep`"
    )]
    TupleMismatch {
        table: String,
        op: &'static str,
        expected: usize,
        found: usize,
    },
    #[error(
        "table {table}: cannot identify the row of {op}: {reason}; the source table needs a primary key, a REPLICA IDENTITY USING INDEX or REPLICA IDENTITY FULL for its changes to be restorable"
    )]
    NoKey {
        table: String,
        op: &'static str,
        reason: String,
    },
    #[error(
        "table {table}: {op} of the row with {key} matched no row in the recovery database, but in an exact restore the row exists: the change stream does not continue the snapshot it is replayed onto; restore from another snapshot, or check the repository with `updog-backup verify --deep`"
    )]
    RowNotFound {
        table: String,
        op: &'static str,
        key: String,
    },
    #[error(
        "table {table}: {op} of the row with {key} matched {count} rows, expected exactly one: the recovery database holds duplicate keys the source could not have; restore from another snapshot"
    )]
    AmbiguousRow {
        table: String,
        op: &'static str,
        key: String,
        count: u64,
    },
    #[error(
        "table {table}: {op} failed in the recovery database: {message}; the change does not fit the restored schema or data: restore to a time after a later snapshot, or report this message"
    )]
    Database {
        table: String,
        op: &'static str,
        message: String,
    },
    #[error("table {table}: {what} cannot be replayed: {hint}")]
    Unsupported {
        table: String,
        what: String,
        hint: String,
    },
}

impl ReplayError {
    fn database(table: &str, op: &'static str, error: &tokio_postgres::Error) -> ReplayError {
        ReplayError::Database {
            table: table.to_string(),
            op,
            message: sqlstate::describe(error),
        }
    }
}

/// A value bound in TEXT format whatever the parameter's type, so that the server parses it
/// with the column's own input function (the stream carries each type's text output).
struct TextParam(Option<Bytes>);

/// Never prints the value: it is tenant data, and parameters end up in debug logs.
impl fmt::Debug for TextParam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(b) => write!(f, "TextParam({} bytes)", b.len()),
            None => f.write_str("TextParam(NULL)"),
        }
    }
}

impl ToSql for TextParam {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0 {
            Some(bytes) => {
                out.extend_from_slice(bytes);
                Ok(IsNull::No)
            }
            None => Ok(IsNull::Yes),
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    to_sql_checked!();
}

/// Appends `value` to COPY text data: backslash, tab, newline and carriage return escaped (the
/// other bytes, UTF-8 included, stand for themselves).
pub(crate) fn copy_escape(out: &mut BytesMut, value: &[u8]) {
    let mut start = 0;
    for (i, &b) in value.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        out.extend_from_slice(&value[start..i]);
        out.extend_from_slice(escaped);
        start = i + 1;
    }
    out.extend_from_slice(&value[start..]);
}

/// Appends one COPY text row (tab-separated, `\N` for NULL, newline-terminated).
fn copy_row<'v>(out: &mut BytesMut, values: impl Iterator<Item = Option<&'v Bytes>>) {
    for (i, value) in values.enumerate() {
        if i > 0 {
            out.put_u8(b'\t');
        }
        match value {
            Some(v) => copy_escape(out, v),
            None => out.extend_from_slice(b"\\N"),
        }
    }
    out.put_u8(b'\n');
}

/// One column of a target table.
#[derive(Debug)]
struct TargetColumn {
    name: String,
    type_oid: Oid,
    /// A generated column: the server computes it, it is never written.
    generated: bool,
    /// `GENERATED ALWAYS AS IDENTITY`: an UPDATE cannot set it.
    identity_always: bool,
}

/// A sequence owned by a column (serial or identity).
#[derive(Debug)]
struct OwnedSequence {
    column: usize,
    oid: Oid,
    /// `regclass` output: quoted and qualified as needed for this session.
    sql_name: String,
    ascending: bool,
}

/// What replay needs of a table in the recovery database, read once.
#[derive(Debug)]
struct Table {
    oid: Oid,
    /// `schema.name`, for messages.
    display: String,
    /// Quoted, qualified.
    sql: String,
    partitioned: bool,
    columns: Vec<TargetColumn>,
    primary_key: Option<Vec<usize>>,
    /// Columns of every valid index, for the no-index warning.
    indexes: Vec<Vec<usize>>,
    sequences: Vec<OwnedSequence>,
}

impl Table {
    /// `ONLY t` for ordinary tables: a change is for this very relation, never its inheritance
    /// children (which have changes of their own); partitioned tables refuse ONLY.
    fn only(&self) -> String {
        if self.partitioned {
            self.sql.clone()
        } else {
            format!("ONLY {}", self.sql)
        }
    }

    fn column_sql(&self, index: usize) -> String {
        quote_ident(&self.columns[index].name)
    }

    fn param_type(&self, index: usize) -> Type {
        let oid = self.columns[index].type_oid;
        // Only the oid is sent (in Parse); tokio-postgres looks unknown ones up itself.
        Type::from_oid(oid)
            .unwrap_or_else(|| Type::new(format!("oid{oid}"), oid, Kind::Simple, String::new()))
    }
}

/// A Relation message bound to its target table.
#[derive(Debug)]
struct Bound {
    relation: Arc<Relation>,
    table: Arc<Table>,
    /// Relation column → target column.
    target: Vec<usize>,
    /// Relation columns written by inserts (those not generated in the target).
    written: Vec<usize>,
    /// The same, as target columns (the statement cache's key).
    written_target: Vec<u16>,
    /// The target's primary key as relation columns, when the relation has all of them.
    pk: Option<Vec<usize>>,
    /// Whether every primary-key column is a replica-identity column: then an old key tuple
    /// holds the primary key, and its absence means the primary key did not change.
    pk_in_identity: bool,
    /// Replica-identity columns of the relation (none with REPLICA IDENTITY FULL).
    identity: Vec<usize>,
}

impl Bound {
    fn new(relation: Arc<Relation>, table: Arc<Table>) -> Result<Bound, ReplayError> {
        let mut target = Vec::with_capacity(relation.columns.len());
        let mut missing = Vec::new();
        for column in &relation.columns {
            match table.columns.iter().position(|c| c.name == column.name) {
                Some(i) => target.push(i),
                None => missing.push(column.name.as_str()),
            }
        }
        if !missing.is_empty() {
            return Err(ReplayError::ColumnMismatch {
                table: table.display.clone(),
                message: format!(
                    "the recovery database's table has no column {}",
                    missing.join(", ")
                ),
            });
        }
        // A column the source dropped would be left holding values (or NULLs, or fail a NOT
        // NULL) that the source no longer has: not the source's state either.
        let dropped: Vec<&str> = table
            .columns
            .iter()
            .enumerate()
            .filter(|(i, c)| !c.generated && !target.contains(i))
            .map(|(_, c)| c.name.as_str())
            .collect();
        if !dropped.is_empty() {
            return Err(ReplayError::ColumnMismatch {
                table: table.display.clone(),
                message: format!(
                    "the source's table no longer has column {}",
                    dropped.join(", ")
                ),
            });
        }
        let written: Vec<usize> = (0..target.len())
            .filter(|&i| !table.columns[target[i]].generated)
            .collect();
        let written_target = written.iter().map(|&i| target[i] as u16).collect();
        // With REPLICA IDENTITY FULL every column is flagged as a key column: none is one.
        let identity: Vec<usize> = if relation.replica_identity == ReplicaIdentity::Full {
            Vec::new()
        } else {
            (0..relation.columns.len())
                .filter(|&i| relation.columns[i].part_of_key)
                .collect()
        };
        let pk = table.primary_key.as_ref().and_then(|pk| {
            pk.iter()
                .map(|t| target.iter().position(|x| x == t))
                .collect::<Option<Vec<usize>>>()
        });
        let pk_in_identity = pk
            .as_ref()
            .is_some_and(|pk| pk.iter().all(|i| identity.contains(i)));
        Ok(Bound {
            relation,
            table,
            target,
            written,
            written_target,
            pk,
            pk_in_identity,
            identity,
        })
    }

    fn check_len(&self, op: &'static str, tuple: &Tuple) -> Result<(), ReplayError> {
        let expected = self.relation.columns.len();
        if tuple.0.len() == expected {
            Ok(())
        } else {
            Err(ReplayError::TupleMismatch {
                table: self.table.display.clone(),
                op,
                expected,
                found: tuple.0.len(),
            })
        }
    }

    fn column_name(&self, rel_column: usize) -> &str {
        &self.relation.columns[rel_column].name
    }

    /// A value to write: text or NULL.
    fn writable(
        &self,
        op: &'static str,
        rel_column: usize,
        value: &Value,
    ) -> Result<Option<Bytes>, ReplayError> {
        match value {
            Value::Text(b) => Ok(Some(b.clone())),
            Value::Null => Ok(None),
            Value::UnchangedToast => Err(self.unsupported(
                format!("{op} with an unchanged-TOAST marker for column {}", self.column_name(rel_column)),
                "only updates may leave TOASTed values out; the change stream is corrupt, check it with `updog-backup verify --deep`",
            )),
            Value::Binary(_) => Err(self.binary(rel_column)),
        }
    }

    fn binary(&self, rel_column: usize) -> ReplayError {
        self.unsupported(
            format!(
                "a binary-format value (column {})",
                self.column_name(rel_column)
            ),
            "the capture must use pgoutput's text format (no `binary` option)",
        )
    }

    fn unsupported(&self, what: String, hint: &str) -> ReplayError {
        ReplayError::Unsupported {
            table: self.table.display.clone(),
            what,
            hint: hint.to_string(),
        }
    }

    /// How to find the row of an update or delete, and with which values.
    fn identify(
        &self,
        op: &'static str,
        old: Option<&OldTuple>,
        new: Option<&Tuple>,
    ) -> Result<Identity, ReplayError> {
        let no_key = |reason: &str| ReplayError::NoKey {
            table: self.table.display.clone(),
            op,
            reason: reason.to_string(),
        };
        let (columns, tuple, full) = match old {
            Some(OldTuple::Full(t)) => match (&self.pk, self.identity.is_empty()) {
                (Some(pk), _) => (pk.clone(), t, false),
                (None, false) => (self.identity.clone(), t, false),
                (None, true) => {
                    let all = (0..t.0.len())
                        .filter(|&i| !matches!(t.0[i], Value::UnchangedToast))
                        .collect::<Vec<_>>();
                    (all, t, true)
                }
            },
            Some(OldTuple::Key(t)) => match &self.pk {
                Some(pk) if self.pk_in_identity => (pk.clone(), t, false),
                _ if !self.identity.is_empty() => (self.identity.clone(), t, false),
                _ => {
                    return Err(no_key(
                        "the change carries an old key but the Relation message marks no key column",
                    ));
                }
            },
            None => {
                let new = new.ok_or_else(|| no_key("the change carries no old row"))?;
                match &self.pk {
                    Some(pk) if self.pk_in_identity => (pk.clone(), new, false),
                    _ if !self.identity.is_empty() => (self.identity.clone(), new, false),
                    _ => {
                        return Err(no_key(
                            "the table has neither a primary key covered by its replica identity nor key columns, and the change carries no old row",
                        ));
                    }
                }
            }
        };
        if columns.is_empty() {
            return Err(no_key("the old row has no comparable column"));
        }
        let mut values = Vec::with_capacity(columns.len());
        for &i in &columns {
            let value = match &tuple.0[i] {
                Value::Text(b) => Some(b.clone()),
                Value::Null if full => None,
                Value::Null | Value::UnchangedToast => {
                    return Err(no_key(&format!(
                        "key column {} has no value in the change",
                        self.column_name(i)
                    )));
                }
                Value::Binary(_) => return Err(self.binary(i)),
            };
            values.push(value);
        }
        let target = columns.iter().map(|&i| self.target[i] as u16).collect();
        Ok(Identity {
            target,
            from_new: old.is_none(),
            values,
            full,
        })
    }
}

/// Which row an update or delete applies to.
struct Identity {
    /// Target columns compared.
    target: Vec<u16>,
    /// The values come from the new row (the change carries no old row): these columns did
    /// not change.
    from_new: bool,
    values: Vec<Option<Bytes>>,
    /// No key: every old column compared, one matching row taken.
    full: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum StatementKind {
    Insert,
    Copy,
    Update,
    Delete,
}

impl StatementKind {
    fn op(self) -> &'static str {
        match self {
            StatementKind::Insert | StatementKind::Copy => "an insert",
            StatementKind::Update => "an update",
            StatementKind::Delete => "a delete",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct StatementKey {
    table: Oid,
    kind: StatementKind,
    set: Vec<u16>,
    filter: Vec<u16>,
    full: bool,
}

/// A prepared statement with what its errors need to say.
struct Prepared {
    statement: Statement,
    table: String,
    op: &'static str,
    /// Parameters before the filter's.
    set_len: usize,
    filter_names: Vec<String>,
}

impl Prepared {
    fn describe_key(&self, params: &[TextParam]) -> String {
        let mut out = String::new();
        for (i, (name, value)) in self
            .filter_names
            .iter()
            .zip(&params[self.set_len.min(params.len())..])
            .enumerate()
        {
            if i > 0 {
                out.push_str(", ");
            }
            let _ = write!(out, "{name} = ");
            match &value.0 {
                None => out.push_str("NULL"),
                Some(b) => {
                    let text = String::from_utf8_lossy(b);
                    if text.chars().count() > MAX_SHOWN_VALUE {
                        let cut: String = text.chars().take(MAX_SHOWN_VALUE).collect();
                        let _ = write!(out, "'{cut}…'");
                    } else {
                        let _ = write!(out, "'{text}'");
                    }
                }
            }
        }
        if self.filter_names.is_empty() {
            out.push_str("the values of the insert");
        }
        out
    }

    /// Checks that one execute affected exactly one row.
    fn check(&self, params: &[TextParam], count: u64) -> Result<(), ReplayError> {
        match count {
            1 => Ok(()),
            0 => Err(ReplayError::RowNotFound {
                table: self.table.clone(),
                op: self.op,
                key: self.describe_key(params),
            }),
            count => Err(ReplayError::AmbiguousRow {
                table: self.table.clone(),
                op: self.op,
                key: self.describe_key(params),
                count,
            }),
        }
    }
}

/// A pipelined execute: resolves to the value bytes it held.
type Pending<'a> = Pin<Box<dyn Future<Output = Result<usize, ReplayError>> + Send + 'a>>;

/// Consecutive inserts into one table with one column set.
struct InsertRun {
    bound: Arc<Bound>,
    rows: u64,
    /// Values of the first rows, while the run is short enough for pipelined INSERTs.
    small: Vec<Vec<Option<Bytes>>>,
    /// COPY text not yet sent; used once the run is longer than [`SMALL_RUN_ROWS`].
    copy: Option<BytesMut>,
    sink: Option<Pin<Box<CopyInSink<Bytes>>>>,
}

/// Applies decoded pgoutput changes to a recovery database, in stream order.
pub struct Replayer<'a> {
    client: &'a Client,
    /// The last Relation message of each oid.
    relations: HashMap<Oid, Arc<Relation>>,
    /// Relations bound to their target table (dropped when a different definition arrives).
    bound: HashMap<Oid, Arc<Bound>>,
    /// Target tables by (schema, name).
    tables: HashMap<(String, String), Arc<Table>>,
    statements: HashMap<StatementKey, Arc<Prepared>>,
    run: Option<InsertRun>,
    in_flight: FuturesOrdered<Pending<'a>>,
    in_flight_bytes: usize,
    /// Tables that got inserts or updates, whose owned sequences `finish` moves.
    written: HashMap<Oid, Arc<Table>>,
    /// Highest (lowest, for descending sequences) value the stream wrote to each
    /// sequence-owning column: (table, column) → value.
    sequence_values: HashMap<(Oid, usize), i64>,
    /// Tables already warned about for having no index on their key.
    warned_no_index: HashSet<Oid>,
    stats: ReplayStats,
}

impl<'a> Replayer<'a> {
    /// `client` is connected to the recovery database and is ALREADY inside a transaction
    /// (BEGIN issued by the caller; the caller COMMITs). Reads what it needs of the target's
    /// catalog lazily (primary keys, column names/types, owned sequences).
    pub fn new(client: &'a Client) -> Self {
        Replayer {
            client,
            relations: HashMap::new(),
            bound: HashMap::new(),
            tables: HashMap::new(),
            statements: HashMap::new(),
            run: None,
            in_flight: FuturesOrdered::new(),
            in_flight_bytes: 0,
            written: HashMap::new(),
            sequence_values: HashMap::new(),
            warned_no_index: HashSet::new(),
            stats: ReplayStats::default(),
        }
    }

    /// Changes accepted so far (some may still be in flight).
    pub fn stats(&self) -> &ReplayStats {
        &self.stats
    }

    /// Applies one message, in stream order. Relation messages (re)define an oid (a later one
    /// for the same oid replaces the earlier). Insert/Update/Delete/Truncate apply to the
    /// relation defined by the last Relation message for their oid. Begin, Commit and anything
    /// else are ignored (the caller handles transaction boundaries).
    ///
    /// A change may still be in flight when this returns; its error, if any, is reported by a
    /// later call or by [`Replayer::finish`].
    pub async fn apply(&mut self, message: &Message) -> Result<(), ReplayError> {
        match message {
            Message::Relation(r) => {
                self.define(r);
                Ok(())
            }
            Message::Insert(m) => self.insert(m).await,
            Message::Update(m) => self.update(m).await,
            Message::Delete(m) => self.delete(m).await,
            Message::Truncate(m) => self.truncate(m).await,
            _ => Ok(()),
        }
    }

    /// Flushes pending batches and moves every sequence owned by a column of a table that got
    /// inserts/updates forward so it hands out no value already used:
    /// setval(seq, greatest(max(col), current last_value)) — never backwards. Values the stream
    /// wrote count too, even when their rows were deleted since.
    pub async fn finish(mut self) -> Result<ReplayStats, ReplayError> {
        self.flush_all().await?;
        let mut tables: Vec<Arc<Table>> = self.written.values().cloned().collect();
        tables.sort_by(|a, b| a.display.cmp(&b.display));
        for table in tables {
            for seq in &table.sequences {
                let seen = self.sequence_values.get(&(table.oid, seq.column)).copied();
                move_sequence(self.client, &table, seq, seen).await?;
            }
        }
        tracing::debug!(stats = ?self.stats, "replay finished");
        Ok(self.stats)
    }

    fn define(&mut self, relation: &Relation) {
        let same = self.relations.get(&relation.oid).is_some_and(|r| {
            r.namespace == relation.namespace
                && r.name == relation.name
                && r.replica_identity == relation.replica_identity
                && r.columns == relation.columns
        });
        if !same {
            self.relations
                .insert(relation.oid, Arc::new(relation.clone()));
            self.bound.remove(&relation.oid);
        }
    }

    async fn bound(&mut self, oid: Oid) -> Result<Arc<Bound>, ReplayError> {
        if let Some(b) = self.bound.get(&oid) {
            return Ok(b.clone());
        }
        let relation = self
            .relations
            .get(&oid)
            .cloned()
            .ok_or(ReplayError::UnknownRelation { oid })?;
        let table = self.table(&relation.namespace, &relation.name).await?;
        let bound = Arc::new(Bound::new(relation, table)?);
        tracing::debug!(
            oid,
            table = %bound.table.display,
            columns = bound.relation.columns.len(),
            primary_key = bound.pk.is_some(),
            "relation bound to its recovery table"
        );
        self.bound.insert(oid, bound.clone());
        Ok(bound)
    }

    async fn table(&mut self, schema: &str, name: &str) -> Result<Arc<Table>, ReplayError> {
        let cache_key = (schema.to_string(), name.to_string());
        if let Some(t) = self.tables.get(&cache_key) {
            return Ok(t.clone());
        }
        self.flush_all().await?;
        let table = Arc::new(load_table(self.client, schema, name).await?);
        self.tables.insert(cache_key, table.clone());
        Ok(table)
    }

    async fn insert(&mut self, m: &Insert) -> Result<(), ReplayError> {
        let bound = self.bound(m.relation).await?;
        bound.check_len("an insert", &m.new)?;
        let mut values = Vec::with_capacity(bound.written.len());
        for &i in &bound.written {
            values.push(bound.writable("an insert", i, &m.new.0[i])?);
        }
        self.track_sequences(&bound, &m.new);
        let continues = self.run.as_ref().is_some_and(|run| {
            Arc::ptr_eq(&run.bound, &bound)
                || (run.bound.table.oid == bound.table.oid
                    && run.bound.written_target == bound.written_target)
        });
        if !continues {
            self.flush_run().await?;
        }
        self.stats.inserts += 1;
        let run = self.run.get_or_insert_with(|| InsertRun {
            bound: bound.clone(),
            rows: 0,
            small: Vec::new(),
            copy: None,
            sink: None,
        });
        run.rows += 1;
        if let Some(buf) = run.copy.as_mut() {
            copy_row(buf, values.iter().map(Option::as_ref));
            if buf.len() >= COPY_CHUNK_BYTES {
                self.send_copy_chunk().await?;
            }
        } else {
            run.small.push(values);
            if run.small.len() > SMALL_RUN_ROWS {
                // Long enough for COPY: the pipeline must be empty before it starts.
                let mut buf = BytesMut::with_capacity(COPY_CHUNK_BYTES + (64 << 10));
                for row in run.small.drain(..) {
                    copy_row(&mut buf, row.iter().map(Option::as_ref));
                }
                run.copy = Some(buf);
            }
        }
        Ok(())
    }

    async fn update(&mut self, m: &Update) -> Result<(), ReplayError> {
        const OP: &str = "an update";
        let bound = self.bound(m.relation).await?;
        bound.check_len(OP, &m.new)?;
        if let Some(old) = &m.old {
            bound.check_len(OP, old.tuple())?;
        }
        self.flush_run().await?;
        let identity = bound.identify(OP, m.old.as_ref(), Some(&m.new))?;
        let table = &bound.table;
        let mut set = Vec::with_capacity(bound.written.len());
        let mut params = Vec::with_capacity(bound.written.len() + identity.values.len());
        for &i in &bound.written {
            let value = match &m.new.0[i] {
                Value::UnchangedToast => continue,
                Value::Text(b) => Some(b.clone()),
                Value::Null => None,
                Value::Binary(_) => return Err(bound.binary(i)),
            };
            let t = bound.target[i];
            // Assigning a column its own value costs the server a parse and a comparison for
            // nothing: leave out the columns the change shows unchanged.
            if identity.from_new && identity.target.contains(&(t as u16)) {
                continue;
            }
            match old_value(&bound, m.old.as_ref(), i) {
                Some(old) if old == value.as_ref() => continue,
                Some(_) if table.columns[t].identity_always => {
                    // `UPDATE … SET` cannot write a GENERATED ALWAYS identity column (it only
                    // changes on the source through `SET … = DEFAULT`).
                    return Err(bound.unsupported(
                        format!(
                            "an update that changes GENERATED ALWAYS identity column {}",
                            table.columns[t].name
                        ),
                        "PostgreSQL refuses to set such a column; make it GENERATED BY DEFAULT on the source",
                    ));
                }
                // Without its old value in the change, a GENERATED ALWAYS identity column is
                // left alone: it is not a key, and it almost never changes.
                None if table.columns[t].identity_always => continue,
                _ => {}
            }
            set.push(t as u16);
            params.push(TextParam(value));
        }
        params.extend(identity.values.into_iter().map(TextParam));
        let key = StatementKey {
            table: table.oid,
            kind: StatementKind::Update,
            set,
            filter: identity.target,
            full: identity.full,
        };
        self.warn_without_index(&bound, &key);
        self.track_sequences(&bound, &m.new);
        self.written.insert(table.oid, table.clone());
        self.stats.updates += 1;
        self.execute(table, key, params).await
    }

    async fn delete(&mut self, m: &Delete) -> Result<(), ReplayError> {
        const OP: &str = "a delete";
        let bound = self.bound(m.relation).await?;
        bound.check_len(OP, m.old.tuple())?;
        self.flush_run().await?;
        let identity = bound.identify(OP, Some(&m.old), None)?;
        let key = StatementKey {
            table: bound.table.oid,
            kind: StatementKind::Delete,
            set: Vec::new(),
            filter: identity.target,
            full: identity.full,
        };
        self.warn_without_index(&bound, &key);
        let params = identity.values.into_iter().map(TextParam).collect();
        self.stats.deletes += 1;
        self.execute(&bound.table, key, params).await
    }

    async fn truncate(&mut self, m: &Truncate) -> Result<(), ReplayError> {
        let mut tables: Vec<Arc<Table>> = Vec::with_capacity(m.relations.len());
        for &oid in &m.relations {
            let bound = self.bound(oid).await?;
            if !tables.iter().any(|t| t.oid == bound.table.oid) {
                tables.push(bound.table.clone());
            }
        }
        if tables.is_empty() {
            return Ok(());
        }
        self.flush_all().await?;
        let mut sql = String::from("TRUNCATE ");
        for (i, table) in tables.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&table.only());
        }
        if m.restart_identity {
            sql.push_str(" RESTART IDENTITY");
        }
        if m.cascade {
            sql.push_str(" CASCADE");
        }
        let names = tables
            .iter()
            .map(|t| t.display.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        self.client
            .batch_execute(&sql)
            .await
            .map_err(|e| ReplayError::database(&names, "a truncate", &e))?;
        if m.restart_identity {
            // The source restarted these sequences: what the stream wrote before no longer
            // constrains them.
            for table in &tables {
                self.sequence_values.retain(|(t, _), _| *t != table.oid);
            }
        }
        tracing::debug!(tables = %names, cascade = m.cascade, restart_identity = m.restart_identity, "truncated");
        self.stats.truncates += tables.len() as u64;
        Ok(())
    }

    /// Remembers the extreme value written to each sequence-owning column.
    fn track_sequences(&mut self, bound: &Bound, tuple: &Tuple) {
        let table = &bound.table;
        if table.sequences.is_empty() {
            return;
        }
        self.written.insert(table.oid, table.clone());
        for seq in &table.sequences {
            let Some(i) = bound.target.iter().position(|&t| t == seq.column) else {
                continue;
            };
            let Value::Text(text) = &tuple.0[i] else {
                continue;
            };
            let Some(value) = std::str::from_utf8(text)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
            else {
                continue;
            };
            self.sequence_values
                .entry((table.oid, seq.column))
                .and_modify(|v| {
                    *v = if seq.ascending {
                        (*v).max(value)
                    } else {
                        (*v).min(value)
                    }
                })
                .or_insert(value);
        }
    }

    /// Logs once per table when key lookups will scan it (e.g. a replay run before the
    /// snapshot's post-data created the indexes).
    fn warn_without_index(&mut self, bound: &Bound, key: &StatementKey) {
        let table = &bound.table;
        if key.full || self.warned_no_index.contains(&table.oid) {
            return;
        }
        let usable = table.indexes.iter().any(|columns| {
            columns
                .first()
                .is_some_and(|c| key.filter.contains(&(*c as u16)))
        });
        if !usable {
            self.warned_no_index.insert(table.oid);
            tracing::warn!(
                table = %table.display,
                "no index on the key columns: every update and delete of this table scans it; create the primary key (or the replica identity index) before replaying"
            );
        }
    }

    /// Queues one execute of the statement for `key`, preparing it first if needed.
    async fn execute(
        &mut self,
        table: &Table,
        key: StatementKey,
        params: Vec<TextParam>,
    ) -> Result<(), ReplayError> {
        let prepared = self.prepared(table, key).await?;
        let bytes: usize = params
            .iter()
            .map(|p| p.0.as_ref().map_or(0, Bytes::len) + 16)
            .sum();
        let client = self.client;
        let mut pending: Pending<'a> = Box::pin(async move {
            let count = client
                .execute_raw(&prepared.statement, params.iter())
                .await
                .map_err(|e| ReplayError::database(&prepared.table, prepared.op, &e))?;
            prepared.check(&params, count)?;
            Ok(bytes)
        });
        // The first poll writes the request to the connection's queue: order is fixed now.
        if let Poll::Ready(result) = futures::poll!(pending.as_mut()) {
            return result.map(|_| ());
        }
        self.in_flight.push_back(pending);
        self.in_flight_bytes += bytes;
        while self.in_flight.len() >= MAX_IN_FLIGHT || self.in_flight_bytes > MAX_IN_FLIGHT_BYTES {
            self.complete_one().await?;
        }
        Ok(())
    }

    async fn complete_one(&mut self) -> Result<bool, ReplayError> {
        match self.in_flight.next().await {
            Some(result) => {
                self.in_flight_bytes = self.in_flight_bytes.saturating_sub(result?);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Waits for every pipelined execute, in order; the first failure is the error.
    async fn drain(&mut self) -> Result<(), ReplayError> {
        while self.complete_one().await? {}
        Ok(())
    }

    async fn flush_all(&mut self) -> Result<(), ReplayError> {
        self.flush_run().await?;
        self.drain().await
    }

    async fn prepared(
        &mut self,
        table: &Table,
        key: StatementKey,
    ) -> Result<Arc<Prepared>, ReplayError> {
        if let Some(p) = self.statements.get(&key) {
            return Ok(p.clone());
        }
        // Preparing is a request of its own: nothing may be waiting for an answer before it.
        self.drain().await?;
        let (sql, types) = statement_sql(table, &key);
        tracing::debug!(table = %table.display, sql = %sql, "preparing");
        let statement = self
            .client
            .prepare_typed(&sql, &types)
            .await
            .map_err(|e| ReplayError::database(&table.display, key.kind.op(), &e))?;
        let prepared = Arc::new(Prepared {
            statement,
            table: table.display.clone(),
            op: key.kind.op(),
            set_len: key.set.len(),
            filter_names: key
                .filter
                .iter()
                .map(|&c| table.columns[c as usize].name.clone())
                .collect(),
        });
        if self.statements.len() >= MAX_STATEMENTS {
            self.statements.clear();
        }
        self.statements.insert(key, prepared.clone());
        Ok(prepared)
    }

    /// Sends the buffered COPY text, starting the COPY if needed.
    async fn send_copy_chunk(&mut self) -> Result<(), ReplayError> {
        let needs_start = self.run.as_ref().is_some_and(|r| r.sink.is_none());
        if needs_start {
            self.drain().await?;
            let Some(run) = self.run.as_ref() else {
                return Ok(());
            };
            let key = StatementKey {
                table: run.bound.table.oid,
                kind: StatementKind::Copy,
                set: run.bound.written_target.clone(),
                filter: Vec::new(),
                full: false,
            };
            let table = run.bound.table.clone();
            let prepared = self.prepared(&table, key).await?;
            let sink = self
                .client
                .copy_in::<_, Bytes>(&prepared.statement)
                .await
                .map_err(|e| ReplayError::database(&table.display, "an insert", &e))?;
            if let Some(run) = self.run.as_mut() {
                run.sink = Some(Box::pin(sink));
            }
        }
        let Some(run) = self.run.as_mut() else {
            return Ok(());
        };
        let (Some(buf), Some(sink)) = (run.copy.as_mut(), run.sink.as_mut()) else {
            return Ok(());
        };
        if buf.is_empty() {
            return Ok(());
        }
        let chunk = buf.split().freeze();
        sink.send(chunk)
            .await
            .map_err(|e| ReplayError::database(&run.bound.table.display, "an insert", &e))
    }

    /// Applies the pending insert run: pipelined INSERTs for a short one, the end of its COPY
    /// for a long one (whose row count is checked).
    async fn flush_run(&mut self) -> Result<(), ReplayError> {
        let copying = match &self.run {
            None => return Ok(()),
            Some(run) => run.copy.is_some(),
        };
        if copying {
            self.send_copy_chunk().await?;
        }
        let Some(mut run) = self.run.take() else {
            return Ok(());
        };
        let table_name = run.bound.table.display.clone();
        if !copying {
            let key = StatementKey {
                table: run.bound.table.oid,
                kind: StatementKind::Insert,
                set: run.bound.written_target.clone(),
                filter: Vec::new(),
                full: false,
            };
            for row in run.small {
                let params = row.into_iter().map(TextParam).collect();
                self.execute(&run.bound.table, key.clone(), params).await?;
            }
            return Ok(());
        }
        let mut sink = run.sink.take().ok_or_else(|| ReplayError::Database {
            table: table_name.clone(),
            op: "an insert",
            message: "the COPY of the run was never started (internal error)".into(),
        })?;
        let loaded = sink
            .as_mut()
            .finish()
            .await
            .map_err(|e| ReplayError::database(&table_name, "an insert", &e))?;
        if loaded != run.rows {
            return Err(ReplayError::Database {
                table: table_name,
                op: "an insert",
                message: format!("COPY loaded {loaded} rows, {} were sent", run.rows),
            });
        }
        tracing::debug!(table = %table_name, rows = loaded, "insert run copied");
        Ok(())
    }
}

/// Moves `seq` forward past the column's largest value (in the table, or written by the
/// stream) when its next value would not be past it already.
async fn move_sequence(
    client: &Client,
    table: &Table,
    seq: &OwnedSequence,
    seen: Option<i64>,
) -> Result<(), ReplayError> {
    const OP: &str = "moving an owned sequence forward";
    let column = table.column_sql(seq.column);
    let extreme = if seq.ascending { "max" } else { "min" };
    // Every table of an inheritance tree may take values from the same sequence.
    let sql = format!(
        "SELECT (SELECT {extreme}({column})::int8 FROM {}), last_value, is_called FROM {}",
        table.sql, seq.sql_name
    );
    let row = client
        .query_one(&sql, &[])
        .await
        .map_err(|e| ReplayError::database(&table.display, OP, &e))?;
    let in_table: Option<i64> = row.get(0);
    let last_value: i64 = row.get(1);
    let is_called: bool = row.get(2);
    let used = match (in_table, seen) {
        (Some(a), Some(b)) if seq.ascending => a.max(b),
        (Some(a), Some(b)) => a.min(b),
        (a, b) => match a.or(b) {
            Some(v) => v,
            None => return Ok(()),
        },
    };
    let past = if seq.ascending {
        last_value > used || (is_called && last_value == used)
    } else {
        last_value < used || (is_called && last_value == used)
    };
    if past {
        return Ok(());
    }
    client
        .execute(
            "SELECT pg_catalog.setval($1::oid::regclass, $2, true)",
            &[&seq.oid, &used],
        )
        .await
        .map_err(|e| ReplayError::database(&table.display, OP, &e))?;
    tracing::debug!(table = %table.display, sequence = %seq.sql_name, from = last_value, to = used, "sequence moved forward");
    Ok(())
}

/// The old value of relation column `i` when the change carries it (a full old row, or an old
/// key tuple and `i` is a key column); `None` when it does not.
fn old_value<'t>(bound: &Bound, old: Option<&'t OldTuple>, i: usize) -> Option<Option<&'t Bytes>> {
    let value = match old {
        Some(OldTuple::Full(t)) => &t.0[i],
        Some(OldTuple::Key(t)) if bound.relation.columns[i].part_of_key => &t.0[i],
        _ => return None,
    };
    match value {
        Value::Text(b) => Some(Some(b)),
        Value::Null => Some(None),
        Value::UnchangedToast | Value::Binary(_) => None,
    }
}

/// The SQL text and parameter types of a statement.
fn statement_sql(table: &Table, key: &StatementKey) -> (String, Vec<Type>) {
    let mut types: Vec<Type> = Vec::with_capacity(key.set.len() + key.filter.len());
    let columns = |list: &[u16]| {
        list.iter()
            .map(|&c| table.column_sql(c as usize))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let sql = match key.kind {
        StatementKind::Copy => format!("COPY {} ({}) FROM STDIN", table.sql, columns(&key.set)),
        StatementKind::Insert => {
            let placeholders = (1..=key.set.len())
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ");
            types.extend(key.set.iter().map(|&c| table.param_type(c as usize)));
            // OVERRIDING SYSTEM VALUE: the stream's value wins over GENERATED ALWAYS identity,
            // as it does in COPY.
            format!(
                "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES ({placeholders})",
                table.sql,
                columns(&key.set)
            )
        }
        StatementKind::Update | StatementKind::Delete => {
            let mut n = 0;
            let mut head = match key.kind {
                StatementKind::Update => {
                    let mut head = format!("UPDATE {} SET ", table.only());
                    if key.set.is_empty() {
                        // Every value unchanged and TOASTed: still check that the row exists,
                        // with an assignment that changes nothing (and that PostgreSQL allows:
                        // not a generated or GENERATED ALWAYS identity column).
                        let column = table
                            .columns
                            .iter()
                            .position(|c| !c.generated && !c.identity_always)
                            .unwrap_or(key.filter[0] as usize);
                        let column = table.column_sql(column);
                        let _ = write!(head, "{column} = {column}");
                    }
                    for (i, &c) in key.set.iter().enumerate() {
                        n += 1;
                        types.push(table.param_type(c as usize));
                        if i > 0 {
                            head.push_str(", ");
                        }
                        let _ = write!(head, "{} = ${n}", table.column_sql(c as usize));
                    }
                    head
                }
                _ => format!("DELETE FROM {}", table.only()),
            };
            let mut conditions = Vec::with_capacity(key.filter.len());
            for &c in &key.filter {
                n += 1;
                types.push(table.param_type(c as usize));
                let column = table.column_sql(c as usize);
                conditions.push(if key.full {
                    // Compared as text, through the column's own type on both sides: identical
                    // rows are what the old row names, and this also works for types without
                    // an equality operator (json, point, xml…).
                    format!("{column}::text IS NOT DISTINCT FROM ${n}::text")
                } else {
                    format!("{column} = ${n}")
                });
            }
            let conditions = conditions.join(" AND ");
            if key.full {
                // Identical rows are interchangeable: change exactly one of them. A ctid is
                // unique only within one partition.
                let (row, select) = if table.partitioned {
                    ("(tableoid, ctid)", "tableoid, ctid")
                } else {
                    ("ctid", "ctid")
                };
                let _ = write!(
                    head,
                    " WHERE {row} = (SELECT {select} FROM {} WHERE {conditions} LIMIT 1)",
                    table.only()
                );
            } else {
                let _ = write!(head, " WHERE {conditions}");
            }
            head
        }
    };
    (sql, types)
}

/// Reads a target table's columns, keys, indexes and owned sequences.
async fn load_table(client: &Client, schema: &str, name: &str) -> Result<Table, ReplayError> {
    const OP: &str = "reading the recovery database's catalog";
    let table_name = format!("{schema}.{name}");
    let db = |e: tokio_postgres::Error| ReplayError::database(&table_name, OP, &e);
    let row = client
        .query_opt(
            "SELECT c.oid, c.relkind = 'p' FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &name],
        )
        .await
        .map_err(db)?;
    let Some(row) = row else {
        return Err(ReplayError::MissingTable { table: table_name });
    };
    let oid: Oid = row.get(0);
    let partitioned: bool = row.get(1);
    let rows = client
        .query(
            "SELECT attnum, attname::text, atttypid, attgenerated::text <> '', attidentity = 'a' \
             FROM pg_catalog.pg_attribute \
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&oid],
        )
        .await
        .map_err(db)?;
    let mut attnums = Vec::with_capacity(rows.len());
    let mut columns = Vec::with_capacity(rows.len());
    for row in &rows {
        attnums.push(row.get::<_, i16>(0));
        columns.push(TargetColumn {
            name: row.get(1),
            type_oid: row.get(2),
            generated: row.get(3),
            identity_always: row.get(4),
        });
    }
    let by_attnum = |n: i16| attnums.iter().position(|&a| a == n);
    let rows = client
        .query(
            "SELECT indisprimary, indkey::int2[] FROM pg_catalog.pg_index \
             WHERE indrelid = $1 AND indisvalid AND indpred IS NULL",
            &[&oid],
        )
        .await
        .map_err(db)?;
    let mut primary_key = None;
    let mut indexes = Vec::new();
    for row in &rows {
        let keys: Vec<i16> = row.get(1);
        // Expression columns (attnum 0) end the usable prefix.
        let columns: Vec<usize> = keys.iter().map_while(|&k| by_attnum(k)).collect();
        if row.get::<_, bool>(0) && columns.len() == keys.len() {
            primary_key = Some(columns.clone());
        }
        indexes.push(columns);
    }
    let rows = client
        .query(
            "SELECT d.refobjsubid::int2, s.oid, s.oid::regclass::text, q.seqincrement > 0, a.atttypid \
             FROM pg_catalog.pg_depend d \
             JOIN pg_catalog.pg_class s ON s.oid = d.objid AND s.relkind = 'S' \
             JOIN pg_catalog.pg_sequence q ON q.seqrelid = s.oid \
             JOIN pg_catalog.pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid \
             WHERE d.classid = 'pg_catalog.pg_class'::regclass \
               AND d.refclassid = 'pg_catalog.pg_class'::regclass \
               AND d.refobjid = $1 AND d.refobjsubid > 0 AND d.deptype IN ('a', 'i')",
            &[&oid],
        )
        .await
        .map_err(db)?;
    let mut sequences = Vec::new();
    for row in &rows {
        let Some(column) = by_attnum(row.get(0)) else {
            continue;
        };
        let type_oid: Oid = row.get(4);
        if ![Type::INT2.oid(), Type::INT4.oid(), Type::INT8.oid()].contains(&type_oid) {
            tracing::warn!(table = %table_name, column = %columns[column].name, "a sequence is owned by a non-integer column: not moved forward");
            continue;
        }
        sequences.push(OwnedSequence {
            column,
            oid: row.get(1),
            sql_name: row.get(2),
            ascending: row.get(3),
        });
    }
    Ok(Table {
        oid,
        sql: format!("{}.{}", quote_ident(schema), quote_ident(name)),
        display: table_name,
        partitioned,
        columns,
        primary_key,
        indexes,
        sequences,
    })
}

impl crate::retry::Classify for ReplayError {
    /// The stream does not fit the recovery database: replaying it again fits no better.
    fn class(&self) -> crate::retry::ErrorClass {
        crate::retry::ErrorClass::Permanent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(value: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        copy_escape(&mut out, value);
        out.to_vec()
    }

    #[test]
    fn copy_escaping() {
        assert_eq!(escaped(b""), b"");
        assert_eq!(escaped(b"plain"), b"plain");
        assert_eq!(escaped(b"a\tb"), b"a\\tb");
        assert_eq!(escaped(b"a\nb\r\n"), b"a\\nb\\r\\n");
        assert_eq!(escaped(b"C:\\dir\\"), b"C:\\\\dir\\\\");
        assert_eq!(escaped(b"\\."), b"\\\\.");
        assert_eq!(escaped(b"\\N"), b"\\\\N");
        assert_eq!(
            escaped("quotes ' \" é 日本 🐕".as_bytes()),
            "quotes ' \" é 日本 🐕".as_bytes()
        );
        assert_eq!(escaped(b"\t\t"), b"\\t\\t");
    }

    #[test]
    fn copy_rows() {
        let mut out = BytesMut::new();
        let a = Bytes::from_static(b"1");
        let b = Bytes::from_static(b"x\ty");
        copy_row(&mut out, [Some(&a), None, Some(&b)].into_iter());
        copy_row(&mut out, [None].into_iter());
        assert_eq!(&out[..], b"1\t\\N\tx\\ty\n\\N\n");
    }

    fn table(partitioned: bool) -> Table {
        let column = |name: &str, type_oid: Oid| TargetColumn {
            name: name.into(),
            type_oid,
            generated: false,
            identity_always: false,
        };
        Table {
            oid: 1,
            display: "we.ird.Tab\"le".into(),
            sql: quote_ident("we.ird") + "." + &quote_ident("Tab\"le"),
            partitioned,
            columns: vec![column("id", 20), column("va lue", 114), column("n", 23)],
            primary_key: Some(vec![0]),
            indexes: vec![vec![0]],
            sequences: Vec::new(),
        }
    }

    fn key(kind: StatementKind, set: &[u16], filter: &[u16], full: bool) -> StatementKey {
        StatementKey {
            table: 1,
            kind,
            set: set.to_vec(),
            filter: filter.to_vec(),
            full,
        }
    }

    #[test]
    fn statements_quote_names_and_bind_every_value() {
        let t = table(false);
        let (sql, types) = statement_sql(&t, &key(StatementKind::Update, &[1, 2], &[0], false));
        assert_eq!(
            sql,
            r#"UPDATE ONLY "we.ird"."Tab""le" SET "va lue" = $1, "n" = $2 WHERE "id" = $3"#
        );
        assert_eq!(types, vec![Type::JSON, Type::INT4, Type::INT8]);
        let (sql, _) = statement_sql(&t, &key(StatementKind::Delete, &[], &[0, 1], true));
        assert_eq!(
            sql,
            r#"DELETE FROM ONLY "we.ird"."Tab""le" WHERE ctid = (SELECT ctid FROM ONLY "we.ird"."Tab""le" WHERE "id"::text IS NOT DISTINCT FROM $1::text AND "va lue"::text IS NOT DISTINCT FROM $2::text LIMIT 1)"#
        );
        let (sql, _) = statement_sql(&table(true), &key(StatementKind::Delete, &[], &[2], true));
        assert!(
            sql.starts_with(r#"DELETE FROM "we.ird"."Tab""le" WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM "we.ird"."Tab""le" WHERE"#),
            "{sql}"
        );
        let (sql, _) = statement_sql(&t, &key(StatementKind::Update, &[], &[0], false));
        assert_eq!(
            sql,
            r#"UPDATE ONLY "we.ird"."Tab""le" SET "id" = "id" WHERE "id" = $1"#
        );
        let (sql, types) = statement_sql(&t, &key(StatementKind::Insert, &[0, 2], &[], false));
        assert_eq!(
            sql,
            r#"INSERT INTO "we.ird"."Tab""le" ("id", "n") OVERRIDING SYSTEM VALUE VALUES ($1, $2)"#
        );
        assert_eq!(types.len(), 2);
        let (sql, types) = statement_sql(&t, &key(StatementKind::Copy, &[0, 1], &[], false));
        assert_eq!(
            sql,
            r#"COPY "we.ird"."Tab""le" ("id", "va lue") FROM STDIN"#
        );
        assert!(types.is_empty());
    }

    /// The caller may run a replay on a spawned task.
    #[allow(dead_code)]
    fn apply_and_finish_are_send(replayer: Replayer<'_>, message: &Message) {
        fn send<T: Send>(_: &T) {}
        let mut replayer = replayer;
        send(&replayer.apply(message));
        send(&replayer.finish());
    }

    #[test]
    fn text_params_never_print_values() {
        let p = TextParam(Some(Bytes::from_static(b"secret")));
        assert_eq!(format!("{p:?}"), "TextParam(6 bytes)");
        assert_eq!(format!("{:?}", TextParam(None)), "TextParam(NULL)");
    }
}
