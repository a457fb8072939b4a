//! The oracle of the capture tests: the source's state of a tenant (digest per table, from
//! hand-written filters independent of the code under test) recorded at instants, a
//! continuous multi-tenant write load that records them, and restores compared with them.
//! [`schemas`]: the same for the random schemas of the isolation property test.

pub mod schemas;

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use tokio_postgres::Client;

use super::TestEnv;
use super::fixture::TENANT_FILTERS;
use super::postgres::cluster;

/// (rows, md5 of every row's text form in a stable order).
pub async fn digest(
    client: &tokio_postgres::Client,
    table: &str,
    filter: Option<&str>,
) -> (i64, String) {
    let filter = filter.map(|f| format!("WHERE {f}")).unwrap_or_default();
    let sql = format!(
        "SELECT count(*), coalesce(md5(string_agg(r::text, E'\\n' ORDER BY r::text)), '') FROM (SELECT * FROM {table} {filter}) r"
    );
    let row = client
        .query_one(&sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    (row.get(0), row.get(1))
}

/// The source's state of `tenant` now: digest per table.
pub async fn state(source: &Client, tenant: &str) -> BTreeMap<String, (i64, String)> {
    let mut out = BTreeMap::new();
    for (table, filter) in TENANT_FILTERS {
        let filter = filter.map(|f| f.replace("$ORG", tenant));
        out.insert(
            table.to_string(),
            digest(source, table, filter.as_deref()).await,
        );
    }
    out
}

pub async fn now(client: &Client) -> DateTime<Utc> {
    client
        .query_one("SELECT clock_timestamp()", &[])
        .await
        .unwrap()
        .get(0)
}

/// Restores `tenant` at `at` and compares every table with `expected` (the recovery side
/// unfiltered: any other tenant's row would show).
pub async fn assert_restore_equals(
    env: &TestEnv,
    tenant: &str,
    at: DateTime<Utc>,
    expected: &BTreeMap<String, (i64, String)>,
    label: &str,
) {
    let target = format!("pitr_{}_{}", label, fastrand::u32(..));
    let at_text = at.to_rfc3339_opts(SecondsFormat::Micros, true);
    let out = env.ok(&[
        "restore",
        "--org",
        tenant,
        "--at",
        &at_text,
        "--target-db",
        &target,
    ]);
    assert!(out.contains("restore point: LSN"), "{out}");
    eprintln!("{label}: {}", out.lines().nth(1).unwrap_or_default());
    let recovered = cluster().await.client(&target).await;
    for (table, want) in expected {
        let found = digest(&recovered, table, None).await;
        assert_eq!(
            &found, want,
            "{label}: {table} of tenant {tenant} restored at {at_text} differs\n{out}"
        );
    }
}

/// A random committed change of one tenant's rows (each its own transaction).
pub async fn random_change(source: &Client, tenant: &str, n: u32) {
    let sql = match fastrand::u32(0..6) {
        0 => format!(
            "INSERT INTO audit.events (organization_id, action, entity, entity_id)
             VALUES ('{tenant}', 'w', 'e', '{n}')"
        ),
        1 => format!(
            "INSERT INTO app.investment_lots (investment_id, shares, price_per_share_cents, acquired_on)
             SELECT i.id, {n}, 1, '2026-03-01' FROM app.investments i JOIN app.funds f ON f.id = i.fund_id
              WHERE f.organization_id = '{tenant}' ORDER BY random() LIMIT 1"
        ),
        2 => format!(
            "UPDATE app.investment_lots SET shares = shares + 1 WHERE id = (
               SELECT l.id FROM app.investment_lots l JOIN app.investments i ON i.id = l.investment_id
                 JOIN app.funds f ON f.id = i.fund_id WHERE f.organization_id = '{tenant}' ORDER BY random() LIMIT 1)"
        ),
        3 => format!(
            "DELETE FROM app.investment_lots WHERE id = (
               SELECT l.id FROM app.investment_lots l JOIN app.investments i ON i.id = l.investment_id
                 JOIN app.funds f ON f.id = i.fund_id WHERE f.organization_id = '{tenant}' ORDER BY random() LIMIT 1)"
        ),
        4 => format!("UPDATE app.funds SET size_cents = {n} WHERE organization_id = '{tenant}'"),
        _ => format!(
            "BEGIN; INSERT INTO audit.events (organization_id, action, entity) VALUES ('{tenant}', 'x', 'y');
             DELETE FROM audit.events WHERE organization_id = '{tenant}' AND action = 'w'
               AND entity_id = (SELECT min(entity_id) FROM audit.events WHERE organization_id = '{tenant}' AND action = 'w');
             COMMIT;"
        ),
    };
    source
        .batch_execute(&sql)
        .await
        .unwrap_or_else(|e| panic!("{e}: {sql}"));
}

/// Per tenant, its state (digest per table).
pub type States = BTreeMap<String, BTreeMap<String, (i64, String)>>;

/// A continuous multi-tenant write load in rounds of 40 random changes (every fourth round
/// also a transaction large enough to be streamed); between rounds, with no write in flight,
/// the instant and every tenant's state are recorded: the oracle restores are compared with.
pub struct Workload {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: tokio::task::JoinHandle<Vec<(DateTime<Utc>, States)>>,
}

impl Workload {
    pub fn start(db: &str, tenants: &[String]) -> Workload {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (db, tenants, flag) = (db.to_string(), tenants.to_vec(), stop.clone());
        let handle = tokio::spawn(async move {
            let source = cluster().await.client(&db).await;
            // The oracle records what is committed: durably, even if the server crashes next.
            source
                .batch_execute("SET synchronous_commit = on")
                .await
                .unwrap();
            let mut instants = Vec::new();
            let mut round = 0;
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                round += 1;
                if round % 4 == 0 {
                    // Larger than logical_decoding_work_mem: streamed before it commits.
                    let tenant = &tenants[fastrand::usize(..tenants.len())];
                    source
                        .batch_execute(&format!(
                            "INSERT INTO audit.events (organization_id, action, entity, entity_id)
                             SELECT '{tenant}', 'big', 'row', g::text FROM generate_series(1, 2000) g"
                        ))
                        .await
                        .unwrap();
                }
                for n in 0..40 {
                    let tenant = &tenants[fastrand::usize(..tenants.len())];
                    random_change(&source, tenant, round * 100 + n).await;
                }
                let t = now(&source).await;
                let mut states = BTreeMap::new();
                for tenant in &tenants {
                    states.insert(tenant.clone(), state(&source, tenant).await);
                }
                instants.push((t, states));
            }
            instants
        });
        Workload { stop, handle }
    }

    /// Stops after the current round; the instants recorded, oldest first.
    pub async fn stop(self) -> Vec<(DateTime<Utc>, States)> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.handle.await.unwrap()
    }
}

/// Restores every tenant of the oracle at a third, two thirds and the end of `instants`.
pub async fn assert_restores_at_thirds(
    env: &TestEnv,
    instants: &[(DateTime<Utc>, States)],
    label: &str,
) {
    let picks = [
        instants.len() / 3,
        2 * instants.len() / 3,
        instants.len() - 1,
    ];
    for i in picks {
        let (t, states) = &instants[i];
        for (tenant, state) in states {
            assert_restore_equals(env, tenant, *t, state, &format!("{label}{i}")).await;
        }
    }
}
