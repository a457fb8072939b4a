//! `rewind`: makes one tenant's rows in the source equal to a restore point, and changes
//! nothing else.
//!
//! The restore point is restored into a scratch database `updog_rewind_…` (as `diff` does) and compared with the
//! tenant's live rows; that comparison is the plan. `--apply` first takes a snapshot of the
//! tenant (so that the rewind can itself be undone), then writes in ONE transaction as
//! `restore.writer_url`, at REPEATABLE READ:
//!
//! 1. deletes, tables children first (reverse foreign-key order): rows the tenant has now and
//!    did not have then — first, so that a row coming back never meets the unique key of a row
//!    that replaced it (a re-import);
//! 2. inserts and updates, parents first: rows of then that are missing or different now;
//! 3. a check: the tenant's rows compared with the restore point again, in the same
//!    transaction; any difference left and nothing is committed.
//!
//! Only rows the tenant filter selects are read, and only rows read are written, each by its
//! primary key (or its whole row) and each statement must touch exactly one row. The live rows
//! are read through cursors of that transaction, so the statements run between two batches.
//! Values travel as record text (`$1::text::table`), which reads back exactly for every type.
//! Sequences are never written, so they never move backwards. A concurrent write to a row the
//! rewind changes makes PostgreSQL refuse the transaction (40001): nothing is changed. Triggers
//! fire as for any write: the application's own audit triggers record the rewind.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::Utc;
use serde::Serialize;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Statement};

use crate::codec::Identities;
use crate::config::Config;
use crate::diff::{
    Change, DiffError, Merge, RowText, Side, SideRow, TableDiff, TableQuery, columns, connect_db,
    cursor_rows, restore_scratch, rows, same_output, side_query, tenant_filter,
};
use crate::pg::quote_ident;
use crate::repository::{Repository, RewindRecord};
use crate::restore::{RestoreRequest, RestoreTarget};
use crate::retry::{Classify, ErrorClass};
use crate::snapshot::{SnapshotError, SnapshotRequest};
use crate::source::SourceError;
use crate::source::catalog::Catalog;

#[derive(Debug, thiserror::Error)]
pub enum RewindError {
    #[error(transparent)]
    Diff(#[from] DiffError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Repository(#[from] crate::repository::RepositoryError),
    #[error(
        "rewind --apply writes to the source and needs restore.writer_url: the source as a role with SELECT, INSERT, UPDATE and DELETE on the tenant tables (README, \"Rewind\"); nothing was changed"
    )]
    NoWriter,
    #[error(
        "tenant {tenant} changed while the rewind ran (a row it was changing was changed by another transaction): nothing was changed; run the rewind again"
    )]
    Conflict { tenant: String },
    #[error("table {table}: {change} of the row with key {key}: {message}; nothing was changed")]
    Row {
        table: String,
        change: &'static str,
        key: String,
        message: String,
    },
    #[error(
        "after the rewind, {table} still differs from the restore point ({left}): nothing was changed"
    )]
    NotEqual { table: String, left: String },
    #[error("table {table}: {message}: nothing was changed")]
    Schema { table: String, message: String },
    #[error(
        "role {role} is subject to row level security on {table}: it would see (and rewind) only what its policies show; set restore.tenant_setting (the setting the policies read the tenant from) with policies for this role, or give it BYPASSRLS (README, \"Rewind\"); nothing was changed"
    )]
    RowSecurity { role: String, table: String },
}

impl Classify for RewindError {
    fn class(&self) -> ErrorClass {
        match self {
            RewindError::Diff(e) => e.class(),
            RewindError::Snapshot(e) => e.class(),
            RewindError::Repository(e) => e.class(),
            RewindError::NoWriter | RewindError::RowSecurity { .. } => ErrorClass::Usage,
            // The tenant was busy: the same rewind may go through a moment later.
            RewindError::Conflict { .. } => ErrorClass::Transient,
            RewindError::Row { .. } | RewindError::NotEqual { .. } | RewindError::Schema { .. } => {
                ErrorClass::Permanent
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct RewindRequest {
    pub tenant: String,
    pub to: RestoreTarget,
    pub apply: bool,
    /// Where the scratch database is created (the restore role's server).
    pub target_url: String,
    pub scratch_dir: std::path::PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct RewindReport {
    pub tenant: String,
    /// The restore point the tenant is made equal to.
    pub to: Side,
    /// Per table, what changed since the restore point (as `diff` says it): the rewind deletes
    /// the rows `inserted` since, puts back those `deleted` since, and sets back those
    /// `updated`.
    pub tables: Vec<TableDiff>,
    pub applied: bool,
    /// The snapshot of the tenant taken before applying (restore it to undo the rewind).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_before: Option<String>,
    /// Where the repository records the rewind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
}

pub async fn run(
    config: &Config,
    repo: &Repository,
    identities: Arc<Identities>,
    request: &RewindRequest,
) -> Result<RewindReport, RewindError> {
    let writer_url = match (&config.restore.writer_url, request.apply) {
        (Some(url), _) => url.clone(),
        (None, false) => config.source.url.clone(),
        (None, true) => return Err(RewindError::NoWriter),
    };
    let maintenance = crate::pg::connect(&request.target_url)
        .await
        .map_err(DiffError::from)?;
    let mut scratch = Vec::new();
    let result = async {
        let (point, restored) = restore_scratch(
            repo,
            &identities,
            RestoreRequest {
                tenant: request.tenant.clone(),
                target: request.to,
                target_db: None,
                target_url: request.target_url.clone(),
                scratch_dir: request.scratch_dir.clone(),
            },
            "rewind",
            &mut scratch,
        )
        .await?;
        tracing::info!(database = %restored.database, restore_point_time = %point.time, "restore point restored into a scratch database");
        let snapshot_before = match request.apply {
            true => Some(
                crate::snapshot::take(
                    config,
                    repo,
                    &SnapshotRequest {
                        tenants: vec![request.tenant.clone()],
                        stream_slot: None,
                    },
                )
                .await?
                .id
                .to_string(),
            ),
            false => None,
        };
        let earlier = connect_db(&request.target_url, &restored.database).await?;
        let writer = crate::pg::connect(&writer_url)
            .await
            .map_err(DiffError::from)?;
        same_output(&writer).await?;
        let mode = if request.apply { "" } else { " READ ONLY" };
        writer
            .batch_execute(&format!("BEGIN ISOLATION LEVEL REPEATABLE READ{mode}"))
            .await
            .map_err(|e| write_error(&request.tenant, "starting the rewind's transaction", &e))?;
        // Under the tenant's own context, the writer role's policies let PostgreSQL itself
        // refuse a row of another tenant; without one, the role must see every row.
        match &config.restore.tenant_setting {
            Some(setting) => {
                writer
                    .query_one("SELECT set_config($1, $2, true)", &[setting, &request.tenant])
                    .await
                    .map_err(|e| write_error(&request.tenant, "setting the tenant context", &e))?;
            }
            None => check_row_security(&writer, &restored.manifest_tables).await?,
        }
        let catalog = Catalog::load(&writer, &config.source)
            .await
            .map_err(|e| DiffError::from(SourceError::from(e)))?;
        let order = parents_first(&writer, &restored.manifest_tables).await?;
        let mut rewind = Rewind {
            tenant: &request.tenant,
            earlier: &earlier,
            writer: &writer,
            catalog: &catalog,
            apply: request.apply,
        };
        // The plan, and the deletes (children first).
        let mut tables: BTreeMap<String, TableDiff> = BTreeMap::new();
        for table in order.iter().rev() {
            let diff = rewind.pass(table, Pass::Deletes).await?;
            tables.insert(diff.table.clone(), diff);
        }
        let mut record = None;
        if request.apply {
            tracing::info!("deletes applied");
            for table in &order {
                rewind.pass(table, Pass::InsertsAndUpdates).await?;
            }
            tracing::info!("inserts and updates applied; comparing with the restore point");
            for table in &order {
                let left = rewind.pass(table, Pass::Check).await?;
                if left.changed() > 0 {
                    return Err(RewindError::NotEqual {
                        table: left.table.clone(),
                        left: format!(
                            "{} to insert, {} to delete, {} to update",
                            left.inserted, left.deleted, left.updated
                        ),
                    });
                }
            }
            writer
                .batch_execute("COMMIT")
                .await
                .map_err(|e| write_error(&request.tenant, "committing the rewind", &e))?;
            let role: String = crate::pg::connect(&writer_url)
                .await
                .map_err(DiffError::from)?
                .query_one("SELECT current_user::text", &[])
                .await
                .map(|r| r.get(0))
                .unwrap_or_default();
            let total = |f: fn(&TableDiff) -> u64| tables.values().map(f).sum();
            let key = repo
                .put_rewind_record(&RewindRecord {
                    tenant: request.tenant.clone(),
                    to: match request.to {
                        RestoreTarget::At(t) => Some(t),
                        RestoreTarget::Latest => None,
                    },
                    restore_point: point.clone(),
                    snapshot_before: snapshot_before.clone().unwrap_or_default(),
                    by: format!(
                        "{} as {role}",
                        std::env::var("USER").unwrap_or_else(|_| "?".into())
                    ),
                    // What the rewind did: it deleted what was inserted since, and put back
                    // what was deleted since.
                    inserted: total(|t| t.deleted),
                    deleted: total(|t| t.inserted),
                    updated: total(|t| t.updated),
                    applied_at: Utc::now(),
                })
                .await;
            // The rewind is committed: a record that cannot be written is worth a warning,
            // not a failure that would suggest running it again.
            match key {
                Ok(key) => record = Some(key),
                Err(e) => {
                    tracing::warn!(error = %e, "could not record the rewind in the repository (rewinds/)")
                }
            }
        } else {
            let _ = writer.batch_execute("ROLLBACK").await;
        }
        Ok(RewindReport {
            tenant: request.tenant.clone(),
            to: Side {
                kind: "repository",
                time: point.time,
                lsn: Some(point.lsn),
            },
            tables: order
                .iter()
                .filter_map(|(s, n)| tables.remove(&format!("{s}.{n}")))
                .collect(),
            applied: request.apply,
            snapshot_before,
            record,
        })
    }
    .await;
    for database in scratch {
        crate::restore::drop_database(&maintenance, &database).await;
    }
    result
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Deletes,
    InsertsAndUpdates,
    Check,
}

/// One rewind's connections: the restore point's scratch database, and the source in the
/// rewind's transaction.
struct Rewind<'a> {
    tenant: &'a str,
    earlier: &'a Client,
    writer: &'a Client,
    catalog: &'a Catalog,
    apply: bool,
}

impl Rewind<'_> {
    /// Compares one table and applies what `pass` applies of the difference.
    async fn pass(
        &mut self,
        entry: &(String, String),
        pass: Pass,
    ) -> Result<TableDiff, RewindError> {
        let name = format!("{}.{}", entry.0, entry.1);
        let TableQuery { sql, key } =
            side_query(self.earlier, entry, None, RowText::Record).await?;
        // Without the tenant's filter the rewind would see (and delete) every tenant's rows.
        let Some(filter) = tenant_filter(self.catalog, entry, self.tenant) else {
            return Err(RewindError::Schema {
                table: name,
                message: "the source has no such tenant table now (dropped, renamed or reconfigured since the restore point)".into(),
            });
        };
        // Rows go back as record text, which is only the same record with the same columns.
        let (then, now) = (
            columns(self.earlier, entry).await?,
            columns(self.writer, entry).await?,
        );
        if then != now {
            return Err(RewindError::Schema {
                table: name,
                message: format!(
                    "its columns at the restore point ({}) are not the source's now ({}): a migration changed it since, and a rewind does not set rows back across a schema change; restore the restore point into a new database (`updog-backup restore --at`) and move what is needed by hand",
                    then.join(", "),
                    now.join(", ")
                ),
            });
        }
        let live = side_query(self.writer, entry, Some(&filter), RowText::Record).await?;
        let statements = Statements::for_table(self.writer, entry, &key).await?;
        let earlier = rows(self.earlier, &sql, &name).await?;
        let later = cursor_rows(self.writer, &live.sql, &name).await?;
        let mut merge = Merge::new(earlier, later).await?;
        let mut diff = TableDiff {
            table: name.clone(),
            key,
            ..TableDiff::default()
        };
        // `earlier` is the restore point and `later` the source: the source's extra rows are
        // deleted, the restore point's missing rows inserted.
        while let Some(change) = merge.next(&mut diff).await? {
            if !self.apply || pass == Pass::Check {
                continue;
            }
            let (sql, row, what) = match (&change, pass) {
                (Change::Insert(live_row), Pass::Deletes) => {
                    (&statements.delete, live_row, "the delete")
                }
                (Change::Delete(then), Pass::InsertsAndUpdates) => {
                    (&statements.insert, then, "the insert")
                }
                (Change::Update { before: then, .. }, Pass::InsertsAndUpdates) => {
                    match &statements.update {
                        Some(update) => (update, then, "the update"),
                        None => continue,
                    }
                }
                _ => continue,
            };
            match self.writer.execute(sql, &[&row.row]).await {
                Ok(1) => {}
                Ok(n) => {
                    return Err(RewindError::Row {
                        table: name,
                        change: what,
                        key: row.key.clone(),
                        message: format!(
                            "it touched {n} rows, not one (another transaction changed it, or the key is not unique)"
                        ),
                    });
                }
                Err(e) => return Err(row_error(self.tenant, &name, what, row, &e)),
            }
        }
        Ok(diff)
    }
}

/// The statements that write one table, each taking a row as record text (`$1`), prepared
/// once: a rewind runs one per row.
struct Statements {
    insert: Statement,
    delete: Statement,
    /// `None`: every column is a key or generated (two rows with one key are the same).
    update: Option<Statement>,
}

impl Statements {
    async fn for_table(
        client: &Client,
        (schema, name): &(String, String),
        key: &[String],
    ) -> Result<Statements, RewindError> {
        let table = format!("{}.{}", quote_ident(schema), quote_ident(name));
        let columns: Vec<(String, bool, bool)> = client
            .query(
                "SELECT attname::text, attgenerated::text <> '', attidentity = 'a'
                   FROM pg_catalog.pg_attribute
                  WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped
                  ORDER BY attnum",
                &[&table],
            )
            .await
            .map_err(|e| write_error("", &format!("reading the columns of {table}"), &e))?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let row = format!("(SELECT ($1::text::{table}).*) s");
        let list = |names: Vec<&String>, prefix: &str| {
            names
                .iter()
                .map(|c| format!("{prefix}{}", quote_ident(c)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let written: Vec<&String> = columns
            .iter()
            .filter(|(_, generated, _)| !generated)
            .map(|(c, ..)| c)
            .collect();
        let matching = key
            .iter()
            .map(|k| format!("d.{k} = s.{k}", k = quote_ident(k)))
            .collect::<Vec<_>>()
            .join(" AND ");
        let insert = format!(
            "INSERT INTO {table} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {row}",
            list(written.clone(), ""),
            list(written.clone(), "s.")
        );
        let delete = if key.is_empty() {
            // Identical rows are interchangeable: one of them.
            format!(
                "DELETE FROM {table} WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM {table} d WHERE d::text = $1 LIMIT 1)"
            )
        } else {
            format!("DELETE FROM {table} d USING {row} WHERE {matching}")
        };
        let settable: Vec<String> = columns
            .iter()
            .filter(|(c, generated, identity)| !generated && !identity && !key.contains(c))
            .map(|(c, ..)| format!("{c} = s.{c}", c = quote_ident(c)))
            .collect();
        let update = (!key.is_empty() && !settable.is_empty()).then(|| {
            format!(
                "UPDATE {table} d SET {} FROM {row} WHERE {matching}",
                settable.join(", ")
            )
        });
        let prepare = |sql: String| async move {
            client
                .prepare_typed(&sql, &[Type::TEXT])
                .await
                .map_err(|e| write_error("", &format!("preparing {sql}"), &e))
        };
        Ok(Statements {
            insert: prepare(insert).await?,
            delete: prepare(delete).await?,
            update: match update {
                Some(sql) => Some(prepare(sql).await?),
                None => None,
            },
        })
    }
}

/// The writer must see every row of the tenant: a role under row level security sees only
/// what its policies allow, and would take the rest for deleted.
async fn check_row_security(
    client: &Client,
    tables: &[(String, String)],
) -> Result<(), RewindError> {
    let row = client
        .query_one(
            "SELECT current_user::text, rolsuper OR rolbypassrls FROM pg_catalog.pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(|e| write_error("", "reading the writer role", &e))?;
    let (role, bypass): (String, bool) = (row.get(0), row.get(1));
    if bypass {
        return Ok(());
    }
    let names: Vec<String> = tables.iter().map(|(s, n)| format!("{s}.{n}")).collect();
    let secured = client
        .query_opt(
            "SELECT n.nspname || '.' || c.relname FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relrowsecurity AND n.nspname || '.' || c.relname = ANY ($1) LIMIT 1",
            &[&names],
        )
        .await
        .map_err(|e| write_error("", "reading row level security", &e))?;
    match secured {
        Some(row) => Err(RewindError::RowSecurity {
            role,
            table: row.get(0),
        }),
        None => Ok(()),
    }
}

/// The tenant tables in foreign-key order, parents first (`tables` as the restore point has
/// them). A cycle is broken where it closes; self-references are ignored.
async fn parents_first(
    client: &Client,
    tables: &[(String, String)],
) -> Result<Vec<(String, String)>, RewindError> {
    let edges = client
        .query(
            "SELECT cn.nspname::text, cc.relname::text, pn.nspname::text, pc.relname::text
               FROM pg_catalog.pg_constraint c
               JOIN pg_catalog.pg_class cc ON cc.oid = c.conrelid
               JOIN pg_catalog.pg_namespace cn ON cn.oid = cc.relnamespace
               JOIN pg_catalog.pg_class pc ON pc.oid = c.confrelid
               JOIN pg_catalog.pg_namespace pn ON pn.oid = pc.relnamespace
              WHERE c.contype = 'f' AND c.conparentid = 0",
            &[],
        )
        .await
        .map_err(|e| write_error("", "reading the foreign keys", &e))?;
    let mut parents: BTreeMap<(String, String), BTreeSet<(String, String)>> = BTreeMap::new();
    for row in &edges {
        let child = (row.get::<_, String>(0), row.get::<_, String>(1));
        let parent = (row.get::<_, String>(2), row.get::<_, String>(3));
        if child != parent && tables.contains(&child) && tables.contains(&parent) {
            parents.entry(child).or_default().insert(parent);
        }
    }
    let mut order = Vec::new();
    let mut state: BTreeMap<(String, String), bool> = BTreeMap::new(); // false: on the path
    fn visit(
        table: &(String, String),
        parents: &BTreeMap<(String, String), BTreeSet<(String, String)>>,
        state: &mut BTreeMap<(String, String), bool>,
        order: &mut Vec<(String, String)>,
    ) {
        if state.contains_key(table) {
            return;
        }
        state.insert(table.clone(), false);
        for parent in parents.get(table).into_iter().flatten() {
            visit(parent, parents, state, order);
        }
        state.insert(table.clone(), true);
        order.push(table.clone());
    }
    for table in tables {
        visit(table, &parents, &mut state, &mut order);
    }
    Ok(order)
}

fn write_error(tenant: &str, context: &str, e: &tokio_postgres::Error) -> RewindError {
    if e.code() == Some(&SqlState::T_R_SERIALIZATION_FAILURE) {
        return RewindError::Conflict {
            tenant: tenant.into(),
        };
    }
    RewindError::Diff(DiffError::Query {
        context: context.into(),
        message: crate::pg::sqlstate::describe(e),
    })
}

fn row_error(
    tenant: &str,
    table: &str,
    change: &'static str,
    row: &SideRow,
    e: &tokio_postgres::Error,
) -> RewindError {
    if e.code() == Some(&SqlState::T_R_SERIALIZATION_FAILURE) {
        return RewindError::Conflict {
            tenant: tenant.into(),
        };
    }
    let message = match e.code() {
        Some(code) if *code == SqlState::UNIQUE_VIOLATION => format!(
            "its key is taken now (by another tenant's row, or one this tenant created since under another key): {}",
            crate::pg::sqlstate::describe(e)
        ),
        _ => crate::pg::sqlstate::describe(e),
    };
    RewindError::Row {
        table: table.into(),
        change,
        key: row.key.clone(),
        message,
    }
}
