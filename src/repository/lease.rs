//! `locks/daemon.json`: which daemon instance is active. Advisory — the PostgreSQL advisory lock
//! is the real mutual exclusion — but an active instance that finds another name here stops
//! capturing at once.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Repository, RepositoryError, keys};
use crate::storage::{PutMode, StorageError};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lease {
    pub instance: String,
    pub slot: String,
    pub acquired_at: DateTime<Utc>,
    pub renewed_at: DateTime<Utc>,
}

impl Repository {
    /// The lease, `None` when absent or unreadable (a half-written lease names nobody).
    pub async fn lease(&self) -> Result<Option<Lease>, RepositoryError> {
        match self.store().get_bytes(keys::LEASE, None).await {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(StorageError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn put_lease(&self, lease: &Lease) -> Result<(), RepositoryError> {
        let json = serde_json::to_vec_pretty(lease).expect("a lease always serializes");
        self.store()
            .put_bytes(keys::LEASE, json.into(), PutMode::Overwrite)
            .await?;
        Ok(())
    }

    pub async fn delete_lease(&self) -> Result<(), RepositoryError> {
        self.store().delete(keys::LEASE).await?;
        Ok(())
    }
}
