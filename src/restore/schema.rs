//! Recreating the schema in the recovery database from the stored `pg_dump -Fc` archive.
//!
//! `pg_restore --no-owner` turns it into SQL (in memory, never on disk); each TOC entry is
//! then executed on its own, so that what the target cannot honour — a GRANT to a role that
//! does not exist there, a policy naming one — is reported by name instead of aborting the
//! restore or being dropped silently. Pre-data runs before the rows are loaded, post-data
//! (indexes, constraints, triggers, RLS) after, so loading fires no trigger and meets no
//! enabled row level security.

use std::process::Stdio;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::Client;

use crate::source::pg_tools::{self, ToolError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    PreData,
    PostData,
}

impl Section {
    fn arg(self) -> &'static str {
        match self {
            Self::PreData => "--section=pre-data",
            Self::PostData => "--section=post-data",
        }
    }
}

/// One TOC entry of the dump, as SQL.
#[derive(Debug, Clone)]
pub struct Entry {
    /// `TABLE app.funds`, `POLICY app.funds funds_select` …
    pub label: String,
    pub kind: String,
    /// The entry's own name as the dump's header gives it (unquoted): `app` for a schema.
    pub name: String,
    pub sql: String,
}

/// A statement of the dump the target refused, reported to the user.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Skipped {
    pub entry: String,
    pub error: String,
}

/// Converts the dump to SQL with pg_restore and splits it into entries. Returns the preamble
/// (session settings) and the entries.
pub async fn entries(
    pg_restore: &std::path::Path,
    dump: &[u8],
    section: Section,
) -> Result<(String, Vec<Entry>), ToolError> {
    let failed = |message: String| ToolError::Failed {
        tool: "pg_restore",
        message,
    };
    let mut child = tokio::process::Command::new(pg_restore)
        .args(["--no-owner", section.arg(), "--file=-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| failed(e.to_string()))?;
    let mut stdin = child.stdin.take().expect("piped");
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let dump = dump.to_vec();
    let feed = tokio::spawn(async move {
        let result = stdin.write_all(&dump).await;
        drop(stdin);
        result
    });
    let mut sql = String::new();
    let mut errors = String::new();
    let (out, err) = tokio::join!(
        stdout.read_to_string(&mut sql),
        stderr.read_to_string(&mut errors)
    );
    out.map_err(|e| failed(e.to_string()))?;
    err.map_err(|e| failed(e.to_string()))?;
    let status = child.wait().await.map_err(|e| failed(e.to_string()))?;
    let fed = feed.await.map_err(|e| failed(e.to_string()))?;
    if !status.success() || fed.is_err() {
        return Err(failed(format!("{status}: {}", errors.trim())));
    }
    Ok(split(&sql))
}

/// Splits pg_restore's script at its `-- Name: …; Type: …; Schema: …` headers.
fn split(sql: &str) -> (String, Vec<Entry>) {
    let mut preamble = String::new();
    let mut entries: Vec<Entry> = Vec::new();
    for line in sql.lines() {
        // psql meta-commands (`\restrict` in current dumps) are not SQL.
        if line.starts_with('\\') {
            continue;
        }
        if let Some(header) = line.strip_prefix("-- Name: ") {
            let field = |name: &str| {
                header
                    .split("; ")
                    .find_map(|part| part.strip_prefix(name))
                    .unwrap_or("")
                    .trim()
                    .to_string()
            };
            let kind = field("Type: ");
            let schema = field("Schema: ");
            let name = header.split("; ").next().unwrap_or("").to_string();
            let label = if schema.is_empty() || schema == "-" {
                format!("{kind} {name}")
            } else {
                format!("{kind} {schema}.{name}")
            };
            entries.push(Entry {
                label,
                kind,
                name,
                sql: String::new(),
            });
            continue;
        }
        if line.starts_with("--") {
            continue;
        }
        let target = match entries.last_mut() {
            Some(entry) => &mut entry.sql,
            None => &mut preamble,
        };
        target.push_str(line);
        target.push('\n');
    }
    // The source's trigger of parent moves calls a function outside the backed-up schemas,
    // and a recovery database has nothing to capture.
    let ours = format!(" {}", crate::source::moves::TRIGGER);
    let theirs = |e: &Entry| !(e.kind == "TRIGGER" && e.name.ends_with(&ours));
    entries.retain(|e| !e.sql.trim().is_empty() && theirs(e));
    for entry in entries.iter_mut().filter(|e| e.kind == "SCHEMA") {
        // Every new database has `public` (and a restore makes the schemas its extensions
        // live in): the schema the tables of so many databases are in must not fail the
        // restore for existing already.
        if let Some(rest) = entry.sql.trim_start().strip_prefix("CREATE SCHEMA ")
            && !rest.starts_with("IF NOT EXISTS ")
        {
            entry.sql = format!("CREATE SCHEMA IF NOT EXISTS {rest}");
        }
    }
    (preamble, entries)
}

/// Entries whose failure leaves the recovery database unusable; the rest (privileges,
/// comments, policies, constraints that the tenant's rows alone cannot satisfy) are reported.
fn is_essential(kind: &str) -> bool {
    matches!(
        kind,
        "SCHEMA"
            | "TYPE"
            | "DOMAIN"
            | "TABLE"
            | "SEQUENCE"
            | "SEQUENCE OWNED BY"
            | "DEFAULT"
            | "FUNCTION"
            | "COLLATION"
            | "EXTENSION"
    )
}

/// Runs the entries, each in its own implicit transaction; returns what was skipped.
pub async fn apply(
    client: &Client,
    preamble: &str,
    entries: &[Entry],
) -> Result<Vec<Skipped>, (String, tokio_postgres::Error)> {
    client
        .batch_execute(preamble)
        .await
        .map_err(|e| ("session settings of the dump".to_string(), e))?;
    let mut skipped = Vec::new();
    for entry in entries {
        if let Err(e) = client.batch_execute(&entry.sql).await {
            if is_essential(&entry.kind) {
                return Err((entry.label.clone(), e));
            }
            let error = crate::pg::sqlstate::describe(&e);
            tracing::warn!(entry = %entry.label, error = %error, "not recreated in the recovery database");
            skipped.push(Skipped {
                entry: entry.label.clone(),
                error,
            });
        }
    }
    Ok(skipped)
}

/// pg_restore able to read a dump from a server of `major` version.
pub async fn pg_restore(major: u32) -> Result<std::path::PathBuf, ToolError> {
    pg_tools::find("pg_restore", major).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_entries_and_drops_meta_commands() {
        let sql = "\\restrict abc\nSET x = 1;\n\n--\n-- Name: app; Type: SCHEMA; Schema: -; Owner: -\n--\n\nCREATE SCHEMA app;\n\n--\n-- Name: funds funds_select; Type: POLICY; Schema: app; Owner: -\n--\n\nCREATE POLICY p ON app.funds;\n\\unrestrict abc\n";
        let (preamble, entries) = split(sql);
        assert_eq!(preamble.trim(), "SET x = 1;");
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].label, "SCHEMA app");
        assert_eq!(
            (entries[0].kind.as_str(), entries[0].name.as_str()),
            ("SCHEMA", "app")
        );
        assert_eq!(entries[0].sql.trim(), "CREATE SCHEMA IF NOT EXISTS app;");
        assert_eq!(entries[1].label, "POLICY app.funds funds_select");
        assert_eq!(entries[1].sql.trim(), "CREATE POLICY p ON app.funds;");
    }
}
