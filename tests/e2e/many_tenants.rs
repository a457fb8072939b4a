//! Thousands of small tenants: the snapshot sweeps them (one COPY per table, rows split by
//! tenant in the client and scattered into encrypted scratch partitions, then gathered by
//! tenant) and, with little memory allowed, splits partitions into groups that fit and
//! streams the tenants that would not fit from the scratch. Every tenant still gets exactly its rows: a sample is
//! restored and compared with the source, and no restore holds another tenant's row.

use crate::support::oracle::digest;
use crate::support::postgres::cluster;
use crate::support::{Repo, TestEnv, restore_latest};

const TENANTS: u32 = 5000;

/// Each table and the filter selecting one tenant's rows in the source (`$ORG`).
const FILTERS: [(&str, &str); 4] = [
    ("m.orgs", "id = '$ORG'"),
    ("m.projects", "organization_id = '$ORG'"),
    (
        "m.tasks",
        "project_id IN (SELECT id FROM m.projects WHERE organization_id = '$ORG')",
    ),
    (
        "m.comments",
        "task_id IN (SELECT t.id FROM m.tasks t JOIN m.projects p ON p.id = t.project_id WHERE p.organization_id = '$ORG')",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_tenants_each_restore_exactly_their_rows() {
    let pg = cluster().await;
    let db = pg.fresh_db("many_tenants").await;
    // Sizes fall off like real tenants': tenant 1 has 40 projects, most have one. `labels`
    // (an array of a composite type) sends m.tasks through text COPY; the others go binary.
    pg.client(&db)
        .await
        .batch_execute(&format!(
            r#"
            CREATE SCHEMA m;
            CREATE TYPE m.label AS (name text, color text);
            CREATE TABLE m.orgs (id uuid PRIMARY KEY, name text NOT NULL);
            CREATE TABLE m.projects (id bigint PRIMARY KEY, organization_id uuid NOT NULL REFERENCES m.orgs,
                                     name text, settings jsonb);
            CREATE INDEX ON m.projects (organization_id);
            CREATE TABLE m.tasks (id bigint PRIMARY KEY, project_id bigint NOT NULL REFERENCES m.projects,
                                  title text, labels m.label[], body bytea);
            CREATE TABLE m.comments (id bigint PRIMARY KEY, task_id bigint REFERENCES m.tasks,
                                     body text, tags text[]);
            INSERT INTO m.orgs SELECT md5('org-' || k)::uuid, 'org ' || k FROM generate_series(1, {TENANTS}) k;
            INSERT INTO m.projects
              SELECT row_number() OVER (), md5('org-' || k)::uuid, 'p' || k || '.' || p,
                     jsonb_build_object('k', k, 'p', p, 'tab', E'a\tb', 'quote', 'it''s')
                FROM generate_series(1, {TENANTS}) k, generate_series(1, greatest(1, round(40 / power(k, 0.8)))::int) p;
            INSERT INTO m.tasks
              SELECT p.id * 10 + t, p.id, CASE WHEN t = 2 THEN NULL ELSE E'task\n' || t END,
                     ARRAY[ROW('l' || t, 'c,"' || p.id || '"')::m.label], decode(md5(p.id::text), 'hex')
                FROM m.projects p, generate_series(1, 3) t;
            INSERT INTO m.comments
              SELECT t.id * 10 + c, CASE WHEN c = 3 THEN NULL ELSE t.id END, repeat('x', (t.id % 50)::int), ARRAY['a', NULL, E'\\']
                FROM m.tasks t, generate_series(1, 3) c;
            -- Tenant 4999 looks small to the planner's statistics, but its comments are long
            -- (compressed on disk, whole in a COPY): it turns out too large to gather.
            UPDATE m.comments SET body = repeat('y', 50000)
             WHERE task_id IN (SELECT t.id FROM m.tasks t JOIN m.projects p ON p.id = t.project_id
                                WHERE p.organization_id = md5('org-4999')::uuid);
            ANALYZE;
            GRANT USAGE ON SCHEMA m TO updog_backup;
            GRANT SELECT ON ALL TABLES IN SCHEMA m TO updog_backup;
            "#
        ))
        .await
        .unwrap();
    let env = TestEnv::new(&db, Repo::Directory).await;
    let config = std::fs::read_to_string(&env.config_path)
        .unwrap()
        .replace(r#"schemas = ["app", "audit"]"#, r#"schemas = ["m"]"#)
        .replace(r#"global_tables = ["app.currencies"]"#, "");
    std::fs::write(&env.config_path, config).unwrap();
    env.apply_identity_fixes(&pg.client(&db).await).await;

    // Little memory: partitions gathered in several passes, and tenants too large for it.
    let scratch = env.dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let out = env
        .command(&["init"])
        .env("UPDOG_BACKUP__SNAPSHOT__BATCH_MEMORY", "64KiB")
        .env("UPDOG_BACKUP__STREAM__SPOOL_DIR", &scratch)
        .env("UPDOG_BACKUP_LOG", "updog_backup::snapshot=debug")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("{TENANTS} tenant(s)")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Every table scattered, partitions split into groups that fit, and tenant 4999 (which
    // would not fit) streamed from the scratch.
    let log = String::from_utf8_lossy(&out.stderr);
    let lines = |message: &str| -> Vec<&str> {
        log.lines()
            .filter(|l| l.contains(&format!("\"message\":\"{message}\"")))
            .collect()
    };
    assert!(lines("table scattered").len() >= FILTERS.len(), "{log}");
    let gathered = lines("partition gathered");
    assert!(gathered.len() >= 2, "{log}");
    assert!(
        gathered.iter().any(|l| l.contains("\"split\":true")),
        "{log}"
    );
    assert!(
        gathered.iter().any(|l| !l.contains("\"streamed\":0,")),
        "{log}"
    );
    assert_eq!(
        std::fs::read_dir(&scratch).unwrap().count(),
        0,
        "scratch files are unlinked"
    );
    // And with the default memory, a second snapshot.
    env.ok(&["backup"]);

    let source = pg.client(&db).await;
    for k in [1, 2, 3, 17, 1000, 2500, 4999, TENANTS] {
        let tenant: String = source
            .query_one("SELECT md5('org-' || $1::int)::uuid::text", &[&(k as i32)])
            .await
            .unwrap()
            .get(0);
        let target = format!("{db}_r{k}");
        env.ok(&restore_latest(&tenant, &target));
        let recovered = pg.client(&target).await;
        let mut rows = 0;
        for (table, filter) in FILTERS {
            let expected = digest(&source, table, Some(&filter.replace("$ORG", &tenant))).await;
            // No filter on the recovery side: every row there must be the tenant's.
            let found = digest(&recovered, table, None).await;
            assert_eq!(found, expected, "{table} of tenant {k} ({tenant})");
            rows += expected.0;
        }
        assert!(rows > 3, "tenant {k} has rows in every table");
    }
    let verify = env.ok(&["verify", "--deep"]);
    assert!(verify.contains("0 failed"), "{verify}");
}
