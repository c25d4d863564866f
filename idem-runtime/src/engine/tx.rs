//! Transactional calls (`#[idempotent(tx = tx)]`): the record lives in the caller's own
//! transaction.
//!
//! The reservation is written on the caller's connection before the body runs, and the
//! result after it, so both commit or roll back with the body's own writes: when the effects
//! are rows in the same database, they happen exactly once. No lease, heartbeat or takeover of
//! a live call is involved: a concurrent duplicate blocks on the row (the database's own row
//! lock) until the first transaction ends, then sees the committed result, or no row if it
//! rolled back and runs the body itself.
//!
//! The same decisions as the leased protocol apply to what `reserve` finds ([`decide`]).

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use super::Engine;
use super::call::{Call, ResolvedCall};
use super::decide::{Decision, decide};
use super::replay::fail;
use super::spec::{Site, Spec};
use crate::codec::ResultCodec;
use crate::error::StoreError;
use crate::outcome::{self, Outcome};
use crate::store::{Claim, Fence, RecordState, Reservation, StoredResult, TxStatements};
use crate::{Error, metrics};

/// A database whose transactions a call can join: its store type, found in the runtime.
pub trait TxDatabase: sqlx::Database {
    /// The idem store for this database.
    type Store: TxStatements<Self> + 'static;
}

#[cfg(feature = "postgres")]
impl TxDatabase for sqlx::Postgres {
    type Store = crate::store::PgStore;
}

#[cfg(feature = "mysql")]
impl TxDatabase for sqlx::MySql {
    type Store = crate::store::MySqlStore;
}

#[cfg(feature = "sqlite")]
impl TxDatabase for sqlx::Sqlite {
    type Store = crate::store::SqliteStore;
}

/// What a duplicate that lost a conflict with a concurrent transaction is told to wait.
const CONFLICT_RETRY_AFTER: Duration = Duration::from_millis(100);

/// How many times `begin` re-reads a key whose row changed between two statements (a
/// concurrent transaction committed or rolled back in between) before it gives up.
const RACES: usize = 5;

/// What `begin` decided: the answer `O` without running the body, or a reservation to run
/// it under.
pub enum TxBegin<O, C> {
    /// Answered without running the body (a replay, or an error).
    Done(O),
    /// The reservation is in the caller's transaction: run the body, then `finish`.
    Run(TxToken<C>),
}

impl<O, C> TxBegin<O, C> {
    /// The same decision with the answer turned into `P`.
    pub(crate) fn map<P>(self, f: impl FnOnce(O) -> P) -> TxBegin<P, C> {
        match self {
            TxBegin::Done(out) => TxBegin::Done(f(out)),
            TxBegin::Run(token) => TxBegin::Run(token),
        }
    }
}

/// A reservation held in the caller's transaction, between `begin` and `finish`.
pub struct TxToken<C> {
    site: &'static Site,
    /// `None`: running unprotected, for the reason `why` (no key, or a disabled runtime).
    call: Option<ResolvedCall>,
    why: &'static str,
    fence: Fence,
    outcome: Outcome,
    codec: PhantomData<C>,
}

impl<C> TxToken<C> {
    /// Whether `finish` writes a record (not for a call running unprotected).
    #[cfg(feature = "axum")]
    pub(crate) fn records(&self) -> bool {
        self.call.is_some()
    }
}

impl ResolvedCall {
    fn tx_store<DB: TxDatabase>(&self) -> Result<&DB::Store, Error> {
        let store = &self.engine.store;
        store
            .as_any()
            .and_then(|any| any.downcast_ref::<DB::Store>())
            .ok_or_else(|| {
                Error::Config(format!(
                    "`{}` joins a {} transaction (`tx = ..`), so its runtime's store must be that database's idem store, not `{}`",
                    self.function(),
                    std::any::type_name::<DB>(),
                    store.backend()
                ))
            })
    }

    /// A failed statement: a conflict with a concurrent transaction (a deadlock, a
    /// serialization failure, a lock timeout) is the caller's to retry, like a call still in
    /// progress; anything else is the store being unavailable.
    fn store_failed(&self, source: StoreError) -> Error {
        if source.is_transaction_conflict() {
            tracing::debug!(function = self.function(), error = %source,
                "idem: the transaction lost a conflict with a concurrent one; retry it");
            return self.in_progress(CONFLICT_RETRY_AFTER);
        }
        self.unavailable(source)
    }
}

/// Reserves the record inside the caller's transaction, or answers without the body.
pub(crate) async fn begin<T, E, C, DB>(
    engine: &Arc<Engine>,
    spec: &'static Spec,
    site: &'static Site,
    types: &[&'static str],
    call: Call,
    conn: &mut DB::Connection,
) -> TxBegin<Result<T, E>, C>
where
    E: From<Error>,
    C: ResultCodec<T, E>,
    DB: TxDatabase,
{
    let token = |call, fence, outcome, why| TxToken {
        site,
        call,
        why,
        fence,
        outcome,
        codec: PhantomData,
    };
    let unprotected =
        |why| TxBegin::Run(token(None, Fence::from_raw(0), Outcome::Unprotected, why));
    if engine.settings.disabled {
        return unprotected("disabled");
    }
    let call = match call.resolve(engine, spec, site, types) {
        Ok(Some(call)) => call,
        // `optional` and no key: the body runs unprotected, still inside the transaction.
        Ok(None) => return unprotected("no key"),
        Err(e) => return TxBegin::Done(Err(fail(site.path, e))),
    };
    let span = call.span();
    match reserve::<T, E, C, DB>(&call, conn).instrument(span).await {
        Ok((fence, outcome)) => TxBegin::Run(token(Some(call), fence, outcome, "")),
        Err(done) => TxBegin::Done(done),
    }
}

/// The reservation's fence and how the body will have run, or the answer without it.
async fn reserve<T, E, C, DB>(
    call: &ResolvedCall,
    conn: &mut DB::Connection,
) -> Result<(Fence, Outcome), Result<T, E>>
where
    E: From<Error>,
    C: ResultCodec<T, E>,
    DB: TxDatabase,
{
    let function = call.function();
    if let Some(cache) = &call.engine.cache
        && let Some(hit) = cache.get(&call.id)
    {
        let stored = hit.fingerprint.as_ref();
        return Err(call.replay::<T, E, C>(hit.codec, &hit.bytes, stored, Outcome::Replayed));
    }
    let store = call.tx_store::<DB>().map_err(|e| Err(fail(function, e)))?;
    for _ in 0..RACES {
        let fence = Fence::random();
        let claim = Claim {
            id: &call.id,
            fence,
            owner: &call.engine.settings.executor_id,
            fingerprint: call.fingerprint.as_ref(),
            // No lease in a transaction: others see the row only once committed, and a
            // committed row still in progress means its call stopped (cancelled, and the
            // transaction committed anyway). Such a row is reclaimable at once.
            lease: Duration::ZERO,
        };
        let record = match store.reserve_in(conn, &claim).await {
            Ok(Reservation::Acquired) => return Ok((fence, Outcome::Executed)),
            Ok(Reservation::Vanished) => continue,
            Ok(Reservation::Exists(record)) => record,
            Err(e) => return Err(Err(fail(function, call.store_failed(e)))),
        };
        match decide(&record, call.fingerprint.as_ref()) {
            Decision::Replay => {
                let Some(result) = record.result else {
                    let e = StoreError::msg("a completed record has no result");
                    return Err(Err(fail(function, call.unavailable(e))));
                };
                // Not cached: a row written earlier in this same transaction could still roll
                // back, and nothing here can tell it from a committed one.
                let stored = record.fingerprint.as_ref();
                let out =
                    call.replay::<T, E, C>(result.codec, &result.bytes, stored, Outcome::Replayed);
                return Err(out);
            }
            Decision::PayloadMismatch => {
                let e = Error::PayloadMismatch {
                    function,
                    key: call.id.hash(),
                };
                return Err(Err(fail(function, e)));
            }
            Decision::TakeOver => match store.take_over_in(conn, &claim, record.fence).await {
                Ok(true) if record.state == RecordState::InProgress => {
                    return Ok((fence, Outcome::TookOver));
                }
                Ok(true) => return Ok((fence, Outcome::Executed)),
                Ok(false) => continue,
                Err(e) => return Err(Err(fail(function, call.unavailable(e)))),
            },
            // A committed in-progress row: a leased call of the same record is running.
            Decision::Wait { retry_after } => {
                return Err(Err(fail(function, call.in_progress(retry_after))));
            }
        }
    }
    Err(Err(fail(function, call.in_progress(CONFLICT_RETRY_AFTER))))
}

/// Records the body's outcome in the caller's transaction: its result, or (for an error that
/// is not stored) the removal of the reservation. An error here is returned to the caller,
/// whose transaction then rolls back with the body's writes: nothing is half done.
pub(crate) async fn finish<T, E, C, DB>(
    token: TxToken<C>,
    conn: &mut DB::Connection,
    out: Result<T, E>,
) -> Result<T, E>
where
    E: From<Error>,
    C: ResultCodec<T, E>,
    DB: TxDatabase,
{
    let Some(call) = token.call else {
        // The body already ran: the span only carries the outcome.
        let _span = super::replay::unprotected_span(token.site, token.why).entered();
        metrics::call(&token.site.labels, Outcome::Unprotected);
        outcome::report(Outcome::Unprotected);
        return out;
    };
    let span = call.span();
    record::<T, E, C, DB>(&call, token.fence, token.outcome, conn, out)
        .instrument(span)
        .await
}

async fn record<T, E, C, DB>(
    call: &ResolvedCall,
    fence: Fence,
    outcome: Outcome,
    conn: &mut DB::Connection,
    out: Result<T, E>,
) -> Result<T, E>
where
    E: From<Error>,
    C: ResultCodec<T, E>,
    DB: TxDatabase,
{
    let function = call.function();
    let store = match call.tx_store::<DB>() {
        Ok(s) => s,
        Err(e) => return Err(fail(function, e)),
    };
    let limit = call.engine.settings.max_result_bytes;
    let result = match C::encode(&out) {
        // An error that is not stored: whatever the caller does with its transaction, the
        // key must not stay reserved.
        None => {
            if let Err(e) = store.release_in(conn, &call.id, fence).await {
                tracing::debug!(function, error = %e, "idem: could not remove the reservation; it goes when the transaction rolls back");
            }
            call.finished(outcome);
            return out;
        }
        // Unlike a leased call, a transactional one can refuse to go on: the caller rolls
        // back and the effect goes with the missing record. Committing an effect whose
        // record is missing would let a retry apply it again.
        Some((_, Ok(bytes))) if bytes.len() > limit => {
            metrics::not_stored(function, "too_large");
            let e = Error::ResultTooLarge {
                function,
                bytes: bytes.len(),
                limit,
            };
            return Err(fail(function, e));
        }
        Some((_, Err(message))) => {
            metrics::not_stored(function, "encode");
            return Err(fail(function, Error::Encode { function, message }));
        }
        Some((codec, Ok(bytes))) => StoredResult { codec, bytes },
    };
    let ttl = call.ttl;
    let failure = match store.finalize_in(conn, &call.id, fence, &result, ttl).await {
        Ok(true) => {
            metrics::stored_bytes(function, result.bytes.len());
            call.finished(outcome);
            return out;
        }
        Ok(false) => StoreError::msg("the reservation changed inside the transaction"),
        Err(e) => e,
    };
    if out.is_err() {
        // A stored error (`cache_errors`) that could not be recorded, usually because the
        // body's own failure aborted the transaction: the body's error is the news.
        tracing::debug!(function, error = %failure, "idem: could not record the error result");
        call.finished(outcome);
        return out;
    }
    Err(fail(function, call.store_failed(failure)))
}

/// Reports a reserved call whose caller rolls its transaction back, reservation and all,
/// without recording anything: the HTTP layer's transactional mode, for a response it does
/// not store. The rollback removes the reservation, so no statement is needed here.
#[cfg(feature = "axum")]
pub(crate) fn abandon<C>(token: TxToken<C>) {
    match token.call {
        Some(call) => call.finished(token.outcome),
        None => {
            metrics::call(&token.site.labels, Outcome::Unprotected);
            outcome::report(Outcome::Unprotected);
        }
    }
}
