//! The publication the change stream decodes: every tenant and global table, nothing else.
//!
//! Creating it takes ownership of the tables (or superuser for `FOR TABLES IN SCHEMA`), which
//! a least-privileged backup role does not have. So `init` creates it when it may and
//! otherwise prints the exact statement for the tables' owner, instead of asking for more
//! privileges than capture needs.

use std::collections::HashSet;

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::catalog::{Catalog, Table, TableScope};
use super::{SourceError, query_context};
use crate::pg::quote_ident;
use crate::pg::sqlstate;
use crate::retry::{Classify, ErrorClass};

#[derive(Debug, thiserror::Error)]
pub enum PublicationError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(
        "publication {name:?} does not exist and this role may not create it ({reason}). As the tables' owner (or a superuser), run:\n\n  {sql}\n\nthen run `updog-backup init` again"
    )]
    CannotCreate {
        name: String,
        reason: String,
        sql: String,
    },
    #[error(
        "publication {name:?} does not exist: run `updog-backup init`, or as the tables' owner:\n\n  {sql}"
    )]
    Missing { name: String, sql: String },
    #[error(
        "publication {name:?} lacks {}, whose changes would be missing from the stream: as the tables' owner, run:\n\n  {sql}\n\nthen run `updog-backup init` again",
        .missing.join(", ")
    )]
    Incomplete {
        name: String,
        /// Quoted, schema-qualified.
        missing: Vec<String>,
        sql: String,
    },
}

/// Tables the stream must see: tenant and global ones, sorted by name.
fn published(catalog: &Catalog) -> Vec<&Table> {
    let mut tables: Vec<&Table> = catalog
        .tables
        .iter()
        .filter(|t| matches!(t.scope, TableScope::Tenant(_) | TableScope::Global))
        .collect();
    tables.sort_by_key(|t| t.sql_name());
    tables
}

fn names(tables: &[&Table]) -> String {
    tables
        .iter()
        .map(|t| t.sql_name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The statement creating the publication. Through the partition root: a partitioned
/// table's changes then name it, as its snapshot does, rather than each partition; it changes
/// nothing for other tables.
fn create_sql(name: &str, tables: &[&Table]) -> String {
    format!(
        "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true);",
        quote_ident(name),
        names(tables)
    )
}

/// The publication's settings that decide what `pg_publication_tables` lists.
struct Settings {
    /// `FOR ALL TABLES`: tables cannot be added (every logged table is in it already).
    all_tables: bool,
    /// `publish_via_partition_root`: a published partitioned table is listed itself, else
    /// its leaf partitions are.
    via_root: bool,
}

async fn settings(client: &Client, name: &str) -> Result<Option<Settings>, PublicationError> {
    Ok(client
        .query_opt(
            "SELECT puballtables, pubviaroot FROM pg_catalog.pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await
        .map_err(query_context("looking up the publication"))?
        .map(|row| Settings {
            all_tables: row.get(0),
            via_root: row.get(1),
        }))
}

/// Makes sure the publication exists and covers every table the catalog backs up. Returns
/// whether it was created now.
pub async fn ensure(
    client: &Client,
    name: &str,
    catalog: &Catalog,
) -> Result<bool, PublicationError> {
    if settings(client, name).await?.is_none() {
        let sql = create_sql(name, &published(catalog));
        return match client.batch_execute(&sql).await {
            Ok(()) => Ok(true),
            Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
                Err(PublicationError::CannotCreate {
                    name: name.into(),
                    reason: sqlstate::describe(&e),
                    sql,
                })
            }
            Err(e) => Err(SourceError::Query {
                context: format!("creating publication {name}"),
                source: e,
            }
            .into()),
        };
    }
    verify(client, name, catalog).await.map(|()| false)
}

/// Checks (never changes) that the publication exists and covers every table the catalog
/// backs up: a table left out would have its changes silently missing from the stream.
pub async fn verify(
    client: &Client,
    name: &str,
    catalog: &Catalog,
) -> Result<(), PublicationError> {
    let tables = published(catalog);
    let Some(settings) = settings(client, name).await? else {
        return Err(PublicationError::Missing {
            name: name.into(),
            sql: create_sql(name, &tables),
        });
    };
    let rows = client
        .query(
            "SELECT schemaname, tablename FROM pg_catalog.pg_publication_tables WHERE pubname = $1",
            &[&name],
        )
        .await
        .map_err(query_context("reading the publication's tables"))?;
    let listed: HashSet<String> = rows
        .iter()
        .map(|r| format!("{}.{}", quote_ident(r.get(0)), quote_ident(r.get(1))))
        .collect();
    // A partitioned table is listed itself through its root, else as its leaf partitions
    // (whose changes then name them: capture maps them to it). Without any partition, it is
    // not listed at all unless published through its root.
    let covered = |t: &Table| {
        listed.contains(&t.sql_name())
            || t.partitions.as_ref().is_some_and(|partitions| {
                !partitions.is_empty() && partitions.iter().all(|p| listed.contains(&p.sql_name()))
            })
    };
    let missing: Vec<&Table> = tables.into_iter().filter(|t| !covered(t)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(PublicationError::Incomplete {
        name: name.into(),
        sql: completion_sql(name, &settings, &missing),
        missing: missing.iter().map(|t| t.sql_name()).collect(),
    })
}

/// The statements that make the publication list `missing`, in an order PostgreSQL accepts.
fn completion_sql(name: &str, settings: &Settings, missing: &[&Table]) -> String {
    let publication = quote_ident(name);
    // An unlogged table writes no WAL: no publication accepts it until it is logged (which
    // rewrites it), and then a FOR ALL TABLES one lists it by itself.
    let mut statements: Vec<String> = missing
        .iter()
        .filter(|t| t.unlogged)
        .map(|t| format!("ALTER TABLE {} SET LOGGED;", t.sql_name()))
        .collect();
    if !settings.via_root && missing.iter().any(|t| t.partitions.is_some()) {
        statements.push(format!(
            "ALTER PUBLICATION {publication} SET (publish_via_partition_root = true);"
        ));
    }
    if !settings.all_tables {
        // A partitioned table without partitions may be a member already (PostgreSQL would
        // refuse to add it again); through the root, the statement above makes it listed.
        let add: Vec<&Table> = missing
            .iter()
            .filter(|t| settings.via_root || !t.partitions.as_ref().is_some_and(Vec::is_empty))
            .copied()
            .collect();
        if !add.is_empty() {
            statements.push(format!(
                "ALTER PUBLICATION {publication} ADD TABLE {};",
                names(&add)
            ));
        }
    }
    statements.join("\n")
}

impl Classify for PublicationError {
    fn class(&self) -> ErrorClass {
        match self {
            PublicationError::Source(e) => e.class(),
            // The message holds the statement for the tables' owner to run.
            PublicationError::CannotCreate { .. }
            | PublicationError::Missing { .. }
            | PublicationError::Incomplete { .. } => ErrorClass::Usage,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::catalog::{Partition, ReplicaIdentity, Route};

    fn table(name: &str, partitions: Option<&[&str]>, unlogged: bool) -> Table {
        Table {
            schema: "m".into(),
            name: name.into(),
            columns: Vec::new(),
            replica_identity: ReplicaIdentity::Full,
            row_security: false,
            can_select: true,
            unlogged,
            partitions: partitions.map(|names| {
                names
                    .iter()
                    .map(|n| Partition {
                        schema: "m".into(),
                        name: n.to_string(),
                        replica_identity: ReplicaIdentity::Full,
                    })
                    .collect()
            }),
            scope: TableScope::Tenant(Route::Direct {
                column: "organization_id".into(),
            }),
            oid: 0,
            attnums: Default::default(),
        }
    }

    #[test]
    fn a_for_all_tables_publication_is_never_asked_to_add_a_table() {
        let (events, unlogged) = (table("events", Some(&[]), false), table("u", None, true));
        let settings = Settings {
            all_tables: true,
            via_root: false,
        };
        assert_eq!(
            completion_sql("pub", &settings, &[&events, &unlogged]),
            "ALTER TABLE \"m\".\"u\" SET LOGGED;\n\
             ALTER PUBLICATION \"pub\" SET (publish_via_partition_root = true);"
        );
    }

    #[test]
    fn a_for_table_publication_adds_tables_once_they_can_be_added() {
        let events = table("events", Some(&["events_p0"]), false);
        let unlogged = table("u", None, true);
        let settings = Settings {
            all_tables: false,
            via_root: false,
        };
        assert_eq!(
            completion_sql("pub", &settings, &[&events, &unlogged]),
            "ALTER TABLE \"m\".\"u\" SET LOGGED;\n\
             ALTER PUBLICATION \"pub\" SET (publish_via_partition_root = true);\n\
             ALTER PUBLICATION \"pub\" ADD TABLE \"m\".\"events\", \"m\".\"u\";"
        );
        // Without partitions it may be a member already: only the setting lists it.
        let empty = table("empty", Some(&[]), false);
        assert_eq!(
            completion_sql("pub", &settings, &[&empty]),
            "ALTER PUBLICATION \"pub\" SET (publish_via_partition_root = true);"
        );
    }

    #[test]
    fn the_publication_is_created_through_partition_roots() {
        let (orgs, events) = (
            table("orgs", None, false),
            table("events", Some(&["p0"]), false),
        );
        assert_eq!(
            create_sql("p\"ub", &[&events, &orgs]),
            "CREATE PUBLICATION \"p\"\"ub\" FOR TABLE \"m\".\"events\", \"m\".\"orgs\" WITH (publish_via_partition_root = true);"
        );
    }
}
