//! Connection targets: a PostgreSQL URL (or key/value string) becomes tokio-postgres's config
//! plus the TLS policy libpq would apply, with the password from `PGPASSWORD` or the passfile.
//!
//! Owns the reading of connection strings this crate does itself: the `sslmode`/`sslrootcert`
//! parameters tokio-postgres cannot parse ([`split_ssl_params`], URL and key/value forms, as
//! libpq reads them) and password masking ([`redact_url`]). What those parameters mean is
//! [`super::tls`]'s. Nothing here connects, and nothing reads the environment but [`pg_config`].

use std::time::Duration;

use super::tls::{SslParams, TlsError, TlsSettings};

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
/// alone: `super::connect::connect_client`, `ReplicationConnection::connect_tls`.
#[derive(Debug, Clone)]
pub struct PgTarget {
    pub config: tokio_postgres::Config,
    pub tls: TlsSettings,
}

/// The file's URL checks: a PostgreSQL URL whose SSL parameters make sense on their own (the
/// environment is only consulted when connecting).
pub fn check_url(url: &str) -> Result<(), String> {
    let (rest, ssl) = split_ssl_params(url).map_err(|e| format!(": {e}"))?;
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
    let (rest, ssl) = split_ssl_params(url).map_err(|e| invalid(e.to_string()))?;
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

/// Splits the SSL parameters the TLS policy handles (`sslmode`, `sslrootcert`) off a connection
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

impl crate::retry::Classify for InvalidUrl {
    fn class(&self) -> crate::retry::ErrorClass {
        crate::retry::ErrorClass::Usage
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::tls::tests::params;
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
}
