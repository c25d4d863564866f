//! Startup: the [`Idem`] handle's builder and the serde-friendly [`IdemConfig`].
//!
//! One `Idem` is installed per process with [`IdemBuilder::install`] and used by every
//! `#[idempotent]` fn that does not name its own `runtime = ..`. Libraries and tests that
//! want their own build one with [`IdemBuilder::build`] and pass it explicitly.

mod file;

use std::sync::Arc;
use std::time::Duration;

pub use file::IdemConfig;

use crate::cache::LocalCache;
use crate::engine::{BatchLimits, Engine, Settings};

/// Group commit's bounds when it is on: the [`defaults`].
const DEFAULT_BATCHING: BatchLimits = BatchLimits {
    max_rows: defaults::BATCH_MAX_ROWS,
    max_bytes: defaults::BATCH_MAX_BYTES,
    max_in_flight: None,
    max_queued: defaults::BATCH_QUEUE,
};
use crate::store::Store;
use crate::switch::{self, Switch};
use crate::{Error, Idem};

impl Idem {
    /// Starts configuring a runtime.
    pub fn builder() -> IdemBuilder {
        IdemBuilder::default()
    }

    /// Builds a runtime from an [`IdemConfig`], connecting to its store.
    pub async fn from_config(config: &IdemConfig) -> Result<Idem, Error> {
        config.builder().await?.build()
    }
}

/// Configures an [`Idem`].
///
/// ```
/// use idem_runtime::{Idem, store::MemoryStore};
/// let idem = Idem::builder()
///     .store(MemoryStore::new())
///     .local_cache(10_000)
///     .default_ttl("PT24H")
///     .executor_id(std::env::var("POD_NAME").ok())
///     .build()?;
/// # Ok::<(), idem_runtime::Error>(())
/// ```
pub struct IdemBuilder {
    store: Option<Arc<dyn Store>>,
    local_cache: u64,
    default_ttl: Duration,
    default_lease: Duration,
    default_wait: Duration,
    max_result_bytes: usize,
    executor_id: Option<String>,
    purge_interval: Option<Duration>,
    purge_batch: u32,
    store_timeout: Duration,
    batching: Option<BatchLimits>,
    switch: Switch,
    error: Option<Error>,
}

impl Default for IdemBuilder {
    fn default() -> Self {
        IdemBuilder {
            store: None,
            local_cache: defaults::LOCAL_CACHE,
            default_ttl: defaults::TTL,
            default_lease: defaults::LEASE,
            default_wait: defaults::WAIT,
            max_result_bytes: defaults::MAX_RESULT_BYTES,
            executor_id: None,
            purge_interval: Some(defaults::PURGE_INTERVAL),
            purge_batch: defaults::PURGE_BATCH,
            store_timeout: defaults::STORE_TIMEOUT,
            batching: Some(DEFAULT_BATCHING),
            switch: Switch::default(),
            error: None,
        }
    }
}

/// The defaults, in one place so the docs and the code agree.
pub mod defaults {
    use std::time::Duration;

    /// Local cache size, in entries.
    pub const LOCAL_CACHE: u64 = 10_000;
    /// How long a completed result is replayed: 24 hours.
    pub const TTL: Duration = Duration::from_secs(24 * 3600);
    /// How long a reservation lasts without a heartbeat: 30 seconds.
    pub const LEASE: Duration = Duration::from_secs(30);
    /// How long a duplicate waits for an in-progress call before `InProgress`: 5 seconds.
    pub const WAIT: Duration = Duration::from_secs(5);
    /// The largest result stored: 1 MiB. Larger results are returned but not stored.
    pub const MAX_RESULT_BYTES: usize = 1 << 20;
    /// How often expired records are purged: every minute.
    pub const PURGE_INTERVAL: Duration = Duration::from_secs(60);
    /// Records deleted per purge statement.
    pub const PURGE_BATCH: u32 = 1_000;
    /// How long one store statement may take before the call gives up on it: 5 seconds.
    pub const STORE_TIMEOUT: Duration = Duration::from_secs(5);
    /// Group commit: the most calls one batched statement carries.
    pub const BATCH_MAX_ROWS: usize = 128;
    /// Group commit: the most result bytes one batch of finalizes carries: 4 MiB.
    pub const BATCH_MAX_BYTES: usize = 4 << 20;
    /// Group commit: how many batches of one verb may be in flight at once, on a store that
    /// does not say ([`Store::batch_concurrency`](crate::store::Store::batch_concurrency)).
    pub const BATCH_CONCURRENCY: usize = crate::store::BATCH_CONCURRENCY;
    /// Group commit: how many statements of one verb may wait for a batch before callers
    /// wait for room.
    pub const BATCH_QUEUE: usize = 4_096;
}

/// Something that names a duration: a `Duration`, or a string with the attribute's rules
/// (`"PT5M"`, `"5m"`).
pub trait IntoDuration {
    /// The duration, or why the string is not one.
    fn into_duration(self) -> Result<Duration, String>;
}

impl IntoDuration for Duration {
    fn into_duration(self) -> Result<Duration, String> {
        if self.is_zero() {
            Err("a zero duration is not allowed".into())
        } else {
            Ok(self.min(idem_duration::MAX))
        }
    }
}

impl IntoDuration for &str {
    fn into_duration(self) -> Result<Duration, String> {
        idem_duration::parse(self).map_err(|e| format!("{self:?}: {e}"))
    }
}

impl IntoDuration for String {
    fn into_duration(self) -> Result<Duration, String> {
        self.as_str().into_duration()
    }
}

impl IdemBuilder {
    /// The durable store (required).
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// The durable store, already shared.
    pub fn shared_store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// How many completed results to keep in the local cache; `0` turns the cache off.
    pub fn local_cache(mut self, entries: u64) -> Self {
        self.local_cache = entries;
        self
    }

    /// How long results are replayed when the attribute has no `ttl` (default 24 h).
    pub fn default_ttl(mut self, ttl: impl IntoDuration) -> Self {
        self.set_duration("default_ttl", ttl, |b, d| b.default_ttl = d);
        self
    }

    /// How long a reservation stays valid without a heartbeat when the attribute has no
    /// `lease` (default 30 s).
    pub fn default_lease(mut self, lease: impl IntoDuration) -> Self {
        self.set_duration("default_lease", lease, |b, d| b.default_lease = d);
        self
    }

    /// How long a duplicate waits for an in-progress call when the attribute has no `wait`
    /// (default 5 s).
    pub fn default_wait(mut self, wait: impl IntoDuration) -> Self {
        self.set_duration("default_wait", wait, |b, d| b.default_wait = d);
        self
    }

    /// The largest encoded result that is stored (default 1 MiB). A larger one is returned
    /// to its caller, the reservation is released, and an error is logged. `0` is refused by
    /// [`build`](Self::build): it would store nothing.
    pub fn max_result_bytes(mut self, bytes: usize) -> Self {
        if bytes == 0 {
            self.error.get_or_insert(Error::Config(
                "max_result_bytes is 0: no result could be stored, so every call would run its body again; leave it at its default (1 MiB) or set the largest result to keep".into(),
            ));
        }
        self.max_result_bytes = bytes;
        self
    }

    /// This process's executor id (for example the pod name). `None` derives one from the
    /// host name and process id.
    pub fn executor_id(mut self, id: impl Into<Option<String>>) -> Self {
        self.executor_id = id.into();
        self
    }

    /// How long one store statement may take (default 5 s). A statement that gets no answer in
    /// time fails the call with [`Error::StoreUnavailable`] (before the body) or
    /// [`Error::ResultNotRecorded`] (after it), so a store that stops answering without closing
    /// its connections (a network partition) cannot hang calls. It is also how long a caller
    /// waits for its result to be recorded.
    pub fn store_timeout(mut self, timeout: impl IntoDuration) -> Self {
        self.set_duration("store_timeout", timeout, |b, d| b.store_timeout = d);
        self
    }

    /// Group commit (on by default, for the SQL stores): concurrent calls' reservations,
    /// results, heartbeats and releases share one statement and one commit. `false` sends
    /// each call's statement on its own.
    pub fn group_commit(mut self, on: bool) -> Self {
        self.batching = match (on, self.batching) {
            (true, None) => Some(DEFAULT_BATCHING),
            (true, some) => some,
            (false, _) => None,
        };
        self
    }

    /// Group commit: the most calls one batch carries (default 128), and the most result
    /// bytes one batch of finalizes carries (default 4 MiB; a larger single result still goes,
    /// alone).
    pub fn batch_max(mut self, rows: usize, bytes: usize) -> Self {
        if let Some(b) = &mut self.batching {
            b.max_rows = rows.max(1);
            b.max_bytes = bytes;
        }
        self
    }

    /// Group commit: how many batches of one verb may be in flight at once. By default, as
    /// many as the store runs well ([`Store::batch_concurrency`]): 1 on SQLite, which writes
    /// one transaction at a time, 2 on the others. One keeps batches largest; more lowers
    /// latency when calls arrive steadily on a store that runs them side by side. On a store
    /// that combines its verbs ([`Store::combine_verbs`]: SQLite), one batch in flight also
    /// carries every verb's calls in one commit; more keeps the verbs' batches apart.
    pub fn batch_concurrency(mut self, batches: usize) -> Self {
        if let Some(b) = &mut self.batching {
            b.max_in_flight = Some(batches.max(1));
        }
        self
    }

    /// Turns idem off: every `#[idempotent]` body (and every route behind the HTTP layer)
    /// runs unprotected, counted as outcome `unprotected`, for test suites that keep the
    /// attributes. The `IDEM_DISABLED` environment variable, when set, overrides this. A
    /// release build stays protected unless [`allow_disabled_in_release`](Self::allow_disabled_in_release)
    /// is also called. One warning is logged when the runtime is built disabled.
    pub fn disabled(mut self, disabled: bool) -> Self {
        self.switch.disabled = disabled;
        self
    }

    /// Lets a release build run disabled (see [`disabled`](Self::disabled)). Code only, on
    /// purpose: an environment or a config file alone cannot turn off production's protection.
    pub fn allow_disabled_in_release(mut self, allow: bool) -> Self {
        self.switch.allow_in_release = allow;
        self
    }

    /// How often expired records are purged in the background; `None` turns purging off.
    pub fn purge_interval(mut self, every: Option<Duration>) -> Self {
        self.purge_interval = every;
        self
    }

    fn set_duration(
        &mut self,
        what: &str,
        value: impl IntoDuration,
        set: impl FnOnce(&mut Self, Duration),
    ) {
        match value.into_duration() {
            Ok(d) => set(self, d),
            Err(e) => {
                self.error
                    .get_or_insert(Error::Config(format!("{what}: {e}")));
            }
        }
    }

    /// Builds the runtime. Fails on an invalid setting or a missing store.
    pub fn build(self) -> Result<Idem, Error> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let store = self.store.ok_or_else(|| {
            Error::Config(
                "no store configured; call `.store(SqliteStore::open(\"idem.db\").await?)` (or another store) on the builder".into(),
            )
        })?;
        let executor_id = match self.executor_id {
            Some(id) if !id.trim().is_empty() => id,
            _ => default_executor_id(),
        };
        if executor_id.len() > 200 {
            return Err(Error::Config(format!(
                "executor_id is {} bytes; at most 200 are stored with each record",
                executor_id.len()
            )));
        }
        let release = !cfg!(debug_assertions);
        let disabled = self
            .switch
            .decide(switch::env_value().as_deref(), release)?;
        let settings = Settings {
            disabled,
            default_ttl: self.default_ttl,
            default_lease: self.default_lease,
            default_wait: self.default_wait,
            max_result_bytes: self.max_result_bytes,
            executor_id: executor_id.into(),
            store_timeout: self.store_timeout,
            batching: self.batching,
        };
        let engine = Engine::new(store, LocalCache::new(self.local_cache), settings);
        let purge = self.purge_interval.map(|every| (every, self.purge_batch));
        Ok(Idem::start(engine, purge))
    }

    /// Builds the runtime and installs it as the one `#[idempotent]` fns use. Fails if one
    /// is already installed.
    pub fn install(self) -> Result<Idem, Error> {
        self.build()?.install()
    }
}

fn default_executor_id() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_string());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[test]
    fn a_bad_duration_is_a_config_error() {
        let err = Idem::builder()
            .store(MemoryStore::new())
            .default_ttl("P1M")
            .build()
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("default_ttl") && msg.contains("ambiguous"),
            "{msg}"
        );
    }

    #[test]
    fn a_missing_store_is_a_config_error() {
        let msg = Idem::builder().build().unwrap_err().to_string();
        assert!(msg.contains("no store configured"), "{msg}");
    }

    #[test]
    fn executor_ids_default_to_host_and_pid() {
        let idem = Idem::builder()
            .store(MemoryStore::new())
            .executor_id(None)
            .build()
            .expect("builds");
        assert!(
            idem.executor_id()
                .ends_with(&format!("-{}", std::process::id()))
        );
    }
}
