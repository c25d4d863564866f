//! Fixtures shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

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
    _guard: Option<tempfile::TempDir>,
}

pub async fn memory_backend() -> Backend {
    Backend {
        store: Arc::new(idem_runtime::store::MemoryStore::new()),
        _guard: None,
    }
}

pub async fn sqlite_backend() -> Backend {
    let fixture = sqlite_store().await;
    Backend {
        store: Arc::new(fixture.store),
        _guard: Some(fixture._dir),
    }
}

/// Generates `mod $scenario { memory, sqlite }` tests running `$scenario(backend)`.
#[macro_export]
macro_rules! for_each_store {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::$scenario(super::support::memory_backend().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$scenario(super::support::sqlite_backend().await).await;
            }
        }
    )*};
}
