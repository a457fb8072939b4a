//! Process and statistics plumbing of the capture bench: shell scripts that panic with their
//! output, the watchdog that outlives nothing, times, percentiles, `/proc` readings and commands
//! under GNU time. (Commands as the clusters' owner: the support crate's `pgbackrest`.)

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use chrono::{DateTime, SecondsFormat, Utc};

use updog_backup_test_support::bench::{median, proc_cpu_seconds};
use updog_backup_test_support::pgbackrest::run;

/// A shell that ends with the first failing command of a pipeline.
pub(crate) fn bash(script: &str, what: &str) -> String {
    run(
        Command::new("bash").args(["-c", &format!("set -euo pipefail\n{script}")]),
        what,
    )
}

/// Stops `pid` (SIGTERM) if this process disappears first: daemons and restored clusters never
/// outlive the bench, however it ends.
pub(crate) fn watchdog(pid: u32, signal: &str, then: &str) {
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

pub(crate) fn secs(d: chrono::TimeDelta) -> f64 {
    d.num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}

pub(crate) fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub(crate) fn parse_time(text: &str) -> Option<DateTime<Utc>> {
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
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// "median (min–max)" or the one value.
pub(crate) fn spread(values: &[f64], digits: usize, unit: &str) -> String {
    let m = median(values);
    if values.len() < 2 {
        return format!("{m:.digits$} {unit}");
    }
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{m:.digits$} {unit} ({min:.digits$}–{max:.digits$})")
}

/// CPU seconds (user + system) of a process so far.
pub(crate) fn proc_cpu(pid: u32) -> f64 {
    proc_cpu_seconds(pid, false)
}

/// A `/proc/<pid>/status` field in KiB (VmRSS, VmHWM).
pub(crate) fn proc_kib(pid: u32, field: &str) -> u64 {
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
pub(crate) struct Timed {
    pub(crate) wall: f64,
    pub(crate) cpu: f64,
    pub(crate) rss_kib: u64,
    pub(crate) stdout: String,
}

pub(crate) fn timed(dir: &Path, cmd: &mut Command, what: &str) -> Timed {
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
