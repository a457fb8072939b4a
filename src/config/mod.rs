//! Configuration: the TOML file (config/updog-backup.toml is the annotated reference), then `UPDOG_BACKUP__SECTION__KEY` overrides.
//!
//! Owns parsing and validation only; it never connects anywhere. Unknown keys are rejected
//! (naming the key) so that a typo never silently falls back to a default. Secrets are not
//! part of the file: database passwords come from `PGPASSWORD` or a passfile
//! (`crate::pg::passfile`), the age identity from `encryption.identity_file` or `UPDOG_BACKUP_IDENTITY`.

mod overrides;
mod units;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use units::{parse_bytes, parse_duration};

/// Environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "UPDOG_BACKUP_CONFIG";
/// Prefix of the per-key overrides, `UPDOG_BACKUP__SOURCE__URL` and so on.
pub const OVERRIDE_PREFIX: &str = "UPDOG_BACKUP__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no configuration: pass --config PATH or set {CONFIG_ENV}")]
    Missing,
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config {origin}: {message}")]
    Invalid { origin: String, message: String },
    #[error("environment override {var}: {message}")]
    Override { var: String, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub source: SourceConfig,
    pub storage: StorageConfig,
    pub encryption: EncryptionConfig,
    #[serde(default)]
    pub compression: CompressionConfig,
    #[serde(default)]
    pub snapshot: SnapshotConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub stream: StreamConfig,
    #[serde(default)]
    pub restore: RestoreConfig,
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub daemon: DaemonConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// libpq-style URL; a password in it is accepted but never printed.
    pub url: String,
    #[serde(default = "default_schemas")]
    pub schemas: Vec<String>,
    #[serde(default = "default_tenant_column")]
    pub tenant_column: String,
    #[serde(default = "default_slot")]
    pub slot: String,
    #[serde(default = "default_slot")]
    pub publication: String,
    #[serde(default)]
    pub exclude_tables: Vec<String>,
    #[serde(default)]
    pub global_tables: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `file:///path` or `s3://bucket/prefix`.
    pub url: String,
    pub s3_endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub s3_region: String,
    #[serde(default)]
    pub s3_force_path_style: bool,
    /// Independent reads in flight at once (footers, stream index, manifests, sections).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    pub recipients: Vec<String>,
    pub identity_file: Option<PathBuf>,
    /// Accept an identity file other users may read (refused by default: it should be 0600);
    /// for a mounted secret whose mode cannot be changed.
    #[serde(default)]
    pub allow_readable_identity: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionConfig {
    #[serde(default = "default_level")]
    pub level: i32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// Database connections exporting tenants in parallel (each one holds the same snapshot).
    #[serde(default = "default_parallel")]
    pub parallel: usize,
    /// What the exporting connections may hold of gathered rows in memory, together: a
    /// snapshot's rows wait in encrypted scratch partitions in `stream.spool_dir` and are
    /// gathered by tenant within it (a tenant that would not fit is exported alone).
    #[serde(default = "default_batch_memory", deserialize_with = "units::bytes")]
    pub batch_memory: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    #[serde(default = "default_cron")]
    pub snapshot: String,
    #[serde(default = "default_keep")]
    pub keep_snapshots: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    #[serde(default = "default_flush", deserialize_with = "units::duration")]
    pub flush_interval: Duration,
    #[serde(default = "default_pack_bytes", deserialize_with = "units::bytes")]
    pub max_pack_bytes: u64,
    /// Packs per stream index object (`changes/index/`).
    #[serde(default = "default_index_window")]
    pub index_window: usize,
    /// Where large packs, in-progress large transactions and a snapshot's scratch partitions
    /// wait, encrypted (default: the system's temporary directory).
    #[serde(default)]
    pub spool_dir: Option<std::path::PathBuf>,
}

impl StreamConfig {
    /// Where bytes wait that memory should not hold (ciphertext only): `spool_dir`, or the
    /// system's temporary directory.
    pub fn scratch_dir(&self) -> std::path::PathBuf {
        self.spool_dir.clone().unwrap_or_else(std::env::temp_dir)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    pub target_url: Option<String>,
    /// The source as a role that may write the tenant tables (`rewind --apply`); `rewind`
    /// without `--apply` and `diff` read the source as the backup role.
    pub writer_url: Option<String>,
    /// The setting the source's row level security reads the current tenant from (the seed's
    /// `app.current_org`): `rewind` sets it to the tenant in its transaction, so that the
    /// writer role's policies make PostgreSQL refuse any row of another tenant. Unset: the
    /// writer role must bypass row level security.
    pub tenant_setting: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
    /// A file holding the bearer token every endpoint but `/healthz` then requires.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// After SIGTERM: how long storing the open pack may take before the daemon exits anyway
    /// (nothing is lost: what is not stored is not acknowledged).
    #[serde(default = "default_shutdown", deserialize_with = "units::duration")]
    pub shutdown_timeout: Duration,
    /// With no change captured for this long, a logical message is written to the source's
    /// WAL so that the slot advances even when nothing else in the database does.
    #[serde(default = "default_heartbeat", deserialize_with = "units::duration")]
    pub heartbeat_interval: Duration,
}

fn default_schemas() -> Vec<String> {
    vec!["public".into()]
}
fn default_tenant_column() -> String {
    "organization_id".into()
}
fn default_slot() -> String {
    "updog_backup".into()
}
fn default_region() -> String {
    "us-east-1".into()
}
fn default_level() -> i32 {
    3
}
fn default_parallel() -> usize {
    4
}
fn default_batch_memory() -> u64 {
    64 << 20
}
fn default_cron() -> String {
    "0 0 2 * * *".into()
}
fn default_keep() -> usize {
    7
}
fn default_flush() -> Duration {
    Duration::from_secs(5)
}
fn default_pack_bytes() -> u64 {
    64 << 20
}
fn default_index_window() -> usize {
    256
}
/// Reads in flight at once unless `storage.concurrency` says otherwise. A busy tenant's
/// restore fetches one section per pack: at a 20 ms round trip, 32 keep that under 2 s per
/// 1,000 packs where 16 took 2.4 s (BENCHMARKS.md, "Restore cost against stream length").
pub const DEFAULT_CONCURRENCY: usize = 32;
fn default_concurrency() -> usize {
    DEFAULT_CONCURRENCY
}
fn default_listen() -> String {
    "127.0.0.1:9187".into()
}
fn default_shutdown() -> Duration {
    Duration::from_secs(10)
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(60)
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self {
            level: default_level(),
        }
    }
}
impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            parallel: default_parallel(),
            batch_memory: default_batch_memory(),
        }
    }
}
impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            snapshot: default_cron(),
            keep_snapshots: default_keep(),
        }
    }
}
impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            flush_interval: default_flush(),
            max_pack_bytes: default_pack_bytes(),
            index_window: default_index_window(),
            spool_dir: None,
        }
    }
}
impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            token_file: None,
        }
    }
}
impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            shutdown_timeout: default_shutdown(),
            heartbeat_interval: default_heartbeat(),
        }
    }
}

impl Config {
    /// Loads `path` (or `$UPDOG_BACKUP_CONFIG`), applies the process environment's overrides,
    /// and validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None => std::env::var_os(CONFIG_ENV)
                .map(PathBuf::from)
                .ok_or(ConfigError::Missing)?,
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string(), std::env::vars())
    }

    /// Parses TOML text with the given environment (a parameter so tests need no global state).
    pub fn from_toml(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut value: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: origin.into(),
                    message: e.message().to_string(),
                })?;
        overrides::apply(&mut value, env)?;
        let config: Config =
            toml::Value::Table(value)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Invalid {
                    origin: origin.into(),
                    message: e.message().to_string(),
                })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            origin: origin.into(),
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        let s = &self.source;
        if s.schemas.is_empty() {
            return Err(
                "source.schemas is empty: list the schemas that hold the tenant tables".into(),
            );
        }
        if s.tenant_column.is_empty() {
            return Err("source.tenant_column is empty".into());
        }
        for (key, name) in [
            ("source.slot", &s.slot),
            ("source.publication", &s.publication),
        ] {
            if name.is_empty()
                || name.len() > 63
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err(format!(
                    "{key} = {name:?}: use 1 to 63 characters of a-z, 0-9 and _"
                ));
            }
        }
        for (key, list) in [
            ("source.exclude_tables", &s.exclude_tables),
            ("source.global_tables", &s.global_tables),
        ] {
            if let Some(bad) = list.iter().find(|t| !t.contains('.')) {
                return Err(format!("{key}: {bad:?} is not \"schema.table\""));
            }
        }
        crate::pg::conninfo::check_url(&s.url).map_err(|e| format!("source.url {e}"))?;
        if let Some(setting) = &self.restore.tenant_setting {
            let valid = setting.split('.').count() == 2
                && setting.split('.').all(|p| {
                    !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                });
            if !valid {
                return Err(format!(
                    "restore.tenant_setting {setting:?} is not a custom setting name: use prefix.name, e.g. app.current_org"
                ));
            }
        }
        if let Some(url) = &self.restore.writer_url {
            crate::pg::conninfo::check_url(url).map_err(|e| format!("restore.writer_url {e}"))?;
        }
        if let Some(url) = &self.restore.target_url {
            crate::pg::conninfo::check_url(url).map_err(|e| format!("restore.target_url {e}"))?;
        }
        self.storage_location().map_err(|e| e.to_string())?;
        if self.encryption.recipients.is_empty() {
            return Err("encryption.recipients is empty: add the recipient printed by `updog-backup keygen`".into());
        }
        crate::codec::parse_recipients(&self.encryption.recipients).map_err(|e| e.to_string())?;
        if !(1..=256).contains(&self.storage.concurrency) {
            return Err(format!(
                "storage.concurrency = {}: use 1 to 256",
                self.storage.concurrency
            ));
        }
        if !(1..=65_536).contains(&self.stream.index_window) {
            return Err(format!(
                "stream.index_window = {}: use 1 to 65536 packs",
                self.stream.index_window
            ));
        }
        if !(1..=19).contains(&self.compression.level) {
            return Err(format!(
                "compression.level = {}: use 1 to 19",
                self.compression.level
            ));
        }
        if self.snapshot.parallel == 0 || self.snapshot.parallel > 64 {
            return Err(format!(
                "snapshot.parallel = {}: use 1 to 64",
                self.snapshot.parallel
            ));
        }
        if self.schedule.keep_snapshots == 0 {
            return Err("schedule.keep_snapshots must be at least 1".into());
        }
        self.snapshot_schedule()?;
        self.server
            .listen
            .parse::<std::net::SocketAddr>()
            .map_err(|_| {
                format!(
                    "server.listen = {:?}: use an address and port, e.g. 127.0.0.1:9187",
                    self.server.listen
                )
            })?;
        Ok(())
    }

    /// `schedule.snapshot` as a cron schedule (six fields, seconds first, UTC).
    pub fn snapshot_schedule(&self) -> Result<cron::Schedule, String> {
        let expr = &self.schedule.snapshot;
        if expr.split_whitespace().count() < 6 {
            return Err(format!(
                "schedule.snapshot = {expr:?}: use six fields, seconds first (UTC), e.g. \"0 0 2 * * *\" for 02:00 every day"
            ));
        }
        expr.parse::<cron::Schedule>()
            .map_err(|e| format!("schedule.snapshot = {expr:?}: {e}"))
    }

    /// Where the repository lives, parsed from `storage.url`.
    pub fn storage_location(&self) -> Result<StorageLocation, ConfigError> {
        StorageLocation::parse(&self.storage)
    }
}

/// `storage.url`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageLocation {
    Directory(PathBuf),
    S3 { bucket: String, prefix: String },
}

impl StorageLocation {
    fn parse(storage: &StorageConfig) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            origin: "storage.url".into(),
            message,
        };
        if let Some(path) = storage.url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(invalid(format!(
                    "{:?}: a file URL needs an absolute path, e.g. file:///var/lib/updog-backup/repo",
                    storage.url
                )));
            }
            return Ok(Self::Directory(PathBuf::from(path)));
        }
        if let Some(rest) = storage.url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(invalid(format!(
                    "{:?}: no bucket, use s3://bucket/prefix",
                    storage.url
                )));
            }
            return Ok(Self::S3 {
                bucket: bucket.into(),
                prefix: prefix.trim_matches('/').into(),
            });
        }
        Err(invalid(format!(
            "{:?}: use file:///absolute/path or s3://bucket/prefix",
            storage.url
        )))
    }
}

impl crate::retry::Classify for ConfigError {
    fn class(&self) -> crate::retry::ErrorClass {
        crate::retry::ErrorClass::Usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [source]
        url = "postgres://updog_backup@127.0.0.1:5432/updog"
        [storage]
        url = "file:///tmp/repo"
        [encryption]
        recipients = ["age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"]
    "#;

    #[test]
    fn the_shipped_configs_load() {
        for (name, text) in [
            (
                "updog-backup.toml",
                include_str!("../../config/updog-backup.toml"),
            ),
            ("embedded.toml", include_str!("../../config/embedded.toml")),
        ] {
            let config =
                Config::from_toml(text, name, []).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                config.daemon.shutdown_timeout,
                Duration::from_secs(10),
                "{name}"
            );
        }
    }

    #[test]
    fn schedule_and_listen_are_checked() {
        for (key, value, says) in [
            ("SCHEDULE__SNAPSHOT", "0 2 * * *", "six fields"),
            ("SCHEDULE__SNAPSHOT", "0 0 25 * * *", "schedule.snapshot"),
            ("SERVER__LISTEN", "localhost", "server.listen"),
        ] {
            let env = [(format!("UPDOG_BACKUP__{key}"), value.to_string())];
            let e = Config::from_toml(MINIMAL, "t", env)
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{key}={value}: {e}");
        }
        let ok = [(
            "UPDOG_BACKUP__SCHEDULE__SNAPSHOT".to_string(),
            "*/4 * * * * *".to_string(),
        )];
        let config = Config::from_toml(MINIMAL, "t", ok).unwrap();
        assert!(
            config
                .snapshot_schedule()
                .unwrap()
                .upcoming(chrono::Utc)
                .next()
                .is_some()
        );
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml(MINIMAL, "t", env(&[])).unwrap();
        assert_eq!(c.source.tenant_column, "organization_id");
        assert_eq!(c.stream.flush_interval, Duration::from_secs(5));
        assert_eq!(c.stream.max_pack_bytes, 64 << 20);
        assert_eq!(
            c.storage_location().unwrap(),
            StorageLocation::Directory("/tmp/repo".into())
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let text = format!("{MINIMAL}\n[compression]\nlevle = 3\n");
        let err = Config::from_toml(&text, "t", env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("levle"), "{err}");
    }

    #[test]
    fn environment_overrides_and_types() {
        let c = Config::from_toml(
            MINIMAL,
            "t",
            env(&[
                ("UPDOG_BACKUP__COMPRESSION__LEVEL", "7"),
                ("UPDOG_BACKUP__STORAGE__URL", "s3://bucket/some/prefix/"),
                ("UPDOG_BACKUP__SOURCE__SCHEMAS", r#"["app", "audit"]"#),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.compression.level, 7);
        assert_eq!(c.source.schemas, ["app", "audit"]);
        assert_eq!(
            c.storage_location().unwrap(),
            StorageLocation::S3 {
                bucket: "bucket".into(),
                prefix: "some/prefix".into()
            }
        );
    }

    #[test]
    fn unknown_override_is_rejected() {
        let err = Config::from_toml(MINIMAL, "t", env(&[("UPDOG_BACKUP__SOURCE__URLL", "x")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("urll"), "{err}");
    }

    #[test]
    fn bad_values_say_what_to_do() {
        for (var, value, needle) in [
            ("UPDOG_BACKUP__COMPRESSION__LEVEL", "40", "1 to 19"),
            ("UPDOG_BACKUP__STORAGE__URL", "ftp://x", "file:///"),
            ("UPDOG_BACKUP__SOURCE__SLOT", "Bad-Slot", "a-z"),
            (
                "UPDOG_BACKUP__ENCRYPTION__RECIPIENTS",
                r#"["age1nope"]"#,
                "recipient",
            ),
            (
                "UPDOG_BACKUP__STREAM__FLUSH_INTERVAL",
                "5 parsecs",
                "duration",
            ),
        ] {
            let err = Config::from_toml(MINIMAL, "t", env(&[(var, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{var}={value}: {err}");
        }
    }

    #[test]
    fn url_tls_parameters_are_checked_at_load() {
        let err = Config::from_toml(
            MINIMAL,
            "t",
            env(&[(
                "UPDOG_BACKUP__SOURCE__URL",
                "postgres://u@h/db?sslmode=verify-ca",
            )]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("source.url") && err.contains("sslrootcert"),
            "{err}"
        );
        Config::from_toml(
            MINIMAL,
            "t",
            env(&[(
                "UPDOG_BACKUP__SOURCE__URL",
                "postgres://u@h/db?sslmode=verify-full&sslrootcert=/ca.pem",
            )]),
        )
        .unwrap();
    }

    #[test]
    fn every_shipped_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                Config::from_toml(&text, &path.display().to_string(), env(&[]))
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(
            seen >= 2,
            "expected the annotated and the embedded-default configs in config/"
        );
    }
}
