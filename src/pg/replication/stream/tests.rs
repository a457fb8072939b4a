use std::time::Duration;

use tokio::io::{AsyncWriteExt as _, DuplexStream};
use tokio::task::JoinHandle;

use super::super::mock::{
    MockServer, backend, command_complete, config, copy_both_response, cstrs, error_response,
    ready, with_server,
};
use super::*;
use crate::retry::Classify as _;

fn copy_data(body: &[u8]) -> Vec<u8> {
    backend(b'd', body)
}

fn xlog_data(wal_start: u64, wal_end: u64, time: i64, payload: &[u8]) -> Vec<u8> {
    let mut body = vec![XLOG_DATA_TAG];
    body.extend(wal_start.to_be_bytes());
    body.extend(wal_end.to_be_bytes());
    body.extend(time.to_be_bytes());
    body.extend(payload);
    copy_data(&body)
}

fn keepalive(wal_end: u64, time: i64, reply: bool) -> Vec<u8> {
    let mut body = vec![KEEPALIVE_TAG];
    body.extend(wal_end.to_be_bytes());
    body.extend(time.to_be_bytes());
    body.push(u8::from(reply));
    copy_data(&body)
}

const OPTIONS: [(&str, &str); 4] = [
    ("proto_version", "2"),
    ("publication_names", "\"it's\",\"b\"\"c\""),
    ("streaming", "on"),
    ("messages", "true"),
];

const COMMAND: &str = "START_REPLICATION SLOT \"updog\" LOGICAL 1/2A (\"proto_version\" '2', \
                       \"publication_names\" '\"it''s\",\"b\"\"c\"', \"streaming\" 'on', \
                       \"messages\" 'true')";

/// Reads the START_REPLICATION query and enters CopyBoth.
async fn accept_start(server: &mut MockServer) {
    server.accept_trust().await;
    let (tag, body) = server.read_message().await;
    assert_eq!(tag, b'Q');
    assert_eq!(body, cstrs(&[COMMAND]));
    server.send(&[copy_both_response(0)]).await;
}

async fn start<F, Fut>(
    pipe: usize,
    script: F,
) -> (ReplicationStream<DuplexStream>, JoinHandle<MockServer>)
where
    F: FnOnce(MockServer) -> Fut + Send + 'static,
    Fut: Future<Output = MockServer> + Send + 'static,
{
    let (connection, server) = with_server(pipe, &config(), script).await;
    let stream = connection
        .expect("connects")
        .start_logical("updog", Lsn(0x1_0000_002A), &OPTIONS)
        .await
        .expect("streaming");
    (stream, server)
}

#[tokio::test]
async fn streams_data_and_keepalives_sends_status_and_finishes_over_one_byte_reads() {
    let (mut stream, server) = start(1, |mut server| async move {
        accept_start(&mut server).await;
        server
            .send(&[
                xlog_data(0x10, 0x20, 7, b"Bpayload"),
                xlog_data(0, 0, 8, b""),
                keepalive(0x30, 9, true),
            ])
            .await;
        let (tag, body) = server.read_message().await;
        assert_eq!(tag, b'd');
        assert_eq!(body.len(), 34);
        assert_eq!(body[0], b'r');
        assert_eq!(body[1..9], 0x30u64.to_be_bytes());
        assert_eq!(body[9..17], 0x20u64.to_be_bytes());
        assert_eq!(body[17..25], 0x10u64.to_be_bytes());
        let client_time = i64::from_be_bytes(body[25..33].try_into().expect("8"));
        // After 2024-01-01, in µs since 2000-01-01.
        assert!(client_time > 757_382_400_000_000, "{client_time}");
        assert_eq!(body[33], 1);
        // finish: our CopyDone, then whatever was in flight, then the server's end.
        assert_eq!(server.read_message().await, (b'c', Vec::new()));
        server
            .send(&[
                xlog_data(0x40, 0x40, 10, b"Cin flight"),
                backend(b'c', b""),
                command_complete("START_REPLICATION"),
                ready(),
            ])
            .await;
        assert_eq!(server.read_message().await, (b'X', Vec::new()));
        server
    })
    .await;
    let before = stream.last_status_sent();
    assert_eq!(
        stream.next().await.expect("data"),
        StreamEvent::XLogData {
            wal_start: Lsn(0x10),
            wal_end: Lsn(0x20),
            server_time: 7,
            data: Bytes::from_static(b"Bpayload"),
        }
    );
    assert_eq!(
        stream.next().await.expect("empty payload"),
        StreamEvent::XLogData {
            wal_start: Lsn(0),
            wal_end: Lsn(0),
            server_time: 8,
            data: Bytes::new(),
        }
    );
    assert_eq!(
        stream.next().await.expect("keepalive"),
        StreamEvent::Keepalive {
            wal_end: Lsn(0x30),
            server_time: 9,
            reply_requested: true,
        }
    );
    stream
        .send_status(Lsn(0x30), Lsn(0x20), Lsn(0x10), true)
        .await
        .expect("status");
    assert!(stream.last_status_sent() > before);
    stream.finish().await.expect("finish");
    server.await.expect("server script");
}

#[tokio::test]
async fn next_is_cancel_safe_mid_message() {
    let message = xlog_data(1, 2, 3, &[b'I'; 1000]);
    let (first, rest) = message.split_at(600);
    let (first, rest) = (first.to_vec(), rest.to_vec());
    let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
    let (mut stream, server) = start(4096, move |mut server| async move {
        accept_start(&mut server).await;
        server.send(&[first]).await;
        gate_rx.await.expect("gate");
        server.send(&[rest]).await;
        server
    })
    .await;
    for _ in 0..3 {
        let cut = tokio::time::timeout(Duration::from_millis(20), stream.next()).await;
        assert!(cut.is_err(), "only part of the message has arrived");
    }
    gate_tx.send(()).expect("server waits");
    match stream.next().await.expect("whole message") {
        StreamEvent::XLogData { data, .. } => assert_eq!(data, vec![b'I'; 1000]),
        other => panic!("{other:?}"),
    }
    server.await.expect("server script");
}

#[tokio::test]
async fn a_server_error_ends_the_copy_and_stop_returns_a_usable_connection() {
    let (mut stream, server) = start(4096, |mut server| async move {
        accept_start(&mut server).await;
        server
            .send(&[
                error_response("ERROR", "42704", "publication \"p\" does not exist", None),
                ready(),
            ])
            .await;
        // stop() sends nothing after an error: the next message is the query.
        let (tag, body) = server.read_message().await;
        assert_eq!(
            (tag, body),
            (b'Q', cstrs(&["DROP_REPLICATION_SLOT \"updog\""]))
        );
        server
            .send(&[command_complete("DROP_REPLICATION_SLOT"), ready()])
            .await;
        server
    })
    .await;
    let err = stream.next().await.expect_err("server error");
    assert_eq!(err.code(), Some("42704"), "{err}");
    assert!(matches!(stream.next().await, Err(ReplicationError::Closed)));
    assert!(matches!(
        stream.send_status(Lsn(1), Lsn(1), Lsn(1), false).await,
        Err(ReplicationError::Closed)
    ));
    let mut connection = stream.stop().await.expect("back to idle");
    connection.drop_slot("updog", false).await.expect("usable");
    server.await.expect("server script");
}

#[tokio::test]
async fn a_shutting_down_server_ends_the_stream_and_finish_accepts_the_hang_up() {
    let (mut stream, server) = start(4096, |mut server| async move {
        accept_start(&mut server).await;
        server
            .send(&[xlog_data(5, 5, 0, b"C"), command_complete("COPY 0")])
            .await;
        server.stream.shutdown().await.expect("hang up");
        server
    })
    .await;
    assert!(matches!(
        stream.next().await,
        Ok(StreamEvent::XLogData { .. })
    ));
    assert_eq!(stream.next().await.expect("end"), StreamEvent::End);
    assert_eq!(stream.next().await.expect("still end"), StreamEvent::End);
    stream.finish().await.expect("nothing left to end");
    server.await.expect("server script");
}

#[tokio::test]
async fn a_hang_up_while_streaming_is_closed_and_retryable() {
    let (mut stream, server) = start(4096, |mut server| async move {
        accept_start(&mut server).await;
        server.stream.shutdown().await.expect("hang up");
        server
    })
    .await;
    let err = stream.next().await.expect_err("hung up");
    assert!(matches!(err, ReplicationError::Closed), "{err:?}");
    assert!(err.class().is_transient());
    assert!(matches!(
        stream.finish().await,
        Err(ReplicationError::Closed)
    ));
    server.await.expect("server script");
}

#[tokio::test]
async fn a_refused_start_returns_the_server_error_and_terminates() {
    let (connection, server) = with_server(4096, &config(), |mut server| async move {
        server.accept_trust().await;
        server.read_message().await;
        server
            .send(&[
                error_response(
                    "ERROR",
                    "42704",
                    "replication slot \"updog\" does not exist",
                    None,
                ),
                ready(),
            ])
            .await;
        assert_eq!(server.read_message().await, (b'X', Vec::new()));
        server
    })
    .await;
    let err = connection
        .expect("connects")
        .start_logical("updog", Lsn(0), &[])
        .await
        .expect_err("no slot");
    assert_eq!(err.code(), Some("42704"), "{err}");
    assert!(!err.class().is_transient());
    server.await.expect("server script");
}

#[test]
fn malformed_and_unknown_copy_data_are_protocol_errors() {
    for body in [
        Vec::new(),
        vec![XLOG_DATA_TAG; XLOG_DATA_HEADER_LEN - 1],
        vec![KEEPALIVE_TAG; KEEPALIVE_LEN - 1],
        vec![KEEPALIVE_TAG; KEEPALIVE_LEN + 1],
        b"x unknown".to_vec(),
    ] {
        let err = parse_copy_data(Bytes::from(body.clone())).expect_err("refused");
        assert!(matches!(err, ReplicationError::Protocol(_)), "{body:?}");
    }
}

#[test]
fn the_payload_is_a_slice_of_the_received_bytes() {
    let message = Bytes::from(xlog_data(1, 2, 3, b"payload")[5..].to_vec());
    let start = message.as_ptr();
    match parse_copy_data(message).expect("parses") {
        StreamEvent::XLogData { data, .. } => {
            assert_eq!(data.as_ptr(), start.wrapping_add(XLOG_DATA_HEADER_LEN));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn start_command_quotes_names_and_values() {
    assert_eq!(
        start_logical_command("updog", Lsn(0x1_0000_002A), &OPTIONS).expect("valid"),
        COMMAND
    );
    assert_eq!(
        start_logical_command("s", Lsn(0), &[]).expect("valid"),
        "START_REPLICATION SLOT \"s\" LOGICAL 0/0"
    );
    assert_eq!(
        start_logical_command("s", Lsn(0), &[("We\"ird", "back\\slash")]).expect("valid"),
        "START_REPLICATION SLOT \"s\" LOGICAL 0/0 (\"We\"\"ird\" 'back\\slash')"
    );
    for options in [&[("", "x")][..], &[("a\0b", "x")], &[("a", "x\0")]] {
        assert!(
            matches!(
                start_logical_command("s", Lsn(0), options),
                Err(ReplicationError::InvalidOption(_))
            ),
            "{options:?}"
        );
    }
    assert!(matches!(
        start_logical_command("Bad", Lsn(0), &[]),
        Err(ReplicationError::InvalidSlotName { .. })
    ));
}

#[test]
fn publication_names_are_quoted_identifiers() {
    assert_eq!(quote_publication_names(["updog"]), "\"updog\"");
    assert_eq!(
        quote_publication_names(["A, b", "it's \"x\""]),
        "\"A, b\",\"it's \"\"x\"\"\""
    );
    assert_eq!(quote_publication_names(Vec::new()), "");
}

#[test]
fn status_updates_have_the_documented_layout() {
    let mut buf = bytes::BytesMut::new();
    encode_status_update(&mut buf, Lsn(1), Lsn(2), Lsn(3), -4, false);
    assert_eq!(buf.len(), 1 + 4 + 34);
    assert_eq!(&buf[..5], &[b'd', 0, 0, 0, 38]);
    assert_eq!(buf[5], b'r');
    assert_eq!(buf[6..14], 1u64.to_be_bytes());
    assert_eq!(buf[14..22], 2u64.to_be_bytes());
    assert_eq!(buf[22..30], 3u64.to_be_bytes());
    assert_eq!(buf[30..38], (-4i64).to_be_bytes());
    assert_eq!(buf[38], 0);
}
