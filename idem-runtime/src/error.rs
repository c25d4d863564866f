//! The one error type a caller of an `#[idempotent]` fn can get from idem itself.
//!
//! Every variant says what happened and what to do about it, names the fn, and identifies the
//! key only by a short hash ([`KeyHash`]): keys and payloads often carry customer data and must
//! not end up in logs through an error message.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::key::KeyHash;

/// What went wrong in an idempotent call, as opposed to in its body.
///
/// An `#[idempotent]` fn returns `Result<T, E>` with `E: From<Error>`, so these arrive in the
/// caller's own error type. [`Error::http_status`] maps each to the status an HTTP API should
/// answer with.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another call with the same key is still running (here or on another replica) and did not
    /// finish within the wait budget, or the fn was declared `on_conflict = "reject"`.
    ///
    /// Retry after `retry_after`; the first call's result will be replayed then. HTTP 409.
    #[error(
        "`{function}`: a call with key {key} is still in progress; retry after {retry_after:?} to get its result"
    )]
    InProgress {
        /// The fn's record path.
        function: &'static str,
        /// A short hash of the key.
        key: KeyHash,
        /// How long until a retry is likely to find the first call finished.
        retry_after: Duration,
    },

    /// The key was first used with a different payload (the fingerprint of the arguments
    /// differs). The stored result belongs to another request, so it is not replayed.
    ///
    /// A client reused a key for a new request: it should send a fresh key. HTTP 422.
    #[error(
        "`{function}`: key {key} was already used with a different payload; a new request needs a new key"
    )]
    PayloadMismatch {
        /// The fn's record path.
        function: &'static str,
        /// A short hash of the key.
        key: KeyHash,
    },

    /// The key (or scope) expression evaluated to `None` and the fn is not `optional`.
    ///
    /// The request carries no idempotency key: reject it (HTTP 400), or declare the attribute
    /// `optional` to run such calls unprotected.
    #[error(
        "`{function}`: the idempotency {part} is missing (it evaluated to `None`); send one, or mark the fn `optional`"
    )]
    MissingKey {
        /// The fn's record path.
        function: &'static str,
        /// `"key"` or `"scope"`.
        part: &'static str,
    },

    /// The key, scope or payload cannot be used: an empty key or scope, or arguments whose
    /// `Serialize` impl failed while fingerprinting. HTTP 400.
    #[error("`{function}`: invalid idempotency input: {reason}")]
    InvalidKey {
        /// The fn's record path.
        function: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// The store could not be reached or refused a statement. The body did not run (idem fails
    /// closed: it never runs a body without a reservation). Retry later. HTTP 503. Also what
    /// opening a store that cannot be reached returns (`function` `"idem"`), with what to check.
    #[error("{}", unavailable(.function, .source))]
    StoreUnavailable {
        /// The fn's record path (`"idem"` when the store could not be opened, before any call:
        /// then the message says what to check instead of "retry later").
        function: &'static str,
        /// What the store said.
        source: StoreError,
    },

    /// A stored result no longer decodes as the fn's return type, usually because the type
    /// changed. Bump the attribute's `version = N` when a return type changes incompatibly, so
    /// old records live in their own namespace. HTTP 500.
    #[error(
        "`{function}` (version {version}): the stored result for key {key} no longer decodes ({message}); bump `version` when the return type changes"
    )]
    Decode {
        /// The fn's record path.
        function: &'static str,
        /// A short hash of the key.
        key: KeyHash,
        /// The attribute's `version`.
        version: u32,
        /// The decoder's message.
        message: String,
    },

    /// A transactional call's result is larger than `max_result_bytes`, so it cannot be
    /// recorded. The caller must roll back its transaction (the effect goes with it) rather
    /// than commit an effect whose record is missing. Raise the limit. HTTP 500.
    ///
    /// (A leased call returns such a result and releases the key instead; see the README.)
    #[error(
        "`{function}`: the result is {bytes} bytes, over max_result_bytes ({limit}); it cannot be recorded, so roll the transaction back (or raise the limit)"
    )]
    ResultTooLarge {
        /// The fn's record path.
        function: &'static str,
        /// The encoded result's size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },

    /// A transactional call's result could not be encoded for storage (its `Serialize` impl
    /// failed). The caller must roll back its transaction. HTTP 500.
    #[error("`{function}`: the result could not be encoded ({message}); roll the transaction back")]
    Encode {
        /// The fn's record path.
        function: &'static str,
        /// The encoder's message.
        message: String,
    },

    /// This call's reservation was taken over by another caller while the body ran (its lease
    /// expired without a heartbeat getting through). The body's effects happened, but the
    /// record now belongs to the newer owner, whose result is the one that will be replayed:
    /// this call's value is never returned as `Ok`, so two callers of one key are never told
    /// two different results. Retry with the same key to get the recorded one. HTTP 409.
    #[error(
        "`{function}`: lost the reservation for key {key} while running (its lease ran out and another caller took over); its result is not the recorded one, so retry with the same key to get that"
    )]
    LeaseLost {
        /// The fn's record path.
        function: &'static str,
        /// A short hash of the key.
        key: KeyHash,
    },

    /// The body ran, but recording its result did not finish within the store timeout (the
    /// store is slow or unreachable). Recording goes on in the background. The value is not
    /// returned, because until it is recorded another caller could still take the key over
    /// and be given a different one.
    ///
    /// Retry after `retry_after` with the same key: the recorded result is replayed, or, if
    /// this call's reservation ran out before its result could be recorded, the body runs
    /// again (the leased guarantee is at least once). HTTP 503.
    #[error(
        "`{function}`: the body ran but its result for key {key} is not recorded yet (the store is slow or away); retry after {retry_after:?} with the same key to get the recorded result"
    )]
    ResultNotRecorded {
        /// The fn's record path.
        function: &'static str,
        /// A short hash of the key.
        key: KeyHash,
        /// When a retry is worth trying.
        retry_after: Duration,
    },

    /// The HTTP layer's transactional mode: the route ran in the layer's transaction and its
    /// response was recorded there, but the commit failed. What the route wrote and the
    /// record are not kept, unless the commit went through and only its answer was lost; the
    /// route's response is not sent, since it may describe writes that never happened.
    ///
    /// Retry with the same key: the committed response is replayed, or the route runs again.
    /// HTTP 503.
    #[error(
        "`{function}`: the transaction did not commit ({source}); nothing the route wrote is kept unless only the commit's answer was lost, so retry with the same key to get the committed response or run it again"
    )]
    NotCommitted {
        /// The record path of the layer.
        function: &'static str,
        /// What the database said.
        source: StoreError,
    },

    /// An `#[idempotent]` fn ran before any [`Idem`](crate::Idem) was installed, and the
    /// attribute names no `runtime = ..`. Call `Idem::builder()...install()` at startup.
    #[error(
        "`{function}`: no idem runtime is installed; call `Idem::builder().store(..).install()` at startup or pass `runtime = ..`"
    )]
    NotInstalled {
        /// The fn's record path.
        function: &'static str,
    },

    /// The configuration is wrong: a bad duration string, no store, a second `install()`.
    #[error("idem configuration: {0}")]
    Config(String),
}

impl Error {
    /// The HTTP status an API should answer with for this error.
    ///
    /// ```
    /// # use idem_runtime::Error;
    /// assert_eq!(Error::Config("x".into()).http_status(), 500);
    /// ```
    pub fn http_status(&self) -> u16 {
        match self {
            Error::InProgress { .. } | Error::LeaseLost { .. } => 409,
            Error::PayloadMismatch { .. } => 422,
            Error::MissingKey { .. } | Error::InvalidKey { .. } => 400,
            Error::StoreUnavailable { .. }
            | Error::ResultNotRecorded { .. }
            | Error::NotCommitted { .. } => 503,
            Error::Decode { .. }
            | Error::ResultTooLarge { .. }
            | Error::Encode { .. }
            | Error::NotInstalled { .. }
            | Error::Config(_) => 500,
        }
    }

    /// For [`Error::InProgress`], how long the caller should wait before retrying.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::InProgress { retry_after, .. }
            | Error::ResultNotRecorded { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// A short, stable name of the variant, for metrics labels and problem types.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InProgress { .. } => "in_progress",
            Error::PayloadMismatch { .. } => "payload_mismatch",
            Error::MissingKey { .. } => "missing_key",
            Error::InvalidKey { .. } => "invalid_key",
            Error::StoreUnavailable { .. } => "store_unavailable",
            Error::Decode { .. } => "decode",
            Error::ResultTooLarge { .. } => "result_too_large",
            Error::Encode { .. } => "encode",
            Error::LeaseLost { .. } => "lease_lost",
            Error::ResultNotRecorded { .. } => "result_not_recorded",
            Error::NotCommitted { .. } => "not_committed",
            Error::NotInstalled { .. } => "not_installed",
            Error::Config(_) => "config",
        }
    }
}

/// A failure reported by a [`Store`](crate::store::Store): the database is down, a statement
/// failed, or a row could not be read.
///
/// Cheap to clone: the underlying error is shared, so one failure can be handed to every
/// caller waiting on the same key.
#[derive(Clone)]
pub struct StoreError {
    inner: Arc<dyn std::error::Error + Send + Sync>,
    conflict: bool,
    timed_out: bool,
    /// Set when the store could not be opened (before any call): what to check.
    opening: Option<&'static str>,
}

impl StoreError {
    /// Wraps any error a store backend produced.
    pub fn new(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError {
            inner: Arc::new(err),
            conflict: false,
            timed_out: false,
            opening: None,
        }
    }

    /// Whether the database refused the statement because of a conflict with a concurrent
    /// transaction (a deadlock, a serialization failure, a lock wait timeout): the caller's
    /// transaction is gone, and retrying it is the remedy. The SQL dialects say which error
    /// codes mean that.
    pub fn is_transaction_conflict(&self) -> bool {
        self.conflict
    }

    /// Marks (or unmarks) the error as a lost conflict with a concurrent transaction.
    #[cfg(feature = "_sql")]
    pub(crate) fn conflicting(mut self, conflict: bool) -> Self {
        self.conflict = conflict;
        self
    }

    /// A statement that got no answer in time: it may or may not have been applied.
    pub(crate) fn timed_out(message: String) -> Self {
        StoreError {
            timed_out: true,
            ..StoreError::msg(message)
        }
    }

    /// Whether the statement got no answer in time, so it may have been applied after all.
    pub(crate) fn is_timeout(&self) -> bool {
        self.timed_out
    }

    /// Marks a failed write that may have been applied all the same (its reply was lost, or
    /// it was applied but not replicated in time): the engine treats it as a timeout.
    pub(crate) fn maybe_applied(mut self) -> Self {
        self.timed_out = true;
        self
    }

    /// The underlying error, if it is a `T`.
    #[cfg(feature = "_sql")]
    pub(crate) fn downcast_ref<T: std::error::Error + 'static>(&self) -> Option<&T> {
        self.inner.downcast_ref::<T>()
    }

    /// A store error described by a message alone.
    pub fn msg(message: impl Into<String>) -> Self {
        #[derive(Debug)]
        struct Message(String);
        impl fmt::Display for Message {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::error::Error for Message {}
        StoreError::new(Message(message.into()))
    }
}

impl fmt::Debug for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.inner, f)
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner, f)
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner.source()
    }
}

/// What to check when a server store (PostgreSQL, MySQL, Redis) cannot be opened.
#[cfg(any(feature = "_sql", feature = "redis"))]
pub(crate) const CHECK_SERVER: &str = "check its URL, credentials and that the server is up";

/// The store could not be opened (connect, create its table), before any call: its message
/// says what to check rather than "retry later".
#[cfg(any(feature = "_sql", feature = "redis"))]
pub(crate) fn not_opened(mut source: StoreError, check: &'static str) -> Error {
    source.opening = Some(check);
    Error::StoreUnavailable {
        function: "idem",
        source,
    }
}

fn unavailable(function: &str, source: &StoreError) -> String {
    if let Some(check) = source.opening {
        format!("`{function}`: the idempotency store could not be opened ({source}); {check}")
    } else {
        format!(
            "`{function}`: the idempotency store is unavailable ({source}); the call did not run, retry later"
        )
    }
}
