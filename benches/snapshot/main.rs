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
//!   `pg_dump -Fc -Z 6 -n app -n audit` (PostgreSQL 15's pg_dump has no zstd: gzip level 6)
//!   and a full pgBackRest backup of the cluster (`--type=full`, zstd 3, 2 processes; the
//!   cluster runs with `archive_mode=on` for it; its bytes are the backup's own directory).
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
//! Needs `age`, `zstd`, `pgbackrest` and GNU `time` (`apt-get install -y age zstd time pgbackrest`). Loopback only;
//! the cluster is stopped and deleted when this process exits.

//!
//! Files: this one (arguments, preflight, `main`); `scale.rs` (the rounds at one scale),
//! `ours.rs` (our backup), `baselines.rs` (the psql/zstd/age pipelines and pg_dump),
//! `measure.rs` (one command under GNU time, samples and medians), `diagnose.rs` (server time
//! per table), `report.rs` (the tables).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use updog_backup_test_support::bench::Machine;
use updog_backup_test_support::bench::exit_with_usage;
use updog_backup_test_support::postgres;

use crate::report::report;
use crate::scale::bench_scale;

mod baselines;
mod diagnose;
mod measure;
mod ours;
mod report;
mod scale;

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
    exit_with_usage(
        problem,
        "usage: cargo bench --bench snapshot -- [--scales 1,10] [--tenants 100] [--runs 5] [--parallel 1,2,4]",
    )
}

fn main() {
    let args = parse_args();
    preflight();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    // Its own cluster with archive_mode on, for pgBackRest's full backups.
    let pg: &'static postgres::Cluster = Box::leak(Box::new(postgres::start_extra(
        &postgres::ClusterSpec {
            name: "snapshot-bench",
            hba: "local all all trust\nhost all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n",
            extra_options: "-c archive_mode=on",
            prepare: &|_| {},
            without_extensions: &[],
        },
    )));
    let work = tempfile::Builder::new()
        .prefix("updog-bench-")
        .tempdir()
        .expect("temporary directory");
    // pgBackRest runs as the cluster's owner and keeps its repository under here.
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
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
    for (tool, package) in [
        ("age", "age"),
        ("zstd", "zstd"),
        ("pgbackrest", "pgbackrest"),
    ] {
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
