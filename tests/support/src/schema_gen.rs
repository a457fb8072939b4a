//! The random schema generator of the isolation property test (tests/e2e/isolation.rs): from one
//! seed, a schema (a tenant root or none, a forest of tables routed to the tenant by its column or
//! by foreign keys) with random rows for a few tenants, and the SQL that builds it. (~1,080
//! lines: one generator whose parts — tables, keys, rows, SQL — are drawn from one seed together.)

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

// ---------------------------------------------------------------------------------------------
// The generated schema

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TenantType {
    Uuid,
    Text,
    Int,
}

impl TenantType {
    pub fn sql(self) -> &'static str {
        match self {
            TenantType::Uuid => "uuid",
            TenantType::Text => "text",
            TenantType::Int => "bigint",
        }
    }
}

/// What other tables reference a table by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
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
pub enum Route {
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
pub struct TableSpec {
    pub name: String,
    pub route: Route,
    pub key: Key,
    /// A nullable foreign key to another table's key, never a route the design would prefer.
    pub extra: Option<usize>,
    /// A nullable foreign key to the table's own key (a tree), never a route.
    pub self_ref: bool,
    /// `PARTITION BY HASH (<tenant column>)`, two partitions.
    pub partitioned: bool,
    /// `currency text REFERENCES currencies`.
    pub currency: bool,
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub seed: u64,
    pub schema: String,
    pub tc: String,
    pub ttype: TenantType,
    /// Tenant values as PostgreSQL prints them (`::text`).
    pub tenants: Vec<String>,
    /// The root's key column (`id` or the tenant column), when there is a root (table 0).
    pub root_col: Option<String>,
    pub tables: Vec<TableSpec>,
    /// `shared`: has the tenant column, listed in `global_tables`.
    pub forced_global: bool,
    /// `scratch`: has the tenant column, listed in `exclude_tables`.
    pub excluded: bool,
    pub capture: bool,
}

pub const CURRENCIES: &[&str] = &["EUR", "USD", "JPY", "CHF"];

pub fn qi(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub fn ql(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

pub fn toml_str(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

impl Spec {
    pub fn qname(&self, i: usize) -> String {
        format!("{}.{}", qi(&self.schema), qi(&self.tables[i].name))
    }

    pub fn qual(&self, name: &str) -> String {
        format!("{}.{}", qi(&self.schema), qi(name))
    }

    pub fn has_tc(&self, i: usize) -> bool {
        match &self.tables[i].route {
            Route::Root => self.root_col.as_deref() == Some(self.tc.as_str()),
            Route::Direct { .. } => true,
            Route::Via { carrier, .. } => carrier.as_deref() == Some(self.tc.as_str()),
        }
    }

    /// Every link up to the tenant is NOT NULL.
    pub fn solid(&self, i: usize) -> bool {
        match &self.tables[i].route {
            Route::Root | Route::Direct { .. } => true,
            Route::Via {
                parent, nullable, ..
            } => !nullable && self.solid(*parent),
        }
    }

    pub fn depth(&self, i: usize) -> usize {
        match &self.tables[i].route {
            Route::Via { parent, .. } => 1 + self.depth(*parent),
            _ => 0,
        }
    }

    pub fn key_columns(&self, i: usize) -> Vec<String> {
        match self.tables[i].key {
            Key::None => vec![],
            Key::Id => vec!["id".into()],
            Key::Composite | Key::UniqueComposite | Key::IdUnique => vec!["k1".into(), "k2".into()],
            Key::TenantComposite => vec![self.tc.clone(), "id".into()],
            Key::Root => vec![self.root_col.clone().unwrap()],
        }
    }

    pub fn key_types(&self, i: usize) -> Vec<&'static str> {
        match self.tables[i].key {
            Key::None => vec![],
            Key::Id => vec!["bigint"],
            Key::Composite | Key::UniqueComposite | Key::IdUnique => vec!["int", "text"],
            Key::TenantComposite => vec![self.ttype.sql(), "bigint"],
            Key::Root => vec![self.ttype.sql()],
        }
    }

    /// Columns of table `i` referencing table `target`'s key, named with `prefix`.
    pub fn ref_columns(
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
    pub fn route_columns(&self, i: usize) -> Vec<String> {
        match &self.tables[i].route {
            Route::Root => vec![self.root_col.clone().unwrap()],
            Route::Direct { .. } => vec![self.tc.clone()],
            Route::Via {
                parent, carrier, ..
            } => self.ref_columns(i, *parent, "p", carrier.as_deref()),
        }
    }

    pub fn extra_columns(&self, i: usize) -> Vec<String> {
        match self.tables[i].extra {
            Some(q) => self.ref_columns(i, q, "x", None),
            None => vec![],
        }
    }

    pub fn self_columns(&self, i: usize) -> Vec<String> {
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
    pub fn struct_columns(&self, i: usize) -> Vec<String> {
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
    pub fn nullable_refs(&self, i: usize) -> Vec<String> {
        self.extra_columns(i)
            .into_iter()
            .chain(self.self_columns(i))
            .filter(|c| *c != self.tc || !self.has_tc(i))
            .collect()
    }

    /// Tables that other tables reference (by any foreign key, self references aside).
    pub fn referenced(&self) -> BTreeSet<usize> {
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

    pub fn tenant_index(&self, value: &str) -> Result<usize, String> {
        self.tenants
            .iter()
            .position(|t| t == value)
            .ok_or_else(|| format!("value {value:?} is not one of the generated tenants"))
    }

    pub fn describe(&self) -> String {
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

    pub fn create_table(&self, i: usize) -> String {
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

    pub fn ddl(&self) -> String {
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
    pub fn overrides(&self) -> Vec<(String, String)> {
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
pub struct Row {
    pub rid: i64,
    pub tenant: Option<usize>,
    pub vals: BTreeMap<String, Option<String>>,
}

impl Row {
    pub fn get(&self, c: &str) -> Option<&str> {
        self.vals.get(c).and_then(|v| v.as_deref())
    }
}

pub type State = Vec<Vec<Row>>;

pub fn key_of(spec: &Spec, i: usize, row: &Row) -> Option<Vec<String>> {
    let cols = spec.key_columns(i);
    if cols.is_empty() {
        return None;
    }
    cols.iter()
        .map(|c| row.get(c).map(str::to_string))
        .collect()
}

pub struct Counters {
    pub rid: i64,
    pub id: i64,
}

pub fn payload(rng: &mut fastrand::Rng) -> String {
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
pub fn new_row(
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

pub fn insert_sql(table: &str, rows: &[&Row]) -> String {
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

pub fn uuid(rng: &mut fastrand::Rng) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        rng.u32(..),
        rng.u16(..),
        rng.u16(..),
        rng.u16(..),
        rng.u64(..) & 0xffff_ffff_ffff
    )
}

pub fn pick<T: Clone>(rng: &mut fastrand::Rng, items: &[T]) -> T {
    items[rng.usize(..items.len())].clone()
}

pub fn generate(seed: u64) -> (Spec, State, String) {
    let mut rng = fastrand::Rng::with_seed(seed);
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
