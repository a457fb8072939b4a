//! (b) replay rate: `restore --org <tenant> --latest --json` of the busiest tenant (and of
//! (c)'s tenant), changes / `changes.seconds`, and the parsing of `restore --json`.

use serde_json::Value;

use updog_backup_test_support::postgres;
use updog_backup_test_support::restore_latest;

use crate::daemon::Env;
use crate::load::Bench;
use crate::memory::Big;
use crate::plumbing::{Timed, timed};

pub(crate) struct ReplayResult {
    pub(crate) label: String,
    pub(crate) tenant: String,
    pub(crate) runs: Vec<ReplayRun>,
}

pub(crate) struct ReplayRun {
    pub(crate) changes: u64,
    pub(crate) transactions: u64,
    pub(crate) packs: u64,
    pub(crate) replay_seconds: f64,
    pub(crate) total: Timed,
    pub(crate) rows: u64,
}

impl ReplayRun {
    pub(crate) fn rate(&self) -> f64 {
        self.changes as f64 / self.replay_seconds
    }
}

/// Parses `restore --json`.
pub(crate) fn replay_run(t: Timed) -> ReplayRun {
    let v: Value = serde_json::from_str(&t.stdout)
        .unwrap_or_else(|e| panic!("restore --json printed no JSON ({e}): {}", t.stdout));
    let c = &v["changes"];
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    ReplayRun {
        changes: n("inserts") + n("updates") + n("deletes") + n("truncates"),
        transactions: n("transactions"),
        packs: n("packs"),
        replay_seconds: c["seconds"].as_f64().unwrap_or(f64::NAN),
        rows: v["tenant_rows"]
            .as_object()
            .map(|m| m.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0),
        total: t,
    }
}

impl Bench<'_> {
    /// (b) restores of the busiest tenant (and of the large transaction's tenant).
    pub(crate) fn replays(
        &self,
        pg: &postgres::Cluster,
        env: &Env,
        busy_tenant: &str,
        big: Option<&Big>,
    ) -> Vec<ReplayResult> {
        let a = self.args;
        let mut replays = Vec::new();
        if a.parts.b {
            let mut list = vec![(
                "tenant 1 (the busiest)".to_string(),
                busy_tenant.to_string(),
                a.runs,
            )];
            if let Some(b) = big {
                list.push((
                    format!("tenant {} (the {}-row transaction)", a.tenants, b.rows),
                    b.tenant.clone(),
                    1,
                ));
            }
            for (label, tenant, runs) in list {
                let mut result = ReplayResult {
                    label,
                    tenant: tenant.clone(),
                    runs: Vec::new(),
                };
                for run in 0..runs {
                    eprintln!(
                        "   (b) restore --latest of {} ({}/{runs})…",
                        result.label,
                        run + 1
                    );
                    let target = format!("bench_b_{}_{run}", &tenant[..8]);
                    let t = timed(
                        &env.dir,
                        &mut env.command(
                            &[&restore_latest(&tenant, &target)[..], &["--json"]].concat(),
                        ),
                        "restore --latest",
                    );
                    let r = replay_run(t);
                    eprintln!(
                        "       {} changes replayed in {:.2} s ({:.0}/s); whole restore {:.2} s",
                        r.changes,
                        r.replay_seconds,
                        r.rate(),
                        r.total.wall
                    );
                    result.runs.push(r);
                    pg.psql(
                        "postgres",
                        &["-c", &format!("DROP DATABASE \"{target}\" WITH (FORCE)")],
                    );
                }
                replays.push(result);
            }
        }
        replays
    }
}
