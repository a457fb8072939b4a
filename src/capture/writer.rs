//! The pack writer: routed changes in, one sealed pack out.
//!
//! Each tenant's changes (and the global ones) are buffered as plaintext records and sealed
//! (zstd then age) into a section once the buffer reaches a piece size, or when all buffers
//! together exceed a bound: memory stays bounded however many tenants or rows a pack holds,
//! and only ciphertext ever reaches the local spool.
//!
//! A tenant's section repeats what replay needs to stand alone: the Relation before its first
//! change of a table, the Begin before its first change of a transaction, and the TRUNCATEs
//! of tenant tables that came earlier in that transaction (so their order relative to the
//! tenant's own changes survives). The global section holds changes of global tables and every
//! TRUNCATE, for tenants absent from the transaction.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};

use super::CaptureError;
use super::spool::BodySpool;
use crate::codec::Sealer;
use crate::pg::Lsn;
use crate::pg::pgoutput::{Begin, Commit, Message, Relation};
use crate::repository::pack::{self, PackFooter, Region, SectionEntry, SectionHeader};
use sha2::Digest;

use crate::repository::Repository;
use crate::repository::routes::Delta;
use crate::repository::tenant_keys::SealingKeys;

/// A section is sealed once its plaintext reaches this size.
const PIECE: usize = 4 << 20;
/// Plaintext buffered across all sections of a pack, at most (then the largest are sealed).
const MAX_BUFFERED: usize = 32 << 20;

/// A section key: a tenant, or `None` for the global section.
type SectionKey = Option<Arc<str>>;

#[derive(Debug, Default)]
struct Piece {
    first: Option<(Lsn, DateTime<Utc>)>,
    last: Option<(Lsn, DateTime<Utc>)>,
    transactions: u64,
    changes: u64,
    messages: u64,
}

#[derive(Debug, Default)]
struct OpenSection {
    plain: Vec<u8>,
    piece: Piece,
    /// Relation generation written to this section, per oid.
    written: HashMap<u32, u64>,
    /// The open transaction's Begin is in this section.
    in_txn: bool,
}

#[derive(Debug)]
struct Txn {
    begin: Begin,
    time: DateTime<Utc>,
    /// TRUNCATEs of tenant tables (with their table) and schema changes so far: tenants that
    /// join the transaction later get them first.
    inline: Vec<(Option<u32>, Message)>,
}

/// What a stored pack holds.
#[derive(Debug, Clone)]
pub struct PackSummary {
    pub key: String,
    pub bytes: u64,
    pub transactions: u64,
    pub changes: u64,
    pub end: Lsn,
    pub covered_until: DateTime<Utc>,
    /// Commit times of the first and last transaction in the pack.
    pub first_commit: Option<DateTime<Utc>>,
    pub last_commit: Option<DateTime<Utc>>,
    /// What the stream index records of it.
    pub footer: PackFooter,
}

impl PackSummary {
    pub fn pack(&self) -> crate::repository::PackRef {
        crate::repository::PackRef {
            start: self.footer.start_lsn,
            end: self.end,
            key: self.key.clone(),
            size: self.bytes,
        }
    }
}

pub struct PackWriter {
    repo: Repository,
    keys: Arc<SealingKeys>,
    level: i32,
    spool_dir: PathBuf,
    start: Lsn,
    body: BodySpool,
    sections: Vec<SectionEntry>,
    open: HashMap<SectionKey, OpenSection>,
    buffered: usize,
    /// When the first transaction of this pack committed: the pack's age for flushing.
    first_commit: Option<Instant>,
    first_commit_time: Option<DateTime<Utc>>,
    txn: Option<Txn>,
    relations: HashMap<u32, (Relation, u64)>,
    generation: u64,
    transactions: u64,
    changes: u64,
    /// Commit LSN and time of the last transaction.
    last_commit: Option<(Lsn, DateTime<Utc>)>,
}

impl std::fmt::Debug for PackWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackWriter")
            .field("start", &self.start)
            .field("transactions", &self.transactions)
            .field("changes", &self.changes)
            .finish()
    }
}

impl PackWriter {
    pub fn new(
        repo: Repository,
        keys: Arc<SealingKeys>,
        level: i32,
        spool_dir: PathBuf,
        start: Lsn,
    ) -> Self {
        Self {
            repo,
            keys,
            level,
            body: BodySpool::new(spool_dir.clone()),
            spool_dir,
            start,
            sections: Vec::new(),
            open: HashMap::new(),
            buffered: 0,
            first_commit: None,
            first_commit_time: None,
            txn: None,
            relations: HashMap::new(),
            generation: 0,
            transactions: 0,
            changes: 0,
            last_commit: None,
        }
    }

    /// A writer for the next pack, keeping the relation definitions.
    pub fn next(&mut self, start: Lsn) -> PackWriter {
        let mut next = PackWriter::new(
            self.repo.clone(),
            self.keys.clone(),
            self.level,
            self.spool_dir.clone(),
            start,
        );
        next.relations = std::mem::take(&mut self.relations);
        next.generation = self.generation;
        next
    }

    pub fn start(&self) -> Lsn {
        self.start
    }

    pub fn transactions(&self) -> u64 {
        self.transactions
    }

    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// How long the oldest transaction in the pack has waited since it committed (zero when it
    /// holds none): by the commit's own time when the stream lags behind the source, else since
    /// it arrived (a server clock ahead of ours cannot delay a pack).
    pub fn age(&self) -> std::time::Duration {
        let Some(arrived) = self.first_commit else {
            return std::time::Duration::ZERO;
        };
        let since_commit = self
            .first_commit_time
            .and_then(|t| (Utc::now() - t).to_std().ok())
            .unwrap_or_default();
        arrived.elapsed().max(since_commit)
    }

    /// How long since the pack's first transaction arrived.
    pub fn collecting(&self) -> std::time::Duration {
        self.first_commit
            .map_or(std::time::Duration::ZERO, |t| t.elapsed())
    }

    /// Bytes the pack will hold, about (sealed plus still buffered plaintext).
    pub fn size(&self) -> u64 {
        self.body.size() + self.buffered as u64
    }

    /// The open transaction's commit LSN and time.
    pub fn current(&self) -> Option<(Lsn, DateTime<Utc>)> {
        self.txn.as_ref().map(|t| (t.begin.final_lsn, t.time))
    }

    pub fn last_commit(&self) -> Option<(Lsn, DateTime<Utc>)> {
        self.last_commit
    }

    pub fn in_transaction(&self) -> bool {
        self.txn.is_some()
    }

    pub fn relation(&mut self, relation: &Relation) {
        let changed = self
            .relations
            .get(&relation.oid)
            .is_none_or(|(r, _)| r != relation);
        if changed {
            self.generation += 1;
            self.relations
                .insert(relation.oid, (relation.clone(), self.generation));
        }
    }

    pub fn begin(&mut self, begin: &Begin) {
        let time = begin.commit_time.to_datetime().unwrap_or_default();
        self.txn = Some(Txn {
            begin: begin.clone(),
            time,
            inline: Vec::new(),
        });
    }

    /// A change of one tenant, or of a global table (`None`).
    pub fn change(
        &mut self,
        section: SectionKey,
        oid: u32,
        message: &Message,
    ) -> Result<(), CaptureError> {
        self.join(&section)?;
        self.write(&section, oid, message, true)?;
        self.changes += 1;
        Ok(())
    }

    /// A message of one tenant that names no table.
    pub fn tenant_message(
        &mut self,
        tenant: Arc<str>,
        message: &Message,
    ) -> Result<(), CaptureError> {
        self.untabled(&Some(tenant), message)
    }

    /// A message that names no table, counted as a change of `section`.
    fn untabled(&mut self, section: &SectionKey, message: &Message) -> Result<(), CaptureError> {
        self.join(section)?;
        self.append(section, message);
        self.open.get_mut(section).expect("joined").piece.changes += 1;
        self.changes += 1;
        self.maybe_seal(section)
    }

    /// A TRUNCATE of a tenant table: into every tenant section of the transaction (now and
    /// when one joins later) and into the global section.
    pub fn truncate_tenant_table(
        &mut self,
        oid: u32,
        message: &Message,
    ) -> Result<(), CaptureError> {
        self.inline(Some(oid), message)?;
        self.change(None, oid, message)
    }

    /// A schema change (the triggers' logical message): like a TRUNCATE of a tenant table, in
    /// its place in every tenant section of the transaction, so a tenant's changes before and
    /// after it meet the table as it was then, and in the global section for every other
    /// tenant's restore.
    pub fn schema_change(&mut self, message: &Message) -> Result<(), CaptureError> {
        self.inline(None, message)?;
        self.untabled(&None, message)
    }

    /// Into every tenant section the transaction has opened, and remembered for those it
    /// opens later.
    fn inline(&mut self, oid: Option<u32>, message: &Message) -> Result<(), CaptureError> {
        let joined: Vec<SectionKey> = self
            .open
            .iter()
            .filter(|(k, s)| k.is_some() && s.in_txn)
            .map(|(k, _)| k.clone())
            .collect();
        for key in joined {
            self.write_inline(&key, oid, message)?;
        }
        if let Some(txn) = &mut self.txn {
            txn.inline.push((oid, message.clone()));
        }
        Ok(())
    }

    /// A message of a table (after its Relation), or of none.
    fn write_inline(
        &mut self,
        section: &SectionKey,
        oid: Option<u32>,
        message: &Message,
    ) -> Result<(), CaptureError> {
        match oid {
            Some(oid) => self.write(section, oid, message, false),
            None => {
                self.append(section, message);
                self.maybe_seal(section)
            }
        }
    }

    /// Opens the transaction in a section: Begin, then the transaction's earlier TRUNCATEs and
    /// schema changes.
    fn join(&mut self, section: &SectionKey) -> Result<(), CaptureError> {
        let txn = self.txn.as_ref().ok_or(CaptureError::Protocol(
            "a change outside a transaction".into(),
        ))?;
        let open = self.open.entry(section.clone()).or_default();
        if open.in_txn {
            return Ok(());
        }
        open.in_txn = true;
        let begin = Message::Begin(txn.begin.clone());
        let inline = if section.is_some() {
            txn.inline.clone()
        } else {
            Vec::new()
        };
        self.append(section, &begin);
        for (oid, message) in inline {
            self.write_inline(section, oid, &message)?;
        }
        Ok(())
    }

    fn write(
        &mut self,
        section: &SectionKey,
        oid: u32,
        message: &Message,
        counts: bool,
    ) -> Result<(), CaptureError> {
        let (relation, generation) = self.relations.get(&oid).ok_or_else(|| {
            CaptureError::Protocol(format!("relation {oid} used before its Relation message"))
        })?;
        let open = self.open.entry(section.clone()).or_default();
        if open.written.get(&oid) != Some(generation) {
            open.written.insert(oid, *generation);
            let relation = Message::Relation(relation.clone());
            self.append(section, &relation);
        }
        self.append(section, message);
        if counts {
            self.open
                .get_mut(section)
                .expect("just opened")
                .piece
                .changes += 1;
        }
        self.maybe_seal(section)
    }

    fn append(&mut self, section: &SectionKey, message: &Message) {
        let txn = self.txn.as_ref().map(|t| (t.begin.final_lsn, t.time));
        let open = self.open.entry(section.clone()).or_default();
        let before = open.plain.len();
        pack::push_message(&mut open.plain, message);
        open.piece.messages += 1;
        if let Some(point) = txn {
            open.piece.first.get_or_insert(point);
            open.piece.last = Some(point);
        }
        self.buffered += open.plain.len() - before;
    }

    fn maybe_seal(&mut self, section: &SectionKey) -> Result<(), CaptureError> {
        if self.open[section].plain.len() >= PIECE {
            self.seal_piece(section)?;
        }
        while self.buffered > MAX_BUFFERED {
            let largest = self
                .open
                .iter()
                .max_by_key(|(_, s)| s.plain.len())
                .map(|(k, _)| k.clone())
                .expect("something is buffered");
            self.seal_piece(&largest)?;
        }
        Ok(())
    }

    /// Seals what a section buffered into the body as one stored section.
    fn seal_piece(&mut self, section: &SectionKey) -> Result<(), CaptureError> {
        let open = self.open.get_mut(section).expect("sealing an open section");
        if open.piece.messages == 0 {
            return Ok(());
        }
        let plain = std::mem::take(&mut open.plain);
        let piece = std::mem::take(&mut open.piece);
        self.buffered -= plain.len();
        let index = u32::try_from(self.sections.len()).expect("fewer than 4 billion sections");
        let header = SectionHeader {
            pack_start: self.start,
            tenant: section.as_deref().map(str::to_string),
            index,
        };
        let seal = self
            .keys
            .seal_for(section.as_deref(), piece.first.map(|(_, time)| time))?;
        let mut sealer = Sealer::new(&seal.recipients, self.level)?;
        sealer.write(&pack::section_header(&header))?;
        sealer.write(&plain)?;
        drop(plain);
        sealer.write(&pack::section_end(piece.messages))?;
        let offset = self.body.size();
        while let Some(chunk) = sealer.take_output() {
            self.body.append(&chunk)?;
        }
        let (rest, summary) = sealer.finish()?;
        self.body.append(&rest)?;
        let (first, last) = (
            piece.first.unwrap_or_default(),
            piece.last.unwrap_or_default(),
        );
        self.sections.push(SectionEntry {
            tenant: header.tenant,
            offset,
            length: summary.stored_bytes,
            sha256: summary.sha256,
            first_lsn: first.0,
            last_lsn: last.0,
            first_time: first.1,
            last_time: last.1,
            transactions: piece.transactions,
            changes: piece.changes,
            sealed_to: seal.sealed_to,
        });
        Ok(())
    }

    pub fn commit(&mut self, commit: &Commit) -> Result<(), CaptureError> {
        let time = commit.commit_time.to_datetime().unwrap_or_default();
        let joined: Vec<SectionKey> = self
            .open
            .iter()
            .filter(|(_, s)| s.in_txn)
            .map(|(k, _)| k.clone())
            .collect();
        let message = Message::Commit(commit.clone());
        for key in &joined {
            self.append(key, &message);
            let open = self.open.get_mut(key).expect("joined");
            open.in_txn = false;
            open.piece.transactions += 1;
        }
        for key in &joined {
            self.maybe_seal(key)?;
        }
        self.txn = None;
        if !joined.is_empty() {
            self.first_commit.get_or_insert_with(Instant::now);
            self.first_commit_time.get_or_insert(time);
            self.transactions += 1;
            self.last_commit = Some((commit.commit_lsn, time));
        }
        Ok(())
    }

    /// Seals every section, writes the routing changes and the footer, and stores the pack as
    /// `[start, end)`.
    pub async fn store(
        mut self,
        end: Lsn,
        covered_until: DateTime<Utc>,
        routes: &[Delta],
    ) -> Result<PackSummary, CaptureError> {
        debug_assert!(self.txn.is_none(), "packs hold whole transactions");
        // The tenants `forget` erased meanwhile: what they committed after it goes to a new
        // key, what they committed before it to the deleted one (see `SealingKeys::seal_for`).
        self.keys.notice_forgotten(&self.repo).await?;
        let mut keys: Vec<SectionKey> = self.open.keys().cloned().collect();
        keys.sort();
        for key in &keys {
            self.seal_piece(key)?;
        }
        let routes = if routes.is_empty() {
            None
        } else {
            let bytes = crate::repository::routes::encode(routes);
            let region = Region {
                offset: self.body.size(),
                length: bytes.len() as u64,
                sha256: hex::encode(sha2::Sha256::digest(&bytes)),
            };
            self.body.append(&bytes)?;
            Some(region)
        };
        let footer = PackFooter {
            format_version: self.keys.format_version(),
            start_lsn: self.start,
            end_lsn: end,
            covered_until,
            sections: std::mem::take(&mut self.sections),
            routes,
        };
        self.body.append(&footer.encode())?;
        let bytes = self.body.size();
        let body = std::mem::replace(&mut self.body, BodySpool::new(self.spool_dir.clone()));
        // The keys of tenants first seen in this pack, before the pack that needs them.
        self.keys.store_new(&self.repo).await?;
        let key = self
            .repo
            .put_pack(self.start, end, body.into_stream()?)
            .await?;
        Ok(PackSummary {
            key,
            bytes,
            transactions: self.transactions,
            changes: self.changes,
            end,
            covered_until,
            first_commit: footer.sections.iter().map(|s| s.first_time).min(),
            last_commit: footer.sections.iter().map(|s| s.last_time).max(),
            footer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Identities;
    use crate::pg::pgoutput::{
        Column, Insert, PgTimestamp, ReplicaIdentity, Truncate, Tuple, Value,
    };
    use crate::storage::{MemoryStore, ObjectStore};

    fn relation(oid: u32, name: &str) -> Relation {
        Relation {
            xid: None,
            oid,
            namespace: "app".into(),
            name: name.into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![Column {
                part_of_key: true,
                name: "id".into(),
                type_oid: 25,
                type_modifier: -1,
            }],
        }
    }

    fn insert(oid: u32, v: &str) -> Message {
        Message::Insert(Insert {
            xid: None,
            relation: oid,
            new: Tuple(vec![Value::Text(bytes::Bytes::copy_from_slice(
                v.as_bytes(),
            ))]),
        })
    }

    async fn messages(
        store: &Arc<dyn ObjectStore>,
        key: &str,
        footer: &PackFooter,
        tenant: Option<&str>,
        ids: &Arc<Identities>,
    ) -> Vec<Message> {
        let mut out = Vec::new();
        for (i, s) in footer.sections.iter().enumerate() {
            if s.tenant.as_deref() != tenant {
                continue;
            }
            let mut rx = Repository::new(store.clone())
                .pack_section(key, i, s, ids.clone())
                .await
                .unwrap();
            while let Some(m) = rx.recv().await {
                out.push(m.unwrap());
            }
        }
        out
    }

    /// Two tenants in one transaction with a TRUNCATE in the middle: each tenant's section
    /// stands alone (Relation, Begin, the TRUNCATE inline where it happened, Commit), the global
    /// section has the TRUNCATE for tenants absent from the transaction, and a section never
    /// holds another tenant's change.
    #[tokio::test]
    async fn sections_stand_alone_and_keep_truncate_order() {
        let identity = age::x25519::Identity::generate();
        let recipients = SealingKeys::unkeyed(vec![identity.to_public()]);
        let ids = Arc::new(Identities::from(vec![identity]));
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let dir = std::env::temp_dir();
        let mut w = PackWriter::new(Repository::new(store.clone()), recipients, 3, dir, Lsn(100));
        w.relation(&relation(1, "funds"));
        let time = PgTimestamp(0);
        w.begin(&Begin {
            final_lsn: Lsn(150),
            commit_time: time,
            xid: 7,
        });
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        w.change(Some(a.clone()), 1, &insert(1, "a1")).unwrap();
        let truncate = Message::Truncate(Truncate {
            xid: None,
            cascade: false,
            restart_identity: false,
            relations: vec![1],
        });
        w.truncate_tenant_table(1, &truncate).unwrap();
        w.change(Some(b.clone()), 1, &insert(1, "b1")).unwrap();
        w.change(Some(a.clone()), 1, &insert(1, "a2")).unwrap();
        let commit = Commit {
            flags: 0,
            commit_lsn: Lsn(150),
            end_lsn: Lsn(160),
            commit_time: time,
        };
        w.commit(&commit).unwrap();
        assert_eq!(w.transactions(), 1);
        let summary = w.store(Lsn(160), Utc::now(), &[]).await.unwrap();
        assert_eq!(summary.key, pack::key(Lsn(100), Lsn(160)));
        let footer = Repository::new(store.clone())
            .pack_footer(&crate::repository::PackRef {
                start: Lsn(100),
                end: Lsn(160),
                key: summary.key.clone(),
                size: summary.bytes,
            })
            .await
            .unwrap();
        let tags = |ms: &[Message]| ms.iter().map(|m| m.tag() as char).collect::<String>();
        let ma = messages(&store, &summary.key, &footer, Some("a"), &ids).await;
        assert_eq!(tags(&ma), "BRITIC", "a: insert, truncate, insert");
        let mb = messages(&store, &summary.key, &footer, Some("b"), &ids).await;
        assert_eq!(
            tags(&mb),
            "BRTIC",
            "b joined after the truncate: it comes first"
        );
        assert!(
            mb.iter().all(
                |m| !matches!(m, Message::Insert(i) if i.new.0[0] == Value::Text("a1".into()))
            )
        );
        let mg = messages(&store, &summary.key, &footer, None, &ids).await;
        assert_eq!(tags(&mg), "BRTC");
        // A section moved to another place in the footer is refused by its own header.
        let mut swapped = footer.clone();
        swapped.sections.swap(0, 1);
        let mut rx = Repository::new(store.clone())
            .pack_section(&summary.key, 0, &swapped.sections[0], ids.clone())
            .await
            .unwrap();
        let mut failed = false;
        while let Some(m) = rx.recv().await {
            failed |= m.is_err();
        }
        assert!(failed);
    }
}
