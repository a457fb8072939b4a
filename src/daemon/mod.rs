//! `updog-backup daemon`: capture, the snapshot schedule with retention, slot health and the
//! HTTP server, as tasks under one supervisor.
//!
//! ```text
//! start ─► checks that cannot heal (repository, recipients) ─► HTTP server
//!       ─► standby: wait for the lock ─► active: capture ∥ schedule ∥ slot health ∥ lock watch
//!            ├─ SIGTERM: capture stores the open pack and acknowledges; the rest stop; exit 0
//!            ├─ lock lost: capture dropped WITHOUT storing (the new holder resends it) ─► standby
//!            └─ a fatal error (slot dropped or invalidated, foreign repository…): stop, exit 1
//! ```
//!
//! Transient failures are retried inside each task with backoff and counted in
//! `updog_backup_task_restarts_total`; the last one is in `/status`.

pub mod http;
pub mod leader;
pub mod schedule;
pub mod slot;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::capture::CaptureError;
use crate::config::Config;
use crate::repository::{Repository, RepositoryError};
use crate::retry::{Classify, ErrorClass};
use crate::storage::ObjectStore;
use crate::telemetry::InstrumentedStore;
use crate::telemetry::{Role, Task, Telemetry};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {0}: {1} (server.listen)")]
    Listen(SocketAddr, #[source] std::io::Error),
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Connect(#[from] crate::pg::ConnectError),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error(transparent)]
    Codec(#[from] crate::codec::CodecError),
    #[error(transparent)]
    Identify(#[from] crate::source::identity::IdentifyError),
    #[error("{0}")]
    Internal(String),
    #[error(
        "replication slot {0:?} was invalidated by max_slot_wal_keep_size (wal_status lost): changes since the last pack are gone from the source; drop the slot and run `updog-backup init` to start a new stream from a new snapshot"
    )]
    SlotLost(String),
}

impl Classify for DaemonError {
    fn class(&self) -> ErrorClass {
        match self {
            // Another process on server.listen is a configuration conflict, not an outage.
            DaemonError::Config(_) | DaemonError::Listen(..) => ErrorClass::Usage,
            DaemonError::Repository(e) => e.class(),
            DaemonError::Capture(e) => e.class(),
            DaemonError::Connect(e) => e.class(),
            DaemonError::Source(e) => e.class(),
            DaemonError::Codec(e) => e.class(),
            DaemonError::Identify(e) => e.class(),
            DaemonError::Internal(_) | DaemonError::SlotLost(_) => ErrorClass::Permanent,
        }
    }
}

/// Runs the daemon until `shutdown` (exit 0) or a fatal error.
pub async fn run(
    config: &Config,
    store: Arc<dyn ObjectStore>,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let telemetry = Arc::new(Telemetry::new(&config.source.slot, store.describe()));
    let store: Arc<dyn ObjectStore> = Arc::new(InstrumentedStore::new(store, telemetry.clone()));
    let repo = Repository::new(store).with_concurrency(config.storage.concurrency);
    // Before the lock, the lease or the slot: a daemon pointed at the wrong repository must
    // touch none of them, and say so instead of waiting or asking for `init`.
    let info = repo.info().await?;
    check_source(config, &info, &repo).await?;
    crate::codec::check_recipients(&config.encryption.recipients, &info.recipients)?;

    let server = http::Server::bind(config).await?;
    tracing::info!(
        listen = server.local_addr().map(tracing::field::display),
        "serving /healthz /readyz /status /metrics"
    );
    let tracker = TaskTracker::new();
    let server_stop = CancellationToken::new();
    {
        let telemetry = telemetry.clone();
        let stop = server_stop.clone();
        tracker.spawn(async move {
            if let Err(e) = server.serve(telemetry.clone(), stop).await {
                telemetry.metrics.task_restarts(Task::Http).inc();
                telemetry.error(Task::Http, e.to_string());
                tracing::error!(error = %e, "the HTTP server stopped");
            }
        });
    }

    let result = loop {
        let Some(mut leadership) = leader::acquire(config, &repo, &telemetry, &shutdown).await?
        else {
            break Ok(());
        };
        telemetry.set_role(Role::Active);
        let outcome = active(config, &repo, &telemetry, &mut leadership, &shutdown).await;
        match outcome {
            Outcome::Stopped => {
                leadership.release(&repo).await;
                break Ok(());
            }
            Outcome::Fatal(e) => {
                leadership.release(&repo).await;
                break Err(e);
            }
            Outcome::LockLost(why) => {
                tracing::error!(reason = %why, "no longer active: standing by");
                telemetry.error(Task::Capture, format!("no longer active: {why}"));
            }
        }
    };
    telemetry.set_role(Role::Stopping);
    server_stop.cancel();
    tracker.close();
    tracker.wait().await;
    result
}

enum Outcome {
    Stopped,
    LockLost(leader::Lost),
    Fatal(DaemonError),
}

/// The active instance's tasks, until shutdown, a fatal error or the lock's loss.
async fn active(
    config: &Config,
    repo: &Repository,
    telemetry: &Arc<Telemetry>,
    leadership: &mut leader::Leadership,
    shutdown: &CancellationToken,
) -> Outcome {
    let others = shutdown.child_token();
    let capture_stop = CancellationToken::new();
    let mut capture = {
        let (config, repo, telemetry, stop, client) = (
            config.clone(),
            repo.clone(),
            telemetry.clone(),
            capture_stop.clone(),
            leadership.client(),
        );
        tokio::spawn(
            async move { crate::capture::run(&config, &repo, stop, &telemetry, &client).await },
        )
    };
    let tasks = TaskTracker::new();
    let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::channel::<DaemonError>(2);
    {
        let (config, repo, telemetry, stop) = (
            config.clone(),
            repo.clone(),
            telemetry.clone(),
            others.clone(),
        );
        tasks.spawn(async move { schedule::run(&config, &repo, &telemetry, &stop).await });
    }
    {
        let (config, repo, telemetry, stop, client) = (
            config.clone(),
            repo.clone(),
            telemetry.clone(),
            others.clone(),
            leadership.client(),
        );
        tasks.spawn(async move {
            if let Err(e) = slot::run(&config, &repo, &telemetry, &stop, &client).await {
                let _ = fatal_tx.send(e).await;
            }
        });
    }
    tasks.close();

    let outcome = tokio::select! {
        () = shutdown.cancelled() => Outcome::Stopped,
        joined = &mut capture => match joined {
            Ok(Ok(())) => Outcome::Stopped,
            Ok(Err(e)) => Outcome::Fatal(e.into()),
            Err(e) => Outcome::Fatal(DaemonError::Internal(format!("the capture task failed: {e}"))),
        },
        Some(e) = fatal_rx.recv() => Outcome::Fatal(e),
        lost = leadership.hold(repo, shutdown) => match lost {
            Some(why) => Outcome::LockLost(why),
            None => Outcome::Stopped,
        },
    };
    others.cancel();
    match &outcome {
        Outcome::LockLost(_) => {
            // Another instance may be capturing already: store nothing. What this one did not
            // store was not acknowledged, and the slot gives it to the new holder.
            capture.abort();
        }
        _ if !capture.is_finished() => {
            tracing::info!("stopping: storing what is complete, then acknowledging");
            capture_stop.cancel();
            match tokio::time::timeout(config.daemon.shutdown_timeout, &mut capture).await {
                Ok(Ok(Err(e))) => tracing::error!(error = %e, "capture failed while stopping"),
                Ok(_) => {}
                Err(_) => {
                    capture.abort();
                    tracing::warn!(
                        timeout_seconds = config.daemon.shutdown_timeout.as_secs_f64(),
                        "the open pack was not stored in time: it was not acknowledged either, and the next start captures it again"
                    );
                }
            }
        }
        _ => {}
    }
    if tokio::time::timeout(config.daemon.shutdown_timeout, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("tasks did not stop in time");
    }
    telemetry.update(|s| s.capturing = false);
    outcome
}

/// The repository must be the configured source database's, and every table it backs up
/// capturable (`init` checked it too, but tables change).
async fn check_source(
    config: &Config,
    info: &crate::repository::RepoInfo,
    repo: &Repository,
) -> Result<(), DaemonError> {
    let (client, identity) = crate::source::identity::identify(&config.source.url).await?;
    info.check_source(
        &identity.system_identifier,
        &identity.database,
        &repo.location(),
    )?;
    let catalog = crate::source::catalog::Catalog::load(&client, &config.source)
        .await
        .map_err(crate::source::SourceError::from)?;
    crate::source::check::refuse_identity_problems(&catalog)
        .map_err(crate::source::SourceError::from)?;
    Ok(())
}
