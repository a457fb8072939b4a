//! Snapshot export: every tenant's rows from ONE consistent snapshot, each tenant in its own
//! sealed archive, then the manifest — last, so the snapshot is invisible until complete.
//!
//! The consistent point comes from a temporary logical replication slot created with
//! `SNAPSHOT 'export'`: its LSN is where a change stream started from the same slot position
//! continues without gap or overlap. Worker connections import the snapshot and export
//! tenants in parallel: all but the largest by a sweep, one `COPY` per table (or slice of
//! one) whose rows are split by tenant here, scattered and gathered again (`plan`, `sweep`,
//! `runs`); a large tenant with its own tenant-filtered `COPY (SELECT …) TO STDOUT`s,
//! streamed into its archive.

mod frames;
mod plan;
mod runs;
mod sweep;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::BytesMut;
use chrono::{DateTime, Utc};
use futures::{StreamExt, pin_mut};
use tokio::io::AsyncReadExt;
use tokio_postgres::Client;

use crate::config::Config;
use crate::pg::Lsn;
use crate::pg::replication::{ReplicationConnection, ReplicationError, SlotSnapshot};
use crate::pg::sqlstate;
use crate::pg::{connect, quote_ident, quote_literal};
use crate::progress::{Progress, Unit};
use crate::repository::archive::{self, ArchiveHeader, ArchiveKind, TableHeader};
use crate::repository::copy_binary::CopyChecker;
use crate::repository::manifest::{ArchiveEntry, SequenceState};
use crate::repository::object::ObjectWriter;
use crate::repository::routes::CheckpointWriter;
use crate::repository::tenant_keys::SealingKeys;
use crate::repository::{Manifest, Repository, RepositoryError, SnapshotId, StoredObject, keys};
use crate::retry::{Classify, ErrorClass};
use crate::source::catalog::{Catalog, CatalogError, Table};
use crate::source::identity::{SourceIdentity, source_identity};
use crate::source::{SourceError, dependencies, pg_tools, query_context};

use plan::{Division, Job, Queue};
use sweep::Sweep;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Connect(#[from] crate::pg::ConnectError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error("replication connection: {0}")]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Tool(#[from] pg_tools::ToolError),
    #[error("tenant {tenant:?}: {message}")]
    Tenant { tenant: String, message: String },
    #[error("exporting {table}: {message}")]
    Export { table: String, message: String },
}

/// What `backup` was asked for.
#[derive(Debug, Clone, Default)]
pub struct SnapshotRequest {
    /// Only these tenants (all when empty).
    pub tenants: Vec<String>,
    /// Create this persistent slot for the change stream and take the snapshot from it, so
    /// the stream continues exactly where the snapshot ends (`init`). Dropped again if the
    /// snapshot fails. `None`: a temporary slot, gone with the connection.
    pub stream_slot: Option<String>,
}

/// Checks a tenant value given on the command line against the tenant column's type, so a
/// typo is reported as such instead of as "no rows".
pub fn validate_tenant(value: &str, tenant_type: &str) -> Result<String, String> {
    if tenant_type == "uuid" {
        return uuid::Uuid::parse_str(value)
            .map(|u| u.hyphenated().to_string())
            .map_err(|_| format!("{value:?} is not a uuid (the tenant column is a uuid), e.g. 3f2a5c1e-0b9d-4f6e-8a7b-1c2d3e4f5a6b"));
    }
    if value.is_empty() || value.chars().any(char::is_control) {
        return Err(format!("{value:?} is not a valid tenant value"));
    }
    Ok(value.to_string())
}

struct Exporter {
    catalog: Catalog,
    repo: Repository,
    id: SnapshotId,
    keys: Arc<SealingKeys>,
    /// The consistent point's time: what a tenant erased after it holds is sealed away.
    consistent_time: DateTime<Utc>,
    level: i32,
    /// The work still to hand out.
    queue: Mutex<Queue>,
    /// Where the routing checkpoint waits until its header is known (ciphertext only).
    scratch: PathBuf,
    /// The tenants exported by one pass over each table (none for named tenants).
    sweep: Option<Sweep>,
    /// What each worker may hold of a sweep's gathered rows in memory.
    run_memory: usize,
    /// The consistent point, where the routing checkpoint holds the state.
    lsn: Lsn,
    /// The source's system identifier, which salts the routing checkpoint's key hashes.
    salt: String,
    progress: Progress,
}

/// Takes one snapshot and returns its manifest (already stored).
pub async fn take(
    config: &Config,
    repo: &Repository,
    request: &SnapshotRequest,
) -> Result<Manifest, SnapshotError> {
    let started_at = Utc::now();
    let clock = Instant::now();
    let info = repo.info().await?;
    let admin = connect(&config.source.url).await?;
    let catalog = Catalog::load(&admin, &config.source).await?;

    let pg_config = crate::pg::pg_config(&config.source.url).map_err(SourceError::from)?;
    let mut replication =
        ReplicationConnection::connect_tls(&pg_config.config, &pg_config.tls).await?;
    let system = replication.identify_system().await?;
    let identity = source_identity(&admin, system.system_id.clone()).await?;
    info.check_source(
        &identity.system_identifier,
        &identity.database,
        &repo.location(),
    )?;

    let (slot_name, temporary) = match &request.stream_slot {
        Some(name) => (name.clone(), false),
        None => (
            format!("updog_snap_{}_{}", std::process::id(), fastrand::u32(..)),
            true,
        ),
    };
    let slot = replication
        .create_logical_slot(&slot_name, temporary, SlotSnapshot::Export)
        .await?;
    let snapshot_name = slot
        .snapshot_name
        .clone()
        .ok_or_else(|| SnapshotError::Export {
            table: "(snapshot)".into(),
            message: "the server did not export a snapshot".into(),
        })?;
    let consistent_time: DateTime<Utc> = admin
        .query_one("SELECT clock_timestamp()", &[])
        .await
        .map_err(query_context("reading the server clock"))?
        .get(0);
    let point = SnapshotPoint {
        id: SnapshotId::new(consistent_time, slot.consistent_point),
        snapshot_name,
        lsn: slot.consistent_point,
        time: consistent_time,
        started_at,
    };
    let id = point.id.clone();
    tracing::info!(snapshot = %id, lsn = %point.lsn, tables = catalog.tables.len(), "snapshot started");

    let result = export(config, repo, catalog, &point, &identity, request).await;
    // The exported snapshot must live until every worker and pg_dump imported it; closing
    // the replication connection drops the temporary slot.
    if let Err(e) = replication.close().await {
        tracing::debug!(error = %e, "closing the replication connection");
    }
    match result {
        Ok(manifest) => {
            tracing::info!(
                snapshot = %id, tenants = manifest.tenants.len(),
                bytes = manifest.objects().map(|o| o.bytes).sum::<u64>(),
                seconds = clock.elapsed().as_secs_f64(), "snapshot stored"
            );
            Ok(manifest)
        }
        Err(e) => {
            repo.discard_incomplete(&id).await;
            if !temporary {
                // A stream slot without its snapshot would only retain WAL.
                if let Err(drop_error) = admin
                    .execute("SELECT pg_drop_replication_slot($1)", &[&slot_name])
                    .await
                {
                    tracing::error!(slot = %slot_name, error = %sqlstate::describe(&drop_error), "could not drop the new replication slot: drop it by hand");
                }
            }
            Err(e)
        }
    }
}

/// Where a snapshot stands in the source's history.
struct SnapshotPoint {
    id: SnapshotId,
    /// The exported snapshot workers and pg_dump import.
    snapshot_name: String,
    lsn: Lsn,
    time: DateTime<Utc>,
    started_at: DateTime<Utc>,
}

async fn export(
    config: &Config,
    repo: &Repository,
    catalog: Catalog,
    point: &SnapshotPoint,
    identity: &SourceIdentity,
    request: &SnapshotRequest,
) -> Result<Manifest, SnapshotError> {
    let (id, snapshot_name) = (&point.id, point.snapshot_name.as_str());
    let mut workers = Vec::new();
    for _ in 0..config.snapshot.parallel {
        workers.push(snapshot_client(&config.source.url, snapshot_name).await?);
    }
    let tenants = if request.tenants.is_empty() {
        workers[0]
            .query(&catalog.tenants_query(), &[])
            .await
            .map_err(query_context("listing tenants"))?
            .into_iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    } else {
        let mut found = Vec::new();
        for tenant in &request.tenants {
            let tenant = validate_tenant(tenant, catalog.tenant_type()).map_err(|message| {
                SnapshotError::Tenant {
                    tenant: tenant.clone(),
                    message,
                }
            })?;
            if !tenant_exists(&workers[0], &catalog, &tenant).await? {
                return Err(SnapshotError::Tenant {
                    tenant,
                    message: "no rows in any tenant table of the source: check the value \
                              (`updog-backup list --tenants` shows the tenants backed up so far)"
                        .into(),
                });
            }
            found.push(tenant);
        }
        found
    };
    let sequences = read_sequences(&workers[0], &config.source.schemas).await?;
    // In the snapshot, like pg_dump: exactly what this snapshot's dump lacks.
    let depends_on = dependencies::find(&workers[0], &config.source.schemas).await?;
    if !depends_on.objects.is_empty() {
        tracing::warn!(
            snapshot = %id,
            objects = %depends_on.objects.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
            "the schemas depend on objects outside source.schemas that are not part of an extension: restores of this snapshot will be refused; add their schemas to source.schemas"
        );
    }
    let recipients = crate::codec::parse_recipients(&config.encryption.recipients)
        .map_err(RepositoryError::from)?;
    let keys = SealingKeys::load(repo, &repo.info().await?, recipients).await?;
    let archives = tenants.len() as u64 + 1;
    let run_memory = usize::try_from(config.snapshot.batch_memory / workers.len().max(1) as u64)
        .unwrap_or(usize::MAX);
    let scratch = config.stream.scratch_dir();
    let division = if request.tenants.is_empty() {
        let sizes = plan::estimate(&workers[0], &catalog, tenants.len()).await?;
        Division::new(tenants, &sizes, workers.len(), run_memory as u64)
    } else {
        Division {
            alone: tenants,
            ..Division::default()
        }
    };
    let slices = if division.partitions() > 0 {
        plan::slices(
            &plan::table_sizes(&workers[0], &catalog).await?,
            workers.len(),
        )
    } else {
        Vec::new()
    };
    let (count, partitions) = (slices.len(), division.partitions());
    let queue = Queue::new(slices, partitions, division.alone.clone());
    let sweep = if partitions > 0 {
        Some(Sweep::new(division, count, &scratch).map_err(|source| {
            RepositoryError::from(crate::storage::StorageError::Io {
                key: format!("a scratch file in {}", scratch.display()),
                source,
            })
        })?)
    } else {
        None
    };
    let exporter = Arc::new(Exporter {
        catalog,
        repo: repo.clone(),
        id: id.clone(),
        keys: keys.clone(),
        consistent_time: point.time,
        level: config.compression.level,
        queue: Mutex::new(queue),
        scratch,
        sweep,
        run_memory,
        lsn: point.lsn,
        salt: identity.system_identifier.clone(),
        progress: Progress::new("snapshot", "archives", Unit::StoredBytes, archives),
    });

    let schema_task = {
        let exporter = exporter.clone();
        let pg_config = crate::pg::pg_config(&config.source.url).map_err(SourceError::from)?;
        let schemas = config.source.schemas.clone();
        let snapshot_name = snapshot_name.to_string();
        let major = identity.server_version_num / 10000;
        tokio::spawn(async move {
            exporter
                .export_schema(&pg_config, major, &schemas, &snapshot_name)
                .await
        })
    };
    let mut tasks = Vec::new();
    for client in workers {
        let exporter = exporter.clone();
        tasks.push(tokio::spawn(async move { exporter.work(client).await }));
    }
    let mut archives = BTreeMap::new();
    let mut first_error = None;
    for task in tasks {
        match task.await {
            Ok(Ok(done)) => archives.extend(done),
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(SnapshotError::Export {
                    table: "(worker)".into(),
                    message: e.to_string(),
                });
            }
        }
    }
    let schema = match schema_task.await {
        Ok(r) => r,
        Err(e) => Err(SnapshotError::Export {
            table: "(schema)".into(),
            message: e.to_string(),
        }),
    };
    exporter.progress.finish();
    if let Some(e) = first_error {
        return Err(e);
    }
    let schema = schema?;
    let global = archives
        .remove(&None)
        .expect("the global job always runs first");
    let tenants = archives
        .into_iter()
        .map(|(k, v)| (k.expect("only the global job has no tenant"), v))
        .collect();

    let manifest = Manifest {
        format_version: keys.format_version(),
        id: id.clone(),
        system_identifier: identity.system_identifier.clone(),
        database: identity.database.clone(),
        server_version_num: identity.server_version_num,
        tenant_column: exporter.catalog.tenant_column.clone(),
        tenant_type: exporter.catalog.tenant_type().to_string(),
        consistent_lsn: point.lsn,
        consistent_time: point.time,
        started_at: point.started_at,
        finished_at: Utc::now(),
        all_tenants: request.tenants.is_empty(),
        tables: exporter.catalog.manifest_tables(),
        sequences,
        schema,
        global,
        tenants,
        depends_on,
    };
    // The keys of tenants first seen here, before the manifest that makes the snapshot exist.
    keys.store_new(repo).await?;
    repo.put_manifest(&manifest).await?;
    Ok(manifest)
}

/// A connection inside the exported snapshot. `row_security = off` makes a role that is
/// subject to row level security fail loudly instead of exporting a filtered, incomplete view.
/// No parallel query: the snapshot already runs one COPY per connection, and parallel hash
/// joins over whole tables per tenant cost a third of the server's CPU (BENCHMARKS.md).
async fn snapshot_client(url: &str, snapshot_name: &str) -> Result<Client, SourceError> {
    let client = connect(url).await?;
    client
        .batch_execute(&format!(
            "SET statement_timeout = 0; SET idle_in_transaction_session_timeout = 0; SET lock_timeout = 0;
             SET row_security = off; SET standard_conforming_strings = on; SET DateStyle = ISO;
             SET max_parallel_workers_per_gather = 0;
             BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;
             SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot_name)
        ))
        .await
        .map_err(query_context("importing the exported snapshot"))?;
    Ok(client)
}

async fn tenant_exists(
    client: &Client,
    catalog: &Catalog,
    tenant: &str,
) -> Result<bool, SourceError> {
    for table in catalog.tenant_tables() {
        let Some(filter) = catalog.tenant_filter(table, tenant) else {
            continue;
        };
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE {filter})",
            table.sql_name()
        );
        if client
            .query_one(&sql, &[])
            .await
            .map_err(query_context(format!(
                "looking up the tenant in {}",
                table.qualified()
            )))?
            .get(0)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

async fn read_sequences(
    client: &Client,
    schemas: &[String],
) -> Result<Vec<SequenceState>, SourceError> {
    let rows = client
        .query(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind = 'S' AND n.nspname = ANY($1) ORDER BY 1, 2",
            &[&schemas],
        )
        .await
        .map_err(query_context("listing sequences"))?;
    let mut out = Vec::new();
    for row in rows {
        let (schema, name): (String, String) = (row.get(0), row.get(1));
        let sql = format!(
            "SELECT last_value, is_called FROM {}.{}",
            quote_ident(&schema),
            quote_ident(&name)
        );
        let state = client
            .query_one(&sql, &[])
            .await
            .map_err(query_context(format!("reading sequence {schema}.{name}")))?;
        out.push(SequenceState {
            schema,
            name,
            last_value: state.get(0),
            is_called: state.get(1),
        });
    }
    Ok(out)
}

impl Exporter {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn work(
        &self,
        client: Client,
    ) -> Result<Vec<(Option<String>, ArchiveEntry)>, SnapshotError> {
        let mut done = Vec::new();
        loop {
            let job = self.queue().next();
            let Some(job) = job else { break };
            let result = match &job {
                Job::Routing => self.routing_checkpoint(&client).await.map(|()| Vec::new()),
                Job::Global => self.export_archive(&client, None).await.map(|a| vec![a]),
                Job::Tenant(tenant) => self
                    .export_archive(&client, Some(tenant))
                    .await
                    .map(|a| vec![a]),
                Job::Scatter(slice) => self.scatter(&client, *slice).await.map(|()| Vec::new()),
                Job::Wait => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    Ok(Vec::new())
                }
                Job::Gather(partition) => self.gather(*partition).await,
            };
            match result {
                Ok(entries) => {
                    self.queue().done(&job);
                    done.extend(entries);
                }
                Err(e) => {
                    // The snapshot is lost: stop the other workers after their current job.
                    self.queue().clear();
                    return Err(e);
                }
            }
        }
        client
            .batch_execute("COMMIT")
            .await
            .map_err(query_context("ending the snapshot transaction"))?;
        Ok(done)
    }

    /// The routing state at the consistent point, read inside the snapshot: where the change
    /// stream starts (`init`), and for later snapshots the checkpoint that lets retention
    /// delete every pack before this snapshot (a restart rebuilds its routing from the newest
    /// checkpoint plus the packs after it; replaying a pack's routing changes from before the
    /// checkpoint again ends in the same maps). Written as it is read: never held in memory.
    async fn routing_checkpoint(&self, client: &Client) -> Result<(), SnapshotError> {
        let started = Instant::now();
        let mut checkpoint = CheckpointWriter::new(self.lsn, &self.scratch).map_err(|source| {
            RepositoryError::from(crate::storage::StorageError::Io {
                key: format!("a scratch file in {}", self.scratch.display()),
                source,
            })
        })?;
        let keys = crate::capture::router::write_checkpoint::<SnapshotError>(
            &self.catalog,
            &self.salt,
            client,
            &mut checkpoint,
        )
        .await?;
        checkpoint.store(&self.repo).await?;
        tracing::debug!(
            keys,
            seconds = started.elapsed().as_secs_f64(),
            "routing checkpoint stored"
        );
        Ok(())
    }

    /// One archive, its tables exported with their own (tenant-filtered) statements and
    /// streamed into it.
    async fn export_archive(
        &self,
        client: &Client,
        tenant: Option<&str>,
    ) -> Result<(Option<String>, ArchiveEntry), SnapshotError> {
        let started = Instant::now();
        let (key, kind, tables): (String, ArchiveKind, Vec<&Table>) = match tenant {
            Some(t) => (
                keys::tenant(&self.id, t),
                ArchiveKind::Tenant,
                self.catalog.tenant_tables().collect(),
            ),
            None => (
                keys::global(&self.id),
                ArchiveKind::Global,
                self.catalog.global_tables().collect(),
            ),
        };
        let mut writer = self.archive_writer(key, kind, tenant).await?;
        let mut rows = BTreeMap::new();
        for table in &tables {
            let filter = tenant.map(|t| {
                self.catalog
                    .tenant_filter(table, t)
                    .expect("tenant tables have a route")
            });
            let n = export_table(client, &mut writer, table, filter.as_deref()).await?;
            rows.insert(table.qualified(), n);
        }
        writer
            .write(&archive::end_record(tables.len() as u64))
            .await?;
        let (object, _) = writer.finish().await?;
        let entry = ArchiveEntry { object, rows };
        tracing::debug!(
            tenant = tenant.unwrap_or("(global)"),
            rows = entry.total_rows(),
            bytes = entry.object.bytes,
            seconds = started.elapsed().as_secs_f64(),
            "archive stored"
        );
        self.progress.advance(entry.object.bytes);
        Ok((tenant.map(str::to_string), entry))
    }

    /// An archive's writer, its header written.
    async fn archive_writer(
        &self,
        key: String,
        kind: ArchiveKind,
        tenant: Option<&str>,
    ) -> Result<ObjectWriter, SnapshotError> {
        let seal = self
            .keys
            .seal_for(tenant, Some(self.consistent_time))
            .map_err(RepositoryError::from)?;
        let mut writer = self.repo.object_writer(key, &seal, self.level)?;
        let header = ArchiveHeader {
            kind,
            snapshot: self.id.to_string(),
            tenant: tenant.map(str::to_string),
        };
        writer.write(&archive::header_record(&header)).await?;
        Ok(writer)
    }

    async fn export_schema(
        &self,
        pg_config: &crate::pg::PgTarget,
        major: u32,
        schemas: &[String],
        snapshot_name: &str,
    ) -> Result<StoredObject, SnapshotError> {
        let pg_dump = pg_tools::find("pg_dump", major).await?;
        let mut cmd = pg_tools::command(&pg_dump, pg_config);
        cmd.args([
            "--schema-only",
            "--format=custom",
            "--compress=0",
            "--snapshot",
            snapshot_name,
        ]);
        for schema in schemas {
            // Quoted: pg_dump reads -n as a pattern; quotes make it the literal name.
            cmd.arg("--schema")
                .arg(format!("\"{}\"", schema.replace('"', "\"\"")));
        }
        let mut child = cmd.spawn().map_err(|e| pg_tools::ToolError::Failed {
            tool: "pg_dump",
            message: e.to_string(),
        })?;
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let errors = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text).await;
            text
        });
        let seal = self
            .keys
            .seal_for(None, None)
            .map_err(RepositoryError::from)?;
        let mut writer = self
            .repo
            .object_writer(keys::schema(&self.id), &seal, self.level)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = stdout
                .read(&mut buf)
                .await
                .map_err(|e| pg_tools::ToolError::Failed {
                    tool: "pg_dump",
                    message: e.to_string(),
                })?;
            if n == 0 {
                break;
            }
            writer.write(&buf[..n]).await?;
        }
        let status = child
            .wait()
            .await
            .map_err(|e| pg_tools::ToolError::Failed {
                tool: "pg_dump",
                message: e.to_string(),
            })?;
        let stderr = errors.await.unwrap_or_default();
        if !status.success() {
            return Err(pg_tools::ToolError::Failed {
                tool: "pg_dump",
                message: format!("{status}: {}", stderr.trim()),
            }
            .into());
        }
        let (object, _) = writer.finish().await?;
        Ok(object)
    }
}

/// Streams one table's (filtered) rows into the archive; returns the row count.
async fn export_table(
    client: &Client,
    writer: &mut ObjectWriter,
    table: &Table,
    filter: Option<&str>,
) -> Result<u64, SnapshotError> {
    let header = table_header(table);
    writer.write(&archive::table_record(&header)).await?;
    let filter = filter.map(|f| format!(" WHERE {f}")).unwrap_or_default();
    let sql = format!(
        "COPY (SELECT {} FROM {}{filter}) TO STDOUT (FORMAT {})",
        table.column_list(),
        table.sql_name(),
        header.format.sql()
    );
    let fail = |message: String| SnapshotError::Export {
        table: table.qualified(),
        message,
    };
    let stream = client
        .copy_out(&sql)
        .await
        .map_err(|e| fail(sqlstate::describe(&e)))?;
    pin_mut!(stream);
    let mut checker = CopyChecker::new(header.format);
    let mut pending = BytesMut::with_capacity(archive::DATA_RECORD + 64 * 1024);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| fail(sqlstate::describe(&e)))?;
        checker.feed(&chunk).map_err(&fail)?;
        pending.extend_from_slice(&chunk);
        if pending.len() >= archive::DATA_RECORD {
            flush_data(writer, &mut pending).await?;
        }
    }
    if !pending.is_empty() {
        flush_data(writer, &mut pending).await?;
    }
    if !checker.is_complete() {
        return Err(fail("COPY stream ended without its trailer".into()));
    }
    writer
        .write(&archive::table_end_record(checker.rows()))
        .await?;
    Ok(checker.rows())
}

fn table_header(table: &Table) -> TableHeader {
    TableHeader {
        schema: table.schema.clone(),
        name: table.name.clone(),
        columns: table.columns.iter().map(|c| c.name.clone()).collect(),
        format: table.copy_format(),
    }
}

async fn flush_data(
    writer: &mut ObjectWriter,
    pending: &mut BytesMut,
) -> Result<(), RepositoryError> {
    writer
        .write(&archive::record_prefix(archive::TAG_DATA, pending.len()))
        .await?;
    writer.write(pending).await?;
    pending.clear();
    Ok(())
}

impl Classify for SnapshotError {
    fn class(&self) -> ErrorClass {
        match self {
            SnapshotError::Connect(e) => e.class(),
            SnapshotError::Source(e) => e.class(),
            SnapshotError::Catalog(e) => e.class(),
            SnapshotError::Repository(e) => e.class(),
            SnapshotError::Replication(e) => e.class(),
            SnapshotError::Tool(e) => e.class(),
            SnapshotError::Tenant { .. } => ErrorClass::Usage,
            SnapshotError::Export { .. } => ErrorClass::Permanent,
        }
    }
}
