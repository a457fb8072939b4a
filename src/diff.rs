//! `diff`: what changed in one tenant's rows between a restore point and now (the live
//! source), or between two restore points: per table, the rows inserted, deleted and updated
//! since, and on request each of them with its key.
//!
//! Each restore point is restored (the ordinary restore: planned, verified, loaded, replayed)
//! into a scratch database on the restore target, compared, and dropped whatever happens. The
//! source is only read, in one REPEATABLE READ READ ONLY transaction as the backup role, through
//! the same tenant filter the snapshot uses. Both sides of a table are streamed in one order,
//! by primary key (or, for a table without one, by the whole row), and merged: memory holds
//! two rows at a time, whatever the tenant's size. Rows are compared as `to_jsonb` text, so a
//! value that prints the same is the same on both servers.
//!
//! It never writes to the source and never touches another tenant's objects: what a restore
//! of the tenant reads is all it reads of the repository.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt, TryStreamExt};
use serde::Serialize;
use tokio_postgres::{Client, Row};

use crate::codec::Identities;
use crate::config::Config;
use crate::pg::{ConnectError, quote_ident, redact_url};
use crate::repository::Repository;
use crate::repository::manifest::Scope;
use crate::repository::{RestorePoint, SnapshotId};
use crate::restore::{RestoreError, RestoreRequest, RestoreTarget};
use crate::retry::{Classify, ErrorClass};
use crate::source::SourceError;
use crate::source::catalog::Catalog;

#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("{context}: {message}")]
    Query { context: String, message: String },
}

impl Classify for DiffError {
    fn class(&self) -> ErrorClass {
        match self {
            DiffError::Restore(e) => e.class(),
            DiffError::Source(e) => e.class(),
            DiffError::Connect(e) => e.class(),
            // A table of the restore point the source no longer has as it was (a migration
            // since): reading it again meets the same.
            DiffError::Query { .. } => ErrorClass::Permanent,
        }
    }
}

fn query_error(context: String) -> impl FnOnce(tokio_postgres::Error) -> DiffError {
    move |e| DiffError::Query {
        context,
        message: crate::pg::sqlstate::describe(&e),
    }
}

/// What the restore point is compared with.
#[derive(Debug, Clone, Copy)]
pub enum Against {
    /// The source as it is now.
    Live,
    /// Another restore point of the repository.
    Point(RestoreTarget),
}

#[derive(Debug, Clone)]
pub struct DiffRequest {
    pub tenant: String,
    pub from: RestoreTarget,
    pub to: Against,
    /// Where the scratch databases are created (the restore role's server).
    pub target_url: String,
    pub scratch_dir: std::path::PathBuf,
}

/// One side of the comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    /// `live` (the source) or `repository`.
    pub kind: &'static str,
    /// The last transaction the side holds: for the source, when its read began.
    pub time: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lsn: Option<crate::pg::Lsn>,
}

impl Side {
    fn of(point: &RestorePoint) -> Side {
        Side {
            kind: "repository",
            time: point.time,
            lsn: Some(point.lsn),
        }
    }
}

/// Per table: how many rows the later side added, removed and changed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TableDiff {
    pub table: String,
    /// The columns rows are matched by (the primary key); empty: whole rows (no primary key).
    pub key: Vec<String>,
    pub inserted: u64,
    pub deleted: u64,
    pub updated: u64,
    pub unchanged: u64,
    /// Set when the table exists on one side only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<&'static str>,
}

impl TableDiff {
    pub fn changed(&self) -> u64 {
        self.inserted + self.deleted + self.updated
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DiffReport {
    pub tenant: String,
    pub from: Side,
    pub to: Side,
    pub tables: Vec<TableDiff>,
}

/// One changed row, for `--rows`.
#[derive(Debug, Clone, Serialize)]
pub struct RowChange {
    pub table: String,
    /// `insert` (only in the later side), `delete` (only in the earlier) or `update`.
    pub change: &'static str,
    /// The primary key's values (a JSON array), or the whole row for a table without one.
    pub key: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<serde_json::Value>,
}

/// Compares the request's two sides; `each_row` is called for every changed row (in table
/// order, then key order) when given.
pub async fn run(
    config: &Config,
    repo: &Repository,
    identities: Arc<Identities>,
    request: &DiffRequest,
    mut each_row: Option<&mut dyn FnMut(RowChange)>,
) -> Result<DiffReport, DiffError> {
    let maintenance = crate::pg::connect(&request.target_url).await?;
    let mut scratch = Vec::new();
    let result = async {
        let restore = |target| RestoreRequest {
            tenant: request.tenant.clone(),
            target,
            target_db: None,
            target_url: request.target_url.clone(),
            scratch_dir: request.scratch_dir.clone(),
        };
        let from = restore_scratch(
            repo,
            &identities,
            restore(request.from),
            "diff",
            &mut scratch,
        )
        .await?;
        let (to_side, later) = match request.to {
            Against::Point(target) => {
                let to = restore_scratch(repo, &identities, restore(target), "diff", &mut scratch)
                    .await?;
                (Side::of(&to.0), Later::Point(to.1))
            }
            Against::Live => {
                let client = crate::pg::connect(&config.source.url).await?;
                same_output(&client).await?;
                client
                    .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await
                    .map_err(query_error("starting a read of the source".into()))?;
                let time: DateTime<Utc> = client
                    .query_one("SELECT now()", &[])
                    .await
                    .map_err(query_error("reading the source's time".into()))?
                    .get(0);
                let catalog = Catalog::load(&client, &config.source)
                    .await
                    .map_err(SourceError::from)?;
                let side = Side {
                    kind: "live",
                    time,
                    lsn: None,
                };
                (side, Later::Live(client, catalog))
            }
        };
        let earlier = connect_db(&request.target_url, &from.1.database).await?;
        // The later side's client, tables, and (live) the catalog its tenant filters use.
        let (later_db, later_tables, live): (Client, Vec<(String, String)>, Option<Catalog>) =
            match later {
                Later::Point(restored) => (
                    connect_db(&request.target_url, &restored.database).await?,
                    restored.manifest_tables,
                    None,
                ),
                Later::Live(client, catalog) => {
                    let tables = catalog
                        .tenant_tables()
                        .map(|t| (t.schema.clone(), t.name.clone()))
                        .collect();
                    (client, tables, Some(catalog))
                }
            };
        // Every tenant table of either side: one created or dropped in between has all its
        // rows on one side, and says so.
        let mut names = from.1.manifest_tables.clone();
        names.extend(
            later_tables
                .iter()
                .filter(|t| !names.contains(t))
                .cloned()
                .collect::<Vec<_>>(),
        );
        let mut tables = Vec::new();
        for entry in &names {
            let (in_earlier, in_later) = (
                from.1.manifest_tables.contains(entry),
                later_tables.contains(entry),
            );
            let name = format!("{}.{}", entry.0, entry.1);
            let TableQuery {
                sql: earlier_sql,
                key,
            } = side_query(
                if in_earlier { &earlier } else { &later_db },
                entry,
                None,
                RowText::Json,
            )
            .await?;
            let later_sql = match &live {
                Some(catalog) => {
                    let filter = tenant_filter(catalog, entry, &request.tenant);
                    side_query(&later_db, entry, filter.as_deref(), RowText::Json)
                        .await?
                        .sql
                }
                None => earlier_sql.clone(),
            };
            let left = match in_earlier {
                true => rows(&earlier, &earlier_sql, &name).await?,
                false => Box::pin(futures::stream::empty()) as RowStream,
            };
            let right = match in_later {
                true => rows(&later_db, &later_sql, &name).await?,
                false => Box::pin(futures::stream::empty()) as RowStream,
            };
            let mut diff = TableDiff {
                table: name,
                key,
                note: match (in_earlier, in_later) {
                    (true, false) => Some("only at the earlier point: dropped or renamed since"),
                    (false, true) => Some("only at the later point: created or renamed since"),
                    _ => None,
                },
                ..TableDiff::default()
            };
            merge(left, right, &mut diff, &mut each_row).await?;
            tables.push(diff);
        }
        Ok(DiffReport {
            tenant: request.tenant.clone(),
            from: Side::of(&from.0),
            to: to_side,
            tables,
        })
    }
    .await;
    for database in scratch {
        crate::restore::drop_database(&maintenance, &database).await;
    }
    result
}

/// The tenant's rows of `table` in the live source, as the snapshot selects them.
pub(crate) fn tenant_filter(
    catalog: &Catalog,
    (schema, name): &(String, String),
    tenant: &str,
) -> Option<String> {
    catalog
        .tables
        .iter()
        .find(|t| &t.schema == schema && &t.name == name)
        .and_then(|t| catalog.tenant_filter(t, tenant))
}

/// The later side: the source in its read transaction (and its catalog, for the tenant's
/// filters), or a second restore point.
enum Later {
    Live(Client, Catalog),
    Point(Restored),
}

/// A restore point in a scratch database.
pub(crate) struct Restored {
    pub(crate) database: String,
    /// (schema, name) of every tenant table the snapshot backs up.
    pub(crate) manifest_tables: Vec<(String, String)>,
}

/// Restores `request.target` into a new scratch database `updog_<purpose>_<random>` (its name
/// pushed on `scratch` first, so the caller drops it whatever happens), readable by the
/// restore role.
pub(crate) async fn restore_scratch(
    repo: &Repository,
    identities: &Arc<Identities>,
    request: RestoreRequest,
    purpose: &str,
    scratch: &mut Vec<String>,
) -> Result<(RestorePoint, Restored), DiffError> {
    let database = format!("updog_{purpose}_{:016x}", fastrand::u64(..));
    scratch.push(database.clone());
    let request = RestoreRequest {
        target_db: Some(database.clone()),
        ..request
    };
    let report = crate::restore::run(repo, identities.clone(), &request).await?;
    let id: SnapshotId = report
        .snapshot
        .parse()
        .map_err(|message| DiffError::Query {
            context: "the restored snapshot's id".into(),
            message,
        })?;
    let manifest = repo.manifest(&id).await.map_err(RestoreError::from)?;
    let manifest_tables: Vec<(String, String)> = manifest
        .tables
        .iter()
        .filter(|t| t.scope == Scope::Tenant)
        .map(|t| (t.schema.clone(), t.name.clone()))
        .collect();
    // The restored tables keep the source's row level security, FORCEd on the owner too in
    // the seed's pattern: the restore role would read nothing of its own scratch database.
    let client = connect_db(&request.target_url, &database).await?;
    for (schema, name) in &manifest_tables {
        client
            .batch_execute(&format!(
                "ALTER TABLE {}.{} NO FORCE ROW LEVEL SECURITY, DISABLE ROW LEVEL SECURITY",
                quote_ident(schema),
                quote_ident(name)
            ))
            .await
            .map_err(query_error(format!(
                "reading {schema}.{name} in the scratch database"
            )))?;
    }
    Ok((
        report.restore_point,
        Restored {
            database,
            manifest_tables,
        },
    ))
}

/// A connection to `database` on the server at `url`, with [`same_output`].
pub(crate) async fn connect_db(url: &str, database: &str) -> Result<Client, DiffError> {
    let mut target = crate::pg::pg_config(url).map_err(SourceError::from)?;
    target.config.dbname(database);
    let (client, connection) = crate::pg::connect::connect_client(&target.config, &target.tls)
        .await
        .map_err(|e| {
            ConnectError::connecting(format!("{} database {database}", redact_url(url)), e)
        })?;
    tokio::spawn(connection);
    same_output(&client).await?;
    Ok(client)
}

/// Settings that make every value print the same on both sides, whatever each server's
/// defaults: a timestamptz in another time zone, or a date in another style, would compare
/// unequal (and read back differently).
pub(crate) async fn same_output(client: &Client) -> Result<(), DiffError> {
    client
        .batch_execute(
            "SET DateStyle = 'ISO, YMD'; SET IntervalStyle = postgres; SET TimeZone = 'UTC';
             SET extra_float_digits = 1; SET bytea_output = hex",
        )
        .await
        .map_err(query_error("setting the session's output formats".into()))
}

/// How one side of a table is listed, in merge order.
pub(crate) struct TableQuery {
    /// `(key, row)` as text, ordered by the key's bytes (`COLLATE "C"`: the order the merge
    /// compares in, whatever the servers' collations), then the row's.
    pub(crate) sql: String,
    /// The primary key's columns; empty: whole rows are the keys.
    pub(crate) key: Vec<String>,
}

/// How rows are written out for comparing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowText {
    /// `to_jsonb(t)`: readable, for people (`diff --rows`).
    Json,
    /// `t::text`, the record's own text: cheaper, and reads back exactly for every type
    /// (`$1::text::table`), for writing it (`rewind`).
    Record,
}

/// The query listing `table` (its rows passing `filter`, if any). The key is the primary key
/// of the table as `catalog` (a connection to the database that has it) knows it.
pub(crate) async fn side_query(
    catalog: &Client,
    (schema, name): &(String, String),
    filter: Option<&str>,
    text: RowText,
) -> Result<TableQuery, DiffError> {
    let table = format!("{}.{}", quote_ident(schema), quote_ident(name));
    let key: Vec<String> = catalog
        .query(
            "SELECT a.attname::text FROM pg_catalog.pg_index i
               JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
              WHERE i.indrelid = $1::text::regclass AND i.indisprimary
              ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&table],
        )
        .await
        .map_err(query_error(format!("reading the primary key of {schema}.{name}")))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let row_expr = match text {
        RowText::Json => "to_jsonb(t)::text",
        RowText::Record => "t::text",
    };
    let key_expr = if key.is_empty() {
        row_expr.to_string()
    } else {
        format!(
            "jsonb_build_array({})::text",
            key.iter()
                .map(|c| format!("t.{}", quote_ident(c)))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let filter = filter.map(|f| format!(" WHERE {f}")).unwrap_or_default();
    let sql = format!(
        "SELECT k, r FROM (SELECT {key_expr} AS k, {row_expr} AS r FROM {table} t{filter}) s \
         ORDER BY k COLLATE \"C\", r COLLATE \"C\""
    );
    Ok(TableQuery { sql, key })
}

/// A table's columns as `name type`, in order: what record text (`t::text`) holds.
pub(crate) async fn columns(
    client: &Client,
    (schema, name): &(String, String),
) -> Result<Vec<String>, DiffError> {
    let table = format!("{}.{}", quote_ident(schema), quote_ident(name));
    Ok(client
        .query(
            "SELECT quote_ident(attname) || ' ' || format_type(atttypid, atttypmod)
               FROM pg_catalog.pg_attribute
              WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped
              ORDER BY attnum",
            &[&table],
        )
        .await
        .map_err(query_error(format!(
            "reading the columns of {schema}.{name}"
        )))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// One row of one side: its key and the row, as [`TableQuery`] writes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SideRow {
    pub(crate) key: String,
    pub(crate) row: String,
}

impl SideRow {
    fn of(row: &Row) -> SideRow {
        SideRow {
            key: row.get(0),
            row: row.get(1),
        }
    }
}

pub(crate) type RowStream<'a> =
    std::pin::Pin<Box<dyn Stream<Item = Result<SideRow, DiffError>> + Send + 'a>>;

/// One side as a stream (the query runs to its end: nothing else may use `client` meanwhile).
pub(crate) async fn rows(
    client: &Client,
    sql: &str,
    table: &str,
) -> Result<RowStream<'static>, DiffError> {
    let stream = client
        .query_raw(sql, std::iter::empty::<&str>())
        .await
        .map_err(query_error(format!("reading {table}")))?;
    let table = table.to_string();
    Ok(Box::pin(stream.map(move |row| {
        row.map(|r| SideRow::of(&r))
            .map_err(query_error(format!("reading {table}")))
    })))
}

/// One side through a cursor of the open transaction, fetched a batch at a time, so that
/// statements can run on `client` between two batches (the cursor keeps the snapshot it was
/// opened with: it does not see them).
pub(crate) async fn cursor_rows<'a>(
    client: &'a Client,
    sql: &str,
    table: &str,
) -> Result<RowStream<'a>, DiffError> {
    let cursor = format!("updog_side_{:08x}", fastrand::u32(..));
    client
        .batch_execute(&format!("DECLARE {cursor} NO SCROLL CURSOR FOR {sql}"))
        .await
        .map_err(query_error(format!("reading {table}")))?;
    let table = table.to_string();
    let state = (std::collections::VecDeque::new(), false);
    Ok(Box::pin(futures::stream::try_unfold(
        state,
        move |(mut batch, mut done): (std::collections::VecDeque<SideRow>, bool)| {
            let (cursor, table) = (cursor.clone(), table.clone());
            async move {
                if batch.is_empty() && !done {
                    let rows = client
                        .query(&format!("FETCH 1000 FROM {cursor}"), &[])
                        .await
                        .map_err(query_error(format!("reading {table}")))?;
                    done = rows.len() < 1000;
                    batch.extend(rows.iter().map(SideRow::of));
                    if done {
                        client
                            .batch_execute(&format!("CLOSE {cursor}"))
                            .await
                            .map_err(query_error(format!("reading {table}")))?;
                    }
                }
                Ok(batch.pop_front().map(|row| (row, (batch, done))))
            }
        },
    )))
}

/// What the later side did to a row of the earlier one.
#[derive(Debug)]
pub(crate) enum Change {
    Insert(SideRow),
    Delete(SideRow),
    Update { before: SideRow, after: SideRow },
}

/// The two sides of one table, both in key order, merged into their differences.
pub(crate) struct Merge<'a> {
    earlier: RowStream<'a>,
    later: RowStream<'a>,
    a: Option<SideRow>,
    b: Option<SideRow>,
}

impl<'a> Merge<'a> {
    pub(crate) async fn new(
        mut earlier: RowStream<'a>,
        mut later: RowStream<'a>,
    ) -> Result<Merge<'a>, DiffError> {
        let (a, b) = (earlier.try_next().await?, later.try_next().await?);
        Ok(Merge {
            earlier,
            later,
            a,
            b,
        })
    }

    /// The next difference (counted into `diff`, as are the unchanged rows on the way).
    pub(crate) async fn next(&mut self, diff: &mut TableDiff) -> Result<Option<Change>, DiffError> {
        loop {
            let order = match (&self.a, &self.b) {
                (None, None) => return Ok(None),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(a), Some(b)) => a.key.as_bytes().cmp(b.key.as_bytes()),
            };
            match order {
                std::cmp::Ordering::Less => {
                    diff.deleted += 1;
                    let row = self.a.take().expect("the earlier side has a row");
                    self.a = self.earlier.try_next().await?;
                    return Ok(Some(Change::Delete(row)));
                }
                std::cmp::Ordering::Greater => {
                    diff.inserted += 1;
                    let row = self.b.take().expect("the later side has a row");
                    self.b = self.later.try_next().await?;
                    return Ok(Some(Change::Insert(row)));
                }
                std::cmp::Ordering::Equal => {
                    let (before, after) =
                        (self.a.take().expect("a row"), self.b.take().expect("a row"));
                    self.a = self.earlier.try_next().await?;
                    self.b = self.later.try_next().await?;
                    // Without a key, whole rows are the keys: equal keys are equal rows.
                    if before.row == after.row {
                        diff.unchanged += 1;
                    } else {
                        diff.updated += 1;
                        return Ok(Some(Change::Update { before, after }));
                    }
                }
            }
        }
    }
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.to_string()))
}

/// Merges the two sides, both in key order, into `diff`, naming each changed row to `each_row`.
async fn merge(
    earlier: RowStream<'_>,
    later: RowStream<'_>,
    diff: &mut TableDiff,
    each_row: &mut Option<&mut dyn FnMut(RowChange)>,
) -> Result<(), DiffError> {
    let mut merge = Merge::new(earlier, later).await?;
    while let Some(change) = merge.next(diff).await? {
        let Some(each) = each_row.as_mut() else {
            continue;
        };
        let (change, key, before, after) = match &change {
            Change::Insert(row) => ("insert", &row.key, None, Some(row)),
            Change::Delete(row) => ("delete", &row.key, Some(row), None),
            Change::Update { before, after } => ("update", &before.key, Some(before), Some(after)),
        };
        each(RowChange {
            table: diff.table.clone(),
            change,
            key: json(key),
            before: before.map(|r| json(&r.row)),
            after: after.map(|r| json(&r.row)),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(rows: &[(&str, &str)]) -> RowStream<'static> {
        let rows: Vec<Result<SideRow, DiffError>> = rows
            .iter()
            .map(|(k, r)| {
                Ok(SideRow {
                    key: k.to_string(),
                    row: r.to_string(),
                })
            })
            .collect();
        Box::pin(futures::stream::iter(rows))
    }

    #[tokio::test]
    async fn merging_counts_and_names_every_changed_row() {
        let earlier = side(&[
            ("[1]", r#"{"id": 1, "v": "a"}"#),
            ("[2]", r#"{"id": 2, "v": "b"}"#),
            ("[4]", r#"{"id": 4, "v": "d"}"#),
        ]);
        let later = side(&[
            ("[1]", r#"{"id": 1, "v": "a"}"#),
            ("[2]", r#"{"id": 2, "v": "B"}"#),
            ("[3]", r#"{"id": 3, "v": "c"}"#),
        ]);
        let mut diff = TableDiff {
            table: "m.t".into(),
            key: vec!["id".into()],
            ..TableDiff::default()
        };
        let mut seen = Vec::new();
        let mut each = |c: RowChange| seen.push((c.change, c.key.to_string()));
        merge(earlier, later, &mut diff, &mut Some(&mut each))
            .await
            .unwrap();
        assert_eq!(
            (diff.inserted, diff.deleted, diff.updated, diff.unchanged),
            (1, 1, 1, 1)
        );
        assert_eq!(
            seen,
            [
                ("update", "[2]".to_string()),
                ("insert", "[3]".to_string()),
                ("delete", "[4]".to_string())
            ]
        );
    }

    #[tokio::test]
    async fn rows_without_a_key_compare_as_multisets() {
        // Two identical rows before, one after: one deleted, one unchanged.
        let row = r#"{"v": 1}"#;
        let mut diff = TableDiff {
            table: "m.t".into(),
            ..TableDiff::default()
        };
        merge(
            side(&[(row, row), (row, row)]),
            side(&[(row, row), (r#"{"v": 2}"#, r#"{"v": 2}"#)]),
            &mut diff,
            &mut None,
        )
        .await
        .unwrap();
        assert_eq!(
            (diff.inserted, diff.deleted, diff.updated, diff.unchanged),
            (1, 1, 0, 1)
        );
    }
}
