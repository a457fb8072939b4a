//! Streaming checkers for PostgreSQL's COPY formats: count rows and validate the framing
//! across arbitrary chunk boundaries, without decoding any value. Used to count rows on
//! export and to parse archives in `verify --deep`.
//!
//! Binary is the default. Tables with a column whose binary form embeds a type OID that
//! differs between databases (arrays of user-defined types, composite types) travel in text
//! format, which names types by value instead.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyFormat {
    #[default]
    Binary,
    Text,
}

impl CopyFormat {
    /// The `COPY … (FORMAT …)` option.
    pub fn sql(self) -> &'static str {
        match self {
            Self::Binary => "binary",
            Self::Text => "text",
        }
    }
}

/// Row counting for either format.
#[derive(Debug)]
pub enum CopyChecker {
    Binary(CopyBinaryChecker),
    /// Text rows end with a newline (newlines inside values are escaped as `\n`).
    Text {
        rows: u64,
        at_row_start: bool,
    },
}

impl CopyChecker {
    pub fn new(format: CopyFormat) -> Self {
        match format {
            CopyFormat::Binary => Self::Binary(CopyBinaryChecker::default()),
            CopyFormat::Text => Self::Text {
                rows: 0,
                at_row_start: true,
            },
        }
    }

    pub fn feed(&mut self, data: &[u8]) -> Result<(), String> {
        match self {
            Self::Binary(c) => c.feed(data),
            Self::Text { rows, at_row_start } => {
                if let Some(last) = data.last() {
                    *rows += data.iter().filter(|b| **b == b'\n').count() as u64;
                    *at_row_start = *last == b'\n';
                }
                Ok(())
            }
        }
    }

    pub fn rows(&self) -> u64 {
        match self {
            Self::Binary(c) => c.rows(),
            Self::Text { rows, .. } => *rows,
        }
    }

    pub fn is_complete(&self) -> bool {
        match self {
            Self::Binary(c) => c.is_complete(),
            Self::Text { at_row_start, .. } => *at_row_start,
        }
    }
}

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Signature (11) + flags (4) + header extension length (4).
    Header,
    HeaderExtension(u32),
    TupleStart,
    FieldLength {
        remaining_fields: u16,
    },
    FieldData {
        remaining_fields: u16,
        remaining_bytes: u32,
    },
    Done,
}

#[derive(Debug)]
pub struct CopyBinaryChecker {
    state: State,
    /// Bytes of a fixed-size item split across chunks.
    partial: Vec<u8>,
    rows: u64,
}

impl Default for CopyBinaryChecker {
    fn default() -> Self {
        Self {
            state: State::Header,
            partial: Vec::with_capacity(19),
            rows: 0,
        }
    }
}

impl CopyBinaryChecker {
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// True once the trailer has been seen.
    pub fn is_complete(&self) -> bool {
        self.state == State::Done
    }

    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), String> {
        while !data.is_empty() {
            match self.state {
                State::Done => return Err("bytes after the COPY trailer".into()),
                State::FieldData {
                    remaining_fields,
                    remaining_bytes,
                } => {
                    let take = (remaining_bytes as usize).min(data.len());
                    data = &data[take..];
                    let left = remaining_bytes - take as u32;
                    self.state = if left > 0 {
                        State::FieldData {
                            remaining_fields,
                            remaining_bytes: left,
                        }
                    } else {
                        self.after_field(remaining_fields)
                    };
                }
                State::HeaderExtension(left) => {
                    let take = (left as usize).min(data.len());
                    data = &data[take..];
                    let left = left - take as u32;
                    self.state = if left > 0 {
                        State::HeaderExtension(left)
                    } else {
                        State::TupleStart
                    };
                }
                State::Header | State::TupleStart | State::FieldLength { .. } => {
                    let need = match self.state {
                        State::Header => 19,
                        State::TupleStart => 2,
                        _ => 4,
                    };
                    let take = (need - self.partial.len()).min(data.len());
                    self.partial.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.partial.len() == need {
                        // Moved out and back so the buffer is reused, not reallocated per field.
                        let item = std::mem::take(&mut self.partial);
                        self.state = self.complete_item(&item)?;
                        self.partial = item;
                        self.partial.clear();
                    }
                }
            }
        }
        Ok(())
    }

    fn after_field(&mut self, remaining_fields: u16) -> State {
        if remaining_fields == 0 {
            self.rows += 1;
            State::TupleStart
        } else {
            State::FieldLength { remaining_fields }
        }
    }

    fn complete_item(&mut self, item: &[u8]) -> Result<State, String> {
        Ok(match self.state {
            State::Header => {
                if &item[..11] != SIGNATURE {
                    return Err("missing binary COPY signature".into());
                }
                let extension = u32::from_be_bytes([item[15], item[16], item[17], item[18]]);
                if extension > 0 {
                    State::HeaderExtension(extension)
                } else {
                    State::TupleStart
                }
            }
            State::TupleStart => {
                let fields = i16::from_be_bytes([item[0], item[1]]);
                match fields {
                    -1 => State::Done,
                    0 => {
                        self.rows += 1;
                        State::TupleStart
                    }
                    n if n > 0 => State::FieldLength {
                        remaining_fields: n as u16,
                    },
                    n => return Err(format!("invalid field count {n}")),
                }
            }
            State::FieldLength { remaining_fields } => {
                let len = i32::from_be_bytes([item[0], item[1], item[2], item[3]]);
                let remaining_fields = remaining_fields - 1;
                match len {
                    -1 => self.after_field(remaining_fields),
                    0 => self.after_field(remaining_fields),
                    n if n > 0 => State::FieldData {
                        remaining_fields,
                        remaining_bytes: n as u32,
                    },
                    n => return Err(format!("invalid field length {n}")),
                }
            }
            State::HeaderExtension(_) | State::FieldData { .. } | State::Done => {
                unreachable!("not a fixed-size item")
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut v = SIGNATURE.to_vec();
        v.extend_from_slice(&0u32.to_be_bytes());
        v.extend_from_slice(&0u32.to_be_bytes());
        for row in 0..3u8 {
            v.extend_from_slice(&2i16.to_be_bytes());
            v.extend_from_slice(&1i32.to_be_bytes());
            v.push(row);
            v.extend_from_slice(&(-1i32).to_be_bytes());
        }
        v.extend_from_slice(&(-1i16).to_be_bytes());
        v
    }

    #[test]
    fn counts_rows_across_any_split() {
        let data = sample();
        for split in 1..data.len() {
            let mut c = CopyBinaryChecker::default();
            for chunk in data.chunks(split) {
                c.feed(chunk).unwrap();
            }
            assert!(c.is_complete());
            assert_eq!(c.rows(), 3);
        }
    }

    #[test]
    fn rejects_garbage_and_detects_truncation() {
        let mut c = CopyBinaryChecker::default();
        assert!(c.feed(b"not a copy stream at all").is_err());
        let data = sample();
        let mut c = CopyBinaryChecker::default();
        c.feed(&data[..data.len() - 2]).unwrap();
        assert!(!c.is_complete());
    }
}
