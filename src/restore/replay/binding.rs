//! Binding: a Relation message matched to its target table, and the change's text values
//! turned into what the target is written with and which row it is found by.

use std::fmt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio_postgres::types::{Format, IsNull, ToSql, Type, to_sql_checked};

use crate::pg::pgoutput::{OldTuple, Relation, ReplicaIdentity, Tuple, Value};

use super::ReplayError;
use super::catalog::Table;

/// A value bound in TEXT format whatever the parameter's type, so that the server parses it
/// with the column's own input function (the stream carries each type's text output).
pub(super) struct TextParam(pub(super) Option<Bytes>);

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

/// A Relation message bound to its target table.
#[derive(Debug)]
pub(super) struct Bound {
    pub(super) relation: Arc<Relation>,
    pub(super) table: Arc<Table>,
    /// Relation column → target column.
    pub(super) target: Vec<usize>,
    /// Relation columns written by inserts (those not generated in the target).
    pub(super) written: Vec<usize>,
    /// The same, as target columns (the statement cache's key).
    pub(super) written_target: Vec<u16>,
    /// The target's primary key as relation columns, when the relation has all of them.
    pub(super) pk: Option<Vec<usize>>,
    /// Whether every primary-key column is a replica-identity column: then an old key tuple
    /// holds the primary key, and its absence means the primary key did not change.
    pk_in_identity: bool,
    /// Replica-identity columns of the relation (none with REPLICA IDENTITY FULL).
    identity: Vec<usize>,
}

impl Bound {
    pub(super) fn new(relation: Arc<Relation>, table: Arc<Table>) -> Result<Bound, ReplayError> {
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

    pub(super) fn check_len(&self, op: &'static str, tuple: &Tuple) -> Result<(), ReplayError> {
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
    pub(super) fn writable(
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

    pub(super) fn binary(&self, rel_column: usize) -> ReplayError {
        self.unsupported(
            format!(
                "a binary-format value (column {})",
                self.column_name(rel_column)
            ),
            "the capture must use pgoutput's text format (no `binary` option)",
        )
    }

    pub(super) fn unsupported(&self, what: String, hint: &str) -> ReplayError {
        ReplayError::Unsupported {
            table: self.table.display.clone(),
            what,
            hint: hint.to_string(),
        }
    }

    /// How to find the row of an update or delete, and with which values.
    pub(super) fn identify(
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
pub(super) struct Identity {
    /// Target columns compared.
    pub(super) target: Vec<u16>,
    /// The values come from the new row (the change carries no old row): these columns did
    /// not change.
    pub(super) from_new: bool,
    pub(super) values: Vec<Option<Bytes>>,
    /// No key: every old column compared, one matching row taken.
    pub(super) full: bool,
}

/// The old value of relation column `i` when the change carries it (a full old row, or an old
/// key tuple and `i` is a key column); `None` when it does not.
pub(super) fn old_value<'t>(
    bound: &Bound,
    old: Option<&'t OldTuple>,
    i: usize,
) -> Option<Option<&'t Bytes>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_params_never_print_values() {
        let p = TextParam(Some(Bytes::from_static(b"secret")));
        assert_eq!(format!("{p:?}"), "TextParam(6 bytes)");
        assert_eq!(format!("{:?}", TextParam(None)), "TextParam(NULL)");
    }
}
