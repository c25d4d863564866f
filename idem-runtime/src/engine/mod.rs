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
//! Stores only execute statements; everything above is decided here from what they return.
//! Callers of one key inside one process share a single flight: one of them (the leader)
//! talks to the store, the others wait for its outcome, so a retry storm costs one
//! reservation per process.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::Instrument;

use crate::__private::{Call, Payload, Scope, Site, Spec};
use crate::codec::{self, Codec};
use crate::config::Inner;
use crate::error::StoreError;
use crate::key::{Fingerprint, RecordId};
use crate::outcome::{self, Outcome};
use crate::store::{Claim, Fence, Record, RecordState, Reservation, StoredResult};
use crate::{Error, Idem, metrics};

#[cfg(feature = "_sql")]
pub(crate) mod tx;

/// How a fn's results are stored: its `Ok` values only, or its `Err` values too.
pub trait ResultCodec<T, E> {
    /// What to store for `out`; `None` when it is not stored (an `Err` of a fn that does not
    /// cache errors).
    fn encode(out: &Result<T, E>) -> Option<(Codec, Result<Vec<u8>, String>)>;
    /// The stored result back.
    fn decode(codec: Codec, bytes: &[u8]) -> Result<Result<T, E>, String>;
}

/// Stores `Ok` values; an `Err` releases the key so a retry runs again.
pub struct ValuesOnly;

impl<T: Serialize + DeserializeOwned, E> ResultCodec<T, E> for ValuesOnly {
    fn encode(out: &Result<T, E>) -> Option<(Codec, Result<Vec<u8>, String>)> {
        match out {
            Ok(v) => Some((Codec::Json, codec::encode(v))),
            Err(_) => None,
        }
    }

    fn decode(codec: Codec, bytes: &[u8]) -> Result<Result<T, E>, String> {
        match codec {
            Codec::Json => codec::decode(bytes).map(Ok),
            Codec::JsonError => {
                Err("the record holds a stored error, but this fn no longer caches errors".into())
            }
        }
    }
}

/// Stores `Ok` and `Err` values (`cache_errors = true`).
pub struct ValuesAndErrors;

impl<T, E> ResultCodec<T, E> for ValuesAndErrors
where
    T: Serialize + DeserializeOwned,
    E: Serialize + DeserializeOwned,
{
    fn encode(out: &Result<T, E>) -> Option<(Codec, Result<Vec<u8>, String>)> {
        Some(match out {
            Ok(v) => (Codec::Json, codec::encode(v)),
            Err(e) => (Codec::JsonError, codec::encode(e)),
        })
    }

    fn decode(codec: Codec, bytes: &[u8]) -> Result<Result<T, E>, String> {
        match codec {
            Codec::Json => codec::decode(bytes).map(Ok),
            Codec::JsonError => codec::decode(bytes).map(Err),
        }
    }
}

/// Everything one call needs, resolved from its spec, its arguments and the runtime.
struct Ctx<'a> {
    idem: &'a Inner,
    site: &'static Site,
    function: &'static str,
    version: u32,
    id: RecordId,
    fingerprint: Option<Fingerprint>,
    ttl: Duration,
    lease: Duration,
    wait: Duration,
    reject: bool,
}

/// A call's inputs checked and resolved: which runtime, which record, which settings.
pub(crate) struct Prepared {
    pub(crate) idem: Idem,
    /// The fn's site (its path, namespaces and metric labels). Read by transactional calls.
    #[cfg_attr(not(feature = "_sql"), allow(dead_code))]
    pub(crate) site: &'static Site,
    pub(crate) id: RecordId,
    pub(crate) fingerprint: Option<Fingerprint>,
    pub(crate) version: u32,
    pub(crate) ttl: Duration,
    pub(crate) lease: Duration,
    pub(crate) wait: Duration,
    pub(crate) reject: bool,
}

/// Checks a call's key, scope and payload and resolves its record. `Ok(None)`: the fn is
/// `optional` and there is no key (or scope), so the body runs unprotected.
pub(crate) fn prepare(
    spec: &'static Spec,
    site: &'static Site,
    types: &[&'static str],
    call: Call,
) -> Result<Option<Prepared>, Error> {
    let function = site.path;
    let idem = call
        .runtime
        .or_else(|| Idem::installed().cloned())
        .ok_or(Error::NotInstalled { function })?;
    let missing = |part: &'static str| {
        if spec.optional {
            Ok(None)
        } else {
            Err(Error::MissingKey { function, part })
        }
    };
    let invalid = |reason: String| Error::InvalidKey { function, reason };
    let Some(key) = call.key else {
        return missing("key");
    };
    let namespace = match call.scope {
        Scope::Unscoped => site.namespace(types),
        Scope::Value(scope) if scope.is_empty() => {
            return Err(invalid("the scope is empty".into()));
        }
        Scope::Value(scope) => {
            crate::key::Namespace::new(&site.qualified_path(types), spec.version, Some(&scope))
        }
        Scope::Missing => return missing("scope"),
    };
    if key.is_empty() {
        return Err(invalid("the key is empty".into()));
    }
    let fingerprint = match call.payload {
        Payload::Unchecked => None,
        Payload::Checked(fp) => Some(fp),
        Payload::Failed(e) => {
            return Err(invalid(format!(
                "the payload could not be fingerprinted: {e}"
            )));
        }
    };
    let settings = &idem.inner.settings;
    Ok(Some(Prepared {
        site,
        id: namespace.record(key),
        fingerprint,
        version: spec.version,
        ttl: spec.ttl.unwrap_or(settings.default_ttl),
        lease: spec.lease.unwrap_or(settings.default_lease),
        wait: spec.wait.unwrap_or(settings.default_wait),
        reject: spec.reject,
        idem,
    }))
}

/// The span of one call. Its `outcome` is recorded when the call ends.
pub(crate) fn span(function: &'static str, id: &RecordId) -> tracing::Span {
    tracing::info_span!(
        "idempotent",
        function,
        key = %id.lazy_hash(),
        outcome = tracing::field::Empty,
        error = tracing::field::Empty,
    )
}

/// Runs one store statement: timed for `idem_store_seconds`, and bounded by `limit`, so a
/// store that stops answering (a silent partition) turns into a prompt error instead of a
/// hung call. The statement's future is dropped at the deadline.
pub(crate) async fn store_call<T>(
    store: &dyn crate::store::Store,
    op: &'static str,
    limit: Duration,
    fut: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    metrics::timed(store, op, async {
        match tokio::time::timeout(limit, fut).await {
            Ok(out) => out,
            Err(_elapsed) => Err(StoreError::msg(format!(
                "no answer from the store within {limit:?} ({op}); it may be unreachable"
            ))),
        }
    })
    .await
}

/// Runs one idempotent call. The entry point behind `__private::run`.
pub(crate) async fn run<T, E, F, C>(
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
    let p = match prepare(spec, site, types, call) {
        Ok(Some(p)) => p,
        Ok(None) => return run_unprotected(site, body).await,
        Err(e) => return Err(fail(site.path, e)),
    };
    let Prepared {
        idem,
        id,
        fingerprint,
        version,
        ttl,
        lease,
        wait,
        reject,
        ..
    } = p;
    let ctx = Ctx {
        idem: &idem.inner,
        site,
        function: site.path,
        version,
        fingerprint,
        ttl,
        lease,
        wait,
        reject,
        id,
    };
    let span = span(site.path, &ctx.id);
    ctx.call::<T, E, F, C>(body).instrument(span).await
}

pub(crate) async fn run_unprotected<T, E>(
    site: &'static Site,
    body: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    tracing::debug!(
        function = site.path,
        "idem: no key; running the body unprotected"
    );
    metrics::call(&site.labels, Outcome::Unprotected);
    outcome::report(Outcome::Unprotected);
    body.await
}

pub(crate) fn fail<E: From<Error>>(function: &'static str, err: Error) -> E {
    metrics::error(function, err.kind());
    let span = tracing::Span::current();
    // A call idem turned away (a duplicate in progress, a reused key, no key) is `rejected`;
    // one it could not serve (the store, a stored value that does not decode) is `failed`.
    let outcome = match err {
        Error::InProgress { .. }
        | Error::PayloadMismatch { .. }
        | Error::MissingKey { .. }
        | Error::InvalidKey { .. } => "rejected",
        _ => "failed",
    };
    span.record("outcome", outcome);
    span.record("error", err.kind());
    E::from(err)
}

/// What the leader got from the store before running anything.
enum Acquired<'a> {
    /// The caller owns the record and runs the body.
    Owned {
        guard: OwnedRecord<'a>,
        took_over: bool,
        /// When the statement that started the lease was sent.
        since: Instant,
    },
    /// The record is completed with this result.
    Replay {
        result: StoredResult,
        fingerprint: Option<Fingerprint>,
        expires_in: Duration,
        waited: bool,
    },
}

/// What the engine does about an existing record. Pure: decided from the record alone.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    Replay,
    PayloadMismatch,
    Wait { retry_after: Duration },
    TakeOver,
}

pub(crate) fn decide(record: &Record, fingerprint: Option<&Fingerprint>) -> Decision {
    let mismatch = match (record.fingerprint.as_ref(), fingerprint) {
        (Some(stored), Some(ours)) => stored != ours,
        // A record without a fingerprint (or a fn without one) cannot be compared.
        _ => false,
    };
    match record.state {
        RecordState::Completed if !record.expires_in.is_zero() => {
            if mismatch {
                Decision::PayloadMismatch
            } else {
                Decision::Replay
            }
        }
        RecordState::InProgress if !record.lease_remaining.is_zero() => {
            if mismatch {
                Decision::PayloadMismatch
            } else {
                Decision::Wait {
                    retry_after: record.lease_remaining,
                }
            }
        }
        // Its owner stopped heartbeating. Only a retry of the same request may run it again:
        // another payload under this key is a client bug, not a takeover.
        RecordState::InProgress if mismatch => Decision::PayloadMismatch,
        // Expired, or abandoned: whatever it held is over.
        RecordState::Completed | RecordState::InProgress => Decision::TakeOver,
    }
}

impl Ctx<'_> {
    async fn call<T, E, F, C>(&self, body: F) -> Result<T, E>
    where
        F: Future<Output = Result<T, E>>,
        E: From<Error>,
        C: ResultCodec<T, E>,
    {
        if let Some(cache) = &self.idem.cache
            && let Some(hit) = cache.get(&self.id)
        {
            return self.replay::<T, E, C>(
                hit.codec,
                &hit.bytes,
                hit.fingerprint.as_ref(),
                Outcome::Replayed,
            );
        }
        // One budget for the whole call, however many times it follows a leader that gives
        // up: the wait is bounded, as documented.
        let deadline = Instant::now() + self.wait;
        let mut body = Some(body);
        loop {
            match self.idem.flights.join(&self.id) {
                Role::Leader(slot) => {
                    // Only one loop iteration ever leads, so the body is still here.
                    let Some(body) = body.take() else {
                        unreachable!("a call leads at most once")
                    };
                    return self.lead::<T, E, F, C>(slot, body, deadline).await;
                }
                Role::Follower(rx) => match self.follow(rx, deadline).await {
                    Shared::Completed {
                        codec,
                        bytes,
                        fingerprint,
                    } => {
                        return self.replay::<T, E, C>(
                            codec,
                            &bytes,
                            fingerprint.as_ref(),
                            Outcome::Waited,
                        );
                    }
                    Shared::Failed(e) => return Err(fail(self.function, e)),
                    Shared::Retry => continue,
                },
            }
        }
    }

    /// Waits for the leader of this key in this process; an `InProgress` error when it does
    /// not finish by `deadline` (or at once for `on_conflict = "reject"`).
    async fn follow(&self, mut rx: watch::Receiver<Option<Shared>>, deadline: Instant) -> Shared {
        let busy = Shared::Failed(Error::InProgress {
            function: self.function,
            key: self.id.hash(),
            retry_after: Duration::from_secs(1),
        });
        if self.reject {
            // A value already shared is still an answer; only a running call is a conflict.
            return rx.borrow().clone().unwrap_or(busy);
        }
        let deadline = tokio::time::Instant::from_std(deadline);
        match tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some)).await {
            Ok(Ok(shared)) => shared.clone().unwrap_or(Shared::Retry),
            // The leader stopped without an answer (dropped or panicked): try again.
            Ok(Err(_closed)) => Shared::Retry,
            Err(_elapsed) => busy,
        }
    }

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
        let (mut guard, took_over, since) = match self.acquire(deadline).await {
            Ok(Acquired::Owned {
                guard,
                took_over,
                since,
            }) => (guard, took_over, since),
            Ok(Acquired::Replay {
                result,
                fingerprint,
                expires_in,
                waited,
            }) => {
                let bytes: Arc<[u8]> = result.bytes.into();
                if let Some(cache) = &self.idem.cache {
                    cache.insert(
                        self.id.clone(),
                        result.codec,
                        bytes.clone(),
                        fingerprint,
                        expires_in,
                    );
                }
                slot.finish(Shared::Completed {
                    codec: result.codec,
                    bytes: bytes.clone(),
                    fingerprint,
                });
                let how = if waited {
                    Outcome::Waited
                } else {
                    Outcome::Replayed
                };
                return self.replay::<T, E, C>(result.codec, &bytes, fingerprint.as_ref(), how);
            }
            Err(e) => {
                // A payload mismatch is about this caller's payload; the others check theirs.
                slot.finish(match e {
                    Error::PayloadMismatch { .. } => Shared::Retry,
                    ref other => Shared::Failed(other.clone()),
                });
                return Err(fail(self.function, e));
            }
        };
        if took_over {
            metrics::takeover(self.function);
        }
        let fence = guard.fence;
        let (out, lost) = crate::lease::with_heartbeat(
            &*self.idem.store,
            self.idem.settings.store_timeout,
            self.function,
            &self.id,
            fence,
            self.lease,
            since,
            body,
        )
        .await;
        let how = if took_over {
            Outcome::TookOver
        } else {
            Outcome::Executed
        };
        let Some((codec, encoded)) = C::encode(&out) else {
            // An error that is not stored: free the key so the next attempt runs the body.
            guard.release().await;
            slot.finish(Shared::Retry);
            self.finished(how);
            return out;
        };
        let bytes = match encoded {
            Ok(bytes) if bytes.len() <= self.idem.settings.max_result_bytes => bytes,
            Ok(bytes) => {
                tracing::error!(
                    function = self.function,
                    bytes = bytes.len(),
                    limit = self.idem.settings.max_result_bytes,
                    "idem: result is larger than max_result_bytes; returned but not stored, so a retry will run the body again"
                );
                metrics::not_stored(self.function, "too_large");
                guard.release().await;
                // Callers already waiting here are concurrent with this call: give them its result.
                slot.finish(Shared::Completed {
                    codec,
                    bytes: bytes.into(),
                    fingerprint: self.fingerprint,
                });
                self.finished(how);
                return out;
            }
            Err(e) => {
                tracing::error!(function = self.function, error = %e, "idem: result could not be encoded; returned but not stored");
                metrics::not_stored(self.function, "encode");
                guard.release().await;
                slot.finish(Shared::Retry);
                self.finished(how);
                return out;
            }
        };
        // The effect happened and its result is in hand: from here on, dropping this call
        // must lead to the result being stored, never to the key being released. The store
        // writes run in their own task, which finishes even if this future is dropped.
        guard.disarm();
        let bytes: Arc<[u8]> = bytes.into();
        let stored = self
            .store_result(
                fence,
                StoredResult {
                    codec,
                    bytes: bytes.to_vec(),
                },
            )
            .await;
        // Only a recorded value is ever returned as `Ok`: the record is what every other
        // caller of this key gets, so an unrecorded value could contradict it.
        let error = match stored {
            Stored::Yes => {
                metrics::stored_bytes(self.function, bytes.len());
                if let Some(cache) = &self.idem.cache {
                    cache.insert(
                        self.id.clone(),
                        codec,
                        bytes.clone(),
                        self.fingerprint,
                        self.ttl,
                    );
                }
                slot.finish(Shared::Completed {
                    codec,
                    bytes,
                    fingerprint: self.fingerprint,
                });
                self.finished(how);
                return out;
            }
            // Someone took the record over: their result is the one that counts. (Counted
            // and logged by the task that found out.)
            Stored::Lost => Error::LeaseLost {
                function: self.function,
                key: self.id.hash(),
            },
            // Still unknown, but a heartbeat already found the record taken: whatever the
            // task finds out, this value is not the one others will be given.
            Stored::Pending if lost => Error::LeaseLost {
                function: self.function,
                key: self.id.hash(),
            },
            // The store is slow or away. The task keeps trying; a retry with this key gets the
            // recorded value (this one, once it lands) or, if the reservation lapsed first, runs
            // the body again.
            Stored::Pending => {
                tracing::warn!(function = self.function, key = %self.id.hash(),
                    "idem: the result is not recorded yet; the caller is told to retry, and recording goes on in the background");
                Error::ResultNotRecorded {
                    function: self.function,
                    key: self.id.hash(),
                    retry_after: RESULT_NOT_RECORDED_RETRY,
                }
            }
        };
        slot.finish(match &error {
            Error::LeaseLost { .. } => Shared::Retry,
            other => Shared::Failed(other.clone()),
        });
        Err(fail(self.function, error))
    }

    /// Stores the result in a task of its own, so it completes even if the caller is
    /// dropped. Waits for it as long as one store statement may take; past that the caller
    /// goes on and the task keeps trying.
    async fn store_result(&self, fence: Fence, result: StoredResult) -> Stored {
        let job = StoreResult {
            store: self.idem.store.clone(),
            timeout: self.idem.settings.store_timeout,
            id: self.id.clone(),
            fence,
            owner: self.idem.settings.executor_id.clone(),
            fingerprint: self.fingerprint,
            lease: self.lease,
            ttl: self.ttl,
            function: self.function,
            result,
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return job.run().await;
        };
        let mut task = rt.spawn(job.run());
        let patience = self.idem.settings.store_timeout;
        match tokio::time::timeout(patience, &mut task).await {
            Ok(Ok(stored)) => stored,
            // The task panicked or its runtime is shutting down.
            Ok(Err(_)) => Stored::Pending,
            Err(_elapsed) => Stored::Pending,
        }
    }

    /// Reserves the record, or finds out why not: replay, wait (until `deadline`), take over,
    /// refuse.
    async fn acquire(&self, deadline: Instant) -> Result<Acquired<'_>, Error> {
        let store = &*self.idem.store;
        let timeout = self.idem.settings.store_timeout;
        let mut backoff = Backoff::default();
        let mut waited = false;
        let mut races = 0u32;
        loop {
            // Armed before the statement runs: if this call is dropped while `reserve` is in
            // flight, the row it may have written is released instead of stuck for a lease.
            let mut guard = OwnedRecord::new(self.idem, &self.id, Fence::random(), self.function);
            let claim = Claim {
                id: &self.id,
                fence: guard.fence,
                owner: &self.idem.settings.executor_id,
                fingerprint: self.fingerprint.as_ref(),
                lease: self.lease,
            };
            let since = Instant::now();
            let reserved = store_call(store, "reserve", timeout, store.reserve(&claim)).await;
            let record = match reserved {
                Ok(Reservation::Acquired) => {
                    return Ok(Acquired::Owned {
                        guard,
                        took_over: false,
                        since,
                    });
                }
                Ok(Reservation::Exists(record)) => {
                    guard.disarm();
                    record
                }
                Ok(Reservation::Vanished) => {
                    guard.disarm();
                    races += 1;
                    self.pace_race(races, &mut backoff, deadline).await?;
                    continue;
                }
                Err(e) => {
                    // The store is failing; a release would fail too. If the insert did land,
                    // its lease frees it.
                    guard.disarm();
                    return Err(self.unavailable(e));
                }
            };
            match decide(&record, self.fingerprint.as_ref()) {
                Decision::Replay => {
                    let result = record.result.ok_or_else(|| {
                        self.unavailable(StoreError::msg("a completed record has no result"))
                    })?;
                    return Ok(Acquired::Replay {
                        result,
                        fingerprint: record.fingerprint,
                        expires_in: record.expires_in,
                        waited,
                    });
                }
                Decision::PayloadMismatch => {
                    return Err(Error::PayloadMismatch {
                        function: self.function,
                        key: self.id.hash(),
                    });
                }
                Decision::TakeOver => {
                    guard.rearm();
                    let since = Instant::now();
                    let take = store.take_over(&claim, record.fence);
                    match store_call(store, "take_over", timeout, take).await {
                        Ok(true) => {
                            return Ok(Acquired::Owned {
                                guard,
                                took_over: record.state == RecordState::InProgress,
                                since,
                            });
                        }
                        Ok(false) => guard.disarm(),
                        Err(e) => {
                            guard.disarm();
                            return Err(self.unavailable(e));
                        }
                    }
                    races += 1;
                    self.pace_race(races, &mut backoff, deadline).await?;
                }
                Decision::Wait { retry_after } => {
                    let now = Instant::now();
                    if self.reject || now >= deadline {
                        return Err(Error::InProgress {
                            function: self.function,
                            key: self.id.hash(),
                            retry_after,
                        });
                    }
                    waited = true;
                    tokio::time::sleep(backoff.next().min(deadline - now)).await;
                }
            }
        }
    }

    /// After losing a race (the record changed between two statements), go again at once a
    /// few times, then back off so a pathological churn cannot spin.
    async fn pace_race(
        &self,
        races: u32,
        backoff: &mut Backoff,
        deadline: Instant,
    ) -> Result<(), Error> {
        if races <= 3 {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::InProgress {
                function: self.function,
                key: self.id.hash(),
                retry_after: backoff.next(),
            });
        }
        tokio::time::sleep(backoff.next().min(deadline - now)).await;
        Ok(())
    }

    fn replay<T, E, C>(
        &self,
        codec: Codec,
        bytes: &[u8],
        stored: Option<&Fingerprint>,
        how: Outcome,
    ) -> Result<T, E>
    where
        E: From<Error>,
        C: ResultCodec<T, E>,
    {
        if let (Some(stored), Some(ours)) = (stored, self.fingerprint.as_ref())
            && stored != ours
        {
            return Err(fail(
                self.function,
                Error::PayloadMismatch {
                    function: self.function,
                    key: self.id.hash(),
                },
            ));
        }
        match C::decode(codec, bytes) {
            Ok(out) => {
                self.finished(how);
                out
            }
            Err(message) => Err(fail(
                self.function,
                Error::Decode {
                    function: self.function,
                    key: self.id.hash(),
                    version: self.version,
                    message,
                },
            )),
        }
    }

    fn finished(&self, how: Outcome) {
        metrics::call(&self.site.labels, how);
        outcome::report(how);
        tracing::Span::current().record("outcome", how.as_str());
    }

    fn unavailable(&self, source: StoreError) -> Error {
        Error::StoreUnavailable {
            function: self.function,
            source,
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
    store: Arc<dyn crate::store::Store>,
    timeout: Duration,
    id: RecordId,
    fence: Fence,
    owner: Arc<str>,
    fingerprint: Option<Fingerprint>,
    lease: Duration,
    ttl: Duration,
    function: &'static str,
    result: StoredResult,
}

impl StoreResult {
    /// Finalize, retried with backoff for up to `STORE_RESULT_RETRY_WINDOW` so a store
    /// outage right after the body ran does not throw its result away. A refused finalize is
    /// checked before it is called lost: the first attempt may have committed with its reply
    /// lost, or purge may have deleted an abandoned-looking row that nobody took over (then
    /// the result is written back).
    async fn run(self) -> Stored {
        let store = &*self.store;
        let give_up = Instant::now() + STORE_RESULT_RETRY_WINDOW;
        let mut pause = Duration::from_millis(20);
        let mut failures = 0u32;
        loop {
            let finalize = store.finalize(&self.id, self.fence, &self.result, self.ttl);
            let attempt = match store_call(store, "finalize", self.timeout, finalize).await {
                Ok(true) => Ok(Stored::Yes),
                Ok(false) => self.confirm().await,
                Err(e) => Err(e),
            };
            match attempt {
                Ok(Stored::Lost) => {
                    // The one place a lost reservation is counted: the caller may be gone.
                    tracing::warn!(function = self.function, key = %self.id.hash(),
                        "idem: the reservation was taken over while the body ran; its result is not recorded (the new owner's is)");
                    metrics::lease_lost(self.function);
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
        let store = &*self.store;
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

/// Exponential backoff with jitter for polling an in-progress record: 5 ms doubling to
/// 250 ms, each pause drawn from [50%, 100%] of the step so waiters spread out.
#[derive(Default)]
struct Backoff {
    step: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let base = Duration::from_millis(5) * 2u32.pow(self.step.min(6));
        self.step = self.step.saturating_add(1);
        let cap = base.min(Duration::from_millis(250));
        cap.mul_f64(0.5 + fastrand::f64() * 0.5)
    }
}

/// An owned reservation. Dropped while armed (the body panicked, or the call's future was
/// dropped mid-body) it releases the record in the background, so the key is free again
/// at once instead of after the lease.
struct OwnedRecord<'a> {
    idem: &'a Inner,
    id: &'a RecordId,
    fence: Fence,
    function: &'static str,
    armed: bool,
}

impl<'a> OwnedRecord<'a> {
    fn new(idem: &'a Inner, id: &'a RecordId, fence: Fence, function: &'static str) -> Self {
        OwnedRecord {
            idem,
            id,
            fence,
            function,
            armed: true,
        }
    }

    fn disarm(&mut self) {
        self.armed = false;
    }

    fn rearm(&mut self) {
        self.armed = true;
    }

    async fn release(&mut self) {
        let store = &*self.idem.store;
        let timeout = self.idem.settings.store_timeout;
        // Still armed while the statement runs: dropped mid-release, the guard releases again.
        let release = store.release(self.id, self.fence);
        if let Err(e) = store_call(store, "release", timeout, release).await {
            tracing::warn!(function = self.function, key = %self.id.hash(), error = %e,
                "idem: could not release the key; it frees itself when the lease runs out");
        }
        self.armed = false;
    }
}

impl Drop for OwnedRecord<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let store = self.idem.store.clone();
        let timeout = self.idem.settings.store_timeout;
        let (id, fence, function) = (self.id.clone(), self.fence, self.function);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let release = store.release(&id, fence);
                    if let Err(e) = store_call(&*store, "release", timeout, release).await {
                        tracing::warn!(function, key = %id.hash(), error = %e,
                            "idem: could not release an abandoned key; it frees itself when the lease runs out");
                    }
                });
            }
            Err(_) => tracing::warn!(function, key = %id.hash(),
                "idem: call abandoned outside a tokio runtime; the key frees itself when the lease runs out"),
        }
    }
}

/// What the leader of a key tells the callers waiting on it.
#[derive(Clone)]
enum Shared {
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
    map: Mutex<HashMap<RecordId, watch::Sender<Option<Shared>>>>,
}

enum Role<'a> {
    Leader(LeaderSlot<'a>),
    Follower(watch::Receiver<Option<Shared>>),
}

impl Flights {
    fn lock(&self) -> MutexGuard<'_, HashMap<RecordId, watch::Sender<Option<Shared>>>> {
        // Critical sections below only insert and remove; a poisoned map is still consistent.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn join(&self, id: &RecordId) -> Role<'_> {
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
struct LeaderSlot<'a> {
    flights: &'a Flights,
    id: RecordId,
    tx: watch::Sender<Option<Shared>>,
}

impl LeaderSlot<'_> {
    fn finish(self, shared: Shared) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Fence;

    fn record(state: RecordState, lease_ms: u64, expires_ms: u64, fp: Option<u8>) -> Record {
        Record {
            state,
            fingerprint: fp.map(|b| Fingerprint::from_bytes(&[b; 16]).expect("16 bytes")),
            fence: Fence::from_raw(1),
            owner: "o".into(),
            attempts: 1,
            lease_remaining: Duration::from_millis(lease_ms),
            expires_in: Duration::from_millis(expires_ms),
            result: None,
        }
    }

    fn fp(b: u8) -> Fingerprint {
        Fingerprint::from_bytes(&[b; 16]).expect("16 bytes")
    }

    #[test]
    fn completed_and_live_replays_for_the_same_payload_only() {
        let r = record(RecordState::Completed, 0, 1_000, Some(1));
        assert_eq!(decide(&r, Some(&fp(1))), Decision::Replay);
        assert_eq!(decide(&r, Some(&fp(2))), Decision::PayloadMismatch);
        assert_eq!(
            decide(&r, None),
            Decision::Replay,
            "no fingerprint, no check"
        );
    }

    #[test]
    fn in_progress_with_a_live_lease_waits() {
        let r = record(RecordState::InProgress, 700, 700, Some(1));
        assert_eq!(
            decide(&r, Some(&fp(1))),
            Decision::Wait {
                retry_after: Duration::from_millis(700)
            }
        );
        assert_eq!(decide(&r, Some(&fp(9))), Decision::PayloadMismatch);
    }

    #[test]
    fn over_leases_and_expired_results_are_taken_over() {
        let r = record(RecordState::InProgress, 0, 0, Some(1));
        assert_eq!(decide(&r, Some(&fp(1))), Decision::TakeOver);
        assert_eq!(
            decide(&r, Some(&fp(2))),
            Decision::PayloadMismatch,
            "an abandoned call is only re-run for its own payload"
        );
        let r = record(RecordState::Completed, 0, 0, Some(1));
        assert_eq!(decide(&r, Some(&fp(2))), Decision::TakeOver);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::default();
        let first = b.next();
        assert!(first <= Duration::from_millis(5));
        for _ in 0..20 {
            assert!(b.next() <= Duration::from_millis(250));
        }
    }
}
