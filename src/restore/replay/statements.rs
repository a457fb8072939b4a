//! SQL: the INSERT, COPY, UPDATE and DELETE statements replay prepares, their cache, and what
//! their errors say about the row they missed.

use std::fmt::Write as _;
use std::sync::Arc;

use tokio_postgres::Statement;
use tokio_postgres::types::Type;

use crate::pg::pgoutput::Oid;

use super::binding::TextParam;
use super::catalog::Table;
use super::{ReplayError, Replayer};

/// Prepared statements kept; beyond this the cache is emptied (update column sets vary with
/// which TOASTed columns were left unchanged, so their number is not bounded by the schema).
const MAX_STATEMENTS: usize = 1024;
/// Longest key value shown in an error message.
const MAX_SHOWN_VALUE: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum StatementKind {
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
pub(super) struct StatementKey {
    pub(super) table: Oid,
    pub(super) kind: StatementKind,
    pub(super) set: Vec<u16>,
    pub(super) filter: Vec<u16>,
    pub(super) full: bool,
}

/// A prepared statement with what its errors need to say.
pub(super) struct Prepared {
    pub(super) statement: Statement,
    pub(super) table: String,
    pub(super) op: &'static str,
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
    pub(super) fn check(&self, params: &[TextParam], count: u64) -> Result<(), ReplayError> {
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
                    // an equality operator (json, point, xml…). Text comparisons use no index,
                    // so where the column's own `=` can find the row through one (NOT NULL, in
                    // a btree index) it goes first: without it every delete of a table without
                    // a key scans the table, and a replay costs its changes times its rows.
                    // Equal text output means equal values, so it never excludes the row.
                    let exact = format!("{column}::text IS NOT DISTINCT FROM ${n}::text");
                    if table.columns[c as usize].indexed_not_null {
                        format!("{column} = ${n} AND {exact}")
                    } else {
                        exact
                    }
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

impl<'a> Replayer<'a> {
    pub(super) async fn prepared(
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::quote_ident;

    use super::super::catalog::TargetColumn;

    fn table(partitioned: bool) -> Table {
        let column = |name: &str, type_oid: Oid| TargetColumn {
            name: name.into(),
            type_oid,
            generated: false,
            identity_always: false,
            // The primary key's column.
            indexed_not_null: name == "id",
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
            r#"DELETE FROM ONLY "we.ird"."Tab""le" WHERE ctid = (SELECT ctid FROM ONLY "we.ird"."Tab""le" WHERE "id" = $1 AND "id"::text IS NOT DISTINCT FROM $1::text AND "va lue"::text IS NOT DISTINCT FROM $2::text LIMIT 1)"#
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
}
