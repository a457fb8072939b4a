//! `forget`: a tenant's keys deleted, after a record of the erasure (FORMAT.md "Keys").
//! Everything of the tenant was sealed to those keys, so deleting them (a handful of small
//! objects) makes its archives and its sections in every pack unreadable at once, while the
//! packs themselves, shared with every other tenant, stay as they are.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::tenant_keys::{self, Erasure, ForgottenRecord, KEYED_FORMAT};
use super::{RepoInfo, Repository, RepositoryError, Result};
use crate::codec::recipient_fingerprint;
use crate::storage::PutMode;

/// What `forget` did.
#[derive(Debug, Clone, Serialize)]
pub struct ErasureReport {
    pub tenant: String,
    pub at: DateTime<Utc>,
    pub by: String,
    /// The keys deleted now (their public halves).
    pub keys: Vec<String>,
    /// How many times the tenant was forgotten, this one included.
    pub erasures: usize,
}

/// Records the erasure of `tenant`, then deletes its keys. Safe to rerun: a run stopped
/// between the two left a record naming the keys, which every reader and writer already
/// treats as forgotten; the rerun deletes them.
pub async fn forget(
    repo: &Repository,
    info: &RepoInfo,
    tenant: &str,
    by: &str,
) -> Result<ErasureReport> {
    tenant_keys::require_keyed(repo, info, "forget one tenant")?;
    let live = tenant_keys::tenant_keys(repo, tenant).await?;
    let mut record = tenant_keys::forgotten(repo, tenant)
        .await?
        .unwrap_or_else(|| ForgottenRecord {
            format_version: KEYED_FORMAT,
            tenant: tenant.to_string(),
            erasures: Vec::new(),
        });
    let already: Vec<String> = record.keys().collect();
    let new: Vec<String> = live
        .iter()
        .map(|(_, recipient)| recipient.clone())
        .filter(|r| {
            r.parse()
                .is_ok_and(|r| !already.contains(&recipient_fingerprint(&r)))
        })
        .collect();
    if live.is_empty() && record.erasures.is_empty() {
        return Err(RepositoryError::UnknownTenant(tenant.to_string()));
    }
    // Nothing new when a run stopped after its record: the rerun only deletes.
    if !new.is_empty() {
        record.erasures.push(Erasure {
            at: Utc::now(),
            by: by.to_string(),
            recipients: new,
        });
        let body = serde_json::to_vec_pretty(&record).expect("a record serializes");
        repo.store()
            .put_bytes(
                &tenant_keys::forgotten_object(tenant),
                body.into(),
                PutMode::Overwrite,
            )
            .await?;
    }
    for (name, _) in &live {
        repo.delete_object(name).await?;
    }
    tracing::info!(tenant, keys = live.len(), "tenant forgotten");
    let last = record.last();
    Ok(ErasureReport {
        tenant: tenant.to_string(),
        at: last.at,
        by: last.by.clone(),
        keys: live.into_iter().map(|(_, f)| f).collect(),
        erasures: record.erasures.len(),
    })
}

/// The refusal for a forgotten tenant, when `at` (`None`: the latest instant) is before its
/// last erasure or nothing of it was stored since.
pub async fn check_not_forgotten(
    repo: &Repository,
    tenant: &str,
    at: Option<DateTime<Utc>>,
) -> Result<()> {
    let Some(record) = tenant_keys::forgotten(repo, tenant).await? else {
        return Ok(());
    };
    let reappeared = !tenant_keys::tenant_keys(repo, tenant).await?.is_empty();
    refuse_forgotten(&record, reappeared, at)
}

/// The refusal of [`check_not_forgotten`], for a tenant with an erasure `record` and, if it
/// `reappeared`, a key again.
pub fn refuse_forgotten(
    record: &ForgottenRecord,
    reappeared: bool,
    at: Option<DateTime<Utc>>,
) -> Result<()> {
    let last = record.last();
    if !reappeared || at.is_some_and(|t| t <= last.at) {
        return Err(RepositoryError::Forgotten {
            tenant: record.tenant.clone(),
            at: last.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            by: last.by.clone(),
            reappeared,
        });
    }
    Ok(())
}

/// Who runs a command, for records: `<os user>@<host>`.
pub fn operator() -> String {
    use std::os::unix::fs::MetadataExt;
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| match std::fs::metadata("/proc/self") {
            Ok(meta) => format!("uid {}", meta.uid()),
            Err(_) => "?".into(),
        });
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    format!("{user}@{host}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::keys;

    #[test]
    fn forgotten_keys_keep_their_folder() {
        assert_eq!(
            tenant_keys::forgotten_object("../a"),
            format!("{}%2E%2E%2Fa.json", keys::FORGOTTEN_PREFIX)
        );
    }
}
