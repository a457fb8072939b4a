//! The load: the pgbench script (a zipfian tenant, audit events, lots inserted, updated and
//! deleted) and its lookup tables, the source database's counters ([`Source`]), and
//! [`Bench::load`], which runs pgbench and samples meanwhile.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use updog_backup_test_support::postgres;

use crate::{Args, SLOT};

/// Lookup tables for the load script, outside the backed-up schemas (the daemon skips them):
/// the investments of fixture tenant k numbered 0..c.
pub(crate) const LOAD_SETUP: &str = "
    CREATE SCHEMA bench;
    CREATE TABLE bench.inv AS
      SELECT o.k, (row_number() OVER (PARTITION BY o.k ORDER BY i.id) - 1)::int AS n, i.id AS investment_id
        FROM (SELECT k, md5('org-' || k)::uuid AS org FROM generate_series(1, :tenants) k) o
        JOIN app.funds f ON f.organization_id = o.org
        JOIN app.investments i ON i.fund_id = f.id;
    ALTER TABLE bench.inv ADD PRIMARY KEY (k, n);
    CREATE TABLE bench.inv_count AS SELECT k, count(*)::int AS c FROM bench.inv GROUP BY k;
    ALTER TABLE bench.inv_count ADD PRIMARY KEY (k);
    CREATE TABLE bench.marker (id serial PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp());
    ANALYZE bench.inv, bench.inv_count;";

/// One transaction of the load: a tenant (zipfian), one of its investments, `:events` audit
/// events, 2 lots inserted, 1 updated, 1 deleted. Works in both pgbench query modes.
pub(crate) const LOAD_SCRIPT: &str = r"\set k random_zipfian(1, :tenants, :skew)
\set r random(0, 2000000000)
BEGIN;
SELECT i.investment_id AS inv FROM bench.inv i JOIN bench.inv_count c ON c.k = i.k WHERE i.k = :k AND i.n = :r % c.c \gset
INSERT INTO audit.events (organization_id, action, entity, entity_id, details) SELECT md5('org-' || :k)::uuid, 'update', 'investment_lot', 'lot-' || :inv, jsonb_build_object('n', g) FROM generate_series(1, :events) g;
INSERT INTO app.investment_lots (investment_id, shares, price_per_share_cents, acquired_on) VALUES (:inv, 100.5, 2500, current_date), (:inv, 200.25, 2600, current_date);
UPDATE app.investment_lots SET shares = shares + 1, price_per_share_cents = price_per_share_cents + 1 WHERE id = (SELECT id FROM app.investment_lots WHERE investment_id = :inv ORDER BY id LIMIT 1 OFFSET 1);
DELETE FROM app.investment_lots WHERE id = (SELECT min(id) FROM app.investment_lots WHERE investment_id = :inv);
COMMIT;
";

pub(crate) struct Bench<'a> {
    pub(crate) rt: &'a tokio::runtime::Runtime,
    pub(crate) args: &'a Args,
    pub(crate) work: &'a Path,
}

/// What one pgbench run did.
#[derive(Clone, Default)]
pub(crate) struct Load {
    pub(crate) wall: f64,
    pub(crate) transactions: u64,
    pub(crate) failed: u64,
    pub(crate) tps: f64,
    /// Row changes of the app/audit tables (statistics), and their WAL.
    pub(crate) changes: i64,
    pub(crate) wal_bytes: i64,
    pub(crate) end: Option<DateTime<Utc>>,
    /// The WAL insert position right after the load.
    pub(crate) end_lsn: String,
}

/// Samples taken once a second during a load.
#[derive(Default)]
pub(crate) struct Samples {
    /// now − covered-until.
    pub(crate) max_covered_lag: f64,
    /// WAL between the server's position and the slot's confirmed position.
    pub(crate) max_slot_lag_bytes: i64,
    pub(crate) max_rss_kib: u64,
}

pub(crate) enum Amount {
    Seconds(u64),
    /// Transactions per client.
    Transactions(u64),
}

pub(crate) struct Source<'a> {
    pub(crate) pg: &'a postgres::Cluster,
    pub(crate) db: String,
    pub(crate) client: tokio_postgres::Client,
}

impl Source<'_> {
    pub(crate) fn now(&self, rt: &tokio::runtime::Runtime) -> DateTime<Utc> {
        rt.block_on(self.client.query_one("SELECT clock_timestamp()", &[]))
            .unwrap()
            .get(0)
    }

    pub(crate) fn row_changes(&self, rt: &tokio::runtime::Runtime) -> i64 {
        rt.block_on(self.client.query_one(
            "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0)::bigint
               FROM pg_stat_user_tables WHERE schemaname IN ('app', 'audit')",
            &[],
        ))
        .unwrap()
        .get(0)
    }

    pub(crate) fn wal_lsn(&self, rt: &tokio::runtime::Runtime) -> String {
        rt.block_on(
            self.client
                .query_one("SELECT pg_current_wal_lsn()::text", &[]),
        )
        .unwrap()
        .get(0)
    }

    pub(crate) fn wal_since(&self, rt: &tokio::runtime::Runtime, lsn: &str) -> i64 {
        rt.block_on(self.client.query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::bigint",
            &[&lsn],
        ))
        .unwrap()
        .get(0)
    }

    pub(crate) fn slot_lag(&self, rt: &tokio::runtime::Runtime) -> i64 {
        rt.block_on(self.client.query_opt(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&SLOT],
        ))
        .ok()
        .flatten()
        .and_then(|r| r.get::<_, Option<i64>>(0))
        .unwrap_or(0)
    }

    /// Whether the walsender `pid` has decoded and sent everything before `lsn`.
    pub(crate) fn sent_past(&self, rt: &tokio::runtime::Runtime, pid: u32, lsn: &str) -> bool {
        rt.block_on(self.client.query_opt(
            "SELECT sent_lsn >= $1::text::pg_lsn FROM pg_stat_replication WHERE pid = $2",
            &[&lsn, &(pid as i32)],
        ))
        .ok()
        .flatten()
        .and_then(|r| r.get::<_, Option<bool>>(0))
        .unwrap_or(false)
    }

    /// The walsender serving the slot, if active.
    pub(crate) fn walsender(&self, rt: &tokio::runtime::Runtime) -> Option<u32> {
        rt.block_on(self.client.query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&SLOT],
        ))
        .ok()
        .flatten()
        .and_then(|r| r.get::<_, Option<i32>>(0))
        .map(|p| p as u32)
    }

    pub(crate) fn tenant(&self, rt: &tokio::runtime::Runtime, k: u32) -> String {
        rt.block_on(
            self.client
                .query_one("SELECT md5('org-' || $1::int)::uuid::text", &[&(k as i32)]),
        )
        .unwrap()
        .get(0)
    }

    pub(crate) fn psql(&self, sql: &str) {
        self.pg.psql(&self.db, &["-c", sql]);
    }
}

impl Bench<'_> {
    pub(crate) fn source<'p>(&self, pg: &'p postgres::Cluster, db: &str) -> Source<'p> {
        Source {
            pg,
            db: db.to_string(),
            client: self.rt.block_on(pg.client(db)),
        }
    }

    /// Runs the load script with pgbench; `sample` runs about once a second meanwhile.
    pub(crate) fn load(&self, src: &Source, amount: Amount, mut sample: impl FnMut()) -> Load {
        let a = self.args;
        let script = self.work.join("load.sql");
        fs::write(&script, LOAD_SCRIPT).unwrap();
        let out = self.work.join("pgbench.out");
        let err = self.work.join("pgbench.err");
        let pgbench = if src.pg.bin.join("pgbench").exists() {
            src.pg.bin.join("pgbench")
        } else {
            PathBuf::from("pgbench")
        };
        let mut cmd = Command::new(pgbench);
        cmd.args(["-n", "-M", "prepared", "-h", "127.0.0.1", "-U", "postgres"])
            .args(["-p", &src.pg.port.to_string()])
            .args(["-c", &a.clients.to_string(), "-j", "2"])
            .args(["--max-tries", "10"])
            .args(["-D", &format!("tenants={}", a.tenants)])
            .args(["-D", &format!("skew={}", a.skew)])
            .args(["-D", &format!("events={}", a.events)])
            .arg("-f")
            .arg(&script);
        match amount {
            Amount::Seconds(s) => cmd.args(["-T", &s.to_string()]),
            Amount::Transactions(t) => cmd.args(["-t", &t.to_string()]),
        };
        cmd.arg(&src.db)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap());
        let changes_before = src.row_changes(self.rt);
        let lsn_before = src.wal_lsn(self.rt);
        let clock = Instant::now();
        let mut child = cmd.spawn().expect("starting pgbench");
        let mut next_sample = Instant::now() + Duration::from_secs(1);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= next_sample {
                sample();
                next_sample += Duration::from_secs(1);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let wall = clock.elapsed().as_secs_f64();
        let end = src.now(self.rt);
        let end_lsn = src.wal_lsn(self.rt);
        let stdout = fs::read_to_string(&out).unwrap_or_default();
        let stderr = fs::read_to_string(&err).unwrap_or_default();
        assert!(
            status.success(),
            "pgbench failed ({status}):\n{stdout}\n{stderr}"
        );
        let field = |prefix: &str| -> f64 {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(prefix))
                // "12345", or "12345/12345" with -t.
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.split('/').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0.0)
        };
        // The backends flush their statistics when they exit, after pgbench.
        std::thread::sleep(Duration::from_millis(1500));
        Load {
            wall,
            transactions: field("number of transactions actually processed:") as u64,
            failed: field("number of failed transactions:") as u64,
            tps: field("tps = "),
            changes: src.row_changes(self.rt) - changes_before,
            wal_bytes: src.wal_since(self.rt, &lsn_before),
            end: Some(end),
            end_lsn,
        }
    }
}
