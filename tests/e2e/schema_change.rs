//! Schema changes while the daemon captures: a table created after `init` (which the
//! publication does not carry) and columns added to a captured table. The daemon notices and
//! records them; a restore across one is refused with a message that says what to do, never
//! silently wrong; a snapshot taken after the fix makes later points restorable again.

use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use tokio_postgres::Client;

use crate::support::daemon::{Daemon, capture_env, wait_covered};
use crate::support::oracle::{digest, now};
use crate::support::postgres::cluster;
use crate::support::{
    Repo, TestEnv, database_exists, fixture_tenant, http_get, parse_metrics,
    publish_tables_of_today,
};

/// What the tests compare: the tenant's funds (all columns) and notes.
async fn tenant_state(source: &Client, tenant: &str) -> Vec<(i64, String)> {
    vec![
        digest(
            source,
            "app.funds",
            Some(&format!("organization_id = '{tenant}'")),
        )
        .await,
        digest(
            source,
            "app.fund_notes",
            Some(&format!("organization_id = '{tenant}'")),
        )
        .await,
    ]
}

fn at(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// `restore --at` must refuse with exit 2 or 1 and a message holding `needle`, leaving no
/// database behind.
async fn assert_refused(env: &TestEnv, tenant: &str, t: DateTime<Utc>, needle: &str) -> String {
    let target = format!("schema_refused_{}", fastrand::u32(..));
    let out = env.run(&[
        "restore",
        "--org",
        tenant,
        "--at",
        &at(t),
        "--target-db",
        &target,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && stderr.contains(needle),
        "restore at {} should be refused ({needle}): {:?}\n{stderr}",
        at(t),
        out.status
    );
    assert!(
        !database_exists(&target).await,
        "{target} was left behind:\n{stderr}"
    );
    stderr
}

async fn assert_restores(env: &TestEnv, tenant: &str, t: DateTime<Utc>, want: &[(i64, String)]) {
    let target = format!("schema_ok_{}", fastrand::u32(..));
    env.ok(&[
        "restore",
        "--org",
        tenant,
        "--at",
        &at(t),
        "--target-db",
        &target,
    ]);
    let recovered = cluster().await.client(&target).await;
    let found = vec![
        digest(&recovered, "app.funds", None).await,
        digest(&recovered, "app.fund_notes", None).await,
    ];
    assert_eq!(found, want, "restore at {}", at(t));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_while_capturing_are_recorded_and_never_restored_wrong() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("schema_change", 3, "0.1").await;
    let source = pg.client(&db).await;
    let mut env = TestEnv::new(&db, Repo::Directory).await;
    capture_env(&mut env);
    // A publication of the tables as they are (what `init` creates), not FOR ALL TABLES: a
    // table created later is not in it.
    publish_tables_of_today(&source).await;
    env.ok(&["init"]);
    let tenant = fixture_tenant(1).await;
    let mut daemon = Daemon::start(&env);
    let started = Instant::now();

    // 1. A table created after init: backed up by the next snapshot, but its changes are not
    //    in the FOR TABLE publication.
    source
        .batch_execute(&format!(
            "CREATE TABLE app.fund_notes (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                                          organization_id uuid NOT NULL, body text);
             ALTER TABLE app.fund_notes REPLICA IDENTITY FULL;
             GRANT SELECT ON app.fund_notes, app.fund_notes_id_seq TO updog_backup;
             INSERT INTO app.fund_notes (organization_id, body) VALUES ('{tenant}', 'first');
             UPDATE app.funds SET size_cents = 7 WHERE organization_id = '{tenant}';"
        ))
        .await
        .unwrap();
    let t1 = now(&source).await;
    wait_covered(&env, t1, &mut daemon);

    // The daemon's coverage check (every minute) notices, reports and records the gap.
    let deadline = started + Duration::from_secs(90);
    let status = loop {
        daemon.assert_running();
        let (_, body) = http_get(daemon.addr, "/status", None);
        if body.contains("fund_notes") {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the unpublished table was never reported: {body}\n{}",
            daemon.output()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let metrics = parse_metrics(&http_get(daemon.addr, "/metrics", None).1);
    assert_eq!(metrics["updog_backup_unpublished_tables"], 1.0, "{status}");
    let gaps: Vec<_> = std::fs::read_dir(env.repo_dir.join("changes/gaps"))
        .expect("a gap record")
        .collect();
    assert_eq!(gaps.len(), 1);
    let refused = assert_refused(&env, &tenant, t1, "stream gap").await;
    assert!(refused.contains("fund_notes"), "{refused}");

    // 2. The owner fixes the publication; a restarted daemon finds it whole and resolves the
    //    gap (the minute check would too); a snapshot after that is a complete base.
    source
        .batch_execute("ALTER PUBLICATION updog_backup ADD TABLE app.fund_notes")
        .await
        .unwrap();
    assert!(daemon.terminate().success());
    let mut daemon = Daemon::start(&env);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !daemon.output().contains("stream gap resolved") {
        daemon.assert_running();
        assert!(Instant::now() < deadline, "{}", daemon.output());
        std::thread::sleep(Duration::from_millis(200));
    }
    env.ok(&["backup"]);
    source
        .batch_execute(&format!(
            "INSERT INTO app.fund_notes (organization_id, body) VALUES ('{tenant}', 'second');
             UPDATE app.fund_notes SET body = 'first, edited' WHERE body = 'first';"
        ))
        .await
        .unwrap();
    let t2 = now(&source).await;
    let s2 = tenant_state(&source, &tenant).await;
    // A change of app.funds with its definition of then: the migration below came after it.
    source
        .batch_execute(&format!(
            "UPDATE app.funds SET size_cents = 8 WHERE organization_id = '{tenant}'"
        ))
        .await
        .unwrap();
    let t2b = now(&source).await;
    wait_covered(&env, t2b, &mut daemon);
    assert_restores(&env, &tenant, t2, &s2).await;
    assert_refused(&env, &tenant, t1, "stream gap").await;

    // 3. A column added to a captured table, and changes of it a while later: the change
    //    stream carries the new shape with them, the snapshot before it does not, and nothing
    //    says when the column came. Refused from the last change known to have the old shape
    //    (an instant between the ALTER and the next change too: the table then had the column,
    //    which a restore would lack); whole again after a snapshot.
    source
        .batch_execute("ALTER TABLE app.funds ADD COLUMN note text")
        .await
        .unwrap();
    let t3a = now(&source).await;
    source
        .batch_execute(&format!(
            "UPDATE app.funds SET note = 'noted' WHERE organization_id = '{tenant}';"
        ))
        .await
        .unwrap();
    let t3 = now(&source).await;
    wait_covered(&env, t3, &mut daemon);
    assert!(
        daemon.output().contains("table definition changed"),
        "{}",
        daemon.output()
    );
    for t in [t3a, t3] {
        assert_refused(&env, &tenant, t, r#"definition of "app"."funds" changed"#).await;
    }
    env.ok(&["backup"]);
    source
        .batch_execute(&format!(
            "ALTER TABLE app.funds DROP COLUMN note;
             UPDATE app.funds SET size_cents = 9 WHERE organization_id = '{tenant}';"
        ))
        .await
        .unwrap();
    let t4 = now(&source).await;
    wait_covered(&env, t4, &mut daemon);
    let refused = assert_refused(&env, &tenant, t4, r#"definition of "app"."funds" changed"#).await;
    eprintln!("schema change refused: {}", refused.trim());
    assert!(daemon.terminate().success());
    // Restores before each change still work (t2 sits between the fix and the column).
    assert_restores(&env, &tenant, t2, &s2).await;
}
