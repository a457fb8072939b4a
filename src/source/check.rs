//! `check`: a preflight report of everything the product needs from the source, with the SQL
//! that fixes each problem. It only reads; it changes nothing.

use std::collections::BTreeSet;
use std::fmt;

use serde::Serialize;
use tokio_postgres::Client;

use super::catalog::{Catalog, ReplicaIdentity, Route, Table, TableScope};
use super::{SourceError, pg_tools, query_context};
use crate::config::Config;
use crate::pg::{connect, quote_ident};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warning,
    Error,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub level: Level,
    pub subject: String,
    pub message: String,
    /// SQL (or config) that fixes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TableReport {
    pub table: String,
    pub scope: String,
    pub route: String,
    pub copy_format: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub source: String,
    pub role: String,
    pub tables: Vec<TableReport>,
    pub findings: Vec<Finding>,
}

impl CheckReport {
    pub fn errors(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.level == Level::Error)
            .count()
    }
    pub fn warnings(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.level == Level::Warning)
            .count()
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "source {} as role {}", self.source, self.role)?;
        writeln!(f, "\ntables:")?;
        let width = self.tables.iter().map(|t| t.table.len()).max().unwrap_or(0);
        for t in &self.tables {
            let format = if t.copy_format == "text" {
                "  [COPY in text format: a column's binary form is database-specific]"
            } else {
                ""
            };
            writeln!(f, "  {:width$}  {:9} {}{format}", t.table, t.scope, t.route)?;
        }
        writeln!(f, "\nfindings:")?;
        for finding in &self.findings {
            let mark = match finding.level {
                Level::Ok => "ok     ",
                Level::Warning => "WARNING",
                Level::Error => "ERROR  ",
            };
            writeln!(f, "  {mark} {}: {}", finding.subject, finding.message)?;
            if let Some(fix) = &finding.fix {
                for line in fix.lines() {
                    writeln!(f, "          fix: {line}")?;
                }
            }
        }
        write!(
            f,
            "\n{} error(s), {} warning(s)",
            self.errors(),
            self.warnings()
        )
    }
}

pub async fn run(config: &Config) -> Result<CheckReport, SourceError> {
    let client = connect(&config.source.url).await?;
    let mut findings = Vec::new();
    let mut push = |level, subject: &str, message: String, fix: Option<String>| {
        findings.push(Finding {
            level,
            subject: subject.into(),
            message,
            fix,
        });
    };

    let row = client
        .query_one(
            "SELECT current_user, r.rolsuper, r.rolreplication, r.rolbypassrls,
                    current_setting('wal_level'), current_setting('server_version_num')::int,
                    current_setting('max_replication_slots')::int,
                    (SELECT count(*) FROM pg_replication_slots)::int,
                    current_setting('max_wal_senders')::int, current_database()
               FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .map_err(query_context("reading the server settings"))?;
    let role: String = row.get(0);
    let (superuser, replication, bypassrls): (bool, bool, bool) =
        (row.get(1), row.get(2), row.get(3));
    let wal_level: String = row.get(4);
    let version: i32 = row.get(5);
    let (max_slots, used_slots, max_senders): (i32, i32, i32) =
        (row.get(6), row.get(7), row.get(8));
    let database: String = row.get(9);
    let role_sql = quote_ident(&role);

    if version < 140000 {
        push(
            Level::Error,
            "server",
            format!(
                "PostgreSQL {} is too old: 14 or newer is needed (pgoutput protocol 2)",
                version / 10000
            ),
            None,
        );
    } else {
        push(
            Level::Ok,
            "server",
            format!("PostgreSQL {}.{}", version / 10000, version % 10000),
            None,
        );
    }
    if wal_level == "logical" {
        push(Level::Ok, "wal_level", "logical".into(), None);
    } else {
        push(
            Level::Error,
            "wal_level",
            format!("is {wal_level}; logical decoding needs logical"),
            Some("ALTER SYSTEM SET wal_level = logical;  -- then restart PostgreSQL".into()),
        );
    }
    if superuser || replication {
        push(
            Level::Ok,
            "replication",
            format!("role {role} may create replication slots"),
            None,
        );
    } else {
        push(
            Level::Error,
            "replication",
            format!("role {role} lacks REPLICATION"),
            Some(format!("ALTER ROLE {role_sql} REPLICATION;")),
        );
    }
    if used_slots + 2 > max_slots || max_senders < 2 {
        push(
            Level::Error,
            "replication slots",
            format!("{used_slots} of max_replication_slots={max_slots} used, max_wal_senders={max_senders}: a snapshot needs one free slot and sender, the stream another"),
            Some("ALTER SYSTEM SET max_replication_slots = 10; ALTER SYSTEM SET max_wal_senders = 10;  -- then restart".into()),
        );
    } else {
        push(
            Level::Ok,
            "replication slots",
            format!("{used_slots} of {max_slots} used"),
            None,
        );
    }

    let (catalog, unroutable) = Catalog::load_with_unroutable(&client, &config.source).await?;
    if let Some(e) = unroutable {
        push(
            Level::Error,
            "routing",
            e.to_string(),
            Some("[source]\nglobal_tables = [\"schema.table\"]   # or exclude_tables".into()),
        );
    }
    let publication = &config.source.publication;
    match super::publication::verify(&client, publication, &catalog).await {
        Ok(()) => push(
            Level::Ok,
            "publication",
            format!("{publication} covers every tenant and global table"),
            None,
        ),
        Err(super::publication::PublicationError::Missing { sql, .. }) => push(
            Level::Warning,
            "publication",
            format!(
                "{publication} does not exist yet: init creates it if this role owns the tables, else the owner runs"
            ),
            Some(sql),
        ),
        Err(super::publication::PublicationError::Incomplete { missing, sql, .. }) => push(
            Level::Error,
            "publication",
            format!(
                "{publication} lacks {}: their changes would not be captured",
                missing.join(", ")
            ),
            Some(sql),
        ),
        Err(e) => push(Level::Error, "publication", e.to_string(), None),
    }
    let leading = leading_index_columns(&client, &config.source.schemas).await?;
    let mut tables = Vec::new();
    let mut rls_tables = Vec::new();
    for table in &catalog.tables {
        let name = table.qualified();
        tables.push(TableReport {
            table: name.clone(),
            scope: match table.scope {
                TableScope::Tenant(_) => "tenant",
                TableScope::Global => "global",
                TableScope::Excluded => "excluded",
                TableScope::Unroutable => "NO ROUTE",
            }
            .into(),
            route: catalog.describe_route(table),
            copy_format: table.copy_format().sql(),
        });
        if matches!(table.scope, TableScope::Excluded | TableScope::Unroutable) {
            continue;
        }
        if !table.can_select {
            push(
                Level::Error,
                &name,
                format!("role {role} cannot SELECT it"),
                Some(format!(
                    "GRANT SELECT ON {} TO {role_sql};",
                    table.sql_name()
                )),
            );
        }
        if table.row_security {
            rls_tables.push(name.clone());
        }
        // Global tables too: the publication covers them, so the source refuses their
        // UPDATEs and DELETEs just the same without a replica identity.
        identity_findings(&catalog, table, &mut push);
        if let TableScope::Tenant(route) = &table.scope {
            if let Route::Via {
                nullable: true,
                columns,
                ..
            } = route
            {
                push(
                    Level::Warning,
                    &name,
                    format!(
                        "rows whose ({}) is NULL reach no tenant and are not backed up",
                        columns.join(", ")
                    ),
                    Some(format!(
                        "ALTER TABLE {} ALTER COLUMN … SET NOT NULL;  -- or route it otherwise",
                        table.sql_name()
                    )),
                );
            }
            let needed = catalog.route_columns(table);
            let indexed = leading
                .iter()
                .any(|(t, cols)| *t == name && cols.starts_with(needed));
            if !indexed {
                push(
                    Level::Warning,
                    &name,
                    format!(
                        "no index leads with ({}): each tenant's export scans the whole table",
                        needed.join(", ")
                    ),
                    Some(format!(
                        "CREATE INDEX CONCURRENTLY ON {} ({});",
                        table.sql_name(),
                        needed
                            .iter()
                            .map(|c| quote_ident(c))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                );
            }
        }
    }
    if !rls_tables.is_empty() && !superuser && !bypassrls {
        push(
            Level::Error,
            "row level security",
            format!(
                "role {role} is subject to RLS on {} table(s) ({}…): it would see no rows",
                rls_tables.len(),
                rls_tables[0]
            ),
            Some(format!("ALTER ROLE {role_sql} BYPASSRLS;")),
        );
    }
    let unreadable_sequences: Vec<String> = client
        .query(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind = 'S' AND n.nspname = ANY($1) AND NOT has_table_privilege(c.oid, 'SELECT')",
            &[&config.source.schemas],
        )
        .await
        .map_err(query_context("reading sequence privileges"))?
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    if !unreadable_sequences.is_empty() {
        push(
            Level::Error,
            "sequences",
            format!(
                "role {role} cannot read {} sequence(s)",
                unreadable_sequences.len()
            ),
            Some(
                unreadable_sequences
                    .iter()
                    .map(|s| format!("GRANT SELECT ON SEQUENCE {s} TO {role_sql};"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
        );
    }
    match pg_tools::find("pg_dump", (version / 10000) as u32).await {
        Ok(path) => push(Level::Ok, "pg_dump", path.display().to_string(), None),
        Err(e) => push(Level::Error, "pg_dump", e.to_string(), None),
    }

    let mut report = CheckReport {
        source: format!(
            "{} (database {database})",
            crate::pg::redact_url(&config.source.url)
        ),
        role,
        tables,
        findings,
    };
    report.findings.sort_by_key(|f| std::cmp::Reverse(f.level));
    Ok(report)
}

/// Whether the source accepts the table's UPDATEs and DELETEs once it is published, and
/// whether their old rows will carry the columns that route them to their tenant.
fn identity_findings(
    catalog: &Catalog,
    table: &Table,
    push: &mut impl FnMut(Level, &str, String, Option<String>),
) {
    let name = table.qualified();
    let partitions = table.partitions.as_deref().unwrap_or_default();
    // A partitioned table's old rows are logged as its partitions' identities say, then sent
    // through it as its own says (whole rows, or its key columns): FULL is needed on all.
    let fix: Vec<String> = std::iter::once((table.sql_name(), &table.replica_identity))
        .chain(
            partitions
                .iter()
                .map(|p| (p.sql_name(), &p.replica_identity)),
        )
        .filter(|(_, identity)| **identity != ReplicaIdentity::Full)
        .map(|(sql, _)| format!("ALTER TABLE {sql} REPLICA IDENTITY FULL;"))
        .collect();
    if fix.is_empty() {
        return;
    }
    let fix = Some(fix.join("\n"));
    // The source checks the identity of the relation holding the changed row.
    let lacking =
        |identity: &ReplicaIdentity| identity_columns(identity).is_some_and(<[String]>::is_empty);
    let unidentified = match &table.partitions {
        None => {
            lacking(&table.replica_identity).then(|| describe_identity(&table.replica_identity))
        }
        Some(partitions) => {
            let lacking: Vec<String> = partitions
                .iter()
                .filter(|p| lacking(&p.replica_identity))
                .map(|p| {
                    format!(
                        "{} ({})",
                        p.qualified(),
                        describe_identity(&p.replica_identity)
                    )
                })
                .collect();
            (!lacking.is_empty()).then(|| format!("partition(s) {}", lacking.join(", ")))
        }
    };
    if let Some(described) = unidentified {
        push(
            Level::Error,
            &name,
            format!(
                "{described}: once published, its UPDATEs and DELETEs fail on the source; give it a primary key, or REPLICA IDENTITY FULL"
            ),
            fix,
        );
        return;
    }
    if table.partitions.is_some() && table.replica_identity == ReplicaIdentity::Full {
        push(
            Level::Error,
            &name,
            "REPLICA IDENTITY FULL, but not all its partitions: their old rows are sent through it as whole rows with NULL in every column outside the partition's own identity, so their changes would be routed and replayed by those NULLs".into(),
            fix,
        );
        return;
    }
    // The root's key columns (the only ones pgoutput marks as sent), as far as every
    // partition logs them.
    let mut carried: BTreeSet<&String> = identity_columns(&table.replica_identity)
        .unwrap_or_default()
        .iter()
        .collect();
    let root_columns = carried.len();
    for partition in partitions {
        if let Some(columns) = identity_columns(&partition.replica_identity) {
            carried.retain(|c| columns.contains(c));
        }
    }
    let mut described = describe_identity(&table.replica_identity);
    if carried.len() < root_columns {
        described.push_str(&format!(
            " (of which its partitions' identities log only ({}))",
            join(&carried)
        ));
    }
    // Rows other tables route through are also known by key (the daemon keeps their key →
    // tenant map), so a DELETE carrying that key routes too, and so does an UPDATE, whose old
    // tenant (it may move the row) the map gives.
    let by_key = catalog.tables.iter().any(|t| match &t.scope {
        TableScope::Tenant(Route::Via {
            parent,
            parent_columns,
            ..
        }) => {
            catalog.tables[*parent].qualified() == name
                && parent_columns.iter().all(|c| carried.contains(c))
        }
        _ => false,
    });
    let needed: BTreeSet<&String> = catalog.route_columns(table).iter().collect();
    if !needed.is_subset(&carried) && !by_key {
        push(
            Level::Warning,
            &name,
            format!(
                "its replica identity, {described}, lacks ({}): the tenant a row had before an UPDATE or a DELETE cannot be known (an UPDATE may move it to another tenant), and capture stops at the first one",
                join(&needed)
            ),
            fix,
        );
    }
}

/// The columns an old row carries under `identity`; `None`: all of them (FULL).
fn identity_columns(identity: &ReplicaIdentity) -> Option<&[String]> {
    match identity {
        ReplicaIdentity::Full => None,
        ReplicaIdentity::Nothing => Some(&[]),
        ReplicaIdentity::Default(cols) | ReplicaIdentity::Index(cols) => Some(cols),
    }
}

fn describe_identity(identity: &ReplicaIdentity) -> String {
    match identity {
        ReplicaIdentity::Full => "REPLICA IDENTITY FULL".into(),
        ReplicaIdentity::Nothing => "REPLICA IDENTITY NOTHING".into(),
        ReplicaIdentity::Default(cols) if cols.is_empty() => {
            "no primary key and default replica identity".into()
        }
        ReplicaIdentity::Default(cols) => format!("primary key ({})", cols.join(", ")),
        ReplicaIdentity::Index(cols) => format!("identity index ({})", cols.join(", ")),
    }
}

fn join(columns: &BTreeSet<&String>) -> String {
    columns
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

async fn leading_index_columns(
    client: &Client,
    schemas: &[String],
) -> Result<Vec<(String, Vec<String>)>, SourceError> {
    let rows = client
        .query(
            "SELECT n.nspname || '.' || c.relname,
                    array(SELECT a.attname::text FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(num, ord)
                            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.num ORDER BY k.ord)
               FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = ANY($1) AND i.indpred IS NULL",
            &[&schemas],
        )
        .await
        .map_err(query_context("reading indexes"))?;
    Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
}
