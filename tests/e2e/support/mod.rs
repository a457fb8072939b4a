//! Shared test support: real services (PostgreSQL, SeaweedFS) and a runner for the real
//! `updog-backup` binary with a config, an identity and a repository made for the test.

#![allow(dead_code)]

pub mod fixture;
pub mod postgres;
pub mod seaweed;

use std::path::PathBuf;
use std::process::{Command, Output};

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

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_updog-backup")
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
        let config = format!(
            r#"[source]
url = "{source}"
schemas = ["app", "audit"]
global_tables = ["app.currencies"]

[storage]
{storage}

[encryption]
recipients = ["{recipient}"]
identity_file = "{identity}"

[snapshot]
parallel = 2

[restore]
target_url = "{target}"
"#,
            source = source_url,
            identity = identity_path.display(),
            target = target_url,
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
        let mut cmd = Command::new(bin());
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
