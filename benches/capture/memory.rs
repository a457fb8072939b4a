//! (c) daemon memory: a freshly started daemon's RSS at idle and its peak (`VmHWM`) while it
//! captures one transaction of `--big-rows` rows, read once covered-until passes its commit.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use chrono::Utc;

use updog_backup_test_support::bench::mib;

use crate::TIMEOUT;
use crate::daemon::{Daemon, Env, PackLine};
use crate::load::{Bench, Source};
use crate::plumbing::secs;

pub(crate) struct Big {
    pub(crate) tenant: String,
    pub(crate) rows: u64,
    pub(crate) insert_seconds: f64,
    pub(crate) idle_rss_kib: u64,
    pub(crate) idle_hwm_kib: u64,
    pub(crate) hwm_kib: u64,
    pub(crate) rss_after_kib: u64,
    /// Commit to covered-until past it.
    pub(crate) capture_seconds: Option<f64>,
    pub(crate) packs: Vec<PackLine>,
    pub(crate) daemon_cpu: f64,
    pub(crate) wal_bytes: i64,
}

impl Bench<'_> {
    /// (c) one large transaction, a fresh daemon.
    pub(crate) fn big(
        &self,
        env: &Env,
        src: &Source,
        problems: &mut Vec<String>,
        stops: &mut Vec<(String, ExitStatus, f64)>,
    ) -> Big {
        let a = self.args;
        let k = a.tenants;
        let tenant = src.tenant(self.rt, k);
        let mut daemon = Daemon::start(env, "big");
        let t0 = src.now(self.rt);
        env.wait_covered(t0, &mut daemon, Duration::from_secs(120))
            .expect("the daemon covers the idle source");
        std::thread::sleep(Duration::from_secs(2));
        let (idle_rss_kib, idle_hwm_kib) = (daemon.kib("VmRSS"), daemon.kib("VmHWM"));
        let cpu0 = daemon.cpu();
        eprintln!(
            "   (c) one transaction of {} rows for tenant {k} ({tenant})…",
            a.big_rows
        );
        let lsn = src.wal_lsn(self.rt);
        let started_at = Utc::now();
        let clock = Instant::now();
        src.psql(&format!(
            "INSERT INTO audit.events (organization_id, actor_id, action, entity, entity_id, details)
             SELECT '{tenant}', md5('user-{k}-1')::uuid, 'import', 'row', g::text,
                    jsonb_build_object('line', g, 'batch', 'bench')
               FROM generate_series(1, {}) g",
            a.big_rows
        ));
        let insert_seconds = clock.elapsed().as_secs_f64();
        let commit = src.now(self.rt);
        let wal_bytes = src.wal_since(self.rt, &lsn);
        let mut max_rss = 0;
        let clock = Instant::now();
        let capture_seconds = loop {
            daemon.assert_running();
            max_rss = max_rss.max(daemon.kib("VmRSS"));
            if env.covered_until().is_some_and(|c| c >= commit) {
                break Some(secs(Utc::now() - commit));
            }
            if clock.elapsed() > TIMEOUT {
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let hwm_kib = daemon.kib("VmHWM");
        let rss_after_kib = daemon.kib("VmRSS");
        let daemon_cpu = daemon.cpu() - cpu0;
        let log = daemon.parse_log();
        problems.extend(log.problems.clone());
        let (status, took) = daemon.stop();
        stops.push(("after (c)".to_string(), status, took));
        eprintln!(
            "   (c) peak RSS {} (idle {}), covered {} after the commit",
            mib(hwm_kib as f64 * 1024.0),
            mib(idle_rss_kib as f64 * 1024.0),
            capture_seconds.map_or("never".into(), |s| format!("{s:.1} s"))
        );
        Big {
            tenant,
            rows: a.big_rows,
            insert_seconds,
            idle_rss_kib,
            idle_hwm_kib,
            hwm_kib: hwm_kib.max(max_rss),
            rss_after_kib,
            capture_seconds,
            packs: log
                .packs
                .into_iter()
                .filter(|p| p.at >= started_at)
                .collect(),
            daemon_cpu,
            wal_bytes,
        }
    }
}
