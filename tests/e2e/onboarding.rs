//! First contact with a schema nobody here wrote (issue 13): PostgreSQL's own pgbench schema,
//! branches as tenants by an integer column (`bid`). Following only what `check` and `init`
//! print, a user reaches a running daemon, and restores of three branches after each of three
//! pgbench bursts equal the source at that instant. Nothing `init` does makes the source refuse
//! the application's writes, and every condition that would stop capture is an error in
//! `check` and a refusal of `init` and of the daemon, before a slot or a publication exists.

use std::collections::BTreeMap;
use std::process::Command;

use chrono::{DateTime, Utc};
use tokio_postgres::Client;

use crate::support::daemon::{Daemon, capture_env, wait_covered};
use crate::support::oracle::{assert_restore_equals, digest, now};
use crate::support::postgres::{Cluster, cluster};
use crate::support::{Repo, TestEnv};

/// The pgbench tables, each with the tenant column `bid`.
const PGBENCH_TABLES: &[&str] = &[
    "public.pgbench_branches",
    "public.pgbench_tellers",
    "public.pgbench_accounts",
    "public.pgbench_history",
];

/// Least-privileged roles (README, "Roles"): the backup role reads and replicates, owns no
/// table, so it cannot create the publication; the restore role only creates databases.
async fn roles(source: &Client) {
    source
        .batch_execute(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'onboard_backup') THEN
                 CREATE ROLE onboard_backup LOGIN REPLICATION; END IF;
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'onboard_restore') THEN
                 CREATE ROLE onboard_restore LOGIN CREATEDB; END IF;
             END $$;
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO onboard_backup;",
        )
        .await
        .unwrap();
}

/// A config for `db` whose tables are all in `public`, tenants by `tenant_column`.
async fn env_for(pg: &Cluster, db: &str, tenant_column: &str) -> TestEnv {
    let mut env = TestEnv::with_urls(
        &pg.url("onboard_backup", db),
        &pg.url("onboard_restore", "postgres"),
        Repo::Directory,
    )
    .await;
    let config = std::fs::read_to_string(&env.config_path).unwrap();
    let config = config.replace(
        "schemas = [\"app\", \"audit\"]\nglobal_tables = [\"app.currencies\"]",
        &format!("schemas = [\"public\"]\ntenant_column = \"{tenant_column}\""),
    );
    assert!(config.contains("tenant_column"), "{config}");
    std::fs::write(&env.config_path, config).unwrap();
    capture_env(&mut env);
    env
}

fn pgbench(pg: &Cluster, db: &str, args: &[&str]) {
    let out = Command::new(pg.bin.join("pgbench"))
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-p",
            &pg.port.to_string(),
        ])
        .args(args)
        .arg(db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pgbench {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `check --json` findings at `level`.
fn findings(env: &TestEnv, level: &str) -> Vec<serde_json::Value> {
    let out = env.run(&["check", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "check --json: {e}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["level"] == level)
        .cloned()
        .collect()
}

/// Whether the source has `slot` or `publication`: what `init` must not leave behind when it
/// refuses.
async fn created(source: &Client, env: &TestEnv) -> (bool, bool) {
    let slot = env
        .env
        .iter()
        .find(|(k, _)| k == "UPDOG_BACKUP__SOURCE__SLOT")
        .map(|(_, v)| v.clone())
        .unwrap();
    let row = source
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1),
                    EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'updog_backup')",
            &[&slot],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// A branch's rows: digest per pgbench table.
type Branch = BTreeMap<String, (i64, String)>;

/// Branch `bid`'s rows in every pgbench table.
async fn branch_state(source: &Client, bid: i32) -> Branch {
    let mut out = BTreeMap::new();
    for table in PGBENCH_TABLES {
        out.insert(
            table.to_string(),
            digest(source, table, Some(&format!("bid = {bid}"))).await,
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_branches_as_tenants_restore_exactly_after_each_burst() {
    let pg = cluster().await;
    let db = pg.fresh_db("pgbench").await;
    pgbench(pg, &db, &["-i", "-s", "3", "--foreign-keys", "-q"]);
    let owner = pg.client(&db).await;
    roles(&owner).await;
    let env = env_for(pg, &db, "bid").await;

    // check: the tables whose old rows would not carry bid are errors, each with its fix.
    let errors = findings(&env, "error");
    let subjects: Vec<&str> = errors
        .iter()
        .map(|f| f["subject"].as_str().unwrap())
        .collect();
    for table in [
        "public.pgbench_accounts",
        "public.pgbench_tellers",
        "public.pgbench_history",
    ] {
        assert!(subjects.contains(&table), "{errors:#?}");
    }
    assert!(
        !subjects.contains(&"public.pgbench_branches"),
        "{errors:#?}"
    );
    // The missing tenant index is a warning, with what its absence costs.
    let warnings = findings(&env, "warning");
    assert!(
        warnings.iter().any(|f| f["message"]
            .as_str()
            .unwrap()
            .contains("no index leads with (bid)")),
        "{warnings:#?}"
    );
    // init refuses before it creates anything, and says what to run.
    let refused = env.fails(&["init"], 2);
    assert!(
        refused.contains("ALTER TABLE \"public\".\"pgbench_accounts\" REPLICA IDENTITY FULL;"),
        "{refused}"
    );
    assert_eq!(created(&owner, &env).await, (false, false));

    // The user runs check's fixes as the owner, then init, which asks the owner for the
    // publication (this role owns no table), then init again.
    for finding in &errors {
        owner
            .batch_execute(finding["fix"].as_str().unwrap())
            .await
            .unwrap();
    }
    assert!(findings(&env, "error").is_empty());
    let refused = env.fails(&["init"], 2);
    let statement = refused
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("CREATE PUBLICATION"))
        .unwrap_or_else(|| panic!("no statement for the owner:\n{refused}"));
    owner.batch_execute(statement).await.unwrap();
    let out = env.ok(&["init"]);
    assert!(out.contains("3 tenant"), "{out}");

    let mut daemon = Daemon::start(&env);
    // After each burst: the instant, and every branch's rows then.
    let mut instants: Vec<(DateTime<Utc>, BTreeMap<i32, Branch>)> = Vec::new();
    for _ in 0..3 {
        pgbench(pg, &db, &["-n", "-c", "4", "-T", "10"]);
        let at = now(&owner).await;
        let mut states = BTreeMap::new();
        for bid in 1..=3 {
            states.insert(bid, branch_state(&owner, bid).await);
        }
        instants.push((at, states));
    }
    wait_covered(&env, instants.last().unwrap().0, &mut daemon);
    daemon.assert_running();
    for (round, (at, states)) in instants.iter().enumerate() {
        for (bid, state) in states {
            // The recovery database is compared unfiltered: another branch's row would show.
            assert_restore_equals(
                &env,
                &bid.to_string(),
                *at,
                state,
                &format!("pgbench_b{bid}_r{round}"),
            )
            .await;
        }
    }
    // An integer tenant by its id, in list and in messages.
    let listed = env.ok(&["list", "--org", "2"]);
    assert!(listed.contains('2'), "{listed}");
    let unknown = env.fails(&["restore", "--org", "7", "--latest"], 2);
    assert!(unknown.contains('7'), "{unknown}");
    daemon.terminate();
}

/// A schema whose tables this role owns, so `init` may create the publication itself.
async fn owned_db(pg: &Cluster, hint: &str, tables: &str) -> (String, Client) {
    let db = pg.fresh_db(hint).await;
    let owner = pg.client(&db).await;
    roles(&owner).await;
    owner
        .batch_execute(&format!(
            "GRANT CREATE ON DATABASE \"{db}\" TO onboard_backup;
             CREATE SCHEMA IF NOT EXISTS public;
             GRANT ALL ON SCHEMA public TO onboard_backup;
             SET ROLE onboard_backup;
             CREATE TABLE orgs (org_id bigint PRIMARY KEY, name text NOT NULL);
             INSERT INTO orgs SELECT g, 'org ' || g FROM generate_series(1, 3) g;
             {tables}
             RESET ROLE;"
        ))
        .await
        .unwrap();
    (db, owner)
}

/// Each condition that would stop capture, or make the source refuse the application's own
/// writes once published: `check` says error, `init` refuses (exit 2) with the statement and
/// creates neither slot nor publication, and the application's UPDATE and DELETE still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_refuses_what_would_stop_capture_and_never_breaks_the_applications_writes() {
    let pg = cluster().await;
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "no primary key",
            "CREATE TABLE events (org_id bigint NOT NULL REFERENCES orgs, n int);
             INSERT INTO events SELECT 1 + g % 3, g FROM generate_series(1, 30) g;",
            "events",
            "no primary key and default replica identity",
        ),
        (
            "identity nothing",
            "CREATE TABLE events (id int PRIMARY KEY, org_id bigint NOT NULL REFERENCES orgs, n int);
             ALTER TABLE events REPLICA IDENTITY NOTHING;
             INSERT INTO events SELECT g, 1 + g % 3, g FROM generate_series(1, 30) g;",
            "events",
            "REPLICA IDENTITY NOTHING",
        ),
        (
            "key without the route",
            "CREATE TABLE events (id int PRIMARY KEY, org_id bigint NOT NULL REFERENCES orgs, n int);
             INSERT INTO events SELECT g, 1 + g % 3, g FROM generate_series(1, 30) g;",
            "events",
            "lacks (org_id)",
        ),
        (
            "partitions without FULL",
            "CREATE TABLE events (org_id bigint NOT NULL, n int) PARTITION BY LIST (org_id);
             CREATE TABLE events_a PARTITION OF events FOR VALUES IN (1, 2);
             CREATE TABLE events_b PARTITION OF events FOR VALUES IN (3);
             ALTER TABLE events REPLICA IDENTITY FULL;
             ALTER TABLE events_a REPLICA IDENTITY FULL;
             INSERT INTO events SELECT 1 + g % 3, g FROM generate_series(1, 30) g;",
            "events",
            "events_b",
        ),
    ];
    for (i, &(case, tables, table, says)) in cases.iter().enumerate() {
        let (db, owner) = owned_db(pg, &format!("blocked{i}"), tables).await;
        let env = env_for(pg, &db, "org_id").await;
        let errors = findings(&env, "error");
        assert!(
            errors
                .iter()
                .any(|f| f["subject"] == format!("public.{table}")
                    && f["message"].as_str().unwrap().contains(says)
                    && f["fix"].as_str().unwrap().contains("REPLICA IDENTITY FULL")),
            "{case}: {errors:#?}"
        );
        let refused = env.fails(&["init"], 2);
        assert!(
            refused.contains("REPLICA IDENTITY FULL;") && refused.contains("nothing was started"),
            "{case}: {refused}"
        );
        assert_eq!(created(&owner, &env).await, (false, false), "{case}");
        // The application's own writes on the table still work.
        owner
            .batch_execute("UPDATE events SET n = n + 1; DELETE FROM events WHERE n > 20;")
            .await
            .unwrap_or_else(|e| panic!("{case}: the application's writes fail: {e}"));
        // Fixed as check says, init creates the publication itself, and the same writes work.
        for finding in &errors {
            if let Some(fix) = finding["fix"].as_str() {
                owner.batch_execute(fix).await.unwrap();
            }
        }
        let out = env.ok(&["init"]);
        assert!(out.contains("created publication"), "{case}: {out}");
        owner
            .batch_execute("UPDATE events SET n = n + 1; DELETE FROM events WHERE n > 10;")
            .await
            .unwrap_or_else(|e| {
                panic!("{case}: the application's writes fail once published: {e}")
            });
    }
}

/// A table altered after `init` so that capture would stop on it: the daemon refuses to start
/// (exit 2) and names the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_refuses_to_start_on_what_would_stop_capture() {
    let pg = cluster().await;
    let (db, owner) = owned_db(
        pg,
        "daemon_blocked",
        "CREATE TABLE events (id int PRIMARY KEY, org_id bigint NOT NULL REFERENCES orgs, n int);
         ALTER TABLE events REPLICA IDENTITY FULL;",
    )
    .await;
    let env = env_for(pg, &db, "org_id").await;
    env.ok(&["init"]);
    owner
        .batch_execute("ALTER TABLE events REPLICA IDENTITY DEFAULT")
        .await
        .unwrap();
    // Bounded: a daemon that started anyway is killed, and the test fails.
    let mut child = env
        .command(&["daemon"])
        .env(
            "UPDOG_BACKUP__SERVER__LISTEN",
            format!("127.0.0.1:{}", crate::support::postgres::free_port()),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the daemon started on a table whose changes it cannot route");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let refused = String::from_utf8_lossy(&out.stderr);
    assert!(
        refused.contains("ALTER TABLE \"public\".\"events\" REPLICA IDENTITY FULL;"),
        "{refused}"
    );
    // The stream begun by init waits for the fix: nothing was lost, the slot still exists.
    assert_eq!(created(&owner, &env).await, (true, true));
}
