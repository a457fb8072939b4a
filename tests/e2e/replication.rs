//! The replication connection against a real PostgreSQL (the shared harness cluster).
//!
//! What these prove, beyond the unit tests' scripted server: the walsender accepts our startup
//! packet and our replication command syntax; `IDENTIFY_SYSTEM` names the cluster the SQL side
//! sees; an exported snapshot shows exactly the rows committed before the slot's consistent point;
//! SCRAM-SHA-256, MD5 and cleartext authentication work against the server's own implementation;
//! and failures come back typed, with the right retryability.
//!
//! Slots and roles are cluster-wide, so every name here is unique per test run.

use std::time::Duration;

use tokio_postgres::Config;
use tokio_postgres::config::Host;
use tokio_postgres::types::PgLsn;
use updog_backup::pg::Lsn;
use updog_backup::pg::replication::{
    ReplicationConnection, ReplicationError, SlotSnapshot, SystemIdentity,
};
use updog_backup::retry::Classify as _;

use crate::support::postgres;

/// A slot name no other test (or earlier run) uses.
fn unique_slot(purpose: &str) -> String {
    format!("updog_test_{purpose}_{:016x}", fastrand::u64(..))
}

async fn connect(config: &Config) -> ReplicationConnection {
    ReplicationConnection::connect(config)
        .await
        .unwrap_or_else(|e| panic!("replication connection to {config:?}: {e}"))
}

async fn slot_exists(client: &tokio_postgres::Client, slot: &str) -> bool {
    client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("pg_replication_slots")
        .is_some()
}

#[tokio::test]
async fn identify_system_names_the_cluster_the_sql_side_sees() {
    let pg = postgres::cluster().await;
    let db = pg.fresh_db("repl_identify").await;
    let client = pg.client(&db).await;
    let before: PgLsn = client
        .query_one("SELECT pg_current_wal_flush_lsn()", &[])
        .await
        .expect("wal lsn")
        .get(0);

    let mut replication = connect(&pg.config(&db)).await;
    assert!(replication.backend_pid().is_some());
    assert!(replication.parameter("server_version").is_some());
    let SystemIdentity {
        system_id,
        timeline,
        xlogpos,
        dbname,
    } = replication
        .identify_system()
        .await
        .expect("IDENTIFY_SYSTEM");

    let row = client
        .query_one(
            "SELECT system_identifier::text, timeline_id::int8 FROM pg_control_system(), \
             pg_control_checkpoint()",
            &[],
        )
        .await
        .expect("pg_control_system");
    assert_eq!(system_id, row.get::<_, String>(0));
    assert!(timeline >= 1);
    assert_eq!(i64::from(timeline), row.get::<_, i64>(1));
    assert!(xlogpos >= Lsn::from(before), "{xlogpos} < {before}");
    assert_eq!(dbname.as_deref(), Some(db.as_str()));

    // The walsender also runs plain SQL with replication=database.
    let rows = replication
        .simple_query("SELECT current_database() AS db, NULL::text AS nothing")
        .await
        .expect("SQL on a walsender");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get("db"), Some(db.as_str()));
    assert_eq!(rows[0].values()[1], None);
    replication.close().await.expect("close");
}

#[tokio::test]
async fn exported_snapshot_sees_exactly_the_rows_committed_before_the_slot() {
    let pg = postgres::cluster().await;
    let db = pg.fresh_db("repl_snapshot").await;
    let writer = pg.client(&db).await;
    writer
        .batch_execute(
            "CREATE TABLE items (id int PRIMARY KEY); INSERT INTO items VALUES (1), (2);",
        )
        .await
        .expect("setup");

    let mut replication = connect(&pg.config(&db)).await;
    let slot = unique_slot("snapshot");
    let created = replication
        .create_logical_slot(&slot, true, SlotSnapshot::Export)
        .await
        .expect("CREATE_REPLICATION_SLOT");
    assert_eq!(created.slot_name, slot);
    let snapshot_name = created.snapshot_name.clone().expect("exported snapshot");
    assert!(!created.consistent_point.is_invalid());

    // Committed after the consistent point: belongs to the stream, not the snapshot.
    writer
        .batch_execute("INSERT INTO items VALUES (3); DELETE FROM items WHERE id = 1;")
        .await
        .expect("later writes");

    let mut reader = pg.client(&db).await;
    let transaction = reader.transaction().await.expect("begin");
    transaction
        .batch_execute(&format!(
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; \
             SET TRANSACTION SNAPSHOT '{snapshot_name}'"
        ))
        .await
        .expect("import the exported snapshot");
    let ids: Vec<i32> = transaction
        .query("SELECT id FROM items ORDER BY id", &[])
        .await
        .expect("read through the snapshot")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [1, 2]);
    transaction.commit().await.expect("commit");

    let row = writer
        .query_one(
            "SELECT temporary, database FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("slot listed");
    assert!(row.get::<_, bool>(0), "temporary slot");
    assert_eq!(row.get::<_, String>(1), db);

    // A temporary slot ends with its session.
    replication.close().await.expect("close");
    let mut gone = false;
    for _ in 0..100 {
        if !slot_exists(&writer, &slot).await {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "temporary slot {slot} outlived its connection");
}

#[tokio::test]
async fn persistent_slots_are_created_and_dropped() {
    let pg = postgres::cluster().await;
    let db = pg.fresh_db("repl_slots").await;
    let client = pg.client(&db).await;
    let mut replication = connect(&pg.config(&db)).await;
    let slot = unique_slot("persistent");

    let created = replication
        .create_logical_slot(&slot, false, SlotSnapshot::NoExport)
        .await
        .expect("create");
    assert_eq!(created.snapshot_name, None);
    let confirmed: Option<PgLsn> = client
        .query_one(
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1 \
             AND NOT temporary AND plugin = 'pgoutput'",
            &[&slot],
        )
        .await
        .expect("persistent pgoutput slot listed")
        .get(0);
    assert_eq!(confirmed.map(Lsn::from), Some(created.consistent_point));

    let err = replication
        .create_logical_slot(&slot, false, SlotSnapshot::NoExport)
        .await
        .expect_err("duplicate slot");
    assert_eq!(err.code(), Some("42710"), "{err}");
    assert!(!err.class().is_transient());

    // The connection survives the error.
    replication.drop_slot(&slot, false).await.expect("drop");
    assert!(!slot_exists(&client, &slot).await);
    let err = replication
        .drop_slot(&slot, true)
        .await
        .expect_err("already dropped");
    assert_eq!(err.code(), Some("42704"), "{err}");

    let err = replication
        .create_logical_slot("Not-Valid", false, SlotSnapshot::NoExport)
        .await
        .expect_err("invalid name");
    assert!(
        matches!(err, ReplicationError::InvalidSlotName { .. }),
        "{err:?}"
    );
    replication.close().await.expect("close");
}

#[tokio::test]
async fn server_errors_keep_the_connection_usable() {
    let pg = postgres::cluster().await;
    let db = pg.fresh_db("repl_errors").await;
    let mut replication = connect(&pg.config(&db)).await;
    let err = replication
        .simple_query("SELECT * FROM no_such_table")
        .await
        .expect_err("missing table");
    assert_eq!(err.code(), Some("42P01"), "{err}");
    let err = replication
        .simple_query("CREATE_REPLICATION_SLOT")
        .await
        .expect_err("bad syntax");
    assert_eq!(err.code(), Some("42601"), "{err}");
    replication.identify_system().await.expect("still usable");
    replication.close().await.expect("close");
}

#[tokio::test]
async fn a_role_without_replication_is_refused_permanently() {
    let pg = postgres::cluster().await;
    let db = pg.fresh_db("repl_norepl").await;
    let role = format!("updog_test_norepl_{:08x}", fastrand::u32(..));
    let admin = pg.client(&db).await;
    admin
        .batch_execute(&format!("CREATE ROLE {role} LOGIN NOREPLICATION"))
        .await
        .expect("create role");

    let mut config = pg.config(&db);
    config.user(&role);
    let err = ReplicationConnection::connect(&config)
        .await
        .expect_err("no REPLICATION attribute");
    admin
        .batch_execute(&format!("DROP ROLE {role}"))
        .await
        .expect("drop role");
    assert_eq!(err.code(), Some("42501"), "{err}");
    assert!(!err.class().is_transient());
}

#[tokio::test]
async fn unix_socket_connects() {
    let pg = postgres::cluster().await;
    let db = pg.fresh_db("repl_unix").await;
    let client = pg.client(&db).await;
    let dirs: String = client
        .query_one("SELECT current_setting('unix_socket_directories')", &[])
        .await
        .expect("unix_socket_directories")
        .get(0);
    let Some(dir) = dirs.split(',').map(str::trim).find(|d| d.starts_with('/')) else {
        eprintln!("unix_socket_connects: the cluster listens on no Unix socket; nothing to test");
        return;
    };
    let base = pg.config(&db);
    let mut config = Config::new();
    config
        .host_path(dir)
        .port(base.get_ports().first().copied().unwrap_or(5432))
        .dbname(&db);
    if let Some(user) = base.get_user() {
        config.user(user);
    }
    if let Some(password) = base.get_password() {
        config.password(password);
    }
    assert!(matches!(config.get_hosts(), [Host::Unix(_)]));
    let mut replication = connect(&config).await;
    let identity = replication
        .identify_system()
        .await
        .expect("IDENTIFY_SYSTEM");
    assert_eq!(identity.dbname.as_deref(), Some(db.as_str()));
    replication.close().await.expect("close");
}

#[tokio::test]
async fn an_unreachable_server_is_a_retryable_io_error() {
    // A port that was just free: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let config: Config = format!("host=127.0.0.1 port={port} user=nobody connect_timeout=5")
        .parse()
        .expect("config");
    let err = ReplicationConnection::connect(&config)
        .await
        .expect_err("refused");
    assert!(matches!(err, ReplicationError::Io { .. }), "{err:?}");
    assert!(err.class().is_transient());
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

#[tokio::test]
async fn a_silent_server_times_out_as_a_retryable_io_error() {
    // Accepts the TCP connection and never says a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let silent = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.expect("accept");
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(socket);
    });
    let mut config: Config = format!("host=127.0.0.1 port={port} user=nobody")
        .parse()
        .expect("config");
    config.connect_timeout(Duration::from_millis(300));
    let err = ReplicationConnection::connect(&config)
        .await
        .expect_err("timed out");
    silent.abort();
    match &err {
        ReplicationError::Io { source, .. } => {
            assert_eq!(source.kind(), std::io::ErrorKind::TimedOut);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(err.class().is_transient());
}

// ---- password authentication ----
//
// These need a server that asks for passwords. The harness cluster's pg_hba.conf names these
// test roles (only them) with the method each one tests; `password_roles` creates the roles
// with passwords generated for this run.

/// Generated per run: no credential lives in the repository.
static PASSWORD: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| (0..24).map(|_| fastrand::alphanumeric()).collect());

#[derive(Clone, Copy)]
enum Method {
    Scram,
    Md5,
    Cleartext,
}

impl Method {
    fn role(self) -> &'static str {
        match self {
            Method::Scram => "updog_test_auth_scram",
            Method::Md5 => "updog_test_auth_md5",
            Method::Cleartext => "updog_test_auth_password",
        }
    }

    /// How the role's password is stored: an md5 hash makes an `md5` hba line use MD5 (with a
    /// SCRAM verifier the server would upgrade the exchange to SCRAM).
    fn password_encryption(self) -> &'static str {
        match self {
            Method::Md5 => "md5",
            Method::Scram | Method::Cleartext => "scram-sha-256",
        }
    }
}

const METHODS: [Method; 3] = [Method::Scram, Method::Md5, Method::Cleartext];

static PASSWORD_ROLES: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

/// Makes the cluster behind `base` (a superuser config from the harness) authenticate
/// [`METHODS`]' roles by password. Idempotent, and done once per test process.
async fn password_roles(admin: &tokio_postgres::Client, base: &Config) {
    PASSWORD_ROLES
        .get_or_init(|| async {
            for method in METHODS {
                let role = method.role();
                admin
                    .batch_execute(&format!(
                        "DO $$ BEGIN \
                           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN \
                             CREATE ROLE {role}; \
                           END IF; \
                         END $$; \
                         SET password_encryption = '{}'; \
                         ALTER ROLE {role} LOGIN REPLICATION PASSWORD '{}'; \
                         RESET password_encryption;",
                        method.password_encryption(),
                        *PASSWORD
                    ))
                    .await
                    .expect("password test roles");
            }

            // Wait until the postmaster asks for a password (it always should: the lines are
            // written before the cluster starts).
            let mut probe = without_password(base);
            probe.user(Method::Scram.role());
            for _ in 0..100 {
                if let Err(ReplicationError::Auth(_)) = ReplicationConnection::connect(&probe).await
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("the cluster did not start asking the test roles for passwords");
        })
        .await;
}

/// `config`'s server and database, with no user or password (tokio-postgres cannot unset one).
fn without_password(config: &Config) -> Config {
    let mut bare = Config::new();
    for host in config.get_hosts() {
        match host {
            Host::Tcp(host) => bare.host(host),
            Host::Unix(dir) => bare.host_path(dir),
        };
    }
    for addr in config.get_hostaddrs() {
        bare.hostaddr(*addr);
    }
    for port in config.get_ports() {
        bare.port(*port);
    }
    if let Some(dbname) = config.get_dbname() {
        bare.dbname(dbname);
    }
    bare
}

/// `base` as `method`'s role with the right password.
fn password_config(base: &Config, method: Method) -> Config {
    let mut config = without_password(base);
    config.user(method.role()).password(PASSWORD.as_str());
    config
}

/// Connects with `config` and checks the session is usable.
async fn assert_authenticates(config: &Config) {
    let mut replication = ReplicationConnection::connect(config)
        .await
        .unwrap_or_else(|e| panic!("{:?}: {e}", config.get_user()));
    replication
        .identify_system()
        .await
        .expect("IDENTIFY_SYSTEM");
    replication.close().await.expect("close");
}

#[tokio::test]
async fn password_methods_authenticate() {
    let pg = postgres::cluster().await;
    let db = pg.fresh_db("repl_auth").await;
    let base = pg.config(&db);
    password_roles(&pg.client(&db).await, &base).await;
    for method in METHODS {
        assert_authenticates(&password_config(&base, method)).await;
    }
}

#[tokio::test]
async fn a_wrong_password_is_refused_with_28p01_and_never_echoed() {
    let pg = postgres::cluster().await;
    let db = pg.fresh_db("repl_badpw").await;
    let base = pg.config(&db);
    password_roles(&pg.client(&db).await, &base).await;
    for method in METHODS {
        let mut config = password_config(&base, method);
        config.password("wrong-password-do-not-print");
        let err = ReplicationConnection::connect(&config)
            .await
            .expect_err("wrong password");
        assert_eq!(err.code(), Some("28P01"), "{}: {err}", method.role());
        assert!(!err.class().is_transient());
        assert!(
            !format!("{err} {err:?}").contains("do-not-print"),
            "{err:?}"
        );
    }
}

#[tokio::test]
async fn a_missing_password_says_how_to_provide_one() {
    let pg = postgres::cluster().await;
    let db = pg.fresh_db("repl_nopw").await;
    let base = pg.config(&db);
    password_roles(&pg.client(&db).await, &base).await;
    for method in METHODS {
        let mut config = without_password(&base);
        config.user(method.role());
        let err = ReplicationConnection::connect(&config)
            .await
            .expect_err("no password");
        assert!(matches!(err, ReplicationError::Auth(_)), "{err:?}");
        assert!(err.to_string().contains("PGPASSWORD"), "{err}");
        assert!(!err.class().is_transient());
    }
}
