//! The daemon in production shape, end to end on real PostgreSQL and SeaweedFS: scheduled
//! snapshots while writes go on, /status and /metrics parsed and checked, SIGTERM draining,
//! retention, and a hot standby taking over from a SIGKILLed active instance.

use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};

use crate::capture::{
    Daemon, Workload, assert_restore_equals, assert_restores_at_thirds, capture_env, wait_covered,
};
use crate::support::postgres::cluster;
use crate::support::{Repo, TestEnv, fixture_tenant, http_get, parse_metrics, try_http_get};

/// Polls `f` every 200 ms until it returns a value (or panics after `limit`).
fn wait_for<T>(
    what: &str,
    limit: Duration,
    daemon: &mut Daemon,
    mut f: impl FnMut(&Daemon) -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        daemon.assert_running();
        if let Some(v) = f(daemon) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}\n{}",
            daemon.output()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn status(daemon: &Daemon, token: Option<&str>) -> serde_json::Value {
    let (code, body) = http_get(daemon.addr, "/status", token);
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn time_of(v: &serde_json::Value) -> DateTime<Utc> {
    v.as_str()
        .unwrap_or_else(|| panic!("not a time: {v}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_snapshots_metrics_drain_and_retention() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("daemon", 4, "0.2").await;
    let mut env = TestEnv::new(&db, Repo::Directory).await;
    capture_env(&mut env);
    let token = format!("{:032x}", fastrand::u128(..));
    let token_file = env.dir.path().join("http-token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    for (k, v) in [
        (
            "UPDOG_BACKUP__SERVER__TOKEN_FILE",
            token_file.display().to_string(),
        ),
        (
            "UPDOG_BACKUP__SCHEDULE__SNAPSHOT",
            "*/4 * * * * *".to_string(),
        ),
        ("UPDOG_BACKUP__SCHEDULE__KEEP_SNAPSHOTS", "2".to_string()),
    ] {
        env.env.push((k.into(), v));
    }
    env.ok(&["init"]);
    let tenants = [fixture_tenant(1).await, fixture_tenant(4).await];
    let token = Some(token.as_str());

    let mut daemon = Daemon::start(&env);
    let workload = Workload::start(&db, &tenants);
    // Snapshots fire while the writes and the capture go on.
    let ids = std::cell::RefCell::new(std::collections::BTreeSet::new());
    wait_for(
        "three scheduled snapshots",
        Duration::from_secs(120),
        &mut daemon,
        |d| {
            let (code, body) = try_http_get(d.addr, "/status", token)?;
            (code == 200).then_some(())?;
            let s: serde_json::Value = serde_json::from_str(&body).unwrap();
            if let Some(id) = s["last_snapshot"]["id"].as_str() {
                ids.borrow_mut().insert(id.to_string());
            }
            (ids.borrow().len() >= 4).then_some(()) // init's, then three scheduled
        },
    );
    let instants = workload.stop().await;
    let last = instants.last().unwrap().0;
    wait_covered(&env, last, &mut daemon);

    // /status: what it says is checked against the repository and the workload.
    let s = status(&daemon, token);
    assert_eq!(s["role"], "active", "{s}");
    assert_eq!(s["capturing"], true, "{s}");
    assert!(time_of(&s["stream"]["covered_until"]) >= last, "{s}");
    assert!(s["stream"]["durable_lsn"].is_string(), "{s}");
    assert!(
        s["stream"]["last_pack"]["bytes"].as_u64().unwrap() > 0,
        "{s}"
    );
    assert!(s["last_snapshot"]["rows"].as_u64().unwrap() > 0, "{s}");
    assert!(
        s["last_snapshot"]["duration_seconds"].as_f64().unwrap() > 0.0,
        "{s}"
    );
    assert!(s["next_snapshot"].is_string(), "{s}");
    assert_eq!(s["storage"]["ok"], true, "{s}");
    let body = s.to_string();
    for tenant in &tenants {
        assert!(
            !body.contains(tenant.as_str()),
            "/status names a tenant: {body}"
        );
    }

    // /metrics: parsed, values checked.
    let (code, text) = http_get(daemon.addr, "/metrics", token);
    assert_eq!(code, 200, "{text}");
    let m = parse_metrics(&text);
    let get = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("no sample {k} in\n{text}"))
    };
    assert_eq!(get("updog_backup_active"), 1.0);
    let snapshots = get("updog_backup_snapshots_total{result=\"success\"}");
    assert!(snapshots >= 3.0, "{text}");
    assert_eq!(
        get("updog_backup_snapshot_duration_seconds_count"),
        snapshots
    );
    assert!(get("updog_backup_snapshot_exported_rows_total") > 0.0);
    assert!(get("updog_backup_snapshot_exported_bytes_total") > 0.0);
    let age =
        Utc::now().timestamp() as f64 - get("updog_backup_last_snapshot_success_timestamp_seconds");
    assert!(
        (0.0..60.0).contains(&age),
        "last snapshot {age} s ago\n{text}"
    );
    // 40 changes a round, a quarter of rounds with a 2,000-row insert: at least 40 a round.
    let changes: f64 = ["insert", "update", "delete"]
        .iter()
        .map(|op| {
            get(&format!(
                "updog_backup_changes_captured_total{{operation=\"{op}\"}}"
            ))
        })
        .sum();
    assert!(
        changes >= 40.0 * instants.len() as f64,
        "{changes} changes for {} rounds",
        instants.len()
    );
    assert!(get("updog_backup_changes_captured_total{operation=\"insert\"}") > 0.0);
    assert!(get("updog_backup_packs_stored_total") > 0.0);
    assert!(get("updog_backup_pack_stored_bytes_total") > 0.0);
    assert!(get("updog_backup_stream_lag_seconds") < 30.0, "{text}");
    assert!(get("updog_backup_slot_retained_wal_bytes") >= 0.0);
    assert!(get("updog_backup_storage_request_duration_seconds_count{operation=\"put\"}") > 0.0);
    assert_eq!(
        get("updog_backup_storage_errors_total{operation=\"put\"}"),
        0.0,
        "{s}\n{}",
        daemon.output()
    );
    assert!(
        get("updog_backup_retention_deleted_objects_total") > 0.0,
        "{text}"
    );
    for tenant in &tenants {
        assert!(!text.contains(tenant.as_str()), "/metrics names a tenant");
    }

    // The token: required everywhere but /healthz.
    assert_eq!(http_get(daemon.addr, "/healthz", None).0, 200);
    for path in ["/metrics", "/status", "/readyz"] {
        assert_eq!(http_get(daemon.addr, path, None).0, 401, "{path}");
        assert_eq!(
            http_get(daemon.addr, path, Some("wrong-token-wrong-token")).0,
            401,
            "{path}"
        );
    }
    let (code, ready) = http_get(daemon.addr, "/readyz", token);
    assert_eq!((code, ready.contains("\"active\"")), (200, true), "{ready}");

    // SIGTERM right after more commits: the daemon drains them before it exits.
    let source = pg.client(&db).await;
    for n in 0..30 {
        crate::capture::random_change(&source, &tenants[0], 90_000 + n).await;
    }
    let final_time = crate::capture::now(&source).await;
    let final_state = crate::capture::state(&source, &tenants[0]).await;
    let stopping = Instant::now();
    let exit = daemon.terminate();
    let stop_seconds = stopping.elapsed().as_secs_f64();
    assert!(exit.success(), "exit {exit}");
    assert!(stop_seconds < 12.0, "stopping took {stop_seconds} s");
    let list: serde_json::Value = serde_json::from_str(&env.ok(&["list", "--json"])).unwrap();
    assert!(
        time_of(&list["stream"]["covered_until"]) >= final_time,
        "{list}"
    );
    assert_restore_equals(&env, &tenants[0], final_time, &final_state, "drained").await;

    // Retention kept exactly two snapshots, and the packs their windows need.
    let snapshots = list["snapshots"].as_array().unwrap();
    assert_eq!(snapshots.len(), 2, "{list}");
    let oldest_kept = time_of(&snapshots[0]["consistent_time"]);
    let retained: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.repo_dir.join("changes/retained.json")).unwrap())
            .unwrap();
    let packs_from = retained["packs_from"].as_str().unwrap().to_string();
    for entry in std::fs::read_dir(env.repo_dir.join("changes")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if let Some((start, _)) = name.strip_suffix(".pack").and_then(|n| n.split_once('-')) {
            assert!(
                lsn_key_ge(start, &packs_from),
                "pack {name} before the kept chain ({packs_from})"
            );
        }
    }
    // A restore inside the kept window equals the oracle; one before it is refused.
    let inside = instants.iter().find(|(t, _)| *t > oldest_kept);
    if let Some((t, states)) = inside {
        assert_restore_equals(&env, &tenants[1], *t, &states[&tenants[1]], "kept").await;
    }
    let (before, _) = &instants[0];
    assert!(
        *before < oldest_kept,
        "the workload began before the oldest kept snapshot"
    );
    let at = before.to_rfc3339_opts(SecondsFormat::Micros, true);
    let refused = env.fails(&["restore", "--org", &tenants[1], "--at", &at], 2);
    assert!(
        refused.contains("window") || refused.contains("earliest"),
        "{refused}"
    );

    // prune --dry-run lists, deletes nothing.
    let dry = env.ok(&["prune", "--dry-run", "--keep", "1"]);
    assert!(dry.contains("would delete"), "{dry}");
    let list2: serde_json::Value = serde_json::from_str(&env.ok(&["list", "--json"])).unwrap();
    assert_eq!(list2["snapshots"].as_array().unwrap().len(), 2);
    // Every restore that ran is recorded.
    let records = std::fs::read_dir(env.repo_dir.join("restores"))
        .unwrap()
        .count();
    assert!(
        records > usize::from(inside.is_some()),
        "{records} restore records"
    );
    eprintln!(
        "{} scheduled snapshots seen, {} rounds of writes, stopped in {stop_seconds:.1} s",
        ids.borrow().len(),
        instants.len()
    );
}

/// `start` (a pack key's 16 hex digits) is at or after `lsn` ("X/Y").
fn lsn_key_ge(start: &str, lsn: &str) -> bool {
    let (hi, lo) = lsn.split_once('/').unwrap();
    let lsn = (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap();
    u64::from_str_radix(start, 16).unwrap() >= lsn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_after_sigkill_with_nothing_lost() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("standby", 4, "0.2").await;
    let mut env = TestEnv::new(&db, Repo::S3).await;
    capture_env(&mut env);
    env.ok(&["init"]);
    let tenants = [fixture_tenant(1).await, fixture_tenant(3).await];

    let mut first = Daemon::start(&env);
    wait_for(
        "the first instance active",
        Duration::from_secs(60),
        &mut first,
        |d| {
            let s = status_if_up(d)?;
            (s["role"] == "active" && s["capturing"] == true).then_some(())
        },
    );
    let mut second = Daemon::start(&env);
    wait_for(
        "the second instance standing by",
        Duration::from_secs(60),
        &mut second,
        |d| {
            let s = status_if_up(d)?;
            (s["role"] == "standby").then_some(s)
        },
    );
    let s = status(&second, None);
    assert!(
        s["active_instance"]
            .as_str()
            .unwrap()
            .ends_with(&format!(":{}", first.pid())),
        "{s}"
    );
    let (code, ready) = http_get(second.addr, "/readyz", None);
    assert_eq!(code, 200, "a healthy standby is ready: {ready}");
    assert!(ready.contains("\"standby\""), "{ready}");
    let m = parse_metrics(&http_get(second.addr, "/metrics", None).1);
    assert_eq!(m["updog_backup_active"], 0.0);

    let workload = Workload::start(&db, &tenants);
    tokio::time::sleep(Duration::from_secs(3)).await;
    first.kill();
    let killed = Instant::now();
    wait_for(
        "the standby taking over",
        Duration::from_secs(60),
        &mut second,
        |d| {
            let s = status_if_up(d)?;
            (s["role"] == "active" && s["capturing"] == true).then_some(())
        },
    );
    let takeover = killed.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let instants = workload.stop().await;
    let last = instants.last().unwrap().0;
    wait_covered(&env, last, &mut second);
    assert!(second.terminate().success());

    assert_restores_at_thirds(&env, &instants, "s").await;
    eprintln!(
        "standby active and capturing {takeover:.1} s after the active instance was SIGKILLed"
    );
}

fn status_if_up(daemon: &Daemon) -> Option<serde_json::Value> {
    let (code, body) = try_http_get(daemon.addr, "/status", None)?;
    assert_eq!(code, 200, "{body}");
    Some(serde_json::from_str(&body).unwrap())
}

/// No writes to the source database: heartbeats still move the slot forward, and /status and
/// /metrics report the slot's WAL against `max_slot_wal_keep_size`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_slot_advances_and_reports_its_health() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("idle", 2, "0.1").await;
    let admin = pg.client("postgres").await;
    // Large enough to change nothing for the other tests on this cluster.
    admin
        .simple_query("ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'")
        .await
        .unwrap();
    admin.simple_query("SELECT pg_reload_conf()").await.unwrap();
    let mut env = TestEnv::new(&db, Repo::Directory).await;
    capture_env(&mut env);
    env.env.push((
        "UPDOG_BACKUP__DAEMON__HEARTBEAT_INTERVAL".into(),
        "1s".into(),
    ));
    env.ok(&["init"]);
    let slot = env.env[0].1.clone();
    let mut daemon = Daemon::start(&env);
    wait_for("capturing", Duration::from_secs(60), &mut daemon, |d| {
        let s = status_if_up(d)?;
        (s["capturing"] == true).then_some(())
    });
    let source = pg.client(&db).await;
    let confirmed = async || -> u64 {
        let lsn: String = source
            .query_one(
                "SELECT (confirmed_flush_lsn - '0/0')::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get(0);
        lsn.parse().unwrap()
    };
    let wal_now: String = source
        .query_one("SELECT (pg_current_wal_lsn() - '0/0')::text", &[])
        .await
        .unwrap()
        .get(0);
    let wal_now: u64 = wal_now.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while confirmed().await <= wal_now {
        daemon.assert_running();
        assert!(
            Instant::now() < deadline,
            "the slot never moved past {wal_now}\n{}",
            daemon.output()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Slot health runs every 15 s: wait for a check after the setting.
    let s = wait_for("slot health", Duration::from_secs(60), &mut daemon, |d| {
        let s = status_if_up(d)?;
        s["slot"]["safe_wal_bytes"].as_i64().map(|_| s)
    });
    assert_eq!(s["slot"]["wal_status"], "reserved", "{s}");
    assert!(
        s["slot"]["retained_wal_bytes"].as_i64().unwrap() >= 0,
        "{s}"
    );
    let m = parse_metrics(&http_get(daemon.addr, "/metrics", None).1);
    assert_eq!(m["updog_backup_slot_wal_limit_bytes"], (10u64 << 30) as f64);
    assert!(m["updog_backup_slot_safe_wal_bytes"] > 0.0);
    let log = daemon.output();
    assert!(!log.contains("cannot write the slot heartbeat"), "{log}");
    assert!(daemon.terminate().success());
    admin
        .simple_query("ALTER SYSTEM RESET max_slot_wal_keep_size")
        .await
        .unwrap();
    admin.simple_query("SELECT pg_reload_conf()").await.unwrap();
}
