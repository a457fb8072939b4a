//! Catalog: every table in the configured schemas, and how its rows reach their tenant.
//!
//! A table is *tenant* when it has the tenant column, when it is the table that column
//! refers to (the tenants' own table, e.g. `organizations.id`), or when a chain of foreign
//! keys leads to such a table; *global* or *excluded* only when configured so. A table with
//! no route is an error, never skipped: silently leaving rows out of a backup is the one
//! thing a backup tool must not do. This module reads the catalog; it never changes it.

use std::collections::{BTreeMap, BTreeSet};

use tokio_postgres::Client;

use crate::config::SourceConfig;
use crate::pg::{qualified, quote_ident, quote_literal};
use crate::repository::copy_binary::CopyFormat;
use crate::repository::manifest::{Scope, TableEntry};
use crate::retry::{Classify, ErrorClass};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("reading the catalog: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("{key} names {table}, which is not a table in schemas {schemas:?}")]
    UnknownConfiguredTable {
        key: &'static str,
        table: String,
        schemas: Vec<String>,
    },
    #[error(
        "{key} names {table}, a partition of {parent}: name {parent} instead (a partitioned table's rows are backed up, and configured, as one table)"
    )]
    ConfiguredPartition {
        key: &'static str,
        table: String,
        parent: String,
    },
    #[error(
        "no table in schemas {schemas:?} has the tenant column {column:?}: check source.schemas and source.tenant_column"
    )]
    NoTenantTables {
        schemas: Vec<String>,
        column: String,
    },
    #[error("{} table(s) have no route to tenant column {column:?}: {}. Add each to source.global_tables (reference data restored with every tenant) or source.exclude_tables (not backed up); `updog-backup check` shows every route", tables.len(), tables.join(", "))]
    Unroutable { column: String, tables: Vec<String> },
}

#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    /// `format_type()` of the column, e.g. `uuid`, `numeric(20,4)`.
    pub type_name: String,
    pub not_null: bool,
    /// Its binary COPY form embeds a database-specific type OID (arrays of user-defined
    /// types, composites), so the table travels in text format.
    pub text_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// The primary key's columns (empty: the table has none).
    Default(Vec<String>),
    Full,
    Index(Vec<String>),
    Nothing,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The table's own column holds the tenant value.
    Direct { column: String },
    /// Through a foreign key `columns` → `parent(parent_columns)`.
    Via {
        columns: Vec<String>,
        parent: usize,
        parent_columns: Vec<String>,
        nullable: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableScope {
    Tenant(Route),
    Global,
    Excluded,
    Unroutable,
}

#[derive(Debug, Clone)]
pub struct Table {
    pub schema: String,
    pub name: String,
    /// Columns as exported (generated columns left out: the target recomputes them).
    pub columns: Vec<Column>,
    pub replica_identity: ReplicaIdentity,
    pub row_security: bool,
    pub can_select: bool,
    /// UNLOGGED: its changes are not written to WAL, so no publication can carry them.
    pub unlogged: bool,
    /// A partitioned table: its leaf partitions, which hold its rows. The table is backed up
    /// as one (its snapshot reads them through it), but their replica identities are what
    /// the source checks, and a publication without `publish_via_partition_root` names them
    /// instead of it. `None`: an ordinary table.
    pub partitions: Option<Vec<Partition>>,
    pub scope: TableScope,
    pub oid: u32,
    /// Every column's number (generated ones included): a schema change in the stream names
    /// columns by number, which is how a restore tells a rename from a drop and an add.
    pub attnums: BTreeMap<String, i16>,
}

/// A leaf partition of a partitioned table (in any schema).
#[derive(Debug, Clone)]
pub struct Partition {
    pub schema: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
}

impl Partition {
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// `"schema"."name"`, safe to splice into SQL.
    pub fn sql_name(&self) -> String {
        qualified(&self.schema, &self.name)
    }
}

impl Table {
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// `"schema"."name"`, safe to splice into SQL.
    pub fn sql_name(&self) -> String {
        qualified(&self.schema, &self.name)
    }

    pub fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn copy_format(&self) -> CopyFormat {
        if self.columns.iter().any(|c| c.text_only) {
            CopyFormat::Text
        } else {
            CopyFormat::Binary
        }
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// A table joined along its route: see [`Catalog::route_joins`].
struct RouteJoins {
    joins: String,
    /// The tenant column, e.g. `r2."organization_id"`.
    tenant: String,
    /// Per hop: "the child's foreign key is complete" and "its parent row was found".
    hops: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct Catalog {
    pub tenant_column: String,
    pub tables: Vec<Table>,
}

#[derive(Debug)]
struct ForeignKey {
    name: String,
    child: usize,
    parent: usize,
    columns: Vec<String>,
    parent_columns: Vec<String>,
}

impl Catalog {
    /// Loads and classifies, keeping unroutable tables (marked so) for `check` to report.
    pub async fn load_with_unroutable(
        client: &Client,
        config: &SourceConfig,
    ) -> Result<(Self, Option<CatalogError>), CatalogError> {
        // Partitions are not tables of their own here: their rows are their partitioned
        // table's, which the snapshot reads (and the restore writes) as one.
        let rows = client
            .query(
                "SELECT c.oid, n.nspname, c.relname, c.relrowsecurity,
                        has_table_privilege(c.oid, 'SELECT'), c.relpersistence = 'u',
                        c.relkind = 'p'
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = ANY($1) AND c.relkind IN ('r', 'p') AND NOT c.relispartition
                  ORDER BY n.nspname, c.relname",
                &[&config.schemas],
            )
            .await?;
        let mut oids = Vec::new();
        let mut tables = Vec::new();
        for row in rows {
            oids.push(row.get::<_, u32>(0));
            tables.push(Table {
                schema: row.get(1),
                name: row.get(2),
                columns: Vec::new(),
                replica_identity: ReplicaIdentity::Nothing,
                row_security: row.get(3),
                can_select: row.get(4),
                unlogged: row.get(5),
                partitions: row.get::<_, bool>(6).then(Vec::new),
                scope: TableScope::Unroutable,
                oid: row.get(0),
                attnums: BTreeMap::new(),
            });
        }
        let index_of = |oid: u32| oids.iter().position(|o| *o == oid);

        // Leaf partitions at any depth (intermediate ones hold no rows), by partitioned table.
        let partitioned: Vec<u32> = oids
            .iter()
            .zip(&tables)
            .filter(|(_, t)| t.partitions.is_some())
            .map(|(oid, _)| *oid)
            .collect();
        let mut leaves: Vec<(usize, u32, Partition)> = Vec::new();
        if !partitioned.is_empty() {
            for row in client
                .query(
                    "SELECT r.root, t.relid::oid, n.nspname, c.relname
                       FROM unnest($1::oid[]) AS r(root)
                      CROSS JOIN LATERAL pg_partition_tree(r.root) AS t
                       JOIN pg_class c ON c.oid = t.relid
                       JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE t.isleaf AND t.relid <> r.root
                      ORDER BY n.nspname, c.relname",
                    &[&partitioned],
                )
                .await?
            {
                let Some(t) = index_of(row.get(0)) else {
                    continue;
                };
                let partition = Partition {
                    schema: row.get(2),
                    name: row.get(3),
                    replica_identity: ReplicaIdentity::Nothing,
                };
                leaves.push((t, row.get(1), partition));
            }
        }

        let mut all_columns: BTreeMap<(usize, i16), String> = BTreeMap::new();
        for row in client
            .query(
                "SELECT a.attrelid, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                        a.attgenerated <> '',
                        t.typtype = 'c' OR (t.typcategory = 'A' AND t.typelem >= 16384)
                          OR (t.typtype = 'd' AND t.typbasetype >= 16384)
                   FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                  WHERE a.attrelid = ANY($1) AND a.attnum > 0 AND NOT a.attisdropped
                  ORDER BY a.attrelid, a.attnum",
                &[&oids],
            )
            .await?
        {
            let Some(t) = index_of(row.get(0)) else { continue };
            let name: String = row.get(2);
            all_columns.insert((t, row.get(1)), name.clone());
            tables[t].attnums.insert(name.clone(), row.get(1));
            if !row.get::<_, bool>(5) {
                tables[t].columns.push(Column { name, type_name: row.get(3), not_null: row.get(4), text_only: row.get(6) });
            }
        }
        let names = |t: usize, nums: &[i16]| -> Vec<String> {
            nums.iter()
                .filter_map(|n| all_columns.get(&(t, *n)).cloned())
                .collect()
        };

        // Replica identities of the tables and of the leaf partitions: the source checks a
        // partition's own when a row of it changes, whatever the publication publishes.
        let mut identities: BTreeMap<u32, ReplicaIdentity> = BTreeMap::new();
        let relations: Vec<u32> = oids
            .iter()
            .copied()
            .chain(leaves.iter().map(|(_, oid, _)| *oid))
            .collect();
        for row in client
            .query(
                "WITH keys AS (
                   SELECT i.indrelid, i.indisprimary, i.indisreplident,
                          array(SELECT a.attname::text
                                  FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(num, ord)
                                  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.num
                                 ORDER BY k.ord) AS columns
                     FROM pg_index i
                    WHERE i.indrelid = ANY($1) AND (i.indisprimary OR i.indisreplident))
                 SELECT c.oid, c.relreplident::text,
                        (SELECT columns FROM keys WHERE indrelid = c.oid AND indisprimary),
                        (SELECT columns FROM keys WHERE indrelid = c.oid AND indisreplident)
                   FROM pg_class c WHERE c.oid = ANY($1)",
                &[&relations],
            )
            .await?
        {
            let identity = match row.get::<_, String>(1).as_str() {
                "f" => ReplicaIdentity::Full,
                "n" => ReplicaIdentity::Nothing,
                "i" => ReplicaIdentity::Index(row.get::<_, Option<_>>(3).unwrap_or_default()),
                _ => ReplicaIdentity::Default(row.get::<_, Option<_>>(2).unwrap_or_default()),
            };
            identities.insert(row.get(0), identity);
        }
        for (t, oid) in oids.iter().enumerate() {
            tables[t].replica_identity = identities.remove(oid).unwrap_or(ReplicaIdentity::Nothing);
        }
        for (t, oid, mut partition) in leaves {
            partition.replica_identity =
                identities.remove(&oid).unwrap_or(ReplicaIdentity::Nothing);
            tables[t]
                .partitions
                .get_or_insert_with(Vec::new)
                .push(partition);
        }

        let mut foreign_keys = Vec::new();
        for row in client
            .query(
                "SELECT conname, conrelid, confrelid, conkey, confkey FROM pg_constraint
                  WHERE contype = 'f' AND conrelid = ANY($1) AND confrelid = ANY($1)
                  ORDER BY conname",
                &[&oids],
            )
            .await?
        {
            let (Some(child), Some(parent)) = (index_of(row.get(1)), index_of(row.get(2))) else {
                continue;
            };
            foreign_keys.push(ForeignKey {
                name: row.get(0),
                child,
                parent,
                columns: names(child, &row.get::<_, Vec<i16>>(3)),
                parent_columns: names(parent, &row.get::<_, Vec<i16>>(4)),
            });
        }

        let mut catalog = Catalog {
            tenant_column: config.tenant_column.clone(),
            tables,
        };
        let unroutable = catalog.classify(config, &foreign_keys)?;
        Ok((catalog, unroutable))
    }

    /// Loads and classifies; a table without a route is an error.
    pub async fn load(client: &Client, config: &SourceConfig) -> Result<Self, CatalogError> {
        let (catalog, unroutable) = Self::load_with_unroutable(client, config).await?;
        match unroutable {
            None => Ok(catalog),
            Some(e) => Err(e),
        }
    }

    /// Sets every table's scope; returns the error naming unroutable tables, if any.
    fn classify(
        &mut self,
        config: &SourceConfig,
        fks: &[ForeignKey],
    ) -> Result<Option<CatalogError>, CatalogError> {
        let find = |key: &'static str,
                    list: &[String],
                    tables: &[Table]|
         -> Result<BTreeSet<usize>, CatalogError> {
            list.iter()
                .map(|q| {
                    if let Some(t) = tables.iter().position(|t| &t.qualified() == q) {
                        return Ok(t);
                    }
                    let parent = tables
                        .iter()
                        .find(|t| t.partitions.iter().flatten().any(|p| &p.qualified() == q));
                    Err(match parent {
                        Some(parent) => CatalogError::ConfiguredPartition {
                            key,
                            table: q.clone(),
                            parent: parent.qualified(),
                        },
                        None => CatalogError::UnknownConfiguredTable {
                            key,
                            table: q.clone(),
                            schemas: config.schemas.clone(),
                        },
                    })
                })
                .collect()
        };
        let excluded = find(
            "source.exclude_tables",
            &config.exclude_tables,
            &self.tables,
        )?;
        let global = find("source.global_tables", &config.global_tables, &self.tables)?;
        let configured = |t: usize| excluded.contains(&t) || global.contains(&t);
        let tc = &self.tenant_column;

        let mut scope: Vec<Option<Route>> = vec![None; self.tables.len()];
        // A nullable tenant column is a table's route only when no NOT NULL foreign key
        // reaches a tenant (below): while a migration adds and backfills one (the seed's
        // pattern), its NULLs are rows of the tenant the foreign key gives, not of none.
        let nullable_tenant: Vec<usize> = (0..self.tables.len())
            .filter(|&t| !configured(t))
            .filter(|&t| self.tables[t].column(tc).is_some_and(|c| !c.not_null))
            .collect();
        for (t, table) in self.tables.iter().enumerate() {
            if !configured(t) && table.column(tc).is_some_and(|c| c.not_null) {
                scope[t] = Some(Route::Direct { column: tc.clone() });
            }
        }
        if scope.iter().all(Option::is_none) && nullable_tenant.is_empty() {
            return Err(CatalogError::NoTenantTables {
                schemas: config.schemas.clone(),
                column: tc.clone(),
            });
        }
        let not_null = |t: usize, columns: &[String]| {
            columns
                .iter()
                .all(|c| self.tables[t].column(c).is_some_and(|c| c.not_null))
        };
        // Through NOT NULL keys first, whatever the route's length: a row whose key is NULL
        // reaches no tenant, so a nullable route is taken only when there is no other (a
        // nullable `shared_with → organizations.id` must not override `fund_id → funds`).
        // Three rounds: NOT NULL routes only; then the nullable tenant columns no NOT NULL
        // route reached, and again NOT NULL routes through them; then nullable routes.
        for round in 0..3 {
            let allow_nullable = round == 2;
            if round == 1 {
                for &t in &nullable_tenant {
                    if scope[t].is_none() {
                        scope[t] = Some(Route::Direct { column: tc.clone() });
                    }
                }
            }
            // A foreign key that maps a tenant column onto another table's column carries the
            // tenant value itself, in either direction: upwards it finds the tenants' own
            // table (users.organization_id → organizations.id; the parent's key is a tenant
            // value whatever the child's nullability), downwards a child whose key includes
            // the parent's tenant column.
            loop {
                let mut changed = false;
                for fk in fks {
                    if fk.child == fk.parent {
                        continue;
                    }
                    let pairs = fk.columns.iter().zip(&fk.parent_columns);
                    let mapped = |t: usize| match &scope[t] {
                        Some(Route::Direct { column }) => Some(column.clone()),
                        _ => None,
                    };
                    if let (Some(child_col), None) = (mapped(fk.child), &scope[fk.parent]) {
                        if let Some((_, p)) = pairs.clone().find(|(c, _)| **c == child_col)
                            && !configured(fk.parent)
                        {
                            scope[fk.parent] = Some(Route::Direct { column: p.clone() });
                            changed = true;
                        }
                    } else if let (None, Some(parent_col)) = (&scope[fk.child], mapped(fk.parent))
                        && let Some((c, _)) = pairs.clone().find(|(_, p)| **p == parent_col)
                        && !configured(fk.child)
                        && (allow_nullable || not_null(fk.child, std::slice::from_ref(c)))
                    {
                        scope[fk.child] = Some(Route::Direct { column: c.clone() });
                        changed = true;
                    }
                }
                if !changed {
                    break;
                }
            }
            // Then breadth first through the remaining foreign keys, so each table takes the
            // shortest route.
            loop {
                let mut assigned = Vec::new();
                for t in 0..self.tables.len() {
                    if scope[t].is_some() || configured(t) {
                        continue;
                    }
                    let best = fks
                        .iter()
                        .filter(|fk| fk.child == t && fk.parent != t && scope[fk.parent].is_some())
                        .map(|fk| (!not_null(t, &fk.columns), fk))
                        .filter(|(nullable, _)| allow_nullable || !nullable)
                        .min_by(|(na, a), (nb, b)| (na, &a.name).cmp(&(nb, &b.name)));
                    if let Some((nullable, fk)) = best {
                        let route = Route::Via {
                            columns: fk.columns.clone(),
                            parent: fk.parent,
                            parent_columns: fk.parent_columns.clone(),
                            nullable,
                        };
                        assigned.push((t, route));
                    }
                }
                if assigned.is_empty() {
                    break;
                }
                for (t, route) in assigned {
                    scope[t] = Some(route);
                }
            }
        }

        let mut unroutable = Vec::new();
        for (t, route) in scope.into_iter().enumerate() {
            self.tables[t].scope = if excluded.contains(&t) {
                TableScope::Excluded
            } else if global.contains(&t) {
                TableScope::Global
            } else if let Some(route) = route {
                TableScope::Tenant(route)
            } else {
                unroutable.push(self.tables[t].qualified());
                TableScope::Unroutable
            };
        }
        Ok((!unroutable.is_empty()).then(|| CatalogError::Unroutable {
            column: tc.clone(),
            tables: unroutable,
        }))
    }

    pub fn tenant_tables(&self) -> impl Iterator<Item = &Table> {
        self.tables
            .iter()
            .filter(|t| matches!(t.scope, TableScope::Tenant(_)))
    }

    pub fn global_tables(&self) -> impl Iterator<Item = &Table> {
        self.tables.iter().filter(|t| t.scope == TableScope::Global)
    }

    /// The SQL condition selecting `table`'s rows of `tenant` (a value, quoted here).
    pub fn tenant_filter(&self, table: &Table, tenant: &str) -> Option<String> {
        match &table.scope {
            TableScope::Tenant(Route::Direct { column }) => {
                let ty = table
                    .column(column)
                    .map_or("text", |c| c.type_name.as_str());
                Some(format!(
                    "{} = {}::{ty}",
                    quote_ident(column),
                    quote_literal(tenant)
                ))
            }
            TableScope::Tenant(Route::Via {
                columns,
                parent,
                parent_columns,
                ..
            }) => {
                let parent = &self.tables[*parent];
                let list = |cols: &[String]| {
                    cols.iter()
                        .map(|c| quote_ident(c))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                Some(format!(
                    "({}) IN (SELECT {} FROM {} WHERE {})",
                    list(columns),
                    list(parent_columns),
                    parent.sql_name(),
                    self.tenant_filter(parent, tenant)?
                ))
            }
            _ => None,
        }
    }

    /// Every distinct tenant value found in the tables that carry it, as text, in the order
    /// of the tenant column's type.
    pub fn tenants_query(&self) -> String {
        let ty = self.tenant_type();
        let parts: Vec<String> = self
            .tables
            .iter()
            .filter_map(|t| match &t.scope {
                TableScope::Tenant(Route::Direct { column }) => Some(format!(
                    "SELECT {}::{ty} AS tenant FROM {}",
                    quote_ident(column),
                    t.sql_name()
                )),
                _ => None,
            })
            .collect();
        // DISTINCT: with a single table carrying the column there is no UNION to dedupe, and
        // every tenant would be listed (and exported) once per row.
        format!(
            "SELECT d.tenant::text FROM (SELECT DISTINCT tenant FROM ({}) AS all_tenants WHERE tenant IS NOT NULL) AS d ORDER BY d.tenant",
            parts.join(" UNION ")
        )
    }

    /// `table` (as `r0`) joined (`join`: `JOIN` or `LEFT JOIN`) along its route to the table
    /// that carries the tenant column, `r1`, `r2`, … in order.
    fn route_joins(&self, table: &Table, join: &str) -> Option<RouteJoins> {
        let mut joins = String::new();
        let mut hops = Vec::new();
        let mut current = table;
        let mut depth = 0;
        let column = loop {
            match &current.scope {
                TableScope::Tenant(Route::Direct { column }) => break column,
                TableScope::Tenant(Route::Via {
                    columns,
                    parent,
                    parent_columns,
                    ..
                }) => {
                    let parent = &self.tables[*parent];
                    let on = columns
                        .iter()
                        .zip(parent_columns)
                        .map(|(c, p)| {
                            format!(
                                "r{depth}.{} = r{}.{}",
                                quote_ident(c),
                                depth + 1,
                                quote_ident(p)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(" AND ");
                    joins.push_str(&format!(
                        " {join} {} AS r{} ON {on}",
                        parent.sql_name(),
                        depth + 1
                    ));
                    let child = columns
                        .iter()
                        .map(|c| format!("r{depth}.{} IS NOT NULL", quote_ident(c)))
                        .collect::<Vec<_>>()
                        .join(" AND ");
                    let found = format!(
                        "r{}.{} IS NOT NULL",
                        depth + 1,
                        quote_ident(&parent_columns[0])
                    );
                    hops.push((child, found));
                    current = parent;
                    depth += 1;
                }
                _ => return None,
            }
        };
        Some(RouteJoins {
            joins,
            tenant: format!("r{depth}.{}", quote_ident(column)),
            hops,
        })
    }

    /// The rows of `table` of every tenant, each preceded by its tenant's value as text: one
    /// statement exports a table for every tenant. A row reaching its tenant through foreign
    /// keys is joined along them (each key is unique in its parent, so a row is selected at
    /// most once, and exactly when [`Catalog::tenant_filter`] would select it); a row with no
    /// tenant is left out. `blocks`: only the rows of `table` in these blocks (from, and to if
    /// any).
    pub fn sweep_query(&self, table: &Table, blocks: Option<(u32, Option<u32>)>) -> Option<String> {
        let ty = self.tenant_type();
        let RouteJoins { joins, tenant, .. } = self.route_joins(table, "JOIN")?;
        let tenant = format!("{tenant}::{ty}");
        let columns: String = table
            .columns
            .iter()
            .map(|c| format!(", r0.{}", quote_ident(&c.name)))
            .collect();
        let blocks = match blocks {
            None => String::new(),
            Some((from, to)) => {
                let mut range = format!(" AND r0.ctid >= '({from},0)'::tid");
                if let Some(to) = to {
                    range.push_str(&format!(" AND r0.ctid < '({to},0)'::tid"));
                }
                range
            }
        };
        Some(format!(
            "SELECT {tenant}::text{columns} FROM {} AS r0{joins} WHERE {tenant} IS NOT NULL{blocks}",
            table.sql_name(),
        ))
    }

    /// Every row of `table` that routing knows, as text: its tenant (NULL: no tenant) and
    /// `keys`, the way capture's router would have learnt them loading the table after its
    /// parents. A row whose foreign key is NULL belongs to no tenant; a row whose parent does
    /// not exist (only where a foreign key is not enforced) is left out, as the router skips it.
    pub fn routing_query(&self, table: &Table, keys: &[String]) -> Option<String> {
        let RouteJoins {
            joins,
            tenant,
            hops,
        } = self.route_joins(table, "LEFT JOIN")?;
        let keys: String = keys
            .iter()
            .map(|k| format!(", r0.{}::text", quote_ident(k)))
            .collect();
        let orphans: Vec<String> = hops
            .iter()
            .map(|(child, found)| format!("NOT ({child} AND NOT {found})"))
            .collect();
        let filter = if orphans.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", orphans.join(" AND "))
        };
        Some(format!(
            "SELECT {tenant}::text{keys} FROM {} AS r0{joins}{filter}",
            table.sql_name()
        ))
    }

    /// The tenant column's type (from the first table that carries it), for validating values.
    pub fn tenant_type(&self) -> &str {
        self.tables
            .iter()
            .find_map(|t| match &t.scope {
                TableScope::Tenant(Route::Direct { column }) => {
                    t.column(column).map(|c| c.type_name.as_str())
                }
                _ => None,
            })
            .unwrap_or("text")
    }

    /// How `table`'s rows reach the tenant, for people: `fund_id → app.funds.id → organization_id`.
    pub fn describe_route(&self, table: &Table) -> String {
        match &table.scope {
            TableScope::Tenant(Route::Direct { column }) => format!("own column {column}"),
            TableScope::Tenant(Route::Via {
                columns,
                parent,
                parent_columns,
                ..
            }) => {
                let parent = &self.tables[*parent];
                let step = format!(
                    "({}) → {}({})",
                    columns.join(", "),
                    parent.qualified(),
                    parent_columns.join(", ")
                );
                match &parent.scope {
                    TableScope::Tenant(Route::Direct { column }) => format!("{step}.{column}"),
                    _ => format!("{step} → {}", self.describe_route(parent)),
                }
            }
            TableScope::Global => "global (configured)".into(),
            TableScope::Excluded => "excluded (configured)".into(),
            TableScope::Unroutable => "NO ROUTE to the tenant column".into(),
        }
    }

    /// Columns a change's old tuple must carry for the stream to route a DELETE of `table`.
    pub fn route_columns<'a>(&self, table: &'a Table) -> &'a [String] {
        match &table.scope {
            TableScope::Tenant(Route::Direct { column }) => std::slice::from_ref(column),
            TableScope::Tenant(Route::Via { columns, .. }) => columns,
            _ => &[],
        }
    }

    /// Manifest entries for every table.
    pub fn manifest_tables(&self) -> Vec<TableEntry> {
        self.tables
            .iter()
            .map(|t| TableEntry {
                schema: t.schema.clone(),
                name: t.name.clone(),
                scope: match t.scope {
                    TableScope::Tenant(_) => Scope::Tenant,
                    TableScope::Global => Scope::Global,
                    _ => Scope::Excluded,
                },
                route: matches!(t.scope, TableScope::Tenant(_)).then(|| self.describe_route(t)),
                columns: t.columns.iter().map(|c| c.name.clone()).collect(),
                oid: Some(t.oid),
                attnums: t.attnums.clone(),
            })
            .collect()
    }
}

impl Classify for CatalogError {
    fn class(&self) -> ErrorClass {
        match self {
            CatalogError::Query(e) => crate::pg::sqlstate::class_of(e),
            // The configuration names tables the schemas do not hold, or leaves some unrouted.
            CatalogError::UnknownConfiguredTable { .. }
            | CatalogError::ConfiguredPartition { .. }
            | CatalogError::NoTenantTables { .. }
            | CatalogError::Unroutable { .. } => ErrorClass::Usage,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table of schema `m`; columns as (name, NOT NULL).
    fn table(name: &str, columns: &[(&str, bool)]) -> Table {
        Table {
            schema: "m".into(),
            name: name.into(),
            columns: columns
                .iter()
                .map(|(c, not_null)| Column {
                    name: c.to_string(),
                    type_name: "uuid".into(),
                    not_null: *not_null,
                    text_only: false,
                })
                .collect(),
            replica_identity: ReplicaIdentity::Default(vec!["id".into()]),
            row_security: false,
            can_select: true,
            unlogged: false,
            partitions: None,
            scope: TableScope::Unroutable,
            oid: 0,
            attnums: BTreeMap::new(),
        }
    }

    fn fk(
        name: &str,
        child: usize,
        column: &str,
        parent: usize,
        parent_column: &str,
    ) -> ForeignKey {
        ForeignKey {
            name: name.into(),
            child,
            parent,
            columns: vec![column.into()],
            parent_columns: vec![parent_column.into()],
        }
    }

    fn classified(tables: Vec<Table>, fks: &[ForeignKey]) -> Catalog {
        let config = SourceConfig {
            url: String::new(),
            schemas: vec!["m".into()],
            tenant_column: "organization_id".into(),
            slot: "s".into(),
            publication: "p".into(),
            exclude_tables: Vec::new(),
            global_tables: Vec::new(),
        };
        let mut catalog = Catalog {
            tenant_column: config.tenant_column.clone(),
            tables,
        };
        assert!(catalog.classify(&config, fks).unwrap().is_none());
        catalog
    }

    #[test]
    fn a_not_null_route_wins_over_a_nullable_key_onto_the_tenants() {
        let catalog = classified(
            vec![
                table("orgs", &[("id", true)]),
                table("funds", &[("id", true), ("organization_id", true)]),
                table("documents", &[("fund_id", true), ("shared_with", false)]),
            ],
            &[
                fk("a_shared_with", 2, "shared_with", 0, "id"),
                fk("funds_org", 1, "organization_id", 0, "id"),
                fk("z_fund", 2, "fund_id", 1, "id"),
            ],
        );
        let documents = &catalog.tables[2];
        assert_eq!(
            catalog.describe_route(documents),
            "(fund_id) → m.funds(id).organization_id"
        );
        assert_eq!(catalog.describe_route(&catalog.tables[0]), "own column id");
    }

    #[test]
    fn a_tenant_column_being_backfilled_routes_only_once_no_foreign_key_does() {
        // The seed's migration: `organization_id` added nullable to a table that reaches its
        // tenant through `fund_id`, then backfilled. Until it is NOT NULL, a NULL in it is a
        // row of the fund's tenant, so the foreign key stays the route.
        let schema = |org_not_null: bool| {
            classified(
                vec![
                    table("funds", &[("id", true), ("organization_id", true)]),
                    table(
                        "snapshots",
                        &[("fund_id", true), ("organization_id", org_not_null)],
                    ),
                    table("events", &[("organization_id", false)]),
                ],
                &[fk("snapshots_fund", 1, "fund_id", 0, "id")],
            )
        };
        let during = schema(false);
        assert_eq!(
            during.describe_route(&during.tables[1]),
            "(fund_id) → m.funds(id).organization_id"
        );
        // Nothing else reaches a tenant: the nullable column is the route (NULL: no tenant).
        assert_eq!(
            during.describe_route(&during.tables[2]),
            "own column organization_id"
        );
        let after = schema(true);
        assert_eq!(
            after.describe_route(&after.tables[1]),
            "own column organization_id"
        );
    }

    #[test]
    fn a_nullable_tenant_column_taken_last_still_leaves_not_null_routes_through_it_first() {
        // `docs` has a nullable tenant column and no NOT NULL route; `sections` reaches it by
        // a NOT NULL key, `notes` by a NOT NULL key to `sections` and a nullable one to `docs`:
        // the NOT NULL route wins, as when `docs.organization_id` is NOT NULL.
        let catalog = classified(
            vec![
                table("orgs", &[("id", true)]),
                table("docs", &[("id", true), ("organization_id", false)]),
                table("sections", &[("id", true), ("doc_id", true)]),
                table("notes", &[("section_id", true), ("a_doc_id", false)]),
            ],
            &[
                fk("docs_org", 1, "organization_id", 0, "id"),
                fk("sections_doc", 2, "doc_id", 1, "id"),
                fk("a_notes_doc", 3, "a_doc_id", 1, "id"),
                fk("notes_section", 3, "section_id", 2, "id"),
            ],
        );
        assert_eq!(
            catalog.describe_route(&catalog.tables[1]),
            "own column organization_id"
        );
        assert_eq!(
            catalog.describe_route(&catalog.tables[3]),
            "(section_id) → m.sections(id) → (doc_id) → m.docs(id).organization_id"
        );
    }

    #[test]
    fn a_nullable_key_onto_the_tenants_routes_when_there_is_no_other() {
        let catalog = classified(
            vec![
                table("orgs", &[("id", true)]),
                table("funds", &[("id", true), ("organization_id", true)]),
                table("notes", &[("shared_with", false)]),
            ],
            &[
                fk("funds_org", 1, "organization_id", 0, "id"),
                fk("notes_shared", 2, "shared_with", 0, "id"),
            ],
        );
        assert_eq!(
            catalog.tables[2].scope,
            TableScope::Tenant(Route::Direct {
                column: "shared_with".into()
            })
        );
    }

    #[test]
    fn quoting_resists_injection() {
        assert_eq!(quote_ident(r#"we"ird name"#), r#""we""ird name""#);
        assert_eq!(
            quote_literal("x'; DROP TABLE t; --"),
            "'x''; DROP TABLE t; --'"
        );
    }
}
