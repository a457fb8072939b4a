//! Sealed objects: plaintext in, compressed + encrypted bytes streamed to the store, and back.
//!
//! Writing is a push API for async producers (COPY streams, pg_dump's stdout): plaintext goes
//! through the [`Sealer`] on the caller's task and ciphertext is handed to the store's `put`
//! through a small bounded channel, so memory stays bounded and no plaintext reaches disk.
//! Reading gives a blocking `Read` of the stored bytes, for parsing on a blocking thread.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::manifest::StoredObject;
use super::tenant_keys::Seal;
use super::{RepositoryError, Result};
use crate::codec::{SealedSummary, Sealer};
use crate::storage::{ObjectStore, PutMode, StorageError};

/// Ciphertext chunks in flight between the sealer and the store.
const CHANNEL_DEPTH: usize = 4;

enum Piece {
    Data(Bytes),
    End,
}

/// Dropping a writer without [`ObjectWriter::finish`] abandons the object.
pub struct ObjectWriter {
    key: String,
    /// `None` only while `finish` runs.
    sealer: Option<Sealer>,
    tx: mpsc::Sender<Piece>,
    put: JoinHandle<Result<u64, StorageError>>,
    sealed_to: Option<String>,
}

impl ObjectWriter {
    pub fn create(
        store: Arc<dyn ObjectStore>,
        key: String,
        seal: &Seal,
        level: i32,
    ) -> Result<Self> {
        let sealer = Sealer::new(&seal.recipients, level)?;
        let (tx, rx) = mpsc::channel::<Piece>(CHANNEL_DEPTH);
        // The body ends cleanly only after `Piece::End`; a writer dropped before `finish`
        // (an error elsewhere, a cancelled task) fails the upload, so the store never
        // makes a truncated object visible.
        let body = Box::pin(futures::stream::unfold(Some(rx), |rx| async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(Piece::Data(bytes)) => Some((Ok(bytes), Some(rx))),
                Some(Piece::End) => None,
                None => Some((
                    Err(io::Error::other("upload abandoned before it was finished")),
                    None,
                )),
            }
        }));
        let put_key = key.clone();
        let put = tokio::spawn(async move { store.put(&put_key, body, PutMode::CreateNew).await });
        Ok(Self {
            key,
            sealer: Some(sealer),
            tx,
            put,
            sealed_to: seal.sealed_to.clone(),
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub async fn write(&mut self, plaintext: &[u8]) -> Result<()> {
        let sealer = self.sealer.as_mut().expect("present until finish");
        sealer.write(plaintext)?;
        if let Some(chunk) = sealer.take_output() {
            self.send(chunk).await?;
        }
        Ok(())
    }

    async fn send(&mut self, chunk: Bytes) -> Result<()> {
        if self.tx.send(Piece::Data(chunk)).await.is_err() {
            // The upload ended early: its error says why.
            return Err(self.upload_error().await);
        }
        Ok(())
    }

    async fn upload_error(&mut self) -> RepositoryError {
        match (&mut self.put).await {
            Ok(Err(e)) => e.into(),
            Ok(Ok(_)) => RepositoryError::Archive {
                key: self.key.clone(),
                message: "upload ended before its data".into(),
            },
            Err(e) => RepositoryError::Archive {
                key: self.key.clone(),
                message: format!("upload task failed: {e}"),
            },
        }
    }

    /// Seals the object and waits until the store has it durably.
    pub async fn finish(self) -> Result<(StoredObject, SealedSummary)> {
        self.seal().await?.stored().await
    }

    /// Seals the object and hands its last bytes to the upload, freeing the encoder (a zstd
    /// context is megabytes): many objects can then wait for their uploads at once.
    pub async fn seal(mut self) -> Result<Upload> {
        let (rest, summary) = self.sealer.take().expect("present until finish").finish()?;
        if !rest.is_empty() {
            self.send(rest).await?;
        }
        if self.tx.send(Piece::End).await.is_err() {
            return Err(self.upload_error().await);
        }
        Ok(Upload {
            key: self.key,
            put: self.put,
            summary,
            sealed_to: self.sealed_to,
        })
    }
}

/// A sealed object on its way to the store.
pub struct Upload {
    key: String,
    put: JoinHandle<Result<u64, StorageError>>,
    summary: SealedSummary,
    sealed_to: Option<String>,
}

impl Upload {
    /// Waits until the store has the object durably.
    pub async fn stored(self) -> Result<(StoredObject, SealedSummary)> {
        let stored = match self.put.await {
            Ok(result) => result?,
            Err(e) => {
                return Err(RepositoryError::Archive {
                    key: self.key,
                    message: format!("upload task failed: {e}"),
                });
            }
        };
        debug_assert_eq!(stored, self.summary.stored_bytes);
        Ok((
            StoredObject {
                key: self.key,
                bytes: self.summary.stored_bytes,
                sha256: self.summary.sha256.clone(),
                sealed_to: self.sealed_to,
            },
            self.summary,
        ))
    }
}

/// A blocking reader of the stored bytes of `key` (or of a range of them); use it on a
/// blocking thread.
pub(super) async fn fetch_reader(
    store: &Arc<dyn ObjectStore>,
    key: &str,
    range: Option<std::ops::Range<u64>>,
) -> Result<impl io::Read + Send + use<>> {
    let stream = store.get(key, range).await?;
    let reader = tokio_util::io::StreamReader::new(stream.map_err(io::Error::other));
    Ok(tokio_util::io::SyncIoBridge::new(reader))
}

impl super::Repository {
    /// A new sealed object at `key` (zstd then age to `seal`'s recipients), streamed to the
    /// store as it is written; it becomes visible only when [`ObjectWriter::finish`] succeeds.
    pub fn object_writer(&self, key: String, seal: &Seal, level: i32) -> Result<ObjectWriter> {
        ObjectWriter::create(self.store().clone(), key, seal, level)
    }
}
