//! Isolation as a property (DESIGN.md invariant 3, and the "tenant table" of its Words): for
//! random schemas and random tenants, a restored database holds every row of its tenant and no
//! row of anyone else.
//!
//! Each case builds, from one seed, a fresh database with one schema: a tenant root table (or
//! none), then a random forest of tables, each with the tenant column itself or a foreign key to
//! a parent (single or composite key, primary key or unique constraint, the parent's key holding
//! the tenant column or not), chains up to four deep, tables without a primary key, nullable and
//! NOT NULL keys, partitioned tables, extra nullable foreign keys and self references that do
//! not route, a global table (and sometimes a forced-global one holding the tenant column), an
//! excluded table, and random rows for 2–5 tenants of type uuid, text or bigint (values that
//! differ only by case, whitespace or prefix, quotes, slashes). Then `init`, and `restore
//! --latest` of every tenant. In half the cases the daemon then captures 30 random steps (single
//! changes or transactions of 2–3, some rolled back): inserts, 50-row inserts (1000 rows,
//! streamed, with `UPDOG_ISOLATION_KNOWN_BUGS=1`), updates (payloads, TOASTed values, keys with ON UPDATE CASCADE, moves to
//! another parent of the same tenant, unreferenced rows moved to another tenant), deletes (ON
//! DELETE CASCADE / SET NULL / NO ACTION), TRUNCATEs, changes of global and excluded tables;
//! sometimes the daemon is SIGKILLed and restarted, or a snapshot is taken while it captures.
//! Then every tenant is restored `--latest` again, and one `--at` an instant in the middle.
//!
//! The oracle never asks the product: every table has a `rid bigint` (not a key), and the test
//! computes each row's tenant from the data by the route the generator built — the tenant
//! column, or the parent row its foreign key references (NULL: no tenant) — which is the route
//! the design prescribes (own column first, then the shortest chain of NOT NULL keys, a nullable
//! key only when there is no other; extra foreign keys are nullable and never shorter). A
//! recovery database must hold exactly the rids of its tenant in every tenant table (rows of
//! another tenant or of none are leaks, missing ones are losses), with the same content as the
//! source, the global tables whole, and nothing of the excluded table.
//!
//! `UPDOG_ISOLATION_CASES` (default 10) sets the number of cases, `UPDOG_ISOLATION_SEED` replays
//! one case (each case prints its seed and writes its SQL to `$TMPDIR/updog-isolation-<seed>.sql`;
//! a failure prints the schema and every change applied), `UPDOG_ISOLATION_STEPS` (default 30)
//! shortens a capture case to minimise it. Run it long with
//! `UPDOG_ISOLATION_CASES=200 cargo test --test e2e isolation:: -- --nocapture`.
//!
//! By default the generator avoids the shapes of the bugs that the ignored tests at the end of
//! this file pin down (one each, minimised); `UPDOG_ISOLATION_KNOWN_BUGS=1` generates them too
//! (a seed replays the same case only under the same setting).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

use futures::FutureExt;
use tokio_postgres::Client;

use crate::support::daemon::{Daemon, capture_env, wait_covered};
use crate::support::oracle::{digest, now};
use crate::support::postgres::cluster;
use crate::support::{Repo, TestEnv};

// ---------------------------------------------------------------------------------------------
// The generated schema

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TenantType {
    Uuid,
    Text,
    Int,
}

impl TenantType {
    fn sql(self) -> &'static str {
        match self {
            TenantType::Uuid => "uuid",
            TenantType::Text => "text",
            TenantType::Int => "bigint",
        }
    }
}

/// What other tables reference a table by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    /// No primary key, no unique constraint: a leaf.
    None,
    /// `PRIMARY KEY (id)`.
    Id,
    /// `PRIMARY KEY (k1, k2)`.
    Composite,
    /// No primary key; `UNIQUE (k1, k2)`.
    UniqueComposite,
    /// `PRIMARY KEY (id)`, and children reference `UNIQUE (k1, k2)`.
    IdUnique,
    /// `PRIMARY KEY (<tenant column>, id)`, ids repeating across tenants.
    TenantComposite,
    /// The root: its key is the tenant value.
    Root,
}

#[derive(Clone, Debug)]
enum Route {
    /// The tenants' own table (`orgs(id)` or `orgs(<tenant column>)`), one row per tenant.
    Root,
    /// The tenant column itself.
    Direct {
        nullable: bool,
        references_root: bool,
    },
    /// A foreign key to `parent`'s key.
    Via {
        parent: usize,
        nullable: bool,
        /// The child's column mapped onto the parent's tenant column (parents keyed by
        /// `(<tenant column>, id)`): the tenant column itself, or another name.
        carrier: Option<String>,
        on_delete: &'static str,
        on_update: &'static str,
    },
}

#[derive(Clone, Debug)]
struct TableSpec {
    name: String,
    route: Route,
    key: Key,
    /// A nullable foreign key to another table's key, never a route the design would prefer.
    extra: Option<usize>,
    /// A nullable foreign key to the table's own key (a tree), never a route.
    self_ref: bool,
    /// `PARTITION BY HASH (<tenant column>)`, two partitions.
    partitioned: bool,
    /// `currency text REFERENCES currencies`.
    currency: bool,
}

#[derive(Clone, Debug)]
struct Spec {
    seed: u64,
    schema: String,
    tc: String,
    ttype: TenantType,
    /// Tenant values as PostgreSQL prints them (`::text`).
    tenants: Vec<String>,
    /// The root's key column (`id` or the tenant column), when there is a root (table 0).
    root_col: Option<String>,
    tables: Vec<TableSpec>,
    /// `shared`: has the tenant column, listed in `global_tables`.
    forced_global: bool,
    /// `scratch`: has the tenant column, listed in `exclude_tables`.
    excluded: bool,
    capture: bool,
    /// Also generate the shapes of the bugs the ignored tests below pin down.
    known_bugs: bool,
}

const CURRENCIES: &[&str] = &["EUR", "USD", "JPY", "CHF"];

fn qi(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn ql(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

fn toml_str(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

impl Spec {
    fn qname(&self, i: usize) -> String {
        format!("{}.{}", qi(&self.schema), qi(&self.tables[i].name))
    }

    fn qual(&self, name: &str) -> String {
        format!("{}.{}", qi(&self.schema), qi(name))
    }

    fn has_tc(&self, i: usize) -> bool {
        match &self.tables[i].route {
            Route::Root => self.root_col.as_deref() == Some(self.tc.as_str()),
            Route::Direct { .. } => true,
            Route::Via { carrier, .. } => carrier.as_deref() == Some(self.tc.as_str()),
        }
    }

    /// Every link up to the tenant is NOT NULL.
    fn solid(&self, i: usize) -> bool {
        match &self.tables[i].route {
            Route::Root | Route::Direct { .. } => true,
            Route::Via {
                parent, nullable, ..
            } => !nullable && self.solid(*parent),
        }
    }

    fn depth(&self, i: usize) -> usize {
        match &self.tables[i].route {
            Route::Via { parent, .. } => 1 + self.depth(*parent),
            _ => 0,
        }
    }

    fn key_columns(&self, i: usize) -> Vec<String> {
        match self.tables[i].key {
            Key::None => vec![],
            Key::Id => vec!["id".into()],
            Key::Composite | Key::UniqueComposite | Key::IdUnique => vec!["k1".into(), "k2".into()],
            Key::TenantComposite => vec![self.tc.clone(), "id".into()],
            Key::Root => vec![self.root_col.clone().unwrap()],
        }
    }

    fn key_types(&self, i: usize) -> Vec<&'static str> {
        match self.tables[i].key {
            Key::None => vec![],
            Key::Id => vec!["bigint"],
            Key::Composite | Key::UniqueComposite | Key::IdUnique => vec!["int", "text"],
            Key::TenantComposite => vec![self.ttype.sql(), "bigint"],
            Key::Root => vec![self.ttype.sql()],
        }
    }

    /// Columns of table `i` referencing table `target`'s key, named with `prefix`.
    fn ref_columns(
        &self,
        i: usize,
        target: usize,
        prefix: &str,
        carrier: Option<&str>,
    ) -> Vec<String> {
        match self.tables[target].key {
            Key::None => unreachable!("a table without a key is never referenced"),
            Key::Id => vec![format!("{prefix}{target}_id")],
            Key::Composite | Key::UniqueComposite | Key::IdUnique => {
                vec![
                    format!("{prefix}{target}_k1"),
                    format!("{prefix}{target}_k2"),
                ]
            }
            Key::TenantComposite => {
                let first = match carrier {
                    Some(c) => c.to_string(),
                    None if self.has_tc(i) => self.tc.clone(),
                    None => format!("{prefix}{target}_org"),
                };
                vec![first, format!("{prefix}{target}_id")]
            }
            Key::Root => match carrier {
                Some(c) => vec![c.to_string()],
                None => vec![format!("{prefix}{target}_org")],
            },
        }
    }

    /// The columns of table `i` that hold the tenant value or lead to it.
    fn route_columns(&self, i: usize) -> Vec<String> {
        match &self.tables[i].route {
            Route::Root => vec![self.root_col.clone().unwrap()],
            Route::Direct { .. } => vec![self.tc.clone()],
            Route::Via {
                parent, carrier, ..
            } => self.ref_columns(i, *parent, "p", carrier.as_deref()),
        }
    }

    fn extra_columns(&self, i: usize) -> Vec<String> {
        match self.tables[i].extra {
            Some(q) => self.ref_columns(i, q, "x", None),
            None => vec![],
        }
    }

    fn self_columns(&self, i: usize) -> Vec<String> {
        if !self.tables[i].self_ref {
            return vec![];
        }
        match self.tables[i].key {
            Key::Id => vec!["s_id".into()],
            Key::Composite | Key::UniqueComposite | Key::IdUnique => {
                vec!["s_k1".into(), "s_k2".into()]
            }
            Key::TenantComposite => vec![self.tc.clone(), "s_id".into()],
            _ => vec![],
        }
    }

    /// Columns the oracle reads: route, key, extra and self-reference columns.
    fn struct_columns(&self, i: usize) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for c in self
            .route_columns(i)
            .into_iter()
            .chain(self.key_columns(i))
            .chain(self.extra_columns(i))
            .chain(self.self_columns(i))
        {
            if !out.contains(&c) {
                out.push(c);
            }
        }
        out
    }

    /// Columns set by the generator that are not the route's (extra and self references),
    /// minus a shared tenant column.
    fn nullable_refs(&self, i: usize) -> Vec<String> {
        self.extra_columns(i)
            .into_iter()
            .chain(self.self_columns(i))
            .filter(|c| *c != self.tc || !self.has_tc(i))
            .collect()
    }

    /// Tables that other tables reference (by any foreign key, self references aside).
    fn referenced(&self) -> BTreeSet<usize> {
        let mut out = BTreeSet::new();
        for t in &self.tables {
            if let Route::Via { parent, .. } = t.route {
                out.insert(parent);
            }
            if let Some(q) = t.extra {
                out.insert(q);
            }
        }
        if self.tables.iter().any(|t| {
            matches!(
                t.route,
                Route::Direct {
                    references_root: true,
                    ..
                }
            )
        }) {
            out.insert(0);
        }
        out
    }

    fn tenant_index(&self, value: &str) -> Result<usize, String> {
        self.tenants
            .iter()
            .position(|t| t == value)
            .ok_or_else(|| format!("value {value:?} is not one of the generated tenants"))
    }

    fn describe(&self) -> String {
        let mut s = format!(
            "{} tenants ({}) in column {:?} of schema {:?}; {} tables:",
            self.tenants.len(),
            self.ttype.sql(),
            self.tc,
            self.schema,
            self.tables.len()
        );
        for (i, t) in self.tables.iter().enumerate() {
            let route = match &t.route {
                Route::Root => format!("root({})", self.root_col.as_deref().unwrap()),
                Route::Direct {
                    nullable,
                    references_root,
                } => format!(
                    "direct{}{}",
                    if *nullable { " nullable" } else { "" },
                    if *references_root { " →root" } else { "" }
                ),
                Route::Via {
                    parent,
                    nullable,
                    carrier,
                    on_delete,
                    ..
                } => format!(
                    "→t{parent}({}){}{} on delete {on_delete}",
                    self.route_columns(i).join(","),
                    if *nullable { " nullable" } else { "" },
                    if carrier.is_some() { " carrier" } else { "" }
                ),
            };
            let _ = write!(
                s,
                " [{i} {:?}: {route}, key {:?}{}{}{}]",
                t.name,
                t.key,
                t.extra.map(|q| format!(", extra→{q}")).unwrap_or_default(),
                if t.self_ref { ", self" } else { "" },
                if t.partitioned { ", partitioned" } else { "" },
            );
        }
        s
    }

    // -- SQL ------------------------------------------------------------------------------------

    fn create_table(&self, i: usize) -> String {
        let t = &self.tables[i];
        let mut cols: Vec<(String, String)> = vec![
            ("rid".into(), "bigint NOT NULL".into()),
            ("payload".into(), "text".into()),
        ];
        let add = |cols: &mut Vec<(String, String)>, name: &str, def: String| {
            if !cols.iter().any(|(c, _)| c == name) {
                cols.push((name.to_string(), def));
            }
        };
        let mut cons: Vec<String> = Vec::new();
        let list = |cs: &[String]| cs.iter().map(|c| qi(c)).collect::<Vec<_>>().join(", ");
        match &t.route {
            Route::Root => add(
                &mut cols,
                self.root_col.as_deref().unwrap(),
                format!("{} NOT NULL", self.ttype.sql()),
            ),
            Route::Direct {
                nullable,
                references_root,
            } => {
                add(
                    &mut cols,
                    &self.tc,
                    format!(
                        "{}{}",
                        self.ttype.sql(),
                        if *nullable { "" } else { " NOT NULL" }
                    ),
                );
                if *references_root {
                    cons.push(format!(
                        "FOREIGN KEY ({}) REFERENCES {} ({}) ON UPDATE CASCADE",
                        qi(&self.tc),
                        self.qname(0),
                        list(&self.key_columns(0))
                    ));
                }
            }
            Route::Via {
                parent,
                nullable,
                on_delete,
                on_update,
                ..
            } => {
                let fk = self.route_columns(i);
                for (c, ty) in fk.iter().zip(self.key_types(*parent)) {
                    add(
                        &mut cols,
                        c,
                        format!("{ty}{}", if *nullable { "" } else { " NOT NULL" }),
                    );
                }
                cons.push(format!(
                    "FOREIGN KEY ({}) REFERENCES {} ({}) ON DELETE {on_delete} ON UPDATE {on_update}",
                    list(&fk),
                    self.qname(*parent),
                    list(&self.key_columns(*parent))
                ));
            }
        }
        match t.key {
            Key::None | Key::Root => {}
            Key::Id | Key::TenantComposite => add(&mut cols, "id", "bigint NOT NULL".into()),
            Key::Composite | Key::UniqueComposite | Key::IdUnique => {
                if t.key == Key::IdUnique {
                    add(&mut cols, "id", "bigint NOT NULL".into());
                }
                add(&mut cols, "k1", "int NOT NULL".into());
                add(&mut cols, "k2", "text NOT NULL".into());
            }
        }
        match t.key {
            Key::None => {}
            Key::UniqueComposite => cons.push(format!("UNIQUE ({})", list(&self.key_columns(i)))),
            Key::IdUnique => {
                cons.push("PRIMARY KEY (id)".into());
                cons.push(format!("UNIQUE ({})", list(&self.key_columns(i))));
            }
            _ => cons.push(format!("PRIMARY KEY ({})", list(&self.key_columns(i)))),
        }
        if let Some(q) = t.extra {
            let xc = self.extra_columns(i);
            for (c, ty) in xc.iter().zip(self.key_types(q)) {
                add(&mut cols, c, ty.to_string());
            }
            let own: Vec<String> = xc
                .iter()
                .filter(|c| **c != self.tc || !self.has_tc(i))
                .cloned()
                .collect();
            cons.push(format!(
                "FOREIGN KEY ({}) REFERENCES {} ({}) ON DELETE SET NULL ({}) ON UPDATE CASCADE",
                list(&xc),
                self.qname(q),
                list(&self.key_columns(q)),
                list(&own)
            ));
        }
        if t.self_ref {
            let sc = self.self_columns(i);
            for (c, ty) in sc.iter().zip(self.key_types(i)) {
                add(&mut cols, c, ty.to_string());
            }
            cons.push(format!(
                "FOREIGN KEY ({}) REFERENCES {} ({}) ON DELETE CASCADE ON UPDATE CASCADE",
                list(&sc),
                self.qname(i),
                list(&self.key_columns(i))
            ));
        }
        if t.currency {
            add(&mut cols, "currency", "text".into());
            cons.push(format!(
                "FOREIGN KEY (currency) REFERENCES {} (code)",
                self.qual("currencies")
            ));
        }
        let body: Vec<String> = cols
            .iter()
            .map(|(c, d)| format!("{} {d}", qi(c)))
            .chain(cons)
            .collect();
        let mut sql = format!(
            "CREATE TABLE {} (\n  {}\n)",
            self.qname(i),
            body.join(",\n  ")
        );
        if t.partitioned {
            let _ = writeln!(sql, " PARTITION BY HASH ({});", qi(&self.tc));
            for r in 0..2 {
                let _ = writeln!(
                    sql,
                    "CREATE TABLE {} PARTITION OF {} FOR VALUES WITH (MODULUS 2, REMAINDER {r});",
                    self.qual(&format!("{}_p{r}", t.name)),
                    self.qname(i)
                );
            }
        } else {
            sql.push_str(";\n");
        }
        sql
    }

    fn ddl(&self) -> String {
        let mut sql = format!(
            "CREATE SCHEMA {s};\nCREATE TABLE {cur} (code text PRIMARY KEY, name text);\n",
            s = qi(&self.schema),
            cur = self.qual("currencies")
        );
        for i in 0..self.tables.len() {
            sql.push_str(&self.create_table(i));
        }
        let tt = self.ttype.sql();
        if self.forced_global {
            let _ = writeln!(
                sql,
                "CREATE TABLE {} (rid bigint PRIMARY KEY, {} {tt} NOT NULL, k text);",
                self.qual("shared"),
                qi(&self.tc)
            );
        }
        if self.excluded {
            let _ = writeln!(
                sql,
                "CREATE TABLE {} (rid bigint NOT NULL, {} {tt}, note text);",
                self.qual("scratch"),
                qi(&self.tc)
            );
        }
        sql
    }

    /// Environment overrides of the test config for this schema.
    fn overrides(&self) -> Vec<(String, String)> {
        let q = |name: &str| toml_str(&format!("{}.{name}", self.schema));
        let mut global = vec![q("currencies")];
        if self.forced_global {
            global.push(q("shared"));
        }
        let excluded = if self.excluded {
            vec![q("scratch")]
        } else {
            vec![]
        };
        vec![
            (
                "UPDOG_BACKUP__SOURCE__SCHEMAS".into(),
                format!("[{}]", toml_str(&self.schema)),
            ),
            (
                "UPDOG_BACKUP__SOURCE__TENANT_COLUMN".into(),
                self.tc.clone(),
            ),
            (
                "UPDOG_BACKUP__SOURCE__GLOBAL_TABLES".into(),
                format!("[{}]", global.join(", ")),
            ),
            (
                "UPDOG_BACKUP__SOURCE__EXCLUDE_TABLES".into(),
                format!("[{}]", excluded.join(", ")),
            ),
        ]
    }
}

// ---------------------------------------------------------------------------------------------
// Rows

/// A row as the generator makes it and as the oracle reads it back: its `rid`, the values of
/// its structural columns as text (`None`: NULL), and the tenant its route reaches.
#[derive(Clone, Debug)]
struct Row {
    rid: i64,
    tenant: Option<usize>,
    vals: BTreeMap<String, Option<String>>,
}

impl Row {
    fn get(&self, c: &str) -> Option<&str> {
        self.vals.get(c).and_then(|v| v.as_deref())
    }
}

type State = Vec<Vec<Row>>;

fn key_of(spec: &Spec, i: usize, row: &Row) -> Option<Vec<String>> {
    let cols = spec.key_columns(i);
    if cols.is_empty() {
        return None;
    }
    cols.iter()
        .map(|c| row.get(c).map(str::to_string))
        .collect()
}

struct Counters {
    rid: i64,
    id: i64,
}

fn payload(rng: &mut fastrand::Rng) -> String {
    const POOL: &[&str] = &[
        "plain",
        "tab\there",
        "new\nline",
        "quote'd \"both\"",
        "back\\slash",
        "ünï cödé",
        "",
        "NULL",
        "\\N",
    ];
    format!("{} {}", POOL[rng.usize(..POOL.len())], rng.u32(..1000))
}

/// A new row of table `i` for `tenant` (`None`: a row whose route reaches no tenant), its parent
/// picked in `state`; `None` when the table cannot hold such a row now.
fn new_row(
    spec: &Spec,
    state: &State,
    i: usize,
    tenant: Option<usize>,
    rng: &mut fastrand::Rng,
    ctr: &mut Counters,
    // A row of no tenant may reference a parent row of no tenant.
    under_no_tenant: bool,
) -> Option<Row> {
    ctr.rid += 1;
    let mut row = Row {
        rid: ctr.rid,
        tenant,
        vals: BTreeMap::new(),
    };
    let t = &spec.tables[i];
    let set = |row: &mut Row, cols: &[String], values: &[String]| {
        for (c, v) in cols.iter().zip(values) {
            row.vals.insert(c.clone(), Some(v.clone()));
        }
    };
    match &t.route {
        Route::Root => return None,
        Route::Direct { nullable, .. } => match tenant {
            Some(k) => {
                row.vals
                    .insert(spec.tc.clone(), Some(spec.tenants[k].clone()));
            }
            None if *nullable => {
                row.vals.insert(spec.tc.clone(), None);
            }
            None => return None,
        },
        Route::Via {
            parent,
            nullable,
            carrier,
            ..
        } => {
            let fk = spec.route_columns(i);
            let parents: Vec<Vec<String>> = state[*parent]
                .iter()
                .filter(|p| p.tenant == tenant)
                .filter_map(|p| key_of(spec, *parent, p))
                .collect();
            match tenant {
                Some(_) => {
                    if parents.is_empty() {
                        return None;
                    }
                    set(&mut row, &fk, &parents[rng.usize(..parents.len())]);
                }
                None => {
                    let parents = if under_no_tenant { parents } else { Vec::new() };
                    if carrier.is_some() || (!*nullable && parents.is_empty()) {
                        return None;
                    }
                    if !parents.is_empty() && (!*nullable || rng.bool()) {
                        // A non-NULL key to a parent that reaches no tenant itself.
                        set(&mut row, &fk, &parents[rng.usize(..parents.len())]);
                    } else if fk.len() == 2 && rng.bool() {
                        // MATCH SIMPLE: one NULL column and the key is not checked at all.
                        let n = rng.usize(..2);
                        row.vals.insert(fk[n].clone(), None);
                        let other = if fk[1 - n].ends_with("_k1") {
                            rng.u32(..3).to_string()
                        } else if fk[1 - n].ends_with("_id") {
                            rng.u32(..5).to_string()
                        } else {
                            format!("dangling{}", rng.u32(..5))
                        };
                        row.vals.insert(fk[1 - n].clone(), Some(other));
                    } else {
                        for c in &fk {
                            row.vals.insert(c.clone(), None);
                        }
                    }
                }
            }
        }
    }
    match t.key {
        Key::None | Key::Root => {}
        Key::Id => {
            ctr.id += 1;
            row.vals.insert("id".into(), Some(ctr.id.to_string()));
        }
        Key::Composite | Key::UniqueComposite | Key::IdUnique => {
            ctr.id += 1;
            if t.key == Key::IdUnique {
                row.vals.insert("id".into(), Some(ctr.id.to_string()));
            }
            row.vals.insert("k1".into(), Some(rng.u32(..3).to_string()));
            row.vals.insert("k2".into(), Some(format!("k{}", ctr.id)));
        }
        Key::TenantComposite => {
            // Ids repeat across tenants: (A, 1) and (B, 1) are different rows.
            let tv = row.get(&spec.tc).map(str::to_string);
            let next = state[i]
                .iter()
                .filter(|r| r.get(&spec.tc).map(str::to_string) == tv)
                .filter_map(|r| r.get("id").and_then(|v| v.parse::<i64>().ok()))
                .max()
                .unwrap_or(0)
                + 1;
            row.vals.insert("id".into(), Some(next.to_string()));
        }
    }
    if let (Some(k), Some(q)) = (tenant, t.extra)
        && rng.u32(..10) < 6
    {
        let targets: Vec<Vec<String>> = state[q]
            .iter()
            .filter(|r| r.tenant == Some(k))
            .filter_map(|r| key_of(spec, q, r))
            .collect();
        if !targets.is_empty() {
            set(
                &mut row,
                &spec.extra_columns(i),
                &targets[rng.usize(..targets.len())],
            );
        }
    }
    if let Some(k) = tenant
        && t.self_ref
        && rng.bool()
    {
        let targets: Vec<Vec<String>> = state[i]
            .iter()
            .filter(|r| r.tenant == Some(k))
            .filter_map(|r| key_of(spec, i, r))
            .collect();
        if !targets.is_empty() {
            set(
                &mut row,
                &spec.self_columns(i),
                &targets[rng.usize(..targets.len())],
            );
        }
    }
    row.vals.insert("payload".into(), Some(payload(rng)));
    if t.currency && rng.bool() {
        row.vals.insert(
            "currency".into(),
            Some(CURRENCIES[rng.usize(..CURRENCIES.len())].to_string()),
        );
    }
    Some(row)
}

fn insert_sql(table: &str, rows: &[&Row]) -> String {
    let mut cols: Vec<String> = Vec::new();
    for r in rows {
        for c in r.vals.keys() {
            if !cols.contains(c) {
                cols.push(c.clone());
            }
        }
    }
    let values: Vec<String> = rows
        .iter()
        .map(|r| {
            let mut v = vec![r.rid.to_string()];
            v.extend(cols.iter().map(|c| match r.get(c) {
                Some(x) => ql(x),
                None => "NULL".into(),
            }));
            format!("({})", v.join(", "))
        })
        .collect();
    format!(
        "INSERT INTO {table} (rid{}) VALUES {};\n",
        cols.iter()
            .map(|c| format!(", {}", qi(c)))
            .collect::<String>(),
        values.join(", ")
    )
}

// ---------------------------------------------------------------------------------------------
// Generation

fn uuid(rng: &mut fastrand::Rng) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        rng.u32(..),
        rng.u16(..),
        rng.u16(..),
        rng.u16(..),
        rng.u64(..) & 0xffff_ffff_ffff
    )
}

fn pick<T: Clone>(rng: &mut fastrand::Rng, items: &[T]) -> T {
    items[rng.usize(..items.len())].clone()
}

/// Whether `UPDOG_ISOLATION_KNOWN_BUGS=1`: generate the shapes of known bugs too.
fn known_bugs() -> bool {
    std::env::var("UPDOG_ISOLATION_KNOWN_BUGS").is_ok_and(|v| v == "1")
}

fn generate(seed: u64) -> (Spec, State, String) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let known_bugs = known_bugs();
    let ttype = pick(
        &mut rng,
        &[
            TenantType::Uuid,
            TenantType::Uuid,
            TenantType::Text,
            TenantType::Int,
        ],
    );
    let tc = pick(
        &mut rng,
        &["organization_id", "organization_id", "tenant_id", "Org Id"],
    )
    .to_string();
    let schema = pick(&mut rng, &["iso", "iso", "Iso Schema"]).to_string();
    let ntenants = rng.usize(2..=5);
    let mut tenants: Vec<String> = Vec::new();
    while tenants.len() < ntenants {
        let v = match ttype {
            TenantType::Uuid => uuid(&mut rng),
            // Values that differ by case, whitespace or a prefix only, and hostile ones.
            TenantType::Text => pick(
                &mut rng,
                &[
                    "acme",
                    "Acme",
                    "acme ",
                    " acme",
                    "o'brien",
                    "a%b_c",
                    "a/b",
                    "ünï cödé",
                    "x",
                    "xx",
                    "42",
                    "-dash",
                    "semi;colon",
                    "back\\slash",
                    "a.b",
                ],
            )
            .to_string(),
            TenantType::Int => pick(
                &mut rng,
                &["1", "2", "10", "11", "100", "-1", "0", "9007199254740993"],
            )
            .to_string(),
        };
        if !tenants.contains(&v) {
            tenants.push(v);
        }
    }
    let root_col = match rng.u32(..3) {
        0 => None,
        1 => Some("id".to_string()),
        _ => Some(tc.clone()),
    };
    let mut spec = Spec {
        seed,
        schema,
        tc: tc.clone(),
        ttype,
        tenants,
        root_col: root_col.clone(),
        tables: Vec::new(),
        forced_global: rng.u32(..10) < 3,
        excluded: rng.u32(..10) < 3,
        capture: rng.bool(),
        known_bugs,
    };
    if root_col.is_some() {
        spec.tables.push(TableSpec {
            name: "orgs".into(),
            route: Route::Root,
            key: Key::Root,
            extra: None,
            self_ref: false,
            partitioned: false,
            currency: false,
        });
    }
    let ntables = rng.usize(3..=8);
    while spec.tables.len() < ntables + usize::from(root_col.is_some()) {
        let i = spec.tables.len();
        let name = match rng.u32(..10) {
            0 => format!("T{i} Mixed"),
            1 => format!("t{i}\"q"),
            _ => format!("t{i}"),
        };
        let first = !spec
            .tables
            .iter()
            .any(|t| matches!(t.route, Route::Direct { .. }));
        let parents: Vec<usize> = (0..i)
            .filter(|&j| spec.tables[j].key != Key::None && spec.depth(j) < 4)
            .collect();
        let route = if first || parents.is_empty() || rng.u32(..10) < 3 {
            Route::Direct {
                nullable: !first && rng.u32(..5) == 0,
                references_root: root_col.is_some() && (first || rng.u32(..10) < 6),
            }
        } else {
            let parent = pick(&mut rng, &parents);
            let carrier = match spec.tables[parent].key {
                Key::TenantComposite => Some(if rng.bool() {
                    tc.clone()
                } else {
                    format!("p{parent}_org")
                }),
                Key::Root => Some(format!("p{parent}_org")),
                _ => None,
            };
            let nullable = carrier.is_none() && rng.u32(..4) == 0;
            // SET NULL moves captured rows to no tenant.
            let on_delete = if nullable {
                pick(&mut rng, &["CASCADE", "SET NULL", "NO ACTION"])
            } else {
                pick(&mut rng, &["CASCADE", "CASCADE", "NO ACTION"])
            };
            Route::Via {
                parent,
                nullable,
                carrier,
                on_delete,
                on_update: pick(&mut rng, &["CASCADE", "NO ACTION"]),
            }
        };
        spec.tables.push(TableSpec {
            name,
            route,
            key: Key::None,
            extra: None,
            self_ref: false,
            partitioned: false,
            currency: rng.u32(..10) < 3,
        });
        let tc_not_null =
            spec.has_tc(i) && !matches!(spec.tables[i].route, Route::Direct { nullable: true, .. });
        let mut keys = vec![
            Key::None,
            Key::Id,
            Key::Id,
            Key::Id,
            Key::Composite,
            Key::Composite,
            Key::UniqueComposite,
            Key::IdUnique,
        ];
        if tc_not_null {
            keys.extend([Key::TenantComposite, Key::TenantComposite]);
        }
        let key = pick(&mut rng, &keys);
        spec.tables[i].key = key;
        spec.tables[i].partitioned = matches!(spec.tables[i].route, Route::Direct { .. })
            && tc_not_null
            && matches!(key, Key::None | Key::TenantComposite)
            && rng.u32(..3) == 0;
        if spec.solid(i) && rng.u32(..10) < 3 {
            // A nullable key to a table keyed by the tenant value, beside a NOT NULL route.
            let targets: Vec<usize> = (0..i)
                .filter(|&j| spec.tables[j].key != Key::None)
                .collect();
            if !targets.is_empty() {
                spec.tables[i].extra = Some(pick(&mut rng, &targets));
            }
        }
        spec.tables[i].self_ref =
            key != Key::None && !spec.tables[i].partitioned && spec.solid(i) && rng.u32(..4) == 0;
    }

    // Rows, parents first.
    let mut ctr = Counters { rid: 0, id: 0 };
    let mut state: State = vec![Vec::new(); spec.tables.len()];
    let mut first_direct_done = false;
    for i in 0..spec.tables.len() {
        match spec.tables[i].route.clone() {
            Route::Root => {
                for k in 0..spec.tenants.len() {
                    ctr.rid += 1;
                    let mut vals = BTreeMap::new();
                    vals.insert(root_col.clone().unwrap(), Some(spec.tenants[k].clone()));
                    vals.insert("payload".into(), Some(payload(&mut rng)));
                    state[i].push(Row {
                        rid: ctr.rid,
                        tenant: Some(k),
                        vals,
                    });
                }
            }
            Route::Direct { nullable, .. } => {
                let mut wanted: Vec<Option<usize>> = Vec::new();
                if !first_direct_done && root_col.is_none() {
                    // Every tenant exists.
                    wanted.extend((0..spec.tenants.len()).map(Some));
                }
                first_direct_done = true;
                for _ in 0..rng.usize(0..=8) {
                    wanted.push(if nullable && rng.u32(..6) == 0 {
                        None
                    } else {
                        Some(rng.usize(..spec.tenants.len()))
                    });
                }
                for tenant in wanted {
                    if let Some(row) = new_row(&spec, &state, i, tenant, &mut rng, &mut ctr, true) {
                        state[i].push(row);
                    }
                }
            }
            Route::Via {
                parent, nullable, ..
            } => {
                for _ in 0..rng.usize(0..=10) {
                    let tenant = if nullable && rng.u32(..5) == 0 {
                        None
                    } else if state[parent].is_empty() {
                        continue;
                    } else {
                        state[parent][rng.usize(..state[parent].len())].tenant
                    };
                    if let Some(row) = new_row(&spec, &state, i, tenant, &mut rng, &mut ctr, true) {
                        state[i].push(row);
                    }
                }
            }
        }
    }

    let mut sql = spec.ddl();
    let _ = writeln!(
        sql,
        "INSERT INTO {} VALUES ('EUR', 'Euro'), ('USD', 'Dollar'), ('JPY', 'Yen'), ('CHF', 'Franc');",
        spec.qual("currencies")
    );
    for (i, rows) in state.iter().enumerate() {
        if !rows.is_empty() {
            sql.push_str(&insert_sql(
                &spec.qname(i),
                &rows.iter().collect::<Vec<_>>(),
            ));
        }
    }
    let some_rows = |rng: &mut fastrand::Rng, ctr: &mut Counters, with_null: bool| {
        (0..6)
            .map(|n| {
                ctr.rid += 1;
                let t = if with_null && n == 5 {
                    "NULL".to_string()
                } else {
                    ql(&spec.tenants[rng.usize(..spec.tenants.len())])
                };
                format!("({}, {t}, 'v{n}')", ctr.rid)
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    if spec.forced_global {
        let rows = some_rows(&mut rng, &mut ctr, false);
        let _ = writeln!(sql, "INSERT INTO {} VALUES {rows};", spec.qual("shared"));
    }
    if spec.excluded {
        let rows = some_rows(&mut rng, &mut ctr, true);
        let _ = writeln!(sql, "INSERT INTO {} VALUES {rows};", spec.qual("scratch"));
    }
    let _ = writeln!(
        sql,
        "GRANT USAGE ON SCHEMA {s} TO updog_backup;\nGRANT SELECT ON ALL TABLES IN SCHEMA {s} TO updog_backup;",
        s = qi(&spec.schema)
    );
    (spec, state, sql)
}

// ---------------------------------------------------------------------------------------------
// The oracle: each row's tenant, from the source's data and the generator's routes

async fn read_state(client: &Client, spec: &Spec) -> Result<State, String> {
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
struct Stats {
    cases: u64,
    capture_cases: u64,
    tables: u64,
    rows: u64,
    changes: u64,
    failed_changes: u64,
    restores: u64,
    rows_checked: u64,
    leaked: u64,
    lost: u64,
    differing: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
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
struct Cleanup {
    source_db: Option<String>,
    slot: Option<String>,
    recovery_dbs: Vec<String>,
    /// The changes applied so far (capture cases), for the report of a case that panics.
    log: Vec<String>,
}

impl Cleanup {
    async fn run(&self, keep_databases: bool) {
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
async fn restore_and_compare(
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

// ---------------------------------------------------------------------------------------------
// Random changes (capture cases)

/// Rows that some other row references (primary, extra or self foreign key).
fn referenced_rows(spec: &Spec, state: &State) -> BTreeSet<(usize, i64)> {
    let mut refs: BTreeSet<(usize, Vec<String>)> = BTreeSet::new();
    for (i, rows) in state.iter().enumerate() {
        let mut links: Vec<(usize, Vec<String>)> = Vec::new();
        match &spec.tables[i].route {
            Route::Via { parent, .. } => links.push((*parent, spec.route_columns(i))),
            Route::Direct {
                references_root: true,
                ..
            } => links.push((0, vec![spec.tc.clone()])),
            _ => {}
        }
        if let Some(q) = spec.tables[i].extra {
            links.push((q, spec.extra_columns(i)));
        }
        if spec.tables[i].self_ref {
            links.push((i, spec.self_columns(i)));
        }
        for row in rows {
            for (target, cols) in &links {
                let key: Option<Vec<String>> = cols
                    .iter()
                    .map(|c| row.get(c).map(str::to_string))
                    .collect();
                if let Some(key) = key {
                    // A row does not keep itself referenced.
                    if *target == i && key_of(spec, i, row).as_ref() == Some(&key) {
                        continue;
                    }
                    refs.insert((*target, key));
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    for (i, rows) in state.iter().enumerate() {
        for row in rows {
            if let Some(k) = key_of(spec, i, row)
                && refs.contains(&(i, k))
            {
                out.insert((i, row.rid));
            }
        }
    }
    out
}

fn set_clause(assignments: &[(String, Option<String>)]) -> String {
    assignments
        .iter()
        .map(|(c, v)| {
            format!(
                "{} = {}",
                qi(c),
                v.as_deref().map_or("NULL".to_string(), ql)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One random change (SQL, description), or `None` when the drawn kind has nothing to act on.
fn plan_change(
    spec: &Spec,
    state: &State,
    rng: &mut fastrand::Rng,
    ctr: &mut Counters,
) -> Option<(String, String)> {
    let nt = spec.tenants.len();
    let tenant = rng.usize(..nt);
    let i = rng.usize(..spec.tables.len());
    let table = spec.qname(i);
    let name = &spec.tables[i].name;
    let t = &spec.tables[i];
    let is_root = matches!(t.route, Route::Root);
    let mine: Vec<&Row> = state[i]
        .iter()
        .filter(|r| r.tenant == Some(tenant))
        .collect();
    let referenced = referenced_rows(spec, state);
    let leaves: Vec<&Row> = mine
        .iter()
        .copied()
        .filter(|r| !referenced.contains(&(i, r.rid)))
        .collect();
    // Unreferenced rows lose their extra and self references when they change tenant.
    let clear_refs = |a: &mut Vec<(String, Option<String>)>| {
        for c in spec.nullable_refs(i) {
            if !a.iter().any(|(x, _)| *x == c) {
                a.push((c, None));
            }
        }
    };
    match rng.u32(..107) {
        // Many rows of one tenant in one transaction: 1000, larger than
        // logical_decoding_work_mem (streamed before it commits, and now and then rolled back).
        104..=106 => {
            if is_root {
                return None;
            }
            let row = new_row(spec, state, i, Some(tenant), rng, ctr, false)?;
            let rows = 1000;
            let base = ctr.rid;
            ctr.rid += rows;
            ctr.id += rows;
            let cols: Vec<&String> = row.vals.keys().collect();
            let exprs: Vec<String> = cols
                .iter()
                .map(|c| match (c.as_str(), t.key) {
                    ("id", Key::Id | Key::TenantComposite | Key::IdUnique) => format!("{base} + g"),
                    ("k1", _) => "g % 3".into(),
                    ("k2", _) => format!("'b{base}_' || g"),
                    ("payload", _) => "repeat(md5(g::text), 4)".into(),
                    _ => row.get(c).map_or("NULL".into(), ql),
                })
                .collect();
            Some((
                format!(
                    "INSERT INTO {table} (rid{}) SELECT {base} + g, {} FROM generate_series(1, {rows}) g;",
                    cols.iter()
                        .map(|c| format!(", {}", qi(c)))
                        .collect::<String>(),
                    exprs.join(", ")
                ),
                format!("bulk insert of {rows} rows into {name} for {tenant}"),
            ))
        }
        // Global tables change for every tenant; the excluded table for none.
        100..=103 => {
            ctr.rid += 1;
            let v = ql(&spec.tenants[tenant]);
            let rid = ctr.rid;
            match rng.u32(..4) {
                0 => Some((
                    format!(
                        "INSERT INTO {} VALUES ('C{rid}', 'new');",
                        spec.qual("currencies")
                    ),
                    "insert a currency".into(),
                )),
                1 => Some((
                    format!(
                        "UPDATE {} SET name = name || '+' WHERE code = 'EUR';",
                        spec.qual("currencies")
                    ),
                    "update a currency".into(),
                )),
                2 if spec.forced_global => Some((
                    format!(
                        "INSERT INTO {s} VALUES ({rid}, {v}, 'late'); UPDATE {s} SET k = k || '+' WHERE rid = (SELECT min(rid) FROM {s});",
                        s = spec.qual("shared")
                    ),
                    "insert and update forced-global rows".into(),
                )),
                3 if spec.excluded => Some((
                    format!(
                        "INSERT INTO {} VALUES ({rid}, {v}, 'late');",
                        spec.qual("scratch")
                    ),
                    "insert into the excluded table".into(),
                )),
                _ => None,
            }
        }
        // Insert a row of the tenant (or, rarely, of none).
        0..=29 => {
            if is_root {
                return None;
            }
            let who = if rng.u32(..10) == 0 {
                None
            } else {
                Some(tenant)
            };
            let row = new_row(spec, state, i, who, rng, ctr, true)?;
            Some((
                insert_sql(&table, &[&row]),
                format!("insert rid {} into {name} for {who:?}", row.rid),
            ))
        }
        // Update a payload: small, or TOASTed (later updates leave it unchanged).
        30..=44 => {
            let row = mine.get(rng.usize(..mine.len().max(1)))?;
            let value = if rng.u32(..4) == 0 {
                format!("repeat(md5('{}'), 300)", rng.u32(..))
            } else {
                ql(&payload(rng))
            };
            Some((
                format!(
                    "UPDATE {table} SET payload = {value} WHERE rid = {};",
                    row.rid
                ),
                format!("update payload of {name} rid {}", row.rid),
            ))
        }
        // Delete a row of the tenant (cascades, SET NULL, or refused by NO ACTION).
        45..=59 => {
            if is_root {
                return None;
            }
            let row = mine.get(rng.usize(..mine.len().max(1)))?;
            Some((
                format!("DELETE FROM {table} WHERE rid = {};", row.rid),
                format!("delete {name} rid {}", row.rid),
            ))
        }
        // Move a row to another parent of the same tenant (its subtree follows).
        60..=71 => {
            let Route::Via { parent, .. } = &t.route else {
                return None;
            };
            let row = mine.get(rng.usize(..mine.len().max(1)))?;
            let fk = spec.route_columns(i);
            let current: Vec<Option<String>> =
                fk.iter().map(|c| row.get(c).map(str::to_string)).collect();
            let others: Vec<Vec<String>> = state[*parent]
                .iter()
                .filter(|p| p.tenant == Some(tenant))
                .filter_map(|p| key_of(spec, *parent, p))
                .filter(|k| k.iter().cloned().map(Some).collect::<Vec<_>>() != current)
                .collect();
            if others.is_empty() {
                return None;
            }
            let to = pick(rng, &others);
            let a: Vec<(String, Option<String>)> = fk
                .iter()
                .cloned()
                .zip(to.iter().cloned().map(Some))
                .collect();
            Some((
                format!(
                    "UPDATE {table} SET {} WHERE rid = {};",
                    set_clause(&a),
                    row.rid
                ),
                format!("move {name} rid {} to parent {to:?} (same tenant)", row.rid),
            ))
        }
        // Move an unreferenced row to another tenant, or to none, or from none to a tenant.
        72..=86 => {
            if is_root {
                return None;
            }
            let other = (tenant + 1 + rng.usize(..nt - 1)) % nt;
            // A row that others reference by key takes its children along on the source, but
            // their changes never say so (a known design gap: see the ignored test below).
            if !spec.known_bugs && spec.referenced().contains(&i) {
                return None;
            }
            // To another tenant, to no tenant, or from no tenant into one.
            let (row, to): (&Row, Option<usize>) = match rng.u32(..3) {
                0 => (*leaves.get(rng.usize(..leaves.len().max(1)))?, Some(other)),
                1 => (*leaves.get(rng.usize(..leaves.len().max(1)))?, None),
                _ => {
                    let none: Vec<&Row> = state[i]
                        .iter()
                        .filter(|r| r.tenant.is_none() && !referenced.contains(&(i, r.rid)))
                        .collect();
                    (*none.get(rng.usize(..none.len().max(1)))?, Some(other))
                }
            };
            let mut a: Vec<(String, Option<String>)> = Vec::new();
            match &t.route {
                Route::Direct { nullable, .. } => {
                    if to.is_none() && !nullable {
                        return None;
                    }
                    a.push((spec.tc.clone(), to.map(|k| spec.tenants[k].clone())));
                    if t.key == Key::TenantComposite {
                        ctr.id += 1;
                        a.push(("id".into(), Some((100_000 + ctr.id).to_string())));
                    }
                }
                Route::Via {
                    parent,
                    nullable,
                    carrier,
                    ..
                } => {
                    let fk = spec.route_columns(i);
                    match to {
                        None => {
                            if !nullable || carrier.is_some() {
                                return None;
                            }
                            a.extend(fk.iter().map(|c| (c.clone(), None)));
                        }
                        Some(k) => {
                            let parents: Vec<Vec<String>> = state[*parent]
                                .iter()
                                .filter(|p| p.tenant == Some(k))
                                .filter_map(|p| key_of(spec, *parent, p))
                                .collect();
                            if parents.is_empty() {
                                return None;
                            }
                            let p = pick(rng, &parents);
                            a.extend(fk.iter().cloned().zip(p.into_iter().map(Some)));
                            if t.key == Key::TenantComposite {
                                ctr.id += 1;
                                a.push(("id".into(), Some((100_000 + ctr.id).to_string())));
                            }
                        }
                    }
                }
                Route::Root => return None,
            }
            clear_refs(&mut a);
            Some((
                format!(
                    "UPDATE {table} SET {} WHERE rid = {};",
                    set_clause(&a),
                    row.rid
                ),
                format!(
                    "move unreferenced {name} rid {} from {:?} to {}",
                    row.rid,
                    row.tenant.map(|k| &spec.tenants[k]),
                    to.map_or("no tenant".to_string(), |k| format!(
                        "{:?}",
                        spec.tenants[k]
                    ))
                ),
            ))
        }
        // Change a key (children follow with ON UPDATE CASCADE, or the change is refused).
        87..=94 => {
            let row = mine.get(rng.usize(..mine.len().max(1)))?;
            ctr.id += 1;
            let a = match t.key {
                Key::Id | Key::TenantComposite => {
                    vec![("id".to_string(), Some((200_000 + ctr.id).to_string()))]
                }
                Key::Composite | Key::UniqueComposite | Key::IdUnique => {
                    vec![("k2".to_string(), Some(format!("r{}", ctr.id)))]
                }
                _ => return None,
            };
            Some((
                format!(
                    "UPDATE {table} SET {} WHERE rid = {};",
                    set_clause(&a),
                    row.rid
                ),
                format!("change the key of {name} rid {}", row.rid),
            ))
        }
        // Point the extra reference elsewhere (a TOASTed payload stays unchanged).
        95..=97 => {
            let q = t.extra?;
            let row = mine.get(rng.usize(..mine.len().max(1)))?;
            let targets: Vec<Vec<String>> = state[q]
                .iter()
                .filter(|r| r.tenant == Some(tenant))
                .filter_map(|r| key_of(spec, q, r))
                .collect();
            let xc = spec.extra_columns(i);
            let a: Vec<(String, Option<String>)> = if targets.is_empty() || rng.bool() {
                spec.nullable_refs(i)
                    .into_iter()
                    .filter(|c| xc.contains(c))
                    .map(|c| (c, None))
                    .collect()
            } else {
                xc.iter()
                    .cloned()
                    .zip(pick(rng, &targets).into_iter().map(Some))
                    .collect()
            };
            Some((
                format!(
                    "UPDATE {table} SET {} WHERE rid = {};",
                    set_clause(&a),
                    row.rid
                ),
                format!("repoint the extra reference of {name} rid {}", row.rid),
            ))
        }
        // TRUNCATE a table nothing references: every tenant loses its rows.
        _ => {
            if spec.referenced().contains(&i) {
                return None;
            }
            Some((format!("TRUNCATE {table};"), format!("truncate {name}")))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One case

async fn run_case(seed: u64, stats: &mut Stats, cleanup: &mut Cleanup) -> Vec<String> {
    let started = Instant::now();
    let pg = cluster().await;
    let (spec, generated, sql) = generate(seed);
    let mut failures = Vec::new();
    stats.cases += 1;
    stats.tables += spec.tables.len() as u64;
    stats.rows += generated.iter().map(Vec::len).sum::<usize>() as u64;
    let script = std::env::temp_dir().join(format!("updog-isolation-{seed}.sql"));
    std::fs::write(&script, &sql).unwrap();
    eprintln!(
        "isolation: seed {seed} (UPDOG_ISOLATION_SEED={seed}){}: {}; {} rows; SQL in {}",
        if spec.capture { " with capture" } else { "" },
        spec.describe(),
        generated.iter().map(Vec::len).sum::<usize>(),
        script.display()
    );

    let db = pg.fresh_db(&format!("iso_{:x}", seed & 0xffff_ffff)).await;
    cleanup.source_db = Some(db.clone());
    let source = pg.client(&db).await;
    source
        .batch_execute(&sql)
        .await
        .unwrap_or_else(|e| panic!("the generated schema does not load: {e:?}\n{sql}"));
    // The oracle read back equals what the generator meant.
    let state = read_state(&source, &spec).await.unwrap();
    for (i, (read, made)) in state.iter().zip(&generated).enumerate() {
        let a: Vec<(i64, Option<usize>)> = read.iter().map(|r| (r.rid, r.tenant)).collect();
        let b: Vec<(i64, Option<usize>)> = made.iter().map(|r| (r.rid, r.tenant)).collect();
        assert_eq!(a, b, "the oracle disagrees with the generator on table {i}");
    }

    let mut env = TestEnv::new(&db, Repo::Directory).await;
    env.env.extend(spec.overrides());
    cleanup.slot = env
        .env
        .iter()
        .find(|(k, _)| k == "UPDOG_BACKUP__SOURCE__SLOT")
        .map(|(_, v)| v.clone());
    if spec.capture {
        capture_env(&mut env);
        // What the DBA does for capture: the replica identities `check` asks for.
        let out = env.run(&["check", "--json"]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "check --json: {e}\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        for f in report["findings"].as_array().unwrap() {
            if let Some(fix) = f["fix"].as_str()
                && fix.contains("REPLICA IDENTITY FULL")
            {
                source
                    .batch_execute(fix)
                    .await
                    .unwrap_or_else(|e| panic!("{fix}: {e}"));
            }
        }
    }
    let init = env.run(&["init"]);
    if !init.status.success() {
        failures.push(format!(
            "init failed ({}): {}{}",
            init.status,
            String::from_utf8_lossy(&init.stdout),
            String::from_utf8_lossy(&init.stderr)
        ));
        return failures;
    }
    for k in 0..spec.tenants.len() {
        restore_and_compare(
            &spec,
            &env,
            &source,
            &state,
            k,
            None,
            "snap",
            true,
            stats,
            cleanup,
            &mut failures,
        )
        .await;
    }

    if spec.capture && failures.is_empty() {
        stats.capture_cases += 1;
        let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed_c0de);
        let mut ctr = Counters {
            rid: 1_000_000,
            id: 1_000_000,
        };
        let mut daemon = Daemon::start(&env);
        let mut state = state;
        let mut middle = None;
        // UPDOG_ISOLATION_STEPS: fewer (or more) steps, to minimise a failing seed.
        let n = env_u64("UPDOG_ISOLATION_STEPS").unwrap_or(30) as usize;
        // Half the cases: the daemon SIGKILLed and restarted (routing state from the
        // repository), and/or a snapshot taken while it captures.
        let disrupt = rng.u32(..4);
        for step in 0..n {
            if step == 15 {
                middle = Some((now(&source).await, state.clone()));
            }
            if step == 10 && disrupt & 1 == 1 {
                daemon.kill();
                cleanup
                    .log
                    .push(format!("{step}: daemon SIGKILLed and restarted"));
                daemon = Daemon::start(&env);
            }
            if step == 20 && disrupt & 2 == 2 {
                let out = env.run(&["backup"]);
                if !out.status.success() {
                    failures.push(format!(
                        "backup during capture failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
                cleanup
                    .log
                    .push(format!("{step}: backup (a snapshot while capturing)"));
            }
            let grouped = rng.u32(..4) == 0;
            let mut planned = Vec::new();
            for _ in 0..if grouped { rng.usize(2..=3) } else { 1 } {
                for _ in 0..20 {
                    if let Some(c) = plan_change(&spec, &state, &mut rng, &mut ctr) {
                        planned.push(c);
                        break;
                    }
                }
            }
            if planned.is_empty() {
                continue;
            }
            let rollback = rng.u32(..20) == 0;
            let body: String = planned.iter().map(|(s, _)| s.as_str()).collect();
            let sql = format!(
                "BEGIN;\n{body}{}",
                if rollback { "ROLLBACK;" } else { "COMMIT;" }
            );
            let what: Vec<&str> = planned.iter().map(|(_, d)| d.as_str()).collect();
            match source.batch_execute(&sql).await {
                Ok(()) if !rollback => {
                    stats.changes += planned.len() as u64;
                    cleanup.log.push(format!(
                        "{step}: {}\n      {}",
                        what.join("; "),
                        body.trim_end().replace('\n', "\n      ")
                    ));
                }
                Ok(()) => cleanup
                    .log
                    .push(format!("{step}: rolled back: {}", what.join("; "))),
                Err(e) => {
                    let _ = source.batch_execute("ROLLBACK").await;
                    stats.failed_changes += 1;
                    cleanup.log.push(format!(
                        "{step}: refused ({}): {}",
                        e.as_db_error()
                            .map_or(e.to_string(), |d| d.message().to_string()),
                        what.join("; ")
                    ));
                }
            }
            state = read_state(&source, &spec).await.unwrap_or_else(|e| {
                panic!("the oracle cannot read the source after {what:?}: {e}")
            });
        }
        let end = now(&source).await;
        tokio::task::block_in_place(|| wait_covered(&env, end, &mut daemon));
        let status = daemon.terminate();
        assert!(
            status.success(),
            "the daemon stops cleanly on SIGTERM: {status}"
        );
        let before = failures.len();
        for k in 0..spec.tenants.len() {
            restore_and_compare(
                &spec,
                &env,
                &source,
                &state,
                k,
                None,
                "capture",
                true,
                stats,
                cleanup,
                &mut failures,
            )
            .await;
        }
        if let Some((t, mid)) = &middle {
            let k = rng.usize(..spec.tenants.len());
            let at = t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            // The source's content at `t` is gone: compare rows only (content against now
            // would differ for rows changed later).
            restore_and_compare(
                &spec,
                &env,
                &source,
                mid,
                k,
                Some(&at),
                "at",
                false,
                stats,
                cleanup,
                &mut failures,
            )
            .await;
        }
        if failures.len() > before {
            failures.push(format!("changes applied:\n  {}", cleanup.log.join("\n  ")));
        }
    }
    eprintln!(
        "isolation: seed {seed}: {} in {:.1}s",
        if failures.is_empty() { "ok" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    failures
}

fn result_panicked(failures: &[String]) -> bool {
    failures.iter().any(|f| f.starts_with("panicked: "))
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        let v = v.trim();
        v.strip_prefix("0x")
            .map(|h| u64::from_str_radix(h, 16))
            .unwrap_or_else(|| v.parse())
            .unwrap_or_else(|e| panic!("{name}={v}: {e}"))
    })
}

/// The property: every restore holds exactly its tenant's rows. Cases run one after another;
/// a failing case does not stop the others, and the test fails at the end naming every seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_schemas_restore_exactly_their_tenants_rows() {
    let started = Instant::now();
    let seeds: Vec<u64> = match env_u64("UPDOG_ISOLATION_SEED") {
        Some(seed) => vec![seed],
        None => {
            let cases = env_u64("UPDOG_ISOLATION_CASES").unwrap_or(10);
            let base = fastrand::u64(..);
            (0..cases)
                .map(|k| base.wrapping_add(k.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
                .collect()
        }
    };
    let mut totals = Stats::default();
    let mut failed: Vec<(u64, String)> = Vec::new();
    for seed in &seeds {
        let mut stats = Stats::default();
        let mut cleanup = Cleanup::default();
        let result = AssertUnwindSafe(run_case(*seed, &mut stats, &mut cleanup))
            .catch_unwind()
            .await;
        let failures = match result {
            Ok(f) => f,
            Err(panic) => vec![format!(
                "panicked: {}",
                panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )],
        };
        let failures = if result_panicked(&failures) && !cleanup.log.is_empty() {
            let mut f = failures;
            f.push(format!("changes applied:\n  {}", cleanup.log.join("\n  ")));
            f
        } else {
            failures
        };
        cleanup.run(!failures.is_empty()).await;
        totals.add(&stats);
        if !failures.is_empty() {
            let (spec, _, _) = generate(*seed);
            failed.push((
                *seed,
                format!(
                    "{}\n{}\n{}",
                    spec.describe(),
                    spec.ddl(),
                    failures.join("\n")
                ),
            ));
        }
    }
    eprintln!(
        "isolation: {} case(s) ({} with capture), {} tables, {} rows, {} changes ({} refused by the source), \
         {} restores, {} rows checked, {} leaked, {} lost, {} tables with different content; {:.1}s",
        totals.cases,
        totals.capture_cases,
        totals.tables,
        totals.rows,
        totals.changes,
        totals.failed_changes,
        totals.restores,
        totals.rows_checked,
        totals.leaked,
        totals.lost,
        totals.differing,
        started.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        let mut msg = String::new();
        for (seed, f) in &failed {
            let _ = writeln!(
                msg,
                "\n=== seed {seed} (UPDOG_ISOLATION_SEED={seed}) ===\n{f}"
            );
        }
        panic!("{} of {} case(s) failed:{msg}", failed.len(), seeds.len());
    }
}

// ---------------------------------------------------------------------------------------------
// Minimised cases: hand-written schemas in schema `m`, tenant column `organization_id` (uuid).

const A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const B: &str = "bbbbbbbb-0000-4000-8000-000000000002";
const C: &str = "cccccccc-0000-4000-8000-000000000003";

/// Per table, the rids a tenant's restore must hold.
type TenantRows<'a> = &'a [(&'a str, &'a [i64])];

struct Mini {
    db: String,
    env: TestEnv,
    source: Client,
    daemon: Option<Daemon>,
}

impl Mini {
    /// A fresh database holding `sql` (`$A`, `$B`, `$C` are tenants), readable by the backup
    /// role, and a config for schema `m`; `publication`: the owner's statement (default
    /// `FOR ALL TABLES`).
    async fn new(sql: &str, publication: Option<&str>) -> Mini {
        let pg = cluster().await;
        let db = pg.fresh_db("iso_mini").await;
        let source = pg.client(&db).await;
        let sql = sql.replace("$A", A).replace("$B", B).replace("$C", C);
        source
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{e:?}\n{sql}"));
        source
            .batch_execute(
                "GRANT USAGE ON SCHEMA m TO updog_backup; GRANT SELECT ON ALL TABLES IN SCHEMA m TO updog_backup;",
            )
            .await
            .unwrap();
        if let Some(p) = publication {
            source.batch_execute(p).await.unwrap();
        }
        let mut env = TestEnv::new(&db, Repo::Directory).await;
        env.env.extend([
            (
                "UPDOG_BACKUP__SOURCE__SCHEMAS".to_string(),
                r#"["m"]"#.to_string(),
            ),
            (
                "UPDOG_BACKUP__SOURCE__GLOBAL_TABLES".to_string(),
                "[]".to_string(),
            ),
        ]);
        capture_env(&mut env);
        Mini {
            db,
            env,
            source,
            daemon: None,
        }
    }

    /// The replica identities `check` asks for (as the DBA would), `init`, and the daemon.
    async fn capture(&mut self) {
        self.fix_replica_identities().await;
        self.env.ok(&["init"]);
        self.daemon = Some(Daemon::start(&self.env));
    }

    async fn fix_replica_identities(&self) {
        let out = self.env.run(&["check", "--json"]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for f in report["findings"].as_array().unwrap() {
            if let Some(fix) = f["fix"].as_str()
                && fix.contains("REPLICA IDENTITY FULL")
            {
                self.source.batch_execute(fix).await.unwrap();
            }
        }
    }

    async fn change(&self, sql: &str) {
        let sql = sql.replace("$A", A).replace("$B", B).replace("$C", C);
        self.source
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{e:?}\n{sql}"));
    }

    /// Waits until the daemon stored everything committed so far.
    async fn covered(&mut self) {
        let t = now(&self.source).await;
        let (env, daemon) = (&self.env, self.daemon.as_mut().unwrap());
        tokio::task::block_in_place(|| wait_covered(env, t, daemon));
    }

    /// `restore --org tenant --latest`, then the rids of each table in the recovery database
    /// (or the restore's error).
    async fn restored(
        &self,
        tenant: &str,
        tables: &[&str],
    ) -> Result<Vec<(String, Vec<i64>)>, String> {
        let target = format!("{}_r{}", self.db, fastrand::u32(..));
        let out = self.env.run(&[
            "restore",
            &format!("--org={tenant}"),
            "--latest",
            "--target-db",
            &target,
        ]);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let recovered = cluster().await.client(&target).await;
        let mut found = Vec::new();
        for t in tables {
            let rows = recovered
                .query(&format!("SELECT rid FROM m.{t} ORDER BY rid"), &[])
                .await
                .unwrap();
            found.push((t.to_string(), rows.iter().map(|r| r.get(0)).collect()));
        }
        Ok(found)
    }

    /// Every restore of `expected` (tenant → per table, its rids) holds exactly those rows.
    async fn assert_restores(&self, expected: &[(&str, TenantRows<'_>)]) {
        let mut wrong = Vec::new();
        for (tenant, tables) in expected {
            let names: Vec<&str> = tables.iter().map(|(t, _)| *t).collect();
            let want: Vec<(String, Vec<i64>)> = tables
                .iter()
                .map(|(t, r)| (t.to_string(), r.to_vec()))
                .collect();
            match self.restored(tenant, &names).await {
                Ok(got) if got == want => {}
                Ok(got) => wrong.push(format!(
                    "tenant {tenant}: restored {got:?}, expected {want:?}"
                )),
                Err(e) => wrong.push(format!("tenant {tenant}: restore failed: {e}")),
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}

/// Exactly one table carries the tenant column: each tenant is exported once. The tenants
/// query used to be a single SELECT without UNION (nor DISTINCT) then, listing a tenant once
/// per row, and init failed exporting its archive twice: "object snapshots/…/tenants/<A>.zst.age
/// already exists".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_table_carrying_the_tenant_column() {
    let m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.funds (rid bigint, id bigint PRIMARY KEY, organization_id uuid NOT NULL);
         CREATE TABLE m.investments (rid bigint, fund_id bigint NOT NULL REFERENCES m.funds);
         INSERT INTO m.funds VALUES (1, 1, '$A'), (2, 2, '$A'), (3, 3, '$B');
         INSERT INTO m.investments VALUES (4, 1), (5, 3);",
        None,
    )
    .await;
    m.env.ok(&["init"]);
    m.assert_restores(&[
        (A, &[("funds", &[1, 2]), ("investments", &[4])]),
        (B, &[("funds", &[3]), ("investments", &[5])]),
    ])
    .await;
}

/// A nullable foreign key onto the tenants' key (`shared_with → orgs(id)`) does not override
/// the table's NOT NULL route (`fund_id → funds.organization_id`) — README: "through NOT NULL
/// keys first … a nullable route is taken only when there is no other". It used to: a document
/// with `shared_with` NULL was in no restore, one shared with B was restored into B, not A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nullable_key_to_the_tenants_does_not_override_a_not_null_route() {
    let m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.orgs (rid bigint, id uuid PRIMARY KEY);
         CREATE TABLE m.funds (rid bigint, id bigint PRIMARY KEY, organization_id uuid NOT NULL REFERENCES m.orgs);
         CREATE TABLE m.documents (rid bigint, fund_id bigint NOT NULL REFERENCES m.funds,
                                   shared_with uuid REFERENCES m.orgs);
         INSERT INTO m.orgs VALUES (1, '$A'), (2, '$B');
         INSERT INTO m.funds VALUES (3, 1, '$A'), (4, 2, '$B');
         INSERT INTO m.documents VALUES (10, 1, NULL), (11, 1, '$A'), (12, 1, '$B'), (13, 2, NULL);",
        None,
    )
    .await;
    m.env.ok(&["init"]);
    let check = m.env.run(&["check"]);
    eprintln!("{}", String::from_utf8_lossy(&check.stdout));
    m.assert_restores(&[
        (A, &[("funds", &[3]), ("documents", &[10, 11, 12])]),
        (B, &[("funds", &[4]), ("documents", &[13])]),
    ])
    .await;
}

/// A partitioned tenant table in the publication the tests (and README's DBA) create, `FOR ALL
/// TABLES`: pg_publication_tables lists its partitions, not the partitioned table, and init
/// accepts them as covering it (capture maps their changes to it). It used to refuse ("publication
/// lacks m.events") with `ALTER PUBLICATION … ADD TABLE m.events`, which PostgreSQL rejects for
/// a FOR ALL TABLES publication (and which would not change pg_publication_tables for a FOR
/// TABLE one either).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_table_in_the_default_publication() {
    let m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.orgs (rid bigint, id uuid PRIMARY KEY);
         CREATE TABLE m.events (rid bigint, organization_id uuid NOT NULL REFERENCES m.orgs, note text)
           PARTITION BY HASH (organization_id);
         CREATE TABLE m.events_p0 PARTITION OF m.events FOR VALUES WITH (MODULUS 2, REMAINDER 0);
         CREATE TABLE m.events_p1 PARTITION OF m.events FOR VALUES WITH (MODULUS 2, REMAINDER 1);
         INSERT INTO m.orgs VALUES (1, '$A'), (2, '$B');
         INSERT INTO m.events VALUES (3, '$A', 'a'), (4, '$B', 'b'), (5, '$A', 'c');",
        None,
    )
    .await;
    m.env.ok(&["init"]);
    m.assert_restores(&[(A, &[("events", &[3, 5])]), (B, &[("events", &[4])])])
        .await;
}

/// A partitioned tenant table published through its root (`publish_via_partition_root =
/// true`): PostgreSQL 15's pgoutput sends a Relation message for the partition as well as for
/// the root before the first change (the change itself names the root); the router knows the
/// partition as its table's. It used to reject it — "table m.events_p0 appeared in the change
/// stream but is not in the catalog loaded at start: restart the daemon to load it" — retrying
/// forever: nothing more was captured, for any tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_table_captured_through_its_root() {
    let mut m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.orgs (rid bigint, id uuid PRIMARY KEY);
         CREATE TABLE m.events (rid bigint, organization_id uuid NOT NULL REFERENCES m.orgs, id bigint,
                                note text, PRIMARY KEY (organization_id, id))
           PARTITION BY HASH (organization_id);
         CREATE TABLE m.events_p0 PARTITION OF m.events FOR VALUES WITH (MODULUS 2, REMAINDER 0);
         CREATE TABLE m.events_p1 PARTITION OF m.events FOR VALUES WITH (MODULUS 2, REMAINDER 1);
         INSERT INTO m.orgs VALUES (1, '$A'), (2, '$B');
         INSERT INTO m.events VALUES (3, '$A', 1, 'a'), (4, '$B', 1, 'b'), (5, '$A', 2, 'c');",
        Some("CREATE PUBLICATION updog_backup FOR ALL TABLES WITH (publish_via_partition_root = true)"),
    )
    .await;
    m.capture().await;
    m.change(
        "INSERT INTO m.events VALUES (6, '$B', 2, 'd'), (7, '$A', 3, 'e');
         UPDATE m.events SET note = 'a2' WHERE rid = 3;
         UPDATE m.events SET organization_id = '$B', id = 3 WHERE rid = 5;
         DELETE FROM m.events WHERE rid = 7;",
    )
    .await;
    m.covered().await;
    m.assert_restores(&[(A, &[("events", &[3])]), (B, &[("events", &[4, 5, 6])])])
        .await;
}

/// An UPDATE that takes a row out of every tenant (its tenant column, or its only route, set to
/// NULL) is a DELETE for the old tenant: its restore no longer has the row, which belongs to no
/// tenant any more (the snapshot leaves such rows out). It used to be routed to the old tenant
/// as an UPDATE, which kept the row (with the NULL). The same goes for the child of a parent
/// deleted with ON DELETE SET NULL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_moved_to_no_tenant_leaves_its_tenants_restore() {
    let mut m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.orgs (rid bigint, id uuid PRIMARY KEY);
         CREATE TABLE m.items (rid bigint, id bigint PRIMARY KEY, organization_id uuid REFERENCES m.orgs);
         INSERT INTO m.orgs VALUES (1, '$A'), (2, '$B');
         INSERT INTO m.items VALUES (3, 1, '$A'), (4, 2, '$A'), (5, 3, '$B');",
        None,
    )
    .await;
    m.capture().await; // check asks for REPLICA IDENTITY FULL on m.items
    m.change("UPDATE m.items SET organization_id = NULL WHERE id = 1")
        .await;
    m.covered().await;
    m.assert_restores(&[
        (A, &[("orgs", &[1]), ("items", &[4])]),
        (B, &[("orgs", &[2]), ("items", &[5])]),
    ])
    .await;
}

/// An UPDATE that gives a row of no tenant a tenant is an INSERT for that tenant. It used to be
/// routed as an UPDATE of a row that tenant's restore never had, which then failed ("an update
/// of the row with … matched no row in the recovery database") for every point in time after
/// the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_moved_from_no_tenant_is_restored() {
    let mut m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.orgs (rid bigint, id uuid PRIMARY KEY);
         CREATE TABLE m.items (rid bigint, id bigint PRIMARY KEY, organization_id uuid REFERENCES m.orgs);
         INSERT INTO m.orgs VALUES (1, '$A'), (2, '$B');
         INSERT INTO m.items VALUES (3, 1, NULL), (4, 2, '$A'), (5, 3, '$B');",
        None,
    )
    .await;
    m.capture().await;
    m.change("UPDATE m.items SET organization_id = '$A' WHERE id = 1")
        .await;
    m.covered().await;
    m.assert_restores(&[
        (A, &[("orgs", &[1]), ("items", &[3, 4])]),
        (B, &[("orgs", &[2]), ("items", &[5])]),
    ])
    .await;
}

/// A row moved to another tenant in a table that other tables route through by key (`funds`,
/// referenced by `investments.fund_id`). `check` asks for no replica identity there (its key
/// routes a DELETE), so an UPDATE of `organization_id` carries no old tuple: the router finds the
/// old tenant in its key map. It used to send the change to the new tenant only: the old
/// tenant's restore kept the fund (a LEAK of B's row into A), and B's failed on an update of a
/// row it never had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_moved_to_another_tenant_in_a_table_routed_through_by_key() {
    let mut m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.orgs (rid bigint, id uuid PRIMARY KEY);
         CREATE TABLE m.funds (rid bigint, id bigint PRIMARY KEY, organization_id uuid NOT NULL REFERENCES m.orgs);
         CREATE TABLE m.investments (rid bigint, id bigint PRIMARY KEY, fund_id bigint NOT NULL REFERENCES m.funds);
         INSERT INTO m.orgs VALUES (1, '$A'), (2, '$B');
         INSERT INTO m.funds VALUES (3, 1, '$A'), (4, 2, '$A'), (5, 3, '$B');
         INSERT INTO m.investments VALUES (6, 1, 1);",
        None,
    )
    .await;
    m.capture().await;
    // Fund 2 has no investments: only the fund itself changes tenant.
    m.change("UPDATE m.funds SET organization_id = '$B' WHERE id = 2")
        .await;
    m.covered().await;
    m.assert_restores(&[
        (A, &[("funds", &[3]), ("investments", &[6])]),
        (B, &[("funds", &[4, 5]), ("investments", &[])]),
    ])
    .await;
}

/// BUG (design): a parent moved to another tenant leaves its children (reached through it by
/// foreign key, unchanged themselves, so absent from the change stream) in the old tenant:
/// A's restore keeps B's investment, B's restore lacks it. Same with a parent whose route
/// becomes NULL: its subtree stays in the old tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "BUG: a parent moved to another tenant leaves its children in the old tenant's restore"]
async fn a_parent_moved_to_another_tenant_takes_its_children() {
    let mut m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.orgs (rid bigint, id uuid PRIMARY KEY);
         CREATE TABLE m.funds (rid bigint, id bigint PRIMARY KEY, organization_id uuid NOT NULL REFERENCES m.orgs);
         CREATE TABLE m.investments (rid bigint, id bigint PRIMARY KEY, fund_id bigint NOT NULL REFERENCES m.funds);
         ALTER TABLE m.funds REPLICA IDENTITY FULL;
         INSERT INTO m.orgs VALUES (1, '$A'), (2, '$B');
         INSERT INTO m.funds VALUES (3, 1, '$A'), (4, 2, '$A'), (5, 3, '$B');
         INSERT INTO m.investments VALUES (6, 1, 1), (7, 2, 2);",
        None,
    )
    .await;
    m.capture().await;
    m.change("UPDATE m.funds SET organization_id = '$B' WHERE id = 1")
        .await;
    m.covered().await;
    m.assert_restores(&[
        (A, &[("funds", &[4]), ("investments", &[7])]),
        (B, &[("funds", &[3, 5]), ("investments", &[6])]),
    ])
    .await;
}

/// A row whose parent belongs to no tenant (`funds.organization_id` NULL) is a row of no tenant
/// too: the router's key maps hold the keys of rows of no tenant, so capture skips it. They used
/// to hold none, so inserting a child of such a parent stopped the daemon ("cannot route a
/// INSERT on m.investments: no row of m.funds with key (2) is known") at every restart: nothing
/// more was captured, for any tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_of_a_row_of_no_tenant_does_not_stop_capture() {
    let mut m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.orgs (rid bigint, id uuid PRIMARY KEY);
         CREATE TABLE m.funds (rid bigint, id bigint PRIMARY KEY, organization_id uuid REFERENCES m.orgs);
         CREATE TABLE m.investments (rid bigint, id bigint PRIMARY KEY, fund_id bigint NOT NULL REFERENCES m.funds);
         INSERT INTO m.orgs VALUES (1, '$A'), (2, '$B');
         INSERT INTO m.funds VALUES (3, 1, '$A'), (4, 2, NULL), (5, 3, '$B');",
        None,
    )
    .await;
    m.capture().await;
    m.change("INSERT INTO m.investments VALUES (6, 1, 2)").await;
    m.change("INSERT INTO m.investments VALUES (7, 2, 1)").await;
    m.covered().await;
    m.assert_restores(&[
        (A, &[("funds", &[3]), ("investments", &[7])]),
        (B, &[("funds", &[5]), ("investments", &[])]),
    ])
    .await;
}

/// A tenant that first appears after the last snapshot: its rows are captured (routed to it),
/// and the snapshot (of all tenants) shows it had no rows then, so its restore is well
/// defined: empty at the snapshot, then its changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_created_after_the_snapshot_is_restorable() {
    let mut m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.orgs (rid bigint, id uuid PRIMARY KEY);
         CREATE TABLE m.funds (rid bigint, id bigint PRIMARY KEY, organization_id uuid NOT NULL REFERENCES m.orgs);
         INSERT INTO m.orgs VALUES (1, '$A'), (2, '$B');
         INSERT INTO m.funds VALUES (3, 1, '$A'), (4, 2, '$B');",
        None,
    )
    .await;
    m.capture().await;
    m.change("INSERT INTO m.orgs VALUES (5, '$C'); INSERT INTO m.funds VALUES (6, 3, '$C');")
        .await;
    m.covered().await;
    m.assert_restores(&[
        (C, &[("orgs", &[5]), ("funds", &[6])]),
        (A, &[("orgs", &[1]), ("funds", &[3])]),
    ])
    .await;
}

/// `check` reports a global table without a primary key as it does a tenant table ("once
/// published, its UPDATEs and DELETEs fail on the source"): the publication covers it too. It
/// used to say nothing, and after `init` the application's UPDATE of `m.currencies` failed
/// ("cannot update table … because it does not have a replica identity and publishes updates").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_global_table_without_a_replica_identity() {
    let m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.currencies (code text, name text);
         CREATE TABLE m.orgs (rid bigint, id uuid PRIMARY KEY);
         CREATE TABLE m.funds (rid bigint, id bigint PRIMARY KEY, organization_id uuid NOT NULL REFERENCES m.orgs);
         INSERT INTO m.currencies VALUES ('EUR', 'Euro');
         INSERT INTO m.orgs VALUES (1, '$A');
         INSERT INTO m.funds VALUES (2, 1, '$A');",
        None,
    )
    .await;
    let mut env_global = m.env.env.clone();
    for (k, v) in &mut env_global {
        if k == "UPDOG_BACKUP__SOURCE__GLOBAL_TABLES" {
            *v = r#"["m.currencies"]"#.into();
        }
    }
    let mut cmd = m.env.command(&["check", "--json"]);
    cmd.envs(env_global.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let out = cmd.output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let findings: Vec<&serde_json::Value> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["subject"] == "m.currencies")
        .collect();
    let update = m
        .source
        .batch_execute("UPDATE m.currencies SET name = 'euro' WHERE code = 'EUR'")
        .await;
    assert!(
        !findings.is_empty(),
        "check says nothing about m.currencies; meanwhile the application's UPDATE: {update:?}"
    );
}

/// A table changed once since the daemon started, then a transaction larger than
/// `logical_decoding_work_mem` (streamed while it runs) on it that is rolled back: its Relation
/// message arrives again inside the streamed block, with an xid. It must be kept without it
/// (the abort discards the spool, and the next change of that table outside any stream uses
/// the same Relation), so capture goes on and both tenants restore exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_streamed_transaction_does_not_stop_capture() {
    let mut m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.orgs (rid bigint, id uuid PRIMARY KEY);
         CREATE TABLE m.events (rid bigint PRIMARY KEY, organization_id uuid NOT NULL REFERENCES m.orgs, note text);
         INSERT INTO m.orgs VALUES (1, '$A'), (2, '$B');
         INSERT INTO m.events VALUES (3, '$A', 'a'), (4, '$B', 'b');",
        None,
    )
    .await;
    m.capture().await;
    // The stream carries m.events' Relation once, outside any streamed transaction.
    m.change("INSERT INTO m.events VALUES (5, '$A', 'before')")
        .await;
    // The daemon streams live from here on.
    m.covered().await;
    // Far more than logical_decoding_work_mem (64kB on the test cluster), then rolled back:
    // pgoutput sends the Relation again inside the streamed block.
    m.change(
        "BEGIN;
         INSERT INTO m.events SELECT 10 + g, '$A', repeat(md5(g::text), 4) FROM generate_series(1, 10000) g;
         ROLLBACK;",
    )
    .await;
    m.change("INSERT INTO m.events VALUES (6, '$A', 'after')")
        .await;
    m.covered().await;
    m.assert_restores(&[(A, &[("events", &[3, 5, 6])]), (B, &[("events", &[4])])])
        .await;
}

/// A small transaction on a table commits while a large one on the same table is being
/// streamed: its change is stored with the Relation the stream sent (without the stream's
/// xid), and both transactions restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_committing_during_a_streamed_one_does_not_stop_capture() {
    let mut m = Mini::new(
        "CREATE SCHEMA m;
         CREATE TABLE m.orgs (rid bigint, id uuid PRIMARY KEY);
         CREATE TABLE m.events (rid bigint PRIMARY KEY, organization_id uuid NOT NULL REFERENCES m.orgs, note text);
         INSERT INTO m.orgs VALUES (1, '$A'), (2, '$B');
         INSERT INTO m.events VALUES (3, '$A', 'a'), (4, '$B', 'b');",
        None,
    )
    .await;
    m.capture().await;
    m.change("INSERT INTO m.events VALUES (5, '$A', 'before')")
        .await;
    // The daemon streams live from here on.
    m.covered().await;
    let large = cluster().await.client(&m.db).await;
    large
        .batch_execute(&format!(
            "BEGIN; INSERT INTO m.events SELECT 10 + g, '{A}', repeat(md5(g::text), 4) FROM generate_series(1, 10000) g"
        ))
        .await
        .unwrap();
    // Streamed while open (logical_decoding_work_mem is 64kB on the test cluster).
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    m.change("INSERT INTO m.events VALUES (6, '$B', 'during')")
        .await;
    large.batch_execute("COMMIT").await.unwrap();
    m.covered().await;
    let all_a: Vec<i64> = [3, 5].into_iter().chain(11..=10010).collect();
    m.assert_restores(&[(A, &[("events", &all_a)]), (B, &[("events", &[4, 6])])])
        .await;
}
