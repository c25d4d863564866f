//! A TCP proxy between a store and its database, to play the network's part in tests: it can
//! be cut (every connection dropped, new ones refused, as a database restart), stalled
//! (connections stay open but nothing gets through, as a silent partition), or slowed (a
//! fixed latency each way).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

struct State {
    cut: AtomicBool,
    stalled: watch::Sender<bool>,
    latency: std::sync::Mutex<Duration>,
}

/// A TCP proxy to one upstream address on 127.0.0.1.
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    conns: Arc<Mutex<Vec<Conn>>>,
    _accept: JoinHandle<()>,
}

/// One proxied connection: its pumps, and its own stall switch.
struct Conn {
    task: JoinHandle<()>,
    stalled: watch::Sender<bool>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State {
            cut: AtomicBool::new(false),
            stalled: watch::channel(false).0,
            latency: std::sync::Mutex::new(Duration::ZERO),
        });
        let conns: Arc<Mutex<Vec<Conn>>> = Arc::default();
        let (st, cs) = (state.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if st.cut.load(SeqCst) {
                    drop(client); // refused: the database is "down"
                    continue;
                }
                let st = st.clone();
                let (stalled, own) = watch::channel(false);
                let task = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = pump(cr, sw, st.clone(), own.clone());
                    let down = pump(sr, cw, st, own);
                    tokio::join!(up, down);
                });
                cs.lock().await.push(Conn { task, stalled });
            }
        });
        Proxy {
            addr,
            state,
            conns,
            _accept: accept,
        }
    }

    /// Drops every open connection and refuses new ones.
    pub async fn cut(&self) {
        self.state.cut.store(true, SeqCst);
        for conn in self.conns.lock().await.drain(..) {
            conn.task.abort();
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.state.cut.store(false, SeqCst);
    }

    /// Keeps every connection open but lets nothing through, in either direction.
    pub fn stall(&self) {
        self.state.stalled.send_replace(true);
    }

    /// Lets traffic through again (what was held is delivered).
    pub fn unstall(&self) {
        self.state.stalled.send_replace(false);
    }

    /// Black-holes the connections open now, for good; new ones go through.
    pub async fn stall_existing(&self) {
        for conn in self.conns.lock().await.iter() {
            conn.stalled.send_replace(true);
        }
    }

    /// Delays every byte by `one_way` in each direction.
    pub fn set_latency(&self, one_way: Duration) {
        *self.state.latency.lock().expect("latency") = one_way;
    }
}

/// Copies `from` to `to`, each read delivered `latency` after it arrived and only while the
/// proxy is not stalled. Reading goes on meanwhile, so the sender never blocks on us.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<State>,
    mut own: watch::Receiver<bool>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let st = state.clone();
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let latency = *st.latency.lock().expect("latency");
                    if tx
                        .send((Instant::now() + latency, buf[..n].to_vec()))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        let mut stalled = state.stalled.subscribe();
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            let _ = stalled.wait_for(|s| !s).await;
            let _ = own.wait_for(|s| !s).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// The `host:port` of a database URL, as a socket address.
pub fn upstream(url: &str, default_port: u16) -> SocketAddr {
    let host_port = url
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("127.0.0.1");
    let with_port = if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:{default_port}")
    };
    std::net::ToSocketAddrs::to_socket_addrs(&with_port)
        .expect("resolve")
        .next()
        .expect("an address")
}

/// `url` with its host and port replaced by the proxy's.
pub fn through(url: &str, proxy: SocketAddr) -> String {
    let (scheme_user, rest) = url.split_once('@').expect("a user in the URL");
    let path = rest.split_once('/').map_or("", |(_, p)| p);
    format!("{scheme_user}@{proxy}/{path}")
}
