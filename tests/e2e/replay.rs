//! Replay of captured changes into a recovery database, against the real PostgreSQL.
//!
//! Most tests build pgoutput messages by hand (the shapes PostgreSQL sends: Relation before use,
//! old key tuples only on key changes, `'u'` for unchanged TOASTed values, full old rows with
//! REPLICA IDENTITY FULL), apply them inside BEGIN…COMMIT and compare the resulting rows as text.
//! One test replays what a real pgoutput slot decoded from a workload onto a copy of the
//! database taken before it, and expects the copy to equal the source afterwards.
//!
//! One file of ~1,250 lines on purpose: its tests share the hand-built message helpers at the
//! top, and each is a short table of one change kind against one column or key shape.

use std::time::Instant;

use bytes::Bytes;
use tokio_postgres::{Client, SimpleQueryMessage};
use updog_backup::pg::pgoutput::{
    self, Column, Context, Delete, Insert, Message, OldTuple, ProtocolVersion, Relation,
    ReplicaIdentity, Truncate, Tuple, Update, Value,
};
use updog_backup::restore::replay::{ReplayError, ReplayStats, Replayer};

use crate::support::postgres;

const SCHEMA: &str = r#"
CREATE SCHEMA app;
CREATE TYPE app.mood AS ENUM ('ok', 'sad', 'it''s odd');
CREATE DOMAIN app.positive AS int CHECK (VALUE > 0);
CREATE TABLE app.orgs (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    note text,
    budget numeric(14,4),
    meta jsonb,
    tags text[],
    created timestamptz,
    name_len int GENERATED ALWAYS AS (length(name)) STORED
);
CREATE TABLE app.items (
    id bigserial PRIMARY KEY,
    org uuid NOT NULL,
    title text UNIQUE,
    qty int,
    body text
);
ALTER TABLE app.items ALTER COLUMN body SET STORAGE EXTERNAL;
CREATE TABLE app.lines (
    org uuid,
    item bigint,
    n app.positive,
    amount numeric,
    PRIMARY KEY (org, item, n)
);
CREATE TABLE app.events (org uuid, kind text, payload json, at timestamptz);
CREATE TABLE app.feelings (id int PRIMARY KEY, mood app.mood DEFAULT 'ok');
ALTER TABLE app.events REPLICA IDENTITY FULL;
CREATE TABLE app.counters (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, label text);
CREATE SCHEMA "we.ird";
CREATE TABLE "we.ird"."Tab""le" ("Key" int PRIMARY KEY, "va lue" text);
"#;

// Relation oids as a source would number them (unrelated to the target's).
const ORGS: u32 = 16_401;
const ITEMS: u32 = 16_402;
const LINES: u32 = 16_403;
const EVENTS: u32 = 16_404;
const COUNTERS: u32 = 16_405;
const WEIRD: u32 = 16_406;

const ORG_A: &str = "3f2a0c5e-8b1d-4c6a-9e7f-0123456789ab";
const ORG_B: &str = "0b5c9d2e-1111-4222-8333-444455556666";
/// Tabs, newlines, carriage return, backslashes, quotes, `\N` and `\.` look-alikes, unicode.
const NASTY: &str = "tab\there\nnew line\r\nback\\slash \\N \\. 'single' \"double\" é 日本 🐕";

fn t(s: &str) -> Value {
    Value::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn tuple(values: &[Option<&str>]) -> Tuple {
    Tuple(values.iter().map(|v| v.map_or(Value::Null, t)).collect())
}

fn relation(oid: u32, namespace: &str, name: &str, columns: &[(&str, bool)]) -> Message {
    relation_with(oid, namespace, name, ReplicaIdentity::Default, columns)
}

fn relation_with(
    oid: u32,
    namespace: &str,
    name: &str,
    replica_identity: ReplicaIdentity,
    columns: &[(&str, bool)],
) -> Message {
    Message::Relation(Relation {
        xid: None,
        oid,
        namespace: namespace.into(),
        name: name.into(),
        replica_identity,
        columns: columns
            .iter()
            .map(|&(name, key)| Column {
                part_of_key: key,
                name: name.into(),
                type_oid: 25,
                type_modifier: -1,
            })
            .collect(),
    })
}

/// The Relation messages of the test schema (generated `name_len` is not sent, as pgoutput
/// never sends generated columns).
fn relations() -> Vec<Message> {
    vec![
        relation(
            ORGS,
            "app",
            "orgs",
            &[
                ("id", true),
                ("name", false),
                ("note", false),
                ("budget", false),
                ("meta", false),
                ("tags", false),
                ("created", false),
            ],
        ),
        relation(
            ITEMS,
            "app",
            "items",
            &[
                ("id", true),
                ("org", false),
                ("title", false),
                ("qty", false),
                ("body", false),
            ],
        ),
        relation(
            LINES,
            "app",
            "lines",
            &[
                ("org", true),
                ("item", true),
                ("n", true),
                ("amount", false),
            ],
        ),
        relation_with(
            EVENTS,
            "app",
            "events",
            ReplicaIdentity::Full,
            &[
                ("org", true),
                ("kind", true),
                ("payload", true),
                ("at", true),
            ],
        ),
        relation(
            COUNTERS,
            "app",
            "counters",
            &[("id", true), ("label", false)],
        ),
        relation(
            WEIRD,
            "we.ird",
            "Tab\"le",
            &[("Key", true), ("va lue", false)],
        ),
    ]
}

fn insert(relation: u32, values: &[Option<&str>]) -> Message {
    Message::Insert(Insert {
        xid: None,
        relation,
        new: tuple(values),
    })
}

fn update(relation: u32, old: Option<OldTuple>, new: Tuple) -> Message {
    Message::Update(Update {
        xid: None,
        relation,
        old,
        new,
    })
}

fn delete(relation: u32, old: OldTuple) -> Message {
    Message::Delete(Delete {
        xid: None,
        relation,
        old,
    })
}

async fn setup(hint: &str) -> Client {
    let pg = postgres::cluster().await;
    let db = pg.fresh_db(hint).await;
    let client = pg.client(&db).await;
    client.batch_execute(SCHEMA).await.expect("schema");
    client
}

/// Applies `messages` in one transaction: committed on success, rolled back on error.
async fn replay(client: &Client, messages: &[Message]) -> Result<ReplayStats, ReplayError> {
    client.batch_execute("BEGIN").await.expect("begin");
    let result = async {
        let mut replayer = Replayer::new(client);
        for m in messages {
            replayer.apply(m).await?;
        }
        replayer.finish().await
    }
    .await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    client.batch_execute(end).await.expect(end);
    result
}

/// Every row of a query, every column as PostgreSQL's text (NULL as None).
async fn rows(client: &Client, sql: &str) -> Vec<Vec<Option<String>>> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn expect(rows: &[&[Option<&str>]]) -> Vec<Vec<Option<String>>> {
    rows.iter()
        .map(|r| r.iter().map(|v| v.map(str::to_string)).collect())
        .collect()
}

fn item(id: &str, title: &str, qty: &str, body: Option<&str>) -> Message {
    insert(
        ITEMS,
        &[Some(id), Some(ORG_A), Some(title), Some(qty), body],
    )
}

#[tokio::test]
async fn replay_batched_inserts_across_tables_with_every_type() {
    let client = setup("replay_inserts").await;
    client
        .batch_execute("SET TimeZone = 'UTC'")
        .await
        .expect("tz");
    let mut messages = relations();
    // Short runs (pipelined INSERTs) interleaved across tables…
    messages.push(insert(
        ORGS,
        &[
            Some(ORG_A),
            Some(NASTY),
            None,
            Some("12345.6789"),
            Some(r#"{"a": [1, 2.50, "x\ty"], "b": null, "é": "\\"}"#),
            Some(r#"{plain,"with space","quote\"d","back\\slash",NULL,"tab	in"}"#),
            Some("2026-11-26 10:41:07.123456+01"),
        ],
    ));
    messages.push(insert(WEIRD, &[Some("1"), Some(NASTY)]));
    messages.push(insert(
        ORGS,
        &[
            Some(ORG_B),
            Some("b"),
            Some(""),
            Some("-0.0001"),
            Some("[]"),
            Some("{}"),
            Some("infinity"),
        ],
    ));
    messages.push(insert(
        LINES,
        &[Some(ORG_A), Some("1"), Some("1"), Some("1e-3")],
    ));
    messages.push(insert(LINES, &[Some(ORG_A), Some("1"), Some("2"), None]));
    // …and long ones (COPY), one of them several MiB so that it is sent in chunks.
    let body = format!("{NASTY}{}", "x".repeat(2_000));
    for i in 1..=3_000 {
        let id = i.to_string();
        let title = format!("title {i}\t{NASTY}");
        let body = (i % 7 != 0).then_some(body.as_str());
        messages.push(item(&id, &title, &id, body));
    }
    for i in 3..=40 {
        messages.push(insert(
            LINES,
            &[Some(ORG_B), Some("7"), Some(&i.to_string()), Some("2.5")],
        ));
    }
    let stats = replay(&client, &messages).await.expect("replay");
    assert_eq!(
        (stats.inserts, stats.updates, stats.deletes, stats.truncates),
        (3_000 + 38 + 2 + 2 + 1, 0, 0, 0)
    );

    assert_eq!(
        rows(
            &client,
            "SELECT id, name, note, budget, meta, tags, created, name_len FROM app.orgs ORDER BY name"
        )
        .await,
        expect(&[
            &[
                Some(ORG_B),
                Some("b"),
                Some(""),
                Some("-0.0001"),
                Some("[]"),
                Some("{}"),
                Some("infinity"),
                Some("1"),
            ],
            &[
                Some(ORG_A),
                Some(NASTY),
                None,
                Some("12345.6789"),
                Some(r#"{"a": [1, 2.50, "x\ty"], "b": null, "é": "\\"}"#),
                Some(r#"{plain,"with space","quote\"d","back\\slash",NULL,"tab	in"}"#),
                Some("2026-11-26 09:41:07.123456+00"),
                Some(&NASTY.chars().count().to_string()),
            ],
        ])
    );
    assert_eq!(
        rows(&client, r#"SELECT "Key", "va lue" FROM "we.ird"."Tab""le""#).await,
        expect(&[&[Some("1"), Some(NASTY)]])
    );
    assert_eq!(
        rows(
            &client,
            "SELECT org, item, n, amount FROM app.lines ORDER BY org, item, n LIMIT 3"
        )
        .await,
        expect(&[
            &[Some(ORG_B), Some("7"), Some("3"), Some("2.5")],
            &[Some(ORG_B), Some("7"), Some("4"), Some("2.5")],
            &[Some(ORG_B), Some("7"), Some("5"), Some("2.5")],
        ])
    );
    assert_eq!(
        rows(
            &client,
            "SELECT count(*), sum(amount) FROM app.lines WHERE org = '3f2a0c5e-8b1d-4c6a-9e7f-0123456789ab'"
        )
        .await,
        expect(&[&[Some("2"), Some("0.001")]])
    );
    // Every item row exact, the nasty text included.
    let expected_title = |i: i64| format!("title {i}\t{NASTY}");
    let got = rows(
        &client,
        "SELECT id, org, title, qty, body FROM app.items ORDER BY id",
    )
    .await;
    assert_eq!(got.len(), 3_000);
    for (n, row) in got.iter().enumerate() {
        let i = n as i64 + 1;
        let want_body = (i % 7 != 0).then(|| body.clone());
        assert_eq!(
            row,
            &vec![
                Some(i.to_string()),
                Some(ORG_A.to_string()),
                Some(expected_title(i)),
                Some(i.to_string()),
                want_body
            ],
            "item {i}"
        );
    }
}

#[tokio::test]
async fn replay_updates_and_deletes() {
    let client = setup("replay_updates").await;
    let big = "B".repeat(10_000);
    let mut messages = relations();
    messages.push(item("1", "one", "1", Some(&big)));
    messages.push(item("2", "two", "2", Some("small")));
    messages.push(item("3", "three", "3", None));
    messages.push(insert(
        LINES,
        &[Some(ORG_A), Some("1"), Some("1"), Some("1")],
    ));
    messages.push(insert(
        LINES,
        &[Some(ORG_A), Some("1"), Some("2"), Some("2")],
    ));
    let event = [
        Some(ORG_A),
        Some("login"),
        Some(r#"{"ip": "10.0.0.1"}"#),
        Some("2026-01-01 00:00:00+00"),
    ];
    let other_event = [Some(ORG_A), Some("logout"), None, None];
    for e in [event, event, event, other_event, other_event] {
        messages.push(insert(EVENTS, &e));
    }
    let stats = replay(&client, &messages).await.expect("load");
    assert_eq!(stats.inserts, 10);

    let mut messages = relations();
    // An update leaving the TOASTed body alone: it keeps its value.
    messages.push(update(
        ITEMS,
        None,
        Tuple(vec![
            t("1"),
            t(ORG_A),
            t("one renamed"),
            t("10"),
            Value::UnchangedToast,
        ]),
    ));
    // A primary key change: the old key comes in a 'K' tuple (other columns NULL).
    messages.push(update(
        ITEMS,
        Some(OldTuple::Key(tuple(&[Some("2"), None, None, None, None]))),
        tuple(&[
            Some("20"),
            Some(ORG_A),
            Some("two"),
            Some("2"),
            Some("small"),
        ]),
    ));
    // Then the same row again, under its new key, in the same pipeline.
    messages.push(update(
        ITEMS,
        None,
        tuple(&[Some("20"), Some(ORG_A), Some("two again"), Some("22"), None]),
    ));
    // A composite key change.
    messages.push(update(
        LINES,
        Some(OldTuple::Key(tuple(&[
            Some(ORG_A),
            Some("1"),
            Some("2"),
            None,
        ]))),
        tuple(&[Some(ORG_A), Some("1"), Some("3"), Some("3.5")]),
    ));
    // Delete by primary key.
    messages.push(delete(
        ITEMS,
        OldTuple::Key(tuple(&[Some("3"), None, None, None, None])),
    ));
    messages.push(delete(
        LINES,
        OldTuple::Key(tuple(&[Some(ORG_A), Some("1"), Some("1"), None])),
    ));
    // No key, REPLICA IDENTITY FULL: one of three identical rows changes, one other goes.
    messages.push(update(
        EVENTS,
        Some(OldTuple::Full(tuple(&event))),
        tuple(&[
            Some(ORG_A),
            Some("login"),
            Some(r#"{"ip": "10.0.0.2"}"#),
            Some("2026-01-01 00:00:00+00"),
        ]),
    ));
    messages.push(delete(EVENTS, OldTuple::Full(tuple(&event))));
    // With NULLs in the old row; one of two identical rows.
    messages.push(delete(EVENTS, OldTuple::Full(tuple(&other_event))));
    let stats = replay(&client, &messages).await.expect("replay");
    assert_eq!((stats.updates, stats.deletes), (5, 4));

    assert_eq!(
        rows(
            &client,
            "SELECT id, title, qty, body = repeat('B', 10000), body FROM app.items ORDER BY id"
        )
        .await
        .into_iter()
        .map(|mut r| {
            if r[3].as_deref() == Some("t") {
                r[4] = Some("<big>".into());
            }
            r
        })
        .collect::<Vec<_>>(),
        expect(&[
            &[
                Some("1"),
                Some("one renamed"),
                Some("10"),
                Some("t"),
                Some("<big>")
            ],
            &[Some("20"), Some("two again"), Some("22"), None, None],
        ])
    );
    assert_eq!(
        rows(&client, "SELECT org, item, n, amount FROM app.lines").await,
        expect(&[&[Some(ORG_A), Some("1"), Some("3"), Some("3.5")]])
    );
    assert_eq!(
        rows(
            &client,
            "SELECT kind, payload::text, at IS NULL FROM app.events ORDER BY kind, payload::text"
        )
        .await,
        expect(&[
            &[Some("login"), Some(r#"{"ip": "10.0.0.1"}"#), Some("f")],
            &[Some("login"), Some(r#"{"ip": "10.0.0.2"}"#), Some("f")],
            &[Some("logout"), None, Some("t")],
        ])
    );
}

/// Before the snapshot's post-data runs, the recovery tables have no primary key yet: rows are
/// found by the Relation's key columns instead.
#[tokio::test]
async fn replay_without_primary_key_uses_the_relations_key() {
    let client = setup("replay_no_pk").await;
    client
        .batch_execute("CREATE TABLE app.bare (id int, sub int, v text, big text)")
        .await
        .expect("table");
    const BARE: u32 = 900;
    let mut messages = vec![relation(
        BARE,
        "app",
        "bare",
        &[("id", true), ("sub", true), ("v", false), ("big", false)],
    )];
    for i in 1..=20 {
        let i = i.to_string();
        messages.push(insert(BARE, &[Some(&i), Some("1"), Some("v"), Some("big")]));
    }
    messages.push(update(
        BARE,
        None,
        Tuple(vec![t("3"), t("1"), t("three"), Value::UnchangedToast]),
    ));
    messages.push(update(
        BARE,
        Some(OldTuple::Key(tuple(&[Some("4"), Some("1"), None, None]))),
        tuple(&[Some("4"), Some("2"), Some("four"), Some("new big")]),
    ));
    messages.push(delete(
        BARE,
        OldTuple::Key(tuple(&[Some("5"), Some("1"), None, None])),
    ));
    // Every value unchanged and TOASTed but the key: the row must still exist.
    messages.push(update(
        BARE,
        None,
        Tuple(vec![
            t("6"),
            t("1"),
            Value::UnchangedToast,
            Value::UnchangedToast,
        ]),
    ));
    let stats = replay(&client, &messages).await.expect("replay");
    assert_eq!((stats.inserts, stats.updates, stats.deletes), (20, 3, 1));
    assert_eq!(
        rows(
            &client,
            "SELECT id, sub, v, big FROM app.bare WHERE id BETWEEN 2 AND 7 ORDER BY id"
        )
        .await,
        expect(&[
            &[Some("2"), Some("1"), Some("v"), Some("big")],
            &[Some("3"), Some("1"), Some("three"), Some("big")],
            &[Some("4"), Some("2"), Some("four"), Some("new big")],
            &[Some("6"), Some("1"), Some("v"), Some("big")],
            &[Some("7"), Some("1"), Some("v"), Some("big")],
        ])
    );
    let err = replay(
        &client,
        &[
            messages[0].clone(),
            update(
                BARE,
                None,
                Tuple(vec![t("5"), t("1"), Value::UnchangedToast, t("x")]),
            ),
        ],
    )
    .await
    .expect_err("deleted row");
    assert!(
        matches!(&err, ReplayError::RowNotFound { key, .. } if key == "id = '5', sub = '1'"),
        "{err:?}"
    );
}

/// Changes published through a partitioned table's root (publish_via_partition_root) apply to
/// the root; without a key, one row of one partition is taken.
#[tokio::test]
async fn replay_into_a_partitioned_table() {
    let client = setup("replay_parted").await;
    client
        .batch_execute(
            "CREATE TABLE app.parted (part int, v text) PARTITION BY LIST (part);
             CREATE TABLE app.parted_1 PARTITION OF app.parted FOR VALUES IN (1);
             CREATE TABLE app.parted_2 PARTITION OF app.parted FOR VALUES IN (2);",
        )
        .await
        .expect("partitions");
    const PARTED: u32 = 901;
    let mut messages = vec![relation_with(
        PARTED,
        "app",
        "parted",
        ReplicaIdentity::Full,
        &[("part", true), ("v", true)],
    )];
    for _ in 0..2 {
        for part in ["1", "2"] {
            messages.push(insert(PARTED, &[Some(part), Some("same")]));
        }
    }
    messages.push(update(
        PARTED,
        Some(OldTuple::Full(tuple(&[Some("2"), Some("same")]))),
        tuple(&[Some("2"), Some("changed")]),
    ));
    // Moves the row to the other partition.
    messages.push(update(
        PARTED,
        Some(OldTuple::Full(tuple(&[Some("1"), Some("same")]))),
        tuple(&[Some("2"), Some("moved")]),
    ));
    messages.push(delete(
        PARTED,
        OldTuple::Full(tuple(&[Some("2"), Some("same")])),
    ));
    replay(&client, &messages).await.expect("replay");
    assert_eq!(
        rows(
            &client,
            "SELECT tableoid::regclass::text, part, v FROM app.parted ORDER BY 1, 3"
        )
        .await,
        expect(&[
            &[Some("app.parted_1"), Some("1"), Some("same")],
            &[Some("app.parted_2"), Some("2"), Some("changed")],
            &[Some("app.parted_2"), Some("2"), Some("moved")],
        ])
    );
}

#[tokio::test]
async fn replay_pipelined_changes_keep_stream_order() {
    let client = setup("replay_order").await;
    let mut messages = relations();
    messages.push(item("1", "a", "0", None));
    messages.push(item("2", "b", "0", None));
    // A key swap through a temporary key, and a unique title moved from one row to another:
    // any reordering would violate a unique constraint or miss a row.
    let key_change = |old: &str, new: &str, title: &str| {
        update(
            ITEMS,
            Some(OldTuple::Key(tuple(&[Some(old), None, None, None, None]))),
            tuple(&[Some(new), Some(ORG_A), Some(title), Some("0"), None]),
        )
    };
    messages.push(key_change("1", "-1", "a"));
    messages.push(key_change("2", "1", "b"));
    messages.push(key_change("-1", "2", "a"));
    messages.push(update(
        ITEMS,
        None,
        tuple(&[Some("1"), Some(ORG_A), Some("c"), Some("0"), None]),
    ));
    messages.push(update(
        ITEMS,
        None,
        tuple(&[Some("2"), Some(ORG_A), Some("b"), Some("0"), None]),
    ));
    // The same row many times over: the last value wins (more than the pipeline's depth).
    for qty in 1..=1_000 {
        messages.push(update(
            ITEMS,
            None,
            tuple(&[
                Some("1"),
                Some(ORG_A),
                Some("c"),
                Some(&qty.to_string()),
                None,
            ]),
        ));
    }
    // Deleted, inserted again, deleted, inserted again.
    for round in 0..3 {
        messages.push(delete(
            ITEMS,
            OldTuple::Key(tuple(&[Some("2"), None, None, None, None])),
        ));
        messages.push(item("2", "b", &round.to_string(), None));
    }
    replay(&client, &messages).await.expect("replay");
    assert_eq!(
        rows(&client, "SELECT id, title, qty FROM app.items ORDER BY id").await,
        expect(&[
            &[Some("1"), Some("c"), Some("1000")],
            &[Some("2"), Some("b"), Some("2")],
        ])
    );
}

#[tokio::test]
async fn replay_truncate() {
    let client = setup("replay_truncate").await;
    client
        .batch_execute(
            "CREATE TABLE app.children (id int PRIMARY KEY, item bigint REFERENCES app.items);
             INSERT INTO app.items (org, title) VALUES ('3f2a0c5e-8b1d-4c6a-9e7f-0123456789ab', 'x');
             INSERT INTO app.children VALUES (1, 1);",
        )
        .await
        .expect("children");
    let mut messages = relations();
    messages.push(insert(COUNTERS, &[Some("7"), Some("seven")]));
    messages.push(insert(WEIRD, &[Some("1"), Some("one")]));
    messages.push(Message::Truncate(Truncate {
        xid: None,
        cascade: false,
        restart_identity: true,
        relations: vec![COUNTERS, WEIRD],
    }));
    messages.push(insert(COUNTERS, &[Some("1"), Some("one")]));
    // CASCADE as the source said: the referencing table goes too.
    messages.push(Message::Truncate(Truncate {
        xid: None,
        cascade: true,
        restart_identity: false,
        relations: vec![ITEMS],
    }));
    let stats = replay(&client, &messages).await.expect("replay");
    assert_eq!(stats.truncates, 3);
    assert_eq!(
        rows(&client, "SELECT id, label FROM app.counters").await,
        expect(&[&[Some("1"), Some("one")]])
    );
    for table in [r#""we.ird"."Tab""le""#, "app.items", "app.children"] {
        assert_eq!(
            rows(&client, &format!("SELECT count(*) FROM {table}")).await,
            expect(&[&[Some("0")]]),
            "{table}"
        );
    }
    // RESTART IDENTITY reset the sequence, the insert after it moved it past 1 again.
    assert_eq!(
        rows(
            &client,
            "SELECT nextval(pg_get_serial_sequence('app.counters', 'id'))"
        )
        .await,
        expect(&[&[Some("2")]])
    );
}

#[tokio::test]
async fn replay_errors_are_typed() {
    let client = setup("replay_errors").await;
    let base = relations();
    let with = |extra: Vec<Message>| base.iter().cloned().chain(extra).collect::<Vec<_>>();

    // A table created after the snapshot.
    let err = replay(
        &client,
        &with(vec![
            relation(900, "app", "invoices", &[("id", true)]),
            insert(900, &[Some("1")]),
        ]),
    )
    .await
    .expect_err("missing table");
    assert!(
        matches!(&err, ReplayError::MissingTable { table } if table == "app.invoices"),
        "{err:?}"
    );
    assert!(err.to_string().contains("later snapshot"), "{err}");

    // A column added after the snapshot.
    let err = replay(
        &client,
        &with(vec![
            relation(
                ITEMS,
                "app",
                "items",
                &[
                    ("id", true),
                    ("org", false),
                    ("title", false),
                    ("qty", false),
                    ("body", false),
                    ("added_later", false),
                ],
            ),
            item("1", "x", "1", None),
        ]),
    )
    .await
    .expect_err("missing column");
    assert!(
        matches!(&err, ReplayError::ColumnMismatch { table, message }
            if table == "app.items" && message.contains("added_later")),
        "{err:?}"
    );

    // A tuple that does not match its relation.
    let err = replay(&client, &with(vec![insert(ITEMS, &[Some("1")])]))
        .await
        .expect_err("short tuple");
    assert!(
        matches!(
            &err,
            ReplayError::TupleMismatch {
                expected: 5,
                found: 1,
                ..
            }
        ),
        "{err:?}"
    );

    // A change before any Relation message for its oid.
    let err = replay(&client, &[insert(4242, &[Some("1")])])
        .await
        .expect_err("unknown relation");
    assert!(
        matches!(err, ReplayError::UnknownRelation { oid: 4242 }),
        "{err:?}"
    );

    // Rows that are not there: update by key, delete by key, delete by full old row.
    let err = replay(
        &client,
        &with(vec![update(
            ITEMS,
            None,
            tuple(&[Some("99"), Some(ORG_A), Some("x"), Some("1"), None]),
        )]),
    )
    .await
    .expect_err("update of a missing row");
    assert!(
        matches!(&err, ReplayError::RowNotFound { table, key, .. }
            if table == "app.items" && key == "id = '99'"),
        "{err:?}"
    );
    let err = replay(
        &client,
        &with(vec![delete(
            LINES,
            OldTuple::Key(tuple(&[Some(ORG_A), Some("1"), Some("1"), None])),
        )]),
    )
    .await
    .expect_err("delete of a missing row");
    assert!(
        matches!(&err, ReplayError::RowNotFound { table, .. } if table == "app.lines"),
        "{err:?}"
    );
    let err = replay(
        &client,
        &with(vec![delete(
            EVENTS,
            OldTuple::Full(tuple(&[Some(ORG_A), Some("x"), None, None])),
        )]),
    )
    .await
    .expect_err("delete of a missing unkeyed row");
    assert!(
        matches!(&err, ReplayError::RowNotFound { table, .. } if table == "app.events"),
        "{err:?}"
    );

    // A failure deep in a pipeline is reported, as the first one in stream order.
    let mut long = Vec::new();
    for i in 1..=300 {
        long.push(item(&i.to_string(), &format!("t{i}"), "0", None));
    }
    for i in 1..=300 {
        let id = if i == 250 { 1000 } else { i };
        long.push(update(
            ITEMS,
            None,
            tuple(&[
                Some(&id.to_string()),
                Some(ORG_A),
                Some(&format!("t{i}")),
                Some("1"),
                None,
            ]),
        ));
    }
    let err = replay(&client, &with(long))
        .await
        .expect_err("missing row in a pipeline");
    assert!(
        matches!(&err, ReplayError::RowNotFound { key, .. } if key == "id = '1000'"),
        "{err:?}"
    );

    // A GENERATED ALWAYS identity column cannot be set to a new value.
    let err = replay(
        &client,
        &with(vec![
            insert(COUNTERS, &[Some("1"), Some("one")]),
            update(
                COUNTERS,
                Some(OldTuple::Key(tuple(&[Some("1"), None]))),
                tuple(&[Some("2"), Some("one")]),
            ),
        ]),
    )
    .await
    .expect_err("identity change");
    assert!(
        matches!(&err, ReplayError::Unsupported { table, what, .. }
            if table == "app.counters" && what.contains("GENERATED ALWAYS identity column id")),
        "{err:?}"
    );

    // A value the column's type refuses.
    let err = replay(&client, &with(vec![item("1", "x", "not a number", None)]))
        .await
        .expect_err("bad value");
    assert!(
        matches!(&err, ReplayError::Database { table, .. } if table == "app.items"),
        "{err:?}"
    );

    // Every failed replay was rolled back.
    assert_eq!(
        rows(&client, "SELECT count(*) FROM app.items").await,
        expect(&[&[Some("0")]])
    );
}

#[tokio::test]
async fn replay_moves_sequences_forward() {
    let client = setup("replay_sequences").await;
    client
        .batch_execute(
            "CREATE TABLE app.down (id int PRIMARY KEY, v text);
             CREATE SEQUENCE app.down_id_seq INCREMENT BY -1 OWNED BY app.down.id;
             ALTER TABLE app.down ALTER COLUMN id SET DEFAULT nextval('app.down_id_seq');
             SELECT setval('app.counters_id_seq', 5000);",
        )
        .await
        .expect("sequences");
    let mut messages = relations();
    messages.push(relation(777, "app", "down", &[("id", true), ("v", false)]));
    for id in [1, 2, 3, 1000] {
        messages.push(item(&id.to_string(), &format!("t{id}"), "0", None));
    }
    // The highest id's row is gone again: its value was still used.
    messages.push(delete(
        ITEMS,
        OldTuple::Key(tuple(&[Some("1000"), None, None, None, None])),
    ));
    messages.push(update(
        ITEMS,
        None,
        tuple(&[Some("3"), Some(ORG_A), Some("t3"), Some("1"), None]),
    ));
    // The identity sequence is already past every value: it must not go back.
    messages.push(insert(COUNTERS, &[Some("10"), Some("ten")]));
    // A descending sequence moves down.
    messages.push(insert(777, &[Some("-50"), Some("x")]));
    replay(&client, &messages).await.expect("replay");
    assert_eq!(
        rows(
            &client,
            "SELECT nextval('app.items_id_seq'), nextval('app.counters_id_seq'), nextval('app.down_id_seq')"
        )
        .await,
        expect(&[&[Some("1001"), Some("5001"), Some("-51")]])
    );
    // Sequences of tables that got no inserts or updates are left alone.
    let client2 = setup("replay_sequences_untouched").await;
    let messages = relations();
    replay(&client2, &messages).await.expect("replay");
    assert_eq!(
        rows(&client2, "SELECT nextval('app.items_id_seq')").await,
        expect(&[&[Some("1")]])
    );
}

/// A real workload decoded from a real pgoutput slot, replayed onto a copy of the database
/// taken before it: afterwards the copy equals the source, table by table.
#[tokio::test]
async fn replay_of_a_real_stream_reproduces_the_source() {
    let pg = postgres::cluster().await;
    let source_db = pg.fresh_db("replay_source").await;
    pg.psql(&source_db, &["-c", SCHEMA]);
    pg.psql(
        &source_db,
        &[
            "-c",
            "INSERT INTO app.orgs (id, name) VALUES ('3f2a0c5e-8b1d-4c6a-9e7f-0123456789ab', 'before');
             INSERT INTO app.items (org, title, qty, body)
                  SELECT '3f2a0c5e-8b1d-4c6a-9e7f-0123456789ab', 'item ' || i, i, repeat('z', 5000)
                    FROM generate_series(1, 50) i;
             INSERT INTO app.events VALUES ('3f2a0c5e-8b1d-4c6a-9e7f-0123456789ab', 'dup', '{\"a\":1}', now()),
                                           ('3f2a0c5e-8b1d-4c6a-9e7f-0123456789ab', 'dup', '{\"a\":1}', now());
             CREATE PUBLICATION replay_pub FOR ALL TABLES;",
        ],
    );
    // The "snapshot": a copy of the source as it is now.
    let target_db = format!("{source_db}_target");
    pg.client("postgres")
        .await
        .batch_execute(&format!(
            "CREATE DATABASE \"{target_db}\" TEMPLATE \"{source_db}\""
        ))
        .await
        .expect("copy");
    let source = pg.client(&source_db).await;
    // The cluster runs with synchronous_commit off, and decoding stops at the flushed WAL.
    source
        .batch_execute("SET synchronous_commit = on")
        .await
        .expect("synchronous commit");
    let slot = format!("replay_slot_{}", fastrand::u32(..));
    source
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .expect("slot");
    for sql in [
        format!(
            "INSERT INTO app.orgs VALUES ('{ORG_B}', $${NASTY}$$, NULL, 1.5, '{{\"k\": [1, \"x\"]}}', '{{a,NULL,\"b c\"}}', now())"
        ),
        "UPDATE app.orgs SET note = 'noted', budget = 10 WHERE name = 'before'".into(),
        "UPDATE app.items SET qty = qty * 10 WHERE id % 3 = 0".into(),
        "UPDATE app.items SET id = id + 1000 WHERE id % 5 = 0".into(),
        "DELETE FROM app.items WHERE id % 7 = 0".into(),
        "INSERT INTO app.items (org, title, qty) SELECT org, 'new ' || id, 1 FROM app.items WHERE id < 20".into(),
        "INSERT INTO app.lines SELECT org, id, n, n * 1.25 FROM app.items, generate_series(1, 3) n WHERE id < 10".into(),
        "UPDATE app.lines SET n = n + 10 WHERE n = 2".into(),
        "DELETE FROM app.events WHERE ctid = (SELECT min(ctid) FROM app.events)".into(),
        "INSERT INTO app.events VALUES (NULL, 'x', NULL, NULL), (NULL, 'x', NULL, NULL)".into(),
        "UPDATE app.events SET kind = 'y' WHERE kind = 'x'".into(),
        "DELETE FROM app.events WHERE kind = 'y' AND ctid = (SELECT max(ctid) FROM app.events)".into(),
        "INSERT INTO app.feelings VALUES (1, 'sad'), (2, DEFAULT)".into(),
        "UPDATE app.feelings SET mood = 'it''s odd' WHERE id = 1".into(),
        "INSERT INTO app.counters (label) SELECT 'c' || i FROM generate_series(1, 20) i".into(),
        "TRUNCATE app.counters RESTART IDENTITY".into(),
        "INSERT INTO app.counters (label) VALUES ('after truncate')".into(),
        "INSERT INTO \"we.ird\".\"Tab\"\"le\" VALUES (1, E'a\\tb'), (2, NULL)".into(),
    ] {
        source
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let changes = source
        .query(
            "SELECT data FROM pg_logical_slot_get_binary_changes($1, NULL, NULL, \
             'proto_version', '1', 'publication_names', 'replay_pub')",
            &[&slot],
        )
        .await
        .expect("changes");
    source
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .expect("drop slot");
    let ctx = Context::new(ProtocolVersion::V1);
    let messages: Vec<Message> = changes
        .iter()
        .map(|row| pgoutput::decode(&Bytes::from(row.get::<_, Vec<u8>>(0)), ctx).expect("decode"))
        .collect();

    let target = pg.client(&target_db).await;
    let stats = replay(&target, &messages).await.expect("replay");
    assert!(stats.inserts > 0 && stats.updates > 0 && stats.deletes > 0 && stats.truncates > 0);
    for table in [
        "app.orgs",
        "app.items",
        "app.lines",
        "app.events",
        "app.feelings",
        "app.counters",
        r#""we.ird"."Tab""le""#,
    ] {
        let sql = format!("SELECT t::text FROM {table} t ORDER BY 1");
        assert_eq!(
            rows(&target, &sql).await,
            rows(&source, &sql).await,
            "{table}"
        );
    }
    // The next ids the recovery database hands out are not ones the source used.
    for (seq, table) in [
        ("app.items_id_seq", "app.items"),
        ("app.counters_id_seq", "app.counters"),
    ] {
        let next = rows(&target, &format!("SELECT nextval('{seq}')")).await;
        let max = rows(&source, &format!("SELECT max(id) FROM {table}")).await;
        let next: i64 = next[0][0].as_deref().unwrap().parse().unwrap();
        let max: i64 = max[0][0].as_deref().unwrap().parse().unwrap();
        assert!(next > max, "{seq}: next {next}, source max {max}");
    }
}

/// Throughput: 200,000 inserts, 50,000 updates and 50,000 deletes (plus an interleaved mix).
/// `cargo test --release --test e2e replay_throughput -- --ignored --nocapture`
#[tokio::test]
#[ignore = "a measurement (prints changes/s, asserts no speed); run it explicitly"]
async fn replay_throughput() {
    let client = setup("replay_throughput").await;
    client
        .batch_execute(
            "CREATE TABLE app.bench (id bigint PRIMARY KEY, org uuid NOT NULL, n int, label text,
                                     amount numeric(12,2), at timestamptz);
             CREATE TABLE app.bench2 (id bigint PRIMARY KEY, bench bigint, note text);",
        )
        .await
        .expect("bench tables");
    const BENCH: u32 = 30_001;
    const BENCH2: u32 = 30_002;
    let rels = vec![
        relation(
            BENCH,
            "app",
            "bench",
            &[
                ("id", true),
                ("org", false),
                ("n", false),
                ("label", false),
                ("amount", false),
                ("at", false),
            ],
        ),
        relation(
            BENCH2,
            "app",
            "bench2",
            &[("id", true), ("bench", false), ("note", false)],
        ),
    ];
    let row = |id: u64, n: u64| {
        let (id, n) = (id.to_string(), n.to_string());
        tuple(&[
            Some(&id),
            Some(ORG_A),
            Some(&n),
            Some(&format!("label number {n} with some text")),
            Some("1234.56"),
            Some("2026-11-26 10:41:07.123456+00"),
        ])
    };
    let mut inserts = rels.clone();
    // Transactions of 100 rows into bench then 100 into bench2: runs of 100.
    for block in 0..1_000u64 {
        for i in 0..100 {
            let id = block * 100 + i + 1;
            inserts.push(Message::Insert(Insert {
                xid: None,
                relation: BENCH,
                new: row(id, id),
            }));
        }
        for i in 0..100 {
            let id = block * 100 + i + 1;
            let (id, b) = (id.to_string(), id.to_string());
            inserts.push(insert(BENCH2, &[Some(&id), Some(&b), Some("note")]));
        }
    }
    let mut updates = rels.clone();
    for id in (1..=100_000u64).step_by(2) {
        updates.push(update(BENCH, None, row(id, id * 2)));
    }
    let mut deletes = rels.clone();
    for id in (2..=100_000u64).step_by(2) {
        deletes.push(delete(
            BENCH2,
            OldTuple::Key(tuple(&[Some(&id.to_string()), None, None])),
        ));
    }
    // Interleaved, as OLTP transactions look: insert a row into each table, update the first.
    let mut mixed = rels.clone();
    for id in 200_001..=220_000u64 {
        mixed.push(Message::Insert(Insert {
            xid: None,
            relation: BENCH,
            new: row(id, id),
        }));
        let s = id.to_string();
        mixed.push(insert(BENCH2, &[Some(&s), Some(&s), Some("note")]));
        mixed.push(update(BENCH, None, row(id, 0)));
    }

    let mut total = (0usize, 0f64);
    for (name, messages) in [
        ("inserts", &inserts),
        ("updates", &updates),
        ("deletes", &deletes),
        ("mixed", &mixed),
    ] {
        let changes = messages.len() - rels.len();
        let clock = Instant::now();
        replay(&client, messages).await.expect(name);
        let seconds = clock.elapsed().as_secs_f64();
        println!(
            "replay {name}: {changes} changes in {seconds:.2}s = {:.0} changes/s",
            changes as f64 / seconds
        );
        if name != "mixed" {
            total.0 += changes;
            total.1 += seconds;
        }
    }
    println!(
        "replay 200k inserts + 50k updates + 50k deletes: {} changes in {:.2}s = {:.0} changes/s",
        total.0,
        total.1,
        total.0 as f64 / total.1
    );
    assert_eq!(
        rows(&client, "SELECT count(*), sum(n) FROM app.bench").await[0][0].as_deref(),
        Some("120000")
    );
}
