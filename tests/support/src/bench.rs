//! What the benches share: what a benchmark ran on (for its report), the CPU time of a process,
//! sizes on disk, and how figures are printed.

use std::path::Path;
use std::process::Command;

use crate::postgres;

pub struct Machine {
    cpus: String,
    model: String,
    ram: String,
    server: String,
    kernel: String,
}

impl Machine {
    pub fn probe(rt: &tokio::runtime::Runtime, pg: &postgres::Cluster) -> Self {
        let server = rt.block_on(async {
            pg.client("postgres")
                .await
                .query_one("SELECT version()", &[])
                .await
                .map(|r| r.get::<_, String>(0))
                .unwrap_or_default()
        });
        Machine {
            cpus: sh("nproc"),
            model: sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
            ram: sh("free -g | awk '/^Mem:/ {print $2 \" GiB\"}'"),
            server: server.split(" on ").next().unwrap_or_default().to_string(),
            kernel: sh("uname -r"),
        }
    }

    /// One line; `setup` says how the bench runs PostgreSQL, `extra` adds other tools.
    pub fn describe(&self, setup: &str, extra: &str) -> String {
        format!(
            "machine: {} CPU(s) ({}), {} RAM, Linux {}; {} ({setup}){extra}",
            self.cpus,
            if self.model.is_empty() {
                "unknown model"
            } else {
                &self.model
            },
            self.ram,
            self.kernel,
            self.server,
        )
    }
}

/// A shell command's trimmed stdout, empty if it fails.
pub fn sh(command: &str) -> String {
    Command::new("sh")
        .args(["-c", command])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub const MIB: f64 = (1u64 << 20) as f64;

/// `bytes` in MiB, one decimal.
pub fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / MIB)
}

/// A target met or missed, in a report.
pub fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

/// Sum of the sizes of the files under `dir` (0 for what cannot be read).
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`, else 100).
pub fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU seconds of process `pid` from `/proc/<pid>/stat`: `utime` and `stime`, and with
/// `children` also `cutime` and `cstime` (its reaped children's). 0 if it cannot be read.
pub fn proc_cpu_seconds(pid: impl std::fmt::Display, children: bool) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after "pid (comm) ": state is [0]; utime, stime, cutime, cstime are [11..15].
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(if children { 4 } else { 2 })
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    ticks as f64 / clock_ticks()
}

/// The median (the mean of the middle two for an even count; NaN for none).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Prints `problem` (if any) and the bench's `usage` line, then exits: 0 for `--help`, 2 for a
/// bad argument.
pub fn exit_with_usage(problem: &str, usage: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("error: {problem}");
    }
    eprintln!("{usage}");
    std::process::exit(if problem.is_empty() { 0 } else { 2 });
}

/// The arguments of a bench over the fixture: `--scale S --tenants N --runs N` (and the
/// `--bench` cargo passes), with the bench's defaults; anything else exits with `usage`.
pub struct FixtureArgs {
    pub scale: String,
    pub tenants: u32,
    pub runs: usize,
}

impl FixtureArgs {
    pub fn parse(defaults: FixtureArgs, usage: &str) -> FixtureArgs {
        let mut args = defaults;
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            let mut value = || {
                it.next()
                    .unwrap_or_else(|| exit_with_usage(&format!("{arg} needs a value"), usage))
            };
            match arg.as_str() {
                "--scale" => args.scale = value(),
                "--tenants" => {
                    args.tenants = value()
                        .parse()
                        .unwrap_or_else(|_| exit_with_usage("--tenants takes a number", usage))
                }
                "--runs" => {
                    args.runs = value()
                        .parse()
                        .unwrap_or_else(|_| exit_with_usage("--runs takes a number", usage))
                }
                "--bench" => {}
                other => exit_with_usage(&format!("unknown argument {other}"), usage),
            }
        }
        args
    }
}
