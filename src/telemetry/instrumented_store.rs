//! An object store that times every request and counts failures for the daemon's metrics and
//! `/status` (whether the store is reachable). Wraps the configured store; the CLI's one-shot
//! commands do without it.

use std::fmt::Debug;
use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use super::{ErrorStatus, StorageOp, Telemetry};
use crate::storage::{
    ByteStream, ListPage, ObjectMeta, ObjectStore, PutMode, Result, StorageError,
};

#[derive(Debug)]
pub struct InstrumentedStore {
    inner: Arc<dyn ObjectStore>,
    telemetry: Arc<Telemetry>,
}

impl InstrumentedStore {
    pub fn new(inner: Arc<dyn ObjectStore>, telemetry: Arc<Telemetry>) -> Self {
        Self { inner, telemetry }
    }

    async fn timed<T>(&self, op: StorageOp, request: impl Future<Output = Result<T>>) -> Result<T> {
        let started = Instant::now();
        let result = request.await;
        let metrics = &self.telemetry.metrics;
        metrics
            .storage_duration(op)
            .observe(started.elapsed().as_secs_f64());
        match &result {
            // Absent and present-already are answers, not failures of the store.
            Ok(_) | Err(StorageError::NotFound { .. } | StorageError::AlreadyExists { .. }) => {
                self.telemetry.update(|s| s.storage.ok = true);
            }
            Err(e) => {
                metrics.storage_errors(op).inc();
                let error = ErrorStatus {
                    task: op.label(),
                    message: e.to_string(),
                    at: chrono::Utc::now(),
                };
                self.telemetry.update(|s| {
                    s.storage.ok = false;
                    s.storage.last_error = Some(error);
                });
            }
        }
        result
    }
}

#[async_trait]
impl ObjectStore for InstrumentedStore {
    async fn put(&self, key: &str, body: ByteStream, mode: PutMode) -> Result<u64> {
        self.timed(StorageOp::Put, self.inner.put(key, body, mode))
            .await
    }
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream> {
        self.timed(StorageOp::Get, self.inner.get(key, range)).await
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        self.timed(StorageOp::Head, self.inner.head(key)).await
    }
    async fn list_page(
        &self,
        prefix: &str,
        continuation: Option<String>,
        limit: usize,
    ) -> Result<ListPage> {
        self.timed(
            StorageOp::List,
            self.inner.list_page(prefix, continuation, limit),
        )
        .await
    }
    async fn delete(&self, key: &str) -> Result<()> {
        self.timed(StorageOp::Delete, self.inner.delete(key)).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}
