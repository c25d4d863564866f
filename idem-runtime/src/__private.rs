//! What `#[idempotent]` expansions call. Not a public API: it changes with the macro, which
//! is pinned to this crate's exact version so the two cannot drift apart.
//!
//! It owns no logic: it resolves which runtime a call uses and enters the engine, whose types
//! it re-exports.

use std::borrow::Cow;
use std::future::Future;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::IdempotentError;
pub use crate::codec::{ResultCodec, ValuesAndErrors, ValuesAndFinalErrors, ValuesOnly};
#[cfg(feature = "_sql")]
pub use crate::engine::tx::{TxBegin, TxDatabase, TxToken};
pub use crate::engine::{Call, Payload, Scope, Spec};
use crate::key::IntoKey;
pub use crate::key::{FingerprintArg, Fingerprinter};
use crate::{Error, Idem};

/// Evaluates `key = ..`.
pub fn key<K: IntoKey + ?Sized>(key: &K) -> Option<String> {
    key.to_key().map(Cow::into_owned)
}

/// Evaluates `scope = ..`.
pub fn scope<K: IntoKey + ?Sized>(scope: &K) -> Scope {
    Scope::of(scope)
}

/// Evaluates `runtime = ..`.
pub fn runtime(idem: &Idem) -> Idem {
    idem.clone()
}

/// The return types `#[idempotent]` accepts.
#[diagnostic::on_unimplemented(
    message = "`#[idempotent]` fns must return `Result<T, E>` where `T: Serialize + DeserializeOwned` and `E: From<idem_runtime::Error>`",
    label = "`{Self}` is not such a `Result`",
    note = "the `Ok` value is stored and replayed, so it must round-trip through serde; idem's own errors are returned through `E`"
)]
pub trait IdempotentOutput: Sized {
    /// `T`.
    type Value: Serialize + DeserializeOwned;
    /// `E`.
    type Error: From<Error>;
    /// As a plain `Result`.
    fn into_result(self) -> Result<Self::Value, Self::Error>;
    /// From a plain `Result`.
    fn from_result(r: Result<Self::Value, Self::Error>) -> Self;
}

impl<T, E> IdempotentOutput for Result<T, E>
where
    T: Serialize + DeserializeOwned,
    E: From<Error>,
{
    type Value = T;
    type Error = E;

    fn into_result(self) -> Self {
        self
    }

    fn from_result(r: Self) -> Self {
        r
    }
}

/// The return types `#[idempotent(cache_errors = true)]` accepts.
#[diagnostic::on_unimplemented(
    message = "`#[idempotent(cache_errors = true)]` stores errors too, so `E` must be `Serialize + DeserializeOwned`",
    label = "the error type of `{Self}` cannot be stored",
    note = "derive `serde::Serialize` and `serde::Deserialize` for the error type, or drop `cache_errors`"
)]
pub trait CachedErrorOutput: IdempotentOutput<Error: Serialize + DeserializeOwned> {}

impl<R> CachedErrorOutput for R
where
    R: IdempotentOutput,
    R::Error: Serialize + DeserializeOwned,
{
}

/// The return types `#[idempotent(cache_errors = "final")]` accepts.
#[diagnostic::on_unimplemented(
    message = "`#[idempotent(cache_errors = \"final\")]` stores final errors, so `E` must be `Serialize + DeserializeOwned` and `idem_runtime::IdempotentError`",
    label = "the error type of `{Self}` cannot be stored, or does not say which errors are final",
    note = "derive `serde::Serialize` and `serde::Deserialize` for the error type and implement `idem_runtime::IdempotentError` (`fn is_final(&self) -> bool`)"
)]
pub trait FinalErrorOutput:
    IdempotentOutput<Error: Serialize + DeserializeOwned + IdempotentError>
{
}

impl<R> FinalErrorOutput for R
where
    R: IdempotentOutput,
    R::Error: Serialize + DeserializeOwned + IdempotentError,
{
}

/// The runtime a call uses: `runtime = ..`, or the installed one.
fn resolve(runtime: Option<Idem>, function: &'static str) -> Result<Idem, Error> {
    runtime
        .or_else(|| Idem::installed().cloned())
        .ok_or(Error::NotInstalled { function })
}

/// The expansion of `#[idempotent]`: reserve, run `body`, record its `Ok` value.
///
/// `M` is the type of a marker fn declared inside the annotated fn; its type name gives the
/// fn's path. `types` are the type names of `Self` and the fn's type parameters.
pub async fn run<M, R, F>(
    spec: &'static Spec,
    _marker: M,
    types: &[&'static str],
    runtime: Option<Idem>,
    call: Call,
    body: F,
) -> R
where
    R: IdempotentOutput,
    F: Future<Output = R>,
{
    run_with::<M, R, F, ValuesOnly>(spec, types, runtime, call, body).await
}

/// The expansion of `#[idempotent(cache_errors = true)]`: like [`run`], but an `Err` is
/// stored and replayed too.
pub async fn run_caching_errors<M, R, F>(
    spec: &'static Spec,
    _marker: M,
    types: &[&'static str],
    runtime: Option<Idem>,
    call: Call,
    body: F,
) -> R
where
    R: CachedErrorOutput,
    F: Future<Output = R>,
{
    run_with::<M, R, F, ValuesAndErrors>(spec, types, runtime, call, body).await
}

/// The expansion of `#[idempotent(cache_errors = "final")]`: like [`run`], but an `Err` the
/// error type calls final is stored and replayed too.
pub async fn run_caching_final_errors<M, R, F>(
    spec: &'static Spec,
    _marker: M,
    types: &[&'static str],
    runtime: Option<Idem>,
    call: Call,
    body: F,
) -> R
where
    R: FinalErrorOutput,
    F: Future<Output = R>,
{
    run_with::<M, R, F, ValuesAndFinalErrors>(spec, types, runtime, call, body).await
}

async fn run_with<M, R, F, C>(
    spec: &'static Spec,
    types: &[&'static str],
    runtime: Option<Idem>,
    call: Call,
    body: F,
) -> R
where
    R: IdempotentOutput,
    F: Future<Output = R>,
    C: ResultCodec<R::Value, R::Error>,
{
    let site = spec.site::<M>();
    let idem = match resolve(runtime, site.path) {
        Ok(idem) => idem,
        Err(e) => return R::from_result(Err(crate::engine::fail(site.path, e))),
    };
    let body = async move { body.await.into_result() };
    let out = idem
        .engine()
        .run::<_, _, _, C>(spec, site, types, call, body);
    R::from_result(out.await)
}

/// The expansion of `#[idempotent(tx = ..)]`, before the body: reserve in the caller's
/// transaction, or answer without the body.
#[cfg(feature = "_sql")]
#[allow(clippy::too_many_arguments)] // one call site: the expansion
pub async fn tx_begin<M, R, C, DB>(
    spec: &'static Spec,
    _marker: M,
    types: &[&'static str],
    runtime: Option<Idem>,
    call: Call,
    tx: &mut sqlx::Transaction<'_, DB>,
    _codec: C,
) -> TxBegin<R, C>
where
    R: IdempotentOutput,
    C: ResultCodec<R::Value, R::Error>,
    DB: TxDatabase,
{
    let site = spec.site::<M>();
    let idem = match resolve(runtime, site.path) {
        Ok(idem) => idem,
        Err(e) => return TxBegin::Done(R::from_result(Err(crate::engine::fail(site.path, e)))),
    };
    let engine = idem.engine();
    engine
        .tx_begin::<R::Value, R::Error, C, DB>(spec, site, types, call, &mut **tx)
        .await
        .map(R::from_result)
}

/// The expansion of `#[idempotent(tx = ..)]`, after the body: record its result (or drop the
/// reservation) in the caller's transaction.
#[cfg(feature = "_sql")]
pub async fn tx_finish<R, C, DB>(token: TxToken<C>, tx: &mut sqlx::Transaction<'_, DB>, out: R) -> R
where
    R: IdempotentOutput,
    C: ResultCodec<R::Value, R::Error>,
    DB: TxDatabase,
{
    let out =
        crate::engine::tx::finish::<R::Value, R::Error, C, DB>(token, &mut **tx, out.into_result());
    R::from_result(out.await)
}
