//! Our backup: the repository, identity and config of one source database ([`Env`]),
//! `updog-backup backup` measured with what it logged and stored, and the backup role's
//! PostgreSQL parallel query turned off for one run.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde_json::Value;

use updog_backup_test_support::bench::dir_bytes;
use updog_backup_test_support::fixture::config_toml;
use updog_backup_test_support::postgres;

use crate::BIN;
use crate::measure::{Outcome, Sample, measure};

/// The repository, identity and config of one source database.
pub(crate) struct Env {
    pub(crate) dir: PathBuf,
    pub(crate) config: PathBuf,
    pub(crate) repo: PathBuf,
    pub(crate) recipient: String,
    /// The `init` that made the repository and took the first snapshot (in format 3, it also
    /// made every tenant's key).
    pub(crate) init: Sample,
}

/// What a backup stored, besides its sample.
pub(crate) struct Stored {
    pub(crate) rows: u64,
    pub(crate) tenants: usize,
    /// tenant → (seconds, stored bytes, rows) from the "archive stored" debug lines.
    pub(crate) archives: BTreeMap<String, (f64, u64, u64)>,
}

impl Env {
    /// A repository of `format_version` (3: per-tenant keys; 2: one key for every tenant),
    /// with its own slot.
    pub(crate) fn new(pg: &postgres::Cluster, base: &Path, db: &str, format_version: u32) -> Self {
        let dir = base.join(format!("{db}-format{format_version}"));
        fs::create_dir_all(&dir).unwrap();
        let identity = dir.join("identity.txt");
        let out = measure(
            pg,
            &dir,
            Path::new(BIN),
            &[
                "keygen".into(),
                "--output".into(),
                identity.display().to_string(),
            ],
            &[],
        );
        let recipient = out.stdout.trim().to_string();
        let repo = dir.join("repo");
        let config = dir.join("updog-backup.toml");
        fs::write(
            &config,
            config_toml(
                &pg.url("updog_backup", db),
                &format!("slot = \"updog_backup_f{format_version}\"\n"),
                &format!("url = \"file://{}\"", repo.display()),
                &recipient,
                &identity,
                "\n[snapshot]\nparallel = 2\n",
            ),
        )
        .unwrap();
        let mut env = Env {
            dir,
            config,
            repo,
            recipient,
            init: Sample::default(),
        };
        // The publication `init` needs, created as the tables' owner would.
        pg.psql(
            db,
            &[
                "-c",
                "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'updog_backup')
                 THEN CREATE PUBLICATION updog_backup FOR ALL TABLES; END IF; END $$",
            ],
        );
        let format = format_version.to_string();
        env.init = Sample::from(&env.run(pg, &["init", "--format-version", &format], 2));
        env
    }

    /// `updog-backup --config … <args>` with `snapshot.parallel` overridden and debug logs
    /// of our crate (JSON lines on stderr, since stderr is not a terminal).
    pub(crate) fn run(&self, pg: &postgres::Cluster, args: &[&str], parallel: usize) -> Outcome {
        let mut all = vec!["--config".to_string(), self.config.display().to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        measure(
            pg,
            &self.dir,
            Path::new(BIN),
            &all,
            &[
                ("UPDOG_BACKUP_LOG", "warn,updog_backup=debug".into()),
                ("UPDOG_BACKUP__SNAPSHOT__PARALLEL", parallel.to_string()),
            ],
        )
    }

    /// Runs a backup, reads what it logged and stored, then deletes the snapshot (disk).
    pub(crate) fn backup(
        &self,
        pg: &postgres::Cluster,
        args: &[&str],
        parallel: usize,
    ) -> (Sample, Stored) {
        let mut all = vec!["backup"];
        all.extend_from_slice(args);
        let out = self.run(pg, &all, parallel);
        let log = Log::parse(&out.stderr);
        let id = log
            .snapshot
            .clone()
            .unwrap_or_else(|| panic!("no \"snapshot stored\" line in:\n{}", out.stderr));
        let snapshot_dir = self.repo.join("snapshots").join(&id);
        let manifest: Value = serde_json::from_slice(
            &fs::read(snapshot_dir.join("manifest.json")).expect("manifest.json"),
        )
        .expect("manifest is JSON");
        let rows_of = |entry: &Value| -> u64 {
            entry["rows"]
                .as_object()
                .map(|m| m.values().filter_map(Value::as_u64).sum())
                .unwrap_or(0)
        };
        let tenants = manifest["tenants"].as_object().expect("tenants");
        let rows = rows_of(&manifest["global"]) + tenants.values().map(rows_of).sum::<u64>();
        let sample = Sample {
            bytes: dir_bytes(&snapshot_dir),
            setup: log.started_at.map_or(f64::NAN, |t| {
                (t - out.spawned_at).num_microseconds().unwrap_or(0) as f64 / 1e6
            }),
            ..Sample::from(&out)
        };
        fs::remove_dir_all(&snapshot_dir).expect("removing the measured snapshot");
        (
            sample,
            Stored {
                rows,
                tenants: tenants.len(),
                archives: log.tenant_archives,
            },
        )
    }
}

/// What a backup logged (JSON lines on stderr).
#[derive(Default)]
pub(crate) struct Log {
    pub(crate) snapshot: Option<String>,
    pub(crate) started_at: Option<DateTime<Utc>>,
    pub(crate) tenant_archives: BTreeMap<String, (f64, u64, u64)>,
}

impl Log {
    pub(crate) fn parse(stderr: &str) -> Self {
        let mut log = Log::default();
        for line in stderr.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let time = v["timestamp"]
                .as_str()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc));
            match v["message"].as_str() {
                Some("snapshot started") => log.started_at = time,
                Some("snapshot stored") => {
                    log.snapshot = v["snapshot"].as_str().map(str::to_string)
                }
                Some("archive stored") => {
                    if let Some(tenant) = v["tenant"].as_str().filter(|t| *t != "(global)") {
                        log.tenant_archives.insert(
                            tenant.to_string(),
                            (
                                v["seconds"].as_f64().unwrap_or(f64::NAN),
                                v["bytes"].as_u64().unwrap_or(0),
                                v["rows"].as_u64().unwrap_or(0),
                            ),
                        );
                    }
                }
                _ => {}
            }
        }
        log
    }
}

/// `snapshot.parallel` of the run without PostgreSQL parallel query (the machine's 2 cores).
pub(crate) const NO_PARALLEL_QUERY_RUN: usize = 2;

/// Turns PostgreSQL parallel query off (`max_parallel_workers_per_gather = 0`) or back to the
/// default for the backup role's new sessions.
pub(crate) fn parallel_query(pg: &postgres::Cluster, on: bool) {
    let sql = if on {
        "ALTER ROLE updog_backup RESET max_parallel_workers_per_gather"
    } else {
        "ALTER ROLE updog_backup SET max_parallel_workers_per_gather = 0"
    };
    pg.psql("postgres", &["-c", sql]);
}
