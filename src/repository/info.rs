//! `repo.json`: what the repository is for. Written once by `init`; never holds a secret.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{RepositoryError, keys};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoInfo {
    pub format_version: u32,
    /// `pg_control_system().system_identifier` of the source cluster.
    pub system_identifier: String,
    pub database: String,
    pub tenant_column: String,
    /// Fingerprints of the age recipients the repository is encrypted to.
    pub recipients: Vec<String>,
    pub created_at: DateTime<Utc>,
}

impl RepoInfo {
    pub fn parse(bytes: &[u8]) -> Result<Self, RepositoryError> {
        let malformed = |e: serde_json::Error| RepositoryError::Malformed {
            key: keys::REPO_INFO.into(),
            message: e.to_string(),
        };
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(malformed)?;
        let version = value
            .get("format_version")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0) as u32;
        if !super::readable(version) {
            return Err(RepositoryError::UnknownFormat {
                key: keys::REPO_INFO.into(),
                found: version,
            });
        }
        serde_json::from_value(value).map_err(malformed)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("repo info always serializes")
    }

    pub fn source_label(&self) -> String {
        format!("{} (system {})", self.database, self.system_identifier)
    }

    /// A repository serves exactly one source database.
    pub fn check_source(
        &self,
        system_identifier: &str,
        database: &str,
        location: &str,
    ) -> Result<(), RepositoryError> {
        if self.system_identifier != system_identifier || self.database != database {
            return Err(RepositoryError::ForeignRepository {
                location: location.into(),
                expected: format!("{database} (system {system_identifier})"),
                found: self.source_label(),
            });
        }
        Ok(())
    }
}
