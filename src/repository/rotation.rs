//! `rotate`: the repository's recipients changed by re-wrapping the keys (FORMAT.md "Keys").
//! In format 3 only the tenants' and the global keys are encrypted to the recipients, so a
//! rotation rewrites one small object per tenant, never the data.
//!
//! Each key object is replaced atomically, so it is always readable by the old set or by the
//! new one, never by neither; each records the set it is wrapped to, so a rerun after an
//! interruption skips what is done. `repo.json` takes the new set after every key has it;
//! then the keys are walked once more for any a writer still on the old set made meanwhile.

use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use super::tenant_keys::{self, KeyRecord};
use super::{RepoInfo, Repository, RepositoryError, Result, keys};
use crate::codec::{Identities, recipient_fingerprint, unwrap_secret, wrap_secret};
use crate::progress::{Progress, Unit};
use crate::storage::PutMode;

#[derive(Debug, Clone, Default, Serialize)]
pub struct RotationReport {
    /// Fingerprints of the recipients the repository is encrypted to now.
    pub recipients: Vec<String>,
    /// Keys re-wrapped by this run.
    pub rewrapped: usize,
    /// Keys that already had the new recipients (an earlier, interrupted run).
    pub unchanged: usize,
}

/// The recipients after adding `add` (age1…) and removing `remove` (age1… or a fingerprint)
/// from `configured`; a message for the operator when that is not possible.
pub fn target(
    configured: &[age::x25519::Recipient],
    add: &[String],
    remove: &[String],
) -> Result<Vec<age::x25519::Recipient>, String> {
    let mut target = configured.to_vec();
    for r in crate::codec::parse_recipients(add).map_err(|e| e.to_string())? {
        if !target.iter().any(|t| t.to_string() == r.to_string()) {
            target.push(r);
        }
    }
    for r in remove.iter().map(|r| r.trim()) {
        let before = target.len();
        target.retain(|t| t.to_string() != r && recipient_fingerprint(t) != r);
        if target.len() == before {
            return Err(format!(
                "--remove {r}: not one of the recipients (encryption.recipients and --add)"
            ));
        }
    }
    if target.is_empty() {
        return Err(
            "rotate would leave no recipient: nobody could restore. Add one with --add".into(),
        );
    }
    Ok(target)
}

/// Where the repository must stand for a rotation from `configured` to `target`: on the
/// configured recipients (a first run), or on the target already (a rerun after the switch,
/// the configuration not updated yet).
pub fn check_start(
    info: &RepoInfo,
    configured: &[age::x25519::Recipient],
    target: &[age::x25519::Recipient],
) -> Result<(), crate::codec::CodecError> {
    if crate::codec::check_parsed_recipients(target, &info.recipients).is_ok() {
        return Ok(());
    }
    crate::codec::check_parsed_recipients(configured, &info.recipients)
}

/// Re-wraps every key to `target`, opening them with `identities`: returns how many it
/// re-wrapped and how many had `target` already.
pub async fn rotate(
    repo: &Repository,
    info: &RepoInfo,
    identities: &Identities,
    target: &[age::x25519::Recipient],
) -> Result<RotationReport> {
    tenant_keys::require_keyed(repo, info, "rotate its recipients by re-wrapping keys")?;
    let mut fingerprints = crate::codec::sorted_fingerprints(target);
    fingerprints.dedup();
    let (rewrapped, unchanged) = rewrap_all(repo, identities, target, &fingerprints).await?;
    let mut report = RotationReport {
        recipients: fingerprints.clone(),
        rewrapped,
        unchanged,
    };
    if info.recipients != fingerprints {
        let mut updated = info.clone();
        updated.recipients = fingerprints.clone();
        repo.put_info(&updated).await?;
    }
    // Keys a writer with the old recipients stored while the first walk ran.
    report.rewrapped += rewrap_all(repo, identities, target, &fingerprints).await?.0;
    Ok(report)
}

/// Every key object re-wrapped to `target`: (re-wrapped, unchanged).
async fn rewrap_all(
    repo: &Repository,
    identities: &Identities,
    target: &[age::x25519::Recipient],
    fingerprints: &[String],
) -> Result<(usize, usize)> {
    let names: Vec<String> = repo
        .store()
        .list(keys::KEYS_PREFIX)
        .await?
        .into_iter()
        .map(|o| o.key)
        .filter(|k| k.ends_with(".json"))
        .collect();
    let progress = Progress::new("rotate", "keys", Unit::Rewrapped, names.len() as u64);
    let results: Vec<bool> = futures::stream::iter(names)
        .map(|name| {
            let progress = &progress;
            async move {
                let changed = rewrap(repo, &name, identities, target, fingerprints).await?;
                progress.advance(u64::from(changed));
                Ok::<_, RepositoryError>(changed)
            }
        })
        .buffer_unordered(repo.concurrency())
        .try_collect()
        .await?;
    progress.finish();
    let rewrapped = results.iter().filter(|c| **c).count();
    Ok((rewrapped, results.len() - rewrapped))
}

/// Re-wraps one key object unless it has `fingerprints` already; returns whether it did.
async fn rewrap(
    repo: &Repository,
    name: &str,
    identities: &Identities,
    target: &[age::x25519::Recipient],
    fingerprints: &[String],
) -> Result<bool> {
    let mut record: KeyRecord = tenant_keys::read_key(repo, name).await?;
    let mut had = record.wrapped_to.clone();
    had.sort();
    if had == fingerprints {
        return Ok(false);
    }
    let wrapped = hex::decode(&record.secret).map_err(|_| RepositoryError::Malformed {
        key: name.into(),
        message: "the secret is not hex".into(),
    })?;
    let object = |source| RepositoryError::Object {
        key: name.into(),
        source,
    };
    let key = unwrap_secret(&wrapped, identities).map_err(object)?;
    record.secret = hex::encode(wrap_secret(&key, target).map_err(object)?);
    record.wrapped_to = fingerprints.to_vec();
    let body = serde_json::to_vec_pretty(&record).expect("a key record serializes");
    repo.store()
        .put_bytes(name, body.into(), PutMode::Overwrite)
        .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipient() -> age::x25519::Recipient {
        age::x25519::Identity::generate().to_public()
    }

    #[test]
    fn the_target_adds_and_removes_by_key_or_fingerprint() {
        let (a, b) = (recipient(), recipient());
        let both = target(std::slice::from_ref(&a), &[b.to_string()], &[]).unwrap();
        assert_eq!(both.len(), 2);
        let only_b = target(&both, &[], &[recipient_fingerprint(&a)]).unwrap();
        assert_eq!(
            only_b.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [b.to_string()]
        );
        let err = target(std::slice::from_ref(&a), &[], &[b.to_string()]).unwrap_err();
        assert!(err.contains("not one of the recipients"), "{err}");
        let err = target(std::slice::from_ref(&a), &[], &[a.to_string()]).unwrap_err();
        assert!(err.contains("no recipient"), "{err}");
        assert!(target(&[a], &["age1nope".into()], &[]).is_err());
    }
}
