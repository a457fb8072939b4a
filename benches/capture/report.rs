//! The report of the capture bench: the tables on stdout, (a) to (d), and the verdicts against
//! the targets.

use std::fmt::Write as _;
use std::time::Duration;

use chrono::{DateTime, Utc};

use updog_backup_test_support::bench::{Machine, mib, verdict};

use crate::daemon::PackLine;
use crate::pgbackrest::PgBackRestRun;
use crate::pitr::PitrResult;
use crate::plumbing::{percentile, rfc3339, secs, spread};
use crate::rate::CaptureResult;
use crate::replay::ReplayRun;
use crate::{
    Args, CAPTURE_TARGET, KEEP_UP_MARGIN, LAG_MARGIN, REPLAY_TARGET, RSS_TARGET_KIB,
    pgbackrest_version,
};
use updog_backup_test_support::bench::median;

pub(crate) fn pack_lags(packs: &[PackLine]) -> Vec<f64> {
    let mut lags: Vec<f64> = packs
        .iter()
        .filter_map(|p| p.first.map(|f| secs(p.at - f)))
        .collect();
    lags.sort_by(f64::total_cmp);
    lags
}

pub(crate) fn report(
    machine: &Machine,
    args: &Args,
    capture: Option<&CaptureResult>,
    pitr: Option<&PitrResult>,
    (load_before, load_after): (&str, &str),
    total: Duration,
) -> String {
    let mut s = String::new();
    let w = &mut s;
    let flush = args.flush();
    writeln!(w, "\n# updog-backup change capture benchmark\n").unwrap();
    writeln!(
        w,
        "{}",
        machine.describe(
            "private clusters, fsync=off, loopback TCP",
            &pgbackrest_version()
        )
    )
    .unwrap();
    writeln!(w, "command: {}", args.command_line()).unwrap();
    writeln!(
        w,
        "load: pgbench -M prepared, {} clients, each transaction = 1 tenant (zipfian s={} over {} \
         tenants) × ({} audit.events inserts + 2 investment_lots inserts + 1 update + 1 delete) = \
         {} row changes; stream.flush_interval {}; ratio = measured / target",
        args.clients,
        args.skew,
        args.tenants,
        args.events,
        args.events + 4,
        if args.flush_interval.is_some() {
            format!("{flush} s (overridden)")
        } else {
            format!("{flush} s (default)")
        }
    )
    .unwrap();
    let mut verdicts: Vec<(String, String, String, String, String)> = Vec::new();

    if let Some(c) = capture {
        writeln!(
            w,
            "\n## (a) sustained capture — fixture {} tenants, scale {} ({} rows); `init` took {:.1} s",
            args.tenants, args.scale, c.db_rows, c.init_seconds
        )
        .unwrap();
        let l = &c.live;
        let captured: u64 = c.live_packs.iter().map(|p| p.changes).sum();
        let captured_txns: u64 = c.live_packs.iter().map(|p| p.transactions).sum();
        let gen_rate = l.changes as f64 / l.wall;
        let cap_rate = captured as f64 / l.wall;
        let keep_up_limit = flush + KEEP_UP_MARGIN;
        let kept_up = c.live_catch_up.is_some_and(|s| s <= keep_up_limit);
        let lags = pack_lags(&c.live_packs);
        let lag_target = flush + LAG_MARGIN;
        let (p50, p99, max) = (
            percentile(&lags, 0.5),
            percentile(&lags, 0.99),
            lags.last().copied().unwrap_or(f64::NAN),
        );
        let interval = if c.live_packs.len() > 1 {
            let mut gaps: Vec<f64> = c
                .live_packs
                .windows(2)
                .map(|p| secs(p[1].at - p[0].at))
                .collect();
            gaps.sort_by(f64::total_cmp);
            median(&gaps)
        } else {
            f64::NAN
        };
        writeln!(
            w,
            "\n| measurement | measured | target | ratio | verdict |\n|---|---:|---:|---:|---|"
        )
        .unwrap();
        writeln!(
            w,
            "| row changes generated (pg_stat_user_tables) | {gen_rate:.0}/s ({} in {:.1} s; {:.0} tps, {} transactions, {} failed) | | | |",
            l.changes, l.wall, l.tps, l.transactions, l.failed
        )
        .unwrap();
        writeln!(
            w,
            "| row changes captured (Σ \"pack stored\" changes) | {cap_rate:.0}/s ({captured} in {} packs, {captured_txns} transactions) | ≥ {CAPTURE_TARGET:.0}/s | {:.2} | {} |",
            c.live_packs.len(),
            cap_rate / CAPTURE_TARGET,
            verdict(cap_rate >= CAPTURE_TARGET && kept_up)
        )
        .unwrap();
        writeln!(
            w,
            "| captured / generated | {:.4} | 1 | | {} |",
            captured as f64 / l.changes as f64,
            verdict(captured as i64 == l.changes)
        )
        .unwrap();
        if let (Some(last), Some(end)) = (c.live_packs.last(), l.end) {
            writeln!(
                w,
                "| last pack (the load's last commits) stored | {:.1} s after the end of the load | | | |",
                secs(last.at - end)
            )
            .unwrap();
        }
        writeln!(
            w,
            "| covered-until reaches the end of the load | {} after it | ≤ {keep_up_limit:.1} s | {} | {} |",
            c.live_catch_up.map_or("never (600 s)".into(), |s| format!("{s:.1} s")),
            c.live_catch_up.map_or("".into(), |s| format!("{:.2}", s / keep_up_limit)),
            verdict(kept_up)
        )
        .unwrap();
        writeln!(
            w,
            "| commit-to-durable lag, p50 of per-pack worst | {p50:.2} s | | | |"
        )
        .unwrap();
        writeln!(
            w,
            "| commit-to-durable lag, p99 of per-pack worst | {p99:.2} s | ≤ {lag_target:.1} s | {:.2} | {} |",
            p99 / lag_target,
            verdict(p99 <= lag_target)
        )
        .unwrap();
        writeln!(
            w,
            "| commit-to-durable lag, max | {max:.2} s | | {:.2} | |",
            max / lag_target
        )
        .unwrap();
        if let Some(b) = &c.backlog {
            let drained: u64 = b.packs.iter().map(|p| p.changes).sum();
            if let Some(d) = b.decoded_seconds {
                let rate = drained as f64 / d;
                writeln!(
                    w,
                    "| backlog after {} s of load with the daemon stopped: decoded and received (walsender sent all) | {rate:.0}/s ({drained} changes in {d:.1} s) | ≥ {CAPTURE_TARGET:.0}/s | {:.2} | {} |",
                    args.backlog,
                    rate / CAPTURE_TARGET,
                    verdict(rate >= CAPTURE_TARGET)
                )
                .unwrap();
            }
            let rate = drained as f64 / b.drain_seconds;
            writeln!(
                w,
                "| same backlog, all of it stored (last pack; waits for the flush) | {rate:.0}/s ({:.1} s) | | | |",
                b.drain_seconds,
            )
            .unwrap();
            let f2 = &b.format2;
            writeln!(
                w,
                "| same backlog again, by a daemon into a format-2 repository (one key for every tenant) | {:.0}/s ({:.1} s, {} packs, daemon CPU {:.1} s) | format 3 / format 2: | {:.3}× time, {:.3}× CPU | |",
                drained as f64 / f2.seconds,
                f2.seconds,
                f2.packs,
                f2.daemon_cpu,
                b.drain_seconds / f2.seconds,
                b.daemon_cpu / f2.daemon_cpu
            )
            .unwrap();
        }
        let stored_packs: u64 = c.live_packs.iter().map(|p| p.bytes).sum();
        writeln!(
            w,
            "\nlive: {} packs, median {interval:.1} s apart, {} stored ({:.1} bytes per change; `changes/` holds {}); \
             pack store time median {:.3} s; \
             {} of WAL ({:.0} bytes per change); daemon CPU {:.1} s ({:.1} µs per change), walsender (decoding) CPU {:.1} s; \
             daemon RSS: {} idle, {} max sampled, VmHWM {}; largest now − covered-until while loading {:.1} s, \
             largest slot lag {}",
            c.live_packs.len(),
            mib(stored_packs as f64),
            stored_packs as f64 / captured.max(1) as f64,
            mib(c.change_bytes_live as f64),
            median(&c.live_packs.iter().map(|p| p.seconds).collect::<Vec<_>>()),
            mib(l.wal_bytes as f64),
            l.wal_bytes as f64 / l.changes.max(1) as f64,
            c.live_daemon_cpu,
            c.live_daemon_cpu * 1e6 / captured.max(1) as f64,
            c.live_walsender_cpu,
            mib(c.idle_rss_start_kib as f64 * 1024.0),
            mib(c.live_samples.max_rss_kib as f64 * 1024.0),
            mib(c.live_hwm_kib as f64 * 1024.0),
            c.live_samples.max_covered_lag,
            mib(c.live_samples.max_slot_lag_bytes as f64),
        )
        .unwrap();
        let origin = c
            .live
            .end
            .map(|e| e - chrono::TimeDelta::milliseconds((l.wall * 1000.0) as i64));
        writeln!(
            w,
            "\nlive packs (times in s from the start of the load):\n\n| pack | stored at | first commit | last commit | transactions | changes | bytes | store time | worst lag |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        )
        .unwrap();
        for (i, p) in c.live_packs.iter().enumerate() {
            let rel = |t: Option<DateTime<Utc>>| match (t, origin) {
                (Some(t), Some(o)) => format!("{:.2}", secs(t - o)),
                _ => "?".into(),
            };
            writeln!(
                w,
                "| {} | {} | {} | {} | {} | {} | {} | {:.3} s | {} |",
                i + 1,
                rel(Some(p.at)),
                rel(p.first),
                rel(p.last),
                p.transactions,
                p.changes,
                p.bytes,
                p.seconds,
                p.first
                    .map_or("?".into(), |f| format!("{:.2} s", secs(p.at - f)))
            )
            .unwrap();
        }
        if let Some(b) = &c.backlog {
            let drained: u64 = b.packs.iter().map(|p| p.changes).sum();
            writeln!(
                w,
                "\nbacklog: {} row changes generated in {:.1} s ({:.0}/s) with the daemon stopped; restarted daemon: \
                 {:.2} s to \"capture started\"; counted from there: walsender sent all of it after {}, {} packs \
                 ({drained} changes) all stored after {:.1} s, covered-until past the end of the load after {}; daemon CPU {:.1} s, \
                 walsender CPU {:.1} s; VmHWM {}",
                b.load.changes,
                b.load.wall,
                b.load.changes as f64 / b.load.wall,
                b.startup_seconds,
                b.decoded_seconds.map_or("never".into(), |s| format!("{s:.1} s")),
                b.packs.len(),
                b.drain_seconds,
                b.covered_after.map_or("never".into(), |s| format!("{s:.1} s")),
                b.daemon_cpu,
                b.walsender_cpu,
                mib(b.hwm_kib as f64 * 1024.0)
            )
            .unwrap();
        }
        verdicts.push((
            "(a) capture rate while keeping up".into(),
            format!(
                "{cap_rate:.0}/s live; kept up: {}",
                if kept_up { "yes" } else { "no" }
            ),
            format!("≥ {CAPTURE_TARGET:.0}/s"),
            format!("{:.2}", cap_rate / CAPTURE_TARGET),
            verdict(cap_rate >= CAPTURE_TARGET && kept_up).into(),
        ));
        if let Some(b) = &c.backlog
            && let Some(d) = b.decoded_seconds
        {
            let drained: u64 = b.packs.iter().map(|p| p.changes).sum();
            let rate = drained as f64 / d;
            verdicts.push((
                "(a) capture capacity (backlog decoded and received)".into(),
                format!("{rate:.0}/s"),
                format!("≥ {CAPTURE_TARGET:.0}/s"),
                format!("{:.2}", rate / CAPTURE_TARGET),
                verdict(rate >= CAPTURE_TARGET).into(),
            ));
        }
        verdicts.push((
            "(a) commit-to-durable lag p99".into(),
            format!("{p99:.2} s"),
            format!("≤ {lag_target:.1} s"),
            format!("{:.2}", p99 / lag_target),
            verdict(p99 <= lag_target).into(),
        ));

        if !c.replays.is_empty() {
            writeln!(
                w,
                "\n## (b) replay rate — `restore --org <tenant> --latest --json` (medians of runs; tenant 1 draws {:.0} % of the load's transactions)",
                c.busy_changes_share * 100.0
            )
            .unwrap();
            writeln!(
                w,
                "\n| tenant | runs | changes replayed | transactions | packs | replay time | replay rate | target | ratio | verdict | whole restore | rows after | restore CPU | peak RSS |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"
            )
            .unwrap();
            for r in &c.replays {
                let rates: Vec<f64> = r.runs.iter().map(ReplayRun::rate).collect();
                let rate = median(&rates);
                let first = &r.runs[0];
                writeln!(
                    w,
                    "| {} `{}` | {} | {} | {} | {} | {} | {} | ≥ {REPLAY_TARGET:.0}/s | {:.2} | {} | {} | {} | {:.2} s | {} |",
                    r.label,
                    &r.tenant[..8],
                    r.runs.len(),
                    first.changes,
                    first.transactions,
                    first.packs,
                    spread(&r.runs.iter().map(|x| x.replay_seconds).collect::<Vec<_>>(), 2, "s"),
                    spread(&rates, 0, "/s"),
                    rate / REPLAY_TARGET,
                    verdict(rate >= REPLAY_TARGET),
                    spread(&r.runs.iter().map(|x| x.total.wall).collect::<Vec<_>>(), 2, "s"),
                    first.rows,
                    median(&r.runs.iter().map(|x| x.total.cpu).collect::<Vec<_>>()),
                    mib(r.runs.iter().map(|x| x.total.rss_kib).max().unwrap_or(0) as f64 * 1024.0),
                )
                .unwrap();
                verdicts.push((
                    format!("(b) replay rate, {}", r.label),
                    format!("{rate:.0}/s"),
                    format!("≥ {REPLAY_TARGET:.0}/s"),
                    format!("{:.2}", rate / REPLAY_TARGET),
                    verdict(rate >= REPLAY_TARGET).into(),
                ));
            }
        }

        if let Some(b) = &c.big {
            writeln!(
                w,
                "\n## (c) daemon memory — one transaction of {} rows (tenant `{}`, {} of WAL, inserted in {:.1} s)",
                b.rows,
                &b.tenant[..8],
                mib(b.wal_bytes as f64),
                b.insert_seconds
            )
            .unwrap();
            let ratio = b.hwm_kib as f64 / RSS_TARGET_KIB as f64;
            writeln!(
                w,
                "\n| measurement | measured | target | ratio | verdict |\n|---|---:|---:|---:|---|"
            )
            .unwrap();
            writeln!(
                w,
                "| daemon RSS at idle (fresh daemon, caught up) | {} (VmHWM {}) | | | |",
                mib(b.idle_rss_kib as f64 * 1024.0),
                mib(b.idle_hwm_kib as f64 * 1024.0)
            )
            .unwrap();
            writeln!(
                w,
                "| daemon peak RSS (VmHWM) capturing the transaction | {} | < {} | {ratio:.2} | {} |",
                mib(b.hwm_kib as f64 * 1024.0),
                mib(RSS_TARGET_KIB as f64 * 1024.0),
                verdict(b.hwm_kib < RSS_TARGET_KIB)
            )
            .unwrap();
            writeln!(
                w,
                "| daemon RSS afterwards | {} | | | |",
                mib(b.rss_after_kib as f64 * 1024.0)
            )
            .unwrap();
            let packs = b
                .packs
                .iter()
                .map(|p| {
                    format!(
                        "{} changes / {} transaction(s), {}, stored in {:.2} s, {:.1} s after its commit",
                        p.changes,
                        p.transactions,
                        mib(p.bytes as f64),
                        p.seconds,
                        p.last.map_or(f64::NAN, |l| secs(p.at - l))
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
            writeln!(
                w,
                "| commit → covered-until past it | {} | | | |",
                b.capture_seconds
                    .map_or("never".into(), |s| format!("{s:.1} s"))
            )
            .unwrap();
            writeln!(
                w,
                "\npacks: {packs}; daemon CPU {:.1} s ({:.2} µs per row)",
                b.daemon_cpu,
                b.daemon_cpu * 1e6 / b.rows as f64
            )
            .unwrap();
            verdicts.push((
                format!("(c) daemon peak RSS, {}-row transaction", b.rows),
                mib(b.hwm_kib as f64 * 1024.0),
                "< 256 MiB".into(),
                format!("{ratio:.2}"),
                verdict(b.hwm_kib < RSS_TARGET_KIB).into(),
            ));
        }
        if !c.stops.is_empty() {
            let stops: Vec<String> = c
                .stops
                .iter()
                .map(|(when, status, took)| format!("{when}: {status} in {took:.2} s"))
                .collect();
            writeln!(w, "\ndaemon stops (SIGTERM): {}", stops.join("; ")).unwrap();
        }
    }

    if let Some(d) = pitr {
        writeln!(
            w,
            "\n## (d) one tenant at T = snapshot + \"one hour\" of load: ours against pgBackRest"
        )
        .unwrap();
        writeln!(
            w,
            "\nsource database {} ({} tenants); median tenant by rows: `{}`{} with {} rows in the snapshot. \
             Backups before the load: our `init` (slot + first snapshot) {:.1} s; pgBackRest full backup {:.1} s ({} in its repository). \
             \"One hour\": {} row changes ({} transactions) in {:.1} s ({:.0}/s, compressed from an hour at {:.0}/s), {} of WAL; \
             T = {}; then `pgbackrest check` (WAL switch + archived) {:.1} s; covered-until passed T {:.1} s after it.",
            mib(d.db_bytes as f64),
            d.tenants,
            d.median_tenant,
            d.median_k.map_or(String::new(), |k| format!(" (fixture tenant {k})")),
            d.median_rows,
            d.init_seconds,
            d.backup_seconds,
            mib(d.backup_bytes as f64),
            d.load.changes,
            d.load.transactions,
            d.load.wall,
            d.load.changes as f64 / d.load.wall,
            d.load.changes as f64 / 3600.0,
            mib(d.load.wal_bytes as f64),
            rfc3339(d.target),
            d.archive_seconds,
            d.covered_seconds.unwrap_or(f64::NAN),
        )
        .unwrap();
        let ours: Vec<f64> = d.ours.iter().map(|r| r.total.wall).collect();
        let theirs: Vec<f64> = d.theirs.iter().map(PgBackRestRun::total).collect();
        let (om, tm) = (median(&ours), median(&theirs));
        writeln!(
            w,
            "\n| measurement ({} interleaved runs, median (min–max)) | time | ratio to pgBackRest | details |\n|---|---:|---:|---|",
            d.ours.len().max(d.theirs.len())
        )
        .unwrap();
        writeln!(
            w,
            "| pgBackRest: restore --type=time + recovery to T + tenant extraction | {} | 1.00 | restore {} ({} of files), recovery to T {}, extract {} |",
            spread(&theirs, 2, "s"),
            spread(&d.theirs.iter().map(|r| r.restore).collect::<Vec<_>>(), 2, "s"),
            mib(d.theirs.first().map_or(0, |r| r.restored_bytes) as f64),
            spread(&d.theirs.iter().map(|r| r.recovery).collect::<Vec<_>>(), 2, "s"),
            spread(&d.theirs.iter().map(|r| r.extract).collect::<Vec<_>>(), 2, "s"),
        )
        .unwrap();
        if let Some(first) = d.ours.first() {
            writeln!(
                w,
                "| ours: `restore --org <median> --at T` | {} | {:.3} | {} changes replayed ({} transactions, {} packs) in {:.2} s; {} rows; CPU {:.2} s; peak RSS {} |",
                spread(&ours, 2, "s"),
                om / tm,
                first.changes,
                first.transactions,
                first.packs,
                median(&d.ours.iter().map(|r| r.replay_seconds).collect::<Vec<_>>()),
                first.rows,
                median(&d.ours.iter().map(|r| r.total.cpu).collect::<Vec<_>>()),
                mib(d.ours.iter().map(|r| r.total.rss_kib).max().unwrap_or(0) as f64 * 1024.0),
            )
            .unwrap();
        }
        writeln!(
            w,
            "\nsame rows: {} ({} tables, {} rows of the tenant compared with the source, row count + md5 of every row)",
            if d.differences.is_empty() {
                "ours = pgBackRest = source".to_string()
            } else {
                format!("NO — {}", d.differences.join("; "))
            },
            d.tables_compared,
            d.rows_compared
        )
        .unwrap();
        verdicts.push((
            "(d) median tenant at T, ours / pgBackRest".into(),
            format!("{om:.2} s vs {tm:.2} s"),
            "faster".into(),
            format!("{:.3} ({:.0}× faster)", om / tm, tm / om),
            verdict(om < tm && d.differences.is_empty()).into(),
        ));
    }

    writeln!(
        w,
        "\n## verdicts\n\n| target | measured | target | ratio | verdict |\n|---|---|---|---:|---|"
    )
    .unwrap();
    for (name, measured, target, ratio, v) in &verdicts {
        writeln!(w, "| {name} | {measured} | {target} | {ratio} | {v} |").unwrap();
    }
    let problems: Vec<&String> = capture
        .map(|c| c.problems.iter().collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(
            pitr.map(|d| d.problems.iter().collect::<Vec<_>>())
                .unwrap_or_default(),
        )
        .collect();
    if problems.is_empty() {
        writeln!(w, "\nthe daemons logged no warning or error").unwrap();
    } else {
        writeln!(
            w,
            "\nthe daemons logged {} warning/error line(s):",
            problems.len()
        )
        .unwrap();
        for p in problems.iter().take(20) {
            writeln!(w, "    {p}").unwrap();
        }
    }
    writeln!(
        w,
        "\ntotal bench time {:.0} s; load average {load_before} before, {load_after} after",
        total.as_secs_f64()
    )
    .unwrap();
    s
}
