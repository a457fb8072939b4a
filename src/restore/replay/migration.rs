//! Schema changes in the stream (`source::ddl`), applied to the recovery database at their
//! place between the changes they separate.
//!
//! The triggers describe each table as a command left it, naming columns by number. The
//! replay follows the source's tables from the snapshot on (the manifest gives the numbers
//! then, the recovery database the rest), and turns each new description into the statements
//! that make the recovery table the same: a column whose number stays and whose name changes
//! was renamed; a new number was added, and the rows already there hold what the source gave
//! them (`attmissingval`), not what the default would give today.
//!
//! What shapes rows (tables, columns, keys, CHECK constraints, indexes, sequences) is applied
//! in place. Foreign keys, policies and row level security are what the restore creates after
//! the replay, from the snapshot's schema: for the tables a schema change touched, the restore
//! creates them as the source had them at the restore point instead ([`foreign_keys`],
//! [`row_security`]).
//!
//! A type change that rewrote the table is repeated with the same cast on the same values.
//! What would give rows values the stream does not carry — a `USING` expression, a volatile
//! default, a table filled by `CREATE TABLE … AS` — is refused at its place, naming the
//! statement and its time: a restore before it is exact, one after it needs a later snapshot. Commands on objects that hold no rows and that the snapshot's schema does not
//! give (views, functions, triggers, grants) are not replayed and are reported as such.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, SecondsFormat, Utc};
use tokio_postgres::Client;

use crate::pg::{qualified, quote_ident, quote_literal};
use crate::repository::manifest::TableEntry;
use crate::source::ddl::{
    ColumnDefinition, Command, ConstraintDefinition, Dropped, PolicyDefinition, SchemaEvent,
    TableDefinition,
};

use super::ReplayError;
use crate::restore::schema::{Entry, Skipped};

/// Constraint kinds the recovery database holds during the replay. Foreign keys come after
/// it (a replay fires nothing), with the policies: see [`foreign_keys`].
const REPLAYED_CONSTRAINTS: [&str; 4] = ["p", "u", "c", "x"];

/// The source's tables as the replay has followed them.
#[derive(Debug, Default)]
pub(super) struct Migrations {
    /// The backed-up schemas: what happens elsewhere is not the restore's business.
    schemas: HashSet<String>,
    /// At the snapshot, by source oid: (schema, name, column numbers by name).
    snapshot: HashMap<u32, (String, String, BTreeMap<String, i16>)>,
    /// Tables a schema change has touched, by source oid, as they are now.
    current: HashMap<u32, Followed>,
    /// Tables of the snapshot dropped since, by source oid.
    dropped: HashSet<u32>,
    /// What was replayed, and what was not, for the report.
    pub(super) report: Vec<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct Followed {
    schema: String,
    name: String,
    columns: BTreeMap<i16, ColumnDefinition>,
    constraints: BTreeMap<String, ConstraintDefinition>,
    policies: Vec<PolicyDefinition>,
    row_security: bool,
    force_row_security: bool,
}

impl Followed {
    fn sql(&self) -> String {
        qualified(&self.schema, &self.name)
    }

    fn from_definition(t: &TableDefinition) -> Self {
        Followed {
            schema: t.schema.clone(),
            name: t.name.clone(),
            columns: t.columns.iter().map(|c| (c.attnum, c.clone())).collect(),
            constraints: t
                .constraints
                .iter()
                .map(|c| (c.name.clone(), c.clone()))
                .collect(),
            policies: t.policies.clone(),
            row_security: t.row_security,
            force_row_security: t.force_row_security,
        }
    }
}

/// What the replay did to the snapshot's tables, for what the restore does after it.
#[derive(Debug, Default, Clone)]
pub struct FollowedSchema {
    /// Snapshot tables by `schema.name` at the snapshot → `Some((schema, name))` now, `None`
    /// dropped; tables a schema change did not touch are absent.
    pub renamed: BTreeMap<String, Option<(String, String)>>,
    /// Tables created after the snapshot and still there: (schema, name).
    pub created: Vec<(String, String)>,
    /// Every table a schema change touched, as the source had it at the restore point, with
    /// its `schema.name` at the snapshot (`None`: created since).
    tables: Vec<(Option<String>, Followed)>,
}

impl FollowedSchema {
    /// What became of the snapshot's table `display` (`schema.name`): `None` untouched,
    /// `Some(None)` dropped, `Some(Some((schema, name)))` its name now.
    pub fn now(&self, display: &str) -> Option<Option<(String, String)>> {
        self.renamed.get(display).cloned()
    }
}

impl Migrations {
    pub(super) fn new(tables: &[TableEntry]) -> Self {
        Migrations {
            schemas: tables.iter().map(|t| t.schema.clone()).collect(),
            snapshot: tables
                .iter()
                .filter(|t| !t.attnums.is_empty())
                .filter_map(|t| {
                    t.oid
                        .map(|oid| (oid, (t.schema.clone(), t.name.clone(), t.attnums.clone())))
                })
                .collect(),
            ..Default::default()
        }
    }

    pub(super) fn followed(&self) -> FollowedSchema {
        let mut renamed = BTreeMap::new();
        let mut created = Vec::new();
        for (oid, t) in &self.current {
            match self.snapshot.get(oid) {
                Some((schema, name, _)) => {
                    renamed.insert(
                        format!("{schema}.{name}"),
                        Some((t.schema.clone(), t.name.clone())),
                    );
                }
                None => created.push((t.schema.clone(), t.name.clone())),
            }
        }
        for oid in &self.dropped {
            if let Some((schema, name, _)) = self.snapshot.get(oid) {
                renamed.insert(format!("{schema}.{name}"), None);
            }
        }
        created.sort();
        let tables = self
            .current
            .iter()
            .map(|(oid, t)| {
                let at_snapshot = self.snapshot.get(oid).map(|(s, n, _)| format!("{s}.{n}"));
                (at_snapshot, t.clone())
            })
            .collect();
        FollowedSchema {
            renamed,
            created,
            tables,
        }
    }

    /// Applies one message of the triggers at `time`, its transaction's commit time.
    pub(super) async fn apply(
        &mut self,
        client: &Client,
        event: &SchemaEvent,
        time: DateTime<Utc>,
    ) -> Result<(), ReplayError> {
        let when = time.to_rfc3339_opts(SecondsFormat::Micros, true);
        let ours =
            |schema: &Option<String>| schema.as_ref().is_some_and(|s| self.schemas.contains(s));
        match event {
            SchemaEvent::Failed { tag, error } => {
                return Err(ReplayError::SchemaChange {
                    statement: tag.clone(),
                    time: when,
                    reason: format!(
                        "the source's schema-change trigger could not describe it ({error})"
                    ),
                });
            }
            SchemaEvent::IncompleteMove { table, .. } => {
                return Err(ReplayError::IncompleteMove {
                    table: table.clone(),
                    time: when,
                });
            }
            SchemaEvent::Rewrite {
                tag, schema, name, ..
            } => {
                if let Some(reason) = event.unrepeatable_rewrite()
                    && self.schemas.contains(schema)
                {
                    return Err(ReplayError::SchemaChange {
                        statement: format!("{tag} {schema}.{name}"),
                        time: when,
                        reason: format!("it rewrote every row: {reason}"),
                    });
                }
            }
            // Capture stores them as the UPDATEs (DELETEs and INSERTs) they are.
            SchemaEvent::Rows { .. } | SchemaEvent::Moved { .. } => {}
            SchemaEvent::Drop {
                tag,
                dropped,
                tables,
            } => {
                let dropped: Vec<&Dropped> = dropped
                    .iter()
                    .filter(|d| d.original && ours(&d.schema))
                    .collect();
                for object in dropped {
                    self.drop(client, tag, object, &when).await?;
                }
                for table in tables {
                    if self.schemas.contains(&table.schema) {
                        let identity = format!("{}.{}", table.schema, table.name);
                        self.table(client, tag, &identity, table, &when).await?;
                    }
                }
            }
            SchemaEvent::Command { tag, commands } => {
                let commands: Vec<&Command> = commands.iter().filter(|c| ours(&c.schema)).collect();
                // Sequences first: a new table's default may use one.
                for command in &commands {
                    self.sequence(client, command, &when).await?;
                }
                for command in commands {
                    if let Some(table) = &command.table {
                        self.table(client, &command.tag, &command.identity, table, &when)
                            .await?;
                    }
                    match (command.object_type.as_str(), &command.index) {
                        ("index", Some(definition)) if command.tag == "CREATE INDEX" => {
                            self.create_index(client, command, definition, &when)
                                .await?
                        }
                        // Followed through their table's definition, or made by it.
                        (
                            "table" | "table column" | "table constraint" | "policy" | "sequence"
                            | "index",
                            _,
                        ) => {}
                        _ => self.not_replayed(tag, &command.identity, &when),
                    }
                }
            }
        }
        Ok(())
    }

    fn not_replayed(&mut self, tag: &str, identity: &str, when: &str) {
        self.report.push(format!(
            "{when} {tag} {identity}: not replayed (holds no rows)"
        ));
    }

    async fn drop(
        &mut self,
        client: &Client,
        tag: &str,
        object: &Dropped,
        when: &str,
    ) -> Result<(), ReplayError> {
        let [schema, name] = object.address.as_slice() else {
            // Parts of a table (column, constraint, policy, default): its definition follows.
            if !matches!(
                object.object_type.as_str(),
                "table column" | "table constraint" | "policy" | "default value"
            ) {
                self.not_replayed(tag, &object.identity, when);
            }
            return Ok(());
        };
        let sql = match object.object_type.as_str() {
            "table" => format!("DROP TABLE IF EXISTS {} CASCADE", qualified(schema, name)),
            "index" => format!("DROP INDEX IF EXISTS {}", qualified(schema, name)),
            "sequence" => format!("DROP SEQUENCE IF EXISTS {}", qualified(schema, name)),
            _ => {
                self.not_replayed(tag, &object.identity, when);
                return Ok(());
            }
        };
        if object.object_type == "table" {
            let named = |s: &String, n: &String| s == schema && n == name;
            let followed = self
                .current
                .iter()
                .find(|(_, t)| named(&t.schema, &t.name))
                .map(|(oid, _)| *oid);
            let at_snapshot = self
                .snapshot
                .iter()
                .find(|(oid, (s, n, _))| named(s, n) && !self.current.contains_key(oid))
                .map(|(oid, _)| *oid);
            if let Some(oid) = followed.or(at_snapshot) {
                self.current.remove(&oid);
                self.dropped.insert(oid);
            }
        }
        execute(client, &object.identity, &sql).await?;
        self.report.push(format!("{when} {sql}"));
        Ok(())
    }

    async fn sequence(
        &mut self,
        client: &Client,
        command: &Command,
        when: &str,
    ) -> Result<(), ReplayError> {
        let Some(sequence) = &command.sequence else {
            return Ok(());
        };
        // An identity column's sequence is made with its column.
        if sequence.identity
            || command.tag == "ALTER SEQUENCE"
            || exists(client, &command.identity).await?
        {
            return Ok(());
        }
        // An object identity is SQL: `schema.name`, each part quoted where it needs to be.
        let sql = format!(
            "CREATE SEQUENCE {} {}",
            command.identity, sequence.definition
        );
        execute(client, &command.identity, &sql).await?;
        self.report.push(format!("{when} {sql}"));
        Ok(())
    }

    async fn create_index(
        &mut self,
        client: &Client,
        command: &Command,
        definition: &str,
        when: &str,
    ) -> Result<(), ReplayError> {
        // An index a constraint made (a primary key's) is there already.
        if !exists(client, &command.identity).await? {
            execute(client, &command.identity, definition).await?;
            self.report.push(format!("{when} {definition}"));
        }
        Ok(())
    }

    /// Makes the recovery table what `after` describes.
    async fn table(
        &mut self,
        client: &Client,
        tag: &str,
        identity: &str,
        after: &TableDefinition,
        when: &str,
    ) -> Result<(), ReplayError> {
        let refuse = |reason: String| ReplayError::SchemaChange {
            statement: format!("{tag} {identity}"),
            time: when.to_string(),
            reason,
        };
        let before = match self.current.get(&after.oid) {
            Some(t) => Some(t.clone()),
            None => self.at_snapshot(client, after.oid).await?,
        };
        if before.is_none() && after.partition_of.is_some() && tag != "CREATE TABLE" {
            // A partition's columns are its parent's, and follow them.
            return Ok(());
        }
        let target = Followed::from_definition(after);
        let statements = match before {
            None if tag == "CREATE TABLE" => create_table(&target, after),
            None => {
                return Err(refuse(match tag {
                    "CREATE TABLE AS" | "SELECT INTO" => {
                        "it filled a new table with rows the change stream does not carry".into()
                    }
                    _ => "the table is not in the snapshot this restore starts from, whose manifest predates schema-change capture".into(),
                }));
            }
            Some(before) => alter_table(&before, &target).map_err(refuse)?,
        };
        for sql in &statements {
            execute(client, identity, sql).await?;
            self.report.push(format!("{when} {sql}"));
        }
        self.current.insert(after.oid, target);
        Ok(())
    }

    /// The table as the snapshot has it: column numbers from the manifest, the rest from the
    /// recovery database (created from the snapshot's schema). `None`: not in the snapshot.
    async fn at_snapshot(
        &self,
        client: &Client,
        oid: u32,
    ) -> Result<Option<Followed>, ReplayError> {
        if self.dropped.contains(&oid) {
            return Ok(None);
        }
        let Some((schema, name, attnums)) = self.snapshot.get(&oid) else {
            return Ok(None);
        };
        let sql = qualified(schema, name);
        let db = |e: tokio_postgres::Error| ReplayError::database(&sql, "reading the catalog", &e);
        // Types and expressions spelled as the triggers spell them (schema-qualified).
        let saved: String = client
            .query_one(
                "SELECT current_setting('search_path'), set_config('search_path', 'pg_catalog', false)",
                &[],
            )
            .await
            .map_err(db)?
            .get(0);
        let columns = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                        pg_get_expr(d.adbin, d.adrelid), nullif(a.attgenerated::text, ''),
                        nullif(a.attidentity::text, '')
                   FROM pg_attribute a
                   LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                  WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                &[&sql],
            )
            .await;
        let constraints = client
            .query(
                "SELECT conname::text, contype::text, pg_get_constraintdef(oid)
                   FROM pg_constraint WHERE conrelid = $1::text::regclass",
                &[&sql],
            )
            .await;
        client
            .query_one("SELECT set_config('search_path', $1, false)", &[&saved])
            .await
            .map_err(db)?;
        let mut followed = Followed {
            schema: schema.clone(),
            name: name.clone(),
            columns: BTreeMap::new(),
            constraints: BTreeMap::new(),
            policies: Vec::new(),
            row_security: false,
            force_row_security: false,
        };
        for row in columns.map_err(db)? {
            let name: String = row.get(0);
            let Some(&attnum) = attnums.get(&name) else {
                return Err(ReplayError::Database {
                    table: sql.clone(),
                    op: "following a schema change",
                    message: format!("column {name} is not in the snapshot's manifest"),
                });
            };
            followed.columns.insert(
                attnum,
                ColumnDefinition {
                    attnum,
                    name,
                    type_name: row.get(1),
                    not_null: row.get(2),
                    default: row.get(3),
                    missing: None,
                    generated: row.get(4),
                    identity: row.get(5),
                },
            );
        }
        for row in constraints.map_err(db)? {
            let c = ConstraintDefinition {
                name: row.get(0),
                kind: row.get(1),
                definition: row.get(2),
            };
            followed.constraints.insert(c.name.clone(), c);
        }
        Ok(Some(followed))
    }
}

/// Post-data entries of the snapshot's schema that [`foreign_keys`] and [`row_security`]
/// replace for a table a schema change touched.
const RECONCILED: [&str; 3] = ["FK CONSTRAINT", "POLICY", "ROW SECURITY"];

impl FollowedSchema {
    /// Whether `entry` of the snapshot's post-data is one of those [`foreign_keys`] and
    /// [`row_security`] make instead, as the source had them at the restore point.
    pub fn replaces(&self, entry: &Entry) -> bool {
        RECONCILED.contains(&entry.kind.as_str())
            && self.tables.iter().any(|(snapshot, _)| {
                snapshot.as_ref().is_some_and(|name| {
                    let label = format!("{} {name}", entry.kind);
                    entry.label == label || entry.label.starts_with(&format!("{label} "))
                })
            })
    }
}

/// The foreign keys of every table a schema change touched, as the source had them at the
/// restore point (in place of the snapshot's: [`FollowedSchema::replaces`]); before row level
/// security is enabled anywhere, as the snapshot's are. What the target refuses is returned, as
/// the snapshot's own statements are.
pub async fn foreign_keys(client: &Client, followed: &FollowedSchema) -> Vec<Skipped> {
    let statements = followed.tables.iter().flat_map(|(_, t)| {
        t.constraints
            .values()
            .filter(|c| c.kind == "f")
            .map(|c| add_constraint(t, c))
    });
    each(client, statements).await
}

/// The policies and row level security of every table a schema change touched, as the source
/// had them at the restore point; after the snapshot's.
pub async fn row_security(client: &Client, followed: &FollowedSchema) -> Vec<Skipped> {
    let statements = followed.tables.iter().flat_map(|(_, t)| {
        let table = t.sql();
        t.policies
            .iter()
            .map(|p| {
                format!(
                    "CREATE POLICY {} ON {table} {}",
                    quote_ident(&p.name),
                    p.definition
                )
            })
            .chain([format!(
                "ALTER TABLE {table} {} ROW LEVEL SECURITY, {} ROW LEVEL SECURITY",
                if t.row_security { "ENABLE" } else { "DISABLE" },
                if t.force_row_security {
                    "FORCE"
                } else {
                    "NO FORCE"
                },
            )])
            .collect::<Vec<_>>()
    });
    each(client, statements).await
}

/// Runs each statement in its own implicit transaction, like the snapshot's: one the target
/// refuses (a role a policy names that does not exist there) is returned, not fatal.
async fn each(client: &Client, statements: impl Iterator<Item = String>) -> Vec<Skipped> {
    let mut refused = Vec::new();
    for sql in statements {
        if let Err(e) = client.batch_execute(&sql).await {
            let error = crate::pg::sqlstate::describe(&e);
            tracing::warn!(%sql, %error, "not recreated in the recovery database");
            refused.push(Skipped { entry: sql, error });
        }
    }
    refused
}

async fn exists(client: &Client, identity: &str) -> Result<bool, ReplayError> {
    Ok(client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&identity])
        .await
        .map_err(|e| ReplayError::database(identity, "reading the catalog", &e))?
        .get(0))
}

async fn execute(client: &Client, object: &str, sql: &str) -> Result<(), ReplayError> {
    tracing::debug!(%sql, "schema change replayed");
    client
        .batch_execute(sql)
        .await
        .map_err(|e| ReplayError::database(object, "a schema change", &e))
}

fn column_sql(c: &ColumnDefinition) -> String {
    let mut sql = format!("{} {}", quote_ident(&c.name), c.type_name);
    match (&c.generated, &c.identity, &c.default) {
        (Some(_), _, Some(expression)) => {
            sql.push_str(&format!(" GENERATED ALWAYS AS ({expression}) STORED"))
        }
        (_, Some(identity), _) => sql.push_str(if identity == "a" {
            " GENERATED ALWAYS AS IDENTITY"
        } else {
            " GENERATED BY DEFAULT AS IDENTITY"
        }),
        (_, _, Some(default)) => sql.push_str(&format!(" DEFAULT {default}")),
        _ => {}
    }
    if c.not_null {
        sql.push_str(" NOT NULL");
    }
    sql
}

fn create_table(t: &Followed, definition: &TableDefinition) -> Vec<String> {
    let mut statements = vec![match (&definition.partition_of, &definition.bound) {
        (Some(parent), Some(bound)) => {
            format!("CREATE TABLE {} PARTITION OF {parent} {bound}", t.sql())
        }
        _ => {
            let columns: Vec<String> = t.columns.values().map(column_sql).collect();
            let partitioned = definition
                .partition_key
                .as_ref()
                .map(|key| format!(" PARTITION BY {key}"))
                .unwrap_or_default();
            format!(
                "CREATE TABLE {} ({}){partitioned}",
                t.sql(),
                columns.join(", ")
            )
        }
    }];
    // A partition inherits its parent's constraints.
    if definition.partition_of.is_none() {
        for c in t.constraints.values() {
            if REPLAYED_CONSTRAINTS.contains(&c.kind.as_str()) {
                statements.push(add_constraint(t, c));
            }
        }
    }
    statements
}

fn add_constraint(t: &Followed, c: &ConstraintDefinition) -> String {
    format!(
        "ALTER TABLE {} ADD CONSTRAINT {} {}",
        t.sql(),
        quote_ident(&c.name),
        c.definition
    )
}

/// The statements that make `before` into `after`; an error says why it cannot be done.
fn alter_table(before: &Followed, after: &Followed) -> Result<Vec<String>, String> {
    let mut statements = Vec::new();
    let mut table = before.sql();
    if before.schema != after.schema {
        statements.push(format!(
            "ALTER TABLE {table} SET SCHEMA {}",
            quote_ident(&after.schema)
        ));
        table = qualified(&after.schema, &before.name);
    }
    if before.name != after.name {
        statements.push(format!(
            "ALTER TABLE {table} RENAME TO {}",
            quote_ident(&after.name)
        ));
    }
    let table = after.sql();
    let replayed = |c: &ConstraintDefinition| REPLAYED_CONSTRAINTS.contains(&c.kind.as_str());
    let changed = |c: &ConstraintDefinition| {
        after
            .constraints
            .get(&c.name)
            .is_none_or(|new| new.definition != c.definition)
    };
    // Constraints that went or changed first: a dropped column may be in one.
    for c in before
        .constraints
        .values()
        .filter(|c| replayed(c) && changed(c))
    {
        statements.push(format!(
            "ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {}",
            quote_ident(&c.name)
        ));
    }
    for (attnum, old) in &before.columns {
        if !after.columns.contains_key(attnum) {
            statements.push(format!(
                "ALTER TABLE {table} DROP COLUMN {}",
                quote_ident(&old.name)
            ));
        }
    }
    for (attnum, new) in &after.columns {
        let column = quote_ident(&new.name);
        let Some(old) = before.columns.get(attnum) else {
            statements.extend(add_column(&table, new)?);
            continue;
        };
        if old.name != new.name {
            statements.push(format!(
                "ALTER TABLE {table} RENAME COLUMN {} TO {column}",
                quote_ident(&old.name)
            ));
        }
        if (&old.generated, &old.identity) != (&new.generated, &new.identity) {
            return Err(format!(
                "column {} changed between generated, identity and plain",
                new.name
            ));
        }
        if old.type_name != new.type_name {
            // The source converted each value with this cast (a USING expression is refused
            // at its rewrite), or kept it as it was (a binary-coercible change).
            statements.push(format!(
                "ALTER TABLE {table} ALTER COLUMN {column} TYPE {} USING {column}::{}",
                new.type_name, new.type_name
            ));
        }
        if old.default != new.default && new.generated.is_none() {
            statements.push(match &new.default {
                Some(default) => {
                    format!("ALTER TABLE {table} ALTER COLUMN {column} SET DEFAULT {default}")
                }
                None => format!("ALTER TABLE {table} ALTER COLUMN {column} DROP DEFAULT"),
            });
        }
        if old.not_null != new.not_null {
            let verb = if new.not_null { "SET" } else { "DROP" };
            statements.push(format!(
                "ALTER TABLE {table} ALTER COLUMN {column} {verb} NOT NULL"
            ));
        }
    }
    for c in after.constraints.values().filter(|c| replayed(c)) {
        let same = before
            .constraints
            .get(&c.name)
            .is_some_and(|old| old.definition == c.definition);
        if !same {
            statements.push(add_constraint(after, c));
        }
    }
    Ok(statements)
}

/// A column added after the snapshot: rows already there get what the source gave them.
fn add_column(table: &str, c: &ColumnDefinition) -> Result<Vec<String>, String> {
    if c.generated.is_some() || c.identity.is_some() {
        // The source rewrote the table for it; had it not, the rewrite refusal came first.
        return Err(format!("column {} is generated or an identity", c.name));
    }
    let column = quote_ident(&c.name);
    let mut statements = match (&c.missing, &c.default) {
        // `attmissingval` is a one-element array of the column's type; as text[] its element
        // is the value's text, which the type's input reads back (arrays included).
        (Some(missing), default) => vec![
            format!(
                "ALTER TABLE {table} ADD COLUMN {column} {} DEFAULT ({}::text[])[1]::{}",
                c.type_name,
                quote_literal(missing),
                c.type_name
            ),
            match default {
                Some(d) => format!("ALTER TABLE {table} ALTER COLUMN {column} SET DEFAULT {d}"),
                None => format!("ALTER TABLE {table} ALTER COLUMN {column} DROP DEFAULT"),
            },
        ],
        // No value kept for the rows there: the statement rewrote the table and wrote the
        // default into every row — the same value for a stable one, which this gives them
        // too; a volatile one's values follow as UPDATEs.
        (None, Some(default)) => vec![format!(
            "ALTER TABLE {table} ADD COLUMN {column} {} DEFAULT {default}",
            c.type_name
        )],
        (None, None) => vec![format!(
            "ALTER TABLE {table} ADD COLUMN {column} {}",
            c.type_name
        )],
    };
    if c.not_null {
        statements.push(format!(
            "ALTER TABLE {table} ALTER COLUMN {column} SET NOT NULL"
        ));
    }
    Ok(statements)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(attnum: i16, name: &str, type_name: &str) -> ColumnDefinition {
        ColumnDefinition {
            attnum,
            name: name.into(),
            type_name: type_name.into(),
            not_null: false,
            default: None,
            missing: None,
            generated: None,
            identity: None,
        }
    }

    fn table(columns: Vec<ColumnDefinition>) -> Followed {
        Followed {
            schema: "app".into(),
            name: "funds".into(),
            columns: columns.into_iter().map(|c| (c.attnum, c)).collect(),
            constraints: BTreeMap::new(),
            policies: Vec::new(),
            row_security: false,
            force_row_security: false,
        }
    }

    #[test]
    fn a_kept_number_is_a_rename_a_new_one_an_add() {
        let before = table(vec![column(1, "id", "bigint"), column(2, "v", "text")]);
        let mut region = column(4, "region", "text");
        region.not_null = true;
        region.default = Some("'eu'::text".into());
        region.missing = Some("{eu}".into());
        let after = table(vec![
            column(1, "id", "bigint"),
            column(2, "w", "text"),
            region,
        ]);
        assert_eq!(
            alter_table(&before, &after).unwrap(),
            [
                r#"ALTER TABLE "app"."funds" RENAME COLUMN "v" TO "w""#,
                r#"ALTER TABLE "app"."funds" ADD COLUMN "region" text DEFAULT ('{eu}'::text[])[1]::text"#,
                r#"ALTER TABLE "app"."funds" ALTER COLUMN "region" SET DEFAULT 'eu'::text"#,
                r#"ALTER TABLE "app"."funds" ALTER COLUMN "region" SET NOT NULL"#,
            ]
        );
    }

    #[test]
    fn a_number_gone_is_a_drop_and_a_new_name_a_table_rename() {
        let before = table(vec![column(1, "id", "bigint"), column(2, "v", "text")]);
        let mut after = table(vec![column(1, "id", "bigint")]);
        after.name = "fund".into();
        assert_eq!(
            alter_table(&before, &after).unwrap(),
            [
                r#"ALTER TABLE "app"."funds" RENAME TO "fund""#,
                r#"ALTER TABLE "app"."fund" DROP COLUMN "v""#,
            ]
        );
    }

    #[test]
    fn a_changed_constraint_is_dropped_before_and_added_after_the_columns() {
        let mut before = table(vec![column(1, "id", "bigint"), column(2, "v", "int")]);
        let check = |definition: &str| ConstraintDefinition {
            name: "v_positive".into(),
            kind: "c".into(),
            definition: definition.into(),
        };
        before
            .constraints
            .insert("v_positive".into(), check("CHECK ((v > 0))"));
        let mut after = table(vec![column(1, "id", "bigint"), column(2, "w", "int")]);
        after
            .constraints
            .insert("v_positive".into(), check("CHECK ((w > 0))"));
        assert_eq!(
            alter_table(&before, &after).unwrap(),
            [
                r#"ALTER TABLE "app"."funds" DROP CONSTRAINT IF EXISTS "v_positive""#,
                r#"ALTER TABLE "app"."funds" RENAME COLUMN "v" TO "w""#,
                r#"ALTER TABLE "app"."funds" ADD CONSTRAINT "v_positive" CHECK ((w > 0))"#,
            ]
        );
    }

    #[test]
    fn generated_and_identity_columns_added_later_are_refused() {
        let before = table(vec![column(1, "id", "bigint")]);
        let mut g = column(2, "g", "bigint");
        g.identity = Some("a".into());
        let after = table(vec![column(1, "id", "bigint"), g]);
        assert!(alter_table(&before, &after).is_err());
    }
}
