//! The fault suite: the daemon under a continuous multi-tenant write load while things go
//! wrong — SIGKILLs at every phase, the object store gone for 30 s and then slow, PostgreSQL
//! restarted (fast and immediate), the spool's disk full, a snapshot killed halfway. After
//! each: restores at recorded instants equal the source's state then (zero changes lost, zero
//! applied twice), and no tenant's restore holds another's rows (the oracle compares every
//! table of the recovery database unfiltered).
//!
//! Short form (CI, part of `scripts/test.sh`): `cargo test --test faults`.
//! Long form: `UPDOG_FAULTS_KILLS=200 UPDOG_FAULTS_OUTAGE_SECONDS=120 cargo test --test faults -- --nocapture`.
//! Tests run one at a time (they restart this binary's own PostgreSQL cluster and cut its
//! object store), so each takes [`serial`] first.

// The harness (tests/support, shared with tests/e2e and the benches), as `crate::support`.
use updog_backup_test_support as support;

mod kills;
mod outages;

use tokio::sync::{Mutex, MutexGuard};

static SERIAL: Mutex<()> = Mutex::const_new(());

/// One fault test at a time.
pub async fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// A count from the environment (the long form), else the short form's.
pub fn setting(var: &str, short: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(short)
}
