//! What the daemon knows about itself, shared by its tasks and served over HTTP: the
//! Prometheus [`metrics`], the `/status` document, and the store wrapper that times every request
//! ([`InstrumentedStore`]). One value made by the supervisor and
//! passed to each task (no global state). Nothing here holds tenant data or a secret.

mod instrumented_store;
pub mod metrics;

use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::Serialize;

pub use instrumented_store::InstrumentedStore;
pub use metrics::{Metrics, Operation, StorageOp, Task};

use crate::pg::Lsn;

/// This instance's part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Connecting, or checking the repository and the source.
    Starting,
    /// Holds the lock and captures.
    Active,
    /// Another instance holds the lock; this one takes over when it goes.
    Standby,
    /// Shutting down.
    Stopping,
}

/// `GET /status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub role: Role,
    /// `host:pid` of this instance.
    pub instance: String,
    pub started_at: DateTime<Utc>,
    /// The instance that holds the lock, as its lease in the repository says (standby only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_instance: Option<String>,
    /// The capture is streaming from the slot.
    pub capturing: bool,
    pub slot: SlotStatus,
    pub stream: StreamStatus,
    pub last_snapshot: Option<SnapshotStatus>,
    pub next_snapshot: Option<DateTime<Utc>>,
    pub storage: StorageStatus,
    pub last_error: Option<ErrorStatus>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SlotStatus {
    pub name: String,
    /// `pg_replication_slots.wal_status`: reserved, extended, unreserved or lost.
    pub wal_status: Option<String>,
    pub confirmed_flush_lsn: Option<Lsn>,
    pub retained_wal_bytes: Option<i64>,
    /// Until `max_slot_wal_keep_size` invalidates the slot (absent when unlimited).
    pub safe_wal_bytes: Option<i64>,
    pub checked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamStatus {
    /// Every transaction that committed before it is stored (and acknowledged).
    pub durable_lsn: Option<Lsn>,
    /// The latest restorable time.
    pub covered_until: Option<DateTime<Utc>>,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub last_pack: Option<PackStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PackStatus {
    pub key: String,
    pub bytes: u64,
    pub changes: u64,
    pub stored_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotStatus {
    pub id: String,
    pub consistent_lsn: Lsn,
    pub finished_at: DateTime<Utc>,
    pub duration_seconds: f64,
    pub tenants: usize,
    pub rows: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StorageStatus {
    /// The last request succeeded (or none failed yet).
    pub ok: bool,
    pub location: String,
    pub last_error: Option<ErrorStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorStatus {
    pub task: &'static str,
    pub message: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug)]
pub struct Telemetry {
    pub metrics: Metrics,
    status: Mutex<Status>,
}

impl Telemetry {
    pub fn new(slot: &str, storage_location: String) -> Self {
        let instance = format!(
            "{}:{}",
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "localhost".into()),
            std::process::id()
        );
        Self {
            metrics: Metrics::default(),
            status: Mutex::new(Status {
                role: Role::Starting,
                instance,
                started_at: Utc::now(),
                active_instance: None,
                capturing: false,
                slot: SlotStatus {
                    name: slot.into(),
                    ..Default::default()
                },
                stream: StreamStatus::default(),
                last_snapshot: None,
                next_snapshot: None,
                storage: StorageStatus {
                    ok: true,
                    location: storage_location,
                    last_error: None,
                },
                last_error: None,
            }),
        }
    }

    /// Changes the status under its lock. Never held across an await.
    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut status);
    }

    /// The status as served, with the lag computed now.
    pub fn status(&self) -> Status {
        let mut status = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(covered) = status.stream.covered_until {
            status.stream.lag_seconds =
                Some(((Utc::now() - covered).num_milliseconds().max(0)) as f64 / 1000.0);
        }
        status
    }

    pub fn instance(&self) -> String {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .instance
            .clone()
    }

    pub fn set_role(&self, role: Role) {
        self.metrics
            .active
            .set(if role == Role::Active { 1.0 } else { 0.0 });
        self.update(|s| {
            s.role = role;
            if role != Role::Active {
                s.capturing = false;
            }
        });
    }

    /// Records a task's error for `/status` (logging is the caller's).
    pub fn error(&self, task: Task, message: impl Into<String>) {
        let error = ErrorStatus {
            task: task.label(),
            message: message.into(),
            at: Utc::now(),
        };
        self.update(|s| s.last_error = Some(error));
    }

    /// Ready means doing its job: capturing, or a standby that can reach the source (the
    /// lock loop says so), with a store whose last request succeeded.
    pub fn ready(&self) -> (bool, Role) {
        let s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let role_ok = match s.role {
            Role::Active => s.capturing,
            Role::Standby => true,
            Role::Starting | Role::Stopping => false,
        };
        (role_ok && s.storage.ok, s.role)
    }
}
