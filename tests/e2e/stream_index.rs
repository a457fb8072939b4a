//! Issue 12: what restoring one tenant from a long change stream costs in store requests. The
//! real daemon writes a few hundred packs to SeaweedFS through the loopback proxy while one
//! tenant (busy) changes in every transaction and another (idle) never changes after the
//! snapshot; then both are restored with `--latest` through a proxy that adds a 20 ms round
//! trip to every request, as a remote S3 would, and counts the requests. Both restores must
//! equal the source, and their request counts must stay within what the stream index allows:
//! a bounded number of index reads plus the tenant's own sections, never one footer per pack.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::support::daemon::Daemon;
use crate::support::oracle::{digest, now, random_change, state};
use crate::support::postgres::cluster;
use crate::support::proxy::{Mode, Proxy, describe_methods};
use crate::support::{Repo, TestEnv, fixture_tenant, seaweed};

/// `stream.index_window` for this test: small, so that a few hundred packs make several
/// windows and a tail.
const WINDOW: u64 = 64;
const INDEX_WINDOW_VAR: &str = "UPDOG_BACKUP__STREAM__INDEX_WINDOW";
/// Packs to store: five whole windows and a tail of a third of one.
const PACKS: u64 = 5 * WINDOW + 20;
/// Short, so that the packs come quickly (a pack is due this long after its first commit,
/// checked after every event under load).
const FLUSH_INTERVAL: &str = "50ms";
/// The added round trip of a remote S3.
const ROUND_TRIP: Duration = Duration::from_millis(20);

/// Requests a `restore --latest` makes whatever the stream's length, with one page per
/// listing: `repo.json`, the snapshot listing and the manifest, the schema, global and tenant
/// archives, `changes/progress.json` and `changes/retained.json`, the listings of `changes/`
/// and of the gaps, and the restore record (a PUT): 13 (9 GETs, 3 listings, 1 PUT), and a
/// little room for a HEAD or a second read of an object, without letting per-pack reads hide
/// in it.
const FIXED: u64 = 16;
/// Listings a restore makes that grow with the stream (`changes/` and its subfolders): each
/// costs one more request per 1,000 keys beyond the page FIXED counts.
const LISTINGS: u64 = 3;
/// Reading one window's index directory: one ranged read of the object's tail, which holds
/// the whole directory of a window this small.
const PER_WINDOW: u64 = 1;
/// Reading a tenant's block of a window's index, for a tenant the window holds.
const PER_BLOCK: u64 = 1;
/// Reading one pack footer without an index: one ranged read of its tail (footers here are far
/// below the 64 KiB that first read covers).
const PER_FOOTER: u64 = 1;
/// Reads of each of the tenant's sections: fetched once, checked, and replayed from the
/// restore's local copy.
const PER_SECTION: u64 = 1;
/// Between the workload's transactions: packs are cut by time (FLUSH_INTERVAL), so a gentler
/// load stores as many packs with fewer transactions, and the busy tenant's replay (the debug
/// build's) stays short.
const PAUSE: Duration = Duration::from_millis(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenant_restore_reads_a_bounded_part_of_a_long_stream() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("streamidx", 4, "0.1").await;
    let source = pg.client(&db).await;
    let mut env = TestEnv::new(&db, Repo::S3).await;
    let proxy = Proxy::in_front_of_s3(&mut env).await;
    env.env.push((
        "UPDOG_BACKUP__STREAM__FLUSH_INTERVAL".into(),
        FLUSH_INTERVAL.into(),
    ));
    env.env.push((INDEX_WINDOW_VAR.into(), WINDOW.to_string()));
    env.ok(&["init"]);
    let (busy, idle) = (fixture_tenant(2).await, fixture_tenant(3).await);

    // Writing: the daemon alone talks through the proxy (the test polls SeaweedFS directly),
    // so its request count is the cost of storing the stream.
    proxy.reset_requests();
    let mut daemon = Daemon::start(&env);
    let load_clock = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let workload = {
        let (db, busy, stop) = (db.clone(), busy.clone(), stop.clone());
        tokio::spawn(async move {
            let source = cluster().await.client(&db).await;
            // The cluster runs synchronous_commit=off: the WAL writer would flush (and the
            // walsender send) these paced commits only every wal_writer_delay, cutting packs
            // by that instead of by FLUSH_INTERVAL.
            source
                .batch_execute("SET synchronous_commit = on")
                .await
                .unwrap();
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                random_change(&source, &busy, n).await;
                tokio::time::sleep(PAUSE).await;
            }
            n
        })
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    while stream_packs(&env).await < PACKS {
        daemon.assert_running();
        assert!(
            Instant::now() < deadline,
            "{PACKS} packs not stored within 180 s\n{}",
            daemon.output()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let transactions = workload.await.unwrap();
    let load_seconds = load_clock.elapsed().as_secs_f64();
    let last_commit = now(&source).await;
    wait_covered_directly(&env, last_commit, &mut daemon).await;
    assert!(daemon.terminate().success());
    let written = proxy.requests_by_method();
    let packs = stream_packs(&env).await;
    let daemon_requests: u64 = written.values().sum();
    eprintln!(
        "stream_index: {transactions} transactions of the busy tenant in {load_seconds:.1} s stored \
         {packs} packs; the daemon made {daemon_requests} requests ({:.2} per pack: {})",
        daemon_requests as f64 / packs as f64,
        describe_methods(&written)
    );

    let expected = [
        ("idle", &idle, state(&source, &idle).await),
        ("busy", &busy, state(&source, &busy).await),
    ];
    proxy.set(Mode::Latency(ROUND_TRIP));
    let mut counts = BTreeMap::new();
    for (label, tenant, _) in &expected {
        let target = format!("streamidx_{label}_{}", fastrand::u32(..));
        proxy.reset_requests();
        let clock = Instant::now();
        let out = env.ok(&[
            "restore",
            "--org",
            tenant,
            "--latest",
            "--json",
            "--target-db",
            &target,
        ]);
        let wall = clock.elapsed().as_secs_f64();
        let requests = proxy.requests();
        let report: serde_json::Value = serde_json::from_str(&out).unwrap();
        eprintln!(
            "stream_index: restore of the {label} tenant with a {} ms round trip: {requests} \
             requests ({}), {wall:.2} s (report: {:.2} s; {} packs replayed, {} transactions)",
            ROUND_TRIP.as_millis(),
            describe_methods(&proxy.requests_by_method()),
            report["seconds"].as_f64().unwrap_or(f64::NAN),
            report["changes"]["packs"],
            report["changes"]["transactions"],
        );
        counts.insert(*label, (requests, target));
    }
    proxy.set(Mode::Pass);

    // Exact first: a cheap restore that is wrong is no restore.
    for (label, tenant, want) in &expected {
        let recovered = cluster().await.client(&counts[label].1).await;
        for (table, rows) in want {
            let found = digest(&recovered, table, None).await;
            assert_eq!(
                &found, rows,
                "{table} of the {label} tenant {tenant} differs from the source"
            );
        }
    }

    // The bounds. With the index, the idle tenant's restore reads the large windows' index
    // objects (every whole window of WINDOW packs), after the last of them at most 15 small
    // windows' (of WINDOW / 16 packs each), and footers only for the packs no index covers yet
    // (fewer than WINDOW / 16), besides what every restore reads (FIXED, and more pages of the
    // listings of `changes/` past 1,000 keys: packs, index objects and a few others). Without
    // the index it read one footer per pack: `packs` requests instead.
    let (large, small) = (packs / WINDOW, WINDOW / 16);
    let windows = large + 15;
    let index_objects = large + packs / small;
    let extra_pages = (packs + index_objects + 100).div_ceil(1000) - 1;
    let idle_bound =
        FIXED + LISTINGS * extra_pages + windows * PER_WINDOW + (small - 1) * PER_FOOTER;
    // The busy tenant adds its block of every window read and its own sections: one per pack
    // it is in (every pack: each transaction is its own and small, so each pack seals one
    // section of it).
    let busy_bound = idle_bound + windows * PER_BLOCK + PER_SECTION * packs;
    let (idle_requests, busy_requests) = (counts["idle"].0, counts["busy"].0);
    eprintln!(
        "stream_index: {packs} packs ({large} windows of {WINDOW}): idle restore {idle_requests} \
         requests (bound {idle_bound}), busy restore {busy_requests} requests (bound {busy_bound})"
    );
    assert!(
        idle_requests <= idle_bound,
        "restoring a tenant no pack mentions made {idle_requests} requests for {packs} packs; \
         the stream index bounds it to {idle_bound}"
    );
    assert!(
        busy_requests <= busy_bound,
        "restoring the busy tenant made {busy_requests} requests for {packs} packs; its sections \
         and the index bound it to {busy_bound}"
    );
}

/// `env`'s command, talking to SeaweedFS directly instead of through the proxy.
async fn direct(env: &TestEnv, args: &[&str]) -> String {
    let endpoint = seaweed::s3().await.endpoint().to_string();
    let out = env
        .command(args)
        .env("UPDOG_BACKUP__STORAGE__S3_ENDPOINT", endpoint)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "updog-backup {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `list --json`'s stream: packs stored, covered-until.
async fn stream_line(env: &TestEnv) -> serde_json::Value {
    let list: serde_json::Value = serde_json::from_str(&direct(env, &["list", "--json"]).await)
        .expect("list --json prints JSON");
    list["stream"].clone()
}

async fn stream_packs(env: &TestEnv) -> u64 {
    stream_line(env).await["packs"].as_u64().unwrap_or(0)
}

/// As `daemon::wait_covered`, without going through the proxy.
async fn wait_covered_directly(env: &TestEnv, t: DateTime<Utc>, daemon: &mut Daemon) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        daemon.assert_running();
        let stream = stream_line(env).await;
        let covered: Option<DateTime<Utc>> = stream["covered_until"]
            .as_str()
            .and_then(|c| c.parse().ok());
        if covered.is_some_and(|c| c >= t) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "covered-until never reached {t}: {stream}\n{}",
            daemon.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
