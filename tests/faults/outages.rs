//! The object store gone and then slow, PostgreSQL restarted under the daemon, and the
//! spool's disk full: the daemon reports it, acknowledges nothing it has not stored, and
//! catches up.

use std::time::{Duration, Instant};

use crate::support::daemon::{Daemon, capture_env, wait_covered};
use crate::support::oracle::{Workload, assert_restores_at_thirds};
use crate::support::postgres::cluster;
use crate::support::proxy::{Mode, Proxy};
use crate::support::{Repo, TestEnv, fixture_tenant, http_get, parse_metrics, try_http_get};
use crate::{serial, setting};

fn status(daemon: &Daemon) -> Option<serde_json::Value> {
    let (code, body) = try_http_get(daemon.addr, "/status", None)?;
    (code == 200).then(|| serde_json::from_str(&body).unwrap())
}

async fn source_with_load(name: &str) -> (String, [String; 2]) {
    let pg = cluster().await;
    let db = pg.capture_fixture_db(name, 4, "0.2").await;
    (db, [fixture_tenant(1).await, fixture_tenant(3).await])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_then_slow_responses() {
    let _serial = serial().await;
    let outage = Duration::from_secs(setting("UPDOG_FAULTS_OUTAGE_SECONDS", 30));
    let (db, tenants) = source_with_load("outage").await;
    let mut env = TestEnv::new(&db, Repo::S3).await;
    capture_env(&mut env);
    let proxy = Proxy::in_front_of_s3(&mut env).await;
    env.ok(&["init"]);
    let mut daemon = Daemon::start(&env);
    let workload = Workload::start(&db, &tenants);
    std::thread::sleep(Duration::from_secs(3));

    // The store goes away: nothing more becomes durable, and /status and /metrics say so.
    proxy.set(Mode::Down);
    let down = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let durable_at_outage = status(&daemon).unwrap()["stream"]["durable_lsn"].clone();
    let mut reported = false;
    while down.elapsed() < outage {
        daemon.assert_running();
        let s = status(&daemon).unwrap();
        assert_eq!(
            s["stream"]["durable_lsn"], durable_at_outage,
            "durable moved while the store was down: {s}"
        );
        reported |= s["storage"]["ok"] == false && s["storage"]["last_error"].is_object();
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(reported, "/status never reported the store down");
    let m = parse_metrics(&http_get(daemon.addr, "/metrics", None).1);
    let errors: f64 = ["put", "get", "head", "list", "delete"]
        .iter()
        .map(|op| m[&format!("updog_backup_storage_errors_total{{operation=\"{op}\"}}")])
        .sum();
    assert!(errors > 0.0, "no storage error counted");

    // Back, but slow: every response 200 ms late. Then normal again.
    proxy.set(Mode::Slow(Duration::from_millis(200)));
    std::thread::sleep(Duration::from_secs(10));
    proxy.set(Mode::Pass);
    let instants = workload.stop().await;
    let last = instants.last().unwrap().0;
    wait_covered(&env, last, &mut daemon);
    let s = status(&daemon).unwrap();
    assert_eq!(s["storage"]["ok"], true, "{s}");
    assert!(daemon.terminate().success());
    assert_restores_at_thirds(&env, &instants, "outage").await;
    eprintln!(
        "faults/outage: store down {:.0} s then 200 ms slow for 10 s; {errors} failed requests counted; \
         {} instants, restores equal the oracle",
        outage.as_secs_f64(),
        instants.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarts_fast_and_immediate() {
    let _serial = serial().await;
    let pg = cluster().await;
    let (db, tenants) = source_with_load("restarts").await;
    let mut env = TestEnv::new(&db, Repo::Directory).await;
    capture_env(&mut env);
    env.ok(&["init"]);
    let mut daemon = Daemon::start(&env);
    let mut instants = Vec::new();
    for mode in ["fast", "immediate", "fast"] {
        let workload = Workload::start(&db, &tenants);
        std::thread::sleep(Duration::from_secs(3));
        let mut phase = workload.stop().await;
        instants.append(&mut phase);
        // Restart while the daemon is mid-stream (the load just stopped; packs are open).
        pg.restart(mode);
        daemon.assert_running();
    }
    let last = instants.last().unwrap().0;
    wait_covered(&env, last, &mut daemon);
    assert!(daemon.terminate().success());
    assert_restores_at_thirds(&env, &instants, "restart").await;
    eprintln!(
        "faults/restarts: PostgreSQL restarted fast, immediate, fast under the daemon; {} instants, restores equal the oracle",
        instants.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_disk_full_then_freed() {
    let _serial = serial().await;
    let spool = tempfile::Builder::new()
        .prefix("updog-spool-")
        .tempdir()
        .unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(spool.path())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        mounted,
        "this test mounts a small tmpfs for the spool: run the fault suite as root (CI does)"
    );
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(spool.path());

    let (db, tenants) = source_with_load("spool").await;
    let mut env = TestEnv::new(&db, Repo::Directory).await;
    capture_env(&mut env);
    env.env.push((
        "UPDOG_BACKUP__STREAM__SPOOL_DIR".into(),
        spool.path().display().to_string(),
    ));
    env.ok(&["init"]);
    let mut daemon = Daemon::start(&env);
    // Streamed while it runs, and some 6 MB even compressed: more than the spool's 1 MiB.
    let huge = format!(
        "INSERT INTO audit.events (organization_id, action, entity, entity_id)
         SELECT '{}', 'huge', md5(random()::text), md5(random()::text) || md5(random()::text)
           FROM generate_series(1, 100000)",
        tenants[0]
    );
    cluster()
        .await
        .client(&db)
        .await
        .batch_execute(&huge)
        .await
        .unwrap();
    // Committed before the load starts, so that no recorded instant straddles it.
    let workload = Workload::start(&db, &tenants);
    let deadline = Instant::now() + Duration::from_secs(60);
    let error = loop {
        daemon.assert_running();
        if let Some(s) = status(&daemon)
            && let Some(message) = s["last_error"]["message"].as_str()
            && message.contains("spool")
        {
            break message.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "the full spool was never reported\n{}",
            daemon.output()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    std::thread::sleep(Duration::from_secs(3));
    let grown = std::process::Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(spool.path())
        .status()
        .unwrap();
    assert!(grown.success());
    std::thread::sleep(Duration::from_secs(3));
    let instants = workload.stop().await;
    let last = instants.last().unwrap().0;
    wait_covered(&env, last, &mut daemon);
    assert!(daemon.terminate().success());
    assert_restores_at_thirds(&env, &instants, "spool").await;
    eprintln!(
        "faults/spool: spool disk full reported ({error}); after it was freed the daemon caught up; {} instants, restores equal the oracle",
        instants.len()
    );
}
