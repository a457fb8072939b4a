//! The `updog-backup daemon` child process of a test, and waiting for what it stores.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::TestEnv;

/// The daemon as a child process, its output in the test's directory.
pub struct Daemon {
    child: Child,
    pub log: std::path::PathBuf,
    /// Where it serves /status and /metrics (a free loopback port: tests run side by side).
    pub addr: std::net::SocketAddr,
}

impl Daemon {
    pub fn start(env: &TestEnv) -> Daemon {
        let log = env
            .dir
            .path()
            .join(format!("daemon-{}.log", fastrand::u32(..)));
        let file = std::fs::File::create(&log).unwrap();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", super::postgres::free_port())
            .parse()
            .unwrap();
        let child = env
            .command(&["daemon"])
            .env("UPDOG_BACKUP__SERVER__LISTEN", addr.to_string())
            .env("UPDOG_BACKUP_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Daemon { child, log, addr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status (within 30 s).
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not stop on SIGTERM:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the daemon to exit by itself (a fatal error), within `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not stop:
{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the daemon exited ({status}):\n{}", self.output());
        }
    }
}

/// A test that fails must not leave its daemon running (it would retry forever).
impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Packs every 500 ms, and a stream index object every 3 packs: every capture test then
/// restores through the index (and through footers for the packs after the last window).
pub fn capture_env(env: &mut TestEnv) {
    env.env.push((
        "UPDOG_BACKUP__STREAM__FLUSH_INTERVAL".into(),
        "500ms".into(),
    ));
    env.env
        .push(("UPDOG_BACKUP__STREAM__INDEX_WINDOW".into(), "3".into()));
}

/// A daemon process a test watches: whether it still runs, and what it logged.
pub trait Watched {
    /// Panics, with the daemon's log, if it exited.
    fn assert_running(&mut self);
    fn output(&self) -> String;
}

impl Watched for Daemon {
    fn assert_running(&mut self) {
        Daemon::assert_running(self);
    }
    fn output(&self) -> String {
        Daemon::output(self)
    }
}

/// Waits until the repository covers `t` (the daemon stored everything committed by then).
pub fn wait_covered(env: &TestEnv, t: DateTime<Utc>, daemon: &mut impl Watched) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        daemon.assert_running();
        let out = env.ok(&["list", "--json"]);
        let list: serde_json::Value = serde_json::from_str(&out).unwrap();
        if let Some(c) = list["stream"]["covered_until"].as_str() {
            let covered: DateTime<Utc> = c.parse().unwrap();
            if covered >= t {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "covered-until never reached {t}: {out}\n{}",
            daemon.output()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
