//! What a benchmark ran on, for its report: shared by the benches (`#[path]`-included, as
//! benches cannot share a library module of their own).

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
