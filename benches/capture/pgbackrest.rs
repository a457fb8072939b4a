//! pgBackRest for (d): its configuration for one cluster ([`PgBackRest`]), a cluster it
//! restored ([`Restored`], stopped and deleted on drop), and [`Bench::pgbackrest_restore`]:
//! restore to T, recovery, and the tenant's rows copied out.

use std::fmt::Write as _;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use updog_backup_test_support::bench::dir_bytes;
use updog_backup_test_support::fixture::TENANT_FILTERS;
use updog_backup_test_support::postgres;

use crate::TIMEOUT;
use crate::load::Bench;
use crate::plumbing::{bash, watchdog};
pub(crate) use updog_backup_test_support::pgbackrest::PgBackRest;
use updog_backup_test_support::pgbackrest::{as_owner, run};

#[derive(Clone, Copy)]
pub(crate) struct PgBackRestRun {
    pub(crate) restore: f64,
    pub(crate) recovery: f64,
    pub(crate) extract: f64,
    pub(crate) restored_bytes: u64,
}

impl PgBackRestRun {
    pub(crate) fn total(&self) -> f64 {
        self.restore + self.recovery + self.extract
    }
}

/// A cluster pgBackRest restored, stopped and deleted on drop.
pub(crate) struct Restored {
    pub(crate) data: PathBuf,
    pub(crate) bin: PathBuf,
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
    /// pgBackRest's point-in-time restore of the whole cluster into a new data directory, the
    /// recovery up to T, then the tenant's rows copied into a fresh database on `pg`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn pgbackrest_restore(
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
