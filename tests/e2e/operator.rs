//! An operator's first hour and worst night, with the real binary: every message names the
//! right next step (the recipients an identity must match, `list --tenants`, `--latest`, a zone
//! for `--at`, whether waiting for the daemon helps), a report stays readable (no info logs
//! by default, no debug formatting in the logs), and the demo can be continued by hand.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};

use crate::capture::{Daemon, capture_env, now, wait_covered};
use crate::support::postgres::cluster;
use crate::support::{
    Repo, TestEnv, bin, database_exists, drop_database, files_under, fixture_tenant, http_get,
    parse_metrics, repo_root, restore_latest,
};

fn stdout_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Log lines (JSON: stderr is not a terminal) hold typed values: no `Some(…)`, `None`,
/// `Lsn(…)` and no chrono `… UTC` times.
fn assert_typed_logs(log: &str) {
    for line in log.lines().filter(|l| l.starts_with('{')) {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for (key, field) in value.as_object().unwrap() {
            let Some(text) = field.as_str() else { continue };
            assert!(
                !text.starts_with("Some(")
                    && text != "None"
                    && !text.contains("Lsn(")
                    && !text.ends_with(" UTC"),
                "{key} = {text:?} in {line}"
            );
            if key.ends_with("_time") || key.ends_with("_at") || key.ends_with("_until") {
                assert!(
                    DateTime::parse_from_rfc3339(text).is_ok(),
                    "{key} is not RFC 3339: {line}"
                );
            }
        }
    }
}

/// "26 object(s) decrypted and parsed (1 manifest, 22 snapshot objects, …), 0 failed": the
/// kinds add up to the total.
fn assert_counts_add_up(report: &str) {
    let line = report
        .lines()
        .find(|l| l.contains("object(s)"))
        .unwrap_or_else(|| panic!("no summary: {report}"));
    let total: usize = line.split(' ').next().unwrap().parse().unwrap();
    let inner = &line[line.find(" (").unwrap() + 2..line.rfind(')').unwrap()];
    let sum: usize = inner
        .split(", ")
        .map(|part| part.split(' ').next().unwrap().parse::<usize>().unwrap())
        .sum();
    assert_eq!(sum, total, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_messages_lead_to_the_next_step() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("operator", 3, "0.1").await;
    let env = TestEnv::new(&db, Repo::Directory).await;
    let tenant = fixture_tenant(1).await;

    // Issue 15.5: the instant is --at or --latest, and the message says both.
    let err = env.fails(&["restore", "--org", &tenant], 2);
    assert!(err.contains("--at") && err.contains("--latest"), "{err}");
    // 15.10: what is missing from a time.
    let err = env.fails(
        &["restore", "--org", &tenant, "--at", "2026-12-04T04:06:07"],
        2,
    );
    assert!(
        err.contains("no time zone") && err.contains("2026-12-04T04:06:07Z"),
        "{err}"
    );
    let err = env.fails(&["restore", "--org", &tenant, "--at", "yesterday"], 2);
    assert!(
        err.contains("-1h") && !err.contains("premature end"),
        "{err}"
    );

    // Before init: a new set-up needs init, but an existing one a configuration that points
    // at its backups (the demo's first friction: the wrong file answered "run init").
    let err = env.fails(&["list"], 2);
    assert!(
        err.contains("updog-backup init") && err.contains("storage.url"),
        "{err}"
    );

    env.ok(&["init"]);
    // 15.12: a one-shot command's report is not interleaved with info logs by default.
    let out = env
        .command(&["backup"])
        .env_remove("UPDOG_BACKUP_LOG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        stdout_of(&out).starts_with("snapshot "),
        "{}",
        stdout_of(&out)
    );
    assert_eq!(stderr_of(&out).trim(), "", "no logs below warn by default");

    // A reader that stops reading (`| head`) ends the command quietly, as SIGPIPE would.
    let mut child = env
        .command(&["list", "--tenants"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(141), "{}", stderr_of(&out));
    assert!(!stderr_of(&out).contains("panicked"), "{}", stderr_of(&out));

    // 15.11: the tenant column only with a tenant.
    let list = env.ok(&["list"]);
    assert!(!list.contains("TENANT ROWS"), "{list}");
    assert!(env.ok(&["list", "--org", &tenant]).contains("TENANT ROWS"));

    // 15.3: list --tenants, text and JSON.
    let text = env.ok(&["list", "--tenants"]);
    for k in 1..=3 {
        assert!(text.contains(&fixture_tenant(k).await), "{text}");
    }
    assert!(text.contains("3 tenant(s) in 2 snapshot(s)"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["list", "--tenants", "--json"])).unwrap();
    let tenants = json["tenants"].as_array().unwrap();
    assert_eq!(tenants.len(), 3, "{json}");
    let listed = tenants
        .iter()
        .find(|t| t["tenant"] == tenant.as_str())
        .unwrap();
    let snapshots: serde_json::Value = serde_json::from_str(&env.ok(&["list", "--json"])).unwrap();
    let newest = snapshots["snapshots"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(listed["snapshot"], newest["id"], "{listed}");
    assert!(listed["rows"].as_u64().unwrap() > 0 && listed["bytes"].as_u64().unwrap() > 0);
    let earliest: DateTime<Utc> = listed["window"]["earliest"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let latest: DateTime<Utc> = listed["window"]["covered_until"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(earliest <= latest, "{listed}");
    env.fails(&["list", "--tenants", "--org", &tenant], 2);
    // Every "check the value" names the command that shows tenants.
    let absent = "00000000-0000-4000-8000-000000000000";
    for args in [
        vec!["restore", "--org", absent, "--latest"],
        vec!["list", "--org", absent],
        vec!["backup", "--org", absent],
        vec!["restore", "--org", "Org 1", "--latest"],
        vec!["verify", "--org", "Org 1"],
    ] {
        let err = env.fails(&args, 2);
        assert!(
            err.contains("list --tenants") && !err.contains("\": has"),
            "{args:?}: {err}"
        );
    }

    // keygen into a directory that does not exist says that, not "never overwrites".
    let out = Command::new(bin())
        .args(["keygen", "--output"])
        .arg(env.dir.path().join("no/such/dir/identity.txt"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr_of(&out).contains("No such file") && !stderr_of(&out).contains("never overwrites"),
        "{}",
        stderr_of(&out)
    );

    // 15.1: a missing identity names the repository's recipients, and never advises a new key.
    let repo_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.repo_dir.join("repo.json")).unwrap()).unwrap();
    let fingerprint = repo_json["recipients"][0].as_str().unwrap().to_string();
    let config = std::fs::read_to_string(&env.config_path).unwrap();
    let identity = env.identity_path.to_str().unwrap();
    let missing = env.dir.path().join("missing.txt");
    std::fs::write(
        &env.config_path,
        config.replace(identity, missing.to_str().unwrap()),
    )
    .unwrap();
    let target = format!("never_{db}");
    for args in [
        restore_latest(&tenant, &target).to_vec(),
        vec!["verify", "--deep"],
    ] {
        let err = env.fails(&args, 2);
        assert!(
            err.contains(&env.recipient)
                && err.contains(&fingerprint)
                && err.contains("cannot decrypt")
                && !err.contains("keygen --output"),
            "{args:?}: {err}"
        );
    }
    assert!(!database_exists(&target).await);

    // 15.2: another identity is named once, up front, not as one failure per object.
    let other = env.dir.path().join("other.txt");
    let out = Command::new(bin())
        .args(["keygen", "--output"])
        .arg(&other)
        .output()
        .unwrap();
    let other_recipient = stdout_of(&out).trim().to_string();
    std::fs::write(
        &env.config_path,
        config.replace(identity, other.to_str().unwrap()),
    )
    .unwrap();
    let out = env.run(&["verify", "--deep"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(
        err.contains("wrong identity")
            && err.contains(&other_recipient)
            && err.contains(&env.recipient),
        "{err}"
    );
    assert!(!stdout_of(&out).contains("FAILED"), "{}", stdout_of(&out));
    std::fs::write(&env.config_path, &config).unwrap();
    // The summary's kinds add up to its total.
    assert_counts_add_up(&env.ok(&["verify", "--deep"]));
    assert_counts_add_up(&env.ok(&["verify"]));

    // 15.9: an identity others may read is refused (unless allowed); group-readable warns.
    set_mode(&env.identity_path, 0o644);
    let err = env.fails(&["verify", "--deep"], 2);
    assert!(err.contains("chmod 600"), "{err}");
    let out = env
        .command(&["verify", "--deep"])
        .env("UPDOG_BACKUP__ENCRYPTION__ALLOW_READABLE_IDENTITY", "true")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    set_mode(&env.identity_path, 0o640);
    let out = env.run(&["verify", "--deep"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("readable by other users"),
        "{}",
        stderr_of(&out)
    );
    set_mode(&env.identity_path, 0o600);

    // 15.7: the same restore twice with the default name: the second gets a free name.
    let restore =
        |args: &[&str]| -> serde_json::Value { serde_json::from_str(&env.ok(args)).unwrap() };
    let first = restore(&["restore", "--org", &tenant, "--latest", "--json"]);
    let first = first["database"].as_str().unwrap().to_string();
    let second = restore(&["restore", "--org", &tenant, "--latest", "--json"]);
    assert_eq!(second["database"].as_str().unwrap(), format!("{first}_2"));
    let report = env.ok(&["restore", "--org", &tenant, "--latest"]);
    assert!(report.contains(&format!("{first}_3")), "{report}");
    // 15.11: no doubled parenthesis in the report.
    assert!(
        !report.contains("))") && report.contains("; restorable window "),
        "{report}"
    );
    // Two at once race for the same free name: the one that loses the race is told so as a
    // taken name (exit 2), never with the catalog's unique violation.
    let racing: Vec<_> = (0..2)
        .map(|_| {
            env.command(&["restore", "--org", &tenant, "--latest", "--json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut raced = Vec::new();
    for child in racing {
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            raced.push(report["database"].as_str().unwrap().to_string());
        } else {
            let err = stderr_of(&out);
            assert_eq!(out.status.code(), Some(2), "{err}");
            assert!(
                err.contains("already exists") && !err.contains("duplicate key"),
                "{err}"
            );
        }
    }
    assert!(!raced.is_empty());
    for name in &raced {
        drop_database(name).await;
    }
    // A taken --target-db is refused before anything is fetched: a damaged archive is not
    // even read.
    let archives: Vec<_> = files_under(&env.repo_dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(&format!("{tenant}.zst.age")))
        .collect();
    let saved: Vec<Vec<u8>> = archives.iter().map(|p| std::fs::read(p).unwrap()).collect();
    for (path, bytes) in archives.iter().zip(&saved) {
        let mut damaged = bytes.clone();
        let middle = damaged.len() / 2;
        damaged[middle] ^= 0x40;
        std::fs::write(path, damaged).unwrap();
    }
    let err = env.fails(&restore_latest(&tenant, &first), 2);
    assert!(
        err.contains("already exists") && err.contains("--target-db"),
        "{err}"
    );
    for (path, bytes) in archives.iter().zip(&saved) {
        std::fs::write(path, bytes).unwrap();
    }
    for name in [first.clone(), format!("{first}_2"), format!("{first}_3")] {
        drop_database(&name).await;
    }

    // 15.8: the restore's log lines are typed (RFC 3339 times).
    let target = format!("logged_{db}");
    let out = env
        .command(&restore_latest(&tenant, &target))
        .env("UPDOG_BACKUP_LOG", "info")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let log = stderr_of(&out);
    assert!(
        log.contains("restore complete") && log.contains("restore_point_time"),
        "{log}"
    );
    assert_typed_logs(&log);
    drop_database(&target).await;
}

/// Runs `cmd` and waits for it to exit within `limit` (killing it otherwise).
fn exits_within(cmd: &mut Command, limit: Duration) -> std::process::Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!(
                "still running after {limit:?}: {:?}",
                child.wait_with_output().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worst_night_messages_say_whether_waiting_helps() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("night", 3, "0.1").await;
    let mut env = TestEnv::new(&db, Repo::Directory).await;
    capture_env(&mut env);
    let tenant = fixture_tenant(1).await;
    env.ok(&["init"]);
    let mut daemon = Daemon::start(&env);
    let source = pg.client(&db).await;
    source
        .batch_execute(&format!(
            "UPDATE app.funds SET size_cents = size_cents + 1 WHERE organization_id = '{tenant}'"
        ))
        .await
        .unwrap();
    let t = now(&source).await;
    wait_covered(&env, t, &mut daemon);

    // 15.11: the unpublished-tables gauge has a sample from the start.
    let (_, metrics) = http_get(daemon.addr, "/metrics", None);
    assert_eq!(
        parse_metrics(&metrics).get("updog_backup_unpublished_tables"),
        Some(&0.0),
        "{metrics}"
    );
    // A second daemon on the same port: a configuration conflict, exit 2.
    let out = exits_within(
        env.command(&["daemon"])
            .env("UPDOG_BACKUP__SERVER__LISTEN", daemon.addr.to_string()),
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("server.listen"),
        "{}",
        stderr_of(&out)
    );

    // 15.6: just after covered-until, with the daemon running: wait a few seconds.
    let list = env.ok(&["list", "--org", &tenant]);
    assert!(
        list.contains("\nthe daemon (") && list.contains("last seen"),
        "{list}"
    );
    let json: serde_json::Value = serde_json::from_str(&env.ok(&["list", "--json"])).unwrap();
    assert_eq!(json["stream"]["capturing"], true, "{json}");
    let soon =
        (Utc::now() + chrono::TimeDelta::seconds(20)).to_rfc3339_opts(SecondsFormat::Micros, true);
    let err = env.fails(&["restore", "--org", &tenant, "--at", &soon], 1);
    assert!(
        err.contains("not stored yet")
            && err.contains("last seen")
            && err.contains("retry in a few seconds"),
        "{err}"
    );
    // Far off is still outside the window.
    let err = env.fails(
        &["restore", "--org", &tenant, "--at", "2030-01-01T00:00:00Z"],
        2,
    );
    assert!(err.contains("outside the restorable window"), "{err}");

    // 15.8: a replaying restore's log, typed.
    let target = format!("night_{db}");
    let at = t.to_rfc3339_opts(SecondsFormat::Micros, true);
    let out = env
        .command(&[
            "restore",
            "--org",
            &tenant,
            "--at",
            &at,
            "--target-db",
            &target,
        ])
        .env("UPDOG_BACKUP_LOG", "info")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let log = stderr_of(&out);
    assert!(
        log.contains("changes replayed") && log.contains("\"last_lsn\":\""),
        "{log}"
    );
    assert_typed_logs(&log);
    drop_database(&target).await;

    // The daemon's own log: typed, the address as an address.
    let (addr, log) = (daemon.addr, daemon.log.clone());
    assert!(daemon.terminate().success());
    let log = std::fs::read_to_string(log).unwrap();
    assert!(log.contains(&format!("\"listen\":\"{addr}\"")), "{log}");
    assert!(
        !log.contains("previous_renewed_at"),
        "a None is left out: {log}"
    );
    assert_typed_logs(&log);

    // Stopped: waiting does not help, and the message says what does.
    std::thread::sleep(Duration::from_secs(1));
    let err = env.fails(&["restore", "--org", &tenant, "--at", "now"], 1);
    assert!(
        err.contains("capture is not running") && err.contains("start `updog-backup daemon`"),
        "{err}"
    );
    let json: serde_json::Value = serde_json::from_str(&env.ok(&["list", "--json"])).unwrap();
    assert_eq!(json["stream"]["capturing"], false, "{json}");
    assert!(
        env.ok(&["list"])
            .contains("\ncapture is not running: no daemon holds the lease")
    );
}

/// `scripts/demo.sh config` leaves a config file without a secret and prints commands that
/// work as printed: here against a database named like the demo's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_can_be_continued_by_hand() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("demo_config", 2, "0.1").await;
    // The demo's source is `updog` (the fixture's connections may take a moment to go).
    let admin = pg.client("postgres").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = admin
        .batch_execute(&format!("ALTER DATABASE \"{db}\" RENAME TO updog"))
        .await
    {
        assert!(Instant::now() < deadline, "renaming {db}: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pg.client("updog")
        .await
        .batch_execute("CREATE PUBLICATION updog_backup FOR ALL TABLES")
        .await
        .unwrap();

    let demo = tempfile::tempdir().unwrap();
    let script = repo_root().join("scripts/demo.sh");
    let target_dir = Path::new(bin()).parent().unwrap().parent().unwrap();
    let demo_sh = |arg: &str| {
        Command::new("bash")
            .arg(&script)
            .arg(arg)
            .env("UPDOG_DEMO_DIR", demo.path())
            .env("UPDOG_DEMO_PORT", pg.port.to_string())
            .env("CARGO_TARGET_DIR", target_dir)
            .output()
            .unwrap()
    };
    let out = demo_sh("config");
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("run scripts/demo.sh first"));
    // `stop` waits until a daemon started by hand is gone (it stores its open pack first; a
    // daemon started again meanwhile would find its port taken), and says nothing of a
    // PostgreSQL that is not running.
    // Not a child of the test (a child would stay a zombie, alive to `kill -0`, until
    // waited for): started from a shell that exits, as an operator's shell would start it.
    let out = Command::new("bash")
        .args([
            "-c",
            "(trap 'sleep 1; exit 0' TERM; while :; do sleep 0.1; done) >/dev/null 2>&1 & echo $!",
        ])
        .output()
        .unwrap();
    let pid = stdout_of(&out).trim().to_string();
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(demo.path().join("daemon.pid"), &pid).unwrap();
    let out = demo_sh("stop");
    assert!(out.status.success(), "{}", stderr_of(&out));
    // Gone, or a zombie its new parent has not reaped yet.
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        state.is_empty() || state.split(' ').nth(2) == Some("Z"),
        "stop returned before the daemon exited: {state}"
    );
    assert_eq!(stdout_of(&out).trim(), "", "{}", stdout_of(&out));
    assert_eq!(stderr_of(&out).trim(), "", "{}", stderr_of(&out));

    // What the demo's run leaves: the identity and its recipient, the tenant it hit.
    let identity = demo.path().join("identity.txt");
    let out = Command::new(bin())
        .args(["keygen", "--output"])
        .arg(&identity)
        .output()
        .unwrap();
    std::fs::write(demo.path().join("recipient.txt"), &out.stdout).unwrap();
    // Tenant 2: the other tests of this file restore tenant 1 with default names.
    let tenant = fixture_tenant(2).await;
    std::fs::write(demo.path().join("tenant.txt"), format!("{tenant}\n")).unwrap();

    let out = demo_sh("config");
    assert!(out.status.success(), "{}", stderr_of(&out));
    let printed = stdout_of(&out);
    let config = demo.path().join("updog-backup.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(!text.contains("AGE-SECRET-KEY"), "{text}");
    assert!(text.contains(identity.to_str().unwrap()), "{text}");
    assert_eq!(
        std::fs::metadata(&identity).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let export = printed
        .lines()
        .find(|l| l.trim_start().starts_with("export UPDOG_BACKUP_CONFIG="))
        .unwrap_or_else(|| panic!("{printed}"));
    assert!(export.contains(config.to_str().unwrap()), "{export}");
    // The commands as printed (without their comments), after the demo's init.
    let command = |needle: &str| -> String {
        let line = printed
            .lines()
            .find(|l| l.trim_start().starts_with(needle))
            .unwrap_or_else(|| panic!("no `{needle}` in {printed}"));
        line.split("  #").next().unwrap().trim().to_string()
    };
    let slot = format!("updog_demo_{}", std::process::id());
    let script = [
        "set -e".to_string(),
        export.trim().to_string(),
        "updog-backup init".into(),
        command("updog-backup list --tenants"),
        command("updog-backup list --org"),
        command("updog-backup restore"),
    ]
    .join("\n");
    let out = Command::new("bash")
        .args(["-c", &script])
        .env_remove("UPDOG_BACKUP_CONFIG")
        .env_remove("PGSSLMODE")
        .env_remove("PGSSLROOTCERT")
        .env("UPDOG_BACKUP__SOURCE__SLOT", &slot)
        .env("UPDOG_BACKUP_LOG", "warn")
        .output()
        .unwrap();
    let stdout = stdout_of(&out);
    assert!(
        out.status.success(),
        "{script}\n{stdout}\n{}",
        stderr_of(&out)
    );
    assert!(
        stdout.contains(&tenant) && stdout.contains("restored tenant"),
        "{stdout}"
    );
    let restored = stdout
        .lines()
        .find_map(|l| l.split("into database ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .unwrap()
        .to_string();
    drop_database(&restored).await;
    pg.client("postgres")
        .await
        .batch_execute(&format!("SELECT pg_drop_replication_slot('{slot}')"))
        .await
        .unwrap();
}
