//! Fixtures shared by the integration tests.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

pub mod proxy;
pub mod redis_servers;

use std::ops::Deref;

use idem_runtime::store::SqliteStore;

/// A SQLite store in its own temporary directory, deleted when the fixture drops.
pub struct SqliteFixture {
    pub store: SqliteStore,
    _dir: tempfile::TempDir,
}

impl Deref for SqliteFixture {
    type Target = SqliteStore;
    fn deref(&self) -> &SqliteStore {
        &self.store
    }
}

pub async fn sqlite_store() -> SqliteFixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open(dir.path().join("idem.db"))
        .await
        .expect("open sqlite");
    SqliteFixture { store, _dir: dir }
}

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use idem_runtime::store::{Claim, Fence, Record, Reservation, Store, StoredResult};
use idem_runtime::{RecordId, StoreError};

/// Wraps a store to count its statements and to make chosen ones fail, as a database that
/// goes away would.
pub struct Instrumented {
    pub inner: Arc<dyn Store>,
    pub reserves: AtomicUsize,
    pub finalizes: AtomicUsize,
    pub releases: AtomicUsize,
    pub heartbeats: AtomicUsize,
    pub down: AtomicBool,
    pub heartbeats_fail: AtomicBool,
    /// Extra time each statement of the kind takes after it ran (a slow reply).
    pub reserve_lag: std::sync::Mutex<Duration>,
    pub finalize_lag: std::sync::Mutex<Duration>,
    pub release_lag: std::sync::Mutex<Duration>,
    /// Time each heartbeat takes to reach the store (a slow request).
    pub heartbeat_lag: std::sync::Mutex<Duration>,
    /// Time each finalize takes to reach the store (a slow request).
    pub finalize_stall: std::sync::Mutex<Duration>,
    /// The next finalize commits, but its reply is lost (the caller sees an error).
    pub lose_finalize_reply: AtomicBool,
}

impl Instrumented {
    pub fn new(inner: Arc<dyn Store>) -> Arc<Instrumented> {
        Arc::new(Instrumented {
            inner,
            reserves: AtomicUsize::new(0),
            finalizes: AtomicUsize::new(0),
            releases: AtomicUsize::new(0),
            heartbeats: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            heartbeats_fail: AtomicBool::new(false),
            reserve_lag: Default::default(),
            finalize_lag: Default::default(),
            release_lag: Default::default(),
            heartbeat_lag: Default::default(),
            finalize_stall: Default::default(),
            lose_finalize_reply: AtomicBool::new(false),
        })
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::msg("connection refused (test: store is down)"))
        } else {
            Ok(())
        }
    }

    pub fn count(n: &AtomicUsize) -> usize {
        n.load(Ordering::SeqCst)
    }

    pub fn set(lag: &std::sync::Mutex<Duration>, d: Duration) {
        *lag.lock().unwrap() = d;
    }

    async fn lag(lag: &std::sync::Mutex<Duration>) {
        let d = *lag.lock().unwrap();
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }
}

#[async_trait::async_trait]
impl Store for Instrumented {
    async fn reserve(&self, claim: &Claim<'_>) -> Result<Reservation, StoreError> {
        self.check()?;
        self.reserves.fetch_add(1, Ordering::SeqCst);
        let out = self.inner.reserve(claim).await;
        Self::lag(&self.reserve_lag).await;
        out
    }
    async fn load(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        self.check()?;
        self.inner.load(id).await
    }
    async fn take_over(&self, claim: &Claim<'_>, observed: Fence) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.take_over(claim, observed).await
    }
    async fn heartbeat(
        &self,
        id: &RecordId,
        fence: Fence,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.check()?;
        self.heartbeats.fetch_add(1, Ordering::SeqCst);
        Self::lag(&self.heartbeat_lag).await;
        if self.heartbeats_fail.load(Ordering::SeqCst) {
            return Err(StoreError::msg("test: heartbeat dropped"));
        }
        self.inner.heartbeat(id, fence, lease).await
    }
    async fn finalize(
        &self,
        id: &RecordId,
        fence: Fence,
        result: &StoredResult,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.check()?;
        self.finalizes.fetch_add(1, Ordering::SeqCst);
        Self::lag(&self.finalize_stall).await;
        let out = self.inner.finalize(id, fence, result, ttl).await;
        Self::lag(&self.finalize_lag).await;
        if self.lose_finalize_reply.swap(false, Ordering::SeqCst) {
            return Err(StoreError::msg("test: connection reset after commit"));
        }
        out
    }
    async fn release(&self, id: &RecordId, fence: Fence) -> Result<bool, StoreError> {
        self.check()?;
        self.releases.fetch_add(1, Ordering::SeqCst);
        Self::lag(&self.release_lag).await;
        self.inner.release(id, fence).await
    }
    async fn purge(&self, limit: u32) -> Result<u64, StoreError> {
        self.check()?;
        self.inner.purge(limit).await
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
}

/// A backend for scenario tests: the store, and whatever must live as long as it.
pub struct Backend {
    pub store: Arc<dyn Store>,
    _guard: Option<Box<dyn std::any::Any + Send>>,
}

pub async fn memory_backend() -> Option<Backend> {
    Some(Backend {
        store: Arc::new(idem_runtime::store::MemoryStore::new()),
        _guard: None,
    })
}

pub async fn sqlite_backend() -> Option<Backend> {
    let fixture = sqlite_store().await;
    Some(Backend {
        store: Arc::new(fixture.store),
        _guard: Some(Box::new(fixture._dir)),
    })
}

pub async fn postgres_backend() -> Option<Backend> {
    let fixture = postgres_store().await?;
    Some(Backend {
        store: Arc::new(fixture.store.clone()),
        _guard: Some(Box::new(fixture)),
    })
}

pub async fn mysql_backend() -> Option<Backend> {
    let fixture = mysql_store().await?;
    Some(Backend {
        store: Arc::new(fixture.store.clone()),
        _guard: Some(Box::new(fixture)),
    })
}

/// The URL of a test server: the environment variable, or this machine's default.
pub fn server_url(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

pub fn postgres_url() -> String {
    server_url(
        "IDEM_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    )
}

pub fn mysql_url() -> String {
    server_url("IDEM_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
}

/// A server the test needs is not reachable: fail in CI, skip (loudly) elsewhere.
pub fn server_missing(what: &str, var: &str, url: &str, err: &dyn std::fmt::Display) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "{what} is not reachable at {url} ({err}); CI=true requires it (scripts/services.sh starts it)"
        );
    }
    eprintln!(
        "SKIPPED: {what} is not reachable at {url} ({err}). Start it (scripts/services.sh) or set {var}; with CI=true this is a failure."
    );
}

/// Claims on `ids`, each under its fence in `fences`, for one owner with one lease.
pub fn claims<'a>(
    ids: &'a [idem_runtime::RecordId],
    fences: &[idem_runtime::store::Fence],
    owner: &'a str,
    lease: std::time::Duration,
) -> Vec<idem_runtime::store::Claim<'a>> {
    ids.iter()
        .zip(fences)
        .map(|(id, fence)| idem_runtime::store::Claim {
            id,
            fence: *fence,
            owner,
            fingerprint: None,
            lease,
        })
        .collect()
}

/// A fresh, unique table name, so tests can share one database and run in parallel.
pub fn unique_table() -> String {
    format!("idem_test_{:016x}", fastrand::u64(..))
}

/// A Postgres store on its own table, dropped when the fixture drops.
pub struct PgFixture {
    pub store: idem_runtime::store::PgStore,
}

impl Deref for PgFixture {
    type Target = idem_runtime::store::PgStore;
    fn deref(&self) -> &Self::Target {
        &self.store
    }
}

impl Drop for PgFixture {
    fn drop(&mut self) {
        let sql = format!("DROP TABLE IF EXISTS {}", self.store.table());
        drop_table(postgres_url(), sql, |url, sql| async move {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&url).await?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut conn)
                .await?;
            Ok(())
        });
    }
}

pub async fn postgres_store() -> Option<PgFixture> {
    postgres_store_with(idem_runtime::store::PgStoreOptions::new()).await
}

/// [`postgres_store`] with `options` (its table replaced by a unique one).
pub async fn postgres_store_with(
    options: idem_runtime::store::PgStoreOptions,
) -> Option<PgFixture> {
    let url = postgres_url();
    let options = options.table(unique_table());
    match idem_runtime::store::PgStore::connect_with(&url, options).await {
        Ok(store) => Some(PgFixture { store }),
        Err(e) => {
            server_missing("PostgreSQL", "IDEM_TEST_POSTGRES_URL", &url, &e);
            None
        }
    }
}

/// A MySQL/MariaDB store on its own table, dropped when the fixture drops.
pub struct MySqlFixture {
    pub store: idem_runtime::store::MySqlStore,
}

impl Deref for MySqlFixture {
    type Target = idem_runtime::store::MySqlStore;
    fn deref(&self) -> &Self::Target {
        &self.store
    }
}

impl Drop for MySqlFixture {
    fn drop(&mut self) {
        let sql = format!("DROP TABLE IF EXISTS {}", self.store.table());
        drop_table(mysql_url(), sql, |url, sql| async move {
            use sqlx::Connection;
            let mut conn = sqlx::MySqlConnection::connect(&url).await?;
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut conn)
                .await?;
            Ok(())
        });
    }
}

pub async fn mysql_store() -> Option<MySqlFixture> {
    let url = mysql_url();
    let options = idem_runtime::store::MySqlStoreOptions::new().table(unique_table());
    match idem_runtime::store::MySqlStore::connect_with(&url, options).await {
        Ok(store) => Some(MySqlFixture { store }),
        Err(e) => {
            server_missing("MySQL/MariaDB", "IDEM_TEST_MYSQL_URL", &url, &e);
            None
        }
    }
}

/// Runs an async cleanup from `Drop`, on a thread of its own (the test's runtime may be
/// shutting down). Best effort: a leftover test table is harmless.
fn drop_table<F, Fut>(url: String, sql: String, f: F)
where
    F: FnOnce(String, String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), sqlx::Error>>,
{
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _ = rt.block_on(f(url, sql));
    })
    .join();
}

/// Generates `mod $scenario { memory, sqlite, postgres, mysql, redis, redis_cluster }` tests running
/// `$scenario(backend)`. The server-backed ones skip (loudly) when their server is missing,
/// except under `CI=true`, where they fail.
#[macro_export]
macro_rules! for_each_store {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                if let Some(b) = super::support::memory_backend().await {
                    super::$scenario(b).await;
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                if let Some(b) = super::support::sqlite_backend().await {
                    super::$scenario(b).await;
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(b) = super::support::postgres_backend().await {
                    super::$scenario(b).await;
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mysql() {
                if let Some(b) = super::support::mysql_backend().await {
                    super::$scenario(b).await;
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                if let Some(b) = super::support::redis_backend().await {
                    super::$scenario(b).await;
                }
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis_cluster() {
                if let Some(b) = super::support::redis_cluster_backend().await {
                    super::$scenario(b).await;
                }
            }
        }
    )*};
}

pub fn redis_url() -> String {
    server_url("IDEM_TEST_REDIS_URL", "redis://127.0.0.1:6379")
}

/// The nodes of the test Redis Cluster (`scripts/redis-cluster.sh` starts it), comma-separated.
pub fn redis_cluster_urls() -> String {
    server_url(
        "IDEM_TEST_REDIS_CLUSTER",
        "redis://127.0.0.1:17001,redis://127.0.0.1:17002,redis://127.0.0.1:17003",
    )
}

/// A Redis store under its own key prefix, its keys deleted when the fixture drops.
pub struct RedisFixture {
    pub store: idem_runtime::store::RedisStore,
    prefix: String,
    /// The node URLs to clean up on: one for a single node, every primary for a cluster.
    urls: Vec<String>,
}

impl RedisFixture {
    /// A command on the node (single-node fixtures), as a test that reaches past the store
    /// sends it.
    pub fn command<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        let client = redis::Client::open(self.urls[0].as_str()).expect("url");
        let mut conn = client.get_connection().expect("connection");
        cmd.query(&mut conn).expect("command")
    }

    /// The key prefix this fixture's store writes under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The keys under this fixture's prefix.
    pub fn keys(&self) -> Vec<String> {
        self.command(redis::cmd("KEYS").arg(format!("{}:*", self.prefix)))
    }
}

impl Deref for RedisFixture {
    type Target = idem_runtime::store::RedisStore;
    fn deref(&self) -> &Self::Target {
        &self.store
    }
}

impl Drop for RedisFixture {
    fn drop(&mut self) {
        redis_clear(std::mem::take(&mut self.urls), self.prefix.clone());
    }
}

/// Deletes every key under `prefix` on each node of `urls`. Best effort, on a thread of its
/// own (it may run from `Drop`): leftover keys expire by themselves anyway.
pub fn redis_clear(urls: Vec<String>, prefix: String) {
    let pattern = format!("{prefix}:*");
    let _ = std::thread::spawn(move || {
        for url in urls {
            let Ok(client) = redis::Client::open(url.as_str()) else {
                continue;
            };
            let Ok(mut conn) = client.get_connection() else {
                continue;
            };
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(&pattern)
                .query(&mut conn)
                .unwrap_or_default();
            for key in keys {
                let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(key).query(&mut conn);
            }
        }
    })
    .join();
}

/// How long a test Redis store keeps expired records: short, so the purge checks are quick,
/// and well past the conformance checks' sleeps, so a loaded machine does not lose a record
/// a check still reads.
pub const REDIS_TEST_RETENTION: Duration = Duration::from_secs(3);

pub fn redis_options() -> (String, idem_runtime::store::RedisStoreOptions) {
    let prefix = format!("idem-test-{:016x}", fastrand::u64(..));
    let options = idem_runtime::store::RedisStoreOptions::new()
        .prefix(prefix.clone())
        .retention(REDIS_TEST_RETENTION);
    (prefix, options)
}

pub async fn redis_store() -> Option<RedisFixture> {
    let url = redis_url();
    let (prefix, options) = redis_options();
    match idem_runtime::store::RedisStore::connect_with(&url, options).await {
        Ok(store) => Some(RedisFixture {
            store,
            prefix,
            urls: vec![url],
        }),
        Err(e) => {
            server_missing("Redis", "IDEM_TEST_REDIS_URL", &url, &e);
            None
        }
    }
}

pub async fn redis_cluster_store() -> Option<RedisFixture> {
    let urls = redis_cluster_urls();
    let nodes: Vec<&str> = urls.split(',').map(str::trim).collect();
    let (prefix, options) = redis_options();
    match idem_runtime::store::RedisStore::connect_cluster(&nodes, options).await {
        Ok(store) => Some(RedisFixture {
            store,
            prefix,
            urls: nodes.iter().map(|n| n.to_string()).collect(),
        }),
        Err(e) => {
            server_missing(
                "the Redis Cluster",
                "IDEM_TEST_REDIS_CLUSTER",
                &urls,
                &format!("{e}; scripts/redis-cluster.sh start"),
            );
            None
        }
    }
}

pub async fn redis_backend() -> Option<Backend> {
    let fixture = redis_store().await?;
    Some(Backend {
        store: Arc::new(fixture.store.clone()),
        _guard: Some(Box::new(fixture)),
    })
}

pub async fn redis_cluster_backend() -> Option<Backend> {
    let fixture = redis_cluster_store().await?;
    Some(Backend {
        store: Arc::new(fixture.store.clone()),
        _guard: Some(Box::new(fixture)),
    })
}
