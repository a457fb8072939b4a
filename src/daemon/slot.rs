//! Slot health: how much WAL the slot holds on the source and how close it is to being
//! invalidated by `max_slot_wal_keep_size`; a heartbeat when nothing is captured, so the slot
//! advances even when no tenant table is written; and, since it runs anyway, the count of
//! restores recorded in the repository for the metrics.

use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::capture::CaptureError;
use crate::capture::gaps::{self, GapError};
use crate::config::Config;
use crate::pg::Lsn;
use crate::repository::Repository;
use crate::source::catalog::Catalog;
use crate::source::query_context;
use crate::telemetry::{Operation, Task, Telemetry};

use super::DaemonError;
use super::leader::sleep_or_stop;

const CHECK_EVERY: Duration = Duration::from_secs(15);
/// Warn when less than this share of `max_slot_wal_keep_size` is left.
const WARN_SAFE_SHARE: f64 = 0.2;
const WARN_EVERY: Duration = Duration::from_secs(300);
/// The publication's coverage is checked every this many slot checks (a minute).
const COVERAGE_EVERY: u32 = 4;

struct Health {
    wal_status: Option<String>,
    retained: Option<i64>,
    safe: Option<i64>,
    limit: Option<i64>,
    confirmed_flush: Option<Lsn>,
}

async fn read(client: &Client, slot: &str) -> Result<Option<Health>, DaemonError> {
    let row = client
        .query_opt(
            "SELECT s.wal_status, s.safe_wal_size,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::int8,
                    s.confirmed_flush_lsn::text,
                    (SELECT setting::int8 FROM pg_catalog.pg_settings
                      WHERE name = 'max_slot_wal_keep_size')
               FROM pg_catalog.pg_replication_slots s
              WHERE s.slot_name = $1 AND s.database = current_database()",
            &[&slot],
        )
        .await
        .map_err(query_context("reading the replication slot's health"))?;
    Ok(row.map(|row| Health {
        wal_status: row.get(0),
        safe: row.get(1),
        retained: row.get(2),
        confirmed_flush: row.get::<_, Option<String>>(3).and_then(|s| s.parse().ok()),
        // In MB; -1 means no limit.
        limit: row
            .get::<_, Option<i64>>(4)
            .filter(|mb| *mb >= 0)
            .map(|mb| mb << 20),
    }))
}

fn changes_captured(telemetry: &Telemetry) -> u64 {
    [
        Operation::Insert,
        Operation::Update,
        Operation::Delete,
        Operation::Truncate,
    ]
    .into_iter()
    .map(|op| telemetry.metrics.change(op).get())
    .sum()
}

/// Runs until `stop`; returns an error only when the slot is gone or invalidated. `client`
/// is the connection holding the daemon's lock (if it fails, the supervisor notices).
pub async fn run(
    config: &Config,
    repo: &Repository,
    telemetry: &Telemetry,
    stop: &CancellationToken,
    client: &Client,
) -> Result<(), DaemonError> {
    let slot = &config.source.slot;
    let mut last_warning: Option<Instant> = None;
    let mut heartbeat_allowed = true;
    let mut quiet_since = (Instant::now(), changes_captured(telemetry));
    // The capture checked the publication as it started: the first check here is a minute on.
    let mut checks: u32 = 1;
    loop {
        match read(client, slot).await {
            Ok(Some(health)) => {
                if health.wal_status.as_deref() == Some("lost") {
                    return Err(DaemonError::SlotLost(slot.clone()));
                }
                record(telemetry, &health);
                let endangered = health.wal_status.as_deref() == Some("unreserved")
                    || matches!((health.safe, health.limit), (Some(safe), Some(limit)) if (safe as f64) < limit as f64 * WARN_SAFE_SHARE);
                if endangered && last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                    tracing::warn!(
                        // Options as values: a field that is None is left out.
                        slot = %slot, wal_status = health.wal_status.as_deref(), retained_bytes = health.retained,
                        safe_bytes = health.safe, limit_bytes = health.limit,
                        "the slot is close to being invalidated by max_slot_wal_keep_size: the capture is not keeping up (see /status last_error) or the limit is too small"
                    );
                    last_warning = Some(Instant::now());
                }
            }
            Ok(None) => return Err(CaptureError::NoSlot(slot.clone()).into()),
            Err(e) => {
                telemetry.metrics.task_restarts(Task::SlotHealth).inc();
                telemetry.error(Task::SlotHealth, e.to_string());
                tracing::warn!(error = %e, "slot health check failed; retrying");
            }
        }

        let captured = changes_captured(telemetry);
        if captured != quiet_since.1 {
            quiet_since = (Instant::now(), captured);
        } else if heartbeat_allowed && quiet_since.0.elapsed() >= config.daemon.heartbeat_interval {
            heartbeat_allowed = heartbeat(client).await;
            quiet_since.0 = Instant::now();
        }

        if checks % COVERAGE_EVERY == 0 {
            coverage(config, repo, telemetry, client).await;
        }
        checks += 1;

        match repo.restore_record_count().await {
            Ok(records) => telemetry.metrics.restores.set(records as u64),
            Err(e) => tracing::debug!(error = %e, "counting restore records"),
        }
        if sleep_or_stop(CHECK_EVERY, stop).await {
            return Ok(());
        }
    }
}

/// A table created since the capture started is in the catalog but, with a `FOR TABLE`
/// publication, not in the stream: record the gap and say so until the publication is fixed.
async fn coverage(config: &Config, repo: &Repository, telemetry: &Telemetry, client: &Client) {
    let result = async {
        let catalog = Catalog::load(client, &config.source)
            .await
            .map_err(|e| GapError::Source(e.into()))?;
        gaps::check_publication(repo, client, &config.source.publication, &catalog).await
    }
    .await;
    match result {
        Ok(missing) => {
            telemetry
                .metrics
                .unpublished_tables
                .set(missing.len() as f64);
            if !missing.is_empty() {
                telemetry.error(
                    Task::SlotHealth,
                    format!(
                        "publication {} lacks {}: their changes are not captured (a stream gap is recorded)",
                        config.source.publication,
                        missing.join(", ")
                    ),
                );
            }
        }
        Err(e) => {
            telemetry.error(Task::SlotHealth, format!("checking the publication: {e}"));
            tracing::warn!(error = %e, "checking the publication's coverage failed");
        }
    }
}

fn record(telemetry: &Telemetry, health: &Health) {
    let m = &telemetry.metrics;
    for (gauge, value) in [
        (&m.slot_retained_wal, health.retained),
        (&m.slot_safe_wal, health.safe),
        (&m.slot_wal_limit, health.limit),
    ] {
        match value {
            Some(v) => gauge.set(v as f64),
            None => gauge.clear(),
        }
    }
    telemetry.update(|s| {
        s.slot.wal_status = health.wal_status.clone();
        s.slot.retained_wal_bytes = health.retained;
        s.slot.safe_wal_bytes = health.safe;
        s.slot.confirmed_flush_lsn = health.confirmed_flush;
        s.slot.checked_at = Some(Utc::now());
    });
}

/// Writes a non-transactional logical message: WAL in this database that the walsender
/// decodes (and pgoutput, without `messages`, skips), so the daemon acknowledges past it.
/// Returns false when the role may not (then heartbeats stop, with one warning).
async fn heartbeat(client: &Client) -> bool {
    match client
        .query_one(
            "SELECT pg_logical_emit_message(false, 'updog-backup', 'heartbeat')::text",
            &[],
        )
        .await
    {
        Ok(row) => {
            tracing::debug!(lsn = %row.get::<_, String>(0), "heartbeat written");
            true
        }
        Err(e) => {
            tracing::warn!(
                error = %crate::pg::sqlstate::describe(&e),
                "cannot write the slot heartbeat; with no writes to this database the slot will hold WAL: \
                 GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO the daemon's role"
            );
            false
        }
    }
}
