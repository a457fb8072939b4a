//! Migrations inside the change stream: with the schema-change triggers installed (by a
//! superuser, from `updog-backup schema-triggers`), a daemon captures while the tables' owner
//! migrates between workload rounds; restores of two tenants to the instant after each step
//! are compared with the source's state then (rows, columns, constraints, indexes, policies).
//! Restores start from `init`'s snapshot or one taken halfway, so each replays the migrations
//! before it. A volatile default on a table without a primary key is refused from its commit
//! on, and restores before it stay exact.

use chrono::{DateTime, SecondsFormat, Utc};
use tokio_postgres::Client;

use crate::support::daemon::{Daemon, capture_env, wait_covered};
use crate::support::oracle::{digest, now};
use crate::support::postgres::cluster;
use crate::support::{Repo, TestEnv, database_exists, fixture_tenant, publish_tables_of_today};

/// Tables the migrations change and their tenant filter (`$ORG`); those created later exist
/// only from their step on (and `app.tasks` until it is renamed `app.todos`).
const TABLES: [(&str, &str); 5] = [
    ("app.funds", "organization_id = '$ORG'"),
    (
        "app.forecast_snapshots",
        "fund_id IN (SELECT id FROM app.funds WHERE organization_id = '$ORG')",
    ),
    ("app.tasks", "organization_id = '$ORG'"),
    ("app.todos", "organization_id = '$ORG'"),
    ("app.labels", "organization_id = '$ORG'"),
];

/// What a restore must reproduce of a table: its definition (columns, constraints, indexes,
/// policies, row level security) and the tenant's rows.
type State = Vec<(String, Vec<String>, (i64, String))>;

async fn state(client: &Client, tenant: Option<&str>) -> State {
    let mut out = Vec::new();
    for (table, filter) in TABLES {
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await
            .unwrap()
            .get(0);
        if !exists {
            continue;
        }
        let definition: Vec<String> = client
            .query(
                "SELECT 'column ' || attname || ' ' || format_type(atttypid, atttypmod)
                        || CASE WHEN attnotnull THEN ' not null' ELSE '' END
                        || coalesce(' default ' || pg_get_expr(adbin, adrelid), '')
                   FROM pg_attribute LEFT JOIN pg_attrdef ON adrelid = attrelid AND adnum = attnum
                  WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped
                 UNION ALL
                 SELECT 'constraint ' || conname || ' ' || pg_get_constraintdef(oid)
                   FROM pg_constraint WHERE conrelid = $1::text::regclass
                 UNION ALL
                 SELECT 'index ' || pg_get_indexdef(indexrelid) FROM pg_index
                  WHERE indrelid = $1::text::regclass
                 UNION ALL
                 SELECT 'policy ' || polname || ' ' || polcmd::text || ' '
                        || coalesce(pg_get_expr(polqual, polrelid), '') || ' '
                        || coalesce(pg_get_expr(polwithcheck, polrelid), '')
                   FROM pg_policy WHERE polrelid = $1::text::regclass
                 UNION ALL
                 SELECT 'row security ' || relrowsecurity || ' ' || relforcerowsecurity
                   FROM pg_class WHERE oid = $1::text::regclass
                 ORDER BY 1",
                &[&table],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let filter = tenant.map(|t| filter.replace("$ORG", t));
        out.push((
            table.to_string(),
            definition,
            digest(client, table, filter.as_deref()).await,
        ));
    }
    out
}

fn at(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Every step's instant and each tenant's state then.
struct Steps {
    tenants: Vec<String>,
    taken: Vec<(String, DateTime<Utc>, Vec<State>)>,
}

impl Steps {
    async fn record(&mut self, source: &Client, step: &str) {
        let t = now(source).await;
        let mut states = Vec::new();
        for tenant in &self.tenants {
            states.push(state(source, Some(tenant)).await);
        }
        self.taken.push((step.to_string(), t, states));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_follow_migrations_captured_in_the_stream() {
    migrations(Repo::Directory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_follow_migrations_captured_in_the_stream_on_s3() {
    migrations(Repo::S3).await;
}

async fn migrations(repo: Repo) {
    let pg = cluster().await;
    let name = format!("migrations_{}", format!("{repo:?}").to_lowercase());
    let db = pg.capture_fixture_db(&name, 3, "0.1").await;
    let source = pg.client(&db).await;
    let mut env = TestEnv::new(&db, repo).await;
    capture_env(&mut env);

    // A tenant table without a primary key (its rows are found by every column).
    source
        .batch_execute(
            "CREATE TABLE app.notes_without_key (organization_id uuid NOT NULL, body text);
             ALTER TABLE app.notes_without_key REPLICA IDENTITY FULL;
             GRANT SELECT ON app.notes_without_key TO updog_backup;",
        )
        .await
        .unwrap();
    // The backup role may not create event triggers: init says so, and check warns.
    let out = env.ok(&["init"]);
    assert!(
        out.contains("schema changes are NOT captured") && out.contains("schema-triggers"),
        "{out}"
    );
    // A superuser installs them as init said, before any migration.
    env.install_schema_triggers(&db).await;
    let check = env.ok(&["check"]);
    assert!(check.contains("captured into the change stream"), "{check}");

    let tenants = vec![fixture_tenant(1).await, fixture_tenant(3).await];
    let mut steps = Steps {
        tenants: tenants.clone(),
        taken: Vec::new(),
    };
    let mut daemon = Daemon::start(&env);
    let touch = |column: &str, value: &str| {
        format!(
            "UPDATE app.funds SET {column} = {value} WHERE id IN (SELECT id FROM app.funds
               WHERE organization_id IN ('{}', '{}') ORDER BY id LIMIT 3);",
            tenants[0], tenants[1]
        )
    };
    let migrations = [
        (
            "workload before any migration",
            touch("size_cents", "11"),
        ),
        (
            "a column added with a default, then written",
            format!(
                "ALTER TABLE app.funds ADD COLUMN region text NOT NULL DEFAULT 'eu';
                 {}",
                touch("region", "'us'")
            ),
        ),
        (
            "a column renamed and its default changed, in one transaction with its updates",
            format!(
                "BEGIN;
                 {}
                 ALTER TABLE app.funds RENAME COLUMN region TO area;
                 ALTER TABLE app.funds ALTER COLUMN area SET DEFAULT 'apac';
                 {}
                 COMMIT;",
                touch("size_cents", "12"),
                touch("area", "'emea'")
            ),
        ),
        (
            "a nullable column, backfilled, made NOT NULL, with a CHECK",
            format!(
                "ALTER TABLE app.funds ADD COLUMN note text;
                 UPDATE app.funds SET note = 'n-' || left(name, 3);
                 ALTER TABLE app.funds ALTER COLUMN note SET NOT NULL;
                 ALTER TABLE app.funds ADD CONSTRAINT note_not_empty CHECK (note <> '');
                 {}",
                touch("note", "'changed'")
            ),
        ),
        (
            "a type changed by a rewrite, without USING: the restore converts as the source did",
            format!(
                "ALTER TABLE app.funds ALTER COLUMN vintage_year TYPE bigint;
                 {}",
                touch("vintage_year", "3000000000")
            ),
        ),
        (
            "a column dropped, a type widened without a rewrite, an index",
            format!(
                "ALTER TABLE app.funds DROP COLUMN area;
                 ALTER TABLE app.funds ALTER COLUMN name TYPE varchar;
                 CREATE INDEX funds_note ON app.funds (note);
                 {}",
                touch("note", "'after drop'")
            ),
        ),
        (
            "a tenant column added to a table reached through a foreign key, half backfilled (the seed's pattern); a snapshot taken then",
            "ALTER TABLE app.forecast_snapshots ADD COLUMN organization_id uuid;
             UPDATE app.forecast_snapshots s SET organization_id = f.organization_id
               FROM app.funds f WHERE f.id = s.fund_id AND s.id % 2 = 0;"
                .to_string(),
        ),
        (
            "the rest backfilled, made NOT NULL with its foreign key and policy",
            "UPDATE app.forecast_snapshots s SET organization_id = f.organization_id
               FROM app.funds f WHERE f.id = s.fund_id AND s.organization_id IS NULL;
             BEGIN;
             ALTER TABLE app.forecast_snapshots ALTER COLUMN organization_id SET NOT NULL,
               ADD CONSTRAINT forecast_snapshots_organization_fkey
                 FOREIGN KEY (organization_id) REFERENCES app.organizations(id);
             DROP POLICY forecast_snapshots_tenant ON app.forecast_snapshots;
             CREATE POLICY forecast_snapshots_tenant ON app.forecast_snapshots
               TO updog_app, updog_analytics USING (organization_id = app.current_org_id());
             COMMIT;"
                .to_string(),
        ),
        (
            "a table created, published, filled",
            format!(
                "CREATE TABLE app.tasks (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                                         organization_id uuid NOT NULL, title text NOT NULL);
                 ALTER TABLE app.tasks REPLICA IDENTITY FULL;
                 GRANT SELECT ON app.tasks TO updog_backup;
                 INSERT INTO app.tasks (organization_id, title)
                   VALUES ('{0}', 'one'), ('{0}', 'two'), ('{1}', 'three');
                 UPDATE app.tasks SET title = 'two, done' WHERE title = 'two';",
                tenants[0], tenants[1]
            ),
        ),
        (
            "a volatile default and a type change USING an expression: the rows follow the statement",
            format!(
                "ALTER TABLE app.funds ADD COLUMN score float8 NOT NULL DEFAULT random();
                 ALTER TABLE app.funds ALTER COLUMN vintage_year TYPE text
                   USING vintage_year::text || ' AD';
                 {}",
                touch("size_cents", "14")
            ),
        ),
        (
            "a table renamed, an index and a constraint dropped, a table on a new sequence",
            format!(
                "ALTER TABLE app.tasks RENAME TO todos;
                 DROP INDEX app.funds_note;
                 ALTER TABLE app.funds DROP CONSTRAINT note_not_empty;
                 CREATE SEQUENCE app.label_ids START 100;
                 CREATE TABLE app.labels (id bigint PRIMARY KEY DEFAULT nextval('app.label_ids'),
                                          organization_id uuid NOT NULL REFERENCES app.organizations(id),
                                          name text);
                 GRANT SELECT ON app.labels TO updog_backup;
                 INSERT INTO app.labels (organization_id, name) VALUES ('{0}', 'x'), ('{1}', 'y');
                 UPDATE app.todos SET title = title || '!' WHERE organization_id = '{0}';",
                tenants[0], tenants[1]
            ),
        ),
        (
            "a table dropped",
            format!("DROP TABLE app.labels; {}", touch("size_cents", "13")),
        ),
    ];
    for (step, sql) in &migrations {
        if step.starts_with("a column renamed") {
            // The daemon is killed while the migration's transaction is open, and started
            // again before it commits: nothing of it may be lost or doubled.
            let migrating = pg.client(&db).await;
            let (first, rest) = sql
                .split_once("ALTER TABLE app.funds ALTER COLUMN")
                .unwrap();
            migrating.batch_execute(first).await.unwrap();
            daemon.kill();
            migrating
                .batch_execute(&format!("ALTER TABLE app.funds ALTER COLUMN{rest}"))
                .await
                .unwrap_or_else(|e| panic!("{step}: {e}"));
            daemon = Daemon::start(&env);
        } else {
            source
                .batch_execute(sql)
                .await
                .unwrap_or_else(|e| panic!("{step}: {e}"));
        }
        steps.record(&source, step).await;
        if step.ends_with("a snapshot taken then") {
            // Its rows with no tenant column value yet are their fund's tenant's: restores
            // after it start from this snapshot and replay the rest of the migration.
            env.ok(&["backup"]);
        }
    }
    // A volatile default on a table without a primary key: its rows' values are nowhere.
    source
        .batch_execute("ALTER TABLE app.notes_without_key ADD COLUMN score float8 DEFAULT random()")
        .await
        .unwrap();
    let rewritten = now(&source).await;
    let last = steps.taken.last().unwrap().1;
    wait_covered(&env, rewritten, &mut daemon);
    if repo == Repo::Directory {
        assert!(
            !env.repo_dir.join("changes/gaps").exists(),
            "a FOR ALL TABLES publication leaves no gap"
        );
    }
    assert!(
        daemon.output().contains("schema change captured"),
        "{}",
        daemon.output()
    );

    for (step, t, states) in &steps.taken {
        for (tenant, want) in tenants.iter().zip(states) {
            let target = format!("migrations_{}", fastrand::u32(..));
            let out = env.ok(&[
                "restore",
                "--org",
                tenant,
                "--at",
                &at(*t),
                "--target-db",
                &target,
            ]);
            let recovered = cluster().await.client(&target).await;
            let found = state(&recovered, None).await;
            assert_eq!(&found, want, "{step}: tenant {tenant}\n{out}");
            if step.starts_with("a table created") {
                assert!(out.contains("schema change"), "{out}");
            }
        }
    }

    // After the rewrite: refused, naming it and its time; nothing left behind.
    let target = format!("migrations_refused_{}", fastrand::u32(..));
    let out = env.run(&[
        "restore",
        "--org",
        &tenants[0],
        "--at",
        &at(rewritten),
        "--target-db",
        &target,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("ALTER TABLE app.notes_without_key")
            && stderr.contains("rewrote every row")
            && stderr.contains("no primary key"),
        "{stderr}"
    );
    assert!(!database_exists(&target).await, "{target} left behind");
    assert!(last < rewritten);
    assert!(daemon.terminate().success());
    // Packs with schema changes in them decrypt and parse like any other.
    env.ok(&["verify", "--deep"]);
}

/// A table created outside a `FOR TABLE` publication: its changes are not in the stream, so a
/// stream gap is recorded — from its creation (the schema change says when), not from the
/// last snapshot before it: a restore between that snapshot and the CREATE TABLE still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_the_publication_lacks_is_a_gap_from_its_creation() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("migrations_gap", 2, "0.1").await;
    let source = pg.client(&db).await;
    let mut env = TestEnv::new(&db, Repo::Directory).await;
    capture_env(&mut env);
    publish_tables_of_today(&source).await;
    env.install_schema_triggers(&db).await;
    env.ok(&["init"]);
    let tenant = fixture_tenant(1).await;
    let mut daemon = Daemon::start(&env);

    source
        .batch_execute(&format!(
            "UPDATE app.funds SET size_cents = 21 WHERE organization_id = '{tenant}'"
        ))
        .await
        .unwrap();
    let before = now(&source).await;
    let want = state(&source, Some(&tenant)).await;
    source
        .batch_execute(&format!(
            "CREATE TABLE app.tasks (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                                     organization_id uuid NOT NULL, title text);
             ALTER TABLE app.tasks REPLICA IDENTITY FULL;
             GRANT SELECT ON app.tasks TO updog_backup;
             INSERT INTO app.tasks (organization_id, title) VALUES ('{tenant}', 'lost');"
        ))
        .await
        .unwrap();
    let after = now(&source).await;
    wait_covered(&env, after, &mut daemon);

    // The gap that names the table starts at its creation (whichever of the capture and the
    // minute's publication check met it first).
    let gaps: Vec<serde_json::Value> = std::fs::read_dir(env.repo_dir.join("changes/gaps"))
        .expect("a gap record")
        .map(|f| serde_json::from_slice(&std::fs::read(f.unwrap().path()).unwrap()).unwrap())
        .filter(|g: &serde_json::Value| !g["tables"].as_array().unwrap().is_empty())
        .collect();
    assert_eq!(gaps.len(), 1, "{gaps:?}\n{}", daemon.output());
    let from: DateTime<Utc> = gaps[0]["from_time"].as_str().unwrap().parse().unwrap();
    assert!(before < from && from <= after, "{gaps:?}");
    let target = format!("migrations_gap_{}", fastrand::u32(..));
    env.ok(&[
        "restore",
        "--org",
        &tenant,
        "--at",
        &at(before),
        "--target-db",
        &target,
    ]);
    let recovered = cluster().await.client(&target).await;
    assert_eq!(state(&recovered, None).await, want);

    let target = format!("migrations_gap_refused_{}", fastrand::u32(..));
    let out = env.run(&[
        "restore",
        "--org",
        &tenant,
        "--at",
        &at(after),
        "--target-db",
        &target,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("stream gap") && stderr.contains("tasks"),
        "{stderr}"
    );
    assert!(!database_exists(&target).await);
    assert!(daemon.terminate().success());
}
