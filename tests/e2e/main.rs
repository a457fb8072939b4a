//! One integration-test binary (one link, one PostgreSQL cluster and one SeaweedFS for all).

mod support;

mod bad_input;
mod replication;
mod snapshot_restore;
mod storage;
