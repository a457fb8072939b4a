//! The repository and the stream it grows: the source database, the release binary's
//! environment with its S3 repository behind the counting proxy ([`Stream`]), the paced load,
//! and [`Stream::grow_to`], which runs the daemon under that load until the stream holds N packs.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;

use updog_backup_test_support::daemon::Daemon;
use updog_backup_test_support::oracle::{States, now, random_change, state};
use updog_backup_test_support::postgres::{self, cluster};
use updog_backup_test_support::proxy::{Mode, Proxy};
use updog_backup_test_support::{Repo, TestEnv, fixture_tenant, seaweed, try_http_get};

use crate::Args;

const INDEX_WINDOW_VAR: &str = "UPDOG_BACKUP__STREAM__INDEX_WINDOW";
/// No wait for the daemon may take longer (keeps the bench bounded).
const TIMEOUT: Duration = Duration::from_secs(1800);

pub(crate) struct Stream<'a> {
    pub(crate) rt: &'a tokio::runtime::Runtime,
    pub(crate) args: &'a Args,
    pub(crate) db: String,
    pub(crate) env: TestEnv,
    pub(crate) proxy: Proxy,
    pub(crate) source: tokio_postgres::Client,
    /// Fixture tenants 1 … T by number (index 0 is tenant 1).
    pub(crate) tenants: Vec<String>,
    /// What the binary was given for `stream.index_window`, for the report.
    pub(crate) index_setting: String,
    pub(crate) db_rows: i64,
    /// Transactions of the load per tenant so far (index 0 is tenant 1).
    pub(crate) transactions: Vec<u64>,
    pub(crate) packs: u64,
    pub(crate) steps: Vec<GrowStep>,
}

/// One step of growth: the daemon from start to stop under the load.
#[derive(Clone)]
pub(crate) struct GrowStep {
    pub(crate) packs_before: u64,
    pub(crate) packs_after: u64,
    pub(crate) seconds: f64,
    pub(crate) transactions: u64,
    /// Requests the daemon made through the proxy over its whole run, by method.
    pub(crate) requests: BTreeMap<String, u64>,
}

impl GrowStep {
    pub(crate) fn added(&self) -> u64 {
        self.packs_after - self.packs_before
    }
}

impl<'a> Stream<'a> {
    pub(crate) fn new(
        rt: &'a tokio::runtime::Runtime,
        pg: &postgres::Cluster,
        args: &'a Args,
    ) -> Self {
        eprintln!("fixture: {} tenants, scale {} …", args.tenants, args.scale);
        let db = rt.block_on(pg.capture_fixture_db("stream_bench", args.tenants, &args.scale));
        pg.psql(&db, &["-c", "VACUUM (FREEZE, ANALYZE)"]);
        let (mut env, proxy) = rt.block_on(async {
            let mut env = TestEnv::new(&db, Repo::S3).await;
            let proxy = Proxy::in_front_of_s3(&mut env).await;
            (env, proxy)
        });
        for (k, v) in [
            (
                "UPDOG_BACKUP__STREAM__FLUSH_INTERVAL",
                format!("{}ms", args.flush_interval_ms),
            ),
            // No scheduled snapshot during the bench: a newer base would change what every
            // restore reads.
            (
                "UPDOG_BACKUP__SCHEDULE__SNAPSHOT",
                "0 0 0 1 1 * 2099".into(),
            ),
        ] {
            env.env.push((k.into(), v));
        }
        let window = args
            .index_window
            .map_or("64".to_string(), |w| w.to_string());
        let index_setting = if !env.accepts_setting(INDEX_WINDOW_VAR, &window) {
            "none: the binary has no `stream.index_window` (the code before the index)".to_string()
        } else if let Some(w) = args.index_window {
            env.env.push((INDEX_WINDOW_VAR.into(), w.to_string()));
            format!("`stream.index_window` = {w}")
        } else {
            "`stream.index_window` at the binary's default".to_string()
        };
        eprintln!("stream index: {index_setting}");
        let init = env.ok(&["init"]);
        eprintln!("{}", init.lines().last().unwrap_or_default());
        let (source, tenants, db_rows) = rt.block_on(async {
            let source = pg.client(&db).await;
            let mut tenants = Vec::new();
            for k in 1..=args.tenants {
                tenants.push(fixture_tenant(k).await);
            }
            let rows: i64 = source
                .query_one(
                    "SELECT coalesce(sum(n_live_tup), 0)::bigint FROM pg_stat_user_tables
                      WHERE schemaname IN ('app', 'audit')",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (source, tenants, rows)
        });
        Stream {
            rt,
            args,
            db,
            env,
            proxy,
            source,
            transactions: vec![0; tenants.len()],
            tenants,
            index_setting,
            db_rows,
            packs: 0,
            steps: Vec::new(),
        }
    }

    pub(crate) fn tenant(&self, k: u32) -> &str {
        &self.tenants[k as usize - 1]
    }

    /// `env`'s command, talking to SeaweedFS directly rather than through the proxy (polls that
    /// must not count as the daemon's requests).
    pub(crate) fn direct(&self, args: &[&str]) -> String {
        let endpoint = self.rt.block_on(seaweed::s3()).endpoint().to_string();
        let out = self
            .env
            .command(args)
            .env("UPDOG_BACKUP__STORAGE__S3_ENDPOINT", endpoint)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "updog-backup {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `list --json`'s stream line.
    pub(crate) fn stream_line(&self) -> Value {
        let list: Value =
            serde_json::from_str(&self.direct(&["list", "--json"])).expect("list --json is JSON");
        list["stream"].clone()
    }

    /// Every tenant's state in the source now (the load is stopped): what restores must equal.
    pub(crate) fn states(&self) -> States {
        self.rt.block_on(async {
            let mut out = States::new();
            for (_, k) in self.args.followed() {
                let t = self.tenant(k).to_string();
                let s = state(&self.source, &t).await;
                out.insert(t, s);
            }
            out
        })
    }

    /// Runs the daemon under the load until the stream holds at least `target` packs, then
    /// stops both once everything committed is stored.
    pub(crate) fn grow_to(&mut self, target: u64) {
        let before = self.packs;
        eprintln!("growing the stream from {before} to {target} packs …");
        self.proxy.set(Mode::Pass);
        self.proxy.reset_requests();
        let clock = Instant::now();
        let mut daemon = start_daemon(&self.env);
        wait_capturing(&mut daemon);
        let stop = Arc::new(AtomicBool::new(false));
        let load = self.rt.spawn(load(
            self.db.clone(),
            self.tenants.clone(),
            weights(self.args),
            self.args.rate,
            stop.clone(),
        ));
        let mut next_report = Instant::now() + Duration::from_secs(10);
        loop {
            daemon.assert_running();
            let stored = before + packs_logged(&daemon);
            if stored >= target {
                break;
            }
            if Instant::now() >= next_report {
                let rate = (stored - before) as f64 / clock.elapsed().as_secs_f64();
                eprintln!("   {stored} packs ({rate:.1} packs/s)");
                next_report += Duration::from_secs(10);
            }
            assert!(
                clock.elapsed() < TIMEOUT,
                "{target} packs not stored within {TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        stop.store(true, Ordering::SeqCst);
        let counts = self.rt.block_on(load).unwrap();
        let last = self.rt.block_on(now(&self.source));
        self.wait_covered(last, &mut daemon);
        let status = daemon.terminate();
        assert!(status.success(), "the daemon's stop: {status}");
        let seconds = clock.elapsed().as_secs_f64();
        let packs = self.stream_line()["packs"].as_u64().unwrap_or(0);
        for (total, n) in self.transactions.iter_mut().zip(&counts) {
            *total += n;
        }
        self.packs = packs;
        let step = GrowStep {
            packs_before: before,
            packs_after: packs,
            seconds,
            transactions: counts.iter().sum(),
            requests: self.proxy.requests_by_method(),
        };
        eprintln!(
            "   {packs} packs stored ({} added in {seconds:.1} s, {} transactions); the daemon made {} requests",
            step.added(),
            step.transactions,
            step.requests.values().sum::<u64>()
        );
        self.steps.push(step);
    }

    fn wait_covered(&self, t: DateTime<Utc>, daemon: &mut Daemon) {
        let clock = Instant::now();
        loop {
            daemon.assert_running();
            let covered: Option<DateTime<Utc>> = self.stream_line()["covered_until"]
                .as_str()
                .and_then(|c| c.parse().ok());
            if covered.is_some_and(|c| c >= t) {
                return;
            }
            assert!(
                clock.elapsed() < TIMEOUT,
                "covered-until never reached {t}\n{}",
                daemon.output()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// The daemon, stopped with SIGTERM if this bench disappears first (it would retry forever
/// against servers that are gone).
pub(crate) fn start_daemon(env: &TestEnv) -> Daemon {
    let daemon = Daemon::start(env);
    let (me, pid) = (std::process::id(), daemon.pid());
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do kill -0 {pid} 2>/dev/null || exit 0; sleep 1; done; \
         kill -TERM {pid} 2>/dev/null"
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
    daemon
}

/// Waits until `/status` says the daemon captures; the seconds waited.
pub(crate) fn wait_capturing(daemon: &mut Daemon) -> f64 {
    let clock = Instant::now();
    loop {
        daemon.assert_running();
        if let Some((200, body)) = try_http_get(daemon.addr, "/status", None)
            && serde_json::from_str::<Value>(&body).is_ok_and(|s| s["capturing"] == true)
        {
            return clock.elapsed().as_secs_f64();
        }
        assert!(
            clock.elapsed() < TIMEOUT,
            "the daemon never captured:\n{}",
            daemon.output()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// "pack stored" lines in the daemon's log: packs it stored so far.
fn packs_logged(daemon: &Daemon) -> u64 {
    daemon
        .output()
        .lines()
        .filter(|l| l.contains("\"pack stored\""))
        .count() as u64
}

/// Each tenant's share of the load (index 0 is tenant 1): the busiest its `--busy-share`,
/// tenants 2 … T−1 the rest by a zipfian law (tenant k ∝ 1/(k−1)), the last one (idle) none.
pub(crate) fn weights(args: &Args) -> Vec<f64> {
    let t = args.tenants as usize;
    let harmonic: f64 = (1..t - 1).map(|r| 1.0 / r as f64).sum();
    (0..t)
        .map(|i| match i {
            0 => args.busy_share,
            i if i == t - 1 => 0.0,
            i => (1.0 - args.busy_share) / (i as f64 * harmonic),
        })
        .collect()
}

/// `rate` small transactions a second, each of one tenant drawn by `weights`, until `stop`;
/// the transactions per tenant.
async fn load(
    db: String,
    tenants: Vec<String>,
    weights: Vec<f64>,
    rate: u32,
    stop: Arc<AtomicBool>,
) -> Vec<u64> {
    let source = cluster().await.client(&db).await;
    // The cluster runs synchronous_commit=off: the WAL writer would flush (and the walsender
    // send) the paced commits only every wal_writer_delay, cutting packs by that instead of by
    // flush_interval.
    source
        .batch_execute("SET synchronous_commit = on")
        .await
        .unwrap();
    let period = Duration::from_secs_f64(1.0 / f64::from(rate));
    let mut counts = vec![0u64; tenants.len()];
    let mut next = tokio::time::Instant::now();
    let mut n = 0u32;
    while !stop.load(Ordering::SeqCst) {
        let mut draw = fastrand::f64();
        let i = weights
            .iter()
            .position(|w| {
                draw -= w;
                draw < 0.0
            })
            .unwrap_or(0);
        n = n.wrapping_add(1);
        random_change(&source, &tenants[i], n).await;
        counts[i] += 1;
        next += period;
        let now = tokio::time::Instant::now();
        if next > now {
            tokio::time::sleep_until(next).await;
        } else if now - next > Duration::from_secs(1) {
            // Fell behind (the machine is saturated): pace from now rather than burst.
            next = now;
        }
    }
    counts
}
