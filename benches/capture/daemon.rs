//! The database, the binary's environment, the daemon: the source database (fixture, REPLICA
//! IDENTITY fixes, the load's lookup tables), the repository/identity/config of the release
//! binary ([`Env`]), and `updog-backup daemon` with its parsed JSON log ([`Daemon`]).

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;

use updog_backup_test_support::bench::dir_bytes;
use updog_backup_test_support::fixture::config_toml;
use updog_backup_test_support::postgres;

use crate::load::LOAD_SETUP;
use crate::plumbing::{parse_time, proc_cpu, proc_kib, watchdog};
use crate::{Args, BIN, SLOT};
use updog_backup_test_support::pgbackrest::run;

/// A source database: the fixture, the REPLICA IDENTITY fixes, the load's lookup tables.
pub(crate) async fn source_db(pg: &postgres::Cluster, hint: &str, args: &Args) -> String {
    let db = pg.capture_fixture_db(hint, args.tenants, &args.scale).await;
    pg.psql(
        &db,
        &[
            "-c",
            &LOAD_SETUP.replace(":tenants", &args.tenants.to_string()),
        ],
    );
    pg.psql(&db, &["-c", "VACUUM (FREEZE, ANALYZE)"]);
    db
}

/// Repository, identity and config of one source database; commands run the release binary.
pub(crate) struct Env {
    pub(crate) dir: PathBuf,
    pub(crate) config: PathBuf,
    pub(crate) repo: PathBuf,
    pub(crate) envs: Vec<(String, String)>,
}

impl Env {
    pub(crate) fn new(
        pg: &postgres::Cluster,
        base: &Path,
        label: &str,
        db: &str,
        args: &Args,
    ) -> Self {
        Self::with_slot(pg, base, label, db, args, SLOT)
    }

    /// [`Env::new`] with its own slot: a second repository of the same source.
    pub(crate) fn with_slot(
        pg: &postgres::Cluster,
        base: &Path,
        label: &str,
        db: &str,
        args: &Args,
        slot: &str,
    ) -> Self {
        let dir = base.join(label);
        fs::create_dir_all(&dir).unwrap();
        let identity = dir.join("identity.txt");
        let recipient = run(
            Command::new(BIN)
                .arg("keygen")
                .arg("--output")
                .arg(&identity),
            "keygen",
        )
        .trim()
        .to_string();
        let repo = dir.join("repo");
        let config = dir.join("updog-backup.toml");
        fs::write(
            &config,
            config_toml(
                &pg.url("updog_backup", db),
                &format!("slot = \"{slot}\"\n"),
                &format!("url = \"file://{}\"", repo.display()),
                &recipient,
                &identity,
                &format!(
                    "\n[restore]\ntarget_url = \"{}\"\n",
                    pg.url("updog_restore", "postgres")
                ),
            ),
        )
        .unwrap();
        let mut envs = Vec::new();
        if let Some(f) = args.flush_interval {
            envs.push((
                "UPDOG_BACKUP__STREAM__FLUSH_INTERVAL".to_string(),
                format!("{}ms", (f * 1000.0).round() as u64),
            ));
        }
        // The publication `init` needs, created as the tables' owner would.
        pg.psql(
            db,
            &[
                "-c",
                "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'updog_backup')
                 THEN CREATE PUBLICATION updog_backup FOR ALL TABLES; END IF; END $$",
            ],
        );
        Env {
            dir,
            config,
            repo,
            envs,
        }
    }

    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("UPDOG_BACKUP_CONFIG")
            .env("UPDOG_BACKUP_LOG", "warn");
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        cmd
    }

    pub(crate) fn ok(&self, args: &[&str]) -> String {
        run(&mut self.command(args), &format!("updog-backup {args:?}"))
    }

    /// Covered-until from `changes/progress.json` (FORMAT.md): what `list` shows, without
    /// starting a process per poll.
    pub(crate) fn covered_until(&self) -> Option<DateTime<Utc>> {
        let text = fs::read_to_string(self.repo.join("changes/progress.json")).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        v["covered_until"].as_str().and_then(parse_time)
    }

    /// Covered-until as `list --json` reports it.
    pub(crate) fn list_covered(&self) -> Option<DateTime<Utc>> {
        let out = self.ok(&["list", "--json"]);
        let v: Value = serde_json::from_str(&out).ok()?;
        v["stream"]["covered_until"].as_str().and_then(parse_time)
    }

    /// Waits until the repository covers `t`; the seconds waited, `None` past `limit`.
    pub(crate) fn wait_covered(
        &self,
        t: DateTime<Utc>,
        daemon: &mut Daemon,
        limit: Duration,
    ) -> Option<f64> {
        let clock = Instant::now();
        loop {
            daemon.assert_running();
            if self.covered_until().is_some_and(|c| c >= t) {
                return Some(clock.elapsed().as_secs_f64());
            }
            if clock.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The first snapshot's manifest (the one `init` took).
    pub(crate) fn first_manifest(&self) -> Value {
        let mut ids: Vec<_> = fs::read_dir(self.repo.join("snapshots"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        ids.sort();
        let path = ids.first().expect("a snapshot").join("manifest.json");
        serde_json::from_slice(&fs::read(&path).unwrap()).expect("manifest is JSON")
    }

    /// Bytes under `changes/` (the packs and the stream's state).
    pub(crate) fn change_bytes(&self) -> u64 {
        dir_bytes(&self.repo.join("changes"))
    }
}

/// `updog-backup daemon`, its JSON log lines in a file.
pub(crate) struct Daemon {
    pub(crate) child: Option<Child>,
    pub(crate) pid: u32,
    pub(crate) log: PathBuf,
    pub(crate) spawned_at: DateTime<Utc>,
}

/// A "pack stored" log line.
#[derive(Clone, Debug)]
pub(crate) struct PackLine {
    pub(crate) at: DateTime<Utc>,
    pub(crate) bytes: u64,
    pub(crate) transactions: u64,
    pub(crate) changes: u64,
    pub(crate) first: Option<DateTime<Utc>>,
    pub(crate) last: Option<DateTime<Utc>>,
    pub(crate) seconds: f64,
}

#[derive(Default)]
pub(crate) struct DaemonLog {
    pub(crate) packs: Vec<PackLine>,
    pub(crate) capture_started: Option<DateTime<Utc>>,
    /// WARN and ERROR lines, as logged.
    pub(crate) problems: Vec<String>,
}

impl Daemon {
    pub(crate) fn start(env: &Env, name: &str) -> Daemon {
        let log = env.dir.join(format!("daemon-{name}.log"));
        let file = fs::File::create(&log).unwrap();
        let spawned_at = Utc::now();
        let child = env
            .command(&["daemon"])
            .env("UPDOG_BACKUP_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .process_group(0)
            .spawn()
            .expect("starting the daemon");
        let pid = child.id();
        watchdog(pid, "TERM", "");
        Daemon {
            child: Some(child),
            pid,
            log,
            spawned_at,
        }
    }

    pub(crate) fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn assert_running(&mut self) {
        if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
            panic!("the daemon exited ({status}):\n{}", self.output());
        }
    }

    pub(crate) fn kib(&self, field: &str) -> u64 {
        proc_kib(self.pid, field)
    }

    pub(crate) fn cpu(&self) -> f64 {
        proc_cpu(self.pid)
    }

    pub(crate) fn parse_log(&self) -> DaemonLog {
        let mut log = DaemonLog::default();
        for line in self.output().lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                if !line.trim().is_empty() {
                    log.problems.push(line.to_string());
                }
                continue;
            };
            let at = v["timestamp"].as_str().and_then(parse_time);
            match v["level"].as_str() {
                Some("WARN") | Some("ERROR") => log.problems.push(line.to_string()),
                _ => {}
            }
            match v["message"].as_str() {
                Some("capture started") => log.capture_started = at,
                Some("pack stored") => log.packs.push(PackLine {
                    at: at.expect("log lines carry a timestamp"),
                    bytes: v["bytes"].as_u64().unwrap_or(0),
                    transactions: v["transactions"].as_u64().unwrap_or(0),
                    changes: v["changes"].as_u64().unwrap_or(0),
                    first: v["first_commit"].as_str().and_then(parse_time),
                    last: v["last_commit"].as_str().and_then(parse_time),
                    seconds: v["seconds"].as_f64().unwrap_or(f64::NAN),
                }),
                _ => {}
            }
        }
        log
    }

    /// SIGTERM; the exit status and how long the clean stop took.
    pub(crate) fn stop(mut self) -> (ExitStatus, f64) {
        let mut child = self.child.take().expect("running");
        let clock = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status, clock.elapsed().as_secs_f64());
            }
            if clock.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                let status = child.wait().unwrap();
                eprintln!("   the daemon did not stop within 120 s of SIGTERM: killed");
                return (status, clock.elapsed().as_secs_f64());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
