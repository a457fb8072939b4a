//! Restore: one tenant into a NEW recovery database, never touching the source.
//!
//! Order of work: plan (which snapshot, which packs) ─► ask the target whether it can create
//! what the schema needs outside its schemas (extensions) ─► verify every object and section
//! needed (digest, decryption, structure and identity) BEFORE creating anything ─► CREATE
//! DATABASE ─► extensions, pre-data ─► COPY the global and the tenant's rows ─► sequences ─►
//! keys and indexes ─► replay the tenant's changes up to T ─► the rest of post-data ─► report.
//! A failure after the database was created drops it: a restore either completes or leaves
//! nothing.

pub mod changes;
pub mod extensions;
pub mod plan;
pub mod replay;
pub mod schema;
mod sections;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::SinkExt;
use serde::Serialize;
use tokio_postgres::Client;

use crate::codec::Identities;
use crate::pg::Lsn;
use crate::pg::redact_url;
use crate::pg::sqlstate;
use crate::pg::{quote_ident, quote_literal};
use crate::progress::{Progress, Unit};
use crate::repository::archive::ArchiveEvent;
use crate::repository::{Manifest, Part, Repository, RepositoryError, RestorePoint};
use crate::retry::{Classify, ErrorClass};
use crate::source::SourceError;

use crate::storage::Requests;
pub use changes::ChangePlan;
pub use plan::{PlanError, RestoreTarget, Window};
use sections::Fetched;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error(transparent)]
    Connect(#[from] crate::pg::ConnectError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Tool(#[from] crate::source::pg_tools::ToolError),
    #[error(
        "database {0:?} already exists on the target (a restore never writes into an existing database): choose another name with --target-db; without --target-db, a restore picks a free default name"
    )]
    TargetExists(String),
    #[error("{0:?} is not a usable database name: use 1 to 63 letters, digits and _")]
    TargetName(String),
    #[error("no restore target: set restore.target_url in the config or pass --target-url")]
    NoTarget,
    #[error(
        "the tenant's schema depends on objects outside source.schemas that no extension provides: {objects}. pg_dump --schema leaves them out, so no recovery database can be built from this snapshot (nothing was created): {advice}"
    )]
    OutsideSchemas { objects: String, advice: String },
    #[error(
        "the restore target {target} cannot create extension(s) {extensions} that the tenant's schema uses (nothing was created): {problems}"
    )]
    Extensions {
        target: String,
        extensions: String,
        problems: String,
    },
    #[error("creating database {name:?}: {message}")]
    CreateDatabase { name: String, message: String },
    #[error("restoring {step} into {database:?}: {message} (the recovery database was dropped)")]
    Load {
        database: String,
        step: String,
        message: String,
    },
}

#[derive(Debug, Clone)]
pub struct RestoreRequest {
    pub tenant: String,
    pub target: RestoreTarget,
    pub target_db: Option<String>,
    pub target_url: String,
    /// Where the change sections wait between their check and the replay (ciphertext only).
    pub scratch_dir: std::path::PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub database: String,
    pub target: String,
    pub tenant: String,
    pub snapshot: String,
    /// The last transaction whose effects the database holds.
    pub restore_point: RestorePoint,
    pub window: Window,
    /// Changes replayed after the snapshot (`None`: the snapshot as it is).
    pub changes: Option<ChangesReport>,
    pub tenant_rows: BTreeMap<String, u64>,
    pub global_rows: BTreeMap<String, u64>,
    /// Schema entries the target refused (e.g. grants or policies for absent roles).
    pub not_recreated: Vec<schema::Skipped>,
    pub seconds: f64,
    /// Requests made to the store (set by the caller that counts them).
    pub store_requests: Requests,
}

/// Records a finished restore in the repository.
pub async fn record(repo: &Repository, report: &RestoreReport) -> Result<(), RepositoryError> {
    repo.put_restore_record(&crate::repository::RestoreRecord {
        tenant: report.tenant.clone(),
        database: report.database.clone(),
        snapshot: report.snapshot.clone(),
        restore_point: report.restore_point.clone(),
        rows: report.total_rows(),
        seconds: report.seconds,
        finished_at: Utc::now(),
    })
    .await
}

#[derive(Debug, Clone, Serialize)]
pub struct ChangesReport {
    pub packs: usize,
    pub transactions: u64,
    /// Time spent replaying (reading the sections and applying them).
    pub seconds: f64,
    #[serde(flatten)]
    pub stats: replay::ReplayStats,
}

impl RestoreReport {
    pub fn total_rows(&self) -> u64 {
        self.tenant_rows.values().sum()
    }
}

/// The default recovery database name: `recovery_<first 8 of the tenant>_<restore point>`
/// (with `_2`, `_3`… when it exists: see [`free_name`]).
pub fn default_database_name(tenant: &str, point: DateTime<Utc>) -> String {
    let short: String = tenant
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect::<String>()
        .to_ascii_lowercase();
    format!("recovery_{short}_{}", point.format("%Y%m%dT%H%M%S"))
}

fn check_database_name(name: &str) -> Result<(), RestoreError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(RestoreError::TargetName(name.into()))
    }
}

pub async fn run(
    repo: &Repository,
    identities: Arc<Identities>,
    request: &RestoreRequest,
) -> Result<RestoreReport, RestoreError> {
    let clock = Instant::now();
    let plan = plan::plan(repo, &request.tenant, request.target).await?;
    let manifest = plan.manifest;
    let point_in_time = plan
        .changes
        .as_ref()
        .map_or(manifest.consistent_time, |c| c.1);
    let database = match &request.target_db {
        Some(name) => name.clone(),
        None => default_database_name(&request.tenant, point_in_time),
    };
    check_database_name(&database)?;
    let database = free_name(&request.target_url, database, request.target_db.is_some()).await?;
    tracing::info!(tenant = %request.tenant, snapshot = %manifest.id, snapshot_lsn = %manifest.consistent_lsn, database = %database, "restore planned");
    // What the target must provide is known from the manifest alone: refused before a byte
    // of the tenant is fetched, and before anything is created.
    extensions::check_outside_objects(&manifest.depends_on)?;
    let maintenance = crate::pg::connect(&request.target_url).await?;
    extensions::check_target(
        &maintenance,
        &redact_url(&request.target_url),
        &manifest.depends_on,
    )
    .await?;

    // Everything is checked before anything is created.
    let dump = repo
        .read_sealed(&manifest.schema, identities.clone())
        .await?;
    // A base snapshot of all tenants without this one: it had no rows then.
    let in_base = manifest.tenants.contains_key(&request.tenant);
    let parts = [Part::Global, Part::Tenant(&request.tenant)];
    for part in &parts[..if in_base { 2 } else { 1 }] {
        repo.check_part(&manifest, *part, Some(identities.clone()))
            .await?;
    }
    let pg_restore = schema::pg_restore(manifest.server_version_num / 10000).await?;
    let (pre_preamble, pre) = schema::entries(&pg_restore, &dump, schema::Section::PreData).await?;
    let pre = extensions::before_pre_data(&manifest.depends_on, pre);
    let (post_preamble, post) =
        schema::entries(&pg_restore, &dump, schema::Section::PostData).await?;
    drop(dump);
    let changes = match plan.changes {
        Some((packs, until)) => {
            let plan = ChangePlan {
                packs,
                from: manifest.consistent_lsn,
                until,
            };
            let fetched = sections::fetch(repo, &plan, &identities, &request.scratch_dir).await?;
            tracing::info!(
                packs = plan.packs.len(),
                sections = fetched.sections,
                bytes = fetched.bytes,
                messages = fetched.messages,
                "change sections fetched and verified"
            );
            Some((plan, fetched))
        }
        None => None,
    };
    tracing::info!(objects = 3, "repository objects verified");

    create_database(&maintenance, &database).await?;
    let loading = async {
        let mut target = crate::pg::pg_config(&request.target_url)?;
        target.config.dbname(&database);
        let (client, connection) = crate::pg::connect::connect_client(&target.config, &target.tls)
            .await
            .map_err(|e| {
                crate::pg::ConnectError::connecting(
                    format!("{} database {database}", redact_url(&request.target_url)),
                    e,
                )
            })?;
        let connection = tokio::spawn(connection);
        let result = load(
            &client,
            repo,
            &identities,
            &manifest,
            &request.tenant,
            SchemaSql {
                pre: (&pre_preamble, &pre),
                post: (&post_preamble, &post),
            },
            changes.as_ref().map(|(plan, fetched)| (plan, fetched)),
        )
        .await;
        drop(client);
        let _ = connection.await;
        result
    };
    match loading.await {
        Ok(loaded) => {
            let report = RestoreReport {
                database,
                target: redact_url(&request.target_url),
                tenant: request.tenant.clone(),
                snapshot: manifest.id.to_string(),
                restore_point: match loaded.replayed.as_ref().and_then(|r| r.last) {
                    Some((lsn, time)) => RestorePoint { lsn, time },
                    None => RestorePoint {
                        lsn: manifest.consistent_lsn,
                        time: manifest.consistent_time,
                    },
                },
                changes: loaded.replayed.map(|r| r.report),
                window: plan.window,
                tenant_rows: loaded.tenant_rows,
                global_rows: loaded.global_rows,
                not_recreated: loaded.not_recreated,
                seconds: clock.elapsed().as_secs_f64(),
                store_requests: Requests::default(),
            };
            tracing::info!(
                database = %report.database, restore_point_lsn = %report.restore_point.lsn,
                restore_point_time = %report.restore_point.time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true), rows = report.total_rows(),
                seconds = report.seconds, "restore complete"
            );
            Ok(report)
        }
        Err(e) => {
            let message = e.to_string();
            drop_database(&maintenance, &database).await;
            Err(match e {
                LoadError::Step(step, message) => RestoreError::Load {
                    database,
                    step,
                    message,
                },
                _ => RestoreError::Load {
                    database,
                    step: "the recovery database".into(),
                    message,
                },
            })
        }
    }
}

/// The recovery database's name, asked of the target before anything is fetched: a taken
/// `--target-db` is refused at once (not after every object was checked), and a taken default
/// name (the same tenant and instant restored again) becomes the first free of `_2`, `_3`….
/// `CREATE DATABASE` still refuses a name taken meanwhile.
async fn free_name(target_url: &str, name: String, explicit: bool) -> Result<String, RestoreError> {
    let client = crate::pg::connect(target_url).await?;
    let taken: Vec<String> = client
        .query(
            "SELECT datname::text FROM pg_catalog.pg_database WHERE starts_with(datname::text, $1)",
            &[&name],
        )
        .await
        .map_err(|e| RestoreError::CreateDatabase {
            name: name.clone(),
            message: format!("checking whether it exists: {}", sqlstate::describe(&e)),
        })?
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    if !taken.contains(&name) {
        return Ok(name);
    }
    if explicit {
        return Err(RestoreError::TargetExists(name));
    }
    let free = (2..)
        .map(|n| format!("{name}_{n}"))
        .find(|candidate| !taken.contains(candidate))
        .expect("finitely many databases");
    check_database_name(&free)?;
    Ok(free)
}

async fn create_database(client: &Client, name: &str) -> Result<(), RestoreError> {
    let sql = format!(
        "CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'",
        quote_ident(name)
    );
    match client.batch_execute(&sql).await {
        Ok(()) => Ok(()),
        // 23505: another CREATE DATABASE of the same name committed meanwhile.
        Err(e)
            if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE)
                || e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
        {
            Err(RestoreError::TargetExists(name.into()))
        }
        Err(e) => Err(RestoreError::CreateDatabase {
            name: name.into(),
            message: sqlstate::describe(&e),
        }),
    }
}

/// Drops a recovery database whose restore failed. `WITH (FORCE)` waits only a few seconds
/// for the backends it terminates to exit, which a loaded server may not manage: a transient
/// failure is tried again before the database is left for the operator to drop.
/// Drops a database this process created (a failed restore's, a diff's scratch one), trying
/// for a while when it is still in use; logs what it could not drop.
pub(crate) async fn drop_database(client: &Client, name: &str) {
    let force = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(name));
    let plain = format!("DROP DATABASE IF EXISTS {}", quote_ident(name));
    let mut sql = &force;
    let mut backoff = crate::retry::Backoff::new(
        std::time::Duration::from_millis(500),
        std::time::Duration::from_secs(4),
    );
    for attempt in 1..=DROP_ATTEMPTS {
        match client.batch_execute(sql).await {
            Ok(()) => return,
            // `WITH (FORCE)` may only terminate sessions of the roles we are a member of; an
            // autovacuum worker that entered the new database is none, and makes it fail
            // with 42501. A plain DROP stops autovacuum workers itself.
            Err(e)
                if attempt < DROP_ATTEMPTS
                    && e.code()
                        == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
                    && sql == &force =>
            {
                sql = &plain;
            }
            // 55006 ("being accessed by other users") is transient, as a restarting server is.
            Err(e) if attempt < DROP_ATTEMPTS && sqlstate::class_of(&e).is_transient() => {
                tracing::warn!(database = name, error = %sqlstate::describe(&e), "dropping the incomplete recovery database; trying again");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) => {
                tracing::error!(database = name, error = %sqlstate::describe(&e), "could not drop the incomplete recovery database: drop it by hand");
                return;
            }
        }
    }
}

/// Tries at dropping a failed restore's database: about 20 s in all, since each `WITH (FORCE)`
/// waits only 5 s for the backends it terminates, which a loaded server may exceed more than once.
const DROP_ATTEMPTS: u32 = 8;

#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error("{0}: {1}")]
    Step(String, String),
    #[error(transparent)]
    Connect(#[from] crate::pg::ConnectError),
    #[error(transparent)]
    Url(#[from] crate::pg::InvalidUrl),
    #[error("replaying changes: {0}")]
    Changes(#[from] changes::ChangesError),
}

fn step(name: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> LoadError {
    let name = name.into();
    move |e| LoadError::Step(name, sqlstate::describe(&e))
}

/// The dump's SQL: preamble and entries, before and after the rows.
struct SchemaSql<'a> {
    pre: (&'a str, &'a [schema::Entry]),
    post: (&'a str, &'a [schema::Entry]),
}

async fn load(
    client: &Client,
    repo: &Repository,
    identities: &Arc<Identities>,
    manifest: &Manifest,
    tenant: &str,
    SchemaSql { pre, post }: SchemaSql<'_>,
    changes: Option<(&ChangePlan, &Fetched)>,
) -> Result<Loaded, LoadError> {
    let mut not_recreated = schema::apply(client, pre.0, pre.1)
        .await
        .map_err(|(entry, e)| LoadError::Step(entry, sqlstate::describe(&e)))?;
    client
        .batch_execute("BEGIN")
        .await
        .map_err(step("starting the data load"))?;
    let tenant_archive = manifest.tenants.get(tenant);
    let tables = manifest.global.rows.len() + tenant_archive.map_or(0, |t| t.rows.len());
    let mut loader = ArchiveLoader {
        client,
        repo,
        identities,
        manifest,
        progress: Progress::new("restore", "tables", Unit::Rows, tables as u64),
        tables: Vec::new(),
    };
    let mut global_rows = loader.load(Part::Global).await?;
    let mut tenant_rows = match tenant_archive {
        Some(_) => loader.load(Part::Tenant(tenant)).await?,
        None => BTreeMap::new(),
    };
    loader.progress.finish();
    let loaded_tables = loader.tables;
    for seq in &manifest.sequences {
        let name = format!("{}.{}", quote_ident(&seq.schema), quote_ident(&seq.name));
        let sql = format!(
            "SELECT pg_catalog.setval({}, {}, {})",
            quote_literal(&name),
            seq.last_value,
            seq.is_called
        );
        client
            .batch_execute(&sql)
            .await
            .map_err(step(format!("sequence {}.{}", seq.schema, seq.name)))?;
    }
    client
        .batch_execute("COMMIT")
        .await
        .map_err(step("committing the data load"))?;
    // Keys and indexes before the replay (updates and deletes find rows by key); foreign
    // keys, triggers and row level security after it, so the replay — the source's own
    // changes, cascades included, in their order — fires nothing and is filtered by nothing.
    let (keys, rest): (Vec<schema::Entry>, Vec<schema::Entry>) = post
        .1
        .iter()
        .cloned()
        .partition(|e| matches!(e.kind.as_str(), "INDEX" | "CONSTRAINT"));
    not_recreated.extend(
        schema::apply(client, post.0, &keys)
            .await
            .map_err(|(entry, e)| LoadError::Step(entry, sqlstate::describe(&e)))?,
    );
    let replayed = match changes {
        Some((plan, fetched)) => {
            Some(replay(client, repo, identities, manifest, tenant, plan, fetched).await?)
        }
        None => None,
    };
    // The restored tables under their names at the restore point (a schema change in the
    // stream may have renamed, dropped or created some).
    let followed = replayed
        .as_ref()
        .map(|r| r.schema.clone())
        .unwrap_or_default();
    let mut tables_now: Vec<(String, String)> = Vec::new();
    for (table, sql_name) in &loaded_tables {
        let (now, sql_name) = match followed.now(table) {
            None => (table.clone(), sql_name.clone()),
            Some(None) => {
                tenant_rows.remove(table);
                global_rows.remove(table);
                continue;
            }
            Some(Some((schema, name))) => (
                format!("{schema}.{name}"),
                crate::pg::qualified(&schema, &name),
            ),
        };
        for counts in [&mut tenant_rows, &mut global_rows] {
            if let Some(n) = counts.remove(table) {
                counts.insert(now.clone(), n);
            }
        }
        tables_now.push((now, sql_name));
    }
    for (schema, name) in &followed.created {
        let now = format!("{schema}.{name}");
        tenant_rows.insert(now.clone(), 0);
        tables_now.push((now, crate::pg::qualified(schema, name)));
    }
    if replayed.is_some() {
        // The report gives what the database holds after the replay (counted before row
        // level security is enabled, which would hide the rows from this role).
        for (table, sql_name) in &tables_now {
            let rows: i64 = client
                .query_one(&format!("SELECT count(*) FROM {sql_name}"), &[])
                .await
                .map_err(step(format!("counting {table}")))?
                .get(0);
            for counts in [&mut tenant_rows, &mut global_rows] {
                if let Some(n) = counts.get_mut(table) {
                    *n = rows as u64;
                }
            }
        }
    }
    // The foreign keys, policies and row level security of tables a schema change touched
    // are the source's at the restore point, not the snapshot's.
    let rest: Vec<schema::Entry> = rest.into_iter().filter(|e| !followed.replaces(e)).collect();
    not_recreated.extend(replay::foreign_keys(client, &followed).await);
    not_recreated.extend(
        schema::apply(client, post.0, &rest)
            .await
            .map_err(|(entry, e)| LoadError::Step(entry, sqlstate::describe(&e)))?,
    );
    not_recreated.extend(replay::row_security(client, &followed).await);
    // Only the restored tables: a database-wide ANALYZE would touch catalogs the restore
    // role does not own.
    for (table, sql_name) in &tables_now {
        client
            .batch_execute(&format!("ANALYZE {sql_name}"))
            .await
            .map_err(step(format!("ANALYZE {table}")))?;
    }
    Ok(Loaded {
        tenant_rows,
        global_rows,
        not_recreated,
        replayed,
    })
}

/// What the replay applied.
struct Replayed {
    last: Option<(Lsn, DateTime<Utc>)>,
    report: ChangesReport,
    /// What its schema changes did to the snapshot's tables.
    schema: replay::FollowedSchema,
}

async fn replay(
    client: &Client,
    repo: &Repository,
    identities: &Arc<Identities>,
    manifest: &Manifest,
    tenant: &str,
    plan: &ChangePlan,
    fetched: &Fetched,
) -> Result<Replayed, LoadError> {
    let clock = Instant::now();
    client
        .batch_execute("BEGIN")
        .await
        .map_err(step("starting the replay"))?;
    let mut replayer = replay::Replayer::new(client).following(&manifest.tables);
    let applied = changes::apply(
        repo,
        plan,
        fetched,
        manifest,
        tenant,
        identities,
        &mut replayer,
    )
    .await?;
    let schema = replayer.followed();
    let stats = replayer
        .finish()
        .await
        .map_err(changes::ChangesError::from)?;
    client
        .batch_execute("COMMIT")
        .await
        .map_err(step("committing the replay"))?;
    tracing::info!(
        transactions = applied.transactions,
        inserts = stats.inserts,
        updates = stats.updates,
        deletes = stats.deletes,
        last_lsn = applied.last.map(|l| tracing::field::display(l.0)),
        "changes replayed"
    );
    Ok(Replayed {
        schema,
        last: applied.last,
        report: ChangesReport {
            packs: plan.packs.len(),
            transactions: applied.transactions,
            seconds: clock.elapsed().as_secs_f64(),
            stats,
        },
    })
}

/// What the load put into the recovery database.
struct Loaded {
    tenant_rows: BTreeMap<String, u64>,
    global_rows: BTreeMap<String, u64>,
    not_recreated: Vec<schema::Skipped>,
    replayed: Option<Replayed>,
}

/// Loads archives into the recovery database inside the load transaction.
struct ArchiveLoader<'a> {
    client: &'a Client,
    repo: &'a Repository,
    identities: &'a Arc<Identities>,
    manifest: &'a Manifest,
    progress: Progress,
    /// Display and quoted SQL name of every table loaded, for ANALYZE afterwards.
    tables: Vec<(String, String)>,
}

impl ArchiveLoader<'_> {
    /// COPYs every table of an archive into the target; returns rows per table as PostgreSQL
    /// counted them, checked against the archive's own counts.
    async fn load(&mut self, part: Part<'_>) -> Result<BTreeMap<String, u64>, LoadError> {
        let (entry, expect) = self
            .manifest
            .archive(part)
            .expect("the plan checked the part exists");
        let key = entry.object.key.clone();
        let mut events = self
            .repo
            .archive_events(&entry.object, self.identities.clone(), expect)
            .await
            .map_err(|e| LoadError::Step(key.clone(), e.to_string()))?;
        let mut rows = BTreeMap::new();
        let mut sink = None;
        let mut table_name = String::new();
        while let Some(event) = events.recv().await {
            match event.map_err(|e| LoadError::Step(key.clone(), e.to_string()))? {
                ArchiveEvent::Table(t) => {
                    table_name = format!("{}.{}", t.schema, t.name);
                    let sql_name = format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name));
                    let columns = t
                        .columns
                        .iter()
                        .map(|c| quote_ident(c))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let sql = format!(
                        "COPY {sql_name} ({columns}) FROM STDIN (FORMAT {})",
                        t.format.sql()
                    );
                    self.tables.push((table_name.clone(), sql_name));
                    let copy = self
                        .client
                        .copy_in::<_, Bytes>(&sql)
                        .await
                        .map_err(step(format!("table {table_name}")))?;
                    sink = Some(Box::pin(copy));
                }
                ArchiveEvent::Data(bytes) => {
                    let copy = sink.as_mut().ok_or_else(|| {
                        LoadError::Step(key.clone(), "data outside a table".into())
                    })?;
                    copy.send(Bytes::from(bytes))
                        .await
                        .map_err(step(format!("table {table_name}")))?;
                }
                ArchiveEvent::TableEnd { rows: recorded } => {
                    let mut copy = sink.take().ok_or_else(|| {
                        LoadError::Step(key.clone(), "table end outside a table".into())
                    })?;
                    let loaded = copy
                        .as_mut()
                        .finish()
                        .await
                        .map_err(step(format!("table {table_name}")))?;
                    if loaded != recorded {
                        return Err(LoadError::Step(
                            format!("table {table_name}"),
                            format!("loaded {loaded} rows, the archive records {recorded}"),
                        ));
                    }
                    tracing::debug!(table = %table_name, rows = loaded, "table loaded");
                    self.progress.advance(loaded);
                    rows.insert(table_name.clone(), loaded);
                }
            }
        }
        Ok(rows)
    }
}

impl Classify for RestoreError {
    fn class(&self) -> ErrorClass {
        match self {
            RestoreError::Plan(e) => e.class(),
            RestoreError::Repository(e) => e.class(),
            RestoreError::Connect(e) => e.class(),
            RestoreError::Source(e) => e.class(),
            RestoreError::Tool(e) => e.class(),
            RestoreError::TargetExists(_)
            | RestoreError::TargetName(_)
            | RestoreError::NoTarget
            | RestoreError::OutsideSchemas { .. }
            | RestoreError::Extensions { .. } => ErrorClass::Usage,
            RestoreError::CreateDatabase { .. } | RestoreError::Load { .. } => {
                ErrorClass::Permanent
            }
        }
    }
}
