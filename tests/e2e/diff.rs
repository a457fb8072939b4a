//! `diff` (issue 16): what changed in one tenant since a restore point, against the live
//! source and between two restore points, equals what the test did to it — and nothing of the
//! other tenant's changes, made at the same time, shows.

use std::collections::BTreeMap;

use crate::support::daemon::{Daemon, capture_env, wait_covered};
use crate::support::fixture_tenant;
use crate::support::oracle::now;
use crate::support::postgres::cluster;
use crate::support::{Repo, TestEnv};

/// (inserted, deleted, updated) of every table `diff --json` reports with a change.
fn changes(report: &serde_json::Value) -> BTreeMap<String, (u64, u64, u64)> {
    report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["table"].as_str().unwrap().to_string(),
                (
                    t["inserted"].as_u64().unwrap(),
                    t["deleted"].as_u64().unwrap(),
                    t["updated"].as_u64().unwrap(),
                ),
            )
        })
        .filter(|(_, c)| *c != (0, 0, 0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_names_what_changed_in_one_tenant_since_an_instant() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("diff", 3, "0.1").await;
    let source = pg.client(&db).await;
    let mut env = TestEnv::new(&db, Repo::Directory).await;
    capture_env(&mut env);
    env.ok(&["init"]);
    let mut daemon = Daemon::start(&env);
    let (a, b) = (fixture_tenant(1).await, fixture_tenant(2).await);

    let before = now(&source).await;
    let permissions: i64 = source
        .query_one(
            "SELECT count(*) FROM app.fund_permissions WHERE organization_id = $1::text::uuid",
            &[&a],
        )
        .await
        .unwrap()
        .get(0);
    assert!(permissions > 0);
    let user: (String, String) = source
        .query_one(
            "SELECT id::text, role FROM app.users WHERE organization_id = $1::text::uuid ORDER BY id LIMIT 1",
            &[&a],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    let new_role = if user.1 == "viewer" {
        "analyst"
    } else {
        "viewer"
    };
    // The tenant's mistakes, and the other tenant's ordinary work at the same time.
    for tenant in [&a, &b] {
        source
            .batch_execute(&format!(
                "DELETE FROM app.fund_permissions WHERE organization_id = '{tenant}';
                 INSERT INTO audit.events (organization_id, action, entity)
                   SELECT '{tenant}', 'import', 'lot' FROM generate_series(1, 3);"
            ))
            .await
            .unwrap();
    }
    source
        .batch_execute(&format!(
            "UPDATE app.users SET role = '{new_role}' WHERE id = '{}'",
            user.0
        ))
        .await
        .unwrap();
    let after = now(&source).await;
    wait_covered(&env, after, &mut daemon);

    let expected: BTreeMap<String, (u64, u64, u64)> = [
        (
            "app.fund_permissions".to_string(),
            (0, permissions as u64, 0),
        ),
        ("app.users".to_string(), (0, 0, 1)),
        ("audit.events".to_string(), (3, 0, 0)),
    ]
    .into();
    let at = before.to_rfc3339();
    // Against the live source.
    let live: serde_json::Value =
        serde_json::from_str(&env.ok(&["diff", "--org", &a, "--at", &at, "--json"])).unwrap();
    assert_eq!(changes(&live), expected, "{live:#}");
    assert_eq!(live["to"]["kind"], "live");
    // Between two restore points (the source is not read), with every row named.
    let out = env.ok(&[
        "diff",
        "--org",
        &a,
        "--from",
        &at,
        "--to",
        &after.to_rfc3339(),
        "--rows",
        "--json",
    ]);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (report, rows) = lines.split_last().unwrap();
    assert_eq!(changes(report), expected, "{report:#}");
    assert_eq!(rows.len() as i64, permissions + 3 + 1, "{out}");
    let update = rows
        .iter()
        .find(|r| r["change"] == "update")
        .unwrap_or_else(|| panic!("no update among\n{out}"));
    assert_eq!(update["table"], "app.users");
    assert_eq!(update["key"], serde_json::json!([user.0]));
    assert_eq!(update["before"]["role"], user.1.as_str());
    assert_eq!(update["after"]["role"], new_role);
    assert!(rows.iter().all(|r| {
        let row = if r["change"] == "insert" {
            &r["after"]
        } else {
            &r["before"]
        };
        row["organization_id"].is_null() || row["organization_id"] == a.as_str()
    }));
    // The human report; and nothing left behind on the restore target.
    let human = env.ok(&["diff", "--org", &a, "--at", &at]);
    assert!(
        human.contains(&format!("{} row(s) changed in 3 table(s)", permissions + 4)),
        "{human}"
    );
    let scratch: i64 = pg
        .client("postgres")
        .await
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'updog\\_diff\\_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(scratch, 0, "a scratch database was left behind");
    // Bad input: neither --at nor --from.
    let usage = env.fails(&["diff", "--org", &a], 2);
    assert!(
        usage.contains("--at") && usage.contains("--from"),
        "{usage}"
    );
    daemon.terminate();
}
