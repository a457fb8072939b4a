//! (d) one tenant at T against pgBackRest: a second cluster with WAL archiving to pgBackRest,
//! our `init` and a pgBackRest full backup, "one hour" of load, then interleaved restores of
//! the median tenant (ours `restore --at T`, pgBackRest's in [`crate::pgbackrest`]) compared
//! with the source table by table.

use std::fs;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;

use updog_backup_test_support::bench::{dir_bytes, mib};
use updog_backup_test_support::fixture::TENANT_FILTERS;
use updog_backup_test_support::oracle::digest;
use updog_backup_test_support::postgres;

use crate::daemon::{Daemon, Env, source_db};
use crate::load::{Amount, Bench, Load};
use crate::pgbackrest::{PgBackRest, PgBackRestRun};
use crate::plumbing::{rfc3339, secs, timed};
use crate::replay::{ReplayRun, replay_run};

pub(crate) const PITR_HBA: &str = "local all all trust\nhost all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n";

pub(crate) struct PitrResult {
    pub(crate) tenants: usize,
    pub(crate) median_tenant: String,
    pub(crate) median_k: Option<u32>,
    pub(crate) median_rows: u64,
    pub(crate) db_bytes: i64,
    pub(crate) init_seconds: f64,
    pub(crate) backup_seconds: f64,
    pub(crate) backup_bytes: u64,
    pub(crate) load: Load,
    pub(crate) archive_seconds: f64,
    pub(crate) covered_seconds: Option<f64>,
    pub(crate) target: DateTime<Utc>,
    pub(crate) ours: Vec<ReplayRun>,
    pub(crate) theirs: Vec<PgBackRestRun>,
    /// Tables where ours, pgBackRest's and the source differ (empty: identical).
    pub(crate) differences: Vec<String>,
    pub(crate) tables_compared: usize,
    pub(crate) rows_compared: i64,
    pub(crate) problems: Vec<String>,
}

impl Bench<'_> {
    pub(crate) fn pitr(&self) -> PitrResult {
        let a = self.args;
        eprintln!("\n== (d): a cluster with archive_mode=on and pgBackRest…");
        let pg: &'static postgres::Cluster =
            Box::leak(Box::new(postgres::start_extra(&postgres::ClusterSpec {
                name: "pitr",
                hba: PITR_HBA,
                extra_options: "-c archive_mode=on",
                prepare: &|_| {},
                without_extensions: &[],
            })));
        let db = self.rt.block_on(source_db(pg, "pitr", a));
        // Only the source database, as in production: the fixture's template goes.
        let templates: Vec<String> = self
            .rt
            .block_on(async {
                pg.client("postgres")
                    .await
                    .query(
                        "SELECT datname FROM pg_database WHERE datname LIKE 'fixture\\_t%'",
                        &[],
                    )
                    .await
                    .unwrap()
            })
            .iter()
            .map(|r| r.get(0))
            .collect();
        for t in templates {
            pg.psql("postgres", &["-c", &format!("DROP DATABASE \"{t}\"")]);
        }
        let src = self.source(pg, &db);
        let db_bytes: i64 = self
            .rt
            .block_on(
                src.client
                    .query_one("SELECT pg_database_size(current_database())", &[]),
            )
            .unwrap()
            .get(0);
        let base = self.work.join("pitr");
        fs::create_dir_all(&base).unwrap();
        let br = PgBackRest::new(&base, pg);
        br.enable(pg);
        br.run(&["check"]);
        let env = Env::new(pg, self.work, "pitr", &db, a);

        // Both backups at the same time, before the load.
        eprintln!("   our init (first snapshot) and a pgBackRest full backup…");
        let clock = Instant::now();
        env.ok(&["init"]);
        let init_seconds = clock.elapsed().as_secs_f64();
        let clock = Instant::now();
        br.run(&["--type=full", "backup"]);
        let backup_seconds = clock.elapsed().as_secs_f64();
        let backup_bytes = dir_bytes(&br.dir.join("repo/backup"));

        // The median tenant by rows, from the snapshot.
        let manifest = env.first_manifest();
        let tenants = manifest["tenants"].as_object().expect("tenants");
        let mut by_rows: Vec<(u64, String)> = tenants
            .iter()
            .map(|(t, e)| {
                let rows = e["rows"]
                    .as_object()
                    .map(|m| m.values().filter_map(Value::as_u64).sum())
                    .unwrap_or(0);
                (rows, t.clone())
            })
            .collect();
        by_rows.sort();
        let (median_rows, median_tenant) = by_rows[by_rows.len() / 2].clone();
        let median_k = (1..=a.tenants).find(|&k| src.tenant(self.rt, k) == median_tenant);

        // "One hour" of load, as fast as the machine goes, with the daemon capturing and the
        // archiver pushing WAL.
        let mut daemon = Daemon::start(&env, "pitr");
        let t0 = src.now(self.rt);
        env.wait_covered(t0, &mut daemon, Duration::from_secs(120))
            .expect("the daemon covers the idle source");
        let per_txn = (a.events + 4) as u64;
        let per_client = a.hour_changes.div_ceil(per_txn).div_ceil(a.clients as u64);
        eprintln!(
            "   \"one hour\" of load: {} row changes ({per_client} transactions × {} clients)…",
            a.hour_changes, a.clients
        );
        let load = self.load(&src, Amount::Transactions(per_client), || {});
        let target = load.end.unwrap();
        // A commit after T, so that recovery knows it reached T; then every WAL segment up to it
        // archived (`check` switches WAL and waits).
        std::thread::sleep(Duration::from_millis(100));
        src.psql("INSERT INTO bench.marker DEFAULT VALUES");
        let clock = Instant::now();
        br.run(&["check"]);
        let archive_seconds = clock.elapsed().as_secs_f64();
        let covered_seconds = env
            .wait_covered(target, &mut daemon, Duration::from_secs(600))
            .map(|_| secs(Utc::now() - target));
        let covered_seconds = covered_seconds.expect("the daemon covers the end of the load");
        let log = daemon.parse_log();
        let (_status, _) = daemon.stop();
        let at = rfc3339(target);
        eprintln!(
            "   T = {at}: {} row changes in {:.1} s, {} of WAL",
            load.changes,
            load.wall,
            mib(load.wal_bytes as f64)
        );

        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        let mut differences = Vec::new();
        let mut tables_compared = 0;
        let mut rows_compared = 0;
        for run_index in 0..a.runs {
            let ours_db = format!("bench_d_ours_{run_index}");
            let theirs_db = format!("bench_d_pgbr_{run_index}");
            let mut order = [false, true];
            if run_index % 2 == 1 {
                order.reverse();
            }
            for is_ours in order {
                if is_ours {
                    eprintln!("   run {}/{}: ours…", run_index + 1, a.runs);
                    let t = timed(
                        &env.dir,
                        &mut env.command(&[
                            "restore",
                            "--org",
                            &median_tenant,
                            "--at",
                            &at,
                            "--target-db",
                            &ours_db,
                            "--json",
                        ]),
                        "restore --at",
                    );
                    let r = replay_run(t);
                    eprintln!("       {:.2} s", r.total.wall);
                    ours.push(r);
                } else {
                    eprintln!("   run {}/{}: pgBackRest…", run_index + 1, a.runs);
                    let r = self.pgbackrest_restore(
                        pg,
                        &br,
                        &db,
                        &median_tenant,
                        target,
                        &theirs_db,
                        run_index,
                    );
                    eprintln!(
                        "       {:.2} s (restore {:.2} s, recovery {:.2} s, extract {:.2} s)",
                        r.total(),
                        r.restore,
                        r.recovery,
                        r.extract
                    );
                    theirs.push(r);
                }
            }
            if run_index == 0 {
                // Ours, pgBackRest's and the source (unchanged since T but for bench.marker)
                // hold the same rows.
                let (diff, rows) = self.rt.block_on(async {
                    let o = pg.client(&ours_db).await;
                    let t = pg.client(&theirs_db).await;
                    let mut diff = Vec::new();
                    let mut rows = 0;
                    for (table, filter) in TENANT_FILTERS {
                        let filter = filter.map(|f| f.replace("$ORG", &median_tenant));
                        let want = digest(&src.client, table, filter.as_deref()).await;
                        let got_ours = digest(&o, table, None).await;
                        let got_theirs = digest(&t, table, None).await;
                        rows += want.0;
                        if got_ours != want || got_theirs != want {
                            diff.push(format!(
                                "{table}: source {} rows, ours {}, pgBackRest {}{}",
                                want.0,
                                got_ours.0,
                                got_theirs.0,
                                if got_ours.0 == want.0 && got_theirs.0 == want.0 {
                                    " (same counts, different contents)"
                                } else {
                                    ""
                                }
                            ));
                        }
                    }
                    (diff, rows)
                });
                differences = diff;
                tables_compared = TENANT_FILTERS.len();
                rows_compared = rows;
            }
            for d in [&ours_db, &theirs_db] {
                pg.psql(
                    "postgres",
                    &[
                        "-c",
                        &format!("DROP DATABASE IF EXISTS \"{d}\" WITH (FORCE)"),
                    ],
                );
            }
        }
        PitrResult {
            tenants: by_rows.len(),
            median_tenant,
            median_k,
            median_rows,
            db_bytes,
            init_seconds,
            backup_seconds,
            backup_bytes,
            load,
            archive_seconds,
            covered_seconds: Some(covered_seconds),
            target,
            ours,
            theirs,
            differences,
            tables_compared,
            rows_compared,
            problems: log.problems,
        }
    }
}
