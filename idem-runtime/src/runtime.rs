//! The [`Idem`] handle: one runtime (a store, the local cache, the settings), installed once
//! per process or passed to calls explicitly. Built by [`IdemBuilder`](crate::IdemBuilder).

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::Error;
use crate::engine::Engine;
use crate::store::Store;

static INSTALLED: OnceLock<Idem> = OnceLock::new();

/// The idem runtime: a store, the local cache and the defaults the attribute falls back to.
///
/// Cheap to clone (a shared handle). Background work (purging expired records) runs on the
/// tokio runtime it was built in, and stops when [`Idem::shutdown`] is called or the last
/// handle is dropped.
#[derive(Clone)]
pub struct Idem {
    engine: Arc<Engine>,
    /// Dropped with the last handle, which stops the background tasks.
    stop: Arc<watch::Sender<bool>>,
}

impl fmt::Debug for Idem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idem")
            .field("store", &self.engine.store.backend())
            .field("local_cache", &self.engine.cache.is_some())
            .field("settings", &self.engine.settings)
            .finish()
    }
}

impl Idem {
    /// A runtime on `engine`, purging expired records every `purge` (interval, batch) on the
    /// current tokio runtime, if there is one.
    pub(crate) fn start(engine: Engine, purge: Option<(Duration, u32)>) -> Idem {
        let (stop, stopped) = watch::channel(false);
        let engine = Arc::new(engine);
        if let (Some((every, batch)), Ok(rt)) = (purge, tokio::runtime::Handle::try_current()) {
            let timeout = engine.settings.store_timeout;
            let store = engine.store.clone();
            rt.spawn(crate::purge::every(store, every, batch, timeout, stopped));
        }
        Idem {
            engine,
            stop: Arc::new(stop),
        }
    }

    /// Makes this the runtime every `#[idempotent]` fn without `runtime = ..` uses.
    pub(crate) fn install(self) -> Result<Idem, Error> {
        INSTALLED.set(self.clone()).map_err(|_| {
            Error::Config(
                "an idem runtime is already installed; install once at startup, or pass `runtime = ..` to the attribute".into(),
            )
        })?;
        Ok(self)
    }

    /// The runtime installed with [`IdemBuilder::install`](crate::IdemBuilder::install), if any.
    pub fn installed() -> Option<&'static Idem> {
        INSTALLED.get()
    }

    pub(crate) fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// This process's executor id, written as the `owner` of the records it reserves.
    pub fn executor_id(&self) -> &str {
        &self.engine.settings.executor_id
    }

    /// Whether this runtime is switched off (`IDEM_DISABLED`, or
    /// [`IdemBuilder::disabled`](crate::IdemBuilder::disabled)): bodies run unprotected.
    pub fn is_disabled(&self) -> bool {
        self.engine.settings.disabled
    }

    /// The store this runtime writes to.
    pub fn store(&self) -> &dyn Store {
        &*self.engine.store
    }

    /// Deletes expired records now, in batches of `batch`, and returns how many it deleted.
    /// The background task does the same every `purge_interval`.
    pub async fn purge_expired(&self, batch: u32) -> Result<u64, Error> {
        let timeout = self.engine.settings.store_timeout;
        crate::purge::all(&*self.engine.store, batch, timeout)
            .await
            .map_err(|source| Error::StoreUnavailable {
                function: "idem::purge",
                source,
            })
    }

    /// Stops this runtime's background tasks. Calls still work; expired records are then
    /// only removed by [`Idem::purge_expired`] or by being reused.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }
}
