//! One integration-test binary (one link, one PostgreSQL cluster and one SeaweedFS for all).

mod support;

mod bad_input;
mod capture;
mod daemon;
mod hostile;
mod isolation;
mod pgoutput;
mod replay;
mod replication;
mod replication_stream;
mod schema_change;
mod snapshot_restore;
mod storage;
mod tls;
