//! Test support of updog-backup, one crate for every test target and bench (a dev-dependency of
//! the root package): real services (PostgreSQL, SeaweedFS) and a runner for the real
//! `updog-backup` binary with a config, an identity and a repository made for the test; the
//! reference fixture's facts, the oracles (the fixture's tenants, and the random schemas of the
//! isolation property test with their generators), a TCP proxy for outages, and the benches'
//! shared helpers ([`bench`]).

pub mod bench;
pub mod change_gen;
pub mod daemon;
pub mod fixture;
pub mod oracle;
pub mod pgbackrest;
pub mod postgres;
pub mod proxy;
pub mod schema_gen;
pub mod seaweed;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use tempfile::TempDir;

/// Where a test's repository lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repo {
    Directory,
    S3,
}

pub struct TestEnv {
    pub dir: TempDir,
    pub config_path: PathBuf,
    pub identity_path: PathBuf,
    pub recipient: String,
    pub repo_dir: PathBuf,
    pub env: Vec<(String, String)>,
}

/// The repository's root (this crate is `tests/support`): where `tests/fixtures` and
/// `target/test-services` are.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(Path::parent)
        .expect("tests/support is two levels below the repository's root")
}

/// The `updog-backup` binary cargo built for the running test or bench target, which that
/// target knows as `env!("CARGO_BIN_EXE_updog-backup")` (a library cannot: cargo sets it for
/// integration tests and benches only): `$CARGO_BIN_EXE_updog-backup` when cargo also sets it
/// at run time, else where cargo puts it, the profile directory above the target's `deps/`.
/// (`tests/e2e` checks that both agree.)
pub fn bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(path) = std::env::var("CARGO_BIN_EXE_updog-backup") {
            return path;
        }
        let exe = std::env::current_exe().expect("the test binary's path");
        let path = exe
            .parent()
            .and_then(Path::parent)
            .map(|profile| profile.join("updog-backup"))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| {
                panic!(
                    "no updog-backup binary next to the deps/ directory of {} (run the tests with cargo)",
                    exe.display()
                )
            });
        path.into_os_string()
            .into_string()
            .expect("a UTF-8 path to the binary")
    })
}

impl TestEnv {
    /// A config for `source_db` on the test cluster, as the least-privileged roles of the
    /// fixture: `updog_backup` reads the source, `updog_restore` (CREATEDB only) restores.
    pub async fn new(source_db: &str, repo: Repo) -> Self {
        let pg = postgres::cluster().await;
        let (source, target) = (
            pg.url("updog_backup", source_db),
            pg.url("updog_restore", "postgres"),
        );
        // What the tables' owner does once (init prints this statement when it may not).
        pg.client(source_db)
            .await
            .batch_execute(
                "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'updog_backup')
                 THEN CREATE PUBLICATION updog_backup FOR ALL TABLES; END IF; END $$",
            )
            .await
            .unwrap();
        Self::with_urls(&source, &target, repo).await
    }

    /// A config for any source and restore target (e.g. another cluster).
    pub async fn with_urls(source_url: &str, target_url: &str, repo: Repo) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("updog-test-")
            .tempdir()
            .unwrap();
        let identity_path = dir.path().join("identity.txt");
        let out = Command::new(bin())
            .args(["keygen", "--output"])
            .arg(&identity_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "keygen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let recipient = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let repo_dir = dir.path().join("repo");
        // Slots are cluster-wide: one per test.
        let mut env = vec![(
            "UPDOG_BACKUP__SOURCE__SLOT".to_string(),
            format!("updog_t{}_{}", std::process::id(), fastrand::u32(..)),
        )];
        let storage = match repo {
            Repo::Directory => format!("url = \"file://{}\"", repo_dir.display()),
            Repo::S3 => {
                let s3 = seaweed::s3().await;
                env.push((
                    "AWS_ACCESS_KEY_ID".to_string(),
                    s3.access_key_id().to_string(),
                ));
                env.push((
                    "AWS_SECRET_ACCESS_KEY".to_string(),
                    s3.secret_access_key().to_string(),
                ));
                let prefix = format!("t{}-{}", std::process::id(), fastrand::u64(..));
                format!(
                    "url = \"s3://{}/{prefix}\"\ns3_endpoint = \"{}\"\ns3_region = \"us-east-1\"\ns3_force_path_style = true",
                    s3.bucket(),
                    s3.endpoint()
                )
            }
        };
        let config = fixture::config_toml(
            source_url,
            "",
            &storage,
            &recipient,
            &identity_path,
            &format!("\n[snapshot]\nparallel = 2\n\n[restore]\ntarget_url = \"{target_url}\"\n"),
        );
        let config_path = dir.path().join("updog-backup.toml");
        std::fs::write(&config_path, config).unwrap();
        Self {
            dir,
            config_path,
            identity_path,
            recipient,
            repo_dir,
            env,
        }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        self.command_of(bin(), args)
    }

    /// [`TestEnv::command`] with another updog-backup binary (a bench's baseline release).
    pub fn command_of(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(program);
        cmd.arg("--config").arg(&self.config_path).args(args);
        // Only the config decides: nothing inherited from the developer's shell.
        cmd.env_remove("UPDOG_BACKUP_CONFIG")
            .env_remove("PGSSLMODE")
            .env_remove("PGSSLROOTCERT")
            .env("UPDOG_BACKUP_LOG", "warn");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// What a superuser does when `init` may not: installs the schema-change triggers in
    /// `db` with the script `updog-backup schema-triggers` prints.
    pub async fn install_schema_triggers(&self, db: &str) {
        let script = self.dir.path().join("schema-triggers.sql");
        std::fs::write(&script, self.ok(&["schema-triggers"])).unwrap();
        postgres::cluster()
            .await
            .psql(db, &["-f", script.to_str().unwrap()]);
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "updog-backup {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Whether the binary knows the setting that the override `var` sets (unknown keys are
    /// configuration errors that name the key): a test or bench written ahead of a setting
    /// runs without it until the binary has it.
    pub fn accepts_setting(&self, var: &str, value: &str) -> bool {
        let out = self.command(&["list"]).env(var, value).output().unwrap();
        let key = var.rsplit("__").next().unwrap_or(var).to_ascii_lowercase();
        !String::from_utf8_lossy(&out.stderr).contains(&format!("unknown field `{key}`"))
    }

    /// What the tables' owner does before `init`, as `check` asks: every `REPLICA IDENTITY
    /// FULL` it names, run on `source` (a connection as the owner).
    pub async fn apply_identity_fixes(&self, source: &tokio_postgres::Client) {
        let out = self.run(&["check", "--json"]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "check --json: {e}\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        for finding in report["findings"].as_array().unwrap() {
            if let Some(fix) = finding["fix"].as_str()
                && fix.contains("REPLICA IDENTITY FULL")
            {
                source
                    .batch_execute(fix)
                    .await
                    .unwrap_or_else(|e| panic!("{fix}: {e}"));
            }
        }
    }

    /// Runs and asserts the exit code; returns stderr (where errors are reported).
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(code),
            "updog-backup {args:?}: expected exit {code}\nstdout: {}\nstderr: {stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        stderr
    }
}

/// Tenant k of the fixture generator (1 is the largest): `md5('org-' || k)::uuid`.
pub async fn fixture_tenant(k: u32) -> String {
    let client = postgres::cluster().await.client("postgres").await;
    client
        .query_one("SELECT md5('org-' || $1::int)::uuid::text", &[&(k as i32)])
        .await
        .unwrap()
        .get(0)
}

/// Replaces the publication with one `FOR TABLE` every table there is now (what `init`
/// creates), not `FOR ALL TABLES`: a table created later is not in it.
pub async fn publish_tables_of_today(source: &tokio_postgres::Client) {
    source
        .batch_execute(
            "DO $$ DECLARE tables text; BEGIN
               SELECT string_agg(format('%I.%I', schemaname, tablename), ', ') INTO tables
                 FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema');
               DROP PUBLICATION updog_backup;
               EXECUTE 'CREATE PUBLICATION updog_backup FOR TABLE ' || tables;
             END $$",
        )
        .await
        .unwrap();
}

/// A plain HTTP/1.1 GET on loopback: (status code, body).
pub fn http_get(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    try_http_get(addr, path, token).unwrap_or_else(|| panic!("nothing listens on {addr}"))
}

/// [`http_get`], or `None` while nothing listens on `addr` yet.
pub fn try_http_get(
    addr: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Samples of a Prometheus text exposition: "name{labels}" → value.
pub fn parse_metrics(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample {l:?}"));
            (
                name.to_string(),
                value.parse().unwrap_or_else(|_| panic!("bad value {l:?}")),
            )
        })
        .collect()
}

/// Every file below `dir`, sorted (a repository's objects, to see that nothing changed).
pub fn files_under(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p))
            } else {
                out.push(p)
            }
        }
    }
    out.sort();
    out
}

pub async fn database_exists(name: &str) -> bool {
    postgres::cluster()
        .await
        .client("postgres")
        .await
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)",
            &[&name],
        )
        .await
        .unwrap()
        .get(0)
}

pub async fn drop_database(name: &str) {
    postgres::cluster()
        .await
        .client("postgres")
        .await
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await
        .unwrap();
}

/// `restore --org <tenant> --latest --target-db <target>`: the restore most tests run.
pub fn restore_latest<'a>(tenant: &'a str, target: &'a str) -> [&'a str; 6] {
    [
        "restore",
        "--org",
        tenant,
        "--latest",
        "--target-db",
        target,
    ]
}
