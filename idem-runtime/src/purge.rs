//! Deleting expired records: on demand, and every `purge_interval` in the background.
//!
//! Stores delete in batches and, where several replicas share a table, one replica at a time
//! (the others find the store's lock taken and skip). Redis-like stores that expire records
//! by themselves return 0.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::engine::store_call;
use crate::error::StoreError;
use crate::store::Store;

/// Deletes every expired record, `batch` at a time.
pub(crate) async fn all(
    store: &dyn Store,
    batch: u32,
    timeout: Duration,
) -> Result<u64, StoreError> {
    let batch = batch.max(1);
    let mut total = 0;
    loop {
        let n = store_call(store, "purge", timeout, store.purge(batch)).await?;
        total += n;
        if n < u64::from(batch) {
            crate::metrics::purged(store.backend(), total);
            return Ok(total);
        }
    }
}

/// Purges every `every` until `stopped` says so (or its sender, the last handle, is gone).
pub(crate) async fn every(
    store: Arc<dyn Store>,
    every: Duration,
    batch: u32,
    timeout: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopped.changed() => return,
        }
        if *stopped.borrow() {
            return;
        }
        if let Err(e) = all(&*store, batch, timeout).await {
            tracing::warn!(error = %e, backend = store.backend(), "idem: purging expired records failed; will retry");
        }
    }
}
