//! updog-backup: per-tenant backup and point-in-time restore for multi-tenant PostgreSQL.
//!
//! ```text
//!              replication connection (pgoutput, proto 2)
//! PostgreSQL ──► pg::replication ─► pg::pgoutput ─► capture (router ─► pack writer) ─► repository ─► storage
//!    │  exported snapshot, COPY per table per tenant                                    ▲           (S3 / dir)
//!    └──────────────────────────────────► snapshot ─────────────────────────────────────┘
//! restore: repository ─► plan(org, T) ─► archive + pack sections ─► load, replay ≤ T ─► report
//! daemon:  supervisor ∥ capture ∥ schedule (snapshots, retention) ∥ slot health ∥ HTTP
//! ```
//!
//! The module map, lowest layer first (a module imports only modules above it in this list;
//! ARCHITECTURE.md has the invariants, the reasons and the error table):
//!
//! - [`retry`]: the error classes ([`retry::Classify`]) and the backoff of every retry loop.
//! - [`pg`]: talking to PostgreSQL — conninfo, passfile, TLS, connecting, quoting, SQLSTATE
//!   classes, the walsender protocol, pgoutput, [`pg::Lsn`].
//! - [`storage`]: the `ObjectStore` trait; local directory, S3, memory.
//! - [`codec`]: zstd then age, streaming; identities and recipients.
//! - [`progress`]: progress bars on a terminal, nothing elsewhere.
//! - [`config`]: the TOML file and its environment overrides, validated.
//! - [`repository`]: the format, all of it (FORMAT.md), behind [`repository::Repository`].
//! - [`source`]: what we ask the source — catalog and tenant routing, `check`, the
//!   publication, pg_dump.
//! - [`telemetry`]: `/status`, Prometheus metrics, the store wrapper that times requests.
//! - [`capture`]: the daemon's change stream — router, pack writer, spools, stream gaps.
//! - [`snapshot`]: a consistent export split by tenant.
//! - [`restore`]: one tenant into a new recovery database (plan, load, replay, report).
//! - [`retention`]: what `keep_snapshots` leaves to delete, deleted in a safe order.
//! - [`verify`], [`listing`], [`init`]: the `verify`, `list` and `init` commands as library
//!   functions returning reports.
//! - [`daemon`]: supervisor, leader lock and lease, snapshot schedule, slot health, HTTP.
//! - [`error`]: the command boundary's error and its exit code; [`cli`]: parse and print.

pub mod capture;
pub mod cli;
pub mod codec;
pub mod config;
pub mod daemon;
pub mod error;
pub mod init;
pub mod listing;
pub mod pg;
pub mod progress;
pub mod repository;
pub mod restore;
pub mod retention;
pub mod retry;
pub mod snapshot;
pub mod source;
pub mod storage;
pub mod telemetry;
pub mod verify;
