//! Change capture and point-in-time restore, end to end: the real daemon on a real slot, a
//! workload of every kind of change, and restores at recorded instants compared with the
//! source's state at those instants (row-level digests from hand-written tenant filters).

use std::collections::BTreeMap;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use tokio_postgres::Client;

use crate::snapshot_restore::{TENANT_FILTERS, digest};
use crate::support::postgres::cluster;
use crate::support::{Repo, TestEnv, fixture_tenant};

/// What `check` tells the DBA to run so that every DELETE can be routed.
const REPLICA_IDENTITY_FIXES: &str = "
    ALTER TABLE app.users REPLICA IDENTITY FULL;
    ALTER TABLE app.fund_permissions REPLICA IDENTITY FULL;
    ALTER TABLE app.portfoliocompanies REPLICA IDENTITY FULL;
    ALTER TABLE app.investment_lots REPLICA IDENTITY FULL;
    ALTER TABLE app.reserve_allocations REPLICA IDENTITY FULL;
    ALTER TABLE app.forecast_snapshots REPLICA IDENTITY FULL;";

/// The daemon as a child process, its output in the test's directory.
pub struct Daemon {
    child: Child,
    pub log: std::path::PathBuf,
}

impl Daemon {
    pub fn start(env: &TestEnv) -> Daemon {
        let log = env
            .dir
            .path()
            .join(format!("daemon-{}.log", fastrand::u32(..)));
        let file = std::fs::File::create(&log).unwrap();
        let child = env
            .command(&["daemon"])
            .env("UPDOG_BACKUP_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Daemon { child, log }
    }

    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status (within 30 s).
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not stop on SIGTERM:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the daemon exited ({status}):\n{}", self.output());
        }
    }
}

pub fn capture_env(env: &mut TestEnv) {
    env.env.push((
        "UPDOG_BACKUP__STREAM__FLUSH_INTERVAL".into(),
        "500ms".into(),
    ));
}

/// Waits until the repository covers `t` (the daemon stored everything committed by then).
pub fn wait_covered(env: &TestEnv, t: DateTime<Utc>, daemon: &mut Daemon) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        daemon.assert_running();
        let out = env.ok(&["list", "--json"]);
        let list: serde_json::Value = serde_json::from_str(&out).unwrap();
        if let Some(c) = list["stream"]["covered_until"].as_str() {
            let covered: DateTime<Utc> = c.parse().unwrap();
            if covered >= t {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "covered-until never reached {t}: {out}\n{}",
            daemon.output()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The source's state of `tenant` now: digest per table.
pub async fn state(source: &Client, tenant: &str) -> BTreeMap<String, (i64, String)> {
    let mut out = BTreeMap::new();
    for (table, filter) in TENANT_FILTERS {
        let filter = filter.map(|f| f.replace("$ORG", tenant));
        out.insert(
            table.to_string(),
            digest(source, table, filter.as_deref()).await,
        );
    }
    out
}

pub async fn now(client: &Client) -> DateTime<Utc> {
    client
        .query_one("SELECT clock_timestamp()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Restores `tenant` at `at` and compares every table with `expected` (the recovery side
/// unfiltered: any other tenant's row would show).
pub async fn assert_restore_equals(
    env: &TestEnv,
    tenant: &str,
    at: DateTime<Utc>,
    expected: &BTreeMap<String, (i64, String)>,
    label: &str,
) {
    let target = format!("pitr_{}_{}", label, fastrand::u32(..));
    let at_text = at.to_rfc3339_opts(SecondsFormat::Micros, true);
    let out = env.ok(&[
        "restore",
        "--org",
        tenant,
        "--at",
        &at_text,
        "--target-db",
        &target,
    ]);
    assert!(out.contains("restore point: LSN"), "{out}");
    let recovered = cluster().await.client(&target).await;
    for (table, want) in expected {
        let found = digest(&recovered, table, None).await;
        assert_eq!(
            &found, want,
            "{label}: {table} of tenant {tenant} restored at {at_text} differs\n{out}"
        );
    }
}

/// One workload step: SQL run as the application would (superuser here), then the instant.
async fn step(source: &Client, sql: &str) -> DateTime<Utc> {
    source
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("workload step failed: {e}\n{sql}"));
    now(source).await
}

/// A fund id of a tenant.
async fn a_fund(source: &Client, tenant: &str) -> String {
    source
        .query_one(
            "SELECT id::text FROM app.funds WHERE organization_id = $1::text::uuid ORDER BY id LIMIT 1",
            &[&tenant],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_in_time_restore_is_exact_at_every_instant() {
    let pg = cluster().await;
    let db = pg.fixture_db("pitr", 6, "0.2").await;
    let source = pg.client(&db).await;
    source.batch_execute(REPLICA_IDENTITY_FIXES).await.unwrap();
    let mut env = TestEnv::new(&db, Repo::Directory).await;
    capture_env(&mut env);
    let init = env.ok(&["init"]);
    assert!(init.contains("created replication slot"), "{init}");

    let (a, c, small) = (
        fixture_tenant(1).await,
        fixture_tenant(3).await,
        fixture_tenant(6).await,
    );
    // Before the daemon has stored anything, nothing after the snapshot is restorable.
    let before = now(&source).await;
    let mut daemon = Daemon::start(&env);
    let fa = a_fund(&source, &a).await;
    let fc = a_fund(&source, &c).await;
    let big_notes = "md5(random()::text) || repeat(md5(random()::text), 300)";
    let steps: Vec<String> = vec![
        // 1. Inserts across tenants, a TOASTed value, FK-routed children of a new parent.
        format!(
            "INSERT INTO app.funds (id, organization_id, name, vintage_year) VALUES
               ('00000000-0000-4000-8000-0000000000a1', '{a}', 'New fund', 2026);
             INSERT INTO app.fundconfigs (fund_id, config) VALUES
               ('00000000-0000-4000-8000-0000000000a1', '{{\"fee\": 2}}');
             INSERT INTO app.portfoliocompanies (id, fund_id, name, tags) VALUES
               ('00000000-0000-4000-8000-0000000000b1', '00000000-0000-4000-8000-0000000000a1', 'Tab\tNew\nline \\ co', ARRAY['x','y']);
             INSERT INTO app.investments (id, fund_id, company_id, amount_cents, round, investment_date, notes) VALUES
               (900001, '00000000-0000-4000-8000-0000000000a1', '00000000-0000-4000-8000-0000000000b1', 12345, 'seed', '2026-01-02', {big_notes});
             INSERT INTO app.investment_lots (investment_id, shares, price_per_share_cents, acquired_on)
               SELECT 900001, g, 100 + g, '2026-01-03' FROM generate_series(1, 20) g;
             INSERT INTO audit.events (organization_id, action, entity, details)
               VALUES ('{c}', 'create', 'fund', '{{\"k\": \"v\"}}'), ('{small}', 'login', 'user', NULL);"
        ),
        // 2. Updates: unchanged TOAST, a primary-key change, plain updates in three tenants.
        format!(
            "UPDATE app.investments SET amount_cents = amount_cents + 1 WHERE id = 900001;
             UPDATE app.forecast_snapshots SET model_version = model_version || '-r2'
              WHERE fund_id IN (SELECT id FROM app.funds WHERE organization_id = '{a}');
             UPDATE app.investment_lots SET id = id + 5000000 WHERE investment_id = 900001 AND shares < 5;
             UPDATE app.users SET email = 'renamed-' || email WHERE organization_id = '{c}';
             UPDATE app.funds SET size_cents = 42 WHERE organization_id = '{small}';
             UPDATE audit.events SET details = '{{\"k\": \"w\"}}' WHERE organization_id = '{c}' AND action = 'create';"
        ),
        // 3. Deletes, ON DELETE CASCADE chains, a table without a primary key.
        format!(
            "DELETE FROM app.investments WHERE id = (SELECT min(i.id) FROM app.investments i
               JOIN app.funds f ON f.id = i.fund_id WHERE f.organization_id = '{a}' AND i.id < 900000);
             DELETE FROM app.fund_permissions WHERE organization_id = '{c}';
             DELETE FROM audit.events WHERE organization_id = '{small}' AND action = 'login';"
        ),
        // 4. A rolled-back transaction and a savepoint rolled back inside a committed one.
        format!(
            "BEGIN; INSERT INTO app.funds (organization_id, name) VALUES ('{a}', 'never'); ROLLBACK;
             BEGIN;
               INSERT INTO app.funds (organization_id, name) VALUES ('{c}', 'kept 1');
               SAVEPOINT s;
               INSERT INTO app.funds (organization_id, name) VALUES ('{c}', 'rolled back');
               ROLLBACK TO SAVEPOINT s;
               INSERT INTO app.funds (organization_id, name) VALUES ('{c}', 'kept 2');
             COMMIT;"
        ),
        // 5. A transaction far larger than logical_decoding_work_mem (streamed), with an
        //    aborted subtransaction in the middle.
        format!(
            "BEGIN;
               INSERT INTO audit.events (organization_id, action, entity, entity_id)
                 SELECT '{a}', 'bulk', 'row', g::text FROM generate_series(1, 3000) g;
               SAVEPOINT s;
               INSERT INTO audit.events (organization_id, action, entity, entity_id)
                 SELECT '{c}', 'aborted', 'row', g::text FROM generate_series(1, 1000) g;
               ROLLBACK TO SAVEPOINT s;
               INSERT INTO app.investment_lots (investment_id, shares, price_per_share_cents, acquired_on)
                 SELECT 900001, g, 1, '2026-02-01' FROM generate_series(1, 2000) g;
               UPDATE app.portfoliocompanies SET sector = 'bulk' WHERE fund_id = '{fc}';
             COMMIT;"
        ),
        // 6. TRUNCATE of a tenant table, with a tenant's insert after it in the same transaction.
        format!(
            "BEGIN;
               TRUNCATE app.reserve_allocations;
               INSERT INTO app.reserve_allocations (fund_id, company_id, allocation_cents)
                 SELECT '{fa}', id, 77 FROM app.portfoliocompanies WHERE fund_id = '{fa}' LIMIT 2;
             COMMIT;"
        ),
        // 7. A whole fund deleted, children first, cascades for the rest.
        format!(
            "BEGIN;
               DELETE FROM app.investments WHERE fund_id = '{fc}';
               DELETE FROM app.forecast_snapshots WHERE fund_id = '{fc}';
               DELETE FROM app.reserve_allocations WHERE fund_id = '{fc}';
               DELETE FROM app.portfoliocompanies WHERE fund_id = '{fc}';
               DELETE FROM app.funds WHERE id = '{fc}';
             COMMIT;"
        ),
    ];
    let mut instants = Vec::new();
    for sql in &steps {
        let t = step(&source, sql).await;
        let mut states = BTreeMap::new();
        for tenant in [&a, &c, &small] {
            states.insert(tenant.clone(), state(&source, tenant).await);
        }
        instants.push((t, states));
    }
    let last = instants.last().unwrap().0;
    wait_covered(&env, last, &mut daemon);
    let status = daemon.terminate();
    assert!(status.success(), "SIGTERM is a clean stop: {status}");

    for (i, (t, states)) in instants.iter().enumerate() {
        for tenant in [&a, &c, &small] {
            // Every instant for the largest tenant; the others at a few.
            if tenant != &a && i % 3 != 0 && i + 1 != instants.len() {
                continue;
            }
            assert_restore_equals(&env, tenant, *t, &states[tenant], &format!("t{}", i + 1))
                .await;
        }
    }

    // The window: from the first snapshot to covered-until; before it is refused.
    let list = env.ok(&["list", "--org", &a]);
    assert!(list.contains("restorable from"), "{list}");
    let too_early = (before - chrono::TimeDelta::hours(1)).to_rfc3339_opts(SecondsFormat::Secs, true);
    let err = env.fails(&["restore", "--org", &a, "--at", &too_early], 2);
    assert!(err.contains("outside the restorable window"), "{err}");
    let too_late = (Utc::now() + chrono::TimeDelta::hours(1)).to_rfc3339_opts(SecondsFormat::Secs, true);
    let err = env.fails(&["restore", "--org", &a, "--at", &too_late], 2);
    assert!(err.contains("outside the restorable window"), "{err}");
}
