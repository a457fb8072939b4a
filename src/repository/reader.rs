//! Reading sealed objects back: digest check, decryption, archive parsing — on a blocking
//! thread, with events handed to async code through a bounded channel (bounded memory).
//!
//! Every read checks three things: the stored bytes' SHA-256 against the manifest (catches a
//! modified, truncated or swapped object without the key), age's authentication of every
//! chunk, and the archive header against what the manifest says the object is (snapshot,
//! kind, tenant), so that another tenant's or another snapshot's archive cannot pass.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::archive::{ArchiveEvent, ArchiveHeader, ArchiveReader};
use super::manifest::{Manifest, Part, StoredObject};
use super::object::fetch_reader;
use super::{Repository, RepositoryError, Result};
use crate::codec::{CodecError, HashingReader, Identities, classify_read_error, open_recorded};
use crate::storage::ObjectStore;

/// Channel depth for archive events (each at most one data record, ~1 MiB).
const EVENTS_IN_FLIGHT: usize = 4;

/// Streams the events of an archive whose header must equal `expect`. The last item is an
/// error if anything is wrong, including a digest mismatch found at the very end — so a
/// consumer must treat its work as provisional until the channel closes without error.
async fn stream_archive(
    store: &Arc<dyn ObjectStore>,
    object: &StoredObject,
    identities: Arc<Identities>,
    expect: ArchiveHeader,
) -> Result<mpsc::Receiver<Result<ArchiveEvent>>> {
    let reader = fetch_reader(store, &object.key, None).await?;
    let (tx, rx) = mpsc::channel(EVENTS_IN_FLIGHT);
    let object = object.clone();
    tokio::task::spawn_blocking(move || {
        let result = read_archive(reader, &object, &identities, &expect, &tx);
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(e));
        }
    });
    Ok(rx)
}

fn read_archive(
    reader: impl Read,
    object: &StoredObject,
    identities: &Identities,
    expect: &ArchiveHeader,
    tx: &mpsc::Sender<Result<ArchiveEvent>>,
) -> Result<()> {
    let archive_error = |message: String| RepositoryError::Archive {
        key: object.key.clone(),
        message,
    };
    let mut hashing = HashingReader::new(reader);
    {
        let plain = open_recorded(&mut hashing, identities, object.sealed_to.as_deref())
            .map_err(|source| object_error(object, source))?;
        let mut archive = ArchiveReader::open(plain).map_err(archive_error)?;
        if archive.header() != expect {
            return Err(archive_error(format!(
                "archive says it is {:?}, the manifest expects {:?}: the object was swapped",
                archive.header(),
                expect
            )));
        }
        while let Some(event) = archive.next_event().map_err(|m| io_aware(m, &object.key))? {
            if tx.blocking_send(Ok(event)).is_err() {
                return Ok(()); // the consumer stopped (its own error), nothing left to check
            }
        }
    }
    // Drain whatever the decoders did not need, so the digest covers every stored byte.
    std::io::copy(&mut hashing, &mut std::io::sink())
        .map_err(|e| object_error(object, classify_read_error(e)))?;
    check_digest(object, &hashing)
}

fn object_error(object: &StoredObject, source: CodecError) -> RepositoryError {
    RepositoryError::Object {
        key: object.key.clone(),
        source,
    }
}

/// Decryption errors surface from `read` as io errors inside the archive parser's messages.
fn io_aware(message: String, key: &str) -> RepositoryError {
    RepositoryError::Archive {
        key: key.into(),
        message: format!("{message} (damaged, truncated or tampered object)"),
    }
}

fn check_digest<R: Read>(object: &StoredObject, hashing: &HashingReader<R>) -> Result<()> {
    let (bytes, sha256) = hashing.digest();
    if bytes != object.bytes || sha256 != object.sha256 {
        return Err(RepositoryError::DigestMismatch {
            key: object.key.clone(),
            expected: object.sha256.clone(),
            found: sha256,
            expected_bytes: object.bytes,
            found_bytes: bytes,
        });
    }
    Ok(())
}

/// Reads a whole (small) sealed object into memory after checking it: the schema dump.
async fn read_sealed(
    store: &Arc<dyn ObjectStore>,
    object: &StoredObject,
    identities: Arc<Identities>,
) -> Result<Vec<u8>> {
    let reader = fetch_reader(store, &object.key, None).await?;
    let object = object.clone();
    tokio::task::spawn_blocking(move || {
        let mut hashing = HashingReader::new(reader);
        let mut plain = Vec::new();
        let fail = |e| object_error(&object, e);
        open_recorded(&mut hashing, &identities, object.sealed_to.as_deref())
            .map_err(fail)?
            .read_to_end(&mut plain)
            .map_err(|e| fail(classify_read_error(e)))?;
        std::io::copy(&mut hashing, &mut std::io::sink())
            .map_err(|e| fail(classify_read_error(e)))?;
        check_digest(&object, &hashing)?;
        Ok(plain)
    })
    .await
    .map_err(|e| RepositoryError::Archive {
        key: "(reader)".into(),
        message: e.to_string(),
    })?
}

/// Checks an object's stored bytes against its digest, without decrypting.
async fn verify_digest(store: &Arc<dyn ObjectStore>, object: &StoredObject) -> Result<()> {
    let reader = fetch_reader(store, &object.key, None).await?;
    let object = object.clone();
    tokio::task::spawn_blocking(move || {
        let mut hashing = HashingReader::new(reader);
        std::io::copy(&mut hashing, &mut std::io::sink())
            .map_err(|e| object_error(&object, e.into()))?;
        check_digest(&object, &hashing)
    })
    .await
    .map_err(|e| RepositoryError::Archive {
        key: "(reader)".into(),
        message: e.to_string(),
    })?
}

/// Decrypts and parses a whole archive; returns its rows per table (`schema.table`).
async fn verify_archive(
    store: &Arc<dyn ObjectStore>,
    object: &StoredObject,
    identities: Arc<Identities>,
    expect: ArchiveHeader,
) -> Result<BTreeMap<String, u64>> {
    let mut events = stream_archive(store, object, identities, expect).await?;
    let mut rows = BTreeMap::new();
    let mut current: Option<(String, super::copy_binary::CopyChecker)> = None;
    let damaged = |message: String| RepositoryError::Archive {
        key: object.key.clone(),
        message,
    };
    while let Some(event) = events.recv().await {
        match event? {
            ArchiveEvent::Table(t) => {
                current = Some((
                    format!("{}.{}", t.schema, t.name),
                    super::copy_binary::CopyChecker::new(t.format),
                ));
            }
            ArchiveEvent::Data(bytes) => {
                let (name, checker) = current
                    .as_mut()
                    .ok_or_else(|| damaged("data outside a table".into()))?;
                checker
                    .feed(&bytes)
                    .map_err(|m| damaged(format!("{name}: {m}")))?;
            }
            ArchiveEvent::TableEnd { rows: recorded } => {
                let (name, checker) = current
                    .take()
                    .ok_or_else(|| damaged("table end outside a table".into()))?;
                if !checker.is_complete() || checker.rows() != recorded {
                    return Err(damaged(format!(
                        "{name}: COPY data holds {} rows, the archive records {recorded}",
                        checker.rows()
                    )));
                }
                rows.insert(name, recorded);
            }
        }
    }
    Ok(rows)
}

/// Checks one part of a snapshot. Without identities: the stored bytes against the manifest's
/// digest. With them: also decrypts and parses it, and an archive must hold exactly the rows
/// the manifest records.
async fn check_part(
    store: &Arc<dyn ObjectStore>,
    manifest: &Manifest,
    part: Part<'_>,
    identities: Option<Arc<Identities>>,
) -> Result<()> {
    let object = manifest
        .object(part)
        .ok_or_else(|| RepositoryError::Malformed {
            key: super::keys::manifest(&manifest.id),
            message: format!("has no {part:?}"),
        })?;
    let Some(identities) = identities else {
        return verify_digest(store, object).await;
    };
    let Some((entry, header)) = manifest.archive(part) else {
        return read_sealed(store, object, identities).await.map(drop);
    };
    let rows = verify_archive(store, object, identities, header).await?;
    if rows != entry.rows {
        return Err(RepositoryError::Archive {
            key: object.key.clone(),
            message: format!("holds rows {rows:?}, the manifest records {:?}", entry.rows),
        });
    }
    Ok(())
}

impl Repository {
    /// Streams the events of an archive whose header must equal `expect`. The last item is an
    /// error if anything is wrong, including a digest mismatch found at the very end — so a
    /// consumer must treat its work as provisional until the channel closes without error.
    pub async fn archive_events(
        &self,
        object: &StoredObject,
        identities: Arc<Identities>,
        expect: ArchiveHeader,
    ) -> Result<mpsc::Receiver<Result<ArchiveEvent>>> {
        stream_archive(self.store(), object, identities, expect).await
    }

    /// A whole (small) sealed object, checked: the schema dump.
    pub async fn read_sealed(
        &self,
        object: &StoredObject,
        identities: Arc<Identities>,
    ) -> Result<Vec<u8>> {
        read_sealed(self.store(), object, identities).await
    }

    /// Checks one part of a snapshot. Without identities: the stored bytes against the
    /// manifest's digest. With them: also decrypts and parses it, and an archive must hold
    /// exactly the rows the manifest records.
    pub async fn check_part(
        &self,
        manifest: &Manifest,
        part: Part<'_>,
        identities: Option<Arc<Identities>>,
    ) -> Result<()> {
        check_part(self.store(), manifest, part, identities).await
    }
}
