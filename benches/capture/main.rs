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
//!
//! Files: this one (arguments, preflight, `main`); `rate.rs` (a), `replay.rs` (b), `memory.rs`
//! (c), `pitr.rs` and `pgbackrest.rs` (d); `daemon.rs` (source database, the binary's
//! environment, the daemon), `load.rs` (pgbench), `plumbing.rs` (processes, times,
//! statistics), `report.rs` (the tables).

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use updog_backup_test_support::bench::exit_with_usage;
use updog_backup_test_support::bench::{Machine, loadavg, sh};
use updog_backup_test_support::postgres;

use crate::load::Bench;
use crate::report::report;

mod daemon;
mod load;
mod memory;
mod pgbackrest;
mod pitr;
mod plumbing;
mod rate;
mod replay;
mod report;

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
    exit_with_usage(
        problem,
        "usage: cargo bench --bench capture -- [--smoke] [--tenants 100] [--scale 1] [--clients 8] \
         [--duration 60] [--backlog 30] [--events 6] [--skew 1.1] [--big-rows 1000000] \
         [--hour-changes 360000] [--runs 3] [--flush-interval SECONDS] [--parts a,b,c,d]\n\
         (b and c run with a: they use its cluster and load)",
    )
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
