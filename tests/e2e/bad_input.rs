//! Bad input gets a clear message, the exit code of README.md (2: usage/config, 1:
//! operational) and never leaves anything half-made or damaged.

use std::path::PathBuf;

use crate::support::postgres::cluster;
use crate::support::restore_latest;
use crate::support::{Repo, TestEnv, database_exists, files_under, fixture_tenant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_and_argument_errors() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("badargs", 3, "0.1").await;
    let env = TestEnv::new(&db, Repo::Directory).await;
    let good = std::fs::read_to_string(&env.config_path).unwrap();

    std::fs::write(&env.config_path, good.replace("[snapshot]", "[snapshot\n")).unwrap();
    assert!(env.fails(&["list"], 2).contains("not valid TOML"));
    std::fs::write(
        &env.config_path,
        good.replace("parallel = 2", "paralel = 2"),
    )
    .unwrap();
    assert!(env.fails(&["list"], 2).contains("paralel"));
    std::fs::write(&env.config_path, &good).unwrap();
    let mut cmd = env.command(&["list"]);
    let out = cmd
        .env("UPDOG_BACKUP__COMPRESSION__LEVEL", "99")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 to 19"));
    let out = std::process::Command::new(crate::support::bin())
        .arg("list")
        .env_remove("UPDOG_BACKUP_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config"));

    // Before init, and with bad tenants.
    assert!(env.fails(&["backup"], 2).contains("updog-backup init"));
    env.ok(&["init"]);
    assert!(
        env.fails(&["backup", "--org", "not-a-uuid"], 2)
            .contains("not a uuid")
    );
    let absent = "00000000-0000-4000-8000-000000000000";
    assert!(
        env.fails(&["backup", "--org", absent], 2)
            .contains("no rows in any tenant table")
    );
    // init took the first snapshot.
    assert!(
        env.fails(&["restore", "--org", absent, "--latest"], 2)
            .contains("is in none of the")
    );
    assert!(
        env.fails(&["restore", "--org", "1; DROP DATABASE x", "--latest"], 2)
            .contains("not")
    );
    assert!(
        env.fails(&["restore", "--org", absent, "--at", "yesterday"], 2)
            .contains("RFC 3339")
    );
    assert_eq!(
        env.run(&["restore", "--org", absent]).status.code(),
        Some(2),
        "--at or --latest is required"
    );
    let err = env.fails(
        &[
            "restore",
            "--org",
            absent,
            "--latest",
            "--target-url",
            "postgres://u:hunter2@127.0.0.1/postgres",
        ],
        2,
    );
    assert!(
        err.contains("PGPASSWORD") && !err.contains("hunter2"),
        "{err}"
    );
    assert!(
        env.fails(&restore_latest(&fixture_tenant(1).await, "bad-name"), 2)
            .contains("not a usable database name")
    );
    // No secret in the repository's plain-text files.
    for file in files_under(&env.repo_dir) {
        if file.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&file).unwrap();
            assert!(!text.contains("AGE-SECRET-KEY"), "{}", file.display());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_target_and_wrong_identity_leave_everything_untouched() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("existing", 3, "0.1").await;
    let env = TestEnv::new(&db, Repo::Directory).await;
    env.ok(&["init"]);
    env.ok(&["backup"]);
    let tenant = fixture_tenant(1).await;
    let existing = pg.fresh_db("precious").await;
    pg.client(&existing)
        .await
        .batch_execute("CREATE TABLE keep (v int); INSERT INTO keep VALUES (42)")
        .await
        .unwrap();
    let err = env.fails(&restore_latest(&tenant, &existing), 2);
    assert!(err.contains("already exists"), "{err}");
    let v: i32 = pg
        .client(&existing)
        .await
        .query_one("SELECT v FROM keep", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 42, "the existing database is untouched");

    // Another identity cannot decrypt: refused before anything is created.
    let other = env.dir.path().join("other.txt");
    std::process::Command::new(crate::support::bin())
        .args(["keygen", "--output"])
        .arg(&other)
        .output()
        .unwrap();
    let config = std::fs::read_to_string(&env.config_path).unwrap();
    std::fs::write(
        &env.config_path,
        config.replace(env.identity_path.to_str().unwrap(), other.to_str().unwrap()),
    )
    .unwrap();
    let err = env.fails(&restore_latest(&tenant, "wrong_identity"), 2);
    assert!(err.contains("wrong identity"), "{err}");
    assert!(!database_exists("wrong_identity").await);
    let missing = env.dir.path().join("missing.txt");
    std::fs::write(
        &env.config_path,
        config.replace(
            env.identity_path.to_str().unwrap(),
            missing.to_str().unwrap(),
        ),
    )
    .unwrap();
    // The message names the recipient the identity must match (operator.rs checks it whole).
    assert!(env.fails(&["verify", "--deep"], 2).contains(&env.recipient));
    // keygen never overwrites an identity.
    let out = std::process::Command::new(crate::support::bin())
        .args(["keygen", "--output"])
        .arg(&env.identity_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// A flipped byte, a cut tail, appended bytes or another tenant's object in place: every
/// restore refuses before creating the database, and `verify` names the object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_objects_are_refused_before_writing() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("tamper", 4, "0.1").await;
    let env = TestEnv::new(&db, Repo::Directory).await;
    env.ok(&["init"]); // takes the (only) snapshot
    let tenant = fixture_tenant(1).await;
    let other = fixture_tenant(2).await;
    let files = files_under(&env.repo_dir);
    let archive = files
        .iter()
        .find(|p| p.to_string_lossy().ends_with(&format!("{tenant}.zst.age")))
        .unwrap()
        .clone();
    let other_archive = files
        .iter()
        .find(|p| p.to_string_lossy().ends_with(&format!("{other}.zst.age")))
        .unwrap()
        .clone();
    let schema = files
        .iter()
        .find(|p| p.to_string_lossy().ends_with("schema.sql.zst.age"))
        .unwrap()
        .clone();
    let original = std::fs::read(&archive).unwrap();
    let original_schema = std::fs::read(&schema).unwrap();

    let mut flipped = original.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    let mut appended = original.clone();
    appended.extend_from_slice(b"\0\0\0\0");
    let damages: Vec<(&str, &PathBuf, Vec<u8>)> = vec![
        ("flipped", &archive, flipped),
        (
            "truncated",
            &archive,
            original[..original.len() - 100].to_vec(),
        ),
        ("appended", &archive, appended),
        ("swapped", &archive, std::fs::read(&other_archive).unwrap()),
        (
            "schema",
            &schema,
            original_schema[..original_schema.len() / 2].to_vec(),
        ),
    ];
    for (n, (what, path, bytes)) in damages.into_iter().enumerate() {
        let saved = std::fs::read(path).unwrap();
        std::fs::write(path, &bytes).unwrap();
        let target = format!("tampered_{n}_{db}");
        let err = env.fails(&restore_latest(&tenant, &target), 1);
        assert!(
            err.contains("zst.age"),
            "{what}: the message names the object\n{err}"
        );
        assert!(
            !database_exists(&target).await,
            "{what}: nothing was created"
        );
        let out = env.run(&["verify"]);
        assert_eq!(out.status.code(), Some(1), "{what}: verify fails");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("FAILED snapshots/"),
            "{what}"
        );
        std::fs::write(path, saved).unwrap();
    }
    // Undamaged again: everything verifies and restores.
    env.ok(&["verify", "--deep"]);
    let target = format!("intact_{db}");
    env.ok(&restore_latest(&tenant, &target));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_services_are_operational_errors() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("unreachable", 2, "0.1").await;
    let env = TestEnv::new(&db, Repo::Directory).await;
    let config = std::fs::read_to_string(&env.config_path).unwrap();
    let dead_port = crate::support::postgres::free_port();
    std::fs::write(
        &env.config_path,
        config.replace(&format!(":{}/", pg.port), &format!(":{dead_port}/")),
    )
    .unwrap();
    let err = env.fails(&["init"], 1);
    assert!(err.contains(&format!("127.0.0.1:{dead_port}")), "{err}");
    // An S3 endpoint where nothing listens.
    let s3 = config.replace(
        &format!("url = \"file://{}\"", env.repo_dir.display()),
        &format!("url = \"s3://nobucket/x\"\ns3_endpoint = \"http://127.0.0.1:{dead_port}\"\ns3_force_path_style = true"),
    );
    std::fs::write(&env.config_path, s3).unwrap();
    let mut cmd = env.command(&["list"]);
    let out = cmd
        .env("AWS_ACCESS_KEY_ID", "x")
        .env("AWS_SECRET_ACCESS_KEY", "y")
        .env("AWS_MAX_ATTEMPTS", "2")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("127.0.0.1:{dead_port}")),
        "names the endpoint: {stderr}"
    );

    // A live S3 server without that bucket, and wrong credentials: named, exit 1, no secret.
    let s3 = crate::support::seaweed::s3().await;
    let missing_bucket = config.replace(
        &format!("url = \"file://{}\"", env.repo_dir.display()),
        &format!(
            "url = \"s3://no-such-bucket/x\"\ns3_endpoint = \"{}\"\ns3_force_path_style = true",
            s3.endpoint()
        ),
    );
    std::fs::write(&env.config_path, missing_bucket).unwrap();
    let mut cmd = env.command(&["list"]);
    let out = cmd
        .env("AWS_ACCESS_KEY_ID", s3.access_key_id())
        .env("AWS_SECRET_ACCESS_KEY", s3.secret_access_key())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("NoSuchBucket") || stderr.contains("no-such-bucket"),
        "{stderr}"
    );
    let mut cmd = env.command(&["list"]);
    let out = cmd
        .env("AWS_ACCESS_KEY_ID", s3.access_key_id())
        .env("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        !stderr.contains("wrong-secret-value") && !stderr.contains(s3.secret_access_key()),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_tables_and_foreign_repositories_are_refused() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("unroutable", 2, "0.1").await;
    pg.client(&db)
        .await
        .batch_execute(
            "CREATE TABLE app.notes (body text); GRANT SELECT ON app.notes TO updog_backup;",
        )
        .await
        .unwrap();
    let env = TestEnv::new(&db, Repo::Directory).await;
    let err = env.fails(&["init"], 2);
    assert!(
        err.contains("app.notes") && err.contains("global_tables"),
        "{err}"
    );
    let out = env.run(&["check"]);
    assert_eq!(out.status.code(), Some(1));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("NO ROUTE"), "{report}");
    assert!(
        report.contains("app.investment_lots")
            && report.contains("(investment_id) → app.investments(id)"),
        "{report}"
    );
    pg.client(&db)
        .await
        .batch_execute("DROP TABLE app.notes")
        .await
        .unwrap();
    env.ok(&["init"]);

    // The same repository, pointed at another database.
    let other_db = pg.capture_fixture_db("other", 2, "0.1").await;
    let config = std::fs::read_to_string(&env.config_path).unwrap();
    std::fs::write(
        &env.config_path,
        config.replace(&format!("/{db}\""), &format!("/{other_db}\"")),
    )
    .unwrap();
    let err = env.fails(&["init"], 2);
    assert!(err.contains("belongs to database"), "{err}");
    assert!(env.fails(&["backup"], 2).contains("belongs to database"));
}

/// A snapshot that fails halfway never becomes visible and leaves no object behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_snapshot_leaves_nothing() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("halfway", 6, "0.1").await;
    let env = TestEnv::new(&db, Repo::Directory).await;
    env.ok(&["init"]);
    let snapshot_files = || -> Vec<PathBuf> {
        files_under(&env.repo_dir)
            .into_iter()
            .filter(|p| p.to_string_lossy().contains("/snapshots/"))
            .collect()
    };
    let after_init = snapshot_files();
    pg.client(&db)
        .await
        .batch_execute("REVOKE SELECT ON app.investment_lots FROM updog_backup")
        .await
        .unwrap();
    let err = env.fails(&["backup"], 1);
    assert!(err.contains("app.investment_lots"), "{err}");
    assert_eq!(snapshot_files(), after_init, "only init's snapshot remains");
    let list: serde_json::Value = serde_json::from_str(&env.ok(&["list", "--json"])).unwrap();
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 1);
    pg.client(&db)
        .await
        .batch_execute("GRANT SELECT ON app.investment_lots TO updog_backup")
        .await
        .unwrap();
    env.ok(&["backup"]);
}
