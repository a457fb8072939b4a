//! Snapshot benchmark: the real release binary against the plain tools, on the reference data.
//!
//! ```sh
//! cargo bench --bench snapshot      # = -- --scales 1,10 --tenants 100 --runs 5 --parallel 1,2,4
//! cargo bench --bench snapshot -- --scales 0.2 --tenants 12 --runs 1 --parallel 2   # smoke run
//! ```
//!
//! For each scale it starts a private PostgreSQL (the tests' support crate, tests/support), loads
//! `tests/fixtures/updog_{schema,data}.sql`, freezes it (`VACUUM (FREEZE, ANALYZE)`, so no run
//! pays for hint bits), makes an identity, a config and a directory repository exactly as a
//! user would, then measures, interleaving ours and the baselines, `--runs` times each (medians):
//!
//! - (a) the largest tenant (`md5('org-1')::uuid`): `updog-backup backup --org` (whole command,
//!   and the tenant archive's own time from its debug log) against, for each of the 11 tenant
//!   tables, `psql -c "COPY (SELECT * FROM t WHERE …) TO STDOUT" | zstd -3 | age -r …` appended
//!   to one file (the issue's pipeline), and for reference the same in one psql session and
//!   one zstd/age stream. Target: ours within 1.2× of the pipeline.
//! - (b) every tenant: `updog-backup backup` at each `snapshot.parallel` against
//!   `pg_dump -Fc -Z 6 -n app -n audit` (PostgreSQL 15's pg_dump has no zstd: gzip level 6).
//!   Target: faster, stored bytes no larger.
//! - (c) the peak RSS of `backup` (GNU time's %M). Target: under 256 MiB at scale 10.
//!
//! (b) also runs ours once more per round with PostgreSQL parallel query off for the backup
//! role (`ALTER ROLE updog_backup SET max_parallel_workers_per_gather = 0`, reset right after),
//! and, after the rounds, logs every statement of one extra backup to show where the server
//! time goes per table (see BENCHMARKS.md).
//!
//! Every command runs under GNU time, which also gives its CPU time (with its children: psql,
//! zstd, age in the pipelines; pg_dump --schema-only in ours); the server's CPU time per command
//! is the growth of the postmaster's reaped-children CPU (`/proc/<pid>/stat`), so both stay
//! meaningful on a machine shared with other work. The load average is printed with the
//! figures for the same reason.
//!
//! Needs `age`, `zstd` and GNU `time` (`apt-get install -y age zstd time`). Loopback only;
//! the cluster is stopped and deleted when this process exits.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;

use updog_backup_test_support::bench::{
    MIB, Machine, dir_bytes, loadavg, mib, proc_cpu_seconds, verdict,
};
use updog_backup_test_support::fixture::tenant_tables;
use updog_backup_test_support::postgres;

/// The binary cargo built for this bench (bench profile = release settings).
const BIN: &str = env!("CARGO_BIN_EXE_updog-backup");
/// No single measured command may take longer (keeps the bench bounded).
const TIMEOUT: Duration = Duration::from_secs(600);
/// Targets from the issue.
const TENANT_RATIO_TARGET: f64 = 1.2;
const RSS_TARGET_KIB: u64 = 256 * 1024;

struct Args {
    scales: Vec<String>,
    tenants: u32,
    runs: usize,
    parallel: Vec<usize>,
}

fn parse_args() -> Args {
    let mut args = Args {
        scales: vec!["1".into(), "10".into()],
        tenants: 100,
        runs: 5,
        parallel: vec![1, 2, 4],
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
        match name.as_str() {
            // cargo bench passes --bench to every bench target.
            "--bench" => {}
            "--scales" => {
                args.scales = value().split(',').map(|s| s.trim().to_string()).collect();
                for s in &args.scales {
                    if s.parse::<f64>().map_or(true, |v| v <= 0.0) {
                        usage(&format!("--scales: {s:?} is not a positive number"));
                    }
                }
            }
            "--tenants" => {
                args.tenants = value()
                    .parse()
                    .ok()
                    .filter(|&t| t >= 1)
                    .unwrap_or_else(|| usage("--tenants: a positive integer"));
            }
            "--runs" => {
                args.runs = value()
                    .parse()
                    .ok()
                    .filter(|&r| r >= 1)
                    .unwrap_or_else(|| usage("--runs: a positive integer"));
            }
            "--parallel" => {
                args.parallel = value()
                    .split(',')
                    .map(|p| {
                        p.trim()
                            .parse()
                            .ok()
                            .filter(|&n: &usize| (1..=64).contains(&n))
                            .unwrap_or_else(|| usage("--parallel: a list of 1..=64"))
                    })
                    .collect();
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
        "usage: cargo bench --bench snapshot -- [--scales 1,10] [--tenants 100] [--runs 5] [--parallel 1,2,4]"
    );
    std::process::exit(if problem.is_empty() { 0 } else { 2 });
}

fn main() {
    let args = parse_args();
    preflight();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let pg = rt.block_on(postgres::cluster());
    let work = tempfile::Builder::new()
        .prefix("updog-bench-")
        .tempdir()
        .expect("temporary directory");
    let machine = Machine::probe(&rt, pg);
    eprintln!(
        "{}",
        machine.describe("private cluster, fsync=off, loopback TCP", "")
    );
    eprintln!("binary: {BIN}");
    let started = Instant::now();
    let mut results = Vec::new();
    for scale in &args.scales {
        results.push(bench_scale(&rt, pg, &args, scale, work.path()));
    }
    let report = report(&machine, &args, &results, started.elapsed());
    println!("{report}");
}

/// Fails early, with the fix, when a tool the baselines need is missing.
fn preflight() {
    for (tool, package) in [("age", "age"), ("zstd", "zstd")] {
        if Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            eprintln!("error: `{tool}` not found: apt-get install -y {package}");
            std::process::exit(2);
        }
    }
    let gnu_time = Command::new("/usr/bin/time")
        .args(["-f", "%M", "true"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !gnu_time {
        eprintln!("error: GNU time not found at /usr/bin/time: apt-get install -y time");
        std::process::exit(2);
    }
}

/// One measured process.
struct Outcome {
    wall: f64,
    /// User + system CPU seconds of the process and the children it waited for (GNU time).
    cpu: f64,
    /// CPU seconds of the PostgreSQL backends that served it (see [`server_cpu`]).
    server: f64,
    rss_kib: u64,
    stdout: String,
    stderr: String,
    spawned_at: DateTime<Utc>,
}

/// CPU seconds the cluster's processes have used: the postmaster's own plus its reaped
/// children's (`cutime`, `cstime`), so that a backend's cost is counted once it has exited,
/// whatever else runs on the machine.
fn server_cpu(pg: &postgres::Cluster) -> f64 {
    let pid = fs::read_to_string(pg.dir.join("data/postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default();
    proc_cpu_seconds(pid, true)
}

/// Runs `program args` under GNU time, in its own process group so a timeout can stop the
/// whole pipeline; panics (ending the bench) on failure.
fn measure(
    pg: &postgres::Cluster,
    dir: &Path,
    program: &Path,
    args: &[String],
    envs: &[(&str, String)],
) -> Outcome {
    let out_path = dir.join("cmd.stdout");
    let err_path = dir.join("cmd.stderr");
    let time_path = dir.join("cmd.time");
    let _ = fs::remove_file(&time_path);
    let mut cmd = Command::new("/usr/bin/time");
    cmd.args(["-f", "%M %U %S", "-o"])
        .arg(&time_path)
        .arg(program)
        .args(args)
        .env_remove("UPDOG_BACKUP_CONFIG")
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(fs::File::create(&err_path).unwrap())
        .process_group(0);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let server_before = server_cpu(pg);
    let spawned_at = Utc::now();
    let clock = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", program.display()));
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            break status;
        }
        if clock.elapsed() > TIMEOUT {
            // Our own child's process group: the command and whatever it started.
            let _ = Command::new("kill")
                .args(["-KILL", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            panic!(
                "{} {args:?} took more than {TIMEOUT:?}; stopped",
                program.display()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let wall = clock.elapsed().as_secs_f64();
    // Let the backends exit and the postmaster reap them before reading its children's CPU.
    std::thread::sleep(Duration::from_millis(200));
    let server = server_cpu(pg) - server_before;
    let stdout = fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    assert!(
        status.success(),
        "{} {args:?} failed ({status}):\nstdout: {stdout}\nstderr: {stderr}",
        program.display()
    );
    let time = fs::read_to_string(&time_path).unwrap_or_default();
    let fields: Vec<f64> = time
        .lines()
        .last()
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    assert_eq!(fields.len(), 3, "GNU time's output: {time:?}");
    Outcome {
        wall,
        cpu: fields[1] + fields[2],
        server,
        rss_kib: fields[0] as u64,
        stdout,
        stderr,
        spawned_at,
    }
}

/// One measured run, reduced to what the report needs.
#[derive(Clone, Copy, Default)]
struct Sample {
    wall: f64,
    /// Client CPU seconds (the command and its children).
    cpu: f64,
    /// Server CPU seconds (the backends that served it).
    server: f64,
    rss_kib: u64,
    /// Stored bytes: ours, the snapshot's files; the baselines, their output file.
    bytes: u64,
    /// Ours with `--org`: the tenant archive's own export time, from the debug log.
    archive: f64,
    /// Ours: process start to "snapshot started" (connect, catalog, slot + exported snapshot).
    setup: f64,
}

impl From<&Outcome> for Sample {
    fn from(o: &Outcome) -> Self {
        Sample {
            wall: o.wall,
            cpu: o.cpu,
            server: o.server,
            rss_kib: o.rss_kib,
            ..Sample::default()
        }
    }
}

/// The repeated samples of one measurement.
#[derive(Default)]
struct Series(Vec<Sample>);

impl Series {
    fn median(&self, f: impl Fn(&Sample) -> f64) -> f64 {
        let mut v: Vec<f64> = self.0.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
    fn wall(&self) -> f64 {
        self.median(|s| s.wall)
    }
    /// "median s (min–max)" of the wall times.
    fn wall_text(&self, digits: usize) -> String {
        let walls = self.0.iter().map(|s| s.wall);
        let min = walls.clone().fold(f64::INFINITY, f64::min);
        let max = walls.fold(f64::NEG_INFINITY, f64::max);
        format!("{:.digits$} s ({min:.digits$}–{max:.digits$})", self.wall())
    }
    fn cpu(&self) -> f64 {
        self.median(|s| s.cpu)
    }
    fn server(&self) -> f64 {
        self.median(|s| s.server)
    }
    fn bytes(&self) -> u64 {
        self.median(|s| s.bytes as f64).round() as u64
    }
    fn peak_rss_kib(&self) -> u64 {
        self.0.iter().map(|s| s.rss_kib).max().unwrap_or(0)
    }
}

/// The repository, identity and config of one source database.
struct Env {
    dir: PathBuf,
    config: PathBuf,
    repo: PathBuf,
    recipient: String,
}

/// What a backup stored, besides its sample.
struct Stored {
    rows: u64,
    tenants: usize,
    /// tenant → (seconds, stored bytes, rows) from the "archive stored" debug lines.
    archives: BTreeMap<String, (f64, u64, u64)>,
}

impl Env {
    fn new(pg: &postgres::Cluster, base: &Path, db: &str) -> Self {
        let dir = base.join(db);
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
            format!(
                r#"[source]
url = "{source}"
schemas = ["app", "audit"]
global_tables = ["app.currencies"]

[storage]
url = "file://{repo}"

[encryption]
recipients = ["{recipient}"]
identity_file = "{identity}"

[snapshot]
parallel = 2
"#,
                source = pg.url("updog_backup", db),
                repo = repo.display(),
                identity = identity.display(),
            ),
        )
        .unwrap();
        let env = Env {
            dir,
            config,
            repo,
            recipient,
        };
        // The publication `init` needs, created as the tables' owner would.
        pg.psql(
            db,
            &["-c", "CREATE PUBLICATION updog_backup FOR ALL TABLES"],
        );
        env.run(pg, &["init"], 2);
        env
    }

    /// `updog-backup --config … <args>` with `snapshot.parallel` overridden and debug logs
    /// of our crate (JSON lines on stderr, since stderr is not a terminal).
    fn run(&self, pg: &postgres::Cluster, args: &[&str], parallel: usize) -> Outcome {
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
    fn backup(&self, pg: &postgres::Cluster, args: &[&str], parallel: usize) -> (Sample, Stored) {
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
struct Log {
    snapshot: Option<String>,
    started_at: Option<DateTime<Utc>>,
    tenant_archives: BTreeMap<String, (f64, u64, u64)>,
}

impl Log {
    fn parse(stderr: &str) -> Self {
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

/// Everything measured at one scale.
struct ScaleResult {
    scale: String,
    tenants: usize,
    rows: u64,
    table_bytes: u64,
    index_bytes: u64,
    load_seconds: f64,
    loadavg_before: String,
    loadavg_after: String,
    largest: String,
    largest_rows: u64,
    // (a)
    pipeline: Series,
    one_stream: Series,
    org: Series,
    schema_dump: Series,
    // (b), (c)
    pg_dump: Series,
    ours: Vec<(usize, Series)>,
    /// Ours with the role's parallel query off (see [`Step::OursNoParallelQuery`]).
    ours_no_parallel_query: Series,
    /// Where the server time of a full backup goes, per table.
    costs: Vec<TableCost>,
}

fn bench_scale(
    rt: &tokio::runtime::Runtime,
    pg: &'static postgres::Cluster,
    args: &Args,
    scale: &str,
    work: &Path,
) -> ScaleResult {
    eprintln!(
        "\n== scale {scale}, {} tenants: loading the fixture…",
        args.tenants
    );
    let clock = Instant::now();
    let hint = format!("bench_s{}", scale.replace('.', "_"));
    let db = rt.block_on(pg.fixture_db(&hint, args.tenants, scale));
    pg.psql(&db, &["-c", "VACUUM (FREEZE, ANALYZE)"]);
    let load_seconds = clock.elapsed().as_secs_f64();
    let (table_bytes, index_bytes, largest) = rt.block_on(async {
        let client = pg.client(&db).await;
        let sizes = client
            .query_one(
                "SELECT sum(pg_table_size(c.oid))::bigint, sum(pg_indexes_size(c.oid))::bigint
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind = 'r' AND n.nspname IN ('app', 'audit')",
                &[],
            )
            .await
            .unwrap();
        let largest: String = client
            .query_one("SELECT md5('org-1')::uuid::text", &[])
            .await
            .unwrap()
            .get(0);
        (
            sizes.get::<_, i64>(0) as u64,
            sizes.get::<_, i64>(1) as u64,
            largest,
        )
    });
    eprintln!(
        "   {db}: {} of tables (heap+TOAST), {} of indexes, loaded in {load_seconds:.0} s",
        mib(table_bytes as f64),
        mib(index_bytes as f64)
    );

    let env = Env::new(pg, work, &db);
    let port = pg.port.to_string();
    let psql = pg.bin.join("psql");
    let conn = format!("-h 127.0.0.1 -p {port} -U updog_backup -d {db}");
    let copies: Vec<String> = tenant_tables()
        .map(|(table, filter)| {
            format!(
                "COPY (SELECT * FROM {table} WHERE {}) TO STDOUT",
                filter.replace("$ORG", &largest)
            )
        })
        .collect();
    // The issue's pipeline, once per table, appended to one file.
    let pipeline_out = env.dir.join("pipeline.out");
    let mut pipeline = format!(": > {}\n", pipeline_out.display());
    for copy in &copies {
        writeln!(
            pipeline,
            "{} -X -q {conn} -c \"{copy}\" | zstd -3 -q | age -r {} >> {}",
            psql.display(),
            env.recipient,
            pipeline_out.display()
        )
        .unwrap();
    }
    // For reference: one session, one zstd frame, one age stream (fewer processes).
    let one_stream_out = env.dir.join("one_stream.out");
    let one_stream = format!(
        "{} -X -q {conn} {} | zstd -3 -q | age -r {} > {}",
        psql.display(),
        copies
            .iter()
            .map(|c| format!("-c \"{c}\""))
            .collect::<Vec<_>>()
            .join(" "),
        env.recipient,
        one_stream_out.display()
    );
    let sh = |script: &str, out: &Path| -> Sample {
        let o = measure(
            pg,
            &env.dir,
            Path::new("sh"),
            &["-c".into(), script.into()],
            &[],
        );
        assert!(
            o.stderr.trim().is_empty(),
            "baseline wrote errors: {}",
            o.stderr
        );
        let bytes = fs::metadata(out).map(|m| m.len()).unwrap_or(0);
        let _ = fs::remove_file(out);
        Sample {
            bytes,
            ..Sample::from(&o)
        }
    };
    let pg_dump_out = env.dir.join("pg_dump.out");
    let pg_dump = |extra: &[&str]| -> Sample {
        let mut a: Vec<String> = [
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "updog_backup",
            "-d",
            &db,
            "-n",
            "app",
            "-n",
            "audit",
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
        a.push("-f".into());
        a.push(pg_dump_out.display().to_string());
        let o = measure(pg, &env.dir, &pg.bin.join("pg_dump"), &a, &[]);
        let bytes = fs::metadata(&pg_dump_out).map(|m| m.len()).unwrap_or(0);
        let _ = fs::remove_file(&pg_dump_out);
        Sample {
            bytes,
            ..Sample::from(&o)
        }
    };

    let loadavg_before = loadavg();
    // Warm-up (untimed): page cache, and proof that the setup works.
    eprintln!("   warm-up backup…");
    let (_, warm) = env.backup(pg, &[], 2);
    let mut result = ScaleResult {
        scale: scale.to_string(),
        tenants: warm.tenants,
        rows: warm.rows,
        table_bytes,
        index_bytes,
        load_seconds,
        loadavg_before,
        loadavg_after: String::new(),
        largest: largest.clone(),
        largest_rows: 0,
        pipeline: Series::default(),
        one_stream: Series::default(),
        org: Series::default(),
        schema_dump: Series::default(),
        pg_dump: Series::default(),
        ours: args
            .parallel
            .iter()
            .map(|&p| (p, Series::default()))
            .collect(),
        ours_no_parallel_query: Series::default(),
        costs: Vec::new(),
    };
    for run in 0..args.runs {
        eprintln!("   run {}/{}: (a) largest tenant…", run + 1, args.runs);
        // Alternate the order between runs so that no side always goes first.
        let mut steps = vec![0, 1, 2, 3];
        if run % 2 == 1 {
            steps.reverse();
        }
        for step in steps {
            match step {
                0 => result.pipeline.0.push(sh(&pipeline, &pipeline_out)),
                1 => result.one_stream.0.push(sh(&one_stream, &one_stream_out)),
                2 => {
                    let (mut sample, stored) = env.backup(pg, &["--org", &largest], 2);
                    let (seconds, bytes, rows) = *stored
                        .archives
                        .get(&largest)
                        .expect("the tenant's \"archive stored\" line");
                    sample.archive = seconds;
                    sample.bytes = bytes;
                    result.largest_rows = rows;
                    result.org.0.push(sample);
                }
                _ => result
                    .schema_dump
                    .0
                    .push(pg_dump(&["--schema-only", "-Fc", "--compress=0"])),
            }
        }
        eprintln!("   run {}/{}: (b) all tenants…", run + 1, args.runs);
        let mut steps: Vec<Step> = std::iter::once(Step::PgDump)
            .chain((0..args.parallel.len()).map(Step::Ours))
            .chain([Step::OursNoParallelQuery])
            .collect();
        if run % 2 == 1 {
            steps.reverse();
        }
        for step in steps {
            match step {
                Step::PgDump => result.pg_dump.0.push(pg_dump(&["-Fc", "-Z", "6"])),
                Step::Ours(i) => {
                    let (sample, stored) = env.backup(pg, &[], args.parallel[i]);
                    assert_eq!(
                        stored.tenants, result.tenants,
                        "every run holds every tenant"
                    );
                    result.ours[i].1.0.push(sample);
                }
                Step::OursNoParallelQuery => {
                    // Set on the role (what an operator can do today), for this run only:
                    // the baselines connect as the same role.
                    parallel_query(pg, false);
                    let (sample, _) = env.backup(pg, &[], NO_PARALLEL_QUERY_RUN);
                    parallel_query(pg, true);
                    result.ours_no_parallel_query.0.push(sample);
                }
            }
        }
    }
    result.loadavg_after = loadavg();
    eprintln!("   server time per table (untimed, statement logging on)…");
    result.costs = diagnose(pg, &env, &conn);
    result
}

/// Server statement time of one table: ours (the sum over every tenant's `COPY`) against one
/// `COPY` of the whole table.
struct TableCost {
    table: String,
    ours_ms: f64,
    statements: usize,
    full_ms: f64,
}

/// After the measurements: one more `backup` at parallel 1, then one binary `COPY` of each whole
/// tenant table through psql, with `log_min_duration_statement = 0` for just this step; the
/// server log gives each statement's execution time.
fn diagnose(pg: &postgres::Cluster, env: &Env, conn: &str) -> Vec<TableCost> {
    let log = pg.dir.join("log");
    let len = || fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let set = |value: &str| {
        pg.psql(
            "postgres",
            &[
                "-c",
                &format!("ALTER SYSTEM SET log_min_duration_statement = {value}"),
                "-c",
                "SELECT pg_reload_conf()",
            ],
        );
        // The reload is asynchronous: let the postmaster take it before new backends start.
        std::thread::sleep(Duration::from_millis(500));
    };
    set("0");
    let start = len();
    env.backup(pg, &[], 1);
    let middle = len();
    let mut script = String::new();
    for (table, _) in tenant_tables() {
        let (schema, name) = table.split_once('.').expect("schema.table");
        writeln!(
            script,
            "{} -X -q {conn} -c 'COPY (SELECT * FROM \"{schema}\".\"{name}\") TO STDOUT (FORMAT binary)' > /dev/null",
            pg.bin.join("psql").display()
        )
        .unwrap();
    }
    measure(pg, &env.dir, Path::new("sh"), &["-c".into(), script], &[]);
    let end = len();
    set("-1");
    let text = fs::read(&log).unwrap_or_default();
    let slice =
        |a: u64, b: u64| String::from_utf8_lossy(&text[a as usize..b as usize]).into_owned();
    let ours = statement_times(&slice(start, middle));
    let full = statement_times(&slice(middle, end));
    tenant_tables()
        .map(|(table, _)| {
            let (ours_ms, statements) = ours.get(table).copied().unwrap_or((f64::NAN, 0));
            TableCost {
                table: table.to_string(),
                ours_ms,
                statements,
                full_ms: full.get(table).map_or(f64::NAN, |f| f.0),
            }
        })
        .collect()
}

/// `schema.table` → (total ms, statements) of the `COPY (SELECT … FROM "schema"."table" …)`
/// statements in a server log (`duration: … ms  execute …:` or `statement:` lines).
fn statement_times(log: &str) -> BTreeMap<String, (f64, usize)> {
    let mut out: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for line in log.lines() {
        let Some((_, rest)) = line.split_once("duration: ") else {
            continue;
        };
        let Some((ms, rest)) = rest.split_once(" ms  ") else {
            continue;
        };
        if !(rest.starts_with("execute") || rest.starts_with("statement:"))
            || !rest.contains("COPY (SELECT ")
        {
            continue;
        }
        let (Ok(ms), Some((_, from))) = (ms.parse::<f64>(), rest.split_once(" FROM ")) else {
            continue;
        };
        let table = from
            .split([' ', ')'])
            .next()
            .unwrap_or_default()
            .replace('"', "");
        let entry = out.entry(table).or_default();
        entry.0 += ms;
        entry.1 += 1;
    }
    out
}

/// The (b) measurements of one run, in the order they run.
#[derive(Clone, Copy)]
enum Step {
    PgDump,
    /// Ours at `args.parallel[i]`.
    Ours(usize),
    /// Ours at [`NO_PARALLEL_QUERY_RUN`] with the source role's parallel query turned off.
    OursNoParallelQuery,
}

/// `snapshot.parallel` of the run without PostgreSQL parallel query (the machine's 2 cores).
const NO_PARALLEL_QUERY_RUN: usize = 2;

/// Turns PostgreSQL parallel query off (`max_parallel_workers_per_gather = 0`) or back to the
/// default for the backup role's new sessions.
fn parallel_query(pg: &postgres::Cluster, on: bool) {
    let sql = if on {
        "ALTER ROLE updog_backup RESET max_parallel_workers_per_gather"
    } else {
        "ALTER ROLE updog_backup SET max_parallel_workers_per_gather = 0"
    };
    pg.psql("postgres", &["-c", sql]);
}

fn report(machine: &Machine, args: &Args, results: &[ScaleResult], total: Duration) -> String {
    let mut s = String::new();
    let w = &mut s;
    writeln!(w, "\n# updog-backup snapshot benchmark\n").unwrap();
    writeln!(
        w,
        "{}",
        machine.describe("private cluster, fsync=off, loopback TCP", "")
    )
    .unwrap();
    writeln!(
        w,
        "command: cargo bench --bench snapshot -- --scales {} --tenants {} --runs {} --parallel {}",
        args.scales.join(","),
        args.tenants,
        args.runs,
        args.parallel
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    )
    .unwrap();
    writeln!(
        w,
        "medians of {} interleaved runs; ratio = ours / baseline; client CPU = the command and its \
         children (user+sys); server CPU = the PostgreSQL backends that served it",
        args.runs
    )
    .unwrap();
    for r in results {
        writeln!(
            w,
            "\n## scale {}: {} tenants, {} rows, {} of tables (heap+TOAST) + {} of indexes",
            r.scale,
            r.tenants,
            r.rows,
            mib(r.table_bytes as f64),
            mib(r.index_bytes as f64),
        )
        .unwrap();
        writeln!(
            w,
            "fixture loaded in {:.0} s; load average {} before, {} after the measurements",
            r.load_seconds, r.loadavg_before, r.loadavg_after
        )
        .unwrap();
        writeln!(
            w,
            "\n(a) largest tenant {}: {} rows",
            r.largest, r.largest_rows
        )
        .unwrap();
        writeln!(
            w,
            "| measurement | time | client CPU | server CPU | stored | ratio | ≤ {TENANT_RATIO_TARGET}× |"
        )
        .unwrap();
        writeln!(w, "|---|---:|---:|---:|---:|---:|---|").unwrap();
        let base = r.pipeline.wall();
        let row = |w: &mut String, name: &str, s: &Series, t: f64, target: bool| {
            let ratio = t / base;
            writeln!(
                w,
                "| {name} | {} | {:.2} s | {:.2} s | {} | {ratio:.2} | {} |",
                if target && name.contains("archive") {
                    format!("{t:.3} s")
                } else {
                    s.wall_text(3)
                },
                s.cpu(),
                s.server(),
                mib(s.bytes() as f64),
                if target {
                    verdict(ratio <= TENANT_RATIO_TARGET)
                } else {
                    ""
                }
            )
            .unwrap();
        };
        row(
            w,
            "baseline: 11 × `psql -c \"COPY (…) TO STDOUT\" \\| zstd -3 \\| age -r`",
            &r.pipeline,
            base,
            false,
        );
        row(
            w,
            "reference: one psql session \\| one zstd -3 \\| one age",
            &r.one_stream,
            r.one_stream.wall(),
            false,
        );
        row(
            w,
            "ours: `backup --org`, whole command",
            &r.org,
            r.org.wall(),
            true,
        );
        row(
            w,
            "ours: its tenant archive (logged export time)",
            &r.org,
            r.org.median(|s| s.archive),
            true,
        );
        writeln!(
            w,
            "\n`backup --org` (parallel 2): {:.3} s from process start to \"snapshot started\" (connect, catalog, \
             temporary slot + exported snapshot); `pg_dump --schema-only` of the same schemas alone: {:.3} s \
             (ours runs it concurrently with the export); peak RSS {}; vs the one-stream reference: \
             {:.2}× (whole command), {:.2}× (archive)",
            r.org.median(|s| s.setup),
            r.schema_dump.wall(),
            mib((r.org.peak_rss_kib() * 1024) as f64),
            r.org.wall() / r.one_stream.wall(),
            r.org.median(|s| s.archive) / r.one_stream.wall()
        )
        .unwrap();
        writeln!(w, "\n(b) all tenants, (c) peak RSS").unwrap();
        writeln!(
            w,
            "| measurement | time | client CPU | server CPU | stored | peak RSS | rows/s | source MiB/s | time ratio | bytes ratio | (b) faster, no larger | (c) < 256 MiB |"
        )
        .unwrap();
        writeln!(
            w,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
        )
        .unwrap();
        let dump_t = r.pg_dump.wall();
        let dump_b = r.pg_dump.bytes();
        let line = |w: &mut String, name: &str, s: &Series, ours: bool| {
            let t = s.wall();
            let (tr, br) = (t / dump_t, s.bytes() as f64 / dump_b as f64);
            let rss = s.peak_rss_kib();
            writeln!(
                w,
                "| {name} | {} | {:.2} s | {:.2} s | {} | {} | {:.0} | {:.1} | {tr:.2} | {br:.3} | {} | {} |",
                s.wall_text(2),
                s.cpu(),
                s.server(),
                mib(s.bytes() as f64),
                mib((rss * 1024) as f64),
                r.rows as f64 / t,
                r.table_bytes as f64 / MIB / t,
                if ours { verdict(tr < 1.0 && br <= 1.0) } else { "" },
                if ours { verdict(rss < RSS_TARGET_KIB) } else { "" },
            )
            .unwrap();
        };
        line(
            w,
            "baseline: `pg_dump -Fc -Z 6 -n app -n audit`",
            &r.pg_dump,
            false,
        );
        for (p, s) in &r.ours {
            line(w, &format!("ours: `backup`, parallel = {p}"), s, true);
        }
        line(
            w,
            &format!(
                "ours: `backup`, parallel = {NO_PARALLEL_QUERY_RUN}, role with `max_parallel_workers_per_gather = 0`"
            ),
            &r.ours_no_parallel_query,
            true,
        );
        let setups: Vec<String> = r
            .ours
            .iter()
            .map(|(p, s)| format!("parallel {p}: {:.3} s", s.median(|s| s.setup)))
            .collect();
        writeln!(
            w,
            "\n`backup`, process start to \"snapshot started\": {}",
            setups.join(", ")
        )
        .unwrap();
        writeln!(
            w,
            "\nserver statement time by table: ours = Σ of every tenant's COPY in one extra `backup` \
             (parallel 1); full = one `COPY (SELECT * FROM t) TO STDOUT (FORMAT binary)` of the whole table \
             (what a dump does); from the server log (log_min_duration_statement = 0, set for this step only)"
        )
        .unwrap();
        writeln!(
            w,
            "| table | ours | statements | full-table COPY | ours / full |"
        )
        .unwrap();
        writeln!(w, "|---|---:|---:|---:|---:|").unwrap();
        let (mut ours_total, mut full_total) = (0.0, 0.0);
        for c in &r.costs {
            ours_total += c.ours_ms;
            full_total += c.full_ms;
            writeln!(
                w,
                "| {} | {:.3} s | {} | {:.3} s | {:.1} |",
                c.table,
                c.ours_ms / 1000.0,
                c.statements,
                c.full_ms / 1000.0,
                c.ours_ms / c.full_ms
            )
            .unwrap();
        }
        writeln!(
            w,
            "| total | {:.3} s | | {:.3} s | {:.1} |",
            ours_total / 1000.0,
            full_total / 1000.0,
            ours_total / full_total
        )
        .unwrap();
    }
    writeln!(w, "\n## verdicts\n").unwrap();
    writeln!(
        w,
        "| scale | (a) whole `backup --org` ≤ 1.2× | (a) tenant archive ≤ 1.2× | (b) faster than pg_dump, bytes no larger | (b) with the role's parallel query off | (c) peak RSS < 256 MiB |"
    )
    .unwrap();
    writeln!(w, "|---|---|---|---|---|---|").unwrap();
    for r in results {
        let base = r.pipeline.wall();
        let whole = r.org.wall() / base;
        let archive = r.org.median(|s| s.archive) / base;
        let b_verdict = |name: String, s: &Series| {
            let tr = s.wall() / r.pg_dump.wall();
            let br = s.bytes() as f64 / r.pg_dump.bytes() as f64;
            format!(
                "{name}: {} ({tr:.2}× time, {br:.2}× bytes)",
                verdict(tr < 1.0 && br <= 1.0)
            )
        };
        let b: Vec<String> = r
            .ours
            .iter()
            .map(|(p, s)| b_verdict(format!("p{p}"), s))
            .collect();
        let b_no_pq = b_verdict(
            format!("p{NO_PARALLEL_QUERY_RUN}"),
            &r.ours_no_parallel_query,
        );
        let rss = r
            .ours
            .iter()
            .map(|(_, s)| s.peak_rss_kib())
            .chain([r.ours_no_parallel_query.peak_rss_kib()])
            .max()
            .unwrap_or(0);
        writeln!(
            w,
            "| {} | {} ({whole:.2}×) | {} ({archive:.2}×) | {} | {b_no_pq} | {} ({}) |",
            r.scale,
            verdict(whole <= TENANT_RATIO_TARGET),
            verdict(archive <= TENANT_RATIO_TARGET),
            b.join("; "),
            verdict(rss < RSS_TARGET_KIB),
            mib((rss * 1024) as f64)
        )
        .unwrap();
    }
    writeln!(w, "\ntotal bench time {:.0} s", total.as_secs_f64()).unwrap();
    s
}
