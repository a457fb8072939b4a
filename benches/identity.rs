//! What a replica identity costs the source: WAL written and time taken by the application's
//! own UPDATEs and DELETEs, for the choices a table whose key lacks its route has (README,
//! "Replica identities").
//!
//! ```sh
//! cargo bench --bench identity                 # = -- --scale 1 --tenants 20 --runs 3
//! cargo bench --bench identity -- --scale 0.2 --runs 1   # smoke run
//! ```
//!
//! It starts a private PostgreSQL 15 (`wal_level = logical`, as a source must have; the tests'
//! support crate), loads the reference fixture, and for each identity builds a fresh copy of
//! it where two tables the fixture needs routed by their old rows get that identity:
//!
//! - `default`: the primary key (what `check` refuses: capture could not route a DELETE);
//! - `full`: `REPLICA IDENTITY FULL` (what `check` asks for);
//! - `key index`: a unique index on (primary key, route column) as `REPLICA IDENTITY USING
//!   INDEX` (the other way to make the old row carry its route).
//!
//! The tables: `app.investment_lots` (narrow rows, ~60 bytes) and `app.forecast_snapshots`
//! (a TOASTed jsonb `payload` of a few kilobytes per row). On each, one statement updates a
//! small column of every row, and one deletes a quarter of the rows. Each statement runs once
//! unmeasured first, so that full-page images after the checkpoint (alike for every identity)
//! are not counted; the measured run is the same statement again, its WAL read from
//! `pg_current_wal_lsn()` before and after. The identities alternate within each run; figures
//! are medians. Loopback only; the cluster is stopped and deleted when this process exits.

use std::time::Instant;

use updog_backup_test_support::bench::{FixtureArgs, Machine, median};
use updog_backup_test_support::postgres;

const USAGE: &str = "cargo bench --bench identity -- [--scale S] [--tenants N] [--runs N]";

fn parse_args() -> FixtureArgs {
    FixtureArgs::parse(
        FixtureArgs {
            scale: "1".into(),
            tenants: 20,
            runs: 3,
        },
        USAGE,
    )
}

/// A table, the route column its identity must carry, and the statements measured.
struct Subject {
    table: &'static str,
    route: &'static str,
    update: &'static str,
    delete: &'static str,
}

const SUBJECTS: &[Subject] = &[
    Subject {
        table: "app.investment_lots",
        route: "investment_id",
        update: "UPDATE app.investment_lots SET shares = shares + 1",
        delete: "DELETE FROM app.investment_lots WHERE id % 4 = 0",
    },
    Subject {
        table: "app.forecast_snapshots",
        route: "fund_id",
        update: "UPDATE app.forecast_snapshots SET model_version = model_version || '.1'",
        delete: "DELETE FROM app.forecast_snapshots WHERE id % 4 = 0",
    },
];

#[derive(Clone, Copy)]
enum Identity {
    Default,
    Full,
    KeyIndex,
}

impl Identity {
    const ALL: [Identity; 3] = [Identity::Default, Identity::Full, Identity::KeyIndex];

    fn name(self) -> &'static str {
        match self {
            Identity::Default => "default (primary key)",
            Identity::Full => "full",
            Identity::KeyIndex => "key index (id, route)",
        }
    }

    fn sql(self, subject: &Subject) -> String {
        let table = subject.table;
        match self {
            Identity::Default => format!("ALTER TABLE {table} REPLICA IDENTITY DEFAULT"),
            Identity::Full => format!("ALTER TABLE {table} REPLICA IDENTITY FULL"),
            Identity::KeyIndex => {
                let index = format!("{}_identity", table.replace('.', "_"));
                format!(
                    "CREATE UNIQUE INDEX {index} ON {table} (id, {route});
                     ALTER TABLE {table} REPLICA IDENTITY USING INDEX {index}",
                    index = index.trim_start_matches("app_"),
                    route = subject.route
                )
            }
        }
    }
}

/// One measured statement: WAL bytes, rows, seconds.
#[derive(Default, Clone)]
struct Sample {
    wal: Vec<f64>,
    rows: u64,
    seconds: Vec<f64>,
}

async fn wal_lsn(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// WAL bytes, rows and seconds of `sql`; with `warm`, after one unmeasured run of it (whose
/// full-page images are then not counted).
async fn measure(client: &tokio_postgres::Client, sql: &str, warm_write: bool) -> (f64, u64, f64) {
    if warm_write {
        client.execute(sql, &[]).await.unwrap();
    }
    let before = wal_lsn(client).await;
    let started = Instant::now();
    let rows = client.execute(sql, &[]).await.unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let after = wal_lsn(client).await;
    let wal: f64 = client
        .query_one(
            "SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)::float8",
            &[&after, &before],
        )
        .await
        .unwrap()
        .get(0);
    (wal, rows, seconds)
}

fn main() {
    let args = parse_args();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pg = rt.block_on(postgres::cluster());
    let machine = Machine::probe(&rt, pg);
    // (subject, operation, identity) → sample
    let mut samples = vec![vec![vec![Sample::default(); 3]; 2]; SUBJECTS.len()];
    for run in 0..args.runs {
        for offset in 0..Identity::ALL.len() {
            let which = (run + offset) % Identity::ALL.len();
            let identity = Identity::ALL[which];
            eprintln!("run {}/{}: {}", run + 1, args.runs, identity.name());
            rt.block_on(async {
                let db = pg
                    .fixture_db("identity_wal", args.tenants, &args.scale)
                    .await;
                let client = pg.client(&db).await;
                for subject in SUBJECTS {
                    client.batch_execute(&identity.sql(subject)).await.unwrap();
                }
                // Every page read and hinted before the checkpoint: the runs differ only by
                // what the identity makes the statements log.
                client
                    .batch_execute("VACUUM (FREEZE, ANALYZE)")
                    .await
                    .unwrap();
                client.batch_execute("CHECKPOINT").await.unwrap();
                for (s, subject) in SUBJECTS.iter().enumerate() {
                    let (wal, rows, seconds) = measure(&client, subject.update, true).await;
                    let sample = &mut samples[s][0][which];
                    sample.wal.push(wal);
                    sample.rows = rows;
                    sample.seconds.push(seconds);
                    // The pages are in WAL once already (the update's full-page images).
                    let (wal, rows, seconds) = measure(&client, subject.delete, false).await;
                    let sample = &mut samples[s][1][which];
                    sample.wal.push(wal);
                    sample.rows = rows;
                    sample.seconds.push(seconds);
                }
                drop(client);
                postgres::cluster()
                    .await
                    .client("postgres")
                    .await
                    .batch_execute(&format!("DROP DATABASE \"{db}\""))
                    .await
                    .unwrap();
            });
        }
    }
    println!("# What a replica identity costs the source's writes\n");
    println!(
        "{}",
        machine.describe(
            "private cluster, wal_level = logical",
            &format!(
                "\ncommand: cargo bench --bench identity -- --scale {} --tenants {} --runs {}\nmedians of {} run(s); WAL from pg_current_wal_lsn() around each statement, full-page images excluded",
                args.scale, args.tenants, args.runs, args.runs
            )
        )
    );
    println!(
        "\n| table | statement | rows | identity | WAL | WAL per row | × default | time | × default |"
    );
    println!("|---|---|---:|---|---:|---:|---:|---:|---:|");
    for (s, subject) in SUBJECTS.iter().enumerate() {
        for (o, op) in ["UPDATE (every row)", "DELETE (a quarter)"]
            .iter()
            .enumerate()
        {
            let base_wal = median(&samples[s][o][0].wal);
            let base_time = median(&samples[s][o][0].seconds);
            for (i, identity) in Identity::ALL.iter().enumerate() {
                let sample = &samples[s][o][i];
                let (wal, time) = (median(&sample.wal), median(&sample.seconds));
                println!(
                    "| {} | {op} | {} | {} | {:.1} MB | {:.0} B | {:.2} | {:.3} s | {:.2} |",
                    subject.table,
                    sample.rows,
                    identity.name(),
                    wal / 1e6,
                    wal / sample.rows.max(1) as f64,
                    wal / base_wal,
                    time,
                    time / base_time
                );
            }
        }
    }
}
