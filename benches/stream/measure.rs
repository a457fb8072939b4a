//! The measured commands at one stream length: restores of the followed tenants, `list --org`,
//! `verify`, and the daemon's start-up, at every added round trip, each timed as a whole and its
//! requests counted by the proxy; a command predicted to exceed the budget is estimated instead.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::Value;

use updog_backup_test_support::drop_database;
use updog_backup_test_support::oracle::digest;
use updog_backup_test_support::postgres::cluster;
use updog_backup_test_support::proxy::{Mode, describe_methods};

use crate::grow::{Stream, start_daemon, wait_capturing};

/// What one command cost at one round trip.
#[derive(Clone, Debug)]
pub(crate) struct Cost {
    pub(crate) seconds: f64,
    pub(crate) requests: u64,
    pub(crate) by_method: BTreeMap<String, u64>,
    /// Not run: predicted from the smallest round trip's run.
    pub(crate) estimated: bool,
}

/// A restore at one round trip, with what its report says.
#[derive(Clone, Debug)]
pub(crate) struct RestoreCost {
    pub(crate) cost: Cost,
    pub(crate) packs_replayed: u64,
    pub(crate) transactions: u64,
}

/// The daemon's start-up at one round trip.
#[derive(Clone, Debug)]
pub(crate) struct Startup {
    /// Until `/status` says capturing (requests: those made by then).
    pub(crate) cost: Cost,
    /// From spawning it until its log's `capture started`.
    pub(crate) logged: Option<f64>,
}

pub(crate) struct SizeResult {
    pub(crate) packs: u64,
    /// (label, fixture tenant) → one per round trip; a baseline binary's restores follow each
    /// tenant's, labelled "<tenant>, baseline".
    pub(crate) restores: Vec<((String, u32), Vec<RestoreCost>)>,
    pub(crate) list: Vec<Cost>,
    pub(crate) verify: Vec<Cost>,
    pub(crate) startup: Vec<Startup>,
}

fn mode(round_trip_ms: u64) -> Mode {
    match round_trip_ms {
        0 => Mode::Pass,
        ms => Mode::Latency(Duration::from_millis(ms)),
    }
}

/// The prediction for `round_trip_ms` from the run at the smallest round trip `base`: requests
/// made one after another each take the added round trip more. `None` when it is within the
/// budget (then the command runs).
fn over_budget(s: &Stream, base: Option<&Cost>, base_ms: u64, round_trip_ms: u64) -> Option<Cost> {
    let base = base?;
    let extra = (round_trip_ms - base_ms) as f64 / 1000.0;
    let predicted = base.seconds + base.requests as f64 * extra;
    (predicted > s.args.budget).then(|| Cost {
        seconds: predicted,
        estimated: true,
        ..base.clone()
    })
}

/// Runs `args` with the proxy at `round_trip_ms`; its cost and stdout.
fn run(s: &Stream, round_trip_ms: u64, args: &[&str]) -> (Cost, String) {
    run_binary(s, crate::BIN, round_trip_ms, args)
}

/// [`run`] with the binary `program`.
fn run_binary(s: &Stream, program: &str, round_trip_ms: u64, args: &[&str]) -> (Cost, String) {
    s.proxy.set(mode(round_trip_ms));
    s.proxy.reset_requests();
    let clock = Instant::now();
    let output = s.env.command_of(program, args).output().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}):\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let out = String::from_utf8(output.stdout).unwrap();
    let seconds = clock.elapsed().as_secs_f64();
    let cost = Cost {
        seconds,
        requests: s.proxy.requests(),
        by_method: s.proxy.requests_by_method(),
        estimated: false,
    };
    s.proxy.set(Mode::Pass);
    (cost, out)
}

fn show(what: &str, round_trip_ms: u64, c: &Cost) {
    eprintln!(
        "   {what} at +{round_trip_ms} ms: {}{:.2} s, {} requests ({})",
        if c.estimated { "not run, est. " } else { "" },
        c.seconds,
        c.requests,
        describe_methods(&c.by_method)
    );
}

pub(crate) fn at_size(s: &Stream) -> SizeResult {
    let packs = s.packs;
    eprintln!("measuring at {packs} packs …");
    let expected = s.states();
    let trips = &s.args.round_trips;
    let base_ms = trips[0];
    let mut restores = Vec::new();
    let binaries: Vec<(&str, &str)> = std::iter::once(("", crate::BIN))
        .chain(s.args.baseline.as_deref().map(|b| (", baseline", b)))
        .collect();
    let followed = s.args.followed().into_iter().flat_map(|(label, k)| {
        binaries
            .iter()
            .map(move |&(suffix, bin)| (label, suffix, bin, k))
    });
    for (label, suffix, program, k) in followed {
        let label = format!("{label}{suffix}");
        let tenant = s.tenant(k).to_string();
        let mut costs: Vec<RestoreCost> = Vec::new();
        for &ms in trips {
            if let Some(cost) = over_budget(s, costs.first().map(|c| &c.cost), base_ms, ms) {
                let first = &costs[0];
                show(&format!("restore of the {label} tenant"), ms, &cost);
                costs.push(RestoreCost {
                    cost,
                    ..first.clone()
                });
                continue;
            }
            let target = format!("stream_{}_{packs}_{ms}ms", label.replace(", ", "_"));
            let (cost, out) = run_binary(
                s,
                program,
                ms,
                &[
                    "restore",
                    "--org",
                    &tenant,
                    "--latest",
                    "--json",
                    "--target-db",
                    &target,
                ],
            );
            show(&format!("restore of the {label} tenant"), ms, &cost);
            let report: Value = serde_json::from_str(&out).expect("restore --json is JSON");
            // A restore is only worth timing if it is right.
            s.rt.block_on(async {
                let recovered = cluster().await.client(&target).await;
                for (table, want) in &expected[&tenant] {
                    let found = digest(&recovered, table, None).await;
                    assert_eq!(
                        &found, want,
                        "{table} of the {label} tenant restored from {packs} packs differs from the source"
                    );
                }
                drop(recovered);
                drop_database(&target).await;
            });
            costs.push(RestoreCost {
                cost,
                packs_replayed: report["changes"]["packs"].as_u64().unwrap_or(0),
                transactions: report["changes"]["transactions"].as_u64().unwrap_or(0),
            });
        }
        restores.push(((label.clone(), k), costs));
    }

    let busiest = s.tenant(1).to_string();
    let mut list: Vec<Cost> = Vec::new();
    let mut verify: Vec<Cost> = Vec::new();
    for &ms in trips {
        let cost = over_budget(s, list.first(), base_ms, ms)
            .unwrap_or_else(|| run(s, ms, &["list", "--org", &busiest]).0);
        show("list --org <busiest>", ms, &cost);
        list.push(cost);
        // `ok`: verify exits non-zero when anything failed.
        let cost = over_budget(s, verify.first(), base_ms, ms)
            .unwrap_or_else(|| run(s, ms, &["verify"]).0);
        show("verify", ms, &cost);
        verify.push(cost);
    }
    // Last: every daemon stop writes a routing checkpoint, one more object for `verify`.
    let mut startup: Vec<Startup> = Vec::new();
    for &ms in trips {
        let up = match over_budget(s, startup.first().map(|u| &u.cost), base_ms, ms) {
            Some(cost) => Startup { cost, logged: None },
            None => start_up(s, ms),
        };
        show("daemon start-up (to /status capturing)", ms, &up.cost);
        startup.push(up);
    }
    SizeResult {
        packs,
        restores,
        list,
        verify,
        startup,
    }
}

/// The daemon from spawning until `/status` says capturing, then stopped (SIGTERM).
fn start_up(s: &Stream, ms: u64) -> Startup {
    s.proxy.set(mode(ms));
    s.proxy.reset_requests();
    let spawned: DateTime<Utc> = Utc::now();
    let mut daemon = start_daemon(&s.env);
    let seconds = wait_capturing(&mut daemon);
    let cost = Cost {
        seconds,
        requests: s.proxy.requests(),
        by_method: s.proxy.requests_by_method(),
        estimated: false,
    };
    let logged = daemon.output().lines().find_map(|l| {
        let v: Value = serde_json::from_str(l).ok()?;
        (v["message"] == "capture started" || v["fields"]["message"] == "capture started")
            .then(|| v["timestamp"].as_str()?.parse::<DateTime<Utc>>().ok())
            .flatten()
            .map(|t| (t - spawned).num_microseconds().unwrap_or(0) as f64 / 1e6)
    });
    let status = daemon.terminate();
    assert!(status.success(), "the daemon's stop: {status}");
    s.proxy.set(Mode::Pass);
    Startup { cost, logged }
}
