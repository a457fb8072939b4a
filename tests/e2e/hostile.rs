//! Hostile input: a repository whose every object type is damaged or swapped, identifiers and
//! tenant values that attack SQL building, and a daemon whose ground moves under it (a
//! repository of another database, other recipients, its replication slot dropped).
//!
//! What each test holds to (ARCHITECTURE.md invariants 3 and 4, exit codes 1 and 2): a damaged
//! object fails restore with exit 1 and a message naming it BEFORE any database is created, and
//! `verify` names it; names are quoted and values bound, never interpolated; what cannot heal
//! stops the daemon with a message saying what to do.
//!
//! One file of ~1,900 lines on purpose: the tests share one damaged-repository fixture and its
//! catalogue of damages, and RELIABILITY.md names them by these paths.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use crate::support::daemon::{Daemon, Watched, capture_env, wait_covered};
use crate::support::oracle::{digest, now, state};
use crate::support::postgres::cluster;
use crate::support::restore_latest;
use crate::support::{Repo, TestEnv, database_exists, drop_database, files_under, fixture_tenant};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// stdout and stderr of a run, together.
fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn flipped(bytes: &[u8], at: usize, mask: u8) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out[at] ^= mask;
    out
}

fn appended(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out.extend_from_slice(b"\x00appended\xff");
    out
}

/// A pack's footer (parsed by hand from FORMAT.md: trailer = footer length u32 LE, SHA-256 of
/// the footer, "UPDOGPK\x01") and where it starts.
fn pack_footer(pack: &[u8]) -> (serde_json::Value, usize) {
    let n = pack.len();
    assert_eq!(&pack[n - 8..], b"UPDOGPK\x01", "a pack ends with its magic");
    let len = u32::from_le_bytes(pack[n - 44..n - 40].try_into().unwrap()) as usize;
    let start = n - 44 - len;
    (serde_json::from_slice(&pack[start..n - 44]).unwrap(), start)
}

/// The byte range of the first section of `tenant` (`None`: the global section) in a pack.
fn section_range(footer: &serde_json::Value, tenant: Option<&str>) -> Option<(usize, usize)> {
    footer["sections"].as_array().unwrap().iter().find_map(|s| {
        (s["tenant"].as_str() == tenant).then(|| {
            let offset = s["offset"].as_u64().unwrap() as usize;
            (offset, offset + s["length"].as_u64().unwrap() as usize)
        })
    })
}

/// A pack key's end LSN as its 16 hex digits (sorts like the LSN).
fn pack_end_hex(path: &Path) -> String {
    let name = path.file_name().unwrap().to_str().unwrap();
    name.trim_end_matches(".pack")
        .split_once('-')
        .unwrap()
        .1
        .to_string()
}

/// The key of a repository file (relative to the repository directory).
fn key_of(repo: &Path, path: &Path) -> String {
    path.strip_prefix(repo)
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// `updog-backup daemon` as a child this file watches itself: unlike the support `Daemon`,
/// its exit is an expected outcome here, and it is waited for with a deadline.
struct Spawned {
    child: Child,
    log: PathBuf,
}

impl Spawned {
    fn start(env: &TestEnv) -> Spawned {
        let log = env
            .dir
            .path()
            .join(format!("hostile-daemon-{}.log", fastrand::u32(..)));
        let file = std::fs::File::create(&log).unwrap();
        let listen = format!("127.0.0.1:{}", crate::support::postgres::free_port());
        let child = env
            .command(&["daemon"])
            .env("UPDOG_BACKUP__SERVER__LISTEN", listen)
            .env("UPDOG_BACKUP_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Spawned { child, log }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status, if it exits within `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the daemon exited ({status}):\n{}", self.output());
        }
    }
}

impl Watched for Spawned {
    fn assert_running(&mut self) {
        Spawned::assert_running(self);
    }
    fn output(&self) -> String {
        Spawned::output(self)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Per table of the reference fixture, (rows, digest) — the oracle of `support::oracle`.
type TenantState = BTreeMap<String, (i64, String)>;

/// Tables of a recovery database that differ from `expected` (unfiltered on the recovery
/// side: another tenant's row shows as a difference).
async fn differences(database: &str, expected: &TenantState) -> Vec<String> {
    let recovered = cluster().await.client(database).await;
    let mut out = Vec::new();
    for (table, want) in expected {
        let found = digest(&recovered, table, None).await;
        if &found != want {
            out.push(format!("{table}: {} rows, expected {}", found.0, want.0));
        }
    }
    out
}

/// Sequences whose state differs between the source and a recovery database.
async fn sequence_differences(source_db: &str, database: &str) -> Vec<String> {
    let sql =
        "SELECT schemaname || '.' || sequencename || ' = ' || coalesce(last_value::text, 'null')
                 FROM pg_sequences ORDER BY 1";
    let pg = cluster().await;
    let rows = |client: Client| async move {
        client
            .query(sql, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<String>>()
    };
    let source = rows(pg.client(source_db).await).await;
    let recovered = rows(pg.client(database).await).await;
    recovered
        .into_iter()
        .filter(|r| !source.contains(r))
        .map(|r| format!("sequence {r}"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// A. Every stored object type, damaged or swapped
// ---------------------------------------------------------------------------------------------

/// One damage to the repository and what must happen.
struct Case {
    what: String,
    path: PathBuf,
    /// The damaged content.
    bytes: Vec<u8>,
    /// What the messages of restore and verify must contain (the object's key).
    names: String,
    /// The restore that must refuse: tenant (empty: none), and `--at` (else `--latest`).
    tenant: String,
    at: Option<String>,
    /// Whether `verify` without the identity can see it (digests), besides `verify --deep`.
    plain_verify: bool,
    /// A restore that must still work (a damage it never reads): tenant, `--at`.
    unaffected: Option<(String, Option<String>)>,
}

/// A repository with two snapshots and a change stream of two rounds of changes (one before
/// the second snapshot, one after), for tenants A and B; the daemon stopped.
struct Damaged {
    env: TestEnv,
    db: String,
    source: Client,
    repo: PathBuf,
    a: String,
    b: String,
    /// Snapshot ids, oldest first, and their directories.
    ids: Vec<String>,
    s1: PathBuf,
    s2: PathBuf,
    /// `--at` of round 1 (restored from the first snapshot plus the round-1 packs).
    t1: String,
    /// The tenants' states at round 1 and at the end (`--latest`).
    at_t1: BTreeMap<String, TenantState>,
    at_t2: BTreeMap<String, TenantState>,
    /// Packs with a section of A: of round 2 (read by `--latest`), of round 1 (by `--at t1`);
    /// of round 2 with a section of B; one with a routing region.
    p: PathBuf,
    q: PathBuf,
    p_b: PathBuf,
    with_routes: PathBuf,
}

impl Damaged {
    fn read(&self, p: &Path) -> Vec<u8> {
        std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn key(&self, p: &Path) -> String {
        key_of(&self.repo, p)
    }

    fn case(&self, what: &str, path: &Path, bytes: Vec<u8>, names: String) -> Case {
        Case {
            what: what.to_string(),
            path: path.to_path_buf(),
            bytes,
            names,
            tenant: self.a.clone(),
            at: None,
            plain_verify: true,
            unaffected: None,
        }
    }

    /// The second snapshot's manifest edited by `f`, its `digest` recomputed as a forger would
    /// (FORMAT.md): what must catch the edit is what the manifest cannot vouch for itself —
    /// the objects' digests and headers, and its id.
    fn manifest_edit(&self, f: &dyn Fn(&mut serde_json::Value)) -> Vec<u8> {
        let mut v: serde_json::Value =
            serde_json::from_slice(&self.read(&self.s2.join("manifest.json"))).unwrap();
        f(&mut v);
        let fields = v.as_object_mut().unwrap();
        fields.remove("digest");
        let digest = hex::encode(Sha256::digest(canonical_json(&v)));
        v["digest"] = digest.into();
        serde_json::to_vec_pretty(&v).unwrap()
    }
}

/// FORMAT.md's canonical JSON of a manifest: keys sorted, no whitespace.
fn canonical_json(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(fields) => {
            let mut keys: Vec<&String> = fields.keys().collect();
            keys.sort();
            let fields: Vec<String> = keys
                .into_iter()
                .map(|k| {
                    format!(
                        "{}:{}",
                        serde_json::Value::from(k.as_str()),
                        canonical_json(&fields[k])
                    )
                })
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        serde_json::Value::Array(items) => {
            let items: Vec<String> = items.iter().map(canonical_json).collect();
            format!("[{}]", items.join(","))
        }
        scalar => scalar.to_string(),
    }
}

async fn damaged_fixture(name: &str) -> Damaged {
    let pg = cluster().await;
    let db = pg.capture_fixture_db(name, 3, "0.1").await;
    let source = pg.client(&db).await;
    let mut env = TestEnv::new(&db, Repo::Directory).await;
    capture_env(&mut env);
    env.ok(&["init"]);
    let (a, b) = (fixture_tenant(1).await, fixture_tenant(2).await);

    let mut daemon = Daemon::start(&env);
    // Round 1 (between the two snapshots). Tenant A: rows without a key (audit.events), so a
    // replay applied twice would duplicate them silently; tenant B: a new fund (a routing key,
    // so the pack has a routing region) and its child.
    source
        .batch_execute(&format!(
            "INSERT INTO audit.events (organization_id, action, entity, entity_id)
               SELECT '{a}', 'round1', 'row', g::text FROM generate_series(1, 5) g;
             UPDATE app.funds SET size_cents = 11 WHERE organization_id = '{a}';"
        ))
        .await
        .unwrap();
    source
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO app.funds (id, organization_id, name) VALUES
               ('00000000-0000-4000-8000-00000000f001', '{b}', 'round 1 fund');
             INSERT INTO app.fundconfigs (fund_id, config) VALUES
               ('00000000-0000-4000-8000-00000000f001', '{{\"r\": 1}}');
             COMMIT;"
        ))
        .await
        .unwrap();
    let t1 = now(&source).await;
    let mut at_t1 = BTreeMap::new();
    for t in [&a, &b] {
        at_t1.insert(t.clone(), state(&source, t).await);
    }
    wait_covered(&env, t1, &mut daemon);
    env.ok(&["backup"]); // the second snapshot, while capture goes on
    // Round 2 (after the second snapshot).
    source
        .batch_execute(&format!(
            "UPDATE app.funds SET name = name || ' r2' WHERE organization_id = '{a}';
             INSERT INTO audit.events (organization_id, action, entity) VALUES ('{a}', 'round2', 'row');"
        ))
        .await
        .unwrap();
    source
        .batch_execute(&format!(
            "DELETE FROM app.fund_permissions WHERE organization_id = '{b}';
             UPDATE app.fundconfigs SET config = '{{\"r\": 2}}' WHERE fund_id = '00000000-0000-4000-8000-00000000f001';"
        ))
        .await
        .unwrap();
    let t2 = now(&source).await;
    let mut at_t2 = BTreeMap::new();
    for t in [&a, &b] {
        at_t2.insert(t.clone(), state(&source, t).await);
    }
    wait_covered(&env, t2, &mut daemon);
    assert!(daemon.terminate().success());

    // The repository as written.
    let repo = env.repo_dir.clone();
    let list: serde_json::Value = serde_json::from_str(&env.ok(&["list", "--json"])).unwrap();
    let ids: Vec<String> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2, "{list}");
    let (s1, s2) = (
        repo.join("snapshots").join(&ids[0]),
        repo.join("snapshots").join(&ids[1]),
    );
    let s2_lsn_hex = ids[1][17..].to_string();
    let packs: Vec<PathBuf> = files_under(&repo.join("changes"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .collect();
    let footer = |p: &PathBuf| pack_footer(&std::fs::read(p).unwrap()).0;
    let with_section =
        |p: &PathBuf, tenant: &str| section_range(&footer(p), Some(tenant)).is_some();
    let find = |what: &str, f: &dyn Fn(&PathBuf) -> bool| {
        packs
            .iter()
            .find(|p| f(p))
            .unwrap_or_else(|| panic!("no {what} in {packs:?}"))
            .clone()
    };
    let p = find("round-2 pack of A", &|p| {
        pack_end_hex(p) > s2_lsn_hex && with_section(p, &a)
    });
    let q = find("round-1 pack of A", &|p| {
        pack_end_hex(p) <= s2_lsn_hex && with_section(p, &a)
    });
    let p_b = find("round-2 pack of B", &|p| {
        pack_end_hex(p) > s2_lsn_hex && with_section(p, &b)
    });
    let with_routes = find("pack with a routing region", &|p| {
        footer(p).get("routes").is_some_and(|r| !r.is_null())
    });
    Damaged {
        env,
        db,
        source,
        repo,
        a,
        b,
        ids,
        s1,
        s2,
        t1: rfc3339(t1),
        at_t1,
        at_t2,
        p,
        q,
        p_b,
        with_routes,
    }
}

/// Damages every object type gets, that the product detects today.
fn object_cases(f: &Damaged) -> Vec<Case> {
    let mut cases = Vec::new();
    let tenant_file =
        |snapshot: &Path, tenant: &str| snapshot.join("tenants").join(format!("{tenant}.zst.age"));

    // global.zst.age of the second snapshot (bad_input damages only tenant archives, and cuts
    // the schema).
    let global = f.s2.join("global.zst.age");
    let g = f.read(&global);
    let global_key = f.key(&global);
    cases.push(f.case(
        "global: flipped bit",
        &global,
        flipped(&g, g.len() / 2, 0x40),
        global_key.clone(),
    ));
    cases.push(f.case(
        "global: cut tail",
        &global,
        g[..g.len() - 17].to_vec(),
        global_key.clone(),
    ));
    cases.push(f.case(
        "global: bytes appended",
        &global,
        appended(&g),
        global_key.clone(),
    ));
    cases.push(f.case(
        "global: the other snapshot's global in its place",
        &global,
        f.read(&f.s1.join("global.zst.age")),
        global_key.clone(),
    ));
    // schema.sql.zst.age
    let schema = f.s2.join("schema.sql.zst.age");
    let s = f.read(&schema);
    let schema_key = f.key(&schema);
    cases.push(f.case(
        "schema: flipped bit",
        &schema,
        flipped(&s, s.len() / 3, 0x01),
        schema_key.clone(),
    ));
    cases.push(f.case(
        "schema: bytes appended",
        &schema,
        appended(&s),
        schema_key.clone(),
    ));
    cases.push(f.case(
        "schema: the other snapshot's schema in its place",
        &schema,
        f.read(&f.s1.join("schema.sql.zst.age")),
        schema_key.clone(),
    ));
    // The tenant's archive replaced by the SAME tenant's archive of the OTHER snapshot.
    let archive = tenant_file(&f.s2, &f.a);
    cases.push(f.case(
        "tenant archive: the same tenant's archive of the other snapshot in its place",
        &archive,
        f.read(&tenant_file(&f.s1, &f.a)),
        f.key(&archive),
    ));

    // manifest.json of the second snapshot.
    let manifest = f.s2.join("manifest.json");
    let m = f.read(&manifest);
    let s2_prefix = format!("snapshots/{}/", f.ids[1]);
    cases.push(f.case(
        "manifest: JSON cut in half",
        &manifest,
        m[..m.len() / 2].to_vec(),
        s2_prefix.clone(),
    ));
    cases.push(f.case(
        "manifest: garbage",
        &manifest,
        b"\x89PNG this is not a manifest \x00\x01".to_vec(),
        s2_prefix.clone(),
    ));
    let a = f.a.clone();
    cases.push(f.case(
        "manifest: the tenant's digest edited",
        &manifest,
        f.manifest_edit(&|v| {
            let sha = v["tenants"][&a]["sha256"].as_str().unwrap().to_string();
            let last = if sha.ends_with('0') { "1" } else { "0" };
            v["tenants"][&a]["sha256"] = format!("{}{last}", &sha[..sha.len() - 1]).into();
        }),
        s2_prefix.clone(),
    ));
    let mut rows_edited = f.case(
        "manifest: a row count of the tenant edited",
        &manifest,
        f.manifest_edit(&|v| {
            let rows = v["tenants"][&a]["rows"].as_object_mut().unwrap();
            let n = rows["app.funds"].as_u64().unwrap();
            rows.insert("app.funds".into(), (n + 1).into());
        }),
        s2_prefix.clone(),
    );
    rows_edited.plain_verify = false; // digests are right: only decrypting shows it
    cases.push(rows_edited);
    cases.push(f.case(
        "manifest: replaced by the other snapshot's manifest",
        &manifest,
        f.read(&f.s1.join("manifest.json")),
        s2_prefix.clone(),
    ));
    let b = f.b.clone();
    let mut redirected = f.case(
        "manifest: the tenant's entry points at another tenant's archive",
        &manifest,
        f.manifest_edit(&|v| {
            let other = v["tenants"][&b].clone();
            for k in ["key", "bytes", "sha256"] {
                v["tenants"][&a][k] = other[k].clone();
            }
        }),
        // The message names the archive read and says it was swapped.
        "the object was swapped".into(),
    );
    redirected.plain_verify = false; // the bytes are another object's, intact
    cases.push(redirected);
    let s1_manifest: serde_json::Value =
        serde_json::from_slice(&f.read(&f.s1.join("manifest.json"))).unwrap();
    let mut global_redirected = f.case(
        "manifest: the global entry points at the other snapshot's global",
        &manifest,
        f.manifest_edit(&|v| v["global"] = s1_manifest["global"].clone()),
        "the object was swapped".into(),
    );
    global_redirected.plain_verify = false;
    cases.push(global_redirected);

    // Packs.
    let pb = f.read(&f.p);
    let (p_footer, p_footer_start) = pack_footer(&pb);
    let p_key = f.key(&f.p);
    let (a_start, a_end) = section_range(&p_footer, Some(&f.a)).unwrap();
    cases.push(f.case(
        "pack: flipped bit inside the tenant's section",
        &f.p,
        flipped(&pb, (a_start + a_end) / 2, 0x08),
        p_key.clone(),
    ));
    // The stream index restates the footer (capture_env indexes every pack), so a restore
    // reads the index, not the footer: only verify must see it, and the restore that never
    // reads the damaged bytes is exact.
    let mut c = f.case(
        "pack: flipped bit inside the footer",
        &f.p,
        flipped(&pb, p_footer_start + 10, 0x02),
        p_key.clone(),
    );
    c.tenant = String::new();
    c.unaffected = Some((f.a.clone(), None));
    cases.push(c);
    cases.push(f.case(
        "pack: cut tail",
        &f.p,
        pb[..pb.len() - 10].to_vec(),
        p_key.clone(),
    ));
    cases.push(f.case("pack: bytes appended", &f.p, appended(&pb), p_key.clone()));
    cases.push(f.case(
        "pack: replaced by another pack renamed to its key",
        &f.p,
        f.read(&f.q),
        p_key.clone(),
    ));
    let q_key = f.key(&f.q);
    let mut older = f.case(
        "pack (round 1, read by --at): replaced by a newer pack renamed to its key",
        &f.q,
        pb.clone(),
        q_key.clone(),
    );
    older.at = Some(f.t1.clone());
    cases.push(older);
    let qb = f.read(&f.q);
    let (qs, qe) = section_range(&pack_footer(&qb).0, Some(&f.a)).unwrap();
    let mut c = f.case(
        "pack (round 1, read by --at): flipped bit inside the tenant's section",
        &f.q,
        flipped(&qb, (qs + qe) / 2, 0x80),
        q_key.clone(),
    );
    c.at = Some(f.t1.clone());
    cases.push(c);
    // Another tenant's section damaged: B's restore refuses, A's never reads it and works.
    let bb = f.read(&f.p_b);
    let (bs, be) = section_range(&pack_footer(&bb).0, Some(&f.b)).unwrap();
    let mut c = f.case(
        "pack: flipped bit inside another tenant's section (isolation)",
        &f.p_b,
        flipped(&bb, (bs + be) / 2, 0x10),
        f.key(&f.p_b),
    );
    c.tenant = f.b.clone();
    c.unaffected = Some((f.a.clone(), None));
    cases.push(c);

    // The change stream's state objects and the repository's description.
    let progress = f.repo.join("changes/progress.json");
    let pr = f.read(&progress);
    cases.push(f.case(
        "progress.json: garbage",
        &progress,
        b"{\"format_version\": 1, garbage".to_vec(),
        "changes/progress.json".into(),
    ));
    cases.push(f.case(
        "progress.json: cut",
        &progress,
        pr[..pr.len() / 2].to_vec(),
        "changes/progress.json".into(),
    ));
    cases.push(f.case(
        "retained.json: garbage (absent before)",
        &f.repo.join("changes/retained.json"),
        b"\x00\x01 not json".to_vec(),
        "changes/retained.json".into(),
    ));
    cases.push(f.case(
        "repo.json: garbage",
        &f.repo.join("repo.json"),
        b"<html>502 Bad Gateway</html>".to_vec(),
        "repo.json".into(),
    ));
    cases
}

/// Damages that once went unnoticed (see `undetected_damages_are_refused_too`).
fn undetected_cases(f: &Damaged) -> Vec<Case> {
    let manifest = f.s2.join("manifest.json");
    let m = f.read(&manifest);
    let s2_prefix = format!("snapshots/{}/", f.ids[1]);
    let mut cases = Vec::new();
    let s1_manifest: serde_json::Value =
        serde_json::from_slice(&f.read(&f.s1.join("manifest.json"))).unwrap();
    // The id says `<time>-<consistent LSN>`: an edited consistent_lsn disagrees with it.
    let mut lsn_edited = f.case(
        "manifest: consistent_lsn edited to the other snapshot's (its id still says otherwise)",
        &manifest,
        f.manifest_edit(&|v| v["consistent_lsn"] = s1_manifest["consistent_lsn"].clone()),
        s2_prefix.clone(),
    );
    lsn_edited.plain_verify = false;
    cases.push(lsn_edited);
    // One flipped bit that keeps the JSON valid: the last digit of consistent_time's year.
    let time_at = {
        let needle = b"\"consistent_time\": \"";
        m.windows(needle.len()).position(|w| w == needle).unwrap() + needle.len() + 3
    };
    let mut time_flipped = f.case(
        "manifest: one flipped bit in consistent_time's year (the JSON stays valid)",
        &manifest,
        flipped(&m, time_at, 0x01),
        s2_prefix.clone(),
    );
    time_flipped.plain_verify = false;
    cases.push(time_flipped);
    // One flipped bit in a sequence's last_value (the JSON stays valid): a restored database
    // would hand out values the tenant's rows already use.
    let seq_at = {
        let needle = b"\"last_value\": ";
        let start = m.windows(needle.len()).position(|w| w == needle).unwrap() + needle.len();
        // The number's last digit: flipping its low bit keeps it a number.
        start + m[start..].iter().take_while(|c| c.is_ascii_digit()).count() - 1
    };
    let mut seq_flipped = f.case(
        "manifest: one flipped bit in a sequence's last_value (the JSON stays valid)",
        &manifest,
        flipped(&m, seq_at, 0x01),
        s2_prefix.clone(),
    );
    seq_flipped.plain_verify = false;
    cases.push(seq_flipped);
    // A pack's routing region: restore never reads it (so it works), but `verify` must see it:
    // the daemon needs it to rebuild its routing state from an older checkpoint.
    let rb = f.read(&f.with_routes);
    let rf = pack_footer(&rb).0;
    let offset = rf["routes"]["offset"].as_u64().unwrap() as usize;
    let length = rf["routes"]["length"].as_u64().unwrap() as usize;
    let mut c = f.case(
        "pack: flipped bit inside the routing region",
        &f.with_routes,
        flipped(&rb, offset + length / 2, 0x04),
        f.key(&f.with_routes),
    );
    c.tenant = String::new(); // no restore reads it: only verify must see it
    c.unaffected = Some((f.b.clone(), Some(f.t1.clone())));
    cases.push(c);
    cases
}

/// Applies each damage in turn (restoring the original bytes after it) and checks what must
/// happen. Returns (detected, databases created, failures).
async fn run_cases(f: &Damaged, cases: &[Case]) -> (usize, usize, Vec<String>) {
    let (mut detected, mut created, mut failures) = (0, 0, Vec::<String>::new());
    for (n, c) in cases.iter().enumerate() {
        let saved = std::fs::read(&c.path).ok();
        std::fs::write(&c.path, &c.bytes).unwrap();
        let mut problems = Vec::new();
        let mut said = String::new();
        if !c.tenant.is_empty() {
            let target = format!("hostile_{n}_{}", f.db);
            let mut args: Vec<&str> = vec!["restore", "--org", &c.tenant, "--target-db", &target];
            match &c.at {
                Some(at) => args.extend(["--at", at.as_str()]),
                None => args.push("--latest"),
            }
            let out = f.env.run(&args);
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            said = err.lines().next().unwrap_or_default().to_string();
            if database_exists(&target).await {
                created += 1;
                let expected = match &c.at {
                    Some(_) => &f.at_t1[&c.tenant],
                    None => &f.at_t2[&c.tenant],
                };
                let mut diff = differences(&target, expected).await;
                diff.extend(sequence_differences(&f.db, &target).await);
                problems.push(format!(
                    "restore created {target} (exit {:?}); its content {}",
                    out.status.code(),
                    if diff.is_empty() {
                        "equals the source's anyway".to_string()
                    } else {
                        format!("is WRONG: {diff:?}")
                    }
                ));
                drop_database(&target).await;
            } else if out.status.code() != Some(1) {
                problems.push(format!(
                    "restore exited {:?}, expected 1: {err}",
                    out.status.code()
                ));
            }
            if !err.contains(&c.names) {
                problems.push(format!(
                    "restore's message does not name {}: {err}",
                    c.names
                ));
            }
        }
        let mut verifies = vec![vec!["verify", "--deep"]];
        if c.plain_verify {
            verifies.push(vec!["verify"]);
        }
        for args in verifies {
            let out = f.env.run(&args);
            let all = text(&out);
            if out.status.code() != Some(1) || !all.contains(&c.names) {
                problems.push(format!(
                    "`{}` exited {:?} without naming {}:\n{all}",
                    args.join(" "),
                    out.status.code(),
                    c.names
                ));
            }
        }
        if let Some((tenant, at)) = &c.unaffected {
            let target = format!("hostile_{n}_ok_{}", f.db);
            let mut args: Vec<&str> = vec!["restore", "--org", tenant, "--target-db", &target];
            match at {
                Some(at) => args.extend(["--at", at.as_str()]),
                None => args.push("--latest"),
            }
            let out = f.env.run(&args);
            if out.status.success() {
                let expected = if at.is_some() {
                    &f.at_t1[tenant]
                } else {
                    &f.at_t2[tenant]
                };
                let diff = differences(&target, expected).await;
                if !diff.is_empty() {
                    problems.push(format!(
                        "the restore of {tenant} that never reads the damage differs: {diff:?}"
                    ));
                }
                drop_database(&target).await;
            } else {
                problems.push(format!(
                    "a restore that never reads the damaged bytes failed ({:?}): {}",
                    out.status.code(),
                    text(&out)
                ));
            }
        }
        match saved {
            Some(bytes) => std::fs::write(&c.path, bytes).unwrap(),
            None => std::fs::remove_file(&c.path).unwrap(),
        }
        if problems.is_empty() {
            detected += 1;
            eprintln!("  detected: {}: {said}", c.what);
        } else {
            eprintln!("  NOT handled: {}", c.what);
            failures.extend(problems.into_iter().map(|p| format!("[{}] {p}", c.what)));
        }
    }
    (detected, created, failures)
}

/// Every object type damaged in turn (a flipped bit, a cut tail, appended bytes, another
/// tenant's, snapshot's or pack's object in its place, edited or cut JSON): restore exits 1
/// naming the object before any database exists, and `verify` names it. A damaged routing
/// checkpoint stops the daemon at start, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_damaged_object_is_refused_before_writing() {
    let clock = Instant::now();
    let f = damaged_fixture("hostile_objects").await;
    let cases = object_cases(&f);
    let (detected, created, mut failures) = run_cases(&f, &cases).await;
    eprintln!(
        "hostile objects: {} damages tried, {detected} detected, {created} databases created",
        cases.len()
    );

    // Undamaged again: everything verifies and restores exactly.
    assert!(f.env.ok(&["verify", "--deep"]).contains("0 failed"));
    let target = format!("hostile_intact_{}", f.db);
    f.env.ok(&restore_latest(&f.a, &target));
    assert_eq!(
        differences(&target, &f.at_t2[&f.a]).await,
        Vec::<String>::new()
    );
    drop_database(&target).await;

    // The routing checkpoint the daemon resumes from (the newest), damaged: it must refuse to
    // start from it, naming it, rather than route with a wrong state.
    let checkpoint = files_under(&f.repo.join("changes"))
        .into_iter()
        .rfind(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("routes-")
        })
        .expect("a routing checkpoint");
    let cp = f.read(&checkpoint);
    let cp_key = f.key(&checkpoint);
    let checkpoint_cases = [
        (
            "routing checkpoint: flipped bit",
            flipped(&cp, cp.len() / 2, 0x20),
        ),
        ("routing checkpoint: cut tail", cp[..cp.len() - 8].to_vec()),
        ("routing checkpoint: garbage", b"not zstd at all".to_vec()),
    ];
    for (what, bytes) in &checkpoint_cases {
        std::fs::write(&checkpoint, bytes).unwrap();
        let mut d = Spawned::start(&f.env);
        match d.wait_exit(Duration::from_secs(60)) {
            Some(status) => {
                let log = d.output();
                let last = log.lines().rev().find(|l| l.starts_with("error:"));
                if status.code() != Some(1) || !last.is_some_and(|l| l.contains(&cp_key)) {
                    failures.push(format!(
                        "[{what}] the daemon exited {status} without naming {cp_key}:\n{log}"
                    ));
                } else {
                    eprintln!("  detected: {what}: {}", last.unwrap());
                }
            }
            None => failures.push(format!(
                "[{what}] the daemon started from a damaged routing checkpoint:\n{}",
                d.output()
            )),
        }
        drop(d);
        std::fs::write(&checkpoint, &cp).unwrap();
    }
    // Intact again, the daemon starts and captures.
    let mut daemon = Daemon::start(&f.env);
    f.source
        .batch_execute(
            "UPDATE app.fundconfigs SET config = '{\"r\": 3}' WHERE fund_id = '00000000-0000-4000-8000-00000000f001';",
        )
        .await
        .unwrap();
    let t3 = now(&f.source).await;
    wait_covered(&f.env, t3, &mut daemon);
    assert!(daemon.terminate().success());
    eprintln!(
        "hostile objects: {} routing checkpoint damages tried; {:.0}s",
        checkpoint_cases.len(),
        clock.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "damages not handled as they must be:\n{}",
        failures.join("\n\n")
    );
}

/// Damages that once went unnoticed. The manifest is plain JSON: without its own digest and a
/// check of its fields against its id (`<consistent time>-<consistent LSN>`), a
/// consistent_lsn that disagrees with the id, or ONE flipped bit in consistent_time or in a
/// sequence's last_value, restored WRONG data with exit 0 (round-1 rows replayed twice; the
/// round-2 changes silently left out of `--latest`; a sequence behind the rows), and `verify`
/// (even `--deep`) saw none of them, nor a damaged pack routing region. A routing checkpoint
/// that does not say which LSN it holds the state at lets an older one under the newest key be
/// loaded, and the daemon route a change to the key's former tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undetected_damages_are_refused_too() {
    let f = damaged_fixture("hostile_undetected").await;
    let cases = undetected_cases(&f);
    let (detected, created, mut failures) = run_cases(&f, &cases).await;
    eprintln!(
        "hostile objects (once undetected): {} damages tried, {detected} detected, {created} databases created",
        cases.len()
    );

    // A routing checkpoint replaced by an OLDER one under the newest key (its content does not
    // say which LSN it is the state at): the daemon must refuse it, not route with it. B's
    // fund f001 (round 1) is deleted and made again under A's: the stale state still says B.
    let fund = "00000000-0000-4000-8000-00000000f001";
    let mut daemon = Daemon::start(&f.env);
    f.source
        .batch_execute(&format!(
            "BEGIN;
             DELETE FROM app.funds WHERE id = '{fund}';
             INSERT INTO app.funds (id, organization_id, name) VALUES ('{fund}', '{}', 'now A''s');
             INSERT INTO app.fundconfigs (fund_id, config) VALUES ('{fund}', '{{}}');
             COMMIT;",
            f.a
        ))
        .await
        .unwrap();
    let moved = now(&f.source).await;
    wait_covered(&f.env, moved, &mut daemon);
    assert!(daemon.terminate().success());
    let checkpoints: Vec<PathBuf> = files_under(&f.repo.join("changes"))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("routes-")
        })
        .collect();
    // The second snapshot's own checkpoint (f001 belongs to B there) under the newest key.
    let s2_lsn_hex = &f.ids[1][17..];
    let stale = checkpoints
        .iter()
        .find(|p| p.to_string_lossy().contains(s2_lsn_hex))
        .unwrap_or_else(|| panic!("no checkpoint of the second snapshot in {checkpoints:?}"));
    let newest = checkpoints.last().unwrap();
    assert_ne!(stale, newest);
    std::fs::write(newest, f.read(stale)).unwrap();
    let a_tenant = f.a.clone();
    let mut d = Spawned::start(&f.env);
    f.source
        .batch_execute(&format!(
            "UPDATE app.fundconfigs SET config = '{{\"after\": \"move\"}}' WHERE fund_id = '{fund}'"
        ))
        .await
        .unwrap();
    let changed = now(&f.source).await;
    let a_state = state(&f.source, &a_tenant).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut outcome = None;
    while Instant::now() < deadline {
        if let Some(status) = d.wait_exit(Duration::from_millis(200)) {
            outcome = Some(status);
            break;
        }
        let list: serde_json::Value = serde_json::from_str(&f.env.ok(&["list", "--json"])).unwrap();
        if list["stream"]["covered_until"]
            .as_str()
            .is_some_and(|c| c.parse::<DateTime<Utc>>().unwrap() >= changed)
        {
            break;
        }
    }
    let log = d.output();
    let last = log
        .lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default()
        .to_string();
    match outcome {
        Some(status) if status.code() == Some(1) && last.contains(&f.key(newest)) => {
            eprintln!("  detected: stale routing checkpoint: {last}")
        }
        Some(status) => failures.push(format!(
            "[routing checkpoint replaced by an older one] the daemon started from it and stopped later ({status}) without naming it: {last}"
        )),
        None => {
            drop(d);
            let target = format!("stale_routes_{}", fastrand::u32(..));
            let out = f
                .env
                .run(&restore_latest(&a_tenant, &target));
            let verdict = if out.status.success() {
                let diff = differences(&target, &a_state).await;
                drop_database(&target).await;
                if diff.is_empty() {
                    "A's restore is right anyway".to_string()
                } else {
                    format!("A's restore (exit 0) is WRONG: the change was routed to B: {diff:?}")
                }
            } else {
                format!("A's restore fails: {}", text(&out))
            };
            failures.push(format!(
                "[routing checkpoint replaced by an older one] the daemon started from it and captured on; {verdict}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "damages not handled as they must be:\n{}",
        failures.join("\n\n")
    );
}

// ---------------------------------------------------------------------------------------------
// B. Identifiers and values that attack SQL building
// ---------------------------------------------------------------------------------------------

/// Tenant values of a text tenant column: quotes and SQL, spaces, non-Latin, path tricks, a
/// value that looks like another one's key encoding, quotes and backslashes, a placeholder.
const HOSTILE_TENANTS: &[&str] = &[
    "O'Brien; DROP TABLE x; --",
    "ten ant",
    "日本",
    "a/../b",
    "a%2F..%2Fb",
    "q\"uote\\back",
    "$1",
];

const T_SELECT: &str = r#""Ünïcödé"."select""#;
const T_REF: &str = r#""Ünïcödé"."ref data""#;
const T_ORDERS: &str = r#""we""ird schema"."order items""#;
const T_AB: &str = r#""we""ird schema"."a""b""#;
const T_LINES: &str = r#""Ünïcödé"."lines; DROP TABLE x --""#;

/// A SQL string literal, written by hand (standard_conforming_strings: only ' is special).
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Hand-written filters of the hostile schema: (table, filter for `tenant`; None = global).
fn hostile_filters(tenant: &str) -> Vec<(&'static str, Option<String>)> {
    let l = lit(tenant);
    vec![
        (T_REF, None),
        (T_SELECT, Some(format!(r#""tenant id" = {l}"#))),
        (T_ORDERS, Some(format!(r#""tenant id" = {l}"#))),
        (
            T_AB,
            Some(format!(
                r#""order" IN (SELECT id FROM {T_ORDERS} WHERE "tenant id" = {l})"#
            )),
        ),
        (
            T_LINES,
            Some(format!(
                r#""a""b id" IN (SELECT ab.id FROM {T_AB} ab JOIN {T_ORDERS} o ON o.id = ab."order" WHERE o."tenant id" = {l})"#
            )),
        ),
    ]
}

async fn hostile_state(source: &Client, tenant: &str) -> TenantState {
    let mut out = BTreeMap::new();
    for (table, filter) in hostile_filters(tenant) {
        out.insert(
            table.to_string(),
            digest(source, table, filter.as_deref()).await,
        );
    }
    out
}

/// Every table of the hostile schema still exists on the source.
async fn hostile_tables_exist(source: &Client) {
    for table in [T_SELECT, T_REF, T_ORDERS, T_AB, T_LINES] {
        let exists: bool = source
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await
            .unwrap()
            .get(0);
        assert!(exists, "{table} still exists on the source");
    }
}

/// Schema, table and column names with quotes, spaces, unicode, reserved words and SQL; a
/// text tenant column named `tenant id` reached directly and through a chain of foreign keys;
/// tenant values that are SQL, paths and key encodings. check, init, capture, backup --org,
/// list, verify and restore (--latest and --at) all work, each tenant's restore equals the
/// source's rows of that tenant and nothing else, and a hostile --org is refused cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_identifiers_and_tenant_values_are_quoted_and_bound() {
    let clock = Instant::now();
    let pg = cluster().await;
    let db = pg.fresh_db("hostile_names").await;
    let source = pg.client(&db).await;
    let tenants_sql = HOSTILE_TENANTS
        .iter()
        .enumerate()
        .map(|(i, t)| format!("({}, 'grp \"{i}\"', DATE '2026-01-01' + {i})", lit(t)))
        .collect::<Vec<_>>()
        .join(", ");
    source
        .batch_execute(&format!(
            r#"
            CREATE SCHEMA "we""ird schema";
            CREATE SCHEMA "Ünïcödé";
            CREATE TABLE {T_SELECT} ("tenant id" text PRIMARY KEY, "group" text, "from" date);
            CREATE TABLE {T_REF} (code text PRIMARY KEY, "désignation" text);
            CREATE TABLE {T_ORDERS} (
              id serial PRIMARY KEY,
              "tenant id" text NOT NULL REFERENCES {T_SELECT},
              "group" text, "Qty ""x""" int, ref text REFERENCES {T_REF});
            CREATE TABLE {T_AB} (
              id bigserial PRIMARY KEY,
              "order" int NOT NULL REFERENCES {T_ORDERS} ON DELETE CASCADE,
              "group" text, "user" text);
            CREATE TABLE {T_LINES} (
              id serial PRIMARY KEY,
              "a""b id" bigint NOT NULL REFERENCES {T_AB} ON DELETE CASCADE,
              "select" text);
            INSERT INTO {T_REF} VALUES ('EUR', 'Euro ''€'''), ('日本円', 'yen; DROP TABLE x; --');
            INSERT INTO {T_SELECT} VALUES {tenants_sql};
            INSERT INTO {T_ORDERS} ("tenant id", "group", "Qty ""x""", ref)
              SELECT s."tenant id", 'order ' || g || E' \t tab''quote \\ "dq"', g, CASE WHEN g = 2 THEN '日本円' ELSE 'EUR' END
                FROM {T_SELECT} s, generate_series(1, 3) g;
            INSERT INTO {T_AB} ("order", "group", "user")
              SELECT o.id, 'ab ' || g, 'u' || o.id FROM {T_ORDERS} o, generate_series(1, 2) g;
            INSERT INTO {T_LINES} ("a""b id", "select") SELECT id, 'line of ' || id FROM {T_AB};
            GRANT USAGE ON SCHEMA "we""ird schema", "Ünïcödé" TO updog_backup;
            GRANT SELECT ON ALL TABLES IN SCHEMA "we""ird schema", "Ünïcödé" TO updog_backup;
            GRANT SELECT ON ALL SEQUENCES IN SCHEMA "we""ird schema", "Ünïcödé" TO updog_backup;
            "#
        ))
        .await
        .unwrap();
    let mut env = TestEnv::new(&db, Repo::Directory).await;
    capture_env(&mut env);
    for (k, v) in [
        (
            "UPDOG_BACKUP__SOURCE__SCHEMAS",
            r#"["we\"ird schema", "Ünïcödé"]"#,
        ),
        ("UPDOG_BACKUP__SOURCE__TENANT_COLUMN", "tenant id"),
        (
            "UPDOG_BACKUP__SOURCE__GLOBAL_TABLES",
            r#"["Ünïcödé.ref data"]"#,
        ),
    ] {
        env.env.push((k.to_string(), v.to_string()));
    }

    // check: every table routed; what it asks for is quoted SQL the DBA can paste.
    let out = env.run(&["check"]);
    let report = text(&out);
    // Its one error is the replica identity the lines table needs (fixed below).
    assert!(
        report.contains("1 error(s)") && report.contains("lacks (a\"b id)"),
        "check accepts the schema but for the replica identity:\n{report}"
    );
    assert!(
        !report.contains("NO ROUTE"),
        "every hostile table has a route:\n{report}"
    );
    // Every fix check prints is SQL the DBA pastes as it is: run each verbatim (a wrongly
    // quoted name would fail here). The lines table needs REPLICA IDENTITY FULL.
    let fixes: Vec<String> = report
        .lines()
        .filter_map(|l| l.trim().strip_prefix("fix: ").map(str::to_string))
        .collect();
    assert!(
        fixes.contains(
            &r#"ALTER TABLE "Ünïcödé"."lines; DROP TABLE x --" REPLICA IDENTITY FULL;"#.to_string()
        ),
        "{report}"
    );
    for fix in &fixes {
        source
            .batch_execute(fix)
            .await
            .unwrap_or_else(|e| panic!("check's fix does not run: {fix}: {e}"));
    }
    // Its one warning is the schema-change triggers, which only a superuser may install.
    assert!(report.contains("updog-backup schema-triggers"), "{report}");
    env.install_schema_triggers(&db).await;
    let check = env.ok(&["check"]);
    assert!(check.contains("0 error(s), 0 warning(s)"), "{check}");
    for route in [
        "we\"ird schema.a\"b",
        "Ünïcödé.lines; DROP TABLE x --",
        "Ünïcödé.ref data",
    ] {
        assert!(check.contains(route), "check names {route:?}:\n{check}");
    }
    hostile_tables_exist(&source).await;

    env.ok(&["init"]);
    hostile_tables_exist(&source).await;
    let mut daemon = Daemon::start(&env);
    let (obrien, space, nihon, dots, encoded, quote, dollar) = (
        HOSTILE_TENANTS[0],
        HOSTILE_TENANTS[1],
        HOSTILE_TENANTS[2],
        HOSTILE_TENANTS[3],
        HOSTILE_TENANTS[4],
        HOSTILE_TENANTS[5],
        HOSTILE_TENANTS[6],
    );
    // Each step its own transaction; values that are SQL travel as data.
    let steps_mid = [
        format!(
            r#"BEGIN;
               WITH o AS (INSERT INTO {T_ORDERS} ("tenant id", "group", "Qty ""x""", ref)
                          VALUES ({l}, $$'); DROP TABLE "we""ird schema"."a""b"; --$$, 99, 'EUR') RETURNING id),
                    ab AS (INSERT INTO {T_AB} ("order", "group", "user") SELECT id, 'new ab', E'\\x00? no: \\\\' FROM o RETURNING id)
               INSERT INTO {T_LINES} ("a""b id", "select") SELECT id, 'SELECT * FROM pg_shadow' FROM ab;
               COMMIT;"#,
            l = lit(obrien)
        ),
        format!(
            r#"UPDATE {T_AB} SET "group" = 'upd '' ' || "group"
                WHERE "order" IN (SELECT id FROM {T_ORDERS} WHERE "tenant id" = {l})"#,
            l = lit(space)
        ),
        format!(
            r#"DELETE FROM {T_ORDERS} WHERE id = (SELECT min(id) FROM {T_ORDERS} WHERE "tenant id" = {l})"#,
            l = lit(nihon)
        ),
    ];
    let steps_end = [
        // A migration with hostile names, replayed by the restores after it (the triggers
        // were installed as check asked).
        format!(
            r#"ALTER TABLE {T_LINES} ADD COLUMN "new ""col"" --" text NOT NULL DEFAULT 'it''s $$ -- {{x}}';
               ALTER TABLE {T_REF} RENAME COLUMN "désignation" TO "dé""sig; --""#
        ),
        format!(
            r#"UPDATE {T_SELECT} SET "group" = 'renamed ../..' WHERE "tenant id" = {l};
               INSERT INTO {T_REF} VALUES ('O''X', 'added during capture')"#,
            l = lit(dots)
        ),
        format!(
            r#"DELETE FROM {T_AB} WHERE id = (SELECT min(ab.id) FROM {T_AB} ab JOIN {T_ORDERS} o ON o.id = ab."order" WHERE o."tenant id" = {l})"#,
            l = lit(encoded)
        ),
        format!(
            r#"UPDATE {T_LINES} SET "select" = 'changed "' || id || '"' WHERE "a""b id" IN
                 (SELECT ab.id FROM {T_AB} ab JOIN {T_ORDERS} o ON o.id = ab."order" WHERE o."tenant id" = {l})"#,
            l = lit(quote)
        ),
        format!(
            r#"INSERT INTO {T_ORDERS} ("tenant id", "group", "Qty ""x""") VALUES ({l}, '$1 $2', NULL)"#,
            l = lit(dollar)
        ),
    ];
    for sql in &steps_mid {
        source
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{e}: {sql}"));
    }
    let t_mid = now(&source).await;
    let mut mid = BTreeMap::new();
    for t in HOSTILE_TENANTS {
        mid.insert(*t, hostile_state(&source, t).await);
    }
    for sql in &steps_end {
        source
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{e}: {sql}"));
    }
    let t_end = now(&source).await;
    let mut end = BTreeMap::new();
    for t in HOSTILE_TENANTS {
        end.insert(*t, hostile_state(&source, t).await);
    }
    wait_covered(&env, t_end, &mut daemon);
    assert!(daemon.terminate().success());
    hostile_tables_exist(&source).await;

    // A snapshot of two hostile tenants only; list and verify with a hostile --org.
    let out = env.ok(&["backup", "--org", obrien, "--org", dots]);
    assert!(out.contains("2 tenant(s)"), "{out}");
    for t in HOSTILE_TENANTS {
        let list = env.ok(&["list", "--org", t]);
        assert!(list.contains("restorable from"), "{t}: {list}");
    }
    assert!(
        env.ok(&["verify", "--deep", "--org", obrien])
            .contains("0 failed")
    );
    assert!(env.ok(&["verify", "--deep"]).contains("0 failed"));
    // One key per tenant, none colliding (a/../b and its own encoding are two objects).
    let archives: Vec<String> = files_under(&env.repo_dir.join("snapshots"))
        .iter()
        .filter(|p| p.to_string_lossy().contains("/tenants/"))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        archives.iter().all(|k| k
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"%_-.".contains(&c))),
        "{archives:?}"
    );
    assert_eq!(
        archives.len(),
        HOSTILE_TENANTS.len() + 2,
        "init's snapshot: every tenant; the partial one: two\n{archives:?}"
    );

    // Every tenant: --latest (from the partial snapshot for two of them) and --at the middle
    // instant (init's snapshot plus the stream), each compared with the source's rows.
    let mut restores = 0;
    for (n, t) in HOSTILE_TENANTS.iter().enumerate() {
        for (label, at, expected) in [("latest", None, &end[t]), ("mid", Some(t_mid), &mid[t])] {
            let mut args = vec!["restore", "--org", t, "--json"];
            let at_text = at.map(rfc3339);
            match &at_text {
                Some(at) => args.extend(["--at", at.as_str()]),
                None => args.push("--latest"),
            }
            // The default database name for one of them (日本 leaves no ASCII of its own).
            let target = format!("hostile_{label}_{n}_{}", fastrand::u32(..));
            if !(label == "latest" && *t == nihon) {
                args.extend(["--target-db", target.as_str()]);
            }
            let report: serde_json::Value = serde_json::from_str(&env.ok(&args)).unwrap();
            let database = report["database"].as_str().unwrap().to_string();
            assert_eq!(report["tenant"], *t);
            let diff = differences(&database, expected).await;
            assert!(
                diff.is_empty(),
                "tenant {t:?} restored {label} into {database} differs: {diff:?}\n{report}"
            );
            restores += 1;
            drop_database(&database).await;
        }
    }

    // An --org that is SQL: not a tenant (exit 2), nothing created, nothing dropped.
    for org in [
        "x'; DROP TABLE \"we\"\"ird schema\".\"a\"\"b\"; --",
        "' OR '1'='1",
        "\"tenant id\" IS NOT NULL --",
    ] {
        let err = env.fails(&restore_latest(org, "never_hostile"), 2);
        assert!(err.contains("is in none of the"), "{org}: {err}");
        assert!(!database_exists("never_hostile").await);
        let err = env.fails(&["backup", "--org", org], 2);
        assert!(
            err.contains("no rows in any tenant table") || err.contains("not"),
            "{org}: {err}"
        );
    }
    hostile_tables_exist(&source).await;
    let rows: i64 = source
        .query_one(&format!("SELECT count(*) FROM {T_AB}"), &[])
        .await
        .unwrap()
        .get(0);
    assert!(rows > 0);
    eprintln!(
        "hostile names: {} tenants, {restores} restores compared, {:.0}s",
        HOSTILE_TENANTS.len(),
        clock.elapsed().as_secs_f64()
    );
}

/// A row whose tenant column changes hands it from tenant A to tenant B: after the move, A's
/// restore no longer has it and B's has it. Two rows move in one transaction: a fund with no
/// children (app.funds keeps its default replica identity, as `check` leaves it: its UPDATE
/// carries no old row, and the router finds the old tenant in its key map) and an audit event
/// (REPLICA IDENTITY FULL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_moved_to_another_tenant_leaves_one_and_joins_the_other() {
    let pg = cluster().await;
    let db = pg.capture_fixture_db("hostile_move", 3, "0.1").await;
    let source = pg.client(&db).await;
    let mut env = TestEnv::new(&db, Repo::Directory).await;
    capture_env(&mut env);
    // Funds are what investments reach their tenant through: moving one needs the trigger of
    // parent moves (without it both restores after the move are refused).
    env.install_schema_triggers(&db).await;
    env.ok(&["init"]);
    let (a, b) = (fixture_tenant(1).await, fixture_tenant(2).await);
    let mut daemon = Daemon::start(&env);
    let fund = "00000000-0000-4000-8000-0000000000ee";
    source
        .batch_execute(&format!(
            "INSERT INTO app.funds (id, organization_id, name) VALUES ('{fund}', '{a}', 'handed over')"
        ))
        .await
        .unwrap();
    let t0 = now(&source).await;
    let a0 = state(&source, &a).await;
    source
        .batch_execute(&format!(
            "BEGIN;
             UPDATE app.funds SET organization_id = '{b}' WHERE id = '{fund}';
             UPDATE audit.events SET organization_id = '{b}'
              WHERE ctid = (SELECT ctid FROM audit.events WHERE organization_id = '{a}' LIMIT 1);
             COMMIT;"
        ))
        .await
        .unwrap();
    let t1 = now(&source).await;
    let (a1, b1) = (state(&source, &a).await, state(&source, &b).await);
    wait_covered(&env, t1, &mut daemon);
    assert!(daemon.terminate().success());
    let mut failures = Vec::new();
    for (tenant, at, expected, label) in [
        (&a, Some(t0), &a0, "A before the move"),
        (&a, None, &a1, "A after the move"),
        (&b, None, &b1, "B after the move"),
    ] {
        let target = format!("move_{}", fastrand::u32(..));
        let mut args: Vec<&str> = vec!["restore", "--org", tenant, "--target-db", &target];
        let at_text = at.map(rfc3339);
        match &at_text {
            Some(at) => args.extend(["--at", at.as_str()]),
            None => args.push("--latest"),
        }
        let out = env.run(&args);
        if out.status.success() {
            let diff = differences(&target, expected).await;
            if !diff.is_empty() {
                failures.push(format!("{label}: restored (exit 0) but WRONG: {diff:?}"));
            }
            drop_database(&target).await;
        } else {
            failures.push(format!(
                "{label}: restore fails ({:?}): {}",
                out.status.code(),
                text(&out)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// C. The ground moves under the daemon
// ---------------------------------------------------------------------------------------------

/// A second identity's recipient (age1…).
fn other_recipient(env: &TestEnv) -> String {
    let path = env
        .dir
        .path()
        .join(format!("other-identity-{}.txt", fastrand::u32(..)));
    let out = std::process::Command::new(crate::support::bin())
        .args(["keygen", "--output"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The config with `encryption.recipients` replaced.
fn with_recipients(env: &TestEnv, config: &str, recipients: &str) -> String {
    let configured = format!("recipients = [\"{}\"]", env.recipient);
    assert!(config.contains(&configured));
    config.replace(&configured, &format!("recipients = {recipients}"))
}

/// A repository of database A, and database B (with the publication its owner would create).
async fn repository_and_another_database(name: &str) -> (TestEnv, String, String) {
    let pg = cluster().await;
    let db = pg
        .capture_fixture_db(&format!("{name}_mine"), 2, "0.1")
        .await;
    let env = TestEnv::new(&db, Repo::Directory).await;
    env.ok(&["init"]);
    let other_db = pg
        .capture_fixture_db(&format!("{name}_theirs"), 2, "0.1")
        .await;
    pg.client(&other_db)
        .await
        .batch_execute("CREATE PUBLICATION updog_backup FOR ALL TABLES")
        .await
        .unwrap();
    (env, db, other_db)
}

/// The daemon with `encryption.recipients` other than the repository's (replaced, or one
/// added) refuses to start, exit 2, saying so, before capturing anything; `backup` against a
/// repository of another database refuses, exit 2, naming both databases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_refuses_other_recipients_and_backup_another_databases_repository() {
    let (env, db, other_db) = repository_and_another_database("hostile_refuse").await;
    let config = std::fs::read_to_string(&env.config_path).unwrap();
    let other = other_recipient(&env);
    let before = files_under(&env.repo_dir);
    for (what, recipients) in [
        ("replaced", format!("[\"{other}\"]")),
        ("added", format!("[\"{}\", \"{other}\"]", env.recipient)),
    ] {
        std::fs::write(
            &env.config_path,
            with_recipients(&env, &config, &recipients),
        )
        .unwrap();
        let mut d = Spawned::start(&env);
        let status = d.wait_exit(Duration::from_secs(60));
        let log = d.output();
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(2),
            "daemon with recipients {what}:\n{log}"
        );
        let last = log.lines().rev().find(|l| l.starts_with("error:")).unwrap();
        assert!(
            last.contains("encryption.recipients do not match the repository's"),
            "{last}"
        );
        eprintln!("recipients {what}: exit 2: {last}");
    }
    // Nothing was stored by the refused daemons (no pack, no lease, no progress rewrite).
    assert_eq!(files_under(&env.repo_dir), before);
    std::fs::write(&env.config_path, &config).unwrap();

    // `backup` with the repository of another database (bad_input checks init and backup say
    // "belongs to database"; here: exit 2 and both named).
    std::fs::write(
        &env.config_path,
        config.replace(&format!("/{db}\""), &format!("/{other_db}\"")),
    )
    .unwrap();
    let err = env.fails(&["backup"], 2);
    assert!(
        err.contains("belongs to database") && err.contains(&db) && err.contains(&other_db),
        "{err}"
    );
    std::fs::write(&env.config_path, &config).unwrap();
    assert_eq!(files_under(&env.repo_dir), before);
    env.ok(&["verify", "--deep"]);
}

/// The daemon of database B pointed at database A's repository must refuse, exit 2, naming
/// both — whether B has a slot of its own or none. And `backup` with recipients other than the
/// repository's must refuse as the daemon does: otherwise it stores a snapshot the
/// repository's identity cannot decrypt, and `restore --latest` then fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_refuses_another_databases_repository_and_backup_other_recipients() {
    let (mut env, db, other_db) = repository_and_another_database("hostile_foreign").await;
    let config = std::fs::read_to_string(&env.config_path).unwrap();
    let mut failures = Vec::new();

    std::fs::write(
        &env.config_path,
        config.replace(&format!("/{db}\""), &format!("/{other_db}\"")),
    )
    .unwrap();
    // B with no slot of that name (the config copied from A's), then with a slot of its own.
    let own_slot = format!("updog_foreign_{}", fastrand::u32(..));
    let b = cluster().await.client(&other_db).await;
    for variant in ["no slot on B", "B has its own slot"] {
        if variant == "B has its own slot" {
            b.query(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&own_slot],
            )
            .await
            .unwrap();
            env.env
                .push(("UPDOG_BACKUP__SOURCE__SLOT".into(), own_slot.clone()));
        }
        let mut d = Spawned::start(&env);
        let status = d.wait_exit(Duration::from_secs(60));
        let log = d.output();
        let last = log
            .lines()
            .rev()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_default()
            .to_string();
        eprintln!("daemon on another database's repository ({variant}): {status:?}: {last}");
        if status.and_then(|s| s.code()) != Some(2)
            || !last.contains("belongs to database")
            || !last.contains(&db)
            || !last.contains(&other_db)
        {
            failures.push(format!(
                "daemon on another database's repository ({variant}): exited {status:?}, expected 2 naming {db} and {other_db}; it said: {last}"
            ));
        }
    }
    env.env.pop();
    b.query("SELECT pg_drop_replication_slot($1)", &[&own_slot])
        .await
        .unwrap();
    std::fs::write(&env.config_path, &config).unwrap();

    // `backup` with other recipients than repo.json's.
    let other = other_recipient(&env);
    std::fs::write(
        &env.config_path,
        with_recipients(&env, &config, &format!("[\"{other}\"]")),
    )
    .unwrap();
    let out = env.run(&["backup"]);
    eprintln!(
        "backup with other recipients: {:?}: {}",
        out.status.code(),
        text(&out).trim()
    );
    if out.status.code() != Some(2) || !text(&out).contains("encryption.recipients") {
        failures.push(format!(
            "`backup` with recipients that are not the repository's: exited {:?}, expected 2:\n{}",
            out.status.code(),
            text(&out)
        ));
    }
    std::fs::write(&env.config_path, &config).unwrap();
    let tenant = fixture_tenant(1).await;
    let target = format!("foreign_latest_{}", fastrand::u32(..));
    let out = env.run(&restore_latest(&tenant, &target));
    if !out.status.success() {
        failures.push(format!(
            "after that `backup`, `restore --latest` with the repository's identity fails ({:?}):\n{}",
            out.status.code(),
            text(&out)
        ));
    }
    drop_database(&target).await;
    let out = env.run(&["verify", "--deep"]);
    if !out.status.success() {
        failures.push(format!(
            "after that `backup`, `verify --deep` with the repository's identity fails:\n{}",
            text(&out)
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// A daemon capturing, a change stored, then its replication slot is dropped under it (its
/// walsender terminated, the slot dropped before it reconnects).
struct SlotDropped {
    env: TestEnv,
    source: Client,
    tenant: String,
    t1: DateTime<Utc>,
    at_t1: TenantState,
    status: Option<ExitStatus>,
    log: String,
    exit_seconds: f64,
}

async fn drop_slot_under_daemon(name: &str) -> SlotDropped {
    let pg = cluster().await;
    let db = pg.capture_fixture_db(name, 3, "0.1").await;
    let source = pg.client(&db).await;
    let mut env = TestEnv::new(&db, Repo::Directory).await;
    capture_env(&mut env);
    env.ok(&["init"]);
    let tenant = fixture_tenant(1).await;
    let slot = env
        .env
        .iter()
        .find(|(k, _)| k == "UPDOG_BACKUP__SOURCE__SLOT")
        .unwrap()
        .1
        .clone();
    let mut d = Spawned::start(&env);
    source
        .batch_execute(&format!(
            "UPDATE app.funds SET size_cents = 4242 WHERE organization_id = '{tenant}';
             INSERT INTO audit.events (organization_id, action, entity) VALUES ('{tenant}', 'before drop', 'x');"
        ))
        .await
        .unwrap();
    let t1 = now(&source).await;
    let at_t1 = state(&source, &tenant).await;
    wait_covered(&env, t1, &mut d);

    // Terminate the walsender and drop the slot before the daemon reconnects (retrying: it
    // reconnects within a second or so).
    let admin = pg.client("postgres").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        admin
            .query(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
                  WHERE slot_name = $1 AND active_pid IS NOT NULL",
                &[&slot],
            )
            .await
            .unwrap();
        if admin
            .query("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "could not drop slot {slot}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dropped = Instant::now();
    let status = d.wait_exit(Duration::from_secs(60));
    let exit_seconds = dropped.elapsed().as_secs_f64();
    let log = d.output();
    SlotDropped {
        env,
        source,
        tenant,
        t1,
        at_t1,
        status,
        log,
        exit_seconds,
    }
}

/// The slot dropped under a running daemon: it exits 1 within a minute telling to run
/// `updog-backup init`; restores up to what was stored still work, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_dropped_under_the_daemon_stops_it_and_keeps_what_was_stored() {
    let s = drop_slot_under_daemon("hostile_slot").await;
    let status = s.status.unwrap_or_else(|| {
        panic!(
            "the daemon still runs a minute after its slot was dropped:\n{}",
            s.log
        )
    });
    assert_eq!(status.code(), Some(1), "{}", s.log);
    let last_error = s
        .log
        .lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no final error line:\n{}", s.log));
    assert!(last_error.contains("updog-backup init"), "{last_error}");
    eprintln!(
        "slot dropped: the daemon exited {status} after {:.1}s: {last_error}",
        s.exit_seconds
    );
    let tenant = s.tenant.clone();
    for (label, at) in [("latest", None), ("t1", Some(rfc3339(s.t1)))] {
        let target = format!("slot_{label}_{}", fastrand::u32(..));
        let mut args: Vec<&str> = vec!["restore", "--org", &tenant, "--target-db", &target];
        match &at {
            Some(at) => args.extend(["--at", at.as_str()]),
            None => args.push("--latest"),
        }
        s.env.ok(&args);
        assert_eq!(
            differences(&target, &s.at_t1).await,
            Vec::<String>::new(),
            "{label}"
        );
        drop_database(&target).await;
    }
    assert!(s.env.ok(&["verify", "--deep"]).contains("0 failed"));
    let _ = &s.source;
}

/// Then, as the message says, `init` starts a new stream from a new snapshot: the instants the
/// old stream covered must stay restorable (its packs are still in the repository, and `list`
/// still shows them inside the window), and those between the two streams, when nothing was
/// captured, are refused with the restorable ranges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reinit_after_a_dropped_slot_keeps_the_old_window_restorable() {
    let s = drop_slot_under_daemon("hostile_reinit").await;
    assert_eq!(s.status.and_then(|s| s.code()), Some(1), "{}", s.log);
    let out = s.env.ok(&["init"]);
    assert!(out.contains("created replication slot"), "{out}");
    assert!(out.contains("earlier change stream"), "{out}");

    // The window: the old stream's range (which holds t1), then the new snapshot's instant.
    let list: serde_json::Value =
        serde_json::from_str(&s.env.ok(&["list", "--org", &s.tenant, "--json"])).unwrap();
    let time = |v: &serde_json::Value| -> DateTime<Utc> { v.as_str().unwrap().parse().unwrap() };
    let ranges: Vec<(DateTime<Utc>, DateTime<Utc>)> = list["window"]["ranges"]
        .as_array()
        .unwrap_or_else(|| panic!("no window ranges: {list}"))
        .iter()
        .map(|r| (time(&r["from"]), time(&r["to"])))
        .collect();
    assert_eq!(ranges.len(), 2, "{list}");
    assert!(ranges[0].0 <= s.t1 && s.t1 <= ranges[0].1, "{list}");
    assert_eq!(
        list["stream"]["earlier"].as_array().map(Vec::len),
        Some(1),
        "{list}"
    );
    let between = rfc3339(ranges[0].1 + (ranges[1].0 - ranges[0].1) / 2);
    let out = s
        .env
        .run(&["restore", "--org", &s.tenant, "--at", &between]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("outside the restorable window")
            && text(&out).contains("nothing was captured between"),
        "{}",
        text(&out)
    );

    let target = format!("reinit_t1_{}", fastrand::u32(..));
    let at = rfc3339(s.t1);
    let out = s.env.run(&[
        "restore",
        "--org",
        &s.tenant,
        "--at",
        &at,
        "--target-db",
        &target,
    ]);
    assert!(
        out.status.success(),
        "after the re-init, restoring at {at} (covered by the old stream, whose packs are all still stored) fails:\n{}",
        text(&out)
    );
    assert_eq!(differences(&target, &s.at_t1).await, Vec::<String>::new());
    drop_database(&target).await;
    let _ = &s.source;
}
