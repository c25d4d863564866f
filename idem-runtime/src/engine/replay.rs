//! Answering from a stored result (replay), and reporting how a call ended: metrics, the
//! span's outcome, and [`observe`](crate::observe). Shared by the leased and transactional
//! paths.

use tracing::{Instrument, Span};

use super::call::ResolvedCall;
use super::spec::Site;
use crate::codec::Codec;
use crate::codec::ResultCodec;
use crate::key::Fingerprint;
use crate::outcome::{self, Outcome};
use crate::{Error, metrics};

impl ResolvedCall {
    /// The stored result as the fn's output, after the payload check.
    pub(crate) fn replay<T, E, C>(
        &self,
        codec: Codec,
        bytes: &[u8],
        stored: Option<&Fingerprint>,
        outcome: Outcome,
    ) -> Result<T, E>
    where
        E: From<Error>,
        C: ResultCodec<T, E>,
    {
        if let (Some(stored), Some(ours)) = (stored, self.fingerprint.as_ref())
            && stored != ours
        {
            return Err(fail(
                self.function(),
                Error::PayloadMismatch {
                    function: self.function(),
                    key: self.id.hash(),
                },
            ));
        }
        match C::decode(codec, bytes) {
            Ok(out) => {
                self.finished(outcome);
                out
            }
            Err(message) => Err(fail(
                self.function(),
                Error::Decode {
                    function: self.function(),
                    key: self.id.hash(),
                    version: self.version,
                    message,
                },
            )),
        }
    }

    /// Reports how the call ended: its metric, its span, and `observe`.
    pub(crate) fn finished(&self, outcome: Outcome) {
        metrics::call(&self.site.labels, outcome);
        outcome::report(outcome);
        Span::current().record("outcome", outcome.as_str());
    }
}

/// Runs a body without protection: an `optional` fn called without a key (`why` is
/// `"no key"`), or a runtime that is switched off (`"disabled"`).
pub(crate) async fn unprotected<T, E>(
    site: &'static Site,
    body: impl Future<Output = Result<T, E>>,
    why: &'static str,
) -> Result<T, E> {
    let span = unprotected_span(site, why);
    tracing::debug!(parent: &span, function = site.path, why, "idem: running the body unprotected");
    metrics::call(&site.labels, Outcome::Unprotected);
    outcome::report(Outcome::Unprotected);
    body.instrument(span).await
}

/// The span of a call that runs unprotected, its outcome already known.
pub(crate) fn unprotected_span(site: &'static Site, why: &'static str) -> Span {
    tracing::info_span!(
        "idempotent",
        function = site.path,
        outcome = Outcome::Unprotected.as_str(),
        unprotected = why,
    )
}

/// An idem error for the caller, counted and recorded on the span.
pub(crate) fn fail<E: From<Error>>(function: &'static str, err: Error) -> E {
    metrics::error(function, err.kind());
    let span = Span::current();
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
