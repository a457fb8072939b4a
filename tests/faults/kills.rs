//! SIGKILLs aimed at each phase of the daemon's work, and a `backup` killed halfway.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::support::daemon::{Daemon, capture_env, wait_covered};
use crate::support::oracle::{Workload, assert_restore_equals};
use crate::support::postgres::cluster;
use crate::support::proxy::{Mode, Proxy};
use crate::support::{Repo, TestEnv, fixture_tenant};
use crate::{serial, setting};

/// Waits until the daemon's log, after its first `from` bytes, holds a line with `needle`.
fn wait_log(daemon: &mut Daemon, from: usize, needle: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        daemon.assert_running();
        if daemon
            .output()
            .get(from..)
            .is_some_and(|l| l.contains(needle))
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Whether, in the log after `from`, the last `started` line has no `finished` line after it.
fn in_progress(log: &str, from: usize, started: &str, finished: &str) -> bool {
    let tail = log.get(from..).unwrap_or_default();
    match (tail.rfind(started), tail.rfind(finished)) {
        (Some(s), Some(f)) => s > f,
        (Some(_), None) => true,
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkills_at_every_phase_lose_and_duplicate_nothing() {
    let _serial = serial().await;
    let kills = setting("UPDOG_FAULTS_KILLS", 20);
    let pg = cluster().await;
    let db = pg.capture_fixture_db("kills", 6, "0.2").await;
    let mut env = TestEnv::new(&db, Repo::S3).await;
    capture_env(&mut env);
    // Every store request crosses a proxy that makes it last: kills land inside uploads.
    let proxy = Proxy::in_front_of_s3(&mut env).await;
    proxy.set(Mode::Slow(Duration::from_millis(30)));
    for (k, v) in [
        ("UPDOG_BACKUP__SCHEDULE__SNAPSHOT", "*/5 * * * * *".into()),
        ("UPDOG_BACKUP__SCHEDULE__KEEP_SNAPSHOTS", "4".into()),
    ] {
        env.env.push((k.into(), v));
    }
    env.ok(&["init"]);
    let tenants = [
        fixture_tenant(1).await,
        fixture_tenant(4).await,
        fixture_tenant(6).await,
    ];
    let workload = Workload::start(&db, &tenants);
    let mut daemon = Daemon::start(&env);
    let mut aimed: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
    for k in 0..kills {
        let from = 0; // each daemon has a log of its own
        let phase = ["anywhere", "pack upload", "snapshot export", "retention"][k as usize % 4];
        let hit = match phase {
            "anywhere" => {
                std::thread::sleep(Duration::from_millis(fastrand::u64(200..1500)));
                true
            }
            "pack upload" => {
                // Responses 300 ms late: the daemon spends most of its time in uploads.
                proxy.set(Mode::Slow(Duration::from_millis(300)));
                wait_log(
                    &mut daemon,
                    from,
                    "capture started",
                    Duration::from_secs(30),
                );
                std::thread::sleep(Duration::from_millis(fastrand::u64(600..1800)));
                true
            }
            "snapshot export" => {
                wait_log(
                    &mut daemon,
                    from,
                    "snapshot started",
                    Duration::from_secs(30),
                );
                std::thread::sleep(Duration::from_millis(fastrand::u64(50..400)));
                in_progress(
                    &daemon.output(),
                    from,
                    "snapshot started",
                    "scheduled snapshot stored",
                )
            }
            _ => {
                wait_log(
                    &mut daemon,
                    from,
                    "scheduled snapshot stored",
                    Duration::from_secs(30),
                );
                in_progress(
                    &daemon.output(),
                    from,
                    "scheduled snapshot stored",
                    "retention applied",
                )
            }
        };
        daemon.assert_running();
        daemon.kill();
        proxy.set(Mode::Slow(Duration::from_millis(30)));
        let entry = aimed.entry(phase).or_default();
        entry.0 += 1;
        entry.1 += u32::from(hit);
        daemon = Daemon::start(&env);
    }

    // A `backup` killed halfway never becomes visible.
    let log = env.dir.path().join("backup.log");
    let mut backup = env
        .command(&["backup"])
        .env("UPDOG_BACKUP_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("snapshot started")
    {
        assert!(Instant::now() < deadline, "the backup never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    backup.kill().unwrap();
    backup.wait().unwrap();
    let killed_id = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .find(|l| l.contains("snapshot started"))
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|v| v["snapshot"].as_str().map(String::from))
        .expect("the killed backup's snapshot id");

    let instants = workload.stop().await;
    let last = instants.last().unwrap().0;
    proxy.set(Mode::Pass);
    wait_covered(&env, last, &mut daemon);
    assert!(daemon.terminate().success());

    let list: serde_json::Value = serde_json::from_str(&env.ok(&["list", "--json"])).unwrap();
    let ids: Vec<&str> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert!(
        !ids.contains(&killed_id.as_str()),
        "a killed snapshot is listed: {list}"
    );
    assert!(
        ids.len() <= 5,
        "retention kept {} snapshots: {list}",
        ids.len()
    );
    env.ok(&["verify"]);
    let next = env.ok(&["backup"]);
    assert!(next.contains("snapshot"), "{next}");

    // Every tenant at three instants inside the kept window.
    let oldest: DateTime<Utc> = list["snapshots"][0]["consistent_time"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let window: Vec<_> = instants.iter().filter(|(t, _)| *t > oldest).collect();
    assert!(
        window.len() >= 3,
        "{} instants in the kept window",
        window.len()
    );
    let mut restores = 0;
    for i in [window.len() / 3, 2 * window.len() / 3, window.len() - 1] {
        let (t, states) = window[i];
        for (tenant, state) in states {
            assert_restore_equals(&env, tenant, *t, state, &format!("kill{i}")).await;
            restores += 1;
        }
    }
    eprintln!(
        "faults/kills: {kills} SIGKILLs aimed (phase: aimed, confirmed in progress) {aimed:?}; \
         a backup killed halfway stayed invisible; {} instants, {restores} restores equal the oracle",
        instants.len()
    );
}
