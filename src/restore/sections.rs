//! The change sections a replay reads, fetched once before anything is created.
//!
//! Every section of the tenant and every global one after the base snapshot is downloaded
//! concurrently (at most `storage.concurrency` at once) into an unlinked local file, as it is
//! stored: age ciphertext, so no plaintext reaches the disk. Each is then checked as the replay
//! will read it (digest, decryption, framing, its header's pack, tenant and position), so a
//! damaged or missing section fails the restore before the recovery database exists; the replay
//! reads them back from the file instead of asking the store a second time. Memory holds no
//! section whole, and a busy tenant's thousands of sections cost round trips in parallel rather
//! than one after another.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use tokio::sync::mpsc;

use super::changes::ChangePlan;
use crate::codec::Identities;
use crate::pg::pgoutput::Message;
use crate::repository::pack::SectionEntry;
use crate::repository::{Repository, RepositoryError};
use crate::storage::StorageError;

/// The fetched sections: where each one's stored bytes are in the local file.
pub struct Fetched {
    file: Arc<File>,
    /// `(pack's position in the plan, section's position in its footer)` → offset in the file.
    at: HashMap<(usize, usize), u64>,
    pub sections: usize,
    pub bytes: u64,
    /// Messages the sections hold (decoded once to check them).
    pub messages: u64,
}

/// A range of the local file, read from a blocking thread.
struct Region {
    file: Arc<File>,
    pos: u64,
    end: u64,
}

impl Read for Region {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = buf.len().min((self.end - self.pos) as usize);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Downloads and checks every section `plan` replays (those of packs after the base).
pub async fn fetch(
    repo: &Repository,
    plan: &ChangePlan,
    identities: &Arc<Identities>,
    dir: &Path,
) -> Result<Fetched, RepositoryError> {
    let file = Arc::new(
        crate::scratch::anonymous_file(dir, "sections").map_err(|source| StorageError::Io {
            key: format!("a scratch file in {}", dir.display()),
            source,
        })?,
    );
    let mut at = HashMap::new();
    let mut wanted: Vec<(usize, usize, &SectionEntry, u64)> = Vec::new();
    let mut bytes = 0u64;
    for (i, view) in plan.packs.iter().enumerate() {
        if view.pack.end <= plan.from {
            continue;
        }
        for (index, entry) in &view.sections {
            at.insert((i, *index), bytes);
            wanted.push((i, *index, entry, bytes));
            bytes += entry.length;
        }
    }
    let reads: Vec<_> = wanted
        .iter()
        .map(|&(i, index, entry, offset)| {
            let key = &plan.packs[i].pack.key;
            let file = file.clone();
            async move {
                repo.fetch_section(key, entry, &file, offset).await?;
                let region = Region {
                    file,
                    pos: offset,
                    end: offset + entry.length,
                };
                let mut rx = repo.decode_section(region, key, index, entry, identities.clone())?;
                let mut messages = 0u64;
                while let Some(m) = rx.recv().await {
                    m?;
                    messages += 1;
                }
                Ok::<_, RepositoryError>(messages)
            }
        })
        .collect();
    let messages = futures::stream::iter(reads)
        .buffer_unordered(repo.concurrency())
        .try_fold(0u64, |total, n| async move { Ok(total + n) })
        .await?;
    Ok(Fetched {
        file,
        at,
        sections: wanted.len(),
        bytes,
        messages,
    })
}

impl Fetched {
    /// The decoded messages of a fetched section (checked again as they are read).
    pub fn section(
        &self,
        repo: &Repository,
        plan: &ChangePlan,
        pack: usize,
        index: usize,
        entry: &SectionEntry,
        identities: Arc<Identities>,
    ) -> Result<mpsc::Receiver<Result<Message, RepositoryError>>, RepositoryError> {
        let key = &plan.packs[pack].pack.key;
        let Some(&pos) = self.at.get(&(pack, index)) else {
            return Err(RepositoryError::Archive {
                key: format!("{key} section {index}"),
                message: "was not fetched before the replay (a bug)".into(),
            });
        };
        let region = Region {
            file: self.file.clone(),
            pos,
            end: pos + entry.length,
        };
        repo.decode_section(region, key, index, entry, identities)
    }
}
