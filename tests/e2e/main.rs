//! One integration-test binary (one link, one PostgreSQL cluster and one SeaweedFS for all).

// The harness (tests/support, shared with tests/faults and the benches), as `crate::support`.
use updog_backup_test_support as support;

mod bad_input;
mod capture;
mod daemon;
mod diff;
mod extensions;
mod hostile;
mod isolation;
mod many_tenants;
mod migrations;
mod onboarding;
mod operator;
mod pgoutput;
mod replay;
mod replication;
mod replication_stream;
mod rewind;
mod schema_change;
mod snapshot_restore;
mod storage;
mod stream_index;
mod tenant_keys;
mod tls;

/// The support crate runs the binary cargo built for this target (it finds it by path, as a
/// library is not told `CARGO_BIN_EXE_*`).
#[test]
fn support_runs_the_binary_cargo_built() {
    assert_eq!(
        std::path::Path::new(support::bin()).canonicalize().unwrap(),
        std::path::Path::new(env!("CARGO_BIN_EXE_updog-backup"))
            .canonicalize()
            .unwrap()
    );
}
