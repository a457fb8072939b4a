//! One replication session of the capture: from the slot's start to its end (a stop, or an
//! error the supervisor loop in `capture::run` retries). It receives pgoutput, routes every
//! change, hands whole transactions to the pack writer, stores packs when they are due, rewrites
//! the stream's progress, and acknowledges the slot only up to what is stored.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::indexer::Indexer;
use super::router::{Destination, RouteError, Routed, Router};
use super::spool::TxnSpool;
use super::writer::PackWriter;
use crate::codec::CodecError;
use crate::config::Config;
use crate::pg::Lsn;
use crate::pg::pgoutput::{
    self, Begin, Commit, Context, Message, OldTuple, ProtocolVersion, Truncate, Tuple, Value,
};
use crate::pg::quote_ident;
use crate::pg::replication::{
    ReplicationConnection, ReplicationError, ReplicationStream, StreamEvent,
    quote_publication_names,
};
use crate::repository::StreamProgress;
use crate::repository::tenant_keys::SealingKeys;
use crate::repository::{Repository, RepositoryError};
use crate::source::catalog::Catalog;
use crate::source::ddl;
use crate::source::{SourceError, query_context};
use crate::telemetry::{Operation, PackStatus, Telemetry};

use super::{
    CHECKPOINT_EVERY, COMMIT_CLOCK_MARGIN, CaptureError, Probe, gaps, probe, restore_routing,
    router, slot_state, wal_writer_delay,
};

/// One replication session: from connecting to an error or a requested shutdown.
pub(super) async fn session(
    config: &Config,
    repo: &Repository,
    shutdown: &CancellationToken,
    telemetry: &Arc<Telemetry>,
    admin: &Client,
) -> Result<(), CaptureError> {
    let info = repo.info().await?;
    let catalog = Catalog::load(admin, &config.source).await?;
    let unpublished =
        gaps::check_publication(repo, admin, &config.source.publication, &catalog).await?;
    // The gauge has a sample from the start, not only after slot health's first check.
    telemetry
        .metrics
        .unpublished_tables
        .set(unpublished.len() as f64);
    let pg = crate::pg::pg_config(&config.source.url).map_err(SourceError::from)?;
    let mut connection = ReplicationConnection::connect_tls(&pg.config, &pg.tls).await?;
    let system = connection.identify_system().await?;
    let database: String = admin
        .query_one("SELECT current_database()", &[])
        .await
        .map_err(query_context("reading the database name"))?
        .get(0);
    info.check_source(&system.system_id, &database, &repo.location())?;

    let slot = &config.source.slot;
    let state = slot_state(admin, slot).await?;
    let stream_state = repo.stream_state().await?;
    let (start, mut progress) = match (&stream_state.progress, stream_state.durable()) {
        (Some(p), Some(durable)) => {
            if durable < state.confirmed_flush {
                return Err(CaptureError::Gap {
                    slot: slot.clone(),
                    slot_lsn: state.confirmed_flush,
                    durable,
                });
            }
            let mut p = p.clone();
            p.durable_lsn = durable;
            (durable, p)
        }
        _ => {
            // The first session after `init`: the stream begins at the slot's consistent
            // point, where the first snapshot ends.
            let p = stream_state.restart(slot, state.confirmed_flush);
            repo.put_stream_progress(&p).await?;
            (state.confirmed_flush, p)
        }
    };
    progress.slot = slot.clone();

    let mut router = Router::new(catalog, &config.source.schemas, &system.system_id);
    router.set_schema_changes_captured(ddl::installed(admin).await?);
    let unmoved = crate::source::moves::missing(admin, router.catalog()).await?;
    if !unmoved.is_empty() {
        tracing::warn!(tables = %unmoved.join(", "), "these tables have no current trigger of parent moves: a row of theirs moved to another tenant makes both tenants' restores after it refused until the next snapshot (`updog-backup check` says how to install it)");
    }
    restore_routing(repo, &stream_state, &progress, start, &mut router, admin).await?;
    // Before the replication stream starts: indexing a long unindexed stream takes a while.
    let indexer = Indexer::resume(repo, &stream_state, config.stream.index_window).await?;
    let publications = quote_publication_names([config.source.publication.as_str()]);
    let stream = connection
        .start_logical(
            slot,
            start,
            &[
                ("proto_version", "2"),
                ("publication_names", &publications),
                ("streaming", "on"),
                // The schema-change triggers' messages (`source::ddl`).
                ("messages", "true"),
            ],
        )
        .await?;
    tracing::info!(slot = %slot, start = %start, routing_keys = router.keys(), "capture started");
    telemetry.update(|s| {
        s.capturing = true;
        s.stream.durable_lsn = Some(progress.durable_lsn);
    });

    let recipients = crate::codec::parse_recipients(&config.encryption.recipients)
        .map_err(RepositoryError::from)?;
    let keys = SealingKeys::load(repo, &repo.info().await?, recipients).await?;
    let spool_dir = config.stream.scratch_dir();
    let mut capture = Capture {
        source: config.source.clone(),
        created: Vec::new(),
        touched: HashMap::new(),
        reshaped: Vec::new(),
        indexer,
        writer: PackWriter::new(
            repo.clone(),
            keys,
            config.compression.level,
            spool_dir.clone(),
            // Packs tile the stream: the next one starts where the last ended, even when the
            // durable point moved on over transactions that touched nothing backed up.
            stream_state.chain_end().unwrap_or(start).min(start),
        ),
        repo: repo.clone(),
        router,
        stream,
        ctx: Context::new(ProtocolVersion::V2),
        progress,
        received: start,
        streamed: HashMap::new(),
        in_stream: None,
        spool_dir,
        pending_probe: None,
        confirmed_probe: None,
        last_progress_write: Instant::now(),
        last_checkpoint: Instant::now(),
        margin: COMMIT_CLOCK_MARGIN + wal_writer_delay(admin).await? * 3,
        flush_interval: config.stream.flush_interval,
        max_pack_bytes: config.stream.max_pack_bytes,
        drain_limit: config.daemon.shutdown_timeout / 2,
        telemetry: telemetry.clone(),
    };
    capture.run(admin, shutdown).await?;
    // A clean CopyDone: the server records the acknowledged position before it lets go.
    if let Err(e) = capture.stream.stop().await {
        tracing::debug!(error = %e, "ending the replication stream");
    }
    Ok(())
}

struct Capture {
    source: crate::config::SourceConfig,
    /// Tables created by the transactions being captured (quoted, qualified) and their commit.
    created: Vec<(String, (Lsn, chrono::DateTime<Utc>))>,
    /// The last transaction stored with a change of each relation (by oid), this session.
    touched: HashMap<u32, (Lsn, chrono::DateTime<Utc>)>,
    /// Tables whose definition changed with no schema change in the stream: (quoted,
    /// qualified) name, its columns now, and the last transaction with the old definition.
    reshaped: Vec<gaps::Reshaped>,
    writer: PackWriter,
    indexer: Indexer,
    repo: Repository,
    router: Router,
    stream: ReplicationStream,
    ctx: Context,
    progress: StreamProgress,
    /// Every transaction that committed before it has been received (and is in the writer,
    /// stored, or irrelevant).
    received: Lsn,
    /// Streamed transactions in progress, by top-level xid.
    streamed: HashMap<u32, TxnSpool>,
    in_stream: Option<u32>,
    spool_dir: PathBuf,
    pending_probe: Option<Probe>,
    confirmed_probe: Option<Probe>,
    last_progress_write: Instant,
    last_checkpoint: Instant,
    /// Subtracted from a confirmed probe's time (see the module documentation).
    margin: chrono::TimeDelta,
    flush_interval: Duration,
    max_pack_bytes: u64,
    /// How long a stop waits for the stream to catch up with the source.
    drain_limit: Duration,
    telemetry: Arc<Telemetry>,
}

impl Capture {
    async fn run(
        &mut self,
        admin: &Client,
        shutdown: &CancellationToken,
    ) -> Result<(), CaptureError> {
        // Probes run often so that covered-until follows the stored packs closely.
        let tick_every = (self.flush_interval / 4).max(Duration::from_millis(100));
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Stopping drains first: everything the source had flushed when the stop came is
        // received (its probe confirmed) before the last pack is stored, so a restore
        // afterwards reaches the last commit before the signal.
        let mut draining: Option<Instant> = None;
        loop {
            if let Some(since) = draining
                && !self.writer.in_transaction()
                && (self.pending_probe.is_none() || since.elapsed() >= self.drain_limit)
            {
                self.flush(true).await?;
                tracing::info!(
                    durable = %self.progress.durable_lsn,
                    covered_until = %self.progress.covered_until.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                    drained = self.pending_probe.is_none(),
                    "capture stopped"
                );
                return Ok(());
            }
            tokio::select! {
                // The timer before the stream: a busy stream must not starve probes and status.
                biased;
                () = shutdown.cancelled(), if draining.is_none() => {
                    // A probe's covered time is its time less the margin: probing the margin
                    // after the stop covers every commit before it.
                    tokio::time::sleep(self.margin.to_std().unwrap_or_default()).await;
                    self.pending_probe = Some(probe(admin).await?);
                    self.status(true).await?;
                    draining = Some(Instant::now());
                }
                _ = tick.tick() => {
                    if self.pending_probe.is_none() && draining.is_none() {
                        let p = probe(admin).await?;
                        let lag = p.lsn.0.saturating_sub(self.progress.durable_lsn.0);
                        self.telemetry.metrics.lag_bytes.set(lag as f64);
                        self.telemetry.update(|s| s.stream.lag_bytes = Some(lag));
                        self.pending_probe = Some(p);
                    }
                    // The walsender reports how far it has read only in keepalives, which it
                    // sends by itself rarely: ask for one until the probe is confirmed.
                    self.status(true).await?;
                    if !self.writer.in_transaction() {
                        self.flush(false).await?;
                    }
                }
                event = self.stream.next() => {
                    match event? {
                        StreamEvent::XLogData { data, .. } => self.message(admin, &data).await?,
                        StreamEvent::Keepalive { wal_end, reply_requested, .. } => {
                            if !self.writer.in_transaction() {
                                self.received = self.received.max(wal_end);
                                self.confirm_probe();
                            }
                            if reply_requested {
                                self.status(false).await?;
                            }
                        }
                        StreamEvent::End => {
                            return Err(CaptureError::Replication(ReplicationError::Closed));
                        }
                    }
                    // Checked after every event, between transactions: under load that is
                    // where a pack becomes due.
                    if !self.writer.in_transaction() && self.pack_due() {
                        self.flush(false).await?;
                    }
                }
            }
        }
    }

    fn confirm_probe(&mut self) {
        if let Some(p) = self.pending_probe
            && self.received >= p.lsn
        {
            self.confirmed_probe = Some(p);
            self.pending_probe = None;
        }
    }

    async fn status(&mut self, reply: bool) -> Result<(), CaptureError> {
        let durable = self.progress.durable_lsn;
        self.stream
            .send_status(self.received, durable, durable, reply)
            .await?;
        Ok(())
    }

    /// A pack is due at `max_pack_bytes`, or `flush_interval` after its first transaction
    /// committed — but not before it has collected for a tenth of the interval, so that a
    /// backlog (every commit already old) makes packs of a fraction of a second, not one per
    /// transaction.
    fn pack_due(&self) -> bool {
        self.writer.transactions() > 0
            && (self.writer.size() >= self.max_pack_bytes
                || (self.writer.age() >= self.flush_interval
                    && self.writer.collecting() >= self.flush_interval / 10))
    }

    /// Stores the pack when it is due (or `force_progress`), else rewrites the progress when
    /// the source was idle; then acknowledges.
    async fn flush(&mut self, force_progress: bool) -> Result<(), CaptureError> {
        if self.writer.transactions() > 0 && !force_progress && !self.pack_due() {
            return Ok(());
        }
        let end = self.received;
        let covered = self
            .confirmed_probe
            .filter(|p| p.lsn <= end)
            .map(|p| p.time - self.margin)
            .unwrap_or(self.progress.covered_until)
            .max(self.progress.covered_until);
        let mut stored = None;
        if self.writer.transactions() > 0 {
            let mut next = self.writer.next(end);
            std::mem::swap(&mut next, &mut self.writer);
            let clock = Instant::now();
            let summary = next.store(end, covered, &self.router.take_delta()).await?;
            self.progress.last_pack_end = Some(end);
            tracing::info!(
                pack = %summary.key, bytes = summary.bytes, transactions = summary.transactions,
                changes = summary.changes, sections = summary.footer.sections.len(), end_lsn = %summary.end,
                first_commit = summary.first_commit.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
                last_commit = summary.last_commit.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
                seconds = clock.elapsed().as_secs_f64(), "pack stored"
            );
            self.telemetry.metrics.packs_stored.inc();
            self.telemetry.metrics.pack_bytes.add(summary.bytes);
            let pack = PackStatus {
                key: summary.key.clone(),
                bytes: summary.bytes,
                changes: summary.changes,
                stored_at: Utc::now(),
            };
            self.telemetry.update(|s| s.stream.last_pack = Some(pack));
            stored = Some(summary);
        } else if !force_progress
            && ((end == self.progress.durable_lsn && covered == self.progress.covered_until)
                || self.last_progress_write.elapsed() < self.flush_interval / 2)
        {
            return Ok(());
        }
        self.progress.durable_lsn = end;
        self.progress.covered_until = covered;
        self.progress.updated_at = Utc::now();
        self.repo.put_stream_progress(&self.progress).await?;
        self.last_progress_write = Instant::now();
        if let Some(summary) = stored {
            self.indexer.stored(summary.pack(), summary.footer).await;
        }
        self.status(false).await?;
        let metrics = &self.telemetry.metrics;
        metrics
            .covered_until
            .set(covered.timestamp_millis() as f64 / 1000.0);
        if let Some(p) = self.confirmed_probe {
            metrics.lag_bytes.set(p.lsn.0.saturating_sub(end.0) as f64);
        }
        self.telemetry.update(|s| {
            s.stream.durable_lsn = Some(end);
            s.stream.covered_until = Some(covered);
        });
        if force_progress || self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
            // The maps now are exactly those after every transaction before `end`.
            self.repo
                .put_routing_checkpoint(end, &self.router.checkpoint())
                .await?;
            self.last_checkpoint = Instant::now();
        }
        Ok(())
    }

    async fn message(&mut self, admin: &Client, data: &bytes::Bytes) -> Result<(), CaptureError> {
        let message = pgoutput::decode(data, self.ctx)?;
        self.ctx = self.ctx.next(&message);
        if let Message::Relation(r) = &message
            && self.router.is_new_table(r)
        {
            // A table created while capturing (a migration): routed as the catalog has it
            // now, which is when it was created, give or take the stream's lag.
            let fresh = Catalog::load(admin, &self.source).await?;
            self.router.add_table(&fresh, r);
        }
        match message {
            Message::StreamStart(s) => {
                if !self.streamed.contains_key(&s.xid) {
                    let spool = TxnSpool::new(&self.spool_dir).map_err(spool_error)?;
                    self.streamed.insert(s.xid, spool);
                }
                self.in_stream = Some(s.xid);
            }
            Message::StreamStop => self.in_stream = None,
            Message::StreamAbort(a) => {
                if a.xid == a.subxid {
                    self.streamed.remove(&a.xid);
                } else if let Some(spool) = self.streamed.get_mut(&a.xid) {
                    spool.abort_subtransaction(a.subxid);
                }
            }
            Message::StreamCommit(c) => {
                let spool = self.streamed.remove(&c.xid).ok_or_else(|| {
                    CaptureError::Protocol(format!("StreamCommit of unknown transaction {}", c.xid))
                })?;
                let commit = Commit {
                    flags: c.flags,
                    commit_lsn: c.commit_lsn,
                    end_lsn: c.end_lsn,
                    commit_time: c.commit_time,
                };
                if commit.commit_lsn < self.progress.durable_lsn {
                    return Ok(()); // stored before a restart
                }
                tracing::debug!(
                    xid = c.xid,
                    messages = spool.messages,
                    "streamed transaction committed"
                );
                self.writer.begin(&Begin {
                    final_lsn: c.commit_lsn,
                    commit_time: c.commit_time,
                    xid: c.xid,
                });
                let mut replay = spool.replay().map_err(spool_error)?;
                while let Some(message) = replay.recv().await {
                    self.data(&message.map_err(spool_error)?)?;
                }
                self.commit(&commit)?;
            }
            other if self.in_stream.is_some() => {
                let xid = other.streamed_xid().unwrap_or_default();
                // Stripped before anything keeps it: a Relation sent inside a streamed block
                // also describes the table for transactions that commit outside it (and
                // outlives this one if it aborts), where an xid cannot be encoded.
                let other = strip_xid(other);
                if let Message::Relation(r) = &other {
                    self.relation(r)?;
                }
                let top = self.in_stream.expect("checked");
                if let Some(spool) = self.streamed.get_mut(&top) {
                    spool.push(xid, &other).map_err(spool_error)?;
                }
            }
            Message::Begin(b) => self.writer.begin(&b),
            Message::Commit(c) => {
                if c.commit_lsn < self.progress.durable_lsn {
                    // Stored before a restart: drop what the writer collected for it.
                    self.discard_transaction();
                    return Ok(());
                }
                self.commit(&c)?;
            }
            other => self.data(&other)?,
        }
        if !self.reshaped.is_empty() && !self.writer.in_transaction() {
            for reshaped in std::mem::take(&mut self.reshaped) {
                gaps::check_reshaped(&self.repo, &reshaped).await?;
            }
        }
        if !self.created.is_empty() && !self.writer.in_transaction() {
            // Tables created by transactions now committed: a publication that does not carry
            // them leaves a gap from their creation on.
            for (table, created) in std::mem::take(&mut self.created) {
                gaps::check_created(&self.repo, admin, &self.source.publication, &table, created)
                    .await?;
            }
        }
        Ok(())
    }

    fn discard_transaction(&mut self) {
        // Transactions before the durable point arrive only at the start of a session, before
        // anything new: a fresh writer drops them.
        self.writer = self.writer.next(self.writer.start());
        self.router.commit();
    }

    fn commit(&mut self, commit: &Commit) -> Result<(), CaptureError> {
        for (table, tenants) in self.router.take_unaccompanied() {
            // The rows below the moved ones stay with the tenant they left, in both tenants'
            // restores from here on: refused there, until a snapshot has them where they are.
            tracing::warn!(%table, tenants = tenants.len(), "rows moved to another tenant without the rows below them (no current trigger of parent moves: run `updog-backup schema-triggers` as a superuser); both tenants' restores after this transaction are refused until the next snapshot");
            let marker = ddl::unaccompanied_move(&table, commit.commit_lsn);
            for tenant in tenants {
                self.writer.tenant_message(tenant, &marker)?;
            }
        }
        self.writer.commit(commit)?;
        self.router.commit();
        self.received = self.received.max(commit.end_lsn);
        self.confirm_probe();
        Ok(())
    }

    /// A table's definition, before its changes.
    fn relation(&mut self, r: &pgoutput::Relation) -> Result<(), CaptureError> {
        if self.router.relation(r)? {
            // The migration came after the last change stored with the old definition.
            self.reshaped.push(gaps::Reshaped {
                table: format!("{}.{}", quote_ident(&r.namespace), quote_ident(&r.name)),
                columns: r.columns.iter().map(|c| c.name.clone()).collect(),
                since: self.touched.get(&r.oid).copied(),
                seen: self.writer.current().map(|(lsn, _)| lsn),
            });
        }
        self.writer.relation(r);
        Ok(())
    }

    /// A data message of the current transaction.
    fn data(&mut self, message: &Message) -> Result<(), CaptureError> {
        match message {
            Message::Relation(r) => self.relation(r)?,
            Message::Insert(_) | Message::Update(_) | Message::Delete(_) => {
                let op = match message {
                    Message::Insert(_) => Operation::Insert,
                    Message::Update(_) => Operation::Update,
                    _ => Operation::Delete,
                };
                self.telemetry.metrics.change(op).inc();
                let oid = relation_oid(message);
                if let Some(point) = self.writer.current() {
                    self.touched.insert(oid, point);
                }
                match self.router.route(message)? {
                    Routed::One(Destination::Tenant(t)) => {
                        self.writer.change(Some(t), oid, message)?;
                    }
                    Routed::One(Destination::Global) => self.writer.change(None, oid, message)?,
                    Routed::One(Destination::Skip) => {}
                    Routed::Moved { from, to } => {
                        let relation = self.router.relation_of(oid)?;
                        for (tenant, change) in split_move(relation, message, from, to)? {
                            self.writer.change(Some(tenant), oid, &change)?;
                        }
                    }
                }
            }
            Message::Truncate(t) => {
                self.telemetry.metrics.change(Operation::Truncate).inc();
                for &oid in &t.relations {
                    let one = Message::Truncate(Truncate {
                        xid: None,
                        cascade: false,
                        restart_identity: t.restart_identity,
                        relations: vec![oid],
                    });
                    match self.router.scope_of(oid)? {
                        router::Scope::Tenant => {
                            self.router.truncated(oid);
                            self.writer.truncate_tenant_table(oid, &one)?;
                        }
                        router::Scope::Global => self.writer.change(None, oid, &one)?,
                        router::Scope::Skip => {}
                    }
                }
            }
            Message::LogicalMessage(m) if m.transactional && m.prefix == ddl::PREFIX => {
                // One this build cannot read is kept: the restore that meets it refuses.
                let event = ddl::SchemaEvent::parse(&m.content).ok();
                if let Some(ddl::SchemaEvent::Moved { parent, table, .. }) = &event {
                    self.router.moves_described(*parent);
                    if let Some(rows) = table {
                        self.moved(rows)?;
                    }
                    return Ok(());
                }
                if let Some((relation, updates)) = event.as_ref().and_then(|e| e.as_updates()) {
                    // Rows a volatile default rewrote: routed and stored as UPDATEs, which
                    // restores apply after the schema change that precedes them.
                    self.data(&Message::Relation(relation))?;
                    for update in updates {
                        self.data(&Message::Update(update))?;
                    }
                    return Ok(());
                }
                let ours = event
                    .as_ref()
                    .is_none_or(|e| e.touches(|s| self.router.covers_schema(s)));
                if let (Some(event), Some(commit)) = (&event, self.writer.current()) {
                    for table in event.created_tables() {
                        if self.router.covers_schema(&table.schema) {
                            self.created
                                .push((crate::pg::qualified(&table.schema, &table.name), commit));
                        }
                    }
                }
                if ours {
                    tracing::info!(lsn = %m.lsn, "schema change captured");
                    self.telemetry.metrics.change(Operation::SchemaChange).inc();
                    self.writer.schema_change(message)?;
                }
            }
            // Types travel as text; origins and other logical messages say nothing about rows.
            _ => {}
        }
        Ok(())
    }

    /// Rows that moved to another tenant with their parent (the trigger read them as they
    /// are): a DELETE for the tenant each left, an INSERT for the one it joined.
    fn moved(&mut self, rows: &ddl::MovedRows) -> Result<(), CaptureError> {
        let (relation, tuples) = rows.tuples().map_err(|e| {
            CaptureError::Protocol(format!("a message of the trigger of parent moves: {e}"))
        })?;
        self.data(&Message::Relation(relation.clone()))?;
        let oid = relation.oid;
        let full = relation.replica_identity == pgoutput::ReplicaIdentity::Full;
        let mut moved = 0u64;
        for tuple in tuples {
            let Routed::Moved { from, to } = self.router.route_moved(oid, &tuple)? else {
                continue;
            };
            let update = Message::Update(pgoutput::Update {
                xid: None,
                relation: oid,
                old: full.then(|| OldTuple::Full(tuple.clone())),
                new: tuple,
            });
            for (tenant, change) in split_move(&relation, &update, from, to)? {
                self.writer.change(Some(tenant), oid, &change)?;
            }
            moved += 1;
        }
        if moved > 0 {
            tracing::info!(table = %router::relation_name(&relation), rows = moved, "rows moved to another tenant with their parent");
        }
        Ok(())
    }
}

fn relation_oid(message: &Message) -> u32 {
    match message {
        Message::Insert(m) => m.relation,
        Message::Update(m) => m.relation,
        Message::Delete(m) => m.relation,
        _ => 0,
    }
}

/// The message as stored: sections hold whole transactions, so xids are dropped.
/// The spool's local I/O failures (a full disk, above all) as what they are: transient, and
/// about the spool. Anything else from it (a spooled change that does not decode) stays fatal.
fn spool_error(e: CodecError) -> CaptureError {
    match e {
        CodecError::Io(e) => CaptureError::Spool(e),
        other => CaptureError::Codec(other),
    }
}

fn strip_xid(mut message: Message) -> Message {
    match &mut message {
        Message::Relation(m) => m.xid = None,
        Message::Type(m) => m.xid = None,
        Message::Insert(m) => m.xid = None,
        Message::Update(m) => m.xid = None,
        Message::Delete(m) => m.xid = None,
        Message::Truncate(m) => m.xid = None,
        Message::LogicalMessage(m) => m.xid = None,
        _ => {}
    }
    message
}

/// An UPDATE that moved a row between tenants, or into or out of every tenant, as each tenant's
/// restore must replay it: a DELETE of the old row for the tenant it left (`from`), whose
/// restore has the row, and an INSERT of the whole new row for the one it joined (`to`), whose
/// restore does not. Both are built before either is stored.
fn split_move(
    relation: &pgoutput::Relation,
    message: &Message,
    from: Option<Arc<str>>,
    to: Option<Arc<str>>,
) -> Result<Vec<(Arc<str>, Message)>, CaptureError> {
    let Message::Update(update) = message else {
        return Err(CaptureError::Protocol("only an UPDATE moves a row".into()));
    };
    let mut changes = Vec::with_capacity(2);
    if let Some(from) = from {
        // Without an old row no replica identity column changed: the new row's are the old's.
        let old = update.old.clone().unwrap_or_else(|| {
            OldTuple::Key(Tuple(
                relation
                    .columns
                    .iter()
                    .zip(&update.new.0)
                    .map(|(c, v)| {
                        if c.part_of_key {
                            v.clone()
                        } else {
                            Value::Null
                        }
                    })
                    .collect(),
            ))
        });
        changes.push((
            from,
            Message::Delete(pgoutput::Delete {
                xid: None,
                relation: update.relation,
                old,
            }),
        ));
    }
    if let Some(to) = to {
        // pgoutput leaves out of the new row a TOASTed value the UPDATE did not change; the
        // whole old row that REPLICA IDENTITY FULL sends carries it (detoasted).
        let old_row = match &update.old {
            Some(OldTuple::Full(t)) => Some(t),
            _ => None,
        };
        let mut new = update.new.clone();
        for (i, value) in new.0.iter_mut().enumerate() {
            if !matches!(value, Value::UnchangedToast) {
                continue;
            }
            match old_row.and_then(|t| t.0.get(i)) {
                Some(old) if !matches!(old, Value::UnchangedToast) => *value = old.clone(),
                _ => {
                    return Err(RouteError::MovedWithoutValue {
                        table: router::relation_name(relation),
                        sql: format!(
                            "{}.{}",
                            quote_ident(&relation.namespace),
                            quote_ident(&relation.name)
                        ),
                        column: relation.columns[i].name.clone(),
                    }
                    .into());
                }
            }
        }
        changes.push((
            to,
            Message::Insert(pgoutput::Insert {
                xid: None,
                relation: update.relation,
                new,
            }),
        ));
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::pgoutput::{Column, Relation, ReplicaIdentity, Update};

    fn relation() -> Relation {
        Relation {
            xid: None,
            oid: 7,
            namespace: "app".into(),
            name: "funds".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: ["id", "org", "notes"]
                .iter()
                .map(|c| Column {
                    part_of_key: *c == "id",
                    name: c.to_string(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    fn text(v: &str) -> Value {
        Value::Text(bytes::Bytes::copy_from_slice(v.as_bytes()))
    }

    fn moved(old: Option<OldTuple>) -> Message {
        Message::Update(Update {
            xid: None,
            relation: 7,
            old,
            new: Tuple(vec![text("f1"), text("t2"), Value::UnchangedToast]),
        })
    }

    #[test]
    fn a_move_is_a_delete_for_the_old_tenant_and_a_whole_insert_for_the_new() {
        let (t1, t2): (Arc<str>, Arc<str>) = (Arc::from("t1"), Arc::from("t2"));
        let full = OldTuple::Full(Tuple(vec![text("f1"), text("t1"), text("long")]));
        let changes = split_move(
            &relation(),
            &moved(Some(full.clone())),
            Some(t1.clone()),
            Some(t2.clone()),
        )
        .unwrap();
        let [
            (from, Message::Delete(delete)),
            (to, Message::Insert(insert)),
        ] = &changes[..]
        else {
            panic!("{changes:?}");
        };
        assert_eq!((from, to), (&t1, &t2));
        assert_eq!(delete.old, full);
        // The unchanged TOASTed value comes from the whole old row.
        assert_eq!(insert.new.0, [text("f1"), text("t2"), text("long")]);

        // Out of every tenant, without an old row: a DELETE by the key the new row shows.
        let changes = split_move(&relation(), &moved(None), Some(t1.clone()), None).unwrap();
        let [(_, Message::Delete(delete))] = &changes[..] else {
            panic!("{changes:?}");
        };
        assert_eq!(
            delete.old,
            OldTuple::Key(Tuple(vec![text("f1"), Value::Null, Value::Null]))
        );

        // Into a tenant without the value: refused, naming the fix.
        let error = split_move(&relation(), &moved(None), None, Some(t2)).unwrap_err();
        assert!(
            matches!(&error, CaptureError::Route(RouteError::MovedWithoutValue { column, .. }) if column == "notes"),
            "{error}"
        );
        assert!(
            error.to_string().contains("REPLICA IDENTITY FULL"),
            "{error}"
        );
    }
}
