//! The libpq passfile (`PGPASSFILE` or `~/.pgpass`): `host:port:database:user:password`, `*`
//! wildcards, `\:` and `\\` escapes. tokio-postgres does not read it, and passwords must not
//! sit in the config file or on the command line.

use std::path::PathBuf;

use tokio_postgres::config::Host;

/// The password for the config's first host, port, database and user, if a line matches.
pub fn lookup(config: &tokio_postgres::Config) -> Option<Vec<u8>> {
    let path = std::env::var_os("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pgpass")))?;
    let text = std::fs::read_to_string(path).ok()?;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(_)) | None => "localhost".to_string(),
        #[cfg(not(unix))]
        None => "localhost".to_string(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let user = config.get_user().unwrap_or_default().to_string();
    let db = config
        .get_dbname()
        .map_or_else(|| user.clone(), str::to_string);
    find(&text, [&host, &port, &db, &user]).map(String::into_bytes)
}

fn find(text: &str, wanted: [&str; 4]) -> Option<String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .find_map(|line| {
            let fields = split(line);
            if fields.len() != 5 {
                return None;
            }
            let matches = fields
                .iter()
                .zip(wanted)
                .all(|(field, want)| field == "*" || field == want);
            matches.then(|| fields[4].clone())
        })
}

fn split(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    fields.last_mut().expect("never empty").push(next);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            _ => fields.last_mut().expect("never empty").push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_with_wildcards_and_escapes() {
        let text = "# comment\nother:5432:*:u:no\n127.0.0.1:*:updog:updog_backup:s\\:ecret\n";
        assert_eq!(
            find(text, ["127.0.0.1", "5432", "updog", "updog_backup"]).as_deref(),
            Some("s:ecret")
        );
        assert_eq!(
            find(text, ["127.0.0.1", "5432", "other", "updog_backup"]),
            None
        );
    }
}
