//! What the tenant's schema needs from outside its own schemas, in the recovery database.
//!
//! The manifest records it (`depends_on`): the dump (`pg_dump --schema`) holds no extension,
//! not even one installed inside a dumped schema, so every `hstore` column would fail with
//! `type "public.hstore" does not exist`. Before anything is created, the restore refuses a
//! snapshot whose schema uses objects that are neither in its schemas nor in an extension, and
//! a target that cannot create one of its extensions (not installed there, not in the
//! source's version, or untrusted and the restore role no superuser). Then, before the dump's
//! pre-data, it creates each extension's schema and the extension, in the source's version.

use std::collections::BTreeSet;

use tokio_postgres::Client;

use super::RestoreError;
use super::schema::Entry;
use crate::pg::{quote_ident, quote_literal};
use crate::repository::manifest::Dependencies;
use crate::source::extensions::{self, ExtensionProblem};
use crate::source::query_context;

/// Refuses a schema that depends on objects no restore can recreate: pg_dump left them out,
/// and no extension brings them.
pub fn check_outside_objects(depends_on: &Dependencies) -> Result<(), RestoreError> {
    let objects = &depends_on.objects;
    if objects.is_empty() {
        return Ok(());
    }
    let schemas: BTreeSet<&str> = objects.iter().filter_map(|o| o.schema.as_deref()).collect();
    let mut advice = Vec::new();
    if !schemas.is_empty() {
        advice.push(format!(
            "add {} to source.schemas (or move what uses them into the backed-up schemas), take a new snapshot (`updog-backup backup`) and restore from it",
            schemas
                .iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if objects.iter().any(|o| o.schema.is_none()) {
        advice.push(
            "objects that belong to no schema (casts, foreign servers, languages…) are never in a schema dump: provide them through an extension, or stop using them in source.schemas"
                .to_string(),
        );
    }
    Err(RestoreError::OutsideSchemas {
        objects: objects
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
        advice: advice.join("; "),
    })
}

/// Asks the target, before CREATE DATABASE, whether it can create every extension.
pub async fn check_target(
    maintenance: &Client,
    target: &str,
    depends_on: &Dependencies,
) -> Result<(), RestoreError> {
    if depends_on.extensions.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = depends_on
        .extensions
        .iter()
        .map(|e| e.name.clone())
        .collect();
    let support = extensions::server_support(maintenance, &names)
        .await
        .map_err(query_context(
            "asking the restore target which extensions it has",
        ))?;
    let problems = extensions::problems(&depends_on.extensions, &support);
    if problems.is_empty() {
        tracing::debug!(extensions = ?names, "the restore target can create every extension");
        return Ok(());
    }
    Err(RestoreError::Extensions {
        target: target.to_string(),
        extensions: problems
            .iter()
            .map(ExtensionProblem::extension)
            .collect::<Vec<_>>()
            .join(", "),
        problems: problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
    })
}

/// The pre-data to run: each extension's schema and the extension first, then the dump's
/// entries without the `CREATE SCHEMA` of the schemas just created (pg_restore would fail on
/// a schema that exists; the schema's comment and grants are entries of their own and stay).
/// `IF NOT EXISTS` because `public` comes with every database, and a schema that is not backed
/// up is created empty, for the extension alone.
pub fn before_pre_data(depends_on: &Dependencies, pre_data: Vec<Entry>) -> Vec<Entry> {
    let mut out = Vec::with_capacity(pre_data.len() + 2 * depends_on.extensions.len());
    let mut created: BTreeSet<&str> = BTreeSet::new();
    for extension in &depends_on.extensions {
        let schema = extension.schema.as_str();
        if schema != "pg_catalog" && created.insert(schema) {
            out.push(Entry {
                label: format!("SCHEMA {schema}"),
                kind: "SCHEMA".into(),
                name: schema.into(),
                sql: format!("CREATE SCHEMA IF NOT EXISTS {};\n", quote_ident(schema)),
            });
        }
        out.push(Entry {
            label: format!("EXTENSION {} {}", extension.name, extension.version),
            kind: "EXTENSION".into(),
            name: extension.name.clone(),
            sql: format!(
                "CREATE EXTENSION IF NOT EXISTS {} SCHEMA {} VERSION {};\n",
                quote_ident(&extension.name),
                quote_ident(schema),
                quote_literal(&extension.version)
            ),
        });
    }
    out.extend(
        pre_data
            .into_iter()
            .filter(|e| !(e.kind == "SCHEMA" && created.contains(e.name.as_str()))),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::manifest::{ExtensionDependency, ObjectDependency};

    fn entry(kind: &str, name: &str, sql: &str) -> Entry {
        Entry {
            label: format!("{kind} {name}"),
            kind: kind.into(),
            name: name.into(),
            sql: sql.into(),
        }
    }

    fn extension(name: &str, schema: &str) -> ExtensionDependency {
        ExtensionDependency {
            name: name.into(),
            version: "1.6".into(),
            schema: schema.into(),
        }
    }

    #[test]
    fn extensions_come_first_and_their_schemas_are_created_once() {
        let depends_on = Dependencies {
            extensions: vec![
                extension("citext", "app"),
                extension("hstore", "public"),
                extension("uuid-ossp", "public"),
                extension("adminpack", "pg_catalog"),
            ],
            ..Default::default()
        };
        let pre = vec![
            entry("SCHEMA", "app", "CREATE SCHEMA app;\n"),
            entry("COMMENT", "SCHEMA app", "COMMENT ON SCHEMA app IS 'x';\n"),
            entry("SCHEMA", "audit", "CREATE SCHEMA audit;\n"),
            entry(
                "TABLE",
                "contacts",
                "CREATE TABLE app.contacts (email app.citext);\n",
            ),
        ];
        let sql: Vec<String> = before_pre_data(&depends_on, pre)
            .into_iter()
            .map(|e| e.sql.trim().to_string())
            .collect();
        assert_eq!(
            sql,
            [
                r#"CREATE SCHEMA IF NOT EXISTS "app";"#,
                r#"CREATE EXTENSION IF NOT EXISTS "citext" SCHEMA "app" VERSION '1.6';"#,
                r#"CREATE SCHEMA IF NOT EXISTS "public";"#,
                r#"CREATE EXTENSION IF NOT EXISTS "hstore" SCHEMA "public" VERSION '1.6';"#,
                r#"CREATE EXTENSION IF NOT EXISTS "uuid-ossp" SCHEMA "public" VERSION '1.6';"#,
                r#"CREATE EXTENSION IF NOT EXISTS "adminpack" SCHEMA "pg_catalog" VERSION '1.6';"#,
                "COMMENT ON SCHEMA app IS 'x';",
                "CREATE SCHEMA audit;",
                "CREATE TABLE app.contacts (email app.citext);",
            ]
        );
    }

    #[test]
    fn no_extension_leaves_the_dump_as_it_is() {
        let pre = vec![entry("SCHEMA", "app", "CREATE SCHEMA app;\n")];
        let out = before_pre_data(&Dependencies::default(), pre);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].sql, "CREATE SCHEMA app;\n");
    }

    #[test]
    fn objects_outside_the_schemas_are_refused_with_the_way_out() {
        assert!(check_outside_objects(&Dependencies::default()).is_ok());
        let depends_on = Dependencies {
            objects: vec![
                ObjectDependency {
                    kind: "type".into(),
                    schema: Some("util".into()),
                    identity: "util.money".into(),
                    used_by: "column amount of table app.funds".into(),
                },
                ObjectDependency {
                    kind: "cast".into(),
                    schema: None,
                    identity: "(integer AS app.mood)".into(),
                    used_by: "view app.v".into(),
                },
            ],
            ..Default::default()
        };
        let error = check_outside_objects(&depends_on).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("type util.money (used by column amount of table app.funds)")
                && message.contains(r#"add "util" to source.schemas"#)
                && message.contains("belong to no schema"),
            "{message}"
        );
        assert_eq!(
            crate::retry::Classify::class(&error),
            crate::retry::ErrorClass::Usage
        );
    }
}
