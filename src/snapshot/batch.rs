//! A batch of small tenants exported together: each tenant table read once for all of them
//! ([`Catalog::batch_query`]), its rows split by tenant ([`super::runs`]), then every tenant's
//! archive written from its runs exactly as a tenant exported alone would have it.
//!
//! [`Catalog::batch_query`]: crate::source::catalog::Catalog::batch_query

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use bytes::BytesMut;
use futures::stream::FuturesUnordered;
use futures::{StreamExt, pin_mut};
use tokio_postgres::Client;

use super::runs::{self, BINARY_HEADER, BINARY_TRAILER, Gather, Runs, Spill, Splitter};
use super::{Exporter, SnapshotError, flush_data, table_header};
use crate::pg::sqlstate;
use crate::repository::archive::{self, ArchiveKind};
use crate::repository::copy_binary::CopyFormat;
use crate::repository::manifest::ArchiveEntry;
use crate::repository::{RepositoryError, keys};
use crate::source::catalog::Table;

impl Exporter {
    /// The archives of consecutive tenants: each tenant table exported once for all of them,
    /// its rows split by tenant ([`runs`]), then every tenant's archive written from its
    /// runs, exactly as [`Self::export_archive`] would have written it. Returns them and the
    /// bytes the COPYs produced.
    pub(super) async fn export_batch(
        &self,
        client: &Client,
        tenants: &[String],
    ) -> Result<(Vec<(Option<String>, ArchiveEntry)>, u64), SnapshotError> {
        let started = Instant::now();
        let tables: Vec<&Table> = self.catalog.tenant_tables().collect();
        let key = age::x25519::Identity::generate();
        let spill = Spill {
            dir: &self.scratch,
            key: &key,
        };
        let mut memory = self.run_memory;
        let mut ordered = false;
        let mut all_runs = Vec::with_capacity(tables.len());
        for table in &tables {
            all_runs.push(
                self.split_table(client, table, tenants, &mut memory, &spill, &mut ordered)
                    .await?,
            );
        }
        let copy_bytes: u64 = all_runs.iter().map(Runs::bytes).sum();
        let spilled = all_runs.iter().filter(|r| r.spilled()).count();
        let scratch_error = |e: std::io::Error| SnapshotError::Export {
            table: "(batch)".into(),
            message: format!("reading back a scratch file: {e}"),
        };
        let mut readers = all_runs
            .into_iter()
            .map(|r| r.into_reader(&key))
            .collect::<Result<Vec<_>, _>>()
            .map_err(scratch_error)?;

        // Archives are written one after another; their uploads finish concurrently (sealed
        // first: an encoder waiting with each would cost megabytes apiece).
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
                let format = table.copy_format();
                writer
                    .write(&archive::table_record(&table_header(table)))
                    .await?;
                let mut pending = BytesMut::new();
                if format == CopyFormat::Binary {
                    pending.extend_from_slice(BINARY_HEADER);
                }
                let run = reader.next_for(position as u32);
                if let Some(run) = run {
                    let mut left = run.len;
                    while left > 0 {
                        let piece = reader
                            .take((left as usize).min(archive::DATA_RECORD))
                            .map_err(scratch_error)?;
                        left -= piece.len() as u64;
                        pending.extend_from_slice(piece);
                        if pending.len() >= archive::DATA_RECORD {
                            flush_data(&mut writer, &mut pending).await?;
                        }
                    }
                }
                if format == CopyFormat::Binary {
                    pending.extend_from_slice(BINARY_TRAILER);
                }
                if !pending.is_empty() {
                    flush_data(&mut writer, &mut pending).await?;
                }
                let n = run.map_or(0, |r| r.rows);
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
        tracing::debug!(
            tenants = tenants.len(),
            copy_bytes,
            spilled_tables = spilled,
            bytes = done.iter().map(|(_, e)| e.object.bytes).sum::<u64>(),
            seconds = started.elapsed().as_secs_f64(),
            "batch of archives stored"
        );
        Ok((done, copy_bytes))
    }

    /// One table's rows of a batch of tenants, by tenant: gathered in memory as the server
    /// sends them (no sort on the server). If they would not fit, they are read again, ordered
    /// by tenant, into runs that spill beyond memory; `ordered` then stays set for the rest of
    /// the batch, whose memory is used up.
    async fn split_table(
        &self,
        client: &Client,
        table: &Table,
        tenants: &[String],
        memory: &mut usize,
        spill: &Spill<'_>,
        ordered: &mut bool,
    ) -> Result<Runs, SnapshotError> {
        if !*ordered {
            let mut gather = Gather::new(tenants.len());
            let mut fits = true;
            self.read_batch(client, table, tenants, false, |position, pieces| {
                // Past the budget the rest is only read: the statement must run to its end
                // (cancelling it would end the snapshot's transaction).
                fits = fits && gather.push(position, pieces, memory);
                Ok(())
            })
            .await?;
            if fits {
                return Ok(gather.into_runs());
            }
            gather.release(memory);
            *ordered = true;
            tracing::debug!(table = %table.qualified(), tenants = tenants.len(), "a batch's table beyond memory: read again ordered by tenant");
        }
        let mut runs = Runs::default();
        self.read_batch(client, table, tenants, true, |position, pieces| {
            runs.push(position, pieces, memory, spill)
        })
        .await?;
        Ok(runs)
    }

    /// Runs `table`'s statement for a batch, handing each row (without its tenant field) to
    /// `row` with its tenant's position in the batch.
    async fn read_batch(
        &self,
        client: &Client,
        table: &Table,
        tenants: &[String],
        ordered: bool,
        mut row: impl FnMut(u32, &[&[u8]]) -> Result<(), String>,
    ) -> Result<(), SnapshotError> {
        let format = table.copy_format();
        let fail = |message: String| SnapshotError::Export {
            table: table.qualified(),
            message,
        };
        // The tenant's value as the row carries it.
        let index: HashMap<Vec<u8>, u32> = tenants
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let field = match format {
                    CopyFormat::Text => runs::text_field(t),
                    CopyFormat::Binary => t.as_bytes().to_vec(),
                };
                (field, i as u32)
            })
            .collect();
        let query = self
            .catalog
            .batch_query(
                table,
                tenants.first().expect("a batch has tenants"),
                tenants.last().expect("a batch has tenants"),
                ordered,
            )
            .expect("tenant tables have a route");
        let sql = format!("COPY ({query}) TO STDOUT (FORMAT {})", format.sql());
        let stream = client
            .copy_out(&sql)
            .await
            .map_err(|e| fail(sqlstate::describe(&e)))?;
        pin_mut!(stream);
        let mut splitter = Splitter::new(format);
        let mut current: Option<(Vec<u8>, u32)> = None;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| fail(sqlstate::describe(&e)))?;
            splitter
                .feed(&chunk, |tenant, pieces| {
                    let position = match &current {
                        Some((value, position)) if value == tenant => *position,
                        _ => {
                            let position = *index.get(tenant).ok_or_else(|| {
                                format!(
                                    "a row of tenant {:?}, which is not in the batch",
                                    String::from_utf8_lossy(tenant)
                                )
                            })?;
                            current = Some((tenant.to_vec(), position));
                            position
                        }
                    };
                    row(position, pieces)
                })
                .map_err(&fail)?;
        }
        splitter.finish().map_err(&fail)
    }
}
