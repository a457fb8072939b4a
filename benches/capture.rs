//! Change-capture and point-in-time-restore benchmark (issue 3): the real daemon on a real
//! replication slot under a pgbench multi-tenant write load, restores from the captured stream,
//! and pgBackRest as the baseline of a one-tenant point-in-time restore.
//!
//! ```sh
//! cargo bench --bench capture            # the defaults of `--help`, about 4–5 minutes
//! cargo bench --bench capture -- --smoke   # tiny sizes, about 2 minutes
//! ```
//!
//! It starts a private PostgreSQL 15 (the tests' support crate, tests/support: `wal_level=logical`,
//! `fsync=off`, `logical_decoding_work_mem=64kB`), loads the reference fixture
//! (`tests/fixtures/updog_{schema,data}.sql`), applies the REPLICA IDENTITY fixes `check`
//! asks for, and uses the release binary as a user would (keygen, config, `init`, `daemon`,
//! `list`, `restore`). Measured, each against the issue's target:
//!
//! - (a) sustained capture: pgbench (`-M prepared`, `--clients` clients, `--duration` s) runs a
//!   script where each transaction picks a tenant (zipfian over the fixture's tenants: tenant 1
//!   is the busiest, like the fixture's sizes) and one of its investments, inserts `--events`
//!   rows into `audit.events`, inserts 2 `app.investment_lots`, updates one and deletes one
//!   (`--events` + 4 row changes). Row changes generated = growth of `n_tup_ins + n_tup_upd +
//!   n_tup_del` of the app/audit tables; captured = the sum of `changes` of the daemon's
//!   "pack stored" log lines. Kept up = covered-until reaches the end of the load within
//!   flush_interval + 5 s. Commit-to-durable lag per pack = the "pack stored" log time minus the
//!   pack's first commit (its worst transaction); p50/p99/max over the packs. Then a backlog:
//!   the daemon stopped, `--backlog` s of the same load, the daemon started again; its drain
//!   rate is the capture capacity when the load generator is not the limit.
//! - (b) replay rate: `restore --org <tenant 1> --latest --json`, changes / `changes.seconds`.
//! - (c) peak RSS (`VmHWM`) of a freshly started daemon while it captures ONE transaction of
//!   `--big-rows` rows (`INSERT INTO audit.events SELECT … FROM generate_series`), read once
//!   covered-until passes its commit; and its RSS at idle. (b) also restores that tenant once.
//! - (d) a second cluster with `archive_mode=on` and pgBackRest (`archive-push`, zstd-3,
//!   aes-256-cbc repository, `process-max=2`): our `init` and a pgBackRest full backup taken
//!   back to back, then "one hour of load" compressed (`--hour-changes` row changes of the same
//!   pgbench script as fast as the machine goes), T = its end. Then, interleaved `--runs` times:
//!   ours `restore --org <median tenant by rows> --at T` against pgBackRest `restore
//!   --type=time --target=T` into a new data directory, start on another port, wait for the
//!   promotion, and the tenant's rows copied (`COPY (SELECT … WHERE <tenant filter>)` per
//!   table, schema by pg_dump) into a fresh database on the first cluster. Both results are
//!   compared with the source table by table (row count + md5).
//!
//! Tables on stdout, progress on stderr. Needs `pgbench` (postgresql-client), GNU `time` and
//! `pgbackrest` (`apt-get install -y pgbackrest time`). Loopback only; the clusters, daemons and
//! temporary directories are removed when this process exits.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;

use updog_backup_test_support::bench::{
    Machine, dir_bytes, loadavg, mib, proc_cpu_seconds, sh, verdict,
};
use updog_backup_test_support::fixture::TENANT_FILTERS;
use updog_backup_test_support::oracle::digest;
use updog_backup_test_support::postgres;

/// The binary cargo built for this bench (bench profile = release settings).
const BIN: &str = env!("CARGO_BIN_EXE_updog-backup");
/// Targets from issue 3.
const CAPTURE_TARGET: f64 = 20_000.0;
const REPLAY_TARGET: f64 = 50_000.0;
const RSS_TARGET_KIB: u64 = 256 * 1024;
/// p99 of the commit-to-durable lag: at most flush_interval + this.
const LAG_MARGIN: f64 = 1.0;
/// Kept up: covered-until reaches the end of the load within flush_interval + this.
const KEEP_UP_MARGIN: f64 = 5.0;
/// The daemon's default `stream.flush_interval`.
const DEFAULT_FLUSH_INTERVAL: f64 = 5.0;
/// No wait for the daemon or a restore may take longer (keeps the bench bounded).
const TIMEOUT: Duration = Duration::from_secs(900);
const SLOT: &str = "updog_backup";
const STANZA: &str = "bench";

/// Lookup tables for the load script, outside the backed-up schemas (the daemon skips them):
/// the investments of fixture tenant k numbered 0..c.
const LOAD_SETUP: &str = "
    CREATE SCHEMA bench;
    CREATE TABLE bench.inv AS
      SELECT o.k, (row_number() OVER (PARTITION BY o.k ORDER BY i.id) - 1)::int AS n, i.id AS investment_id
        FROM (SELECT k, md5('org-' || k)::uuid AS org FROM generate_series(1, :tenants) k) o
        JOIN app.funds f ON f.organization_id = o.org
        JOIN app.investments i ON i.fund_id = f.id;
    ALTER TABLE bench.inv ADD PRIMARY KEY (k, n);
    CREATE TABLE bench.inv_count AS SELECT k, count(*)::int AS c FROM bench.inv GROUP BY k;
    ALTER TABLE bench.inv_count ADD PRIMARY KEY (k);
    CREATE TABLE bench.marker (id serial PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp());
    ANALYZE bench.inv, bench.inv_count;";

/// One transaction of the load: a tenant (zipfian), one of its investments, `:events` audit
/// events, 2 lots inserted, 1 updated, 1 deleted. Works in both pgbench query modes.
const LOAD_SCRIPT: &str = r"\set k random_zipfian(1, :tenants, :skew)
\set r random(0, 2000000000)
BEGIN;
SELECT i.investment_id AS inv FROM bench.inv i JOIN bench.inv_count c ON c.k = i.k WHERE i.k = :k AND i.n = :r % c.c \gset
INSERT INTO audit.events (organization_id, action, entity, entity_id, details) SELECT md5('org-' || :k)::uuid, 'update', 'investment_lot', 'lot-' || :inv, jsonb_build_object('n', g) FROM generate_series(1, :events) g;
INSERT INTO app.investment_lots (investment_id, shares, price_per_share_cents, acquired_on) VALUES (:inv, 100.5, 2500, current_date), (:inv, 200.25, 2600, current_date);
UPDATE app.investment_lots SET shares = shares + 1, price_per_share_cents = price_per_share_cents + 1 WHERE id = (SELECT id FROM app.investment_lots WHERE investment_id = :inv ORDER BY id LIMIT 1 OFFSET 1);
DELETE FROM app.investment_lots WHERE id = (SELECT min(id) FROM app.investment_lots WHERE investment_id = :inv);
COMMIT;
";

#[derive(Clone, Copy)]
struct Parts {
    a: bool,
    b: bool,
    c: bool,
    d: bool,
}

struct Args {
    tenants: u32,
    scale: String,
    clients: u32,
    duration: u64,
    backlog: u64,
    events: u32,
    skew: f64,
    big_rows: u64,
    hour_changes: u64,
    runs: usize,
    /// `stream.flush_interval` in seconds; `None`: the daemon's default (5 s), not overridden.
    flush_interval: Option<f64>,
    parts: Parts,
    smoke: bool,
}

impl Args {
    fn flush(&self) -> f64 {
        self.flush_interval.unwrap_or(DEFAULT_FLUSH_INTERVAL)
    }

    fn command_line(&self) -> String {
        let mut s = format!(
            "cargo bench --bench capture -- --tenants {} --scale {} --clients {} --duration {} --backlog {} \
             --events {} --skew {} --big-rows {} --hour-changes {} --runs {}",
            self.tenants,
            self.scale,
            self.clients,
            self.duration,
            self.backlog,
            self.events,
            self.skew,
            self.big_rows,
            self.hour_changes,
            self.runs
        );
        if let Some(f) = self.flush_interval {
            write!(s, " --flush-interval {f}").unwrap();
        }
        let p = self.parts;
        if !(p.a && p.b && p.c && p.d) {
            let names: Vec<&str> = [(p.a, "a"), (p.b, "b"), (p.c, "c"), (p.d, "d")]
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, n)| *n)
                .collect();
            write!(s, " --parts {}", names.join(",")).unwrap();
        }
        s
    }
}

fn parse_args() -> Args {
    let mut args = Args {
        tenants: 100,
        scale: "1".into(),
        clients: 8,
        duration: 60,
        backlog: 30,
        events: 6,
        skew: 1.1,
        big_rows: 1_000_000,
        hour_changes: 360_000,
        runs: 3,
        flush_interval: None,
        parts: Parts {
            a: true,
            b: true,
            c: true,
            d: true,
        },
        smoke: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .unwrap_or_else(|| usage(&format!("{name} needs a value")))
        };
        fn positive<T: std::str::FromStr + PartialOrd + Default>(v: String, what: &str) -> T {
            v.parse()
                .ok()
                .filter(|n: &T| *n > T::default())
                .unwrap_or_else(|| usage(&format!("{what}: a positive number")))
        }
        match name.as_str() {
            // cargo bench passes --bench to every bench target.
            "--bench" => {}
            "--smoke" => {
                args.smoke = true;
                args.tenants = 12;
                args.scale = "0.2".into();
                args.clients = 4;
                args.duration = 10;
                args.backlog = 5;
                args.big_rows = 100_000;
                args.hour_changes = 20_000;
                args.runs = 1;
            }
            "--tenants" => args.tenants = positive(value(), "--tenants"),
            "--scale" => {
                let v = value();
                let _: f64 = positive(v.clone(), "--scale");
                args.scale = v;
            }
            "--clients" => args.clients = positive(value(), "--clients"),
            "--duration" => args.duration = positive(value(), "--duration"),
            "--backlog" => {
                args.backlog = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--backlog: seconds, 0 to skip"))
            }
            "--events" => args.events = positive(value(), "--events"),
            "--skew" => {
                args.skew = value()
                    .parse()
                    .ok()
                    .filter(|s: &f64| (1.001..=1000.0).contains(s))
                    .unwrap_or_else(|| {
                        usage("--skew: pgbench's random_zipfian parameter, 1.001..1000")
                    })
            }
            "--big-rows" => args.big_rows = positive(value(), "--big-rows"),
            "--hour-changes" => args.hour_changes = positive(value(), "--hour-changes"),
            "--runs" => args.runs = positive(value(), "--runs"),
            "--flush-interval" => args.flush_interval = Some(positive(value(), "--flush-interval")),
            "--parts" => {
                let v = value();
                let has = |p: &str| v.split(',').any(|x| x.trim() == p);
                if v.split(',')
                    .any(|x| !["a", "b", "c", "d"].contains(&x.trim()))
                {
                    usage("--parts: a comma-separated subset of a,b,c,d");
                }
                args.parts = Parts {
                    a: has("a") || has("b") || has("c"),
                    b: has("b"),
                    c: has("c"),
                    d: has("d"),
                };
            }
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    args
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("error: {problem}");
    }
    eprintln!(
        "usage: cargo bench --bench capture -- [--smoke] [--tenants 100] [--scale 1] [--clients 8] \
         [--duration 60] [--backlog 30] [--events 6] [--skew 1.1] [--big-rows 1000000] \
         [--hour-changes 360000] [--runs 3] [--flush-interval SECONDS] [--parts a,b,c,d]\n\
         (b and c run with a: they use its cluster and load)"
    );
    std::process::exit(if problem.is_empty() { 0 } else { 2 });
}

fn main() {
    let args = parse_args();
    preflight(&args);
    let started = Instant::now();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let work = tempfile::Builder::new()
        .prefix("updog-capture-bench-")
        .tempdir()
        .expect("temporary directory");
    // pgBackRest runs as the clusters' owner and needs to reach its directory inside.
    fs::set_permissions(work.path(), fs::Permissions::from_mode(0o711)).unwrap();
    let pg = rt.block_on(postgres::cluster());
    let machine = Machine::probe(&rt, pg);
    eprintln!(
        "{}",
        machine.describe(
            "private clusters, fsync=off, loopback TCP",
            &pgbackrest_version()
        )
    );
    eprintln!("binary: {BIN}");
    let bench = Bench {
        rt: &rt,
        args: &args,
        work: work.path(),
    };
    let loadavg_before = loadavg();
    let capture = (args.parts.a || args.parts.b || args.parts.c).then(|| bench.capture(pg));
    let pitr = args.parts.d.then(|| bench.pitr());
    let report = report(
        &machine,
        &args,
        capture.as_ref(),
        pitr.as_ref(),
        (&loadavg_before, &loadavg()),
        started.elapsed(),
    );
    println!("{report}");
}

/// Fails early, with the fix, when a tool is missing.
fn preflight(args: &Args) {
    let found = |program: &str, arg: &str| {
        Command::new(program)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !found("pgbench", "--version") {
        eprintln!("error: `pgbench` not found: apt-get install -y postgresql-client-15");
        std::process::exit(2);
    }
    if !Command::new("/usr/bin/time")
        .args(["-f", "%M", "true"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        eprintln!("error: GNU time not found at /usr/bin/time: apt-get install -y time");
        std::process::exit(2);
    }
    if args.parts.d && !found("pgbackrest", "version") {
        eprintln!(
            "error: `pgbackrest` not found; (d) compares with it: apt-get install -y pgbackrest \
             (or leave (d) out: --parts a,b,c)"
        );
        std::process::exit(2);
    }
}

/// `; pgBackRest 2.45`, or that it is missing, for the machine line.
fn pgbackrest_version() -> String {
    match sh("pgbackrest version 2>/dev/null") {
        v if v.is_empty() => "; pgBackRest not installed".into(),
        v => format!("; {v}"),
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `program` as the clusters' owner (`postgres` when we are root, as the support code does).
fn as_owner(program: impl AsRef<std::ffi::OsStr>) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Runs to completion; panics with the output on failure; returns stdout.
fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A shell that ends with the first failing command of a pipeline.
fn bash(script: &str, what: &str) -> String {
    run(
        Command::new("bash").args(["-c", &format!("set -euo pipefail\n{script}")]),
        what,
    )
}

/// Stops `pid` (SIGTERM) if this process disappears first: daemons and restored clusters never
/// outlive the bench, however it ends.
fn watchdog(pid: u32, signal: &str, then: &str) {
    let me = std::process::id();
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do kill -0 {pid} 2>/dev/null || exit 0; sleep 1; done; \
         kill -{signal} {pid} 2>/dev/null; {then}"
    );
    // Never waited for on purpose: it must outlive this process (init reaps it).
    #[allow(clippy::zombie_processes)]
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("watchdog");
}

fn secs(d: chrono::TimeDelta) -> f64 {
    d.num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    let t = text.trim();
    let t = t
        .strip_prefix("Some(")
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or(t);
    DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// "median (min–max)" or the one value.
fn spread(values: &[f64], digits: usize, unit: &str) -> String {
    let m = median(values);
    if values.len() < 2 {
        return format!("{m:.digits$} {unit}");
    }
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{m:.digits$} {unit} ({min:.digits$}–{max:.digits$})")
}

/// CPU seconds (user + system) of a process so far.
fn proc_cpu(pid: u32) -> f64 {
    proc_cpu_seconds(pid, false)
}

/// A `/proc/<pid>/status` field in KiB (VmRSS, VmHWM).
fn proc_kib(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)
                .and_then(|r| r.strip_prefix(':'))
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// One command under GNU time (wall, CPU with children, peak RSS).
struct Timed {
    wall: f64,
    cpu: f64,
    rss_kib: u64,
    stdout: String,
}

fn timed(dir: &Path, cmd: &mut Command, what: &str) -> Timed {
    let time_path = dir.join("cmd.time");
    let _ = fs::remove_file(&time_path);
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let envs: Vec<_> = cmd
        .get_envs()
        .map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned())))
        .collect();
    let mut wrapped = Command::new("/usr/bin/time");
    wrapped
        .args(["-f", "%M %U %S", "-o"])
        .arg(&time_path)
        .arg(program)
        .args(args);
    for (k, v) in envs {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    let clock = Instant::now();
    let out = wrapped
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let wall = clock.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let time = fs::read_to_string(&time_path).unwrap_or_default();
    let f: Vec<f64> = time
        .lines()
        .last()
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    assert_eq!(f.len(), 3, "GNU time's output: {time:?}");
    Timed {
        wall,
        cpu: f[1] + f[2],
        rss_kib: f[0] as u64,
        stdout,
    }
}

// ---------------------------------------------------------------------------------------------
// The database, the binary's environment, the daemon

/// A source database: the fixture, the REPLICA IDENTITY fixes, the load's lookup tables.
async fn source_db(pg: &postgres::Cluster, hint: &str, args: &Args) -> String {
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
struct Env {
    dir: PathBuf,
    config: PathBuf,
    repo: PathBuf,
    envs: Vec<(String, String)>,
}

impl Env {
    fn new(pg: &postgres::Cluster, base: &Path, label: &str, db: &str, args: &Args) -> Self {
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
            format!(
                r#"[source]
url = "{source}"
schemas = ["app", "audit"]
global_tables = ["app.currencies"]
slot = "{SLOT}"

[storage]
url = "file://{repo}"

[encryption]
recipients = ["{recipient}"]
identity_file = "{identity}"

[restore]
target_url = "{target}"
"#,
                source = pg.url("updog_backup", db),
                target = pg.url("updog_restore", "postgres"),
                repo = repo.display(),
                identity = identity.display(),
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
            &["-c", "CREATE PUBLICATION updog_backup FOR ALL TABLES"],
        );
        Env {
            dir,
            config,
            repo,
            envs,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
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

    fn ok(&self, args: &[&str]) -> String {
        run(&mut self.command(args), &format!("updog-backup {args:?}"))
    }

    /// Covered-until from `changes/progress.json` (FORMAT.md): what `list` shows, without
    /// starting a process per poll.
    fn covered_until(&self) -> Option<DateTime<Utc>> {
        let text = fs::read_to_string(self.repo.join("changes/progress.json")).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        v["covered_until"].as_str().and_then(parse_time)
    }

    /// Covered-until as `list --json` reports it.
    fn list_covered(&self) -> Option<DateTime<Utc>> {
        let out = self.ok(&["list", "--json"]);
        let v: Value = serde_json::from_str(&out).ok()?;
        v["stream"]["covered_until"].as_str().and_then(parse_time)
    }

    /// Waits until the repository covers `t`; the seconds waited, `None` past `limit`.
    fn wait_covered(&self, t: DateTime<Utc>, daemon: &mut Daemon, limit: Duration) -> Option<f64> {
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
    fn first_manifest(&self) -> Value {
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
    fn change_bytes(&self) -> u64 {
        dir_bytes(&self.repo.join("changes"))
    }
}

/// `updog-backup daemon`, its JSON log lines in a file.
struct Daemon {
    child: Option<Child>,
    pid: u32,
    log: PathBuf,
    spawned_at: DateTime<Utc>,
}

/// A "pack stored" log line.
#[derive(Clone, Debug)]
struct PackLine {
    at: DateTime<Utc>,
    bytes: u64,
    transactions: u64,
    changes: u64,
    first: Option<DateTime<Utc>>,
    last: Option<DateTime<Utc>>,
    seconds: f64,
}

#[derive(Default)]
struct DaemonLog {
    packs: Vec<PackLine>,
    capture_started: Option<DateTime<Utc>>,
    /// WARN and ERROR lines, as logged.
    problems: Vec<String>,
}

impl Daemon {
    fn start(env: &Env, name: &str) -> Daemon {
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

    fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
            panic!("the daemon exited ({status}):\n{}", self.output());
        }
    }

    fn kib(&self, field: &str) -> u64 {
        proc_kib(self.pid, field)
    }

    fn cpu(&self) -> f64 {
        proc_cpu(self.pid)
    }

    fn parse_log(&self) -> DaemonLog {
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
    fn stop(mut self) -> (ExitStatus, f64) {
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

// ---------------------------------------------------------------------------------------------
// The load

struct Bench<'a> {
    rt: &'a tokio::runtime::Runtime,
    args: &'a Args,
    work: &'a Path,
}

/// What one pgbench run did.
#[derive(Clone, Default)]
struct Load {
    wall: f64,
    transactions: u64,
    failed: u64,
    tps: f64,
    /// Row changes of the app/audit tables (statistics), and their WAL.
    changes: i64,
    wal_bytes: i64,
    end: Option<DateTime<Utc>>,
    /// The WAL insert position right after the load.
    end_lsn: String,
}

/// Samples taken once a second during a load.
#[derive(Default)]
struct Samples {
    /// now − covered-until.
    max_covered_lag: f64,
    /// WAL between the server's position and the slot's confirmed position.
    max_slot_lag_bytes: i64,
    max_rss_kib: u64,
}

enum Amount {
    Seconds(u64),
    /// Transactions per client.
    Transactions(u64),
}

struct Source<'a> {
    pg: &'a postgres::Cluster,
    db: String,
    client: tokio_postgres::Client,
}

impl Source<'_> {
    fn now(&self, rt: &tokio::runtime::Runtime) -> DateTime<Utc> {
        rt.block_on(self.client.query_one("SELECT clock_timestamp()", &[]))
            .unwrap()
            .get(0)
    }

    fn row_changes(&self, rt: &tokio::runtime::Runtime) -> i64 {
        rt.block_on(self.client.query_one(
            "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::bigint
               FROM pg_stat_user_tables WHERE schemaname IN ('app', 'audit')",
            &[],
        ))
        .unwrap()
        .get(0)
    }

    fn wal_lsn(&self, rt: &tokio::runtime::Runtime) -> String {
        rt.block_on(
            self.client
                .query_one("SELECT pg_current_wal_lsn()::text", &[]),
        )
        .unwrap()
        .get(0)
    }

    fn wal_since(&self, rt: &tokio::runtime::Runtime, lsn: &str) -> i64 {
        rt.block_on(self.client.query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::bigint",
            &[&lsn],
        ))
        .unwrap()
        .get(0)
    }

    fn slot_lag(&self, rt: &tokio::runtime::Runtime) -> i64 {
        rt.block_on(self.client.query_opt(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&SLOT],
        ))
        .ok()
        .flatten()
        .and_then(|r| r.get::<_, Option<i64>>(0))
        .unwrap_or(0)
    }

    /// Whether the walsender `pid` has decoded and sent everything before `lsn`.
    fn sent_past(&self, rt: &tokio::runtime::Runtime, pid: u32, lsn: &str) -> bool {
        rt.block_on(self.client.query_opt(
            "SELECT sent_lsn >= $1::text::pg_lsn FROM pg_stat_replication WHERE pid = $2",
            &[&lsn, &(pid as i32)],
        ))
        .ok()
        .flatten()
        .and_then(|r| r.get::<_, Option<bool>>(0))
        .unwrap_or(false)
    }

    /// The walsender serving the slot, if active.
    fn walsender(&self, rt: &tokio::runtime::Runtime) -> Option<u32> {
        rt.block_on(self.client.query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&SLOT],
        ))
        .ok()
        .flatten()
        .and_then(|r| r.get::<_, Option<i32>>(0))
        .map(|p| p as u32)
    }

    fn tenant(&self, rt: &tokio::runtime::Runtime, k: u32) -> String {
        rt.block_on(
            self.client
                .query_one("SELECT md5('org-' || $1::int)::uuid::text", &[&(k as i32)]),
        )
        .unwrap()
        .get(0)
    }

    fn psql(&self, sql: &str) {
        self.pg.psql(&self.db, &["-c", sql]);
    }
}

impl Bench<'_> {
    fn source<'p>(&self, pg: &'p postgres::Cluster, db: &str) -> Source<'p> {
        Source {
            pg,
            db: db.to_string(),
            client: self.rt.block_on(pg.client(db)),
        }
    }

    /// Runs the load script with pgbench; `sample` runs about once a second meanwhile.
    fn load(&self, src: &Source, amount: Amount, mut sample: impl FnMut()) -> Load {
        let a = self.args;
        let script = self.work.join("load.sql");
        fs::write(&script, LOAD_SCRIPT).unwrap();
        let out = self.work.join("pgbench.out");
        let err = self.work.join("pgbench.err");
        let pgbench = if src.pg.bin.join("pgbench").exists() {
            src.pg.bin.join("pgbench")
        } else {
            PathBuf::from("pgbench")
        };
        let mut cmd = Command::new(pgbench);
        cmd.args(["-n", "-M", "prepared", "-h", "127.0.0.1", "-U", "postgres"])
            .args(["-p", &src.pg.port.to_string()])
            .args(["-c", &a.clients.to_string(), "-j", "2"])
            .args(["--max-tries", "10"])
            .args(["-D", &format!("tenants={}", a.tenants)])
            .args(["-D", &format!("skew={}", a.skew)])
            .args(["-D", &format!("events={}", a.events)])
            .arg("-f")
            .arg(&script);
        match amount {
            Amount::Seconds(s) => cmd.args(["-T", &s.to_string()]),
            Amount::Transactions(t) => cmd.args(["-t", &t.to_string()]),
        };
        cmd.arg(&src.db)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap());
        let changes_before = src.row_changes(self.rt);
        let lsn_before = src.wal_lsn(self.rt);
        let clock = Instant::now();
        let mut child = cmd.spawn().expect("starting pgbench");
        let mut next_sample = Instant::now() + Duration::from_secs(1);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= next_sample {
                sample();
                next_sample += Duration::from_secs(1);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let wall = clock.elapsed().as_secs_f64();
        let end = src.now(self.rt);
        let end_lsn = src.wal_lsn(self.rt);
        let stdout = fs::read_to_string(&out).unwrap_or_default();
        let stderr = fs::read_to_string(&err).unwrap_or_default();
        assert!(
            status.success(),
            "pgbench failed ({status}):\n{stdout}\n{stderr}"
        );
        let field = |prefix: &str| -> f64 {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(prefix))
                // "12345", or "12345/12345" with -t.
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.split('/').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0.0)
        };
        // The backends flush their statistics when they exit, after pgbench.
        std::thread::sleep(Duration::from_millis(1500));
        Load {
            wall,
            transactions: field("number of transactions actually processed:") as u64,
            failed: field("number of failed transactions:") as u64,
            tps: field("tps = "),
            changes: src.row_changes(self.rt) - changes_before,
            wal_bytes: src.wal_since(self.rt, &lsn_before),
            end: Some(end),
            end_lsn,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (a), (b), (c): the shared cluster

struct CaptureResult {
    db_rows: i64,
    init_seconds: f64,
    // (a) live
    idle_rss_start_kib: u64,
    live: Load,
    live_samples: Samples,
    live_packs: Vec<PackLine>,
    live_catch_up: Option<f64>,
    live_daemon_cpu: f64,
    live_walsender_cpu: f64,
    live_hwm_kib: u64,
    change_bytes_live: u64,
    // (a) backlog
    backlog: Option<Backlog>,
    // (c)
    big: Option<Big>,
    // (b)
    replays: Vec<ReplayResult>,
    problems: Vec<String>,
    stops: Vec<(String, ExitStatus, f64)>,
    busy_changes_share: f64,
}

struct Backlog {
    load: Load,
    packs: Vec<PackLine>,
    /// Daemon start (its "capture started" line) to the last pack with the backlog.
    drain_seconds: f64,
    /// Daemon start to the walsender having sent everything of the backlog (decoded, and
    /// taken by the daemon but for what the socket buffers hold).
    decoded_seconds: Option<f64>,
    startup_seconds: f64,
    /// Daemon start ("capture started") to covered-until past the end of the backlog.
    covered_after: Option<f64>,
    daemon_cpu: f64,
    walsender_cpu: f64,
    hwm_kib: u64,
}

struct Big {
    tenant: String,
    rows: u64,
    insert_seconds: f64,
    idle_rss_kib: u64,
    idle_hwm_kib: u64,
    hwm_kib: u64,
    rss_after_kib: u64,
    /// Commit to covered-until past it.
    capture_seconds: Option<f64>,
    packs: Vec<PackLine>,
    daemon_cpu: f64,
    wal_bytes: i64,
}

struct ReplayResult {
    label: String,
    tenant: String,
    runs: Vec<ReplayRun>,
}

struct ReplayRun {
    changes: u64,
    transactions: u64,
    packs: u64,
    replay_seconds: f64,
    total: Timed,
    rows: u64,
}

impl ReplayRun {
    fn rate(&self) -> f64 {
        self.changes as f64 / self.replay_seconds
    }
}

/// Parses `restore --json`.
fn replay_run(t: Timed) -> ReplayRun {
    let v: Value = serde_json::from_str(&t.stdout)
        .unwrap_or_else(|e| panic!("restore --json printed no JSON ({e}): {}", t.stdout));
    let c = &v["changes"];
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    ReplayRun {
        changes: n("inserts") + n("updates") + n("deletes") + n("truncates"),
        transactions: n("transactions"),
        packs: n("packs"),
        replay_seconds: c["seconds"].as_f64().unwrap_or(f64::NAN),
        rows: v["tenant_rows"]
            .as_object()
            .map(|m| m.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0),
        total: t,
    }
}

impl Bench<'_> {
    fn capture(&self, pg: &'static postgres::Cluster) -> CaptureResult {
        let a = self.args;
        eprintln!(
            "\n== (a)–(c): fixture {} tenants, scale {}…",
            a.tenants, a.scale
        );
        let db = self.rt.block_on(source_db(pg, "capture", a));
        let src = self.source(pg, &db);
        let db_rows: i64 = self
            .rt
            .block_on(src.client.query_one(
                "SELECT sum(n_live_tup)::bigint FROM pg_stat_user_tables WHERE schemaname IN ('app', 'audit')",
                &[],
            ))
            .unwrap()
            .get(0);
        let env = Env::new(pg, self.work, "capture", &db, a);
        let clock = Instant::now();
        env.ok(&["init"]);
        let init_seconds = clock.elapsed().as_secs_f64();
        let mut problems = Vec::new();
        let mut stops = Vec::new();

        // (a) live.
        let mut daemon = Daemon::start(&env, "live");
        let t0 = src.now(self.rt);
        env.wait_covered(t0, &mut daemon, Duration::from_secs(120))
            .expect("the daemon covers the idle source within 2 minutes");
        std::thread::sleep(Duration::from_secs(2));
        let idle_rss_start_kib = daemon.kib("VmRSS");
        let walsender = src.walsender(self.rt).expect("the daemon's walsender");
        let (cpu0, ws0) = (daemon.cpu(), proc_cpu(walsender));
        eprintln!("   (a) {} clients, {} s of pgbench…", a.clients, a.duration);
        let started_at = Utc::now();
        let mut samples = Samples::default();
        let live = self.load(&src, Amount::Seconds(a.duration), || {
            if let Some(c) = env.covered_until() {
                samples.max_covered_lag = samples.max_covered_lag.max(secs(Utc::now() - c));
            }
            samples.max_slot_lag_bytes = samples.max_slot_lag_bytes.max(src.slot_lag(self.rt));
            samples.max_rss_kib = samples.max_rss_kib.max(daemon.kib("VmRSS"));
        });
        let end = live.end.unwrap();
        // Measured from the end of the load: `load` already waited 1.5 s for the statistics.
        let waited = env.wait_covered(end, &mut daemon, Duration::from_secs(600));
        let live_catch_up = waited.map(|_| secs(Utc::now() - end));
        let live_daemon_cpu = daemon.cpu() - cpu0;
        let live_walsender_cpu = proc_cpu(walsender) - ws0;
        let live_hwm_kib = daemon.kib("VmHWM");
        let log = daemon.parse_log();
        let live_packs: Vec<PackLine> = log
            .packs
            .iter()
            .filter(|p| p.at >= started_at)
            .cloned()
            .collect();
        let change_bytes_live = env.change_bytes();
        eprintln!(
            "   (a) generated {} row changes ({:.0}/s), captured {} in {} packs; covered {} after the load",
            live.changes,
            live.changes as f64 / live.wall,
            live_packs.iter().map(|p| p.changes).sum::<u64>(),
            live_packs.len(),
            live_catch_up.map_or("never".into(), |s| format!("{s:.1} s")),
        );
        problems.extend(log.problems);
        let (status, took) = daemon.stop();
        stops.push(("after (a)".to_string(), status, took));

        // (a) backlog: load while the daemon is down, then its drain.
        let backlog = (a.backlog > 0).then(|| {
            eprintln!(
                "   (a) backlog: {} s of pgbench with the daemon stopped…",
                a.backlog
            );
            let load = self.load(&src, Amount::Seconds(a.backlog), || {});
            let end = load.end.unwrap();
            let mut daemon = Daemon::start(&env, "backlog");
            let spawned = daemon.spawned_at;
            let mut walsender = None;
            let clock = Instant::now();
            while walsender.is_none() && clock.elapsed() < Duration::from_secs(30) {
                walsender = src.walsender(self.rt);
                std::thread::sleep(Duration::from_millis(20));
            }
            let (cpu0, ws0) = (daemon.cpu(), walsender.map(proc_cpu).unwrap_or(0.0));
            let mut decoded_at = None;
            if let Some(pid) = walsender {
                while clock.elapsed() < TIMEOUT {
                    if src.sent_past(self.rt, pid, &load.end_lsn) {
                        decoded_at = Some(Utc::now());
                        break;
                    }
                    daemon.assert_running();
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let covered_at = env
                .wait_covered(end, &mut daemon, Duration::from_secs(600))
                .map(|_| Utc::now());
            let daemon_cpu = daemon.cpu() - cpu0;
            let walsender_cpu = walsender.map(proc_cpu).unwrap_or(0.0) - ws0;
            let hwm_kib = daemon.kib("VmHWM");
            let log = daemon.parse_log();
            let started = log.capture_started.unwrap_or(spawned);
            let last = log.packs.last().map_or(started, |p| p.at);
            problems.extend(log.problems.clone());
            let (status, took) = daemon.stop();
            stops.push(("after the backlog".to_string(), status, took));
            eprintln!(
                "   (a) backlog of {} row changes drained in {:.1} s",
                load.changes,
                secs(last - started)
            );
            Backlog {
                load,
                drain_seconds: secs(last - started),
                decoded_seconds: decoded_at.map(|d| secs(d - started)),
                startup_seconds: secs(started - spawned),
                packs: log.packs,
                covered_after: covered_at.map(|c| secs(c - started)),
                daemon_cpu,
                walsender_cpu,
                hwm_kib,
            }
        });

        // (c) one large transaction, a fresh daemon.
        let big = a.parts.c.then(|| {
            let k = a.tenants;
            let tenant = src.tenant(self.rt, k);
            let mut daemon = Daemon::start(&env, "big");
            let t0 = src.now(self.rt);
            env.wait_covered(t0, &mut daemon, Duration::from_secs(120))
                .expect("the daemon covers the idle source");
            std::thread::sleep(Duration::from_secs(2));
            let (idle_rss_kib, idle_hwm_kib) = (daemon.kib("VmRSS"), daemon.kib("VmHWM"));
            let cpu0 = daemon.cpu();
            eprintln!(
                "   (c) one transaction of {} rows for tenant {k} ({tenant})…",
                a.big_rows
            );
            let lsn = src.wal_lsn(self.rt);
            let started_at = Utc::now();
            let clock = Instant::now();
            src.psql(&format!(
                "INSERT INTO audit.events (organization_id, actor_id, action, entity, entity_id, details)
                 SELECT '{tenant}', md5('user-{k}-1')::uuid, 'import', 'row', g::text,
                        jsonb_build_object('line', g, 'batch', 'bench')
                   FROM generate_series(1, {}) g",
                a.big_rows
            ));
            let insert_seconds = clock.elapsed().as_secs_f64();
            let commit = src.now(self.rt);
            let wal_bytes = src.wal_since(self.rt, &lsn);
            let mut max_rss = 0;
            let clock = Instant::now();
            let capture_seconds = loop {
                daemon.assert_running();
                max_rss = max_rss.max(daemon.kib("VmRSS"));
                if env.covered_until().is_some_and(|c| c >= commit) {
                    break Some(secs(Utc::now() - commit));
                }
                if clock.elapsed() > TIMEOUT {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            let hwm_kib = daemon.kib("VmHWM");
            let rss_after_kib = daemon.kib("VmRSS");
            let daemon_cpu = daemon.cpu() - cpu0;
            let log = daemon.parse_log();
            problems.extend(log.problems.clone());
            let (status, took) = daemon.stop();
            stops.push(("after (c)".to_string(), status, took));
            eprintln!(
                "   (c) peak RSS {} (idle {}), covered {} after the commit",
                mib(hwm_kib as f64 * 1024.0),
                mib(idle_rss_kib as f64 * 1024.0),
                capture_seconds.map_or("never".into(), |s| format!("{s:.1} s"))
            );
            Big {
                tenant,
                rows: a.big_rows,
                insert_seconds,
                idle_rss_kib,
                idle_hwm_kib,
                hwm_kib: hwm_kib.max(max_rss),
                rss_after_kib,
                capture_seconds,
                packs: log
                    .packs
                    .into_iter()
                    .filter(|p| p.at >= started_at)
                    .collect(),
                daemon_cpu,
                wal_bytes,
            }
        });

        // (b) restores of the busiest tenant (and of the large transaction's tenant).
        let busy_tenant = src.tenant(self.rt, 1);
        let busy_changes_share = {
            // Tenant k's share of the zipfian choice.
            let h: f64 = (1..=a.tenants).map(|k| (k as f64).powf(-a.skew)).sum();
            1.0 / h
        };
        let mut replays = Vec::new();
        if a.parts.b {
            let mut list = vec![(
                "tenant 1 (the busiest)".to_string(),
                busy_tenant.clone(),
                a.runs,
            )];
            if let Some(b) = &big {
                list.push((
                    format!("tenant {} (the {}-row transaction)", a.tenants, b.rows),
                    b.tenant.clone(),
                    1,
                ));
            }
            for (label, tenant, runs) in list {
                let mut result = ReplayResult {
                    label,
                    tenant: tenant.clone(),
                    runs: Vec::new(),
                };
                for run in 0..runs {
                    eprintln!(
                        "   (b) restore --latest of {} ({}/{runs})…",
                        result.label,
                        run + 1
                    );
                    let target = format!("bench_b_{}_{run}", &tenant[..8]);
                    let t = timed(
                        &env.dir,
                        &mut env.command(&[
                            "restore",
                            "--org",
                            &tenant,
                            "--latest",
                            "--target-db",
                            &target,
                            "--json",
                        ]),
                        "restore --latest",
                    );
                    let r = replay_run(t);
                    eprintln!(
                        "       {} changes replayed in {:.2} s ({:.0}/s); whole restore {:.2} s",
                        r.changes,
                        r.replay_seconds,
                        r.rate(),
                        r.total.wall
                    );
                    result.runs.push(r);
                    pg.psql(
                        "postgres",
                        &["-c", &format!("DROP DATABASE \"{target}\" WITH (FORCE)")],
                    );
                }
                replays.push(result);
            }
        }
        // `list` agrees with the state file the bench polled.
        let listed = env.list_covered();
        assert_eq!(
            listed,
            env.covered_until(),
            "`list --json` and changes/progress.json disagree"
        );
        CaptureResult {
            db_rows,
            init_seconds,
            idle_rss_start_kib,
            live,
            live_samples: samples,
            live_packs,
            live_catch_up,
            live_daemon_cpu,
            live_walsender_cpu,
            live_hwm_kib,
            change_bytes_live,
            backlog,
            big,
            replays,
            problems,
            stops,
            busy_changes_share,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (d): a cluster with WAL archiving to pgBackRest

const PITR_HBA: &str = "local all all trust\nhost all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n";

struct PitrResult {
    tenants: usize,
    median_tenant: String,
    median_k: Option<u32>,
    median_rows: u64,
    db_bytes: i64,
    init_seconds: f64,
    backup_seconds: f64,
    backup_bytes: u64,
    load: Load,
    archive_seconds: f64,
    covered_seconds: Option<f64>,
    target: DateTime<Utc>,
    ours: Vec<ReplayRun>,
    theirs: Vec<PgBackRestRun>,
    /// Tables where ours, pgBackRest's and the source differ (empty: identical).
    differences: Vec<String>,
    tables_compared: usize,
    rows_compared: i64,
    problems: Vec<String>,
}

#[derive(Clone, Copy)]
struct PgBackRestRun {
    restore: f64,
    recovery: f64,
    extract: f64,
    restored_bytes: u64,
}

impl PgBackRestRun {
    fn total(&self) -> f64 {
        self.restore + self.recovery + self.extract
    }
}

/// A pgBackRest configuration for one cluster, in a directory the cluster's owner can write.
struct PgBackRest {
    dir: PathBuf,
    config: PathBuf,
}

impl PgBackRest {
    fn new(base: &Path, pg: &postgres::Cluster) -> Self {
        let dir = base.join("pgbackrest");
        fs::create_dir_all(&dir).unwrap();
        let config = dir.join("pgbackrest.conf");
        let pass: String = (0..32)
            .map(|_| format!("{:02x}", fastrand::u8(..)))
            .collect();
        fs::write(
            &config,
            format!(
                "[global]
repo1-path={dir}/repo
repo1-retention-full=2
repo1-cipher-type=aes-256-cbc
repo1-cipher-pass={pass}
compress-type=zst
compress-level=3
process-max=2
start-fast=y
archive-timeout=300
log-path={dir}/log
lock-path={dir}/lock
spool-path={dir}/spool
log-level-console=warn
log-level-stderr=warn
log-level-file=off

[{STANZA}]
pg1-path={data}
pg1-port={port}
pg1-socket-path={socket}
pg1-user=postgres
",
                dir = dir.display(),
                data = pg.dir.join("data").display(),
                port = pg.port,
                socket = pg.dir.display(),
            ),
        )
        .unwrap();
        if is_root() {
            run(
                Command::new("chown").args(["-R", "postgres:"]).arg(base),
                "chown",
            );
        }
        PgBackRest { dir, config }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = as_owner("pgbackrest");
        c.arg(format!("--config={}", self.config.display()))
            .arg(format!("--stanza={STANZA}"))
            .args(args);
        c
    }

    fn run(&self, args: &[&str]) -> String {
        run(&mut self.command(args), &format!("pgbackrest {args:?}"))
    }

    fn archive_command(&self) -> String {
        format!(
            "pgbackrest --config={} --stanza={STANZA} archive-push %p",
            self.config.display()
        )
    }
}

/// A cluster pgBackRest restored, stopped and deleted on drop.
struct Restored {
    data: PathBuf,
    bin: PathBuf,
}

impl Drop for Restored {
    fn drop(&mut self) {
        let _ = as_owner(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(self.data.parent().unwrap());
    }
}

impl Bench<'_> {
    fn pitr(&self) -> PitrResult {
        let a = self.args;
        eprintln!("\n== (d): a cluster with archive_mode=on and pgBackRest…");
        let pg: &'static postgres::Cluster =
            Box::leak(Box::new(postgres::start_extra(&postgres::ClusterSpec {
                name: "pitr",
                hba: PITR_HBA,
                extra_options: "-c archive_mode=on",
                prepare: &|_| {},
            })));
        let db = self.rt.block_on(source_db(pg, "pitr", a));
        // Only the source database, as in production: the fixture's template goes.
        let templates: Vec<String> = self
            .rt
            .block_on(async {
                pg.client("postgres")
                    .await
                    .query(
                        "SELECT datname FROM pg_database WHERE datname LIKE 'fixture\\_t%'",
                        &[],
                    )
                    .await
                    .unwrap()
            })
            .iter()
            .map(|r| r.get(0))
            .collect();
        for t in templates {
            pg.psql("postgres", &["-c", &format!("DROP DATABASE \"{t}\"")]);
        }
        let src = self.source(pg, &db);
        let db_bytes: i64 = self
            .rt
            .block_on(
                src.client
                    .query_one("SELECT pg_database_size(current_database())", &[]),
            )
            .unwrap()
            .get(0);
        let base = self.work.join("pitr");
        fs::create_dir_all(&base).unwrap();
        let br = PgBackRest::new(&base, pg);
        pg.psql(
            "postgres",
            &[
                "-c",
                &format!(
                    "ALTER SYSTEM SET archive_command = '{}'",
                    br.archive_command()
                ),
                "-c",
                "SELECT pg_reload_conf()",
            ],
        );
        std::thread::sleep(Duration::from_millis(500));
        br.run(&["stanza-create"]);
        br.run(&["check"]);
        let env = Env::new(pg, self.work, "pitr", &db, a);

        // Both backups at the same time, before the load.
        eprintln!("   our init (first snapshot) and a pgBackRest full backup…");
        let clock = Instant::now();
        env.ok(&["init"]);
        let init_seconds = clock.elapsed().as_secs_f64();
        let clock = Instant::now();
        br.run(&["--type=full", "backup"]);
        let backup_seconds = clock.elapsed().as_secs_f64();
        let backup_bytes = dir_bytes(&br.dir.join("repo/backup"));

        // The median tenant by rows, from the snapshot.
        let manifest = env.first_manifest();
        let tenants = manifest["tenants"].as_object().expect("tenants");
        let mut by_rows: Vec<(u64, String)> = tenants
            .iter()
            .map(|(t, e)| {
                let rows = e["rows"]
                    .as_object()
                    .map(|m| m.values().filter_map(Value::as_u64).sum())
                    .unwrap_or(0);
                (rows, t.clone())
            })
            .collect();
        by_rows.sort();
        let (median_rows, median_tenant) = by_rows[by_rows.len() / 2].clone();
        let median_k = (1..=a.tenants).find(|&k| src.tenant(self.rt, k) == median_tenant);

        // "One hour" of load, as fast as the machine goes, with the daemon capturing and the
        // archiver pushing WAL.
        let mut daemon = Daemon::start(&env, "pitr");
        let t0 = src.now(self.rt);
        env.wait_covered(t0, &mut daemon, Duration::from_secs(120))
            .expect("the daemon covers the idle source");
        let per_txn = (a.events + 4) as u64;
        let per_client = a.hour_changes.div_ceil(per_txn).div_ceil(a.clients as u64);
        eprintln!(
            "   \"one hour\" of load: {} row changes ({per_client} transactions × {} clients)…",
            a.hour_changes, a.clients
        );
        let load = self.load(&src, Amount::Transactions(per_client), || {});
        let target = load.end.unwrap();
        // A commit after T, so that recovery knows it reached T; then every WAL segment up to it
        // archived (`check` switches WAL and waits).
        std::thread::sleep(Duration::from_millis(100));
        src.psql("INSERT INTO bench.marker DEFAULT VALUES");
        let clock = Instant::now();
        br.run(&["check"]);
        let archive_seconds = clock.elapsed().as_secs_f64();
        let covered_seconds = env
            .wait_covered(target, &mut daemon, Duration::from_secs(600))
            .map(|_| secs(Utc::now() - target));
        let covered_seconds = covered_seconds.expect("the daemon covers the end of the load");
        let log = daemon.parse_log();
        let (_status, _) = daemon.stop();
        let at = rfc3339(target);
        eprintln!(
            "   T = {at}: {} row changes in {:.1} s, {} of WAL",
            load.changes,
            load.wall,
            mib(load.wal_bytes as f64)
        );

        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        let mut differences = Vec::new();
        let mut tables_compared = 0;
        let mut rows_compared = 0;
        for run_index in 0..a.runs {
            let ours_db = format!("bench_d_ours_{run_index}");
            let theirs_db = format!("bench_d_pgbr_{run_index}");
            let mut order = [false, true];
            if run_index % 2 == 1 {
                order.reverse();
            }
            for is_ours in order {
                if is_ours {
                    eprintln!("   run {}/{}: ours…", run_index + 1, a.runs);
                    let t = timed(
                        &env.dir,
                        &mut env.command(&[
                            "restore",
                            "--org",
                            &median_tenant,
                            "--at",
                            &at,
                            "--target-db",
                            &ours_db,
                            "--json",
                        ]),
                        "restore --at",
                    );
                    let r = replay_run(t);
                    eprintln!("       {:.2} s", r.total.wall);
                    ours.push(r);
                } else {
                    eprintln!("   run {}/{}: pgBackRest…", run_index + 1, a.runs);
                    let r = self.pgbackrest_restore(
                        pg,
                        &br,
                        &db,
                        &median_tenant,
                        target,
                        &theirs_db,
                        run_index,
                    );
                    eprintln!(
                        "       {:.2} s (restore {:.2} s, recovery {:.2} s, extract {:.2} s)",
                        r.total(),
                        r.restore,
                        r.recovery,
                        r.extract
                    );
                    theirs.push(r);
                }
            }
            if run_index == 0 {
                // Ours, pgBackRest's and the source (unchanged since T but for bench.marker)
                // hold the same rows.
                let (diff, rows) = self.rt.block_on(async {
                    let o = pg.client(&ours_db).await;
                    let t = pg.client(&theirs_db).await;
                    let mut diff = Vec::new();
                    let mut rows = 0;
                    for (table, filter) in TENANT_FILTERS {
                        let filter = filter.map(|f| f.replace("$ORG", &median_tenant));
                        let want = digest(&src.client, table, filter.as_deref()).await;
                        let got_ours = digest(&o, table, None).await;
                        let got_theirs = digest(&t, table, None).await;
                        rows += want.0;
                        if got_ours != want || got_theirs != want {
                            diff.push(format!(
                                "{table}: source {} rows, ours {}, pgBackRest {}{}",
                                want.0,
                                got_ours.0,
                                got_theirs.0,
                                if got_ours.0 == want.0 && got_theirs.0 == want.0 {
                                    " (same counts, different contents)"
                                } else {
                                    ""
                                }
                            ));
                        }
                    }
                    (diff, rows)
                });
                differences = diff;
                tables_compared = TENANT_FILTERS.len();
                rows_compared = rows;
            }
            for d in [&ours_db, &theirs_db] {
                pg.psql(
                    "postgres",
                    &[
                        "-c",
                        &format!("DROP DATABASE IF EXISTS \"{d}\" WITH (FORCE)"),
                    ],
                );
            }
        }
        PitrResult {
            tenants: by_rows.len(),
            median_tenant,
            median_k,
            median_rows,
            db_bytes,
            init_seconds,
            backup_seconds,
            backup_bytes,
            load,
            archive_seconds,
            covered_seconds: Some(covered_seconds),
            target,
            ours,
            theirs,
            differences,
            tables_compared,
            rows_compared,
            problems: log.problems,
        }
    }

    /// pgBackRest's point-in-time restore of the whole cluster into a new data directory, the
    /// recovery up to T, then the tenant's rows copied into a fresh database on `pg`.
    #[allow(clippy::too_many_arguments)]
    fn pgbackrest_restore(
        &self,
        pg: &postgres::Cluster,
        br: &PgBackRest,
        db: &str,
        tenant: &str,
        target: DateTime<Utc>,
        fresh: &str,
        run_index: usize,
    ) -> PgBackRestRun {
        let dir = br.dir.join(format!("restore-{run_index}"));
        let data = dir.join("data");
        run(
            as_owner("mkdir").args(["-m", "700", "-p"]).arg(&data),
            "mkdir",
        );
        let port = postgres::free_port();
        let restored = Restored {
            data: data.clone(),
            bin: pg.bin.clone(),
        };
        let pg_target = target.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string();
        let clock = Instant::now();
        br.run(&[
            &format!("--pg1-path={}", data.display()),
            "--type=time",
            &format!("--target={pg_target}"),
            "--target-action=promote",
            "--archive-mode=off",
            "restore",
        ]);
        let restore = clock.elapsed().as_secs_f64();
        let restored_bytes = dir_bytes(&data);

        let clock = Instant::now();
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c wal_level=logical -c max_replication_slots=100 \
             -c max_wal_senders=60 -c max_connections=200 -c track_commit_timestamp=on -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off",
            dir.display()
        );
        run(
            as_owner(pg.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.join("log"))
                .args(["-w", "-t", "900", "-o", &options, "start"]),
            "pg_ctl start (restored cluster)",
        );
        let postmaster = fs::read_to_string(data.join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()));
        if let Some(pid) = postmaster {
            watchdog(pid, "QUIT", "");
        }
        let psql = |port: u16, db: &str| {
            let mut c = Command::new(pg.bin.join("psql"));
            c.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
                .args(["-U", "postgres", "-p", &port.to_string(), "-d", db]);
            c
        };
        loop {
            let out = psql(port, "postgres")
                .args(["-tA", "-c", "SELECT pg_is_in_recovery()"])
                .output()
                .unwrap();
            if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "f" {
                break;
            }
            assert!(
                clock.elapsed() < TIMEOUT,
                "the restored cluster did not finish recovery:\n{}",
                fs::read_to_string(dir.join("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let recovery = clock.elapsed().as_secs_f64();

        // The tenant into a fresh database: schema from the restored cluster, then one
        // filtered COPY per table, then indexes, constraints and policies.
        let p = |port: u16, db: &str| {
            format!(
                "{} -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U postgres -p {port} -d {db}",
                pg.bin.join("psql").display()
            )
        };
        let dump = |section: &str| {
            format!(
                "{} -h 127.0.0.1 -U postgres -p {port} -d {db} -n app -n audit --section={section}",
                pg.bin.join("pg_dump").display()
            )
        };
        let mut script = format!(
            "{} -c 'CREATE DATABASE \"{fresh}\"'\n{} --schema-only | {}\n",
            p(pg.port, "postgres"),
            dump("pre-data"),
            p(pg.port, fresh)
        );
        for (table, filter) in TENANT_FILTERS {
            let filter = filter
                .map(|f| format!(" WHERE {}", f.replace("$ORG", tenant)))
                .unwrap_or_default();
            writeln!(
                script,
                "{} -c \"COPY (SELECT * FROM {table}{filter}) TO STDOUT\" | {} -c \"COPY {table} FROM STDIN\"",
                p(port, db),
                p(pg.port, fresh)
            )
            .unwrap();
        }
        writeln!(
            script,
            "{} --data-only -t 'app.*_seq' | {}\n{} --schema-only | {}",
            dump("data"),
            p(pg.port, fresh),
            dump("post-data"),
            p(pg.port, fresh)
        )
        .unwrap();
        let clock = Instant::now();
        bash(&script, "extracting the tenant from the restored cluster");
        let extract = clock.elapsed().as_secs_f64();
        drop(restored);
        PgBackRestRun {
            restore,
            recovery,
            extract,
            restored_bytes,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Report

fn pack_lags(packs: &[PackLine]) -> Vec<f64> {
    let mut lags: Vec<f64> = packs
        .iter()
        .filter_map(|p| p.first.map(|f| secs(p.at - f)))
        .collect();
    lags.sort_by(f64::total_cmp);
    lags
}

fn report(
    machine: &Machine,
    args: &Args,
    capture: Option<&CaptureResult>,
    pitr: Option<&PitrResult>,
    (load_before, load_after): (&str, &str),
    total: Duration,
) -> String {
    let mut s = String::new();
    let w = &mut s;
    let flush = args.flush();
    writeln!(w, "\n# updog-backup change capture benchmark\n").unwrap();
    writeln!(
        w,
        "{}",
        machine.describe(
            "private clusters, fsync=off, loopback TCP",
            &pgbackrest_version()
        )
    )
    .unwrap();
    writeln!(w, "command: {}", args.command_line()).unwrap();
    writeln!(
        w,
        "load: pgbench -M prepared, {} clients, each transaction = 1 tenant (zipfian s={} over {} \
         tenants) × ({} audit.events inserts + 2 investment_lots inserts + 1 update + 1 delete) = \
         {} row changes; stream.flush_interval {}; ratio = measured / target",
        args.clients,
        args.skew,
        args.tenants,
        args.events,
        args.events + 4,
        if args.flush_interval.is_some() {
            format!("{flush} s (overridden)")
        } else {
            format!("{flush} s (default)")
        }
    )
    .unwrap();
    let mut verdicts: Vec<(String, String, String, String, String)> = Vec::new();

    if let Some(c) = capture {
        writeln!(
            w,
            "\n## (a) sustained capture — fixture {} tenants, scale {} ({} rows); `init` took {:.1} s",
            args.tenants, args.scale, c.db_rows, c.init_seconds
        )
        .unwrap();
        let l = &c.live;
        let captured: u64 = c.live_packs.iter().map(|p| p.changes).sum();
        let captured_txns: u64 = c.live_packs.iter().map(|p| p.transactions).sum();
        let gen_rate = l.changes as f64 / l.wall;
        let cap_rate = captured as f64 / l.wall;
        let keep_up_limit = flush + KEEP_UP_MARGIN;
        let kept_up = c.live_catch_up.is_some_and(|s| s <= keep_up_limit);
        let lags = pack_lags(&c.live_packs);
        let lag_target = flush + LAG_MARGIN;
        let (p50, p99, max) = (
            percentile(&lags, 0.5),
            percentile(&lags, 0.99),
            lags.last().copied().unwrap_or(f64::NAN),
        );
        let interval = if c.live_packs.len() > 1 {
            let mut gaps: Vec<f64> = c
                .live_packs
                .windows(2)
                .map(|p| secs(p[1].at - p[0].at))
                .collect();
            gaps.sort_by(f64::total_cmp);
            median(&gaps)
        } else {
            f64::NAN
        };
        writeln!(
            w,
            "\n| measurement | measured | target | ratio | verdict |\n|---|---:|---:|---:|---|"
        )
        .unwrap();
        writeln!(
            w,
            "| row changes generated (pg_stat_user_tables) | {gen_rate:.0}/s ({} in {:.1} s; {:.0} tps, {} transactions, {} failed) | | | |",
            l.changes, l.wall, l.tps, l.transactions, l.failed
        )
        .unwrap();
        writeln!(
            w,
            "| row changes captured (Σ \"pack stored\" changes) | {cap_rate:.0}/s ({captured} in {} packs, {captured_txns} transactions) | ≥ {CAPTURE_TARGET:.0}/s | {:.2} | {} |",
            c.live_packs.len(),
            cap_rate / CAPTURE_TARGET,
            verdict(cap_rate >= CAPTURE_TARGET && kept_up)
        )
        .unwrap();
        writeln!(
            w,
            "| captured / generated | {:.4} | 1 | | {} |",
            captured as f64 / l.changes as f64,
            verdict(captured as i64 == l.changes)
        )
        .unwrap();
        if let (Some(last), Some(end)) = (c.live_packs.last(), l.end) {
            writeln!(
                w,
                "| last pack (the load's last commits) stored | {:.1} s after the end of the load | | | |",
                secs(last.at - end)
            )
            .unwrap();
        }
        writeln!(
            w,
            "| covered-until reaches the end of the load | {} after it | ≤ {keep_up_limit:.1} s | {} | {} |",
            c.live_catch_up.map_or("never (600 s)".into(), |s| format!("{s:.1} s")),
            c.live_catch_up.map_or("".into(), |s| format!("{:.2}", s / keep_up_limit)),
            verdict(kept_up)
        )
        .unwrap();
        writeln!(
            w,
            "| commit-to-durable lag, p50 of per-pack worst | {p50:.2} s | | | |"
        )
        .unwrap();
        writeln!(
            w,
            "| commit-to-durable lag, p99 of per-pack worst | {p99:.2} s | ≤ {lag_target:.1} s | {:.2} | {} |",
            p99 / lag_target,
            verdict(p99 <= lag_target)
        )
        .unwrap();
        writeln!(
            w,
            "| commit-to-durable lag, max | {max:.2} s | | {:.2} | |",
            max / lag_target
        )
        .unwrap();
        if let Some(b) = &c.backlog {
            let drained: u64 = b.packs.iter().map(|p| p.changes).sum();
            if let Some(d) = b.decoded_seconds {
                let rate = drained as f64 / d;
                writeln!(
                    w,
                    "| backlog after {} s of load with the daemon stopped: decoded and received (walsender sent all) | {rate:.0}/s ({drained} changes in {d:.1} s) | ≥ {CAPTURE_TARGET:.0}/s | {:.2} | {} |",
                    args.backlog,
                    rate / CAPTURE_TARGET,
                    verdict(rate >= CAPTURE_TARGET)
                )
                .unwrap();
            }
            let rate = drained as f64 / b.drain_seconds;
            writeln!(
                w,
                "| same backlog, all of it stored (last pack; waits for the flush) | {rate:.0}/s ({:.1} s) | | | |",
                b.drain_seconds,
            )
            .unwrap();
        }
        let stored_packs: u64 = c.live_packs.iter().map(|p| p.bytes).sum();
        writeln!(
            w,
            "\nlive: {} packs, median {interval:.1} s apart, {} stored ({:.1} bytes per change; `changes/` holds {}); \
             pack store time median {:.3} s; \
             {} of WAL ({:.0} bytes per change); daemon CPU {:.1} s ({:.1} µs per change), walsender (decoding) CPU {:.1} s; \
             daemon RSS: {} idle, {} max sampled, VmHWM {}; largest now − covered-until while loading {:.1} s, \
             largest slot lag {}",
            c.live_packs.len(),
            mib(stored_packs as f64),
            stored_packs as f64 / captured.max(1) as f64,
            mib(c.change_bytes_live as f64),
            median(&c.live_packs.iter().map(|p| p.seconds).collect::<Vec<_>>()),
            mib(l.wal_bytes as f64),
            l.wal_bytes as f64 / l.changes.max(1) as f64,
            c.live_daemon_cpu,
            c.live_daemon_cpu * 1e6 / captured.max(1) as f64,
            c.live_walsender_cpu,
            mib(c.idle_rss_start_kib as f64 * 1024.0),
            mib(c.live_samples.max_rss_kib as f64 * 1024.0),
            mib(c.live_hwm_kib as f64 * 1024.0),
            c.live_samples.max_covered_lag,
            mib(c.live_samples.max_slot_lag_bytes as f64),
        )
        .unwrap();
        let origin = c
            .live
            .end
            .map(|e| e - chrono::TimeDelta::milliseconds((l.wall * 1000.0) as i64));
        writeln!(
            w,
            "\nlive packs (times in s from the start of the load):\n\n| pack | stored at | first commit | last commit | transactions | changes | bytes | store time | worst lag |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        )
        .unwrap();
        for (i, p) in c.live_packs.iter().enumerate() {
            let rel = |t: Option<DateTime<Utc>>| match (t, origin) {
                (Some(t), Some(o)) => format!("{:.2}", secs(t - o)),
                _ => "?".into(),
            };
            writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} | {} | {:.3} s | {} |",
                i + 1,
                rel(Some(p.at)),
                rel(p.first),
                rel(p.last),
                p.transactions,
                p.changes,
                p.bytes,
                p.seconds,
                p.first
                    .map_or("?".into(), |f| format!("{:.2} s", secs(p.at - f)))
            )
            .unwrap();
        }
        if let Some(b) = &c.backlog {
            let drained: u64 = b.packs.iter().map(|p| p.changes).sum();
            writeln!(
                w,
                "\nbacklog: {} row changes generated in {:.1} s ({:.0}/s) with the daemon stopped; restarted daemon: \
                 {:.2} s to \"capture started\"; counted from there: walsender sent all of it after {}, {} packs \
                 ({drained} changes) all stored after {:.1} s, covered-until past the end of the load after {}; daemon CPU {:.1} s, \
                 walsender CPU {:.1} s; VmHWM {}",
                b.load.changes,
                b.load.wall,
                b.load.changes as f64 / b.load.wall,
                b.startup_seconds,
                b.decoded_seconds.map_or("never".into(), |s| format!("{s:.1} s")),
                b.packs.len(),
                b.drain_seconds,
                b.covered_after.map_or("never".into(), |s| format!("{s:.1} s")),
                b.daemon_cpu,
                b.walsender_cpu,
                mib(b.hwm_kib as f64 * 1024.0)
            )
            .unwrap();
        }
        verdicts.push((
            "(a) capture rate while keeping up".into(),
            format!(
                "{cap_rate:.0}/s live; kept up: {}",
                if kept_up { "yes" } else { "no" }
            ),
            format!("≥ {CAPTURE_TARGET:.0}/s"),
            format!("{:.2}", cap_rate / CAPTURE_TARGET),
            verdict(cap_rate >= CAPTURE_TARGET && kept_up).into(),
        ));
        if let Some(b) = &c.backlog
            && let Some(d) = b.decoded_seconds
        {
            let drained: u64 = b.packs.iter().map(|p| p.changes).sum();
            let rate = drained as f64 / d;
            verdicts.push((
                "(a) capture capacity (backlog decoded and received)".into(),
                format!("{rate:.0}/s"),
                format!("≥ {CAPTURE_TARGET:.0}/s"),
                format!("{:.2}", rate / CAPTURE_TARGET),
                verdict(rate >= CAPTURE_TARGET).into(),
            ));
        }
        verdicts.push((
            "(a) commit-to-durable lag p99".into(),
            format!("{p99:.2} s"),
            format!("≤ {lag_target:.1} s"),
            format!("{:.2}", p99 / lag_target),
            verdict(p99 <= lag_target).into(),
        ));

        if !c.replays.is_empty() {
            writeln!(
                w,
                "\n## (b) replay rate — `restore --org <tenant> --latest --json` (medians of runs; tenant 1 draws {:.0} % of the load's transactions)",
                c.busy_changes_share * 100.0
            )
            .unwrap();
            writeln!(
                w,
                "\n| tenant | runs | changes replayed | transactions | packs | replay time | replay rate | target | ratio | verdict | whole restore | rows after | restore CPU | peak RSS |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"
            )
            .unwrap();
            for r in &c.replays {
                let rates: Vec<f64> = r.runs.iter().map(ReplayRun::rate).collect();
                let rate = median(&rates);
                let first = &r.runs[0];
                writeln!(
                    w,
                    "| {} `{}` | {} | {} | {} | {} | {} | {} | ≥ {REPLAY_TARGET:.0}/s | {:.2} | {} | {} | {} | {:.2} s | {} |",
                    r.label,
                    &r.tenant[..8],
                    r.runs.len(),
                    first.changes,
                    first.transactions,
                    first.packs,
                    spread(&r.runs.iter().map(|x| x.replay_seconds).collect::<Vec<_>>(), 2, "s"),
                    spread(&rates, 0, "/s"),
                    rate / REPLAY_TARGET,
                    verdict(rate >= REPLAY_TARGET),
                    spread(&r.runs.iter().map(|x| x.total.wall).collect::<Vec<_>>(), 2, "s"),
                    first.rows,
                    median(&r.runs.iter().map(|x| x.total.cpu).collect::<Vec<_>>()),
                    mib(r.runs.iter().map(|x| x.total.rss_kib).max().unwrap_or(0) as f64 * 1024.0),
                )
                .unwrap();
                verdicts.push((
                    format!("(b) replay rate, {}", r.label),
                    format!("{rate:.0}/s"),
                    format!("≥ {REPLAY_TARGET:.0}/s"),
                    format!("{:.2}", rate / REPLAY_TARGET),
                    verdict(rate >= REPLAY_TARGET).into(),
                ));
            }
        }

        if let Some(b) = &c.big {
            writeln!(
                w,
                "\n## (c) daemon memory — one transaction of {} rows (tenant `{}`, {} of WAL, inserted in {:.1} s)",
                b.rows,
                &b.tenant[..8],
                mib(b.wal_bytes as f64),
                b.insert_seconds
            )
            .unwrap();
            let ratio = b.hwm_kib as f64 / RSS_TARGET_KIB as f64;
            writeln!(
                w,
                "\n| measurement | measured | target | ratio | verdict |\n|---|---:|---:|---:|---|"
            )
            .unwrap();
            writeln!(
                w,
                "| daemon RSS at idle (fresh daemon, caught up) | {} (VmHWM {}) | | | |",
                mib(b.idle_rss_kib as f64 * 1024.0),
                mib(b.idle_hwm_kib as f64 * 1024.0)
            )
            .unwrap();
            writeln!(
                w,
                "| daemon peak RSS (VmHWM) capturing the transaction | {} | < {} | {ratio:.2} | {} |",
                mib(b.hwm_kib as f64 * 1024.0),
                mib(RSS_TARGET_KIB as f64 * 1024.0),
                verdict(b.hwm_kib < RSS_TARGET_KIB)
            )
            .unwrap();
            writeln!(
                w,
                "| daemon RSS afterwards | {} | | | |",
                mib(b.rss_after_kib as f64 * 1024.0)
            )
            .unwrap();
            let packs = b
                .packs
                .iter()
                .map(|p| {
                    format!(
                        "{} changes / {} transaction(s), {}, stored in {:.2} s, {:.1} s after its commit",
                        p.changes,
                        p.transactions,
                        mib(p.bytes as f64),
                        p.seconds,
                        p.last.map_or(f64::NAN, |l| secs(p.at - l))
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
            writeln!(
                w,
                "| commit → covered-until past it | {} | | | |",
                b.capture_seconds
                    .map_or("never".into(), |s| format!("{s:.1} s"))
            )
            .unwrap();
            writeln!(
                w,
                "\npacks: {packs}; daemon CPU {:.1} s ({:.2} µs per row)",
                b.daemon_cpu,
                b.daemon_cpu * 1e6 / b.rows as f64
            )
            .unwrap();
            verdicts.push((
                format!("(c) daemon peak RSS, {}-row transaction", b.rows),
                mib(b.hwm_kib as f64 * 1024.0),
                "< 256 MiB".into(),
                format!("{ratio:.2}"),
                verdict(b.hwm_kib < RSS_TARGET_KIB).into(),
            ));
        }
        if !c.stops.is_empty() {
            let stops: Vec<String> = c
                .stops
                .iter()
                .map(|(when, status, took)| format!("{when}: {status} in {took:.2} s"))
                .collect();
            writeln!(w, "\ndaemon stops (SIGTERM): {}", stops.join("; ")).unwrap();
        }
    }

    if let Some(d) = pitr {
        writeln!(
            w,
            "\n## (d) one tenant at T = snapshot + \"one hour\" of load: ours against pgBackRest"
        )
        .unwrap();
        writeln!(
            w,
            "\nsource database {} ({} tenants); median tenant by rows: `{}`{} with {} rows in the snapshot. \
             Backups before the load: our `init` (slot + first snapshot) {:.1} s; pgBackRest full backup {:.1} s ({} in its repository). \
             \"One hour\": {} row changes ({} transactions) in {:.1} s ({:.0}/s, compressed from an hour at {:.0}/s), {} of WAL; \
             T = {}; then `pgbackrest check` (WAL switch + archived) {:.1} s; covered-until passed T {:.1} s after it.",
            mib(d.db_bytes as f64),
            d.tenants,
            d.median_tenant,
            d.median_k.map_or(String::new(), |k| format!(" (fixture tenant {k})")),
            d.median_rows,
            d.init_seconds,
            d.backup_seconds,
            mib(d.backup_bytes as f64),
            d.load.changes,
            d.load.transactions,
            d.load.wall,
            d.load.changes as f64 / d.load.wall,
            d.load.changes as f64 / 3600.0,
            mib(d.load.wal_bytes as f64),
            rfc3339(d.target),
            d.archive_seconds,
            d.covered_seconds.unwrap_or(f64::NAN),
        )
        .unwrap();
        let ours: Vec<f64> = d.ours.iter().map(|r| r.total.wall).collect();
        let theirs: Vec<f64> = d.theirs.iter().map(PgBackRestRun::total).collect();
        let (om, tm) = (median(&ours), median(&theirs));
        writeln!(
            w,
            "\n| measurement ({} interleaved runs, median (min–max)) | time | ratio to pgBackRest | details |\n|---|---:|---:|---|",
            d.ours.len().max(d.theirs.len())
        )
        .unwrap();
        writeln!(
            w,
            "| pgBackRest: restore --type=time + recovery to T + tenant extraction | {} | 1.00 | restore {} ({} of files), recovery to T {}, extract {} |",
            spread(&theirs, 2, "s"),
            spread(&d.theirs.iter().map(|r| r.restore).collect::<Vec<_>>(), 2, "s"),
            mib(d.theirs.first().map_or(0, |r| r.restored_bytes) as f64),
            spread(&d.theirs.iter().map(|r| r.recovery).collect::<Vec<_>>(), 2, "s"),
            spread(&d.theirs.iter().map(|r| r.extract).collect::<Vec<_>>(), 2, "s"),
        )
        .unwrap();
        if let Some(first) = d.ours.first() {
            writeln!(
                w,
                "| ours: `restore --org <median> --at T` | {} | {:.3} | {} changes replayed ({} transactions, {} packs) in {:.2} s; {} rows; CPU {:.2} s; peak RSS {} |",
                spread(&ours, 2, "s"),
                om / tm,
                first.changes,
                first.transactions,
                first.packs,
                median(&d.ours.iter().map(|r| r.replay_seconds).collect::<Vec<_>>()),
                first.rows,
                median(&d.ours.iter().map(|r| r.total.cpu).collect::<Vec<_>>()),
                mib(d.ours.iter().map(|r| r.total.rss_kib).max().unwrap_or(0) as f64 * 1024.0),
            )
            .unwrap();
        }
        writeln!(
            w,
            "\nsame rows: {} ({} tables, {} rows of the tenant compared with the source, row count + md5 of every row)",
            if d.differences.is_empty() {
                "ours = pgBackRest = source".to_string()
            } else {
                format!("NO — {}", d.differences.join("; "))
            },
            d.tables_compared,
            d.rows_compared
        )
        .unwrap();
        verdicts.push((
            "(d) median tenant at T, ours / pgBackRest".into(),
            format!("{om:.2} s vs {tm:.2} s"),
            "faster".into(),
            format!("{:.3} ({:.0}× faster)", om / tm, tm / om),
            verdict(om < tm && d.differences.is_empty()).into(),
        ));
    }

    writeln!(
        w,
        "\n## verdicts\n\n| target | measured | target | ratio | verdict |\n|---|---|---|---:|---|"
    )
    .unwrap();
    for (name, measured, target, ratio, v) in &verdicts {
        writeln!(w, "| {name} | {measured} | {target} | {ratio} | {v} |").unwrap();
    }
    let problems: Vec<&String> = capture
        .map(|c| c.problems.iter().collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(
            pitr.map(|d| d.problems.iter().collect::<Vec<_>>())
                .unwrap_or_default(),
        )
        .collect();
    if problems.is_empty() {
        writeln!(w, "\nthe daemons logged no warning or error").unwrap();
    } else {
        writeln!(
            w,
            "\nthe daemons logged {} warning/error line(s):",
            problems.len()
        )
        .unwrap();
        for p in problems.iter().take(20) {
            writeln!(w, "    {p}").unwrap();
        }
    }
    writeln!(
        w,
        "\ntotal bench time {:.0} s; load average {load_before} before, {load_after} after",
        total.as_secs_f64()
    )
    .unwrap();
    s
}
