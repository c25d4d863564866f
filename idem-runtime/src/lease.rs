//! Keeping a reservation alive while the body runs.
//!
//! The heartbeat is not a separate task: it is polled beside the body inside the caller's own
//! future, so there is nothing to spawn for short bodies and nothing left running when the
//! call is dropped. A body shorter than a third of its lease never sends one.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use crate::key::RecordId;
use crate::store::{Fence, Store};

/// Runs `body` while extending the lease on `id` every third of `lease`. Returns the body's
/// output and whether a heartbeat found the record no longer ours.
///
/// A lost lease does not cancel the body: stopping user code at an arbitrary await point
/// could leave an effect half done. The engine reports the loss when finalize is refused.
pub(crate) async fn with_heartbeat<F: Future>(
    store: &dyn Store,
    function: &'static str,
    id: &RecordId,
    fence: Fence,
    lease: Duration,
    body: F,
) -> (F::Output, bool) {
    let every = (lease / 3).max(Duration::from_millis(5));
    let beats = async {
        loop {
            tokio::time::sleep(every).await;
            match crate::metrics::timed(store, "heartbeat", store.heartbeat(id, fence, lease)).await
            {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    // The next beat may get through before the lease runs out; if it does
                    // not, finalize will be refused and the caller told.
                    tracing::warn!(function, key = %id.hash(), error = %e, "idem: heartbeat failed");
                }
            }
        }
    };
    let mut body = pin!(body);
    let mut beats = pin!(beats);
    let mut lost = false;
    loop {
        tokio::select! {
            biased;
            out = &mut body => return (out, lost),
            () = &mut beats, if !lost => {
                lost = true;
                crate::metrics::lease_lost(function);
                tracing::warn!(function, key = %id.hash(), "idem: lease lost while the body runs; another caller took the key over");
            }
        }
    }
}
