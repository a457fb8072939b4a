//! `changes/gaps/<from_lsn>.json`: a stream gap — tables the snapshots back up but whose
//! changes the stream lacks (the publication did not carry them) — and when it closed. Capture
//! records them; restore refuses to replay across one.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Repository, RepositoryError, keys};
use crate::pg::Lsn;
use crate::storage::{PutMode, StorageError};

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
    /// Not a publication's gap: the tables' definition changed at an unknown instant after
    /// `from_time` (schema changes were not captured), shown by the transaction at
    /// `resolved_lsn`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reshaped: bool,
}

impl Gap {
    /// Whether replaying changes from a base snapshot at `base` up to time `at` crosses this
    /// gap. Judged by time at the start (a restore point's LSN is known only once replayed):
    /// a point after the gap's first snapshot may need changes the stream lacks.
    /// A gap that names no table (each found to start later, in a gap of its own) breaks
    /// nothing.
    pub fn breaks(&self, base: Lsn, at: DateTime<Utc>) -> bool {
        !self.tables.is_empty()
            && self.from_time.is_none_or(|t| t < at)
            && self.resolved_lsn.is_none_or(|r| base < r)
    }
}

fn key(from: Lsn) -> String {
    format!("{}{}.json", keys::GAPS_PREFIX, from.to_key())
}

impl Repository {
    /// Every recorded gap, oldest first.
    pub async fn gaps(&self) -> Result<Vec<Gap>, RepositoryError> {
        let store = self.store();
        let mut gaps = Vec::new();
        for object in store.list(keys::GAPS_PREFIX).await? {
            let bytes = match store.get_bytes(&object.key, None).await {
                Ok(b) => b,
                Err(StorageError::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            let gap: Gap =
                serde_json::from_slice(&bytes).map_err(|e| RepositoryError::Malformed {
                    key: object.key.clone(),
                    message: e.to_string(),
                })?;
            if !super::readable(gap.format_version) {
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

    /// The gaps not resolved yet.
    pub async fn open_gaps(&self) -> Result<Vec<Gap>, RepositoryError> {
        let mut gaps = self.gaps().await?;
        gaps.retain(|g| g.resolved_lsn.is_none());
        Ok(gaps)
    }

    /// Records a gap, or its resolution (rewritten in place).
    pub async fn put_gap(&self, gap: &Gap) -> Result<(), RepositoryError> {
        let json = serde_json::to_vec_pretty(gap).expect("a gap always serializes");
        self.store()
            .put_bytes(&key(gap.from_lsn), json.into(), PutMode::Overwrite)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gap(from: Option<i64>, resolved: Option<u64>) -> Gap {
        Gap {
            format_version: crate::repository::FORMAT_2,
            from_lsn: Lsn(from.map_or(0, |s| s as u64 * 100)),
            from_time: from.map(time),
            tables: vec!["app.t".into()],
            detected_at: Utc::now(),
            resolved_lsn: resolved.map(Lsn),
            resolved_at: None,
            reshaped: false,
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
