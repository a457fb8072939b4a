//! One scale: the fixture loaded and frozen, then `--runs` rounds interleaving ours and the
//! baselines — (a) the largest tenant, (b) every tenant at each `snapshot.parallel` and without
//! parallel query — and the server time per table at the end ([`crate::diagnose`]).

use std::path::Path;
use std::time::Instant;

use updog_backup_test_support::bench::{loadavg, mib};
use updog_backup_test_support::postgres;

use crate::Args;
use crate::baselines::Baselines;
use crate::diagnose::{TableCost, diagnose};
use crate::measure::{Sample, Series};
use crate::ours::{Env, NO_PARALLEL_QUERY_RUN, parallel_query};

/// Everything measured at one scale.
pub(crate) struct ScaleResult {
    pub(crate) scale: String,
    pub(crate) tenants: usize,
    pub(crate) rows: u64,
    pub(crate) table_bytes: u64,
    pub(crate) index_bytes: u64,
    pub(crate) load_seconds: f64,
    pub(crate) loadavg_before: String,
    pub(crate) loadavg_after: String,
    pub(crate) largest: String,
    pub(crate) largest_rows: u64,
    // (a)
    pub(crate) pipeline: Series,
    pub(crate) one_stream: Series,
    pub(crate) org: Series,
    pub(crate) schema_dump: Series,
    // (b), (c)
    pub(crate) pg_dump: Series,
    pub(crate) ours: Vec<(usize, Series)>,
    /// Ours with the role's parallel query off (see [`Step::OursNoParallelQuery`]).
    pub(crate) ours_no_parallel_query: Series,
    /// Ours into a format-2 repository (one key for every tenant), at parallel 2: what
    /// per-tenant keys cost.
    pub(crate) ours_format2: Series,
    /// `init` (the first snapshot; in format 3 also every tenant's key): format 3, format 2.
    pub(crate) init: (Sample, Sample),
    /// Where the server time of a full backup goes, per table.
    pub(crate) costs: Vec<TableCost>,
}

pub(crate) fn bench_scale(
    rt: &tokio::runtime::Runtime,
    pg: &'static postgres::Cluster,
    args: &Args,
    scale: &str,
    work: &Path,
) -> ScaleResult {
    eprintln!(
        "\n== scale {scale}, {} tenants: loading the fixture…",
        args.tenants
    );
    let clock = Instant::now();
    let hint = format!("bench_s{}", scale.replace('.', "_"));
    let db = rt.block_on(pg.capture_fixture_db(&hint, args.tenants, scale));
    pg.psql(&db, &["-c", "VACUUM (FREEZE, ANALYZE)"]);
    let load_seconds = clock.elapsed().as_secs_f64();
    let (table_bytes, index_bytes, largest) = rt.block_on(async {
        let client = pg.client(&db).await;
        let sizes = client
            .query_one(
                "SELECT sum(pg_table_size(c.oid))::bigint, sum(pg_indexes_size(c.oid))::bigint
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind = 'r' AND n.nspname IN ('app', 'audit')",
                &[],
            )
            .await
            .unwrap();
        let largest: String = client
            .query_one("SELECT md5('org-1')::uuid::text", &[])
            .await
            .unwrap()
            .get(0);
        (
            sizes.get::<_, i64>(0) as u64,
            sizes.get::<_, i64>(1) as u64,
            largest,
        )
    });
    eprintln!(
        "   {db}: {} of tables (heap+TOAST), {} of indexes, loaded in {load_seconds:.0} s",
        mib(table_bytes as f64),
        mib(index_bytes as f64)
    );

    let env = Env::new(pg, work, &db, 3);
    let format2 = Env::new(pg, work, &db, 2);
    let port = pg.port.to_string();
    let conn = format!("-h 127.0.0.1 -p {port} -U updog_backup -d {db}");
    let baselines = Baselines::new(pg, &env, &db, &conn, &largest);

    let loadavg_before = loadavg();
    // Warm-up (untimed): page cache, and proof that the setup works.
    eprintln!("   warm-up backup…");
    let (_, warm) = env.backup(pg, &[], 2);
    format2.backup(pg, &[], 2);
    let mut result = ScaleResult {
        scale: scale.to_string(),
        tenants: warm.tenants,
        rows: warm.rows,
        table_bytes,
        index_bytes,
        load_seconds,
        loadavg_before,
        loadavg_after: String::new(),
        largest: largest.clone(),
        largest_rows: 0,
        pipeline: Series::default(),
        one_stream: Series::default(),
        org: Series::default(),
        schema_dump: Series::default(),
        pg_dump: Series::default(),
        ours: args
            .parallel
            .iter()
            .map(|&p| (p, Series::default()))
            .collect(),
        ours_no_parallel_query: Series::default(),
        ours_format2: Series::default(),
        init: (env.init, format2.init),
        costs: Vec::new(),
    };
    for run in 0..args.runs {
        eprintln!("   run {}/{}: (a) largest tenant…", run + 1, args.runs);
        // Alternate the order between runs so that no side always goes first.
        let mut steps = vec![0, 1, 2, 3];
        if run % 2 == 1 {
            steps.reverse();
        }
        for step in steps {
            match step {
                0 => result.pipeline.0.push(baselines.pipeline()),
                1 => result.one_stream.0.push(baselines.one_stream()),
                2 => {
                    let (mut sample, stored) = env.backup(pg, &["--org", &largest], 2);
                    let (seconds, bytes, rows) = *stored
                        .archives
                        .get(&largest)
                        .expect("the tenant's \"archive stored\" line");
                    sample.archive = seconds;
                    sample.bytes = bytes;
                    result.largest_rows = rows;
                    result.org.0.push(sample);
                }
                _ => result.schema_dump.0.push(baselines.pg_dump(&[
                    "--schema-only",
                    "-Fc",
                    "--compress=0",
                ])),
            }
        }
        eprintln!("   run {}/{}: (b) all tenants…", run + 1, args.runs);
        let mut steps: Vec<Step> = std::iter::once(Step::PgDump)
            .chain((0..args.parallel.len()).map(Step::Ours))
            .chain([Step::OursNoParallelQuery, Step::OursFormat2])
            .collect();
        if run % 2 == 1 {
            steps.reverse();
        }
        for step in steps {
            match step {
                Step::PgDump => result
                    .pg_dump
                    .0
                    .push(baselines.pg_dump(&["-Fc", "-Z", "6"])),
                Step::Ours(i) => {
                    let (sample, stored) = env.backup(pg, &[], args.parallel[i]);
                    assert_eq!(
                        stored.tenants, result.tenants,
                        "every run holds every tenant"
                    );
                    result.ours[i].1.0.push(sample);
                }
                Step::OursNoParallelQuery => {
                    // Set on the role (what an operator can do today), for this run only:
                    // the baselines connect as the same role.
                    parallel_query(pg, false);
                    let (sample, _) = env.backup(pg, &[], NO_PARALLEL_QUERY_RUN);
                    parallel_query(pg, true);
                    result.ours_no_parallel_query.0.push(sample);
                }
                Step::OursFormat2 => {
                    let (sample, _) = format2.backup(pg, &[], FORMAT2_RUN);
                    result.ours_format2.0.push(sample);
                }
            }
        }
    }
    result.loadavg_after = loadavg();
    eprintln!("   server time per table (untimed, statement logging on)…");
    result.costs = diagnose(pg, &env, &conn);
    result
}

/// The (b) measurements of one run, in the order they run.
#[derive(Clone, Copy)]
pub(crate) enum Step {
    PgDump,
    /// Ours at `args.parallel[i]`.
    Ours(usize),
    /// Ours at [`NO_PARALLEL_QUERY_RUN`] with the source role's parallel query turned off.
    OursNoParallelQuery,
    /// Ours at [`FORMAT2_RUN`] into the format-2 repository.
    OursFormat2,
}

/// `snapshot.parallel` of the format-2 run (compare it with ours at the same parallel).
pub(crate) const FORMAT2_RUN: usize = 2;
