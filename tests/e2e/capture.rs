//! Change capture and point-in-time restore, end to end: the real daemon on a real slot, a
//! workload of every kind of change, and restores at recorded instants compared with the
//! source's state at those instants (row-level digests from hand-written tenant filters).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use tokio_postgres::Client;

// Re-exported: the daemon and oracle helpers lived here first.
pub use crate::support::daemon::{Daemon, capture_env, wait_covered};
pub use crate::support::oracle::{
    Workload, assert_restore_equals, assert_restores_at_thirds, now, random_change, state,
};
use crate::support::postgres::cluster;
use crate::support::{Repo, TestEnv, fixture_tenant};

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
    let db = pg.capture_fixture_db("pitr", 6, "0.2").await;
    let source = pg.client(&db).await;
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
            assert_restore_equals(&env, tenant, *t, &states[tenant], &format!("t{}", i + 1)).await;
        }
    }

    // The window: from the first snapshot to covered-until; before it is refused.
    let list = env.ok(&["list", "--org", &a]);
    assert!(list.contains("restorable from"), "{list}");
    assert_indexed(&env);
    let too_early =
        (before - chrono::TimeDelta::hours(1)).to_rfc3339_opts(SecondsFormat::Secs, true);
    let err = env.fails(&["restore", "--org", &a, "--at", &too_early], 2);
    assert!(err.contains("outside the restorable window"), "{err}");
    let too_late =
        (Utc::now() + chrono::TimeDelta::hours(1)).to_rfc3339_opts(SecondsFormat::Secs, true);
    let err = env.fails(&["restore", "--org", &a, "--at", &too_late], 2);
    assert!(err.contains("outside the restorable window"), "{err}");
}

/// Every pack but those after the last whole window (3 packs, `capture_env`) is in the
/// stream index, so the restores went through it.
fn assert_indexed(env: &TestEnv) {
    let json: serde_json::Value = serde_json::from_str(&env.ok(&["list", "--json"])).unwrap();
    let (packs, indexed) = (
        json["stream"]["packs"].as_u64().unwrap(),
        json["stream"]["indexed_packs"].as_u64().unwrap(),
    );
    assert!(packs - indexed < 3, "{json}");
}

/// Kills (SIGKILL) during capture: after restarts, restores at recorded instants equal the
/// source — nothing lost, nothing applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_daemon_loses_and_duplicates_nothing() {
    let kills: u32 = std::env::var("UPDOG_TEST_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let pg = cluster().await;
    let db = pg.capture_fixture_db("kills", 6, "0.2").await;
    let mut env = TestEnv::new(&db, Repo::S3).await;
    capture_env(&mut env);
    env.ok(&["init"]);
    let tenants = [
        fixture_tenant(1).await,
        fixture_tenant(4).await,
        fixture_tenant(6).await,
    ];

    // Kills happen whenever, the oracle is recorded between rounds.
    let workload = Workload::start(&db, &tenants);
    let mut daemon = Daemon::start(&env);
    for k in 0..kills {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(300..1500))).await;
        if k == kills / 2 {
            // A snapshot taken while writes and capture go on: later instants restore from it
            // plus the changes after its own consistent LSN.
            let out = env.ok(&["backup"]);
            assert!(out.contains("snapshot"), "{out}");
        }
        daemon.assert_running();
        daemon.kill();
        daemon = Daemon::start(&env);
    }
    let instants = workload.stop().await;
    let last = instants.last().unwrap().0;
    wait_covered(&env, last, &mut daemon);
    assert!(daemon.terminate().success());

    // The last instant for every tenant, and a few earlier ones (before and after the second
    // snapshot).
    assert_restores_at_thirds(&env, &instants, "k").await;
    // Each restart indexed the packs its predecessor left unindexed.
    assert_indexed(&env);
    eprintln!(
        "daemon SIGKILLed {kills} times during capture; {} instants recorded",
        instants.len()
    );
}

/// While the daemon is down, a child row changes and then its parent (and the child) are
/// deleted: on restart the child's change still routes, from the persisted routing state
/// (the source no longer has the parent to ask about).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_routes_changes_to_parents_deleted_while_down() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("routes", 4, "0.2").await;
    let source = pg.client(&db).await;
    let mut env = TestEnv::new(&db, Repo::Directory).await;
    capture_env(&mut env);
    env.ok(&["init"]);
    let tenant = fixture_tenant(2).await;
    let fund = a_fund(&source, &tenant).await;

    let mut daemon = Daemon::start(&env);
    // A change after a pack or two, so that the restart also reads packs' routing changes.
    let t0 = step(
        &source,
        &format!("UPDATE app.funds SET name = name || ' (renamed)' WHERE id = '{fund}'"),
    )
    .await;
    wait_covered(&env, t0, &mut daemon);
    daemon.kill();

    let t1 = step(
        &source,
        &format!(
            "UPDATE app.fundconfigs SET config = '{{\"changed\": true}}' WHERE fund_id = '{fund}';
             UPDATE app.investment_lots SET shares = shares * 2 WHERE investment_id IN
               (SELECT id FROM app.investments WHERE fund_id = '{fund}');"
        ),
    )
    .await;
    let at_t1 = state(&source, &tenant).await;
    let t2 = step(
        &source,
        &format!(
            "BEGIN;
               DELETE FROM app.investments WHERE fund_id = '{fund}';
               DELETE FROM app.forecast_snapshots WHERE fund_id = '{fund}';
               DELETE FROM app.reserve_allocations WHERE fund_id = '{fund}';
               DELETE FROM app.portfoliocompanies WHERE fund_id = '{fund}';
               DELETE FROM app.funds WHERE id = '{fund}';
             COMMIT;"
        ),
    )
    .await;
    let at_t2 = state(&source, &tenant).await;

    let mut daemon = Daemon::start(&env);
    wait_covered(&env, t2, &mut daemon);
    assert!(daemon.terminate().success());
    assert_restore_equals(&env, &tenant, t1, &at_t1, "down_t1").await;
    assert_restore_equals(&env, &tenant, t2, &at_t2, "down_t2").await;
}

/// A damaged pack (a flipped bit, a cut tail) is refused before any database is created, and
/// `verify` names it; a missing pack is a gap, never silently skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_or_missing_packs_are_refused_before_writing() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("badpack", 3, "0.1").await;
    let source = pg.client(&db).await;
    let mut env = TestEnv::new(&db, Repo::Directory).await;
    capture_env(&mut env);
    env.ok(&["init"]);
    let tenant = fixture_tenant(1).await;
    let mut daemon = Daemon::start(&env);
    let t = step(
        &source,
        &format!("UPDATE app.funds SET size_cents = 7 WHERE organization_id = '{tenant}'"),
    )
    .await;
    wait_covered(&env, t, &mut daemon);
    assert!(daemon.terminate().success());
    let packs: Vec<std::path::PathBuf> = std::fs::read_dir(env.repo_dir.join("changes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .collect();
    assert_eq!(packs.len(), 1, "{packs:?}");
    let pack = &packs[0];
    let original = std::fs::read(pack).unwrap();
    let at = t.to_rfc3339_opts(SecondsFormat::Micros, true);
    let mut flipped = original.clone();
    flipped[original.len() / 3] ^= 0x01;
    for (what, bytes) in [
        ("flipped", flipped),
        ("cut", original[..original.len() - 10].to_vec()),
    ] {
        std::fs::write(pack, &bytes).unwrap();
        let target = format!("badpack_{what}");
        let err = env.fails(
            &[
                "restore",
                "--org",
                &tenant,
                "--at",
                &at,
                "--target-db",
                &target,
            ],
            1,
        );
        assert!(err.contains(".pack"), "{what}: {err}");
        let exists: bool = source
            .query_one(
                "SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)",
                &[&target],
            )
            .await
            .unwrap()
            .get(0);
        assert!(!exists, "{what}: nothing is created");
        let out = env.run(&["verify"]);
        assert!(!out.status.success(), "{what}: verify fails");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("FAILED") && stdout.contains(".pack"),
            "{what}: {stdout}"
        );
    }
    std::fs::remove_file(pack).unwrap();
    let err = env.fails(&["restore", "--org", &tenant, "--at", &at], 2);
    assert!(err.contains("missing"), "{err}");
    std::fs::write(pack, &original).unwrap();
    assert!(env.ok(&["verify", "--deep"]).contains("0 failed"));
}

/// With no writes at all, covered-until still advances (so `--latest` and `--at now` work).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn covered_until_advances_on_an_idle_source() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("idle", 2, "0.1").await;
    let source = pg.client(&db).await;
    let mut env = TestEnv::new(&db, Repo::Directory).await;
    capture_env(&mut env);
    env.ok(&["init"]);
    let mut daemon = Daemon::start(&env);
    let t = now(&source).await;
    let clock = Instant::now();
    wait_covered(&env, t, &mut daemon);
    // Probes every quarter of the 500 ms flush interval: well under a few seconds.
    assert!(
        clock.elapsed() < Duration::from_secs(10),
        "{:?}",
        clock.elapsed()
    );
    assert!(daemon.terminate().success());
}
