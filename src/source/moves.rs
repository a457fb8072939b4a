//! Rows that change tenant without changing: the children of a parent row moved to another
//! tenant.
//!
//! A table that reaches its tenant through a foreign key follows its parent row: when the
//! parent's route changes (`UPDATE funds SET organization_id = …`), every row below it belongs
//! to the new tenant, though none of them changed, so the change stream does not carry them.
//! The old tenant's restore would keep them and the new one's would lack them.
//!
//! So each table other tables route through gets a statement trigger (generated here from the
//! catalog's routes, installed with the schema-change triggers) that, when an UPDATE changed
//! the route of some of its rows, emits the rows below them, table by table from the top, as
//! logical messages in the same transaction right after the UPDATE. Capture stores each as a
//! DELETE for the tenant it left and an INSERT for the one it joined (`capture::router`).
//!
//! The triggers hold no dependency on any column (a statement trigger with transition tables,
//! the comparison in the function's body), so no migration of the application fails because
//! of them; a body that no longer fits the tables (a column renamed) emits a `failed` message
//! instead of failing the UPDATE, and restores refuse from there until the next snapshot.

use std::collections::BTreeMap;

use tokio_postgres::Client;

use super::catalog::{Catalog, Route, Table, TableScope};
use super::{SourceError, query_context};
use crate::pg::quote_ident;

/// The name of the trigger on every table other tables route through.
pub const TRIGGER: &str = "updog_backup_move";

/// Rows per message.
const ROWS_PER_MESSAGE: usize = 1000;

/// The tables other tables route through (by catalog index), each with the tables below it,
/// parents before children.
pub fn parents(catalog: &Catalog) -> BTreeMap<usize, Vec<usize>> {
    let mut children: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, t) in catalog.tables.iter().enumerate() {
        if let TableScope::Tenant(Route::Via { parent, .. }) = &t.scope
            && *parent != i
        {
            children.entry(*parent).or_default().push(i);
        }
    }
    children
        .keys()
        .map(|&p| {
            // Breadth first: a table's rows are emitted after those of its parent.
            let mut below = Vec::new();
            let mut next = vec![p];
            while !next.is_empty() {
                let mut level = Vec::new();
                for t in next {
                    for &c in children.get(&t).into_iter().flatten() {
                        if c != p && !below.contains(&c) {
                            below.push(c);
                            level.push(c);
                        }
                    }
                }
                next = level;
            }
            (p, below)
        })
        .collect()
}

/// The function each parent's trigger runs.
fn function_name(parent: &Table) -> String {
    format!("updog_backup_ddl.move_{}", parent.oid)
}

fn columns(alias: &str, names: &[String]) -> String {
    names
        .iter()
        .map(|c| format!("{alias}.{}", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The source of the function of `parent`'s trigger (what `pg_proc.prosrc` then holds).
fn body(catalog: &Catalog, parent: usize, below: &[usize]) -> String {
    let p = &catalog.tables[parent];
    // The rows whose route changed, with the keys their children reference: what the new rows
    // hold and the old did not. A set difference, not a join of old and new rows: linear in
    // the rows updated whatever the planner guesses of the transition tables (an EXISTS over
    // their join ran a nested loop: hours for a 100,000-row UPDATE).
    let mut wanted: Vec<String> = catalog.route_columns(p).to_vec();
    for &c in below {
        if let TableScope::Tenant(Route::Via {
            parent: q,
            parent_columns,
            ..
        }) = &catalog.tables[c].scope
            && *q == parent
        {
            for column in parent_columns {
                if !wanted.contains(column) {
                    wanted.push(column.clone());
                }
            }
        }
    }
    let list = columns("t", &wanted);
    let moved = format!(
        "SELECT {list} FROM updog_backup_new t EXCEPT SELECT {list} FROM updog_backup_old t"
    );
    let mut out = String::new();
    out.push_str(&format!(
        "
DECLARE
  messages text[] := '{{}}';
  message text;
BEGIN
  BEGIN
    IF NOT EXISTS ({moved}) THEN
      RETURN NULL;
    END IF;
    messages := ARRAY[jsonb_build_object('version', 1, 'event', 'moved', 'tag', TG_OP,
                                         'parent', TG_RELID::int8)::text];
"
    ));
    for &d in below {
        let table = &catalog.tables[d];
        out.push_str(&format!(
            "    messages := messages || ARRAY(
      SELECT updog_backup_ddl.moved_message(TG_OP, TG_RELID, {oid}, jsonb_agg(r.t))
        FROM (SELECT d0::text AS t, (row_number() OVER () - 1) / {ROWS_PER_MESSAGE} AS g
                FROM {name} d0 WHERE {condition}) r
       GROUP BY r.g ORDER BY r.g);
",
            oid = table.oid,
            name = table.sql_name(),
            condition = condition(catalog, d, parent, &moved, 0),
        ));
    }
    out.push_str(
        "  EXCEPTION WHEN OTHERS THEN
    -- Never the application's UPDATE fails because of us: restores refuse from here instead.
    messages := ARRAY[jsonb_build_object('version', 1, 'event', 'failed', 'tag', TG_OP,
      'error', format('the rows below the moved rows of %s could not be read (%s): run `updog-backup schema-triggers` again',
                      TG_RELID::regclass, SQLERRM))::text];
  END;
  -- Outside the block: logical decoding keeps a subtransaction's lone messages out of place.
  FOREACH message IN ARRAY messages LOOP
    PERFORM pg_logical_emit_message(true, 'updog-backup/ddl', message);
  END LOOP;
  RETURN NULL;
END
",
    );
    out
}

/// Which rows of table `d` (alias `d{depth}`) are below the moved rows of `parent`.
fn condition(catalog: &Catalog, d: usize, parent: usize, moved: &str, depth: usize) -> String {
    let TableScope::Tenant(Route::Via {
        columns: fk,
        parent: up,
        parent_columns,
        ..
    }) = &catalog.tables[d].scope
    else {
        unreachable!("tables below a parent route through it");
    };
    let alias = format!("d{depth}");
    if *up == parent {
        format!(
            "({}) IN (SELECT {} FROM ({moved}) mv)",
            columns(&alias, fk),
            columns("mv", parent_columns)
        )
    } else {
        let next = format!("d{}", depth + 1);
        format!(
            "({}) IN (SELECT {} FROM {} {next} WHERE {})",
            columns(&alias, fk),
            columns(&next, parent_columns),
            catalog.tables[*up].sql_name(),
            condition(catalog, *up, parent, moved, depth + 1)
        )
    }
}

/// The SQL that (re)creates every parent's trigger and function, and drops those of tables
/// that are no longer parents. Run by whoever may create triggers on the tables (their owner,
/// or a superuser), after `ddl.sql`.
pub fn script(catalog: &Catalog) -> String {
    let mut out = String::from(
        "-- updog-backup: the rows that move with a parent row moved to another tenant.
-- Generated from the source's routes: run `updog-backup schema-triggers` again after a
-- migration that adds a table reaching its tenant through another.
DO $$
DECLARE
  t record;
BEGIN
  FOR t IN SELECT tgrelid::regclass AS rel FROM pg_catalog.pg_trigger
            WHERE tgname = 'updog_backup_move' LOOP
    EXECUTE format('DROP TRIGGER updog_backup_move ON %s', t.rel);
  END LOOP;
  FOR t IN SELECT p.oid::regprocedure AS f FROM pg_catalog.pg_proc p
            JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname = 'updog_backup_ddl' AND p.proname LIKE 'move\\_%' LOOP
    EXECUTE format('DROP FUNCTION %s', t.f);
  END LOOP;
END
$$;
",
    );
    for (parent, below) in parents(catalog) {
        let p = &catalog.tables[parent];
        let function = function_name(p);
        let body = body(catalog, parent, &below);
        // A dollar quote no identifier in the body holds.
        let mut quote = "$body$".to_string();
        while body.contains(&quote) {
            quote.insert(1, '_');
        }
        out.push_str(&format!(
            "
CREATE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog
  -- Values as exact as pgoutput's whatever the updating session set.
  SET extra_float_digits = 3 SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'postgres'
  SET bytea_output = 'hex' AS {quote}{body}{quote};
CREATE TRIGGER {TRIGGER} AFTER UPDATE ON {}
  REFERENCING OLD TABLE AS updog_backup_old NEW TABLE AS updog_backup_new
  FOR EACH STATEMENT EXECUTE FUNCTION {function}();
",
            p.sql_name(),
        ));
    }
    out
}

/// The tables other tables route through whose trigger is missing or out of date (their
/// children's moves are then not captured), by qualified name.
pub async fn missing(client: &Client, catalog: &Catalog) -> Result<Vec<String>, SourceError> {
    let rows = client
        .query(
            "SELECT t.tgrelid::int8, p.prosrc
               FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid
              WHERE t.tgname = $1 AND t.tgenabled <> 'D'",
            &[&TRIGGER],
        )
        .await
        .map_err(query_context("looking up the triggers of parent moves"))?;
    let installed: BTreeMap<u32, String> = rows
        .iter()
        .map(|r| (r.get::<_, i64>(0) as u32, r.get(1)))
        .collect();
    Ok(parents(catalog)
        .into_iter()
        .filter(|(p, below)| {
            let t = &catalog.tables[*p];
            installed.get(&t.oid) != Some(&body(catalog, *p, below))
        })
        .map(|(p, _)| catalog.tables[p].qualified())
        .collect())
}
