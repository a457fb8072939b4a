//! Codec: plaintext ─► zstd ─► age (X25519) on the way out, the reverse on the way in.
//!
//! Owns the byte transformation and the keys' parsing, nothing else: it never touches storage
//! or the database. Both directions stream in bounded memory. The write side is a push
//! encoder ([`Sealer`]) so async code can feed it chunk by chunk without a thread; the read
//! side is a `std::io::Read` adapter meant for a blocking thread.
//!
//! Integrity comes from age's STREAM construction: every 64 KiB chunk is authenticated and the
//! last chunk is marked, so a flipped byte or a cut tail is an error, never silent garbage.

mod keys;

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};

pub use keys::{
    Identities, check_parsed_recipients, check_recipients, generate_identity, new_wrapped_key,
    parse_recipients, recipient_fingerprint, sorted_fingerprints, unwrap_secret, wrap_secret,
};

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error(
        "invalid age recipient {0:?}: expected an X25519 recipient starting with age1 (see `updog-backup keygen`)"
    )]
    Recipient(String),
    #[error(
        "encryption.recipients do not match the repository's (repo.json lists fingerprints {expected:?}, the config gives {found:?}): \
         new data would be unreadable with the repository's identity; restore the configured recipients, or start a new repository"
    )]
    RecipientMismatch {
        expected: Vec<String>,
        found: Vec<String>,
    },
    #[error("identity file {path}: {message}")]
    Identity { path: String, message: String },
    #[error(
        "no identity to decrypt the repository ({origin}: {reason}); it is encrypted to {recipients}: \
         point encryption.identity_file (or UPDOG_BACKUP_IDENTITY) at the identity file holding the matching secret key. \
         A new key from `updog-backup keygen` cannot decrypt backups made before it"
    )]
    NoIdentity {
        origin: String,
        reason: String,
        recipients: String,
    },
    #[error(
        "wrong identity for this repository: {origin} holds the key of {found}, but the repository is encrypted to {recipients}; \
         use the identity file whose public key (keygen writes it as its `# public key:` line) is one of those"
    )]
    IdentityMismatch {
        origin: String,
        found: String,
        recipients: String,
    },
    #[error(
        "identity file {path} is readable by other users (mode {mode:04o}): run `chmod 600 {path}`; \
         where its mode cannot change (e.g. a mounted secret: give it mode 0400), set encryption.allow_readable_identity = true"
    )]
    IdentityPermissions { path: String, mode: u32 },
    #[error(
        "none of the configured identities can decrypt this object: wrong identity file for this repository?"
    )]
    WrongIdentity,
    #[error("object is damaged or was tampered with ({0})")]
    Corrupt(String),
    #[error("encryption: {0}")]
    Encrypt(String),
    #[error("codec I/O: {0}")]
    Io(#[from] io::Error),
}

/// Output buffer shared between the encoder chain (which owns its writer) and the [`Sealer`].
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<BytesMut>>);

impl SharedBuf {
    fn take(&self) -> BytesMut {
        std::mem::take(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
    fn len(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

impl Write for SharedBuf {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a finished [`Sealer`] reports about the bytes it produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedSummary {
    /// Ciphertext bytes produced (the stored object's size).
    pub stored_bytes: u64,
    /// Plaintext bytes consumed.
    pub plain_bytes: u64,
    /// SHA-256 of the ciphertext, lowercase hex: lets `verify` check objects without the key.
    pub sha256: String,
}

/// Push encoder: write plaintext, take ciphertext as it becomes available.
pub struct Sealer {
    encoder: zstd::stream::write::Encoder<'static, age::stream::StreamWriter<SharedBuf>>,
    out: SharedBuf,
    hasher: Sha256,
    stored: u64,
    plain: u64,
}

/// Ciphertext is handed out in pieces of about this size, so downstream messages stay large
/// enough to be cheap and small enough to bound memory.
pub const OUTPUT_CHUNK: usize = 256 * 1024;

impl Sealer {
    pub fn new(recipients: &[age::x25519::Recipient], level: i32) -> Result<Self, CodecError> {
        let out = SharedBuf::default();
        let encryptor =
            age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
                .map_err(|e| CodecError::Encrypt(e.to_string()))?;
        let writer = encryptor.wrap_output(out.clone())?;
        let encoder = zstd::stream::write::Encoder::new(writer, level)?;
        Ok(Self {
            encoder,
            out,
            hasher: Sha256::new(),
            stored: 0,
            plain: 0,
        })
    }

    pub fn write(&mut self, plaintext: &[u8]) -> Result<(), CodecError> {
        self.encoder.write_all(plaintext)?;
        self.plain += plaintext.len() as u64;
        Ok(())
    }

    /// Ciphertext produced so far, once at least [`OUTPUT_CHUNK`] bytes are pending.
    pub fn take_output(&mut self) -> Option<Bytes> {
        if self.out.len() < OUTPUT_CHUNK {
            return None;
        }
        Some(self.drain())
    }

    fn drain(&mut self) -> Bytes {
        let bytes = self.out.take().freeze();
        self.hasher.update(&bytes);
        self.stored += bytes.len() as u64;
        bytes
    }

    /// Ends the zstd frame and the age stream; returns the last ciphertext and the summary.
    pub fn finish(self) -> Result<(Bytes, SealedSummary), CodecError> {
        let Self {
            encoder,
            out,
            mut hasher,
            stored,
            plain,
        } = self;
        encoder.finish()?.finish()?;
        let rest = out.take().freeze();
        hasher.update(&rest);
        let summary = SealedSummary {
            stored_bytes: stored + rest.len() as u64,
            plain_bytes: plain,
            sha256: hex::encode(hasher.finalize()),
        };
        Ok((rest, summary))
    }
}

/// Wraps a reader of stored bytes: hashes them (for the digest check) as they pass.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }
    /// Bytes read so far and their SHA-256 (lowercase hex).
    pub fn digest(&self) -> (u64, String) {
        (self.bytes, hex::encode(self.hasher.clone().finalize()))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Decrypts then decompresses `stored`. Errors in the stream surface from `read` as
/// `io::ErrorKind::InvalidData`; use [`classify_read_error`] to turn them into a [`CodecError`].
pub fn open<R: Read>(stored: R, identities: &Identities) -> Result<impl Read, CodecError> {
    let decryptor =
        age::Decryptor::new_buffered(io::BufReader::new(stored)).map_err(map_decrypt_error)?;
    let reader = decryptor
        .decrypt(identities.iter())
        .map_err(map_decrypt_error)?;
    Ok(zstd::stream::read::Decoder::new(reader)?)
}

/// [`open`] for an object recorded as sealed to the key `sealed_to` (format 3). The reader
/// holds that key (or was refused before it read anything), so a key that does not open it
/// means the object is not the one recorded: another tenant's, swapped in.
pub fn open_recorded<R: Read>(
    stored: R,
    identities: &Identities,
    sealed_to: Option<&str>,
) -> Result<impl Read, CodecError> {
    open(stored, identities).map_err(|e| match (e, sealed_to) {
        (CodecError::WrongIdentity, Some(key)) => CodecError::Corrupt(format!(
            "not sealed to the key recorded for it ({key}): the object was swapped for another tenant's, or that key was deleted from keys/"
        )),
        (e, _) => e,
    })
}

/// Decrypts `stored` (age without zstd: the wrapped keys).
pub(crate) fn open_plain<R: Read>(
    stored: R,
    identities: &Identities,
) -> Result<impl Read, CodecError> {
    let decryptor =
        age::Decryptor::new_buffered(io::BufReader::new(stored)).map_err(map_decrypt_error)?;
    decryptor
        .decrypt(identities.iter())
        .map_err(map_decrypt_error)
}

fn map_decrypt_error(e: age::DecryptError) -> CodecError {
    match e {
        age::DecryptError::NoMatchingKeys => CodecError::WrongIdentity,
        age::DecryptError::Io(io) if io.kind() != io::ErrorKind::UnexpectedEof => {
            CodecError::Io(io)
        }
        other => CodecError::Corrupt(format!("age header: {other}")),
    }
}

/// Errors met while reading an opened object are integrity failures unless the underlying
/// storage failed; the wording says which.
pub fn classify_read_error(e: io::Error) -> CodecError {
    match e.kind() {
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof | io::ErrorKind::Other => {
            CodecError::Corrupt(e.to_string())
        }
        _ => CodecError::Io(e),
    }
}

impl crate::retry::Classify for CodecError {
    fn class(&self) -> crate::retry::ErrorClass {
        use crate::retry::ErrorClass;
        match self {
            CodecError::Recipient(_)
            | CodecError::RecipientMismatch { .. }
            | CodecError::Identity { .. }
            | CodecError::NoIdentity { .. }
            | CodecError::IdentityMismatch { .. }
            | CodecError::IdentityPermissions { .. }
            | CodecError::WrongIdentity => ErrorClass::Usage,
            CodecError::Corrupt(_) | CodecError::Encrypt(_) => ErrorClass::Permanent,
            // The bytes came from a store or a spool that failed under them.
            CodecError::Io(_) => ErrorClass::Transient,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(plain: &[u8], recipients: &[age::x25519::Recipient]) -> (Vec<u8>, SealedSummary) {
        let mut sealer = Sealer::new(recipients, 3).unwrap();
        let mut out = Vec::new();
        for chunk in plain.chunks(10_000) {
            sealer.write(chunk).unwrap();
            if let Some(b) = sealer.take_output() {
                out.extend_from_slice(&b);
            }
        }
        let (rest, summary) = sealer.finish().unwrap();
        out.extend_from_slice(&rest);
        (out, summary)
    }

    fn read_all(stored: &[u8], ids: &Identities) -> Result<Vec<u8>, CodecError> {
        let mut reader = open(stored, ids)?;
        let mut out = Vec::new();
        reader.read_to_end(&mut out).map_err(classify_read_error)?;
        Ok(out)
    }

    fn plaintext() -> Vec<u8> {
        // Compressible but not trivially so, and several age chunks long after compression.
        (0..2_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 & 0x3f)
            .collect()
    }

    #[test]
    fn round_trip_and_digest() {
        let identity = age::x25519::Identity::generate();
        let ids = Identities::from(vec![identity.clone()]);
        let plain = plaintext();
        let (stored, summary) = seal(&plain, &[identity.to_public()]);
        assert_eq!(summary.stored_bytes, stored.len() as u64);
        assert_eq!(summary.plain_bytes, plain.len() as u64);
        assert_eq!(summary.sha256, hex::encode(Sha256::digest(&stored)));
        assert_eq!(read_all(&stored, &ids).unwrap(), plain);
    }

    #[test]
    fn wrong_identity_is_named() {
        let identity = age::x25519::Identity::generate();
        let (stored, _) = seal(b"tenant rows", &[identity.to_public()]);
        let other = Identities::from(vec![age::x25519::Identity::generate()]);
        assert!(matches!(
            read_all(&stored, &other),
            Err(CodecError::WrongIdentity)
        ));
    }

    #[test]
    fn flipped_byte_and_cut_tail_are_detected() {
        let identity = age::x25519::Identity::generate();
        let ids = Identities::from(vec![identity.clone()]);
        let (stored, _) = seal(&plaintext(), &[identity.to_public()]);
        for position in [10, stored.len() / 2, stored.len() - 1] {
            let mut damaged = stored.clone();
            damaged[position] ^= 0x01;
            assert!(
                read_all(&damaged, &ids).is_err(),
                "flip at {position} undetected"
            );
        }
        for cut in [1, 17, stored.len() / 2] {
            let damaged = &stored[..stored.len() - cut];
            assert!(read_all(damaged, &ids).is_err(), "cut of {cut} undetected");
        }
        let mut extended = stored.clone();
        extended.extend_from_slice(b"appended");
        assert!(
            read_all(&extended, &ids).is_err(),
            "appended bytes undetected"
        );
    }
}
