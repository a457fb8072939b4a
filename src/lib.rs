//! updog-backup: per-tenant backup and point-in-time restore for multi-tenant PostgreSQL.
//!
//! ```text
//!             replication connection (walsender)             ┌──────────────┐
//! PostgreSQL ───────────────► exported snapshot ───────────► │ snapshot     │
//!    │                         (CREATE_REPLICATION_SLOT)     │ exporter     │──► codec (zstd ─► age) ──► storage
//!    │  COPY (SELECT … WHERE tenant) per table per tenant ──►│ per tenant   │        (S3 / directory)
//!    │                                                       └──────────────┘
//!    └─ catalog: every table in the configured schemas is tenant (own column or a
//!       foreign-key path to it), global, or excluded — never silently skipped
//!
//! restore: repository ─► manifest ─► verify (digest + decrypt) ─► CREATE DATABASE ─► pre-data
//!          ─► COPY global + tenant rows ─► post-data (indexes, constraints, RLS) ─► report
//! ```
//!
//! capture: slot (pgoutput, proto 2) ─► decoder ─► router (tenant of each change) ─► pack
//!          writer (per-tenant sections, zstd ─► age) ─► store ─► acknowledge
//!
//! Module map: [`config`] (TOML + environment), [`storage`] (object stores), [`codec`]
//! (zstd then age, streaming), [`repository`] (keys, manifests, tenant archives),
//! [`source`] (PostgreSQL side: connections, catalog, snapshot export), [`replication`]
//! (walsender protocol, pgoutput), [`capture`] (routing, packs), [`restore`] (recovery databases), [`cli`] (commands).

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
