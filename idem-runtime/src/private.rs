//! What `#[idempotent]` expansions call. Not a public API: it changes with the macro, which
//! is pinned to this crate's exact version so the two cannot drift apart.

use std::any::type_name;
use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{OnceLock, RwLock};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

#[cfg(feature = "_sql")]
pub use crate::engine::tx::{TxDatabase, TxToken};
pub use crate::engine::{ResultCodec, ValuesAndErrors, ValuesOnly};
use crate::key::{Fingerprint, IntoKey, Namespace};
pub use crate::key::{FingerprintArg, Fingerprinter};
use crate::{Error, Idem};

/// The attribute's arguments, fixed at compile time, plus what is worked out on first use.
pub struct Spec {
    name: Option<&'static str>,
    pub(crate) ttl: Option<Duration>,
    pub(crate) lease: Option<Duration>,
    pub(crate) wait: Option<Duration>,
    pub(crate) reject: bool,
    pub(crate) version: u32,
    pub(crate) optional: bool,
    site: OnceLock<Site>,
}

/// A spec's fn path and unscoped namespace, worked out once.
pub(crate) struct Site {
    pub(crate) path: &'static str,
    unscoped: Namespace,
    version: u32,
    /// Unscoped namespaces of generic instantiations and `Self` types, by type names.
    by_types: RwLock<HashMap<Box<[&'static str]>, Namespace>>,
    pub(crate) labels: crate::metrics::CallLabels,
}

impl Site {
    /// The unscoped namespace for one instantiation. `types` are the type names of `Self`
    /// (for methods) and of the fn's type parameters: a trait's default method run for two
    /// implementers, or a generic fn run for two type arguments, are two fns with two sets of
    /// records.
    pub(crate) fn namespace(&self, types: &[&'static str]) -> Namespace {
        if types.is_empty() {
            return self.unscoped.clone();
        }
        let read = self.by_types.read().unwrap_or_else(|p| p.into_inner());
        if let Some(ns) = read.get(types) {
            return ns.clone();
        }
        drop(read);
        let ns = Namespace::new(&self.qualified_path(types), self.version, None);
        // Bounded by the program's monomorphizations of this fn.
        self.by_types
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(types.into())
            .or_insert(ns)
            .clone()
    }

    /// The fn path with the instantiation's type names: `path[Self, T]`.
    pub(crate) fn qualified_path(&self, types: &[&'static str]) -> Cow<'static, str> {
        if types.is_empty() {
            Cow::Borrowed(self.path)
        } else {
            Cow::Owned(format!("{}[{}]", self.path, types.join(", ")))
        }
    }
}

impl Default for Spec {
    fn default() -> Self {
        Self::new()
    }
}

impl Spec {
    /// A spec with every argument at its default.
    pub const fn new() -> Spec {
        Spec {
            name: None,
            ttl: None,
            lease: None,
            wait: None,
            reject: false,
            version: 0,
            optional: false,
            site: OnceLock::new(),
        }
    }

    /// `name = ".."`: the record path, instead of the fn's Rust path.
    pub const fn name(mut self, name: &'static str) -> Spec {
        self.name = Some(name);
        self
    }

    /// `ttl = ".."`, in milliseconds (checked by the macro).
    pub const fn ttl_ms(mut self, ms: u64) -> Spec {
        self.ttl = Some(Duration::from_millis(ms));
        self
    }

    /// `lease = ".."`, in milliseconds.
    pub const fn lease_ms(mut self, ms: u64) -> Spec {
        self.lease = Some(Duration::from_millis(ms));
        self
    }

    /// `wait = ".."`, in milliseconds.
    pub const fn wait_ms(mut self, ms: u64) -> Spec {
        self.wait = Some(Duration::from_millis(ms));
        self
    }

    /// `on_conflict = "reject"`.
    pub const fn reject(mut self) -> Spec {
        self.reject = true;
        self
    }

    /// `version = N`.
    pub const fn version(mut self, version: u32) -> Spec {
        self.version = version;
        self
    }

    /// `optional`.
    pub const fn optional(mut self) -> Spec {
        self.optional = true;
        self
    }

    /// The record path: `name = ..`, or the fn's path as Rust prints it, taken from the type
    /// name of a marker fn declared inside the annotated fn (`M`).
    pub(crate) fn site<M>(&'static self) -> &'static Site {
        self.site.get_or_init(|| {
            let path: &'static str = match self.name {
                Some(name) => name,
                None => Box::leak(fn_path(type_name::<M>()).into_boxed_str()),
            };
            Site {
                path,
                unscoped: Namespace::new(path, self.version, None),
                version: self.version,
                by_types: RwLock::default(),
                labels: crate::metrics::CallLabels::new(path),
            }
        })
    }
}

/// `crate::module::Type::method::{{closure}}::__idem_here` -> `crate::module::Type::method`.
fn fn_path(marker: &str) -> String {
    let path = marker.strip_suffix("::__idem_here").unwrap_or(marker);
    path.replace("::{{closure}}", "")
}

/// What one call passes: its key, scope, payload fingerprint and runtime.
pub struct Call {
    /// The key expression's value; `None` when it evaluated to `None`.
    pub key: Option<String>,
    /// The scope expression's value.
    pub scope: Scope,
    /// The payload fingerprint.
    pub payload: Payload,
    /// `runtime = ..`, or `None` for the installed runtime.
    pub runtime: Option<Idem>,
}

/// A call's scope.
pub enum Scope {
    /// The attribute has no `scope = ..`.
    Unscoped,
    /// The scope expression evaluated to `None`.
    Missing,
    /// The scope.
    Value(String),
}

/// A call's payload fingerprint.
pub enum Payload {
    /// `skip_all` and no `fingerprint = ..`: no payload check.
    Unchecked,
    /// The fingerprint of the arguments or of `fingerprint = ..`.
    Checked(Fingerprint),
    /// A `Serialize` impl failed.
    Failed(String),
}

impl Payload {
    /// The payload of a `fingerprint = ..` expression.
    pub fn of<T: FingerprintArg + ?Sized>(value: &T) -> Payload {
        let mut fp = Fingerprinter::new();
        fp.arg(value);
        Payload::from(fp.finish())
    }
}

impl From<Result<Fingerprint, String>> for Payload {
    fn from(r: Result<Fingerprint, String>) -> Payload {
        match r {
            Ok(fp) => Payload::Checked(fp),
            Err(e) => Payload::Failed(e),
        }
    }
}

/// Evaluates `key = ..`.
pub fn key<K: IntoKey + ?Sized>(key: &K) -> Option<String> {
    key.to_key().map(Cow::into_owned)
}

/// Evaluates `scope = ..`.
pub fn scope<K: IntoKey + ?Sized>(scope: &K) -> Scope {
    match scope.to_key() {
        Some(s) => Scope::Value(s.into_owned()),
        None => Scope::Missing,
    }
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

/// The expansion of `#[idempotent]`: reserve, run `body`, record its `Ok` value.
///
/// `M` is the type of a marker fn declared inside the annotated fn; its type name gives the
/// fn's path. `types` are the type names of `Self` and the fn's type parameters.
pub async fn run<M, R, F>(
    spec: &'static Spec,
    _marker: M,
    types: &[&'static str],
    call: Call,
    body: F,
) -> R
where
    R: IdempotentOutput,
    F: Future<Output = R>,
{
    let site = spec.site::<M>();
    let body = async move { body.await.into_result() };
    R::from_result(
        crate::engine::run::<_, _, _, crate::engine::ValuesOnly>(spec, site, types, call, body)
            .await,
    )
}

/// The expansion of `#[idempotent(cache_errors = true)]`: like [`run`], but an `Err` is
/// stored and replayed too.
pub async fn run_caching_errors<M, R, F>(
    spec: &'static Spec,
    _marker: M,
    types: &[&'static str],
    call: Call,
    body: F,
) -> R
where
    R: CachedErrorOutput,
    F: Future<Output = R>,
{
    let site = spec.site::<M>();
    let body = async move { body.await.into_result() };
    R::from_result(
        crate::engine::run::<_, _, _, crate::engine::ValuesAndErrors>(
            spec, site, types, call, body,
        )
        .await,
    )
}

/// What `tx_begin` decided.
#[cfg(feature = "_sql")]
pub enum TxBegin<R, C> {
    /// Answered without running the body (a replay, or an error).
    Done(R),
    /// The reservation is in the caller's transaction: run the body, then `tx_finish`.
    Run(TxToken<C>),
}

/// The expansion of `#[idempotent(tx = ..)]`, before the body: reserve in the caller's
/// transaction, or answer without the body.
#[cfg(feature = "_sql")]
pub async fn tx_begin<M, R, C, DB>(
    spec: &'static Spec,
    _marker: M,
    types: &[&'static str],
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
    let prepared = crate::engine::prepare(spec, site, types, call);
    match crate::engine::tx::begin::<R::Value, R::Error, C, DB>(site, prepared, &mut **tx).await {
        Ok(token) => TxBegin::Run(token),
        Err(done) => TxBegin::Done(R::from_result(done)),
    }
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
    R::from_result(
        crate::engine::tx::finish::<R::Value, R::Error, C, DB>(token, &mut **tx, out.into_result())
            .await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_drop_the_marker_and_closures() {
        assert_eq!(
            fn_path("shop::orders::create::__idem_here"),
            "shop::orders::create"
        );
        assert_eq!(
            fn_path("<shop::Email as shop::Handler>::handle::{{closure}}::__idem_here"),
            "<shop::Email as shop::Handler>::handle"
        );
    }
}
