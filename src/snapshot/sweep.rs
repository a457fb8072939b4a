//! The sweep: every tenant but the largest exported by one pass over each table.
//!
//! A [`Job::Scatter`](super::plan::Job) runs one `COPY` of a tenant table with its route
//! joined once ([`Catalog::sweep_query`]); its rows, cut by tenant ([`Splitter`]), are appended
//! to the scratch partition of their tenant: consecutive tenants, in frames sealed one by one
//! (ChaCha20-Poly1305, a key made for the snapshot and held only in memory: no plaintext tenant
//! data on local disk) in an unlinked file. Every tenant's bytes are counted as they pass.
//! Once every table is scattered, a [`Job::Gather`](super::plan::Job) reads one partition back,
//! gathers its rows by table and tenant in memory, and writes each tenant's archive exactly as a
//! tenant exported alone would have it.
//!
//! Memory: frame buffers (at most [`FRAME_MEMORY`] per worker whatever the number of
//! partitions) and one gathered group of tenants. A partition whose counted bytes would not
//! fit is gathered in several passes over its file, a group of tenants each; a tenant that
//! alone would not fit is exported with its own statements. Counts are exact: nothing is
//! estimated here.
//!
//! [`Catalog::sweep_query`]: crate::source::catalog::Catalog::sweep_query

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use bytes::BytesMut;
use chacha20poly1305::aead::{AeadInPlace, KeyInit, OsRng};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use futures::stream::FuturesUnordered;
use futures::{StreamExt, pin_mut};
use tokio_postgres::Client;

use super::plan::{Division, Slice};
use super::runs::{self, BINARY_HEADER, BINARY_TRAILER, Gather, RunReader, Splitter};
use super::{Exporter, SnapshotError, flush_data, table_header};
use crate::pg::sqlstate;
use crate::repository::archive::{self, ArchiveKind};
use crate::repository::copy_binary::CopyFormat;
use crate::repository::manifest::ArchiveEntry;
use crate::repository::{RepositoryError, keys};
use crate::scratch::anonymous_file;
use crate::source::catalog::Table;

/// What one worker's frame buffers may hold during a scatter, shared by the partitions.
pub const FRAME_MEMORY: usize = 8 << 20;
/// A frame never waits for more than this.
const FRAME_BYTES: usize = 64 << 10;
/// Nor is it cut smaller than this (more partitions then cost more than the budget).
const MIN_FRAME_BYTES: usize = 4 << 10;
/// Scratch frames are compressed fast: a fifth of the bytes to seal, write and read back.
const SCRATCH_LEVEL: i32 = 1;
/// What a gathered tenant's table costs besides its rows (a buffer's smallest size).
const PER_RUN: u64 = 256;

/// The swept tenants, their partitions, and what was scattered into them.
pub struct Sweep {
    division: Division,
    /// A tenant's value as binary COPY sends it → its index in `division.swept`.
    binary: HashMap<Vec<u8>, u32>,
    /// The same as text COPY escapes it, where escaping changes a value.
    text: Option<HashMap<Vec<u8>, u32>>,
    /// Partition of each swept tenant.
    partition_of: Vec<u32>,
    partitions: Vec<Mutex<Partition>>,
    /// COPY bytes of each swept tenant's rows (without the tenant field), all tables.
    bytes: Mutex<Vec<u64>>,
    /// Slices to scatter, and those done with the COPY bytes they read.
    slices: usize,
    scattered: Mutex<(usize, u64)>,
    cipher: ChaCha20Poly1305,
}

struct Partition {
    file: Option<File>,
    /// Frames written: the next one's nonce.
    frames: u64,
    /// Bytes written (the next frame's offset).
    end: u64,
}

impl std::fmt::Debug for Sweep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sweep")
            .field("tenants", &self.division.swept.len())
            .field("partitions", &self.partitions.len())
            .finish()
    }
}

impl Sweep {
    /// Opens a scratch file per partition of `division` in `dir`, for `slices` to scatter.
    pub fn new(division: Division, slices: usize, dir: &std::path::Path) -> std::io::Result<Self> {
        let mut binary = HashMap::with_capacity(division.swept.len());
        let mut text = HashMap::new();
        let mut escaped = false;
        for (i, tenant) in division.swept.iter().enumerate() {
            let field = runs::text_field(tenant);
            escaped |= field != tenant.as_bytes();
            binary.insert(tenant.as_bytes().to_vec(), i as u32);
            text.insert(field, i as u32);
        }
        let mut partition_of = vec![0; division.swept.len()];
        let mut partitions = Vec::with_capacity(division.partitions());
        for (p, range) in division.bounds.windows(2).enumerate() {
            partition_of[range[0]..range[1]].fill(p as u32);
            partitions.push(Mutex::new(Partition {
                file: Some(anonymous_file(dir, "sweep")?),
                frames: 0,
                end: 0,
            }));
        }
        Ok(Self {
            bytes: Mutex::new(vec![0; division.swept.len()]),
            slices,
            scattered: Mutex::new((0, 0)),
            division,
            binary,
            text: escaped.then_some(text),
            partition_of,
            partitions,
            cipher: ChaCha20Poly1305::new(&ChaCha20Poly1305::generate_key(&mut OsRng)),
        })
    }

    fn index(&self, format: CopyFormat) -> &HashMap<Vec<u8>, u32> {
        match (format, &self.text) {
            (CopyFormat::Text, Some(text)) => text,
            _ => &self.binary,
        }
    }

    fn nonce(partition: usize, frame: u64) -> Nonce {
        let mut nonce = [0u8; 12];
        nonce[..4].copy_from_slice(&(partition as u32).to_le_bytes());
        nonce[4..].copy_from_slice(&frame.to_le_bytes());
        nonce.into()
    }

    /// Compresses and seals `frame` (emptied) and appends it to `partition`'s file.
    fn append(&self, partition: usize, frame: &mut Vec<u8>) -> Result<(), String> {
        let mut sealed = zstd::bulk::compress(frame, SCRATCH_LEVEL)
            .map_err(|e| format!("compressing a scratch frame: {e}"))?;
        let raw = frame.len() as u32;
        frame.clear();
        let mut state = lock(&self.partitions[partition]);
        self.cipher
            .encrypt_in_place(&Self::nonce(partition, state.frames), b"", &mut sealed)
            .map_err(|_| "sealing a scratch frame failed".to_string())?;
        let file = state.file.as_mut().ok_or("partition already gathered")?;
        let write = (|| {
            file.write_all(&(sealed.len() as u32).to_le_bytes())?;
            file.write_all(&raw.to_le_bytes())?;
            file.write_all(&sealed)
        })();
        write.map_err(|e| format!("writing a scratch file: {e}"))?;
        state.frames += 1;
        state.end += 8 + sealed.len() as u64;
        Ok(())
    }

    /// Calls `record(table, tenant, row)` for every row scattered into `partition`, frame by
    /// frame in the order they were written (`tenant`: its index in `division.swept`).
    fn read(
        &self,
        partition: usize,
        mut record: impl FnMut(u32, u32, &[u8]) -> Result<(), String>,
    ) -> Result<(), String> {
        let state = lock(&self.partitions[partition]);
        let file = state.file.as_ref().ok_or("partition already gathered")?;
        let first = self.division.bounds[partition] as u32;
        let broken = || "a scratch frame is truncated".to_string();
        let (mut at, mut frame, mut sealed) = (0u64, 0u64, Vec::new());
        while at < state.end {
            let mut head = [0u8; 8];
            file.read_exact_at(&mut head, at)
                .map_err(|e| format!("reading a scratch file: {e}"))?;
            let (len, raw) = head.split_at(4);
            sealed.resize(u32::from_le_bytes(len.try_into().unwrap()) as usize, 0);
            file.read_exact_at(&mut sealed, at + 8)
                .map_err(|e| format!("reading a scratch file: {e}"))?;
            at += 8 + sealed.len() as u64;
            self.cipher
                .decrypt_in_place(&Self::nonce(partition, frame), b"", &mut sealed)
                .map_err(|_| "a scratch frame does not open with its key (changed on disk?)")?;
            frame += 1;
            let buf = zstd::bulk::decompress(
                &sealed,
                u32::from_le_bytes(raw.try_into().unwrap()) as usize,
            )
            .map_err(|e| format!("a scratch frame does not decompress: {e}"))?;
            let table = u32::from_le_bytes(buf.get(..4).ok_or_else(broken)?.try_into().unwrap());
            let mut rest = &buf[4..];
            while !rest.is_empty() {
                let head = rest.get(..8).ok_or_else(broken)?;
                let tenant = u32::from_le_bytes(head[..4].try_into().unwrap());
                let len = u32::from_le_bytes(head[4..].try_into().unwrap()) as usize;
                let row = rest.get(8..8 + len).ok_or_else(broken)?;
                record(table, first + tenant, row)?;
                rest = &rest[8 + len..];
            }
        }
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Exporter {
    fn sweep(&self) -> &Sweep {
        self.sweep
            .as_ref()
            .expect("sweep jobs only exist with a sweep")
    }

    /// One tenant table's rows of every swept tenant, scattered into the partitions.
    pub(super) async fn scatter(&self, client: &Client, slice: Slice) -> Result<(), SnapshotError> {
        let sweep = self.sweep();
        let table_index = slice.table;
        let table = self
            .catalog
            .tenant_tables()
            .nth(table_index)
            .expect("a tenant table");
        let fail = |message: String| SnapshotError::Export {
            table: table.qualified(),
            message,
        };
        let format = table.copy_format();
        let index = sweep.index(format);
        let partitions = sweep.partitions.len();
        let frame_bytes = (FRAME_MEMORY / partitions).clamp(MIN_FRAME_BYTES, FRAME_BYTES);
        let mut frames: Vec<Vec<u8>> = vec![Vec::new(); partitions];
        let mut counted: HashMap<u32, u64> = HashMap::new();
        let query = self
            .catalog
            .sweep_query(
                table,
                &sweep.division.alone,
                (slice != Slice::whole(table_index)).then_some((slice.from_block, slice.to_block)),
            )
            .expect("tenant tables have a route");
        let sql = format!("COPY ({query}) TO STDOUT (FORMAT {})", format.sql());
        let stream = client
            .copy_out(&sql)
            .await
            .map_err(|e| fail(sqlstate::describe(&e)))?;
        pin_mut!(stream);
        let mut splitter = Splitter::new(format);
        // Rows of one tenant usually come together: its lookup is kept.
        let mut current: Option<(Vec<u8>, u32)> = None;
        let mut total = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| fail(sqlstate::describe(&e)))?;
            splitter
                .feed(&chunk, |tenant, pieces| {
                    let i = match &current {
                        Some((value, i)) if value == tenant => *i,
                        _ => {
                            let i = *index.get(tenant).ok_or_else(|| {
                                format!(
                                    "a row of tenant {:?}, which was not listed in the snapshot",
                                    String::from_utf8_lossy(tenant)
                                )
                            })?;
                            current = Some((tenant.to_vec(), i));
                            i
                        }
                    };
                    let p = sweep.partition_of[i as usize] as usize;
                    let len: usize = pieces.iter().map(|p| p.len()).sum();
                    let frame = &mut frames[p];
                    if frame.is_empty() {
                        frame.reserve(frame_bytes + 16);
                        frame.extend_from_slice(&(table_index as u32).to_le_bytes());
                    }
                    let first = sweep.division.bounds[p] as u32;
                    let row_len = u32::try_from(len).map_err(|_| "a row of 4 GiB or more")?;
                    frame.extend_from_slice(&(i - first).to_le_bytes());
                    frame.extend_from_slice(&row_len.to_le_bytes());
                    for piece in pieces {
                        frame.extend_from_slice(piece);
                    }
                    *counted.entry(i).or_default() += len as u64;
                    total += len as u64;
                    if frame.len() >= frame_bytes {
                        sweep.append(p, frame)?;
                        if frame.capacity() > 4 * frame_bytes {
                            // A huge row passed: its room is not kept for small ones.
                            *frame = Vec::new();
                        }
                    }
                    Ok(())
                })
                .map_err(&fail)?;
        }
        splitter.finish().map_err(&fail)?;
        for (p, frame) in frames.iter_mut().enumerate() {
            if !frame.is_empty() {
                sweep.append(p, frame).map_err(&fail)?;
            }
        }
        let mut bytes = lock(&sweep.bytes);
        for (i, n) in counted {
            bytes[i as usize] += n;
        }
        drop(bytes);
        let (slices, read) = {
            let mut scattered = lock(&sweep.scattered);
            scattered.0 += 1;
            scattered.1 += total;
            *scattered
        };
        self.progress.status(format!(
            "tables read: {slices}/{} slices, {:.1} MiB",
            sweep.slices,
            read as f64 / f64::from(1 << 20)
        ));
        tracing::debug!(table = %table.qualified(), from_block = slice.from_block, to_block = ?slice.to_block, copy_bytes = total, "table scattered");
        Ok(())
    }

    /// One partition's tenants: gathered from the scratch a group at a time (as many as
    /// memory holds, by their counted bytes) and written as archives. A tenant that alone
    /// would not fit is exported with its own statements.
    pub(super) async fn gather(
        &self,
        client: &Client,
        partition: usize,
    ) -> Result<Vec<(Option<String>, ArchiveEntry)>, SnapshotError> {
        let sweep = self.sweep();
        let tables: Vec<&Table> = self.catalog.tenant_tables().collect();
        let (start, end) = (
            sweep.division.bounds[partition],
            sweep.division.bounds[partition + 1],
        );
        let bytes: Vec<u64> = lock(&sweep.bytes)[start..end].to_vec();
        let memory = self.run_memory as u64;
        // What gathering a tenant may take: its buffers grow by doubling.
        let cost = |b: u64| 2 * b + PER_RUN * tables.len() as u64;
        let started = std::time::Instant::now();
        let (mut passes, mut alone) = (0, 0);
        let mut done = Vec::with_capacity(end - start);
        let mut at = start;
        while at < end {
            if cost(bytes[at - start]) > memory {
                let tenant = sweep.division.swept[at].clone();
                tracing::debug!(%tenant, bytes = bytes[at - start], "a swept tenant larger than memory: exported alone");
                done.push(self.export_archive(client, Some(&tenant)).await?);
                alone += 1;
                at += 1;
                continue;
            }
            let mut group_end = at;
            let mut total = 0;
            while group_end < end && total + cost(bytes[group_end - start]) <= memory {
                total += cost(bytes[group_end - start]);
                group_end += 1;
            }
            done.extend(self.gather_group(partition, at, group_end, &tables).await?);
            passes += 1;
            at = group_end;
        }
        // The partition's file is closed (its space freed) once read.
        lock(&sweep.partitions[partition]).file = None;
        tracing::debug!(
            partition,
            tenants = end - start,
            copy_bytes = bytes.iter().sum::<u64>(),
            passes,
            alone,
            seconds = started.elapsed().as_secs_f64(),
            "partition gathered"
        );
        Ok(done)
    }

    /// Tenants `start..end` of the sweep (all of one partition), gathered in one pass over its
    /// file and written as archives.
    async fn gather_group(
        &self,
        partition: usize,
        start: usize,
        end: usize,
        tables: &[&Table],
    ) -> Result<Vec<(Option<String>, ArchiveEntry)>, SnapshotError> {
        let sweep = self.sweep();
        let mut memory = self.run_memory;
        let mut gathers: Vec<Gather> = tables.iter().map(|_| Gather::new(end - start)).collect();
        sweep
            .read(partition, |table, tenant, row| {
                let tenant = tenant as usize;
                if !(start..end).contains(&tenant) {
                    return Ok(());
                }
                let gather = gathers
                    .get_mut(table as usize)
                    .ok_or("a scratch frame names no table")?;
                if gather.push((tenant - start) as u32, &[row], &mut memory) {
                    Ok(())
                } else {
                    Err("a partition's rows outgrew their counted bytes".into())
                }
            })
            .map_err(|message| SnapshotError::Export {
                table: "(sweep)".into(),
                message,
            })?;
        let readers = gathers.into_iter().map(Gather::into_runs).collect();
        self.write_archives(&sweep.division.swept[start..end], tables, readers)
            .await
    }
}

impl Exporter {
    /// The archives of `tenants` from their runs of every table (`readers`, in `tables`'
    /// order), exactly as [`Self::export_archive`] would have written them. Archives are
    /// written one after another; their uploads finish concurrently (sealed first: an encoder
    /// waiting with each would cost megabytes apiece).
    async fn write_archives(
        &self,
        tenants: &[String],
        tables: &[&Table],
        mut readers: Vec<RunReader>,
    ) -> Result<Vec<(Option<String>, ArchiveEntry)>, SnapshotError> {
        let mut uploads = FuturesUnordered::new();
        let mut done = Vec::with_capacity(tenants.len());
        for (position, tenant) in tenants.iter().enumerate() {
            let mut writer = self
                .archive_writer(
                    keys::tenant(&self.id, tenant),
                    ArchiveKind::Tenant,
                    Some(tenant),
                )
                .await?;
            let mut rows = BTreeMap::new();
            for (table, reader) in tables.iter().zip(&mut readers) {
                let binary = table.copy_format() == CopyFormat::Binary;
                writer
                    .write(&archive::table_record(&table_header(table)))
                    .await?;
                let mut pending = BytesMut::new();
                if binary {
                    pending.extend_from_slice(BINARY_HEADER);
                }
                let mut n = 0;
                if let Some((run, bytes)) = reader.next_for(position as u32) {
                    n = run.rows;
                    for piece in bytes.chunks(archive::DATA_RECORD) {
                        pending.extend_from_slice(piece);
                        if pending.len() >= archive::DATA_RECORD {
                            flush_data(&mut writer, &mut pending).await?;
                        }
                    }
                }
                if binary {
                    pending.extend_from_slice(BINARY_TRAILER);
                }
                if !pending.is_empty() {
                    flush_data(&mut writer, &mut pending).await?;
                }
                writer.write(&archive::table_end_record(n)).await?;
                rows.insert(table.qualified(), n);
            }
            writer
                .write(&archive::end_record(tables.len() as u64))
                .await?;
            let tenant = tenant.clone();
            let upload = writer.seal().await?;
            uploads.push(async move {
                let (object, _) = upload.stored().await?;
                Ok::<_, RepositoryError>((Some(tenant), ArchiveEntry { object, rows }))
            });
            while uploads.len() >= self.repo.concurrency() {
                let (tenant, entry) = uploads.next().await.expect("not empty")?;
                self.progress.advance(entry.object.bytes);
                done.push((tenant, entry));
            }
        }
        while let Some(finished) = uploads.next().await {
            let (tenant, entry) = finished?;
            self.progress.advance(entry.object.bytes);
            done.push((tenant, entry));
        }
        Ok(done)
    }
}
