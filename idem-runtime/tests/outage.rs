//! The store goes away while requests run, then comes back.
//!
//! The store connects through a TCP proxy inside the test; cutting the proxy drops every
//! open connection and refuses new ones, as a database restart or a network partition would.
//! While it is cut, calls must fail with `StoreUnavailable` without running their body
//! (idem fails closed). Once it is back, every key completes: nothing is left stuck.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use idem_runtime::store::{
    MySqlStore, MySqlStoreOptions, PgStore, PgStoreOptions, RedisStore, Store,
};
use idem_runtime::{Error, Idem, idempotent};
use support::proxy::{Proxy, through, upstream};

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

/// The proxies in front of one store: one for a database or a Redis node, one per node of
/// a Redis Cluster. Each switch applies to all of them at once.
struct Proxies(Vec<Proxy>);

impl Proxies {
    async fn cut(&self) {
        for p in &self.0 {
            p.cut().await;
        }
    }
    fn restore(&self) {
        self.0.iter().for_each(Proxy::restore);
    }
    fn stall(&self) {
        self.0.iter().for_each(Proxy::stall);
    }
    fn unstall(&self) {
        self.0.iter().for_each(Proxy::unstall);
    }
    async fn stall_existing(&self) {
        for p in &self.0 {
            p.stall_existing().await;
        }
    }
}

async fn outage(store: Arc<dyn Store>, proxy: Proxies) {
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
    // Cut once all of them hold their reservations and run their bodies (a fixed pause can
    // come too early on a loaded machine), while the bodies still sleep.
    let give_up = std::time::Instant::now() + Duration::from_secs(10);
    while bodies.load(SeqCst) < 15 {
        assert!(
            std::time::Instant::now() < give_up,
            "the in-flight calls did not all start their bodies"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
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
    // The in-flight calls finish their bodies; their results could not be recorded, so they
    // do not return their value (until it is recorded, another caller could take the key over
    // and get a different one): they say so, and their keys stay reserved.
    for call in in_flight {
        let out = call.await.unwrap();
        assert!(
            matches!(out, Err(AppError::Idem(Error::ResultNotRecorded { .. }))),
            "{out:?}"
        );
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

/// Regression: with the database unreachable but connections left open (packets dropped,
/// nothing closed), a statement already sent waited as long as the partition lasted. Every
/// store statement is now bounded by `store_timeout`: calls end in an error, not a hang.
async fn partition(store: Arc<dyn Store>, proxy: Proxies) {
    let idem = Idem::builder()
        .shared_store(store.clone())
        .default_lease("PT2S")
        .store_timeout("PT1S")
        .local_cache(0)
        .build()
        .unwrap();
    let bodies = Arc::new(AtomicUsize::new(0));
    assert_eq!(charge(&idem, &bodies, 1).await.unwrap(), 10);

    // A call whose body runs when the network goes silent: its result cannot be recorded.
    let (i, b) = (idem.clone(), bodies.clone());
    let in_flight = tokio::spawn(async move { charge(&i, &b, 2).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.stall();
    // Bounded far above the 1 s statement timeout: only a hang trips it.
    let bound = Duration::from_secs(20);
    let out = tokio::time::timeout(bound, in_flight)
        .await
        .expect("the in-flight call hung in the partition")
        .unwrap();
    assert!(
        matches!(out, Err(AppError::Idem(Error::ResultNotRecorded { .. }))),
        "{out:?}"
    );
    let ran = bodies.load(SeqCst);
    for key in 10..13 {
        let out = tokio::time::timeout(bound, charge(&idem, &bodies, key))
            .await
            .expect("a new call hung in the partition");
        assert!(
            matches!(out, Err(AppError::Idem(Error::StoreUnavailable { .. }))),
            "key {key}: {out:?}"
        );
    }
    assert_eq!(
        bodies.load(SeqCst),
        ran,
        "no body ran without a reservation"
    );

    // The network heals: every key completes.
    proxy.unstall();
    for key in [1, 2, 10, 11, 12] {
        let mut attempts = 0;
        loop {
            match charge(&idem, &bodies, key).await {
                Ok(v) => {
                    assert_eq!(v, key * 10);
                    break;
                }
                // Reservations sent into the partition land later and hold their key until
                // their lease runs out.
                Err(AppError::Idem(Error::StoreUnavailable { .. } | Error::InProgress { .. }))
                    if attempts < 20 =>
                {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(e) => panic!("key {key} after the partition: {e:?}"),
            }
        }
    }
}

/// A store on its own table, connected through a proxy; `None` (after saying so) when the
/// database is not there.
struct Proxied {
    store: Arc<dyn Store>,
    proxy: Proxy,
    url: String,
    table: String,
}

async fn proxied(postgres: bool) -> Option<Proxied> {
    proxied_with(postgres, 16).await
}

async fn proxied_with(postgres: bool, connections: u32) -> Option<Proxied> {
    let (url, port) = if postgres {
        (support::postgres_url(), 5432)
    } else {
        (support::mysql_url(), 3306)
    };
    let proxy = Proxy::start(upstream(&url, port)).await;
    let (table, at) = (support::unique_table(), through(&url, proxy.addr));
    let wait = Duration::from_secs(1);
    let store: Result<Arc<dyn Store>, Error> = if postgres {
        let options = PgStoreOptions::new()
            .table(&table)
            .acquire_timeout(wait)
            .max_connections(connections);
        PgStore::connect_with(&at, options)
            .await
            .map(|s| Arc::new(s) as _)
    } else {
        let options = MySqlStoreOptions::new()
            .table(&table)
            .acquire_timeout(wait)
            .max_connections(connections);
        MySqlStore::connect_with(&at, options)
            .await
            .map(|s| Arc::new(s) as _)
    };
    match store {
        Ok(store) => Some(Proxied {
            store,
            proxy,
            url,
            table,
        }),
        Err(e) if postgres => {
            support::server_missing("PostgreSQL", "IDEM_TEST_POSTGRES_URL", &url, &e);
            None
        }
        Err(e) => {
            support::server_missing("MySQL/MariaDB", "IDEM_TEST_MYSQL_URL", &url, &e);
            None
        }
    }
}

/// Regression: a statement that timed out left its connection to the pool, where sqlx pinged
/// it with no time limit before reuse. Connections black-holed mid-life (the path to the
/// database dies silently, new connections still get through) then held every slot of the
/// pool for as long as TCP took to give up, and every call failed although the database was
/// reachable. Now a connection whose statement was abandoned is closed, and calls recover.
async fn dead_connections(store: Arc<dyn Store>, proxy: Proxies) {
    let idem = Idem::builder()
        .shared_store(store)
        .store_timeout("PT1S")
        .local_cache(0)
        .build()
        .unwrap();
    let bodies = Arc::new(AtomicUsize::new(0));
    // A warm pool: every connection open.
    let warm: Vec<_> = (0..4)
        .map(|key| {
            let (idem, bodies) = (idem.clone(), bodies.clone());
            tokio::spawn(async move { charge(&idem, &bodies, key).await })
        })
        .collect();
    for w in warm {
        w.await.unwrap().unwrap();
    }
    // Idle in the pool (sqlx pings each connection as it comes back: let that finish), then
    // the path to the database dies silently under them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.stall_existing().await;
    let mut failures = 0;
    for key in 100.. {
        match charge(&idem, &bodies, key).await {
            Ok(v) => {
                assert_eq!(v, key * 10);
                break;
            }
            Err(AppError::Idem(Error::StoreUnavailable { .. })) => failures += 1,
            Err(e) => panic!("key {key}: {e:?}"),
        }
        assert!(
            failures < 30,
            "the pool never recovered from its dead connections"
        );
    }
    println!("dead connections: {failures} calls failed before the pool recovered");
}

macro_rules! on_both_databases {
    ($($scenario:ident => $pg:ident, $maria:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $pg() {
            if let Some(p) = proxied(true).await {
                $scenario(p.store, Proxies(vec![p.proxy])).await;
                drop_table(&p.url, &p.table).await;
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $maria() {
            if let Some(p) = proxied(false).await {
                $scenario(p.store, Proxies(vec![p.proxy])).await;
                drop_table(&p.url, &p.table).await;
            }
        }
    )*};
}

on_both_databases! {
    outage => postgres_goes_away_and_comes_back, mariadb_goes_away_and_comes_back;
    partition => postgres_partition_fails_calls_instead_of_hanging, mariadb_partition_fails_calls_instead_of_hanging;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_that_die_silently_are_replaced() {
    if let Some(p) = proxied_with(true, 4).await {
        dead_connections(p.store, Proxies(vec![p.proxy])).await;
        drop_table(&p.url, &p.table).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_connections_that_die_silently_are_replaced() {
    if let Some(p) = proxied_with(false, 4).await {
        dead_connections(p.store, Proxies(vec![p.proxy])).await;
        drop_table(&p.url, &p.table).await;
    }
}

/// A Redis store under its own key prefix through a proxy to the test Redis.
async fn redis_proxied() -> Option<(Arc<dyn Store>, Proxies, RedisCleanup)> {
    let url = support::redis_url();
    let host_port = url
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .unwrap_or("127.0.0.1:6379");
    let upstream = std::net::ToSocketAddrs::to_socket_addrs(host_port)
        .ok()?
        .next()?;
    let proxy = Proxy::start(upstream).await;
    let (prefix, options) = support::redis_options();
    let at = format!("redis://{}", proxy.addr);
    match RedisStore::connect_with(&at, options).await {
        Ok(store) => Some((
            Arc::new(store),
            Proxies(vec![proxy]),
            RedisCleanup(vec![url], prefix),
        )),
        Err(e) => {
            support::server_missing("Redis", "IDEM_TEST_REDIS_URL", &url, &e);
            None
        }
    }
}

/// Deletes a test's keys when dropped.
struct RedisCleanup(Vec<String>, String);

impl Drop for RedisCleanup {
    fn drop(&mut self) {
        support::redis_clear(std::mem::take(&mut self.0), self.1.clone());
    }
}

/// A private three-node Redis Cluster whose nodes announce proxies as their addresses, so
/// all of the store's traffic (including what cluster redirects send it to) goes through
/// proxies the test can cut. The nodes' cluster bus is direct: the cluster itself stays
/// healthy while its clients are cut off. Nodes are killed when the servers drop.
async fn redis_cluster_proxied(
    base_port: u16,
) -> Option<(Arc<dyn Store>, Proxies, support::redis_servers::Servers)> {
    if !support::redis_servers::available() {
        return None;
    }
    let ports = [base_port, base_port + 1, base_port + 2];
    let mut proxies = Vec::new();
    for port in ports {
        proxies.push(Proxy::start(([127, 0, 0, 1], port).into()).await);
    }
    let announce = [0, 1, 2].map(|i| proxies[i].addr.port());
    let servers = tokio::task::spawn_blocking(move || {
        support::redis_servers::cluster_announcing(ports, announce)
    })
    .await
    .unwrap();
    let nodes: Vec<String> = proxies
        .iter()
        .map(|p| format!("redis://{}", p.addr))
        .collect();
    let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
    let (_, options) = support::redis_options();
    let store = RedisStore::connect_cluster(&nodes, options).await.unwrap();
    Some((Arc::new(store), Proxies(proxies), servers))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_goes_away_and_comes_back() {
    if let Some((store, proxies, _cleanup)) = redis_proxied().await {
        outage(store, proxies).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_partition_fails_calls_instead_of_hanging() {
    if let Some((store, proxies, _cleanup)) = redis_proxied().await {
        partition(store, proxies).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_connections_that_die_silently_are_replaced() {
    if let Some((store, proxies, _cleanup)) = redis_proxied().await {
        dead_connections(store, proxies).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_goes_away_and_comes_back() {
    if let Some((store, proxies, _cluster)) = redis_cluster_proxied(17101).await {
        outage(store, proxies).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_partition_fails_calls_instead_of_hanging() {
    if let Some((store, proxies, _cluster)) = redis_cluster_proxied(17111).await {
        partition(store, proxies).await;
    }
}
