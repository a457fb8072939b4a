//! Writes the stream index (`changes/index/`, FORMAT.md) as packs are stored, so that restores
//! read a bounded number of objects per window instead of every pack's footer: a small index
//! every `stream.index_window / 16` packs, and a large one over each `stream.index_window`
//! packs once they are all stored. Readers take the large ones and, after the last of them, the
//! small ones: at most 15 small indexes and 15 footers beyond the large windows.
//!
//! The index only accelerates readers: until a window is indexed its packs are read through
//! their footers, so a failed index write is logged and tried again after the next pack, and a
//! crash loses nothing (the next start indexes the packs after the last index).

use crate::repository::index::MAX_SECTIONS;
use crate::repository::pack::PackFooter;
use crate::repository::{PackRef, Repository, RepositoryError, StreamState};

/// How many small windows make a large one.
const SMALL_PER_LARGE: usize = 16;

pub struct Indexer {
    repo: Repository,
    window: usize,
    small: usize,
    /// Consecutive packs since the last large index, with their footers.
    pending: Vec<(PackRef, PackFooter)>,
    /// How many of `pending` the small indexes cover.
    small_until: usize,
    sections: usize,
}

impl Indexer {
    /// Picks up after the packs already stored: the current stream's packs after its last
    /// index (every pack, in a repository written before the index existed) are read once and
    /// indexed window by window; the rest wait for the packs that follow them.
    pub async fn resume(
        repo: &Repository,
        state: &StreamState,
        window: usize,
    ) -> Result<Self, RepositoryError> {
        let window = window.max(1);
        let mut indexer = Self {
            repo: repo.clone(),
            window,
            small: (window / SMALL_PER_LARGE).max(1),
            pending: Vec::new(),
            small_until: 0,
            sections: 0,
        };
        let tail = state.unindexed_tail();
        if tail.len() >= indexer.window {
            tracing::info!(
                packs = tail.len(),
                "indexing the packs stored without a stream index"
            );
        }
        for chunk in tail.chunks(indexer.window) {
            let footers = repo.pack_footers(chunk).await?;
            for (pack, footer) in chunk.iter().cloned().zip(footers) {
                indexer.push(pack, footer);
                indexer.write_due().await?;
            }
        }
        Ok(indexer)
    }

    /// Records a stored pack, and writes the indexes of the windows it completes.
    pub async fn stored(&mut self, pack: PackRef, footer: PackFooter) {
        self.push(pack, footer);
        if let Err(e) = self.write_due().await {
            tracing::warn!(error = %e, packs = self.pending.len(), "storing the stream index failed: trying again after the next pack (restores read these packs' footers meanwhile)");
        }
    }

    fn push(&mut self, pack: PackRef, footer: PackFooter) {
        // An index covers consecutive packs only; a writer that started elsewhere (it cannot
        // now, but an index must never claim a gap) begins a new window.
        if self
            .pending
            .last()
            .is_some_and(|(p, _)| p.end != pack.start)
        {
            self.pending.clear();
            self.sections = 0;
        }
        self.sections += footer.sections.len();
        self.pending.push((pack, footer));
    }

    /// The large index once its window is whole (or holds MAX_SECTIONS sections), else the
    /// small one once its window is.
    async fn write_due(&mut self) -> Result<(), RepositoryError> {
        if self.pending.len() >= self.window || self.sections >= MAX_SECTIONS {
            self.write(0).await?;
            self.pending.clear();
            self.small_until = 0;
            self.sections = 0;
        } else if self.pending.len() - self.small_until >= self.small {
            self.write(self.small_until).await?;
            self.small_until = self.pending.len();
        }
        Ok(())
    }

    /// Stores the index of `pending[from..]`.
    async fn write(&self, from: usize) -> Result<(), RepositoryError> {
        let packs = &self.pending[from..];
        let index = self.repo.put_stream_index(packs).await?;
        tracing::debug!(index = %index.key, packs = packs.len(), bytes = index.size, "stream index stored");
        Ok(())
    }
}
