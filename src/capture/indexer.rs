//! Writes the stream index (`changes/index/`, FORMAT.md) as packs are stored: one index object
//! for every `stream.index_window` consecutive packs, so that restores read a bounded number of
//! objects per window instead of every pack's footer.
//!
//! The index only accelerates readers: until a window is indexed its packs are read through
//! their footers, so a failed index write is logged and tried again after the next pack, and a
//! crash loses nothing (the next start indexes the packs after the last index).

use crate::repository::index::MAX_SECTIONS;
use crate::repository::pack::PackFooter;
use crate::repository::{PackRef, Repository, RepositoryError, StreamState};

pub struct Indexer {
    repo: Repository,
    window: usize,
    /// Consecutive packs not indexed yet, with their footers.
    pending: Vec<(PackRef, PackFooter)>,
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
        let mut indexer = Self {
            repo: repo.clone(),
            window: window.max(1),
            pending: Vec::new(),
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
                if indexer.due() {
                    indexer.write().await?;
                }
            }
        }
        Ok(indexer)
    }

    /// Records a stored pack, and writes the index once a window is complete.
    pub async fn stored(&mut self, pack: PackRef, footer: PackFooter) {
        self.push(pack, footer);
        if self.due()
            && let Err(e) = self.write().await
        {
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

    fn due(&self) -> bool {
        self.pending.len() >= self.window || self.sections >= MAX_SECTIONS
    }

    async fn write(&mut self) -> Result<(), RepositoryError> {
        let index = self.repo.put_stream_index(&self.pending).await?;
        tracing::info!(index = %index.key, packs = self.pending.len(), sections = self.sections, bytes = index.size, "stream index stored");
        self.pending.clear();
        self.sections = 0;
        Ok(())
    }
}
