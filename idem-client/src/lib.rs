//! The client half of safe retries, for [`reqwest`].
//!
//! A server behind idem's `IdempotencyLayer` runs a request once per `Idempotency-Key` and
//! replays its response to every retry. That only helps if the client retries with the *same*
//! key, backs off so a struggling server can recover, and waits as long as the server asks.
//! [`RetryingClient::send`] does that for one logical request:
//!
//! - one key for the logical request: the request's own `Idempotency-Key` header, or a fresh
//!   random UUID (v4) when it has none, sent unchanged on every attempt;
//! - retried: connection errors, timeouts, a connection that broke before the whole response
//!   arrived (the request may have run: the key makes that safe), and the answers `409
//!   Conflict` (the same key still in progress), `429 Too Many Requests` and `503 Service
//!   Unavailable`;
//! - never retried: any other status, `422` (the key was reused with another payload) and the
//!   rest of 4xx above all: sending them again cannot change the answer;
//! - exponential backoff with full jitter (a random wait between zero and the exponential
//!   bound, so many clients that failed together do not come back together), except that a
//!   `Retry-After` header (seconds or an HTTP-date) is the wait when the server sends one;
//! - bounded by a number of attempts and a total time: a wait that would end past the total
//!   time is not started, and the last answer is returned.
//!
//! ```no_run
//! # async fn demo() -> Result<(), idem_client::Error> {
//! use idem_client::RetryingClient;
//!
//! let client = RetryingClient::new(reqwest::Client::new());
//! let reply = client
//!     .send(client.http().post("http://localhost:3000/orders").body(r#"{"sku":"A1"}"#))
//!     .await?;
//! println!(
//!     "{} after {} attempt(s), key {}, replayed: {}",
//!     reply.status(),
//!     reply.attempts(),
//!     reply.key(),
//!     reply.replayed()
//! );
//! # Ok(()) }
//! ```

mod retry_after;

use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{HeaderName, HeaderValue};
use reqwest::{Response, StatusCode};
use retry_policies::policies::{ExponentialBackoff, ExponentialBackoffTimed};
use retry_policies::{Jitter, RetryDecision, RetryPolicy};

/// The header the key travels in (as idem's layer reads it by default).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The header a replayed response carries (as idem's layer writes it).
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// The defaults of [`RetryingClient::new`].
pub mod defaults {
    use std::time::Duration;

    /// Attempts per logical request, the first included.
    pub const MAX_ATTEMPTS: u32 = 5;
    /// The most time one logical request may take, waits included.
    pub const MAX_ELAPSED: Duration = Duration::from_secs(30);
    /// The bound of the first backoff (before jitter).
    pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
    /// The largest backoff bound (before jitter).
    pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
}

/// What went wrong, when there is no response to return.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request could not be built (a bad URL, a header that is not one).
    #[error("the request could not be built: {0}")]
    Build(#[source] reqwest::Error),
    /// The body is a stream, which cannot be sent twice; give the request a body in memory.
    #[error(
        "the request's body is a stream and cannot be sent again on a retry; give it a body in memory"
    )]
    BodyNotReplayable,
    /// The request's own `Idempotency-Key` header is not text.
    #[error("the request's `Idempotency-Key` header is not visible ASCII")]
    InvalidKey,
    /// The settings given to the builder do not make sense.
    #[error("invalid retry settings: {0}")]
    Config(String),
    /// No response came back: the last attempt failed on the connection (or timed out),
    /// and the attempts or the time ran out. The request may have run on the server: send it
    /// again with the same [`key`](Error::Transport::key) later and it is answered once.
    #[error("no response after {attempts} attempt(s) (key {key}): {source}")]
    Transport {
        /// The key every attempt carried.
        key: String,
        /// How many attempts were made.
        attempts: u32,
        /// The last attempt's error.
        #[source]
        source: reqwest::Error,
    },
    /// An error reqwest returns that no retry can fix (a redirect loop, for example).
    #[error("the request failed (key {key}): {source}")]
    Request {
        /// The key the request carried.
        key: String,
        /// reqwest's error.
        #[source]
        source: reqwest::Error,
    },
}

/// Why an attempt is followed by another, and how long the client waited before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retry {
    /// What the attempt got: `"connection"`, `"timeout"`, or the status code (`"503"`).
    pub reason: String,
    /// How long the client waited before the next attempt.
    pub waited: Duration,
    /// Whether the wait was the server's `Retry-After` rather than the backoff.
    pub retry_after: bool,
}

/// The answer to one logical request: the final response, its key, and how it was obtained.
#[derive(Debug)]
pub struct Reply {
    response: Response,
    key: String,
    retries: Vec<Retry>,
}

impl Reply {
    /// The final response's status.
    pub fn status(&self) -> StatusCode {
        self.response.status()
    }

    /// Whether the server answered from its record of an earlier attempt
    /// (`Idempotent-Replayed: true`) rather than running the request now: the usual sign that
    /// an earlier attempt ran and only its response was lost.
    pub fn replayed(&self) -> bool {
        self.response
            .headers()
            .get(IDEMPOTENT_REPLAYED)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"))
    }

    /// The idempotency key every attempt carried.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// How many attempts were made, the first included.
    pub fn attempts(&self) -> u32 {
        u32::try_from(self.retries.len()).map_or(u32::MAX, |r| r.saturating_add(1))
    }

    /// Each retry's reason and wait, in order.
    pub fn retries(&self) -> &[Retry] {
        &self.retries
    }

    /// The final response.
    pub fn response(&self) -> &Response {
        &self.response
    }

    /// The final response, to read its body.
    pub fn into_response(self) -> Response {
        self.response
    }
}

/// A `reqwest::Client` that retries each logical request with one idempotency key.
#[derive(Clone, Debug)]
pub struct RetryingClient {
    http: reqwest::Client,
    max_attempts: u32,
    max_elapsed: Duration,
    backoff: ExponentialBackoffTimed,
    attempt_timeout: Option<Duration>,
    header: HeaderName,
}

/// Configures a [`RetryingClient`].
#[derive(Clone, Debug)]
pub struct Builder {
    http: reqwest::Client,
    max_attempts: u32,
    max_elapsed: Duration,
    min_backoff: Duration,
    max_backoff: Duration,
    attempt_timeout: Option<Duration>,
    header: String,
}

impl Builder {
    /// Attempts per logical request, the first included (default 5; at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// The most time one logical request may take, waits included (default 30 s).
    pub fn max_elapsed(mut self, total: Duration) -> Self {
        self.max_elapsed = total;
        self
    }

    /// The backoff's bounds before jitter: the first retry waits up to `min`, each next one
    /// up to twice as long, never more than `max` (default 100 ms and 10 s).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max;
        self
    }

    /// A time limit for each attempt (default: the `reqwest::Client`'s own). An attempt that
    /// runs out of it is retried like a broken connection.
    pub fn attempt_timeout(mut self, limit: Duration) -> Self {
        self.attempt_timeout = Some(limit);
        self
    }

    /// The header the key travels in (default `Idempotency-Key`).
    pub fn header(mut self, name: &str) -> Self {
        self.header = name.to_string();
        self
    }

    /// The client, or why the settings do not make sense.
    pub fn build(self) -> Result<RetryingClient, Error> {
        if self.max_attempts == 0 {
            return Err(Error::Config("max_attempts must be at least 1".into()));
        }
        if self.min_backoff > self.max_backoff {
            return Err(Error::Config(format!(
                "the backoff's min ({:?}) is larger than its max ({:?})",
                self.min_backoff, self.max_backoff
            )));
        }
        let header = HeaderName::from_bytes(self.header.as_bytes())
            .map_err(|e| Error::Config(format!("header {:?}: {e}", self.header)))?;
        Ok(self.client(header))
    }

    /// The client, from settings already checked.
    fn client(self, header: HeaderName) -> RetryingClient {
        let backoff = ExponentialBackoff::builder()
            .retry_bounds(self.min_backoff, self.max_backoff)
            .jitter(Jitter::Full)
            .base(2)
            .build_with_total_retry_duration_and_max_retries(
                self.max_elapsed,
                self.max_attempts.saturating_sub(1),
            );
        RetryingClient {
            http: self.http,
            max_attempts: self.max_attempts,
            max_elapsed: self.max_elapsed,
            backoff,
            attempt_timeout: self.attempt_timeout,
            header,
        }
    }
}

/// What one attempt got, as far as retrying goes.
enum Attempt {
    /// A final answer: returned as it is.
    Done(Response),
    /// A response worth another attempt (409, 429, 503), with its `Retry-After`.
    Busy(Response, Option<Duration>),
    /// No response: the connection failed, broke or timed out.
    Broken(reqwest::Error),
}

impl RetryingClient {
    /// A client with the [`defaults`].
    pub fn new(http: reqwest::Client) -> RetryingClient {
        // The defaults are valid settings: no check needed.
        RetryingClient::builder(http).client(HeaderName::from_static(IDEMPOTENCY_KEY))
    }

    /// Starts configuring a client around `http`.
    pub fn builder(http: reqwest::Client) -> Builder {
        Builder {
            http,
            max_attempts: defaults::MAX_ATTEMPTS,
            max_elapsed: defaults::MAX_ELAPSED,
            min_backoff: defaults::MIN_BACKOFF,
            max_backoff: defaults::MAX_BACKOFF,
            attempt_timeout: None,
            header: IDEMPOTENCY_KEY.to_string(),
        }
    }

    /// The `reqwest::Client` underneath, to build requests with.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Sends one logical request, retrying as the [crate docs](crate) say. Its
    /// `Idempotency-Key` header is its key; without one, a fresh UUID is.
    ///
    /// Returns the final response whatever its status (a 4xx, or the last 503 when the
    /// attempts ran out), and an error only when there is no response to return.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Result<Reply, Error> {
        let mut request = request.build().map_err(Error::Build)?;
        let key = match request.headers().get(&self.header) {
            Some(v) => v.to_str().map_err(|_| Error::InvalidKey)?.to_string(),
            None => {
                let key = uuid::Uuid::new_v4().to_string();
                let value = HeaderValue::from_str(&key).map_err(|_| Error::InvalidKey)?;
                request.headers_mut().insert(self.header.clone(), value);
                key
            }
        };
        let started_at = SystemTime::now();
        // `max_elapsed` beyond what an `Instant` can hold means no limit.
        let deadline = Instant::now().checked_add(self.max_elapsed);
        let mut retries = Vec::new();
        loop {
            let mut attempt = request.try_clone().ok_or(Error::BodyNotReplayable)?;
            // An attempt ends by the total time too, not only its own limit.
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            *attempt.timeout_mut() = match (self.attempt_timeout, left) {
                (Some(limit), Some(left)) => Some(limit.min(left)),
                (limit, left) => limit.or(left),
            };
            let outcome = match self.http.execute(attempt).await {
                Ok(response) => classify(response),
                Err(e) if is_transport(&e) => Attempt::Broken(e),
                Err(source) => return Err(Error::Request { key, source }),
            };
            let past = u32::try_from(retries.len()).unwrap_or(u32::MAX);
            let Some(retry) = self.next_retry(&outcome, past, started_at, deadline) else {
                return match outcome {
                    Attempt::Done(response) | Attempt::Busy(response, _) => Ok(Reply {
                        response,
                        key,
                        retries,
                    }),
                    Attempt::Broken(source) => Err(Error::Transport {
                        key,
                        attempts: past + 1,
                        source,
                    }),
                };
            };
            tracing::debug!(key = %key, attempt = past + 1, reason = %retry.reason,
                waited = ?retry.waited, "idem-client: retrying with the same key");
            let wait = retry.waited;
            retries.push(retry);
            tokio::time::sleep(wait).await;
        }
    }

    /// Whether `outcome`, after `past` retries, is retried, and after how long: the
    /// server's `Retry-After`, or the backoff. `None` when the answer is final, or the
    /// attempts or the time (`deadline`) would run out.
    fn next_retry(
        &self,
        outcome: &Attempt,
        past: u32,
        started_at: SystemTime,
        deadline: Option<Instant>,
    ) -> Option<Retry> {
        let (reason, retry_after) = match outcome {
            Attempt::Done(_) => return None,
            Attempt::Busy(r, after) => (r.status().as_u16().to_string(), *after),
            Attempt::Broken(e) if e.is_timeout() => ("timeout".to_string(), None),
            Attempt::Broken(_) => ("connection".to_string(), None),
        };
        if past.saturating_add(1) >= self.max_attempts {
            return None;
        }
        let (waited, from_server) = match retry_after {
            Some(after) => (after, true),
            None => match self.backoff.should_retry(started_at, past) {
                RetryDecision::Retry { execute_after } => {
                    let wait = execute_after
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    (wait, false)
                }
                RetryDecision::DoNotRetry => return None,
            },
        };
        // A wait that would end past the total time is not started.
        let ends = Instant::now().checked_add(waited);
        if let Some(deadline) = deadline
            && ends.is_none_or(|ends| ends >= deadline)
        {
            return None;
        }
        Some(Retry {
            reason,
            waited,
            retry_after: from_server,
        })
    }
}

/// Whether a response is final, or worth another attempt.
fn classify(response: Response) -> Attempt {
    // A replayed answer is the recorded one (say a route's own 409): sending again gets it
    // again.
    let replayed = response
        .headers()
        .get(IDEMPOTENT_REPLAYED)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
    if replayed {
        return Attempt::Done(response);
    }
    match response.status() {
        StatusCode::CONFLICT | StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
            let after = retry_after::parse(response.headers(), SystemTime::now());
            Attempt::Busy(response, after)
        }
        _ => Attempt::Done(response),
    }
}

/// Whether an error means the attempt may not have reached the server or its answer was lost
/// (worth a retry with the same key), rather than a mistake in the request.
fn is_transport(e: &reqwest::Error) -> bool {
    e.is_connect() || e.is_timeout() || e.is_request()
}
