//! The daemon's Prometheus metrics: a fixed set, every label value known in advance (no label
//! grows with the number of tenants), rendered in the text exposition format.
//!
//! Our own few lines instead of a metrics crate: counters, gauges and histograms over atomics
//! are all the daemon needs, and the names below are the contract of README § Metrics, the
//! alert rules and the dashboard (`deploy/check.sh` checks them against this file).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::Utc;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    /// For counts kept elsewhere (restores recorded in the repository).
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }
}

/// A value that goes up and down; `None` until first set (then it is not exported).
#[derive(Debug)]
pub struct Gauge(AtomicU64);

const UNSET: u64 = u64::MAX; // a NaN bit pattern no f64 arithmetic here produces

impl Default for Gauge {
    fn default() -> Self {
        Self(AtomicU64::new(UNSET))
    }
}

impl Gauge {
    pub fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }
    pub fn clear(&self) {
        self.0.store(UNSET, Ordering::Relaxed);
    }
    pub fn get(&self) -> Option<f64> {
        let bits = self.0.load(Ordering::Relaxed);
        (bits != UNSET).then(|| f64::from_bits(bits))
    }
}

/// Cumulative buckets in the Prometheus sense.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    /// Sum in microunits, so that it stays an atomic integer.
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
    pub fn observe(&self, value: f64) {
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            if value <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((value.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

const SNAPSHOT_SECONDS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
];
const STORAGE_SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Row operations, the label values of `updog_backup_changes_captured_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Insert,
    Update,
    Delete,
    Truncate,
    /// A schema change the triggers put into the stream.
    SchemaChange,
}

impl Operation {
    const ALL: [Operation; 5] = [
        Self::Insert,
        Self::Update,
        Self::Delete,
        Self::Truncate,
        Self::SchemaChange,
    ];
    fn label(self) -> &'static str {
        match self {
            Self::Insert => "insert",
            Self::Update => "update",
            Self::Delete => "delete",
            Self::Truncate => "truncate",
            Self::SchemaChange => "schema_change",
        }
    }
}

/// Object store requests, the label values of the storage metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageOp {
    Put,
    Get,
    Head,
    List,
    Delete,
}

impl StorageOp {
    const ALL: [StorageOp; 5] = [Self::Put, Self::Get, Self::Head, Self::List, Self::Delete];
    pub fn label(self) -> &'static str {
        match self {
            Self::Put => "put",
            Self::Get => "get",
            Self::Head => "head",
            Self::List => "list",
            Self::Delete => "delete",
        }
    }
}

/// The daemon's supervised tasks, the label values of `updog_backup_task_restarts_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Capture,
    Schedule,
    SlotHealth,
    Http,
}

impl Task {
    const ALL: [Task; 4] = [Self::Capture, Self::Schedule, Self::SlotHealth, Self::Http];
    pub fn label(self) -> &'static str {
        match self {
            Self::Capture => "capture",
            Self::Schedule => "schedule",
            Self::SlotHealth => "slot_health",
            Self::Http => "http",
        }
    }
}

#[derive(Debug)]
pub struct Metrics {
    pub active: Gauge,
    pub last_snapshot_success: Gauge,
    pub snapshot_duration: Histogram,
    pub snapshots_succeeded: Counter,
    pub snapshots_failed: Counter,
    pub exported_bytes: Counter,
    pub exported_rows: Counter,
    changes: [Counter; Operation::ALL.len()],
    pub packs_stored: Counter,
    pub pack_bytes: Counter,
    pub lag_bytes: Gauge,
    pub covered_until: Gauge,
    pub slot_retained_wal: Gauge,
    pub slot_safe_wal: Gauge,
    pub slot_wal_limit: Gauge,
    pub unpublished_tables: Gauge,
    storage_duration: [Histogram; 5],
    storage_errors: [Counter; 5],
    pub restores: Counter,
    pub retention_deleted: Counter,
    task_restarts: [Counter; 4],
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            active: Gauge::default(),
            last_snapshot_success: Gauge::default(),
            snapshot_duration: Histogram::new(SNAPSHOT_SECONDS),
            snapshots_succeeded: Counter::default(),
            snapshots_failed: Counter::default(),
            exported_bytes: Counter::default(),
            exported_rows: Counter::default(),
            changes: Default::default(),
            packs_stored: Counter::default(),
            pack_bytes: Counter::default(),
            lag_bytes: Gauge::default(),
            covered_until: Gauge::default(),
            slot_retained_wal: Gauge::default(),
            slot_safe_wal: Gauge::default(),
            slot_wal_limit: Gauge::default(),
            unpublished_tables: Gauge::default(),
            storage_duration: std::array::from_fn(|_| Histogram::new(STORAGE_SECONDS)),
            storage_errors: Default::default(),
            restores: Counter::default(),
            retention_deleted: Counter::default(),
            task_restarts: Default::default(),
        }
    }
}

impl Metrics {
    pub fn change(&self, op: Operation) -> &Counter {
        &self.changes[op as usize]
    }
    pub fn storage_duration(&self, op: StorageOp) -> &Histogram {
        &self.storage_duration[op as usize]
    }
    pub fn storage_errors(&self, op: StorageOp) -> &Counter {
        &self.storage_errors[op as usize]
    }
    pub fn task_restarts(&self, task: Task) -> &Counter {
        &self.task_restarts[task as usize]
    }

    /// The text exposition format, version 0.0.4.
    pub fn render(&self) -> String {
        let mut out = Exposition::default();
        out.family(
            "updog_backup_build_info",
            "gauge",
            "Always 1; the version label says which build runs",
        );
        out.sample(
            "updog_backup_build_info",
            &format!("{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")),
            1.0,
        );
        out.gauge(
            "updog_backup_active",
            "1 while this instance captures (holds the lock), 0 while it waits as standby",
            &self.active,
        );
        out.gauge(
            "updog_backup_last_snapshot_success_timestamp_seconds",
            "Unix time the last successful snapshot finished",
            &self.last_snapshot_success,
        );
        out.histogram(
            "updog_backup_snapshot_duration_seconds",
            "Duration of successful snapshots",
            "",
            &self.snapshot_duration,
        );
        out.family(
            "updog_backup_snapshots_total",
            "counter",
            "Snapshots attempted, by result",
        );
        out.sample(
            "updog_backup_snapshots_total",
            "{result=\"success\"}",
            self.snapshots_succeeded.get() as f64,
        );
        out.sample(
            "updog_backup_snapshots_total",
            "{result=\"failure\"}",
            self.snapshots_failed.get() as f64,
        );
        out.counter(
            "updog_backup_snapshot_exported_bytes_total",
            "Bytes stored by snapshots (compressed, encrypted)",
            &self.exported_bytes,
        );
        out.counter(
            "updog_backup_snapshot_exported_rows_total",
            "Rows exported by snapshots",
            &self.exported_rows,
        );
        out.family(
            "updog_backup_changes_captured_total",
            "counter",
            "Row changes captured from the slot, by operation",
        );
        for op in Operation::ALL {
            let labels = format!("{{operation=\"{}\"}}", op.label());
            out.sample(
                "updog_backup_changes_captured_total",
                &labels,
                self.change(op).get() as f64,
            );
        }
        out.counter(
            "updog_backup_packs_stored_total",
            "Packs stored",
            &self.packs_stored,
        );
        out.counter(
            "updog_backup_pack_stored_bytes_total",
            "Bytes of packs stored",
            &self.pack_bytes,
        );
        out.gauge(
            "updog_backup_stream_lag_bytes",
            "WAL between the source's flushed position and the durable (stored and acknowledged) LSN",
            &self.lag_bytes,
        );
        let lag_seconds = Gauge::default();
        if let Some(covered) = self.covered_until.get() {
            let now = Utc::now().timestamp_micros() as f64 / 1e6;
            lag_seconds.set((now - covered).max(0.0));
        }
        out.gauge(
            "updog_backup_stream_lag_seconds",
            "Seconds since covered-until, the latest restorable time",
            &lag_seconds,
        );
        out.gauge(
            "updog_backup_covered_until_timestamp_seconds",
            "Covered-until: every transaction committed at or before it is stored",
            &self.covered_until,
        );
        out.gauge(
            "updog_backup_slot_retained_wal_bytes",
            "WAL the replication slot holds back on the source",
            &self.slot_retained_wal,
        );
        out.gauge(
            "updog_backup_slot_safe_wal_bytes",
            "WAL that can still be written before the slot is invalidated (max_slot_wal_keep_size)",
            &self.slot_safe_wal,
        );
        out.gauge(
            "updog_backup_slot_wal_limit_bytes",
            "The source's max_slot_wal_keep_size",
            &self.slot_wal_limit,
        );
        out.gauge(
            "updog_backup_unpublished_tables",
            "Tables backed up by snapshots whose changes the publication does not carry (a stream gap is recorded; restores across it are refused)",
            &self.unpublished_tables,
        );
        out.family(
            "updog_backup_storage_request_duration_seconds",
            "histogram",
            "Object store requests by operation (get: until the body starts)",
        );
        for op in StorageOp::ALL {
            let labels = format!("operation=\"{}\"", op.label());
            out.buckets(
                "updog_backup_storage_request_duration_seconds",
                &labels,
                self.storage_duration(op),
            );
        }
        out.family(
            "updog_backup_storage_errors_total",
            "counter",
            "Failed object store requests by operation",
        );
        for op in StorageOp::ALL {
            let labels = format!("{{operation=\"{}\"}}", op.label());
            out.sample(
                "updog_backup_storage_errors_total",
                &labels,
                self.storage_errors(op).get() as f64,
            );
        }
        out.counter(
            "updog_backup_restores_total",
            "Restores recorded in the repository (restores/)",
            &self.restores,
        );
        out.counter(
            "updog_backup_retention_deleted_objects_total",
            "Objects deleted by retention",
            &self.retention_deleted,
        );
        out.family(
            "updog_backup_task_restarts_total",
            "counter",
            "Supervised tasks restarted after an error, by task",
        );
        for task in Task::ALL {
            let labels = format!("{{task=\"{}\"}}", task.label());
            out.sample(
                "updog_backup_task_restarts_total",
                &labels,
                self.task_restarts(task).get() as f64,
            );
        }
        out.0
    }
}

#[derive(Default)]
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &str, value: f64) {
        let _ = writeln!(self.0, "{name}{labels} {value}");
    }
    fn counter(&mut self, name: &str, help: &str, counter: &Counter) {
        self.family(name, "counter", help);
        self.sample(name, "", counter.get() as f64);
    }
    /// An unset gauge is left out: "no value yet" is not zero.
    fn gauge(&mut self, name: &str, help: &str, gauge: &Gauge) {
        self.family(name, "gauge", help);
        if let Some(v) = gauge.get() {
            self.sample(name, "", v);
        }
    }
    fn histogram(&mut self, name: &str, help: &str, labels: &str, h: &Histogram) {
        self.family(name, "histogram", help);
        self.buckets(name, labels, h);
    }
    /// `labels` without braces, to be joined with `le`.
    fn buckets(&mut self, name: &str, labels: &str, h: &Histogram) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, bucket) in h.bounds.iter().zip(&h.buckets) {
            let le = format!("{{{labels}{sep}le=\"{bound}\"}}");
            self.sample(
                &format!("{name}_bucket"),
                &le,
                bucket.load(Ordering::Relaxed) as f64,
            );
        }
        let count = h.count() as f64;
        self.sample(
            &format!("{name}_bucket"),
            &format!("{{{labels}{sep}le=\"+Inf\"}}"),
            count,
        );
        let braced = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        self.sample(&format!("{name}_sum"), &braced, sum);
        self.sample(&format!("{name}_count"), &braced, count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_help_type_and_samples() {
        let m = Metrics::default();
        m.change(Operation::Update).add(3);
        m.storage_duration(StorageOp::Put).observe(0.02);
        m.snapshot_duration.observe(42.0);
        m.covered_until.set(Utc::now().timestamp() as f64 - 10.0);
        let text = m.render();
        assert!(text.contains("updog_backup_changes_captured_total{operation=\"update\"} 3\n"));
        assert!(text.contains(
            "updog_backup_storage_request_duration_seconds_bucket{operation=\"put\",le=\"0.025\"} 1\n"
        ));
        assert!(text.contains(
            "updog_backup_storage_request_duration_seconds_bucket{operation=\"put\",le=\"0.01\"} 0\n"
        ));
        assert!(text.contains("updog_backup_snapshot_duration_seconds_bucket{le=\"+Inf\"} 1\n"));
        assert!(text.contains("updog_backup_snapshot_duration_seconds_sum 42\n"));
        let lag: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("updog_backup_stream_lag_seconds "))
            .unwrap()
            .parse()
            .unwrap();
        assert!((9.0..60.0).contains(&lag), "{lag}");
        // Unset gauges are declared but have no sample.
        assert!(text.contains("# TYPE updog_backup_slot_safe_wal_bytes gauge\n"));
        assert!(!text.contains("\nupdog_backup_slot_safe_wal_bytes "));
        // Every sample line belongs to a declared family.
        let declared: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| declared.contains(b)))
                .unwrap_or(name);
            assert!(declared.contains(&base), "{line}");
        }
    }
}
