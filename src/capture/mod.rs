//! Change capture: ONE logical replication slot, every committed change routed to its tenant
//! and stored in packs; the slot is acknowledged only up to what is stored.
//!
//! The loop: decode pgoutput (protocol 2, large transactions streamed) ─► route each change ─►
//! the pack writer's per-tenant sections ─► every `stream.flush_interval` (or at
//! `max_pack_bytes`) store the pack, rewrite `changes/progress.json`, then acknowledge the
//! pack's end LSN. A crash loses nothing: the slot resends from the last acknowledged LSN and
//! whatever the repository already holds (`durable`) is skipped by LSN.
//!
//! Covered-until (the latest restorable time) is established by probes: at time t0 the source's
//! WAL is flushed up to W0, and the walsender decodes only flushed WAL; once everything before
//! W0 is received and stored, every transaction that committed before t0 − margin is stored.
//! The margin covers the instant between a commit taking its timestamp and writing its record
//! ([`COMMIT_CLOCK_MARGIN`]) and, for asynchronous commits, the WAL writer's flush (at most
//! three `wal_writer_delay`s). The insert position would need no margin for the latter, but
//! WAL that no commit flushes (page pruning by readers) can sit unflushed for many seconds and
//! would hold covered-until back on an idle source.

pub mod gaps;
mod indexer;
pub mod router;
mod session;
pub mod spool;
pub mod writer;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::codec::CodecError;
use crate::config::Config;
use crate::pg::Lsn;
use crate::pg::pgoutput::{self};
use crate::pg::replication::ReplicationError;
use crate::repository::{Repository, RepositoryError};
use crate::repository::{StreamProgress, StreamState};
use crate::retry::{Backoff, Classify, ErrorClass};
use crate::source::catalog::CatalogError;
use crate::source::{SourceError, query_context};
use crate::storage::StorageError;
use crate::telemetry::{Task, Telemetry};
use router::{RouteError, Router};

/// See the module documentation.
pub const COMMIT_CLOCK_MARGIN: chrono::TimeDelta = chrono::TimeDelta::milliseconds(500);
/// How often the daemon stores a routing checkpoint (and when it stops): a restart replays the
/// routing regions of the packs after the newest one.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(600);

/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("replication: {0}")]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error("storing a pack: {0}")]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("local spool: {0}")]
    Spool(#[from] std::io::Error),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("pgoutput: {0}")]
    Decode(#[from] pgoutput::DecodeError),
    #[error(transparent)]
    Publication(#[from] crate::source::publication::PublicationError),
    #[error("checking the publication's coverage: {0}")]
    Coverage(#[from] gaps::GapError),
    #[error("unexpected replication stream: {0}")]
    Protocol(String),
    #[error(
        "replication slot {0:?} does not exist on the source: run `updog-backup init` (it creates the slot and the first snapshot)"
    )]
    NoSlot(String),
    #[error(
        "replication slot {slot:?} is at {slot_lsn}, but the repository holds changes only up to {durable}: changes in between were consumed by something else and are lost to this repository; run `updog-backup init` again to start a new stream from a new snapshot"
    )]
    Gap {
        slot: String,
        slot_lsn: Lsn,
        durable: Lsn,
    },
    #[error(
        "replication slot {slot:?} uses plugin {plugin:?}, not pgoutput: drop it or choose another source.slot"
    )]
    WrongPlugin { slot: String, plugin: String },
}

impl Classify for CaptureError {
    /// What a reconnect cannot heal stops the daemon; the rest is retried with backoff.
    fn class(&self) -> ErrorClass {
        match self {
            CaptureError::Source(e) => e.class(),
            CaptureError::Catalog(e) => e.class(),
            CaptureError::Replication(e) => e.class(),
            CaptureError::Repository(e) => e.class(),
            CaptureError::Storage(e) => e.class(),
            CaptureError::Codec(e) => e.class(),
            CaptureError::Publication(e) => e.class(),
            CaptureError::Coverage(e) => e.class(),
            CaptureError::Route(e) => e.class(),
            // A full or failing spool disk may be freed.
            CaptureError::Spool(_) => ErrorClass::Transient,
            CaptureError::WrongPlugin { .. } => ErrorClass::Usage,
            CaptureError::Decode(_)
            | CaptureError::Protocol(_)
            | CaptureError::NoSlot(_)
            | CaptureError::Gap { .. } => ErrorClass::Permanent,
        }
    }
}

/// Captures until `shutdown` is cancelled (then stores what is complete and returns) or a
/// fatal error; transient failures reconnect with backoff. `admin` is the daemon's SQL
/// connection to the source (the one holding its lock: a connection less to budget for).
pub async fn run(
    config: &Config,
    repo: &Repository,
    shutdown: CancellationToken,
    telemetry: &Arc<Telemetry>,
    admin: &Client,
) -> Result<(), CaptureError> {
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    loop {
        let started = Instant::now();
        let result = session::session(config, repo, &shutdown, telemetry, admin).await;
        telemetry.update(|s| s.capturing = false);
        match result {
            Ok(()) => return Ok(()),
            Err(e) if !e.class().is_transient() => {
                telemetry.error(Task::Capture, e.to_string());
                return Err(e);
            }
            Err(e) => {
                // A session that ran for a while was healthy: start the backoff over.
                if started.elapsed() > BACKOFF_MAX {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                telemetry.metrics.task_restarts(Task::Capture).inc();
                telemetry.error(Task::Capture, e.to_string());
                tracing::warn!(error = %e, retry_in_seconds = delay.as_secs(), "capture interrupted; reconnecting");
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// The slot as `pg_replication_slots` shows it.
struct SlotState {
    confirmed_flush: Lsn,
}

async fn slot_state(client: &Client, slot: &str) -> Result<SlotState, CaptureError> {
    let row = client
        .query_opt(
            "SELECT plugin, confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots
              WHERE slot_name = $1 AND database = current_database()",
            &[&slot],
        )
        .await
        .map_err(query_context("reading the replication slot"))?
        .ok_or_else(|| CaptureError::NoSlot(slot.into()))?;
    let plugin: Option<String> = row.get(0);
    if plugin.as_deref() != Some("pgoutput") {
        return Err(CaptureError::WrongPlugin {
            slot: slot.into(),
            plugin: plugin.unwrap_or_default(),
        });
    }
    let confirmed: Option<String> = row.get(1);
    let confirmed_flush = confirmed.and_then(|s| s.parse().ok()).unwrap_or(Lsn(0));
    Ok(SlotState { confirmed_flush })
}

/// A covered-until probe: at `time` the WAL insert position was `lsn`.
#[derive(Debug, Clone, Copy)]
struct Probe {
    time: DateTime<Utc>,
    lsn: Lsn,
}

async fn wal_writer_delay(client: &Client) -> Result<chrono::TimeDelta, CaptureError> {
    let ms: f64 = client
        .query_one(
            "SELECT extract(epoch FROM current_setting('wal_writer_delay')::interval)::float8 * 1000",
            &[],
        )
        .await
        .map_err(query_context("reading wal_writer_delay"))?
        .get(0);
    Ok(chrono::TimeDelta::milliseconds(ms as i64))
}

async fn probe(client: &Client) -> Result<Probe, CaptureError> {
    let row = client
        .query_one(
            "SELECT clock_timestamp(), pg_current_wal_flush_lsn()::text",
            &[],
        )
        .await
        .map_err(query_context("probing the source's WAL position"))?;
    let lsn: String = row.get(1);
    Ok(Probe {
        time: row.get(0),
        lsn: lsn
            .parse()
            .map_err(|_| CaptureError::Protocol(format!("bad LSN {lsn:?}")))?,
    })
}

/// Rebuilds the router's key maps as they were at `start`: the newest checkpoint, then the
/// routing changes of every pack after it.
async fn restore_routing(
    repo: &Repository,
    state: &StreamState,
    progress: &StreamProgress,
    start: Lsn,
    router: &mut Router,
    admin: &Client,
) -> Result<(), CaptureError> {
    let Some((lsn, checkpoint)) = repo
        .newest_routing_checkpoint(progress.since_lsn, start)
        .await?
    else {
        tracing::warn!(
            "no routing checkpoint in the repository: loading keys from the source's current rows; \
             a change to a row whose parent was deleted since {start} would not route"
        );
        router.load(admin).await?;
        return Ok(());
    };
    router.apply(checkpoint);
    let packs = state
        .chain_from(lsn)
        .map_err(|m| CaptureError::Protocol(format!("rebuilding the routing state: {m}")))?;
    let packs: Vec<_> = packs.into_iter().filter(|p| p.end <= start).collect();
    // The stream index says which packs changed the routing state; only their regions are read.
    let views = repo.pack_views(state, &packs, None).await?;
    let reads: Vec<_> = views
        .iter()
        .filter_map(|v| Some(repo.pack_routes(&v.pack.key, v.routes.as_ref()?)))
        .collect();
    let mut regions = futures::stream::iter(reads).buffered(repo.concurrency());
    while let Some(delta) = regions.try_next().await? {
        router.apply(delta);
    }
    tracing::info!(checkpoint = %lsn, packs = packs.len(), keys = router.keys(), "routing state restored");
    Ok(())
}
