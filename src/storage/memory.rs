//! An in-memory [`ObjectStore`] for unit tests.
//!
//! Owns a sorted map of keys to immutable byte buffers behind a mutex. It follows the same
//! contract as the real backends (it passes the same conformance suite), so code tested against
//! it behaves the same on a directory or S3. It must never be used for a real repository: nothing
//! survives the process, and `put` necessarily holds whole objects in memory.

use std::collections::BTreeMap;
use std::ops::{Bound, Range};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::TryStreamExt;

use super::{
    ByteStream, ListPage, ObjectMeta, ObjectStore, PutMode, Result, StorageError, check_range,
    validate_key, validate_prefix,
};

/// `get` hands out the stored bytes in slices of this size, so that consumers are exercised with
/// multi-chunk streams as they would be by the real backends.
const GET_CHUNK: usize = 64 * 1024;

/// See the module documentation. Cloning shares the same objects.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    objects: Arc<Mutex<BTreeMap<String, Bytes>>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn objects(&self) -> MutexGuard<'_, BTreeMap<String, Bytes>> {
        // A panic while holding this lock cannot leave the map half-updated (every critical
        // section is a single map operation), so a poisoned lock is safe to keep using.
        self.objects.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl ObjectStore for MemoryStore {
    async fn put(&self, key: &str, body: ByteStream, mode: PutMode) -> Result<u64> {
        validate_key(key)?;
        if mode == PutMode::CreateNew && self.objects().contains_key(key) {
            return Err(StorageError::AlreadyExists {
                key: key.to_string(),
            });
        }
        // The object becomes visible only once the whole body has been read: a failing stream
        // returns here with nothing inserted.
        let value = body
            .try_fold(BytesMut::new(), |mut buf, chunk| async move {
                buf.extend_from_slice(&chunk);
                Ok(buf)
            })
            .await
            .map_err(|source| StorageError::io(key, source))?
            .freeze();
        let size = value.len() as u64;
        let mut objects = self.objects();
        if mode == PutMode::CreateNew && objects.contains_key(key) {
            return Err(StorageError::AlreadyExists {
                key: key.to_string(),
            });
        }
        objects.insert(key.to_string(), value);
        Ok(size)
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream> {
        validate_key(key)?;
        let value = self
            .objects()
            .get(key)
            .cloned()
            .ok_or_else(|| StorageError::NotFound {
                key: key.to_string(),
            })?;
        let range = range.unwrap_or(0..value.len() as u64);
        check_range(key, &range, value.len() as u64)?;
        // check_range bounded both ends by the length of an in-memory buffer, so they fit usize.
        let value = value.slice(range.start as usize..range.end as usize);
        let chunks: Vec<std::io::Result<Bytes>> = (0..value.len())
            .step_by(GET_CHUNK)
            .map(|start| Ok(value.slice(start..value.len().min(start + GET_CHUNK))))
            .collect();
        Ok(Box::pin(futures::stream::iter(chunks)))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        validate_key(key)?;
        Ok(self.objects().get(key).map(|value| ObjectMeta {
            key: key.to_string(),
            size: value.len() as u64,
        }))
    }

    async fn list_page(
        &self,
        prefix: &str,
        continuation: Option<String>,
        limit: usize,
    ) -> Result<ListPage> {
        validate_prefix(prefix)?;
        let limit = limit.max(1);
        // The token is the last key of the previous page; a token that sorts before the prefix
        // (not one this prefix produced) must not make the listing start outside it.
        let lower = match continuation {
            Some(last) if last.as_str() >= prefix => Bound::Excluded(last),
            _ => Bound::Included(prefix.to_string()),
        };
        let objects = self.objects();
        let mut page: Vec<ObjectMeta> = objects
            .range((lower, Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
            .take(limit + 1)
            .map(|(key, value)| ObjectMeta {
                key: key.clone(),
                size: value.len() as u64,
            })
            .collect();
        let next = if page.len() > limit {
            page.truncate(limit);
            page.last().map(|meta| meta.key.clone())
        } else {
            None
        };
        Ok(ListPage {
            objects: page,
            next,
        })
    }

    async fn delete(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        self.objects().remove(key);
        Ok(())
    }

    fn describe(&self) -> String {
        "memory (test store)".to_string()
    }
}
