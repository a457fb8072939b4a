//! What replay reads of the recovery database's catalog: each target table's columns, keys,
//! indexes and owned sequences, read once per table.

use tokio_postgres::Client;
use tokio_postgres::types::{Kind, Type};

use crate::pg::pgoutput::Oid;
use crate::pg::quote_ident;

use super::ReplayError;

/// One column of a target table.
#[derive(Debug)]
pub(super) struct TargetColumn {
    pub(super) name: String,
    pub(super) type_oid: Oid,
    /// A generated column: the server computes it, it is never written.
    pub(super) generated: bool,
    /// `GENERATED ALWAYS AS IDENTITY`: an UPDATE cannot set it.
    pub(super) identity_always: bool,
    /// NOT NULL, and a key column of a btree index with its type's default operator class:
    /// `column = value` finds a row through that index (see `statements`).
    pub(super) indexed_not_null: bool,
}

/// A sequence owned by a column (serial or identity).
#[derive(Debug)]
pub(super) struct OwnedSequence {
    pub(super) column: usize,
    pub(super) oid: Oid,
    /// `regclass` output: quoted and qualified as needed for this session.
    pub(super) sql_name: String,
    pub(super) ascending: bool,
}

/// What replay needs of a table in the recovery database, read once.
#[derive(Debug)]
pub(super) struct Table {
    pub(super) oid: Oid,
    /// `schema.name`, for messages.
    pub(super) display: String,
    /// Quoted, qualified.
    pub(super) sql: String,
    pub(super) partitioned: bool,
    pub(super) columns: Vec<TargetColumn>,
    pub(super) primary_key: Option<Vec<usize>>,
    /// Columns of every valid index, for the no-index warning.
    pub(super) indexes: Vec<Vec<usize>>,
    pub(super) sequences: Vec<OwnedSequence>,
}

impl Table {
    /// `ONLY t` for ordinary tables: a change is for this very relation, never its inheritance
    /// children (which have changes of their own); partitioned tables refuse ONLY.
    pub(super) fn only(&self) -> String {
        if self.partitioned {
            self.sql.clone()
        } else {
            format!("ONLY {}", self.sql)
        }
    }

    pub(super) fn column_sql(&self, index: usize) -> String {
        quote_ident(&self.columns[index].name)
    }

    pub(super) fn param_type(&self, index: usize) -> Type {
        let oid = self.columns[index].type_oid;
        // Only the oid is sent (in Parse); tokio-postgres looks unknown ones up itself.
        Type::from_oid(oid)
            .unwrap_or_else(|| Type::new(format!("oid{oid}"), oid, Kind::Simple, String::new()))
    }
}

/// Reads a target table's columns, keys, indexes and owned sequences.
pub(super) async fn load_table(
    client: &Client,
    schema: &str,
    name: &str,
) -> Result<Table, ReplayError> {
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
            "SELECT attnum, attname::text, atttypid, attgenerated::text <> '', attidentity = 'a', \
                    attnotnull \
             FROM pg_catalog.pg_attribute \
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[&oid],
        )
        .await
        .map_err(db)?;
    let mut attnums = Vec::with_capacity(rows.len());
    let mut columns = Vec::with_capacity(rows.len());
    let mut not_null = Vec::with_capacity(rows.len());
    for row in &rows {
        attnums.push(row.get::<_, i16>(0));
        columns.push(TargetColumn {
            name: row.get(1),
            type_oid: row.get(2),
            generated: row.get(3),
            identity_always: row.get(4),
            indexed_not_null: false,
        });
        not_null.push(row.get::<_, bool>(5));
    }
    let by_attnum = |n: i16| attnums.iter().position(|&a| a == n);
    let rows = client
        .query(
            "SELECT i.indisprimary, i.indkey::int2[], am.amname = 'btree', \
                    array(SELECT o.opcdefault FROM unnest(i.indclass::oid[]) WITH ORDINALITY u(c, k) \
                           JOIN pg_catalog.pg_opclass o ON o.oid = u.c ORDER BY u.k) \
             FROM pg_catalog.pg_index i \
             JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid \
             JOIN pg_catalog.pg_am am ON am.oid = ic.relam \
             WHERE i.indrelid = $1 AND i.indisvalid AND i.indpred IS NULL",
            &[&oid],
        )
        .await
        .map_err(db)?;
    let mut primary_key = None;
    let mut indexes = Vec::new();
    let mut equality_indexed = Vec::new();
    for row in &rows {
        let keys: Vec<i16> = row.get(1);
        // Expression columns (attnum 0) end the usable prefix.
        let columns: Vec<usize> = keys.iter().map_while(|&k| by_attnum(k)).collect();
        if row.get::<_, bool>(0) && columns.len() == keys.len() {
            primary_key = Some(columns.clone());
        }
        let (btree, default_class): (bool, Vec<bool>) = (row.get(2), row.get(3));
        for (&column, &default) in columns.iter().zip(&default_class) {
            if btree && default && not_null[column] {
                equality_indexed.push(column);
            }
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
    for column in equality_indexed {
        columns[column].indexed_not_null = true;
    }
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
