//! Preparing a call: its key, scope and payload checked and resolved into one record and the
//! settings it runs with.

use std::sync::Arc;
use std::time::Duration;

use super::Engine;
use super::spec::{OnConflict, Site, Spec};
use crate::Error;
use crate::key::{Fingerprint, FingerprintArg, Fingerprinter, IntoKey, RecordId};

/// What one call passes: its key, scope and payload fingerprint.
pub struct Call {
    /// The key expression's value; `None` when it evaluated to `None`.
    pub key: Option<String>,
    /// The scope expression's value.
    pub scope: Scope,
    /// The payload fingerprint.
    pub payload: Payload,
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

impl Scope {
    /// The value of a `scope = ..` expression.
    pub fn of<K: IntoKey + ?Sized>(scope: &K) -> Scope {
        match scope.to_key() {
            Some(s) => Scope::Value(s.into_owned()),
            None => Scope::Missing,
        }
    }
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

/// A call resolved: the engine it runs on, its record, and the settings it runs with.
pub(crate) struct ResolvedCall {
    pub(crate) engine: Arc<Engine>,
    pub(crate) site: &'static Site,
    pub(crate) id: RecordId,
    pub(crate) fingerprint: Option<Fingerprint>,
    pub(crate) version: u32,
    pub(crate) ttl: Duration,
    pub(crate) lease: Duration,
    pub(crate) wait: Duration,
    pub(crate) on_conflict: OnConflict,
}

impl Call {
    /// Checks the key, scope and payload and resolves the record. `Ok(None)`: the fn is
    /// `optional` and there is no key (or scope), so the body runs unprotected.
    pub(crate) fn resolve(
        self,
        engine: &Arc<Engine>,
        spec: &'static Spec,
        site: &'static Site,
        types: &[&'static str],
    ) -> Result<Option<ResolvedCall>, Error> {
        let function = site.path;
        let missing = |part: &'static str| {
            if spec.optional {
                Ok(None)
            } else {
                Err(Error::MissingKey { function, part })
            }
        };
        let invalid = |reason: &str| Error::InvalidKey {
            function,
            reason: reason.to_owned(),
        };
        let Some(key) = self.key else {
            return missing("key");
        };
        let namespace = match self.scope {
            Scope::Unscoped => site.namespace(types, None),
            Scope::Value(scope) if scope.is_empty() => return Err(invalid("the scope is empty")),
            Scope::Value(scope) => site.namespace(types, Some(&scope)),
            Scope::Missing => return missing("scope"),
        };
        if key.is_empty() {
            return Err(invalid("the key is empty"));
        }
        let fingerprint = match self.payload {
            Payload::Unchecked => None,
            Payload::Checked(fp) => Some(fp),
            Payload::Failed(e) => {
                let reason = format!("the payload could not be fingerprinted: {e}");
                return Err(invalid(&reason));
            }
        };
        let settings = &engine.settings;
        Ok(Some(ResolvedCall {
            engine: engine.clone(),
            site,
            id: namespace.record(key),
            fingerprint,
            version: spec.version,
            ttl: spec.ttl.unwrap_or(settings.default_ttl),
            lease: spec.lease.unwrap_or(settings.default_lease),
            wait: spec.wait.unwrap_or(settings.default_wait),
            on_conflict: spec.on_conflict,
        }))
    }
}

impl ResolvedCall {
    /// The fn's record path, for messages and metrics.
    pub(crate) fn function(&self) -> &'static str {
        self.site.path
    }

    /// The span of this call. Its `outcome` is recorded when the call ends.
    pub(crate) fn span(&self) -> tracing::Span {
        tracing::info_span!(
            "idempotent",
            function = self.site.path,
            key = %self.id.lazy_hash(),
            outcome = tracing::field::Empty,
            error = tracing::field::Empty,
        )
    }

    /// The error for a store that failed.
    pub(crate) fn unavailable(&self, source: crate::error::StoreError) -> Error {
        Error::StoreUnavailable {
            function: self.function(),
            source,
        }
    }

    /// The error for a duplicate of a call still in progress.
    pub(crate) fn in_progress(&self, retry_after: Duration) -> Error {
        Error::InProgress {
            function: self.function(),
            key: self.id.hash(),
            retry_after,
        }
    }
}
