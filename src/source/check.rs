//! `check`: a preflight report of everything the product needs from the source, with the SQL
//! that fixes each problem; and of what a restore will need from `restore.target_url` (its
//! major version, the extensions the schemas use), found on day one rather than during the
//! incident. It only reads; it changes nothing.

use std::collections::BTreeSet;
use std::fmt;

use serde::Serialize;
use tokio_postgres::Client;

use super::catalog::{Catalog, ReplicaIdentity, Route, Table, TableScope};
use super::{SourceError, dependencies, extensions, pg_tools, query_context};
use crate::config::Config;
use crate::pg::{connect, quote_ident};
use crate::repository::manifest::Dependencies;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    /// Worth knowing, nothing to fix (e.g. the restore target was not reachable from here).
    Note,
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

/// How a superuser installs the schema-change triggers.
pub const SCHEMA_TRIGGERS_FIX: &str =
    "updog-backup schema-triggers | psql --set ON_ERROR_STOP=1 -d <the source database>";

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub source: String,
    pub role: String,
    pub tables: Vec<TableReport>,
    /// What the schemas use outside themselves (what a restore must find or create).
    pub depends_on: Dependencies,
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
        let depends_on = &self.depends_on;
        if !depends_on.is_empty() {
            writeln!(f, "\noutside the schemas:")?;
            for e in &depends_on.extensions {
                writeln!(
                    f,
                    "  extension {} {} in schema {}",
                    e.name, e.version, e.schema
                )?;
            }
            for o in &depends_on.objects {
                writeln!(f, "  {o}  [in no extension: not restorable]")?;
            }
            if !depends_on.roles.is_empty() {
                writeln!(
                    f,
                    "  role(s) named in grants and policies: {}",
                    depends_on.roles.join(", ")
                )?;
            }
        }
        writeln!(f, "\nfindings:")?;
        for finding in &self.findings {
            let mark = match finding.level {
                Level::Ok => "ok     ",
                Level::Note => "note   ",
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
    let unmoved = super::moves::missing(&client, &catalog).await?;
    if !unmoved.is_empty() {
        push(
            Level::Warning,
            "parent moves",
            format!(
                "{} other tables reach their tenant through have no current trigger: when an UPDATE moves one of their rows to another tenant, the rows below it are not captured with it, and restores of both tenants after it are refused until the next snapshot. A superuser (or the tables' owner) runs `{SCHEMA_TRIGGERS_FIX}`, again after each migration that adds such a table",
                unmoved.join(", ")
            ),
            None,
        );
    }
    if super::ddl::installed(&client).await? {
        push(
            Level::Ok,
            "schema changes",
            "captured into the change stream (event triggers updog_backup_ddl_*): restores follow migrations".into(),
            None,
        );
    } else {
        push(
            Level::Warning,
            "schema changes",
            format!(
                "not captured (no event triggers): a restore to an instant after a migration of a backed-up table is refused until a snapshot is taken after it. init installs the triggers when its role may; otherwise a superuser runs `{SCHEMA_TRIGGERS_FIX}`"
            ),
            None,
        );
    }
    for finding in identity_problems(&catalog) {
        push(
            finding.level,
            &finding.subject,
            finding.message,
            finding.fix,
        );
    }
    let leading = leading_index_columns(&client, &config.source.schemas).await?;
    let sizes = table_sizes(&client, &config.source.schemas).await?;
    let tenants = tenant_estimate(&catalog, &sizes);
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
                        "no index leads with ({}): each tenant's export scans the whole table{}",
                        needed.join(", "),
                        scan_cost(sizes.get(&name), tenants)
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
    let depends_on = dependencies::find(&client, &config.source.schemas).await?;
    dependency_findings(&depends_on, &config.source.schemas, &mut push);
    if let Some(url) = &config.restore.target_url {
        target_findings(url, version as u32, &depends_on, &mut push).await;
    }

    let mut report = CheckReport {
        source: format!(
            "{} (database {database})",
            crate::pg::redact_url(&config.source.url)
        ),
        role,
        tables,
        depends_on,
        findings,
    };
    report.findings.sort_by_key(|f| std::cmp::Reverse(f.level));
    Ok(report)
}

/// What restores will have to provide outside the schemas: extensions (created by the
/// restore), objects in no extension (which make every restore refuse), roles.
fn dependency_findings(
    depends_on: &Dependencies,
    schemas: &[String],
    push: &mut impl FnMut(Level, &str, String, Option<String>),
) {
    if !depends_on.extensions.is_empty() {
        push(
            Level::Ok,
            "extensions",
            format!(
                "{}: a restore creates them before the schema (trusted ones need no superuser)",
                depends_on
                    .extensions
                    .iter()
                    .map(|e| format!("{} {} (schema {})", e.name, e.version, e.schema))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None,
        );
    }
    if !depends_on.objects.is_empty() {
        let missing: BTreeSet<&str> = depends_on
            .objects
            .iter()
            .filter_map(|o| o.schema.as_deref())
            .filter(|s| !schemas.iter().any(|c| c == s))
            .collect();
        let fix = (!missing.is_empty()).then(|| {
            let all: Vec<String> = schemas
                .iter()
                .map(String::as_str)
                .chain(missing.iter().copied())
                .map(|s| format!("{s:?}"))
                .collect();
            format!("[source]\nschemas = [{}]", all.join(", "))
        });
        push(
            Level::Error,
            "dependencies",
            format!(
                "the schemas use {} outside source.schemas and in no extension: pg_dump --schema leaves them out, so restores will be refused until a snapshot includes their schema",
                depends_on
                    .objects
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            fix,
        );
    }
    if !depends_on.roles.is_empty() {
        push(
            Level::Ok,
            "roles",
            format!(
                "grants and policies name {}: a restore target without these roles skips those grants and policies, and the restore lists each",
                depends_on.roles.join(", ")
            ),
            None,
        );
    }
}

/// What `restore.target_url` will make of a restore: its major version against the source's,
/// and whether it can create every extension. Only a note when it cannot be reached from here
/// (the restore role's credentials may live elsewhere).
async fn target_findings(
    url: &str,
    source_version: u32,
    depends_on: &Dependencies,
    push: &mut impl FnMut(Level, &str, String, Option<String>),
) {
    const SUBJECT: &str = "restore target";
    let shown = crate::pg::redact_url(url);
    let client = match connect(url).await {
        Ok(client) => client,
        Err(e) => {
            push(
                Level::Note,
                SUBJECT,
                format!(
                    "{shown} is not reachable from here ({e}): its version and extensions were not checked"
                ),
                None,
            );
            return;
        }
    };
    let names: Vec<String> = depends_on
        .extensions
        .iter()
        .map(|e| e.name.clone())
        .collect();
    let support = match extensions::server_support(&client, &names).await {
        Ok(support) => support,
        Err(e) => {
            push(
                Level::Note,
                SUBJECT,
                format!(
                    "{shown}: could not read its version and extensions ({}): not checked",
                    crate::pg::sqlstate::describe(&e)
                ),
                None,
            );
            return;
        }
    };
    let (source_major, target_major) = (source_version / 10000, support.major());
    if target_major != source_major {
        let consequence = if target_major < source_major {
            "a dump of a newer server may use what an older one cannot create: restores can fail"
        } else {
            "a restore there is also a major upgrade (extension versions may be missing, behaviour may differ): rehearse one there"
        };
        push(
            Level::Warning,
            SUBJECT,
            format!(
                "{shown} runs PostgreSQL {target_major}, the source {source_major}: {consequence}"
            ),
            Some(format!(
                "restore.target_url = a PostgreSQL {source_major} server"
            )),
        );
    }
    if !depends_on.roles.is_empty() {
        match client
            .query(
                "SELECT r FROM unnest($1::text[]) r WHERE r NOT IN (SELECT rolname FROM pg_catalog.pg_roles) ORDER BY 1",
                &[&depends_on.roles],
            )
            .await
        {
            Ok(rows) if !rows.is_empty() => push(
                Level::Note,
                SUBJECT,
                format!(
                    "{shown} has no role {}: a restore there leaves out the grants and policies that name them (and lists them)",
                    rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>().join(", ")
                ),
                None,
            ),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %crate::pg::sqlstate::describe(&e), "reading the restore target's roles"),
        }
    }
    let problems = extensions::problems(&depends_on.extensions, &support);
    for problem in &problems {
        push(Level::Warning, SUBJECT, format!("{shown}: {problem}"), None);
    }
    if target_major == source_major && problems.is_empty() {
        push(
            Level::Ok,
            SUBJECT,
            format!(
                "{shown}: PostgreSQL {target_major}{}",
                if names.is_empty() {
                    String::new()
                } else {
                    format!(", can create {}", names.join(", "))
                }
            ),
            None,
        );
    }
}

/// What would stop capture, or make the source refuse the application's own UPDATEs and
/// DELETEs once a table is published: errors in `check`, and what `init` and the daemon refuse
/// to start on, before they create a publication or a slot.
pub fn identity_problems(catalog: &Catalog) -> Vec<Finding> {
    let mut found = Vec::new();
    let mut push = |level, subject: &str, message, fix| {
        found.push(Finding {
            level,
            subject: subject.into(),
            message,
            fix,
        })
    };
    // Global tables too: the publication covers them, so the source refuses their UPDATEs
    // and DELETEs just the same without a replica identity.
    for table in &catalog.tables {
        if matches!(table.scope, TableScope::Tenant(_) | TableScope::Global) {
            identity_findings(catalog, table, &mut push);
        }
    }
    found
}

/// The tables [`identity_problems`] found: `init` and the daemon start on none of them.
#[derive(Debug, thiserror::Error)]
pub struct ReplicaIdentityError(pub Vec<Finding>);

impl fmt::Display for ReplicaIdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} table(s) cannot be captured as they are, so nothing was started (`updog-backup check` lists every finding):",
            self.0.len()
        )?;
        for finding in &self.0 {
            writeln!(f, "  {}: {}", finding.subject, finding.message)?;
        }
        writeln!(f, "\nAs the tables' owner, run:\n")?;
        for fix in self.0.iter().filter_map(|finding| finding.fix.as_deref()) {
            for line in fix.lines() {
                writeln!(f, "  {line}")?;
            }
        }
        write!(
            f,
            "\nthen run this command again (README, \"Replica identities\", says what each choice costs)"
        )
    }
}

impl crate::retry::Classify for ReplicaIdentityError {
    /// The source's set-up changes, not the environment.
    fn class(&self) -> crate::retry::ErrorClass {
        crate::retry::ErrorClass::Usage
    }
}

/// Refuses a catalog with [`identity_problems`].
pub fn refuse_identity_problems(catalog: &Catalog) -> Result<(), ReplicaIdentityError> {
    let found = identity_problems(catalog);
    if found.is_empty() {
        Ok(())
    } else {
        Err(ReplicaIdentityError(found))
    }
}

/// Rows and bytes (the planner's estimate, the heap's size) of every table in the schemas,
/// and the distinct values of each column the statistics know (`pg_stats.n_distinct`).
struct Sizes {
    tables: std::collections::HashMap<String, (f64, i64)>,
    distinct: std::collections::HashMap<(String, String), f64>,
}

impl Sizes {
    fn get(&self, table: &str) -> Option<(f64, i64)> {
        self.tables.get(table).copied()
    }
}

async fn table_sizes(client: &Client, schemas: &[String]) -> Result<Sizes, SourceError> {
    let rows = client
        .query(
            "SELECT n.nspname || '.' || c.relname, c.reltuples::float8,
                    CASE WHEN c.relkind = 'p'
                         THEN (SELECT coalesce(sum(pg_relation_size(p.relid)), 0)::int8
                                 FROM pg_partition_tree(c.oid) p)
                         ELSE pg_relation_size(c.oid) END
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = ANY($1) AND c.relkind IN ('r', 'p') AND NOT c.relispartition",
            &[&schemas],
        )
        .await
        .map_err(query_context("reading table sizes"))?;
    let tables = rows
        .into_iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let rows = client
        .query(
            "SELECT schemaname || '.' || tablename, attname::text, n_distinct::float8
               FROM pg_stats WHERE schemaname = ANY($1)",
            &[&schemas],
        )
        .await
        .map_err(query_context("reading column statistics"))?;
    let distinct = rows
        .into_iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    Ok(Sizes { tables, distinct })
}

/// How many tenants the statistics suggest: the most distinct tenant values of any table that
/// carries the column (`None` before the tables were analyzed).
fn tenant_estimate(catalog: &Catalog, sizes: &Sizes) -> Option<f64> {
    catalog
        .tables
        .iter()
        .filter_map(|t| match &t.scope {
            TableScope::Tenant(Route::Direct { column }) => {
                let name = t.qualified();
                let n = *sizes.distinct.get(&(name.clone(), column.clone()))?;
                // Negative: a fraction of the rows (PostgreSQL's convention).
                Some(if n < 0.0 { -n * sizes.get(&name)?.0 } else { n })
            }
            _ => None,
        })
        .reduce(f64::max)
        .filter(|n| *n >= 1.0)
}

/// What a table without an index on its route costs a snapshot, as far as the planner's
/// estimates tell: empty when they tell nothing.
fn scan_cost(size: Option<(f64, i64)>, tenants: Option<f64>) -> String {
    let Some((rows, bytes)) = size.filter(|(rows, _)| *rows > 0.0) else {
        return String::new();
    };
    let mut out = format!(" (~{} rows, {})", rows.round(), megabytes(bytes));
    if let Some(tenants) = tenants {
        let reads = tenants.round();
        out.push_str(&format!(
            ", once for each of ~{reads} tenants: a snapshot reads ~{} of it",
            megabytes((bytes as f64 * reads) as i64)
        ));
    }
    out
}

fn megabytes(bytes: i64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
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
            Level::Error,
            &name,
            format!(
                "its replica identity, {described}, lacks ({}): the tenant a row had before an UPDATE or a DELETE cannot be known (an UPDATE may move it to another tenant), so capture would stop at the first one; REPLICA IDENTITY FULL, or for wide rows a unique index on its key and ({}) as its identity (README, \"Replica identities\")",
                join(&needed),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::manifest::{ExtensionDependency, ObjectDependency};

    fn findings(depends_on: &Dependencies) -> Vec<Finding> {
        let mut out = Vec::new();
        dependency_findings(
            depends_on,
            &["app".into(), "audit".into()],
            &mut |level, subject: &str, message, fix| {
                out.push(Finding {
                    level,
                    subject: subject.into(),
                    message,
                    fix,
                })
            },
        );
        out
    }

    #[test]
    fn an_object_outside_the_schemas_is_an_error_with_the_schemas_that_fix_it() {
        let depends_on = Dependencies {
            extensions: vec![ExtensionDependency {
                name: "hstore".into(),
                version: "1.8".into(),
                schema: "public".into(),
            }],
            objects: vec![ObjectDependency {
                kind: "type".into(),
                schema: Some("public".into()),
                identity: "public.colour".into(),
                used_by: "column colour of table app.users".into(),
            }],
            roles: vec![],
        };
        let found = findings(&depends_on);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].level, Level::Ok);
        assert!(found[0].message.contains("hstore 1.8 (schema public)"));
        assert_eq!(found[1].level, Level::Error);
        assert!(
            found[1]
                .message
                .contains("type public.colour (used by column colour of table app.users)"),
            "{}",
            found[1].message
        );
        assert_eq!(
            found[1].fix.as_deref(),
            Some("[source]\nschemas = [\"app\", \"audit\", \"public\"]")
        );
    }

    #[test]
    fn nothing_outside_the_schemas_nothing_to_say() {
        assert!(findings(&Dependencies::default()).is_empty());
    }
}
