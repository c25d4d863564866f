//! The `Idempotency-Key` header for axum services (feature `axum`).
//!
//! [`IdempotencyLayer`] follows the IETF httpapi draft "The Idempotency-Key HTTP Header
//! Field" and what payment APIs do: the first request with a key runs the route and its
//! whole response (status, allowlisted headers, body) is stored; a retry with the same key
//! gets that response back with `Idempotent-Replayed: true`. The key is scoped by a principal
//! the application supplies, by method and by route; the request is fingerprinted (method,
//! path and query, body), so a key reused for a different request is refused.
//!
//! | situation | answer |
//! | --- | --- |
//! | no key on a route that requires one | 400 |
//! | key reused with a different request | 422 |
//! | same key still in progress | 409 with `Retry-After` (after a bounded wait, if configured) |
//! | the store is unavailable | 503 |
//! | request body over the limit | 413 |
//!
//! Error bodies are `application/problem+json` (RFC 9457). Responses with status 5xx, 401,
//! 403, 408 or 429 are not stored (the key is released, so a retry runs the route again);
//! every other status is, unless [`IdempotencyLayer::store_status`] says otherwise.
//!
//! ```no_run
//! # async fn demo(idem: idem_runtime::Idem) {
//! use axum::{Router, routing::post};
//! use idem_runtime::http::IdempotencyLayer;
//!
//! async fn create_order() -> &'static str { "created" }
//!
//! let orders = IdempotencyLayer::new(idem)
//!     .principal(|req| req.headers.get("x-api-key")?.to_str().ok().map(str::to_owned))
//!     .ttl("PT24H");
//! let app: Router = Router::new().route("/orders", post(create_order).layer(orders));
//! # }
//! ```
//!
//! The layer is the right tool when the response is what should be replayed, and for routes
//! you do not want to touch; [`IdempotencyLayer::transactional`] makes the route's own rows
//! commit with the recorded response (the route takes [`IdemTx`]). `#[idempotent]` on a
//! handler (or on the service fn it calls) fits when the handler's result is a serializable
//! value or the key is not a header; see [`Json`].

mod json;
mod key;
mod problem;
mod service;
mod stored;
#[cfg(feature = "_sql")]
mod tx;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::http::header::{HeaderName, HeaderValue};
use axum::http::request::Parts;
use tower::Layer;

pub use json::Json;
pub use service::IdempotencyService;
#[cfg(feature = "_sql")]
pub use tx::IdemTx;

use crate::engine::Spec;
use crate::{Error, Idem, IntoDuration};

/// The header a replayed response carries.
pub const REPLAYED: &str = "idempotent-replayed";

/// The response headers replayed by default; others are sent on the first response only.
const DEFAULT_REPLAY_HEADERS: &[&str] = &[
    "content-type",
    "content-language",
    "content-location",
    "location",
    "etag",
    "last-modified",
    "cache-control",
    "link",
];

type Principal = dyn Fn(&Parts) -> Option<String> + Send + Sync;
type BodyView = dyn Fn(&[u8]) -> Cow<'_, [u8]> + Send + Sync;
type StorePolicy = dyn Fn(StatusCode) -> bool + Send + Sync;

/// A tower layer that makes the routes it wraps honour the `Idempotency-Key` header.
///
/// Build one at startup with the same [`Idem`] the rest of the application uses, configure
/// it, and add it to the routes (and methods) it should protect with axum's `.layer(..)` or
/// `.route_layer(..)`.
#[derive(Clone)]
pub struct IdempotencyLayer {
    config: Arc<Config>,
}

/// A layer's settings, shared by the services it makes.
#[derive(Clone)]
struct Config {
    idem: Idem,
    settings: SpecSettings,
    header: HeaderName,
    required: bool,
    principal: Arc<Principal>,
    body_view: Option<Arc<BodyView>>,
    store_status: Arc<StorePolicy>,
    max_request_bytes: usize,
    max_response_bytes: usize,
    replay_headers: Vec<HeaderName>,
    /// The transactional mode for the store's database, once chosen.
    #[cfg(feature = "_sql")]
    transactional: Option<Arc<dyn tx::Mode>>,
    /// A setting that was refused; every request then gets a 500 naming it.
    error: Option<String>,
    /// The record spec, looked up once for a built service (a layer still being configured
    /// has none: its settings may change).
    spec: Option<&'static Spec>,
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("header", &self.config.header)
            .field("required", &self.config.required)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// The record spec for this layer's settings.
    fn spec(&self) -> &'static Spec {
        self.spec.unwrap_or_else(|| self.settings.spec())
    }

    /// The response headers a replay carries, in their order.
    fn replayed_headers(&self, headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
        self.replay_headers
            .iter()
            .flat_map(|name| {
                let values = headers.get_all(name).iter();
                values.map(move |v| (name.clone(), v.clone()))
            })
            .collect()
    }
}

/// The default: 2xx and the client errors that are final, never 5xx, 401, 403, 408 or 429.
fn default_store_status(status: StatusCode) -> bool {
    !(status.is_server_error()
        || status.is_informational()
        || matches!(status.as_u16(), 401 | 403 | 408 | 429))
}

impl IdempotencyLayer {
    /// A layer on `idem`'s store: header `Idempotency-Key`, required, records kept for the
    /// runtime's default TTL, request and response bodies up to 1 MiB.
    pub fn new(idem: Idem) -> IdempotencyLayer {
        IdempotencyLayer {
            config: Arc::new(Config {
                settings: SpecSettings {
                    name: "http".into(),
                    ..SpecSettings::default()
                },
                max_response_bytes: idem.engine().settings.max_result_bytes / 2,
                idem,
                header: HeaderName::from_static("idempotency-key"),
                required: true,
                principal: Arc::new(|_| None),
                body_view: None,
                store_status: Arc::new(default_store_status),
                max_request_bytes: 1 << 20,
                replay_headers: DEFAULT_REPLAY_HEADERS
                    .iter()
                    .map(|h| HeaderName::from_static(h))
                    .collect(),
                #[cfg(feature = "_sql")]
                transactional: None,
                error: None,
                spec: None,
            }),
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Config)) -> Self {
        // Layers are configured once, before they are cloned into routes.
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// The header carrying the key (default `Idempotency-Key`).
    pub fn header(self, name: &str) -> Self {
        match HeaderName::try_from(name) {
            Ok(h) => self.with(|c| c.header = h),
            Err(_) => self.misconfigured(format!("{name:?} is not a header name")),
        }
    }

    /// Whether a request without the header is refused with 400 (`true`, the default) or
    /// passed to the route unprotected.
    pub fn required(self, required: bool) -> Self {
        self.with(|c| c.required = required)
    }

    /// Who the request is from (the authenticated user, the API key): keys are scoped by it,
    /// so two tenants using the same key never see each other's responses. `None` (the
    /// default for every request) puts the request in a shared anonymous scope.
    pub fn principal<F>(self, principal: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        self.with(|c| c.principal = Arc::new(principal))
    }

    /// What of the request body is fingerprinted: for example the JSON body without a
    /// client timestamp that legitimately differs between retries.
    pub fn fingerprint_body<F>(self, view: F) -> Self
    where
        F: Fn(&[u8]) -> Cow<'_, [u8]> + Send + Sync + 'static,
    {
        self.with(|c| c.body_view = Some(Arc::new(view)))
    }

    /// Which responses are stored and replayed; the others release the key.
    pub fn store_status<F>(self, policy: F) -> Self
    where
        F: Fn(StatusCode) -> bool + Send + Sync + 'static,
    {
        self.with(|c| c.store_status = Arc::new(policy))
    }

    /// The largest request body accepted (it is read to be fingerprinted); larger: 413.
    pub fn max_request_bytes(self, bytes: usize) -> Self {
        self.with(|c| c.max_request_bytes = bytes)
    }

    /// The largest response body stored (default: half the runtime's `max_result_bytes`, as
    /// a stored response is a little larger than its body). A larger one is sent to its
    /// client but not stored, and the key is released.
    pub fn max_response_bytes(self, bytes: usize) -> Self {
        self.with(|c| c.max_response_bytes = bytes)
    }

    /// Also replay this response header (by default: content type and language, location,
    /// content location, etag, last modified, cache control, link).
    pub fn replay_header(self, name: &str) -> Self {
        match HeaderName::try_from(name) {
            Ok(h) => self.with(|c| c.replay_headers.push(h)),
            Err(_) => self.misconfigured(format!("{name:?} is not a header name")),
        }
    }

    /// Runs each protected request in a transaction on the store's database (PostgreSQL,
    /// MySQL/MariaDB or SQLite) and records its response in that same transaction: a route
    /// that takes [`IdemTx`] writes its rows in it, so its writes and its recorded response
    /// commit together, once per key, or not at all.
    ///
    /// The layer begins the transaction and reserves the key in it, runs the route, reads its
    /// whole response (up to `max_response_bytes`), records it and commits; then the response
    /// goes out. A duplicate sent meanwhile waits on the record's row in the database, then
    /// replays the committed response (or runs the route, if the first rolled back). A
    /// response that is not stored (5xx, 401, 403, 408, 429 unless
    /// [`store_status`](Self::store_status) says otherwise) rolls the transaction back: the
    /// route's writes go with it and the key stays free. A failed commit answers 503 with a
    /// problem document, never the route's response. A request without a key on a layer that
    /// does not require one runs in a transaction too, with nothing recorded.
    ///
    /// The runtime's store must be that database's idem store ([`PgStore`](crate::store::PgStore),
    /// [`MySqlStore`](crate::store::MySqlStore), [`SqliteStore`](crate::store::SqliteStore));
    /// with any other, every request gets a 500 that says so. Leases, heartbeats and `wait`
    /// play no part: a duplicate waits as long as the first request's transaction (bounded by
    /// the database's lock timeout: `lock_timeout` on PostgreSQL, `innodb_lock_wait_timeout`
    /// on MySQL, the busy timeout on SQLite).
    #[cfg(feature = "_sql")]
    #[cfg_attr(
        docsrs,
        doc(cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite")))
    )]
    pub fn transactional(self) -> Self {
        let store = self.config.idem.engine().store.clone();
        match tx::mode_for(&*store) {
            Some(mode) => self.with(|c| c.transactional = Some(mode)),
            None => self.misconfigured(format!(
                "transactional mode needs a PostgreSQL, MySQL or SQLite idem store, and this runtime's store is `{}`",
                store.backend()
            )),
        }
    }

    /// How long a response is replayed (default: the runtime's TTL).
    pub fn ttl(self, ttl: impl IntoDuration) -> Self {
        self.duration("ttl", ttl, |s, ms| s.ttl_ms = Some(ms))
    }

    /// How long a request in progress keeps its key without a heartbeat.
    pub fn lease(self, lease: impl IntoDuration) -> Self {
        self.duration("lease", lease, |s, ms| s.lease_ms = Some(ms))
    }

    /// How long a duplicate waits for the first request before it gets 409.
    pub fn wait(self, wait: impl IntoDuration) -> Self {
        self.duration("wait", wait, |s, ms| s.wait_ms = Some(ms))
    }

    /// Answer a duplicate of a request still in progress with 409 at once, without waiting.
    pub fn reject_conflicts(self) -> Self {
        self.with(|c| c.settings.reject = true)
    }

    /// The name of this layer's records (default `http`). Give each service its own when
    /// several share one store: two services with the same routes would otherwise share
    /// records.
    pub fn namespace(self, name: &str) -> Self {
        let name = name.to_owned();
        self.with(|c| c.settings.name = name)
    }

    fn duration(self, what: &str, d: impl IntoDuration, set: fn(&mut SpecSettings, u64)) -> Self {
        match d.into_duration() {
            Ok(d) => {
                let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
                self.with(|c| set(&mut c.settings, ms))
            }
            Err(e) => self.misconfigured(format!("{what}: {e}")),
        }
    }

    /// A setting the layer cannot use: logged now, and every request through the layer gets
    /// a 500 that says so (a layer method cannot fail; [`check`](Self::check) can). The first
    /// such setting is the one reported.
    fn misconfigured(self, e: String) -> Self {
        tracing::error!(error = %e, "idem: the idempotency layer is misconfigured; every request through it will get a 500");
        self.with(|c| {
            c.error.get_or_insert(e);
        })
    }

    /// Whether every setting given to the layer could be used: call it at startup to fail
    /// there (`layer.check()?`) rather than with a 500 on every request.
    pub fn check(&self) -> Result<(), Error> {
        match &self.config.error {
            Some(e) => Err(Error::Config(format!("idempotency layer: {e}"))),
            None => Ok(()),
        }
    }
}

/// What a layer's records are made with: the engine's spec, as data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct SpecSettings {
    name: String,
    ttl_ms: Option<u64>,
    lease_ms: Option<u64>,
    wait_ms: Option<u64>,
    reject: bool,
}

impl SpecSettings {
    /// The spec for these settings. Specs live as long as the program (calls hold
    /// `&'static` ones), so each distinct configuration is made once and kept: layers built
    /// per request do not grow memory.
    fn spec(&self) -> &'static Spec {
        static SPECS: Mutex<Option<HashMap<SpecSettings, &'static Spec>>> = Mutex::new(None);
        let mut specs = SPECS.lock().unwrap_or_else(|p| p.into_inner());
        let specs = specs.get_or_insert_with(HashMap::new);
        if let Some(spec) = specs.get(self) {
            return spec;
        }
        let name: &'static str = Box::leak(self.name.clone().into_boxed_str());
        let mut spec = Spec::new().name(name);
        if let Some(ms) = self.ttl_ms {
            spec = spec.ttl_ms(ms);
        }
        if let Some(ms) = self.lease_ms {
            spec = spec.lease_ms(ms);
        }
        if let Some(ms) = self.wait_ms {
            spec = spec.wait_ms(ms);
        }
        if self.reject {
            spec = spec.reject();
        }
        let spec: &'static Spec = Box::leak(Box::new(spec));
        specs.insert(self.clone(), spec);
        spec
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> IdempotencyService<S> {
        // The spec is found once here rather than in a shared table on every request.
        let config = Config {
            spec: Some(self.config.settings.spec()),
            ..(*self.config).clone()
        };
        IdempotencyService::new(inner, Arc::new(config))
    }
}
