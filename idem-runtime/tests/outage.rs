//! The store goes away while requests run, then comes back.
//!
//! The store connects through a TCP proxy inside the test; cutting the proxy drops every
//! open connection and refuses new ones, as a database restart or a network partition would.
//! While it is cut, calls must fail with `StoreUnavailable` without running their body
//! (idem fails closed). Once it is back, every key completes: nothing is left stuck.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use idem_runtime::store::{MySqlStore, MySqlStoreOptions, PgStore, PgStoreOptions, Store};
use idem_runtime::{Error, Idem, idempotent};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

/// A TCP proxy to `upstream` that can be cut and restored.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    pipes: Arc<Mutex<Vec<JoinHandle<()>>>>,
    _accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let pipes: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (c, p) = (cut.clone(), pipes.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if c.load(SeqCst) {
                    drop(client); // refused: the database is "down"
                    continue;
                }
                let pipe = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                p.lock().await.push(pipe);
            }
        });
        Proxy {
            addr,
            cut,
            pipes,
            _accept: accept,
        }
    }

    /// Drops every open connection and refuses new ones.
    async fn cut(&self) {
        self.cut.store(true, SeqCst);
        for pipe in self.pipes.lock().await.drain(..) {
            pipe.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, SeqCst);
    }
}

#[derive(Debug)]
enum AppError {
    Idem(Error),
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Idem(e)
    }
}

#[idempotent(key = key, runtime = idem, skip(bodies), name = "tests::outage")]
async fn charge(idem: &Idem, bodies: &AtomicUsize, key: u32) -> Result<u32, AppError> {
    bodies.fetch_add(1, SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(key * 10)
}

async fn outage(store: Arc<dyn Store>, proxy: Proxy) {
    let idem = Idem::builder()
        .shared_store(store.clone())
        .default_lease("PT1S")
        .default_wait("PT3S")
        .local_cache(0)
        .build()
        .unwrap();
    let bodies = Arc::new(AtomicUsize::new(0));

    // Before: all is well.
    for key in 0..5 {
        assert_eq!(charge(&idem, &bodies, key).await.unwrap(), key * 10);
    }

    // Calls in flight when the store goes away.
    let mut in_flight = Vec::new();
    for key in 100..110 {
        let (idem, bodies) = (idem.clone(), bodies.clone());
        in_flight.push(tokio::spawn(
            async move { charge(&idem, &bodies, key).await },
        ));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.cut().await;
    let before_outage = bodies.load(SeqCst);

    // New calls while it is away: a clear error, and no body runs.
    let mut refused = 0;
    for key in 200..210 {
        match charge(&idem, &bodies, key).await {
            Err(AppError::Idem(e @ Error::StoreUnavailable { .. })) => {
                assert_eq!(e.http_status(), 503);
                assert!(e.to_string().contains("unavailable"), "{e}");
                refused += 1;
            }
            other => panic!("key {key} during the outage: {other:?}"),
        }
    }
    assert_eq!(refused, 10);
    assert_eq!(
        bodies.load(SeqCst),
        before_outage,
        "no body ran without a reservation"
    );
    // The in-flight calls finish their bodies; their results could not be recorded, so
    // they return their value (the effect happened) and their keys stay reserved.
    for call in in_flight {
        let out = call.await.unwrap();
        assert!(out.is_ok(), "{out:?}");
    }

    // Back again: every key completes, none is stuck.
    proxy.restore();
    let keys: Vec<u32> = (0..5).chain(100..110).chain(200..210).collect();
    let mut done = HashSet::new();
    for key in &keys {
        let mut attempts = 0;
        loop {
            match charge(&idem, &bodies, *key).await {
                Ok(v) => {
                    assert_eq!(v, key * 10);
                    done.insert(*key);
                    break;
                }
                // A pooled connection that died in the outage may fail once more, and a
                // reservation from before the outage is still in its lease: both pass.
                Err(AppError::Idem(Error::StoreUnavailable { .. } | Error::InProgress { .. }))
                    if attempts < 10 =>
                {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(e) => panic!("key {key} after the outage: {e:?}"),
            }
        }
    }
    assert_eq!(done.len(), keys.len());
    for key in &keys {
        let id = idem_runtime::RecordId::new("tests::outage/v0", key.to_string());
        let record = store.load(&id).await.unwrap().expect("a record");
        assert_eq!(
            record.state,
            idem_runtime::store::RecordState::Completed,
            "key {key} is not stuck"
        );
    }
    println!(
        "outage: {} bodies for {} keys ({} re-run after the outage cut their finalize)",
        bodies.load(SeqCst),
        keys.len(),
        bodies.load(SeqCst) - keys.len()
    );
}

fn upstream(url: &str, default_port: u16) -> SocketAddr {
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
        .unwrap()
        .next()
        .unwrap()
}

fn through(url: &str, proxy: SocketAddr) -> String {
    let (scheme_user, rest) = url.split_once('@').unwrap();
    let path = rest.split_once('/').map_or("", |(_, p)| p);
    format!("{scheme_user}@{proxy}/{path}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_goes_away_and_comes_back() {
    let url = support::postgres_url();
    let proxy = Proxy::start(upstream(&url, 5432)).await;
    let options = PgStoreOptions::new()
        .table(support::unique_table())
        .acquire_timeout(Duration::from_secs(1));
    let store = match PgStore::connect_with(&through(&url, proxy.addr), options).await {
        Ok(s) => s,
        Err(e) => return support::server_missing("PostgreSQL", "IDEM_TEST_POSTGRES_URL", &url, &e),
    };
    let table = store.table().to_string();
    outage(Arc::new(store), proxy).await;
    drop_table(&url, &table).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_goes_away_and_comes_back() {
    let url = support::mysql_url();
    let proxy = Proxy::start(upstream(&url, 3306)).await;
    let options = MySqlStoreOptions::new()
        .table(support::unique_table())
        .acquire_timeout(Duration::from_secs(1));
    let store = match MySqlStore::connect_with(&through(&url, proxy.addr), options).await {
        Ok(s) => s,
        Err(e) => return support::server_missing("MySQL/MariaDB", "IDEM_TEST_MYSQL_URL", &url, &e),
    };
    let table = store.table().to_string();
    outage(Arc::new(store), proxy).await;
    drop_table(&url, &table).await;
}

async fn drop_table(url: &str, table: &str) {
    use sqlx::Connection;
    let sql = sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}"));
    if url.starts_with("postgres") {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
    } else {
        let mut c = sqlx::MySqlConnection::connect(url).await.unwrap();
        sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
    }
}
