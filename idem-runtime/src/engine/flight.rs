//! Single flight inside the process: concurrent calls of one key share one reservation. The
//! first (the leader) talks to the store; the others (followers) wait for its [`Answer`], so
//! a retry storm costs one store round trip per process, not one per caller.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::call::ResolvedCall;
use super::spec::OnConflict;
use crate::Error;
use crate::codec::Codec;
use crate::key::{Fingerprint, RecordId};

/// What a follower is told to retry after when it gives up on a leader.
const FOLLOWER_RETRY_AFTER: Duration = Duration::from_secs(1);

/// What the leader of a key tells the callers waiting on it.
#[derive(Clone)]
pub(crate) enum Answer {
    /// It has a recorded result (or, for a result too large to store, the one it returned).
    Completed {
        codec: Codec,
        bytes: Arc<[u8]>,
        fingerprint: Option<Fingerprint>,
    },
    /// It stopped without a result to share: run the protocol yourself.
    Retry,
    /// It failed in a way that applies to every caller of the key.
    Failed(Error),
}

/// The keys this process is currently leading, for single flight.
#[derive(Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<RecordId, watch::Sender<Option<Answer>>>>,
}

pub(crate) enum Role<'a> {
    Leader(LeaderSlot<'a>),
    Follower(watch::Receiver<Option<Answer>>),
}

impl Flights {
    fn lock(&self) -> MutexGuard<'_, HashMap<RecordId, watch::Sender<Option<Answer>>>> {
        // Critical sections below only insert and remove; a poisoned map is still consistent.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn join(&self, id: &RecordId) -> Role<'_> {
        let mut map = self.lock();
        if let Some(tx) = map.get(id) {
            return Role::Follower(tx.subscribe());
        }
        let (tx, _) = watch::channel(None);
        map.insert(id.clone(), tx.clone());
        Role::Leader(LeaderSlot {
            flights: self,
            id: id.clone(),
            tx,
        })
    }
}

/// Leadership of one key in this process. Finishing (or dropping) it removes the key from
/// the map first, so a caller arriving afterwards starts afresh instead of seeing a stale
/// answer, and then wakes the followers.
pub(crate) struct LeaderSlot<'a> {
    flights: &'a Flights,
    id: RecordId,
    tx: watch::Sender<Option<Answer>>,
}

impl LeaderSlot<'_> {
    pub(crate) fn finish(self, shared: Answer) {
        self.remove();
        self.tx.send_replace(Some(shared));
    }

    fn remove(&self) {
        let mut map = self.flights.lock();
        if map
            .get(&self.id)
            .is_some_and(|tx| tx.same_channel(&self.tx))
        {
            map.remove(&self.id);
        }
    }
}

impl Drop for LeaderSlot<'_> {
    fn drop(&mut self) {
        // Finished or not, leave the map. Followers of an unfinished flight see the channel
        // close once the last sender (ours) is gone, and retry.
        self.remove();
    }
}

impl ResolvedCall {
    /// Waits for the leader of this key in this process; an `InProgress` error when it does
    /// not finish by `deadline` (or at once for `on_conflict = "reject"`).
    pub(crate) async fn follow(
        &self,
        mut rx: watch::Receiver<Option<Answer>>,
        deadline: Instant,
    ) -> Answer {
        let busy = Answer::Failed(self.in_progress(FOLLOWER_RETRY_AFTER));
        if self.on_conflict == OnConflict::Reject {
            // A value already shared is still an answer; only a running call is a conflict.
            return rx.borrow().clone().unwrap_or(busy);
        }
        let deadline = tokio::time::Instant::from_std(deadline);
        match tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some)).await {
            Ok(Ok(answer)) => answer.clone().unwrap_or(Answer::Retry),
            // The leader stopped without an answer (dropped or panicked): try again.
            Ok(Err(_closed)) => Answer::Retry,
            Err(_elapsed) => busy,
        }
    }
}
