//! The publication the change stream decodes: every tenant and global table, nothing else.
//!
//! Creating it takes ownership of the tables (or superuser for `FOR TABLES IN SCHEMA`), which
//! a least-privileged backup role does not have. So `init` creates it when it may and
//! otherwise prints the exact statement for the tables' owner, instead of asking for more
//! privileges than capture needs.

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;

use super::catalog::{Catalog, TableScope, quote_ident};
use super::{SourceError, describe_db_error, query_context};

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
        "publication {name:?} lacks {missing}, whose changes would be missing from the stream: as the tables' owner, run:\n\n  {sql}\n\nthen run `updog-backup init` again"
    )]
    Incomplete {
        name: String,
        missing: String,
        sql: String,
    },
}

/// Tables the stream must see: tenant and global ones (sorted, quoted).
fn published(catalog: &Catalog) -> Vec<String> {
    let mut tables: Vec<String> = catalog
        .tables
        .iter()
        .filter(|t| matches!(t.scope, TableScope::Tenant(_) | TableScope::Global))
        .map(|t| t.sql_name())
        .collect();
    tables.sort();
    tables
}

async fn exists(client: &Client, name: &str) -> Result<bool, PublicationError> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await
        .map_err(query_context("looking up the publication"))?
        .is_some())
}

/// Makes sure the publication exists and covers every table the catalog backs up. Returns
/// whether it was created now.
pub async fn ensure(
    client: &Client,
    name: &str,
    catalog: &Catalog,
) -> Result<bool, PublicationError> {
    let tables = published(catalog);
    if !exists(client, name).await? {
        let sql = format!(
            "CREATE PUBLICATION {} FOR TABLE {};",
            quote_ident(name),
            tables.join(", ")
        );
        return match client.batch_execute(&sql).await {
            Ok(()) => Ok(true),
            Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
                Err(PublicationError::CannotCreate {
                    name: name.into(),
                    reason: describe_db_error(&e),
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
    if !exists(client, name).await? {
        return Err(PublicationError::Missing {
            name: name.into(),
            sql: format!(
                "CREATE PUBLICATION {} FOR TABLE {};",
                quote_ident(name),
                tables.join(", ")
            ),
        });
    }
    let rows = client
        .query(
            "SELECT schemaname, tablename FROM pg_catalog.pg_publication_tables WHERE pubname = $1",
            &[&name],
        )
        .await
        .map_err(query_context("reading the publication's tables"))?;
    let have: std::collections::HashSet<String> = rows
        .iter()
        .map(|r| format!("{}.{}", quote_ident(r.get(0)), quote_ident(r.get(1))))
        .collect();
    let missing: Vec<String> = tables.into_iter().filter(|t| !have.contains(t)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(PublicationError::Incomplete {
        name: name.into(),
        missing: missing.join(", "),
        sql: format!(
            "ALTER PUBLICATION {} ADD TABLE {};",
            quote_ident(name),
            missing.join(", ")
        ),
    })
}
