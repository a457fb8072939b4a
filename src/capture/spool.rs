//! Local spools for capture: where bytes wait that memory should not hold.
//!
//! - [`BodySpool`]: a pack's sealed sections (ciphertext only) before upload; in memory while
//!   small, in an unlinked temporary file beyond that.
//! - [`TxnSpool`]: a streamed (large, in-progress) transaction's changes until it commits or
//!   aborts. They are compressed and encrypted to an X25519 key generated for the spool and
//!   held only in memory, so the file is useless to anyone who reads the disk, and a crash
//!   leaves nothing readable (the file is unlinked from the start, too).

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::codec::{CodecError, Identities, Sealer, open};
use crate::pg::pgoutput::{self, Message};
use crate::repository::pack::CONTEXT;
use crate::scratch::anonymous_file;
use crate::storage::ByteStream;

/// A body stays in memory up to this size.
const IN_MEMORY: usize = 8 << 20;
/// Messages in flight while a spooled transaction is read back.
const REPLAY_DEPTH: usize = 1024;

#[derive(Debug)]
pub struct BodySpool {
    dir: PathBuf,
    memory: Vec<u8>,
    file: Option<File>,
    len: u64,
}

impl BodySpool {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            memory: Vec::new(),
            file: None,
            len: 0,
        }
    }

    pub fn size(&self) -> u64 {
        self.len
    }

    pub fn append(&mut self, data: &[u8]) -> io::Result<()> {
        if self.file.is_none() && self.memory.len() + data.len() > IN_MEMORY {
            let mut file = anonymous_file(&self.dir, "pack")?;
            file.write_all(&self.memory)?;
            self.memory = Vec::new();
            self.file = Some(file);
        }
        match &mut self.file {
            Some(file) => file.write_all(data)?,
            None => self.memory.extend_from_slice(data),
        }
        self.len += data.len() as u64;
        Ok(())
    }

    /// The bytes, for upload.
    pub fn into_stream(self) -> io::Result<ByteStream> {
        match self.file {
            None => {
                let bytes = Bytes::from(self.memory);
                Ok(Box::pin(futures::stream::once(async move { Ok(bytes) })))
            }
            Some(mut file) => {
                file.flush()?;
                file.seek(SeekFrom::Start(0))?;
                let file = tokio::fs::File::from_std(file);
                Ok(Box::pin(
                    tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).map(|r| r),
                ))
            }
        }
    }
}

/// A streamed transaction's changes, encrypted on disk until its StreamCommit.
pub struct TxnSpool {
    file: File,
    sealer: Sealer,
    identity: age::x25519::Identity,
    /// Subtransactions that aborted: their changes are skipped on replay.
    aborted: HashSet<u32>,
    pub messages: u64,
}

impl std::fmt::Debug for TxnSpool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxnSpool")
            .field("messages", &self.messages)
            .finish()
    }
}

impl TxnSpool {
    pub fn new(dir: &Path) -> Result<Self, CodecError> {
        let identity = age::x25519::Identity::generate();
        // Level 1: the spool is read back once, soon; speed matters more than size.
        let sealer = Sealer::new(&[identity.to_public()], 1)?;
        Ok(Self {
            file: anonymous_file(dir, "txn")?,
            sealer,
            identity,
            aborted: HashSet::new(),
            messages: 0,
        })
    }

    /// Appends a message of subtransaction `xid` (the xid the streamed block gave it).
    pub fn push(&mut self, xid: u32, message: &Message) -> Result<(), CodecError> {
        let encoded = pgoutput::encode(message, CONTEXT);
        let mut record = Vec::with_capacity(8 + encoded.len());
        record.extend_from_slice(&xid.to_le_bytes());
        record.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
        record.extend_from_slice(&encoded);
        self.sealer.write(&record)?;
        if let Some(chunk) = self.sealer.take_output() {
            self.file.write_all(&chunk)?;
        }
        self.messages += 1;
        Ok(())
    }

    pub fn abort_subtransaction(&mut self, xid: u32) {
        self.aborted.insert(xid);
    }

    /// Reads the committed transaction back, skipping aborted subtransactions, on a blocking
    /// thread; messages arrive in order, an error ends the channel.
    pub fn replay(self) -> Result<mpsc::Receiver<Result<Message, CodecError>>, CodecError> {
        let Self {
            mut file,
            sealer,
            identity,
            aborted,
            ..
        } = self;
        let (rest, _) = sealer.finish()?;
        file.write_all(&rest)?;
        file.seek(SeekFrom::Start(0))?;
        let (tx, rx) = mpsc::channel(REPLAY_DEPTH);
        tokio::task::spawn_blocking(move || {
            let identities = Identities::from(vec![identity]);
            let result = (|| -> Result<(), CodecError> {
                let mut plain = io::BufReader::new(open(io::BufReader::new(file), &identities)?);
                loop {
                    let mut head = [0u8; 8];
                    match plain.read_exact(&mut head) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                        Err(e) => return Err(e.into()),
                    }
                    let xid = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
                    let len = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
                    let mut payload = vec![0u8; len as usize];
                    plain.read_exact(&mut payload)?;
                    if aborted.contains(&xid) {
                        continue;
                    }
                    let message = pgoutput::decode(&Bytes::from(payload), CONTEXT)
                        .map_err(|e| CodecError::Corrupt(format!("spooled change: {e}")))?;
                    if tx.blocking_send(Ok(message)).is_err() {
                        return Ok(());
                    }
                }
            })();
            if let Err(e) = result {
                let _ = tx.blocking_send(Err(e));
            }
        });
        Ok(rx)
    }
}
