//! Snapshots on `schedule.snapshot` (cron, UTC), one at a time, while capture goes on; after
//! each successful one, retention. A failed snapshot is retried with backoff until the next
//! scheduled time; runs that fall due while one is running are skipped and logged.

use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::repository::{Manifest, Repository, RepositoryError};
use crate::retry::Backoff;
use crate::snapshot::{self, SnapshotRequest};
use crate::telemetry::{SnapshotStatus, Task, Telemetry};

use super::leader::sleep_or_stop;

const RETRY_MIN: Duration = Duration::from_secs(10);
const RETRY_MAX: Duration = Duration::from_secs(600);

/// Runs until `stop`. Snapshot and retention failures are reported, never fatal: the next
/// attempt may succeed, and the snapshot-age alert fires if none does.
pub async fn run(
    config: &Config,
    repo: &Repository,
    telemetry: &Telemetry,
    stop: &CancellationToken,
) {
    let schedule = config
        .snapshot_schedule()
        .expect("validated when the config was loaded");
    let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
    let mut retry: Option<Duration> = None;
    // The snapshot-age alert must not reset with a restart: start from the repository's newest.
    match newest_snapshot(repo).await {
        Ok(Some(manifest)) => record_snapshot(telemetry, &manifest, None),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "reading the newest snapshot"),
    }
    // Finishes a retention run a crash interrupted, or that a daemon killed before its first
    // scheduled snapshot never got to: otherwise snapshots pile up across restarts.
    tokio::select! {
        () = stop.cancelled() => return,
        () = prune(config, repo, telemetry) => {}
    }
    loop {
        let now = Utc::now();
        let Some(next) = schedule.after(&now).next() else {
            tracing::warn!(schedule = %config.schedule.snapshot, "the snapshot schedule has no future run");
            stop.cancelled().await;
            return;
        };
        let wait = match retry {
            Some(backoff) if now + backoff < next => backoff,
            _ => {
                // The scheduled run comes first: it is the next try.
                retry = None;
                backoff.reset();
                (next - now).to_std().unwrap_or_default()
            }
        };
        telemetry.update(|s| s.next_snapshot = Some(now + wait));
        if sleep_or_stop(wait, stop).await {
            return;
        }
        let due = Utc::now();
        let started = Instant::now();
        tracing::info!(retry = retry.is_some(), "scheduled snapshot starting");
        let request = SnapshotRequest {
            tenants: Vec::new(),
            stream_slot: None,
        };
        let result = tokio::select! {
            // Dropping the snapshot leaves objects without a manifest: never visible, and
            // retention deletes them once a newer snapshot is kept.
            () = stop.cancelled() => {
                tracing::info!("scheduled snapshot abandoned: stopping");
                return;
            }
            r = snapshot::take(config, repo, &request) => r,
        };
        let metrics = &telemetry.metrics;
        match result {
            Ok(manifest) => {
                retry = None;
                backoff.reset();
                record_snapshot(telemetry, &manifest, Some(started.elapsed().as_secs_f64()));
                prune(config, repo, telemetry).await;
            }
            Err(e) => {
                metrics.snapshots_failed.inc();
                metrics.task_restarts(Task::Schedule).inc();
                telemetry.error(Task::Schedule, format!("snapshot failed: {e}"));
                let delay = backoff.next_delay();
                tracing::error!(error = %e, retry_in_seconds = delay.as_secs(), "scheduled snapshot failed");
                retry = Some(delay);
            }
        }
        let missed = schedule
            .after(&due)
            .take_while(|t| *t <= Utc::now())
            .count();
        if missed > 0 {
            tracing::warn!(
                missed,
                schedule = %config.schedule.snapshot,
                "scheduled snapshot(s) missed while the previous one ran: snapshots take longer than the schedule allows"
            );
        }
    }
}

async fn newest_snapshot(repo: &Repository) -> Result<Option<Manifest>, RepositoryError> {
    match repo.snapshots().await?.last() {
        Some(id) => Ok(Some(repo.manifest(id).await?)),
        None => Ok(None),
    }
}

/// A successful snapshot in /status and the metrics; `seconds` when this daemon took it
/// (then it also counts), `None` for the repository's newest at start.
fn record_snapshot(telemetry: &Telemetry, manifest: &Manifest, seconds: Option<f64>) {
    let bytes: u64 = manifest.objects().map(|o| o.bytes).sum();
    let rows: u64 = manifest
        .tenants
        .values()
        .map(|t| t.total_rows())
        .sum::<u64>()
        + manifest.global.total_rows();
    let duration = seconds.unwrap_or_else(|| {
        (manifest.finished_at - manifest.started_at).num_milliseconds() as f64 / 1000.0
    });
    let metrics = &telemetry.metrics;
    metrics
        .last_snapshot_success
        .set(manifest.finished_at.timestamp_millis() as f64 / 1000.0);
    if let Some(seconds) = seconds {
        metrics.snapshots_succeeded.inc();
        metrics.snapshot_duration.observe(seconds);
        metrics.exported_bytes.add(bytes);
        metrics.exported_rows.add(rows);
        tracing::info!(
            snapshot = %manifest.id, consistent_lsn = %manifest.consistent_lsn,
            tenants = manifest.tenants.len(), rows, bytes, seconds, "scheduled snapshot stored"
        );
    }
    let status = SnapshotStatus {
        id: manifest.id.to_string(),
        consistent_lsn: manifest.consistent_lsn,
        finished_at: manifest.finished_at,
        duration_seconds: duration,
        tenants: manifest.tenants.len(),
        rows,
        bytes,
    };
    telemetry.update(|s| s.last_snapshot = Some(status));
}

async fn prune(config: &Config, repo: &Repository, telemetry: &Telemetry) {
    let started = Instant::now();
    let result = async {
        let plan = crate::retention::plan(repo, config.schedule.keep_snapshots).await?;
        let deleted = crate::retention::apply(repo, &plan, |_, _| {
            telemetry.metrics.retention_deleted.inc();
        })
        .await?;
        Ok::<_, crate::repository::RepositoryError>((plan, deleted))
    }
    .await;
    match result {
        Ok((plan, deleted)) => tracing::info!(
            kept = plan.kept.len(),
            snapshots_deleted = plan.snapshots.len(),
            packs_deleted = plan.packs.len(),
            packs_from = plan.packs_from.map(tracing::field::display),
            objects = deleted,
            bytes = plan.bytes(),
            seconds = started.elapsed().as_secs_f64(),
            "retention applied"
        ),
        Err(e) => {
            telemetry.error(Task::Schedule, format!("retention failed: {e}"));
            tracing::error!(error = %e, "retention failed; it runs again after the next snapshot");
        }
    }
}
