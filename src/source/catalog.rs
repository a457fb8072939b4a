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
use crate::repository::copy_binary::CopyFormat;
use crate::repository::manifest::{Scope, TableEntry};

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
    pub scope: TableScope,
}

impl Table {
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// `"schema"."name"`, safe to splice into SQL.
    pub fn sql_name(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
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

/// Double-quotes an identifier (doubling embedded quotes), whatever it contains.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A string literal (standard_conforming_strings is on since 9.1; connections pin it on).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

impl Catalog {
    /// Loads and classifies, keeping unroutable tables (marked so) for `check` to report.
    pub async fn load_with_unroutable(
        client: &Client,
        config: &SourceConfig,
    ) -> Result<(Self, Option<CatalogError>), CatalogError> {
        let rows = client
            .query(
                "SELECT c.oid, n.nspname, c.relname, c.relreplident::text, c.relrowsecurity,
                        has_table_privilege(c.oid, 'SELECT')
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = ANY($1) AND c.relkind IN ('r', 'p') AND NOT c.relispartition
                  ORDER BY n.nspname, c.relname",
                &[&config.schemas],
            )
            .await?;
        let mut oids = Vec::new();
        let mut tables = Vec::new();
        let mut identity_kind = Vec::new();
        for row in rows {
            oids.push(row.get::<_, u32>(0));
            identity_kind.push(row.get::<_, String>(3));
            tables.push(Table {
                schema: row.get(1),
                name: row.get(2),
                columns: Vec::new(),
                replica_identity: ReplicaIdentity::Nothing,
                row_security: row.get(4),
                can_select: row.get(5),
                scope: TableScope::Unroutable,
            });
        }
        let index_of = |oid: u32| oids.iter().position(|o| *o == oid);

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
            if !row.get::<_, bool>(5) {
                tables[t].columns.push(Column { name, type_name: row.get(3), not_null: row.get(4), text_only: row.get(6) });
            }
        }
        let names = |t: usize, nums: &[i16]| -> Vec<String> {
            nums.iter()
                .filter_map(|n| all_columns.get(&(t, *n)).cloned())
                .collect()
        };

        let mut primary_keys: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        let mut identity_indexes: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for row in client
            .query(
                "SELECT indrelid, indisprimary, indisreplident, indkey::int2[] FROM pg_index
                  WHERE indrelid = ANY($1) AND (indisprimary OR indisreplident)",
                &[&oids],
            )
            .await?
        {
            let Some(t) = index_of(row.get(0)) else {
                continue;
            };
            let cols = names(t, &row.get::<_, Vec<i16>>(3));
            if row.get(1) {
                primary_keys.insert(t, cols.clone());
            }
            if row.get(2) {
                identity_indexes.insert(t, cols);
            }
        }
        for (t, kind) in identity_kind.iter().enumerate() {
            tables[t].replica_identity = match kind.as_str() {
                "f" => ReplicaIdentity::Full,
                "n" => ReplicaIdentity::Nothing,
                "i" => ReplicaIdentity::Index(identity_indexes.remove(&t).unwrap_or_default()),
                _ => ReplicaIdentity::Default(primary_keys.remove(&t).unwrap_or_default()),
            };
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
                    tables
                        .iter()
                        .position(|t| &t.qualified() == q)
                        .ok_or_else(|| CatalogError::UnknownConfiguredTable {
                            key,
                            table: q.clone(),
                            schemas: config.schemas.clone(),
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
        for (t, table) in self.tables.iter().enumerate() {
            if !configured(t) && table.column(tc).is_some() {
                scope[t] = Some(Route::Direct { column: tc.clone() });
            }
        }
        if scope.iter().all(Option::is_none) {
            return Err(CatalogError::NoTenantTables {
                schemas: config.schemas.clone(),
                column: tc.clone(),
            });
        }
        // A foreign key that maps a tenant column onto another table's column carries the
        // tenant value itself, in either direction: upwards it finds the tenants' own table
        // (users.organization_id → organizations.id), downwards a child whose key includes
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
                    if let Some((_, p)) = pairs.clone().find(|(c, _)| **c == child_col) {
                        if !configured(fk.parent) {
                            scope[fk.parent] = Some(Route::Direct { column: p.clone() });
                            changed = true;
                        }
                    }
                } else if let (None, Some(parent_col)) = (&scope[fk.child], mapped(fk.parent)) {
                    if let Some((c, _)) = pairs.clone().find(|(_, p)| **p == parent_col) {
                        if !configured(fk.child) {
                            scope[fk.child] = Some(Route::Direct { column: c.clone() });
                            changed = true;
                        }
                    }
                }
            }
            if !changed {
                break;
            }
        }
        // Then breadth first through the remaining foreign keys, so each table takes the
        // shortest route — through NOT NULL keys first, whatever the length: a row whose key is
        // NULL reaches no tenant, so a nullable route is taken only when there is no other.
        for allow_nullable in [false, true] {
            loop {
                let mut assigned = Vec::new();
                for t in 0..self.tables.len() {
                    if scope[t].is_some() || configured(t) {
                        continue;
                    }
                    let best = fks
                        .iter()
                        .filter(|fk| fk.child == t && fk.parent != t && scope[fk.parent].is_some())
                        .map(|fk| {
                            let nullable = fk
                                .columns
                                .iter()
                                .any(|c| !self.tables[t].column(c).is_some_and(|c| c.not_null));
                            (nullable, fk)
                        })
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

    /// Every distinct tenant value found in the tables that carry it, sorted.
    pub fn tenants_query(&self) -> String {
        let parts: Vec<String> = self
            .tables
            .iter()
            .filter_map(|t| match &t.scope {
                TableScope::Tenant(Route::Direct { column }) => Some(format!(
                    "SELECT {}::text AS tenant FROM {}",
                    quote_ident(column),
                    t.sql_name()
                )),
                _ => None,
            })
            .collect();
        format!(
            "SELECT tenant FROM ({}) AS all_tenants WHERE tenant IS NOT NULL ORDER BY tenant",
            parts.join(" UNION ")
        )
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
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_resists_injection() {
        assert_eq!(quote_ident(r#"we"ird name"#), r#""we""ird name""#);
        assert_eq!(
            quote_literal("x'; DROP TABLE t; --"),
            "'x''; DROP TABLE t; --'"
        );
    }
}
