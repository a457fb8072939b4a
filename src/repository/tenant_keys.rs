//! Per-tenant keys (format 3, FORMAT.md "Keys"). Every tenant's sealed bytes — its snapshot
//! archives and its pack sections — are encrypted to the tenant's own X25519 key, and the
//! global ones to a global key; only these keys' secrets are encrypted ("wrapped") to the
//! repository's recipients. So forgetting a tenant is deleting its keys: its sections stay
//! inside packs shared with every other tenant, and nothing can decrypt them any more; and
//! rotating the recipients re-wraps one small object per tenant, never the data.
//!
//! Writers ([`SealingKeys`]) hold public keys only: a new key's secret is wrapped the moment it
//! is made and dropped, so the daemon's host never holds a way to decrypt a tenant. Readers
//! ([`Keyring`]) unwrap the keys they need with the repository identity.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use super::{RepoInfo, Repository, RepositoryError, Result, keys};
use crate::codec::{CodecError, Identities, new_wrapped_key, recipient_fingerprint, unwrap_secret};
use crate::storage::{PutMode, StorageError};

/// The first format with per-tenant keys.
pub const KEYED_FORMAT: u32 = 3;

/// `keys/<scope>/<recipient>.json`: one wrapped key. The public key is in the object's name, so
/// a writer learns every tenant's public key from a listing, without a read per tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    pub format_version: u32,
    /// `None` for the global key.
    pub tenant: Option<String>,
    /// The public key (`age1…`): what sections and archives are sealed to.
    pub recipient: String,
    /// Fingerprints of the repository recipients `secret` is encrypted to (rotation's progress).
    pub wrapped_to: Vec<String>,
    pub created_at: DateTime<Utc>,
    /// Hex of age (binary) of the key's `AGE-SECRET-KEY-1…` line, to `wrapped_to`.
    pub secret: String,
}

/// `forgotten/<tenant>.json`: the erasures of one tenant, oldest first. No tenant data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForgottenRecord {
    pub format_version: u32,
    pub tenant: String,
    pub erasures: Vec<Erasure>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Erasure {
    pub at: DateTime<Utc>,
    /// `<os user>@<host>`: who ran `forget`.
    pub by: String,
    /// The public keys (`age1…`) of the keys deleted: what is sealed to them is unreadable on
    /// purpose. Writers seal to them what the tenant committed before the erasure and they
    /// had not sealed yet (a daemon behind, a pack open while `forget` ran).
    pub recipients: Vec<String>,
}

impl ForgottenRecord {
    pub fn last(&self) -> &Erasure {
        self.erasures.last().expect("a record holds an erasure")
    }
    /// Fingerprints of every key deleted.
    pub fn keys(&self) -> impl Iterator<Item = String> + '_ {
        self.erasures.iter().flat_map(|e| {
            e.recipients.iter().map(|r| {
                r.parse::<age::x25519::Recipient>()
                    .map_or_else(|_| r.clone(), |r| recipient_fingerprint(&r))
            })
        })
    }

    /// The last erasure that deleted a key: its time, and a deleted key to seal to.
    fn sealing_away(&self) -> Option<(DateTime<Utc>, PublicKey)> {
        let last = self
            .erasures
            .iter()
            .rev()
            .find(|e| !e.recipients.is_empty())?;
        let recipient = last.recipients.first()?.parse().ok()?;
        Some((last.at, PublicKey::new(recipient)))
    }
}

/// A public key and its fingerprint (the `sealed_to` of what is sealed to it).
#[derive(Debug, Clone)]
pub struct PublicKey {
    pub recipient: age::x25519::Recipient,
    pub fingerprint: String,
}

impl PublicKey {
    fn new(recipient: age::x25519::Recipient) -> Self {
        Self {
            fingerprint: recipient_fingerprint(&recipient),
            recipient,
        }
    }
}

/// What to seal one object or section to, and what to record about it.
#[derive(Debug, Clone)]
pub struct Seal {
    pub recipients: Vec<age::x25519::Recipient>,
    /// The key's fingerprint (format 3), recorded beside the object; `None` in format 2.
    pub sealed_to: Option<String>,
}

/// Refuses what only per-tenant keys make possible, in a format-2 repository.
pub fn require_keyed(repo: &Repository, info: &RepoInfo, what: &'static str) -> Result<()> {
    if info.format_version < KEYED_FORMAT {
        return Err(RepositoryError::Unkeyed {
            location: repo.location(),
            what,
        });
    }
    Ok(())
}

fn scope_prefix(tenant: Option<&str>) -> String {
    match tenant {
        None => format!("{}global/", keys::KEYS_PREFIX),
        Some(t) => format!("{}tenants/{}/", keys::KEYS_PREFIX, keys::encode_tenant(t)),
    }
}

fn key_object(tenant: Option<&str>, recipient: &str) -> String {
    format!("{}{recipient}.json", scope_prefix(tenant))
}

pub(super) fn forgotten_object(tenant: &str) -> String {
    format!(
        "{}{}.json",
        keys::FORGOTTEN_PREFIX,
        keys::encode_tenant(tenant)
    )
}

/// `(tenant, recipient)` of a key object's name; `None` for anything else under `keys/`.
fn parse_key_name(key: &str) -> Option<(Option<String>, String)> {
    let rest = key.strip_prefix(keys::KEYS_PREFIX)?;
    let (scope, file) = rest.rsplit_once('/')?;
    let recipient = file.strip_suffix(".json")?.to_string();
    let tenant = match scope {
        "global" => None,
        s => Some(keys::decode_tenant(s.strip_prefix("tenants/")?)?),
    };
    Some((tenant, recipient))
}

fn malformed(key: &str, message: impl Into<String>) -> RepositoryError {
    RepositoryError::Malformed {
        key: key.into(),
        message: message.into(),
    }
}

/// Every key object's `(name, tenant, recipient)`, from one listing.
async fn list_keys(
    repo: &Repository,
    prefix: &str,
) -> Result<Vec<(String, Option<String>, age::x25519::Recipient)>> {
    let mut out = Vec::new();
    for object in repo.store().list(prefix).await? {
        let Some((tenant, recipient)) = parse_key_name(&object.key) else {
            continue;
        };
        let recipient = recipient
            .parse()
            .map_err(|_| malformed(&object.key, "the name is not an age recipient"))?;
        out.push((object.key, tenant, recipient));
    }
    Ok(out)
}

fn parse<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| malformed(key, e.to_string()))
}

pub(super) async fn read_key(repo: &Repository, key: &str) -> Result<KeyRecord> {
    let record: KeyRecord = parse(key, &repo.store().get_bytes(key, None).await?)?;
    if Some((record.tenant.clone(), record.recipient.clone())) != parse_key_name(key) {
        return Err(malformed(key, "the record names another key than its name"));
    }
    Ok(record)
}

/// The tenant's stored keys: `(object name, public key)`.
pub async fn tenant_keys(repo: &Repository, tenant: &str) -> Result<Vec<(String, String)>> {
    Ok(list_keys(repo, &scope_prefix(Some(tenant)))
        .await?
        .into_iter()
        .map(|(name, _, recipient)| (name, recipient.to_string()))
        .collect())
}

/// The tenant's erasures, if it was ever forgotten.
pub async fn forgotten(repo: &Repository, tenant: &str) -> Result<Option<ForgottenRecord>> {
    let key = forgotten_object(tenant);
    match repo.store().get_bytes(&key, None).await {
        Ok(bytes) => Ok(Some(parse(&key, &bytes)?)),
        Err(StorageError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Every forgotten tenant's record.
pub async fn all_forgotten(repo: &Repository) -> Result<Vec<ForgottenRecord>> {
    let listed = repo.store().list(keys::FORGOTTEN_PREFIX).await?;
    futures::stream::iter(listed)
        .map(|object| async move {
            let bytes = repo.store().get_bytes(&object.key, None).await?;
            parse::<ForgottenRecord>(&object.key, &bytes)
        })
        .buffer_unordered(repo.concurrency())
        .try_collect()
        .await
}

/// The public keys writers seal to, and the keys they made that are not stored yet.
#[derive(Debug)]
pub struct SealingKeys {
    /// False in a format-2 repository: everything is sealed to the repository's recipients.
    per_tenant: bool,
    /// The configured recipients: format 2 seals to them, format 3 wraps new keys to them.
    repository: Vec<age::x25519::Recipient>,
    state: Mutex<SealingState>,
}

#[derive(Debug, Default)]
struct SealingState {
    global: Option<PublicKey>,
    tenants: HashMap<String, PublicKey>,
    /// Key objects made since the last [`SealingKeys::store_new`]: `(name, record)`.
    pending: Vec<(String, KeyRecord)>,
    /// Fingerprints of forgotten keys: never sealed to again.
    forgotten: HashSet<String>,
    /// `forgotten/` objects read, with their size (a record grows with each erasure).
    forgotten_seen: HashMap<String, u64>,
    /// Erased tenant → when, and a deleted key of it.
    erased: HashMap<String, (DateTime<Utc>, PublicKey)>,
}

impl SealingKeys {
    /// The repository's keys, by listing (format 3), or the recipients alone (format 2).
    pub async fn load(
        repo: &Repository,
        info: &RepoInfo,
        recipients: Vec<age::x25519::Recipient>,
    ) -> Result<Arc<Self>> {
        let keys = Self {
            per_tenant: info.format_version >= KEYED_FORMAT,
            repository: recipients,
            state: Mutex::default(),
        };
        if keys.per_tenant {
            keys.refresh(repo).await?;
        }
        Ok(Arc::new(keys))
    }

    /// Sealing to `recipients` for everyone: format 2, and unit tests.
    pub fn unkeyed(recipients: Vec<age::x25519::Recipient>) -> Arc<Self> {
        Arc::new(Self {
            per_tenant: false,
            repository: recipients,
            state: Mutex::default(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SealingState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The format version of what is sealed with these keys (manifests, footers).
    pub fn format_version(&self) -> u32 {
        if self.per_tenant {
            KEYED_FORMAT
        } else {
            super::FORMAT_2
        }
    }

    /// Reads the erasures `forget` recorded since the last call (a listing, and a read of each
    /// new or changed record) and drops the keys they name: the tenant's bytes from after the
    /// erasure get a new key, those from before it the deleted one ([`Self::seal_for`]). Only
    /// a piece sealed while `forget` ran (a large transaction is sealed in pieces as it comes)
    /// may hold changes from after the erasure under the deleted key: they are erased too.
    pub async fn notice_forgotten(&self, repo: &Repository) -> Result<()> {
        if !self.per_tenant {
            return Ok(());
        }
        let listed = repo.store().list(keys::FORGOTTEN_PREFIX).await?;
        let changed: Vec<_> = {
            let state = self.state();
            listed
                .into_iter()
                .filter(|o| state.forgotten_seen.get(&o.key) != Some(&o.size))
                .collect()
        };
        for object in changed {
            let bytes = repo.store().get_bytes(&object.key, None).await?;
            let record: ForgottenRecord = parse(&object.key, &bytes)?;
            let mut state = self.state();
            state.forgotten.extend(record.keys());
            if let Some(away) = record.sealing_away() {
                state.erased.insert(record.tenant.clone(), away);
            }
            let SealingState {
                tenants, forgotten, ..
            } = &mut *state;
            tenants.retain(|_, k| !forgotten.contains(&k.fingerprint));
            state.forgotten_seen.insert(object.key, bytes.len() as u64);
        }
        Ok(())
    }

    /// Reads the erasures, then every stored key's public half (one listing).
    async fn refresh(&self, repo: &Repository) -> Result<()> {
        self.notice_forgotten(repo).await?;
        let forgotten = self.state().forgotten.clone();
        let listed = list_keys(repo, keys::KEYS_PREFIX).await?;
        let mut global: Option<PublicKey> = None;
        let mut tenants: HashMap<String, Option<PublicKey>> = HashMap::new();
        for (_, tenant, recipient) in listed {
            let key = PublicKey::new(recipient);
            if forgotten.contains(&key.fingerprint) {
                continue; // `forget` stopped between its record and the deletion
            }
            // Two writers may each have made a key for a new tenant: readers take all of
            // them, writers the same one (the smallest).
            let slot = match tenant {
                None => &mut global,
                Some(t) => tenants.entry(t).or_default(),
            };
            keep_smallest(slot, key);
        }
        let mut tenants: HashMap<String, PublicKey> = tenants
            .into_iter()
            .filter_map(|(t, k)| Some((t, k?)))
            .collect();
        let mut state = self.state();
        // Keys made here and not stored yet are still the ones to seal to.
        for (_, record) in &state.pending {
            let key = PublicKey::new(record.recipient.parse().expect("made here"));
            match &record.tenant {
                None => global = Some(key),
                Some(t) => {
                    tenants.insert(t.clone(), key);
                }
            }
        }
        state.global = global;
        state.tenants = tenants;
        Ok(())
    }

    /// What to seal `tenant`'s bytes (`None`: global ones) to; `since` is when the first
    /// change they hold committed (a snapshot's consistent time). A tenant seen for the first
    /// time gets a new key, wrapped to the repository's recipients and kept as a pending
    /// object: [`Self::store_new`] must store it before anything sealed to it is published.
    /// Bytes of an erased tenant from before its erasure are sealed to a deleted key: what
    /// `forget` erased stays erased, however late a writer learns of it.
    pub fn seal_for(
        &self,
        tenant: Option<&str>,
        since: Option<DateTime<Utc>>,
    ) -> Result<Seal, CodecError> {
        if !self.per_tenant {
            return Ok(Seal {
                recipients: self.repository.clone(),
                sealed_to: None,
            });
        }
        let mut state = self.state();
        if let Some((at, key)) = tenant.and_then(|t| state.erased.get(t))
            && since.is_none_or(|s| s <= *at)
        {
            return Ok(Seal {
                recipients: vec![key.recipient.clone()],
                sealed_to: Some(key.fingerprint.clone()),
            });
        }
        let known = match tenant {
            None => state.global.clone(),
            Some(t) => state.tenants.get(t).cloned(),
        };
        let key = match known {
            Some(k) => k,
            None => {
                let (wrapped, public) = new_wrapped_key(&self.repository)?;
                let key = PublicKey::new(public);
                let record = KeyRecord {
                    format_version: KEYED_FORMAT,
                    tenant: tenant.map(str::to_string),
                    recipient: key.recipient.to_string(),
                    wrapped_to: self.repository.iter().map(recipient_fingerprint).collect(),
                    created_at: Utc::now(),
                    secret: hex::encode(wrapped),
                };
                state
                    .pending
                    .push((key_object(tenant, &record.recipient), record));
                match tenant {
                    None => state.global = Some(key.clone()),
                    Some(t) => {
                        state.tenants.insert(t.to_string(), key.clone());
                    }
                }
                key
            }
        };
        Ok(Seal {
            recipients: vec![key.recipient],
            sealed_to: Some(key.fingerprint),
        })
    }

    /// Stores the keys made since the last call. Call it before publishing anything sealed
    /// with [`Self::seal_for`] (a pack, a manifest): what is sealed to a key that was never
    /// stored could never be read. A key `forget` recorded meanwhile is stored all the same
    /// (its tenant's bytes already went to it) and deleted by the next `forget --org`.
    pub async fn store_new(&self, repo: &Repository) -> Result<()> {
        if self.state().pending.is_empty() {
            return Ok(());
        }
        // `rotate` may have changed the recipients since this writer started: a key wrapped to
        // the old ones would stay readable by an identity the operator meant to retire.
        crate::codec::check_parsed_recipients(&self.repository, &repo.info().await?.recipients)?;
        let pending = std::mem::take(&mut self.state().pending);
        // Concurrently: a first snapshot of thousands of tenants makes as many keys.
        let results: Vec<_> = futures::stream::iter(pending)
            .map(|(name, record)| async move {
                let body = serde_json::to_vec_pretty(&record).expect("a key record serializes");
                let stored = repo
                    .store()
                    .put_bytes(&name, body.into(), PutMode::CreateNew)
                    .await;
                match stored {
                    Ok(_) | Err(StorageError::AlreadyExists { .. }) => Ok(()),
                    Err(e) => Err((e, name, record)),
                }
            })
            .buffer_unordered(repo.concurrency())
            .collect()
            .await;
        let mut failed = None;
        let mut left = Vec::new();
        for result in results {
            if let Err((e, name, record)) = result {
                failed.get_or_insert(e);
                left.push((name, record));
            }
        }
        if let Some(e) = failed {
            // Kept for the retry: the sections sealed to them are still to be published.
            self.state().pending.extend(left);
            return Err(e.into());
        }
        Ok(())
    }
}

fn keep_smallest(slot: &mut Option<PublicKey>, key: PublicKey) {
    let smaller = match slot {
        Some(k) => key.recipient.to_string() < k.recipient.to_string(),
        None => true,
    };
    if smaller {
        *slot = Some(key);
    }
}

/// The keys a reader unwrapped, by fingerprint, and the forgotten ones.
pub struct Keyring {
    base: Arc<Identities>,
    keys: HashMap<String, age::x25519::Identity>,
    /// Fingerprint of a forgotten key → its tenant's record.
    forgotten: HashMap<String, Arc<ForgottenRecord>>,
    /// Loaded for one tenant: its erasures, and whether it has a key (again).
    tenant: Option<(Option<ForgottenRecord>, bool)>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keyring({} keys redacted)", self.keys.len())
    }
}

impl Keyring {
    /// The global keys and `tenant`'s (every key, for `None`), unwrapped with `base`; in a
    /// format-2 repository, `base` alone. A listing per prefix and a read per key.
    pub async fn load(
        repo: &Repository,
        base: Arc<Identities>,
        tenant: Option<&str>,
    ) -> Result<Self> {
        let forgotten_records: Vec<ForgottenRecord> = match tenant {
            Some(t) => forgotten(repo, t).await?.into_iter().collect(),
            None => all_forgotten(repo).await?,
        };
        let tenant_record = tenant.and(forgotten_records.first().cloned());
        let mut forgotten = HashMap::new();
        for record in forgotten_records {
            let record = Arc::new(record);
            for key in record.keys() {
                forgotten.insert(key, record.clone());
            }
        }
        let mut listed = list_keys(repo, &scope_prefix(None)).await?;
        listed.extend(match tenant {
            Some(t) => list_keys(repo, &scope_prefix(Some(t))).await?,
            None => list_keys(repo, &format!("{}tenants/", keys::KEYS_PREFIX)).await?,
        });
        let listed: Vec<_> = listed
            .into_iter()
            .filter(|(_, _, r)| !forgotten.contains_key(&recipient_fingerprint(r)))
            .collect();
        let has_key = listed.iter().any(|(_, t, _)| t.is_some());
        let base_ref = &base;
        let keys = futures::stream::iter(listed)
            .map(|(name, _, recipient)| async move {
                let record = read_key(repo, &name).await?;
                let wrapped = hex::decode(&record.secret)
                    .map_err(|_| malformed(&name, "the secret is not hex"))?;
                let identity = unwrap_secret(&wrapped, base_ref).map_err(|source| {
                    RepositoryError::Object {
                        key: name.clone(),
                        source,
                    }
                })?;
                if identity.to_public().to_string() != recipient.to_string() {
                    return Err(malformed(&name, "the secret does not match its public key"));
                }
                Ok::<_, RepositoryError>((recipient_fingerprint(&recipient), identity))
            })
            .buffer_unordered(repo.concurrency())
            .try_collect()
            .await?;
        Ok(Self {
            base,
            keys,
            forgotten,
            tenant: tenant.map(|_| (tenant_record, has_key)),
        })
    }

    /// Loaded for one tenant: refuses it when it was forgotten before `at` (`None`: the
    /// latest instant), as [`super::erasure::check_not_forgotten`] does.
    pub fn refuse_forgotten(&self, at: Option<DateTime<Utc>>) -> Result<()> {
        match &self.tenant {
            Some((Some(record), has_key)) => super::erasure::refuse_forgotten(record, *has_key, at),
            _ => Ok(()),
        }
    }

    /// Everything this keyring opens: the unwrapped keys, then the repository identity
    /// (format-2 objects are sealed to it).
    pub fn identities(&self) -> Arc<Identities> {
        if self.keys.is_empty() {
            return self.base.clone();
        }
        Arc::new(self.base.with(self.keys.values().cloned()))
    }

    /// What opens an object sealed to `sealed_to` (`None`: a format-2 object).
    pub fn identities_for(&self, sealed_to: Option<&str>) -> Arc<Identities> {
        match sealed_to.and_then(|f| self.keys.get(f)) {
            Some(key) => Arc::new(self.base.with([key.clone()])),
            None => self.base.clone(),
        }
    }

    /// The erasure that made what is sealed to `sealed_to` unreadable, if one did.
    pub fn forgotten(&self, sealed_to: Option<&str>) -> Option<&Arc<ForgottenRecord>> {
        self.forgotten.get(sealed_to?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::erasure;
    use crate::storage::MemoryStore;

    #[tokio::test]
    async fn an_erased_tenant_is_sealed_away_before_its_erasure_and_to_a_new_key_after() {
        let repo = Repository::new(Arc::new(MemoryStore::new()));
        let identity = age::x25519::Identity::generate();
        let recipient = identity.to_public();
        let info = RepoInfo {
            format_version: KEYED_FORMAT,
            system_identifier: "1".into(),
            database: "d".into(),
            tenant_column: "organization_id".into(),
            recipients: vec![recipient_fingerprint(&recipient)],
            created_at: Utc::now(),
        };
        repo.init(&info).await.unwrap();
        let keys = SealingKeys::load(&repo, &info, vec![recipient.clone()])
            .await
            .unwrap();
        let first = keys.seal_for(Some("a"), None).unwrap().sealed_to;
        assert_eq!(keys.seal_for(Some("a"), None).unwrap().sealed_to, first);
        assert_ne!(keys.seal_for(Some("b"), None).unwrap().sealed_to, first);
        keys.store_new(&repo).await.unwrap();

        let key_of_a = tenant_keys(&repo, "a").await.unwrap()[0].0.clone();
        let stored_key = repo.store().get_bytes(&key_of_a, None).await.unwrap();
        let erased = erasure::forget(&repo, &info, "a", "test").await.unwrap().at;
        let second = chrono::TimeDelta::seconds(1);

        // `forget` stopped between its record and the deletion: the key object is back, and
        // forgotten all the same; the rerun deletes it and records no second erasure.
        repo.store()
            .put_bytes(&key_of_a, stored_key, PutMode::CreateNew)
            .await
            .unwrap();
        let meanwhile = SealingKeys::load(&repo, &info, vec![recipient.clone()])
            .await
            .unwrap();
        let sealed = meanwhile
            .seal_for(Some("a"), Some(erased + second))
            .unwrap();
        assert!(sealed.sealed_to.is_some() && sealed.sealed_to != first);
        let rerun = erasure::forget(&repo, &info, "a", "test").await.unwrap();
        assert_eq!(rerun.erasures, 1);
        assert!(tenant_keys(&repo, "a").await.unwrap().is_empty());

        // The running writer learns of it before its next pack.
        keys.notice_forgotten(&repo).await.unwrap();
        let before = keys.seal_for(Some("a"), Some(erased - second)).unwrap();
        assert_eq!(
            before.sealed_to, first,
            "before the erasure: the deleted key"
        );
        let after = keys.seal_for(Some("a"), Some(erased + second)).unwrap();
        assert!(after.sealed_to.is_some() && after.sealed_to != first);
        keys.store_new(&repo).await.unwrap();

        let ids = Arc::new(Identities::from(vec![identity]));
        let keyring = Keyring::load(&repo, ids, Some("a")).await.unwrap();
        assert!(keyring.forgotten(first.as_deref()).is_some());
        assert!(keyring.forgotten(after.sealed_to.as_deref()).is_none());
        keyring.refuse_forgotten(Some(erased + second)).unwrap();
        assert!(keyring.refuse_forgotten(Some(erased - second)).is_err());

        // A writer started later (a restarted daemon) does the same.
        let fresh = SealingKeys::load(&repo, &info, vec![recipient])
            .await
            .unwrap();
        let sealed = |at| fresh.seal_for(Some("a"), Some(at)).unwrap().sealed_to;
        assert_eq!(sealed(erased - second), first);
        assert_eq!(sealed(erased + second), after.sealed_to);
    }
}
