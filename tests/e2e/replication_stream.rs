//! The logical replication stream against a real PostgreSQL (the shared harness cluster).
//!
//! What these prove, beyond the unit tests' scripted server: the walsender accepts our
//! `START_REPLICATION` with pgoutput options quoted our way (a publication name with a quote, a
//! double quote, a comma and capitals); committed transactions arrive as pgoutput messages;
//! keepalives arrive and our status updates are understood — `flushed` becomes the slot's
//! `confirmed_flush_lsn`, a restart from it skips what was acknowledged, and replies keep a session
//! with a short `wal_sender_timeout` alive while silence gets it killed; a transaction larger than
//! `logical_decoding_work_mem` arrives in streamed chunks; and refusals come back typed.
//!
//! The payload checks read a few pgoutput bytes by hand on purpose: this is the transport's test,
//! and must not depend on the decoder. Every test is bounded in time and drops its slot however it
//! ends (the binary's tests share `max_replication_slots`).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::PgLsn;
use tokio_postgres::{Client, Config};
use updog_backup::pg::Lsn;
use updog_backup::pg::replication::{
    ReplicationConnection, ReplicationError, ReplicationStream, SlotSnapshot, StreamEvent,
    quote_publication_names,
};
use updog_backup::retry::Classify as _;

use crate::support::postgres;

/// Upper bound of one test, cleanup excluded.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Upper bound of the wait for one stream event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Needs every kind of quoting: `'` inside the option's string literal, `"` and `,` and capitals
/// inside pgoutput's identifier list.
const PUBLICATION: &str = r#"Updog's "pub", One"#;
const CREATE_SCHEMA: &str = r#"
    CREATE TABLE items (id int PRIMARY KEY, note text);
    CREATE PUBLICATION "Updog's ""pub"", One" FOR TABLE items;
"#;

/// A fresh database with the table and publication, and a slot name for the test.
struct Source {
    admin: Client,
    config: Config,
    slot: String,
}

async fn source(hint: &str) -> Source {
    let pg = postgres::cluster().await;
    let db = pg.fresh_db(hint).await;
    let admin = pg.client(&db).await;
    admin.batch_execute(CREATE_SCHEMA).await.expect("schema");
    Source {
        admin,
        config: pg.config(&db),
        slot: format!("updog_test_stream_{:016x}", fastrand::u64(..)),
    }
}

impl Source {
    async fn connect(&self) -> ReplicationConnection {
        ReplicationConnection::connect(&self.config)
            .await
            .expect("replication connection")
    }

    /// A connection that just created the test's (persistent) slot, and the slot's consistent
    /// point.
    async fn connect_with_slot(&self) -> (ReplicationConnection, Lsn) {
        let mut connection = self.connect().await;
        let created = connection
            .create_logical_slot(&self.slot, false, SlotSnapshot::NoExport)
            .await
            .expect("CREATE_REPLICATION_SLOT");
        (connection, created.consistent_point)
    }

    async fn start(&self, connection: ReplicationConnection, from: Lsn) -> ReplicationStream {
        let publications = quote_publication_names([PUBLICATION]);
        connection
            .start_logical(&self.slot, from, &pgoutput_options(&publications))
            .await
            .expect("START_REPLICATION")
    }

    async fn confirmed_flush(&self) -> Option<Lsn> {
        self.admin
            .query_one(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .expect("slot listed")
            .get::<_, Option<PgLsn>>(0)
            .map(Lsn::from)
    }

    /// Runs `body` within [`TEST_TIMEOUT`], then drops the slot whatever happened, then fails
    /// the test if `body` did.
    async fn run(&self, body: impl Future<Output = ()>) {
        let outcome = AssertUnwindSafe(tokio::time::timeout(TEST_TIMEOUT, body))
            .catch_unwind()
            .await;
        self.drop_slot_eventually().await;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("test did not finish within {TEST_TIMEOUT:?}"),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Drops the slot if it exists, waiting for a walsender that still holds it (a stream dropped
    /// by a failed test) to let go.
    async fn drop_slot_eventually(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self
                .admin
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                     WHERE slot_name = $1",
                    &[&self.slot],
                )
                .await
            {
                Ok(_) => return,
                Err(e)
                    if e.code() == Some(&SqlState::OBJECT_IN_USE) && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("dropping slot {}: {e}", self.slot),
            }
        }
    }
}

fn pgoutput_options(publications: &str) -> [(&'static str, &str); 4] {
    [
        ("proto_version", "2"),
        ("publication_names", publications),
        ("streaming", "on"),
        ("messages", "true"),
    ]
}

async fn next_event(stream: &mut ReplicationStream) -> StreamEvent {
    tokio::time::timeout(EVENT_TIMEOUT, stream.next())
        .await
        .expect("a stream event in time")
        .expect("stream event")
}

/// pgoutput messages up to and including the first one tagged `last`; keepalives are skipped.
async fn read_until(stream: &mut ReplicationStream, last: u8) -> Vec<Bytes> {
    let mut messages = Vec::new();
    loop {
        match next_event(stream).await {
            StreamEvent::XLogData { data, .. } => {
                let tag = *data.first().expect("pgoutput messages are never empty");
                messages.push(data);
                if tag == last {
                    return messages;
                }
            }
            StreamEvent::Keepalive { .. } => {}
            StreamEvent::End => panic!("the server ended the stream"),
        }
    }
}

fn tags(messages: &[Bytes]) -> String {
    messages.iter().map(|m| char::from(m[0])).collect()
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn be_lsn(bytes: &[u8], at: usize) -> Lsn {
    Lsn(u64::from_be_bytes(
        bytes[at..at + 8].try_into().expect("8 bytes"),
    ))
}

/// The first column, as text, of a pgoutput Insert: `'I' [xid] relid 'N' ncols ('t' len value)…`
/// (`xid` only inside a streamed transaction).
fn inserted_id(insert: &[u8], streamed: bool) -> i32 {
    assert_eq!(insert[0], b'I');
    let tuple = if streamed { 9 } else { 5 };
    assert_eq!(insert[tuple], b'N', "new tuple");
    assert_eq!(insert[tuple + 3], b't', "first column in text");
    let len = be_u32(insert, tuple + 4) as usize;
    let value = &insert[tuple + 8..tuple + 8 + len];
    std::str::from_utf8(value)
        .expect("utf-8")
        .parse()
        .expect("an integer")
}

/// Begin: `'B' final_lsn commit_time xid`.
fn begin_final_lsn(begin: &[u8]) -> Lsn {
    assert_eq!(begin[0], b'B');
    be_lsn(begin, 1)
}

/// Commit: `'C' flags commit_lsn end_lsn commit_time`.
fn commit_lsns(commit: &[u8]) -> (Lsn, Lsn) {
    assert_eq!(commit[0], b'C');
    (be_lsn(commit, 2), be_lsn(commit, 10))
}

#[tokio::test]
async fn committed_changes_stream_and_an_acknowledged_flush_becomes_the_slots_position() {
    let src = source("stream_ack").await;
    src.run(async {
        let (connection, start) = src.connect_with_slot().await;
        src.admin
            .batch_execute("INSERT INTO items VALUES (1, 'one'), (2, 'two')")
            .await
            .expect("insert");
        let mut stream = src.start(connection, start).await;

        let transaction = read_until(&mut stream, b'C').await;
        assert_eq!(tags(&transaction), "BRIIC");
        let ids: Vec<i32> = transaction[2..4]
            .iter()
            .map(|m| inserted_id(m, false))
            .collect();
        assert_eq!(ids, [1, 2]);
        let (commit_lsn, end_lsn) = commit_lsns(&transaction[4]);
        assert_eq!(begin_final_lsn(&transaction[0]), commit_lsn);
        assert!(
            start < commit_lsn && commit_lsn < end_lsn,
            "{start} {commit_lsn} {end_lsn}"
        );
        assert_eq!(
            src.confirmed_flush().await,
            Some(start),
            "nothing acknowledged yet"
        );

        // With nothing acknowledged, the walsender pings before it waits for more WAL.
        let wal_end = loop {
            match next_event(&mut stream).await {
                StreamEvent::Keepalive { wal_end, .. } => break wal_end,
                // PostgreSQL 15 sends empty stream blocks (start, stop, abort) for large
                // transactions of other databases: tests beside this one write those.
                StreamEvent::XLogData { data, .. }
                    if data.first().is_some_and(|b| b"SEA".contains(b)) => {}
                other => panic!("expected a keepalive, got {other:?}"),
            }
        };
        assert!(wal_end >= end_lsn, "{wal_end} < {end_lsn}");

        stream
            .send_status(end_lsn, end_lsn, end_lsn, false)
            .await
            .expect("status update");
        let deadline = Instant::now() + Duration::from_secs(10);
        while src.confirmed_flush().await != Some(end_lsn) {
            assert!(
                Instant::now() < deadline,
                "confirmed_flush_lsn stayed at {:?}, expected {end_lsn}",
                src.confirmed_flush().await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stream.finish().await.expect("clean finish");
    })
    .await;
}

#[tokio::test]
async fn a_restart_from_the_acknowledged_position_skips_what_was_acknowledged() {
    let src = source("stream_resume").await;
    src.run(async {
        let (connection, start) = src.connect_with_slot().await;
        src.admin
            .batch_execute("INSERT INTO items VALUES (1, 'acknowledged')")
            .await
            .expect("first transaction");
        let mut stream = src.start(connection, start).await;
        let first = read_until(&mut stream, b'C').await;
        assert_eq!(tags(&first), "BRIC");
        assert_eq!(inserted_id(&first[2], false), 1);
        let (_, acknowledged) = commit_lsns(&first[3]);
        stream
            .send_status(acknowledged, acknowledged, acknowledged, false)
            .await
            .expect("status update");
        stream.finish().await.expect("clean finish");

        for id in [2, 3] {
            src.admin
                .execute("INSERT INTO items VALUES ($1, 'later')", &[&id])
                .await
                .expect("later transaction");
        }

        let mut stream = src.start(src.connect().await, acknowledged).await;
        let mut ids = Vec::new();
        for _ in [2, 3] {
            let transaction = read_until(&mut stream, b'C').await;
            // A new session sends the Relation again before the first change.
            assert!(
                matches!(tags(&transaction).as_str(), "BRIC" | "BIC"),
                "{}",
                tags(&transaction)
            );
            assert!(begin_final_lsn(&transaction[0]) > acknowledged);
            ids.push(inserted_id(&transaction[transaction.len() - 2], false));
        }
        assert_eq!(ids, [2, 3], "the acknowledged transaction came again");
        stream.finish().await.expect("clean finish");
    })
    .await;
}

#[tokio::test]
async fn status_updates_keep_a_short_timeout_session_alive_and_silence_ends_it() {
    let src = source("stream_keepalive").await;
    src.run(async {
        // 2 s: the server asks for a reply after 1 s of silence and hangs up after 2 s.
        let mut config = src.config.clone();
        config.options("-c wal_sender_timeout=2s");

        let (connection, start) = src.connect_with_slot().await;
        connection.close().await.expect("close");
        let connection = ReplicationConnection::connect(&config)
            .await
            .expect("connect");
        let mut stream = src.start(connection, start).await;
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut requests = 0;
        loop {
            // As the daemon will: the stream raced against a timer, which must lose nothing.
            let event = tokio::select! {
                event = stream.next() => event.expect("the session stays alive"),
                () = tokio::time::sleep_until(until) => break,
            };
            match event {
                StreamEvent::Keepalive {
                    wal_end,
                    reply_requested: true,
                    ..
                } => {
                    requests += 1;
                    // Received up to wal_end; nothing durable to acknowledge.
                    stream
                        .send_status(wal_end, Lsn::INVALID, Lsn::INVALID, false)
                        .await
                        .expect("status update");
                }
                StreamEvent::Keepalive { .. } => {}
                // PostgreSQL 15 sends empty stream blocks (start, stop, abort) for large
                // transactions of other databases: tests beside this one write those.
                StreamEvent::XLogData { data, .. }
                    if data.first().is_some_and(|b| b"SEA".contains(b)) => {}
                other => panic!("nothing was written, got {other:?}"),
            }
        }
        assert!(requests >= 2, "{requests} reply requests in 5 s");
        stream.finish().await.expect("alive after 2.5 timeouts");

        let connection = ReplicationConnection::connect(&config)
            .await
            .expect("connect");
        let mut stream = src.start(connection, start).await;
        let started = Instant::now();
        let err = loop {
            match tokio::time::timeout(Duration::from_secs(15), stream.next())
                .await
                .expect("the server gives up on a silent client")
            {
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        assert!(
            matches!(err, ReplicationError::Closed | ReplicationError::Io { .. }),
            "{err:?}"
        );
        assert!(err.class().is_transient());
        assert!(started.elapsed() >= Duration::from_millis(1500));
    })
    .await;
}

#[tokio::test]
async fn a_transaction_larger_than_the_decoding_memory_arrives_in_streamed_chunks() {
    const ROWS: i32 = 5000;
    let src = source("stream_large").await;
    src.run(async {
        let (connection, start) = src.connect_with_slot().await;
        let mut stream = src.start(connection, start).await;
        // ~0.7 MB of changes against logical_decoding_work_mem=64kB.
        src.admin
            .execute(
                "INSERT INTO items SELECT g, repeat('x', 100) FROM generate_series(1, $1) g",
                &[&ROWS],
            )
            .await
            .expect("large transaction");

        let messages = read_until(&mut stream, b'c').await;
        let tags = tags(&messages);
        assert!(tags.starts_with('S'), "{}", &tags[..20.min(tags.len())]);
        assert!(
            !tags.contains(['B', 'C']),
            "not sent as a plain transaction"
        );
        let xid = be_u32(&messages[0], 1);
        let mut chunks = 0;
        let mut open = false;
        let mut ids = Vec::new();
        for message in &messages {
            match message[0] {
                b'S' => {
                    assert!(!open, "StreamStart inside a chunk");
                    open = true;
                    chunks += 1;
                    assert_eq!(be_u32(message, 1), xid);
                    // first_segment is set on the first chunk only.
                    assert_eq!(message[5], u8::from(chunks == 1));
                }
                b'E' => {
                    assert!(open, "StreamStop outside a chunk");
                    open = false;
                }
                b'I' => {
                    assert!(open, "change outside a chunk");
                    assert_eq!(be_u32(message, 1), xid);
                    ids.push(inserted_id(message, true));
                }
                b'R' => assert!(open, "Relation outside a chunk"),
                b'c' => {
                    assert!(!open, "StreamCommit inside a chunk");
                    assert_eq!(be_u32(message, 1), xid);
                }
                other => panic!("unexpected pgoutput message {:?}", char::from(other)),
            }
        }
        assert!(chunks >= 2, "{chunks} chunk(s)");
        assert_eq!(ids, (1..=ROWS).collect::<Vec<_>>());

        // StreamCommit: 'c' xid flags commit_lsn end_lsn commit_time.
        let commit = messages.last().expect("StreamCommit");
        let end_lsn = be_lsn(commit, 14);
        assert!(end_lsn > be_lsn(commit, 6));
        stream
            .send_status(end_lsn, end_lsn, end_lsn, false)
            .await
            .expect("status update");
        stream.finish().await.expect("clean finish");
    })
    .await;
}

#[tokio::test]
async fn starting_from_a_missing_slot_is_a_42704_server_error() {
    let src = source("stream_missing").await;
    src.run(async {
        let publications = quote_publication_names([PUBLICATION]);
        let err = src
            .connect()
            .await
            .start_logical(&src.slot, Lsn::INVALID, &pgoutput_options(&publications))
            .await
            .expect_err("no such slot");
        assert_eq!(err.code(), Some("42704"), "{err}");
        assert!(!err.class().is_transient());
    })
    .await;
}

/// Measures how fast row changes come through the stream, server-side decoding included (it is
/// the bottleneck). Not a pass/fail test:
/// `cargo test --test e2e -- --ignored --nocapture replication_stream_throughput`.
#[tokio::test]
#[ignore = "a measurement; run it explicitly"]
async fn replication_stream_throughput() {
    const ROWS: i32 = 200_000;
    const TRANSACTIONS: i32 = 50_000;
    let src = source("stream_throughput").await;
    src.run(async {
        let (connection, start) = src.connect_with_slot().await;
        connection.close().await.expect("close");

        src.admin
            .execute(
                "INSERT INTO items SELECT g, repeat('x', 40) FROM generate_series(1, $1) g",
                &[&ROWS],
            )
            .await
            .expect("one large transaction");
        let (messages, bytes, elapsed, end) = drain(&src, start, b'c', 1).await;
        report("one transaction", ROWS, messages, bytes, elapsed);

        src.admin
            .batch_execute(&format!(
                "DO $$ BEGIN FOR i IN 1..{TRANSACTIONS} LOOP \
                   INSERT INTO items VALUES ({ROWS} + i, 'small'); COMMIT; \
                 END LOOP; END $$"
            ))
            .await
            .expect("many small transactions");
        let (messages, bytes, elapsed, _) = drain(&src, end, b'C', TRANSACTIONS).await;
        report(
            "single-row transactions",
            TRANSACTIONS,
            messages,
            bytes,
            elapsed,
        );
    })
    .await;
}

async fn drain(src: &Source, from: Lsn, last: u8, count: i32) -> (u64, u64, Duration, Lsn) {
    let mut stream = src.start(src.connect().await, from).await;
    let started = Instant::now();
    let cpu_before = process_cpu();
    let (mut messages, mut bytes, mut seen) = (0u64, 0u64, 0);
    let end = loop {
        if let StreamEvent::XLogData { data, .. } = next_event(&mut stream).await {
            messages += 1;
            bytes += data.len() as u64;
            if data[0] == last {
                seen += 1;
                if seen == count {
                    let at = if last == b'c' { 14 } else { 10 };
                    break be_lsn(&data, at);
                }
            }
        }
    };
    let elapsed = started.elapsed();
    if let (Some(before), Some(after)) = (cpu_before, process_cpu()) {
        eprintln!(
            "  client CPU while draining: {:.2} s of {:.2} s",
            (after - before).as_secs_f64(),
            elapsed.as_secs_f64()
        );
    }
    stream
        .send_status(end, end, end, false)
        .await
        .expect("status update");
    stream.finish().await.expect("finish");
    (messages, bytes, elapsed, end)
}

/// User + system CPU time of this process so far (Linux), to tell whether the client or the
/// server is the bottleneck.
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(Duration::from_millis(ticks * 10))
}

fn report(what: &str, rows: i32, messages: u64, bytes: u64, elapsed: Duration) {
    let seconds = elapsed.as_secs_f64();
    eprintln!(
        "{what}: {rows} row changes, {messages} messages, {:.1} MB in {seconds:.2} s: \
         {:.0} row changes/s, {:.0} messages/s",
        bytes as f64 / 1e6,
        f64::from(rows) / seconds,
        messages as f64 / seconds
    );
}
