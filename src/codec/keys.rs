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
    let mut found: Vec<String> = parse_recipients(configured)?
        .iter()
        .map(recipient_fingerprint)
        .collect();
    let mut expected = repository.to_vec();
    found.sort();
    expected.sort();
    if found != expected {
        return Err(CodecError::RecipientMismatch { expected, found });
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
    /// Loads from `path`, or from `$UPDOG_BACKUP_IDENTITY` when no path is configured.
    pub fn load(path: Option<&Path>) -> Result<Self, CodecError> {
        match path {
            Some(path) => {
                let shown = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|e| CodecError::Identity {
                    path: shown.clone(),
                    message: format!(
                        "{e} (create one with `updog-backup keygen --output {shown}`)"
                    ),
                })?;
                Self::parse(&text, &shown)
            }
            None => match std::env::var(IDENTITY_ENV) {
                Ok(text) => Self::parse(&text, IDENTITY_ENV),
                Err(_) => Err(CodecError::Identity {
                    path: "(none)".into(),
                    message: format!(
                        "set encryption.identity_file or {IDENTITY_ENV} to decrypt the repository"
                    ),
                }),
            },
        }
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

    #[test]
    fn garbage_identity_does_not_echo_content() {
        let err = Identities::parse("AGE-SECRET-KEY-1NOTREALLYASECRET\n", "f")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("NOTREALLY"), "{err}");
    }
}
