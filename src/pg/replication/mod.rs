//! The walsender (replication) protocol.
//!
//! Owns the replication connection — startup and authentication on a `replication=database`
//! session, the replication commands (`IDENTIFY_SYSTEM`, `CREATE_REPLICATION_SLOT`,
//! `DROP_REPLICATION_SLOT`) — the CopyBoth stream of `START_REPLICATION` ([`ReplicationStream`]:
//! WAL data, keepalives, standby status updates). Its payloads are decoded by
//! [`crate::pg::pgoutput`]; positions are [`crate::pg::Lsn`]s.
//!
//! It must never decide what to back up: which slot, from which position, which tables and
//! tenants are the caller's decisions. It also never
//! acknowledges a position on its own; only the caller knows what is durable (ARCHITECTURE.md,
//! invariant 1: no loss).
//!
//! It is written directly on `postgres-protocol` because tokio-postgres has no replication mode.

//!
//! One file a job: [`ReplicationError`] (`error`), the socket and its TLS (`transport`), message
//! framing and rows (`wire`), the password exchange (`auth`), the session and its commands
//! (`session`), the CopyBoth stream (`stream`); the tests share one scripted walsender (`mock`).

mod auth;
mod error;
#[cfg(test)]
mod mock;
mod session;
mod stream;
mod transport;
mod wire;

pub use error::ReplicationError;
pub use session::{
    CreatedSlot, DEFAULT_APPLICATION_NAME, ReplicationConnection, SlotSnapshot, SystemIdentity,
};
pub use stream::{ReplicationStream, STATUS_UPDATE_INTERVAL, StreamEvent, quote_publication_names};
pub use transport::Socket;
pub use wire::Row;
