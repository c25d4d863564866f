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

use tracing::Instrument;

use super::{Decision, Prepared, ResultCodec, decide, fail};
use crate::__private::Site;
use crate::codec::Codec;
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

/// What `begin` decided: run the body (`Ok`), or the answer without it (`Err`).
type Begin<T, E, C> = Result<TxToken<C>, Result<T, E>>;

/// A reservation held in the caller's transaction, between `begin` and `finish`.
pub struct TxToken<C> {
    site: &'static Site,
    /// `None`: an `optional` fn without a key, running unprotected.
    prepared: Option<Prepared>,
    fence: Fence,
    took_over: bool,
    codec: PhantomData<C>,
}

/// How many times `begin` re-reads a key whose row changed between two statements (a
/// concurrent transaction committed or rolled back in between) before it gives up.
const RACES: usize = 5;

fn store_of<DB: TxDatabase>(p: &Prepared) -> Result<&DB::Store, Error> {
    p.idem
        .inner
        .store
        .as_any()
        .and_then(|any| any.downcast_ref::<DB::Store>())
        .ok_or_else(|| {
            Error::Config(format!(
                "`{}` joins a {} transaction (`tx = ..`), so its runtime's store must be that database's idem store, not `{}`",
                p.site.path,
                std::any::type_name::<DB>(),
                p.idem.inner.store.backend()
            ))
        })
}

/// Reserves the record inside the caller's transaction, or answers without the body.
pub(crate) async fn begin<T, E, C, DB>(
    site: &'static Site,
    prepared: Result<Option<Prepared>, Error>,
    conn: &mut DB::Connection,
) -> Begin<T, E, C>
where
    E: From<Error>,
    C: ResultCodec<T, E>,
    DB: TxDatabase,
{
    let p = match prepared {
        Ok(Some(p)) => p,
        // `optional` and no key: the body runs unprotected, still inside the transaction.
        Ok(None) => {
            return Ok(TxToken {
                site,
                prepared: None,
                fence: Fence::from_raw(0),
                took_over: false,
                codec: PhantomData,
            });
        }
        Err(e) => return Err(Err(fail(site.path, e))),
    };
    let span = super::span(site.path, &p.id);
    reserve::<T, E, C, DB>(p, conn).instrument(span).await
}

async fn reserve<T, E, C, DB>(p: Prepared, conn: &mut DB::Connection) -> Begin<T, E, C>
where
    E: From<Error>,
    C: ResultCodec<T, E>,
    DB: TxDatabase,
{
    let function = p.site.path;
    if let Some(cache) = &p.idem.inner.cache
        && let Some(hit) = cache.get(&p.id)
    {
        return Err(replay::<T, E, C>(
            &p,
            hit.codec,
            &hit.bytes,
            hit.fingerprint.as_ref(),
        ));
    }
    let store = match store_of::<DB>(&p) {
        Ok(s) => s,
        Err(e) => return Err(Err(fail(function, e))),
    };
    for _ in 0..RACES {
        let fence = Fence::random();
        let claim = Claim {
            id: &p.id,
            fence,
            owner: &p.idem.inner.settings.executor_id,
            fingerprint: p.fingerprint.as_ref(),
            // No lease in a transaction: others see the row only once committed, and a
            // committed row still in progress means its call stopped (cancelled, and the
            // transaction committed anyway). Such a row is reclaimable at once.
            lease: std::time::Duration::ZERO,
        };
        let record = match store.reserve_in(conn, &claim).await {
            Ok(Reservation::Acquired) => return run(p, fence, false),
            Ok(Reservation::Vanished) => continue,
            Ok(Reservation::Exists(record)) => record,
            Err(e) => return Err(Err(store_failed(function, &p, e))),
        };
        match decide(&record, p.fingerprint.as_ref()) {
            Decision::Replay => {
                let Some(result) = record.result else {
                    let e = StoreError::msg("a completed record has no result");
                    return Err(Err(unavailable(function, e)));
                };
                // Not cached: a row written earlier in this same transaction could still roll
                // back, and nothing here can tell it from a committed one.
                return Err(replay::<T, E, C>(
                    &p,
                    result.codec,
                    &result.bytes,
                    record.fingerprint.as_ref(),
                ));
            }
            Decision::PayloadMismatch => {
                let e = Error::PayloadMismatch {
                    function,
                    key: p.id.hash(),
                };
                return Err(Err(fail(function, e)));
            }
            Decision::TakeOver => match store.take_over_in(conn, &claim, record.fence).await {
                Ok(true) => return run(p, fence, record.state == RecordState::InProgress),
                Ok(false) => continue,
                Err(e) => return Err(Err(unavailable(function, e))),
            },
            Decision::Wait { retry_after } => {
                // A committed in-progress row: a leased call of the same record is running.
                let e = Error::InProgress {
                    function,
                    key: p.id.hash(),
                    retry_after,
                };
                return Err(Err(fail(function, e)));
            }
        }
    }
    let e = Error::InProgress {
        function,
        key: p.id.hash(),
        retry_after: std::time::Duration::from_millis(100),
    };
    Err(Err(fail(function, e)))
}

fn run<T, E, C>(p: Prepared, fence: Fence, took_over: bool) -> Begin<T, E, C> {
    Ok(TxToken {
        site: p.site,
        prepared: Some(p),
        fence,
        took_over,
        codec: PhantomData,
    })
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
    let Some(p) = token.prepared else {
        metrics::call(&token.site.labels, Outcome::Unprotected);
        outcome::report(Outcome::Unprotected);
        return out;
    };
    let span = super::span(p.site.path, &p.id);
    record::<T, E, C, DB>(p, token.fence, token.took_over, conn, out)
        .instrument(span)
        .await
}

async fn record<T, E, C, DB>(
    p: Prepared,
    fence: Fence,
    took_over: bool,
    conn: &mut DB::Connection,
    out: Result<T, E>,
) -> Result<T, E>
where
    E: From<Error>,
    C: ResultCodec<T, E>,
    DB: TxDatabase,
{
    let function = p.site.path;
    let store = match store_of::<DB>(&p) {
        Ok(s) => s,
        Err(e) => return Err(fail(function, e)),
    };
    let how = if took_over {
        Outcome::TookOver
    } else {
        Outcome::Executed
    };
    let limit = p.idem.inner.settings.max_result_bytes;
    let result = match C::encode(&out) {
        // An error that is not stored: whatever the caller does with its transaction, the
        // key must not stay reserved.
        None => {
            if let Err(e) = store.release_in(conn, &p.id, fence).await {
                tracing::debug!(function, error = %e, "idem: could not remove the reservation; it goes when the transaction rolls back");
            }
            finished(&p, how);
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
    let failure = match store.finalize_in(conn, &p.id, fence, &result, p.ttl).await {
        Ok(true) => {
            metrics::stored_bytes(function, result.bytes.len());
            finished(&p, how);
            return out;
        }
        Ok(false) => StoreError::msg("the reservation changed inside the transaction"),
        Err(e) => e,
    };
    if out.is_err() {
        // A stored error (`cache_errors`) that could not be recorded, usually because the
        // body's own failure aborted the transaction: the body's error is the news.
        tracing::debug!(function, error = %failure, "idem: could not record the error result");
        finished(&p, how);
        return out;
    }
    Err(store_failed(function, &p, failure))
}

fn replay<T, E, C>(
    p: &Prepared,
    codec: Codec,
    bytes: &[u8],
    stored: Option<&crate::key::Fingerprint>,
) -> Result<T, E>
where
    E: From<Error>,
    C: ResultCodec<T, E>,
{
    let function = p.site.path;
    if let (Some(stored), Some(ours)) = (stored, p.fingerprint.as_ref())
        && stored != ours
    {
        let e = Error::PayloadMismatch {
            function,
            key: p.id.hash(),
        };
        return Err(fail(function, e));
    }
    match C::decode(codec, bytes) {
        Ok(out) => {
            finished(p, Outcome::Replayed);
            out
        }
        Err(message) => Err(fail(
            function,
            Error::Decode {
                function,
                key: p.id.hash(),
                version: p.version,
                message,
            },
        )),
    }
}

fn finished(p: &Prepared, how: Outcome) {
    metrics::call(&p.site.labels, how);
    outcome::report(how);
    tracing::Span::current().record("outcome", how.as_str());
}

fn unavailable<E: From<Error>>(function: &'static str, source: StoreError) -> E {
    fail(function, Error::StoreUnavailable { function, source })
}

/// A failed statement: a conflict with a concurrent transaction (a deadlock, a serialization
/// failure, a lock timeout) is the caller's to retry, like a call still in progress; anything
/// else is the store being unavailable.
fn store_failed<E: From<Error>>(function: &'static str, p: &Prepared, source: StoreError) -> E {
    if source.is_transaction_conflict() {
        tracing::debug!(function, error = %source, "idem: the transaction lost a conflict with a concurrent one; retry it");
        let e = Error::InProgress {
            function,
            key: p.id.hash(),
            retry_after: std::time::Duration::from_millis(100),
        };
        return fail(function, e);
    }
    unavailable(function, source)
}
