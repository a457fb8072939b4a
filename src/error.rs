//! The crate's error at the command boundary: every module error, and the exit code its
//! class earns (README.md: 0 success, 1 operational failure, 2 usage or configuration error).
//! Which class each error has is its module's answer ([`Classify`]); this type only carries it.

use crate::retry::{Classify, ErrorClass};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Url(#[from] crate::pg::InvalidUrl),
    #[error(transparent)]
    Connect(#[from] crate::pg::ConnectError),
    #[error(transparent)]
    Replication(#[from] crate::pg::replication::ReplicationError),
    #[error(transparent)]
    Codec(#[from] crate::codec::CodecError),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error(transparent)]
    Repository(#[from] crate::repository::RepositoryError),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error(transparent)]
    Restore(#[from] crate::restore::RestoreError),
    #[error(transparent)]
    Plan(#[from] crate::restore::PlanError),
    #[error(transparent)]
    Diff(#[from] crate::diff::DiffError),
    #[error(transparent)]
    Rewind(#[from] crate::rewind::RewindError),
    #[error(transparent)]
    Capture(#[from] crate::capture::CaptureError),
    #[error(transparent)]
    Publication(#[from] crate::source::publication::PublicationError),
    #[error(transparent)]
    Daemon(#[from] crate::daemon::DaemonError),
    #[error(transparent)]
    Init(#[from] crate::init::InitError),
    #[error(transparent)]
    List(#[from] crate::listing::ListError),
    #[error(transparent)]
    Verify(#[from] crate::verify::VerifyError),
    #[error("{0}")]
    Failed(String),
}

impl Classify for Error {
    fn class(&self) -> ErrorClass {
        match self {
            Error::Usage(_) => ErrorClass::Usage,
            Error::Config(e) => e.class(),
            Error::Url(e) => e.class(),
            Error::Connect(e) => e.class(),
            Error::Replication(e) => e.class(),
            Error::Codec(e) => e.class(),
            Error::Storage(e) => e.class(),
            Error::Repository(e) => e.class(),
            Error::Source(e) => e.class(),
            Error::Snapshot(e) => e.class(),
            Error::Restore(e) => e.class(),
            Error::Plan(e) => e.class(),
            Error::Diff(e) => e.class(),
            Error::Rewind(e) => e.class(),
            Error::Capture(e) => e.class(),
            Error::Publication(e) => e.class(),
            Error::Daemon(e) => e.class(),
            Error::Init(e) => e.class(),
            Error::List(e) => e.class(),
            Error::Verify(e) => e.class(),
            Error::Failed(_) => ErrorClass::Permanent,
        }
    }
}

impl Error {
    /// The process exit code: the class's (2 for usage, 1 otherwise).
    pub fn exit_code(&self) -> u8 {
        self.class().exit_code()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::replication::ReplicationError;
    use crate::source::identity::IdentifyError;

    /// The same configuration error exits 2 whether it comes directly or wrapped (init once
    /// flattened replication errors into strings, and they exited 1).
    #[test]
    fn a_wrapped_error_keeps_its_exit_code() {
        let direct = Error::Replication(ReplicationError::Config("bad".into()));
        let wrapped = Error::Init(crate::init::InitError::Identify(
            IdentifyError::Replication {
                target: "postgres://h/db".into(),
                source: ReplicationError::Config("bad".into()),
            },
        ));
        assert_eq!(direct.exit_code(), 2);
        assert_eq!(wrapped.exit_code(), 2);
        let closed = Error::Init(crate::init::InitError::Identify(
            IdentifyError::Replication {
                target: "postgres://h/db".into(),
                source: ReplicationError::Closed,
            },
        ));
        assert_eq!(closed.class(), ErrorClass::Transient);
        assert_eq!(closed.exit_code(), 1);
    }

    /// "Retry once the daemon covers …" is not a usage error.
    #[test]
    fn a_restore_point_not_covered_yet_is_transient() {
        let now = chrono::Utc::now();
        let left_out = Error::Plan(crate::restore::PlanError::LeftOut {
            snapshot: "s".into(),
            at: now,
            lsn: crate::pg::Lsn(1),
            committed: now,
            covered_until: now,
        });
        assert_eq!(left_out.class(), ErrorClass::Transient);
        assert_eq!(left_out.exit_code(), 1);
    }
}

/// ARCHITECTURE.md's table of every error and its class is the code's: this reads each
/// `impl Classify` in `src/` (their matches name every variant — a wildcard arm is refused, so
/// a new variant cannot slip in unclassified) and compares the table with what they say.
#[cfg(test)]
mod table {
    use std::collections::BTreeSet;
    use std::path::Path;

    /// (error type, variant, class, exit code) as ARCHITECTURE.md writes them.
    type Row = (String, String, String, String);

    fn sources(dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(std::fs::read_to_string(&path).unwrap());
            }
        }
    }

    /// The text between the brace at `open` and its match.
    fn block(text: &str, open: usize) -> &str {
        let mut depth = 0;
        for (i, c) in text[open..].char_indices() {
            match c {
                '{' | '(' | '[' => depth += 1,
                '}' | ')' | ']' => {
                    depth -= 1;
                    if depth == 0 {
                        return &text[open + 1..open + i];
                    }
                }
                _ => {}
            }
        }
        panic!("unbalanced block");
    }

    /// Splits at commas outside brackets.
    fn top_level(text: &str) -> Vec<&str> {
        let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
        for (i, c) in text.char_indices() {
            match c {
                '{' | '(' | '[' => depth += 1,
                '}' | ')' | ']' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&text[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&text[start..]);
        parts.into_iter().filter(|p| !p.trim().is_empty()).collect()
    }

    fn without_comments(text: &str) -> String {
        text.lines()
            .map(|l| l.find("//").map_or(l, |i| &l[..i]))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The variants of `pub enum name`, `None` when `name` is a struct.
    fn variants(code: &str, name: &str) -> Option<Vec<String>> {
        let at = code.find(&format!("pub enum {name} {{"))?;
        let body = block(code, at + code[at..].find('{').unwrap());
        let mut plain = String::new();
        let mut rest = body;
        // Attributes (`#[error(…)]`) hold commas and braces of their own.
        while let Some(i) = rest.find("#[") {
            plain.push_str(&rest[..i]);
            let inner = block(rest, i + 1);
            rest = &rest[i + 1 + inner.len() + 2..];
        }
        plain.push_str(rest);
        Some(
            top_level(&plain)
                .into_iter()
                .map(|v| {
                    v.trim()
                        .split(|c: char| !c.is_alphanumeric() && c != '_')
                        .next()
                        .unwrap()
                        .to_string()
                })
                .collect(),
        )
    }

    fn class_of(expr: &str) -> &'static str {
        // Derived classes first: their expressions may name classes too.
        for (needle, class) in [
            ("match status", "by HTTP status"),
            ("class_of_code(", "by SQLSTATE"),
            ("class_of(", "by SQLSTATE"),
            (".class()", "the wrapped error's"),
            ("ErrorClass::Usage", "usage"),
            ("ErrorClass::Transient", "transient"),
            ("ErrorClass::Permanent", "permanent"),
        ] {
            if expr.contains(needle) {
                return class;
            }
        }
        panic!("cannot tell the class of `{expr}`");
    }

    fn exit_of(class: &str) -> &'static str {
        match class {
            "usage" => "2",
            "transient" | "permanent" => "1",
            _ => "as its class",
        }
    }

    /// What the code says.
    fn from_code() -> BTreeSet<Row> {
        let mut files = Vec::new();
        sources(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut files,
        );
        let code = files
            .iter()
            .map(|f| without_comments(f))
            .collect::<String>();
        let mut rows = BTreeSet::new();
        for (at, _) in code.match_indices("Classify for ") {
            if !(code[..at].ends_with("impl ") || code[..at].ends_with("impl crate::retry::")) {
                continue;
            }
            let name: String = code[at + "Classify for ".len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let fn_at = at + code[at..].find("fn class(").unwrap();
            let body = block(&code, fn_at + code[fn_at..].find('{').unwrap());
            let mut row = |variant: &str, class: &'static str| {
                rows.insert((
                    name.clone(),
                    variant.to_string(),
                    class.to_string(),
                    exit_of(class).to_string(),
                ));
            };
            let Some(m) = body.find("match self {") else {
                // One class for the whole type.
                let class = class_of(body);
                match variants(&code, &name) {
                    Some(all) => all.iter().for_each(|v| row(v, class)),
                    None => row("—", class),
                }
                continue;
            };
            for arm in top_level(block(body, m + "match self ".len())) {
                let (pattern, expr) = arm.split_once("=>").expect("a match arm");
                assert!(
                    !pattern.trim().starts_with('_'),
                    "{name}: a wildcard arm hides which class new variants get"
                );
                let class = class_of(expr);
                for part in pattern.split('|') {
                    let part = part.trim();
                    let variant = part
                        .split_once("::")
                        .map_or(part, |(_, v)| v)
                        .split(|c: char| !c.is_alphanumeric() && c != '_')
                        .next()
                        .unwrap();
                    row(variant, class);
                }
            }
        }
        rows
    }

    /// What ARCHITECTURE.md says: the rows of its table of errors.
    fn from_document() -> BTreeSet<Row> {
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md"))
                .unwrap();
        text.lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l
                    .trim()
                    .strip_prefix('|')?
                    .strip_suffix('|')?
                    .split('|')
                    .collect();
                let cells: Vec<String> = cells
                    .iter()
                    .map(|c| c.trim().trim_matches('`').to_string())
                    .collect();
                (cells.len() == 4 && cells[0].ends_with("Error")
                    || cells.first().is_some_and(|c| c == "InvalidUrl"))
                .then(|| {
                    (
                        cells[0].clone(),
                        cells[1].clone(),
                        cells[2].clone(),
                        cells[3].clone(),
                    )
                })
            })
            .collect()
    }

    #[test]
    fn architecture_md_lists_every_error_with_its_class() {
        let code = from_code();
        let document = from_document();
        if code != document {
            let table: String = code
                .iter()
                .map(|(t, v, c, e)| format!("| `{t}` | `{v}` | {c} | {e} |\n"))
                .collect();
            panic!(
                "ARCHITECTURE.md's error table differs from the code.\nOnly in the code: {:?}\nOnly in the document: {:?}\nThe table as the code has it:\n{table}",
                code.difference(&document).collect::<Vec<_>>(),
                document.difference(&code).collect::<Vec<_>>()
            );
        }
    }
}
