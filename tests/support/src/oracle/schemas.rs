//! The oracle of the isolation property test: each row's tenant of a generated schema (see
//! [`crate::schema_gen`]), computed from the source's data by the routes the generator built,
//! never by asking the product; and restores compared with it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tokio_postgres::Client;

use crate::TestEnv;
use crate::oracle::digest;
use crate::postgres::cluster;
use crate::schema_gen::*;

// ---------------------------------------------------------------------------------------------
// The oracle: each row's tenant, from the source's data and the generator's routes

pub async fn read_state(client: &Client, spec: &Spec) -> Result<State, String> {
    let mut state: State = Vec::new();
    // Per table: key → tenant of the row holding it.
    let mut keys: Vec<HashMap<Vec<String>, Option<usize>>> = Vec::new();
    for i in 0..spec.tables.len() {
        let cols = spec.struct_columns(i);
        let sql = format!(
            "SELECT rid{} FROM {} ORDER BY rid",
            cols.iter()
                .map(|c| format!(", {}::text", qi(c)))
                .collect::<String>(),
            spec.qname(i)
        );
        let rows = client
            .query(&sql, &[])
            .await
            .map_err(|e| format!("{sql}: {e}"))?;
        let mut out = Vec::new();
        let mut map = HashMap::new();
        for r in rows {
            let mut row = Row {
                rid: r.get(0),
                tenant: None,
                vals: BTreeMap::new(),
            };
            for (n, c) in cols.iter().enumerate() {
                row.vals
                    .insert(c.clone(), r.get::<_, Option<String>>(n + 1));
            }
            row.tenant = match &spec.tables[i].route {
                Route::Root | Route::Direct { .. } => match row.get(&spec.route_columns(i)[0]) {
                    Some(v) => Some(spec.tenant_index(v)?),
                    None => None,
                },
                Route::Via {
                    parent, carrier, ..
                } => {
                    let fk: Option<Vec<String>> = spec
                        .route_columns(i)
                        .iter()
                        .map(|c| row.get(c).map(str::to_string))
                        .collect();
                    match fk {
                        // Any NULL: MATCH SIMPLE, the key leads nowhere.
                        None => None,
                        Some(fk) => {
                            let t = *keys[*parent].get(&fk).ok_or_else(|| {
                                format!(
                                    "{}: rid {} references no row of {} ({fk:?})",
                                    spec.tables[i].name, row.rid, spec.tables[*parent].name
                                )
                            })?;
                            if let Some(c) = carrier {
                                let own = spec.tenant_index(row.get(c).unwrap())?;
                                if t != Some(own) {
                                    return Err(format!(
                                        "{}: rid {} carries tenant {own} but its parent is {t:?}",
                                        spec.tables[i].name, row.rid
                                    ));
                                }
                            }
                            t
                        }
                    }
                }
            };
            if let Some(k) = key_of(spec, i, &row) {
                map.insert(k, row.tenant);
            }
            out.push(row);
        }
        state.push(out);
        keys.push(map);
    }
    Ok(state)
}

// ---------------------------------------------------------------------------------------------
// Restores compared with the oracle

#[derive(Default, Debug, Clone)]
pub struct Stats {
    pub cases: u64,
    pub capture_cases: u64,
    pub tables: u64,
    pub rows: u64,
    pub changes: u64,
    pub failed_changes: u64,
    pub restores: u64,
    pub rows_checked: u64,
    pub leaked: u64,
    pub lost: u64,
    pub differing: u64,
}

impl Stats {
    pub fn add(&mut self, o: &Stats) {
        self.cases += o.cases;
        self.capture_cases += o.capture_cases;
        self.tables += o.tables;
        self.rows += o.rows;
        self.changes += o.changes;
        self.failed_changes += o.failed_changes;
        self.restores += o.restores;
        self.rows_checked += o.rows_checked;
        self.leaked += o.leaked;
        self.lost += o.lost;
        self.differing += o.differing;
    }
}

/// What a case leaves behind to clean up, known before anything can fail.
#[derive(Default)]
pub struct Cleanup {
    pub source_db: Option<String>,
    pub slot: Option<String>,
    pub recovery_dbs: Vec<String>,
    /// The changes applied so far (capture cases), for the report of a case that panics.
    pub log: Vec<String>,
}

impl Cleanup {
    pub async fn run(&self, keep_databases: bool) {
        let pg = cluster().await;
        let admin = pg.client("postgres").await;
        if let Some(slot) = &self.slot {
            let _ = admin
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                    &[slot],
                )
                .await;
        }
        if keep_databases {
            return;
        }
        for db in self.recovery_dbs.iter().chain(&self.source_db) {
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", qi(db)))
                .await;
        }
    }
}

/// Restores `tenant` (`--latest`, or `--at`) and compares the recovery database with the
/// oracle `state` read from `source`; mismatches go to `failures`.
#[allow(clippy::too_many_arguments)]
pub async fn restore_and_compare(
    spec: &Spec,
    env: &TestEnv,
    source: &Client,
    state: &State,
    tenant: usize,
    at: Option<&str>,
    label: &str,
    content: bool,
    stats: &mut Stats,
    cleanup: &mut Cleanup,
    failures: &mut Vec<String>,
) {
    let pg = cluster().await;
    let target = format!("iso_{:x}_{label}_{tenant}", spec.seed & 0xffff_ffff);
    cleanup.recovery_dbs.push(target.clone());
    let org = format!("--org={}", spec.tenants[tenant]);
    let mut args = vec!["restore", org.as_str(), "--target-db", target.as_str()];
    match at {
        Some(t) => args.extend(["--at", t]),
        None => args.push("--latest"),
    }
    let out = env.run(&args);
    stats.restores += 1;
    let what = format!(
        "{label}: restore of tenant {:?} ({})",
        spec.tenants[tenant],
        at.unwrap_or("--latest")
    );
    if !out.status.success() {
        failures.push(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
        return;
    }
    let recovered = pg.client(&target).await;
    for (i, rows) in state.iter().enumerate() {
        let table = spec.qname(i);
        let expected: BTreeSet<i64> = rows
            .iter()
            .filter(|r| r.tenant == Some(tenant))
            .map(|r| r.rid)
            .collect();
        let found: BTreeSet<i64> = match recovered
            .query(&format!("SELECT rid FROM {table}"), &[])
            .await
        {
            Ok(rs) => rs.iter().map(|r| r.get(0)).collect(),
            Err(e) => {
                failures.push(format!("{what}: {table}: {e}"));
                continue;
            }
        };
        stats.rows_checked += expected.len() as u64;
        let leaked: Vec<String> = found
            .difference(&expected)
            .map(|rid| {
                let owner = match rows.iter().find(|r| r.rid == *rid) {
                    Some(r) => match r.tenant {
                        Some(k) => format!("tenant {:?}", spec.tenants[k]),
                        None => "no tenant".into(),
                    },
                    None => "no longer in the source".into(),
                };
                format!("rid {rid} ({owner})")
            })
            .collect();
        let lost: Vec<i64> = expected.difference(&found).copied().collect();
        stats.leaked += leaked.len() as u64;
        stats.lost += lost.len() as u64;
        if !leaked.is_empty() {
            failures.push(format!(
                "{what}: {} LEAKED {} row(s) not of this tenant: {}",
                spec.tables[i].name,
                leaked.len(),
                leaked.join(", ")
            ));
        }
        if !lost.is_empty() {
            failures.push(format!(
                "{what}: {} LOST {} row(s) of this tenant: rids {lost:?}",
                spec.tables[i].name,
                lost.len()
            ));
        }
        if content && leaked.is_empty() && lost.is_empty() {
            let ids = expected
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let filter = format!("rid = ANY('{{{ids}}}'::bigint[])");
            let want = digest(source, &table, Some(&filter)).await;
            let got = digest(&recovered, &table, None).await;
            if want != got {
                stats.differing += 1;
                failures.push(format!(
                    "{what}: {} holds the right rows with different content",
                    spec.tables[i].name
                ));
            }
        }
    }
    let mut globals = vec!["currencies"];
    if spec.forced_global {
        globals.push("shared");
    }
    // Global tables as of an earlier instant are not in `source` any more.
    if !content {
        globals.clear();
    }
    for g in globals {
        let table = spec.qual(g);
        if digest(source, &table, None).await != digest(&recovered, &table, None).await {
            failures.push(format!("{what}: global table {g} differs from the source"));
        }
    }
    if spec.excluded {
        let exists: Option<String> = recovered
            .query_one("SELECT to_regclass($1)::text", &[&spec.qual("scratch")])
            .await
            .unwrap()
            .get(0);
        if exists.is_some() {
            let n: i64 = recovered
                .query_one(
                    &format!("SELECT count(*) FROM {}", spec.qual("scratch")),
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if n > 0 {
                stats.leaked += n as u64;
                failures.push(format!("{what}: the excluded table holds {n} row(s)"));
            }
        }
    }
}
