//! Sequences: the change stream does not carry them, so replay remembers the values written to
//! sequence-owning columns and, at the end, moves each sequence past them.

use tokio_postgres::Client;

use crate::pg::pgoutput::{Tuple, Value};

use super::binding::Bound;
use super::catalog::{OwnedSequence, Table};
use super::{ReplayError, Replayer};

impl<'a> Replayer<'a> {
    /// Remembers the extreme value written to each sequence-owning column.
    pub(super) fn track_sequences(&mut self, bound: &Bound, tuple: &Tuple) {
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
}

/// Moves `seq` forward past the column's largest value (in the table, or written by the
/// stream) when its next value would not be past it already.
pub(super) async fn move_sequence(
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
