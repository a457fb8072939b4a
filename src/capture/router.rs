//! Routing: which tenant each captured change belongs to.
//!
//! A change names its relation and carries tuples as text. Tables with their own tenant
//! column are routed by that value. Tables that reach the tenant through foreign keys carry
//! only the parent's key, so the router keeps, for every table some route passes through, a
//! map from its referenced key to the tenant: loaded from the source when capture starts and
//! kept current by the stream itself (inserts add keys, deletes remove them when their
//! transaction commits, so cascaded deletes later in the same transaction still route). The
//! maps hold the rows of no tenant too: their children belong to no tenant either, and a
//! key missing from a map must mean "unknown", never "no tenant".
//!
//! An UPDATE is routed by its old row as well as its new one: a row can change tenant, or
//! enter or leave every tenant, and then it is a DELETE for the tenant it left and an INSERT
//! for the one it joined. pgoutput sends the old row only with REPLICA IDENTITY FULL, or its
//! key when the key changed; without it the new row's identity columns are the old row's, and
//! the table's own key map, where it has one, gives the old tenant.
//!
//! A change that cannot be routed — a DELETE or an UPDATE whose old row (as far as the change
//! and the key maps show it) lacks the route's columns, a child whose parent key is unknown —
//! is an error naming the table, never a silent drop or a guess.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::{StreamExt, pin_mut};
use tokio_postgres::Client;

use crate::pg::pgoutput::{Message, OldTuple, Relation, Tuple, Value};
use crate::pg::quote_ident;
use crate::repository::RepositoryError;
use crate::repository::routes::{CheckpointWriter, Delta, KeyHash};
use crate::retry::{Classify, ErrorClass};
use crate::source::catalog::{Catalog, ReplicaIdentity, Route, Table, TableScope};
use crate::source::{SourceError, query_context};

/// Where a change goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Tenant(Arc<str>),
    /// Global tables: every restore applies them.
    Global,
    /// Excluded tables, tables outside the configured schemas, rows that belong to no tenant
    /// (a NULL nullable foreign key: the snapshot leaves them out too).
    Skip,
}

/// A relation's place in the backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Tenant,
    Global,
    Skip,
}

/// What a change means for the tenants it touches.
#[derive(Debug)]
pub enum Routed {
    One(Destination),
    /// An UPDATE that changed the row's tenant (`None`: no tenant; never both `None`, never
    /// equal): a DELETE for `from`, whose restore has the row, and an INSERT for `to`, whose
    /// restore does not.
    Moved {
        from: Option<Arc<str>>,
        to: Option<Arc<str>>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error(
        "cannot route {op} on {table}: its old row lacks column {column} (replica identity {identity}), so the tenant the row belonged to cannot be known; run `ALTER TABLE {sql} REPLICA IDENTITY FULL` (see `updog-backup check`). The changes already in the slot stay unroutable: then drop the replication slot and run `updog-backup init` to start a new stream from a new snapshot"
    )]
    MissingColumn {
        op: &'static str,
        table: String,
        sql: String,
        column: String,
        identity: String,
    },
    #[error(
        "cannot route {op} on {table}: no row of {parent} with key ({key}) is known (it was deleted before the daemon saw the row that references it)"
    )]
    UnknownParent {
        op: &'static str,
        table: String,
        parent: String,
        key: String,
    },
    #[error(
        "table {table} appeared in the change stream but is not in the catalog loaded at start: restart the daemon to load it"
    )]
    UnknownTable { table: String },
    #[error(
        "cannot capture an UPDATE that moves a row of {table} into another tenant: it left column {column} unchanged and TOASTed, so the change lacks its value, and the new tenant's restore needs the whole row; run `ALTER TABLE {sql} REPLICA IDENTITY FULL` (the old row then carries it). The change already in the slot stays incomplete: then drop the replication slot and run `updog-backup init` to start a new stream from a new snapshot"
    )]
    MovedWithoutValue {
        table: String,
        sql: String,
        column: String,
    },
    #[error("a change names relation oid {0}, which no Relation message defined")]
    UnknownRelation(u32),
    #[error("{table}: {message}")]
    Tuple { table: String, message: String },
}

/// One key map: the key columns of a table other tables route through.
#[derive(Debug)]
struct KeyMap {
    /// `schema.table(col, …)`: how persisted state names the map.
    name: Arc<str>,
    columns: Vec<String>,
    /// `None`: the row belongs to no tenant.
    tenants: HashMap<KeyHash, Option<Arc<str>>>,
}

#[derive(Debug)]
struct Rel {
    relation: Relation,
    /// The catalog table, `None` outside the configured schemas.
    table: Option<usize>,
}

pub struct Router {
    catalog: Catalog,
    by_name: HashMap<(String, String), usize>,
    relations: HashMap<u32, Rel>,
    /// Per table index: its key maps.
    maps: HashMap<usize, Vec<KeyMap>>,
    /// Keys deleted by the open transaction, removed at its commit.
    doomed: HashSet<(usize, usize, KeyHash)>,
    /// Keys of rows the open transaction moved to another tenant, with the tenant each left:
    /// the rows below them follow ([`Router::route_moved`]).
    moved_from: HashMap<(usize, usize, KeyHash), Option<Arc<str>>>,
    /// Tables whose rows the open transaction moved with no word yet of the rows below them
    /// (their trigger's first message), and the tenants those moves touched.
    unaccompanied: HashMap<usize, HashSet<Arc<str>>>,
    // A mutex, not a RefCell: `snapshot::take` holds a router across awaits in a task that
    // must be Send (the daemon's schedule). Never contended.
    interned: std::sync::Mutex<HashSet<Arc<str>>>,
    schemas: HashSet<String>,
    salt: Vec<u8>,
    /// Map changes since the last [`Router::take_delta`].
    delta: Vec<Delta>,
    /// Whether the source's schema-change triggers are installed (`source::ddl`).
    schema_changes_captured: bool,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("relations", &self.relations.len())
            .field("keys", &self.keys())
            .finish()
    }
}

/// A tuple value as routing sees it.
enum Lookup<'a> {
    Value(&'a [u8]),
    Null,
    /// Not in the tuple (a key-only old tuple, an unchanged TOAST value, an unknown column).
    Absent,
}

fn hash_key(salt: &[u8], map: &str, parts: &[&[u8]]) -> KeyHash {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(salt);
    h.update(map.as_bytes());
    h.update([0]);
    for p in parts {
        h.update((p.len() as u32).to_le_bytes());
        h.update(p);
    }
    let digest = h.finalize();
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

fn describe_key(parts: &[&[u8]]) -> String {
    parts
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Router {
    /// `salt`: mixed into every key hash (the source's system identifier).
    pub fn new(catalog: Catalog, schemas: &[String], salt: &str) -> Self {
        // A partition's changes are its partitioned table's: published without
        // publish_via_partition_root they name the partition, and with it pgoutput still sends
        // the partition's Relation message as well as the root's, which the changes name.
        let by_name = catalog
            .tables
            .iter()
            .enumerate()
            .flat_map(|(i, t)| {
                let partitions = t.partitions.iter().flatten();
                std::iter::once((t.schema.clone(), t.name.clone()))
                    .chain(partitions.map(|p| (p.schema.clone(), p.name.clone())))
                    .map(move |key| (key, i))
            })
            .collect();
        let maps = key_maps(&catalog);
        Self {
            catalog,
            by_name,
            relations: HashMap::new(),
            maps,
            doomed: HashSet::new(),
            moved_from: HashMap::new(),
            unaccompanied: HashMap::new(),
            interned: std::sync::Mutex::new(HashSet::new()),
            schemas: schemas.iter().cloned().collect(),
            salt: salt_bytes(salt),
            delta: Vec::new(),
            schema_changes_captured: false,
        }
    }

    /// Says whether the source's schema-change triggers are installed: a table whose
    /// definition changes is then no news.
    pub fn set_schema_changes_captured(&mut self, captured: bool) {
        self.schema_changes_captured = captured;
    }

    /// The map changes since the last call (what the pack being sealed did to them).
    pub fn take_delta(&mut self) -> Vec<Delta> {
        std::mem::take(&mut self.delta)
    }

    /// The whole state as deltas: per map (by name), a Clear then its entries.
    pub fn checkpoint(&self) -> Vec<Delta> {
        let mut maps: Vec<&KeyMap> = self.maps.values().flatten().collect();
        maps.sort_by(|a, b| a.name.cmp(&b.name));
        let mut out = Vec::new();
        for m in maps {
            out.push(Delta::Clear {
                map: m.name.clone(),
            });
            out.extend(m.tenants.iter().map(|(key, tenant)| Delta::Set {
                map: m.name.clone(),
                key: *key,
                tenant: tenant.clone(),
            }));
        }
        out
    }

    fn map_mut(&mut self, name: &str) -> Option<&mut KeyMap> {
        self.maps.values_mut().flatten().find(|m| &*m.name == name)
    }

    /// Applies persisted changes (a checkpoint is a Clear and Sets); maps that no longer
    /// exist are ignored.
    pub fn apply(&mut self, deltas: impl IntoIterator<Item = Delta>) {
        for d in deltas {
            match d {
                Delta::Set { map, key, tenant } => {
                    let tenant = tenant.map(|t| self.intern(t.as_bytes()));
                    if let Some(m) = self.map_mut(&map) {
                        m.tenants.insert(key, tenant);
                    }
                }
                Delta::Remove { map, key } => {
                    if let Some(m) = self.map_mut(&map) {
                        m.tenants.remove(&key);
                    }
                }
                Delta::Clear { map } => {
                    if let Some(m) = self.map_mut(&map) {
                        m.tenants.clear();
                    }
                }
            }
        }
        self.delta.clear();
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Keys held in all maps (for logs and metrics).
    pub fn keys(&self) -> usize {
        self.maps
            .values()
            .flat_map(|l| l.iter().map(|m| m.tenants.len()))
            .sum()
    }

    /// One allocation per tenant, however many changes name it.
    fn intern(&self, value: &[u8]) -> Arc<str> {
        let s = String::from_utf8_lossy(value);
        let mut interned = self
            .interned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(found) = interned.get(s.as_ref()) {
            return found.clone();
        }
        let arc: Arc<str> = Arc::from(s.as_ref());
        interned.insert(arc.clone());
        arc
    }

    /// Fills the key maps from the source's current rows, parents before children.
    pub async fn load(&mut self, client: &Client) -> Result<(), SourceError> {
        let mut order: Vec<usize> = self.maps.keys().copied().collect();
        order.sort_by_key(|&t| self.depth(t));
        for table in order {
            let t = &self.catalog.tables[table];
            let route_columns: Vec<String> = self.catalog.route_columns(t).to_vec();
            let map_columns: Vec<Vec<String>> = self.maps[&table]
                .iter()
                .map(|m| m.columns.clone())
                .collect();
            let mut wanted: Vec<String> = route_columns.clone();
            for cols in &map_columns {
                for c in cols {
                    if !wanted.contains(c) {
                        wanted.push(c.clone());
                    }
                }
            }
            let sql = format!(
                "SELECT {} FROM {}",
                wanted
                    .iter()
                    .map(|c| format!("{}::text", quote_ident(c)))
                    .collect::<Vec<_>>()
                    .join(", "),
                t.sql_name()
            );
            let what = format!("loading the keys of {}", t.qualified());
            let rows = client
                .query_raw(&sql, std::iter::empty::<&str>())
                .await
                .map_err(query_context(what.clone()))?;
            pin_mut!(rows);
            let mut loaded = 0u64;
            while let Some(row) = rows.next().await {
                let row = row.map_err(query_context(what.clone()))?;
                let values: Vec<Option<String>> = (0..wanted.len()).map(|i| row.get(i)).collect();
                let view = RowView::Loaded {
                    names: &wanted,
                    values: &values,
                };
                let Ok(tenant) = self.tenant_of(table, "a loaded row", &view) else {
                    continue; // unknown parents cannot happen in one snapshot
                };
                self.remember(table, &view, tenant);
                loaded += 1;
            }
            tracing::info!(table = %self.catalog.tables[table].qualified(), keys = loaded, "routing keys loaded");
        }
        Ok(())
    }

    fn depth(&self, table: usize) -> usize {
        match &self.catalog.tables[table].scope {
            TableScope::Tenant(Route::Via { parent, .. }) if *parent != table => {
                1 + self.depth(*parent)
            }
            _ => 0,
        }
    }

    /// Whether a Relation names a table of the backed-up schemas the router does not know: one
    /// created since its catalog was loaded.
    pub fn is_new_table(&self, relation: &Relation) -> bool {
        self.schemas.contains(&relation.namespace)
            && !self
                .by_name
                .contains_key(&(relation.namespace.clone(), relation.name.clone()))
    }

    /// A table created after the catalog was loaded joins, so its first changes are routed
    /// without a restart: with the route `fresh` (the catalog now) gives the table of the
    /// relation's oid (renamed since, perhaps), when routing it needs nothing the router lacks
    /// (a parent it keeps a key map of); or, gone from `fresh` (dropped since), through its
    /// own tenant column if it has one. Otherwise false: the capture stops with
    /// [`RouteError::UnknownTable`], as it did before.
    pub fn add_table(&mut self, fresh: &Catalog, relation: &Relation) -> bool {
        let found = fresh.tables.iter().find(|t| t.oid == relation.oid);
        let mut table = match found {
            Some(t) => t.clone(),
            None => {
                let tenant = &self.catalog.tenant_column;
                if !relation.columns.iter().any(|c| &c.name == tenant) {
                    return false;
                }
                Table {
                    schema: relation.namespace.clone(),
                    name: relation.name.clone(),
                    columns: Vec::new(),
                    replica_identity: ReplicaIdentity::Nothing,
                    row_security: false,
                    can_select: false,
                    unlogged: false,
                    partitions: None,
                    scope: TableScope::Tenant(Route::Direct {
                        column: tenant.clone(),
                    }),
                    oid: relation.oid,
                    attnums: Default::default(),
                }
            }
        };
        if let TableScope::Tenant(Route::Via {
            parent,
            parent_columns,
            ..
        }) = &mut table.scope
        {
            let p = &fresh.tables[*parent];
            let known = self
                .by_name
                .get(&(p.schema.clone(), p.name.clone()))
                .copied();
            let mapped = known.filter(|i| {
                self.maps
                    .get(i)
                    .is_some_and(|maps| maps.iter().any(|m| &m.columns == parent_columns))
            });
            match mapped {
                Some(i) => *parent = i,
                None => return false,
            }
        }
        let index = self.catalog.tables.len();
        let names = [
            (relation.namespace.clone(), relation.name.clone()),
            (table.schema.clone(), table.name.clone()),
        ];
        let partitions = table
            .partitions
            .iter()
            .flatten()
            .map(|p| (p.schema.clone(), p.name.clone()));
        for key in names.into_iter().chain(partitions) {
            self.by_name.entry(key).or_insert(index);
        }
        tracing::info!(table = %relation_name(relation), route = %fresh.describe_route(&table), "a new table joins the change stream");
        self.catalog.tables.push(table);
        true
    }

    /// Whether `schema` is one of the backed-up schemas.
    pub fn covers_schema(&self, schema: &str) -> bool {
        self.schemas.contains(schema)
    }

    /// Records (or replaces) a relation's definition. True when the definition of a table of
    /// the backed-up schemas changed and the stream does not say how (no schema-change
    /// triggers).
    pub fn relation(&mut self, relation: &Relation) -> Result<bool, RouteError> {
        let table = self
            .by_name
            .get(&(relation.namespace.clone(), relation.name.clone()))
            .copied();
        if table.is_none() && self.schemas.contains(&relation.namespace) {
            return Err(RouteError::UnknownTable {
                table: format!("{}.{}", relation.namespace, relation.name),
            });
        }
        let changed = match self.relations.get(&relation.oid) {
            // Names and types: a replica identity changed (key flags) is no new shape.
            Some(old) => {
                let shape = |r: &Relation| -> Vec<(String, u32, i32)> {
                    r.columns
                        .iter()
                        .map(|c| (c.name.clone(), c.type_oid, c.type_modifier))
                        .collect()
                };
                shape(&old.relation) != shape(relation)
            }
            // The table's first definition this session: against the catalog read at its start
            // (a session often begins with the change that follows an ALTER).
            None => table.is_some_and(|t| {
                let known = self.catalog.tables[t].columns.iter().map(|c| &c.name);
                !known.eq(relation.columns.iter().map(|c| &c.name))
            }),
        };
        if changed {
            let table = format!("{}.{}", relation.namespace, relation.name);
            if self.schema_changes_captured {
                tracing::info!(%table, "table definition changed (the schema change is in the stream)");
            } else {
                tracing::warn!(
                    %table,
                    "table definition changed while capturing, and schema changes are not captured (`updog-backup check`): restores across this change need a snapshot taken after it"
                );
            }
        }
        self.relations.insert(
            relation.oid,
            Rel {
                relation: relation.clone(),
                table,
            },
        );
        Ok(changed && table.is_some() && !self.schema_changes_captured)
    }

    pub fn relation_of(&self, oid: u32) -> Result<&Relation, RouteError> {
        self.relations
            .get(&oid)
            .map(|r| &r.relation)
            .ok_or(RouteError::UnknownRelation(oid))
    }

    /// The scope of a relation, for TRUNCATE.
    pub fn scope_of(&self, oid: u32) -> Result<Scope, RouteError> {
        let rel = self
            .relations
            .get(&oid)
            .ok_or(RouteError::UnknownRelation(oid))?;
        Ok(match rel.table.map(|t| &self.catalog.tables[t].scope) {
            Some(TableScope::Tenant(_)) => Scope::Tenant,
            Some(TableScope::Global) => Scope::Global,
            _ => Scope::Skip,
        })
    }

    /// A TRUNCATE of a table other tables route through forgets its keys at commit.
    pub fn truncated(&mut self, oid: u32) {
        if let Some(table) = self.relations.get(&oid).and_then(|r| r.table)
            && let Some(maps) = self.maps.get_mut(&table)
        {
            for m in maps {
                m.tenants.clear();
                self.delta.push(Delta::Clear {
                    map: m.name.clone(),
                });
            }
        }
    }

    /// Routes an Insert, Update or Delete and keeps the key maps current.
    pub fn route(&mut self, message: &Message) -> Result<Routed, RouteError> {
        let (oid, op, new, old) = match message {
            Message::Insert(m) => (m.relation, "an INSERT", Some(&m.new), None),
            Message::Update(m) => (m.relation, "an UPDATE", Some(&m.new), m.old.as_ref()),
            Message::Delete(m) => (m.relation, "a DELETE", None, Some(&m.old)),
            _ => return Ok(Routed::One(Destination::Skip)),
        };
        let rel = self
            .relations
            .get(&oid)
            .ok_or(RouteError::UnknownRelation(oid))?;
        let Some(table) = rel.table else {
            return Ok(Routed::One(Destination::Skip));
        };
        match &self.catalog.tables[table].scope {
            TableScope::Tenant(_) => {}
            TableScope::Global => return Ok(Routed::One(Destination::Global)),
            _ => return Ok(Routed::One(Destination::Skip)),
        }
        let relation = &rel.relation;
        for tuple in new.into_iter().chain(old.map(OldTuple::tuple)) {
            if tuple.0.len() != relation.columns.len() {
                return Err(RouteError::Tuple {
                    table: relation_name(relation),
                    message: format!(
                        "a tuple has {} values for {} columns",
                        tuple.0.len(),
                        relation.columns.len()
                    ),
                });
            }
        }
        let new_row = new.map(|tuple| RowView::Tuple {
            relation,
            tuple,
            key_only: false,
        });
        // The old row as far as the change shows it. An UPDATE carries none when no column of
        // the replica identity changed: then the new row's identity columns are the old row's.
        let old_row = match (old, new) {
            (Some(t), _) => Some(RowView::Tuple {
                relation,
                tuple: t.tuple(),
                key_only: matches!(t, OldTuple::Key(_)),
            }),
            (None, Some(tuple)) if matches!(message, Message::Update(_)) => Some(RowView::Tuple {
                relation,
                tuple,
                key_only: true,
            }),
            (None, _) => None,
        };
        let (from, to) = match (&old_row, &new_row) {
            (None, Some(n)) => (None, self.tenant_of(table, op, n)?),
            (Some(o), None) => (self.tenant_of(table, op, o)?, None),
            (Some(o), Some(n)) => {
                match (self.tenant_of(table, op, o), self.tenant_of(table, op, n)) {
                    (Ok(from), Ok(to)) => (from, to),
                    // A new row lacks a route column only when it is an unchanged TOASTed
                    // value: the route did not change.
                    (Ok(from), Err(RouteError::MissingColumn { .. })) => (from.clone(), from),
                    // The old tenant is unknown (the replica identity lacks the route and no
                    // key map knows the row): refused, not guessed. Taking the new tenant for
                    // the old one would misroute every UPDATE that moves a row, silently — the
                    // old tenant's restore would keep it, the new one's would fail. `check`
                    // asks for REPLICA IDENTITY FULL on exactly these tables, which their
                    // DELETEs need anyway; keeping a key map of every such table instead would
                    // hold a key of every row in the daemon's memory and checkpoints.
                    (Err(e), Ok(_) | Err(RouteError::MissingColumn { .. })) => return Err(e),
                    // The new row's parent is unknown.
                    (_, Err(e)) => return Err(e),
                }
            }
            (None, None) => return Ok(Routed::One(Destination::Skip)),
        };
        // Key map updates: computed while the relation is borrowed, applied after. A new row's
        // keys are remembered with its tenant, or as keys of no tenant.
        let mut doomed = Vec::new();
        let mut remembered = Vec::new();
        if let Some(maps) = self.maps.get(&table) {
            for (i, m) in maps.iter().enumerate() {
                if let Some(row) = &old_row
                    && let Some(key) = keys_of(&self.salt, m, row)
                {
                    doomed.push((i, key));
                }
                if let Some(row) = &new_row
                    && let Some(key) = keys_of(&self.salt, m, row)
                {
                    remembered.push((i, key, to.clone()));
                }
            }
        }
        for (i, key) in doomed {
            self.doomed.insert((table, i, key));
        }
        let moved = matches!(message, Message::Update(_)) && from != to;
        if moved && !remembered.is_empty() {
            // Rows below it may have moved too: its trigger says which.
            self.unaccompanied
                .entry(table)
                .or_default()
                .extend(from.iter().chain(&to).cloned());
        }
        for (i, key, tenant) in remembered {
            if moved {
                self.moved_from.insert((table, i, key), from.clone());
            } else {
                self.moved_from.remove(&(table, i, key));
            }
            self.doomed.remove(&(table, i, key));
            if let Some(m) = self.maps.get_mut(&table).and_then(|l| l.get_mut(i))
                && m.tenants.get(&key) != Some(&tenant)
            {
                m.tenants.insert(key, tenant.clone());
                self.delta.push(Delta::Set {
                    map: m.name.clone(),
                    key,
                    tenant,
                });
            }
        }
        let destination = |tenant: Option<Arc<str>>| match tenant {
            Some(t) => Destination::Tenant(t),
            None => Destination::Skip,
        };
        Ok(match message {
            Message::Update(_) if from != to => Routed::Moved { from, to },
            Message::Delete(_) => Routed::One(destination(from)),
            _ => Routed::One(destination(to)),
        })
    }

    /// The trigger of parent moves on the table `parent` (an oid) spoke: the rows below the
    /// moves follow, if any.
    pub fn moves_described(&mut self, parent: u32) {
        if let Some(table) = self.catalog.tables.iter().position(|t| t.oid == parent) {
            self.unaccompanied.remove(&table);
        }
    }

    /// The tables whose rows the open transaction moved to another tenant without the rows
    /// below them following (their trigger is missing), with the tenants concerned.
    pub fn take_unaccompanied(&mut self) -> Vec<(String, Vec<Arc<str>>)> {
        let mut out: Vec<(String, Vec<Arc<str>>)> = self
            .unaccompanied
            .drain()
            .map(|(t, tenants)| {
                let mut tenants: Vec<Arc<str>> = tenants.into_iter().collect();
                tenants.sort();
                (self.catalog.tables[t].qualified(), tenants)
            })
            .collect();
        out.sort();
        out
    }

    /// Routes a row the trigger of parent moves read below a moved row (as it is now, with
    /// `relation`'s columns): `Moved` from the tenant its parent left to the one it joined,
    /// or `Skip` when its parent's route changed without its tenant. Its own keys follow, for
    /// the rows below it.
    pub fn route_moved(&mut self, oid: u32, tuple: &Tuple) -> Result<Routed, RouteError> {
        let rel = self
            .relations
            .get(&oid)
            .ok_or(RouteError::UnknownRelation(oid))?;
        let Some(table) = rel.table else {
            return Ok(Routed::One(Destination::Skip));
        };
        let TableScope::Tenant(Route::Via {
            columns,
            parent,
            parent_columns,
            ..
        }) = &self.catalog.tables[table].scope
        else {
            return Ok(Routed::One(Destination::Skip));
        };
        let row = RowView::Tuple {
            relation: &rel.relation,
            tuple,
            key_only: false,
        };
        let to = self.tenant_of(table, "a moved row", &row)?;
        let mut parts = Vec::new();
        for c in columns {
            match row.get(c) {
                Lookup::Value(v) => parts.push(v),
                // Below no row at all: it did not move.
                _ => return Ok(Routed::One(Destination::Skip)),
            }
        }
        let from = self
            .maps
            .get(parent)
            .and_then(|l| l.iter().position(|m| &m.columns == parent_columns))
            .and_then(|i| {
                let name = &self.maps[parent][i].name;
                self.moved_from
                    .get(&(*parent, i, hash_key(&self.salt, name, &parts)))
            })
            .cloned()
            .unwrap_or_else(|| to.clone());
        let own: Vec<(usize, KeyHash)> = self
            .maps
            .get(&table)
            .into_iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, m)| keys_of(&self.salt, m, &row).map(|k| (i, k)))
            .collect();
        for (i, key) in own {
            if from != to {
                self.moved_from.insert((table, i, key), from.clone());
            }
            let m = &mut self.maps.get_mut(&table).expect("listed above")[i];
            if m.tenants.get(&key) != Some(&to) {
                m.tenants.insert(key, to.clone());
                self.delta.push(Delta::Set {
                    map: m.name.clone(),
                    key,
                    tenant: to.clone(),
                });
            }
        }
        Ok(if from == to {
            Routed::One(Destination::Skip)
        } else {
            Routed::Moved { from, to }
        })
    }

    /// The tenant of a row of `table`: `Ok(None)` when it belongs to none (NULL foreign key).
    fn tenant_of(
        &self,
        table: usize,
        op: &'static str,
        row: &RowView<'_>,
    ) -> Result<Option<Arc<str>>, RouteError> {
        let t = &self.catalog.tables[table];
        let missing = |column: &str| RouteError::MissingColumn {
            op,
            table: t.qualified(),
            sql: t.sql_name(),
            column: column.to_string(),
            identity: format!("{:?}", t.replica_identity),
        };
        let first_error = match &t.scope {
            TableScope::Tenant(Route::Direct { column }) => match row.get(column) {
                Lookup::Value(v) => return Ok(Some(self.intern(v))),
                Lookup::Null => return Ok(None),
                Lookup::Absent => missing(column),
            },
            TableScope::Tenant(Route::Via {
                columns,
                parent,
                parent_columns,
                ..
            }) => {
                let mut parts = Vec::new();
                let mut absent = None;
                for c in columns {
                    match row.get(c) {
                        Lookup::Value(v) => parts.push(v),
                        Lookup::Null => return Ok(None),
                        Lookup::Absent => {
                            absent = Some(c.clone());
                            break;
                        }
                    }
                }
                match absent {
                    Some(c) => missing(&c),
                    None => {
                        let found = self.maps.get(parent).and_then(|l| {
                            l.iter()
                                .find(|m| &m.columns == parent_columns)
                                .and_then(|m| m.tenants.get(&hash_key(&self.salt, &m.name, &parts)))
                        });
                        match found {
                            Some(tenant) => return Ok(tenant.clone()),
                            None => RouteError::UnknownParent {
                                op,
                                table: t.qualified(),
                                parent: self.catalog.tables[*parent].qualified(),
                                key: describe_key(&parts),
                            },
                        }
                    }
                }
            }
            _ => return Ok(None),
        };
        // The route's columns are not in the tuple: the table's own key map may know the row.
        if let Some(maps) = self.maps.get(&table) {
            for m in maps {
                let parts: Option<Vec<&[u8]>> = m
                    .columns
                    .iter()
                    .map(|c| match row.get(c) {
                        Lookup::Value(v) => Some(v),
                        _ => None,
                    })
                    .collect();
                if let Some(parts) = parts
                    && let Some(tenant) = m.tenants.get(&hash_key(&self.salt, &m.name, &parts))
                {
                    return Ok(tenant.clone());
                }
            }
        }
        Err(first_error)
    }

    /// Loads a row's keys (not a change: nothing for the delta).
    fn remember(&mut self, table: usize, row: &RowView<'_>, tenant: Option<Arc<str>>) {
        if let Some(maps) = self.maps.get_mut(&table) {
            for m in maps {
                if let Some(key) = keys_of(&self.salt, m, row) {
                    m.tenants.insert(key, tenant.clone());
                }
            }
        }
    }

    /// The open transaction committed: forget the keys it deleted.
    pub fn commit(&mut self) {
        self.moved_from.clear();
        self.unaccompanied.clear();
        for (table, i, key) in self.doomed.drain() {
            if let Some(m) = self.maps.get_mut(&table).and_then(|l| l.get_mut(i))
                && m.tenants.remove(&key).is_some()
            {
                self.delta.push(Delta::Remove {
                    map: m.name.clone(),
                    key,
                });
            }
        }
    }
}

/// The key maps routing needs: per table, one per set of columns that other tables' routes
/// reference in it.
fn key_maps(catalog: &Catalog) -> HashMap<usize, Vec<KeyMap>> {
    let mut maps: HashMap<usize, Vec<KeyMap>> = HashMap::new();
    for table in &catalog.tables {
        if let TableScope::Tenant(Route::Via {
            parent,
            parent_columns,
            ..
        }) = &table.scope
        {
            let name: Arc<str> = Arc::from(format!(
                "{}({})",
                catalog.tables[*parent].qualified(),
                parent_columns.join(",")
            ));
            let list = maps.entry(*parent).or_default();
            if !list.iter().any(|m| &m.columns == parent_columns) {
                list.push(KeyMap {
                    name,
                    columns: parent_columns.clone(),
                    tenants: HashMap::new(),
                });
            }
        }
    }
    maps
}

/// What every key hash starts with (`salt`: the source's system identifier).
fn salt_bytes(salt: &str) -> Vec<u8> {
    format!("updog-backup routing {salt}").into_bytes()
}

/// Writes the routing state of the source, as `client` sees it (inside a snapshot), to
/// `checkpoint` without holding it: the same state [`Router::load`] builds in memory (then
/// [`Router::checkpoint`]), read a table at a time with each row's tenant joined along its
/// route by the server. Returns the keys written.
pub async fn write_checkpoint<E: From<SourceError> + From<RepositoryError>>(
    catalog: &Catalog,
    salt: &str,
    client: &Client,
    checkpoint: &mut CheckpointWriter,
) -> Result<u64, E> {
    let salt = salt_bytes(salt);
    let mut maps: Vec<(usize, Vec<KeyMap>)> = key_maps(catalog).into_iter().collect();
    maps.sort_by_key(|(table, _)| *table);
    for m in maps.iter().flat_map(|(_, list)| list) {
        checkpoint.clear(&m.name)?;
    }
    let mut written = 0u64;
    for (table, list) in &maps {
        let t = &catalog.tables[*table];
        let mut wanted: Vec<String> = Vec::new();
        for m in list {
            for c in &m.columns {
                if !wanted.contains(c) {
                    wanted.push(c.clone());
                }
            }
        }
        let positions: Vec<Vec<usize>> = list
            .iter()
            .map(|m| {
                m.columns
                    .iter()
                    .map(|c| 1 + wanted.iter().position(|w| w == c).expect("collected above"))
                    .collect()
            })
            .collect();
        let sql = catalog
            .routing_query(t, &wanted)
            .expect("tables other routes pass through have a route");
        let what = format!("loading the keys of {}", t.qualified());
        let rows = client
            .query_raw(&sql, std::iter::empty::<&str>())
            .await
            .map_err(query_context(what.clone()))?;
        pin_mut!(rows);
        while let Some(row) = rows.next().await {
            let row = row.map_err(query_context(what.clone()))?;
            let tenant: Option<&str> = row.get(0);
            for (m, columns) in list.iter().zip(&positions) {
                let mut parts: Vec<&[u8]> = Vec::with_capacity(columns.len());
                for &i in columns {
                    match row.get::<_, Option<&str>>(i) {
                        Some(v) => parts.push(v.as_bytes()),
                        None => break,
                    }
                }
                // A key with a NULL part references nothing: the router keeps none.
                if parts.len() < columns.len() {
                    continue;
                }
                let key = hash_key(&salt, &m.name, &parts);
                checkpoint.set(&m.name, &key, tenant)?;
                written += 1;
            }
        }
        tracing::info!(table = %t.qualified(), "routing keys written");
    }
    Ok(written)
}

fn keys_of(salt: &[u8], map: &KeyMap, row: &RowView<'_>) -> Option<KeyHash> {
    let parts: Option<Vec<&[u8]>> = map
        .columns
        .iter()
        .map(|c| match row.get(c) {
            Lookup::Value(v) => Some(v),
            _ => None,
        })
        .collect();
    parts.map(|p| hash_key(salt, &map.name, &p))
}

/// A row as routing reads it: a change's tuple, or a row loaded from the source.
enum RowView<'a> {
    Tuple {
        relation: &'a Relation,
        tuple: &'a Tuple,
        /// A key-only old tuple: columns outside the replica identity are absent (the
        /// protocol sends them as NULL).
        key_only: bool,
    },
    Loaded {
        names: &'a [String],
        values: &'a [Option<String>],
    },
}

impl<'a> RowView<'a> {
    fn get(&self, name: &str) -> Lookup<'a> {
        match *self {
            RowView::Tuple {
                relation,
                tuple,
                key_only,
            } => {
                let Some(i) = relation.columns.iter().position(|c| c.name == name) else {
                    return Lookup::Absent;
                };
                if key_only && !relation.columns[i].part_of_key {
                    return Lookup::Absent;
                }
                match tuple.0.get(i) {
                    Some(Value::Text(b) | Value::Binary(b)) => Lookup::Value(b),
                    Some(Value::Null) => Lookup::Null,
                    Some(Value::UnchangedToast) | None => Lookup::Absent,
                }
            }
            RowView::Loaded { names, values } => match names.iter().position(|c| c == name) {
                Some(i) => values[i]
                    .as_deref()
                    .map_or(Lookup::Null, |v| Lookup::Value(v.as_bytes())),
                None => Lookup::Absent,
            },
        }
    }
}

/// Quoted names for messages.
pub fn relation_name(relation: &Relation) -> String {
    format!("{}.{}", relation.namespace, relation.name)
}

impl Classify for RouteError {
    fn class(&self) -> ErrorClass {
        match self {
            // A restart loads the catalog again, and with it the new table.
            RouteError::UnknownTable { .. } => ErrorClass::Transient,
            // The change in the slot stays unroutable however often it is read again.
            RouteError::MissingColumn { .. }
            | RouteError::UnknownParent { .. }
            | RouteError::MovedWithoutValue { .. }
            | RouteError::UnknownRelation(_)
            | RouteError::Tuple { .. } => ErrorClass::Permanent,
        }
    }
}

#[cfg(test)]
mod tests;
