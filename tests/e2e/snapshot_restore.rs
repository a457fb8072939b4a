//! End to end: real PostgreSQL, the real binary, repositories in a directory and in SeaweedFS.
//! The oracle is independent of the code under test: hand-written tenant filters for the
//! reference schema, and a digest of every column of every row as PostgreSQL prints it.

use crate::support::fixture::TENANT_FILTERS;
pub use crate::support::oracle::digest;
use crate::support::postgres::cluster;
use crate::support::restore_latest;
use crate::support::{Repo, TestEnv, fixture_tenant};

/// The recovery database equals the source for `tenant`, table by table, and holds nothing else.
pub async fn assert_restored(source_db: &str, recovery_db: &str, tenant: &str) {
    let pg = cluster().await;
    let source = pg.client(source_db).await;
    let recovered = pg.client(recovery_db).await;
    let mut total = 0;
    for (table, filter) in TENANT_FILTERS {
        let filter = filter.map(|f| f.replace("$ORG", tenant));
        let expected = digest(&source, table, filter.as_deref()).await;
        // No filter on the recovery side: every row there must be the tenant's.
        let found = digest(&recovered, table, None).await;
        assert_eq!(
            found, expected,
            "{table} of tenant {tenant} differs in {recovery_db}"
        );
        total += expected.0;
    }
    assert!(total > 0, "tenant {tenant} has rows");
}

async fn round_trip(repo: Repo) {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("roundtrip", 12, "0.2").await;
    let env = TestEnv::new(&db, repo).await;
    assert!(env.ok(&["init"]).contains("initialised repository"));
    assert!(
        env.ok(&["init"]).contains("already initialised"),
        "init is idempotent"
    );
    let out = env.ok(&["backup"]);
    assert!(out.contains("12 tenant(s)"), "{out}");
    for (k, name) in [(1, "largest"), (6, "middle"), (12, "smallest")] {
        let tenant = fixture_tenant(k).await;
        let target = format!("{name}_{}", db);
        let out = env.ok(&restore_latest(&tenant, &target));
        assert!(out.contains(&format!("into database {target}")), "{out}");
        assert!(out.contains("restore point: LSN"), "{out}");
        assert!(
            !out.contains("NOT RECREATED"),
            "same cluster: every policy and grant is recreated\n{out}"
        );
        assert_restored(&db, &target, &tenant).await;
    }
    let list = env.ok(&["list", "--org", &fixture_tenant(1).await]);
    assert!(list.contains("restorable from"), "{list}");
    let verify = env.ok(&["verify", "--deep"]);
    assert!(verify.contains("0 failed"), "{verify}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_directory_repository() {
    round_trip(Repo::Directory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_s3_repository() {
    round_trip(Repo::S3).await;
}

/// Types beyond the reference schema, including those whose binary COPY form is database
/// specific (arrays of enums, composites), generated and identity columns, and hostile names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_column_type_round_trips() {
    let pg = cluster().await;
    let db = pg.fresh_db("types").await;
    pg.client(&db)
        .await
        .batch_execute(
            r#"
            CREATE SCHEMA "odd.schema";
            CREATE TYPE "odd.schema".mood AS ENUM ('sad', 'ok', 'happy');
            CREATE TYPE "odd.schema".pair AS (a int, b text);
            CREATE TABLE "odd.schema"."Tenants" ("Org" text PRIMARY KEY);
            CREATE TABLE "odd.schema"."select" (
              id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
              "Org" text NOT NULL REFERENCES "odd.schema"."Tenants",
              moods "odd.schema".mood[], p "odd.schema".pair, f float8, i interval, j jsonb, b bytea,
              n numeric, t timestamptz, tz time with time zone, r int4range, x xml, u uuid,
              "we""ird" text, doubled int GENERATED ALWAYS AS (id * 2) STORED
            );
            CREATE TABLE "odd.schema".child (id serial PRIMARY KEY, parent int NOT NULL REFERENCES "odd.schema"."select");
            INSERT INTO "odd.schema"."Tenants" VALUES ('t''1'), ('t2; DROP TABLE x'), ('ünï cödé');
            INSERT INTO "odd.schema"."select" ("Org", moods, p, f, i, j, b, n, t, tz, r, x, u, "we""ird") VALUES
              ('t''1', '{sad,happy}', ROW(1, 'a,b"c'), 'NaN', '1 year 2 mons -3 days 04:05:06.789', '{"k": [1, null, "\u00e9"]}',
               '\x00ff10', 1e-30, '2026-11-26 12:34:56.789012+05:30', '10:00:00+02', '[1,10)', '<a>b</a>', gen_random_uuid(), E'tab\there\nnewline\\back'),
              ('t''1', NULL, NULL, '-Infinity', NULL, 'null', '', -0.000001, 'infinity', NULL, 'empty', NULL, NULL, ''),
              ('t2; DROP TABLE x', '{}', ROW(NULL, NULL), 1.5e300, '0', '[]', '\x', 12345678901234567890.123456789, '-infinity', NULL, NULL, NULL, NULL, NULL),
              ('ünï cödé', '{ok}', ROW(-1, ''), 0, NULL, '{}', NULL, NULL, NULL, NULL, NULL, NULL, NULL, 'ü');
            INSERT INTO "odd.schema".child (parent) SELECT id FROM "odd.schema"."select";
            GRANT USAGE ON SCHEMA "odd.schema" TO updog_backup;
            GRANT SELECT ON ALL TABLES IN SCHEMA "odd.schema" TO updog_backup;
            GRANT SELECT ON ALL SEQUENCES IN SCHEMA "odd.schema" TO updog_backup;
            "#,
        )
        .await
        .unwrap();
    let env = TestEnv::new(&db, Repo::Directory).await;
    let config = std::fs::read_to_string(&env.config_path)
        .unwrap()
        .replace(
            r#"schemas = ["app", "audit"]"#,
            r#"schemas = ["odd.schema"]"#,
        )
        .replace(r#"global_tables = ["app.currencies"]"#, "")
        .replace("[source]", "[source]\ntenant_column = \"Org\"");
    std::fs::write(&env.config_path, config).unwrap();
    env.apply_identity_fixes(&pg.client(&db).await).await;
    env.ok(&["init"]);
    let check = env.ok(&["check"]);
    assert!(
        check.contains("odd.schema.child")
            && check.contains("(parent) → odd.schema.select(id).Org"),
        "{check}"
    );
    assert!(
        check.contains("COPY in text format"),
        "the table with enum[] and composite columns travels as text\n{check}"
    );
    env.ok(&["backup"]);
    let recovered_client = |db: String| async move { pg.client(&db).await };
    for (n, tenant) in ["t'1", "t2; DROP TABLE x", "ünï cödé"]
        .into_iter()
        .enumerate()
    {
        let target = format!("types_{n}_{db}");
        env.ok(&restore_latest(tenant, &target));
        let source = pg.client(&db).await;
        let recovered = recovered_client(target.clone()).await;
        let lit = tenant.replace('\'', "''");
        for (table, filter) in [
            ("\"odd.schema\".\"Tenants\"", format!("\"Org\" = '{lit}'")),
            ("\"odd.schema\".\"select\"", format!("\"Org\" = '{lit}'")),
            (
                "\"odd.schema\".child",
                format!(
                    "parent IN (SELECT id FROM \"odd.schema\".\"select\" WHERE \"Org\" = '{lit}')"
                ),
            ),
        ] {
            let expected = crate::snapshot_restore::digest(&source, table, Some(&filter)).await;
            assert!(expected.0 > 0);
            assert_eq!(
                crate::snapshot_restore::digest(&recovered, table, None).await,
                expected,
                "{table} for {tenant}"
            );
        }
        // Identity and serial sequences continue after the source's values.
        let next: i32 = recovered.query_one("INSERT INTO \"odd.schema\".child (parent) SELECT min(id) FROM \"odd.schema\".\"select\" RETURNING id", &[]).await.unwrap().get(0);
        assert!(next > 4, "sequence restored (got {next})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_as_of_a_snapshot_time_and_window_refusals() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("pitr_snapshots", 5, "0.1").await;
    let env = TestEnv::new(&db, Repo::Directory).await;
    env.ok(&["init"]);
    let tenant = fixture_tenant(2).await;
    env.ok(&["backup"]);
    let source = pg.client(&db).await;
    let before: serde_json::Value =
        serde_json::from_str(&env.ok(&["list", "--org", &tenant, "--json"])).unwrap();
    let first_time = before["snapshots"][0]["consistent_time"]
        .as_str()
        .unwrap()
        .to_string();
    let first_state = crate::snapshot_restore::digest(
        &source,
        "app.funds",
        Some(&format!("organization_id = '{tenant}'")),
    )
    .await;
    source.batch_execute(&format!("DELETE FROM app.fund_permissions WHERE organization_id = '{tenant}'; UPDATE app.funds SET name = 'renamed' WHERE organization_id = '{tenant}'")).await.unwrap();
    env.ok(&["backup", "--org", &tenant]);

    // --at the first snapshot's time restores the first state, --latest the second.
    let target = format!("first_{db}");
    let report: serde_json::Value = serde_json::from_str(&env.ok(&[
        "restore",
        "--org",
        &tenant,
        "--at",
        &first_time,
        "--target-db",
        &target,
        "--json",
    ]))
    .unwrap();
    assert_eq!(report["snapshot"], before["snapshots"][0]["id"]);
    let recovered = pg.client(&target).await;
    assert_eq!(
        crate::snapshot_restore::digest(&recovered, "app.funds", None).await,
        first_state
    );
    let latest = format!("latest_{db}");
    env.ok(&restore_latest(&tenant, &latest));
    assert_restored(&db, &latest, &tenant).await;

    // Outside the window: refused with the window in the message, nothing created.
    let err = env.fails(
        &[
            "restore",
            "--org",
            &tenant,
            "--at",
            "2001-01-01T00:00:00Z",
            "--target-db",
            "never_made",
        ],
        2,
    );
    assert!(
        err.contains("outside the restorable window") && err.contains(&first_time[..19]),
        "{err}"
    );
    let err = env.fails(
        &[
            "restore",
            "--org",
            &tenant,
            "--at",
            "2999-01-01T00:00:00Z",
            "--target-db",
            "never_made",
        ],
        2,
    );
    assert!(err.contains("outside the restorable window"), "{err}");
    let exists: bool = source
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_database WHERE datname = 'never_made')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!exists);
    // Tenant 3 is in init's snapshot and the first backup, not in the partial one.
    let other = fixture_tenant(3).await;
    let out = env.ok(&["list", "--org", &other]);
    assert!(out.contains("(2 snapshot(s)"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_for_missing_roles_are_reported_not_dropped() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("missing_role", 3, "0.1").await;
    let source = pg.client(&db).await;
    let role = format!("auditor_{}", fastrand::u32(..));
    source
        .batch_execute(&format!("CREATE ROLE {role}; CREATE POLICY auditors ON audit.events FOR SELECT TO {role} USING (true); GRANT SELECT ON audit.events TO {role};"))
        .await
        .unwrap();
    let env = TestEnv::new(&db, Repo::Directory).await;
    env.ok(&["init"]);
    env.ok(&["backup"]);
    source.batch_execute(&format!("DROP POLICY auditors ON audit.events; REVOKE ALL ON audit.events FROM {role}; DROP ROLE {role};")).await.unwrap();
    let tenant = fixture_tenant(1).await;
    let target = format!("partial_{db}");
    let out = env.ok(&restore_latest(&tenant, &target));
    assert!(
        out.contains("NOT RECREATED POLICY audit.events auditors"),
        "{out}"
    );
    assert_restored(&db, &target, &tenant).await;
    // RLS is on again after the load, and forced, like on the source.
    let recovered = pg.client(&target).await;
    let row = recovered.query_one("SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE oid = 'app.funds'::regclass", &[]).await.unwrap();
    assert!(row.get::<_, bool>(0) && row.get::<_, bool>(1));
    let owner: String = recovered.query_one("SELECT tableowner::text FROM pg_tables WHERE schemaname = 'app' AND tablename = 'funds'", &[]).await.unwrap().get(0);
    assert_eq!(owner, "updog_restore", "restored by a CREATEDB-only role");
}

/// Routes the reference schema does not have: a composite foreign key that carries the tenant
/// column (the child is routed by its own copy of it), a composite key chain without it, and a
/// chain through both. Checked against hand-written filters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_and_mapped_foreign_keys_route_rows() {
    let pg = cluster().await;
    let db = pg.fresh_db("routes").await;
    pg.client(&db)
        .await
        .batch_execute(
            r#"
            CREATE SCHEMA r;
            CREATE TABLE r.orgs (id uuid PRIMARY KEY);
            CREATE TABLE r.projects (organization_id uuid REFERENCES r.orgs, id int, PRIMARY KEY (organization_id, id));
            -- the tenant value arrives under another name through a composite key
            CREATE TABLE r.tasks (id serial PRIMARY KEY, owner_org uuid NOT NULL, project int NOT NULL,
                                  FOREIGN KEY (owner_org, project) REFERENCES r.projects (organization_id, id));
            CREATE TABLE r.regions (a int, b int, organization_id uuid NOT NULL, PRIMARY KEY (a, b));
            -- composite key, no tenant column: routed through r.regions
            CREATE TABLE r.sites (id serial PRIMARY KEY, a int NOT NULL, b int NOT NULL, FOREIGN KEY (a, b) REFERENCES r.regions);
            CREATE TABLE r.site_notes (id serial PRIMARY KEY, site int NOT NULL REFERENCES r.sites, task int REFERENCES r.tasks, body text);
            INSERT INTO r.orgs SELECT md5('o' || g)::uuid FROM generate_series(1, 3) g;
            INSERT INTO r.projects SELECT id, p FROM r.orgs, generate_series(1, 2) p;
            INSERT INTO r.tasks (owner_org, project) SELECT organization_id, id FROM r.projects, generate_series(1, 3);
            INSERT INTO r.regions SELECT g, g * 10, md5('o' || (1 + g % 3))::uuid FROM generate_series(1, 6) g;
            INSERT INTO r.sites (a, b) SELECT a, b FROM r.regions, generate_series(1, 2);
            INSERT INTO r.site_notes (site, task, body) SELECT id, NULL, 'note ' || id FROM r.sites;
            GRANT USAGE ON SCHEMA r TO updog_backup;
            GRANT SELECT ON ALL TABLES IN SCHEMA r TO updog_backup;
            GRANT SELECT ON ALL SEQUENCES IN SCHEMA r TO updog_backup;
            "#,
        )
        .await
        .unwrap();
    let env = TestEnv::new(&db, Repo::Directory).await;
    let config = std::fs::read_to_string(&env.config_path)
        .unwrap()
        .replace(r#"schemas = ["app", "audit"]"#, r#"schemas = ["r"]"#)
        .replace(r#"global_tables = ["app.currencies"]"#, "");
    std::fs::write(&env.config_path, config).unwrap();
    env.apply_identity_fixes(&pg.client(&db).await).await;
    let check = env.ok(&["check"]);
    let lines: Vec<String> = check
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    for route in [
        "r.orgs tenant own column id",
        "r.tasks tenant own column owner_org",
        "r.sites tenant (a, b) → r.regions(a, b).organization_id",
        // through the NOT NULL key, not the shorter nullable one (task)
        "r.site_notes tenant (site) → r.sites(id) → (a, b) → r.regions(a, b).organization_id",
    ] {
        assert!(
            lines.iter().any(|l| l == route),
            "missing {route:?} in\n{check}"
        );
    }
    env.ok(&["init"]);
    env.ok(&["backup"]);
    let source = pg.client(&db).await;
    for k in 1..=3 {
        let org: String = source
            .query_one("SELECT md5('o' || $1::int)::uuid::text", &[&k])
            .await
            .unwrap()
            .get(0);
        let target = format!("routes_{k}_{db}");
        env.ok(&restore_latest(&org, &target));
        let recovered = pg.client(&target).await;
        for (table, filter) in [
            ("r.orgs", format!("id = '{org}'")),
            ("r.projects", format!("organization_id = '{org}'")),
            ("r.tasks", format!("owner_org = '{org}'")),
            ("r.regions", format!("organization_id = '{org}'")),
            (
                "r.sites",
                format!("(a, b) IN (SELECT a, b FROM r.regions WHERE organization_id = '{org}')"),
            ),
            (
                "r.site_notes",
                format!(
                    "site IN (SELECT s.id FROM r.sites s JOIN r.regions g USING (a, b) WHERE g.organization_id = '{org}')"
                ),
            ),
        ] {
            let expected = digest(&source, table, Some(&filter)).await;
            assert!(expected.0 > 0, "{table} has rows of {org}");
            assert_eq!(
                digest(&recovered, table, None).await,
                expected,
                "{table} of {org}"
            );
        }
    }
}

/// A schema entry the restore role cannot create (a function in an untrusted language, which
/// only a superuser may create) fails the restore after CREATE DATABASE: the database is
/// dropped again. (What the manifest shows the target lacks — an extension, a type outside the
/// backed-up schemas — is refused before CREATE DATABASE: `e2e extensions::*`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_that_fails_midway_drops_its_database() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("midway", 2, "0.1").await;
    pg.client(&db)
        .await
        .batch_execute(
            "CREATE FUNCTION app.my_abs(integer) RETURNS integer LANGUAGE internal IMMUTABLE AS 'int4abs';",
        )
        .await
        .unwrap();
    let env = TestEnv::new(&db, Repo::Directory).await;
    env.ok(&["init"]);
    env.ok(&["backup"]);
    let target = format!("midway_{db}");
    let err = env.fails(&restore_latest(&fixture_tenant(1).await, &target), 1);
    assert!(
        err.contains("FUNCTION app.my_abs(integer)")
            && err.contains("permission denied for language internal")
            && err.contains("was dropped"),
        "{err}"
    );
    let exists: bool = pg
        .client("postgres")
        .await
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)",
            &[&target],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!exists, "the half-restored database is gone");
}

/// `check` prints the SQL that fixes what the backup role lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_missing_privileges_with_their_fix() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("privileges", 2, "0.1").await;
    let role = format!("weak_{}", fastrand::u32(..));
    pg.client(&db)
        .await
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA app, audit TO {role}; \
             GRANT SELECT ON ALL TABLES IN SCHEMA app TO {role}; REVOKE SELECT ON app.funds FROM {role};"
        ))
        .await
        .unwrap();
    let env = TestEnv::new(&db, Repo::Directory).await;
    let config = std::fs::read_to_string(&env.config_path)
        .unwrap()
        .replace("updog_backup@", &format!("{role}@"));
    std::fs::write(&env.config_path, config).unwrap();
    let out = env.run(&["check"]);
    assert_eq!(out.status.code(), Some(1));
    let report = String::from_utf8_lossy(&out.stdout);
    for fix in [
        format!("ALTER ROLE \"{role}\" REPLICATION;"),
        format!("ALTER ROLE \"{role}\" BYPASSRLS;"),
        format!("GRANT SELECT ON \"app\".\"funds\" TO \"{role}\";"),
        format!("GRANT SELECT ON \"audit\".\"events\" TO \"{role}\";"),
        format!("GRANT SELECT ON SEQUENCE app.investments_id_seq TO \"{role}\";"),
    ] {
        assert!(report.contains(&fix), "missing {fix:?} in\n{report}");
    }
}
