//! Inserts: consecutive inserts into one table gathered into a run, sent as COPY text rows
//! when the run is long and as pipelined INSERTs when it is short.

use std::pin::Pin;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use futures::SinkExt;
use tokio_postgres::CopyInSink;

use crate::pg::pgoutput::Insert;

use super::binding::{Bound, TextParam};
use super::statements::{StatementKey, StatementKind};
use super::{ReplayError, Replayer};

/// COPY data is sent to the server in chunks of about this size.
const COPY_CHUNK_BYTES: usize = 1 << 20;
/// Runs of at most this many inserts become pipelined INSERTs instead of a COPY: a COPY waits
/// for two answers (its start, its end), a pipelined INSERT for none.
const SMALL_RUN_ROWS: usize = 8;

/// Appends `value` to COPY text data: backslash, tab, newline and carriage return escaped (the
/// other bytes, UTF-8 included, stand for themselves).
pub(crate) fn copy_escape(out: &mut BytesMut, value: &[u8]) {
    let mut start = 0;
    for (i, &b) in value.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        out.extend_from_slice(&value[start..i]);
        out.extend_from_slice(escaped);
        start = i + 1;
    }
    out.extend_from_slice(&value[start..]);
}

/// Appends one COPY text row (tab-separated, `\N` for NULL, newline-terminated).
fn copy_row<'v>(out: &mut BytesMut, values: impl Iterator<Item = Option<&'v Bytes>>) {
    for (i, value) in values.enumerate() {
        if i > 0 {
            out.put_u8(b'\t');
        }
        match value {
            Some(v) => copy_escape(out, v),
            None => out.extend_from_slice(b"\\N"),
        }
    }
    out.put_u8(b'\n');
}

/// Consecutive inserts into one table with one column set.
pub(super) struct InsertRun {
    bound: Arc<Bound>,
    rows: u64,
    /// Values of the first rows, while the run is short enough for pipelined INSERTs.
    small: Vec<Vec<Option<Bytes>>>,
    /// COPY text not yet sent; used once the run is longer than [`SMALL_RUN_ROWS`].
    copy: Option<BytesMut>,
    sink: Option<Pin<Box<CopyInSink<Bytes>>>>,
}

impl<'a> Replayer<'a> {
    pub(super) async fn insert(&mut self, m: &Insert) -> Result<(), ReplayError> {
        let bound = self.bound(m.relation).await?;
        bound.check_len("an insert", &m.new)?;
        let mut values = Vec::with_capacity(bound.written.len());
        for &i in &bound.written {
            values.push(bound.writable("an insert", i, &m.new.0[i])?);
        }
        self.track_sequences(&bound, &m.new);
        let continues = self.run.as_ref().is_some_and(|run| {
            Arc::ptr_eq(&run.bound, &bound)
                || (run.bound.table.oid == bound.table.oid
                    && run.bound.written_target == bound.written_target)
        });
        if !continues {
            self.flush_run().await?;
        }
        self.stats.inserts += 1;
        let run = self.run.get_or_insert_with(|| InsertRun {
            bound: bound.clone(),
            rows: 0,
            small: Vec::new(),
            copy: None,
            sink: None,
        });
        run.rows += 1;
        if let Some(buf) = run.copy.as_mut() {
            copy_row(buf, values.iter().map(Option::as_ref));
            if buf.len() >= COPY_CHUNK_BYTES {
                self.send_copy_chunk().await?;
            }
        } else {
            run.small.push(values);
            if run.small.len() > SMALL_RUN_ROWS {
                // Long enough for COPY: the pipeline must be empty before it starts.
                let mut buf = BytesMut::with_capacity(COPY_CHUNK_BYTES + (64 << 10));
                for row in run.small.drain(..) {
                    copy_row(&mut buf, row.iter().map(Option::as_ref));
                }
                run.copy = Some(buf);
            }
        }
        Ok(())
    }

    /// Sends the buffered COPY text, starting the COPY if needed.
    async fn send_copy_chunk(&mut self) -> Result<(), ReplayError> {
        let needs_start = self.run.as_ref().is_some_and(|r| r.sink.is_none());
        if needs_start {
            self.drain().await?;
            let Some(run) = self.run.as_ref() else {
                return Ok(());
            };
            let key = StatementKey {
                table: run.bound.table.oid,
                kind: StatementKind::Copy,
                set: run.bound.written_target.clone(),
                filter: Vec::new(),
                full: false,
            };
            let table = run.bound.table.clone();
            let prepared = self.prepared(&table, key).await?;
            let sink = self
                .client
                .copy_in::<_, Bytes>(&prepared.statement)
                .await
                .map_err(|e| ReplayError::database(&table.display, "an insert", &e))?;
            if let Some(run) = self.run.as_mut() {
                run.sink = Some(Box::pin(sink));
            }
        }
        let Some(run) = self.run.as_mut() else {
            return Ok(());
        };
        let (Some(buf), Some(sink)) = (run.copy.as_mut(), run.sink.as_mut()) else {
            return Ok(());
        };
        if buf.is_empty() {
            return Ok(());
        }
        let chunk = buf.split().freeze();
        sink.send(chunk)
            .await
            .map_err(|e| ReplayError::database(&run.bound.table.display, "an insert", &e))
    }

    /// Applies the pending insert run: pipelined INSERTs for a short one, the end of its COPY
    /// for a long one (whose row count is checked).
    pub(super) async fn flush_run(&mut self) -> Result<(), ReplayError> {
        let copying = match &self.run {
            None => return Ok(()),
            Some(run) => run.copy.is_some(),
        };
        if copying {
            self.send_copy_chunk().await?;
        }
        let Some(mut run) = self.run.take() else {
            return Ok(());
        };
        let table_name = run.bound.table.display.clone();
        if !copying {
            let key = StatementKey {
                table: run.bound.table.oid,
                kind: StatementKind::Insert,
                set: run.bound.written_target.clone(),
                filter: Vec::new(),
                full: false,
            };
            for row in run.small {
                let params = row.into_iter().map(TextParam).collect();
                self.execute(&run.bound.table, key.clone(), params).await?;
            }
            return Ok(());
        }
        let mut sink = run.sink.take().ok_or_else(|| ReplayError::Database {
            table: table_name.clone(),
            op: "an insert",
            message: "the COPY of the run was never started (internal error)".into(),
        })?;
        let loaded = sink
            .as_mut()
            .finish()
            .await
            .map_err(|e| ReplayError::database(&table_name, "an insert", &e))?;
        if loaded != run.rows {
            return Err(ReplayError::Database {
                table: table_name,
                op: "an insert",
                message: format!("COPY loaded {loaded} rows, {} were sent", run.rows),
            });
        }
        tracing::debug!(table = %table_name, rows = loaded, "insert run copied");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(value: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        copy_escape(&mut out, value);
        out.to_vec()
    }

    #[test]
    fn copy_escaping() {
        assert_eq!(escaped(b""), b"");
        assert_eq!(escaped(b"plain"), b"plain");
        assert_eq!(escaped(b"a\tb"), b"a\\tb");
        assert_eq!(escaped(b"a\nb\r\n"), b"a\\nb\\r\\n");
        assert_eq!(escaped(b"C:\\dir\\"), b"C:\\\\dir\\\\");
        assert_eq!(escaped(b"\\."), b"\\\\.");
        assert_eq!(escaped(b"\\N"), b"\\\\N");
        assert_eq!(
            escaped("quotes ' \" é 日本 🐕".as_bytes()),
            "quotes ' \" é 日本 🐕".as_bytes()
        );
        assert_eq!(escaped(b"\t\t"), b"\\t\\t");
    }

    #[test]
    fn copy_rows() {
        let mut out = BytesMut::new();
        let a = Bytes::from_static(b"1");
        let b = Bytes::from_static(b"x\ty");
        copy_row(&mut out, [Some(&a), None, Some(&b)].into_iter());
        copy_row(&mut out, [None].into_iter());
        assert_eq!(&out[..], b"1\t\\N\tx\\ty\n\\N\n");
    }
}
