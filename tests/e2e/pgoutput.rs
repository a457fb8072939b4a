//! The pgoutput decoder against what a real PostgreSQL writes.
//!
//! One workload (inserts, updates with and without a key change and with an unchanged TOASTed
//! column, REPLICA IDENTITY FULL and default, deletes, a truncate, logical messages, a
//! transaction from a replication origin, and transactions larger than the cluster's 64kB
//! `logical_decoding_work_mem`, one committed and one rolled back) is read back from a pgoutput
//! slot with `pg_logical_slot_peek_binary_changes`, once with protocol 2 and streaming on and
//! once with protocol 1. Every row must decode, re-encode to the exact bytes PostgreSQL sent,
//! and make sense as a sequence: transactions properly opened and closed, streamed blocks
//! carrying their xid, relations described before they are used, and the changes being the
//! workload's own.
//!
//! The SQL function is only the test oracle here (the daemon reads the walsender); it decodes in
//! the calling backend with the same output plugin and the same streaming logic.

use std::collections::HashMap;

use bytes::Bytes;
use chrono::{DateTime, Duration, Utc};
use updog_backup::pg::Lsn;
use updog_backup::pg::pgoutput::{
    self, Context, Delete, Insert, LogicalMessage, Message, OldTuple, Origin, ProtocolVersion,
    ReplicaIdentity, Truncate, Tuple, Update, Value, Xid,
};

use crate::support::postgres;

/// Stored out of line and uncompressed (`STORAGE EXTERNAL`), so an update that leaves it alone
/// sends it as `'u'`.
const BIG_BODY_LEN: usize = 20_000;
/// Rows of the large transactions: well over 64kB of decoded changes.
const BULK_ROWS: usize = 2_000;

fn unique(purpose: &str) -> String {
    format!("updog_test_{purpose}_{:016x}", fastrand::u64(..))
}

fn text(s: &str) -> Value {
    Value::Text(Bytes::copy_from_slice(s.as_bytes()))
}

/// One row of `pg_logical_slot_peek_binary_changes`, decoded.
struct Row {
    xid: Xid,
    message: Message,
}

async fn peek(
    client: &tokio_postgres::Client,
    slot: &str,
    publication: &str,
    proto: ProtocolVersion,
) -> Vec<Row> {
    // Protocol 1 refuses `streaming` ("requested proto_version=1 does not support streaming").
    let streaming = if proto == ProtocolVersion::V2 {
        ", 'streaming', 'on'"
    } else {
        ""
    };
    let sql = format!(
        "SELECT xid::text, data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, \
         'proto_version', '{}', 'publication_names', $2, 'messages', 'true'{streaming})",
        proto.option_value()
    );
    let rows = client
        .query(&sql, &[&slot, &publication])
        .await
        .expect("peek changes");
    let mut ctx = Context::new(proto);
    let mut decoded = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let data = Bytes::from(row.get::<_, Vec<u8>>(1));
        let message = pgoutput::decode(&data, ctx)
            .unwrap_or_else(|e| panic!("row {i} ({proto:?}, {ctx:?}): {e}; bytes {data:?}"));
        assert_eq!(
            pgoutput::encode(&message, ctx).freeze(),
            data,
            "row {i}: re-encoding {message:?} must give PostgreSQL's bytes back"
        );
        ctx = ctx.next(&message);
        decoded.push(Row {
            xid: row.get::<_, String>(0).parse().expect("xid"),
            message,
        });
    }
    assert!(!ctx.in_stream, "the last streamed block was never stopped");
    decoded
}

/// A committed transaction, its changes gathered from Begin…Commit or from every streamed block
/// of its xid up to StreamCommit. Relation, Type and Origin messages are kept apart.
#[derive(Debug, Default)]
struct Txn {
    xid: Xid,
    streamed: bool,
    blocks: usize,
    origin: Option<Origin>,
    changes: Vec<Message>,
    commit_lsn: Lsn,
    end_lsn: Lsn,
    commit_time: Option<DateTime<Utc>>,
}

#[derive(Debug, Default)]
struct Replay {
    committed: Vec<Txn>,
    aborted_streams: Vec<Xid>,
    /// Non-transactional logical messages, which arrive outside any transaction.
    standalone: Vec<LogicalMessage>,
    relations: HashMap<u32, pgoutput::Relation>,
    types: HashMap<u32, pgoutput::Type>,
}

/// Walks the messages as a consumer would, asserting the sequence is well formed.
fn replay(rows: &[Row]) -> Replay {
    let mut out = Replay::default();
    let mut open: Option<(Txn, Lsn)> = None;
    let mut streams: HashMap<Xid, Txn> = HashMap::new();
    let mut block: Option<Xid> = None;
    for (i, row) in rows.iter().enumerate() {
        let (row_xid, message) = (row.xid, &row.message);
        let current: Option<&mut Txn> = match block {
            Some(xid) => streams.get_mut(&xid),
            None => open.as_mut().map(|(txn, _)| txn),
        };
        match message {
            Message::Begin(begin) => {
                assert!(open.is_none() && block.is_none(), "row {i}: nested Begin");
                assert_eq!(row_xid, begin.xid, "row {i}: Begin names its row's xid");
                let txn = Txn {
                    xid: begin.xid,
                    commit_time: begin.commit_time.to_datetime(),
                    ..Txn::default()
                };
                open = Some((txn, begin.final_lsn));
            }
            Message::Commit(commit) => {
                let (mut txn, final_lsn) = open.take().expect("Commit without Begin");
                assert_eq!(commit.flags, 0);
                assert_eq!(commit.commit_lsn, final_lsn, "row {i}: Begin's final LSN");
                assert!(commit.end_lsn > commit.commit_lsn);
                assert_eq!(commit.commit_time.to_datetime(), txn.commit_time);
                txn.commit_lsn = commit.commit_lsn;
                txn.end_lsn = commit.end_lsn;
                // PostgreSQL 14 sends transactions that changed nothing published as an empty
                // Begin/Commit (15 skips them): nothing to check in those.
                if !txn.changes.is_empty() || txn.origin.is_some() {
                    out.committed.push(txn);
                }
            }
            Message::StreamStart(start) => {
                assert!(open.is_none(), "row {i}: StreamStart inside a transaction");
                assert_eq!(row_xid, start.xid);
                assert_eq!(
                    start.first_segment,
                    !streams.contains_key(&start.xid),
                    "row {i}: first_segment is set exactly on the first block"
                );
                let txn = streams.entry(start.xid).or_insert_with(|| Txn {
                    xid: start.xid,
                    streamed: true,
                    ..Txn::default()
                });
                txn.blocks += 1;
                block = Some(start.xid);
            }
            Message::StreamStop => block = None,
            Message::StreamCommit(commit) => {
                let mut txn = streams
                    .remove(&commit.xid)
                    .expect("StreamCommit of a streamed xid");
                assert_eq!(commit.flags, 0);
                assert!(commit.end_lsn > commit.commit_lsn);
                txn.commit_lsn = commit.commit_lsn;
                txn.end_lsn = commit.end_lsn;
                txn.commit_time = commit.commit_time.to_datetime();
                out.committed.push(txn);
            }
            Message::StreamAbort(abort) => {
                // No subtransactions in the workload: only whole transactions abort.
                assert_eq!(abort.xid, abort.subxid);
                streams
                    .remove(&abort.xid)
                    .expect("StreamAbort of a streamed xid");
                out.aborted_streams.push(abort.xid);
            }
            Message::Origin(origin) => {
                current.expect("Origin outside a transaction").origin = Some(origin.clone());
            }
            Message::LogicalMessage(m) if !m.transactional => {
                assert!(current.is_none(), "row {i}: non-transactional inside one");
                out.standalone.push(m.clone());
            }
            data => {
                let txn = current.unwrap_or_else(|| panic!("row {i}: {data:?} outside"));
                assert_eq!(
                    data.streamed_xid(),
                    block,
                    "row {i}: xid exactly inside streamed blocks, the block's own"
                );
                match data {
                    Message::Relation(r) => {
                        out.relations.insert(r.oid, r.clone());
                    }
                    Message::Type(t) => {
                        out.types.insert(t.oid, t.clone());
                    }
                    change => {
                        // A consumer can only interpret a tuple after its Relation.
                        let used = match change {
                            Message::Insert(m) => vec![m.relation],
                            Message::Update(m) => vec![m.relation],
                            Message::Delete(m) => vec![m.relation],
                            Message::Truncate(m) => m.relations.clone(),
                            _ => Vec::new(),
                        };
                        for oid in used {
                            assert!(
                                out.relations.contains_key(&oid),
                                "row {i}: relation {oid} used before its Relation message"
                            );
                        }
                        txn.changes.push(change.clone());
                    }
                }
            }
        }
    }
    assert!(open.is_none(), "a transaction was never committed");
    assert!(
        streams.is_empty(),
        "streamed transactions never finished: {:?}",
        streams.keys().collect::<Vec<_>>(),
    );
    out
}

/// The Insert/Update/Delete/Truncate/Message changes with their streamed xid removed, so that
/// streamed and whole transactions compare alike.
fn without_xid(changes: &[Message]) -> Vec<Message> {
    changes
        .iter()
        .cloned()
        .map(|mut m| {
            match &mut m {
                Message::Insert(x) => x.xid = None,
                Message::Update(x) => x.xid = None,
                Message::Delete(x) => x.xid = None,
                Message::Truncate(x) => x.xid = None,
                Message::LogicalMessage(x) => x.xid = None,
                _ => {}
            }
            m
        })
        .collect()
}

#[tokio::test]
async fn decodes_every_message_postgres_sends() {
    let pg = postgres::cluster().await;
    let db = pg.fresh_db("pgoutput").await;
    let client = pg.client(&db).await;
    let slot = unique("pgoutput");
    let origin_name = unique("origin");
    let publication = "updog_pub";

    client
        .batch_execute(&format!(
            "CREATE TYPE mood AS ENUM ('happy', 'sad');
             CREATE TABLE docs (id int PRIMARY KEY, title text NOT NULL, body text, mood mood);
             ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
             CREATE TABLE ledger (id int PRIMARY KEY, note text);
             ALTER TABLE ledger REPLICA IDENTITY FULL;
             CREATE TABLE bulk (id int PRIMARY KEY, payload text);
             CREATE TABLE flush_marker (x int);
             CREATE PUBLICATION {publication} FOR TABLE docs, ledger, bulk;"
        ))
        .await
        .expect("schema");
    let oid = |name: &'static str| {
        let client = &client;
        async move {
            client
                .query_one("SELECT $1::text::regclass::oid", &[&name])
                .await
                .expect("oid")
                .get::<_, u32>(0)
        }
    };
    let (docs, ledger, bulk) = (oid("docs").await, oid("ledger").await, oid("bulk").await);
    let mood: u32 = client
        .query_one("SELECT 'mood'::regtype::oid", &[])
        .await
        .expect("type oid")
        .get(0);
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .expect("create slot");
    let started: DateTime<Utc> = client
        .query_one("SELECT now()", &[])
        .await
        .expect("now")
        .get(0);

    let big_body = "0123456789abcdef".repeat(BIG_BODY_LEN / 16);
    client
        .execute(
            "INSERT INTO docs VALUES (1, 'first', $1, 'happy')",
            &[&big_body],
        )
        .await
        .expect("insert doc");
    // One simple-query string runs as one transaction: send each transaction on its own.
    let workload = [
        "UPDATE docs SET title = 'renamed' WHERE id = 1".to_owned(),
        "UPDATE docs SET id = 2 WHERE id = 1".to_owned(),
        "INSERT INTO ledger VALUES (1, 'a'), (2, 'b')".to_owned(),
        "UPDATE ledger SET note = 'c' WHERE id = 1".to_owned(),
        "DELETE FROM ledger WHERE id = 2".to_owned(),
        "DELETE FROM docs WHERE id = 2".to_owned(),
        "SELECT pg_logical_emit_message(true, 'updog', 'transactional')".to_owned(),
        "SELECT pg_logical_emit_message(false, 'updog', '\\x00ff'::bytea)".to_owned(),
        "TRUNCATE docs, ledger RESTART IDENTITY".to_owned(),
        format!("SELECT pg_replication_origin_create('{origin_name}')"),
        format!("SELECT pg_replication_origin_session_setup('{origin_name}')"),
        "BEGIN; SELECT pg_replication_origin_xact_setup('0/ABCDEF', now()); \
         INSERT INTO ledger VALUES (3, 'from elsewhere'); COMMIT"
            .to_owned(),
        "SELECT pg_replication_origin_session_reset()".to_owned(),
        format!(
            "INSERT INTO bulk SELECT g, repeat('x', 200) FROM generate_series(1, {BULK_ROWS}) g"
        ),
        format!(
            "BEGIN; INSERT INTO bulk SELECT g, repeat('y', 200) \
             FROM generate_series({BULK_ROWS} + 1, 2 * {BULK_ROWS}) g; ROLLBACK"
        ),
    ];
    for sql in &workload {
        client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    // The SQL functions decode only WAL that is flushed, and this cluster runs with
    // synchronous_commit off (an abort is never flushed at once anyway). A synchronous commit
    // flushes everything before it — but only if its transaction wrote WAL: hence a row in a
    // table the publication leaves out.
    client
        .batch_execute(
            "BEGIN; SET LOCAL synchronous_commit = on; INSERT INTO flush_marker VALUES (1); COMMIT",
        )
        .await
        .expect("flush WAL");
    let finished: DateTime<Utc> = client
        .query_one("SELECT now()", &[])
        .await
        .expect("now")
        .get(0);

    for proto in [ProtocolVersion::V2, ProtocolVersion::V1] {
        let rows = peek(&client, &slot, publication, proto).await;
        let replay = replay(&rows);

        // Relations and the enum type, as the catalog has them.
        let r = &replay.relations[&docs];
        assert_eq!((r.namespace.as_str(), r.name.as_str()), ("public", "docs"));
        assert_eq!(r.replica_identity, ReplicaIdentity::Default);
        let columns: Vec<(&str, bool, u32)> = r
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.part_of_key, c.type_oid))
            .collect();
        assert_eq!(
            columns,
            [
                ("id", true, 23),
                ("title", false, 25),
                ("body", false, 25),
                ("mood", false, mood)
            ]
        );
        let r = &replay.relations[&ledger];
        assert_eq!(r.name, "ledger");
        assert_eq!(r.replica_identity, ReplicaIdentity::Full);
        assert!(
            r.columns.iter().all(|c| c.part_of_key),
            "FULL: every column is part of the key"
        );
        assert_eq!(replay.relations[&bulk].name, "bulk");
        let t = &replay.types[&mood];
        assert_eq!((t.namespace.as_str(), t.name.as_str()), ("public", "mood"));

        for txn in &replay.committed {
            let time = txn.commit_time.expect("a representable commit time");
            assert!(
                time >= started - Duration::seconds(1) && time <= finished + Duration::seconds(1),
                "commit time {time} outside the workload's [{started}, {finished}]"
            );
        }
        for pair in replay.committed.windows(2) {
            assert!(pair[0].end_lsn <= pair[1].commit_lsn, "commit order");
        }

        let [
            insert_doc,
            rename,
            rekey,
            ledger_inserts,
            ledger_update,
            ledger_delete,
            doc_delete,
            emitted,
            truncate,
            from_origin,
            bulk_insert,
        ] = replay.committed.as_slice()
        else {
            panic!(
                "{proto:?}: expected 11 committed transactions, got {:#?}",
                replay.committed
            )
        };
        let doc = |id: &str, title: &str, body: Value| {
            Tuple(vec![text(id), text(title), body, text("happy")])
        };
        assert_eq!(
            without_xid(&insert_doc.changes),
            [Message::Insert(Insert {
                xid: None,
                relation: docs,
                new: doc("1", "first", text(&big_body)),
            })]
        );
        // The body is TOASTed and untouched: PostgreSQL does not resend it.
        assert_eq!(
            without_xid(&rename.changes),
            [Message::Update(Update {
                xid: None,
                relation: docs,
                old: None,
                new: doc("1", "renamed", Value::UnchangedToast),
            })]
        );
        // A key change sends the old key ('K'), the other columns null.
        assert_eq!(
            without_xid(&rekey.changes),
            [Message::Update(Update {
                xid: None,
                relation: docs,
                old: Some(OldTuple::Key(Tuple(vec![
                    text("1"),
                    Value::Null,
                    Value::Null,
                    Value::Null
                ]))),
                new: doc("2", "renamed", Value::UnchangedToast),
            })]
        );
        assert_eq!(ledger_inserts.changes.len(), 2);
        // REPLICA IDENTITY FULL: the whole old row ('O'), on update and delete alike.
        assert_eq!(
            without_xid(&ledger_update.changes),
            [Message::Update(Update {
                xid: None,
                relation: ledger,
                old: Some(OldTuple::Full(Tuple(vec![text("1"), text("a")]))),
                new: Tuple(vec![text("1"), text("c")]),
            })]
        );
        assert_eq!(
            without_xid(&ledger_delete.changes),
            [Message::Delete(Delete {
                xid: None,
                relation: ledger,
                old: OldTuple::Full(Tuple(vec![text("2"), text("b")])),
            })]
        );
        assert_eq!(
            without_xid(&doc_delete.changes),
            [Message::Delete(Delete {
                xid: None,
                relation: docs,
                old: OldTuple::Key(Tuple(vec![
                    text("2"),
                    Value::Null,
                    Value::Null,
                    Value::Null
                ])),
            })]
        );
        let [Message::LogicalMessage(m)] = emitted.changes.as_slice() else {
            panic!("{:?}", emitted.changes)
        };
        assert!(m.transactional);
        assert_eq!(
            (m.prefix.as_str(), &m.content[..]),
            ("updog", &b"transactional"[..])
        );
        let [standalone] = replay.standalone.as_slice() else {
            panic!("{:?}", replay.standalone)
        };
        assert_eq!(
            (standalone.prefix.as_str(), &standalone.content[..]),
            ("updog", &[0x00, 0xff][..])
        );
        let [
            Message::Truncate(Truncate {
                cascade: false,
                restart_identity: true,
                relations,
                ..
            }),
        ] = truncate.changes.as_slice()
        else {
            panic!("{:?}", truncate.changes)
        };
        let mut relations = relations.clone();
        relations.sort_unstable();
        let mut expected = vec![docs, ledger];
        expected.sort_unstable();
        assert_eq!(relations, expected);
        let origin = from_origin.origin.as_ref().expect("an Origin message");
        assert_eq!(origin.name, origin_name);
        assert_eq!(origin.lsn, "0/ABCDEF".parse().unwrap());
        assert_eq!(from_origin.changes.len(), 1);

        // The large transaction: all its rows, in order, whichever way it came.
        let ids: Vec<Value> = bulk_insert
            .changes
            .iter()
            .map(|m| match m {
                Message::Insert(i) if i.relation == bulk => i.new.0[0].clone(),
                other => panic!("{other:?} in the bulk insert"),
            })
            .collect();
        let expected: Vec<Value> = (1..=BULK_ROWS).map(|i| text(&i.to_string())).collect();
        assert_eq!(ids, expected);

        // Only the ten small ones came whole. With protocol 2 the SQL interface streams like
        // the walsender: both large transactions went out in blocks once they passed 64kB, so
        // the rolled-back one had to be taken back with StreamAbort. (How much of it was sent
        // first varies: decoding after the fact, PostgreSQL sees the abort in the commit log at
        // its first catalog lookup and cuts the block short, possibly to nothing.)
        assert!(replay.committed[..10].iter().all(|t| !t.streamed));
        match proto {
            ProtocolVersion::V2 => {
                assert!(bulk_insert.streamed, "{BULK_ROWS} rows exceed 64kB");
                assert!(bulk_insert.blocks >= 1);
                assert_eq!(
                    replay.aborted_streams.len(),
                    1,
                    "the rolled-back bulk insert"
                );
                assert_ne!(replay.aborted_streams[0], bulk_insert.xid);
            }
            ProtocolVersion::V1 => {
                assert!(!bulk_insert.streamed);
                assert!(
                    replay.aborted_streams.is_empty(),
                    "without streaming a rolled-back transaction is never sent"
                );
            }
        }
        eprintln!(
            "{proto:?}: {} rows, bulk insert in {} streamed block(s)",
            rows.len(),
            bulk_insert.blocks
        );
    }

    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .expect("drop slot");
    client
        .execute("SELECT pg_replication_origin_drop($1)", &[&origin_name])
        .await
        .expect("drop origin");
}
