//! Keeping a reservation alive while the body runs.
//!
//! The heartbeat is not a separate task: it is polled beside the body inside the caller's own
//! future, so there is nothing to spawn for short bodies and nothing left running when the
//! call is dropped. A body shorter than a third of its lease never sends one.
//!
//! Beats are scheduled against the lease, not slept between: each one is due a third of the
//! lease after the previous *successful* one was sent (the store set the lease no earlier than
//! that), however long the previous one took to answer. A store that answers in a round trip
//! of up to a third of the lease costs nothing; up to two thirds, beats go back to back and the
//! lease still holds. A failed beat is retried soon, until the lease would have run out.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use tokio::time::Instant;

use crate::key::RecordId;
use crate::store::{Fence, Store};

/// Runs `body` while extending the lease on `id`. `since` is when the reservation (or
/// takeover) that started the lease was sent. Returns the body's output and whether a
/// heartbeat found the record no longer ours.
///
/// A lost lease does not cancel the body: stopping user code at an arbitrary await point
/// could leave an effect half done. The engine decides what the caller is told.
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
pub(crate) async fn with_heartbeat<F: Future>(
    store: &dyn Store,
    timeout: Duration,
    function: &'static str,
    id: &RecordId,
    fence: Fence,
    lease: Duration,
    since: std::time::Instant,
    body: F,
) -> (F::Output, bool) {
    let every = (lease / 3).max(Duration::from_millis(5));
    let retry = (lease / 10).max(Duration::from_millis(5));
    let beats = async {
        // When the lease was last extended, as far as this process can tell: no later than
        // the moment the statement that extended it was sent.
        let mut extended = Instant::from_std(since);
        let mut due = extended + every;
        loop {
            tokio::time::sleep_until(due).await;
            let sent = Instant::now();
            let beat = store.heartbeat(id, fence, lease);
            match crate::engine::store_call(store, "heartbeat", timeout, beat).await {
                Ok(true) => {
                    extended = sent;
                    due = sent + every;
                }
                Ok(false) => return,
                Err(e) => {
                    // Try again soon: another beat may still get through before the lease
                    // runs out. If none does, finalize finds out.
                    let left = (extended + lease).saturating_duration_since(Instant::now());
                    tracing::warn!(function, key = %id.hash(), error = %e, lease_left = ?left,
                        "idem: heartbeat failed; retrying");
                    due = Instant::now() + retry;
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
                tracing::warn!(function, key = %id.hash(),
                    "idem: a heartbeat found the reservation no longer ours (taken over or deleted) while the body runs");
            }
        }
    }
}
