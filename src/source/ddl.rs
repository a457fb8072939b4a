//! Schema changes in the change stream: the event triggers that put them there, and what their
//! messages say.
//!
//! Logical replication carries no DDL, and a Relation message cannot make a replay exact: it
//! does not tell a rename from a drop and an add, nor say what `ADD COLUMN … DEFAULT` gave the
//! rows already there. So event triggers (`ddl.sql`) emit, inside the migrating transaction,
//! a transactional logical message describing each command's tables as it left them; pgoutput
//! delivers it at its place in the transaction, the daemon stores it with the changes, and a
//! restore applies it between the changes it separates (`restore::replay::migration`).
//!
//! Creating an event trigger takes a superuser, which the backup's role should not be. So
//! `init` installs them when it may and otherwise prints the script for one to run, as it does
//! for the publication; without them, a restore across a schema change is refused as before.

use bytes::Bytes;
use serde::Deserialize;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::catalog::Catalog;
use super::{SourceError, query_context};
use crate::pg::pgoutput::{
    Column, LogicalMessage, Message, Relation, ReplicaIdentity, Tuple, Update, Value,
};

/// The prefix of the logical messages the triggers emit.
pub const PREFIX: &str = "updog-backup/ddl";

/// The event triggers' script.
const SCRIPT: &str = include_str!("ddl.sql");

/// The script installing the triggers (idempotent: run again, it replaces them): the event
/// triggers, then the triggers of parent moves generated from `catalog`'s routes.
pub fn script(catalog: &Catalog) -> String {
    format!("{SCRIPT}\n{}", super::moves::script(catalog))
}

/// The event triggers the script creates.
const TRIGGERS: [&str; 3] = [
    "updog_backup_ddl_command",
    "updog_backup_ddl_drop",
    "updog_backup_ddl_rewrite",
];

/// Whether schema changes reach the change stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Capture {
    /// The triggers are installed and enabled.
    Installed,
    /// They are not, and this role may not install them: `script` is for a superuser.
    Missing { reason: String },
}

/// Installs (or refreshes) the triggers when this role may; otherwise says why not.
pub async fn ensure(client: &Client, catalog: &Catalog) -> Result<Capture, SourceError> {
    // One implicit transaction: all of it or nothing.
    match client.batch_execute(&script(catalog)).await {
        Ok(()) => Ok(Capture::Installed),
        Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
            // Installed earlier by a superuser: nothing is missing.
            if installed(client).await? {
                Ok(Capture::Installed)
            } else {
                Ok(Capture::Missing {
                    reason: crate::pg::sqlstate::describe(&e),
                })
            }
        }
        Err(e) => Err(SourceError::Query {
            context: "installing the schema-change triggers".into(),
            source: e,
        }),
    }
}

/// Whether every trigger exists and is enabled.
pub async fn installed(client: &Client) -> Result<bool, SourceError> {
    let names: Vec<String> = TRIGGERS.iter().map(|t| t.to_string()).collect();
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_catalog.pg_event_trigger
              WHERE evtname = ANY($1) AND evtenabled <> 'D'",
            &[&names],
        )
        .await
        .map_err(query_context("looking up the schema-change triggers"))?;
    Ok(row.get::<_, i64>(0) == TRIGGERS.len() as i64)
}

/// One message of the triggers.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SchemaEvent {
    /// `ddl_command_end`: what the statement (`tag`) created or altered, as it left it.
    Command { tag: String, commands: Vec<Command> },
    /// `sql_drop`: what the statement dropped, and the tables that lost a part (a column, a
    /// constraint, a policy, a default) as they are now.
    Drop {
        tag: String,
        dropped: Vec<Dropped>,
        #[serde(default)]
        tables: Vec<TableDefinition>,
    },
    /// `table_rewrite`: the statement rewrote every row of the table (`reason`: PostgreSQL's
    /// `AT_REWRITE_*` bits; `using`: its text may hold a `USING` clause).
    Rewrite {
        tag: String,
        schema: String,
        name: String,
        reason: i32,
        #[serde(default = "maybe")]
        using: bool,
        /// The rows are sent after the statement ([`SchemaEvent::Rows`]).
        #[serde(default)]
        rows: bool,
    },
    /// Rows of a table a volatile default rewrote, as the statement left them (a thousand
    /// per message): what pgoutput would send of each as an UPDATE.
    Rows {
        tag: String,
        oid: u32,
        schema: String,
        name: String,
        /// `relreplident`: `d`, `f`, `i` or `n`.
        replica_identity: String,
        columns: Vec<RowColumn>,
        rows: Vec<Vec<Option<String>>>,
    },
    /// The trigger failed to describe the statement (it lets the migration go on): what it
    /// did is unknown.
    Failed { tag: String, error: String },
    /// Not from the source: capture's mark, in one tenant's section, that rows of `table`
    /// moved to or from the tenant without word of the rows below them (their trigger of
    /// parent moves was missing).
    IncompleteMove { tag: String, table: String },
    /// An UPDATE changed the route of rows of `parent` (a table other tables route through):
    /// first a message without `table`, then the rows below the moved ones, a table at a time
    /// from the top (`source::moves`).
    Moved {
        tag: String,
        parent: u32,
        #[serde(default)]
        table: Option<MovedRows>,
    },
}

/// Rows of one table below a moved parent row, as the trigger read them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MovedRows {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// `relreplident`: `d`, `f`, `i` or `n`.
    pub replica_identity: String,
    /// Every column of the record text, generated ones included.
    pub columns: Vec<RowColumn>,
    /// Each row's record text: `(1,"a b",)`.
    pub rows: Vec<String>,
}

/// What capture stores in a tenant's stream when rows of `table` moved to or from it without
/// the rows below them (their trigger is missing): [`SchemaEvent::IncompleteMove`], which a
/// restore after it refuses (a release before it: as a message it cannot read).
pub fn unaccompanied_move(table: &str, lsn: crate::pg::Lsn) -> Message {
    let content = serde_json::json!({
        "version": 1,
        "event": "incomplete_move",
        "tag": "UPDATE",
        "table": table,
    });
    Message::LogicalMessage(LogicalMessage {
        xid: None,
        transactional: true,
        lsn,
        prefix: PREFIX.to_string(),
        content: Bytes::from(content.to_string()),
    })
}

impl MovedRows {
    /// The table's Relation message as pgoutput would send it, and each row as the tuple it
    /// would send.
    pub fn tuples(&self) -> Result<(Relation, Vec<Tuple>), String> {
        let relation = relation(
            self.oid,
            &self.schema,
            &self.name,
            &self.replica_identity,
            &self.columns,
        )?;
        let tuples = self
            .rows
            .iter()
            .map(|text| {
                let fields = parse_record(text)?;
                if fields.len() != self.columns.len() {
                    return Err(format!(
                        "a row of {}.{} has {} values for {} columns",
                        self.schema,
                        self.name,
                        fields.len(),
                        self.columns.len()
                    ));
                }
                Ok(Tuple(
                    fields
                        .into_iter()
                        .zip(&self.columns)
                        .filter(|(_, c)| !c.generated)
                        .map(|(v, _)| match v {
                            Some(text) => Value::Text(Bytes::from(text)),
                            None => Value::Null,
                        })
                        .collect(),
                ))
            })
            .collect::<Result<_, String>>()?;
        Ok((relation, tuples))
    }
}

/// The fields of a record's text output (`record_out`): `None` for NULL (nothing between the
/// commas), quoted fields unescaped (`""` and `\x`).
fn parse_record(text: &str) -> Result<Vec<Option<String>>, String> {
    let bad = || format!("not a record's text: {text:?}");
    let inner = text
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or_else(bad)?;
    let mut fields = Vec::new();
    let mut chars = inner.chars().peekable();
    loop {
        let mut value = String::new();
        let mut quoted = false;
        let mut any = false;
        while let Some(&c) = chars.peek() {
            match c {
                ',' if !quoted => break,
                '"' => {
                    chars.next();
                    if quoted && chars.peek() == Some(&'"') {
                        chars.next();
                        value.push('"');
                    } else {
                        quoted = !quoted;
                    }
                    any = true;
                }
                '\\' => {
                    chars.next();
                    value.push(chars.next().ok_or_else(bad)?);
                    any = true;
                }
                _ => {
                    chars.next();
                    value.push(c);
                    any = true;
                }
            }
        }
        if quoted {
            return Err(bad());
        }
        fields.push(any.then_some(value));
        if chars.next().is_none() {
            return Ok(fields);
        }
    }
}

fn maybe() -> bool {
    true
}

/// `AT_REWRITE_DEFAULT_VAL`: a column added with a volatile default (or generated, or an
/// identity) got a value per row.
const REWRITE_DEFAULT_VALUE: i32 = 0x02;
/// `AT_REWRITE_COLUMN_REWRITE`: a column's values were converted to a new type.
const REWRITE_COLUMN: i32 = 0x04;

impl SchemaEvent {
    /// Why a restore cannot give the rows of a rewritten table the values the source gave
    /// them, if it cannot. The triggers send every row after a rewrite that changed values (a
    /// default's, a type change's) of a table with a primary key; without one, the values of a
    /// volatile default or a `USING` expression are nowhere. Other rewrites (persistence,
    /// access method) keep the values.
    pub fn unrepeatable_rewrite(&self) -> Option<&'static str> {
        let SchemaEvent::Rewrite {
            reason,
            using,
            rows,
            ..
        } = self
        else {
            return None;
        };
        if *rows || reason & (REWRITE_DEFAULT_VALUE | REWRITE_COLUMN) == 0 {
            None
        } else if reason & REWRITE_DEFAULT_VALUE != 0 {
            Some(
                "it gave every row a default's value (a volatile one, or a new generated or identity column), and the table has no primary key the rows could be sent by",
            )
        } else if *using {
            Some(
                "it converted a column's values with a USING expression, and the table has no primary key the rows could be sent by",
            )
        } else {
            // The type's own cast, which the restore repeats on the same values.
            None
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Command {
    pub tag: String,
    #[serde(rename = "type")]
    pub object_type: String,
    pub identity: String,
    pub schema: Option<String>,
    /// The table the command changed (itself, or the owner of its policy, constraint or
    /// trigger), as the command left it.
    pub table: Option<TableDefinition>,
    /// For an index: `pg_get_indexdef`.
    pub index: Option<String>,
    #[serde(default)]
    pub sequence: Option<SequenceDefinition>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RowColumn {
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    /// Part of the replica identity.
    pub key: bool,
    /// pgoutput does not send them (the target computes them); only moved rows hold them.
    #[serde(default)]
    pub generated: bool,
}

/// A table's Relation message as pgoutput would send it: without generated columns.
fn relation(
    oid: u32,
    schema: &str,
    name: &str,
    replica_identity: &str,
    columns: &[RowColumn],
) -> Result<Relation, String> {
    let replica_identity = replica_identity
        .as_bytes()
        .first()
        .and_then(|b| ReplicaIdentity::from_byte(*b))
        .ok_or_else(|| format!("unknown replica identity {replica_identity:?}"))?;
    Ok(Relation {
        xid: None,
        oid,
        namespace: schema.to_string(),
        name: name.to_string(),
        replica_identity,
        columns: columns
            .iter()
            .filter(|c| !c.generated)
            .map(|c| Column {
                part_of_key: c.key,
                name: c.name.clone(),
                type_oid: c.type_oid,
                type_modifier: c.type_modifier,
            })
            .collect(),
    })
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SequenceDefinition {
    /// An identity column's: its table's definition makes it.
    pub identity: bool,
    /// `CREATE SEQUENCE` options: `AS integer INCREMENT BY 1 …`.
    pub definition: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PolicyDefinition {
    pub name: String,
    /// What follows `CREATE POLICY name ON table`: `AS PERMISSIVE FOR SELECT TO … USING (…)`.
    pub definition: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TableDefinition {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    pub columns: Vec<ColumnDefinition>,
    pub constraints: Vec<ConstraintDefinition>,
    /// A partitioned table's `PARTITION BY` clause.
    #[serde(default)]
    pub partition_key: Option<String>,
    /// A partition's parent (quoted, qualified) and bound: its rows are its parent's.
    #[serde(default)]
    pub partition_of: Option<String>,
    #[serde(default)]
    pub bound: Option<String>,
    #[serde(default)]
    pub row_security: bool,
    #[serde(default)]
    pub force_row_security: bool,
    #[serde(default)]
    pub policies: Vec<PolicyDefinition>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ColumnDefinition {
    pub attnum: i16,
    pub name: String,
    /// `format_type`: `character varying(20)`, `app.mood[]` …
    #[serde(rename = "type")]
    pub type_name: String,
    pub not_null: bool,
    /// The default (or, for a generated column, its expression), as SQL.
    pub default: Option<String>,
    /// What rows that existed when the column was added hold (`attmissingval`, as the text of
    /// a one-element array of the column's type), until they are next written.
    pub missing: Option<String>,
    pub generated: Option<String>,
    pub identity: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ConstraintDefinition {
    pub name: String,
    /// `pg_constraint.contype`: `p`, `u`, `c`, `f`, `x`, `t`, `n`.
    #[serde(rename = "type")]
    pub kind: String,
    pub definition: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Dropped {
    #[serde(rename = "type")]
    pub object_type: String,
    pub identity: String,
    pub schema: Option<String>,
    pub name: Option<String>,
    pub address: Vec<String>,
    /// Named by the statement itself (not dropped as a dependency of what it named).
    pub original: bool,
}

impl SchemaEvent {
    /// Parses a message's content (an error: a message this build cannot read).
    pub fn parse(content: &[u8]) -> Result<SchemaEvent, serde_json::Error> {
        serde_json::from_slice(content)
    }

    pub fn tag(&self) -> &str {
        match self {
            SchemaEvent::Command { tag, .. }
            | SchemaEvent::Drop { tag, .. }
            | SchemaEvent::Rewrite { tag, .. }
            | SchemaEvent::Rows { tag, .. }
            | SchemaEvent::Moved { tag, .. }
            | SchemaEvent::IncompleteMove { tag, .. }
            | SchemaEvent::Failed { tag, .. } => tag,
        }
    }

    /// Rows as the UPDATEs pgoutput would send of them: the table's Relation message, then one
    /// Update per row (no old row: the key did not change).
    pub fn as_updates(&self) -> Option<(Relation, Vec<Update>)> {
        let SchemaEvent::Rows {
            oid,
            schema,
            name,
            replica_identity,
            columns,
            rows,
            ..
        } = self
        else {
            return None;
        };
        let relation = relation(*oid, schema, name, replica_identity, columns).ok()?;
        let updates = rows
            .iter()
            .map(|row| Update {
                xid: None,
                relation: *oid,
                old: None,
                new: Tuple(
                    row.iter()
                        .map(|v| match v {
                            Some(text) => Value::Text(Bytes::copy_from_slice(text.as_bytes())),
                            None => Value::Null,
                        })
                        .collect(),
                ),
            })
            .collect();
        Some((relation, updates))
    }

    /// The tables its statement created.
    pub fn created_tables(&self) -> impl Iterator<Item = &TableDefinition> {
        let commands = match self {
            SchemaEvent::Command { commands, .. } => commands.as_slice(),
            _ => &[],
        };
        commands
            .iter()
            .filter(|c| c.tag == "CREATE TABLE" && c.object_type == "table")
            .filter_map(|c| c.table.as_ref())
    }

    /// Whether it touches one of `schemas` (the backed-up ones); the others' are not stored.
    pub fn touches(&self, backed_up: impl Fn(&str) -> bool) -> bool {
        let ours = |s: &Option<String>| s.as_deref().is_some_and(&backed_up);
        match self {
            SchemaEvent::Command { commands, .. } => commands.iter().any(|c| ours(&c.schema)),
            SchemaEvent::Drop { dropped, .. } => dropped.iter().any(|d| ours(&d.schema)),
            SchemaEvent::Rewrite { schema, .. } | SchemaEvent::Rows { schema, .. } => {
                backed_up(schema)
            }
            SchemaEvent::Moved { table, .. } => {
                table.as_ref().is_some_and(|t| backed_up(&t.schema))
            }
            // It may have touched anything.
            SchemaEvent::Failed { .. } | SchemaEvent::IncompleteMove { .. } => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_text_splits_into_the_values_pgoutput_would_send() {
        let fields = parse_record(r#"(1,"a b",,"","q""uote","back\\slash","(,)")"#).unwrap();
        let want: Vec<Option<&str>> = vec![
            Some("1"),
            Some("a b"),
            None,
            Some(""),
            Some("q\"uote"),
            Some("back\\slash"),
            Some("(,)"),
        ];
        assert_eq!(
            fields.iter().map(|f| f.as_deref()).collect::<Vec<_>>(),
            want
        );
        assert!(parse_record("1,2").is_err());
        assert!(parse_record(r#"("open)"#).is_err());
        // Generated columns are in the record, not in what pgoutput sends.
        let moved = br#"{"version": 1, "event": "moved", "tag": "UPDATE", "parent": 7, "table": {"oid": 9, "schema": "app", "name": "lots", "replica_identity": "d", "columns": [{"name": "id", "type_oid": 20, "type_modifier": -1, "generated": false, "key": true}, {"name": "twice", "type_oid": 20, "type_modifier": -1, "generated": true, "key": false}, {"name": "t", "type_oid": 1009, "type_modifier": -1, "generated": false, "key": false}], "rows": ["(1,2,\"{\"\"a b\"\",c}\")"]}}"#;
        let SchemaEvent::Moved {
            parent: 7,
            table: Some(rows),
            ..
        } = SchemaEvent::parse(moved).unwrap()
        else {
            panic!("not a move")
        };
        let (relation, tuples) = rows.tuples().unwrap();
        assert_eq!(relation.columns.len(), 2);
        assert_eq!(
            tuples[0].0,
            vec![
                Value::Text(Bytes::from_static(b"1")),
                Value::Text(Bytes::from_static(br#"{"a b",c}"#))
            ]
        );
    }

    #[test]
    fn messages_of_each_event_parse() {
        let command = br#"{"tag": "ALTER TABLE", "event": "command", "version": 1, "commands": [{"tag": "ALTER TABLE", "type": "table", "index": null, "table": {"oid": 16438, "kind": "r", "name": "y", "schema": "app", "columns": [{"name": "region", "type": "text", "attnum": 4, "default": "'eu'::text", "missing": "{eu}", "identity": null, "not_null": true, "generated": null}], "constraints": [{"name": "y_pkey", "type": "p", "definition": "PRIMARY KEY (a)"}]}, "schema": "app", "identity": "app.y"}]}"#;
        let event = SchemaEvent::parse(command).unwrap();
        assert_eq!(event.tag(), "ALTER TABLE");
        assert!(event.touches(|s| s == "app"));
        assert!(!event.touches(|s| s == "crm"));
        let SchemaEvent::Command { commands, .. } = event else {
            panic!()
        };
        let table = commands[0].table.as_ref().unwrap();
        assert_eq!(table.columns[0].missing.as_deref(), Some("{eu}"));

        let drop = br#"{"tag": "DROP TABLE", "event": "drop", "version": 1, "dropped": [{"name": "f", "type": "table", "schema": "app", "address": ["app", "f"], "identity": "app.f", "original": true}, {"name": "pg_toast_1", "type": "toast table", "schema": "pg_toast", "address": ["pg_toast", "pg_toast_1"], "identity": "pg_toast.pg_toast_1", "original": false}]}"#;
        assert!(SchemaEvent::parse(drop).unwrap().touches(|s| s == "app"));
        // With the rows sent after it, any rewrite is repeated; without (no primary key), a
        // type change by the type's own cast still is, one USING an expression or a volatile
        // default is not.
        let rewrite = |reason: i32, using: bool, rows: bool| {
            let json = format!(
                r#"{{"tag": "ALTER TABLE", "name": "f", "event": "rewrite", "reason": {reason}, "using": {using}, "rows": {rows}, "schema": "app", "version": 1}}"#
            );
            SchemaEvent::parse(json.as_bytes()).unwrap()
        };
        assert_eq!(rewrite(6, true, true).unrepeatable_rewrite(), None);
        assert_eq!(rewrite(4, false, false).unrepeatable_rewrite(), None);
        assert!(rewrite(4, true, false).unrepeatable_rewrite().is_some());
        assert!(rewrite(2, false, false).unrepeatable_rewrite().is_some());
        // SET LOGGED, SET ACCESS METHOD keep the values.
        assert_eq!(rewrite(1, true, false).unrepeatable_rewrite(), None);
        // A message without `using` (a trigger from before it): maybe.
        let old = br#"{"tag": "ALTER TABLE", "name": "f", "event": "rewrite", "reason": 4, "schema": "app", "version": 1}"#;
        assert!(
            SchemaEvent::parse(old)
                .unwrap()
                .unrepeatable_rewrite()
                .is_some()
        );
        let failed =
            br#"{"tag": "ALTER TABLE", "event": "failed", "error": "out of memory", "version": 1}"#;
        let failed = SchemaEvent::parse(failed).unwrap();
        assert!(
            failed.touches(|_| false),
            "an undescribed change may touch anything"
        );
    }
}
