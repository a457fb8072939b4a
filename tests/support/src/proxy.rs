//! A TCP proxy on loopback between the daemon and a server, for outages, slow responses and
//! remote round trips: `Down` cuts every open connection and drops new ones at once (to the
//! client, a server that went away); `Slow(d)` delays the connection and every chunk the server
//! sends by `d`; `Latency(d)` delays each HTTP request by `d` before forwarding it, so that
//! every request/response costs `d` more, as a remote S3 with a round trip of `d` would.
//! It also counts the HTTP requests it forwards (per method), which is how tests and benches
//! see how many round trips an operation makes.
//! It runs on a runtime of its own, so it forwards while the test's threads block.
//!
//! Counting rests on one property of the clients it serves (the AWS SDK's HTTP/1.1 connection
//! pool): they never pipeline. A request on a keep-alive connection therefore starts with the
//! first bytes the client sends after the server sent response bytes (or with the first bytes
//! of the connection), and everything the client sends until the server answers is that
//! request's headers and body. An interim `100 Continue` is not an answer: the body follows it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Down,
    Slow(Duration),
    /// An added round trip per HTTP request: the request waits `d` before it is forwarded;
    /// responses stream as they come. New connections are not delayed (the SDK keeps its
    /// connections alive, so a remote store's handshakes are rare next to its requests).
    Latency(Duration),
}

pub struct Proxy {
    pub addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    requests: Arc<Requests>,
}

/// HTTP requests forwarded, in total and per method (`LIST` for a GET whose request line has
/// `list-type=`, S3's ListObjectsV2).
#[derive(Default)]
struct Requests {
    total: AtomicU64,
    by_method: Mutex<BTreeMap<String, u64>>,
}

impl Requests {
    fn count(&self, first_bytes: &[u8]) {
        self.total.fetch_add(1, Ordering::SeqCst);
        *self
            .by_method
            .lock()
            .unwrap()
            .entry(method_of(first_bytes))
            .or_default() += 1;
    }
}

impl Proxy {
    /// Forwards a free loopback port to `target`.
    pub fn start(target: SocketAddr) -> Proxy {
        let mode = Arc::new(Mutex::new(Mode::Pass));
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let requests: Arc<Requests> = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let (m, c, r) = (mode.clone(), connections.clone(), requests.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    let mode = *m.lock().unwrap();
                    if mode == Mode::Down {
                        drop(client);
                        continue;
                    }
                    let (m, r) = (m.clone(), r.clone());
                    let task = tokio::spawn(async move {
                        let _ = forward(client, target, m, r).await;
                    });
                    let mut open = c.lock().unwrap();
                    open.retain(|t| !t.is_finished());
                    open.push(task.abort_handle());
                }
            });
        });
        Proxy {
            addr: rx.recv().unwrap(),
            mode,
            connections,
            requests,
        }
    }

    /// A proxy in front of the test's S3 server, and `env`'s repository reached through it.
    pub async fn in_front_of_s3(env: &mut super::TestEnv) -> Proxy {
        let server = super::seaweed::s3()
            .await
            .endpoint()
            .trim_start_matches("http://")
            .parse()
            .unwrap();
        let proxy = Proxy::start(server);
        env.env.push((
            "UPDOG_BACKUP__STORAGE__S3_ENDPOINT".into(),
            format!("http://{}", proxy.addr),
        ));
        proxy
    }

    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
        if mode == Mode::Down {
            for connection in self.connections.lock().unwrap().drain(..) {
                connection.abort();
            }
        }
    }

    /// HTTP requests forwarded to the server since the start or the last [`Proxy::reset_requests`].
    pub fn requests(&self) -> u64 {
        self.requests.total.load(Ordering::SeqCst)
    }

    /// [`Proxy::requests`] per method: `GET`, `PUT`, `HEAD`, `DELETE`, `POST`, and `LIST` for
    /// S3 listings (a GET with `list-type=`).
    pub fn requests_by_method(&self) -> BTreeMap<String, u64> {
        self.requests.by_method.lock().unwrap().clone()
    }

    pub fn reset_requests(&self) {
        // Under one lock with the total, so that a reader never sees one reset and not the other.
        let mut by_method = self.requests.by_method.lock().unwrap();
        by_method.clear();
        self.requests.total.store(0, Ordering::SeqCst);
    }
}

/// `GET 300, LIST 1, PUT 2`: a per-method count for reports.
pub fn describe_methods(by_method: &BTreeMap<String, u64>) -> String {
    if by_method.is_empty() {
        return "none".into();
    }
    by_method
        .iter()
        .map(|(m, n)| format!("{m} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The method of a request from its first bytes (its request line, which the client writes in
/// one piece with the headers).
fn method_of(first_bytes: &[u8]) -> String {
    let line_end = first_bytes
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(first_bytes.len());
    let line = String::from_utf8_lossy(&first_bytes[..line_end]);
    let method = line.split(' ').next().unwrap_or_default();
    if method.is_empty() || method.len() > 10 || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return "OTHER".into();
    }
    if method == "GET" && line.contains("list-type=") {
        return "LIST".into();
    }
    method.to_string()
}

/// Whether the first bytes of the server's answer hold a final response, not only interim
/// `1xx` ones (`100 Continue`, after which the client sends the body of the same request).
fn holds_final_response(mut chunk: &[u8]) -> bool {
    loop {
        let interim = chunk.len() >= 12
            && (chunk.starts_with(b"HTTP/1.1 1") || chunk.starts_with(b"HTTP/1.0 1"))
            && &chunk[9..12] != b"101";
        if !interim {
            return !chunk.is_empty();
        }
        match chunk.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(end) => chunk = &chunk[end + 4..],
            // The rest of the interim response comes in the next chunk.
            None => return false,
        }
    }
}

/// How much of a request's first bytes is kept to find its request line.
const MAX_REQUEST_LINE: usize = 8 * 1024;

/// Where a connection is in its request/response exchange.
struct Exchange {
    /// The client's next bytes start a new request.
    awaiting_request: bool,
    /// The server has started its final answer to the current request.
    answered: bool,
}

async fn forward(
    client: TcpStream,
    target: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    requests: Arc<Requests>,
) -> std::io::Result<()> {
    let current = || *mode.lock().unwrap();
    if let Mode::Slow(d) = current() {
        tokio::time::sleep(d).await;
    }
    let server = TcpStream::connect(target).await?;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let exchange = Mutex::new(Exchange {
        awaiting_request: true,
        answered: false,
    });
    let upstream = async {
        let mut buf = vec![0u8; 64 * 1024];
        // The current request's first bytes until its request line is whole (a client may
        // write it in pieces): its method is known then.
        let mut request_line: Option<Vec<u8>> = None;
        loop {
            let n = client_read.read(&mut buf).await?;
            if n == 0 {
                if let Some(line) = request_line.take() {
                    requests.count(&line);
                }
                return server_write.shutdown().await;
            }
            let starts_request = {
                let mut e = exchange.lock().unwrap();
                let starts = e.awaiting_request;
                if starts {
                    e.awaiting_request = false;
                    e.answered = false;
                }
                starts
            };
            if starts_request {
                if let Some(unfinished) = request_line.replace(Vec::new()) {
                    requests.count(&unfinished);
                }
                if let Mode::Latency(d) = current() {
                    tokio::time::sleep(d).await;
                }
            }
            if let Some(line) = request_line.as_mut() {
                line.extend_from_slice(&buf[..n.min(MAX_REQUEST_LINE)]);
                if line.windows(2).any(|w| w == b"\r\n") || line.len() >= MAX_REQUEST_LINE {
                    requests.count(line);
                    request_line = None;
                }
            }
            server_write.write_all(&buf[..n]).await?;
        }
    };
    let downstream = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = server_read.read(&mut buf).await?;
            if n == 0 {
                return client_write.shutdown().await;
            }
            // Before the client can see the answer (and send its next request).
            {
                let mut e = exchange.lock().unwrap();
                if !e.answered && holds_final_response(&buf[..n]) {
                    e.answered = true;
                    e.awaiting_request = true;
                }
            }
            if let Mode::Slow(d) = current() {
                tokio::time::sleep(d).await;
            }
            client_write.write_all(&buf[..n]).await?;
        }
    };
    let (a, b) = tokio::join!(upstream, downstream);
    a.and(b)
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Instant;

    use super::*;

    /// A minimal HTTP/1.1 server (keep-alive, Content-Length bodies, `Expect: 100-continue`)
    /// answering every request with a 2-byte body; returns its address.
    fn http_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                std::thread::spawn(move || serve(stream));
            }
        });
        addr
    }

    fn serve(stream: TcpStream) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        loop {
            let mut head = Vec::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                if line == "\r\n" {
                    break;
                }
                head.push(line.to_ascii_lowercase());
            }
            let length: usize = head
                .iter()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if head.iter().any(|l| l.starts_with("expect: 100-continue")) {
                writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let response: &[u8] = if head[0].starts_with("head ") {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            };
            writer.write_all(response).unwrap();
        }
    }

    /// One request on a keep-alive connection, its whole response read (the client does not
    /// pipeline). With `expect`, the body waits for the server's `100 Continue`.
    fn exchange(stream: &mut TcpStream, method: &str, path: &str, body: &[u8], expect: bool) {
        let expect_header = if expect {
            "Expect: 100-continue\r\n"
        } else {
            ""
        };
        // The request line in two writes: the proxy must not need it in one read.
        stream.write_all(method.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let head = format!(
            " {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n{expect_header}\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut status = String::new();
        if expect {
            reader.read_line(&mut status).unwrap();
            assert!(status.starts_with("HTTP/1.1 100"), "{status}");
            let mut blank = String::new();
            reader.read_line(&mut blank).unwrap();
            status.clear();
        }
        // Written in pieces, as a client streams a body.
        for piece in body.chunks(10_000) {
            stream.write_all(piece).unwrap();
        }
        reader.read_line(&mut status).unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
        }
        if method != "HEAD" {
            let mut ok = [0u8; 2];
            reader.read_exact(&mut ok).unwrap();
            assert_eq!(&ok, b"ok");
        }
        // The BufReader read nothing beyond the response: the server sends nothing unasked.
        assert!(reader.buffer().is_empty());
    }

    #[test]
    fn counts_every_request_of_keep_alive_connections_by_method() {
        let proxy = Proxy::start(http_server());
        let mut first = TcpStream::connect(proxy.addr).unwrap();
        exchange(&mut first, "GET", "/bucket/a", b"", false);
        // A body larger than the proxy's buffer arrives in several reads: still one request.
        exchange(&mut first, "PUT", "/bucket/b", &vec![7u8; 200_000], false);
        exchange(
            &mut first,
            "GET",
            "/bucket?list-type=2&prefix=changes%2F",
            b"",
            false,
        );
        exchange(&mut first, "HEAD", "/bucket/c", b"", false);
        // The body after an interim 100 Continue belongs to the same request.
        exchange(&mut first, "PUT", "/bucket/d", &vec![1u8; 30_000], true);
        let mut second = TcpStream::connect(proxy.addr).unwrap();
        exchange(&mut second, "DELETE", "/bucket/a", b"", false);
        exchange(&mut second, "POST", "/bucket?delete", b"<Delete/>", false);
        assert_eq!(proxy.requests(), 7);
        let by_method = proxy.requests_by_method();
        let expected: BTreeMap<String, u64> = [
            ("DELETE", 1),
            ("GET", 1),
            ("HEAD", 1),
            ("LIST", 1),
            ("POST", 1),
            ("PUT", 2),
        ]
        .into_iter()
        .map(|(m, n)| (m.to_string(), n))
        .collect();
        assert_eq!(by_method, expected);
        assert_eq!(
            describe_methods(&by_method),
            "DELETE 1, GET 1, HEAD 1, LIST 1, POST 1, PUT 2"
        );
        proxy.reset_requests();
        assert_eq!(proxy.requests(), 0);
        assert!(proxy.requests_by_method().is_empty());
        exchange(&mut second, "GET", "/bucket/a", b"", false);
        assert_eq!(proxy.requests(), 1);
    }

    /// Each request waits the added round trip once, however many reads its body takes (a
    /// lower bound only: how much longer a loaded machine takes is not this test's business).
    #[test]
    fn latency_adds_one_round_trip_per_request() {
        let proxy = Proxy::start(http_server());
        let d = Duration::from_millis(60);
        proxy.set(Mode::Latency(d));
        let mut stream = TcpStream::connect(proxy.addr).unwrap();
        let clock = Instant::now();
        exchange(&mut stream, "GET", "/bucket/a", b"", false);
        exchange(&mut stream, "PUT", "/bucket/b", &vec![0u8; 150_000], false);
        exchange(&mut stream, "GET", "/bucket/c", b"", false);
        assert!(clock.elapsed() >= 3 * d, "{:?}", clock.elapsed());
        assert_eq!(proxy.requests(), 3);
        // Back to Pass on the same connection: counted, not delayed.
        proxy.set(Mode::Pass);
        exchange(&mut stream, "GET", "/bucket/d", b"", false);
        assert_eq!(proxy.requests(), 4);
    }

    #[test]
    fn methods_and_interim_responses() {
        assert_eq!(method_of(b"GET /b/k HTTP/1.1\r\nHost: x\r\n"), "GET");
        assert_eq!(
            method_of(b"GET /b?list-type=2&prefix=changes HTTP/1.1\r\n"),
            "LIST"
        );
        assert_eq!(method_of(b"\x16\x03\x01 tls"), "OTHER");
        assert!(holds_final_response(b"HTTP/1.1 200 OK\r\n"));
        assert!(!holds_final_response(b"HTTP/1.1 100 Continue\r\n\r\n"));
        assert!(holds_final_response(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 412 Precondition Failed\r\n"
        ));
        assert!(!holds_final_response(b"HTTP/1.1 100 Conti"));
        assert!(!holds_final_response(b""));
    }
}
