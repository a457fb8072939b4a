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

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::pg::Lsn;
use crate::pg::quote_ident;
use crate::repository::{FORMAT_VERSION, Repository, RepositoryError};
use crate::retry::{Classify, ErrorClass};
use crate::source::catalog::Catalog;
use crate::source::publication::PublicationError;
use crate::source::{SourceError, query_context};
use crate::storage::{ObjectStore, PutMode, StorageError};

pub const PREFIX: &str = "changes/gaps/";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gap {
    pub format_version: u32,
    /// Changes after this LSN may lack the tables' changes.
    pub from_lsn: Lsn,
    /// The consistent time of the snapshot at `from_lsn` (none: the repository's start).
    pub from_time: Option<DateTime<Utc>>,
    /// Schema-qualified, quoted as in SQL.
    pub tables: Vec<String>,
    pub detected_at: DateTime<Utc>,
    /// The publication covered the tables again from this LSN on.
    #[serde(default)]
    pub resolved_lsn: Option<Lsn>,
    #[serde(default)]
    pub resolved_at: Option<DateTime<Utc>>,
}

impl Gap {
    /// Whether replaying changes from a base snapshot at `base` up to time `at` crosses this
    /// gap. Judged by time at the start (a restore point's LSN is known only once replayed):
    /// a point after the gap's first snapshot may need changes the stream lacks.
    pub fn breaks(&self, base: Lsn, at: DateTime<Utc>) -> bool {
        self.from_time.is_none_or(|t| t < at) && self.resolved_lsn.is_none_or(|r| base < r)
    }
}

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

fn key(from: Lsn) -> String {
    format!("{PREFIX}{}.json", from.to_key())
}

/// Every recorded gap, oldest first.
pub async fn read_all(store: &Arc<dyn ObjectStore>) -> Result<Vec<Gap>, RepositoryError> {
    let mut gaps = Vec::new();
    for object in store.list(PREFIX).await? {
        let bytes = match store.get_bytes(&object.key, None).await {
            Ok(b) => b,
            Err(StorageError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        let gap: Gap = serde_json::from_slice(&bytes).map_err(|e| RepositoryError::Malformed {
            key: object.key.clone(),
            message: e.to_string(),
        })?;
        if gap.format_version != FORMAT_VERSION {
            return Err(RepositoryError::UnknownFormat {
                key: object.key,
                found: gap.format_version,
            });
        }
        gaps.push(gap);
    }
    gaps.sort_by_key(|g| g.from_lsn);
    Ok(gaps)
}

async fn read_open(store: &Arc<dyn ObjectStore>) -> Result<Vec<Gap>, RepositoryError> {
    let mut gaps = read_all(store).await?;
    gaps.retain(|g| g.resolved_lsn.is_none());
    Ok(gaps)
}

async fn write(store: &Arc<dyn ObjectStore>, gap: &Gap) -> Result<(), StorageError> {
    let json = serde_json::to_vec_pretty(gap).expect("a gap always serializes");
    store
        .put_bytes(&key(gap.from_lsn), json.into(), PutMode::Overwrite)
        .await?;
    Ok(())
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
            tracing::error!(publication, tables = ?missing, fix = %sql, "the publication lacks tables the backup covers: their changes are not captured; run the fix as the tables' owner, then take a snapshot");
            Ok(missing)
        }
        Err(e) => Err(e.into()),
    }
}

/// Records that `unpublished` tables are missing from the stream, unless an open gap already
/// says so. Returns the gap now open for them.
async fn record(repo: &Repository, unpublished: &[String]) -> Result<Gap, GapError> {
    let store = repo.store();
    let open = read_open(store).await?;
    if let Some(gap) = open
        .iter()
        .find(|g| unpublished.iter().all(|t| g.tables.contains(t)))
    {
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
    let mut tables: Vec<String> = unpublished.to_vec();
    // A gap open from the same point (new tables found later) grows instead of being replaced.
    if let Some(same) = open.iter().find(|g| g.from_lsn == from.0) {
        tables.extend(same.tables.iter().cloned());
        tables.sort();
        tables.dedup();
    }
    let gap = Gap {
        format_version: FORMAT_VERSION,
        from_lsn: from.0,
        from_time: from.1,
        tables,
        detected_at: Utc::now(),
        resolved_lsn: None,
        resolved_at: None,
    };
    write(store, &gap).await?;
    tracing::error!(
        tables = ?gap.tables, from_lsn = %gap.from_lsn, from_time = ?gap.from_time,
        "stream gap recorded: these tables are backed up by snapshots but not published, so their changes are missing from the stream; restores across the gap are refused until the publication covers them and a snapshot is taken after that"
    );
    Ok(gap)
}

/// The publication covers every table again: open gaps end at the source's current WAL
/// position (after the change that fixed it, so a later snapshot is a complete base).
async fn resolve(repo: &Repository, client: &Client) -> Result<usize, GapError> {
    let store = repo.store();
    let open = read_open(store).await?;
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
        write(store, &gap).await?;
        tracing::info!(tables = ?gap.tables, from_lsn = %gap.from_lsn, resolved_lsn = %lsn, "stream gap resolved: the publication covers its tables again; take a snapshot to make later restores possible");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn gap(from: Option<i64>, resolved: Option<u64>) -> Gap {
        Gap {
            format_version: FORMAT_VERSION,
            from_lsn: Lsn(from.map_or(0, |s| s as u64 * 100)),
            from_time: from.map(time),
            tables: vec!["app.t".into()],
            detected_at: Utc::now(),
            resolved_lsn: resolved.map(Lsn),
            resolved_at: None,
        }
    }

    fn time(second: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + second, 0).unwrap()
    }

    #[test]
    fn a_restore_across_an_open_gap_breaks() {
        let g = gap(Some(10), None);
        assert!(
            !g.breaks(Lsn(500), time(10)),
            "up to the gap's start is whole"
        );
        assert!(g.breaks(Lsn(500), time(11)));
        assert!(
            g.breaks(Lsn(5000), time(60)),
            "a base inside an open gap is no help"
        );
        assert!(
            gap(None, None).breaks(Lsn(1), time(0)),
            "a gap from the start"
        );
    }

    #[test]
    fn a_base_after_the_resolution_is_whole() {
        let g = gap(Some(10), Some(3000));
        assert!(g.breaks(Lsn(1500), time(40)));
        assert!(!g.breaks(Lsn(3000), time(40)));
        assert!(!g.breaks(Lsn(500), time(9)));
    }
}
