//! Which tenants a snapshot exports with one pass over each table, and how their rows are
//! divided to be gathered again.
//!
//! Exporting each tenant with its own filtered `COPY` of every table costs a statement per
//! table per tenant, and each statement of a table that reaches its tenant through foreign
//! keys joins its route: at thousands of small tenants the server spends its time finding
//! rows, not sending them; and per-tenant statements of a large tenant join its route again
//! for each. So a snapshot of every tenant is a sweep ([`super::sweep`]): one `COPY` per table
//! (or per range of blocks of a large one) with the route joined once, its rows cut by tenant
//! in the client and scattered into encrypted scratch partitions of consecutive tenants, each
//! then gathered in memory and written as its tenants' archives. Tenants a user names are
//! exported alone, with their own statements.
//!
//! Sizes come from the tables' sizes on disk and the planner's statistics of the tenant
//! column (the most common values name the large tenants). They only shape the work: the
//! sweep counts every tenant's bytes exactly, a partition larger than memory is split into
//! groups that fit, and a tenant too large for memory is streamed from the scratch, so a wrong
//! estimate costs time, never memory.

use std::collections::{HashMap, VecDeque};

use tokio_postgres::Client;

use crate::source::catalog::{Catalog, Route, Table, TableScope};
use crate::source::{SourceError, query_context};

/// At most this many partitions: each is a scratch file open during the sweep, with a frame
/// buffer per worker.
pub const MAX_PARTITIONS: usize = 256;

/// One piece of a snapshot's work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// The routing checkpoint at the consistent point (the longest single job: first).
    Routing,
    /// The global tables' archive.
    Global,
    /// One slice of a tenant table's rows of every swept tenant, scattered into the
    /// partitions.
    Scatter(Slice),
    /// One tenant, exported with its own statements.
    Tenant(String),
    /// Nothing to hand out until the scatters still running end.
    Wait,
    /// One partition's tenants, gathered from the scratch and written as archives.
    Gather(usize),
}

/// A tenant table (its index among the catalog's tenant tables), or a range of its blocks:
/// a large table is read by several workers at once, so that the sweep does not wait for
/// one statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    pub table: usize,
    pub from_block: u32,
    /// `None`: to the end (rows added to the end after the sizes were read are still read).
    pub to_block: Option<u32>,
}

impl Slice {
    pub fn whole(table: usize) -> Self {
        Self {
            table,
            from_block: 0,
            to_block: None,
        }
    }
}

/// A tenant table's size: its own relation's blocks (`None`: a partitioned table, which is
/// never cut) and its bytes with its TOAST (what reading it costs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSize {
    pub blocks: Option<u32>,
    pub bytes: u64,
}

/// The size of each tenant table, in the catalog's order.
pub async fn table_sizes(
    client: &Client,
    catalog: &Catalog,
) -> Result<Vec<TableSize>, SourceError> {
    let names: Vec<String> = catalog.tenant_tables().map(|t| t.sql_name()).collect();
    let rows = client
        .query(
            "SELECT CASE WHEN c.relkind = 'r'
                         THEN pg_relation_size(c.oid) / current_setting('block_size')::bigint END,
                    coalesce((SELECT sum(pg_table_size(p.relid)) FROM pg_partition_tree(c.oid) AS p),
                             pg_table_size(c.oid))::bigint
               FROM unnest($1::text[]) WITH ORDINALITY AS t(name, i)
               JOIN pg_class c ON c.oid = t.name::regclass
              ORDER BY t.i",
            &[&names],
        )
        .await
        .map_err(query_context("reading the tenant tables' sizes"))?;
    Ok(rows
        .iter()
        .map(|r| TableSize {
            blocks: r
                .get::<_, Option<i64>>(0)
                .map(|b| b.clamp(0, i64::from(u32::MAX)) as u32),
            bytes: r.get::<_, i64>(1).max(0) as u64,
        })
        .collect())
}

/// The slices a sweep reads, largest first (the last to start are the shortest). A table of
/// more than a third of a worker's share of the bytes is cut into that many ranges of blocks:
/// each range joins the table's route again, so tables are cut only as far as keeping the
/// workers busy to the end needs.
pub fn slices(sizes: &[TableSize], workers: usize) -> Vec<Slice> {
    let total: u64 = sizes.iter().map(|s| s.bytes).sum();
    let piece = (total / (3 * workers.max(1) as u64)).max(1 << 20);
    let mut slices = Vec::new();
    for (table, size) in sizes.iter().enumerate() {
        let pieces = match size.blocks {
            Some(blocks) => size
                .bytes
                .div_ceil(piece)
                .clamp(1, u64::from(blocks).max(1)),
            None => 1,
        };
        let blocks = u64::from(size.blocks.unwrap_or(0));
        for k in 0..pieces {
            let from_block = (blocks * k / pieces) as u32;
            let to_block = (k + 1 < pieces).then(|| (blocks * (k + 1) / pieces) as u32);
            slices.push((
                size.bytes / pieces,
                Slice {
                    table,
                    from_block,
                    to_block,
                },
            ));
        }
    }
    slices.sort_by_key(|(bytes, slice)| (std::cmp::Reverse(*bytes), slice.table, slice.from_block));
    slices.into_iter().map(|(_, slice)| slice).collect()
}

/// The tenants a snapshot sweeps, divided into partitions, and those it exports alone.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Division {
    /// Exported on their own, in order (the tenants a user named).
    pub alone: Vec<String>,
    /// Swept, in the tenant column's order.
    pub swept: Vec<String>,
    /// Partition `p` holds `swept[bounds[p]..bounds[p + 1]]`.
    pub bounds: Vec<usize>,
}

impl Division {
    /// Divides `tenants` (in the tenant column's order) for `workers` that each gather up to
    /// `memory` bytes at a time: consecutive tenants fill partitions of about a quarter of it
    /// (COPY bytes run up to a few times the bytes on disk, and gathering may take twice
    /// them), at least two per worker so that the gathers end together. A tenant estimated
    /// at that quarter or more gets a partition of its own: if it is too large to gather, it
    /// is streamed from its partition, which then holds nothing else to read past.
    pub fn new(swept: Vec<String>, sizes: &Sizes, workers: usize, memory: u64) -> Self {
        if swept.is_empty() {
            return Self::default();
        }
        let share = (memory / 4).max(1) as f64;
        let total: f64 = swept.iter().map(|t| sizes.of(t)).sum();
        let partitions = ((total / share).ceil() as usize)
            .max(2 * workers.max(1))
            .clamp(1, MAX_PARTITIONS);
        let each = total / partitions as f64;
        let mut bounds = vec![0];
        let mut filled = 0.0;
        for (i, tenant) in swept.iter().enumerate() {
            let size = sizes.of(tenant);
            if filled > 0.0
                && (size >= share || filled + size > each)
                && bounds.len() < MAX_PARTITIONS
            {
                bounds.push(i);
                filled = 0.0;
            }
            filled += size.max(f64::MIN_POSITIVE);
        }
        bounds.push(swept.len());
        Self {
            alone: Vec::new(),
            swept,
            bounds,
        }
    }

    pub fn partitions(&self) -> usize {
        self.bounds.len().saturating_sub(1)
    }
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

/// The work still to do, handed out a job at a time: the routing checkpoint and the global
/// archive, the scatters, the tenants that go alone (while the last scatters run), then the
/// gathers, which need every scatter ended.
#[derive(Debug)]
pub struct Queue {
    routing: bool,
    global: bool,
    scatters: VecDeque<Slice>,
    /// Scatters handed out and not yet done.
    scattering: usize,
    alone: VecDeque<String>,
    gathers: VecDeque<usize>,
}

impl Queue {
    /// A sweep of `slices` into `partitions` (none: no sweep), and `alone` tenants.
    pub fn new(slices: Vec<Slice>, partitions: usize, alone: Vec<String>) -> Self {
        Self {
            routing: true,
            global: true,
            scatters: slices.into(),
            scattering: 0,
            alone: alone.into(),
            gathers: (0..partitions).collect(),
        }
    }

    /// The next job (`None`: nothing is left).
    pub fn next(&mut self) -> Option<Job> {
        if std::mem::take(&mut self.routing) {
            return Some(Job::Routing);
        }
        if std::mem::take(&mut self.global) {
            return Some(Job::Global);
        }
        if let Some(slice) = self.scatters.pop_front() {
            self.scattering += 1;
            return Some(Job::Scatter(slice));
        }
        if let Some(tenant) = self.alone.pop_front() {
            return Some(Job::Tenant(tenant));
        }
        if self.gathers.is_empty() {
            return None;
        }
        if self.scattering > 0 {
            return Some(Job::Wait);
        }
        self.gathers.pop_front().map(Job::Gather)
    }

    /// A job ended well.
    pub fn done(&mut self, job: &Job) {
        if matches!(job, Job::Scatter(_)) {
            self.scattering -= 1;
        }
    }

    /// Stops handing out work (a job failed: the snapshot is lost).
    pub fn clear(&mut self) {
        self.routing = false;
        self.global = false;
        self.scatters.clear();
        self.alone.clear();
        self.gathers.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform(total: u64, tenants: usize) -> Sizes {
        Sizes {
            typical: total as f64 / tenants as f64,
            named: HashMap::new(),
        }
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("t{i:05}")).collect()
    }

    #[test]
    fn large_tenants_get_partitions_of_their_own_and_the_rest_fill_them_in_order() {
        let mut sizes = uniform(10 << 20, 10);
        sizes.named.insert("t00003".into(), 40.0 * (1 << 20) as f64);
        let division = Division::new(names(10), &sizes, 1, 64 << 20);
        assert!(division.alone.is_empty());
        assert_eq!(division.swept.len(), 10);
        assert_eq!(
            division.bounds,
            [0, 3, 4, 10],
            "t00003 alone in its partition"
        );

        // 10,000 tenants of 100 KiB, 32 MiB to gather with: partitions of about 8 MiB.
        let division = Division::new(
            names(10_000),
            &uniform(10_000 * 102_400, 10_000),
            2,
            32 << 20,
        );
        let sizes: Vec<usize> = division.bounds.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            sizes[..sizes.len() - 1].iter().all(|&n| n == 81),
            "{sizes:?}"
        );
        assert_eq!(division.partitions(), 124);

        // Never more partitions than tenants, nor than the limit.
        assert_eq!(
            Division::new(names(3), &uniform(1 << 40, 3), 1, 1 << 20).partitions(),
            3
        );
        assert_eq!(
            Division::new(names(3), &uniform(3, 3), 4, 1 << 20).partitions(),
            3
        );
        assert_eq!(
            Division::new(names(100_000), &uniform(1 << 40, 1 << 30), 1, 1 << 20).partitions(),
            MAX_PARTITIONS
        );
        assert_eq!(
            Division::new(Vec::new(), &uniform(0, 1), 1, 1 << 20).partitions(),
            0
        );
    }

    fn size(blocks: Option<u32>, mib: u64) -> TableSize {
        TableSize {
            blocks,
            bytes: mib << 20,
        }
    }

    #[test]
    fn large_tables_are_cut_into_slices_read_largest_first() {
        // A third of a worker's share of 600 MiB for 2 workers: pieces of 100 MiB.
        let sizes = [
            size(Some(10), 10),
            size(None, 150),
            size(Some(17_000), 340),
            size(Some(100), 100),
        ];
        let slices = slices(&sizes, 2);
        assert_eq!(slices.len(), 4 + 1 + 1 + 1);
        assert_eq!(
            slices[..2],
            [Slice::whole(1), Slice::whole(3)],
            "largest first; a partitioned table is never cut"
        );
        assert_eq!(slices[6], Slice::whole(0));
        let mut cut: Vec<_> = slices.iter().filter(|s| s.table == 2).collect();
        cut.sort_by_key(|s| s.from_block);
        let ranges: Vec<_> = cut.iter().map(|s| (s.from_block, s.to_block)).collect();
        assert_eq!(
            ranges,
            [
                (0, Some(4250)),
                (4250, Some(8500)),
                (8500, Some(12750)),
                (12750, None)
            ],
            "every block read once, the last range to the end"
        );
        // Small tables are never cut.
        assert_eq!(
            super::slices(&[size(Some(100), 1), size(Some(50), 1)], 2),
            [Slice::whole(0), Slice::whole(1)]
        );
    }

    #[test]
    fn gathers_wait_for_every_scatter() {
        let mut queue = Queue::new(
            vec![Slice::whole(0), Slice::whole(1)],
            2,
            vec!["big".into()],
        );
        assert_eq!(queue.next(), Some(Job::Routing));
        assert_eq!(queue.next(), Some(Job::Global));
        let first = queue.next().unwrap();
        assert_eq!(first, Job::Scatter(Slice::whole(0)));
        assert_eq!(queue.next(), Some(Job::Scatter(Slice::whole(1))));
        assert_eq!(queue.next(), Some(Job::Tenant("big".into())));
        queue.done(&first);
        assert_eq!(queue.next(), Some(Job::Wait));
        queue.done(&Job::Scatter(Slice::whole(1)));
        assert_eq!(queue.next(), Some(Job::Gather(0)));
        assert_eq!(queue.next(), Some(Job::Gather(1)));
        assert_eq!(queue.next(), None);

        let mut queue = Queue::new(Vec::new(), 0, vec!["a".into(), "b".into()]);
        let jobs: Vec<Job> = std::iter::from_fn(|| queue.next()).collect();
        assert_eq!(
            jobs,
            [
                Job::Routing,
                Job::Global,
                Job::Tenant("a".into()),
                Job::Tenant("b".into())
            ]
        );
        let mut queue = Queue::new(vec![Slice::whole(0)], 2, Vec::new());
        queue.next();
        queue.clear();
        assert_eq!(queue.next(), None);
    }
}
