//! Everything about talking to PostgreSQL, and nothing about what to ask it.
//!
//! Owns connection targets ([`conninfo`]: URLs, the passfile, libpq's TLS policy and its
//! certificate verifier in [`tls`]), opening SQL connections ([`connect`]), quoting
//! ([`quote`]), what a server error means for a retry ([`sqlstate`]), WAL positions
//! ([`Lsn`]), the walsender protocol ([`replication`]) and pgoutput messages ([`pgoutput`]).
//!
//! It must never decide what to back up (which tables, tenants, slot or position: its callers'
//! decisions) and never acknowledges a WAL position on its own. It imports no other module of
//! the crate but [`crate::retry`].

pub mod connect;
pub mod conninfo;
mod lsn;
pub mod passfile;
pub mod pgoutput;
pub mod quote;
pub mod replication;
pub mod sqlstate;
pub mod tls;

pub use connect::{ConnectError, connect};
pub use conninfo::{InvalidUrl, PgTarget, pg_config, redact_url};
pub use lsn::{Lsn, LsnParseError};
pub use quote::{qualified, quote_ident, quote_literal};
