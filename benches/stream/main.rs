//! Restore cost against stream length (issue 12): how the time and the S3 requests of restoring
//! one tenant, of `list --org`, `verify` and of the daemon's start-up grow with the number of
//! packs the change stream holds, on a local S3 and on one with a remote S3's round trip.
//!
//! ```sh
//! cargo bench --bench stream             # = -- --sizes 100,1000,10000 --round-trips 0,20, about 16 minutes
//! cargo bench --bench stream -- --smoke  # = -- --sizes 50,200 --tenants 8 --scale 0.1, about 2 minutes
//! ```
//!
//! It starts a private PostgreSQL and SeaweedFS (the tests' support crate, tests/support: real
//! servers on 127.0.0.1, credentials generated for the run), loads the reference fixture with the
//! REPLICA IDENTITY fixes `check` asks for, and uses the release binary as a user would (keygen,
//! config, `init`, `daemon`, `restore`, `list`, `verify`), its S3 repository reached through the
//! support crate's loopback proxy, which counts every HTTP request and can add a round trip to
//! each (`Mode::Latency`).
//!
//! The stream grows in steps: for each size N of `--sizes`, the daemon runs (`stream.flush_interval`
//! `--flush-interval`, 20 ms, so packs come quickly) under a paced load of `--rate` small
//! transactions a second (the e2e oracle's random changes: inserts, updates and deletes of
//! audit events, lots and funds), each of one tenant: tenant 1 (the busiest) draws `--busy-share`
//! of them, tenants 2 … T−1 the rest (zipfian), tenant T (the idle one) none, so it is untouched
//! since the snapshot `init` took. Once N packs are stored, the load stops, the daemon stores
//! what is left and stops (SIGTERM). What the daemon sent through the proxy meanwhile is its
//! write cost (per 1,000 packs: the packs, the progress rewrites, index objects when the binary
//! writes them). Then, for each added round trip of `--round-trips` (0 and 20 ms):
//!
//! - `restore --org <tenant> --latest --json` of the idle tenant, the median one (tenant T/2)
//!   and the busiest; each restored database is compared with the source table by table (row
//!   count + md5 of every row), then dropped;
//! - `list --org <busiest>` and `verify` (without `--deep`);
//! - the daemon's start-up: from spawning it until `/status` says `capturing` (and until its log
//!   says `capture started`), and the requests it made by then; then SIGTERM.
//!
//! Every command is timed as a whole (wall clock) and its requests counted. A command whose time
//! at a round trip, predicted from the smallest round trip's run (its time + its requests × the
//! added round trip, as requests made one after another would take), exceeds `--budget` seconds
//! is not run: the table shows the prediction, marked `est.`. That keeps the full run near
//! 16 minutes while today's code makes one request per pack; once restores make a bounded number
//! of requests, every cell runs.
//!
//! `stream.index_window` (`--index-window`) is passed only when the binary knows the setting
//! (the report says which), so the same bench measures the code before and after the index.
//! Tables on stdout, progress on stderr. Loopback only; the servers, daemons and temporary
//! directories are removed when this process exits.
//!
//! Files: this one (arguments, preflight, `main`); `grow.rs` (the repository, the load and the
//! daemon that grows the stream); `measure.rs` (the measured commands and the budget);
//! `report.rs` (the tables).

use std::time::Instant;

use updog_backup_test_support::bench::{Machine, exit_with_usage, loadavg};
use updog_backup_test_support::postgres;

use crate::grow::Stream;
use crate::measure::SizeResult;

mod grow;
mod measure;
mod report;

/// The binary cargo built for this bench (bench profile = release settings).
const BIN: &str = env!("CARGO_BIN_EXE_updog-backup");

struct Args {
    /// Packs stored at each measurement, ascending.
    sizes: Vec<u64>,
    /// Added round trips in ms, ascending.
    round_trips: Vec<u64>,
    tenants: u32,
    scale: String,
    /// Transactions per second of the load.
    rate: u32,
    busy_share: f64,
    flush_interval_ms: u64,
    /// `stream.index_window` to pass (when the binary knows it); `None`: its default.
    index_window: Option<u64>,
    /// Seconds a command may be predicted to take before it is estimated instead of run.
    budget: f64,
    /// Another updog-backup binary (an earlier release) whose restores run beside this one's
    /// on the same repository, for a side-by-side comparison in one run.
    baseline: Option<String>,
    smoke: bool,
}

impl Args {
    fn command_line(&self) -> String {
        let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        let mut s = format!(
            "cargo bench --bench stream -- --sizes {} --round-trips {} --tenants {} --scale {} \
             --rate {} --busy-share {} --flush-interval {}ms --budget {}",
            list(&self.sizes),
            list(&self.round_trips),
            self.tenants,
            self.scale,
            self.rate,
            self.busy_share,
            self.flush_interval_ms,
            self.budget
        );
        if let Some(w) = self.index_window {
            s.push_str(&format!(" --index-window {w}"));
        }
        if let Some(b) = &self.baseline {
            s.push_str(&format!(" --baseline {b}"));
        }
        s
    }

    /// The fixture tenants the report follows: (label, fixture number).
    fn followed(&self) -> [(&'static str, u32); 3] {
        [
            ("idle", self.tenants),
            ("median", self.median_tenant()),
            ("busiest", 1),
        ]
    }

    /// The middle of the loaded tenants 2 … T−1 by their share of the load.
    fn median_tenant(&self) -> u32 {
        (self.tenants / 2).max(2)
    }
}

fn parse_args() -> Args {
    let mut args = Args {
        sizes: vec![100, 1_000, 10_000],
        round_trips: vec![0, 20],
        tenants: 20,
        scale: "0.2".into(),
        rate: 200,
        busy_share: 0.3,
        flush_interval_ms: 20,
        index_window: None,
        budget: 120.0,
        baseline: None,
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
        fn ascending(v: String, what: &str, zero: bool) -> Vec<u64> {
            let mut out: Vec<u64> = v
                .split(',')
                .map(|x| {
                    x.trim()
                        .parse()
                        .ok()
                        .filter(|n| zero || *n > 0)
                        .unwrap_or_else(|| usage(&format!("{what}: comma-separated numbers")))
                })
                .collect();
            out.sort_unstable();
            out.dedup();
            out
        }
        match name.as_str() {
            // cargo bench passes --bench to every bench target.
            "--bench" => {}
            "--smoke" => {
                args.smoke = true;
                args.sizes = vec![50, 200];
                args.tenants = 8;
                args.scale = "0.1".into();
            }
            "--sizes" => args.sizes = ascending(value(), "--sizes", false),
            "--round-trips" => args.round_trips = ascending(value(), "--round-trips", true),
            "--tenants" => {
                args.tenants = positive(value(), "--tenants");
                if args.tenants < 4 {
                    usage("--tenants: at least 4 (idle, median, busiest and one more)");
                }
            }
            "--scale" => {
                let v = value();
                let _: f64 = positive(v.clone(), "--scale");
                args.scale = v;
            }
            "--rate" => args.rate = positive(value(), "--rate"),
            "--busy-share" => {
                args.busy_share = value()
                    .parse()
                    .ok()
                    .filter(|s: &f64| (0.0..1.0).contains(s))
                    .unwrap_or_else(|| usage("--busy-share: a fraction, 0 to 1 excluded"))
            }
            "--flush-interval" => {
                let v = value();
                args.flush_interval_ms = positive(
                    v.trim_end_matches("ms").to_string(),
                    "--flush-interval (ms)",
                )
            }
            "--index-window" => args.index_window = Some(positive(value(), "--index-window")),
            "--budget" => args.budget = positive(value(), "--budget"),
            "--baseline" => {
                let path = value();
                if !std::path::Path::new(&path).is_file() {
                    usage(&format!("--baseline {path}: no such binary"));
                }
                args.baseline = Some(path);
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
        "usage: cargo bench --bench stream -- [--smoke] [--sizes 100,1000,10000] [--round-trips 0,20] \
         [--tenants 20] [--scale 0.2] [--rate 200] [--busy-share 0.3] [--flush-interval 20ms] \
         [--index-window N] [--budget 120] [--baseline PATH]\n\
         (sizes: packs stored at each measurement; round trips: ms added to every S3 request; \
         budget: seconds a command may be predicted to take before it is estimated instead of run; \
         baseline: an earlier updog-backup binary whose restores run beside this one's)",
    )
}

fn main() {
    let args = parse_args();
    preflight();
    let started = Instant::now();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let pg = rt.block_on(postgres::cluster());
    let machine = Machine::probe(&rt, pg);
    let setup = "private cluster, fsync=off, loopback TCP; SeaweedFS S3 through a counting proxy";
    eprintln!("{}", machine.describe(setup, ""));
    eprintln!("binary: {BIN}");
    let loadavg_before = loadavg();
    let mut stream = Stream::new(&rt, pg, &args);
    let mut sizes: Vec<SizeResult> = Vec::new();
    for &target in &args.sizes {
        stream.grow_to(target);
        sizes.push(measure::at_size(&stream));
    }
    println!(
        "{}",
        report::report(
            &machine,
            setup,
            &args,
            &stream,
            &sizes,
            (&loadavg_before, &loadavg()),
            started.elapsed()
        )
    );
}

/// Fails early, with the fix, when something is missing.
fn preflight() {
    // The support crate's runner (TestEnv) finds the binary by path; it must be this bench's.
    let found = std::path::Path::new(updog_backup_test_support::bin()).canonicalize();
    let ours = std::path::Path::new(BIN).canonicalize();
    if found.is_err() || found.as_ref().ok() != ours.as_ref().ok() {
        eprintln!(
            "error: the support crate runs {} but this bench was built with {BIN}: run it with cargo bench",
            updog_backup_test_support::bin()
        );
        std::process::exit(2);
    }
}
