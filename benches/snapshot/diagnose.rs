//! Where the server time of a full backup goes, per table: one more backup and one `COPY` of
//! each whole tenant table with statement logging on, read back from the server log.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::time::Duration;

use updog_backup_test_support::fixture::tenant_tables;
use updog_backup_test_support::postgres;

use crate::measure::measure;
use crate::ours::Env;

/// Server statement time of one table: ours (the sum over every tenant's `COPY`) against one
/// `COPY` of the whole table.
pub(crate) struct TableCost {
    pub(crate) table: String,
    pub(crate) ours_ms: f64,
    pub(crate) statements: usize,
    pub(crate) full_ms: f64,
}

/// After the measurements: one more `backup` at parallel 1, then one binary `COPY` of each whole
/// tenant table through psql, with `log_min_duration_statement = 0` for just this step; the
/// server log gives each statement's execution time.
pub(crate) fn diagnose(pg: &postgres::Cluster, env: &Env, conn: &str) -> Vec<TableCost> {
    let log = pg.dir.join("log");
    let len = || fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let set = |value: &str| {
        pg.psql(
            "postgres",
            &[
                "-c",
                &format!("ALTER SYSTEM SET log_min_duration_statement = {value}"),
                "-c",
                "SELECT pg_reload_conf()",
            ],
        );
        // The reload is asynchronous: let the postmaster take it before new backends start.
        std::thread::sleep(Duration::from_millis(500));
    };
    set("0");
    let start = len();
    env.backup(pg, &[], 1);
    let middle = len();
    let mut script = String::new();
    for (table, _) in tenant_tables() {
        let (schema, name) = table.split_once('.').expect("schema.table");
        writeln!(
            script,
            "{} -X -q {conn} -c 'COPY (SELECT * FROM \"{schema}\".\"{name}\") TO STDOUT (FORMAT binary)' > /dev/null",
            pg.bin.join("psql").display()
        )
        .unwrap();
    }
    measure(pg, &env.dir, Path::new("sh"), &["-c".into(), script], &[]);
    let end = len();
    set("-1");
    let text = fs::read(&log).unwrap_or_default();
    let slice =
        |a: u64, b: u64| String::from_utf8_lossy(&text[a as usize..b as usize]).into_owned();
    let ours = statement_times(&slice(start, middle));
    let full = statement_times(&slice(middle, end));
    tenant_tables()
        .map(|(table, _)| {
            let (ours_ms, statements) = ours.get(table).copied().unwrap_or((f64::NAN, 0));
            TableCost {
                table: table.to_string(),
                ours_ms,
                statements,
                full_ms: full.get(table).map_or(f64::NAN, |f| f.0),
            }
        })
        .collect()
}

/// `schema.table` → (total ms, statements) of the `COPY (SELECT … FROM "schema"."table" …)`
/// statements in a server log (`duration: … ms  execute …:` or `statement:` lines).
pub(crate) fn statement_times(log: &str) -> BTreeMap<String, (f64, usize)> {
    let mut out: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for line in log.lines() {
        let Some((_, rest)) = line.split_once("duration: ") else {
            continue;
        };
        let Some((ms, rest)) = rest.split_once(" ms  ") else {
            continue;
        };
        if !(rest.starts_with("execute") || rest.starts_with("statement:"))
            || !rest.contains("COPY (SELECT ")
        {
            continue;
        }
        let (Ok(ms), Some((_, from))) = (ms.parse::<f64>(), rest.split_once(" FROM ")) else {
            continue;
        };
        let table = from
            .split([' ', ')'])
            .next()
            .unwrap_or_default()
            .replace('"', "");
        let entry = out.entry(table).or_default();
        entry.0 += ms;
        entry.1 += 1;
    }
    out
}
