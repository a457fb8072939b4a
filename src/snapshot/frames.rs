//! A sweep's scratch files: frames of rows, each compressed (zstd -1: about a fifth of the
//! bytes to seal, write and read back) and sealed with ChaCha20-Poly1305 to a key held only in
//! memory, appended to an unlinked file. No plaintext tenant data reaches the disk.
//!
//! A frame holds rows of one tenant table: records of (tenant, row), the tenant numbered from
//! its partition's first. On disk: its sealed length, its raw length and its table's index in
//! a clear header (the table is authenticated as associated data), then the sealed bytes. The
//! nonce is the file's number and the frame's: never reused under one key.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use chacha20poly1305::aead::{AeadInPlace, KeyInit, OsRng};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};

use crate::scratch::anonymous_file;

/// A frame's length sealed, its length raw, its table.
const HEAD: u64 = 12;
const LEVEL: i32 = 1;

/// The key a set of frame files is sealed with (made here, never stored).
pub struct FrameKey(ChaCha20Poly1305);

impl FrameKey {
    pub fn generate() -> Self {
        Self(ChaCha20Poly1305::new(&ChaCha20Poly1305::generate_key(
            &mut OsRng,
        )))
    }
}

/// A frame compressed, ready to be sealed into a file.
pub struct Compressed {
    bytes: Vec<u8>,
    raw: u32,
}

/// Compresses `frame` and empties it (its room is kept for the next rows).
pub fn compress(frame: &mut Vec<u8>) -> Result<Compressed, String> {
    let bytes = zstd::bulk::compress(frame, LEVEL)
        .map_err(|e| format!("compressing a scratch frame: {e}"))?;
    let raw = u32::try_from(frame.len()).map_err(|_| "a scratch frame of 4 GiB or more")?;
    frame.clear();
    Ok(Compressed { bytes, raw })
}

/// Appends a frame's record of a row of tenant `tenant` (numbered from its partition's first).
pub fn push_record(frame: &mut Vec<u8>, tenant: u32, pieces: &[&[u8]]) -> Result<(), String> {
    let len: usize = pieces.iter().map(|p| p.len()).sum();
    let len = u32::try_from(len).map_err(|_| "a row of 4 GiB or more")?;
    frame.extend_from_slice(&tenant.to_le_bytes());
    frame.extend_from_slice(&len.to_le_bytes());
    for piece in pieces {
        frame.extend_from_slice(piece);
    }
    Ok(())
}

/// Frames sealed into an unlinked file, read back in order or a table at a time.
pub struct FrameFile {
    file: File,
    /// Distinguishes the nonces of files sealed with one key.
    id: u32,
    /// Frames written: the next one's nonce.
    frames: u64,
    /// Bytes written.
    end: u64,
}

impl FrameFile {
    /// A new file in `dir`, number `id` among those sealed with one key.
    pub fn create(dir: &Path, id: u32) -> std::io::Result<Self> {
        Ok(Self {
            file: anonymous_file(dir, "sweep")?,
            id,
            frames: 0,
            end: 0,
        })
    }

    fn nonce(&self, frame: u64) -> Nonce {
        let mut nonce = [0u8; 12];
        nonce[..4].copy_from_slice(&self.id.to_le_bytes());
        nonce[4..].copy_from_slice(&frame.to_le_bytes());
        nonce.into()
    }

    /// Seals a frame of rows of tenant table `table` and appends it.
    pub fn append(&mut self, key: &FrameKey, table: u32, frame: Compressed) -> Result<(), String> {
        let Compressed { mut bytes, raw } = frame;
        let table = table.to_le_bytes();
        key.0
            .encrypt_in_place(&self.nonce(self.frames), &table, &mut bytes)
            .map_err(|_| "sealing a scratch frame failed".to_string())?;
        let sealed = u32::try_from(bytes.len()).map_err(|_| "a scratch frame of 4 GiB or more")?;
        let file = &mut self.file;
        let write = (|| {
            file.write_all(&sealed.to_le_bytes())?;
            file.write_all(&raw.to_le_bytes())?;
            file.write_all(&table)?;
            file.write_all(&bytes)
        })();
        write.map_err(|e| format!("writing a scratch file: {e}"))?;
        self.frames += 1;
        self.end += HEAD + bytes.len() as u64;
        Ok(())
    }

    /// The frames in the order they were written, or only those of table `table`.
    pub fn frames<'a>(&'a self, key: &'a FrameKey, table: Option<u32>) -> Frames<'a> {
        Frames {
            file: self,
            key,
            table,
            at: 0,
            number: 0,
        }
    }
}

pub struct Frames<'a> {
    file: &'a FrameFile,
    key: &'a FrameKey,
    table: Option<u32>,
    at: u64,
    number: u64,
}

impl Frames<'_> {
    /// The next frame: its table and its records (see [`records`]).
    pub fn next(&mut self) -> Result<Option<(u32, Vec<u8>)>, String> {
        let read = |e: std::io::Error| format!("reading a scratch file: {e}");
        let file = &self.file.file;
        while self.at < self.file.end {
            let mut head = [0u8; HEAD as usize];
            file.read_exact_at(&mut head, self.at).map_err(read)?;
            let word = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().expect("4 bytes"));
            let (len, raw, table) = (word(0) as usize, word(4) as usize, word(8));
            let (at, number) = (self.at, self.number);
            self.at += HEAD + len as u64;
            self.number += 1;
            if self.table.is_some_and(|t| t != table) {
                continue;
            }
            let mut sealed = vec![0; len];
            file.read_exact_at(&mut sealed, at + HEAD).map_err(read)?;
            self.key
                .0
                .decrypt_in_place(&self.file.nonce(number), &table.to_le_bytes(), &mut sealed)
                .map_err(|_| "a scratch frame does not open with its key (changed on disk?)")?;
            let records = zstd::bulk::decompress(&sealed, raw)
                .map_err(|e| format!("a scratch frame does not decompress: {e}"))?;
            return Ok(Some((table, records)));
        }
        Ok(None)
    }
}

/// A frame's records: each row with its tenant's number.
pub fn records(mut frame: &[u8]) -> impl Iterator<Item = Result<(u32, &[u8]), String>> {
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
            Some((tenant, row))
        })();
        if record.is_none() {
            frame = &[];
        }
        Some(record.ok_or_else(|| "a scratch frame is truncated".to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(records: &[(u32, &[u8])]) -> Compressed {
        let mut frame = Vec::new();
        for (tenant, row) in records {
            push_record(&mut frame, *tenant, &[row]).unwrap();
        }
        let compressed = compress(&mut frame).unwrap();
        assert!(frame.is_empty(), "the frame is emptied for the next rows");
        compressed
    }

    fn all(frames: &mut Frames<'_>) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some((table, frame)) = frames.next().unwrap() {
            for r in records(&frame) {
                let (tenant, row) = r.unwrap();
                out.push((table, tenant, row.to_vec()));
            }
        }
        out
    }

    #[test]
    fn frames_read_back_in_order_or_by_table_and_nothing_plain_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let key = FrameKey::generate();
        let mut file = FrameFile::create(dir.path(), 7).unwrap();
        // Incompressible: zstd would store it as it is, only sealing hides it.
        let secret: Vec<u8> = (0..500).map(|_| fastrand::u8(..)).collect();
        file.append(&key, 0, frame(&[(0, &secret), (1, b"c1")]))
            .unwrap();
        file.append(&key, 4, frame(&[(1, b"c2")])).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "unlinked"
        );

        let mut on_disk = vec![0; file.end as usize];
        file.file.read_exact_at(&mut on_disk, 0).unwrap();
        assert!(!on_disk.windows(16).any(|w| w == &secret[..16]));

        assert_eq!(
            all(&mut file.frames(&key, None)),
            [
                (0, 0, secret.clone()),
                (0, 1, b"c1".to_vec()),
                (4, 1, b"c2".to_vec())
            ]
        );
        assert_eq!(
            all(&mut file.frames(&key, Some(4))),
            [(4, 1, b"c2".to_vec())]
        );
        assert!(all(&mut file.frames(&key, Some(1))).is_empty());
        assert!(
            file.frames(&FrameKey::generate(), None).next().is_err(),
            "another key opens nothing"
        );
    }

    #[test]
    fn a_changed_frame_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = FrameKey::generate();
        let mut file = FrameFile::create(dir.path(), 0).unwrap();
        file.append(&key, 2, frame(&[(0, b"a1")])).unwrap();
        // The table in the clear header is authenticated too.
        file.file.write_all_at(&3u32.to_le_bytes(), 8).unwrap();
        let error = file.frames(&key, None).next().unwrap_err();
        assert!(error.contains("does not open"), "{error}");
    }

    #[test]
    fn truncated_records_are_refused() {
        let mut frame = Vec::new();
        push_record(&mut frame, 0, &[b"abc"]).unwrap();
        let out: Vec<_> = records(&frame[..frame.len() - 1]).collect();
        assert_eq!(out.len(), 1);
        assert!(out[0].is_err());
    }
}
