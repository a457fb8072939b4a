//! `rewind` (issue 16): a tenant's mistakes — a fund deleted with everything under it, its
//! permissions gone, lots imported twice, users changed, a key changed — undone in the source
//! in one transaction while the daemon captures and another tenant keeps working: the tenant
//! equals its state at the instant, the other tenant is untouched, no sequence went back, and a
//! restore after the rewind gives the rewound state. The plan alone writes nothing.

use crate::support::daemon::{Daemon, capture_env, wait_covered};
use crate::support::fixture_tenant;
use crate::support::oracle::{assert_restore_equals, now, random_change, state};
use crate::support::postgres::cluster;
use crate::support::{Repo, TestEnv};

/// Every sequence's position: a rewind never moves one back.
async fn sequences(client: &tokio_postgres::Client) -> Vec<(String, i64)> {
    client
        .query(
            "SELECT schemaname || '.' || sequencename, coalesce(last_value, 0) FROM pg_sequences ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The writer role that bypasses row level security (README, "Rewind").
const WRITER: &str =
    "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'updog_rewind') THEN
       CREATE ROLE updog_rewind LOGIN BYPASSRLS; END IF; END $$;
     GRANT USAGE ON SCHEMA app, audit TO updog_rewind;
     GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA app, audit TO updog_rewind;";

/// The writer role under the tenant's context (README, "Rewind"): no BYPASSRLS, and a policy
/// on every tenant table that shows and accepts only the rows of `app.current_org`'s tenant.
const CONTEXT_WRITER: &str = "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'updog_rewind_ctx') THEN
       CREATE ROLE updog_rewind_ctx LOGIN; END IF; END $$;
     GRANT USAGE ON SCHEMA app, audit TO updog_rewind_ctx;
     GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA app, audit TO updog_rewind_ctx;
     GRANT SELECT ON app.currencies TO updog_rewind_ctx;
     CREATE POLICY rewind ON app.organizations TO updog_rewind_ctx
       USING (id = app.current_org_id()) WITH CHECK (id = app.current_org_id());
     CREATE POLICY rewind ON app.users TO updog_rewind_ctx
       USING (organization_id = app.current_org_id()) WITH CHECK (organization_id = app.current_org_id());
     CREATE POLICY rewind ON app.funds TO updog_rewind_ctx
       USING (organization_id = app.current_org_id()) WITH CHECK (organization_id = app.current_org_id());
     CREATE POLICY rewind ON app.fund_permissions TO updog_rewind_ctx
       USING (organization_id = app.current_org_id()) WITH CHECK (organization_id = app.current_org_id());
     CREATE POLICY rewind ON audit.events TO updog_rewind_ctx
       USING (organization_id = app.current_org_id()) WITH CHECK (organization_id = app.current_org_id());
     DO $$ DECLARE t text; BEGIN
       FOREACH t IN ARRAY ARRAY['app.fundconfigs', 'app.portfoliocompanies', 'app.investments',
           'app.forecast_snapshots', 'app.reserve_allocations'] LOOP
         EXECUTE format($p$CREATE POLICY rewind ON %s TO updog_rewind_ctx
           USING (EXISTS (SELECT 1 FROM app.funds f WHERE f.id = fund_id AND f.organization_id = app.current_org_id()))
           WITH CHECK (EXISTS (SELECT 1 FROM app.funds f WHERE f.id = fund_id AND f.organization_id = app.current_org_id()))$p$, t);
       END LOOP; END $$;
     CREATE POLICY rewind ON app.investment_lots TO updog_rewind_ctx
       USING (EXISTS (SELECT 1 FROM app.investments i JOIN app.funds f ON f.id = i.fund_id
                       WHERE i.id = investment_id AND f.organization_id = app.current_org_id()))
       WITH CHECK (EXISTS (SELECT 1 FROM app.investments i JOIN app.funds f ON f.id = i.fund_id
                       WHERE i.id = investment_id AND f.organization_id = app.current_org_id()));";

/// A capturing fixture database, its daemon, and tenants A (the one rewound) and B.
struct Setup {
    db: String,
    source: tokio_postgres::Client,
    env: TestEnv,
    daemon: Daemon,
    a: String,
    b: String,
}

async fn setup(hint: &str, roles: &str, writer: &str, tenant_setting: Option<&str>) -> Setup {
    let pg = cluster().await;
    let db = pg.capture_fixture_db(hint, 3, "0.1").await;
    let source = pg.client(&db).await;
    source.batch_execute(roles).await.unwrap();
    let mut env = TestEnv::new(&db, Repo::Directory).await;
    capture_env(&mut env);
    env.env.push((
        "UPDOG_BACKUP__RESTORE__WRITER_URL".into(),
        pg.url(writer, &db),
    ));
    if let Some(setting) = tenant_setting {
        env.env.push((
            "UPDOG_BACKUP__RESTORE__TENANT_SETTING".into(),
            setting.into(),
        ));
    }
    env.ok(&["init"]);
    let daemon = Daemon::start(&env);
    let (a, b) = (fixture_tenant(1).await, fixture_tenant(2).await);
    Setup {
        db,
        source,
        env,
        daemon,
        a,
        b,
    }
}

/// The mistakes, each its own transaction, while `b` works.
async fn mistakes(source: &tokio_postgres::Client, a: &str, b: &str) {
    let fund: String = source
        .query_one(
            "SELECT id::text FROM app.funds WHERE organization_id = $1::text::uuid ORDER BY id LIMIT 1",
            &[&a],
        )
        .await
        .unwrap()
        .get(0);
    for (n, sql) in [
        format!(
            "BEGIN;
             DELETE FROM app.investment_lots WHERE investment_id IN (SELECT id FROM app.investments WHERE fund_id = '{fund}');
             DELETE FROM app.investments WHERE fund_id = '{fund}';
             DELETE FROM app.reserve_allocations WHERE fund_id = '{fund}';
             DELETE FROM app.forecast_snapshots WHERE fund_id = '{fund}';
             DELETE FROM app.portfoliocompanies WHERE fund_id = '{fund}';
             DELETE FROM app.funds WHERE id = '{fund}';
             COMMIT;"
        ),
        format!("DELETE FROM app.fund_permissions WHERE organization_id = '{a}'"),
        format!(
            "INSERT INTO app.investment_lots (investment_id, shares, price_per_share_cents, acquired_on)
             SELECT l.investment_id, l.shares, l.price_per_share_cents, l.acquired_on
               FROM app.investment_lots l JOIN app.investments i ON i.id = l.investment_id
               JOIN app.funds f ON f.id = i.fund_id, generate_series(1, 2)
              WHERE f.organization_id = '{a}'"
        ),
        format!("UPDATE app.users SET role = 'viewer' WHERE organization_id = '{a}'"),
        format!(
            "UPDATE app.investment_lots SET id = id + 1000000 WHERE id = (
               SELECT min(l.id) FROM app.investment_lots l JOIN app.investments i ON i.id = l.investment_id
                 JOIN app.funds f ON f.id = i.fund_id WHERE f.organization_id = '{a}')"
        ),
    ]
    .iter()
    .enumerate()
    {
        source
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{e}: {sql}"));
        random_change(source, b, n as u32).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewind_undoes_one_tenants_mistakes_and_nothing_else() {
    let Setup {
        source,
        env,
        mut daemon,
        a,
        b,
        ..
    } = setup("rewind", WRITER, "updog_rewind", None).await;
    let at = now(&source).await;
    let wanted = state(&source, &a).await;
    mistakes(&source, &a, &b).await;
    let mistaken = state(&source, &a).await;
    assert_ne!(mistaken, wanted);
    let other = state(&source, &b).await;
    let sequences_before = sequences(&source).await;
    wait_covered(&env, now(&source).await, &mut daemon);

    // The plan writes nothing.
    let plan = env.ok(&["rewind", "--org", &a, "--to", &at.to_rfc3339()]);
    assert!(plan.contains("nothing was written"), "{plan}");
    assert!(plan.contains("app.fund_permissions"), "{plan}");
    assert_eq!(state(&source, &a).await, mistaken);

    let report: serde_json::Value = serde_json::from_str(&env.ok(&[
        "rewind",
        "--org",
        &a,
        "--to",
        &at.to_rfc3339(),
        "--apply",
        "--json",
    ]))
    .unwrap();
    assert_eq!(report["applied"], true, "{report:#}");
    assert!(report["snapshot_before"].is_string(), "{report:#}");
    assert_eq!(
        state(&source, &a).await,
        wanted,
        "the tenant equals its state then"
    );
    assert_eq!(
        state(&source, &b).await,
        other,
        "the other tenant is untouched"
    );
    let sequences_after = sequences(&source).await;
    for ((name, before), (_, after)) in sequences_before.iter().zip(&sequences_after) {
        assert!(
            after >= before,
            "sequence {name} went back: {before} → {after}"
        );
    }
    let records = crate::support::files_under(&env.repo_dir.join("rewinds"));
    assert_eq!(records.len(), 1, "the rewind is recorded");

    // The rewind is an ordinary change in the stream.
    let after = now(&source).await;
    wait_covered(&env, after, &mut daemon);
    assert_restore_equals(&env, &a, after, &wanted, "after_rewind").await;
    daemon.terminate();
}

/// Under the tenant's context (`restore.tenant_setting`), with a writer role that does not
/// bypass row level security: PostgreSQL itself refuses that role a row of another tenant, and
/// the rewind is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewind_under_the_tenants_context_cannot_write_another_tenants_row() {
    let Setup {
        db,
        source,
        env,
        mut daemon,
        a,
        b,
    } = setup(
        "rewind_ctx",
        &format!("{WRITER}\n{CONTEXT_WRITER}"),
        "updog_rewind_ctx",
        Some("app.current_org"),
    )
    .await;
    // What the rewind's transaction is: the role, the tenant's context. Another tenant's row
    // can be neither seen nor written, whatever a plan would say.
    let writer =
        crate::support::postgres::client_for(&cluster().await.url("updog_rewind_ctx", &db)).await;
    writer
        .batch_execute(&format!(
            "BEGIN; SELECT set_config('app.current_org', '{a}', true)"
        ))
        .await
        .unwrap();
    let seen: i64 = writer
        .query_one(
            "SELECT count(*) FROM app.funds WHERE organization_id = $1::text::uuid",
            &[&b],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        seen, 0,
        "another tenant's rows are invisible under the context"
    );
    let refused = writer
        .batch_execute(&format!(
            "INSERT INTO app.fund_permissions (fund_id, user_id, organization_id)
             SELECT f.id, u.id, '{b}' FROM app.funds f, app.users u LIMIT 1"
        ))
        .await;
    drop(writer);
    let injected = source
        .query_one(
            "SELECT f.id::text, u.id::text FROM app.funds f, app.users u
              WHERE f.organization_id = $1::text::uuid AND u.organization_id = $1::text::uuid LIMIT 1",
            &[&b],
        )
        .await
        .unwrap();
    let writer =
        crate::support::postgres::client_for(&cluster().await.url("updog_rewind_ctx", &db)).await;
    let error = writer
        .batch_execute(&format!(
            "BEGIN; SELECT set_config('app.current_org', '{a}', true);
             INSERT INTO app.fund_permissions (fund_id, user_id, organization_id)
             VALUES ('{}', '{}', '{b}')",
            injected.get::<_, String>(0),
            injected.get::<_, String>(1)
        ))
        .await
        .expect_err("a row of another tenant is refused under the tenant's context");
    assert!(
        error.to_string().contains("row-level security") || refused.is_err(),
        "{error}"
    );
    drop(writer);

    let at = now(&source).await;
    let wanted = state(&source, &a).await;
    mistakes(&source, &a, &b).await;
    let other = state(&source, &b).await;
    wait_covered(&env, now(&source).await, &mut daemon);
    env.ok(&["rewind", "--org", &a, "--to", &at.to_rfc3339(), "--apply"]);
    assert_eq!(state(&source, &a).await, wanted);
    assert_eq!(state(&source, &b).await, other);
    daemon.terminate();
}

/// The rewind's process, started; its pid.
fn start_rewind(env: &TestEnv, a: &str, at: &str) -> std::process::Child {
    env.command(&["rewind", "--org", a, "--to", at, "--apply"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until the rewind's transaction waits for the lock `blocker` holds.
async fn wait_blocked(source: &tokio_postgres::Client) {
    for _ in 0..600 {
        let waiting: i64 = source
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'updog_rewind' AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the rewind never waited for the row another transaction holds");
}

/// A rewind killed in its transaction, one that meets a concurrent write to a row it changes,
/// and one whose row's key now belongs to another tenant: each changes nothing, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewind_that_cannot_finish_changes_nothing() {
    let Setup {
        db,
        source,
        env,
        mut daemon,
        a,
        b,
    } = setup("rewind_refused", WRITER, "updog_rewind", None).await;
    let at = now(&source).await.to_rfc3339();
    let wanted = state(&source, &a).await;
    mistakes(&source, &a, &b).await;
    wait_covered(&env, now(&source).await, &mut daemon);
    let user: String = source
        .query_one(
            "SELECT id::text FROM app.users WHERE organization_id = $1::text::uuid ORDER BY id LIMIT 1",
            &[&a],
        )
        .await
        .unwrap()
        .get(0);
    let blocker = cluster().await.client(&db).await;

    // The rewind's deletes begin with the duplicated lots: a SHARE lock on that table (which
    // gives the holder no transaction id, so the rewind's snapshot of the tenant does not wait
    // for it) holds the rewind inside its transaction.
    let hold = "BEGIN; LOCK TABLE app.investment_lots IN SHARE MODE";

    // Killed while it waits inside its transaction: nothing lands.
    let mistaken = state(&source, &a).await;
    blocker.batch_execute(hold).await.unwrap();
    let mut rewind = start_rewind(&env, &a, &at);
    wait_blocked(&source).await;
    rewind.kill().unwrap();
    rewind.wait().unwrap();
    blocker.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        state(&source, &a).await,
        mistaken,
        "a killed rewind changed rows"
    );

    // A concurrent write, committed after the rewind began, to a row it sets back later:
    // PostgreSQL refuses the rewind's transaction, nothing changed, and it says so.
    blocker.batch_execute(hold).await.unwrap();
    let rewind = start_rewind(&env, &a, &at);
    wait_blocked(&source).await;
    source
        .batch_execute(&format!(
            "UPDATE app.users SET email = 'concurrent@example.com' WHERE id = '{user}'"
        ))
        .await
        .unwrap();
    let concurrent = state(&source, &a).await;
    blocker.batch_execute("ROLLBACK").await.unwrap();
    let out = rewind.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("changed while the rewind ran"), "{stderr}");
    assert_eq!(
        state(&source, &a).await,
        concurrent,
        "the rewind changed nothing"
    );

    // A lot the tenant had then now belongs to another tenant: refused by name.
    let moved: i64 = source
        .query_one(
            "SELECT min(l.id) FROM app.investment_lots l JOIN app.investments i ON i.id = l.investment_id
               JOIN app.funds f ON f.id = i.fund_id WHERE f.organization_id = $1::text::uuid",
            &[&a],
        )
        .await
        .unwrap()
        .get(0);
    // Moves the lot under the first investment of `tenant`.
    let move_lot = |tenant: &str| {
        format!(
            "UPDATE app.investment_lots SET investment_id = (
               SELECT min(i.id) FROM app.investments i JOIN app.funds f ON f.id = i.fund_id
                WHERE f.organization_id = '{tenant}') WHERE id = {moved}"
        )
    };
    source.batch_execute(&move_lot(&b)).await.unwrap();
    let before = state(&source, &a).await;
    let refused = env.fails(&["rewind", "--org", &a, "--to", &at, "--apply"], 1);
    assert!(
        refused.contains("app.investment_lots") && refused.contains(&moved.to_string()),
        "{refused}"
    );
    assert!(refused.contains("nothing was changed"), "{refused}");
    assert_eq!(state(&source, &a).await, before);

    // Given back, the same rewind goes through.
    source.batch_execute(&move_lot(&a)).await.unwrap();
    env.ok(&["rewind", "--org", &a, "--to", &at, "--apply"]);
    assert_eq!(state(&source, &a).await, wanted);
    daemon.terminate();
}

/// A rewind to a point before a migration of a table it would write refuses, naming the
/// columns then and now, and changes nothing: rows go back as record text, which is only the
/// same record with the same columns. (A restore of that point follows the migration:
/// `migrations::*`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewind_across_a_migration_refuses_and_changes_nothing() {
    let Setup {
        db,
        source,
        env,
        mut daemon,
        a,
        ..
    } = setup("rewind_migration", WRITER, "updog_rewind", None).await;
    env.install_schema_triggers(&db).await;
    let before = now(&source).await;
    let want = state(&source, &a).await;
    source
        .batch_execute(&format!(
            "ALTER TABLE app.funds ADD COLUMN region text NOT NULL DEFAULT 'eu';
             DELETE FROM app.fund_permissions WHERE organization_id = '{a}';"
        ))
        .await
        .unwrap();
    let after = now(&source).await;
    wait_covered(&env, after, &mut daemon);
    let out = env.run(&[
        "rewind",
        "--org",
        &a,
        "--to",
        &before.to_rfc3339(),
        "--apply",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1)
            && stderr.contains("app.funds")
            && stderr.contains("a migration changed it since")
            && stderr.contains("region text"),
        "{stderr}"
    );
    // Nothing was written: the tenant is as the migration left it.
    let permissions: i64 = source
        .query_one(
            "SELECT count(*) FROM app.fund_permissions WHERE organization_id = $1::text::uuid",
            &[&a],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(permissions, 0);
    assert_ne!(state(&source, &a).await, want);
    assert!(daemon.terminate().success());
}
