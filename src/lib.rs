//! updog-backup: per-tenant backup and point-in-time restore for multi-tenant PostgreSQL.
//!
//! ```text
//!              replication connection (pgoutput, proto 2)
//! PostgreSQL ──► pg::replication ─► pg::pgoutput ─► capture (router ─► pack writer) ─► repository ─► storage
//!    │  exported snapshot, COPY per table per tenant                                    ▲           (S3 / dir)
//!    └──────────────────────────────────► snapshot ─────────────────────────────────────┘
//! restore: repository ─► plan(org, T) ─► archive + pack sections ─► load, replay ≤ T ─► report
//! daemon:  supervisor ∥ capture ∥ schedule (snapshots, retention) ∥ slot health ∥ HTTP
//! ```
//!
//! The module map, lowest layer first (a module imports only modules above it in this list;
//! ARCHITECTURE.md has the invariants, the reasons and the error table):
//!
//! - [`retry`]: the error classes ([`retry::Classify`]) and the backoff of every retry loop.
//! - [`scratch`]: local files only this process can reach (unlinked at once), for ciphertext.
//! - [`pg`]: talking to PostgreSQL — conninfo, passfile, TLS, connecting, quoting, SQLSTATE
//!   classes, the walsender protocol, pgoutput, [`pg::Lsn`].
//! - [`codec`]: zstd then age, streaming; identities and recipients.
//! - [`progress`]: progress bars on a terminal, nothing elsewhere.
//! - [`config`]: the TOML file and its environment overrides, validated.
//! - [`storage`]: the `ObjectStore` trait; local directory, S3, memory; the configured one.
//! - [`repository`]: the format, all of it (FORMAT.md), behind [`repository::Repository`].
//! - [`source`]: what we ask the source — catalog and tenant routing, what its schemas use
//!   outside themselves (extensions…) and what a server can create of it, `check`, the
//!   publication, pg_dump.
//! - [`telemetry`]: `/status`, Prometheus metrics, the store wrapper that times requests.
//! - [`capture`]: the daemon's change stream — router, pack writer, spools, stream gaps.
//! - [`snapshot`]: a consistent export split by tenant.
//! - [`restore`]: one tenant into a new recovery database (plan, load, replay, report).
//! - [`diff`]: what changed in one tenant between a restore point and now, or two of them.
//! - [`rewind`]: one tenant's rows in the source made equal to a restore point, in one
//!   transaction.
//! - [`retention`]: what `keep_snapshots` leaves to delete, deleted in a safe order.
//! - [`verify`], [`listing`], [`init`]: the `verify`, `list` and `init` commands as library
//!   functions returning reports.
//! - [`daemon`]: supervisor, leader lock and lease, snapshot schedule, slot health, HTTP.
//! - [`error`]: the command boundary's error and its exit code; [`cli`]: parse and print.

pub mod capture;
pub mod cli;
pub mod codec;
pub mod config;
pub mod daemon;
pub mod diff;
pub mod error;
pub mod init;
pub mod listing;
pub mod pg;
pub mod progress;
pub mod repository;
pub mod restore;
pub mod retention;
pub mod retry;
pub mod rewind;
pub mod scratch;
pub mod snapshot;
pub mod source;
pub mod storage;
pub mod telemetry;
pub mod verify;

/// The module map above is a layering: no top-level module imports one that imports it back.
/// Read from the sources (`crate::<module>` paths outside test code), so a new import that
/// closes a cycle fails here, naming it.
#[cfg(test)]
mod layering {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    fn collect(dir: &Path, top: Option<&str>, graph: &mut BTreeMap<String, BTreeSet<String>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().to_string();
            let module = top.map_or(name.clone(), str::to_string);
            if path.is_dir() {
                collect(&path, Some(&module), graph);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs")
                || name == "tests"
                || (top.is_none() && (name == "lib" || name == "main"))
            {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            let uses = graph.entry(module.clone()).or_default();
            for (at, _) in code.match_indices("crate::") {
                let target: String = code[at + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if target != module && !target.is_empty() {
                    uses.insert(target);
                }
            }
        }
    }

    #[test]
    fn no_top_level_module_imports_one_that_imports_it() {
        let mut graph = BTreeMap::new();
        collect(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            None,
            &mut graph,
        );
        let reaches = |from: &str, to: &str| {
            let (mut seen, mut todo) = (BTreeSet::new(), vec![from.to_string()]);
            while let Some(m) = todo.pop() {
                for next in graph.get(&m).into_iter().flatten() {
                    if next == to {
                        return true;
                    }
                    if seen.insert(next.clone()) {
                        todo.push(next.clone());
                    }
                }
            }
            false
        };
        let cycles: Vec<(&String, &String)> = graph
            .iter()
            .flat_map(|(m, uses)| uses.iter().map(move |u| (m, u)))
            .filter(|(m, u)| reaches(u, m))
            .collect();
        assert!(
            cycles.is_empty(),
            "import cycles between top-level modules: {cycles:?}"
        );
        assert!(graph["retry"].is_empty(), "retry imports nothing of ours");
        assert_eq!(
            graph["pg"].iter().collect::<Vec<_>>(),
            ["retry"],
            "pg imports only retry"
        );
    }
}
