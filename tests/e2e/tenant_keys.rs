//! Per-tenant keys (format 3): `forget` erases one tenant from every backup at once while
//! every other tenant restores exactly; `rotate` re-wraps the keys, survives a SIGKILL and a
//! rerun; the daemon's host never holds a tenant's secret; a format-2 repository keeps
//! working, and refuses what needs per-tenant keys.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use age::secrecy::ExposeSecret;
use chrono::SecondsFormat;
use updog_backup::codec::{CodecError, Identities};
use updog_backup::config::{Config, StorageLocation};
use updog_backup::repository::Repository;
use updog_backup::repository::archive::ArchiveReader;
use updog_backup::repository::tenant_keys::{KeyRecord, Keyring};
use updog_backup::storage::{LocalStore, ObjectStore, S3Settings, S3Store};

use crate::support::daemon::{Daemon, capture_env, wait_covered};
use crate::support::oracle::{
    Workload, assert_restore_equals, assert_restores_at_thirds, now, random_change, state,
};
use crate::support::postgres::cluster;
use crate::support::proxy::{Mode, Proxy};
use crate::support::{Repo, TestEnv, files_under, fixture_tenant, restore_latest, seaweed};

/// The repository of `env`, opened in this process: the test's own reader, with only what
/// an operator holding the repository identity has.
async fn open_store(env: &TestEnv) -> Arc<dyn ObjectStore> {
    let config = Config::load(Some(&env.config_path)).unwrap();
    match config.storage_location().unwrap() {
        StorageLocation::Directory(path) => Arc::new(LocalStore::new(path)),
        StorageLocation::S3 { bucket, prefix } => {
            let s3 = seaweed::s3().await;
            Arc::new(
                S3Store::with_static_credentials(
                    S3Settings {
                        bucket,
                        prefix,
                        endpoint: Some(s3.endpoint().to_string()),
                        region: "us-east-1".into(),
                        force_path_style: true,
                    },
                    s3.access_key_id(),
                    s3.secret_access_key(),
                )
                .unwrap(),
            )
        }
    }
}

fn identities(path: &Path) -> Arc<Identities> {
    Arc::new(Identities::load(Some(path), false).unwrap())
}

fn open_all(stored: &[u8], ids: &Identities) -> Result<Vec<u8>, CodecError> {
    let mut plain = Vec::new();
    updog_backup::codec::open(stored, ids)?
        .read_to_end(&mut plain)
        .map_err(updog_backup::codec::classify_read_error)?;
    Ok(plain)
}

/// Whether `needle` occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every sealed object and every pack section, tried with the repository identity and every
/// key it unwraps. Nothing of `tenant` may open, and what opens may not hold its id (as text
/// or as the 16 bytes of a binary COPY). Returns (opened, refused).
async fn walk(store: &Arc<dyn ObjectStore>, identity: &Path, tenant: &str) -> (usize, usize) {
    let repo = Repository::new(store.clone());
    let all = Keyring::load(&repo, identities(identity), None)
        .await
        .unwrap()
        .identities();
    let id_bytes = *uuid::Uuid::parse_str(tenant).unwrap().as_bytes();
    let leaks = |plain: &[u8]| contains(plain, tenant.as_bytes()) || contains(plain, &id_bytes);
    let (mut opened, mut refused) = (0, 0);
    for object in store.list("").await.unwrap() {
        let key = object.key;
        if key.starts_with("keys/") {
            assert!(
                !key.contains(tenant),
                "a key of the forgotten tenant is left: {key}"
            );
        }
        if !key.ends_with(".zst.age") {
            continue;
        }
        let mine = key.ends_with(&format!("tenants/{tenant}.zst.age"));
        let stored = store.get_bytes(&key, None).await.unwrap();
        match open_all(&stored, &all) {
            Ok(plain) => {
                assert!(!mine, "{key} of the forgotten tenant still opens");
                assert!(!leaks(&plain), "{key} holds the forgotten tenant's id");
                if key.contains("/tenants/") {
                    let archive = ArchiveReader::open(&plain[..]).unwrap();
                    assert_ne!(archive.header().tenant.as_deref(), Some(tenant));
                }
                opened += 1;
            }
            Err(CodecError::WrongIdentity) if mine => refused += 1,
            Err(e) => panic!("{key}: {e}"),
        }
    }
    for pack in repo.stream_state().await.unwrap().packs {
        let footer = repo.pack_footer(&pack).await.unwrap();
        for (n, section) in footer.sections.iter().enumerate() {
            let mine = section.tenant.as_deref() == Some(tenant);
            let range = section.offset..section.offset + section.length;
            let stored = store.get_bytes(&pack.key, Some(range)).await.unwrap();
            match open_all(&stored, &all) {
                Ok(plain) => {
                    assert!(
                        !mine,
                        "{} section {n} of the forgotten tenant opens",
                        pack.key
                    );
                    assert!(
                        !leaks(&plain),
                        "{} section {n} holds the forgotten tenant's id",
                        pack.key
                    );
                    opened += 1;
                }
                Err(CodecError::WrongIdentity) if mine => refused += 1,
                Err(e) => panic!("{} section {n}: {e}", pack.key),
            }
        }
    }
    (opened, refused)
}

async fn forget_erases_one_tenant_from_every_backup(kind: Repo, label: &str) {
    let pg = cluster().await;
    let db = pg.capture_fixture_db(label, 5, "0.1").await;
    let source = pg.client(&db).await;
    let mut env = TestEnv::new(&db, kind).await;
    capture_env(&mut env);
    env.ok(&["init"]);
    let mut tenants = Vec::new();
    for k in 1..=4 {
        tenants.push(fixture_tenant(k).await);
    }
    let x = tenants[1].clone();

    let mut daemon = Daemon::start(&env);
    let workload = Workload::start(&db, &tenants);
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.ok(&["backup"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let instants = workload.stop().await;
    wait_covered(&env, instants.last().unwrap().0, &mut daemon);

    let err = env.fails(&["forget", "--org", &x], 2);
    assert!(err.contains("--yes"), "{err}");
    let before_forget = now(&source).await;
    let out = env.ok(&["forget", "--org", &x, "--yes"]);
    assert!(out.contains(&format!("forgot tenant {x}")), "{out}");

    let err = env.fails(&restore_latest(&x, &format!("forgotten_{db}")), 1);
    assert!(err.contains("forgotten on"), "{err}");
    let err = env.fails(&["list", "--org", &x], 1);
    assert!(err.contains("forgotten on"), "{err}");
    let listed = env.ok(&["list", "--tenants"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(x.as_str()) && l.contains("forgotten on")),
        "{listed}"
    );

    let store = open_store(&env).await;
    let (opened, refused) = walk(&store, &env.identity_path, &x).await;
    eprintln!(
        "{label}: {opened} objects and sections open, {refused} of the forgotten tenant do not"
    );
    assert!(refused >= 3, "two archives and sections of {x}: {refused}");
    assert!(opened > refused);

    // Every other tenant, at every third of the workload.
    let others: Vec<_> = instants
        .iter()
        .map(|(t, states)| {
            let mut states = states.clone();
            states.remove(&x);
            (*t, states)
        })
        .collect();
    assert_restores_at_thirds(&env, &others, label).await;
    let out = env.ok(&["verify", "--deep"]);
    assert!(out.contains(&format!("forgotten: tenant {x}")), "{out}");

    // The same id again (the source still has the tenant's rows): a new key, restorable from
    // the first snapshot after the erasure; instants before it stay refused.
    random_change(&source, &x, 7).await;
    env.ok(&["backup"]);
    let t = now(&source).await;
    wait_covered(&env, t, &mut daemon);
    let expected = state(&source, &x).await;
    assert_restore_equals(&env, &x, t, &expected, &format!("{label}_again")).await;
    let at = before_forget.to_rfc3339_opts(SecondsFormat::Micros, true);
    let err = env.fails(
        &[
            "restore",
            "--org",
            &x,
            "--at",
            &at,
            "--target-db",
            &format!("before_{db}"),
        ],
        1,
    );
    assert!(err.contains("forgotten on"), "{err}");
    assert!(daemon.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_erases_one_tenant_from_every_backup_in_a_directory() {
    forget_erases_one_tenant_from_every_backup(Repo::Directory, "forget_dir").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_erases_one_tenant_from_every_backup_on_s3() {
    forget_erases_one_tenant_from_every_backup(Repo::S3, "forget_s3").await;
}

/// Which identity opens each key object: (the old one, the new one). Never neither.
async fn wrapped(store: &Arc<dyn ObjectStore>, old: &Path, new: &Path) -> (usize, usize) {
    let (old, new) = (identities(old), identities(new));
    let (mut by_old, mut by_new) = (0, 0);
    for object in store.list("keys/").await.unwrap() {
        let bytes = store.get_bytes(&object.key, None).await.unwrap();
        let record: KeyRecord = serde_json::from_slice(&bytes).unwrap();
        let secret = hex::decode(&record.secret).unwrap();
        let opens = |ids: &Identities| updog_backup::codec::unwrap_secret(&secret, ids).is_ok();
        match (opens(&old), opens(&new)) {
            (true, false) => by_old += 1,
            (false, true) => by_new += 1,
            other => panic!("{}: opened by (old, new) = {other:?}", object.key),
        }
    }
    (by_old, by_new)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_rewraps_every_key_and_a_rerun_after_a_sigkill_finishes() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("rotate", 40, "0.02").await;
    let source = pg.client(&db).await;
    let mut env = TestEnv::new(&db, Repo::S3).await;
    let proxy = Proxy::in_front_of_s3(&mut env).await;
    capture_env(&mut env);
    env.ok(&["init"]);
    // A daemon that keeps the old recipients throughout.
    let mut daemon = Daemon::start(&env);
    let tenant = fixture_tenant(3).await;
    let expected = state(&source, &tenant).await;
    let store = open_store(&env).await;

    let new_identity = env.dir.path().join("new-identity.txt");
    let out = std::process::Command::new(crate::support::bin())
        .args(["keygen", "--output"])
        .arg(&new_identity)
        .output()
        .unwrap();
    let new_recipient = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let old_recipient = env.recipient.clone();
    let rotate = [
        "rotate",
        "--add",
        &new_recipient,
        "--remove",
        &old_recipient,
    ];

    // One key at a time, each read and write 40 ms away: the kill lands in the middle.
    proxy.set(Mode::Latency(Duration::from_millis(40)));
    let mut child = env
        .command(&rotate)
        .env("UPDOG_BACKUP__STORAGE__CONCURRENCY", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    proxy.set(Mode::Pass);
    let (by_old, by_new) = wrapped(&store, &env.identity_path, &new_identity).await;
    eprintln!("after the SIGKILL: {by_old} keys on the old recipient, {by_new} on the new one");
    assert!(by_old > 0 && by_new > 0, "the kill landed mid-rotation");

    let out = env.ok(&rotate);
    assert!(out.contains("re-wrapped"), "{out}");
    let (by_old, by_new) = wrapped(&store, &env.identity_path, &new_identity).await;
    assert_eq!(
        (by_old, by_new),
        (0, 41),
        "every key (40 tenants and the global one)"
    );
    // Run again: nothing left to do, and the repository already has the new recipients.
    let out = env.ok(&rotate);
    assert!(out.contains("re-wrapped 0 key(s)"), "{out}");

    // The daemon still on the old recipients meets a new tenant: it stops rather than wrap
    // the tenant's key to a recipient the operator removed.
    source
        .batch_execute(
            "INSERT INTO app.organizations (id, name) VALUES ('0b1f9a4e-7c1d-4d4a-9f67-00000000beef', 'Late')",
        )
        .await
        .unwrap();
    let stopped = daemon.wait_exit(Duration::from_secs(60));
    assert!(!stopped.success());
    let log = daemon.output();
    assert!(log.contains("do not match the repository"), "{log}");

    // The old identity opens nothing any more; the new one restores.
    let err = env.fails(&restore_latest(&tenant, &format!("old_{db}")), 2);
    assert!(err.contains("wrong identity"), "{err}");
    let config = std::fs::read_to_string(&env.config_path)
        .unwrap()
        .replace(&old_recipient, &new_recipient)
        .replace(
            &env.identity_path.display().to_string(),
            &new_identity.display().to_string(),
        );
    std::fs::write(&env.config_path, config).unwrap();
    let target = format!("new_{db}");
    env.ok(&restore_latest(&tenant, &target));
    let recovered = pg.client(&target).await;
    for (table, want) in &expected {
        let found = crate::support::oracle::digest(&recovered, table, None).await;
        assert_eq!(&found, want, "{table}");
    }
}

/// The daemon seals to public keys: nothing it writes or keeps (its spool, its log) holds a
/// secret key, although it made the key of a tenant that appeared after the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_host_never_holds_a_tenants_secret() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("nosecret", 3, "0.1").await;
    let source = pg.client(&db).await;
    let mut env = TestEnv::new(&db, Repo::Directory).await;
    capture_env(&mut env);
    env.ok(&["init"]);
    // The daemon's own configuration: no identity at all, a spool directory to read after.
    let spool = env.dir.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let daemon_config = env.dir.path().join("daemon.toml");
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("identity_file"))
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        .replace(
            "[snapshot]",
            &format!(
                "[stream]\nspool_dir = \"{}\"\n\n[snapshot]",
                spool.display()
            ),
        );
    std::fs::write(&daemon_config, text).unwrap();
    let own_config = std::mem::replace(&mut env.config_path, daemon_config.clone());
    let mut daemon = Daemon::start(&env);
    env.config_path = own_config;
    // A tenant the daemon sees first: its key is made by the daemon.
    let newcomer = "0b1f9a4e-7c1d-4d4a-9f67-00000000feed";
    source
        .batch_execute(&format!(
            "INSERT INTO app.organizations (id, name) VALUES ('{newcomer}', 'Newcomer');
             INSERT INTO app.users (organization_id, email, role)
             SELECT '{newcomer}', 'u' || g || '@newcomer.test', 'analyst' FROM generate_series(1, 200) g"
        ))
        .await
        .unwrap();
    let t = now(&source).await;
    wait_covered(&env, t, &mut daemon);
    let expected = state(&source, newcomer).await;
    assert_restore_equals(&env, newcomer, t, &expected, "newcomer").await;

    // Its key as the repository identity unwraps it: in no file the daemon wrote or kept.
    let store = open_store(&env).await;
    let ids = identities(&env.identity_path);
    let mut secrets = Vec::new();
    for object in store
        .list(&format!("keys/tenants/{newcomer}/"))
        .await
        .unwrap()
    {
        let bytes = store.get_bytes(&object.key, None).await.unwrap();
        let record: KeyRecord = serde_json::from_slice(&bytes).unwrap();
        let key = updog_backup::codec::unwrap_secret(&hex::decode(&record.secret).unwrap(), &ids)
            .unwrap();
        secrets.push(key.to_string().expose_secret().to_string());
    }
    assert_eq!(secrets.len(), 1, "the daemon made the newcomer's key");
    let log = daemon.output();
    assert!(daemon.terminate().success());
    let mut files = files_under(&spool);
    files.push(daemon_config);
    let mut read = vec![log.into_bytes()];
    for f in &files {
        read.push(std::fs::read(f).unwrap_or_default());
    }
    for bytes in &read {
        assert!(
            !contains(bytes, b"AGE-SECRET-KEY-"),
            "a secret key on the daemon's host"
        );
        for s in &secrets {
            assert!(!contains(bytes, s.as_bytes()));
        }
    }
}

/// A format-2 repository (one key for everything): captured and restored as before; forget
/// and rotate refuse with what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_2_repository_keeps_working_and_refuses_forget() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("format2", 3, "0.1").await;
    let source = pg.client(&db).await;
    let mut env = TestEnv::new(&db, Repo::Directory).await;
    capture_env(&mut env);
    env.ok(&["init", "--format-version", "2"]);
    let repo_json = std::fs::read_to_string(env.repo_dir.join("repo.json")).unwrap();
    assert!(repo_json.contains("\"format_version\": 2"), "{repo_json}");
    let tenant = fixture_tenant(2).await;
    let mut daemon = Daemon::start(&env);
    random_change(&source, &tenant, 1).await;
    env.ok(&["backup"]);
    random_change(&source, &tenant, 2).await;
    let t = now(&source).await;
    wait_covered(&env, t, &mut daemon);
    let expected = state(&source, &tenant).await;
    assert_restore_equals(&env, &tenant, t, &expected, "format2").await;
    env.ok(&["verify", "--deep"]);
    assert!(
        !env.repo_dir.join("keys").exists(),
        "no per-tenant keys in format 2"
    );

    let err = env.fails(&["forget", "--org", &tenant, "--yes"], 2);
    assert!(err.contains("format 2") && err.contains("init"), "{err}");
    let err = env.fails(&["rotate", "--add", &env.recipient], 2);
    assert!(err.contains("format 2"), "{err}");
    assert!(daemon.terminate().success());
}
