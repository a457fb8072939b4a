//! What the schema depends on outside its own schemas (issue 18), end to end: a tenant table
//! with `citext` (installed inside the backed-up schema `app`) and `hstore` columns, arrays of
//! them, a `pg_trgm` GIN index (the extension in a schema that is not backed up), column
//! defaults calling `uuid-ossp` and `pgcrypto` functions. The snapshot records the extensions,
//! the daemon captures changes to those columns, and restores at two instants are exact for two
//! tenants, as the server prints the values. A target server without one of the extensions (a
//! real one: a copy of the installation without hstore's files) is refused before anything is
//! created, and `check` said so beforehand; so is a schema that uses a type of a schema that is
//! not backed up.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use tokio_postgres::Client;

use crate::support::daemon::{Daemon, capture_env, wait_covered};
use crate::support::oracle::{assert_restore_equals, digest, now, state};
use crate::support::postgres::{Cluster, ClusterSpec, client_for, cluster, start_extra};
use crate::support::{Repo, TestEnv, database_exists, fixture_tenant, restore_latest};

/// The extensions of the test schema, as `CREATE EXTENSION` leaves them here:
/// (name, schema).
const EXTENSIONS: &[(&str, &str)] = &[
    ("citext", "app"),
    ("hstore", "public"),
    ("pg_trgm", "extensions"),
    ("pgcrypto", "public"),
    ("uuid-ossp", "public"),
];

/// Run by the superuser on a fixture database (which has pgcrypto in public already).
const SCHEMA: &str = r#"
CREATE EXTENSION IF NOT EXISTS citext SCHEMA app;
CREATE EXTENSION IF NOT EXISTS hstore SCHEMA public;
CREATE SCHEMA IF NOT EXISTS extensions;
CREATE EXTENSION IF NOT EXISTS pg_trgm SCHEMA extensions;
CREATE EXTENSION IF NOT EXISTS "uuid-ossp" SCHEMA public;
CREATE TABLE app.contacts (
  id              uuid PRIMARY KEY DEFAULT public.uuid_generate_v4(),
  organization_id uuid NOT NULL REFERENCES app.organizations (id),
  email           app.citext NOT NULL,
  attrs           public.hstore,
  aliases         app.citext[],
  note            text,
  fingerprint     text NOT NULL DEFAULT encode(public.digest(random()::text, 'sha256'), 'hex'),
  UNIQUE (organization_id, email)
);
CREATE INDEX contacts_note_trgm ON app.contacts USING gin (note extensions.gin_trgm_ops);
-- Travels in binary COPY (no array of an extension type), routed through contacts.
CREATE TABLE app.contact_tags (
  id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  contact_id uuid NOT NULL REFERENCES app.contacts (id) ON DELETE CASCADE,
  label      app.citext NOT NULL,
  props      public.hstore NOT NULL DEFAULT ''
);
ALTER TABLE app.contacts REPLICA IDENTITY FULL;
ALTER TABLE app.contact_tags REPLICA IDENTITY FULL;
GRANT SELECT ON app.contacts, app.contact_tags TO updog_backup;
GRANT SELECT ON SEQUENCE app.contact_tags_id_seq TO updog_backup;
INSERT INTO app.contacts (organization_id, email, attrs, aliases, note)
  SELECT o.id, 'User' || g || '@Example.COM',
         public.hstore(ARRAY['k', 'n', 'quote"d'], ARRAY['v' || g, g::text, 'a "b" \c']),
         ARRAY['Alias' || g, 'ALIAS-' || g]::app.citext[], 'note about ' || md5(g::text)
    FROM app.organizations o, generate_series(1, 4) g;
INSERT INTO app.contact_tags (contact_id, label, props)
  SELECT c.id, 'Tag-' || g, public.hstore('weight', g::text)
    FROM app.contacts c, generate_series(1, 2) g;
"#;

/// The tables of the test schema with the rows of `$ORG`.
const FILTERS: &[(&str, &str)] = &[
    ("app.contacts", "organization_id = '$ORG'"),
    (
        "app.contact_tags",
        "contact_id IN (SELECT id FROM app.contacts WHERE organization_id = '$ORG')",
    ),
];

/// Every table of the tenant (the fixture's and the test's), digested as the server prints
/// the rows: `citext` and `hstore` values in their text form.
async fn tenant_state(source: &Client, tenant: &str) -> BTreeMap<String, (i64, String)> {
    let mut out = state(source, tenant).await;
    for (table, filter) in FILTERS {
        let filter = filter.replace("$ORG", tenant);
        out.insert(
            table.to_string(),
            digest(source, table, Some(&filter)).await,
        );
    }
    out
}

/// A fixture database with the test schema.
async fn source_db(pg: &Cluster, hint: &str) -> String {
    let db = pg.capture_fixture_db(hint, 3, "0.1").await;
    pg.client(&db)
        .await
        .batch_execute(SCHEMA)
        .await
        .unwrap_or_else(|e| panic!("the test schema: {e}"));
    db
}

/// The manifests of the repository, oldest first.
fn manifests(env: &TestEnv) -> Vec<serde_json::Value> {
    crate::support::files_under(&env.repo_dir)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "manifest.json"))
        .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
        .collect()
}

async fn step(source: &Client, sql: &str) -> DateTime<Utc> {
    source
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("workload step failed: {e}\n{sql}"));
    now(source).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extension_types_restore_exactly_at_every_instant() {
    let pg = cluster().await;
    let db = source_db(pg, "extensions").await;
    let source = pg.client(&db).await;
    let mut env = TestEnv::new(&db, Repo::Directory).await;
    capture_env(&mut env);

    // check lists what the schemas use outside themselves, and the target has it all.
    let report: serde_json::Value = serde_json::from_str(&env.ok(&["check", "--json"])).unwrap();
    let listed: Vec<(String, String)> = report["depends_on"]["extensions"]
        .as_array()
        .unwrap_or_else(|| panic!("no extensions in {report}"))
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["schema"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut expected: Vec<(String, String)> = EXTENSIONS
        .iter()
        .map(|(n, s)| (n.to_string(), s.to_string()))
        .collect();
    let mut sorted = listed.clone();
    sorted.sort();
    expected.sort();
    assert_eq!(sorted, expected, "{report}");
    assert!(
        report["depends_on"].get("objects").is_none(),
        "nothing outside the schemas but extensions: {report}"
    );
    let target = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["subject"] == "restore target")
        .unwrap_or_else(|| panic!("no restore target finding: {report}"));
    assert_eq!(target["level"], "ok", "{target}");
    let human = env.ok(&["check"]);
    assert!(
        human.contains("extension citext ") && human.contains(" in schema app"),
        "{human}"
    );

    env.ok(&["init"]);
    let manifest = &manifests(&env)[0];
    assert_eq!(
        manifest["depends_on"]["extensions"]
            .as_array()
            .unwrap()
            .len(),
        EXTENSIONS.len(),
        "{}",
        manifest["depends_on"]
    );

    let (a, b) = (fixture_tenant(1).await, fixture_tenant(2).await);
    // citext's operators live in app: without it on the path, `=` is text's, case-sensitive.
    source
        .batch_execute("SET search_path = app, public, extensions")
        .await
        .unwrap();
    let mut daemon = Daemon::start(&env);
    let steps = [
        // Inserts (defaults calling extension functions), updates of every extension column
        // (a case-only change of a citext, hstore concatenation and deletion), a delete.
        format!(
            "INSERT INTO app.contacts (organization_id, email, attrs, aliases, note) VALUES
               ('{a}', 'New@Example.com', 'a=>1, \"b c\"=>NULL', ARRAY['x','Y']::app.citext[], 'fresh'),
               ('{b}', 'Other@Example.com', '', NULL, NULL);
             UPDATE app.contacts SET email = upper(email::text), attrs = attrs || public.hstore('k', 'changed')
              WHERE organization_id = '{a}' AND email = 'user1@example.com';
             UPDATE app.contacts SET attrs = public.delete(attrs, 'n'), aliases = aliases || 'more'::app.citext
              WHERE organization_id = '{b}';
             INSERT INTO app.contact_tags (contact_id, label, props)
               SELECT id, 'Late', 'x=>\"tab\there\"' FROM app.contacts WHERE email = 'new@example.com';
             DELETE FROM app.contacts WHERE organization_id = '{b}' AND email = 'USER2@example.com';"
        ),
        // Updates found by an hstore and a citext value, keys swapped, a tag relabelled.
        format!(
            "UPDATE app.contact_tags SET props = props || 'weight=>99', label = 'TAG-1'
              WHERE label = 'tag-1' AND contact_id IN (SELECT id FROM app.contacts WHERE organization_id = '{a}');
             UPDATE app.contacts SET note = note || ' (edited)', attrs = NULL
              WHERE organization_id = '{a}' AND attrs -> 'k' = 'v3';
             DELETE FROM app.contact_tags WHERE label = 'late';
             INSERT INTO app.contacts (organization_id, email) VALUES ('{b}', 'defaults@example.com');"
        ),
    ];
    let mut instants = Vec::new();
    for sql in &steps {
        let t = step(&source, sql).await;
        let mut states = BTreeMap::new();
        for tenant in [&a, &b] {
            states.insert(tenant.clone(), tenant_state(&source, tenant).await);
        }
        instants.push((t, states));
    }
    wait_covered(&env, instants.last().unwrap().0, &mut daemon);
    assert!(daemon.terminate().success());

    for (i, (t, states)) in instants.iter().enumerate() {
        for tenant in [&a, &b] {
            // Unfiltered on the recovery side: another tenant's row would show.
            assert_restore_equals(&env, tenant, *t, &states[tenant], &format!("ext{i}")).await;
        }
    }

    // The recovery database has the extensions the source has, in their schemas and
    // versions, and what uses them works: the defaults, the trigram index.
    let target = format!("ext_latest_{}", fastrand::u32(..));
    env.ok(&restore_latest(&a, &target));
    let recovered = pg.client(&target).await;
    let extensions = |client: Client| async move {
        client
            .query(
                "SELECT extname::text, extversion, extnamespace::regnamespace::text FROM pg_extension
                  WHERE extname <> 'plpgsql' ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect::<Vec<(String, String, String)>>()
    };
    assert_eq!(
        extensions(pg.client(&target).await).await,
        extensions(pg.client(&db).await).await
    );
    let index: String = recovered
        .query_one(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'contacts_note_trgm'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(index.contains("extensions.gin_trgm_ops"), "{index}");
    let row = recovered
        .query_one(
            &format!(
                "INSERT INTO app.contacts (organization_id, email) VALUES ('{a}', 'after@restore')
                 RETURNING id::text, length(fingerprint)"
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0).len(), 36);
    assert_eq!(row.get::<_, i32>(1), 64);
    crate::support::drop_database(&target).await;
}

/// A server of this binary without hstore, as one where the package is missing.
fn no_hstore_cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        start_extra(&ClusterSpec {
            name: "nohstore",
            hba: "local all all trust\nhost all all 127.0.0.1/32 trust\n",
            extra_options: "",
            prepare: &|_| {},
            without_extensions: &["hstore"],
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_without_an_extension_is_refused_before_anything_is_created() {
    let pg = cluster().await;
    let db = source_db(pg, "ext_missing").await;
    let bare = no_hstore_cluster();
    let mut env = TestEnv::new(&db, Repo::Directory).await;
    env.env.push((
        "UPDOG_BACKUP__RESTORE__TARGET_URL".into(),
        bare.url("updog_restore", "postgres"),
    ));
    let available: bool = client_for(&bare.url("postgres", "postgres"))
        .await
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_available_extensions WHERE name = 'hstore')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!available, "the bare server has no hstore");

    // check says so on day one: a warning that names the extension and what to install.
    let human = env.ok(&["check"]);
    assert!(
        human.contains("WARNING restore target")
            && human.contains("extension hstore (1.8) is not installed")
            && human.contains("contrib"),
        "{human}"
    );
    let report: serde_json::Value = serde_json::from_str(&env.ok(&["check", "--json"])).unwrap();
    let warnings: Vec<&serde_json::Value> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["level"] == "warning" && f["subject"] == "restore target")
        .collect();
    assert_eq!(warnings.len(), 1, "only hstore is missing: {report}");

    env.ok(&["init"]);
    let target = format!("ext_refused_{}", fastrand::u32(..));
    let err = env.fails(&restore_latest(&fixture_tenant(1).await, &target), 2);
    assert!(
        err.contains("cannot create extension(s) hstore")
            && err.contains("nothing was created")
            && err.contains("postgresql-15"),
        "{err}"
    );
    let exists: bool = client_for(&bare.url("postgres", "postgres"))
        .await
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)",
            &[&target],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!exists, "no recovery database on the target");
    assert!(!database_exists(&target).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_outside_the_schemas_is_refused_before_anything_is_created() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("ext_outside", 2, "0.1").await;
    pg.client(&db)
        .await
        .batch_execute(
            "CREATE TYPE public.colour AS ENUM ('red');
             ALTER TABLE app.users ADD COLUMN colour public.colour;",
        )
        .await
        .unwrap();
    let env = TestEnv::new(&db, Repo::Directory).await;
    // check: an error, with the configuration that fixes it.
    let out = env.run(&["check"]);
    let human = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{human}");
    assert!(
        human.contains("type public.colour (used by column colour of table app.users)")
            && human.contains(r#"schemas = ["app", "audit", "public"]"#),
        "{human}"
    );
    env.ok(&["init"]);
    let objects = &manifests(&env)[0]["depends_on"]["objects"];
    assert_eq!(objects[0]["identity"], "public.colour", "{objects}");
    let target = format!("ext_outside_{}", fastrand::u32(..));
    let err = env.fails(&restore_latest(&fixture_tenant(1).await, &target), 2);
    assert!(
        err.contains("type public.colour") && err.contains(r#"add "public" to source.schemas"#),
        "{err}"
    );
    assert!(!database_exists(&target).await);
}
