//! Stream gaps: periods in which the change stream is known to lack the changes of some
//! tables — tables the catalog backs up but the publication does not publish (typically
//! created after `init`; a `FOR TABLE` publication does not grow by itself). Their changes are
//! simply not decoded, so nothing in the stream shows the loss: it is recorded here, in the
//! repository, and a restore that would replay across a gap is refused instead of handing back
//! a database without those rows.
//!
//! A gap starts at the consistent LSN of the newest snapshot without the tables (the tables
//! did not exist then, so nothing before it is missing), or at the start of the repository when
//! every snapshot has them. It is resolved when the publication covers them again; from then
//! on a snapshot taken after the resolution is a complete base.
//!
//! A *reshaped* gap is the other kind: without the schema-change triggers, a table's new
//! definition shows only with its next change, so the stream does not know its definition
//! between the last instant it knew the old one and that change ([`check_reshaped`]).

use chrono::Utc;
use tokio_postgres::Client;

use crate::pg::Lsn;
use crate::pg::quote_ident;
use crate::repository::{FORMAT_2, Gap, Repository, RepositoryError};
use crate::retry::{Classify, ErrorClass};
use crate::source::catalog::Catalog;
use crate::source::publication::PublicationError;
use crate::source::{SourceError, query_context};
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum GapError {
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Publication(#[from] PublicationError),
    #[error("the source reported WAL position {0:?}, which is not an LSN")]
    Position(String),
}

/// Checks that the publication covers the catalog: if it does, open gaps are resolved; if
/// not, the gap is recorded and the tables are returned (capture goes on for the others: their
/// changes are whole, and WAL must not pile up on the source meanwhile).
pub async fn check_publication(
    repo: &Repository,
    client: &Client,
    publication: &str,
    catalog: &Catalog,
) -> Result<Vec<String>, GapError> {
    match crate::source::publication::verify(client, publication, catalog).await {
        Ok(()) => {
            resolve(repo, client).await?;
            Ok(Vec::new())
        }
        Err(PublicationError::Incomplete { missing, sql, .. }) => {
            record(repo, &missing).await?;
            tracing::error!(publication, tables = %missing.join(", "), fix = %sql, "the publication lacks tables the backup covers: their changes are not captured; run the fix as the tables' owner, then take a snapshot");
            Ok(missing)
        }
        Err(e) => Err(e.into()),
    }
}

/// A table created in the transaction that committed at `created` (a schema change in the
/// stream says when): if the publication does not carry it, the gap starts there, not at
/// the last snapshot before it, so restores to any instant before its creation stay possible.
/// Asked of the publication now: a table dropped since is taken as not published (the gap
/// then closes at the next check, which finds nothing missing).
pub async fn check_created(
    repo: &Repository,
    client: &Client,
    publication: &str,
    table: &str,
    created: (Lsn, chrono::DateTime<Utc>),
) -> Result<(), GapError> {
    let published: Option<bool> = client
        .query_opt(
            "SELECT p.puballtables OR EXISTS (
                      SELECT 1 FROM pg_catalog.pg_publication_tables t
                       WHERE t.pubname = p.pubname
                         AND format('%I.%I', t.schemaname, t.tablename) = $2)
               FROM pg_catalog.pg_publication p WHERE p.pubname = $1",
            &[&publication, &table],
        )
        .await
        .map_err(query_context("reading the publication's tables"))?
        .map(|row| row.get(0));
    if published != Some(false) {
        return Ok(());
    }
    // The check that runs every minute may have met the table first and opened its gap at
    // the last snapshot without it: the table did not exist before its creation, so that gap
    // no longer names it.
    for mut gap in repo.open_gaps().await? {
        if gap.from_lsn < created.0 && gap.tables.iter().any(|t| t == table) {
            gap.tables.retain(|t| t != table);
            repo.put_gap(&gap).await?;
        }
    }
    let unpublished = [table.to_string()];
    let open = repo.open_gaps().await?;
    if open_for(&open, &unpublished).is_none() {
        put(repo, &open, &unpublished, (created.0, Some(created.1))).await?;
    }
    Ok(())
}

/// A table whose definition changed while schema changes are not captured (no triggers): the
/// stream shows it only with the table's next change, not when the migration ran.
#[derive(Debug, Clone)]
pub struct Reshaped {
    /// Quoted, qualified.
    pub table: String,
    /// Its columns now.
    pub columns: Vec<String>,
    /// The last transaction stored with a change of the table, this session (the migration
    /// came after it).
    pub since: Option<(Lsn, chrono::DateTime<Utc>)>,
    /// The transaction that showed the new definition: a snapshot from there on has it.
    pub seen: Option<Lsn>,
}

/// Records when a restore can no longer know `reshaped`'s definition: from the later of its
/// last change with the old one and the newest snapshot with other columns (the migration came
/// after both), to the transaction that showed the new one. A restore from an earlier
/// snapshot to an instant after that start is refused (it would have the old definition where
/// the source had the new), instead of only from the first change with the new definition.
/// Without either bound nothing is recorded: the replay still refuses at that first change.
pub async fn check_reshaped(repo: &Repository, reshaped: &Reshaped) -> Result<(), GapError> {
    let mut from = reshaped.since;
    for id in repo.snapshots().await?.into_iter().rev() {
        let manifest = match repo.manifest(&id).await {
            Ok(m) => m,
            Err(RepositoryError::NoSuchSnapshot(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        if from.is_some_and(|(lsn, _)| manifest.consistent_lsn <= lsn) {
            break;
        }
        let entry = manifest.tables.iter().find(|e| {
            format!("{}.{}", quote_ident(&e.schema), quote_ident(&e.name)) == reshaped.table
        });
        if entry.is_some_and(|e| e.columns != reshaped.columns) {
            from = Some((manifest.consistent_lsn, manifest.consistent_time));
            break;
        }
    }
    let Some((mut from_lsn, from_time)) = from else {
        return Ok(());
    };
    // Keyed by its start: never over another gap.
    let taken: Vec<Lsn> = repo.gaps().await?.iter().map(|g| g.from_lsn).collect();
    while taken.contains(&from_lsn) {
        from_lsn = Lsn(from_lsn.0 + 1);
    }
    let gap = Gap {
        format_version: FORMAT_2,
        from_lsn,
        from_time: Some(from_time),
        tables: vec![reshaped.table.clone()],
        detected_at: Utc::now(),
        resolved_lsn: reshaped.seen,
        resolved_at: reshaped.seen.map(|_| Utc::now()),
        reshaped: true,
    };
    repo.put_gap(&gap).await?;
    tracing::warn!(table = %reshaped.table, from_lsn = %gap.from_lsn, "a table's definition changed and schema changes are not captured: restores from earlier snapshots to instants after its last change with the old definition are refused (`updog-backup check`)");
    Ok(())
}

fn open_for<'a>(open: &'a [Gap], unpublished: &[String]) -> Option<&'a Gap> {
    open.iter()
        .find(|g| unpublished.iter().all(|t| g.tables.contains(t)))
}

/// Records that `unpublished` tables are missing from the stream, unless an open gap already
/// says so. Returns the gap now open for them.
async fn record(repo: &Repository, unpublished: &[String]) -> Result<Gap, GapError> {
    let open = repo.open_gaps().await?;
    if let Some(gap) = open_for(&open, unpublished) {
        return Ok(gap.clone());
    }
    // The newest snapshot without one of the tables: they did not exist before it.
    let mut from = (Lsn(0), None);
    for id in repo.snapshots().await?.into_iter().rev() {
        let manifest = match repo.manifest(&id).await {
            Ok(m) => m,
            Err(RepositoryError::NoSuchSnapshot(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let has = |t: &String| {
            manifest
                .tables
                .iter()
                .any(|e| format!("{}.{}", quote_ident(&e.schema), quote_ident(&e.name)) == *t)
        };
        if !unpublished.iter().all(has) {
            from = (manifest.consistent_lsn, Some(manifest.consistent_time));
            break;
        }
    }
    put(repo, &open, unpublished, from).await
}

/// Opens a gap of `unpublished` from `from`.
async fn put(
    repo: &Repository,
    open: &[Gap],
    unpublished: &[String],
    from: (Lsn, Option<chrono::DateTime<Utc>>),
) -> Result<Gap, GapError> {
    let mut tables: Vec<String> = unpublished.to_vec();
    // A gap open from the same point (new tables found later) grows instead of being replaced.
    if let Some(same) = open.iter().find(|g| g.from_lsn == from.0) {
        tables.extend(same.tables.iter().cloned());
        tables.sort();
        tables.dedup();
    }
    let gap = Gap {
        format_version: FORMAT_2,
        from_lsn: from.0,
        from_time: from.1,
        tables,
        detected_at: Utc::now(),
        resolved_lsn: None,
        resolved_at: None,
        reshaped: false,
    };
    repo.put_gap(&gap).await?;
    tracing::error!(
        tables = %gap.tables.join(", "), from_lsn = %gap.from_lsn,
        from_time = gap.from_time.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        "stream gap recorded: these tables are backed up by snapshots but not published, so their changes are missing from the stream; restores across the gap are refused until the publication covers them and a snapshot is taken after that"
    );
    Ok(gap)
}

/// The publication covers every table again: open gaps end at the source's current WAL
/// position (after the change that fixed it, so a later snapshot is a complete base).
async fn resolve(repo: &Repository, client: &Client) -> Result<usize, GapError> {
    let open = repo.open_gaps().await?;
    if open.is_empty() {
        return Ok(0);
    }
    let lsn: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(query_context("reading the current WAL position"))?
        .get(0);
    let lsn: Lsn = lsn.parse().map_err(|_| GapError::Position(lsn))?;
    for mut gap in open.iter().cloned() {
        gap.resolved_lsn = Some(lsn);
        gap.resolved_at = Some(Utc::now());
        repo.put_gap(&gap).await?;
        tracing::info!(tables = %gap.tables.join(", "), from_lsn = %gap.from_lsn, resolved_lsn = %lsn, "stream gap resolved: the publication covers its tables again; take a snapshot to make later restores possible");
    }
    Ok(open.len())
}

impl Classify for GapError {
    fn class(&self) -> ErrorClass {
        match self {
            GapError::Repository(e) => e.class(),
            GapError::Storage(e) => e.class(),
            GapError::Source(e) => e.class(),
            GapError::Publication(e) => e.class(),
            GapError::Position(_) => ErrorClass::Permanent,
        }
    }
}
