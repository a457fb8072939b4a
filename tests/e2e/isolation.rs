//! Isolation as a property (ARCHITECTURE.md invariant 3, and README's "How tables reach their
//! tenant"): for random schemas and random tenants, a restored database holds every row of its
//! tenant and no row of anyone else. (~930 lines: the property test and the regression tests it
//! found, which RELIABILITY.md names by these paths; generators and oracle are in tests/support.)
//!
//! Each case builds, from one seed, a fresh database with one schema: a tenant root table (or
//! none), then a random forest of tables, each with the tenant column itself or a foreign key to
//! a parent (single or composite key, primary key or unique constraint, the parent's key holding
//! the tenant column or not), chains up to four deep, tables without a primary key, nullable and
//! NOT NULL keys, partitioned tables, extra nullable foreign keys and self references that do
//! not route, a global table (and sometimes a forced-global one holding the tenant column), an
//! excluded table, and random rows for 2–5 tenants of type uuid, text or bigint (values that
//! differ only by case, whitespace or prefix, quotes, slashes). Then `init`, and `restore
//! --latest` of every tenant. In half the cases the daemon then captures 30 random steps (single
//! changes or transactions of 2–3, some rolled back): inserts, 1000-row inserts (streamed),
//! updates (payloads, TOASTed values, keys with ON UPDATE CASCADE, moves to another parent of
//! the same tenant, rows moved to another tenant or to none with their subtree), deletes (ON
//! DELETE CASCADE / SET NULL / NO ACTION), TRUNCATEs, changes of global and excluded tables;
//! sometimes the daemon is SIGKILLed and restarted, or a snapshot is taken while it captures.
//! Then every tenant is restored `--latest` again, and one `--at` an instant in the middle.
//!
//! The oracle never asks the product: every table has a `rid bigint` (not a key), and the test
//! computes each row's tenant from the data by the route the generator built — the tenant
//! column, or the parent row its foreign key references (NULL: no tenant) — which is the route
//! the design prescribes (own column first, then the shortest chain of NOT NULL keys, a nullable
//! key only when there is no other; extra foreign keys are nullable and never shorter). A
//! recovery database must hold exactly the rids of its tenant in every tenant table (rows of
//! another tenant or of none are leaks, missing ones are losses), with the same content as the
//! source, the global tables whole, and nothing of the excluded table.
//!
//! `UPDOG_ISOLATION_CASES` (default 10) sets the number of cases, `UPDOG_ISOLATION_SEED` replays
//! one case (each case prints its seed and writes its SQL to `$TMPDIR/updog-isolation-<seed>.sql`;
//! a failure prints the schema and every change applied), `UPDOG_ISOLATION_STEPS` (default 30)
//! shortens a capture case to minimise it. Run it long with
//! `UPDOG_ISOLATION_CASES=200 cargo test --test e2e isolation:: -- --nocapture`.
//!
//! The generators and the oracle are test support: `support::schema_gen` (the schema and its
//! rows), `support::change_gen` (the capture cases' changes), `support::oracle::schemas` (each
//! row's tenant, restores compared with it). This file holds the property test and its case, then
//! the minimised regression tests.

use std::fmt::Write as _;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

use futures::FutureExt;
use tokio_postgres::Client;

use crate::support::change_gen::plan_change;
use crate::support::daemon::{Daemon, capture_env, wait_covered};
use crate::support::oracle::now;
use crate::support::oracle::schemas::{Cleanup, Stats, read_state, restore_and_compare};
use crate::support::postgres::cluster;
use crate::support::schema_gen::{Counters, generate};
use crate::support::{Repo, TestEnv};

// ---------------------------------------------------------------------------------------------
// One case

/// The routing checkpoint `init` wrote as it read the source (the route joined by the server,
/// never held in memory) holds exactly the key maps capture's router builds by loading the
/// same rows itself (the fallback of a daemon without checkpoint).
async fn checkpoint_is_what_the_router_loads(env: &TestEnv, db: &str) -> Result<(), String> {
    use updog_backup::capture::router::Router;
    use updog_backup::repository::routes::decode_checkpoint;
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let config = updog_backup::config::Config::from_toml(&text, "test", env.env.clone()).unwrap();
    let client = cluster().await.client(db).await;
    let catalog = updog_backup::source::catalog::Catalog::load(&client, &config.source)
        .await
        .map_err(|e| format!("catalog: {e}"))?;
    let salt: String = client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let mut router = Router::new(catalog, &config.source.schemas, &salt);
    router
        .load(&client)
        .await
        .map_err(|e| format!("router: {e}"))?;
    let changes = env.repo_dir.join("changes");
    let stored = std::fs::read_dir(&changes)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("routes-"))
        .ok_or("no routing checkpoint after init")?;
    let key = format!("changes/{}", stored.file_name().to_string_lossy());
    let written = decode_checkpoint(&key, &std::fs::read(stored.path()).unwrap())
        .map_err(|e| format!("{key}: {e}"))?;
    let as_set = |deltas: Vec<updog_backup::repository::routes::Delta>| {
        let mut v: Vec<String> = deltas.iter().map(|d| format!("{d:?}")).collect();
        v.sort();
        v
    };
    let (written, loaded) = (as_set(written), as_set(router.checkpoint()));
    if written != loaded {
        let only_written: Vec<&String> = written
            .iter()
            .filter(|d| !loaded.contains(d))
            .take(5)
            .collect();
        let only_loaded: Vec<&String> = loaded
            .iter()
            .filter(|d| !written.contains(d))
            .take(5)
            .collect();
        return Err(format!(
            "the routing checkpoint ({} operations) differs from the router's own load ({}): only written {only_written:?}, only loaded {only_loaded:?}",
            written.len(),
            loaded.len()
        ));
    }
    Ok(())
}

async fn run_case(seed: u64, stats: &mut Stats, cleanup: &mut Cleanup) -> Vec<String> {
    let started = Instant::now();
    let pg = cluster().await;
    let (spec, generated, sql) = generate(seed);
    let mut failures = Vec::new();
    stats.cases += 1;
    stats.tables += spec.tables.len() as u64;
    stats.rows += generated.iter().map(Vec::len).sum::<usize>() as u64;
    let script = std::env::temp_dir().join(format!("updog-isolation-{seed}.sql"));
    std::fs::write(&script, &sql).unwrap();
    eprintln!(
        "isolation: seed {seed} (UPDOG_ISOLATION_SEED={seed}){}: {}; {} rows; SQL in {}",
        if spec.capture { " with capture" } else { "" },
        spec.describe(),
        generated.iter().map(Vec::len).sum::<usize>(),
        script.display()
    );

    let db = pg.fresh_db(&format!("iso_{:x}", seed & 0xffff_ffff)).await;
    cleanup.source_db = Some(db.clone());
    let source = pg.client(&db).await;
    source
        .batch_execute(&sql)
        .await
        .unwrap_or_else(|e| panic!("the generated schema does not load: {e:?}\n{sql}"));
    // The oracle read back equals what the generator meant.
    let state = read_state(&source, &spec).await.unwrap();
    for (i, (read, made)) in state.iter().zip(&generated).enumerate() {
        let a: Vec<(i64, Option<usize>)> = read.iter().map(|r| (r.rid, r.tenant)).collect();
        let b: Vec<(i64, Option<usize>)> = made.iter().map(|r| (r.rid, r.tenant)).collect();
        assert_eq!(a, b, "the oracle disagrees with the generator on table {i}");
    }

    let mut env = TestEnv::new(&db, Repo::Directory).await;
    env.env.extend(spec.overrides());
    cleanup.slot = env
        .env
        .iter()
        .find(|(k, _)| k == "UPDOG_BACKUP__SOURCE__SLOT")
        .map(|(_, v)| v.clone());
    if spec.capture {
        capture_env(&mut env);
    }
    // What the DBA does before init: the replica identities `check` asks for, and (before a
    // capture) the triggers that put schema changes and parent moves into the stream.
    env.apply_identity_fixes(&source).await;
    if spec.capture {
        env.install_schema_triggers(&db).await;
    }
    let init = env.run(&["init"]);
    if !init.status.success() {
        failures.push(format!(
            "init failed ({}): {}{}",
            init.status,
            String::from_utf8_lossy(&init.stdout),
            String::from_utf8_lossy(&init.stderr)
        ));
        return failures;
    }
    if let Err(m) = checkpoint_is_what_the_router_loads(&env, &db).await {
        failures.push(m);
    }
    for k in 0..spec.tenants.len() {
        restore_and_compare(
            &spec,
            &env,
            &source,
            &state,
            k,
            None,
            "snap",
            true,
            stats,
            cleanup,
            &mut failures,
        )
        .await;
    }

    if spec.capture && failures.is_empty() {
        stats.capture_cases += 1;
        let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed_c0de);
        let mut ctr = Counters {
            rid: 1_000_000,
            id: 1_000_000,
        };
        let mut daemon = Daemon::start(&env);
        let mut state = state;
        let mut middle = None;
        // UPDOG_ISOLATION_STEPS: fewer (or more) steps, to minimise a failing seed.
        let n = env_u64("UPDOG_ISOLATION_STEPS").unwrap_or(30) as usize;
        // Half the cases: the daemon SIGKILLed and restarted (routing state from the
        // repository), and/or a snapshot taken while it captures.
        let disrupt = rng.u32(..4);
        for step in 0..n {
            if step == 15 {
                middle = Some((now(&source).await, state.clone()));
            }
            if step == 10 && disrupt & 1 == 1 {
                daemon.kill();
                cleanup
                    .log
                    .push(format!("{step}: daemon SIGKILLed and restarted"));
                daemon = Daemon::start(&env);
            }
            if step == 20 && disrupt & 2 == 2 {
                let out = env.run(&["backup"]);
                if !out.status.success() {
                    failures.push(format!(
                        "backup during capture failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
                cleanup
                    .log
                    .push(format!("{step}: backup (a snapshot while capturing)"));
            }
            let grouped = rng.u32(..4) == 0;
            let mut planned = Vec::new();
            for _ in 0..if grouped { rng.usize(2..=3) } else { 1 } {
                for _ in 0..20 {
                    if let Some(c) = plan_change(&spec, &state, &mut rng, &mut ctr) {
                        planned.push(c);
                        break;
                    }
                }
            }
            if planned.is_empty() {
                continue;
            }
            let rollback = rng.u32(..20) == 0;
            let body: String = planned.iter().map(|(s, _)| s.as_str()).collect();
            let sql = format!(
                "BEGIN;\n{body}{}",
                if rollback { "ROLLBACK;" } else { "COMMIT;" }
            );
            let what: Vec<&str> = planned.iter().map(|(_, d)| d.as_str()).collect();
            match source.batch_execute(&sql).await {
                Ok(()) if !rollback => {
                    stats.changes += planned.len() as u64;
                    cleanup.log.push(format!(
                        "{step}: {}\n      {}",
                        what.join("; "),
                        body.trim_end().replace('\n', "\n      ")
                    ));
                }
                Ok(()) => cleanup
                    .log
                    .push(format!("{step}: rolled back: {}", what.join("; "))),
                Err(e) => {
                    let _ = source.batch_execute("ROLLBACK").await;
                    stats.failed_changes += 1;
                    cleanup.log.push(format!(
                        "{step}: refused ({}): {}",
                        e.as_db_error()
                            .map_or(e.to_string(), |d| d.message().to_string()),
                        what.join("; ")
                    ));
                }
            }
            state = read_state(&source, &spec).await.unwrap_or_else(|e| {
                panic!("the oracle cannot read the source after {what:?}: {e}")
            });
        }
        let end = now(&source).await;
        tokio::task::block_in_place(|| wait_covered(&env, end, &mut daemon));
        let status = daemon.terminate();
        assert!(
            status.success(),
            "the daemon stops cleanly on SIGTERM: {status}"
        );
        let before = failures.len();
        for k in 0..spec.tenants.len() {
            restore_and_compare(
                &spec,
                &env,
                &source,
                &state,
                k,
                None,
                "capture",
                true,
                stats,
                cleanup,
                &mut failures,
            )
            .await;
        }
        if let Some((t, mid)) = &middle {
            let k = rng.usize(..spec.tenants.len());
            let at = t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            // The source's content at `t` is gone: compare rows only (content against now
            // would differ for rows changed later).
            restore_and_compare(
                &spec,
                &env,
                &source,
                mid,
                k,
                Some(&at),
                "at",
                false,
                stats,
                cleanup,
                &mut failures,
            )
            .await;
        }
        if failures.len() > before {
            failures.push(format!("changes applied:\n  {}", cleanup.log.join("\n  ")));
        }
    }
    eprintln!(
        "isolation: seed {seed}: {} in {:.1}s",
        if failures.is_empty() { "ok" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    failures
}

fn result_panicked(failures: &[String]) -> bool {
    failures.iter().any(|f| f.starts_with("panicked: "))
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        let v = v.trim();
        v.strip_prefix("0x")
            .map(|h| u64::from_str_radix(h, 16))
            .unwrap_or_else(|| v.parse())
            .unwrap_or_else(|e| panic!("{name}={v}: {e}"))
    })
}

/// The property: every restore holds exactly its tenant's rows. Cases run one after another;
/// a failing case does not stop the others, and the test fails at the end naming every seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_schemas_restore_exactly_their_tenants_rows() {
    let started = Instant::now();
    let seeds: Vec<u64> = match env_u64("UPDOG_ISOLATION_SEED") {
        Some(seed) => vec![seed],
        None => {
            let cases = env_u64("UPDOG_ISOLATION_CASES").unwrap_or(10);
            let base = fastrand::u64(..);
            (0..cases)
                .map(|k| base.wrapping_add(k.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
                .collect()
        }
    };
    let mut totals = Stats::default();
    let mut failed: Vec<(u64, String)> = Vec::new();
    for seed in &seeds {
        let mut stats = Stats::default();
        let mut cleanup = Cleanup::default();
        let result = AssertUnwindSafe(run_case(*seed, &mut stats, &mut cleanup))
            .catch_unwind()
            .await;
        let failures = match result {
            Ok(f) => f,
            Err(panic) => vec![format!(
                "panicked: {}",
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )],
        };
        let failures = if result_panicked(&failures) && !cleanup.log.is_empty() {
            let mut f = failures;
            f.push(format!("changes applied:\n  {}", cleanup.log.join("\n  ")));
            f
        } else {
            failures
        };
        cleanup.run(!failures.is_empty()).await;
        totals.add(&stats);
        if !failures.is_empty() {
            let (spec, _, _) = generate(*seed);
            failed.push((
                *seed,
                format!(
                    "{}\n{}\n{}",
                    spec.describe(),
                    spec.ddl(),
                    failures.join("\n")
                ),
            ));
        }
    }
    eprintln!(
        "isolation: {} case(s) ({} with capture), {} tables, {} rows, {} changes ({} refused by the source), \
         {} restores, {} rows checked, {} leaked, {} lost, {} tables with different content; {:.1}s",
        totals.cases,
        totals.capture_cases,
        totals.tables,
        totals.rows,
        totals.changes,
        totals.failed_changes,
        totals.restores,
        totals.rows_checked,
        totals.leaked,
        totals.lost,
        totals.differing,
        started.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        let mut msg = String::new();
        for (seed, f) in &failed {
            let _ = writeln!(
                msg,
                "\n=== seed {seed} (UPDOG_ISOLATION_SEED={seed}) ===\n{f}"
            );
        }
        panic!("{} of {} case(s) failed:{msg}", failed.len(), seeds.len());
    }
}

// ---------------------------------------------------------------------------------------------
// Minimised cases: hand-written schemas in schema `m`, tenant column `organization_id` (uuid).

const A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const B: &str = "bbbbbbbb-0000-4000-8000-000000000002";
const C: &str = "cccccccc-0000-4000-8000-000000000003";

/// Per table, the rids a tenant's restore must hold.
type TenantRows<'a> = &'a [(&'a str, &'a [i64])];

struct Mini {
    db: String,
    env: TestEnv,
    source: Client,
    daemon: Option<Daemon>,
}

impl Mini {
    /// A fresh database holding `sql` (`$A`, `$B`, `$C` are tenants), readable by the backup
    /// role, and a config for schema `m`; `publication`: the owner's statement (default
    /// `FOR ALL TABLES`).
    async fn new(sql: &str, publication: Option<&str>) -> Mini {
        let pg = cluster().await;
        let db = pg.fresh_db("iso_mini").await;
        let source = pg.client(&db).await;
        let sql = sql.replace("$A", A).replace("$B", B).replace("$C", C);
        source
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{e:?}\n{sql}"));
        source
            .batch_execute(
                "GRANT USAGE ON SCHEMA m TO updog_backup; GRANT SELECT ON ALL TABLES IN SCHEMA m TO updog_backup;",
            )
            .await
            .unwrap();
        if let Some(p) = publication {
            source.batch_execute(p).await.unwrap();
        }
        let mut env = TestEnv::new(&db, Repo::Directory).await;
        env.env.extend([
            (
                "UPDOG_BACKUP__SOURCE__SCHEMAS".to_string(),
                r#"["m"]"#.to_string(),
            ),
            (
                "UPDOG_BACKUP__SOURCE__GLOBAL_TABLES".to_string(),
                "[]".to_string(),
            ),
        ]);
        capture_env(&mut env);
        Mini {
            db,
            env,
            source,
            daemon: None,
        }
    }

    /// The replica identities `check` asks for (as the DBA would), then `init`.
    async fn init(&self) {
        self.env.apply_identity_fixes(&self.source).await;
        self.env.ok(&["init"]);
    }

    /// [`Mini::init`], and the daemon.
    async fn capture(&mut self) {
        self.init().await;
        self.daemon = Some(Daemon::start(&self.env));
    }

    async fn change(&self, sql: &str) {
        let sql = sql.replace("$A", A).replace("$B", B).replace("$C", C);
        self.source
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{e:?}\n{sql}"));
    }

    /// Waits until the daemon stored everything committed so far.
    async fn covered(&mut self) {
        let t = now(&self.source).await;
        let (env, daemon) = (&self.env, self.daemon.as_mut().unwrap());
        tokio::task::block_in_place(|| wait_covered(env, t, daemon));
    }

    /// `restore --org tenant --latest`, then the rids of each table in the recovery database
    /// (or the restore's error).
    async fn restored(
        &self,
        tenant: &str,
        tables: &[&str],
    ) -> Result<Vec<(String, Vec<i64>)>, String> {
        let target = format!("{}_r{}", self.db, fastrand::u32(..));
        let out = self.env.run(&[
            "restore",
            &format!("--org={tenant}"),
            "--latest",
            "--target-db",
            &target,
        ]);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let recovered = cluster().await.client(&target).await;
        let mut found = Vec::new();
        for t in tables {
            let rows = recovered
                .query(&format!("SELECT rid FROM m.{t} ORDER BY rid"), &[])
                .await
                .unwrap();
            found.push((t.to_string(), rows.iter().map(|r| r.get(0)).collect()));
        }
        Ok(found)
    }

    /// Every restore of `expected` (tenant → per table, its rids) holds exactly those rows.
    async fn assert_restores(&self, expected: &[(&str, TenantRows<'_>)]) {
        let mut wrong = Vec::new();
        for (tenant, tables) in expected {
            let names: Vec<&str> = tables.iter().map(|(t, _)| *t).collect();
            let want: Vec<(String, Vec<i64>)> = tables
                .iter()
                .map(|(t, r)| (t.to_string(), r.to_vec()))
                .collect();
            match self.restored(tenant, &names).await {
                Ok(got) if got == want => {}
                Ok(got) => wrong.push(format!(
                    "tenant {tenant}: restored {got:?}, expected {want:?}"
                )),
                Err(e) => wrong.push(format!("tenant {tenant}: restore failed: {e}")),
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}

/// Exactly one table carries the tenant column: each tenant is exported once. The tenants
/// query used to be a single SELECT without UNION (nor DISTINCT) then, listing a tenant once
/// per row, and init failed exporting its archive twice: "object snapshots/…/tenants/<A>.zst.age
/// already exists".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_table_carrying_the_tenant_column() {
    let m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.funds (rid bigint, id bigint PRIMARY KEY, organization_id uuid NOT NULL);
         CREATE TABLE m.investments (rid bigint, fund_id bigint NOT NULL REFERENCES m.funds);
         INSERT INTO m.funds VALUES (1, 1, '$A'), (2, 2, '$A'), (3, 3, '$B');
         INSERT INTO m.investments VALUES (4, 1), (5, 3);",
        None,
    )
    .await;
    m.init().await;
    m.assert_restores(&[
        (A, &[("funds", &[1, 2]), ("investments", &[4])]),
        (B, &[("funds", &[3]), ("investments", &[5])]),
    ])
    .await;
}

/// A nullable foreign key onto the tenants' key (`shared_with → orgs(id)`) does not override
/// the table's NOT NULL route (`fund_id → funds.organization_id`) — README: "through NOT NULL
/// keys first … a nullable route is taken only when there is no other". It used to: a document
/// with `shared_with` NULL was in no restore, one shared with B was restored into B, not A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nullable_key_to_the_tenants_does_not_override_a_not_null_route() {
    let m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.orgs (rid bigint, id uuid PRIMARY KEY);
         CREATE TABLE m.funds (rid bigint, id bigint PRIMARY KEY, organization_id uuid NOT NULL REFERENCES m.orgs);
         CREATE TABLE m.documents (rid bigint, fund_id bigint NOT NULL REFERENCES m.funds,
                                   shared_with uuid REFERENCES m.orgs);
         INSERT INTO m.orgs VALUES (1, '$A'), (2, '$B');
         INSERT INTO m.funds VALUES (3, 1, '$A'), (4, 2, '$B');
         INSERT INTO m.documents VALUES (10, 1, NULL), (11, 1, '$A'), (12, 1, '$B'), (13, 2, NULL);",
        None,
    )
    .await;
    m.init().await;
    let check = m.env.run(&["check"]);
    eprintln!("{}", String::from_utf8_lossy(&check.stdout));
    m.assert_restores(&[
        (A, &[("funds", &[3]), ("documents", &[10, 11, 12])]),
        (B, &[("funds", &[4]), ("documents", &[13])]),
    ])
    .await;
}

/// A partitioned tenant table in the publication the tests (and README's DBA) create, `FOR ALL
/// TABLES`: pg_publication_tables lists its partitions, not the partitioned table, and init
/// accepts them as covering it (capture maps their changes to it). It used to refuse ("publication
/// lacks m.events") with `ALTER PUBLICATION … ADD TABLE m.events`, which PostgreSQL rejects for
/// a FOR ALL TABLES publication (and which would not change pg_publication_tables for a FOR
/// TABLE one either).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_table_in_the_default_publication() {
    let m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.orgs (rid bigint, id uuid PRIMARY KEY);
         CREATE TABLE m.events (rid bigint, organization_id uuid NOT NULL REFERENCES m.orgs, note text)
           PARTITION BY HASH (organization_id);
         CREATE TABLE m.events_p0 PARTITION OF m.events FOR VALUES WITH (MODULUS 2, REMAINDER 0);
         CREATE TABLE m.events_p1 PARTITION OF m.events FOR VALUES WITH (MODULUS 2, REMAINDER 1);
         INSERT INTO m.orgs VALUES (1, '$A'), (2, '$B');
         INSERT INTO m.events VALUES (3, '$A', 'a'), (4, '$B', 'b'), (5, '$A', 'c');",
        None,
    )
    .await;
    m.init().await;
    m.assert_restores(&[(A, &[("events", &[3, 5])]), (B, &[("events", &[4])])])
        .await;
}

/// A partitioned tenant table published through its root (`publish_via_partition_root =
/// true`): PostgreSQL 15's pgoutput sends a Relation message for the partition as well as for
/// the root before the first change (the change itself names the root); the router knows the
/// partition as its table's. It used to reject it — "table m.events_p0 appeared in the change
/// stream but is not in the catalog loaded at start: restart the daemon to load it" — retrying
/// forever: nothing more was captured, for any tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_table_captured_through_its_root() {
    let mut m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.orgs (rid bigint, id uuid PRIMARY KEY);
         CREATE TABLE m.events (rid bigint, organization_id uuid NOT NULL REFERENCES m.orgs, id bigint,
                                note text, PRIMARY KEY (organization_id, id))
           PARTITION BY HASH (organization_id);
         CREATE TABLE m.events_p0 PARTITION OF m.events FOR VALUES WITH (MODULUS 2, REMAINDER 0);
         CREATE TABLE m.events_p1 PARTITION OF m.events FOR VALUES WITH (MODULUS 2, REMAINDER 1);
         INSERT INTO m.orgs VALUES (1, '$A'), (2, '$B');
         INSERT INTO m.events VALUES (3, '$A', 1, 'a'), (4, '$B', 1, 'b'), (5, '$A', 2, 'c');",
        Some("CREATE PUBLICATION updog_backup FOR ALL TABLES WITH (publish_via_partition_root = true)"),
    )
    .await;
    m.capture().await;
    m.change(
        "INSERT INTO m.events VALUES (6, '$B', 2, 'd'), (7, '$A', 3, 'e');
         UPDATE m.events SET note = 'a2' WHERE rid = 3;
         UPDATE m.events SET organization_id = '$B', id = 3 WHERE rid = 5;
         DELETE FROM m.events WHERE rid = 7;",
    )
    .await;
    m.covered().await;
    m.assert_restores(&[(A, &[("events", &[3])]), (B, &[("events", &[4, 5, 6])])])
        .await;
}

/// An UPDATE that takes a row out of every tenant (its tenant column, or its only route, set to
/// NULL) is a DELETE for the old tenant: its restore no longer has the row, which belongs to no
/// tenant any more (the snapshot leaves such rows out). It used to be routed to the old tenant
/// as an UPDATE, which kept the row (with the NULL). The same goes for the child of a parent
/// deleted with ON DELETE SET NULL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_moved_to_no_tenant_leaves_its_tenants_restore() {
    let mut m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.orgs (rid bigint, id uuid PRIMARY KEY);
         CREATE TABLE m.items (rid bigint, id bigint PRIMARY KEY, organization_id uuid REFERENCES m.orgs);
         INSERT INTO m.orgs VALUES (1, '$A'), (2, '$B');
         INSERT INTO m.items VALUES (3, 1, '$A'), (4, 2, '$A'), (5, 3, '$B');",
        None,
    )
    .await;
    m.capture().await; // check asks for REPLICA IDENTITY FULL on m.items
    m.change("UPDATE m.items SET organization_id = NULL WHERE id = 1")
        .await;
    m.covered().await;
    m.assert_restores(&[
        (A, &[("orgs", &[1]), ("items", &[4])]),
        (B, &[("orgs", &[2]), ("items", &[5])]),
    ])
    .await;
}

/// An UPDATE that gives a row of no tenant a tenant is an INSERT for that tenant. It used to be
/// routed as an UPDATE of a row that tenant's restore never had, which then failed ("an update
/// of the row with … matched no row in the recovery database") for every point in time after
/// the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_moved_from_no_tenant_is_restored() {
    let mut m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.orgs (rid bigint, id uuid PRIMARY KEY);
         CREATE TABLE m.items (rid bigint, id bigint PRIMARY KEY, organization_id uuid REFERENCES m.orgs);
         INSERT INTO m.orgs VALUES (1, '$A'), (2, '$B');
         INSERT INTO m.items VALUES (3, 1, NULL), (4, 2, '$A'), (5, 3, '$B');",
        None,
    )
    .await;
    m.capture().await;
    m.change("UPDATE m.items SET organization_id = '$A' WHERE id = 1")
        .await;
    m.covered().await;
    m.assert_restores(&[
        (A, &[("orgs", &[1]), ("items", &[3, 4])]),
        (B, &[("orgs", &[2]), ("items", &[5])]),
    ])
    .await;
}

/// A row moved to another tenant in a table that other tables route through by key (`funds`,
/// referenced by `investments.fund_id`). `check` asks for no replica identity there (its key
/// routes a DELETE), so an UPDATE of `organization_id` carries no old tuple: the router finds the
/// old tenant in its key map. It used to send the change to the new tenant only: the old
/// tenant's restore kept the fund (a LEAK of B's row into A), and B's failed on an update of a
/// row it never had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_moved_to_another_tenant_in_a_table_routed_through_by_key() {
    let mut m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.orgs (rid bigint, id uuid PRIMARY KEY);
         CREATE TABLE m.funds (rid bigint, id bigint PRIMARY KEY, organization_id uuid NOT NULL REFERENCES m.orgs);
         CREATE TABLE m.investments (rid bigint, id bigint PRIMARY KEY, fund_id bigint NOT NULL REFERENCES m.funds);
         INSERT INTO m.orgs VALUES (1, '$A'), (2, '$B');
         INSERT INTO m.funds VALUES (3, 1, '$A'), (4, 2, '$A'), (5, 3, '$B');
         INSERT INTO m.investments VALUES (6, 1, 1);",
        None,
    )
    .await;
    // Without the trigger of parent moves, a move of a fund is refused in both tenants' restores
    // (its investments cannot be known to follow): `a_parent_moved_without_its_trigger_…`.
    m.env.install_schema_triggers(&m.db).await;
    m.capture().await;
    // Fund 2 has no investments: only the fund itself changes tenant.
    m.change("UPDATE m.funds SET organization_id = '$B' WHERE id = 2")
        .await;
    m.covered().await;
    m.assert_restores(&[
        (A, &[("funds", &[3]), ("investments", &[6])]),
        (B, &[("funds", &[4, 5]), ("investments", &[])]),
    ])
    .await;
}

/// A parent moved to another tenant takes its children (reached through it by foreign key,
/// unchanged themselves, so absent from the change stream) and theirs: the trigger of parent
/// moves (`schema-triggers`) sends them after the UPDATE, and capture stores them as DELETEs
/// for the tenant they left and INSERTs for the one they joined. They used to stay in the old
/// tenant: A's restore kept B's investment, B's lacked it. The same for a parent moved to
/// another parent (of another tenant), and one whose route becomes NULL (its subtree leaves
/// every tenant); a change of a moved child later in the same transaction meets it in its new
/// tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_moved_to_another_tenant_takes_its_children() {
    let mut m = Mini::new(MOVES, None).await;
    m.env.install_schema_triggers(&m.db).await;
    m.capture().await;
    m.change(
        "BEGIN;
         UPDATE m.funds SET organization_id = '$B' WHERE id = 1;
         UPDATE m.investments SET note = 'moved' WHERE id = 1;
         COMMIT;",
    )
    .await;
    m.change("UPDATE m.investments SET fund_id = 3 WHERE id = 2")
        .await;
    m.change("UPDATE m.investments SET fund_id = NULL WHERE id = 3")
        .await;
    m.covered().await;
    m.assert_restores(&[
        (A, &[("funds", &[4]), ("investments", &[]), ("txns", &[])]),
        (
            B,
            &[
                ("funds", &[3, 5]),
                ("investments", &[6, 7]),
                ("txns", &[9, 10, 11]),
            ],
        ),
        (
            C,
            &[("funds", &[13]), ("investments", &[14]), ("txns", &[15])],
        ),
    ])
    .await;
}

/// Without the trigger of parent moves (no superuser ran `schema-triggers`), the children of a
/// moved parent cannot follow it: both tenants' restores after the move are refused, naming
/// the table, instead of A's keeping B's rows and B's lacking them; another tenant's restore
/// is exact, and `check` says what is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_moved_without_its_trigger_refuses_both_tenants_restores() {
    let mut m = Mini::new(MOVES, None).await;
    let check = m.env.run(&["check"]);
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(
        report.contains("parent moves") && report.contains("m.funds"),
        "check does not say the trigger of parent moves is missing:\n{report}"
    );
    m.capture().await;
    m.change("UPDATE m.funds SET organization_id = '$B' WHERE id = 1")
        .await;
    m.covered().await;
    for tenant in [A, B] {
        match m.restored(tenant, &["funds"]).await {
            Err(e) => assert!(
                e.contains("moved rows of m.funds") && e.contains("trigger of parent moves"),
                "tenant {tenant}: refused, but not saying why: {e}"
            ),
            Ok(got) => panic!("tenant {tenant}: restored {got:?} without the moved rows' children"),
        }
    }
    m.assert_restores(&[(
        C,
        &[("funds", &[13]), ("investments", &[14]), ("txns", &[15])],
    )])
    .await;
}

/// Funds reach their tenant by its column, investments through funds (nullable), txns through
/// investments.
const MOVES: &str = "CREATE SCHEMA m;
     CREATE TABLE m.orgs (rid bigint, id uuid PRIMARY KEY);
     CREATE TABLE m.funds (rid bigint, id bigint PRIMARY KEY, organization_id uuid NOT NULL REFERENCES m.orgs);
     CREATE TABLE m.investments (rid bigint, id bigint PRIMARY KEY, fund_id bigint REFERENCES m.funds, note text);
     CREATE TABLE m.txns (rid bigint, id bigint PRIMARY KEY, investment_id bigint NOT NULL REFERENCES m.investments);
     INSERT INTO m.orgs VALUES (1, '$A'), (2, '$B'), (12, '$C');
     INSERT INTO m.funds VALUES (3, 1, '$A'), (4, 2, '$A'), (5, 3, '$B'), (13, 4, '$C');
     INSERT INTO m.investments VALUES (6, 1, 1), (7, 2, 2), (8, 3, 2), (14, 4, 4);
     INSERT INTO m.txns VALUES (9, 1, 1), (10, 2, 1), (11, 3, 2), (16, 4, 3), (15, 5, 4);";

/// A row whose parent belongs to no tenant (`funds.organization_id` NULL) is a row of no tenant
/// too: the router's key maps hold the keys of rows of no tenant, so capture skips it. They used
/// to hold none, so inserting a child of such a parent stopped the daemon ("cannot route a
/// INSERT on m.investments: no row of m.funds with key (2) is known") at every restart: nothing
/// more was captured, for any tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_of_a_row_of_no_tenant_does_not_stop_capture() {
    let mut m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.orgs (rid bigint, id uuid PRIMARY KEY);
         CREATE TABLE m.funds (rid bigint, id bigint PRIMARY KEY, organization_id uuid REFERENCES m.orgs);
         CREATE TABLE m.investments (rid bigint, id bigint PRIMARY KEY, fund_id bigint NOT NULL REFERENCES m.funds);
         INSERT INTO m.orgs VALUES (1, '$A'), (2, '$B');
         INSERT INTO m.funds VALUES (3, 1, '$A'), (4, 2, NULL), (5, 3, '$B');",
        None,
    )
    .await;
    m.capture().await;
    m.change("INSERT INTO m.investments VALUES (6, 1, 2)").await;
    m.change("INSERT INTO m.investments VALUES (7, 2, 1)").await;
    m.covered().await;
    m.assert_restores(&[
        (A, &[("funds", &[3]), ("investments", &[7])]),
        (B, &[("funds", &[5]), ("investments", &[])]),
    ])
    .await;
}

/// A tenant that first appears after the last snapshot: its rows are captured (routed to it),
/// and the snapshot (of all tenants) shows it had no rows then, so its restore is well
/// defined: empty at the snapshot, then its changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_created_after_the_snapshot_is_restorable() {
    let mut m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.orgs (rid bigint, id uuid PRIMARY KEY);
         CREATE TABLE m.funds (rid bigint, id bigint PRIMARY KEY, organization_id uuid NOT NULL REFERENCES m.orgs);
         INSERT INTO m.orgs VALUES (1, '$A'), (2, '$B');
         INSERT INTO m.funds VALUES (3, 1, '$A'), (4, 2, '$B');",
        None,
    )
    .await;
    m.capture().await;
    m.change("INSERT INTO m.orgs VALUES (5, '$C'); INSERT INTO m.funds VALUES (6, 3, '$C');")
        .await;
    m.covered().await;
    m.assert_restores(&[
        (C, &[("orgs", &[5]), ("funds", &[6])]),
        (A, &[("orgs", &[1]), ("funds", &[3])]),
    ])
    .await;
}

/// `check` reports a global table without a primary key as it does a tenant table ("once
/// published, its UPDATEs and DELETEs fail on the source"): the publication covers it too. It
/// used to say nothing, and after `init` the application's UPDATE of `m.currencies` failed
/// ("cannot update table … because it does not have a replica identity and publishes updates").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_global_table_without_a_replica_identity() {
    let m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.currencies (code text, name text);
         CREATE TABLE m.orgs (rid bigint, id uuid PRIMARY KEY);
         CREATE TABLE m.funds (rid bigint, id bigint PRIMARY KEY, organization_id uuid NOT NULL REFERENCES m.orgs);
         INSERT INTO m.currencies VALUES ('EUR', 'Euro');
         INSERT INTO m.orgs VALUES (1, '$A');
         INSERT INTO m.funds VALUES (2, 1, '$A');",
        None,
    )
    .await;
    let mut env_global = m.env.env.clone();
    for (k, v) in &mut env_global {
        if k == "UPDOG_BACKUP__SOURCE__GLOBAL_TABLES" {
            *v = r#"["m.currencies"]"#.into();
        }
    }
    let mut cmd = m.env.command(&["check", "--json"]);
    cmd.envs(env_global.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let out = cmd.output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let findings: Vec<&serde_json::Value> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["subject"] == "m.currencies")
        .collect();
    let update = m
        .source
        .batch_execute("UPDATE m.currencies SET name = 'euro' WHERE code = 'EUR'")
        .await;
    assert!(
        !findings.is_empty(),
        "check says nothing about m.currencies; meanwhile the application's UPDATE: {update:?}"
    );
}

/// A table changed once since the daemon started, then a transaction larger than
/// `logical_decoding_work_mem` (streamed while it runs) on it that is rolled back: its Relation
/// message arrives again inside the streamed block, with an xid. It must be kept without it
/// (the abort discards the spool, and the next change of that table outside any stream uses
/// the same Relation), so capture goes on and both tenants restore exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_streamed_transaction_does_not_stop_capture() {
    let mut m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.orgs (rid bigint, id uuid PRIMARY KEY);
         CREATE TABLE m.events (rid bigint PRIMARY KEY, organization_id uuid NOT NULL REFERENCES m.orgs, note text);
         INSERT INTO m.orgs VALUES (1, '$A'), (2, '$B');
         INSERT INTO m.events VALUES (3, '$A', 'a'), (4, '$B', 'b');",
        None,
    )
    .await;
    m.capture().await;
    // The stream carries m.events' Relation once, outside any streamed transaction.
    m.change("INSERT INTO m.events VALUES (5, '$A', 'before')")
        .await;
    // The daemon streams live from here on.
    m.covered().await;
    // Far more than logical_decoding_work_mem (64kB on the test cluster), then rolled back:
    // pgoutput sends the Relation again inside the streamed block.
    m.change(
        "BEGIN;
         INSERT INTO m.events SELECT 10 + g, '$A', repeat(md5(g::text), 4) FROM generate_series(1, 10000) g;
         ROLLBACK;",
    )
    .await;
    m.change("INSERT INTO m.events VALUES (6, '$A', 'after')")
        .await;
    m.covered().await;
    m.assert_restores(&[(A, &[("events", &[3, 5, 6])]), (B, &[("events", &[4])])])
        .await;
}

/// A small transaction on a table commits while a large one on the same table is being
/// streamed: its change is stored with the Relation the stream sent (without the stream's
/// xid), and both transactions restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_committing_during_a_streamed_one_does_not_stop_capture() {
    let mut m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.orgs (rid bigint, id uuid PRIMARY KEY);
         CREATE TABLE m.events (rid bigint PRIMARY KEY, organization_id uuid NOT NULL REFERENCES m.orgs, note text);
         INSERT INTO m.orgs VALUES (1, '$A'), (2, '$B');
         INSERT INTO m.events VALUES (3, '$A', 'a'), (4, '$B', 'b');",
        None,
    )
    .await;
    m.capture().await;
    m.change("INSERT INTO m.events VALUES (5, '$A', 'before')")
        .await;
    // The daemon streams live from here on.
    m.covered().await;
    let large = cluster().await.client(&m.db).await;
    large
        .batch_execute(&format!(
            "BEGIN; INSERT INTO m.events SELECT 10 + g, '{A}', repeat(md5(g::text), 4) FROM generate_series(1, 10000) g"
        ))
        .await
        .unwrap();
    // Streamed while open (logical_decoding_work_mem is 64kB on the test cluster).
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    m.change("INSERT INTO m.events VALUES (6, '$B', 'during')")
        .await;
    large.batch_execute("COMMIT").await.unwrap();
    m.covered().await;
    let all_a: Vec<i64> = [3, 5].into_iter().chain(11..=10010).collect();
    m.assert_restores(&[(A, &[("events", &all_a)]), (B, &[("events", &[4, 6])])])
        .await;
}
