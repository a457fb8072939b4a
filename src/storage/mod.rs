//! Object storage: where the repository's bytes live.
//!
//! This module owns the [`ObjectStore`] contract and its backends (local directory, S3, memory).
//! It knows nothing of the repository format, encryption or tenants: keys are opaque
//! `/`-separated strings relative to the store's prefix, values are opaque bytes.
//!
//! # Contract (every backend passes the same conformance suite)
//! - `put` with [`PutMode::CreateNew`] stores an object only if the key is absent, atomically:
//!   a reader sees either no object or the whole object, never a prefix of it. A second
//!   `CreateNew` of the same key fails with [`StorageError::AlreadyExists`] and leaves the first
//!   object untouched. [`PutMode::Overwrite`] replaces atomically.
//! - `put` consumes a stream and never holds the whole object in memory (bounded by a part size).
//! - `put` whose body stream yields an error stores nothing: no object (and no prefix of one)
//!   becomes visible, and the error is returned.
//! - `get` streams an object, optionally a byte range `[start, end)`; a missing key is
//!   [`StorageError::NotFound`]. A range must lie within the object (`start <= end <= size`),
//!   otherwise [`StorageError::InvalidRange`]; a successful ranged `get` yields exactly
//!   `end - start` bytes or ends with an error, never silently short.
//! - `list_page` returns keys under a prefix in lexicographic (byte) order, at most `limit` a page
//!   (possibly fewer, even with more to come), with a continuation token; `list` follows the pages
//!   to the end. The prefix is a plain string prefix, not a directory: `a/b` matches `a/b/c` and
//!   `a/bc`. Tokens are opaque and only valid for the same store and prefix. Every key appears
//!   exactly once across the pages. One exception to the order: some S3-compatible servers
//!   (SeaweedFS) list in directory order, which differs from byte order only where a character
//!   sorting below `/` (such as `-` or `.`) follows a common prefix (`a-c` vs `a/b`); `list`
//!   sorts its result, so use it (or keep such keys apart) when the order matters.
//! - `delete` of a missing key succeeds (idempotent).
//! - Keys are checked by [`validate_key`], prefixes by [`validate_prefix`], in every backend.
//! - Transient failures (network, throttling, 5xx) are retried with backoff inside the backend;
//!   what surfaces is permanent or has exhausted its retries.

mod counted;
mod local;
mod memory;
mod s3;

use std::fmt::Debug;
use std::ops::Range;
use std::pin::Pin;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

pub use counted::{CountedStore, Requests};
pub use local::LocalStore;
pub use memory::MemoryStore;
pub use s3::{S3Settings, S3Store};

/// A stream of object bytes, as produced by `get` and consumed by `put`.
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send + 'static>>;

/// How `put` treats an existing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Fail with [`StorageError::AlreadyExists`] if the key exists (repository objects are immutable).
    CreateNew,
    /// Replace an existing object atomically.
    Overwrite,
}

/// What a listing or `head` tells about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
}

/// One page of a listing.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    pub objects: Vec<ObjectMeta>,
    /// Pass back to `list_page` to get the next page; `None` when this was the last.
    pub next: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("object {key} not found")]
    NotFound { key: String },
    #[error("object {key} already exists")]
    AlreadyExists { key: String },
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("byte range {start}..{end} is not within object {key} ({size} bytes)")]
    InvalidRange {
        key: String,
        start: u64,
        end: u64,
        size: u64,
    },
    #[error("storage I/O on {key}: {source}")]
    Io {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("S3 {operation} on {key}: {message}")]
    S3 {
        operation: &'static str,
        key: String,
        /// The HTTP status of the server's answer; `None` when there was none (connection
        /// refused, timeout) or the answer itself was unusable.
        status: Option<u16>,
        message: String,
    },
    #[error("storage configuration: {0}")]
    Config(String),
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

#[async_trait]
pub trait ObjectStore: Send + Sync + Debug {
    /// Stores `body` under `key` (see the module contract). Returns the number of bytes stored.
    async fn put(&self, key: &str, body: ByteStream, mode: PutMode) -> Result<u64>;
    /// Streams the object, or the byte range `[start, end)` of it.
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream>;
    /// The object's metadata, or `None` if absent.
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>>;
    /// One page of keys under `prefix`, in lexicographic order.
    async fn list_page(
        &self,
        prefix: &str,
        continuation: Option<String>,
        limit: usize,
    ) -> Result<ListPage>;
    /// Deletes the object; a missing key is not an error.
    async fn delete(&self, key: &str) -> Result<()>;
    /// A human-readable location for messages (never contains credentials).
    fn describe(&self) -> String;

    /// Every object under `prefix`, following pagination, in lexicographic order.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let mut out = Vec::new();
        let mut next = None;
        loop {
            let page = self.list_page(prefix, next, 1000).await?;
            out.extend(page.objects);
            match page.next {
                Some(token) => next = Some(token),
                None => break,
            }
        }
        // Already sorted except on servers listing in directory order (see the module contract).
        out.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Convenience: stores a small in-memory value.
    async fn put_bytes(&self, key: &str, value: Bytes, mode: PutMode) -> Result<u64> {
        self.put(
            key,
            Box::pin(futures::stream::once(async move { Ok(value) })),
            mode,
        )
        .await
    }

    /// Convenience: reads a whole small object into memory (manifests, repo.json, footers).
    async fn get_bytes(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes> {
        use futures::TryStreamExt;
        let mut stream = self.get(key, range).await?;
        let mut buf = bytes::BytesMut::new();
        while let Some(chunk) = stream.try_next().await.map_err(|source| StorageError::Io {
            key: key.to_string(),
            source,
        })? {
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }
}

/// Rejects keys that could escape the prefix or that backends disagree on.
///
/// Segments starting with `.` are reserved: besides `.` and `..`, the local directory backend
/// keeps its in-progress uploads under `.tmp/`, which must never be mistaken for an object.
pub fn validate_key(key: &str) -> Result<()> {
    let bad = |reason| {
        Err(StorageError::InvalidKey {
            key: key.to_string(),
            reason,
        })
    };
    if key.is_empty() {
        return bad("empty");
    }
    if key.starts_with('/') || key.ends_with('/') {
        return bad("leading or trailing '/'");
    }
    if key.split('/').any(str::is_empty) {
        return bad("empty path segment");
    }
    if key.split('/').any(|part| part.starts_with('.')) {
        return bad("path segment starting with '.' (reserved)");
    }
    if key.chars().any(|c| c.is_control() || c == '\\') {
        return bad("control character or backslash");
    }
    Ok(())
}

/// Rejects listing prefixes that no valid key could start with in a way backends would disagree
/// on. The empty prefix (everything) is valid; a prefix may end in the middle of a segment
/// (`snapshots/2026`) or at a `/` (`snapshots/`).
pub fn validate_prefix(prefix: &str) -> Result<()> {
    let bad = |reason| {
        Err(StorageError::InvalidKey {
            key: prefix.to_string(),
            reason,
        })
    };
    if prefix.is_empty() {
        return Ok(());
    }
    if prefix.starts_with('/') {
        return bad("leading '/' in prefix");
    }
    if prefix.chars().any(|c| c.is_control() || c == '\\') {
        return bad("control character or backslash in prefix");
    }
    // Every complete segment must be one a key could have; the last, possibly partial, segment
    // only must not start with '.' (no valid key has such a segment).
    let mut segments = prefix.split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if (!last && segment.is_empty()) || segment.starts_with('.') {
            return bad("empty or '.'-prefixed segment in prefix");
        }
    }
    Ok(())
}

/// Checks `range` against an object of `size` bytes (see the module contract for `get`).
pub(crate) fn check_range(key: &str, range: &Range<u64>, size: u64) -> Result<()> {
    if range.start > range.end || range.end > size {
        return Err(StorageError::InvalidRange {
            key: key.to_string(),
            start: range.start,
            end: range.end,
            size,
        });
    }
    Ok(())
}

impl StorageError {
    pub(crate) fn io(key: &str, source: std::io::Error) -> Self {
        StorageError::Io {
            key: key.to_string(),
            source,
        }
    }
}

/// The store a configuration names: a local directory or an S3 bucket prefix.
pub async fn open(
    location: &crate::config::StorageLocation,
    config: &crate::config::StorageConfig,
) -> Result<std::sync::Arc<dyn ObjectStore>> {
    use crate::config::StorageLocation;
    Ok(match location {
        StorageLocation::Directory(path) => std::sync::Arc::new(LocalStore::new(path.clone())),
        StorageLocation::S3 { bucket, prefix } => std::sync::Arc::new(
            S3Store::new(S3Settings {
                bucket: bucket.clone(),
                prefix: prefix.clone(),
                endpoint: config.s3_endpoint.clone(),
                region: config.s3_region.clone(),
                force_path_style: config.s3_force_path_style,
            })
            .await?,
        ),
    })
}

impl crate::retry::Classify for StorageError {
    fn class(&self) -> crate::retry::ErrorClass {
        use crate::retry::ErrorClass;
        match self {
            StorageError::Config(_) => ErrorClass::Usage,
            // The store's state may change by itself: a disk with room again, a server back.
            StorageError::Io { .. } => ErrorClass::Transient,
            // Without an answer, or with one saying "later" (timeouts, throttling, 5xx); a
            // refused request (credentials, policy, a missing bucket) is asked again in vain.
            StorageError::S3 { status, .. } => match status {
                None | Some(408 | 429 | 500..) => ErrorClass::Transient,
                Some(_) => ErrorClass::Permanent,
            },
            StorageError::NotFound { .. }
            | StorageError::AlreadyExists { .. }
            | StorageError::InvalidKey { .. }
            | StorageError::InvalidRange { .. } => ErrorClass::Permanent,
        }
    }
}
