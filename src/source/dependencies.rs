//! What the configured schemas depend on outside themselves: extensions (also those installed
//! inside a configured schema), objects of other schemas, roles named in grants and policies.
//!
//! `pg_dump --schema` dumps only the objects of those schemas, and never an extension or its
//! members (it skips members even when they live in a dumped schema), so a dump of a schema
//! with an `hstore` column restores only where `hstore` was created first. What the dump's
//! objects reference is in `pg_depend` (and `pg_shdepend` for roles); reading it in the
//! snapshot's own transaction gives exactly what that snapshot's dump needs.
//!
//! Limits, as PostgreSQL records dependencies: the body of a function that is not
//! `BEGIN ATOMIC` is not tracked (a PL/pgSQL function calling another schema's function is
//! not seen), and neither are objects named in `search_path` settings.

use std::collections::{BTreeMap, BTreeSet};

use tokio_postgres::Client;

use super::{SourceError, query_context};
use crate::repository::manifest::{Dependencies, ExtensionDependency, ObjectDependency};

/// Every object of the configured schemas (`$1`), by catalog and oid, and the subset pg_dump
/// dumps (not extension members). Objects with a namespace of their own, and the sub-objects
/// of the schemas' tables (defaults, triggers, policies, rules) which `pg_depend` records
/// separately.
const OBJECTS: &str = "
WITH schemas AS (SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = ANY($1)),
inside (classid, objid) AS (
          SELECT 'pg_catalog.pg_namespace'::regclass, oid FROM schemas
UNION ALL SELECT 'pg_catalog.pg_class'::regclass, oid FROM pg_catalog.pg_class WHERE relnamespace IN (SELECT oid FROM schemas)
UNION ALL SELECT 'pg_catalog.pg_type'::regclass, oid FROM pg_catalog.pg_type WHERE typnamespace IN (SELECT oid FROM schemas)
UNION ALL SELECT 'pg_catalog.pg_proc'::regclass, oid FROM pg_catalog.pg_proc WHERE pronamespace IN (SELECT oid FROM schemas)
UNION ALL SELECT 'pg_catalog.pg_constraint'::regclass, oid FROM pg_catalog.pg_constraint WHERE connamespace IN (SELECT oid FROM schemas)
UNION ALL SELECT 'pg_catalog.pg_operator'::regclass, oid FROM pg_catalog.pg_operator WHERE oprnamespace IN (SELECT oid FROM schemas)
UNION ALL SELECT 'pg_catalog.pg_collation'::regclass, oid FROM pg_catalog.pg_collation WHERE collnamespace IN (SELECT oid FROM schemas)
UNION ALL SELECT 'pg_catalog.pg_conversion'::regclass, oid FROM pg_catalog.pg_conversion WHERE connamespace IN (SELECT oid FROM schemas)
UNION ALL SELECT 'pg_catalog.pg_opclass'::regclass, oid FROM pg_catalog.pg_opclass WHERE opcnamespace IN (SELECT oid FROM schemas)
UNION ALL SELECT 'pg_catalog.pg_opfamily'::regclass, oid FROM pg_catalog.pg_opfamily WHERE opfnamespace IN (SELECT oid FROM schemas)
UNION ALL SELECT 'pg_catalog.pg_ts_config'::regclass, oid FROM pg_catalog.pg_ts_config WHERE cfgnamespace IN (SELECT oid FROM schemas)
UNION ALL SELECT 'pg_catalog.pg_ts_dict'::regclass, oid FROM pg_catalog.pg_ts_dict WHERE dictnamespace IN (SELECT oid FROM schemas)
UNION ALL SELECT 'pg_catalog.pg_ts_parser'::regclass, oid FROM pg_catalog.pg_ts_parser WHERE prsnamespace IN (SELECT oid FROM schemas)
UNION ALL SELECT 'pg_catalog.pg_ts_template'::regclass, oid FROM pg_catalog.pg_ts_template WHERE tmplnamespace IN (SELECT oid FROM schemas)
UNION ALL SELECT 'pg_catalog.pg_statistic_ext'::regclass, oid FROM pg_catalog.pg_statistic_ext WHERE stxnamespace IN (SELECT oid FROM schemas)
UNION ALL SELECT 'pg_catalog.pg_default_acl'::regclass, oid FROM pg_catalog.pg_default_acl WHERE defaclnamespace IN (SELECT oid FROM schemas)
UNION ALL SELECT 'pg_catalog.pg_attrdef'::regclass, d.oid FROM pg_catalog.pg_attrdef d
            JOIN pg_catalog.pg_class c ON c.oid = d.adrelid WHERE c.relnamespace IN (SELECT oid FROM schemas)
UNION ALL SELECT 'pg_catalog.pg_trigger'::regclass, t.oid FROM pg_catalog.pg_trigger t
            JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid WHERE c.relnamespace IN (SELECT oid FROM schemas)
             -- The backup's own (source::moves): a restore leaves it out.
             AND t.tgname <> 'updog_backup_move'
UNION ALL SELECT 'pg_catalog.pg_policy'::regclass, p.oid FROM pg_catalog.pg_policy p
            JOIN pg_catalog.pg_class c ON c.oid = p.polrelid WHERE c.relnamespace IN (SELECT oid FROM schemas)
UNION ALL SELECT 'pg_catalog.pg_rewrite'::regclass, r.oid FROM pg_catalog.pg_rewrite r
            JOIN pg_catalog.pg_class c ON c.oid = r.ev_class WHERE c.relnamespace IN (SELECT oid FROM schemas)
),
members AS (
  SELECT classid, objid, refobjid AS extension FROM pg_catalog.pg_depend
   WHERE deptype = 'e' AND refclassid = 'pg_catalog.pg_extension'::regclass
),
dumped AS (
  SELECT i.classid, i.objid FROM inside i
   WHERE NOT EXISTS (SELECT FROM members m WHERE m.classid = i.classid AND m.objid = i.objid)
)";

/// What the dumped objects reference outside what is dumped, each with the extension it
/// belongs to, if any: a member itself, or an object internal to a member (an extension
/// type's array type is not a member, it belongs to its element type). Objects created by
/// initdb (oid below 16384, FirstNormalObjectId) exist in every database.
const REFERENCED: &str = "
, refs AS (
  SELECT d.refclassid, d.refobjid, min(pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid)) AS used_by
    FROM pg_catalog.pg_depend d JOIN dumped i ON i.classid = d.classid AND i.objid = d.objid
   WHERE d.deptype IN ('n', 'a', 'i') AND d.refobjid >= 16384
     AND NOT EXISTS (SELECT FROM dumped j WHERE j.classid = d.refclassid AND j.objid = d.refobjid)
   GROUP BY 1, 2
)
SELECT COALESCE(
         CASE WHEN r.refclassid = 'pg_catalog.pg_extension'::regclass THEN r.refobjid END,
         (SELECT m.extension FROM members m WHERE m.classid = r.refclassid AND m.objid = r.refobjid),
         (SELECT m.extension FROM pg_catalog.pg_depend p
            JOIN members m ON m.classid = p.refclassid AND m.objid = p.refobjid
           WHERE p.classid = r.refclassid AND p.objid = r.refobjid AND p.deptype = 'i' LIMIT 1)),
       o.type, o.schema, o.identity, r.used_by
  FROM refs r, LATERAL pg_catalog.pg_identify_object(r.refclassid, r.refobjid, 0) o
 ORDER BY o.identity";

/// Roles the dumped objects' privileges and policies name (owners are not restored:
/// pg_restore runs with `--no-owner`).
const ROLES: &str = "
SELECT DISTINCT r.rolname::text FROM pg_catalog.pg_shdepend s
  JOIN dumped i ON i.classid = s.classid AND i.objid = s.objid
  JOIN pg_catalog.pg_roles r ON r.oid = s.refobjid
 WHERE s.dbid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())
   AND s.refclassid = 'pg_catalog.pg_authid'::regclass AND s.deptype IN ('a', 'r')
 ORDER BY 1";

/// Every extension but those initdb creates (plpgsql), with the extensions it requires.
const EXTENSIONS: &str = "
SELECT e.oid, e.extname::text, e.extversion, n.nspname::text, n.nspname = ANY($1),
       ARRAY(SELECT d.refobjid FROM pg_catalog.pg_depend d
              WHERE d.classid = 'pg_catalog.pg_extension'::regclass AND d.objid = e.oid
                AND d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.deptype = 'n')
  FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
 WHERE e.oid >= 16384";

/// An installed extension, as [`order`] needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub oid: u32,
    pub dependency: ExtensionDependency,
    /// Installed into one of the configured schemas.
    pub in_schemas: bool,
    /// The extensions it requires (their oids).
    pub requires: Vec<u32>,
}

/// Reads what `schemas` depend on outside themselves. Run it in the snapshot's transaction,
/// so that it describes the snapshot's dump.
pub async fn find(client: &Client, schemas: &[String]) -> Result<Dependencies, SourceError> {
    let mut used = BTreeSet::new();
    let mut objects = Vec::new();
    for row in client
        .query(&format!("{OBJECTS}{REFERENCED}"), &[&schemas])
        .await
        .map_err(query_context(
            "reading what the schemas depend on (pg_depend)",
        ))?
    {
        match row.get::<_, Option<u32>>(0) {
            Some(extension) => {
                used.insert(extension);
            }
            None => objects.push(ObjectDependency {
                kind: row.get(1),
                schema: row.get(2),
                // NULL only for an object dropped while this ran (outside a snapshot).
                identity: row.get::<_, Option<String>>(3).unwrap_or_default(),
                used_by: row.get::<_, Option<String>>(4).unwrap_or_default(),
            }),
        }
    }
    let roles = client
        .query(&format!("{OBJECTS}{ROLES}"), &[&schemas])
        .await
        .map_err(query_context(
            "reading the roles grants and policies name (pg_shdepend)",
        ))?
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    let installed: Vec<Installed> = client
        .query(EXTENSIONS, &[&schemas])
        .await
        .map_err(query_context("reading the installed extensions"))?
        .into_iter()
        .map(|r| Installed {
            oid: r.get(0),
            dependency: ExtensionDependency {
                name: r.get(1),
                version: r.get(2),
                schema: r.get(3),
            },
            in_schemas: r.get(4),
            requires: r.get(5),
        })
        .collect();
    Ok(Dependencies {
        extensions: order(&installed, &used),
        objects,
        roles,
    })
}

/// The extensions a restore creates, in creation order: those the dump uses, those installed
/// into a configured schema (the schema "has" them whether or not a dumped object uses them),
/// and every extension those require, each after what it requires (PostgreSQL forbids
/// cycles); ties by name, so the order is stable.
pub fn order(installed: &[Installed], used: &BTreeSet<u32>) -> Vec<ExtensionDependency> {
    let by_oid: BTreeMap<u32, &Installed> = installed.iter().map(|e| (e.oid, e)).collect();
    let mut wanted: BTreeSet<u32> = installed
        .iter()
        .filter(|e| e.in_schemas)
        .map(|e| e.oid)
        .chain(used.iter().copied())
        .filter(|oid| by_oid.contains_key(oid))
        .collect();
    let mut pending: Vec<u32> = wanted.iter().copied().collect();
    while let Some(oid) = pending.pop() {
        for required in &by_oid[&oid].requires {
            if by_oid.contains_key(required) && wanted.insert(*required) {
                pending.push(*required);
            }
        }
    }
    let mut out = Vec::with_capacity(wanted.len());
    let mut done = BTreeSet::new();
    while done.len() < wanted.len() {
        let mut ready: Vec<&Installed> = wanted
            .iter()
            .filter(|oid| !done.contains(*oid))
            .map(|oid| by_oid[oid])
            .filter(|e| {
                e.requires
                    .iter()
                    .all(|r| done.contains(r) || !wanted.contains(r))
            })
            .collect();
        if ready.is_empty() {
            // Not reachable with a real catalog; never loop on a damaged one.
            ready = wanted
                .iter()
                .filter(|oid| !done.contains(*oid))
                .map(|oid| by_oid[oid])
                .collect();
        }
        ready.sort_by(|a, b| a.dependency.name.cmp(&b.dependency.name));
        let next = ready[0];
        done.insert(next.oid);
        out.push(next.dependency.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(oid: u32, name: &str, in_schemas: bool, requires: &[u32]) -> Installed {
        Installed {
            oid,
            dependency: ExtensionDependency {
                name: name.into(),
                version: "1.0".into(),
                schema: "public".into(),
            },
            in_schemas,
            requires: requires.to_vec(),
        }
    }

    fn names(list: &[ExtensionDependency]) -> Vec<&str> {
        list.iter().map(|e| e.name.as_str()).collect()
    }

    #[test]
    fn used_extensions_come_after_what_they_require() {
        let installed = [
            ext(1, "earthdistance", false, &[2]),
            ext(2, "cube", false, &[]),
            ext(3, "unused", false, &[]),
            ext(4, "citext", true, &[]),
            ext(5, "a_needs_z", false, &[6]),
            ext(6, "z", false, &[]),
        ];
        let used = BTreeSet::from([1, 5]);
        assert_eq!(
            names(&order(&installed, &used)),
            ["citext", "cube", "earthdistance", "z", "a_needs_z"]
        );
    }

    #[test]
    fn nothing_used_nothing_created() {
        let installed = [ext(1, "pgcrypto", false, &[])];
        assert!(order(&installed, &BTreeSet::new()).is_empty());
        // An oid that is not an installed extension (plpgsql, created by initdb) is left out.
        assert!(order(&installed, &BTreeSet::from([13_559])).is_empty());
    }
}
