//! pgBackRest beside a test cluster, for the benches that compare with it: its configuration
//! (a repository in a directory, zstd 3, encrypted, 2 processes) and commands run as the
//! clusters' owner.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::postgres::{self, is_root};

/// The stanza of every bench's pgBackRest configuration.
pub const STANZA: &str = "bench";

/// `program` as the clusters' owner (`postgres` when we are root, as the support code does).
pub fn as_owner(program: impl AsRef<std::ffi::OsStr>) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Runs to completion; panics with the output on failure; returns stdout.
pub fn run(cmd: &mut Command, what: &str) -> String {
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

/// A pgBackRest configuration for one cluster, in a directory the cluster's owner can write.
pub struct PgBackRest {
    pub dir: PathBuf,
    pub config: PathBuf,
}

impl PgBackRest {
    pub fn new(base: &Path, pg: &postgres::Cluster) -> Self {
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

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = as_owner("pgbackrest");
        c.arg(format!("--config={}", self.config.display()))
            .arg(format!("--stanza={STANZA}"))
            .args(args);
        c
    }

    pub fn run(&self, args: &[&str]) -> String {
        run(&mut self.command(args), &format!("pgbackrest {args:?}"))
    }

    /// Points the cluster's `archive_command` at this configuration (the cluster runs with
    /// `archive_mode=on`) and creates the stanza.
    pub fn enable(&self, pg: &postgres::Cluster) {
        pg.psql(
            "postgres",
            &[
                "-c",
                &format!(
                    "ALTER SYSTEM SET archive_command = '{}'",
                    self.archive_command()
                ),
                "-c",
                "SELECT pg_reload_conf()",
            ],
        );
        // The reload is asynchronous: let the archiver take it before pgBackRest checks it.
        std::thread::sleep(std::time::Duration::from_millis(500));
        self.run(&["stanza-create"]);
    }

    pub fn archive_command(&self) -> String {
        format!(
            "pgbackrest --config={} --stanza={STANZA} archive-push %p",
            self.config.display()
        )
    }
}
