//! age keys: recipients from the config, identities from a file or the environment.
//! Identities are secrets: they are never printed, logged or put in an error message.

use std::path::Path;

use age::secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use super::CodecError;

/// Environment variable that may hold the identity file's contents (for containers that
/// mount secrets as variables); `encryption.identity_file` wins when both are set.
pub const IDENTITY_ENV: &str = "UPDOG_BACKUP_IDENTITY";

pub fn parse_recipients(texts: &[String]) -> Result<Vec<age::x25519::Recipient>, CodecError> {
    texts
        .iter()
        .map(|t| {
            t.trim()
                .parse()
                .map_err(|_| CodecError::Recipient(t.clone()))
        })
        .collect()
}

/// A short, stable, public fingerprint of a recipient for repo.json (recipients are public
/// keys, but a fingerprint is enough to tell which key a repository was made for).
pub fn recipient_fingerprint(recipient: &age::x25519::Recipient) -> String {
    hex::encode(&Sha256::digest(recipient.to_string().as_bytes())[..8])
}

/// Checks that the configured recipients are exactly the repository's (by fingerprint):
/// data encrypted to other keys would be unreadable with the repository's identity, or
/// readable by someone else's.
pub fn check_recipients(configured: &[String], repository: &[String]) -> Result<(), CodecError> {
    check_parsed_recipients(&parse_recipients(configured)?, repository)
}

/// [`check_recipients`] of recipients already parsed.
pub fn check_parsed_recipients(
    configured: &[age::x25519::Recipient],
    repository: &[String],
) -> Result<(), CodecError> {
    let found = sorted_fingerprints(configured);
    let mut expected = repository.to_vec();
    expected.sort();
    if found != expected {
        return Err(CodecError::RecipientMismatch { expected, found });
    }
    Ok(())
}

/// The fingerprints of `recipients`, sorted: a set to compare with repo.json's.
pub fn sorted_fingerprints(recipients: &[age::x25519::Recipient]) -> Vec<String> {
    let mut f: Vec<String> = recipients.iter().map(recipient_fingerprint).collect();
    f.sort();
    f
}

/// The repository's recipients for a message: each fingerprint, with the public key from the
/// config when one has it (an operator finds the matching identity by that key: keygen writes
/// it as the identity file's `# public key:` line).
pub fn describe_recipients(fingerprints: &[String], configured: &[String]) -> String {
    let known: Vec<age::x25519::Recipient> = configured
        .iter()
        .filter_map(|t| t.trim().parse().ok())
        .collect();
    let shown: Vec<String> = fingerprints
        .iter()
        .map(
            |f| match known.iter().find(|r| recipient_fingerprint(r) == *f) {
                Some(r) => format!("{r} (fingerprint {f})"),
                None => format!("the recipient with fingerprint {f}"),
            },
        )
        .collect();
    if shown.is_empty() {
        "no recipient (repo.json lists none)".into()
    } else {
        shown.join(", ")
    }
}

/// Other users may not read an identity (README: mode 0600).
fn check_mode(path: &Path, allow_readable: bool) -> Result<(), CodecError> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(()); // it was just read: a race with its removal is not a mode problem
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o007 != 0 && !allow_readable {
        return Err(CodecError::IdentityPermissions {
            path: path.display().to_string(),
            mode,
        });
    }
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = %format!("{mode:04o}"),
            "the identity file is readable by other users than its owner: chmod 600 it unless that is deliberate"
        );
    }
    Ok(())
}

/// A new identity: (secret identity file text, public recipient).
pub fn generate_identity() -> (String, String) {
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let text = format!(
        "# created by updog-backup keygen: {}\n# public key: {recipient}\n{}\n",
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        identity.to_string().expose_secret()
    );
    (text, recipient)
}

/// A new per-tenant key: its secret wrapped (age, binary) to `recipients`, and its public
/// half. The secret exists only inside this function: writers keep the public half.
pub fn new_wrapped_key(
    recipients: &[age::x25519::Recipient],
) -> Result<(Vec<u8>, age::x25519::Recipient), CodecError> {
    let identity = age::x25519::Identity::generate();
    let public = identity.to_public();
    let wrapped = wrap_secret(&identity, recipients)?;
    Ok((wrapped, public))
}

/// `identity`'s secret encrypted to `recipients` (rotation re-wraps with this too).
pub fn wrap_secret(
    identity: &age::x25519::Identity,
    recipients: &[age::x25519::Recipient],
) -> Result<Vec<u8>, CodecError> {
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|e| CodecError::Encrypt(e.to_string()))?;
    let mut out = Vec::new();
    let mut writer = encryptor.wrap_output(&mut out)?;
    std::io::Write::write_all(&mut writer, identity.to_string().expose_secret().as_bytes())?;
    writer.finish()?;
    Ok(out)
}

/// The key a [`wrap_secret`] output holds, decrypted with `identities`.
pub fn unwrap_secret(
    wrapped: &[u8],
    identities: &Identities,
) -> Result<age::x25519::Identity, CodecError> {
    use std::io::Read;
    let mut reader = super::open_plain(wrapped, identities)?;
    let mut text = String::new();
    reader
        .read_to_string(&mut text)
        .map_err(super::classify_read_error)?;
    // Zeroized when dropped, like the identity it becomes.
    let text = age::secrecy::SecretString::from(text);
    text.expose_secret()
        .trim()
        .parse::<age::x25519::Identity>()
        .map_err(|_| CodecError::Corrupt("a wrapped key does not hold an age identity".into()))
}

/// The identities that can decrypt the repository.
pub struct Identities(Vec<age::x25519::Identity>);

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identities([{} redacted])", self.0.len())
    }
}

impl From<Vec<age::x25519::Identity>> for Identities {
    fn from(v: Vec<age::x25519::Identity>) -> Self {
        Self(v)
    }
}

impl Identities {
    /// Loads from `path`, or from `$UPDOG_BACKUP_IDENTITY` when no path is configured. A file
    /// that other users may read is refused unless `allow_readable` (README: mode 0600), and
    /// one the group may read is accepted with a warning (a group-managed secret is a
    /// deliberate set-up; a world-readable one is a leak).
    pub fn load(path: Option<&Path>, allow_readable: bool) -> Result<Self, CodecError> {
        match path {
            Some(path) => {
                let shown = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|e| CodecError::Identity {
                    path: shown.clone(),
                    message: e.to_string(),
                })?;
                check_mode(path, allow_readable)?;
                Self::parse(&text, &shown)
            }
            None => match std::env::var(IDENTITY_ENV) {
                Ok(text) => Self::parse(&text, IDENTITY_ENV),
                Err(_) => Err(CodecError::Identity {
                    path: "(none)".into(),
                    message: format!("neither encryption.identity_file nor {IDENTITY_ENV} is set"),
                }),
            },
        }
    }

    /// [`Identities::load`] for a repository encrypted to `fingerprints` (repo.json), checked
    /// up front: an identity that is missing, or matches none of them, is named once with the
    /// recipients the repository needs, instead of a failure per object (or advice to create a
    /// new key, which can never decrypt what was stored before it). `configured` are the
    /// config's recipients, shown in full where their fingerprint is the repository's.
    pub fn load_for(
        path: Option<&Path>,
        allow_readable: bool,
        fingerprints: &[String],
        configured: &[String],
    ) -> Result<Self, CodecError> {
        let recipients = describe_recipients(fingerprints, configured);
        let identities = Self::load(path, allow_readable).map_err(|e| match e {
            CodecError::Identity { path, message } => CodecError::NoIdentity {
                origin: path,
                reason: message,
                recipients: recipients.clone(),
            },
            other => other,
        })?;
        let own: Vec<String> = identities
            .recipients()
            .iter()
            .map(recipient_fingerprint)
            .collect();
        if !own.iter().any(|f| fingerprints.contains(f)) {
            return Err(CodecError::IdentityMismatch {
                origin: path.map_or(IDENTITY_ENV.to_string(), |p| p.display().to_string()),
                found: identities
                    .recipients()
                    .iter()
                    .map(|r| format!("{r} (fingerprint {})", recipient_fingerprint(r)))
                    .collect::<Vec<_>>()
                    .join(", "),
                recipients,
            });
        }
        Ok(identities)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, CodecError> {
        let mut identities = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let identity =
                line.parse::<age::x25519::Identity>()
                    .map_err(|_| CodecError::Identity {
                        path: origin.into(),
                        // Never echo the line: it may be (a damaged copy of) the secret key.
                        message: format!(
                            "line {} is not an age X25519 identity (AGE-SECRET-KEY-1…)",
                            n + 1
                        ),
                    })?;
            identities.push(identity);
        }
        if identities.is_empty() {
            return Err(CodecError::Identity {
                path: origin.into(),
                message: "contains no identity".into(),
            });
        }
        Ok(Self(identities))
    }

    pub fn iter(&self) -> impl Iterator<Item = &dyn age::Identity> {
        self.0.iter().map(|i| i as &dyn age::Identity)
    }

    /// These identities and `extra` (tenants' keys unwrapped from the repository), extra first:
    /// a format-3 object is sealed to one of them, so it is found with the first X25519 try.
    pub fn with(&self, extra: impl IntoIterator<Item = age::x25519::Identity>) -> Self {
        let mut all: Vec<_> = extra.into_iter().collect();
        all.extend(self.0.iter().cloned());
        Self(all)
    }

    /// The recipients matching these identities (to check them against repo.json).
    pub fn recipients(&self) -> Vec<age::x25519::Recipient> {
        self.0
            .iter()
            .map(age::x25519::Identity::to_public)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_identity_parses_and_matches_recipient() {
        let (text, recipient) = generate_identity();
        let ids = Identities::parse(&text, "t").unwrap();
        assert_eq!(ids.recipients()[0].to_string(), recipient);
        assert_eq!(parse_recipients(&[recipient]).unwrap().len(), 1);
    }

    fn write_identity(dir: &Path, mode: u32) -> (std::path::PathBuf, String) {
        use std::os::unix::fs::PermissionsExt;
        let (text, recipient) = generate_identity();
        let path = dir.join(format!("identity-{mode:o}.txt"));
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        (path, recipient)
    }

    fn fingerprint(recipient: &str) -> String {
        recipient_fingerprint(&recipient.parse().unwrap())
    }

    /// A missing identity names the recipients the repository needs, never "create one".
    #[test]
    fn a_missing_identity_names_the_repository_recipients() {
        let dir = tempfile::tempdir().unwrap();
        let (_, recipient) = generate_identity();
        let fp = fingerprint(&recipient);
        let err = Identities::load_for(
            Some(&dir.path().join("absent.txt")),
            false,
            std::slice::from_ref(&fp),
            std::slice::from_ref(&recipient),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, CodecError::NoIdentity { .. }), "{text}");
        assert!(text.contains(&recipient) && text.contains(&fp), "{text}");
        assert!(text.contains("cannot decrypt"), "{text}");
        assert!(!text.contains("keygen --output"), "{text}");
        // Without the public key in the config, the fingerprint alone.
        let err = Identities::load_for(
            Some(&dir.path().join("absent.txt")),
            false,
            std::slice::from_ref(&fp),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(&fp) && !err.contains("age1"), "{err}");
    }

    #[test]
    fn an_identity_of_another_repository_is_refused_up_front() {
        let dir = tempfile::tempdir().unwrap();
        let (path, own) = write_identity(dir.path(), 0o600);
        let (_, theirs) = generate_identity();
        let err = Identities::load_for(
            Some(&path),
            false,
            &[fingerprint(&theirs)],
            std::slice::from_ref(&theirs),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, CodecError::IdentityMismatch { .. }), "{text}");
        assert!(text.contains(&own) && text.contains(&theirs), "{text}");
        assert!(text.contains("wrong identity"), "{text}");
        assert!(Identities::load_for(Some(&path), false, &[fingerprint(&own)], &[]).is_ok());
    }

    #[test]
    fn a_world_readable_identity_is_refused_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write_identity(dir.path(), 0o644);
        let err = Identities::load(Some(&path), false).unwrap_err();
        assert!(
            matches!(err, CodecError::IdentityPermissions { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
        assert!(Identities::load(Some(&path), true).is_ok());
        // Group-readable: accepted (with a warning).
        let (path, _) = write_identity(dir.path(), 0o640);
        assert!(Identities::load(Some(&path), false).is_ok());
        let (path, _) = write_identity(dir.path(), 0o400);
        assert!(Identities::load(Some(&path), false).is_ok());
    }

    #[test]
    fn garbage_identity_does_not_echo_content() {
        let err = Identities::parse("AGE-SECRET-KEY-1NOTREALLYASECRET\n", "f")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("NOTREALLY"), "{err}");
    }
}
