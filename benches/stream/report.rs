//! The report of the stream bench: the tables on stdout (markdown, as BENCHMARKS.md shows them).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use updog_backup_test_support::bench::Machine;
use updog_backup_test_support::proxy::describe_methods;

use crate::Args;
use crate::grow::{Stream, weights};
use crate::measure::{Cost, SizeResult};

/// A cell's time: measured, or the prediction of a command that was not run.
fn time(c: &Cost) -> String {
    if c.estimated {
        format!("~{:.0} s (est.)", c.seconds)
    } else {
        format!("{:.2} s", c.seconds)
    }
}

/// Requests of one command over the round trips: one number when every run agrees.
fn requests(costs: &[&Cost]) -> String {
    let mut seen: Vec<u64> = costs
        .iter()
        .filter(|c| !c.estimated)
        .map(|c| c.requests)
        .collect();
    seen.dedup();
    seen.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(" / ")
}

fn per_thousand(by_method: &BTreeMap<String, u64>, packs: u64) -> BTreeMap<String, u64> {
    by_method
        .iter()
        .map(|(m, n)| {
            (
                m.clone(),
                (*n as f64 * 1000.0 / packs.max(1) as f64).round() as u64,
            )
        })
        .collect()
}

pub(crate) fn report(
    machine: &Machine,
    setup: &str,
    args: &Args,
    stream: &Stream,
    sizes: &[SizeResult],
    (load_before, load_after): (&str, &str),
    total: Duration,
) -> String {
    let mut s = String::new();
    let w = &mut s;
    writeln!(
        w,
        "\n# updog-backup restore cost against stream length (issue 12)\n"
    )
    .unwrap();
    writeln!(w, "{}", machine.describe(setup, "")).unwrap();
    writeln!(w, "command: {}", args.command_line()).unwrap();
    writeln!(w, "stream index: {}", stream.index_setting).unwrap();
    writeln!(
        w,
        "load: {} transactions/s, each a random change (insert, update or delete of audit events, \
         lots, funds) of one tenant: tenant 1 draws {:.0} %, tenants 2–{} the rest (zipfian), tenant \
         {} none; stream.flush_interval {} ms; fixture {} tenants, scale {} ({} rows)",
        args.rate,
        args.busy_share * 100.0,
        args.tenants - 1,
        args.tenants,
        args.flush_interval_ms,
        args.tenants,
        args.scale,
        stream.db_rows
    )
    .unwrap();
    let all: u64 = stream.transactions.iter().sum();
    let shares = weights(args);
    let followed: Vec<String> = args
        .followed()
        .iter()
        .map(|&(label, k)| {
            let n = stream.transactions[k as usize - 1];
            format!(
                "{label} = tenant {k} `{}` ({n} transactions, {:.1} % of the load; expected {:.1} %)",
                &stream.tenant(k)[..8],
                n as f64 * 100.0 / all.max(1) as f64,
                shares[k as usize - 1] * 100.0
            )
        })
        .collect();
    writeln!(w, "followed tenants: {}", followed.join("; ")).unwrap();

    writeln!(
        w,
        "\n## Writing the stream (the daemon through the proxy, no added round trip)\n"
    )
    .unwrap();
    writeln!(
        w,
        "| packs stored | added | daemon run | packs/s | transactions | daemon requests | per 1,000 packs added | by method, per 1,000 packs |"
    )
    .unwrap();
    writeln!(w, "|---:|---:|---:|---:|---:|---:|---:|---|").unwrap();
    for step in &stream.steps {
        let total: u64 = step.requests.values().sum();
        writeln!(
            w,
            "| {} | {} | {:.1} s | {:.1} | {} | {} | {:.0} | {} |",
            step.packs_after,
            step.added(),
            step.seconds,
            step.added() as f64 / step.seconds,
            step.transactions,
            total,
            total as f64 * 1000.0 / step.added().max(1) as f64,
            describe_methods(&per_thousand(&step.requests, step.added()))
        )
        .unwrap();
    }
    writeln!(
        w,
        "\n(a run includes the daemon's start-up and stop: a step that adds few packs shows their \
         cost per pack too)"
    )
    .unwrap();

    let trips = &args.round_trips;
    let heads: Vec<String> = trips.iter().map(|ms| format!("+{ms} ms")).collect();
    writeln!(
        w,
        "\n## `restore --org <tenant> --latest`: requests and time against packs stored\n"
    )
    .unwrap();
    writeln!(
        w,
        "| packs | tenant | packs replayed | transactions replayed | requests | requests / pack | by method | {} |",
        heads.join(" | ")
    )
    .unwrap();
    writeln!(
        w,
        "|---:|---|---:|---:|---:|---:|---|{}",
        "---:|".repeat(trips.len())
    )
    .unwrap();
    for size in sizes {
        for ((label, k), costs) in &size.restores {
            let first = &costs[0];
            writeln!(
                w,
                "| {} | {label} (tenant {k}) | {} | {} | {} | {:.2} | {} | {} |",
                size.packs,
                first.packs_replayed,
                first.transactions,
                requests(&costs.iter().map(|c| &c.cost).collect::<Vec<_>>()),
                first.cost.requests as f64 / size.packs.max(1) as f64,
                describe_methods(&first.cost.by_method),
                costs
                    .iter()
                    .map(|c| time(&c.cost))
                    .collect::<Vec<_>>()
                    .join(" | ")
            )
            .unwrap();
        }
    }

    writeln!(
        w,
        "\n## `list --org <busiest>`, `verify`, daemon start-up\n"
    )
    .unwrap();
    writeln!(
        w,
        "| packs | command | requests | by method | {} |",
        heads.join(" | ")
    )
    .unwrap();
    writeln!(w, "|---:|---|---:|---|{}", "---:|".repeat(trips.len())).unwrap();
    for size in sizes {
        let startup: Vec<&Cost> = size.startup.iter().map(|u| &u.cost).collect();
        let logged: Vec<String> = size
            .startup
            .iter()
            .map(|u| u.logged.map_or("–".into(), |t| format!("{t:.2} s")))
            .collect();
        let rows: [(String, Vec<&Cost>); 3] = [
            ("`list --org <busiest>`".into(), size.list.iter().collect()),
            ("`verify`".into(), size.verify.iter().collect()),
            (
                format!(
                    "daemon start-up, until `/status` capturing (log's `capture started`: {})",
                    logged.join(" / ")
                ),
                startup,
            ),
        ];
        for (what, costs) in rows {
            writeln!(
                w,
                "| {} | {what} | {} | {} | {} |",
                size.packs,
                requests(&costs),
                describe_methods(&costs[0].by_method),
                costs
                    .iter()
                    .map(|c| time(c))
                    .collect::<Vec<_>>()
                    .join(" | ")
            )
            .unwrap();
        }
    }
    writeln!(
        w,
        "\nest.: not run, predicted from the +{} ms run as its time + its requests × the added \
         round trip (requests made one after another), because that exceeds --budget {} s. Times \
         are whole commands (process start to exit); requests are every HTTP request the proxy \
         forwarded to SeaweedFS. Each restore equalled the source (row count + md5 of every row \
         of every table).",
        trips[0], args.budget
    )
    .unwrap();
    writeln!(
        w,
        "\ntotal bench time {:.0} s; load average {load_before} before, {load_after} after",
        total.as_secs_f64()
    )
    .unwrap();
    s
}
