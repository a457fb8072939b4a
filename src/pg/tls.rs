//! TLS to PostgreSQL, as libpq's `sslmode` and `sslrootcert` say.
//!
//! Owns the TLS policy of every connection the crate opens: which `sslmode` applies (the URL,
//! else `PGSSLMODE`, else `prefer`), which root certificates are trusted (`sslrootcert`, else
//! `PGSSLROOTCERT`, else `~/.postgresql/root.crt` like libpq, else the system's roots for
//! `verify-full`), the rustls client configuration whose certificate verifier (`verifier`) does
//! exactly what the mode promises, and the environment that hands the same policy to pg_dump
//! ([`TlsSettings::libpq_env`]). Reading `sslmode`/`sslrootcert` out of a URL is
//! [`super::conninfo`]'s; the connections that apply the policy are [`super::connect`]'s
//! (tokio-postgres) and [`super::replication`]'s (the SSLRequest and handshake of the walsender).
//!
//! | sslmode | TLS | certificate chain | host name |
//! |---|---|---|---|
//! | `disable` | never | – | – |
//! | `prefer` (default) | if the server offers it, else plain | not checked | not checked |
//! | `require` | always | checked only if a root certificate is given | not checked |
//! | `verify-ca` | always | checked against the root certificate | not checked |
//! | `verify-full` | always | checked (root certificate, else the system's roots) | checked |
//!
//! It must never silently downgrade `require`, `verify-ca` or `verify-full` to a plain or less
//! verified connection: a server without TLS, an unreadable root certificate or a certificate that
//! does not verify is an error that says what to change. It never handles private keys (there are
//! no client certificates) and never logs certificate contents.
//!
//! Unix-domain sockets never use TLS, whatever the mode, as in libpq: the socket's file
//! permissions are its protection and the server would refuse the SSLRequest anyway.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};
use tokio_postgres::config::{Host, SslNegotiation};

mod verifier;

use verifier::PolicyVerifier;
pub use verifier::{describe_rustls, rustls_cause};

/// `sslmode` when the URL has none.
pub const SSLMODE_ENV: &str = "PGSSLMODE";
/// `sslrootcert` when the URL has none.
pub const SSLROOTCERT_ENV: &str = "PGSSLROOTCERT";
/// The `sslrootcert` value that names the system's trusted roots (libpq 16 and later).
pub const SYSTEM_ROOTS: &str = "system";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error(
        "{origin}={value:?} is not valid: use disable, prefer, require, verify-ca or verify-full"
    )]
    InvalidMode { origin: &'static str, value: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("the {name} parameter is not valid percent-encoding")]
    Encoding { name: String },
    #[error(
        "sslmode={mode} with sslrootcert={SYSTEM_ROOTS} would accept any certificate a public CA \
         issued for any name: use sslmode=verify-full, or set sslrootcert to your own CA's \
         certificate"
    )]
    WeakModeWithSystemRoots { mode: SslMode },
    #[error(
        "sslmode=verify-ca needs the CA that signed the server certificate: set sslrootcert (or \
         {SSLROOTCERT_ENV}) to its PEM file; the system's roots are only trusted with verify-full"
    )]
    VerifyCaWithoutRootCert,
    #[error(
        "cannot read sslrootcert {}: {source}; set sslrootcert (or {SSLROOTCERT_ENV}) to a readable PEM file of the CA that signed the server certificate",
        path.display()
    )]
    RootCertRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "sslrootcert {} holds no usable PEM certificate{}: it must contain \"-----BEGIN CERTIFICATE-----\" blocks",
        path.display(),
        detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default()
    )]
    RootCertInvalid {
        path: PathBuf,
        detail: Option<String>,
    },
    #[error(
        "sslmode=verify-full without sslrootcert trusts the system's root certificates, but none \
         could be loaded ({detail}): install ca-certificates or set sslrootcert"
    )]
    NoSystemRoots { detail: String },
    #[error("{host:?} is not a valid TLS server name")]
    ServerName { host: String },
    #[error("cannot set up TLS: {0}")]
    Setup(#[source] rustls::Error),
    #[error(
        "the server does not support TLS but sslmode={mode}: turn ssl on in the server, or use \
         sslmode=prefer (encrypts when the server can) or disable if a plain connection is \
         acceptable"
    )]
    NotSupportedByServer { mode: SslMode },
    /// The handshake failed on TLS's side: a certificate that does not verify, no common
    /// protocol version or cipher. Kept as text: [`describe_rustls`] already made it readable,
    /// and rustls's own rendering of the same error would only repeat it less clearly.
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
    #[error(
        "the server refused the unencrypted connection ({message}): its pg_hba.conf wants TLS for \
         this role; use sslmode=require or stronger instead of disable"
    )]
    PlainRefused { message: String },
}

/// libpq's `sslmode`, minus `allow` (plain first, TLS as a fallback), which protects nothing that
/// `prefer` does not and is refused with that suggestion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a server without TLS must be refused.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = TlsError;

    fn from_str(value: &str) -> Result<Self, TlsError> {
        match value {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            "allow" => Err(TlsError::Unsupported(
                "sslmode=allow is not supported: use prefer (TLS when the server offers it) or \
                 disable"
                    .into(),
            )),
            _ => Err(TlsError::InvalidMode {
                origin: "sslmode",
                value: value.into(),
            }),
        }
    }
}

/// The SSL parameters of a connection string, as written (before the environment applies).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SslParams {
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
}

/// The TLS policy of one connection target.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    /// PEM file of the trusted CA(s). `None`: the system's roots with `verify-full`, no chain
    /// check with `prefer` and `require` (`verify-ca` without one is refused when resolving).
    pub root_cert: Option<PathBuf>,
}

impl TlsSettings {
    /// Applies libpq's precedence: the connection string, then `PGSSLMODE`/`PGSSLROOTCERT`, then
    /// the defaults (`prefer`; `$HOME/.postgresql/root.crt` if it exists). `env` looks variables
    /// up (a parameter so tests need no global state).
    pub fn resolve(
        params: SslParams,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<TlsSettings, TlsError> {
        let nonempty = |v: Option<String>| v.filter(|v| !v.is_empty());
        let root_cert = nonempty(params.sslrootcert).or_else(|| nonempty(env(SSLROOTCERT_ENV)));
        let mode = match (nonempty(params.sslmode), nonempty(env(SSLMODE_ENV))) {
            (Some(value), _) => value.parse()?,
            (None, Some(value)) => value.parse().map_err(|e| match e {
                TlsError::InvalidMode { value, .. } => TlsError::InvalidMode {
                    origin: SSLMODE_ENV,
                    value,
                },
                other => other,
            })?,
            // libpq 16: naming the system's roots makes verify-full the default.
            (None, None) if root_cert.as_deref() == Some(SYSTEM_ROOTS) => SslMode::VerifyFull,
            (None, None) => SslMode::default(),
        };
        let root_cert = match root_cert.as_deref() {
            Some(SYSTEM_ROOTS) => {
                // libpq 16 refuses weaker modes with the system's roots, and so must we: pg_dump
                // gets the same settings, and both should fail or succeed together.
                if mode != SslMode::VerifyFull && mode != SslMode::Disable {
                    return Err(TlsError::WeakModeWithSystemRoots { mode });
                }
                None
            }
            Some(path) => Some(PathBuf::from(path)),
            // libpq's default file; using it too keeps psql, pg_dump and this tool in agreement.
            None => env("HOME")
                .map(|home| Path::new(&home).join(".postgresql/root.crt"))
                .filter(|path| path.is_file()),
        };
        if mode == SslMode::VerifyCa && root_cert.is_none() {
            return Err(TlsError::VerifyCaWithoutRootCert);
        }
        Ok(TlsSettings { mode, root_cert })
    }

    /// The settings equivalent to a tokio-postgres `sslmode` (which knows no verify modes).
    pub fn from_tokio_postgres(mode: tokio_postgres::config::SslMode) -> Result<Self, TlsError> {
        use tokio_postgres::config::SslMode as Tp;
        let mode = match mode {
            Tp::Disable => SslMode::Disable,
            Tp::Prefer => SslMode::Prefer,
            Tp::Require => SslMode::Require,
            // A mode added upstream later may promise more than require: refuse, never weaken.
            other => {
                return Err(TlsError::Unsupported(format!(
                    "sslmode {other:?} is not supported here"
                )));
            }
        };
        Ok(TlsSettings {
            mode,
            root_cert: None,
        })
    }

    /// Whether the certificate chain is checked: the verify modes, and `require` once a root
    /// certificate is given (libpq: "the same as verify-ca").
    pub fn verifies_chain(&self) -> bool {
        match self.mode {
            SslMode::VerifyCa | SslMode::VerifyFull => true,
            SslMode::Require => self.root_cert.is_some(),
            SslMode::Disable | SslMode::Prefer => false,
        }
    }

    /// Sets tokio-postgres's own `sslmode` to match: it decides whether to send the SSLRequest
    /// and whether a refusal is fatal; the verifier of [`TlsSettings::client_config`] does the
    /// rest. Refuses what neither connection path can honour.
    pub fn configure(&self, config: &mut tokio_postgres::Config) -> Result<(), TlsError> {
        use tokio_postgres::config::SslMode as Tp;
        if config.get_ssl_negotiation() == SslNegotiation::Direct {
            return Err(TlsError::Unsupported(
                "sslnegotiation=direct is not supported: remove it (TLS is negotiated with the \
                 standard SSLRequest)"
                    .into(),
            ));
        }
        let unix_only = !config.get_hosts().is_empty()
            && config.get_hostaddrs().is_empty()
            && config
                .get_hosts()
                .iter()
                .all(|h| !matches!(h, Host::Tcp(_)));
        let mode = match self.mode {
            _ if unix_only => Tp::Disable,
            SslMode::Disable => Tp::Disable,
            SslMode::Prefer => Tp::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Tp::Require,
        };
        config.ssl_mode(mode);
        Ok(())
    }

    /// A rustls client configuration whose certificate verifier implements this mode. Reads the
    /// root certificate file (or the system's store) now, so a missing file is reported before
    /// any connection is attempted.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        // Explicitly ring: the dependency graph also enables aws-lc-rs (through the AWS SDK), and
        // with two providers compiled in rustls cannot pick a process default on its own.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = if self.verifies_chain() {
            Some(Arc::new(match &self.root_cert {
                Some(path) => load_root_cert(path)?,
                None => load_system_roots()?,
            }))
        } else {
            None
        };
        let verifier = PolicyVerifier {
            roots,
            check_host: self.mode == SslMode::VerifyFull,
            trusted: match &self.root_cert {
                Some(path) => format!("sslrootcert {}", path.display()),
                None => "the system's root certificates".into(),
            },
            provider: provider.clone(),
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Setup)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    /// The environment that gives a libpq program (pg_dump) this policy. Variables not listed
    /// must be removed from the child's environment by the caller (see `pg_tools::command`).
    pub fn libpq_env(&self) -> Vec<(&'static str, OsString)> {
        let mut env = vec![(SSLMODE_ENV, OsString::from(self.mode.as_str()))];
        match &self.root_cert {
            Some(path) => env.push((SSLROOTCERT_ENV, path.clone().into_os_string())),
            // Without a file, verify-full trusts the system's roots here; tell libpq the same
            // (older libpq reads "system" as a file name and fails, which is loud, not weak).
            None if self.mode == SslMode::VerifyFull => {
                env.push((SSLROOTCERT_ENV, OsString::from(SYSTEM_ROOTS)));
            }
            None => {}
        }
        env
    }
}

fn load_root_cert(path: &Path) -> Result<RootCertStore, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::RootCertRead {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |detail: Option<String>| TlsError::RootCertInvalid {
        path: path.to_path_buf(),
        detail,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| invalid(Some(e.to_string())))?;
        roots.add(cert).map_err(|e| invalid(Some(e.to_string())))?;
    }
    if roots.is_empty() {
        return Err(invalid(None));
    }
    Ok(roots)
}

fn load_system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (_, unparsable) = roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let mut problems: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        if unparsable > 0 {
            problems.push(format!("{unparsable} certificates could not be parsed"));
        }
        if problems.is_empty() {
            problems.push("the store is empty".into());
        }
        return Err(TlsError::NoSystemRoots {
            detail: problems.join("; "),
        });
    }
    Ok(roots)
}

/// The server refused a plain connection because pg_hba.conf only admits this role over TLS
/// (`hostssl`, or `hostnossl … reject`): SQLSTATE 28000 and a message ending in "no encryption"
/// (PostgreSQL 12 and later; "SSL off" before).
pub fn plain_refused(mode: SslMode, code: &str, message: &str) -> Option<TlsError> {
    (mode == SslMode::Disable
        && code == "28000"
        && (message.ends_with("no encryption") || message.ends_with("SSL off")))
    .then(|| TlsError::PlainRefused {
        message: message.to_string(),
    })
}

impl crate::retry::Classify for TlsError {
    /// The message says what to change; the same settings meet the same refusal.
    fn class(&self) -> crate::retry::ErrorClass {
        crate::retry::ErrorClass::Usage
    }
}

#[cfg(test)]
// `params` also serves the tests of the parser that produces `SslParams` (`super::conninfo`).
pub(super) mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    pub(in crate::pg) fn params(mode: Option<&str>, root: Option<&str>) -> SslParams {
        SslParams {
            sslmode: mode.map(Into::into),
            sslrootcert: root.map(Into::into),
        }
    }

    #[test]
    fn url_beats_environment_beats_default() {
        let t = TlsSettings::resolve(params(None, None), env(&[])).unwrap();
        assert_eq!(t, TlsSettings::default());
        assert_eq!(t.mode, SslMode::Prefer);

        let e = [("PGSSLMODE", "require"), ("PGSSLROOTCERT", "/env/ca.pem")];
        let t = TlsSettings::resolve(params(None, None), env(&e)).unwrap();
        assert_eq!(t.mode, SslMode::Require);
        assert_eq!(t.root_cert.as_deref(), Some(Path::new("/env/ca.pem")));
        assert!(
            t.verifies_chain(),
            "require with a root certificate is verify-ca"
        );

        let t =
            TlsSettings::resolve(params(Some("verify-full"), Some("/url.pem")), env(&e)).unwrap();
        assert_eq!(t.mode, SslMode::VerifyFull);
        assert_eq!(t.root_cert.as_deref(), Some(Path::new("/url.pem")));

        // Empty values count as unset, as in libpq.
        let t =
            TlsSettings::resolve(params(Some(""), None), env(&[("PGSSLMODE", "disable")])).unwrap();
        assert_eq!(t.mode, SslMode::Disable);
    }

    #[test]
    fn default_root_cert_is_libpqs() {
        let home = tempfile::tempdir().unwrap();
        let home_str = home.path().to_str().unwrap().to_string();
        let e = [("HOME", home_str.as_str())];
        let t = TlsSettings::resolve(params(Some("require"), None), env(&e)).unwrap();
        assert_eq!(t.root_cert, None);
        assert!(!t.verifies_chain());
        std::fs::create_dir(home.path().join(".postgresql")).unwrap();
        std::fs::write(home.path().join(".postgresql/root.crt"), "x").unwrap();
        let t = TlsSettings::resolve(params(Some("require"), None), env(&e)).unwrap();
        assert_eq!(t.root_cert, Some(home.path().join(".postgresql/root.crt")));
        assert!(t.verifies_chain());
    }

    #[test]
    fn bad_and_weak_modes_say_what_to_do() {
        let err = TlsSettings::resolve(params(Some("verify_full"), None), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("verify-full"), "{err}");
        let err = TlsSettings::resolve(params(Some("allow"), None), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("prefer"), "{err}");
        let err = TlsSettings::resolve(params(Some("verify-ca"), None), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sslrootcert"), "{err}");
        for mode in ["require", "verify-ca", "prefer"] {
            let err = TlsSettings::resolve(params(Some(mode), Some("system")), env(&[]))
                .unwrap_err()
                .to_string();
            assert!(err.contains("verify-full"), "{mode}: {err}");
        }
        let t =
            TlsSettings::resolve(params(Some("verify-full"), Some("system")), env(&[])).unwrap();
        assert_eq!(t.root_cert, None);
        assert!(t.verifies_chain());
        // As in libpq 16, naming the system's roots alone means verify-full.
        let t = TlsSettings::resolve(params(None, Some("system")), env(&[])).unwrap();
        assert_eq!(t.mode, SslMode::VerifyFull);
        // A bad PGSSLMODE is reported under its own name.
        let err = TlsSettings::resolve(params(None, None), env(&[("PGSSLMODE", "on")]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("PGSSLMODE=\"on\""), "{err}");
    }

    #[test]
    fn libpq_gets_the_same_policy() {
        let t = TlsSettings {
            mode: SslMode::VerifyCa,
            root_cert: Some("/ca.pem".into()),
        };
        assert_eq!(
            t.libpq_env(),
            [
                ("PGSSLMODE", OsString::from("verify-ca")),
                ("PGSSLROOTCERT", OsString::from("/ca.pem"))
            ]
        );
        let t = TlsSettings {
            mode: SslMode::VerifyFull,
            root_cert: None,
        };
        assert_eq!(
            t.libpq_env(),
            [
                ("PGSSLMODE", OsString::from("verify-full")),
                ("PGSSLROOTCERT", OsString::from("system"))
            ]
        );
        assert_eq!(
            TlsSettings::default().libpq_env(),
            [("PGSSLMODE", OsString::from("prefer"))]
        );
    }

    #[test]
    fn tokio_postgres_mode_follows_and_unix_sockets_never_use_tls() {
        use tokio_postgres::config::SslMode as Tp;
        let verify = TlsSettings {
            mode: SslMode::VerifyFull,
            root_cert: None,
        };
        let mut config: tokio_postgres::Config = "host=db user=u".parse().unwrap();
        verify.configure(&mut config).unwrap();
        assert_eq!(config.get_ssl_mode(), Tp::Require);
        let mut config: tokio_postgres::Config = "host=/run/postgresql user=u".parse().unwrap();
        verify.configure(&mut config).unwrap();
        assert_eq!(config.get_ssl_mode(), Tp::Disable);
        let mut config: tokio_postgres::Config =
            "host=db user=u sslnegotiation=direct sslmode=require"
                .parse()
                .unwrap();
        let err = verify.configure(&mut config).unwrap_err().to_string();
        assert!(err.contains("sslnegotiation"), "{err}");
    }

    #[test]
    fn root_cert_files_are_checked_before_connecting() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let settings = |path: &Path| TlsSettings {
            mode: SslMode::VerifyCa,
            root_cert: Some(path.to_path_buf()),
        };
        let err = settings(&missing).client_config().unwrap_err().to_string();
        assert!(
            err.contains("missing.pem") && err.contains("cannot read"),
            "{err}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = settings(&empty).client_config().unwrap_err().to_string();
        assert!(err.contains("no usable PEM certificate"), "{err}");
        // Modes that do not verify never read it.
        let prefer = TlsSettings {
            mode: SslMode::Prefer,
            root_cert: Some(missing),
        };
        prefer.client_config().unwrap();
    }
}
