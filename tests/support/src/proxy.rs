//! A TCP proxy on loopback between the daemon and a server, for outages and slow responses:
//! `Down` cuts every open connection and drops new ones at once (to the client, a server that
//! went away); `Slow(d)` delays the connection and every chunk the server sends by `d`.
//! It runs on a runtime of its own, so it forwards while the test's threads block.

use std::net::SocketAddr;
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
}

pub struct Proxy {
    pub addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Proxy {
    /// Forwards a free loopback port to `target`.
    pub fn start(target: SocketAddr) -> Proxy {
        let mode = Arc::new(Mutex::new(Mode::Pass));
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let (m, c) = (mode.clone(), connections.clone());
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
                    let m = m.clone();
                    let task = tokio::spawn(async move {
                        let _ = forward(client, target, m).await;
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
}

async fn forward(
    client: TcpStream,
    target: SocketAddr,
    mode: Arc<Mutex<Mode>>,
) -> std::io::Result<()> {
    let delay = || match *mode.lock().unwrap() {
        Mode::Slow(d) => Some(d),
        _ => None,
    };
    if let Some(d) = delay() {
        tokio::time::sleep(d).await;
    }
    let server = TcpStream::connect(target).await?;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = client_read.read(&mut buf).await?;
            if n == 0 {
                return server_write.shutdown().await;
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
            if let Some(d) = delay() {
                tokio::time::sleep(d).await;
            }
            client_write.write_all(&buf[..n]).await?;
        }
    };
    let (a, b) = tokio::join!(upstream, downstream);
    a.and(b)
}
