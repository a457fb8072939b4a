//! A store that counts the requests made through it: what a command cost in requests (which
//! S3 bills), reported by `restore`.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use serde::Serialize;

use super::{ByteStream, ListPage, ObjectMeta, ObjectStore, PutMode, Result};

/// Requests made, by kind (a listing counts one per page).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Requests {
    pub get: u64,
    pub list: u64,
    pub head: u64,
    pub put: u64,
    pub delete: u64,
}

impl Requests {
    pub fn total(&self) -> u64 {
        self.get + self.list + self.head + self.put + self.delete
    }
}

#[derive(Debug)]
pub struct CountedStore {
    inner: Arc<dyn ObjectStore>,
    counts: [AtomicU64; 5],
}

const GET: usize = 0;
const LIST: usize = 1;
const HEAD: usize = 2;
const PUT: usize = 3;
const DELETE: usize = 4;

impl CountedStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self {
            inner,
            counts: Default::default(),
        }
    }

    pub fn requests(&self) -> Requests {
        let n = |i: usize| self.counts[i].load(Ordering::Relaxed);
        Requests {
            get: n(GET),
            list: n(LIST),
            head: n(HEAD),
            put: n(PUT),
            delete: n(DELETE),
        }
    }

    fn count(&self, kind: usize) {
        self.counts[kind].fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl ObjectStore for CountedStore {
    async fn put(&self, key: &str, body: ByteStream, mode: PutMode) -> Result<u64> {
        self.count(PUT);
        self.inner.put(key, body, mode).await
    }
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream> {
        self.count(GET);
        self.inner.get(key, range).await
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        self.count(HEAD);
        self.inner.head(key).await
    }
    async fn list_page(
        &self,
        prefix: &str,
        continuation: Option<String>,
        limit: usize,
    ) -> Result<ListPage> {
        self.count(LIST);
        self.inner.list_page(prefix, continuation, limit).await
    }
    async fn delete(&self, key: &str) -> Result<()> {
        self.count(DELETE);
        self.inner.delete(key).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStore;

    #[tokio::test]
    async fn every_request_is_counted_by_kind() {
        let store = CountedStore::new(Arc::new(MemoryStore::new()));
        store
            .put_bytes("a", bytes::Bytes::from_static(b"x"), PutMode::CreateNew)
            .await
            .unwrap();
        store.get_bytes("a", None).await.unwrap();
        store.get_bytes("a", Some(0..1)).await.unwrap();
        store.list("").await.unwrap();
        store.head("a").await.unwrap();
        store.delete("a").await.unwrap();
        let r = store.requests();
        assert_eq!((r.get, r.list, r.head, r.put, r.delete), (2, 1, 1, 1, 1));
        assert_eq!(r.total(), 6);
    }
}
