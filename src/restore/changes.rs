//! Reading one tenant's captured changes back for a point-in-time restore.
//!
//! For each pack after the base snapshot, the tenant's sections and the global ones (which the
//! stream index or the pack's footer named, fetched beforehand: see `sections`). Both are
//! sequences of whole transactions in commit order; they are merged by commit LSN. Transactions that committed before the
//! snapshot's consistent LSN are already in it and are skipped; replay stops at the first
//! transaction that committed after the target time (PostgreSQL's inclusive
//! `recovery_target_time`).
//!
//! A transaction in both sections (a TRUNCATE while the tenant also changed rows) carries the
//! TRUNCATEs of tenant tables inline in the tenant's section, in their original order, so the
//! global section's copies are skipped for it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

use super::replay::{ReplayError, Replayer};
use super::sections::Fetched;
use crate::codec::Identities;
use crate::pg::Lsn;
use crate::pg::pgoutput::{Begin, Message};
use crate::repository::manifest::Scope;
use crate::repository::pack::SectionEntry;
use crate::repository::{Manifest, PackView, Repository, RepositoryError};
use crate::retry::{Classify, ErrorClass};

#[derive(Debug, thiserror::Error)]
pub enum ChangesError {
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error("{key}: {message}")]
    Structure { key: String, message: String },
}

/// Changes applied between two commits of the replay (at the first transaction boundary
/// after): bounds how many versions of one row a transaction accumulates (see
/// [`Replayer::commit`]), at one commit per this many changes.
const COMMIT_EVERY: u64 = 5_000;

/// What a replay runs over.
#[derive(Debug, Clone)]
pub struct ChangePlan {
    /// What the tenant reads of each pack: its sections and the global ones.
    pub packs: Vec<PackView>,
    /// The base snapshot's consistent LSN: earlier commits are in it.
    pub from: Lsn,
    /// Apply transactions that committed at or before this time.
    pub until: DateTime<Utc>,
}

/// The last transaction applied, and totals.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub last: Option<(Lsn, DateTime<Utc>)>,
    pub transactions: u64,
}

/// The messages of a pack's sections for one owner, one section after another.
struct Chain<'a> {
    repo: &'a Repository,
    plan: &'a ChangePlan,
    fetched: &'a Fetched,
    pack: usize,
    identities: Arc<Identities>,
    pending: VecDeque<&'a (usize, SectionEntry)>,
    current: Option<mpsc::Receiver<Result<Message, RepositoryError>>>,
    peeked: Option<Message>,
}

impl<'a> Chain<'a> {
    fn new(
        repo: &'a Repository,
        plan: &'a ChangePlan,
        fetched: &'a Fetched,
        pack: usize,
        owner: Option<&'a str>,
        identities: &Arc<Identities>,
    ) -> Self {
        Self {
            repo,
            plan,
            fetched,
            pack,
            identities: identities.clone(),
            pending: plan.packs[pack].sections_of(owner).collect(),
            current: None,
            peeked: None,
        }
    }

    async fn next(&mut self) -> Result<Option<Message>, ChangesError> {
        if let Some(m) = self.peeked.take() {
            return Ok(Some(m));
        }
        loop {
            if let Some(rx) = &mut self.current {
                match rx.recv().await {
                    Some(m) => return Ok(Some(m?)),
                    None => self.current = None,
                }
            }
            let Some((index, entry)) = self.pending.pop_front() else {
                return Ok(None);
            };
            self.current = Some(self.fetched.section(
                self.repo,
                self.plan,
                self.pack,
                *index,
                entry,
                self.identities.clone(),
            )?);
        }
    }
    /// The next transaction's Begin, leaving it to be read again.
    async fn peek_begin(&mut self) -> Result<Option<Begin>, ChangesError> {
        match self.next().await? {
            None => Ok(None),
            Some(Message::Begin(b)) => {
                self.peeked = Some(Message::Begin(b.clone()));
                Ok(Some(b))
            }
            Some(other) => Err(self.structure(format!(
                "expected a transaction, found a {:?} message",
                other.tag() as char
            ))),
        }
    }

    /// The rest of the current transaction, through its Commit, message by message: `None`
    /// after the Commit.
    async fn next_in_txn(&mut self) -> Result<Option<Message>, ChangesError> {
        match self.next().await? {
            Some(Message::Commit(_)) => Ok(None),
            Some(Message::Begin(_)) | None => {
                Err(self.structure("a transaction without its Commit".into()))
            }
            Some(m) => Ok(Some(m)),
        }
    }

    fn structure(&self, message: String) -> ChangesError {
        ChangesError::Structure {
            key: self.plan.packs[self.pack].pack.key.clone(),
            message,
        }
    }
}

/// Replays the plan for `tenant` through `replayer`.
pub async fn apply(
    repo: &Repository,
    plan: &ChangePlan,
    fetched: &Fetched,
    manifest: &Manifest,
    tenant: &str,
    identities: &Arc<Identities>,
    replayer: &mut Replayer<'_>,
) -> Result<Applied, ChangesError> {
    let mut applied = Applied::default();
    let mut committed = 0;
    // oid → whether it is a tenant table, from the Relation messages seen.
    let mut tenant_tables: HashMap<u32, bool> = HashMap::new();
    for (i, view) in plan.packs.iter().enumerate() {
        if view.pack.end <= plan.from {
            continue;
        }
        let mut own = Chain::new(repo, plan, fetched, i, Some(tenant), identities);
        let mut global = Chain::new(repo, plan, fetched, i, None, identities);
        loop {
            let (a, b) = (own.peek_begin().await?, global.peek_begin().await?);
            let (lsn, time) = match (&a, &b) {
                (None, None) => break,
                (Some(x), None) | (None, Some(x)) => (x.final_lsn, x.commit_time),
                (Some(x), Some(y)) => {
                    if x.final_lsn <= y.final_lsn {
                        (x.final_lsn, x.commit_time)
                    } else {
                        (y.final_lsn, y.commit_time)
                    }
                }
            };
            let time = time.to_datetime().unwrap_or_default();
            let in_own = a.as_ref().is_some_and(|x| x.final_lsn == lsn);
            let in_global = b.as_ref().is_some_and(|x| x.final_lsn == lsn);
            let skip = lsn < plan.from;
            if !skip && time > plan.until {
                return Ok(applied);
            }
            if in_global {
                global.next().await?; // the Begin
                while let Some(m) = global.next_in_txn().await? {
                    if let Message::Relation(r) = &m {
                        let scope = manifest
                            .table(&format!("{}.{}", r.namespace, r.name))
                            .map(|t| t.scope);
                        tenant_tables.insert(r.oid, scope == Some(Scope::Tenant));
                        replayer.apply(&m).await?;
                        continue;
                    }
                    let inline_elsewhere = in_own
                        && (schema_change(&m).is_some()
                            || matches!(&m, Message::Truncate(t)
                            if t.relations.iter().all(|o| tenant_tables.get(o) == Some(&true))));
                    if !skip && !inline_elsewhere {
                        apply_one(replayer, &m, time).await?;
                    }
                }
            }
            if in_own {
                own.next().await?;
                while let Some(m) = own.next_in_txn().await? {
                    if !skip || matches!(m, Message::Relation(_)) {
                        apply_one(replayer, &m, time).await?;
                    }
                }
            }
            if !skip {
                applied.transactions += 1;
                applied.last = Some((lsn, time));
            }
            if replayer.applied() >= committed + COMMIT_EVERY {
                replayer.commit().await?;
                committed = replayer.applied();
            }
        }
    }
    Ok(applied)
}

/// The content of a schema change the triggers put in the stream.
fn schema_change(message: &Message) -> Option<&[u8]> {
    match message {
        Message::LogicalMessage(m) if m.prefix == crate::source::ddl::PREFIX => Some(&m.content),
        _ => None,
    }
}

async fn apply_one(
    replayer: &mut Replayer<'_>,
    message: &Message,
    time: DateTime<Utc>,
) -> Result<(), ReplayError> {
    match schema_change(message) {
        Some(content) => replayer.schema_change(content, time).await,
        None => replayer.apply(message).await,
    }
}

impl Classify for ChangesError {
    fn class(&self) -> ErrorClass {
        match self {
            ChangesError::Repository(e) => e.class(),
            ChangesError::Replay(e) => e.class(),
            ChangesError::Structure { .. } => ErrorClass::Permanent,
        }
    }
}
