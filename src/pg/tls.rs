//! TLS to PostgreSQL, as libpq's `sslmode` and `sslrootcert` say.
//!
//! Owns the TLS policy of every connection the crate opens: which `sslmode` applies (the URL,
//! else `PGSSLMODE`, else `prefer`), which root certificates are trusted (`sslrootcert`, else
//! `PGSSLROOTCERT`, else `~/.postgresql/root.crt` like libpq, else the system's roots for
//! `verify-full`), the rustls client configuration with a certificate verifier that does exactly
//! what the mode promises, the tokio-postgres connection ([`connect_client`]), the TLS handshake of
//! the replication connection ([`handshake`]; the SSLRequest itself is protocol, so
//! `replication::connection` sends it), and the environment that hands the same policy to
//! pg_dump ([`TlsSettings::libpq_env`]).
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

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::config::{Host, SslNegotiation};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

/// `sslmode` when the URL has none.
pub const SSLMODE_ENV: &str = "PGSSLMODE";
/// `sslrootcert` when the URL has none.
pub const SSLROOTCERT_ENV: &str = "PGSSLROOTCERT";
/// The `sslrootcert` value that names the system's trusted roots (libpq 16 and later).
pub const SYSTEM_ROOTS: &str = "system";

/// The TLS stream of a tokio-postgres connection made by [`connect_client`].
pub type ClientTlsStream = <MakeRustlsConnect as MakeTlsConnect<tokio_postgres::Socket>>::Stream;
/// The connection half of [`connect_client`]: spawn it, it runs until the client is dropped.
pub type ClientConnection = tokio_postgres::Connection<tokio_postgres::Socket, ClientTlsStream>;

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

/// Splits the SSL parameters this module handles (`sslmode`, `sslrootcert`) off a connection
/// string — URL (`postgres://…?sslmode=…`) or key/value (`host=… sslmode=…`) — and returns the
/// rest, which tokio-postgres can parse (it rejects `verify-ca`, `verify-full` and
/// `sslrootcert`). Other `ssl*` parameters are refused by name rather than ignored. A string that
/// does not parse here is returned as it is, for tokio-postgres to report.
pub fn split_ssl_params(url: &str) -> Result<(String, SslParams), TlsError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        split_url(url)
    } else {
        split_key_values(url)
    }
}

/// What to do with a connection-string parameter.
fn take_param(params: &mut SslParams, key: &str, value: String) -> Result<bool, TlsError> {
    match key {
        "sslmode" => params.sslmode = Some(value),
        "sslrootcert" => params.sslrootcert = Some(value),
        // tokio-postgres understands sslnegotiation; `configure` checks its value.
        "sslnegotiation" => return Ok(false),
        other if other.starts_with("ssl") || other == "requiressl" => {
            return Err(TlsError::Unsupported(format!(
                "the {other} parameter is not supported (client certificates, CRLs and \
                 protocol limits are not implemented; sslmode and sslrootcert are): remove it"
            )));
        }
        _ => return Ok(false),
    }
    Ok(true)
}

fn split_url(url: &str) -> Result<(String, SslParams), TlsError> {
    let mut params = SslParams::default();
    let Some((head, query)) = url.split_once('?') else {
        return Ok((url.to_string(), params));
    };
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded_key = percent_decode(key).ok_or_else(|| TlsError::Encoding {
            name: key.to_string(),
        })?;
        let decoded_value = || {
            percent_decode(value).ok_or_else(|| TlsError::Encoding {
                name: decoded_key.clone(),
            })
        };
        // Only SSL values are decoded: the rest is tokio-postgres's to read (and report).
        let is_ssl = decoded_key.starts_with("ssl") || decoded_key == "requiressl";
        if !is_ssl || !take_param(&mut params, &decoded_key, decoded_value()?)? {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        head.to_string()
    } else {
        format!("{head}?{}", kept.join("&"))
    };
    Ok((rest, params))
}

/// `%XX` escapes only, as libpq (a `+` stays a `+`). `None` if malformed or not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Key/value form as libpq's `conninfo_parse`: `key = value`, values bare or single-quoted,
/// backslash escaping the next character in both. The kept pairs are copied verbatim.
fn split_key_values(text: &str) -> Result<(String, SslParams), TlsError> {
    let mut params = SslParams::default();
    let Some(pairs) = key_value_pairs(text) else {
        return Ok((text.to_string(), params));
    };
    let mut kept = Vec::new();
    for (key, value, span) in pairs {
        if !take_param(&mut params, &key, value)? {
            kept.push(&text[span]);
        }
    }
    Ok((kept.join(" "), params))
}

/// `(key, unescaped value, byte range of the whole pair)`; `None` if malformed.
fn key_value_pairs(text: &str) -> Option<Vec<(String, String, std::ops::Range<usize>)>> {
    let bytes = text.as_bytes();
    let mut pairs = Vec::new();
    let mut i = 0;
    let skip_space = |i: &mut usize| {
        while *i < bytes.len() && bytes[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_space(&mut i);
        if i >= bytes.len() {
            return Some(pairs);
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = text[start..i].to_string();
        skip_space(&mut i);
        if bytes.get(i) != Some(&b'=') || key.is_empty() {
            return None;
        }
        i += 1;
        skip_space(&mut i);
        let mut value = Vec::new();
        let quoted = bytes.get(i) == Some(&b'\'');
        if quoted {
            i += 1;
        }
        loop {
            match bytes.get(i) {
                None if quoted => return None,
                None => break,
                Some(b'\\') => {
                    value.push(*bytes.get(i + 1)?);
                    i += 2;
                }
                Some(b'\'') if quoted => {
                    i += 1;
                    break;
                }
                Some(b) if !quoted && b.is_ascii_whitespace() => break,
                Some(b) => {
                    value.push(*b);
                    i += 1;
                }
            }
        }
        pairs.push((key, String::from_utf8(value).ok()?, start..i));
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

/// A certificate problem, worded for the operator; travels inside rustls's error.
#[derive(Debug)]
struct CertificateProblem(String);

impl fmt::Display for CertificateProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CertificateProblem {}

/// A rustls error as an operator should read it: the verifier's own wording for certificate
/// problems (rustls would print it through `Debug`), rustls's message otherwise.
pub fn describe_rustls(error: &rustls::Error) -> String {
    if let rustls::Error::InvalidCertificate(CertificateError::Other(other)) = error {
        return other.0.to_string();
    }
    error.to_string()
}

/// A name from rustls's `NotValidForNameContext::presented`, which renders them through `Debug`
/// (`DnsName("localhost")`, `IpAddress(127.0.0.1)`): just the name.
fn presented_name(name: &str) -> &str {
    name.split_once('(')
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .map_or(name, |inner| inner.trim_matches('"'))
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

fn problem(message: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        CertificateProblem(message),
    ))))
}

/// Checks the server certificate exactly as far as the mode promises.
///
/// Chain and host name are checked by separate calls (not by `WebPkiServerVerifier`, which always
/// checks both) so that verify-ca's "chain but no name" is explicit rather than a matter of
/// swallowing a name error. Handshake signatures are always verified: even without a chain
/// check, the server must prove it holds the key of the certificate it sent.
#[derive(Debug)]
struct PolicyVerifier {
    /// `None`: the chain is not checked (prefer, require without a root certificate).
    roots: Option<Arc<RootCertStore>>,
    check_host: bool,
    /// Where the roots come from, for messages.
    trusted: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PolicyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )
        .map_err(|e| match e {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => problem(format!(
                "the server certificate is not signed by a CA in {}: set sslrootcert to the \
                 certificate of the CA that issued it",
                self.trusted
            )),
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ) => problem(format!(
                "the server certificate has expired ({e}): renew it"
            )),
            other => problem(format!(
                "the server certificate does not verify against {}: {other}",
                self.trusted
            )),
        })?;
        if self.check_host {
            rustls::client::verify_server_name(&cert, server_name).map_err(|e| {
                let names = match &e {
                    rustls::Error::InvalidCertificate(
                        CertificateError::NotValidForNameContext { presented, .. },
                    ) if !presented.is_empty() => presented
                        .iter()
                        .map(|name| presented_name(name))
                        .collect::<Vec<_>>()
                        .join(", "),
                    _ => "other names".into(),
                };
                problem(format!(
                    "the server certificate (for {names}) is not valid for host {}: connect \
                     with a name it lists, use sslmode=verify-ca (no host name check), or fix \
                     the certificate",
                    server_name.to_str()
                ))
            })?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The rustls error inside an I/O error from a TLS stream, if the failure was TLS's (a refused
/// certificate, a protocol violation) rather than the network's.
pub fn rustls_cause(error: &io::Error) -> Option<&rustls::Error> {
    error.get_ref()?.downcast_ref::<rustls::Error>()
}

/// The TLS handshake over an open stream whose server agreed to TLS (it answered `S` to the
/// SSLRequest). `host` is the name the certificate is checked against (verify-full) and sent as
/// SNI when it is a DNS name.
///
/// # Errors
/// [`TlsError::Handshake`] if TLS refused (as `Ok(Err)`), an I/O error if the network failed.
pub async fn handshake<S>(
    config: Arc<ClientConfig>,
    host: &str,
    stream: S,
) -> Result<io::Result<tokio_rustls::client::TlsStream<S>>, TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(host.to_owned()).map_err(|_| TlsError::ServerName {
        host: host.to_owned(),
    })?;
    match tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
    {
        Ok(stream) => Ok(Ok(stream)),
        Err(e) => match rustls_cause(&e) {
            Some(cause) => Err(TlsError::Handshake(describe_rustls(cause))),
            None => Ok(Err(e)),
        },
    }
}

/// Why [`connect_client`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientConnectError {
    /// The TLS policy could not be met; the message says what to change.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Anything else: unreachable server, authentication, the server's own refusal.
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

/// Connects a tokio-postgres client as `config` and `tls` say. `config` must have gone through
/// [`TlsSettings::configure`] (`config::pg_config` does it).
pub async fn connect_client(
    config: &tokio_postgres::Config,
    tls: &TlsSettings,
) -> Result<(tokio_postgres::Client, ClientConnection), ClientConnectError> {
    let connector = MakeRustlsConnect::new(Arc::unwrap_or_clone(tls.client_config()?));
    config
        .connect(connector)
        .await
        .map_err(|e| explain_client_error(e, tls))
}

/// Turns the TLS failures tokio-postgres reports into [`TlsError`]s that say what to do.
fn explain_client_error(error: tokio_postgres::Error, tls: &TlsSettings) -> ClientConnectError {
    use std::error::Error as _;
    if let Some(db) = error.as_db_error() {
        return match plain_refused(tls.mode, db.code().code(), db.message()) {
            Some(refused) => refused.into(),
            None => error.into(),
        };
    }
    let Some(cause) = error.source() else {
        return error.into();
    };
    // tokio-postgres reports a refused SSLRequest only as this text (connect_tls.rs); the e2e
    // test against a server without TLS notices if that ever changes.
    if tls.mode.requires_tls() && cause.to_string() == "server does not support TLS" {
        return TlsError::NotSupportedByServer { mode: tls.mode }.into();
    }
    let rustls = cause
        .downcast_ref::<io::Error>()
        .and_then(rustls_cause)
        .or_else(|| cause.downcast_ref::<rustls::Error>());
    match rustls {
        Some(cause) => TlsError::Handshake(describe_rustls(cause)).into(),
        None => error.into(),
    }
}

impl crate::retry::Classify for TlsError {
    /// The message says what to change; the same settings meet the same refusal.
    fn class(&self) -> crate::retry::ErrorClass {
        crate::retry::ErrorClass::Usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    fn params(mode: Option<&str>, root: Option<&str>) -> SslParams {
        SslParams {
            sslmode: mode.map(Into::into),
            sslrootcert: root.map(Into::into),
        }
    }

    #[test]
    fn url_parameters_are_split_off_and_decoded() {
        let (rest, p) = split_ssl_params(
            "postgres://u:pw@h:5432/db?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20dir%2Fca.pem&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u:pw@h:5432/db?application_name=x&connect_timeout=3"
        );
        assert_eq!(p, params(Some("verify-full"), Some("/etc/ca dir/ca.pem")));

        let (rest, p) = split_ssl_params("postgresql://h/db?sslmode=require").unwrap();
        assert_eq!(rest, "postgresql://h/db");
        assert_eq!(p, params(Some("require"), None));

        let (rest, p) = split_ssl_params("postgres://h/db").unwrap();
        assert_eq!(rest, "postgres://h/db");
        assert_eq!(p, SslParams::default());

        // tokio-postgres handles sslnegotiation itself.
        let (rest, _) = split_ssl_params("postgres://h/db?sslnegotiation=postgres").unwrap();
        assert_eq!(rest, "postgres://h/db?sslnegotiation=postgres");
    }

    #[test]
    fn key_value_parameters_are_split_off_with_quoting() {
        let (rest, p) = split_ssl_params(
            r"host=h  port = 5 sslmode = verify-ca sslrootcert='/a b/it\'s.pem' user=u",
        )
        .unwrap();
        assert_eq!(rest, "host=h port = 5 user=u");
        assert_eq!(p, params(Some("verify-ca"), Some("/a b/it's.pem")));

        // Malformed: left for tokio-postgres to report.
        let (rest, p) = split_ssl_params("host=h sslmode").unwrap();
        assert_eq!(rest, "host=h sslmode");
        assert_eq!(p, SslParams::default());
    }

    #[test]
    fn other_ssl_parameters_are_refused_by_name() {
        for url in [
            "postgres://h/db?sslcert=/c.pem",
            "host=h sslkey=/k.pem",
            "postgres://h/db?ssl%63rl=x",
        ] {
            let err = split_ssl_params(url).unwrap_err().to_string();
            assert!(err.contains("not supported"), "{url}: {err}");
            assert!(err.contains("ssl"), "{url}: {err}");
        }
        let err = split_ssl_params("postgres://h/db?sslrootcert=%zz")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sslrootcert"), "{err}");
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
    fn certificate_names_and_refusals_read_plainly() {
        assert_eq!(presented_name("DnsName(\"localhost\")"), "localhost");
        assert_eq!(presented_name("IpAddress(127.0.0.1)"), "127.0.0.1");
        assert_eq!(presented_name("odd"), "odd");
        let message = "pg_hba.conf rejects connection for host \"h\", user \"u\", database \"d\", no encryption";
        assert!(plain_refused(SslMode::Disable, "28000", message).is_some());
        assert!(plain_refused(SslMode::Prefer, "28000", message).is_none());
        assert!(plain_refused(SslMode::Disable, "28P01", message).is_none());
        let wrapped = rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(CertificateProblem("plain words".into()))),
        ));
        assert_eq!(describe_rustls(&wrapped), "plain words");
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
