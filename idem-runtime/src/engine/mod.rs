//! The state machine: the one place that decides what a call does.
//!
//! ```text
//!   local cache hit ──────────────────────────────────────────────► replay
//!   same key already running in this process ── wait for it ──────► replay / its error / try again
//!   reserve ── acquired ──► run body (heartbeat) ── Ok ── finalize ► cache, return
//!      │                                         └─ Err ─ release ─► return the error
//!      └─ exists ── completed, live ──────────── same payload ─────► replay
//!               ├─ in progress, live lease ──── wait (bounded) or reject
//!               ├─ lease over / expired ─────── take over (CAS) ──► run body
//!               └─ different payload ─────────────────────────────► PayloadMismatch
//! ```
//!
//! A call goes through the files of this module in order:
//!
//! | step | file |
//! | --- | --- |
//! | what the fn declared (its spec) and where it lives (its site) | `spec.rs` |
//! | key, scope and payload resolved into one record and its settings | `call.rs` |
//! | single flight: one leader per key in this process, followers wait | `flight.rs` |
//! | acquire: reserve, or replay / wait / take over / refuse | `acquire.rs`, deciding with `decide.rs` |
//! | run the body while heartbeats keep its lease | `lease.rs` |
//! | record the result (fenced finalize, in its own task) | `record.rs` |
//! | replay a stored result and report the outcome | `replay.rs` |
//! | the same, inside a caller's database transaction | `tx.rs` |
//!
//! Stores only execute statements; everything is decided here from what they return.

mod acquire;
mod batch;
mod call;
mod decide;
pub(crate) mod detach;
mod flight;
mod lease;
mod record;
mod replay;
mod spec;
#[cfg(feature = "_sql")]
pub(crate) mod tx;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::cache::LocalCache;
use crate::codec::ResultCodec;
use crate::error::StoreError;
use crate::key::RecordId;
use crate::outcome::Outcome;
use crate::store::{Claim, Fence, Reservation, Store, StoredResult};
use crate::{Error, metrics};
pub(crate) use batch::BatchLimits;
use batch::{Batcher, OwnedClaim};
pub use call::{Call, Payload, Scope};
use flight::{Answer, Flights, LeaderSlot, Role};
pub(crate) use replay::fail;
pub(crate) use spec::Site;
pub use spec::Spec;

/// The defaults an attribute's missing arguments take, and the runtime's limits.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    /// The off switch: every body runs unprotected.
    pub(crate) disabled: bool,
    pub(crate) default_ttl: Duration,
    pub(crate) default_lease: Duration,
    pub(crate) default_wait: Duration,
    pub(crate) max_result_bytes: usize,
    pub(crate) executor_id: Arc<str>,
    pub(crate) store_timeout: Duration,
    /// Group commit's bounds; `None` sends each statement on its own.
    pub(crate) batching: Option<BatchLimits>,
}

/// What every call of one runtime shares: the store, the local cache, the settings, and the
/// keys this process is leading.
pub(crate) struct Engine {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) cache: Option<LocalCache>,
    pub(crate) settings: Settings,
    flights: Flights,
    /// Group commit, for a store that batches.
    batcher: Option<Arc<Batcher>>,
}

impl Engine {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        cache: Option<LocalCache>,
        settings: Settings,
    ) -> Engine {
        let batcher = match settings.batching {
            Some(limits) if store.group_commit() => {
                let timeout = settings.store_timeout;
                Some(Arc::new(Batcher::new(store.clone(), timeout, limits)))
            }
            _ => None,
        };
        Engine {
            store,
            cache,
            settings,
            flights: Flights::default(),
            batcher,
        }
    }

    /// `Store::reserve`, through group commit where the store batches, bounded in time.
    pub(crate) async fn reserve(&self, claim: &Claim<'_>) -> Result<Reservation, StoreError> {
        let timeout = self.settings.store_timeout;
        let Some(batcher) = &self.batcher else {
            return store_call(&*self.store, "reserve", timeout, self.store.reserve(claim)).await;
        };
        let claim = OwnedClaim {
            id: claim.id.clone(),
            fence: claim.fence,
            owner: self.settings.executor_id.clone(),
            fingerprint: claim.fingerprint.copied(),
            lease: claim.lease,
        };
        bounded("reserve", timeout, batcher.reserve(claim)).await
    }

    /// `Store::finalize`, through group commit where the store batches, bounded in time.
    pub(crate) async fn finalize(
        &self,
        id: &RecordId,
        fence: Fence,
        result: &StoredResult,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let timeout = self.settings.store_timeout;
        let Some(batcher) = &self.batcher else {
            let finalize = self.store.finalize(id, fence, result, ttl);
            return store_call(&*self.store, "finalize", timeout, finalize).await;
        };
        let finalize = batcher.finalize(id.clone(), fence, result.clone(), ttl);
        bounded("finalize", timeout, finalize).await
    }

    /// `Store::heartbeat`, through group commit where the store batches, bounded by `limit`.
    pub(crate) async fn heartbeat(
        &self,
        id: &RecordId,
        fence: Fence,
        lease: Duration,
        limit: Duration,
    ) -> Result<bool, StoreError> {
        let Some(batcher) = &self.batcher else {
            let beat = self.store.heartbeat(id, fence, lease);
            return store_call(&*self.store, "heartbeat", limit, beat).await;
        };
        bounded(
            "heartbeat",
            limit,
            batcher.heartbeat(id.clone(), fence, lease),
        )
        .await
    }

    /// `Store::release`, through group commit where the store batches, bounded in time.
    pub(crate) async fn release(&self, id: &RecordId, fence: Fence) -> Result<bool, StoreError> {
        let timeout = self.settings.store_timeout;
        let Some(batcher) = &self.batcher else {
            let release = self.store.release(id, fence);
            return store_call(&*self.store, "release", timeout, release).await;
        };
        bounded("release", timeout, batcher.release(id.clone(), fence)).await
    }

    /// Runs one idempotent call: resolve its record, then local cache, single flight,
    /// acquire, run the body under its lease, record the result. The door every caller
    /// enters by (`__private`, the HTTP layer).
    pub(crate) async fn run<T, E, F, C>(
        self: &Arc<Self>,
        spec: &'static Spec,
        site: &'static Site,
        types: &[&'static str],
        call: Call,
        body: F,
    ) -> Result<T, E>
    where
        F: Future<Output = Result<T, E>>,
        E: From<Error>,
        C: ResultCodec<T, E>,
    {
        if self.settings.disabled {
            return replay::unprotected(site, body, "disabled").await;
        }
        let call = match call.resolve(self, spec, site, types) {
            Ok(Some(call)) => call,
            Ok(None) => return replay::unprotected(site, body, "no key").await,
            Err(e) => return Err(replay::fail(site.path, e)),
        };
        let span = call.span();
        call.run::<T, E, F, C>(body).instrument(span).await
    }

    /// Joins a transactional call: its reservation, in the caller's transaction.
    #[cfg(feature = "_sql")]
    pub(crate) async fn tx_begin<T, E, C, DB>(
        self: &Arc<Self>,
        spec: &'static Spec,
        site: &'static Site,
        types: &[&'static str],
        call: Call,
        conn: &mut DB::Connection,
    ) -> tx::TxBegin<Result<T, E>, C>
    where
        E: From<Error>,
        C: ResultCodec<T, E>,
        DB: tx::TxDatabase,
    {
        tx::begin::<T, E, C, DB>(self, spec, site, types, call, conn).await
    }
}

impl call::ResolvedCall {
    async fn run<T, E, F, C>(&self, body: F) -> Result<T, E>
    where
        F: Future<Output = Result<T, E>>,
        E: From<Error>,
        C: ResultCodec<T, E>,
    {
        if let Some(cache) = &self.engine.cache
            && let Some(hit) = cache.get(&self.id)
        {
            let stored = hit.fingerprint.as_ref();
            return self.replay::<T, E, C>(hit.codec, &hit.bytes, stored, Outcome::Replayed);
        }
        // One budget for the whole call, however many times it follows a leader that gives
        // up: the wait is bounded, as documented.
        let deadline = Instant::now() + self.wait;
        let mut body = Some(body);
        loop {
            match self.engine.flights.join(&self.id) {
                Role::Leader(slot) => {
                    // Only one loop iteration ever leads, so the body is still here.
                    let Some(body) = body.take() else {
                        unreachable!("a call leads at most once")
                    };
                    return self.lead::<T, E, F, C>(slot, body, deadline).await;
                }
                Role::Follower(rx) => match self.follow(rx, deadline).await {
                    Answer::Completed {
                        codec,
                        bytes,
                        fingerprint,
                    } => {
                        let stored = fingerprint.as_ref();
                        return self.replay::<T, E, C>(codec, &bytes, stored, Outcome::Waited);
                    }
                    Answer::Failed(e) => return Err(replay::fail(self.function(), e)),
                    Answer::Retry => continue,
                },
            }
        }
    }

    /// Leads the key in this process: acquire the record, run the body under its lease,
    /// record the result, and tell the followers.
    async fn lead<T, E, F, C>(
        &self,
        slot: LeaderSlot<'_>,
        body: F,
        deadline: Instant,
    ) -> Result<T, E>
    where
        F: Future<Output = Result<T, E>>,
        E: From<Error>,
        C: ResultCodec<T, E>,
    {
        let (guard, outcome, since) = match self.acquire(deadline).await {
            Ok(acquire::Acquired::Owned {
                guard,
                took_over,
                since,
            }) => {
                if took_over {
                    metrics::takeover(self.function());
                    (guard, Outcome::TookOver, since)
                } else {
                    (guard, Outcome::Executed, since)
                }
            }
            Ok(acquire::Acquired::Replay {
                result,
                fingerprint,
                expires_in,
                waited,
            }) => {
                let bytes: Arc<[u8]> = result.bytes.into();
                if let Some(cache) = &self.engine.cache {
                    let id = self.id.clone();
                    cache.insert(id, result.codec, bytes.clone(), fingerprint, expires_in);
                }
                slot.finish(Answer::Completed {
                    codec: result.codec,
                    bytes: bytes.clone(),
                    fingerprint,
                });
                let outcome = if waited {
                    Outcome::Waited
                } else {
                    Outcome::Replayed
                };
                let stored = fingerprint.as_ref();
                return self.replay::<T, E, C>(result.codec, &bytes, stored, outcome);
            }
            Err(e) => {
                // A payload mismatch is about this caller's payload; the others check theirs.
                slot.finish(match e {
                    Error::PayloadMismatch { .. } => Answer::Retry,
                    ref other => Answer::Failed(other.clone()),
                });
                return Err(replay::fail(self.function(), e));
            }
        };
        let (out, lost) = lease::with_heartbeat(self, guard.fence, since, body).await;
        self.record::<T, E, C>(slot, guard, out, lost, outcome)
            .await
    }
}

/// Runs one store statement: timed for `idem_store_seconds`, and bounded by `limit`, so a
/// store that stops answering (a silent partition) turns into a prompt error instead of a
/// hung call. The statement's future is dropped at the deadline.
pub(crate) async fn store_call<T>(
    store: &dyn Store,
    op: &'static str,
    limit: Duration,
    fut: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    metrics::timed(store.backend(), op, bounded(op, limit, fut)).await
}

/// `fut`, or a timeout error after `limit`.
async fn bounded<T>(
    op: &'static str,
    limit: Duration,
    fut: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_elapsed) => Err(StoreError::timed_out(format!(
            "no answer from the store within {limit:?} ({op}); it may be unreachable"
        ))),
    }
}
