//! Running the body while heartbeats keep its reservation alive.
//!
//! The heartbeat is not a separate task: it is polled beside the body inside the caller's own
//! future, so there is nothing to spawn for short bodies and nothing left running when the
//! call is dropped. A body shorter than a third of its lease never sends one.
//!
//! Beats are scheduled against the lease, not slept between: one is due a third of the lease
//! after the previous one was sent, whether or not that one has answered, so a slow or stuck
//! beat never holds back the next (at most [`MAX_IN_FLIGHT`] are outstanding, each given up
//! after a lease or the store timeout). A round trip of up to a third of the lease costs
//! nothing; longer ones overlap, and the lease holds while each beat's round trip stays under
//! about two thirds of it. A failed beat is retried a tenth of a lease later.

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

use super::call::ResolvedCall;
use crate::error::StoreError;
use crate::metrics;
use crate::store::Fence;

/// How many heartbeats may be outstanding at once.
const MAX_IN_FLIGHT: usize = 3;

type Beat<'a> = Pin<Box<dyn Future<Output = (Instant, Result<bool, StoreError>)> + Send + 'a>>;

/// Runs `body` while extending the lease of the reservation `fence` holds on `call`'s record.
/// `since` is when the statement that started the lease was sent. Returns the body's output
/// and whether a heartbeat found the record no longer ours (counted in
/// `idem_leases_lost_total` when found).
///
/// A lost lease does not cancel the body: stopping user code at an arbitrary await point
/// could leave an effect half done. The engine decides what the caller is told.
pub(crate) async fn with_heartbeat<F: Future>(
    call: &ResolvedCall,
    fence: Fence,
    since: std::time::Instant,
    body: F,
) -> (F::Output, bool) {
    let mut body = pin!(body);
    let mut beats = pin!(beat_until_lost(call, fence, Instant::from_std(since)));
    tokio::select! {
        biased;
        out = &mut body => (out, false),
        () = &mut beats => {
            metrics::lease_lost(call.function());
            tracing::warn!(function = call.function(), key = %call.id.hash(),
                "idem: a heartbeat found the reservation no longer ours (taken over or deleted) while the body runs");
            (body.await, true)
        }
    }
}

/// Heartbeats forever; returns once one finds the record no longer held by `fence`.
async fn beat_until_lost(call: &ResolvedCall, fence: Fence, since: Instant) {
    let engine = &call.engine;
    let lease = call.lease;
    let every = (lease / 3).max(Duration::from_millis(5));
    let retry = (lease / 10).max(Duration::from_millis(5));
    // Each beat is given up once it could no longer help: after a lease, or the store timeout.
    let bound = call.engine.settings.store_timeout.min(lease);
    let mut in_flight: Vec<Beat<'_>> = Vec::new();
    let mut due = since + every;
    loop {
        let event = {
            let (waiting, room) = (!in_flight.is_empty(), in_flight.len() < MAX_IN_FLIGHT);
            let answered = next_answer(&mut in_flight);
            tokio::select! {
                biased;
                answer = answered, if waiting => Some(answer),
                () = tokio::time::sleep_until(due), if room => None,
            }
        };
        match event {
            None => {
                let sent = Instant::now();
                let beat = engine.heartbeat(&call.id, fence, lease, bound);
                in_flight.push(Box::pin(async move { (sent, beat.await) }));
                due = sent + every;
            }
            Some((_, Ok(true))) => {}
            Some((_, Ok(false))) => return,
            Some((sent, Err(e))) => {
                tracing::warn!(function = call.function(), key = %call.id.hash(), error = %e,
                    sent_ago = ?sent.elapsed(), "idem: heartbeat failed; retrying");
                due = due.min(Instant::now() + retry);
            }
        }
    }
}

/// The first of `beats` to answer, removed from the list.
fn next_answer<'b, 'a>(
    beats: &'b mut Vec<Beat<'a>>,
) -> impl Future<Output = (Instant, Result<bool, StoreError>)> + 'b {
    poll_fn(move |cx| {
        for i in 0..beats.len() {
            if let Poll::Ready(answer) = beats[i].as_mut().poll(cx) {
                drop(beats.swap_remove(i));
                return Poll::Ready(answer);
            }
        }
        Poll::Pending
    })
}
