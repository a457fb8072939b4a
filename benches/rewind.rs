//! `rewind` against the manual path, on the reference data: the time to undo one tenant's
//! mistake in the source.
//!
//! ```sh
//! cargo bench --bench rewind                  # = -- --scale 2 --tenants 20 --runs 3
//! cargo bench --bench rewind -- --scale 10 --tenants 100 --runs 3   # the issue's scale (long)
//! ```
//!
//! It starts a private PostgreSQL 15 and loads the fixture with the REPLICA IDENTITY fixes
//! (the tests' support crate), runs `init` and the daemon as a user would, with a writer role
//! that bypasses row level security. For the median and the largest tenant, each run makes the
//! same mistake after a fixed instant T — every fund permission of the tenant deleted, and its
//! first fund's lots deleted — waits until the stream covers it, then undoes it one way:
//!
//! - **rewind**: `rewind --to T` (the plan), then `rewind --to T --apply`, whole commands;
//! - **manual**: `restore --at T` into a recovery database, then for the two tables the rows the
//!   source lacks copied back with `psql \copy … TO STDOUT | psql \copy … FROM STDIN` (what a
//!   DBA does who knows which tables the mistake touched), then the recovery database dropped.
//!
//! Each is checked: the tenant equals its state at T afterwards. The two ways alternate;
//! figures are medians. Loopback only; the cluster is stopped and deleted when this process
//! exits.

use std::process::{Command, Stdio};
use std::time::Instant;

use updog_backup_test_support::bench::{FixtureArgs, Machine, median};
use updog_backup_test_support::daemon::{Daemon, capture_env, wait_covered};
use updog_backup_test_support::oracle::{now, state};
use updog_backup_test_support::postgres::{self, cluster};
use updog_backup_test_support::{Repo, TestEnv, fixture_tenant};

const USAGE: &str = "cargo bench --bench rewind -- [--scale S] [--tenants N] [--runs N]";

fn parse_args() -> FixtureArgs {
    FixtureArgs::parse(
        FixtureArgs {
            scale: "2".into(),
            tenants: 20,
            runs: 3,
        },
        USAGE,
    )
}

/// Runs an updog-backup command, asserting success; its seconds.
fn timed(env: &TestEnv, args: &[&str]) -> f64 {
    let started = Instant::now();
    env.ok(args);
    started.elapsed().as_secs_f64()
}

/// `psql … -c "\copy (query) TO STDOUT" db_from | psql … -c "\copy table FROM STDIN" db_to`.
fn copy_back(pg: &postgres::Cluster, from: &str, to: &str, query: &str, table: &str) {
    let psql = |db: &str, command: String| {
        let mut cmd = Command::new(pg.bin.join("psql"));
        cmd.args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
        ])
        .args(["-p", &pg.port.to_string(), "-d", db, "-c", &command]);
        cmd
    };
    let mut out = psql(from, format!("\\copy ({query}) TO STDOUT"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let status = psql(to, format!("\\copy {table} FROM STDIN"))
        .stdin(out.stdout.take().unwrap())
        .status()
        .unwrap();
    assert!(
        status.success() && out.wait().unwrap().success(),
        "copying {table} back"
    );
}

fn main() {
    let args = parse_args();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pg = rt.block_on(cluster());
    let machine = Machine::probe(&rt, pg);
    let db = rt.block_on(pg.capture_fixture_db("rewind_bench", args.tenants, &args.scale));
    let source = rt.block_on(pg.client(&db));
    rt.block_on(source.batch_execute(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'updog_rewind') THEN
           CREATE ROLE updog_rewind LOGIN BYPASSRLS; END IF; END $$;
         GRANT USAGE ON SCHEMA app, audit TO updog_rewind;
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA app, audit TO updog_rewind;",
    ))
    .unwrap();
    let mut env = rt.block_on(TestEnv::new(&db, Repo::Directory));
    capture_env(&mut env);
    env.env.push((
        "UPDOG_BACKUP__RESTORE__WRITER_URL".into(),
        pg.url("updog_rewind", &db),
    ));
    env.ok(&["init"]);
    let mut daemon = Daemon::start(&env);
    let mut rows = Vec::new();
    for (label, k) in [("median", args.tenants / 2), ("largest", 1)] {
        let tenant = rt.block_on(fixture_tenant(k));
        let at = rt.block_on(now(&source));
        let wanted = rt.block_on(state(&source, &tenant));
        let fund: String = rt
            .block_on(source.query_one(
                "SELECT id::text FROM app.funds WHERE organization_id = $1::text::uuid ORDER BY id LIMIT 1",
                &[&tenant],
            ))
            .unwrap()
            .get(0);
        let lots = format!(
            "SELECT l.* FROM app.investment_lots l JOIN app.investments i ON i.id = l.investment_id WHERE i.fund_id = '{fund}'"
        );
        let permissions =
            format!("SELECT * FROM app.fund_permissions WHERE organization_id = '{tenant}'");
        let mistake = format!(
            "DELETE FROM app.fund_permissions WHERE organization_id = '{tenant}';
             DELETE FROM app.investment_lots WHERE investment_id IN (SELECT id FROM app.investments WHERE fund_id = '{fund}');"
        );
        let changed: i64 = rt
            .block_on(source.query_one(
                &format!("SELECT (SELECT count(*) FROM ({permissions}) p) + (SELECT count(*) FROM ({lots}) l)"),
                &[],
            ))
            .unwrap()
            .get(0);
        let at_text = at.to_rfc3339();
        let (mut plan, mut apply, mut manual) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..args.runs {
            eprintln!("{label} tenant, run {}/{}", run + 1, args.runs);
            for way in ["rewind", "manual"] {
                rt.block_on(source.batch_execute(&mistake)).unwrap();
                wait_covered(&env, rt.block_on(now(&source)), &mut daemon);
                if way == "rewind" {
                    plan.push(timed(&env, &["rewind", "--org", &tenant, "--to", &at_text]));
                    apply.push(timed(
                        &env,
                        &["rewind", "--org", &tenant, "--to", &at_text, "--apply"],
                    ));
                } else {
                    let started = Instant::now();
                    let recovery = format!("manual_{run}");
                    env.ok(&[
                        "restore",
                        "--org",
                        &tenant,
                        "--at",
                        &at_text,
                        "--target-db",
                        &recovery,
                    ]);
                    copy_back(
                        pg,
                        &recovery,
                        &db,
                        // The recovery database holds this tenant only.
                        "SELECT * FROM app.fund_permissions",
                        "app.fund_permissions",
                    );
                    copy_back(pg, &recovery, &db, &lots, "app.investment_lots");
                    manual.push(started.elapsed().as_secs_f64());
                    rt.block_on(updog_backup_test_support::drop_database(&recovery));
                }
                assert_eq!(
                    rt.block_on(state(&source, &tenant)),
                    wanted,
                    "{way} did not give the tenant back its state at T"
                );
            }
        }
        rows.push((
            label,
            k,
            changed,
            median(&plan),
            median(&apply),
            median(&manual),
        ));
    }
    daemon.terminate();
    println!("# Rewind against the manual path\n");
    println!(
        "{}",
        machine.describe(
            "private cluster, fsync=off",
            &format!(
                "\ncommand: cargo bench --bench rewind -- --scale {} --tenants {} --runs {}\nmistake: the tenant's fund permissions and its first fund's lots deleted; medians of {} run(s)",
                args.scale, args.tenants, args.runs, args.runs
            )
        )
    );
    println!(
        "\n| tenant | rows to put back | rewind: plan | rewind: --apply | rows/s (apply) | manual: restore + \\copy back | apply / manual |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (label, k, changed, plan, apply, manual) in rows {
        println!(
            "| {label} (tenant {k}) | {changed} | {plan:.2} s | {apply:.2} s | {:.0} | {manual:.2} s | {:.2} |",
            changed as f64 / apply,
            apply / manual
        );
    }
}
