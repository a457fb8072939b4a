//! The report of the snapshot bench: the tables on stdout per scale, (a) to (c), against the
//! issue's targets.

use std::fmt::Write as _;
use std::time::Duration;

use updog_backup_test_support::bench::{MIB, Machine, mib, verdict};

use crate::measure::Series;
use crate::ours::NO_PARALLEL_QUERY_RUN;
use crate::scale::ScaleResult;
use crate::{Args, RSS_TARGET_KIB, TENANT_RATIO_TARGET};

pub(crate) fn report(
    machine: &Machine,
    args: &Args,
    results: &[ScaleResult],
    total: Duration,
) -> String {
    let mut s = String::new();
    let w = &mut s;
    writeln!(w, "\n# updog-backup snapshot benchmark\n").unwrap();
    writeln!(
        w,
        "{}",
        machine.describe("private cluster, fsync=off, loopback TCP", "")
    )
    .unwrap();
    writeln!(
        w,
        "command: cargo bench --bench snapshot -- --scales {} --tenants {} --runs {} --parallel {}",
        args.scales.join(","),
        args.tenants,
        args.runs,
        args.parallel
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    )
    .unwrap();
    writeln!(
        w,
        "medians of {} interleaved runs; ratio = ours / baseline; client CPU = the command and its \
         children (user+sys); server CPU = the PostgreSQL backends that served it",
        args.runs
    )
    .unwrap();
    for r in results {
        writeln!(
            w,
            "\n## scale {}: {} tenants, {} rows, {} of tables (heap+TOAST) + {} of indexes",
            r.scale,
            r.tenants,
            r.rows,
            mib(r.table_bytes as f64),
            mib(r.index_bytes as f64),
        )
        .unwrap();
        writeln!(
            w,
            "fixture loaded in {:.0} s; load average {} before, {} after the measurements",
            r.load_seconds, r.loadavg_before, r.loadavg_after
        )
        .unwrap();
        writeln!(
            w,
            "\n(a) largest tenant {}: {} rows",
            r.largest, r.largest_rows
        )
        .unwrap();
        writeln!(
            w,
            "| measurement | time | client CPU | server CPU | stored | ratio | ≤ {TENANT_RATIO_TARGET}× |"
        )
        .unwrap();
        writeln!(w, "|---|---:|---:|---:|---:|---:|---|").unwrap();
        let base = r.pipeline.wall();
        let row = |w: &mut String, name: &str, s: &Series, t: f64, target: bool| {
            let ratio = t / base;
            writeln!(
                w,
                "| {name} | {} | {:.2} s | {:.2} s | {} | {ratio:.2} | {} |",
                if target && name.contains("archive") {
                    format!("{t:.3} s")
                } else {
                    s.wall_text(3)
                },
                s.cpu(),
                s.server(),
                mib(s.bytes() as f64),
                if target {
                    verdict(ratio <= TENANT_RATIO_TARGET)
                } else {
                    ""
                }
            )
            .unwrap();
        };
        row(
            w,
            "baseline: 11 × `psql -c \"COPY (…) TO STDOUT\" \\| zstd -3 \\| age -r`",
            &r.pipeline,
            base,
            false,
        );
        row(
            w,
            "reference: one psql session \\| one zstd -3 \\| one age",
            &r.one_stream,
            r.one_stream.wall(),
            false,
        );
        row(
            w,
            "ours: `backup --org`, whole command",
            &r.org,
            r.org.wall(),
            true,
        );
        row(
            w,
            "ours: its tenant archive (logged export time)",
            &r.org,
            r.org.median(|s| s.archive),
            true,
        );
        writeln!(
            w,
            "\n`backup --org` (parallel 2): {:.3} s from process start to \"snapshot started\" (connect, catalog, \
             temporary slot + exported snapshot); `pg_dump --schema-only` of the same schemas alone: {:.3} s \
             (ours runs it concurrently with the export); peak RSS {}; vs the one-stream reference: \
             {:.2}× (whole command), {:.2}× (archive)",
            r.org.median(|s| s.setup),
            r.schema_dump.wall(),
            mib((r.org.peak_rss_kib() * 1024) as f64),
            r.org.wall() / r.one_stream.wall(),
            r.org.median(|s| s.archive) / r.one_stream.wall()
        )
        .unwrap();
        writeln!(w, "\n(b) all tenants, (c) peak RSS").unwrap();
        writeln!(
            w,
            "| measurement | time | client CPU | server CPU | stored | peak RSS | rows/s | source MiB/s | time ratio | bytes ratio | (b) faster, no larger | (c) < 256 MiB |"
        )
        .unwrap();
        writeln!(
            w,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
        )
        .unwrap();
        let dump_t = r.pg_dump.wall();
        let dump_b = r.pg_dump.bytes();
        let line = |w: &mut String, name: &str, s: &Series, ours: bool| {
            let t = s.wall();
            let (tr, br) = (t / dump_t, s.bytes() as f64 / dump_b as f64);
            let rss = s.peak_rss_kib();
            writeln!(
                w,
                "| {name} | {} | {:.2} s | {:.2} s | {} | {} | {:.0} | {:.1} | {tr:.2} | {br:.3} | {} | {} |",
                s.wall_text(2),
                s.cpu(),
                s.server(),
                mib(s.bytes() as f64),
                mib((rss * 1024) as f64),
                r.rows as f64 / t,
                r.table_bytes as f64 / MIB / t,
                if ours { verdict(tr < 1.0 && br <= 1.0) } else { "" },
                if ours { verdict(rss < RSS_TARGET_KIB) } else { "" },
            )
            .unwrap();
        };
        line(
            w,
            "baseline: `pg_dump -Fc -Z 6 -n app -n audit`",
            &r.pg_dump,
            false,
        );
        for (p, s) in &r.ours {
            line(w, &format!("ours: `backup`, parallel = {p}"), s, true);
        }
        line(
            w,
            &format!(
                "ours: `backup`, parallel = {NO_PARALLEL_QUERY_RUN}, role with `max_parallel_workers_per_gather = 0`"
            ),
            &r.ours_no_parallel_query,
            true,
        );
        line(
            w,
            "pgBackRest: `--type=full backup` of the whole cluster (zstd 3, 2 processes)",
            &r.pgbackrest,
            false,
        );
        let br_t = r.pgbackrest.wall();
        let br_b = r.pgbackrest.bytes() as f64;
        for (p, s) in &r.ours {
            writeln!(
                w,
                "\nours (parallel {p}) / pgBackRest: {:.2}× time, {:.2}× bytes; / pg_dump: {:.2}× time, {:.2}× bytes",
                s.wall() / br_t,
                s.bytes() as f64 / br_b,
                s.wall() / dump_t,
                s.bytes() as f64 / dump_b as f64
            )
            .unwrap();
        }
        writeln!(
            w,
            "\n`init` (first snapshot, also makes every tenant's key): {:.2} s",
            r.init.wall
        )
        .unwrap();
        let setups: Vec<String> = r
            .ours
            .iter()
            .map(|(p, s)| format!("parallel {p}: {:.3} s", s.median(|s| s.setup)))
            .collect();
        writeln!(
            w,
            "\n`backup`, process start to \"snapshot started\": {}",
            setups.join(", ")
        )
        .unwrap();
        writeln!(
            w,
            "\nserver statement time by table: ours = Σ of every tenant's COPY in one extra `backup` \
             (parallel 1); full = one `COPY (SELECT * FROM t) TO STDOUT (FORMAT binary)` of the whole table \
             (what a dump does); from the server log (log_min_duration_statement = 0, set for this step only)"
        )
        .unwrap();
        writeln!(
            w,
            "| table | ours | statements | full-table COPY | ours / full |"
        )
        .unwrap();
        writeln!(w, "|---|---:|---:|---:|---:|").unwrap();
        let (mut ours_total, mut full_total) = (0.0, 0.0);
        for c in &r.costs {
            ours_total += c.ours_ms;
            full_total += c.full_ms;
            writeln!(
                w,
                "| {} | {:.3} s | {} | {:.3} s | {:.1} |",
                c.table,
                c.ours_ms / 1000.0,
                c.statements,
                c.full_ms / 1000.0,
                c.ours_ms / c.full_ms
            )
            .unwrap();
        }
        writeln!(
            w,
            "| total | {:.3} s | | {:.3} s | {:.1} |",
            ours_total / 1000.0,
            full_total / 1000.0,
            ours_total / full_total
        )
        .unwrap();
    }
    writeln!(w, "\n## verdicts\n").unwrap();
    writeln!(
        w,
        "| scale | (a) whole `backup --org` ≤ 1.2× | (a) tenant archive ≤ 1.2× | (b) faster than pg_dump, bytes no larger | (b) with the role's parallel query off | (c) peak RSS < 256 MiB |"
    )
    .unwrap();
    writeln!(w, "|---|---|---|---|---|---|").unwrap();
    for r in results {
        let base = r.pipeline.wall();
        let whole = r.org.wall() / base;
        let archive = r.org.median(|s| s.archive) / base;
        let b_verdict = |name: String, s: &Series| {
            let tr = s.wall() / r.pg_dump.wall();
            let br = s.bytes() as f64 / r.pg_dump.bytes() as f64;
            format!(
                "{name}: {} ({tr:.2}× time, {br:.2}× bytes)",
                verdict(tr < 1.0 && br <= 1.0)
            )
        };
        let b: Vec<String> = r
            .ours
            .iter()
            .map(|(p, s)| b_verdict(format!("p{p}"), s))
            .collect();
        let b_no_pq = b_verdict(
            format!("p{NO_PARALLEL_QUERY_RUN}"),
            &r.ours_no_parallel_query,
        );
        let rss = r
            .ours
            .iter()
            .map(|(_, s)| s.peak_rss_kib())
            .chain([r.ours_no_parallel_query.peak_rss_kib()])
            .max()
            .unwrap_or(0);
        writeln!(
            w,
            "| {} | {} ({whole:.2}×) | {} ({archive:.2}×) | {} | {b_no_pq} | {} ({}) |",
            r.scale,
            verdict(whole <= TENANT_RATIO_TARGET),
            verdict(archive <= TENANT_RATIO_TARGET),
            b.join("; "),
            verdict(rss < RSS_TARGET_KIB),
            mib((rss * 1024) as f64)
        )
        .unwrap();
    }
    writeln!(w, "\ntotal bench time {:.0} s", total.as_secs_f64()).unwrap();
    s
}
