//! Commands: argument parsing (clap) and each command's composition of the modules, with
//! its human and `--json` output. Output goes to stdout, logs to stderr.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::codec::{Identities, generate_identity};
use crate::config::Config;
use crate::error::Error;
use crate::pg::redact_url;
use crate::progress::{Progress, Unit};
use crate::repository::tenant_keys::Keyring;
use crate::repository::{RepoInfo, Repository};
use crate::restore::{RestoreRequest, RestoreTarget};
use crate::snapshot::{SnapshotRequest, validate_tenant};
use crate::storage::ObjectStore;

#[derive(Debug, Parser)]
#[command(
    name = "updog-backup",
    version,
    about = "Per-tenant backup and point-in-time restore for multi-tenant PostgreSQL"
)]
pub struct Cli {
    /// Config file (TOML); default: $UPDOG_BACKUP_CONFIG
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the source, initialise the repository, create the publication and the slot
    /// with the first snapshot (idempotent)
    Init {
        /// Repository format for a new repository: 3 (per-tenant keys: `forget` and `rotate`
        /// work) or 2 (one key for everything, readable by releases before 3)
        #[arg(long, value_name = "N", default_value_t = crate::repository::FORMAT_VERSION,
              value_parser = clap::value_parser!(u32).range(2..=3))]
        format_version: u32,
    },
    /// Capture every change, take scheduled snapshots, apply retention and serve /status and
    /// /metrics (until SIGTERM / Ctrl-C); a second instance stands by and takes over
    Daemon,
    /// Print the SQL that installs the triggers putting schema changes, and the rows that move
    /// with a parent moved to another tenant, into the change stream, for a superuser to run on
    /// the source database (init installs them when it may); run it again after a migration
    /// that adds a table reaching its tenant through another
    SchemaTriggers,
    /// Preflight report: settings, privileges, replica identities, how every table reaches its tenant
    Check {
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// Take one consistent snapshot now (every tenant unless --org is given)
    Backup {
        /// Only this tenant (repeatable)
        #[arg(long = "org", value_name = "ORG")]
        orgs: Vec<String>,
    },
    /// Snapshots and the change stream; --tenants: every tenant; --org: one tenant's
    /// restorable window
    List {
        /// Only the snapshots holding this tenant, and its restorable window
        #[arg(long, value_name = "ORG", conflicts_with = "tenants")]
        org: Option<String>,
        /// Every tenant: its id, rows and bytes in the newest snapshot holding it, and its
        /// first and last restorable instants
        #[arg(long)]
        tenants: bool,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// Restore one tenant into a NEW database
    Restore(RestoreArgs),
    /// What changed in one tenant since a restore point (against the live source, read
    /// only), or between two restore points: rows inserted, deleted and updated per table
    Diff(DiffArgs),
    /// Make one tenant's rows in the source equal to a restore point, in one transaction
    /// (prints the plan; --apply writes it, after a snapshot of the tenant)
    Rewind(RewindArgs),
    /// Delete the snapshots and packs that no kept restore window needs (schedule.keep_snapshots)
    Prune {
        /// Only show what would be deleted
        #[arg(long)]
        dry_run: bool,
        /// Keep this many snapshots instead of schedule.keep_snapshots
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        keep: Option<u64>,
    },
    /// Check stored objects against their digests (--deep: also decrypt and parse them)
    Verify {
        /// Only this tenant's objects and sections (and the global ones)
        #[arg(long, value_name = "ORG")]
        org: Option<String>,
        /// Also decrypt and parse every object (needs the identity)
        #[arg(long)]
        deep: bool,
    },
    /// Erase one tenant from every backup at once: deletes its keys, so that nothing stored
    /// of it can be decrypted any more (asks for confirmation unless --yes)
    Forget {
        /// The tenant to erase (its id: `updog-backup list --tenants` shows them)
        #[arg(long, value_name = "ORG")]
        org: String,
        /// Do not ask for confirmation
        #[arg(long)]
        yes: bool,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// Change the repository's recipients by re-wrapping the per-tenant keys (not the data);
    /// opens them with the configured identity. Safe to interrupt and run again
    Rotate {
        /// A recipient (age1…) to add (repeatable)
        #[arg(long, value_name = "RECIPIENT")]
        add: Vec<String>,
        /// A recipient (age1…, or its fingerprint from repo.json) to remove (repeatable)
        #[arg(long, value_name = "RECIPIENT")]
        remove: Vec<String>,
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
    /// Create a new age identity; prints its recipient (public key)
    Keygen {
        /// Write the identity here (mode 0600) instead of stdout
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
// One of --at and --latest: clap's message for a missing one then names both.
#[command(group = clap::ArgGroup::new("point").required(true).args(["at", "latest"]))]
pub struct RestoreArgs {
    /// The tenant to restore (its id: `updog-backup list --tenants` shows them)
    #[arg(long, value_name = "ORG")]
    pub org: String,
    /// Restore point, inclusive (the last transaction committed at or before it): RFC 3339
    /// with a zone (2026-11-26T10:41:07Z, …+01:00), `now`, or a time before now (-90s, -15m,
    /// -1h30m, -2d)
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    pub at: Option<String>,
    /// Everything the repository covers
    #[arg(long)]
    pub latest: bool,
    /// Name of the database to create (default recovery_<org8>_<yyyymmddThhmmss>, with _2,
    /// _3… when that one exists)
    #[arg(long, value_name = "NAME")]
    pub target_db: Option<String>,
    /// Server to create it on (default: restore.target_url)
    #[arg(long, value_name = "URL")]
    pub target_url: Option<String>,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
// --at (against the live source) or --from with --to (two restore points).
#[command(group = clap::ArgGroup::new("since").required(true).args(["at", "from"]))]
pub struct DiffArgs {
    /// The tenant (its id: `updog-backup list --tenants` shows them)
    #[arg(long, value_name = "ORG")]
    pub org: String,
    /// The restore point to compare the live source with (as for `restore --at`)
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    pub at: Option<String>,
    /// The earlier of two restore points (as for `restore --at`); the source is not read
    #[arg(long, value_name = "TIME", allow_hyphen_values = true, requires = "to")]
    pub from: Option<String>,
    /// The later of two restore points (`latest`: everything the repository covers)
    #[arg(
        long,
        value_name = "TIME",
        allow_hyphen_values = true,
        requires = "from"
    )]
    pub to: Option<String>,
    /// Also print every changed row as a JSON line (table, change, key, before, after)
    #[arg(long)]
    pub rows: bool,
    /// Server for the scratch databases each restore point is restored into (default:
    /// restore.target_url); they are dropped when the diff ends
    #[arg(long, value_name = "URL")]
    pub target_url: Option<String>,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RewindArgs {
    /// The tenant (its id: `updog-backup list --tenants` shows them)
    #[arg(long, value_name = "ORG")]
    pub org: String,
    /// The restore point to make the tenant equal to (as for `restore --at`)
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    pub to: String,
    /// Write the plan to the source (as restore.writer_url), after a snapshot of the tenant
    #[arg(long)]
    pub apply: bool,
    /// Server for the scratch database the restore point is restored into (default:
    /// restore.target_url); dropped when the rewind ends
    #[arg(long, value_name = "URL")]
    pub target_url: Option<String>,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

pub async fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Keygen { output } => keygen(output.as_deref()),
        command => {
            let config = Config::load(cli.config.as_deref())?;
            match command {
                Command::Init { format_version } => init(&config, format_version).await,
                Command::Daemon => daemon(&config).await,
                Command::Check { json } => check(&config, json).await,
                Command::SchemaTriggers => schema_triggers(&config).await,
                Command::Backup { orgs } => backup(&config, orgs).await,
                Command::List { org, tenants, json } => list(&config, org, tenants, json).await,
                Command::Restore(args) => restore(&config, args).await,
                Command::Diff(args) => diff(&config, args).await,
                Command::Rewind(args) => rewind(&config, args).await,
                Command::Verify { org, deep } => verify(&config, org, deep).await,
                Command::Prune { dry_run, keep } => prune(&config, dry_run, keep).await,
                Command::Forget { org, yes, json } => forget(&config, &org, yes, json).await,
                Command::Rotate { add, remove, json } => rotate(&config, add, remove, json).await,
                Command::Keygen { .. } => unreachable!("handled above"),
            }
        }
    }
}

/// The configured object store.
pub async fn open_store(config: &Config) -> Result<Arc<dyn ObjectStore>, Error> {
    Ok(crate::storage::open(&config.storage_location()?, &config.storage).await?)
}

/// The configured repository (its store, and how many reads it makes at once).
async fn open_repository(config: &Config) -> Result<Repository, Error> {
    Ok(Repository::new(open_store(config).await?).with_concurrency(config.storage.concurrency))
}

fn print_json<T: Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("reports serialize")
    );
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn keygen(output: Option<&Path>) -> Result<(), Error> {
    let (identity, recipient) = generate_identity();
    match output {
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| {
                    // "Never overwrites" only where something is there to overwrite.
                    let why = if e.kind() == std::io::ErrorKind::AlreadyExists {
                        " (keygen never overwrites an identity: the repository may be encrypted to it)"
                    } else {
                        ""
                    };
                    Error::Usage(format!("cannot create {}: {e}{why}", path.display()))
                })?;
            file.write_all(identity.as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|e| Error::Failed(format!("writing {}: {e}", path.display())))?;
            eprintln!(
                "identity written to {} (keep it secret, keep a copy offline: without it no backup can be restored)",
                path.display()
            );
            println!("{recipient}");
        }
        None => {
            print!("{identity}");
            eprintln!("public key: {recipient}");
        }
    }
    Ok(())
}

async fn init(config: &Config, format_version: u32) -> Result<(), Error> {
    let repo = open_repository(config).await?;
    let report = crate::init::run(config, &repo, format_version).await?;
    let verb = if report.repository_created {
        "initialised repository"
    } else {
        "repository"
    };
    let already = if report.repository_created {
        ""
    } else {
        " already initialised"
    };
    println!(
        "{verb} {}{already} for {}",
        report.repository, report.source
    );
    if report.publication_created {
        println!("created publication {}", config.source.publication);
    }
    match &report.schema_changes {
        crate::source::ddl::Capture::Installed => println!(
            "schema changes are captured into the change stream (event triggers updog_backup_ddl_*)"
        ),
        crate::source::ddl::Capture::Missing { reason } => println!(
            "schema changes are NOT captured: this role may not create event triggers ({reason}); a restore to an instant after a migration is refused until a snapshot is taken after it. As a superuser, run:\n\n  {}\n",
            crate::source::check::SCHEMA_TRIGGERS_FIX
        ),
    }
    let slot = &config.source.slot;
    match &report.stream {
        crate::init::StreamStart::Existing { durable_lsn } => println!(
            "replication slot {slot} exists and the repository's change stream is durable up to {durable_lsn}: nothing to do (run `updog-backup daemon`)"
        ),
        crate::init::StreamStart::New { snapshot, earlier } => {
            if let Some(old) = earlier {
                println!(
                    "the earlier change stream (slot {}, LSN {} to {}) stays restorable; nothing between its end and the new snapshot was captured (`updog-backup list --org ORG` shows each tenant's restorable instants)",
                    old.slot, old.since_lsn, old.durable_lsn
                );
            }
            println!(
                "created replication slot {slot} and the first snapshot {} ({} tenant(s)) at {} (LSN {})",
                snapshot.id,
                snapshot.tenants,
                time(snapshot.consistent_time),
                snapshot.consistent_lsn
            );
            println!(
                "the change stream continues from there: start `updog-backup daemon` now (until it runs, the slot keeps WAL on the source)"
            );
        }
    }
    Ok(())
}

async fn daemon(config: &Config) -> Result<(), Error> {
    let store = open_store(config).await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stop requested");
        signals.cancel();
    });
    crate::daemon::run(config, store, shutdown).await?;
    Ok(())
}

async fn prune(config: &Config, dry_run: bool, keep: Option<u64>) -> Result<(), Error> {
    let repo = open_repository(config).await?;
    repo.info().await?;
    let keep = keep.map_or(config.schedule.keep_snapshots, |k| k as usize);
    let plan = crate::retention::plan(&repo, keep).await?;
    println!(
        "keeping {} snapshot(s){}",
        plan.kept.len(),
        plan.kept
            .first()
            .map(|id| format!(", oldest {id}"))
            .unwrap_or_default()
    );
    for (id, objects) in &plan.snapshots {
        let bytes: u64 = objects.iter().map(|o| o.size).sum();
        println!(
            "  snapshot {id}: {} object(s), {}",
            objects.len(),
            human_bytes(bytes)
        );
    }
    if !plan.abandoned.is_empty() {
        println!(
            "  {} object(s) of snapshots that never completed",
            plan.abandoned.len()
        );
    }
    if let (Some(first), Some(last)) = (plan.packs.first(), plan.packs.last()) {
        println!(
            "  {} pack(s) from {} to {}, {}",
            plan.packs.len(),
            first.start,
            last.end,
            human_bytes(plan.packs.iter().map(|p| p.size).sum())
        );
    }
    if !plan.checkpoints.is_empty() {
        println!("  {} routing checkpoint(s)", plan.checkpoints.len());
    }
    let verb = if dry_run { "would delete" } else { "deleting" };
    println!(
        "{verb} {} object(s), {}",
        plan.objects(),
        human_bytes(plan.bytes())
    );
    if dry_run || plan.objects() == 0 {
        return Ok(());
    }
    let progress = Progress::new(
        "prune",
        "objects",
        Unit::DeletedBytes,
        plan.objects() as u64,
    );
    let deleted = crate::retention::apply(&repo, &plan, |_, bytes| progress.advance(bytes)).await?;
    progress.finish();
    println!("deleted {deleted} object(s)");
    Ok(())
}

/// The triggers' SQL: the event triggers, and those of parent moves for the source's routes now.
async fn schema_triggers(config: &Config) -> Result<(), Error> {
    let client = crate::pg::connect(&config.source.url)
        .await
        .map_err(crate::source::SourceError::from)?;
    let catalog = crate::source::catalog::Catalog::load(&client, &config.source)
        .await
        .map_err(crate::source::SourceError::from)?;
    print!("{}", crate::source::ddl::script(&catalog));
    Ok(())
}

async fn check(config: &Config, json: bool) -> Result<(), Error> {
    let report = crate::source::check::run(config).await?;
    if json {
        print_json(&report);
    } else {
        println!("{report}");
    }
    if report.errors() > 0 {
        return Err(Error::Failed(format!(
            "check found {} error(s): apply the fixes above",
            report.errors()
        )));
    }
    Ok(())
}

async fn backup(config: &Config, orgs: Vec<String>) -> Result<(), Error> {
    let repo = open_repository(config).await?;
    let info = repo.info().await?;
    crate::codec::check_recipients(&config.encryption.recipients, &info.recipients)?;
    let manifest = crate::snapshot::take(
        config,
        &repo,
        &SnapshotRequest {
            tenants: orgs,
            stream_slot: None,
        },
    )
    .await?;
    let bytes: u64 = manifest.objects().map(|o| o.bytes).sum();
    let rows: u64 = manifest.tenants.values().map(|t| t.total_rows()).sum();
    println!(
        "snapshot {} at {} (LSN {}): {} tenant(s), {rows} rows, {} stored in {:.1}s",
        manifest.id,
        time(manifest.consistent_time),
        manifest.consistent_lsn,
        manifest.tenants.len(),
        human_bytes(bytes),
        (manifest.finished_at - manifest.started_at).num_milliseconds() as f64 / 1000.0
    );
    Ok(())
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The configured repository, checked to be initialised (its repo.json), and `--org`
/// resolved against it.
async fn open_initialised(
    config: &Config,
    org: Option<&str>,
) -> Result<(Repository, RepoInfo, Option<String>), Error> {
    let repo = open_repository(config).await?;
    let info = repo.info().await?;
    let org = match org {
        Some(o) => Some(resolve_tenant(&repo, o).await?),
        None => None,
    };
    Ok((repo, info, org))
}

/// The identity for restore and `verify --deep`, checked against the recipients the
/// repository is encrypted to before any object is read.
fn load_identities(config: &Config, info: &RepoInfo) -> Result<Arc<Identities>, Error> {
    Ok(Arc::new(Identities::load_for(
        config.encryption.identity_file.as_deref(),
        config.encryption.allow_readable_identity,
        &info.recipients,
        &config.encryption.recipients,
    )?))
}

/// What opens one tenant's objects and the global ones: the identity and the keys it
/// unwraps. A tenant forgotten before `at` (`None`: the latest instant) is refused first.
async fn tenant_identities(
    config: &Config,
    repo: &Repository,
    info: &RepoInfo,
    tenant: &str,
    at: Option<DateTime<Utc>>,
) -> Result<Arc<Identities>, Error> {
    let identities = load_identities(config, info)?;
    let keyring = Keyring::load(repo, identities, Some(tenant)).await?;
    keyring.refuse_forgotten(at)?;
    Ok(keyring.identities())
}

/// The instant a target names (`None`: the latest).
fn target_time(target: &RestoreTarget) -> Option<DateTime<Utc>> {
    match target {
        RestoreTarget::At(t) => Some(*t),
        RestoreTarget::Latest => None,
    }
}

async fn list(
    config: &Config,
    org: Option<String>,
    tenants: bool,
    json: bool,
) -> Result<(), Error> {
    let (repo, _, org) = open_initialised(config, org.as_deref()).await?;
    if tenants {
        return list_tenants(&repo, json).await;
    }
    if let Some(tenant) = &org {
        crate::repository::erasure::check_not_forgotten(&repo, tenant, None).await?;
    }
    let report = crate::listing::run(&repo, org).await?;
    if json {
        print_json(&report);
        return Ok(());
    }
    println!("repository {}", report.repository);
    if let (Some(t), Some(w)) = (&report.tenant, &report.window) {
        let ranges: Vec<String> = w
            .ranges
            .iter()
            .map(|r| format!("from {} to {}", time(r.from), time(r.to)))
            .collect();
        println!(
            "tenant {t}: restorable {} ({} snapshot(s){})",
            ranges.join(", "),
            w.snapshots,
            if ranges.len() > 1 {
                "; nothing was captured between these ranges"
            } else {
                ""
            }
        );
    }
    print_stream(report.stream.as_ref());
    if report.snapshots.is_empty() {
        println!("no snapshots yet: run `updog-backup backup`");
    }
    // The tenant's own column only when there is a tenant.
    let tenant_header = if report.tenant.is_some() {
        "  TENANT ROWS / BYTES"
    } else {
        ""
    };
    println!(
        "{:<34} {:<28} {:>8} {:>11}{tenant_header}",
        "SNAPSHOT", "CONSISTENT TIME", "TENANTS", "STORED"
    );
    for s in &report.snapshots {
        let tenant = match (s.tenant_rows, s.tenant_bytes) {
            (Some(r), Some(b)) => format!("  {r} / {}", human_bytes(b)),
            _ => String::new(),
        };
        let partial = if s.all_tenants { "" } else { " (partial)" };
        println!(
            "{:<34} {:<28} {:>8} {:>11}{tenant}{partial}",
            s.id,
            time(s.consistent_time),
            s.tenants,
            human_bytes(s.bytes)
        );
    }
    Ok(())
}

/// The change stream's lines of `list`: earlier streams, this one, and whether capture runs.
fn print_stream(stream: Option<&crate::listing::StreamLine>) {
    let Some(s) = stream else {
        println!("no change stream: run `updog-backup init`, then `updog-backup daemon`");
        return;
    };
    for e in &s.earlier {
        println!(
            "earlier change stream (slot {}, replaced by `updog-backup init`): LSN {} to {}, covered until {}",
            e.slot,
            e.since_lsn,
            e.durable_lsn,
            time(e.covered_until)
        );
    }
    println!(
        "change stream (slot {}): {} pack(s) ({} indexed), {}, durable up to LSN {}, covered until {}",
        s.slot,
        s.packs,
        s.indexed_packs,
        human_bytes(s.bytes),
        s.durable_lsn,
        if s.covered_until == DateTime::<Utc>::UNIX_EPOCH {
            "nothing yet (is `updog-backup daemon` running?)".to_string()
        } else {
            time(s.covered_until)
        }
    );
    println!("{}", s.capture);
}

/// `list --tenants`: every tenant of the repository's snapshots.
async fn list_tenants(repo: &Repository, json: bool) -> Result<(), Error> {
    let report = crate::listing::tenants(repo).await?;
    if json {
        print_json(&report);
        return Ok(());
    }
    println!("repository {}", report.repository);
    print_stream(report.stream.as_ref());
    println!(
        "{:<36} {:>10} {:>11}  {:<27}  TO",
        "TENANT", "ROWS", "BYTES", "RESTORABLE FROM"
    );
    for t in &report.tenants {
        if let Some(at) = t.forgotten_at {
            println!(
                "{:<36} forgotten on {} (`updog-backup forget`): nothing of it can be restored",
                t.tenant,
                time(at)
            );
            continue;
        }
        let gaps = if t.window.ranges.len() > 1 {
            " (with gaps: `list --org` shows them)"
        } else {
            ""
        };
        println!(
            "{:<36} {:>10} {:>11}  {:<27}  {}{gaps}",
            t.tenant,
            t.rows,
            human_bytes(t.bytes),
            time(t.window.earliest),
            time(t.window.covered_until)
        );
    }
    println!(
        "{} tenant(s) in {} snapshot(s); rows and bytes as of the newest snapshot holding each",
        report.tenants.len(),
        report.snapshots
    );
    println!(
        "(a tenant created after the newest snapshot is listed once a snapshot holds it; `list --org` and `restore` find it in the change stream already)"
    );
    Ok(())
}

/// A tenant value from the command line in the repository's canonical form (uuids in
/// lowercase), checked against the tenant column's type recorded by the newest snapshot.
async fn resolve_tenant(repo: &Repository, org: &str) -> Result<String, Error> {
    if uuid::Uuid::parse_str(org).is_ok() {
        return validate_tenant(org, "uuid").map_err(Error::Usage);
    }
    let tenant_type = match repo.snapshots().await?.last() {
        Some(id) => repo.manifest(id).await?.tenant_type,
        None => "text".to_string(),
    };
    // A customer's name where its id belongs is the likely mistake: say where ids are.
    validate_tenant(org, &tenant_type).map_err(|m| {
        Error::Usage(format!(
            "{m}: --org takes the tenant's id (`updog-backup list --tenants` shows them)"
        ))
    })
}

/// `--at`: RFC 3339 with a zone, `now`, or a time before now (`-90s`, `-15m`, `-1h30m`,
/// `-2d`). What is wrong with anything else is said, with an example of the fix: an instant
/// without a zone is ambiguous, so it is refused rather than guessed.
pub fn parse_instant(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("now") {
        return Ok(now);
    }
    if let Some(relative) = t.strip_prefix('-') {
        return parse_ago(relative).map(|d| now - d).ok_or_else(|| {
            format!(
                "--at {text:?}: a time before now is a minus sign and amounts with units s, m, h or d, e.g. -90s, -15m, -1h30m, -2d"
            )
        });
    }
    if let Ok(at) = DateTime::parse_from_rfc3339(t) {
        return Ok(at.with_timezone(&Utc));
    }
    let zoneless = ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .any(|f| chrono::NaiveDateTime::parse_from_str(t, f).is_ok());
    if zoneless {
        return Err(format!(
            "--at {text:?} has no time zone: add one, e.g. {t}Z (UTC) or {t}+01:00"
        ));
    }
    let minutes = ["%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M"]
        .iter()
        .any(|f| chrono::NaiveDateTime::parse_from_str(t.trim_end_matches(['Z', 'z']), f).is_ok());
    if minutes {
        return Err(format!(
            "--at {text:?} has no seconds: add them and a zone, e.g. {}:00Z",
            t.trim_end_matches(['Z', 'z'])
        ));
    }
    if chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d").is_ok() {
        return Err(format!(
            "--at {text:?} is a date without a time: add a time and a zone, e.g. {t}T00:00:00Z"
        ));
    }
    Err(format!(
        "--at {text:?} is not a time: give RFC 3339 with a zone (e.g. 2026-11-26T10:41:07Z), `now`, or a time before now (e.g. -15m, -1h, -2d)"
    ))
}

/// `1h30m`, `90s`, `2d`: a duration from amounts with units.
fn parse_ago(text: &str) -> Option<chrono::TimeDelta> {
    let mut total = chrono::TimeDelta::zero();
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let amount: i64 = rest[..digits].parse().ok()?;
        let unit = rest[digits..].chars().next()?;
        let seconds = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return None,
        };
        total += chrono::TimeDelta::try_seconds(amount.checked_mul(seconds)?)?;
        rest = &rest[digits + 1..];
    }
    Some(total)
}

async fn diff(config: &Config, args: DiffArgs) -> Result<(), Error> {
    let now = Utc::now();
    let point = |text: &str| -> Result<RestoreTarget, Error> {
        if text.eq_ignore_ascii_case("latest") {
            return Ok(RestoreTarget::Latest);
        }
        Ok(RestoreTarget::At(
            parse_instant(text, now).map_err(Error::Usage)?,
        ))
    };
    let (from, to) = match (&args.at, &args.from, &args.to) {
        (Some(at), None, None) => (point(at)?, crate::diff::Against::Live),
        (None, Some(from), Some(to)) => (point(from)?, crate::diff::Against::Point(point(to)?)),
        _ => {
            return Err(Error::Usage(
                "diff takes --at TIME (against the live source) or --from TIME --to TIME (two restore points)".into(),
            ));
        }
    };
    let target_url = restore_target_url(config, args.target_url.as_deref())?;
    let repo = open_repository(config).await?;
    let info = repo.info().await?;
    let tenant = resolve_tenant(&repo, &args.org).await?;
    let identities = tenant_identities(config, &repo, &info, &tenant, target_time(&from)).await?;
    let request = crate::diff::DiffRequest {
        tenant,
        from,
        to,
        target_url,
        scratch_dir: config.stream.scratch_dir(),
    };
    let mut stdout = std::io::stdout().lock();
    let mut print_row = |change: crate::diff::RowChange| {
        let line = serde_json::to_string(&change).expect("rows serialize");
        let _ = writeln!(stdout, "{line}");
    };
    let each: Option<&mut dyn FnMut(crate::diff::RowChange)> = if args.rows {
        Some(&mut print_row)
    } else {
        None
    };
    let report = crate::diff::run(config, &repo, identities, &request, each).await?;
    if args.json {
        let line = serde_json::to_string(&report).expect("reports serialize");
        println!("{line}");
        return Ok(());
    }
    let side = |s: &crate::diff::Side| match s.lsn {
        Some(lsn) => format!("restore point {} (LSN {lsn})", time(s.time)),
        None => format!("the live source at {}", time(s.time)),
    };
    println!(
        "tenant {}: from {} to {}",
        report.tenant,
        side(&report.from),
        side(&report.to)
    );
    print_tables(
        &report.tables,
        ["inserted", "deleted", "updated", "unchanged"],
    );
    let changed: u64 = report.tables.iter().map(|t| t.changed()).sum();
    let tables = report.tables.iter().filter(|t| t.changed() > 0).count();
    println!("{changed} row(s) changed in {tables} table(s)");
    Ok(())
}

async fn rewind(config: &Config, args: RewindArgs) -> Result<(), Error> {
    let to = if args.to.eq_ignore_ascii_case("latest") {
        RestoreTarget::Latest
    } else {
        RestoreTarget::At(parse_instant(&args.to, Utc::now()).map_err(Error::Usage)?)
    };
    let target_url = restore_target_url(config, args.target_url.as_deref())?;
    let repo = open_repository(config).await?;
    let info = repo.info().await?;
    let tenant = resolve_tenant(&repo, &args.org).await?;
    let identities = tenant_identities(config, &repo, &info, &tenant, target_time(&to)).await?;
    let request = crate::rewind::RewindRequest {
        tenant,
        to,
        apply: args.apply,
        target_url,
        scratch_dir: config.stream.scratch_dir(),
    };
    let report = crate::rewind::run(config, &repo, identities, &request).await?;
    if args.json {
        print_json(&report);
        return Ok(());
    }
    let total =
        |f: fn(&crate::diff::TableDiff) -> u64| -> u64 { report.tables.iter().map(f).sum() };
    let (delete, put_back, set_back) = (
        total(|t| t.inserted),
        total(|t| t.deleted),
        total(|t| t.updated),
    );
    let point = format!(
        "restore point {} (LSN {})",
        time(report.to.time),
        report.to.lsn.map(|l| l.to_string()).unwrap_or_default()
    );
    if report.applied {
        println!(
            "rewound tenant {} to {point} in one transaction: deleted {delete}, put back {put_back}, set back {set_back} row(s)",
            report.tenant
        );
        if let Some(id) = &report.snapshot_before {
            println!(
                "the tenant as it was before is snapshot {id} (a restore at an instant just before this rewind, or a rewind to it, undoes it)"
            );
        }
        if let Some(key) = &report.record {
            println!("recorded as {key}");
        }
        return Ok(());
    }
    println!(
        "tenant {}: the plan to rewind it to {point} (nothing was written; --apply writes it):",
        report.tenant
    );
    print_tables(
        &report.tables,
        ["delete", "put back", "set back", "unchanged"],
    );
    println!(
        "{} row(s) to change in {} table(s)",
        delete + put_back + set_back,
        report.tables.iter().filter(|t| t.changed() > 0).count()
    );
    Ok(())
}

/// Per table: rows inserted, deleted, updated and unchanged since the restore point, under
/// the given headings (what `diff` and `rewind` call them).
fn print_tables(tables: &[crate::diff::TableDiff], headings: [&str; 4]) {
    let width = tables
        .iter()
        .map(|t| t.table.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let [a, b, c, d] = headings;
    println!("  {:width$}  {a:>9} {b:>9} {c:>9} {d:>9}", "table");
    for t in tables {
        let note = match (t.note, t.key.is_empty()) {
            (Some(note), _) => format!("  ({note})"),
            (None, true) => "  (no primary key: rows matched whole)".into(),
            (None, false) => String::new(),
        };
        println!(
            "  {:width$}  {:>9} {:>9} {:>9} {:>9}{note}",
            t.table, t.inserted, t.deleted, t.updated, t.unchanged
        );
    }
}

/// `--target-url` (without a password on the command line) or `restore.target_url`.
fn restore_target_url(config: &Config, given: Option<&str>) -> Result<String, Error> {
    if let Some(url) = given
        && redact_url(url) != url
    {
        return Err(Error::Usage(
            "--target-url contains a password, which other users can read on the command line: \
             put it in PGPASSWORD or a passfile instead"
                .into(),
        ));
    }
    Ok(given
        .map(str::to_string)
        .or_else(|| config.restore.target_url.clone())
        .ok_or(crate::restore::RestoreError::NoTarget)?)
}

async fn restore(config: &Config, args: RestoreArgs) -> Result<(), Error> {
    let target = match (&args.at, args.latest) {
        (Some(at), false) => {
            RestoreTarget::At(parse_instant(at, Utc::now()).map_err(Error::Usage)?)
        }
        _ => RestoreTarget::Latest,
    };
    let target_url = restore_target_url(config, args.target_url.as_deref())?;
    // Counted: the requests a restore makes are what S3 bills for it.
    let store = Arc::new(crate::storage::CountedStore::new(open_store(config).await?));
    let repo = Repository::new(store.clone()).with_concurrency(config.storage.concurrency);
    let info = repo.info().await?;
    let tenant = resolve_tenant(&repo, &args.org).await?;
    let identities = tenant_identities(config, &repo, &info, &tenant, target_time(&target)).await?;
    let request = RestoreRequest {
        tenant,
        target,
        target_db: args.target_db,
        target_url,
        scratch_dir: config.stream.scratch_dir(),
    };
    let mut report = crate::restore::run(&repo, identities, &request).await?;
    report.store_requests = store.requests();
    // The audit trail (and the daemon's restore count); a repository the restore role may
    // only read is worth a warning, not a failed restore.
    if let Err(e) = crate::restore::record(&repo, &report).await {
        tracing::warn!(error = %e, "could not record the restore in the repository (restores/)");
    }
    if args.json {
        print_json(&report);
        return Ok(());
    }
    println!(
        "restored tenant {} into database {} on {}",
        report.tenant, report.database, report.target
    );
    // The restore point is the tenant's last change, often before the instant asked for: say
    // that nothing of it changed in between, lest it look like the wrong instant was restored.
    let asked = match target {
        RestoreTarget::At(at) => at,
        RestoreTarget::Latest => report.window.covered_until,
    };
    let unchanged = if asked > report.restore_point.time {
        format!(
            " (nothing of the tenant changed after it up to {})",
            time(asked)
        )
    } else {
        String::new()
    };
    println!(
        "restore point: LSN {}, {}{unchanged} — snapshot {}{}; restorable window {}",
        report.restore_point.lsn,
        time(report.restore_point.time),
        report.snapshot,
        match &report.changes {
            Some(c) => format!(
                " + {} transaction(s) replayed from {} pack(s): {} inserts, {} updates, {} deletes, {} truncates, {} schema change(s)",
                c.transactions,
                c.packs,
                c.stats.inserts,
                c.stats.updates,
                c.stats.deletes,
                c.stats.truncates,
                c.stats.schema_changes.len()
            ),
            None => String::new(),
        },
        report.window
    );
    for change in report.changes.iter().flat_map(|c| &c.stats.schema_changes) {
        println!("  schema change {change}");
    }
    for (table, rows) in &report.tenant_rows {
        println!("  {table:<40} {rows:>10} rows");
    }
    for (table, rows) in &report.global_rows {
        println!("  {table:<40} {rows:>10} rows (global)");
    }
    for skipped in &report.not_recreated {
        println!("  NOT RECREATED {}: {}", skipped.entry, skipped.error);
    }
    println!(
        "{} rows in {:.1}s, {} store requests",
        report.total_rows(),
        report.seconds,
        report.store_requests.total()
    );
    Ok(())
}

async fn forget(config: &Config, org: &str, yes: bool, json: bool) -> Result<(), Error> {
    let repo = open_repository(config).await?;
    let info = repo.info().await?;
    crate::repository::tenant_keys::require_keyed(&repo, &info, "forget one tenant")?;
    let tenant = resolve_tenant(&repo, org).await?;
    if !yes {
        confirm_forget(&tenant)?;
    }
    let by = crate::repository::erasure::operator();
    let report = crate::repository::erasure::forget(&repo, &info, &tenant, &by).await?;
    if json {
        print_json(&report);
        return Ok(());
    }
    println!(
        "forgot tenant {}: {} key(s) deleted on {} by {}; nothing stored of it can be decrypted any more, with the repository identity or otherwise",
        report.tenant,
        report.keys.len(),
        time(report.at),
        report.by
    );
    println!(
        "every other tenant restores as before; a running daemon gives the tenant's id a new key from its next pack on, should it appear again"
    );
    Ok(())
}

/// `forget` cannot be undone: the operator types the tenant's id, or passes --yes.
fn confirm_forget(tenant: &str) -> Result<(), Error> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return Err(Error::Usage(format!(
            "forget erases tenant {tenant} from every backup, for good; standard input is not a terminal to confirm on: add --yes"
        )));
    }
    eprint!(
        "This erases tenant {tenant} from every backup in the repository, for good.\nType the tenant's id to confirm: "
    );
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .map_err(|e| Error::Failed(format!("reading the confirmation: {e}")))?;
    if answer.trim() != tenant {
        return Err(Error::Usage(
            "not confirmed (the id typed differs): nothing was erased".into(),
        ));
    }
    Ok(())
}

async fn rotate(
    config: &Config,
    add: Vec<String>,
    remove: Vec<String>,
    json: bool,
) -> Result<(), Error> {
    if add.is_empty() && remove.is_empty() {
        return Err(Error::Usage(
            "rotate needs --add RECIPIENT and/or --remove RECIPIENT".into(),
        ));
    }
    let repo = open_repository(config).await?;
    let info = repo.info().await?;
    crate::repository::tenant_keys::require_keyed(
        &repo,
        &info,
        "rotate its recipients by re-wrapping keys",
    )?;
    let configured = crate::codec::parse_recipients(&config.encryption.recipients)?;
    let target =
        crate::repository::rotation::target(&configured, &add, &remove).map_err(Error::Usage)?;
    crate::repository::rotation::check_start(&info, &configured, &target)?;
    let identities = Identities::load(
        config.encryption.identity_file.as_deref(),
        config.encryption.allow_readable_identity,
    )?;
    let report = crate::repository::rotation::rotate(&repo, &info, &identities, &target).await?;
    if json {
        print_json(&report);
        return Ok(());
    }
    println!(
        "re-wrapped {} key(s) ({} had the new recipients already); the repository is encrypted to {}",
        report.rewrapped,
        report.unchanged,
        report.recipients.join(", ")
    );
    let list: Vec<String> = target.iter().map(|r| format!("\"{r}\"")).collect();
    println!(
        "now set encryption.recipients = [{}] in the configuration and restart the daemon; a removed recipient's identity opens nothing any more",
        list.join(", ")
    );
    Ok(())
}

async fn verify(config: &Config, org: Option<String>, deep: bool) -> Result<(), Error> {
    let (repo, info, org) = open_initialised(config, org.as_deref()).await?;
    let keyring = if deep {
        let identities = load_identities(config, &info)?;
        Some(Keyring::load(&repo, identities, org.as_deref()).await?)
    } else {
        None
    };
    let report = crate::verify::run(&repo, org.as_deref(), keyring.as_ref()).await?;
    for failure in &report.failures {
        println!("FAILED {failure}");
    }
    for (tenant, f) in &report.forgotten {
        println!(
            "forgotten: tenant {tenant} (on {} by {}): {} object(s) unreadable on purpose, digests checked",
            time(f.at),
            f.by,
            f.objects
        );
    }
    let what = if deep {
        "decrypted and parsed"
    } else {
        "digests checked"
    };
    println!(
        "{} object(s) {what} ({}), {} failed",
        report.checked,
        report.breakdown(),
        report.failures.len()
    );
    if report.failures.is_empty() {
        Ok(())
    } else {
        Err(Error::Failed(format!(
            "{} object(s) failed verification",
            report.failures.len()
        )))
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn instants_say_what_is_missing() {
        let now = Utc.with_ymd_and_hms(2026, 12, 4, 12, 0, 0).unwrap();
        let ok = |t: &str| parse_instant(t, now).unwrap();
        assert_eq!(
            ok("2026-12-04T04:06:07Z"),
            Utc.with_ymd_and_hms(2026, 12, 4, 4, 6, 7).unwrap()
        );
        assert_eq!(
            ok("2026-12-04T05:06:07+01:00"),
            Utc.with_ymd_and_hms(2026, 12, 4, 4, 6, 7).unwrap()
        );
        assert_eq!(ok("now"), now);
        assert_eq!(ok("-1h"), now - chrono::TimeDelta::hours(1));
        assert_eq!(ok("-1h30m"), now - chrono::TimeDelta::minutes(90));
        assert_eq!(ok("-90s"), now - chrono::TimeDelta::seconds(90));
        assert_eq!(ok("-2d"), now - chrono::TimeDelta::days(2));
        let err = |t: &str| parse_instant(t, now).unwrap_err();
        let zoneless = err("2026-12-04T04:06:07");
        assert!(
            zoneless.contains("no time zone") && zoneless.contains("2026-12-04T04:06:07Z"),
            "{zoneless}"
        );
        assert!(err("2026-12-04 04:06:07.5").contains("no time zone"));
        assert!(err("2026-12-04").contains("T00:00:00Z"));
        assert!(err("2026-12-04T04:06Z").contains("2026-12-04T04:06:00Z"));
        let word = err("yesterday");
        assert!(
            word.contains("RFC 3339") && word.contains("-1h") && word.contains("now"),
            "{word}"
        );
        assert!(err("-1x").contains("-15m"));
        assert!(err("-").contains("-15m"));
        assert!(err("-1h30").contains("-15m"));
        assert!(!word.contains("premature end of input"));
    }

    /// `--help` explains every option (an option without help is one more thing to guess at
    /// 3 a.m.).
    #[test]
    fn every_option_has_help() {
        let cli = Cli::command();
        let mut missing = Vec::new();
        for command in cli.get_subcommands() {
            for arg in command.get_arguments() {
                if arg.get_help().is_none() && !["help", "version"].contains(&arg.get_id().as_str())
                {
                    missing.push(format!("{} --{}", command.get_name(), arg.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "options without help: {missing:?}");
    }

    /// `restore --org X` alone names both ways to choose the instant.
    #[test]
    fn restore_without_an_instant_names_at_and_latest() {
        let err = Cli::try_parse_from(["updog-backup", "restore", "--org", "x"]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("--at") && text.contains("--latest"), "{text}");
        assert!(
            Cli::try_parse_from(["updog-backup", "restore", "--org", "x", "--at", "-1h"]).is_ok()
        );
        assert!(
            Cli::try_parse_from([
                "updog-backup",
                "restore",
                "--org",
                "x",
                "--at",
                "now",
                "--latest"
            ])
            .is_err()
        );
    }
}
