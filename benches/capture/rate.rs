//! (a) capture rate and lag on the shared cluster of (a)–(c): [`Bench::capture`] loads the source
//! under a live daemon (rate, kept up, commit-to-durable lag, RSS and CPU), then a backlog with
//! the daemon stopped and its drain; it goes on with (c) ([`crate::memory`]) and (b)
//! ([`crate::replay`]) on the same repository.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use chrono::Utc;

use updog_backup_test_support::postgres;

use crate::TIMEOUT;
use crate::daemon::{Daemon, Env, PackLine, source_db};
use crate::load::{Amount, Bench, Load, Samples, Source};
use crate::memory::Big;
use crate::plumbing::{proc_cpu, secs};
use crate::replay::ReplayResult;

pub(crate) struct CaptureResult {
    pub(crate) db_rows: i64,
    pub(crate) init_seconds: f64,
    // (a) live
    pub(crate) idle_rss_start_kib: u64,
    pub(crate) live: Load,
    pub(crate) live_samples: Samples,
    pub(crate) live_packs: Vec<PackLine>,
    pub(crate) live_catch_up: Option<f64>,
    pub(crate) live_daemon_cpu: f64,
    pub(crate) live_walsender_cpu: f64,
    pub(crate) live_hwm_kib: u64,
    pub(crate) change_bytes_live: u64,
    // (a) backlog
    pub(crate) backlog: Option<Backlog>,
    // (c)
    pub(crate) big: Option<Big>,
    // (b)
    pub(crate) replays: Vec<ReplayResult>,
    pub(crate) problems: Vec<String>,
    pub(crate) stops: Vec<(String, ExitStatus, f64)>,
    pub(crate) busy_changes_share: f64,
}

pub(crate) struct Backlog {
    pub(crate) load: Load,
    pub(crate) packs: Vec<PackLine>,
    /// Daemon start (its "capture started" line) to the last pack with the backlog.
    pub(crate) drain_seconds: f64,
    /// Daemon start to the walsender having sent everything of the backlog (decoded, and
    /// taken by the daemon but for what the socket buffers hold).
    pub(crate) decoded_seconds: Option<f64>,
    pub(crate) startup_seconds: f64,
    /// Daemon start ("capture started") to covered-until past the end of the backlog.
    pub(crate) covered_after: Option<f64>,
    pub(crate) daemon_cpu: f64,
    pub(crate) walsender_cpu: f64,
    pub(crate) hwm_kib: u64,
    /// The same backlog drained by a daemon into a format-2 repository (one key for every
    /// tenant), after this one: what per-tenant keys cost.
    pub(crate) format2: Drain,
}

/// A daemon started on a backlog: capture started to the last pack with it, and its CPU.
pub(crate) struct Drain {
    pub(crate) seconds: f64,
    pub(crate) daemon_cpu: f64,
    pub(crate) packs: usize,
}

/// The second repository's slot (format 2), for the backlog's comparison.
const FORMAT2_SLOT: &str = "updog_backup_format2";

impl Bench<'_> {
    pub(crate) fn capture(&self, pg: &'static postgres::Cluster) -> CaptureResult {
        let a = self.args;
        eprintln!(
            "\n== (a)–(c): fixture {} tenants, scale {}…",
            a.tenants, a.scale
        );
        let db = self.rt.block_on(source_db(pg, "capture", a));
        let src = self.source(pg, &db);
        let db_rows: i64 = self
            .rt
            .block_on(src.client.query_one(
                "SELECT sum(n_live_tup)::bigint FROM pg_stat_user_tables WHERE schemaname IN ('app', 'audit')",
                &[],
            ))
            .unwrap()
            .get(0);
        let env = Env::new(pg, self.work, "capture", &db, a);
        let clock = Instant::now();
        env.ok(&["init"]);
        let init_seconds = clock.elapsed().as_secs_f64();
        let mut problems = Vec::new();
        let mut stops = Vec::new();

        // (a) live.
        let mut daemon = Daemon::start(&env, "live");
        let t0 = src.now(self.rt);
        env.wait_covered(t0, &mut daemon, Duration::from_secs(120))
            .expect("the daemon covers the idle source within 2 minutes");
        std::thread::sleep(Duration::from_secs(2));
        let idle_rss_start_kib = daemon.kib("VmRSS");
        let walsender = src.walsender(self.rt).expect("the daemon's walsender");
        let (cpu0, ws0) = (daemon.cpu(), proc_cpu(walsender));
        eprintln!("   (a) {} clients, {} s of pgbench…", a.clients, a.duration);
        let started_at = Utc::now();
        let mut samples = Samples::default();
        let live = self.load(&src, Amount::Seconds(a.duration), || {
            if let Some(c) = env.covered_until() {
                samples.max_covered_lag = samples.max_covered_lag.max(secs(Utc::now() - c));
            }
            samples.max_slot_lag_bytes = samples.max_slot_lag_bytes.max(src.slot_lag(self.rt));
            samples.max_rss_kib = samples.max_rss_kib.max(daemon.kib("VmRSS"));
        });
        let end = live.end.unwrap();
        // Measured from the end of the load: `load` already waited 1.5 s for the statistics.
        let waited = env.wait_covered(end, &mut daemon, Duration::from_secs(600));
        let live_catch_up = waited.map(|_| secs(Utc::now() - end));
        let live_daemon_cpu = daemon.cpu() - cpu0;
        let live_walsender_cpu = proc_cpu(walsender) - ws0;
        let live_hwm_kib = daemon.kib("VmHWM");
        let log = daemon.parse_log();
        let live_packs: Vec<PackLine> = log
            .packs
            .iter()
            .filter(|p| p.at >= started_at)
            .cloned()
            .collect();
        let change_bytes_live = env.change_bytes();
        eprintln!(
            "   (a) generated {} row changes ({:.0}/s), captured {} in {} packs; covered {} after the load",
            live.changes,
            live.changes as f64 / live.wall,
            live_packs.iter().map(|p| p.changes).sum::<u64>(),
            live_packs.len(),
            live_catch_up.map_or("never".into(), |s| format!("{s:.1} s")),
        );
        problems.extend(log.problems);
        let (status, took) = daemon.stop();
        stops.push(("after (a)".to_string(), status, took));

        // (a) backlog: load while the daemon is down, then its drain.
        let backlog =
            (a.backlog > 0).then(|| self.backlog(pg, &db, &env, &src, &mut problems, &mut stops));

        // (c) one large transaction, a fresh daemon.
        let big = a
            .parts
            .c
            .then(|| self.big(&env, &src, &mut problems, &mut stops));

        // (b) restores of the busiest tenant (and of the large transaction's tenant).
        let busy_tenant = src.tenant(self.rt, 1);
        let busy_changes_share = {
            // Tenant k's share of the zipfian choice.
            let h: f64 = (1..=a.tenants).map(|k| (k as f64).powf(-a.skew)).sum();
            1.0 / h
        };
        let replays = self.replays(pg, &env, &busy_tenant, big.as_ref());
        // `list` agrees with the state file the bench polled.
        let listed = env.list_covered();
        assert_eq!(
            listed,
            env.covered_until(),
            "`list --json` and changes/progress.json disagree"
        );
        CaptureResult {
            db_rows,
            init_seconds,
            idle_rss_start_kib,
            live,
            live_samples: samples,
            live_packs,
            live_catch_up,
            live_daemon_cpu,
            live_walsender_cpu,
            live_hwm_kib,
            change_bytes_live,
            backlog,
            big,
            replays,
            problems,
            stops,
            busy_changes_share,
        }
    }

    /// (a) backlog: load while the daemon is down, then its drain.
    fn backlog(
        &self,
        pg: &'static postgres::Cluster,
        db: &str,
        env: &Env,
        src: &Source,
        problems: &mut Vec<String>,
        stops: &mut Vec<(String, ExitStatus, f64)>,
    ) -> Backlog {
        let a = self.args;
        // A format-2 repository of the same source, its slot made now: it drains the same
        // backlog after the format-3 daemon, alone.
        let format2 = Env::with_slot(pg, self.work, "capture-format2", db, a, FORMAT2_SLOT);
        format2.ok(&["init", "--format-version", "2"]);
        eprintln!(
            "   (a) backlog: {} s of pgbench with the daemon stopped…",
            a.backlog
        );
        let load = self.load(src, Amount::Seconds(a.backlog), || {});
        let end = load.end.unwrap();
        let mut daemon = Daemon::start(env, "backlog");
        let spawned = daemon.spawned_at;
        let mut walsender = None;
        let clock = Instant::now();
        while walsender.is_none() && clock.elapsed() < Duration::from_secs(30) {
            walsender = src.walsender(self.rt);
            std::thread::sleep(Duration::from_millis(20));
        }
        let (cpu0, ws0) = (daemon.cpu(), walsender.map(proc_cpu).unwrap_or(0.0));
        let mut decoded_at = None;
        if let Some(pid) = walsender {
            while clock.elapsed() < TIMEOUT {
                if src.sent_past(self.rt, pid, &load.end_lsn) {
                    decoded_at = Some(Utc::now());
                    break;
                }
                daemon.assert_running();
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let covered_at = env
            .wait_covered(end, &mut daemon, Duration::from_secs(600))
            .map(|_| Utc::now());
        let daemon_cpu = daemon.cpu() - cpu0;
        let walsender_cpu = walsender.map(proc_cpu).unwrap_or(0.0) - ws0;
        let hwm_kib = daemon.kib("VmHWM");
        let log = daemon.parse_log();
        let started = log.capture_started.unwrap_or(spawned);
        let last = log.packs.last().map_or(started, |p| p.at);
        problems.extend(log.problems.clone());
        let (status, took) = daemon.stop();
        stops.push(("after the backlog".to_string(), status, took));
        eprintln!(
            "   (a) backlog of {} row changes drained in {:.1} s",
            load.changes,
            secs(last - started)
        );
        let mut daemon = Daemon::start(&format2, "backlog-format2");
        let cpu0 = daemon.cpu();
        format2
            .wait_covered(end, &mut daemon, Duration::from_secs(600))
            .expect("the format-2 daemon drains the backlog");
        let daemon_cpu_format2 = daemon.cpu() - cpu0;
        let log2 = daemon.parse_log();
        let started2 = log2.capture_started.unwrap_or(daemon.spawned_at);
        let last2 = log2.packs.last().map_or(started2, |p| p.at);
        problems.extend(log2.problems.clone());
        let (status, took) = daemon.stop();
        stops.push(("after the format-2 backlog".to_string(), status, took));
        // Its slot would hold WAL for the rest of the bench.
        self.rt
            .block_on(
                src.client
                    .execute("SELECT pg_drop_replication_slot($1)", &[&FORMAT2_SLOT]),
            )
            .unwrap();
        eprintln!(
            "   (a) the same backlog into a format-2 repository: {:.1} s",
            secs(last2 - started2)
        );
        Backlog {
            format2: Drain {
                seconds: secs(last2 - started2),
                daemon_cpu: daemon_cpu_format2,
                packs: log2.packs.len(),
            },
            load,
            drain_seconds: secs(last - started),
            decoded_seconds: decoded_at.map(|d| secs(d - started)),
            startup_seconds: secs(started - spawned),
            packs: log.packs,
            covered_after: covered_at.map(|c| secs(c - started)),
            daemon_cpu,
            walsender_cpu,
            hwm_kib,
        }
    }
}
