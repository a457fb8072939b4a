//! A scripted walsender for the tests: backend messages built by hand as a server would send
//! them, and a server on the other end of an in-memory pipe that runs a test's script.
//!
//! Shared by the tests of the session, authentication, framing and the CopyBoth stream, so that
//! they all speak to the same server. Test-only: it must never be compiled into the program.

use std::collections::HashMap;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
use tokio::task::JoinHandle;
use tokio_postgres::config::Config;

use super::error::ReplicationError;
use super::session::ReplicationConnection;

// ---- backend messages, built by hand as a server would send them ----

pub(super) fn backend(tag: u8, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len() + 4).expect("test message fits");
    let mut out = vec![tag];
    out.extend(len.to_be_bytes());
    out.extend(body);
    out
}

pub(super) fn authentication(code: i32, extra: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend(extra);
    backend(b'R', &body)
}

pub(super) fn cstrs(parts: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for part in parts {
        out.extend(part.as_bytes());
        out.push(0);
    }
    out
}

pub(super) fn parameter_status(name: &str, value: &str) -> Vec<u8> {
    backend(b'S', &cstrs(&[name, value]))
}

pub(super) fn backend_key_data(pid: i32, secret: i32) -> Vec<u8> {
    let mut body = pid.to_be_bytes().to_vec();
    body.extend(secret.to_be_bytes());
    backend(b'K', &body)
}

pub(super) fn ready() -> Vec<u8> {
    backend(b'Z', b"I")
}

pub(super) fn server_fields(
    tag: u8,
    severity: &str,
    code: &str,
    message: &str,
    hint: Option<&str>,
) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', message),
    ]
    .into_iter()
    .chain(hint.map(|h| (b'H', h)))
    {
        body.push(field);
        body.extend(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    backend(tag, &body)
}

pub(super) fn error_response(
    severity: &str,
    code: &str,
    message: &str,
    hint: Option<&str>,
) -> Vec<u8> {
    server_fields(b'E', severity, code, message, hint)
}

pub(super) fn row_description(columns: &[&str]) -> Vec<u8> {
    let mut body = u16::try_from(columns.len())
        .expect("few")
        .to_be_bytes()
        .to_vec();
    for column in columns {
        body.extend(cstrs(&[column]));
        body.extend(0u32.to_be_bytes()); // table oid
        body.extend(0i16.to_be_bytes()); // column number
        body.extend(25u32.to_be_bytes()); // text
        body.extend((-1i16).to_be_bytes());
        body.extend((-1i32).to_be_bytes());
        body.extend(0i16.to_be_bytes()); // text format
    }
    backend(b'T', &body)
}

pub(super) fn data_row(values: &[Option<&str>]) -> Vec<u8> {
    let mut body = u16::try_from(values.len())
        .expect("few")
        .to_be_bytes()
        .to_vec();
    for value in values {
        match value {
            None => body.extend((-1i32).to_be_bytes()),
            Some(v) => {
                body.extend(i32::try_from(v.len()).expect("short").to_be_bytes());
                body.extend(v.as_bytes());
            }
        }
    }
    backend(b'D', &body)
}

pub(super) fn command_complete(tag: &str) -> Vec<u8> {
    backend(b'C', &cstrs(&[tag]))
}

pub(super) fn copy_both_response(columns: u16) -> Vec<u8> {
    let mut body = vec![0u8];
    body.extend(columns.to_be_bytes());
    for _ in 0..columns {
        body.extend(0u16.to_be_bytes());
    }
    backend(b'W', &body)
}

// ---- a scripted server on the other end of an in-memory pipe ----

pub(super) struct MockServer {
    pub(super) stream: DuplexStream,
}

impl MockServer {
    pub(super) async fn read_startup(&mut self) -> HashMap<String, String> {
        let len = self.stream.read_u32().await.expect("startup length");
        let mut body = vec![0; len as usize - 4];
        self.stream
            .read_exact(&mut body)
            .await
            .expect("startup body");
        assert_eq!(&body[..4], &0x0003_0000u32.to_be_bytes(), "protocol 3.0");
        let strings: Vec<String> = body[4..]
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8(s.to_vec()).expect("utf-8"))
            .collect();
        strings
            .chunks(2)
            .map(|kv| (kv[0].clone(), kv[1].clone()))
            .collect()
    }

    pub(super) async fn read_message(&mut self) -> (u8, Vec<u8>) {
        let tag = self.stream.read_u8().await.expect("tag");
        let len = self.stream.read_u32().await.expect("length");
        let mut body = vec![0; len as usize - 4];
        self.stream.read_exact(&mut body).await.expect("body");
        (tag, body)
    }

    pub(super) async fn send(&mut self, messages: &[Vec<u8>]) {
        for message in messages {
            self.stream.write_all(message).await.expect("server write");
        }
        self.stream.flush().await.expect("server flush");
    }

    pub(super) async fn accept_trust(&mut self) {
        self.read_startup().await;
        self.send(&[authentication(0, b""), backend_key_data(42, 7), ready()])
            .await;
    }
}

pub(super) fn config() -> Config {
    let mut config = Config::new();
    config.user("alice").dbname("updog");
    config
}

/// Runs `script` as the server and connects a client to it. `pipe` is the in-memory buffer
/// size: 1 forces every message, both ways, to cross in one-byte reads.
pub(super) async fn with_server<F, Fut>(
    pipe: usize,
    config: &Config,
    script: F,
) -> (
    Result<ReplicationConnection<DuplexStream>, ReplicationError>,
    JoinHandle<MockServer>,
)
where
    F: FnOnce(MockServer) -> Fut + Send + 'static,
    Fut: Future<Output = MockServer> + Send + 'static,
{
    let (client, server) = duplex(pipe);
    let server = tokio::spawn(script(MockServer { stream: server }));
    let connection = ReplicationConnection::connect_stream(client, config).await;
    (connection, server)
}
