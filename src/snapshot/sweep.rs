//! The sweep: every tenant exported by one pass over each table.
//!
//! A [`Job::Scatter`](super::plan::Job) runs one `COPY` of a tenant table with its route
//! joined once ([`Catalog::sweep_query`]); its rows, cut by tenant ([`Splitter`]), are appended
//! to the scratch partition of their tenant: consecutive tenants, in frames sealed one by one
//! (ChaCha20-Poly1305, a key made for the snapshot and held only in memory: no plaintext tenant
//! data on local disk) in an unlinked file. Every tenant's bytes are counted as they pass.
//! Once every table is scattered, a [`Job::Gather`](super::plan::Job) reads one partition back,
//! gathers its rows by table and tenant in memory, and writes each tenant's archive exactly as a
//! tenant exported alone would have it. Frames are compressed (zstd -1) before they are sealed:
//! the scratch holds about a fifth of the COPY bytes.
//!
//! Memory: frame buffers (at most [`FRAME_MEMORY`] per worker whatever the number of
//! partitions) and one gathered group of tenants. A partition whose counted bytes would not
//! fit is gathered in several passes over its file, a group of tenants each; a tenant that
//! alone would not fit is streamed into its archive a table at a time, reading only that
//! table's frames each time (a frame's table is in its clear, authenticated header). Counts
//! are exact: nothing is estimated here.
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

    /// Compresses and seals `frame` (rows of tenant table `table`; emptied) and appends it to
    /// `partition`'s file. The table's index is written in the clear (and authenticated):
    /// a tenant streamed from the scratch reads only its table's frames at each step.
    fn append(&self, partition: usize, table: u32, frame: &mut Vec<u8>) -> Result<(), String> {
        let mut sealed = zstd::bulk::compress(frame, SCRATCH_LEVEL)
            .map_err(|e| format!("compressing a scratch frame: {e}"))?;
        let raw = frame.len() as u32;
        frame.clear();
        let mut state = lock(&self.partitions[partition]);
        let table = table.to_le_bytes();
        self.cipher
            .encrypt_in_place(&Self::nonce(partition, state.frames), &table, &mut sealed)
            .map_err(|_| "sealing a scratch frame failed".to_string())?;
        let file = state.file.as_mut().ok_or("partition already gathered")?;
        let write = (|| {
            file.write_all(&(sealed.len() as u32).to_le_bytes())?;
            file.write_all(&raw.to_le_bytes())?;
            file.write_all(&table)?;
            file.write_all(&sealed)
        })();
        write.map_err(|e| format!("writing a scratch file: {e}"))?;
        state.frames += 1;
        state.end += FRAME_HEAD + sealed.len() as u64;
        Ok(())
    }

    /// `partition`'s scratch file, to be read back (once every slice is scattered).
    fn take(&self, partition: usize) -> Result<Scratch, String> {
        let mut state = lock(&self.partitions[partition]);
        let file = state.file.take().ok_or("partition already gathered")?;
        Ok(Scratch {
            file,
            end: state.end,
            partition,
            first: self.division.bounds[partition] as u32,
        })
    }
}

/// A frame's length sealed, its length raw, its table.
const FRAME_HEAD: u64 = 12;

/// One partition's scratch file, read back by its gatherer.
struct Scratch {
    file: File,
    end: u64,
    partition: usize,
    /// The partition's first tenant (records number tenants from it).
    first: u32,
}

impl Scratch {
    /// The frames in the order they were written, or only those of table `table`.
    fn frames<'a>(&'a self, sweep: &'a Sweep, table: Option<u32>) -> Frames<'a> {
        Frames {
            scratch: self,
            sweep,
            table,
            at: 0,
            number: 0,
        }
    }
}

struct Frames<'a> {
    scratch: &'a Scratch,
    sweep: &'a Sweep,
    table: Option<u32>,
    at: u64,
    number: u64,
}

impl Frames<'_> {
    /// The next frame: its table and its records (see [`records`]).
    fn next(&mut self) -> Result<Option<(u32, Vec<u8>)>, String> {
        let read = |e: std::io::Error| format!("reading a scratch file: {e}");
        let file = &self.scratch.file;
        while self.at < self.scratch.end {
            let mut head = [0u8; FRAME_HEAD as usize];
            file.read_exact_at(&mut head, self.at).map_err(read)?;
            let word = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().expect("4 bytes"));
            let (len, raw, table) = (word(0) as usize, word(4) as usize, word(8));
            let (at, number) = (self.at, self.number);
            self.at += FRAME_HEAD + len as u64;
            self.number += 1;
            if self.table.is_some_and(|t| t != table) {
                continue;
            }
            let mut sealed = vec![0; len];
            file.read_exact_at(&mut sealed, at + FRAME_HEAD)
                .map_err(read)?;
            self.sweep
                .cipher
                .decrypt_in_place(
                    &Sweep::nonce(self.scratch.partition, number),
                    &table.to_le_bytes(),
                    &mut sealed,
                )
                .map_err(|_| "a scratch frame does not open with its key (changed on disk?)")?;
            let records = zstd::bulk::decompress(&sealed, raw)
                .map_err(|e| format!("a scratch frame does not decompress: {e}"))?;
            return Ok(Some((table, records)));
        }
        Ok(None)
    }
}

/// A frame's records: each row with its tenant's index in the sweep.
fn records(first: u32, mut frame: &[u8]) -> impl Iterator<Item = Result<(u32, &[u8]), String>> {
    std::iter::from_fn(move || {
        if frame.is_empty() {
            return None;
        }
        let record = (|| {
            let head = frame.get(..8)?;
            let tenant = u32::from_le_bytes(head[..4].try_into().ok()?);
            let len = u32::from_le_bytes(head[4..].try_into().ok()?) as usize;
            let row = frame.get(8..8 + len)?;
            frame = &frame[8 + len..];
            Some((first + tenant, row))
        })();
        if record.is_none() {
            frame = &[];
        }
        Some(record.ok_or_else(|| "a scratch frame is truncated".to_string()))
    })
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
                    if frame.capacity() == 0 {
                        frame.reserve(frame_bytes + 16);
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
                        sweep.append(p, table_index as u32, frame)?;
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
                sweep.append(p, table_index as u32, frame).map_err(&fail)?;
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
    /// would not fit is streamed from the scratch into its archive, a table at a time.
    pub(super) async fn gather(
        &self,
        partition: usize,
    ) -> Result<Vec<(Option<String>, ArchiveEntry)>, SnapshotError> {
        let started = std::time::Instant::now();
        let sweep = self.sweep();
        let failed = |message: String| SnapshotError::Export {
            table: "(sweep)".into(),
            message,
        };
        let tables: Vec<&Table> = self.catalog.tenant_tables().collect();
        let (start, end) = (
            sweep.division.bounds[partition],
            sweep.division.bounds[partition + 1],
        );
        let bytes: Vec<u64> = lock(&sweep.bytes)[start..end].to_vec();
        let scratch = sweep.take(partition).map_err(failed)?;
        let memory = self.run_memory as u64;
        // What gathering a tenant may take: its buffers grow by doubling.
        let cost = |b: u64| 2 * b + PER_RUN * tables.len() as u64;
        let (mut passes, mut streamed) = (0, 0);
        let mut done = Vec::with_capacity(end - start);
        let mut at = start;
        while at < end {
            if cost(bytes[at - start]) > memory {
                done.push(self.stream_tenant(&scratch, at, &tables).await?);
                streamed += 1;
                at += 1;
                continue;
            }
            let mut group_end = at;
            let mut total = 0;
            while group_end < end && total + cost(bytes[group_end - start]) <= memory {
                total += cost(bytes[group_end - start]);
                group_end += 1;
            }
            done.extend(self.gather_group(&scratch, at, group_end, &tables).await?);
            passes += 1;
            at = group_end;
        }
        tracing::debug!(
            partition,
            tenants = end - start,
            copy_bytes = bytes.iter().sum::<u64>(),
            passes,
            streamed,
            seconds = started.elapsed().as_secs_f64(),
            "partition gathered"
        );
        // The scratch file is closed (its space freed) here.
        Ok(done)
    }

    /// Tenants `start..end` of the sweep (all of `scratch`'s partition), gathered in one pass
    /// over its file and written as archives.
    async fn gather_group(
        &self,
        scratch: &Scratch,
        start: usize,
        end: usize,
        tables: &[&Table],
    ) -> Result<Vec<(Option<String>, ArchiveEntry)>, SnapshotError> {
        let sweep = self.sweep();
        let mut memory = self.run_memory;
        let mut gathers: Vec<Gather> = tables.iter().map(|_| Gather::new(end - start)).collect();
        let mut frames = scratch.frames(sweep, None);
        let read = (|| {
            while let Some((table, frame)) = frames.next()? {
                let gather = gathers
                    .get_mut(table as usize)
                    .ok_or("a scratch frame names no table")?;
                for record in records(scratch.first, &frame) {
                    let (tenant, row) = record?;
                    let tenant = tenant as usize;
                    if (start..end).contains(&tenant)
                        && !gather.push((tenant - start) as u32, &[row], &mut memory)
                    {
                        return Err("a partition's rows outgrew their counted bytes".to_string());
                    }
                }
            }
            Ok(())
        })();
        read.map_err(|message| SnapshotError::Export {
            table: "(sweep)".into(),
            message,
        })?;
        let readers = gathers.into_iter().map(Gather::into_runs).collect();
        self.write_archives(&sweep.division.swept[start..end], tables, readers)
            .await
    }

    /// The archive of tenant `tenant` (its index in the sweep), too large to gather: each
    /// table's frames read from `scratch` in turn, its rows streamed into the archive.
    async fn stream_tenant(
        &self,
        scratch: &Scratch,
        tenant: usize,
        tables: &[&Table],
    ) -> Result<(Option<String>, ArchiveEntry), SnapshotError> {
        let started = std::time::Instant::now();
        let sweep = self.sweep();
        let name = &sweep.division.swept[tenant];
        let failed = |table: &Table| {
            let table = table.qualified();
            move |message: String| SnapshotError::Export { table, message }
        };
        let mut writer = self
            .archive_writer(
                keys::tenant(&self.id, name),
                ArchiveKind::Tenant,
                Some(name),
            )
            .await?;
        let mut rows = BTreeMap::new();
        for (index, table) in tables.iter().enumerate() {
            let binary = table.copy_format() == CopyFormat::Binary;
            writer
                .write(&archive::table_record(&table_header(table)))
                .await?;
            let mut pending = BytesMut::new();
            if binary {
                pending.extend_from_slice(BINARY_HEADER);
            }
            let mut n = 0;
            let mut frames = scratch.frames(sweep, Some(index as u32));
            while let Some((_, frame)) = frames.next().map_err(failed(table))? {
                for record in records(scratch.first, &frame) {
                    let (of, row) = record.map_err(failed(table))?;
                    if of as usize != tenant {
                        continue;
                    }
                    n += 1;
                    for piece in row.chunks(archive::DATA_RECORD) {
                        pending.extend_from_slice(piece);
                        if pending.len() >= archive::DATA_RECORD {
                            flush_data(&mut writer, &mut pending).await?;
                        }
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
        let (object, _) = writer.finish().await?;
        let entry = ArchiveEntry { object, rows };
        tracing::debug!(
            tenant = %name,
            rows = entry.total_rows(),
            bytes = entry.object.bytes,
            seconds = started.elapsed().as_secs_f64(),
            "archive streamed from the scratch"
        );
        self.progress.advance(entry.object.bytes);
        Ok((Some(name.clone()), entry))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tenant: u32, row: &[u8]) -> Vec<u8> {
        let mut out = tenant.to_le_bytes().to_vec();
        out.extend_from_slice(&(row.len() as u32).to_le_bytes());
        out.extend_from_slice(row);
        out
    }

    fn sweep(dir: &std::path::Path) -> Sweep {
        let division = Division {
            alone: Vec::new(),
            swept: vec!["a".into(), "b".into(), "c".into()],
            bounds: vec![0, 1, 3],
        };
        Sweep::new(division, 1, dir).unwrap()
    }

    fn all(frames: &mut Frames<'_>, first: u32) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some((table, frame)) = frames.next().unwrap() {
            for r in records(first, &frame) {
                let (tenant, row) = r.unwrap();
                out.push((table, tenant, row.to_vec()));
            }
        }
        out
    }

    #[test]
    fn frames_read_back_in_order_or_by_table_and_nothing_plain_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let sweep = sweep(dir.path());
        // Partition 1 holds tenants 1 and 2 ("b", "c"); records number them from 0.
        // Incompressible: zstd would store it as it is, only sealing hides it.
        let secret: Vec<u8> = (0..500).map(|_| fastrand::u8(..)).collect();
        let mut frame = [record(0, &secret), record(1, b"c1")].concat();
        sweep.append(1, 0, &mut frame).unwrap();
        assert!(frame.is_empty(), "the frame is emptied for the next rows");
        let mut frame = record(1, b"c2");
        sweep.append(1, 4, &mut frame).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "unlinked"
        );

        let scratch = sweep.take(1).unwrap();
        assert!(sweep.take(1).is_err(), "a partition is gathered once");
        let mut on_disk = vec![0; scratch.end as usize];
        scratch.file.read_exact_at(&mut on_disk, 0).unwrap();
        assert!(!on_disk.windows(16).any(|w| w == &secret[..16]));

        assert_eq!(
            all(&mut scratch.frames(&sweep, None), scratch.first),
            [
                (0, 1, secret.clone()),
                (0, 2, b"c1".to_vec()),
                (4, 2, b"c2".to_vec())
            ]
        );
        assert_eq!(
            all(&mut scratch.frames(&sweep, Some(4)), scratch.first),
            [(4, 2, b"c2".to_vec())]
        );
        assert!(all(&mut scratch.frames(&sweep, Some(1)), scratch.first).is_empty());
    }

    #[test]
    fn a_changed_scratch_frame_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sweep = sweep(dir.path());
        let mut frame = record(0, b"a1");
        sweep.append(0, 2, &mut frame).unwrap();
        let scratch = sweep.take(0).unwrap();
        // The table in the clear header is authenticated too.
        scratch.file.write_all_at(&3u32.to_le_bytes(), 8).unwrap();
        let error = scratch.frames(&sweep, None).next().unwrap_err();
        assert!(error.contains("does not open"), "{error}");
    }

    #[test]
    fn truncated_records_are_refused() {
        let frame = record(0, b"abc");
        let cut = &frame[..frame.len() - 1];
        let out: Vec<_> = records(0, cut).collect();
        assert_eq!(out.len(), 1);
        assert!(out[0].is_err());
    }
}
