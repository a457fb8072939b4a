//! pgoutput bytes → [`Message`]: the decoder, whose every read is checked against the bytes
//! actually left.
//!
//! It must never panic or allocate from an unchecked length, whatever the input, and never copies
//! values: they are [`Bytes`] slices of the payload (the module doc of [`super`] says why).

use bytes::Bytes;

use super::*;

/// Decodes one pgoutput message (one XLogData payload).
///
/// Values and message contents in the result share `buf`'s memory; nothing is copied but
/// names.
///
/// # Errors
/// [`DecodeError`] when the payload is empty, truncated, has an unknown tag or a bad byte in a
/// field with fixed values, a name that is not UTF-8, bytes left over, or is a message that
/// cannot appear in `ctx` (a StreamStop outside a streamed block, anything under protocol 1
/// with `in_stream` set, …).
pub fn decode(buf: &Bytes, ctx: Context) -> Result<Message, DecodeError> {
    let Some(&tag) = buf.first() else {
        return Err(DecodeError {
            tag: None,
            offset: 0,
            kind: DecodeErrorKind::Empty,
        });
    };
    let mut r = Reader { buf, pos: 1, tag };
    if !is_known_tag(tag) {
        return Err(r.error(0, DecodeErrorKind::UnknownTag));
    }
    if let Some(reason) = ctx.refuses(tag) {
        return Err(r.error(0, DecodeErrorKind::NotInContext(reason)));
    }
    let streamed_xid = |r: &mut Reader<'_>| -> Result<Option<Xid>, DecodeError> {
        if ctx.carries_xid() {
            r.u32("xid").map(Some)
        } else {
            Ok(None)
        }
    };
    let message = match tag {
        b'B' => Message::Begin(Begin {
            final_lsn: r.lsn("final LSN")?,
            commit_time: r.timestamp("commit time")?,
            xid: r.u32("xid")?,
        }),
        b'C' => Message::Commit(Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit LSN")?,
            end_lsn: r.lsn("end LSN")?,
            commit_time: r.timestamp("commit time")?,
        }),
        b'O' => Message::Origin(Origin {
            lsn: r.lsn("origin LSN")?,
            name: r.cstring("origin name")?,
        }),
        b'R' => Message::Relation(Relation {
            xid: streamed_xid(&mut r)?,
            oid: r.u32("relation oid")?,
            namespace: r.cstring("namespace")?,
            name: r.cstring("relation name")?,
            replica_identity: {
                let at = r.pos;
                let byte = r.u8("replica identity")?;
                ReplicaIdentity::from_byte(byte).ok_or_else(|| {
                    r.bad_byte(at, "replica identity", byte, "'d', 'n', 'f' or 'i'")
                })?
            },
            columns: r.columns()?,
        }),
        b'Y' => Message::Type(Type {
            xid: streamed_xid(&mut r)?,
            oid: r.u32("type oid")?,
            namespace: r.cstring("namespace")?,
            name: r.cstring("type name")?,
        }),
        b'I' => {
            let xid = streamed_xid(&mut r)?;
            let relation = r.u32("relation oid")?;
            r.expect(b'N', "tuple marker", "'N'")?;
            Message::Insert(Insert {
                xid,
                relation,
                new: r.tuple()?,
            })
        }
        b'U' => {
            let xid = streamed_xid(&mut r)?;
            let relation = r.u32("relation oid")?;
            let at = r.pos;
            let old = match r.u8("tuple marker")? {
                b'K' => Some(OldTuple::Key(r.tuple()?)),
                b'O' => Some(OldTuple::Full(r.tuple()?)),
                b'N' => None,
                found => return Err(r.bad_byte(at, "tuple marker", found, "'K', 'O' or 'N'")),
            };
            if old.is_some() {
                r.expect(b'N', "new tuple marker", "'N'")?;
            }
            Message::Update(Update {
                xid,
                relation,
                old,
                new: r.tuple()?,
            })
        }
        b'D' => {
            let xid = streamed_xid(&mut r)?;
            let relation = r.u32("relation oid")?;
            let at = r.pos;
            let old = match r.u8("tuple marker")? {
                b'K' => OldTuple::Key(r.tuple()?),
                b'O' => OldTuple::Full(r.tuple()?),
                found => return Err(r.bad_byte(at, "tuple marker", found, "'K' or 'O'")),
            };
            Message::Delete(Delete { xid, relation, old })
        }
        b'T' => {
            let xid = streamed_xid(&mut r)?;
            let count_at = r.pos;
            let count = r.length("relation count")?;
            let options_at = r.pos;
            let options = r.u8("truncate options")?;
            if options & !(TRUNCATE_CASCADE | TRUNCATE_RESTART_IDENTITY) != 0 {
                return Err(r.bad_byte(
                    options_at,
                    "truncate options",
                    options,
                    "bits 1 (CASCADE) and 2 (RESTART IDENTITY) only",
                ));
            }
            // Each oid is 4 bytes: check them all are there before allocating for them.
            r.ensure_at(count_at, count.saturating_mul(4), "relation oids")?;
            let mut relations = Vec::with_capacity(count);
            for _ in 0..count {
                relations.push(r.u32("relation oid")?);
            }
            Message::Truncate(Truncate {
                xid,
                cascade: options & TRUNCATE_CASCADE != 0,
                restart_identity: options & TRUNCATE_RESTART_IDENTITY != 0,
                relations,
            })
        }
        b'M' => {
            let xid = streamed_xid(&mut r)?;
            let at = r.pos;
            let transactional = match r.u8("message flags")? {
                0 => false,
                1 => true,
                found => return Err(r.bad_byte(at, "message flags", found, "0 or 1")),
            };
            let lsn = r.lsn("message LSN")?;
            let prefix = r.cstring("message prefix")?;
            let length = r.length("content length")?;
            Message::LogicalMessage(LogicalMessage {
                xid,
                transactional,
                lsn,
                prefix,
                content: r.bytes(length, "content")?,
            })
        }
        b'S' => {
            let xid = r.u32("xid")?;
            let at = r.pos;
            let first_segment = match r.u8("first segment")? {
                0 => false,
                1 => true,
                found => return Err(r.bad_byte(at, "first segment", found, "0 or 1")),
            };
            Message::StreamStart(StreamStart { xid, first_segment })
        }
        b'E' => Message::StreamStop,
        b'c' => Message::StreamCommit(StreamCommit {
            xid: r.u32("xid")?,
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit LSN")?,
            end_lsn: r.lsn("end LSN")?,
            commit_time: r.timestamp("commit time")?,
        }),
        b'A' => Message::StreamAbort(StreamAbort {
            xid: r.u32("xid")?,
            subxid: r.u32("subtransaction xid")?,
        }),
        _ => return Err(r.error(0, DecodeErrorKind::UnknownTag)),
    };
    r.finish()?;
    Ok(message)
}

fn is_known_tag(tag: u8) -> bool {
    matches!(
        tag,
        b'B' | b'C'
            | b'O'
            | b'R'
            | b'Y'
            | b'I'
            | b'U'
            | b'D'
            | b'T'
            | b'M'
            | b'S'
            | b'E'
            | b'c'
            | b'A'
    )
}

/// A cursor over one payload. Every read checks the remaining length first.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
    tag: u8,
}

impl Reader<'_> {
    fn error(&self, offset: usize, kind: DecodeErrorKind) -> DecodeError {
        DecodeError {
            tag: Some(self.tag),
            offset,
            kind,
        }
    }

    fn bad_byte(
        &self,
        offset: usize,
        field: &'static str,
        found: u8,
        expected: &'static str,
    ) -> DecodeError {
        self.error(
            offset,
            DecodeErrorKind::BadByte {
                field,
                found,
                expected,
            },
        )
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Fails unless `needed` bytes remain after `from` (a position at or before `pos`, so that
    /// the error points at the count that promised them).
    fn ensure_at(
        &self,
        from: usize,
        needed: usize,
        field: &'static str,
    ) -> Result<(), DecodeError> {
        let remaining = self.remaining();
        if needed > remaining {
            return Err(self.error(
                from,
                DecodeErrorKind::Truncated {
                    field,
                    needed,
                    remaining,
                },
            ));
        }
        Ok(())
    }

    /// Consumes `N` bytes.
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        self.ensure_at(self.pos, N, field)?;
        let mut out = [0; N];
        out.copy_from_slice(&self.buf[self.pos..self.pos + N]);
        self.pos += N;
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_be_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        self.array(field).map(i32::from_be_bytes)
    }

    fn lsn(&mut self, field: &'static str) -> Result<Lsn, DecodeError> {
        self.array(field).map(|b| Lsn(u64::from_be_bytes(b)))
    }

    fn timestamp(&mut self, field: &'static str) -> Result<PgTimestamp, DecodeError> {
        self.array(field)
            .map(|b| PgTimestamp(i64::from_be_bytes(b)))
    }

    /// An `int32` length or count, which PostgreSQL never sends negative.
    fn length(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let at = self.pos;
        let value = self.i32(field)?;
        usize::try_from(value)
            .map_err(|_| self.error(at, DecodeErrorKind::NegativeLength { field, value }))
    }

    fn expect(
        &mut self,
        wanted: u8,
        field: &'static str,
        expected: &'static str,
    ) -> Result<(), DecodeError> {
        let at = self.pos;
        let found = self.u8(field)?;
        if found == wanted {
            Ok(())
        } else {
            Err(self.bad_byte(at, field, found, expected))
        }
    }

    /// `len` bytes as a zero-copy slice of the input.
    fn bytes(&mut self, len: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        self.ensure_at(self.pos, len, field)?;
        let out = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(out)
    }

    /// A NUL-terminated UTF-8 string (the walsender converts names to the client encoding,
    /// which a replication session sets to UTF-8).
    fn cstring(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let start = self.pos;
        let rest = &self.buf[start..];
        let Some(len) = rest.iter().position(|&b| b == 0) else {
            return Err(self.error(start, DecodeErrorKind::Unterminated { field }));
        };
        let text = std::str::from_utf8(&rest[..len]).map_err(|e| {
            self.error(
                start + e.valid_up_to(),
                DecodeErrorKind::InvalidUtf8 { field },
            )
        })?;
        self.pos = start + len + 1;
        Ok(text.to_owned())
    }

    /// A column count: at most [`MAX_COLUMNS`], and at least `min_bytes_each` bytes per column
    /// must remain, so that the vector sized from it is never larger than the input justifies.
    fn column_count(&mut self, min_bytes_each: usize) -> Result<usize, DecodeError> {
        let at = self.pos;
        let count = usize::from(self.u16("column count")?);
        if count > MAX_COLUMNS {
            return Err(self.error(at, DecodeErrorKind::TooManyColumns { count }));
        }
        self.ensure_at(at, count * min_bytes_each, "columns")?;
        Ok(count)
    }

    fn columns(&mut self) -> Result<Vec<Column>, DecodeError> {
        // flags, an empty name's NUL, type oid, typmod.
        let count = self.column_count(1 + 1 + 4 + 4)?;
        let mut columns = Vec::with_capacity(count);
        for _ in 0..count {
            let at = self.pos;
            let part_of_key = match self.u8("column flags")? {
                0 => false,
                1 => true,
                found => {
                    return Err(self.bad_byte(at, "column flags", found, "0 or 1 (part of key)"));
                }
            };
            columns.push(Column {
                part_of_key,
                name: self.cstring("column name")?,
                type_oid: self.u32("column type oid")?,
                type_modifier: self.i32("column type modifier")?,
            });
        }
        Ok(columns)
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let count = self.column_count(1)?;
        let mut values = Vec::with_capacity(count);
        for _ in 0..count {
            let at = self.pos;
            let value = match self.u8("column kind")? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => {
                    let len = self.length("value length")?;
                    Value::Text(self.bytes(len, "text value")?)
                }
                b'b' => {
                    let len = self.length("value length")?;
                    Value::Binary(self.bytes(len, "binary value")?)
                }
                found => return Err(self.error(at, DecodeErrorKind::BadTupleKind { found })),
            };
            values.push(value);
        }
        Ok(Tuple(values))
    }

    fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(self.error(self.pos, DecodeErrorKind::TrailingBytes { count })),
        }
    }
}

#[cfg(test)]
mod tests;
