//! The sweep: every tenant exported by one pass over each table.
//!
//! A [`Job::Scatter`](super::plan::Job) runs one `COPY` of a tenant table (or of a range of its
//! blocks) with its route joined once ([`Catalog::sweep_query`]); its rows, cut by tenant
//! ([`Splitter`]), are appended to the scratch partition of their tenant (consecutive tenants)
//! in sealed frames ([`super::frames`]). Every tenant's bytes are counted as they pass. Once
//! every slice is scattered, a [`Job::Gather`](super::plan::Job) reads one partition back,
//! gathers its rows by table and tenant in memory, and writes each tenant's archive exactly as a
//! tenant exported alone would have it.
//!
//! Memory: frame buffers (at most [`FRAME_MEMORY`] per worker whatever the number of
//! partitions) and one gathered group of tenants. A partition whose counted bytes would not
//! fit is split once into a scratch file per group of tenants that fits (read once, written
//! once more) and each group gathered from its own; a tenant that alone would not fit is
//! streamed into its archive a table at a time, reading only that table's frames each time.
//! Counts are exact: nothing is estimated here.
//!
//! [`Catalog::sweep_query`]: crate::source::catalog::Catalog::sweep_query

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use bytes::BytesMut;
use futures::stream::FuturesUnordered;
use futures::{StreamExt, pin_mut};
use tokio_postgres::Client;

use super::frames::{self, FrameFile, FrameKey};
use super::plan::{Division, Slice};
use super::runs::{self, BINARY_HEADER, BINARY_TRAILER, Gather, RunReader, Splitter};
use super::{Exporter, SnapshotError, flush_data, table_header};
use crate::pg::sqlstate;
use crate::repository::archive::{self, ArchiveKind};
use crate::repository::copy_binary::CopyFormat;
use crate::repository::manifest::ArchiveEntry;
use crate::repository::object::ObjectWriter;
use crate::repository::{RepositoryError, keys};
use crate::source::catalog::Table;

/// What one worker's frame buffers may hold at a time, shared by the partitions (or groups).
pub const FRAME_MEMORY: usize = 8 << 20;
/// A frame never waits for more than this.
const FRAME_BYTES: usize = 64 << 10;
/// Nor is it cut smaller than this (more buffers then cost more than the budget).
const MIN_FRAME_BYTES: usize = 4 << 10;
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
    /// Each partition's file, until its gatherer takes it.
    partitions: Vec<Mutex<Option<FrameFile>>>,
    key: FrameKey,
    /// COPY bytes of each swept tenant's rows (without the tenant field), all tables.
    bytes: Mutex<Vec<u64>>,
    /// Slices to scatter, and those done with the COPY bytes they read.
    slices: usize,
    scattered: Mutex<(usize, u64)>,
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
            partitions.push(Mutex::new(Some(FrameFile::create(dir, p as u32)?)));
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
            key: FrameKey::generate(),
        })
    }

    fn index(&self, format: CopyFormat) -> &HashMap<Vec<u8>, u32> {
        match (format, &self.text) {
            (CopyFormat::Text, Some(text)) => text,
            _ => &self.binary,
        }
    }

    /// Compresses and seals `frame` (rows of tenant table `table`; emptied) into
    /// `partition`'s file (compressed before the partition is locked).
    fn append(&self, partition: usize, table: u32, frame: &mut Vec<u8>) -> Result<(), String> {
        let compressed = frames::compress(frame)?;
        lock(&self.partitions[partition])
            .as_mut()
            .ok_or("partition already gathered")?
            .append(&self.key, table, compressed)
    }

    /// `partition`'s file, to be read back (once every slice is scattered).
    fn take(&self, partition: usize) -> Result<FrameFile, String> {
        lock(&self.partitions[partition])
            .take()
            .ok_or_else(|| "partition already gathered".to_string())
    }
}

/// Frame buffers, a budget shared among `count` of them.
fn frame_bytes(count: usize) -> usize {
    (FRAME_MEMORY / count.max(1)).clamp(MIN_FRAME_BYTES, FRAME_BYTES)
}

/// Scratch rows to read back: a file, its key, and the sweep's index of the tenant its
/// records number from.
struct Scratch<'a> {
    file: &'a FrameFile,
    key: &'a FrameKey,
    first: usize,
}

impl Scratch<'_> {
    /// Calls `row(table, tenant, row)` for every record of every frame (or of table `table`'s
    /// frames), `tenant` being its index in the sweep. Frames are read one at a time: the
    /// caller may await between them by handling a frame's rows itself (see
    /// [`Exporter::stream_tenant`]).
    fn each(
        &self,
        table: Option<u32>,
        mut row: impl FnMut(u32, usize, &[u8]) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut frames = self.file.frames(self.key, table);
        while let Some((table, frame)) = frames.next()? {
            for record in frames::records(&frame) {
                let (tenant, bytes) = record?;
                row(table, self.first + tenant as usize, bytes)?;
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

    /// One slice of a tenant table's rows of every swept tenant, scattered into the
    /// partitions.
    pub(super) async fn scatter(&self, client: &Client, slice: Slice) -> Result<(), SnapshotError> {
        let sweep = self.sweep();
        let table = self
            .catalog
            .tenant_tables()
            .nth(slice.table)
            .expect("a tenant table");
        let fail = |message: String| SnapshotError::Export {
            table: table.qualified(),
            message,
        };
        let format = table.copy_format();
        let index = sweep.index(format);
        let frame_bytes = frame_bytes(sweep.partitions.len());
        let mut frames: Vec<Vec<u8>> = vec![Vec::new(); sweep.partitions.len()];
        let mut counted: HashMap<u32, u64> = HashMap::new();
        let query = self
            .catalog
            .sweep_query(
                table,
                (slice != Slice::whole(slice.table)).then_some((slice.from_block, slice.to_block)),
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
                    let frame = &mut frames[p];
                    if frame.capacity() == 0 {
                        frame.reserve(frame_bytes + 16);
                    }
                    let first = sweep.division.bounds[p] as u32;
                    frames::push_record(frame, i - first, pieces)?;
                    let len: u64 = pieces.iter().map(|p| p.len() as u64).sum();
                    *counted.entry(i).or_default() += len;
                    total += len;
                    if frame.len() >= frame_bytes {
                        sweep.append(p, slice.table as u32, frame)?;
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
                sweep.append(p, slice.table as u32, frame).map_err(&fail)?;
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

    /// One partition's tenants, gathered a group at a time (as many as memory holds, by
    /// their counted bytes) and written as archives; a tenant that alone would not fit is
    /// streamed into its archive a table at a time. With more than two groups the partition
    /// is first split into a file per group: reading it whole once per group would cost its
    /// size times the groups.
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
        let memory = self.run_memory as u64;
        // What gathering a tenant may take: its buffers grow by doubling.
        let cost = |b: u64| 2 * b + PER_RUN * tables.len() as u64;
        // (first tenant, end, streamed)
        let mut groups: Vec<(usize, usize, bool)> = Vec::new();
        let mut at = start;
        while at < end {
            if cost(bytes[at - start]) > memory {
                groups.push((at, at + 1, true));
                at += 1;
                continue;
            }
            let mut total = 0;
            let group = at;
            while at < end && total + cost(bytes[at - start]) <= memory {
                total += cost(bytes[at - start]);
                at += 1;
            }
            groups.push((group, at, false));
        }
        let file = sweep.take(partition).map_err(failed)?;
        let split = groups.len() > 2;
        let (key, files) = if split {
            let key = FrameKey::generate();
            let files = self
                .split(file, start, &groups, &key, tables.len())
                .map_err(failed)?;
            (Some(key), files)
        } else {
            (None, vec![file])
        };
        let key = key.as_ref().unwrap_or(&sweep.key);
        let mut done = Vec::with_capacity(end - start);
        for (g, &(first, last, streamed)) in groups.iter().enumerate() {
            let scratch = Scratch {
                file: &files[if split { g } else { 0 }],
                key,
                first: start,
            };
            if streamed {
                done.push(self.stream_tenant(&scratch, first, &tables).await?);
            } else {
                done.extend(self.gather_group(&scratch, first, last, &tables).await?);
            }
        }
        tracing::debug!(
            partition,
            tenants = end - start,
            copy_bytes = bytes.iter().sum::<u64>(),
            groups = groups.len(),
            streamed = groups.iter().filter(|g| g.2).count(),
            split,
            seconds = started.elapsed().as_secs_f64(),
            "partition gathered"
        );
        // The scratch files are closed (their space freed) here.
        Ok(done)
    }

    /// A partition's `file` (its tenants numbered from `first`) split into a file per group
    /// of `groups`, sealed with `key`; the partition's file is closed once read.
    fn split(
        &self,
        file: FrameFile,
        first: usize,
        groups: &[(usize, usize, bool)],
        key: &FrameKey,
        tables: usize,
    ) -> Result<Vec<FrameFile>, String> {
        let mut files = (0..groups.len())
            .map(|g| FrameFile::create(&self.scratch, g as u32))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("creating a scratch file in {}: {e}", self.scratch.display()))?;
        let frame_bytes = frame_bytes(groups.len() * tables);
        let mut buffers: Vec<Vec<u8>> = vec![Vec::new(); groups.len() * tables];
        let scratch = Scratch {
            file: &file,
            key: &self.sweep().key,
            first,
        };
        scratch.each(None, |table, tenant, row| {
            let table = table as usize;
            if table >= tables {
                return Err("a scratch frame names no table".into());
            }
            let g = groups.partition_point(|group| group.0 <= tenant) - 1;
            let buffer = &mut buffers[g * tables + table];
            frames::push_record(buffer, (tenant - first) as u32, &[row])?;
            if buffer.len() >= frame_bytes {
                files[g].append(key, table as u32, frames::compress(buffer)?)?;
            }
            Ok(())
        })?;
        for (i, buffer) in buffers.iter_mut().enumerate() {
            if !buffer.is_empty() {
                files[i / tables].append(key, (i % tables) as u32, frames::compress(buffer)?)?;
            }
        }
        Ok(files)
    }

    /// Tenants `start..end` of the sweep, gathered in one pass over `scratch` and written as
    /// archives.
    async fn gather_group(
        &self,
        scratch: &Scratch<'_>,
        start: usize,
        end: usize,
        tables: &[&Table],
    ) -> Result<Vec<(Option<String>, ArchiveEntry)>, SnapshotError> {
        let mut memory = self.run_memory;
        let mut gathers: Vec<Gather> = tables.iter().map(|_| Gather::new(end - start)).collect();
        scratch
            .each(None, |table, tenant, row| {
                let gather = gathers
                    .get_mut(table as usize)
                    .ok_or("a scratch frame names no table")?;
                if (start..end).contains(&tenant)
                    && !gather.push((tenant - start) as u32, &[row], &mut memory)
                {
                    return Err("a partition's rows outgrew their counted bytes".into());
                }
                Ok(())
            })
            .map_err(|message| SnapshotError::Export {
                table: "(sweep)".into(),
                message,
            })?;
        let readers = gathers.into_iter().map(Gather::into_runs).collect();
        self.write_archives(&self.sweep().division.swept[start..end], tables, readers)
            .await
    }

    /// The archive of tenant `tenant` (its index in the sweep), too large to gather: each
    /// table's frames read from `scratch` in turn, its rows streamed into the archive.
    async fn stream_tenant(
        &self,
        scratch: &Scratch<'_>,
        tenant: usize,
        tables: &[&Table],
    ) -> Result<(Option<String>, ArchiveEntry), SnapshotError> {
        let started = std::time::Instant::now();
        let name = &self.sweep().division.swept[tenant];
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
            let mut section = Section::start(&mut writer, table).await?;
            // Frame by frame, so that the archive is written between them.
            let mut frames = scratch.file.frames(scratch.key, Some(index as u32));
            while let Some((_, frame)) = frames.next().map_err(failed(table))? {
                for record in frames::records(&frame) {
                    let (of, row) = record.map_err(failed(table))?;
                    if scratch.first + of as usize == tenant {
                        section.push(&mut writer, row, 1).await?;
                    }
                }
            }
            rows.insert(table.qualified(), section.end(&mut writer).await?);
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
                let mut section = Section::start(&mut writer, table).await?;
                if let Some((run, bytes)) = reader.next_for(position as u32) {
                    section.push(&mut writer, &bytes, run.rows).await?;
                }
                rows.insert(table.qualified(), section.end(&mut writer).await?);
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

/// One table's section of an archive, written from its COPY bytes as they come: data records
/// of about [`archive::DATA_RECORD`] (a binary stream with its own header and trailer).
struct Section {
    pending: BytesMut,
    binary: bool,
    rows: u64,
}

impl Section {
    async fn start(writer: &mut ObjectWriter, table: &Table) -> Result<Self, RepositoryError> {
        writer
            .write(&archive::table_record(&table_header(table)))
            .await?;
        let binary = table.copy_format() == CopyFormat::Binary;
        let mut pending = BytesMut::new();
        if binary {
            pending.extend_from_slice(BINARY_HEADER);
        }
        Ok(Self {
            pending,
            binary,
            rows: 0,
        })
    }

    /// Adds `bytes`, `rows` whole rows.
    async fn push(
        &mut self,
        writer: &mut ObjectWriter,
        bytes: &[u8],
        rows: u64,
    ) -> Result<(), RepositoryError> {
        self.rows += rows;
        for piece in bytes.chunks(archive::DATA_RECORD) {
            self.pending.extend_from_slice(piece);
            if self.pending.len() >= archive::DATA_RECORD {
                flush_data(writer, &mut self.pending).await?;
            }
        }
        Ok(())
    }

    /// Ends the section; returns its rows.
    async fn end(mut self, writer: &mut ObjectWriter) -> Result<u64, RepositoryError> {
        if self.binary {
            self.pending.extend_from_slice(BINARY_TRAILER);
        }
        if !self.pending.is_empty() {
            flush_data(writer, &mut self.pending).await?;
        }
        writer.write(&archive::table_end_record(self.rows)).await?;
        Ok(self.rows)
    }
}
