//! TLS end to end: a second cluster of its own with `ssl=on`, a CA and a server certificate
//! (for 127.0.0.1 and localhost) made with the `openssl` CLI at test time, and a pg_hba.conf that
//! admits every role but the superuser over TLS only (`hostssl`, with `hostnossl … reject`), so a
//! connection that succeeds there is encrypted. The shared cluster has no TLS: it is where
//! `prefer` must fall back and `require` must refuse.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use updog_backup::pg::ConnectError;
use updog_backup::pg::pg_config;
use updog_backup::pg::replication::{ReplicationConnection, ReplicationError};
use updog_backup::retry::Classify as _;

use crate::support::postgres::{Cluster, ClusterSpec, cluster, start_extra};
use crate::support::restore_latest;
use crate::support::{Repo, TestEnv, fixture_tenant};

struct TlsCluster {
    pg: Cluster,
    /// The CA that signed the server certificate.
    ca: PathBuf,
    /// A CA that signed nothing the server has.
    other_ca: PathBuf,
}

static TLS_CLUSTER: OnceLock<TlsCluster> = OnceLock::new();

/// The superuser may connect either way (the harness's psql and clients are plain); every other
/// role, the fixture's `updog_backup` and `updog_restore` included, only over TLS.
const HBA: &str = "local all all trust\n\
    host all postgres 127.0.0.1/32 trust\n\
    hostssl all all 127.0.0.1/32 trust\n\
    hostssl replication all 127.0.0.1/32 trust\n\
    hostnossl all all 127.0.0.1/32 reject\n\
    hostnossl replication all 127.0.0.1/32 reject\n";

const OPENSSL_CONFIG: &str = "[req]\n\
    distinguished_name = dn\n\
    prompt = no\n\
    [dn]\n\
    CN = unused\n\
    [ca]\n\
    basicConstraints = critical, CA:TRUE\n\
    keyUsage = critical, keyCertSign, cRLSign\n\
    subjectKeyIdentifier = hash\n\
    [server]\n\
    basicConstraints = critical, CA:FALSE\n\
    keyUsage = critical, digitalSignature\n\
    extendedKeyUsage = serverAuth\n\
    subjectAltName = IP:127.0.0.1, DNS:localhost\n\
    subjectKeyIdentifier = hash\n\
    authorityKeyIdentifier = keyid\n";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("the openssl CLI (Debian: openssl, a dependency of postgresql's ssl-cert)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `tls/ca.crt`, `tls/server.{crt,key}` (CN 127.0.0.1; SAN 127.0.0.1 and localhost) and an
/// unrelated `tls/other-ca.crt`. EC P-256 keys: quick to make, and what rustls verifies natively.
fn make_certificates(cluster_dir: &Path) {
    let dir = cluster_dir.join("tls");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("openssl.cnf"), OPENSSL_CONFIG).unwrap();
    let new_key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for (name, subject) in [
        ("ca", "/CN=updog test CA"),
        ("other-ca", "/CN=updog other CA"),
    ] {
        let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
        let mut args = vec!["req", "-x509", "-new", "-config", "openssl.cnf"];
        args.extend(new_key);
        args.extend([
            "-keyout",
            &key,
            "-out",
            &crt,
            "-days",
            "3",
            "-subj",
            subject,
            "-extensions",
            "ca",
        ]);
        openssl(&dir, &args);
    }
    let mut args = vec!["req", "-new", "-config", "openssl.cnf"];
    args.extend(new_key);
    args.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(&dir, &args);
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "3",
            "-extfile",
            "openssl.cnf",
            "-extensions",
            "server",
        ],
    );
    // PostgreSQL refuses a key file that others can read.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
}

fn tls_cluster() -> &'static TlsCluster {
    TLS_CLUSTER.get_or_init(|| {
        let pg = start_extra(&ClusterSpec {
            name: "tls",
            hba: HBA,
            // Relative to the data directory, where the server runs.
            extra_options: "-c ssl=on -c ssl_cert_file=../tls/server.crt -c ssl_key_file=../tls/server.key",
            prepare: &make_certificates,
            without_extensions: &[],
        });
        let tls = pg.dir.join("tls");
        TlsCluster {
            ca: tls.join("ca.crt"),
            other_ca: tls.join("other-ca.crt"),
            pg,
        }
    })
}

impl TlsCluster {
    /// A URL for the TLS-only `updog_backup` role (LOGIN REPLICATION) with `params`.
    fn url(&self, host: &str, db: &str, params: &str) -> String {
        format!(
            "postgres://updog_backup@{host}:{}/{db}?{params}",
            self.pg.port
        )
    }
}

/// Whether the session on `client` is encrypted, as the server sees it.
async fn client_uses_tls(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn replication(url: &str) -> Result<ReplicationConnection, ReplicationError> {
    let target = pg_config(url).unwrap();
    ReplicationConnection::connect_tls(&target.config, &target.tls).await
}

/// Connects a walsender, checks IDENTIFY_SYSTEM, and says whether it is encrypted.
async fn replication_uses_tls(url: &str) -> bool {
    let mut connection = replication(url)
        .await
        .unwrap_or_else(|e| panic!("replication connection to {url}: {e}"));
    let system = connection.identify_system().await.unwrap();
    assert!(!system.system_id.is_empty());
    let rows = connection
        .simple_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .await
        .unwrap();
    connection.close().await.unwrap();
    rows[0].get("ssl") == Some("t")
}

async fn client_error(url: &str) -> ConnectError {
    match updog_backup::pg::connect(url).await {
        Ok(_) => panic!("{url} connected"),
        Err(e) => e,
    }
}

async fn replication_error(url: &str) -> ReplicationError {
    match replication(url).await {
        Ok(_) => panic!("replication to {url} connected"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn require_encrypts_client_and_replication_connections() {
    let tls = tls_cluster();
    for params in ["sslmode=require", "sslmode=prefer", ""] {
        let url = tls.url("127.0.0.1", "postgres", params);
        let client = updog_backup::pg::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert!(client_uses_tls(&client).await, "{url}");
        assert!(replication_uses_tls(&url).await, "{url}");
    }
}

#[tokio::test]
async fn verify_full_checks_the_chain_and_the_host_name() {
    let tls = tls_cluster();
    let params = format!("sslmode=verify-full&sslrootcert={}", tls.ca.display());
    for host in ["localhost", "127.0.0.1"] {
        let url = tls.url(host, "postgres", &params);
        let client = updog_backup::pg::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert!(client_uses_tls(&client).await);
        assert!(replication_uses_tls(&url).await, "{url}");
    }
    // The key/value form and PGSSLROOTCERT-style values take the same path.
    let url = format!(
        "host=localhost port={} user=updog_backup dbname=postgres sslmode=verify-full sslrootcert='{}'",
        tls.pg.port,
        tls.ca.display()
    );
    updog_backup::pg::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_clearly() {
    let tls = tls_cluster();
    let other = tls.other_ca.display().to_string();
    // require with a root certificate verifies the chain too (libpq: "the same as verify-ca").
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = tls.url(
            "localhost",
            "postgres",
            &format!("sslmode={mode}&sslrootcert={other}"),
        );
        let err = client_error(&url).await;
        assert!(matches!(err, ConnectError::Tls { .. }), "{mode}: {err:?}");
        let message = err.to_string();
        assert!(
            message.contains("not signed by a CA in sslrootcert")
                && message.contains(&other)
                && message.contains("set sslrootcert"),
            "{mode}: {message}"
        );
        let err = replication_error(&url).await;
        assert!(matches!(err, ReplicationError::Tls(_)), "{mode}: {err:?}");
        assert!(!err.class().is_transient());
        assert!(
            err.to_string().contains("not signed by a CA"),
            "{mode}: {err}"
        );
    }
}

#[tokio::test]
async fn a_host_name_the_certificate_lacks_needs_verify_ca() {
    let tls = tls_cluster();
    // hostaddr says where to connect; host is the name the certificate must carry.
    let url = |mode: &str| {
        tls.url(
            "wrong-name.invalid",
            "postgres",
            &format!(
                "hostaddr=127.0.0.1&sslmode={mode}&sslrootcert={}",
                tls.ca.display()
            ),
        )
    };
    let message = client_error(&url("verify-full")).await.to_string();
    assert!(
        message.contains("(for 127.0.0.1, localhost) is not valid for host wrong-name.invalid")
            && message.contains("sslmode=verify-ca"),
        "{message}"
    );
    let message = replication_error(&url("verify-full")).await.to_string();
    assert!(
        message.contains("not valid for host wrong-name.invalid"),
        "{message}"
    );
    // verify-ca checks the chain only.
    let client = updog_backup::pg::connect(&url("verify-ca")).await.unwrap();
    assert!(client_uses_tls(&client).await);
    assert!(replication_uses_tls(&url("verify-ca")).await);
}

#[tokio::test]
async fn disable_is_refused_by_the_server_for_a_tls_only_role() {
    let tls = tls_cluster();
    let url = tls.url("127.0.0.1", "postgres", "sslmode=disable");
    let message = client_error(&url).await.to_string();
    assert!(
        message.contains("no encryption") && message.contains("sslmode=require"),
        "{message}"
    );
    let err = replication_error(&url).await;
    assert!(matches!(err, ReplicationError::Tls(_)), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("no encryption") && message.contains("sslmode=require"),
        "{message}"
    );
}

#[tokio::test]
async fn a_server_without_tls_is_refused_unless_prefer() {
    let pg = cluster().await;
    let db = pg.fresh_db("tls_plain").await;
    for mode in ["require", "verify-full"] {
        let url = format!("{}?sslmode={mode}", pg.url("updog_backup", &db));
        let err = client_error(&url).await;
        assert!(matches!(err, ConnectError::Tls { .. }), "{mode}: {err:?}");
        assert!(
            err.to_string()
                .contains(&format!("does not support TLS but sslmode={mode}")),
            "{err}"
        );
        let err = replication_error(&url).await;
        assert!(
            err.to_string()
                .contains(&format!("does not support TLS but sslmode={mode}")),
            "{err}"
        );
        assert!(!err.class().is_transient());
    }
    // prefer (explicit or libpq's default) falls back to a plain connection.
    for suffix in ["?sslmode=prefer", ""] {
        let url = format!("{}{suffix}", pg.url("updog_backup", &db));
        let client = updog_backup::pg::connect(&url).await.unwrap();
        assert!(!client_uses_tls(&client).await, "{url}");
        assert!(!replication_uses_tls(&url).await, "{url}");
    }
}

/// The binary end to end over verified TLS: `init` and `backup` (replication connection, the
/// exporters' clients, pg_dump through PGSSLMODE/PGSSLROOTCERT) and `restore` (the target's
/// clients), all as roles the server admits over TLS only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_restore_over_verified_tls() {
    let tls = tls_cluster();
    let db = tls.pg.capture_fixture_db("tls_source", 4, "0.1").await;
    let params = format!("sslmode=verify-full&sslrootcert={}", tls.ca.display());
    let target = format!(
        "postgres://updog_restore@localhost:{}/postgres?{params}",
        tls.pg.port
    );
    let env = TestEnv::with_urls(
        &tls.url("localhost", &db, &params),
        &target,
        Repo::Directory,
    )
    .await;
    tls.pg.psql(
        &db,
        &["-c", "CREATE PUBLICATION updog_backup FOR ALL TABLES"],
    );
    env.ok(&["init"]);
    let out = env.ok(&["backup"]);
    assert!(out.contains("4 tenant(s)"), "{out}");
    let tenant = fixture_tenant(2).await;
    let target = format!("recovered_{db}");
    let out = env.ok(&restore_latest(&tenant, &target));
    assert!(out.contains(&format!("into database {target}")), "{out}");

    let source = tls.pg.client(&db).await;
    let recovered = tls.pg.client(&target).await;
    let mut rows = 0;
    for (table, filter) in [
        ("app.organizations", format!("id = '{tenant}'")),
        ("app.funds", format!("organization_id = '{tenant}'")),
        (
            "app.investment_lots",
            format!(
                "investment_id IN (SELECT i.id FROM app.investments i JOIN app.funds f \
                 ON f.id = i.fund_id WHERE f.organization_id = '{tenant}')"
            ),
        ),
    ] {
        let expected = crate::snapshot_restore::digest(&source, table, Some(&filter)).await;
        let found = crate::snapshot_restore::digest(&recovered, table, None).await;
        assert_eq!(found, expected, "{table} of tenant {tenant}");
        rows += expected.0;
    }
    assert!(rows > 0, "tenant {tenant} has rows");
}
