//! `restores/<time>-<random>.json`: one restore that ran — which tenant, into which database,
//! to which point. An audit trail for the operator, and the daemon's restore count. It holds no
//! tenant data beyond the tenant's id. `rewinds/<time>-<random>.json` likewise records each
//! rewind applied to the source.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Repository, RepositoryError, keys};
use crate::pg::Lsn;
use crate::storage::PutMode;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreRecord {
    pub tenant: String,
    pub database: String,
    pub snapshot: String,
    pub restore_point: RestorePoint,
    pub rows: u64,
    pub seconds: f64,
    pub finished_at: DateTime<Utc>,
}

/// A rewind applied to the source: who asked, to which point, what it changed, and the
/// snapshot of the tenant taken just before (what a rewind of the rewind restores).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RewindRecord {
    pub tenant: String,
    /// The instant asked for (`None`: the latest).
    pub to: Option<DateTime<Utc>>,
    pub restore_point: RestorePoint,
    pub snapshot_before: String,
    /// The operating-system user that ran it, and the database role that wrote.
    pub by: String,
    pub inserted: u64,
    pub deleted: u64,
    pub updated: u64,
    pub applied_at: DateTime<Utc>,
}

/// The last transaction a restore applied (its commit LSN and time): what the restored
/// database holds exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestorePoint {
    pub lsn: Lsn,
    pub time: DateTime<Utc>,
}

impl Repository {
    pub async fn put_restore_record(&self, record: &RestoreRecord) -> Result<(), RepositoryError> {
        self.put_record(keys::RESTORES_PREFIX, record.finished_at, record)
            .await
            .map(|_| ())
    }

    /// Returns the record's key.
    pub async fn put_rewind_record(
        &self,
        record: &RewindRecord,
    ) -> Result<String, RepositoryError> {
        self.put_record(keys::REWINDS_PREFIX, record.applied_at, record)
            .await
    }

    /// `<prefix><time>-<random>.json`, never overwriting: one object per event.
    async fn put_record(
        &self,
        prefix: &str,
        at: DateTime<Utc>,
        record: &impl Serialize,
    ) -> Result<String, RepositoryError> {
        let key = format!(
            "{prefix}{}-{:08x}.json",
            at.format("%Y%m%dT%H%M%S%.3fZ"),
            fastrand::u32(..)
        );
        let json = serde_json::to_vec_pretty(record).expect("a record always serializes");
        self.store()
            .put_bytes(&key, json.into(), PutMode::CreateNew)
            .await?;
        Ok(key)
    }

    /// How many restores are recorded (a listing, no reads).
    pub async fn restore_record_count(&self) -> Result<usize, RepositoryError> {
        Ok(self.store().list(keys::RESTORES_PREFIX).await?.len())
    }
}
