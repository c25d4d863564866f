//! Recording the result: encode it, check its size, and store it with a fenced finalize
//! (finished in a task of its own if the caller goes away), retried through a store outage.
//! Only a recorded value is returned as `Ok`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;

use super::acquire::OwnedRecord;
use super::call::ResolvedCall;
use super::detach::Detach;
use super::flight::{Answer, LeaderSlot};
use super::replay::fail;
use super::store_call;
use crate::codec::ResultCodec;
use crate::error::StoreError;
use crate::key::{Fingerprint, RecordId};
use crate::outcome::Outcome;
use crate::store::{Claim, Fence, RecordState, Reservation, StoredResult};
use crate::{Error, metrics};

/// What becomes of a body's output before anything is stored.
enum Encoded {
    /// An error the fn does not store: the key is released.
    NotStored,
    /// A result that cannot be stored (too large, or failing to encode): returned anyway,
    /// and the key released. Concurrent followers get the bytes when there are some.
    Unstorable(Option<(crate::codec::Codec, Vec<u8>)>),
    /// The result to store.
    Store(StoredResult),
}

impl ResolvedCall {
    /// Records the body's output `out` for the record `guard` owns, and answers the caller
    /// and the followers waiting in `slot`. `lost`: a heartbeat found the reservation taken.
    pub(crate) async fn record<T, E, C>(
        &self,
        slot: LeaderSlot<'_>,
        mut guard: OwnedRecord<'_>,
        out: Result<T, E>,
        lost: bool,
        outcome: Outcome,
    ) -> Result<T, E>
    where
        E: From<Error>,
        C: ResultCodec<T, E>,
    {
        let result = match self.encode::<T, E, C>(&out) {
            Encoded::Store(result) => result,
            Encoded::NotStored => {
                // An error that is not stored: free the key so the next attempt runs the body.
                guard.release().await;
                slot.finish(Answer::Retry);
                self.finished(outcome);
                return out;
            }
            Encoded::Unstorable(bytes) => {
                guard.release().await;
                // Callers already waiting here are concurrent with this call: give them its
                // result, when there is one to give.
                slot.finish(match bytes {
                    Some((codec, bytes)) => Answer::Completed {
                        codec,
                        bytes: bytes.into(),
                        fingerprint: self.fingerprint,
                    },
                    None => Answer::Retry,
                });
                self.finished(outcome);
                return out;
            }
        };
        // The effect happened and its result is in hand: from here on, dropping this call
        // must lead to the result being stored, never to the key being released. The store
        // writes finish in a task of their own if this future is dropped.
        guard.disarm();
        let (codec, bytes): (_, Arc<[u8]>) = (result.codec, result.bytes.as_slice().into());
        // Only a recorded value is ever returned as `Ok`: the record is what every other
        // caller of this key gets, so an unrecorded value could contradict it.
        let error = match self.store_result(guard.fence, result, lost).await {
            Stored::Yes => {
                metrics::stored_bytes(self.function(), bytes.len());
                if let Some(cache) = &self.engine.cache {
                    let id = self.id.clone();
                    cache.insert(id, codec, bytes.clone(), self.fingerprint, self.ttl);
                }
                slot.finish(Answer::Completed {
                    codec,
                    bytes,
                    fingerprint: self.fingerprint,
                });
                self.finished(outcome);
                return out;
            }
            // Someone took the record over: their result is the one that counts. (Counted
            // and logged by whoever found out first: a heartbeat, or the task.)
            Stored::Lost => self.lease_lost(),
            // Still unknown, but a heartbeat already found the record taken: whatever the
            // task finds out, this value is not the one others will be given.
            Stored::Pending if lost => self.lease_lost(),
            // The store is slow or away. The task keeps trying; a retry with this key gets
            // the recorded value (this one, once it lands) or, if the reservation lapsed
            // first, runs the body again.
            Stored::Pending => {
                tracing::warn!(function = self.function(), key = %self.id.hash(),
                    "idem: the result is not recorded yet; the caller is told to retry, and recording goes on in the background");
                Error::ResultNotRecorded {
                    function: self.function(),
                    key: self.id.hash(),
                    retry_after: RESULT_NOT_RECORDED_RETRY,
                }
            }
        };
        slot.finish(match &error {
            Error::LeaseLost { .. } => Answer::Retry,
            other => Answer::Failed(other.clone()),
        });
        Err(fail(self.function(), error))
    }

    /// The body's output as it would be stored, checked against the size limit.
    fn encode<T, E, C: ResultCodec<T, E>>(&self, out: &Result<T, E>) -> Encoded {
        let Some((codec, encoded)) = C::encode(out) else {
            return Encoded::NotStored;
        };
        let function = self.function();
        let limit = self.engine.settings.max_result_bytes;
        match encoded {
            Ok(bytes) if bytes.len() <= limit => Encoded::Store(StoredResult { codec, bytes }),
            Ok(bytes) => {
                tracing::error!(
                    function,
                    bytes = bytes.len(),
                    limit,
                    "idem: result is larger than max_result_bytes; returned but not stored, so a retry will run the body again"
                );
                metrics::not_stored(function, "too_large");
                Encoded::Unstorable(Some((codec, bytes)))
            }
            Err(e) => {
                tracing::error!(function, error = %e, "idem: result could not be encoded; returned but not stored");
                metrics::not_stored(function, "encode");
                Encoded::Unstorable(None)
            }
        }
    }

    fn lease_lost(&self) -> Error {
        Error::LeaseLost {
            function: self.function(),
            key: self.id.hash(),
        }
    }

    /// Stores the result, in a task of its own from the moment the caller is dropped, so it
    /// completes even then. Waits for it as long as one store statement may take; past that
    /// the caller goes on and the task keeps trying. `lost`: a heartbeat already found (and counted)
    /// the reservation lost.
    async fn store_result(&self, fence: Fence, result: StoredResult, lost: bool) -> Stored {
        let job = StoreResult {
            lost_counted: lost,
            engine: self.engine.clone(),
            timeout: self.engine.settings.store_timeout,
            id: self.id.clone(),
            fence,
            owner: self.engine.settings.executor_id.clone(),
            fingerprint: self.fingerprint,
            lease: self.lease,
            ttl: self.ttl,
            function: self.function(),
            result,
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return job.run().await;
        };
        // Run here, without a hop to another task; if this caller is dropped or stops
        // waiting, the rest runs on in a task of its own.
        let patience = self.engine.settings.store_timeout;
        let job = job.run().in_current_span();
        match tokio::time::timeout(patience, Detach::new(rt, job)).await {
            Ok(Ok(stored)) => stored,
            // A store that panicked: nothing is known of the result, as when it is late.
            Ok(Err(_panicked)) => Stored::Pending,
            Err(_elapsed) => Stored::Pending,
        }
    }
}

/// What a caller whose result is not recorded yet is told to wait before retrying.
const RESULT_NOT_RECORDED_RETRY: Duration = Duration::from_secs(1);

/// How long a result whose recording keeps failing is retried in the background. A late
/// finalize is still safe: it is fenced, and refused if someone took the key over.
const STORE_RESULT_RETRY_WINDOW: Duration = Duration::from_secs(60);

/// Whether a result made it into the store.
enum Stored {
    Yes,
    /// Another caller owns the record now.
    Lost,
    /// Not yet: the store is failing and a task keeps trying.
    Pending,
}

/// Everything needed to store a result, owned, so it can run in its own task.
struct StoreResult {
    engine: Arc<super::Engine>,
    timeout: Duration,
    id: RecordId,
    fence: Fence,
    owner: Arc<str>,
    fingerprint: Option<Fingerprint>,
    lease: Duration,
    ttl: Duration,
    function: &'static str,
    result: StoredResult,
    /// A heartbeat already counted the lost lease.
    lost_counted: bool,
}

impl StoreResult {
    /// Finalize, retried with backoff for up to `STORE_RESULT_RETRY_WINDOW` so a store
    /// outage right after the body ran does not throw its result away. A refused finalize is
    /// checked before it is called lost: the first attempt may have committed with its reply
    /// lost, or purge may have deleted an abandoned-looking row that nobody took over (then
    /// the result is written back).
    async fn run(self) -> Stored {
        let give_up = Instant::now() + STORE_RESULT_RETRY_WINDOW;
        let mut pause = Duration::from_millis(20);
        let mut failures = 0u32;
        loop {
            let finalize = self
                .engine
                .finalize(&self.id, self.fence, &self.result, self.ttl);
            let attempt = match finalize.await {
                Ok(true) => Ok(Stored::Yes),
                Ok(false) => self.confirm().await,
                Err(e) => Err(e),
            };
            match attempt {
                Ok(Stored::Lost) => {
                    // Counted here, where it is known for sure: the caller may be gone.
                    tracing::warn!(function = self.function, key = %self.id.hash(),
                        "idem: the reservation was taken over while the body ran; its result is not recorded (the new owner's is)");
                    if !self.lost_counted {
                        metrics::lease_lost(self.function);
                    }
                    metrics::not_stored(self.function, "lease_lost");
                    return Stored::Lost;
                }
                Ok(stored) => {
                    if failures > 0 {
                        tracing::info!(function = self.function, key = %self.id.hash(), failures,
                            "idem: result recorded after the store came back");
                    }
                    return stored;
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(function = self.function, key = %self.id.hash(), error = %e,
                            "idem: recording the result failed; retrying");
                    }
                    if Instant::now() + pause >= give_up {
                        tracing::error!(function = self.function, key = %self.id.hash(), error = %e,
                            "idem: gave up recording the result; after its lease a retry runs the body again");
                        metrics::not_stored(self.function, "store");
                        return Stored::Pending;
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn confirm(&self) -> Result<Stored, StoreError> {
        let store = &*self.engine.store;
        let limit = self.timeout;
        Ok(
            match store_call(store, "load", limit, store.load(&self.id)).await? {
                Some(record)
                    if record.fence == self.fence && record.state == RecordState::Completed =>
                {
                    Stored::Yes
                }
                Some(_) => Stored::Lost,
                None => {
                    // Nobody holds the key: this result is the only one. Write it back.
                    let claim = Claim {
                        id: &self.id,
                        fence: self.fence,
                        owner: &self.owner,
                        fingerprint: self.fingerprint.as_ref(),
                        lease: self.lease,
                    };
                    match store_call(store, "reserve", limit, store.reserve(&claim)).await? {
                        Reservation::Acquired => {
                            let finalize =
                                store.finalize(&self.id, self.fence, &self.result, self.ttl);
                            if store_call(store, "finalize", limit, finalize).await? {
                                Stored::Yes
                            } else {
                                Stored::Lost
                            }
                        }
                        Reservation::Exists(_) | Reservation::Vanished => Stored::Lost,
                    }
                }
            },
        )
    }
}
