//! Replay: applies a tenant's captured logical-replication changes to its recovery database.
//!
//! Point-in-time restore loads the snapshot, then replays the changes committed after it. This
//! module is the engine that applies them; which changes (and transaction boundaries) is the
//! caller's business. The caller opens the transaction and commits it, and may commit between
//! two source transactions ([`Replayer::commit`]) so that rows changed many times do not pile
//! up versions; a replay that fails drops the recovery database, so it lands whole or not at
//! all, and triggers, foreign keys and row level security are only created after it.
//!
//! Why it looks the way it does:
//! - Values arrive as each type's *text output* (pgoutput without `binary`), so they go back in
//!   as text: bound parameters in text format, or COPY text rows. The server then parses each one
//!   with the target column's own input function, which is what makes every type (arrays, jsonb,
//!   enums, domains, ranges, user and extension types — `hstore`, `citext` — whose oids differ
//!   between clusters: the parameter types are the recovery database's) round-trip exactly
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
//!   database that looks restored but is not (ARCHITECTURE.md, invariant 2).
//! - Memory is bounded whatever the transaction size (ARCHITECTURE.md, invariant 6): a COPY run is streamed in
//!   ~1 MiB chunks, and the pipeline holds at most [`MAX_IN_FLIGHT`] changes and
//!   [`MAX_IN_FLIGHT_BYTES`] of values.
//! - Sequences are not part of the change stream, so [`Replayer::finish`] moves each sequence
//!   owned by a written column past every value the stream used — including values of rows that
//!   were deleted again, which a plain `max(column)` would miss — and never backwards.
//!
//! This file owns the [`Replayer`] (its public API, and the dispatch of updates, deletes and
//! truncates) and [`ReplayError`]. The rest is split by job: `catalog` reads the recovery
//! database's tables, `binding` matches relations to them and turns values into parameters,
//! `statements` writes and caches the SQL, `copy` batches inserts, `pipeline` keeps executes
//! in flight, and `sequences` moves owned sequences forward.

mod binding;
mod catalog;
mod copy;
mod migration;
mod pipeline;
mod sequences;
mod statements;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};

use futures::stream::FuturesOrdered;
use tokio_postgres::Client;

use crate::pg::pgoutput::{Delete, Message, Oid, Relation, Truncate, Update, Value};
use crate::pg::sqlstate;

use binding::{Bound, TextParam, old_value};
use catalog::{Table, load_table};
use copy::InsertRun;
use migration::Migrations;
pub use migration::{FollowedSchema, foreign_keys, row_security};
use pipeline::Pending;
pub use pipeline::{MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES};
use sequences::move_sequence;
use statements::{Prepared, StatementKey, StatementKind};

/// Changes applied so far. `truncates` counts truncated tables.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ReplayStats {
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
    pub truncates: u64,
    /// The schema changes met, in order: `<commit time> <statement> <object>`, and those not
    /// replayed because they hold no rows, marked so.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub schema_changes: Vec<String>,
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
        "table {table}: {message}; the table was altered after the snapshot was taken and the change stream does not say how (the source's schema-change triggers were not installed then: `updog-backup check`): restore to a time after a later snapshot"
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
    #[error(
        "the schema change {statement} committed at {time} cannot be replayed exactly: {reason}; restore to an instant before it, or to one after a snapshot taken after it"
    )]
    SchemaChange {
        statement: String,
        time: String,
        reason: String,
    },
    #[error(
        "the transaction committed at {time} moved rows of {table} to or from this tenant, and the rows that reach their tenant through them were not captured with them (the source lacked its trigger of parent moves: `updog-backup check`); restore to an instant before it, or to one after a snapshot taken after it"
    )]
    IncompleteMove { table: String, time: String },
    #[error(
        "a schema change in the stream cannot be read ({message}): it was captured by a newer updog-backup; restore with that version"
    )]
    UnreadableSchemaChange { message: String },
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

impl crate::retry::Classify for ReplayError {
    /// The stream does not fit the recovery database: replaying it again fits no better.
    fn class(&self) -> crate::retry::ErrorClass {
        crate::retry::ErrorClass::Permanent
    }
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
    /// The source's tables as schema changes in the stream left them.
    migrations: Migrations,
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
            migrations: Migrations::default(),
            stats: ReplayStats::default(),
        }
    }

    /// Follows schema changes in the stream from the snapshot whose tables these are.
    pub fn following(mut self, tables: &[crate::repository::manifest::TableEntry]) -> Self {
        self.migrations = Migrations::new(tables);
        self
    }

    /// A schema change the triggers put in the stream (`source::ddl`), at its place; `time` is
    /// its transaction's commit time. Everything before it is applied first, and what replay
    /// knew of the changed tables is read again after it.
    pub async fn schema_change(
        &mut self,
        content: &[u8],
        time: DateTime<Utc>,
    ) -> Result<(), ReplayError> {
        let event = crate::source::ddl::SchemaEvent::parse(content).map_err(|e| {
            ReplayError::UnreadableSchemaChange {
                message: e.to_string(),
            }
        })?;
        self.flush_all().await?;
        // Sequences of tables about to change are moved now, while replay still knows them.
        self.move_sequences().await?;
        let before = self.migrations.report.len();
        self.migrations.apply(self.client, &event, time).await?;
        self.stats
            .schema_changes
            .extend_from_slice(&self.migrations.report[before..]);
        self.bound.clear();
        self.tables.clear();
        self.statements.clear();
        Ok(())
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

    /// What the schema changes replayed so far did to the snapshot's tables.
    pub fn followed(&self) -> FollowedSchema {
        self.migrations.followed()
    }

    /// Commits what was applied so far and opens the next transaction; the caller calls it
    /// between two of the source's transactions. Row versions the replay's own transaction
    /// made stay visible to it until it ends, so a row updated a thousand times in one
    /// transaction is found through a thousand versions (and index entries) by its next
    /// update: a replay in one transaction costs the square of its changes to hot rows.
    pub async fn commit(&mut self) -> Result<(), ReplayError> {
        self.flush_all().await?;
        for statement in ["COMMIT", "BEGIN"] {
            self.client
                .batch_execute(statement)
                .await
                .map_err(|e| ReplayError::database("(every table)", "a commit", &e))?;
        }
        Ok(())
    }

    /// Changes applied since the replay began (inserts, updates, deletes, truncated tables).
    pub fn applied(&self) -> u64 {
        let s = &self.stats;
        s.inserts + s.updates + s.deletes + s.truncates
    }

    /// Flushes pending batches and moves every sequence owned by a column of a table that got
    /// inserts/updates forward so it hands out no value already used:
    /// setval(seq, greatest(max(col), current last_value)) — never backwards. Values the stream
    /// wrote count too, even when their rows were deleted since.
    pub async fn finish(mut self) -> Result<ReplayStats, ReplayError> {
        self.flush_all().await?;
        self.move_sequences().await?;
        tracing::debug!(stats = ?self.stats, "replay finished");
        Ok(self.stats)
    }

    async fn move_sequences(&mut self) -> Result<(), ReplayError> {
        let mut tables: Vec<Arc<Table>> = self.written.drain().map(|(_, t)| t).collect();
        tables.sort_by(|a, b| a.display.cmp(&b.display));
        for table in tables {
            for seq in &table.sequences {
                let seen = self.sequence_values.remove(&(table.oid, seq.column));
                move_sequence(self.client, &table, seq, seen).await?;
            }
        }
        Ok(())
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The caller may run a replay on a spawned task.
    #[allow(dead_code)]
    fn apply_and_finish_are_send(replayer: Replayer<'_>, message: &Message) {
        fn send<T: Send>(_: &T) {}
        let mut replayer = replayer;
        send(&replayer.apply(message));
        send(&replayer.finish());
    }
}
