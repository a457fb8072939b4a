//! One scale: the fixture loaded and frozen, then `--runs` rounds interleaving ours and the
//! baselines — (a) the largest tenant, (b) every tenant at each `snapshot.parallel` and without
//! parallel query — and the server time per table at the end ([`crate::diagnose`]).

use std::path::Path;
use std::time::Instant;

use std::fs;

use updog_backup_test_support::bench::{dir_bytes, loadavg, mib};
use updog_backup_test_support::pgbackrest::{PgBackRest, STANZA};
use updog_backup_test_support::postgres;

use crate::Args;
use crate::baselines::Baselines;
use crate::diagnose::{TableCost, diagnose};
use crate::measure::{Sample, Series, measure};
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
    /// `pgbackrest --type=full backup` (time, and the bytes of the backup's own directory).
    pub(crate) pgbackrest: Series,
    /// `init` (the first snapshot, which also makes every tenant's key).
    pub(crate) init: Sample,
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
    let pgbackrest = PgBackRestBackups::new(pg, work, scale);
    let port = pg.port.to_string();
    let conn = format!("-h 127.0.0.1 -p {port} -U updog_backup -d {db}");
    let baselines = Baselines::new(pg, &env, &db, &conn, &largest);

    let loadavg_before = loadavg();
    // Warm-up (untimed): page cache, and proof that the setup works.
    eprintln!("   warm-up backup…");
    let (_, warm) = env.backup(pg, &[], 2);
    pgbackrest.backup(pg, work);
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
        pgbackrest: Series::default(),
        init: env.init,
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
            .chain([Step::OursNoParallelQuery, Step::PgBackRest])
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
                Step::PgBackRest => result.pgbackrest.0.push(pgbackrest.backup(pg, work)),
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
    /// A full pgBackRest backup of the whole cluster.
    PgBackRest,
}

/// pgBackRest beside the cluster (archive_mode is on): full backups, each measured by its own
/// directory in the repository (WAL archived meanwhile is not counted).
struct PgBackRestBackups {
    config: PgBackRest,
}

impl PgBackRestBackups {
    fn new(pg: &postgres::Cluster, work: &Path, scale: &str) -> Self {
        let base = work.join(format!("pgbackrest-{scale}"));
        fs::create_dir_all(&base).unwrap();
        let config = PgBackRest::new(&base, pg);
        config.enable(pg);
        PgBackRestBackups { config }
    }

    fn backup(&self, pg: &postgres::Cluster, work: &Path) -> Sample {
        let backups = self.config.dir.join("repo/backup").join(STANZA);
        let before: Vec<_> = fs::read_dir(&backups)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        let mut args: Vec<String> = ["-u", "postgres", "--", "pgbackrest"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(format!("--config={}", self.config.config.display()));
        args.push(format!("--stanza={STANZA}"));
        args.push("--type=full".into());
        args.push("backup".into());
        let o = measure(pg, work, Path::new("runuser"), &args, &[]);
        let new = fs::read_dir(&backups)
            .unwrap()
            .flatten()
            .find(|e| {
                e.file_name().to_string_lossy().ends_with('F') && !before.contains(&e.file_name())
            })
            .expect("the new full backup's directory");
        Sample {
            bytes: dir_bytes(&new.path()),
            ..Sample::from(&o)
        }
    }
}
