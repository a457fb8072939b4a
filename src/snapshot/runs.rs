//! A sweep's rows, cut by tenant: each tenant table is exported by one `COPY` whose rows
//! carry their tenant's value first ([`Catalog::sweep_query`]). [`Splitter`] cuts that stream
//! into rows; each tenant's rows of a table, without the tenant field, form its run, so that
//! every tenant's archive can be written afterwards as if its rows had been exported alone
//! (binary COPY streams get their own header and trailer). [`Gather`] collects a group of
//! tenants' rows by tenant in memory, within a budget.
//!
//! [`Catalog::sweep_query`]: crate::source::catalog::Catalog::sweep_query

use crate::repository::copy_binary::CopyFormat;

/// The header every binary COPY stream starts with (signature, no flags, no extension).
pub const BINARY_HEADER: &[u8; 19] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The trailer ending a binary COPY stream (a field count of -1).
pub const BINARY_TRAILER: &[u8; 2] = &[0xff, 0xff];

/// Cuts a COPY stream (text or binary) whose rows start with a tenant field into rows.
#[derive(Debug)]
pub struct Splitter {
    format: CopyFormat,
    /// Binary: the stream's header is still to come.
    header: bool,
    /// Binary: the trailer came; nothing may follow.
    done: bool,
    /// The beginning of a row that continues in the next chunk.
    carry: Vec<u8>,
}

impl Splitter {
    pub fn new(format: CopyFormat) -> Self {
        Self {
            format,
            header: format == CopyFormat::Binary,
            done: false,
            carry: Vec::new(),
        }
    }

    /// Feeds one chunk of the stream; `row(tenant, pieces)` is called for every complete
    /// row with its tenant field (text: as COPY wrote it; binary: the value's bytes) and the
    /// pieces that make up the row without it.
    pub fn feed(
        &mut self,
        chunk: &[u8],
        mut row: impl FnMut(&[u8], &[&[u8]]) -> Result<(), String>,
    ) -> Result<(), String> {
        // The server sends a row per message: the carry is usually empty and the chunk is
        // read in place.
        let mut carried = std::mem::take(&mut self.carry);
        let data: &[u8] = if carried.is_empty() {
            chunk
        } else {
            carried.extend_from_slice(chunk);
            &carried
        };
        let used = match self.format {
            CopyFormat::Text => split_text(data, &mut row)?,
            CopyFormat::Binary => self.split_binary(data, &mut row)?,
        };
        let rest = &data[used..];
        if !rest.is_empty() {
            self.carry = rest.to_vec();
        }
        Ok(())
    }

    /// Checks that the stream ended where a COPY stream ends.
    pub fn finish(&self) -> Result<(), String> {
        if !self.carry.is_empty() {
            return Err("COPY stream ended inside a row".into());
        }
        if self.format == CopyFormat::Binary && !self.done {
            return Err("COPY stream ended without its trailer".into());
        }
        Ok(())
    }

    fn split_binary(
        &mut self,
        data: &[u8],
        row: &mut impl FnMut(&[u8], &[&[u8]]) -> Result<(), String>,
    ) -> Result<usize, String> {
        let mut at = 0;
        if self.header {
            if data.len() < 19 {
                return Ok(0);
            }
            if data[..11] != BINARY_HEADER[..11] {
                return Err("missing binary COPY signature".into());
            }
            let extension = u32::from_be_bytes(data[15..19].try_into().expect("4 bytes")) as usize;
            if data.len() < 19 + extension {
                return Ok(0);
            }
            at = 19 + extension;
            self.header = false;
        }
        while at < data.len() {
            if self.done {
                return Err("bytes after the COPY trailer".into());
            }
            let tuple = &data[at..];
            if tuple.len() < 2 {
                break;
            }
            let fields = i16::from_be_bytes([tuple[0], tuple[1]]);
            if fields == -1 {
                self.done = true;
                at += 2;
                continue;
            }
            if fields < 1 {
                return Err(format!("a row with {fields} fields has no tenant field"));
            }
            // Walk the field lengths; stop if the row is not complete yet.
            let mut end = 2;
            let mut tenant = None;
            let mut complete = true;
            for field in 0..fields {
                let Some(len) = tuple.get(end..end + 4) else {
                    complete = false;
                    break;
                };
                let len = i32::from_be_bytes(len.try_into().expect("4 bytes"));
                end += 4;
                if len < 0 {
                    if field == 0 {
                        return Err("a row without a tenant value".into());
                    }
                    continue;
                }
                let len = len as usize;
                if tuple.len() < end + len {
                    complete = false;
                    break;
                }
                if field == 0 {
                    tenant = Some(&tuple[end..end + len]);
                }
                end += len;
            }
            if !complete {
                break;
            }
            let tenant = tenant.expect("a complete row has its first field");
            let rest_start = 2 + 4 + tenant.len();
            let count = (fields - 1).to_be_bytes();
            row(tenant, &[&count, &tuple[rest_start..end]])?;
            at += end;
        }
        Ok(at)
    }
}

fn split_text(
    data: &[u8],
    row: &mut impl FnMut(&[u8], &[&[u8]]) -> Result<(), String>,
) -> Result<usize, String> {
    let mut at = 0;
    while let Some(newline) = memchr::memchr(b'\n', &data[at..]) {
        let line = &data[at..at + newline + 1];
        let tab = memchr::memchr(b'\t', line).ok_or("a row without a tenant field")?;
        let tenant = &line[..tab];
        if tenant == b"\\N" {
            return Err("a row without a tenant value".into());
        }
        row(tenant, &[&line[tab + 1..]])?;
        at += newline + 1;
    }
    Ok(at)
}

/// A tenant value as text COPY writes it: backslash escapes for the characters that would
/// break the row apart.
pub fn text_field(value: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    for b in value.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0x0b => out.extend_from_slice(b"\\v"),
            _ => out.push(b),
        }
    }
    out
}

/// One tenant's consecutive rows of one table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// The tenant's position in its group.
    pub tenant: u32,
    pub len: u64,
    pub rows: u64,
}

/// One table's rows of a group of tenants, in the order they come, gathered by tenant in
/// memory.
#[derive(Debug)]
pub struct Gather {
    /// Per tenant of the group: its rows and how many.
    tenants: Vec<(Vec<u8>, u64)>,
}

impl Gather {
    /// For a group of `tenants`.
    pub fn new(tenants: usize) -> Self {
        Self {
            tenants: vec![(Vec::new(), 0); tenants],
        }
    }

    /// Adds a row of tenant `tenant` if memory allows it (what its buffer grows by is taken
    /// from `memory`); `false`: it does not fit, nothing was taken.
    pub fn push(&mut self, tenant: u32, pieces: &[&[u8]], memory: &mut usize) -> bool {
        let (buffer, rows) = &mut self.tenants[tenant as usize];
        let size: usize = pieces.iter().map(|p| p.len()).sum();
        if buffer.capacity() - buffer.len() < size {
            let capacity = (buffer.len() + size).max(2 * buffer.capacity()).max(256);
            let growth = capacity - buffer.capacity();
            if growth > *memory {
                return false;
            }
            *memory -= growth;
            buffer.reserve_exact(capacity - buffer.len());
        }
        for piece in pieces {
            buffer.extend_from_slice(piece);
        }
        *rows += 1;
        true
    }

    /// The tenants' runs, in tenant order, to be read back.
    pub fn into_runs(self) -> RunReader {
        let mut runs = Vec::new();
        let mut blocks = std::collections::VecDeque::new();
        for (tenant, (buffer, rows)) in self.tenants.into_iter().enumerate() {
            if rows > 0 {
                runs.push(Run {
                    tenant: tenant as u32,
                    len: buffer.len() as u64,
                    rows,
                });
                blocks.push_back(buffer);
            }
        }
        RunReader {
            runs: runs.into_iter().peekable(),
            blocks,
        }
    }
}

/// Reads a table's runs back, tenant by tenant.
pub struct RunReader {
    runs: std::iter::Peekable<std::vec::IntoIter<Run>>,
    /// A run each, freed as it is read.
    blocks: std::collections::VecDeque<Vec<u8>>,
}

impl RunReader {
    /// The run of tenant `tenant` and its bytes, if it has one (tenants must be asked for in
    /// order).
    pub fn next_for(&mut self, tenant: u32) -> Option<(Run, Vec<u8>)> {
        let run = self.runs.next_if(|run| run.tenant == tenant)?;
        Some((run, self.blocks.pop_front().expect("a block per run")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary_row(fields: &[Option<&[u8]>]) -> Vec<u8> {
        let mut out = (fields.len() as i16).to_be_bytes().to_vec();
        for f in fields {
            match f {
                Some(v) => {
                    out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    out.extend_from_slice(v);
                }
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        out
    }

    fn split_all(format: CopyFormat, stream: &[u8], chunk: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut splitter = Splitter::new(format);
        let mut rows = Vec::new();
        for piece in stream.chunks(chunk) {
            splitter
                .feed(piece, |tenant, pieces| {
                    rows.push((tenant.to_vec(), pieces.concat()));
                    Ok(())
                })
                .unwrap();
        }
        splitter.finish().unwrap();
        rows
    }

    #[test]
    fn binary_rows_lose_their_tenant_field_whatever_the_chunking() {
        let mut stream = BINARY_HEADER.to_vec();
        stream.extend(binary_row(&[Some(b"a"), Some(b"xy"), None]));
        stream.extend(binary_row(&[Some(b"bb"), Some(b"")]));
        stream.extend_from_slice(BINARY_TRAILER);
        let expected = vec![
            (b"a".to_vec(), binary_row(&[Some(b"xy"), None])),
            (b"bb".to_vec(), binary_row(&[Some(b"")])),
        ];
        for chunk in [1, 2, 3, 7, 100] {
            assert_eq!(split_all(CopyFormat::Binary, &stream, chunk), expected);
        }
    }

    #[test]
    fn text_rows_lose_their_tenant_field() {
        let stream = b"a\t1\t\\N\nbb\tx\\ty\n";
        for chunk in [1, 4, 100] {
            assert_eq!(
                split_all(CopyFormat::Text, stream, chunk),
                vec![
                    (b"a".to_vec(), b"1\t\\N\n".to_vec()),
                    (b"bb".to_vec(), b"x\\ty\n".to_vec())
                ]
            );
        }
        assert_eq!(text_field("a\tb\\c\n"), b"a\\tb\\\\c\\n");
    }

    #[test]
    fn truncated_streams_and_missing_tenants_are_refused() {
        let mut splitter = Splitter::new(CopyFormat::Binary);
        let mut stream = BINARY_HEADER.to_vec();
        stream.extend(binary_row(&[Some(b"a"), Some(b"xy")]));
        splitter
            .feed(&stream[..stream.len() - 1], |_, _| Ok(()))
            .unwrap();
        assert!(splitter.finish().is_err());

        let mut splitter = Splitter::new(CopyFormat::Binary);
        let mut stream = BINARY_HEADER.to_vec();
        stream.extend(binary_row(&[None, Some(b"xy")]));
        assert!(splitter.feed(&stream, |_, _| Ok(())).is_err());

        let mut splitter = Splitter::new(CopyFormat::Text);
        assert!(splitter.feed(b"\\N\tx\n", |_, _| Ok(())).is_err());
    }

    fn read_back(gather: Gather, tenants: u32) -> Vec<(u32, Vec<u8>)> {
        let mut reader = gather.into_runs();
        (0..tenants)
            .filter_map(|t| reader.next_for(t))
            .map(|(run, bytes)| {
                assert_eq!(run.len, bytes.len() as u64);
                (run.tenant, bytes)
            })
            .collect()
    }

    #[test]
    fn gathered_rows_read_back_by_tenant_and_memory_is_respected() {
        let mut memory = 10_000;
        let mut gather = Gather::new(6);
        for (tenant, row) in [
            (5u32, &b"secret"[..]),
            (0, b"one"),
            (2, b"three"),
            (0, b"two"),
        ] {
            assert!(gather.push(tenant, &[row], &mut memory));
        }
        assert_eq!(
            read_back(gather, 6),
            vec![
                (0, b"onetwo".to_vec()),
                (2, b"three".to_vec()),
                (5, b"secret".to_vec())
            ]
        );
        let mut memory = 300;
        let mut gather = Gather::new(2);
        assert!(gather.push(0, &[&[1; 200]], &mut memory));
        assert!(
            !gather.push(1, &[&[2; 200]], &mut memory),
            "over the budget"
        );
        assert_eq!(
            memory, 44,
            "only what the first row took (its buffer's 256 bytes)"
        );
    }
}
