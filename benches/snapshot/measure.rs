//! Measuring one command: [`measure`] runs it under GNU time (wall, CPU with its children,
//! peak RSS) and reads the server's CPU for it; [`Sample`] is one run reduced to what the report
//! needs, [`Series`] the repeated runs of one measurement and their medians.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use updog_backup_test_support::bench::proc_cpu_seconds;
use updog_backup_test_support::postgres;

use crate::TIMEOUT;

/// One measured process.
pub(crate) struct Outcome {
    pub(crate) wall: f64,
    /// User + system CPU seconds of the process and the children it waited for (GNU time).
    pub(crate) cpu: f64,
    /// CPU seconds of the PostgreSQL backends that served it (see [`server_cpu`]).
    pub(crate) server: f64,
    pub(crate) rss_kib: u64,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    pub(crate) spawned_at: DateTime<Utc>,
}

/// CPU seconds the cluster's processes have used: the postmaster's own plus its reaped
/// children's (`cutime`, `cstime`), so that a backend's cost is counted once it has exited,
/// whatever else runs on the machine.
pub(crate) fn server_cpu(pg: &postgres::Cluster) -> f64 {
    let pid = fs::read_to_string(pg.dir.join("data/postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default();
    proc_cpu_seconds(pid, true)
}

/// Runs `program args` under GNU time, in its own process group so a timeout can stop the
/// whole pipeline; panics (ending the bench) on failure.
pub(crate) fn measure(
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
pub(crate) struct Sample {
    pub(crate) wall: f64,
    /// Client CPU seconds (the command and its children).
    pub(crate) cpu: f64,
    /// Server CPU seconds (the backends that served it).
    pub(crate) server: f64,
    pub(crate) rss_kib: u64,
    /// Stored bytes: ours, the snapshot's files; the baselines, their output file.
    pub(crate) bytes: u64,
    /// Ours with `--org`: the tenant archive's own export time, from the debug log.
    pub(crate) archive: f64,
    /// Ours: process start to "snapshot started" (connect, catalog, slot + exported snapshot).
    pub(crate) setup: f64,
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
pub(crate) struct Series(pub(crate) Vec<Sample>);

impl Series {
    pub(crate) fn median(&self, f: impl Fn(&Sample) -> f64) -> f64 {
        let v: Vec<f64> = self.0.iter().map(f).collect();
        updog_backup_test_support::bench::median(&v)
    }
    pub(crate) fn wall(&self) -> f64 {
        self.median(|s| s.wall)
    }
    /// "median s (min–max)" of the wall times.
    pub(crate) fn wall_text(&self, digits: usize) -> String {
        let walls = self.0.iter().map(|s| s.wall);
        let min = walls.clone().fold(f64::INFINITY, f64::min);
        let max = walls.fold(f64::NEG_INFINITY, f64::max);
        format!("{:.digits$} s ({min:.digits$}–{max:.digits$})", self.wall())
    }
    pub(crate) fn cpu(&self) -> f64 {
        self.median(|s| s.cpu)
    }
    pub(crate) fn server(&self) -> f64 {
        self.median(|s| s.server)
    }
    pub(crate) fn bytes(&self) -> u64 {
        self.median(|s| s.bytes as f64).round() as u64
    }
    pub(crate) fn peak_rss_kib(&self) -> u64 {
        self.0.iter().map(|s| s.rss_kib).max().unwrap_or(0)
    }
}
