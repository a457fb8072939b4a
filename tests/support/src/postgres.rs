//! A private PostgreSQL cluster per test binary (never the system one), started on first use
//! and stopped when the test process exits; one fresh database per test.
//!
//! Binaries come from `$UPDOG_BACKUP_TEST_PG_BIN` or Debian's `/usr/lib/postgresql/<newest>/bin`.
//! As root (CI), the cluster runs as the `postgres` user. `wal_level=logical` and
//! `logical_decoding_work_mem=64kB` so tests exercise logical decoding and streaming.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Mutex;

pub struct Cluster {
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub port: u16,
    /// Template databases holding the reference fixture, by (tenants, scale).
    templates: Mutex<Vec<(u32, String, String)>>,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// `$UPDOG_BACKUP_TEST_PG_BIN`, else the newest Debian-installed server.
fn pg_bin() -> PathBuf {
    if let Some(dir) = std::env::var_os("UPDOG_BACKUP_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut majors: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    majors.sort_unstable();
    let major = majors
        .into_iter()
        .rev()
        .find(|m| Path::new(&format!("/usr/lib/postgresql/{m}/bin/initdb")).exists())
        .unwrap_or(15);
    PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"))
}

/// Whether this process runs as root (then clusters run as the `postgres` user).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a PostgreSQL server program as the cluster's owner.
fn as_owner(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn free_port() -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if port < 55000 {
            return port;
        }
    }
}

/// The binary's cluster, started on first call.
pub async fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(start)
}

/// What sets an extra cluster apart from the shared one (which has the same server options).
pub struct ClusterSpec<'a> {
    /// Suffix of its directory, `$TMPDIR/updog-backup-tests/pg-<pid>-<name>`.
    pub name: &'a str,
    /// The whole pg_hba.conf.
    pub hba: &'a str,
    /// Server options after the shared ones (`-c ssl=on …`).
    pub extra_options: &'a str,
    /// Runs with the cluster's directory after initdb, before the server starts (e.g. to write
    /// certificates there); whatever it writes is handed to the cluster's owner afterwards.
    pub prepare: &'a dyn Fn(&Path),
    /// Extensions this server must not have, as on a server without their package: it runs
    /// from a copy of the installation whose share directory lacks their files
    /// ([`installation_without`]).
    pub without_extensions: &'a [&'a str],
}

const SHARED_HBA: &str = "# Password roles of the replication tests; everything else is trusted (loopback only).\n\
     host all updog_test_auth_scram 127.0.0.1/32 scram-sha-256\n\
     host all updog_test_auth_md5 127.0.0.1/32 md5\n\
     host all updog_test_auth_password 127.0.0.1/32 password\n\
     local all all trust\nhost all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n";

fn start() -> Cluster {
    start_with(&ClusterSpec {
        name: "",
        hba: SHARED_HBA,
        extra_options: "",
        prepare: &|_| {},
        without_extensions: &[],
    })
}

/// Another cluster of this binary's own (never the shared one), with the fixture's roles, stopped
/// and deleted when the process exits like the shared one. Blocks while it starts: call it from
/// a `OnceLock` as [`cluster`] does.
pub fn start_extra(spec: &ClusterSpec) -> Cluster {
    assert!(!spec.name.is_empty(), "an extra cluster needs a name");
    start_with(spec)
}

fn start_with(spec: &ClusterSpec) -> Cluster {
    let installed = pg_bin();
    assert!(
        installed.join("initdb").exists(),
        "no PostgreSQL server at {}: install postgresql-15 or set UPDOG_BACKUP_TEST_PG_BIN",
        installed.display()
    );
    // Under the system temp directory, not the checkout: as root the server runs as the
    // `postgres` user, who may not be able to traverse the checkout's parents (e.g. /root).
    let base = std::env::temp_dir().join("updog-backup-tests");
    std::fs::create_dir_all(&base).unwrap();
    let dir = match spec.name {
        "" => base.join(format!("pg-{}", std::process::id())),
        name => base.join(format!("pg-{}-{name}", std::process::id())),
    };
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if is_root() {
        run(Command::new("chown").arg("postgres:").arg(&dir), "chown");
    }
    // Inside the cluster's directory: deleted with it.
    let bin = if spec.without_extensions.is_empty() {
        installed
    } else {
        installation_without(
            &installed,
            &dir.join("installation"),
            spec.without_extensions,
        )
    };
    let data = dir.join("data");
    run(
        as_owner(&bin.join("initdb")).arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]),
        "initdb",
    );
    std::fs::write(data.join("pg_hba.conf"), spec.hba).unwrap();
    (spec.prepare)(&dir);
    if is_root() {
        run(
            Command::new("chown").args(["-R", "postgres:"]).arg(&dir),
            "chown",
        );
    }
    let port = free_port();
    let options = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c wal_level=logical -c max_replication_slots=100 -c max_wal_senders=60 \
         -c max_connections=200 -c track_commit_timestamp=on -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
         -c logical_decoding_work_mem=64kB -c password_encryption=scram-sha-256 {}",
        dir.display(),
        spec.extra_options
    );
    run(
        as_owner(&bin.join("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("log"))
            .args(["-w", "-o", &options, "start"]),
        "pg_ctl start",
    );
    // Stop the cluster and delete it when this test process is gone, however it ends.
    let pid = std::process::id();
    let watchdog = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; kill -QUIT $(head -1 {data}/postmaster.pid) 2>/dev/null; sleep 2; rm -rf {dir}",
        data = data.display(),
        dir = dir.display()
    );
    // Never waited for on purpose: it must outlive this process (init reaps it).
    #[allow(clippy::zombie_processes)]
    Command::new("sh")
        .args(["-c", &watchdog])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("watchdog");
    let cluster = Cluster {
        bin,
        dir,
        port,
        templates: Mutex::new(Vec::new()),
    };
    // The fixture's roles are cluster-wide: create them once, before tests run in parallel.
    let schema =
        std::fs::read_to_string(crate::repo_root().join("tests/fixtures/updog_schema.sql"))
            .unwrap();
    let roles = &schema[..schema
        .find("CREATE EXTENSION")
        .expect("the fixture creates its roles first")];
    cluster.psql("postgres", &["-c", roles]);
    // The fixture's CONNECTION LIMIT 10 budgets one deployment (an active daemon: 2, a standby:
    // 1, a snapshot: snapshot.parallel + 2). Tests run several deployments side by side on this
    // one cluster.
    cluster.psql(
        "postgres",
        &["-c", "ALTER ROLE updog_backup CONNECTION LIMIT 60"],
    );
    cluster
}

/// A copy of the PostgreSQL installation at `bin` under `root`, without the files of
/// `extensions`; returns its bin directory. PostgreSQL finds its share directory (where the
/// extensions' control and script files are) and its library directory relative to its own
/// executable, when the executable sits where the build's bin directory would be under
/// another prefix. So the server programs are copied (a symbolic link would be followed back
/// to the original), everything else is linked, and the extension directory holds links to
/// every file but those of `extensions`.
pub fn installation_without(bin: &Path, root: &Path, extensions: &[&str]) -> PathBuf {
    let out = Command::new(bin.join("pg_config"))
        .args(["--bindir", "--sharedir", "--pkglibdir"])
        .output()
        .expect("pg_config");
    let dirs: Vec<PathBuf> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(PathBuf::from)
        .collect();
    let under_root = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let (bindir, sharedir, pkglibdir) = (&dirs[0], &dirs[1], &dirs[2]);
    let new_bin = under_root(bindir);
    std::fs::create_dir_all(&new_bin).unwrap();
    for entry in std::fs::read_dir(bin).unwrap().flatten() {
        let name = entry.file_name();
        let target = new_bin.join(&name);
        if ["postgres", "initdb", "pg_ctl"].contains(&name.to_str().unwrap_or("")) {
            std::fs::copy(entry.path(), &target).unwrap();
        } else {
            std::os::unix::fs::symlink(entry.path(), &target).unwrap();
        }
    }
    let new_lib = under_root(pkglibdir);
    std::fs::create_dir_all(new_lib.parent().unwrap()).unwrap();
    if !new_lib.exists() {
        std::os::unix::fs::symlink(pkglibdir, &new_lib).unwrap();
    }
    let new_share = under_root(sharedir);
    std::fs::create_dir_all(new_share.join("extension")).unwrap();
    for entry in std::fs::read_dir(sharedir).unwrap().flatten() {
        if entry.file_name() != "extension" {
            std::os::unix::fs::symlink(entry.path(), new_share.join(entry.file_name())).unwrap();
        }
    }
    for entry in std::fs::read_dir(sharedir.join("extension"))
        .unwrap()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let left_out = extensions
            .iter()
            .any(|e| name == format!("{e}.control") || name.starts_with(&format!("{e}--")));
        if !left_out {
            std::os::unix::fs::symlink(entry.path(), new_share.join("extension").join(&name))
                .unwrap();
        }
    }
    new_bin
}

impl Cluster {
    pub fn url(&self, user: &str, db: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{db}", self.port)
    }

    pub fn config(&self, db: &str) -> tokio_postgres::Config {
        self.url("postgres", db).parse().unwrap()
    }

    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        client_for(&self.url("postgres", db)).await
    }

    /// Restarts the server with `pg_ctl restart -m <mode>` (`fast` or `immediate`), same
    /// options; every connection breaks.
    pub fn restart(&self, mode: &str) {
        run(
            as_owner(&self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(self.dir.join("data"))
                .arg("-l")
                .arg(self.dir.join("log"))
                .args(["-w", "-m", mode, "restart"]),
            &format!("pg_ctl restart -m {mode}"),
        );
    }

    /// Runs a SQL file (or `-c` text) with psql as the superuser.
    pub fn psql(&self, db: &str, args: &[&str]) {
        run(
            Command::new(self.bin.join("psql"))
                .args([
                    "-X",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-h",
                    "127.0.0.1",
                    "-U",
                    "postgres",
                    "-p",
                    &self.port.to_string(),
                    "-d",
                    db,
                ])
                .args(args),
            &format!("psql {args:?}"),
        );
    }

    /// A new empty database.
    pub async fn fresh_db(&self, name_hint: &str) -> String {
        let name = unique_db_name(name_hint);
        self.client("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap();
        name
    }

    /// A new database holding the reference schema and data (`tenants`, `scale` as in
    /// updog_data.sql), copied from a template made once per binary.
    pub async fn fixture_db(&self, name_hint: &str, tenants: u32, scale: &str) -> String {
        let template = {
            let mut templates = self.templates.lock().await;
            match templates
                .iter()
                .find(|(t, s, _)| *t == tenants && s == scale)
            {
                Some((_, _, name)) => name.clone(),
                None => {
                    let name = self.fresh_db(&format!("fixture_t{tenants}")).await;
                    let fixtures = crate::repo_root().join("tests/fixtures");
                    self.psql(
                        &name,
                        &["-f", fixtures.join("updog_schema.sql").to_str().unwrap()],
                    );
                    self.psql(
                        &name,
                        &[
                            "-v",
                            &format!("tenants={tenants}"),
                            "-v",
                            &format!("scale={scale}"),
                            "-f",
                            fixtures.join("updog_data.sql").to_str().unwrap(),
                        ],
                    );
                    templates.push((tenants, scale.to_string(), name.clone()));
                    name
                }
            }
        };
        let name = unique_db_name(name_hint);
        self.client("postgres")
            .await
            .batch_execute(&format!(
                "CREATE DATABASE \"{name}\" TEMPLATE \"{template}\""
            ))
            .await
            .unwrap();
        name
    }
}

pub async fn client_for(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(connection);
    client
}

/// A database name from `hint`, unique in this test binary.
fn unique_db_name(hint: &str) -> String {
    format!(
        "{}_{}",
        hint.to_ascii_lowercase()
            .replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}
