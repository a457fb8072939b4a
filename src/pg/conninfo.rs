//! Connection targets: a PostgreSQL URL (or key/value string) becomes tokio-postgres's config
//! plus the TLS policy libpq would apply, with the password from `PGPASSWORD` or the passfile.
//! Nothing here connects.

use std::time::Duration;

use super::tls::TlsSettings;

/// A URL that cannot be used as a connection target. Worded like a configuration error, since
/// URLs come from the configuration.
#[derive(Debug, thiserror::Error)]
#[error("config {origin}: {message}")]
pub struct InvalidUrl {
    /// The URL, password masked.
    pub origin: String,
    pub message: String,
}

/// A PostgreSQL URL with its password (if any) masked, for messages and logs.
pub fn redact_url(url: &str) -> String {
    // postgres://user:secret@host → postgres://user:***@host. Key/value strings (`password=`) too.
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..]
            .find(['/', '?'])
            .map_or(out.len(), |i| rest_start + i);
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let userinfo = &out[rest_start..rest_start + at];
            if let Some(colon) = userinfo.find(':') {
                out.replace_range(rest_start + colon + 1..rest_start + at, "***");
            }
        }
    }
    if let Some(i) = out.find("password=") {
        let end = out[i..].find(['&', ' ']).map_or(out.len(), |j| i + j);
        out.replace_range(i + "password=".len()..end, "***");
    }
    out
}

/// A connection target: tokio-postgres's config and the TLS policy it cannot hold (it knows
/// neither `verify-ca`/`verify-full` nor `sslrootcert`). Connect with both, never the config
/// alone: `super::tls::connect_client`, `ReplicationConnection::connect_tls`.
#[derive(Debug, Clone)]
pub struct PgTarget {
    pub config: tokio_postgres::Config,
    pub tls: TlsSettings,
}

/// The file's URL checks: a PostgreSQL URL whose SSL parameters make sense on their own (the
/// environment is only consulted when connecting).
pub fn check_url(url: &str) -> Result<(), String> {
    let (rest, ssl) = super::tls::split_ssl_params(url).map_err(|e| format!(": {e}"))?;
    rest.parse::<tokio_postgres::Config>()
        .map_err(|e| format!("is not a PostgreSQL URL: {e}"))?;
    TlsSettings::resolve(ssl, |_| None).map_err(|e| format!(": {e}"))?;
    Ok(())
}

/// Builds a connection target from a URL: its SSL parameters (else `PGSSLMODE`,
/// `PGSSLROOTCERT`) become the TLS policy, and the password comes from `PGPASSWORD` or the
/// passfile when the URL has none (tokio-postgres reads neither).
pub fn pg_config(url: &str) -> Result<PgTarget, InvalidUrl> {
    let invalid = |message: String| InvalidUrl {
        origin: redact_url(url),
        message,
    };
    let (rest, ssl) = super::tls::split_ssl_params(url).map_err(|e| invalid(e.to_string()))?;
    let mut config: tokio_postgres::Config = rest
        .parse()
        .map_err(|e| invalid(format!("not a PostgreSQL URL: {e}")))?;
    let tls = TlsSettings::resolve(ssl, |name| std::env::var(name).ok())
        .map_err(|e| invalid(e.to_string()))?;
    tls.configure(&mut config)
        .map_err(|e| invalid(e.to_string()))?;
    if config.get_application_name().is_none() {
        config.application_name("updog-backup");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    if config.get_password().is_none() {
        if let Some(password) = std::env::var_os("PGPASSWORD") {
            config.password(password.to_string_lossy().as_bytes());
        } else if let Some(password) = super::passfile::lookup(&config) {
            config.password(password);
        }
    }
    Ok(PgTarget { config, tls })
}

impl crate::retry::Classify for InvalidUrl {
    fn class(&self) -> crate::retry::ErrorClass {
        crate::retry::ErrorClass::Usage
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5/db"),
            "postgres://u:***@h:5/db"
        );
        assert_eq!(
            redact_url("postgres://u@h/db?password=secret&x=1"),
            "postgres://u@h/db?password=***&x=1"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn tls_parameters_are_ours_and_checked() {
        let target = pg_config(
            "postgres://u:secret@127.0.0.1:5/db?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(target.tls.mode, super::super::tls::SslMode::VerifyFull);
        assert_eq!(target.tls.root_cert.as_deref(), Some(Path::new("/ca.pem")));
        assert_eq!(
            target.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert_eq!(target.config.get_application_name(), Some("x"));
        assert_eq!(target.config.get_password(), Some(&b"secret"[..]));

        let err = pg_config("postgres://u:secret@h/db?sslmode=verify_full")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("verify-full") && !err.contains("secret"),
            "{err}"
        );
    }
}
