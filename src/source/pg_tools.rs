//! PostgreSQL's own client programs (pg_dump, pg_restore), found for the server's major
//! version. Passwords and the TLS policy reach them through the environment, never their
//! command line.

use std::path::PathBuf;
use std::process::Stdio;

use tokio::process::Command;

use crate::pg::PgTarget;

/// Directory holding pg_dump/pg_restore, overriding the search (e.g. a custom install).
pub const PG_BIN_ENV: &str = "UPDOG_BACKUP_PG_BIN";

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error(
        "{tool} for PostgreSQL {major} not found: install postgresql-client-{major} or set {PG_BIN_ENV} to its bin directory"
    )]
    NotFound { tool: &'static str, major: u32 },
    #[error("{tool}: {message}")]
    Failed { tool: &'static str, message: String },
}

/// The path of `tool` able to talk to a server of `major` version: `$UPDOG_BACKUP_PG_BIN`,
/// Debian's `/usr/lib/postgresql/<major>/bin`, then `PATH` if its version is new enough.
pub async fn find(tool: &'static str, major: u32) -> Result<PathBuf, ToolError> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os(PG_BIN_ENV) {
        candidates.push(PathBuf::from(dir).join(tool));
    }
    for m in (major..=major + 5).rev() {
        candidates.push(PathBuf::from(format!("/usr/lib/postgresql/{m}/bin/{tool}")));
    }
    candidates.push(PathBuf::from(tool));
    for path in candidates {
        let Ok(out) = Command::new(&path).arg("--version").output().await else {
            continue;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        // "pg_dump (PostgreSQL) 15.18 (Debian …)"
        let version = text
            .split_whitespace()
            .nth(2)
            .and_then(|v| v.split('.').next())
            .and_then(|v| v.parse::<u32>().ok());
        if version.is_some_and(|v| v >= major) {
            return Ok(path);
        }
    }
    Err(ToolError::NotFound { tool, major })
}

/// A command for a libpq program connecting as `target` says: connection parameters in a
/// conninfo string without the password, which goes in `PGPASSWORD`, and the same TLS policy as
/// this process's own connections in `PGSSLMODE`/`PGSSLROOTCERT` (whatever the parent
/// environment held: the URL may have overridden it).
pub fn command(path: &PathBuf, target: &PgTarget) -> Command {
    let config = &target.config;
    let mut cmd = Command::new(path);
    cmd.arg("--dbname").arg(conninfo(config));
    cmd.env_remove("PGPASSWORD");
    if let Some(password) = config.get_password() {
        cmd.env("PGPASSWORD", String::from_utf8_lossy(password).into_owned());
    }
    cmd.env_remove(crate::pg::tls::SSLMODE_ENV)
        .env_remove(crate::pg::tls::SSLROOTCERT_ENV);
    cmd.envs(target.tls.libpq_env());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

fn conninfo(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut parts = Vec::new();
    if let Some(host) = config.get_hosts().first() {
        let host = match host {
            Host::Tcp(h) => h.clone(),
            Host::Unix(p) => p.display().to_string(),
        };
        parts.push(format!("host={}", quote(&host)));
    }
    if let Some(port) = config.get_ports().first() {
        parts.push(format!("port={port}"));
    }
    if let Some(user) = config.get_user() {
        parts.push(format!("user={}", quote(user)));
    }
    if let Some(db) = config.get_dbname() {
        parts.push(format!("dbname={}", quote(db)));
    }
    parts.push("application_name='updog-backup'".into());
    parts.join(" ")
}

impl crate::retry::Classify for ToolError {
    fn class(&self) -> crate::retry::ErrorClass {
        match self {
            ToolError::NotFound { .. } => crate::retry::ErrorClass::Usage,
            ToolError::Failed { .. } => crate::retry::ErrorClass::Permanent,
        }
    }
}
