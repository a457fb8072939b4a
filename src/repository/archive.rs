//! Archive framing: the plaintext inside `global.zst.age` and `tenants/<org>.zst.age`.
//!
//! ```text
//! "UPDOGAR\x01"                                  magic + framing version
//! record*: tag (1 byte) | length (u32 big-endian) | payload
//!   'H' JSON ArchiveHeader   first record: what the archive is (binds it to snapshot + tenant)
//!   'T' JSON TableHeader     a table starts; its COPY columns
//!   'D' bytes                a piece of that table's `COPY … (FORMAT binary)` stream
//!   'E' JSON {"rows": n}     the table ends
//!   'Z' JSON {"tables": n}   last record; anything after it is an error
//! ```
//! The format is described for people (and hand recovery) in FORMAT.md.

use std::io::Read;

use serde::{Deserialize, Serialize};

use super::copy_binary::CopyFormat;

pub const MAGIC: &[u8; 8] = b"UPDOGAR\x01";
/// Readers refuse larger records, so a damaged length cannot make them allocate wildly.
pub const MAX_RECORD: u32 = 16 << 20;
/// Writers cut 'D' records at about this size.
pub const DATA_RECORD: usize = 1 << 20;

pub const TAG_HEADER: u8 = b'H';
pub const TAG_TABLE: u8 = b'T';
pub const TAG_DATA: u8 = b'D';
pub const TAG_TABLE_END: u8 = b'E';
pub const TAG_END: u8 = b'Z';

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArchiveKind {
    Global,
    Tenant,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveHeader {
    pub kind: ArchiveKind,
    pub snapshot: String,
    /// The tenant value for tenant archives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableHeader {
    pub schema: String,
    pub name: String,
    pub columns: Vec<String>,
    #[serde(default)]
    pub format: CopyFormat,
}

#[derive(Debug, Serialize, Deserialize)]
struct TableEnd {
    rows: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct ArchiveEnd {
    tables: u64,
}

/// Bytes of one record's tag and length.
pub fn record_prefix(tag: u8, len: usize) -> [u8; 5] {
    let len = u32::try_from(len).expect("records are cut well below 4 GiB");
    let l = len.to_be_bytes();
    [tag, l[0], l[1], l[2], l[3]]
}

/// A whole JSON record.
pub fn json_record<T: Serialize>(tag: u8, value: &T) -> Vec<u8> {
    let payload = serde_json::to_vec(value).expect("archive records always serialize");
    let mut out = record_prefix(tag, payload.len()).to_vec();
    out.extend_from_slice(&payload);
    out
}

pub fn header_record(header: &ArchiveHeader) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&json_record(TAG_HEADER, header));
    out
}

pub fn table_record(table: &TableHeader) -> Vec<u8> {
    json_record(TAG_TABLE, table)
}

pub fn table_end_record(rows: u64) -> Vec<u8> {
    json_record(TAG_TABLE_END, &TableEnd { rows })
}

pub fn end_record(tables: u64) -> Vec<u8> {
    json_record(TAG_END, &ArchiveEnd { tables })
}

/// What a reader meets, in order.
#[derive(Debug)]
pub enum ArchiveEvent {
    Table(TableHeader),
    Data(Vec<u8>),
    /// End of the current table, with the row count the writer recorded.
    TableEnd {
        rows: u64,
    },
}

/// Pull parser over a decrypted, decompressed archive. Checks the structure as it goes: the
/// magic, record order, JSON payloads and that the archive ends with its end record.
pub struct ArchiveReader<R> {
    inner: R,
    header: ArchiveHeader,
    in_table: bool,
    tables: u64,
    finished: bool,
}

impl<R: Read> ArchiveReader<R> {
    pub fn open(mut inner: R) -> Result<Self, String> {
        let mut magic = [0u8; 8];
        inner
            .read_exact(&mut magic)
            .map_err(|e| format!("reading archive magic: {e}"))?;
        if &magic != MAGIC {
            return Err("not an updog-backup archive (bad magic)".into());
        }
        let (tag, payload) = read_record(&mut inner)?.ok_or("archive ends before its header")?;
        if tag != TAG_HEADER {
            return Err("archive does not start with its header".into());
        }
        let header =
            serde_json::from_slice(&payload).map_err(|e| format!("archive header: {e}"))?;
        Ok(Self {
            inner,
            header,
            in_table: false,
            tables: 0,
            finished: false,
        })
    }

    pub fn header(&self) -> &ArchiveHeader {
        &self.header
    }

    /// The next event, or `None` after a valid end record.
    pub fn next_event(&mut self) -> Result<Option<ArchiveEvent>, String> {
        if self.finished {
            return Ok(None);
        }
        let (tag, payload) =
            read_record(&mut self.inner)?.ok_or("archive is truncated: no end record")?;
        match (tag, self.in_table) {
            (TAG_TABLE, false) => {
                self.in_table = true;
                let table =
                    serde_json::from_slice(&payload).map_err(|e| format!("table header: {e}"))?;
                Ok(Some(ArchiveEvent::Table(table)))
            }
            (TAG_DATA, true) => Ok(Some(ArchiveEvent::Data(payload))),
            (TAG_TABLE_END, true) => {
                self.in_table = false;
                self.tables += 1;
                let end: TableEnd =
                    serde_json::from_slice(&payload).map_err(|e| format!("table end: {e}"))?;
                Ok(Some(ArchiveEvent::TableEnd { rows: end.rows }))
            }
            (TAG_END, false) => {
                let end: ArchiveEnd =
                    serde_json::from_slice(&payload).map_err(|e| format!("archive end: {e}"))?;
                if end.tables != self.tables {
                    return Err(format!(
                        "archive end names {} tables, found {}",
                        end.tables, self.tables
                    ));
                }
                let mut extra = [0u8; 1];
                if self.inner.read(&mut extra).map_err(|e| e.to_string())? != 0 {
                    return Err("bytes after the archive end record".into());
                }
                self.finished = true;
                Ok(None)
            }
            (tag, in_table) => Err(format!(
                "unexpected record {:?} (inside a table: {in_table})",
                tag as char
            )),
        }
    }
}

fn read_record<R: Read>(r: &mut R) -> Result<Option<(u8, Vec<u8>)>, String> {
    let mut prefix = [0u8; 5];
    match r.read_exact(&mut prefix) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
    if len > MAX_RECORD {
        return Err(format!("record of {len} bytes exceeds the limit"));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)
        .map_err(|e| format!("archive is truncated: {e}"))?;
    Ok(Some((prefix[0], payload)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive() -> Vec<u8> {
        let mut v = header_record(&ArchiveHeader {
            kind: ArchiveKind::Tenant,
            snapshot: "s".into(),
            tenant: Some("t".into()),
        });
        v.extend(table_record(&TableHeader {
            schema: "app".into(),
            name: "x".into(),
            columns: vec!["a".into()],
            format: CopyFormat::Binary,
        }));
        v.extend(record_prefix(TAG_DATA, 3));
        v.extend(b"abc");
        v.extend(table_end_record(1));
        v.extend(end_record(1));
        v
    }

    fn read_all(bytes: &[u8]) -> Result<usize, String> {
        let mut r = ArchiveReader::open(bytes)?;
        let mut n = 0;
        while r.next_event()?.is_some() {
            n += 1;
        }
        Ok(n)
    }

    #[test]
    fn round_trip_and_truncation() {
        let bytes = archive();
        assert_eq!(read_all(&bytes).unwrap(), 3);
        for cut in 1..bytes.len() {
            assert!(read_all(&bytes[..cut]).is_err(), "cut at {cut} undetected");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(read_all(&extra).is_err());
    }
}
