//! Which tenants a snapshot exports together.
//!
//! Exporting each tenant with its own filtered `COPY` of every table costs a statement per
//! table per tenant: at thousands of small tenants the server spends its time finding rows,
//! not sending them. So consecutive tenants (in the tenant column's order) are exported in
//! batches, one `COPY` per table per batch, and their rows split by tenant in the client
//! ([`super::runs`]). A tenant of a few MiB or more is exported on its own, its rows found
//! through indexes and streamed straight into its archive: a batch's statements join whole
//! tables, which only pays for tenants too small to be worth their own statements.
//!
//! Batch sizes come from the tables' sizes on disk and the planner's statistics of the
//! tenant column (the most common values name the large tenants), corrected as batches finish
//! by what their rows really weighed (TOASTed values are larger in a COPY than on disk). The
//! estimate only shapes the work: a batch larger than memory allows spills to an encrypted
//! scratch file, so a wrong estimate costs time, never memory.

use std::collections::{HashMap, VecDeque};

use tokio_postgres::Client;

use crate::source::catalog::{Catalog, Route, Table, TableScope};
use crate::source::{SourceError, query_context};

/// The rows a batch aims at, in COPY bytes.
pub const BATCH_BYTES: u64 = 32 << 20;
/// Fewer bytes per batch are not worth a statement per table.
const MIN_BATCH_BYTES: u64 = 1 << 20;
/// A tenant with this many COPY bytes is exported alone: its own statements find its rows
/// through indexes, at a cost proportional to them, while a batch's statements join whole
/// tables (scanned once per batch). Measured at scale 10 with 200 tenants of a few MiB each:
/// batches took 1.6× the time of tenants exported alone; at 5,000 tenants of tens of KiB,
/// half.
const ALONE_BYTES: f64 = (2u64 << 20) as f64;

/// One piece of a snapshot's work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// The routing checkpoint at the consistent point (the longest single job: first).
    Routing,
    /// The global tables' archive.
    Global,
    /// One tenant, exported with its own statements.
    Tenant(String),
    /// Consecutive tenants (at least two), exported with a statement per table.
    Batch(Vec<String>),
}

/// Estimated on-disk bytes of each tenant's rows.
#[derive(Debug, Default, Clone)]
pub struct Sizes {
    /// What a tenant not named below holds.
    pub typical: f64,
    /// The tenants the statistics name.
    pub named: HashMap<String, f64>,
}

impl Sizes {
    pub fn of(&self, tenant: &str) -> f64 {
        self.named.get(tenant).copied().unwrap_or(self.typical)
    }
}

/// Reads the tenant tables' sizes and the statistics of the tenant column of those that carry
/// it: each table's bytes are shared out like the tenant column of the table it reaches the
/// tenant through.
pub async fn estimate(
    client: &Client,
    catalog: &Catalog,
    tenants: usize,
) -> Result<Sizes, SourceError> {
    let tables: Vec<&Table> = catalog.tenant_tables().collect();
    let names: Vec<String> = tables.iter().map(|t| t.sql_name()).collect();
    let rows = client
        .query(
            // A partitioned table's rows are in its partitions (an ordinary table has no
            // partition tree).
            "SELECT t.i, coalesce((SELECT sum(pg_table_size(p.relid)) FROM pg_partition_tree(t.name::regclass) AS p),
                                  pg_table_size(t.name::regclass))::bigint
               FROM unnest($1::text[]) WITH ORDINALITY AS t(name, i)",
            &[&names],
        )
        .await
        .map_err(query_context("reading the tenant tables' sizes"))?;
    // Bytes per table that carries the tenant column: its own and those of the tables
    // that reach the tenant through it.
    let mut weight: HashMap<usize, f64> = HashMap::new();
    for row in rows {
        let (i, bytes): (i64, i64) = (row.get(0), row.get(1));
        let root = root_of(catalog, tables[(i - 1) as usize]);
        *weight.entry(root).or_default() += bytes as f64;
    }
    let tenants = tenants.max(1) as f64;
    let mut sizes = Sizes::default();
    for (root, bytes) in weight {
        let table = &catalog.tables[root];
        let TableScope::Tenant(Route::Direct { column }) = &table.scope else {
            continue;
        };
        let stats = client
            .query_opt(
                "SELECT most_common_vals::text::text[], most_common_freqs FROM pg_stats
                  WHERE schemaname = $1 AND tablename = $2 AND attname = $3
                  ORDER BY inherited DESC LIMIT 1",
                &[&table.schema, &table.name, column],
            )
            .await
            .map_err(query_context(format!(
                "reading the statistics of {}",
                table.qualified()
            )))?;
        let (values, freqs): (Vec<String>, Vec<f32>) = match stats {
            Some(row) => (
                row.get::<_, Option<Vec<String>>>(0).unwrap_or_default(),
                row.get::<_, Option<Vec<f32>>>(1).unwrap_or_default(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        let listed: f64 = freqs.iter().map(|f| f64::from(*f)).sum();
        let others = (tenants - values.len() as f64).max(1.0);
        let typical = bytes * (1.0 - listed).max(0.0) / others;
        sizes.typical += typical;
        for (value, freq) in values.into_iter().zip(freqs) {
            *sizes.named.entry(value).or_default() += bytes * f64::from(freq) - typical;
        }
    }
    for size in sizes.named.values_mut() {
        *size += sizes.typical;
    }
    tracing::debug!(
        typical_bytes = sizes.typical,
        named = sizes.named.len(),
        largest_bytes = sizes.named.values().copied().fold(0.0, f64::max),
        "tenant sizes estimated"
    );
    Ok(sizes)
}

/// The table that carries the tenant column on `table`'s route.
fn root_of(catalog: &Catalog, table: &Table) -> usize {
    let mut current = catalog
        .tables
        .iter()
        .position(|t| std::ptr::eq(t, table))
        .expect("a table of the catalog");
    while let TableScope::Tenant(Route::Via { parent, .. }) = &catalog.tables[current].scope {
        current = *parent;
    }
    current
}

/// The work still to do, handed out a job at a time.
#[derive(Debug)]
pub struct Queue {
    routing: bool,
    global: bool,
    tenants: VecDeque<String>,
    sizes: Sizes,
    /// Bytes a batch aims at.
    target: f64,
    /// COPY bytes per estimated byte, learnt from the batches done.
    exported: f64,
    estimated: f64,
}

impl Queue {
    /// `tenants` in the order of the tenant column; `workers` that share the queue, each
    /// holding up to `memory` bytes of its batch's rows before it spills.
    pub fn new(tenants: Vec<String>, sizes: Sizes, workers: usize, memory: u64) -> Self {
        let total: f64 = tenants.iter().map(|t| sizes.of(t)).sum();
        // Enough batches for every worker to have several (the last ones finish together),
        // each fitting in memory as estimated.
        let largest = (BATCH_BYTES.min(memory * 3 / 4)).max(MIN_BATCH_BYTES);
        let target =
            (total / (4 * workers.max(1)) as f64).clamp(MIN_BATCH_BYTES as f64, largest as f64);
        Self {
            routing: true,
            global: true,
            tenants: tenants.into(),
            sizes,
            target,
            exported: 0.0,
            estimated: 0.0,
        }
    }

    /// Each tenant on its own (the tenants a user named).
    pub fn singles(tenants: Vec<String>) -> Self {
        let mut queue = Self::new(tenants, Sizes::default(), 1, 0);
        queue.target = 0.0;
        queue
    }

    /// The next job: the routing checkpoint and the global archive first, then tenants in
    /// order.
    pub fn next(&mut self) -> Option<Job> {
        if std::mem::take(&mut self.routing) {
            return Some(Job::Routing);
        }
        if std::mem::take(&mut self.global) {
            return Some(Job::Global);
        }
        let ratio = if self.estimated > 0.0 {
            (self.exported / self.estimated).max(0.01)
        } else {
            1.0
        };
        let size = |t: &str| self.sizes.of(t) * ratio;
        let alone = self.target.min(ALONE_BYTES);
        let first = self.tenants.pop_front()?;
        let mut total = size(&first);
        if total >= alone {
            return Some(Job::Tenant(first));
        }
        let mut batch = vec![first];
        while let Some(next) = self.tenants.front() {
            let more = size(next);
            if more >= alone || total + more > self.target {
                break;
            }
            total += more;
            batch.push(self.tenants.pop_front().expect("just looked"));
        }
        Some(if batch.len() == 1 {
            Job::Tenant(batch.pop().expect("one"))
        } else {
            Job::Batch(batch)
        })
    }

    /// Learns from a finished job how many COPY bytes its estimate stood for.
    pub fn done(&mut self, job: &Job, copy_bytes: u64) {
        let estimated: f64 = match job {
            Job::Routing | Job::Global => return,
            Job::Tenant(t) => self.sizes.of(t),
            Job::Batch(ts) => ts.iter().map(|t| self.sizes.of(t)).sum(),
        };
        self.estimated += estimated;
        self.exported += copy_bytes as f64;
    }

    /// Stops handing out work (a job failed: the snapshot is lost).
    pub fn clear(&mut self) {
        self.routing = false;
        self.global = false;
        self.tenants.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Job {
        fn archives(&self) -> usize {
            match self {
                Job::Routing => 0,
                Job::Global | Job::Tenant(_) => 1,
                Job::Batch(tenants) => tenants.len(),
            }
        }
    }

    impl Sizes {
        fn uniform(total: u64, tenants: usize) -> Self {
            Self {
                typical: total as f64 / tenants as f64,
                named: HashMap::new(),
            }
        }
    }

    fn drain(mut queue: Queue) -> Vec<Job> {
        std::iter::from_fn(|| queue.next()).collect()
    }

    #[test]
    fn small_tenants_are_batched_in_order_and_a_large_one_goes_alone() {
        let tenants: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
        let mut sizes = Sizes::uniform(10 << 20, 10);
        sizes.named.insert("t3".into(), 40.0 * (1 << 20) as f64);
        let jobs = drain(Queue::new(tenants, sizes, 1, 64 << 20));
        assert_eq!(jobs[..2], [Job::Routing, Job::Global]);
        assert_eq!(
            jobs[2],
            Job::Batch(vec!["t0".into(), "t1".into(), "t2".into()])
        );
        assert_eq!(jobs[3], Job::Tenant("t3".into()));
        let rest: Vec<String> = jobs[4..]
            .iter()
            .flat_map(|j| match j {
                Job::Batch(ts) => ts.clone(),
                Job::Tenant(t) => vec![t.clone()],
                Job::Routing | Job::Global => unreachable!(),
            })
            .collect();
        assert_eq!(rest, ["t4", "t5", "t6", "t7", "t8", "t9"]);
    }

    #[test]
    fn batches_shrink_when_rows_weigh_more_than_their_estimate() {
        // 10,000 tenants of 100 KiB: batches of 24 MiB (three quarters of 32 MiB of memory).
        let tenants: Vec<String> = (0..10_000).map(|i| format!("t{i:05}")).collect();
        let mut queue = Queue::new(
            tenants,
            Sizes::uniform(10_000 * 102_400, 10_000),
            2,
            32 << 20,
        );
        assert_eq!(queue.next(), Some(Job::Routing));
        assert_eq!(queue.next(), Some(Job::Global));
        let first = queue.next().unwrap();
        assert_eq!(first.archives(), 245);
        // Its rows were 4 times the estimate: the next batch holds a quarter as many.
        queue.done(&first, 4 * 245 * 102_400);
        assert_eq!(queue.next().unwrap().archives(), 61);
        // 40 times: each tenant now weighs 4 MiB, and goes alone.
        queue.done(&Job::Batch(vec!["t09999".into()]), 40 * 102_400 * 306);
        assert!(matches!(queue.next(), Some(Job::Tenant(_))));
    }

    #[test]
    fn named_tenants_go_one_by_one() {
        let jobs = drain(Queue::singles(vec!["a".into(), "b".into()]));
        assert_eq!(
            jobs,
            [
                Job::Routing,
                Job::Global,
                Job::Tenant("a".into()),
                Job::Tenant("b".into())
            ]
        );
    }
}
