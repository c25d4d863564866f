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
//! you do not want to touch. `#[idempotent]` on a handler (or on the service fn it calls)
//! fits when the handler's result is a serializable value, the key is not a header, or the
//! effect should share a database transaction with its record (`tx = ..`); see [`Json`].

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::MatchedPath;
use axum::http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use axum::http::request::Parts;
use axum::http::{Request, Response, StatusCode};
use axum::response::IntoResponse;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tower::{Layer, Service, ServiceExt};

use crate::__private::{Call, Payload, Scope, Spec};
use crate::config::IntoDuration;
use crate::key::Fingerprinter;
use crate::outcome::observe;
use crate::{Error, Idem};

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
    error: Option<String>,
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("header", &self.config.header)
            .field("required", &self.config.required)
            .finish_non_exhaustive()
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
                max_response_bytes: idem.inner.settings.max_result_bytes / 2,
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
                error: None,
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
            Err(_) => self.with(|c| c.error = Some(format!("{name:?} is not a header name"))),
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
            Err(_) => self.with(|c| c.error = Some(format!("{name:?} is not a header name"))),
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
            Err(e) => self.with(|c| c.error = Some(format!("{what}: {e}"))),
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
        IdempotencyService {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service [`IdempotencyLayer`] wraps a route in.
#[derive(Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> Service<Request<Body>> for IdempotencyService<S>
where
    S: Service<Request<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Response: IntoResponse,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // The clone is the one that is ready; this one takes its place for the next call.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let config = self.config.clone();
        Box::pin(async move { Ok(handle(config, inner, req).await) })
    }
}

/// A response as it is replayed: status, the allowlisted headers, and the body.
///
/// Stored as JSON `{"status", "headers": [[name, bytes]], "body": {"Text": ..} | {"Base64": ..}}`:
/// text bodies (most API responses) stay readable in the store; others are base64, a third
/// larger (JSON would write bytes as an array of numbers, three to four times larger). A
/// stored response that does not decode into a valid one (a bad status, header or base64) is
/// an [`Error::Decode`], never a made-up response.
#[derive(Debug, Deserialize)]
#[serde(try_from = "StoredForm")]
struct StoredResponse {
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
}

/// [`StoredResponse`] as it is written, before its parts are checked.
#[derive(Serialize, Deserialize)]
struct StoredForm {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: StoredBody,
}

#[derive(Serialize, Deserialize)]
enum StoredBody {
    Text(String),
    Base64(String),
}

impl Serialize for StoredResponse {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let body = match std::str::from_utf8(&self.body) {
            Ok(text) => StoredBody::Text(text.to_owned()),
            Err(_) => StoredBody::Base64(base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                &self.body,
            )),
        };
        StoredForm {
            status: self.status.as_u16(),
            headers: self
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect(),
            body,
        }
        .serialize(s)
    }
}

impl TryFrom<StoredForm> for StoredResponse {
    type Error = String;

    fn try_from(form: StoredForm) -> Result<Self, String> {
        let status = StatusCode::from_u16(form.status)
            .map_err(|_| format!("stored status {} is not an HTTP status", form.status))?;
        let headers = form
            .headers
            .into_iter()
            .map(|(name, value)| {
                let n = HeaderName::try_from(name.as_str())
                    .map_err(|_| format!("stored header name {name:?} is not valid"))?;
                let v = HeaderValue::from_bytes(&value)
                    .map_err(|_| format!("stored value of header {name:?} is not valid"))?;
                Ok((n, v))
            })
            .collect::<Result<_, String>>()?;
        let body = match form.body {
            StoredBody::Text(t) => Bytes::from(t),
            StoredBody::Base64(b) => {
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b)
                    .map_err(|e| format!("stored body is not valid base64: {e}"))?
                    .into()
            }
        };
        Ok(StoredResponse {
            status,
            headers,
            body,
        })
    }
}

/// Why the route's response is not stored.
enum NotStored {
    /// idem itself refused or failed.
    Idem(Error),
    /// The route's response went to its client as it was and is not stored (its status, its
    /// size, or a broken body); the key is released.
    Sent,
}

impl From<Error> for NotStored {
    fn from(e: Error) -> Self {
        NotStored::Idem(e)
    }
}

async fn handle<S>(config: Arc<Config>, inner: S, req: Request<Body>) -> Response<Body>
where
    S: Service<Request<Body>, Error = Infallible> + Send + 'static,
    S::Response: IntoResponse,
    S::Future: Send + 'static,
{
    if let Some(e) = &config.error {
        return problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "misconfigured",
            "The idempotency layer is misconfigured",
            e,
        );
    }
    let (parts, body) = req.into_parts();
    let key = match key_from(&parts.headers, &config.header) {
        Ok(Some(key)) => key,
        Err(why) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "invalid-key",
                "Invalid idempotency key",
                why,
            );
        }
        Ok(None) if config.required => {
            return problem(
                StatusCode::BAD_REQUEST,
                "missing-key",
                "Idempotency key required",
                &format!("this request needs an `{}` header", config.header),
            );
        }
        Ok(None) => {
            let resp = inner.oneshot(Request::from_parts(parts, body)).await;
            return into_response(resp);
        }
    };
    let bytes = match http_body_util::Limited::new(body, config.max_request_bytes)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request-too-large",
                "Request body too large",
                &format!(
                    "requests with an idempotency key may carry at most {} bytes",
                    config.max_request_bytes
                ),
            );
        }
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "unreadable-body",
                "The request body could not be read",
                &e.to_string(),
            );
        }
    };
    let route = parts
        .extensions
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| parts.uri.path().to_owned());
    // `p:` keeps every principal apart from the anonymous scope, whatever it is called, and
    // escaping the principal keeps a principal with a space in it from reading as another
    // principal's method and route.
    let scope = match (config.principal)(&parts) {
        Some(principal) => format!(
            "p:{} {} {route}",
            crate::key::escape(&principal, b" "),
            parts.method
        ),
        None => format!("anonymous {} {route}", parts.method),
    };
    let mut fp = Fingerprinter::new();
    fp.arg(parts.method.as_str());
    fp.arg(parts.uri.path_and_query().map_or("/", |p| p.as_str()));
    match &config.body_view {
        Some(view) => fp.arg(&serde_bytes_view(&view(&bytes))),
        None => fp.arg(&serde_bytes_view(&bytes)),
    }
    let call = Call {
        key: Some(key),
        scope: Scope::Value(scope),
        payload: Payload::from(fp.finish()),
        runtime: Some(config.idem.clone()),
    };

    // The call runs in a task of its own: a client that hangs up must not cancel a route
    // that has already done its work, or the retry would do it again.
    let (head_tx, head_rx) = tokio::sync::oneshot::channel();
    let tail: Arc<Mutex<Option<Tail>>> = Arc::default();
    let spec = config.settings.spec();
    let route_run = run_route(config.clone(), inner, parts, bytes, head_tx, tail.clone());
    let task = tokio::spawn(async move {
        let site = spec.site::<()>();
        let out = observe(crate::engine::run::<
            StoredResponse,
            NotStored,
            _,
            crate::engine::ValuesOnly,
        >(spec, site, &[], call, route_run))
        .await;
        // The route ran here and its response is out but for the piece that completes it:
        // send that now that the record is written (or the key released), or break the
        // response off if idem could not stand behind it.
        let held = tail.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(held) = held {
            match &out.0 {
                Ok(_) | Err(NotStored::Sent) => held.complete(),
                Err(NotStored::Idem(e)) => held.abort(e),
            }
        }
        out
    });
    // Either the route ran here, and its response streams to the client while it is being
    // recorded, or the engine answered without it (a replay, a conflict, an error).
    if let Ok(response) = head_rx.await {
        return response;
    }
    match task.await {
        Ok((Ok(stored), _)) => replayed(stored),
        Ok((Err(NotStored::Idem(e)), _)) => error_response(&e),
        Ok((Err(NotStored::Sent), _)) | Err(_) => {
            // The route ran but its response never reached us: it panicked.
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// The piece of a response that completes it for its client, held back by `run_route` until
/// the engine has written the record (or released the key). A client that has the whole
/// response and sends the request again then finds the record and gets the replay, never a
/// "still in progress" 409; and a response idem cannot stand behind (its reservation was
/// taken over, or its record could not be written) is broken off instead of completed.
enum Tail {
    /// A response without a body (HEAD, 204, 304, `content-length: 0`): the head completes it.
    Head(tokio::sync::oneshot::Sender<Response<Body>>, Response<Body>),
    /// A body whose length the headers declare: its last chunk completes it.
    LastChunk(BodySender, Bytes),
    /// A chunked body: its end completes it (the sender's drop).
    End(BodySender),
}

type BodySender = tokio::sync::mpsc::Sender<Result<Bytes, axum::Error>>;

impl Tail {
    fn complete(self) {
        match self {
            Tail::Head(tx, resp) => {
                let _ = tx.send(resp);
            }
            // The channel holds 16 chunks and the client may be slow: never wait here.
            Tail::LastChunk(tx, chunk) => {
                tokio::spawn(async move {
                    let _ = tx.send(Ok(chunk)).await;
                });
            }
            Tail::End(tx) => drop(tx),
        }
    }

    fn abort(self, e: &Error) {
        tracing::warn!(error = %e, "idem: the route ran but its response could not be recorded; the response is broken off so the client retries");
        match self {
            Tail::Head(tx, _) => {
                let _ = tx.send(error_response(e));
            }
            Tail::LastChunk(tx, _) | Tail::End(tx) => {
                let e = axum::Error::new(e.clone());
                tokio::spawn(async move {
                    let _ = tx.send(Err(e)).await;
                });
            }
        }
    }
}

/// Whether the client has the whole response once it has the head: no body follows it.
fn complete_at_head(method: &axum::http::Method, parts: &axum::http::response::Parts) -> bool {
    let declared_empty = parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() == b"0");
    method == axum::http::Method::HEAD
        || parts.status.is_informational()
        || matches!(parts.status.as_u16(), 204 | 304)
        || declared_empty
}

/// The body length the headers declare, if any.
fn declared_length(parts: &axum::http::response::Parts) -> Option<u64> {
    parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The route, run once for a key. Its response goes to the client through `head` as soon as
/// it starts, and its body streams on while a copy is kept; the copy is stored at the end if
/// the status policy and the size limit allow. The piece that completes the response is left
/// in `tail` for the caller to send once the engine is done with the record.
async fn run_route<S>(
    config: Arc<Config>,
    inner: S,
    parts: Parts,
    bytes: Bytes,
    head: tokio::sync::oneshot::Sender<Response<Body>>,
    tail: Arc<Mutex<Option<Tail>>>,
) -> Result<StoredResponse, NotStored>
where
    S: Service<Request<Body>, Error = Infallible> + Send + 'static,
    S::Response: IntoResponse,
    S::Future: Send + 'static,
{
    let method = parts.method.clone();
    let resp = into_response(
        inner
            .oneshot(Request::from_parts(parts, Body::from(bytes)))
            .await,
    );
    let hold = |piece: Tail| *tail.lock().unwrap_or_else(|p| p.into_inner()) = Some(piece);
    let (parts, mut body) = resp.into_parts();
    let stored = (config.store_status)(parts.status);
    let status = parts.status;
    let headers: Vec<(HeaderName, HeaderValue)> = config
        .replay_headers
        .iter()
        .flat_map(|name| {
            parts
                .headers
                .get_all(name)
                .iter()
                .map(move |v| (name.clone(), v.clone()))
        })
        .collect();
    let at_head = complete_at_head(&method, &parts);
    let mut length_left = declared_length(&parts);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let response = Response::from_parts(parts, Body::new(ChannelBody { rx }));
    if at_head {
        hold(Tail::Head(head, response));
    } else {
        let _ = head.send(response);
    }
    // `None` when the head completes the response: there is no body to send.
    let mut client = (!at_head).then_some(tx);
    let mut hung_up = false;
    // A response that is not stored is not copied, only streamed.
    let mut kept = stored.then(bytes::BytesMut::new);
    while let Some(frame) = body.frame().await {
        let data = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => data,
                Err(_trailers) => continue,
            },
            Err(e) => {
                tracing::warn!(error = %e, "idem: the response body failed; not stored");
                if let Some(c) = client.take() {
                    let _ = c.send(Err(e)).await;
                }
                return Err(NotStored::Sent);
            }
        };
        if let Some(buf) = &mut kept {
            if buf.len() + data.len() <= config.max_response_bytes {
                buf.extend_from_slice(&data);
            } else {
                tracing::warn!(
                    limit = config.max_response_bytes,
                    "idem: response body too large to store; sent but not stored"
                );
                crate::metrics::not_stored("http", "too_large");
                kept = None;
            }
        }
        if let Some(left) = &mut length_left {
            *left = left.saturating_sub(data.len() as u64);
            if *left == 0
                && let Some(c) = client.take()
            {
                // The chunk that completes the declared length waits for the record.
                hold(Tail::LastChunk(c, data));
                continue;
            }
        }
        if let Some(c) = &client
            && c.send(Ok(data)).await.is_err()
        {
            client = None;
            hung_up = true;
        }
        if hung_up && kept.is_none() {
            // The client is gone and nothing is being stored: nothing left to do.
            return Err(NotStored::Sent);
        }
    }
    if let Some(c) = client {
        hold(Tail::End(c));
    }
    let Some(kept) = kept else {
        return Err(NotStored::Sent);
    };
    Ok(StoredResponse {
        status,
        headers,
        body: kept.freeze(),
    })
}

/// The client's end of a response body being copied by `run_route`.
struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, axum::Error>>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|next| next.map(|r| r.map(http_body::Frame::data)))
    }
}

fn into_response<R: IntoResponse>(resp: Result<R, Infallible>) -> Response<Body> {
    match resp {
        Ok(r) => r.into_response(),
        Err(never) => match never {},
    }
}

fn replayed(stored: StoredResponse) -> Response<Body> {
    let mut resp = Response::new(Body::from(stored.body));
    *resp.status_mut() = stored.status;
    for (name, value) in stored.headers {
        resp.headers_mut().append(name, value);
    }
    resp.headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    resp
}

/// The key from the request's key header.
///
/// The draft defines the field as one structured-field string (RFC 8941: `"..."`, with `\"`
/// and `\\` as the only escapes); a bare value is accepted too, since most clients send one
/// (`Idempotency-Key: 8e0f..`). Either way the key is 1 to 255 printable ASCII characters.
/// More than one header line is refused: RFC 9110 reads several lines as one comma-joined
/// value, which a proxy may or may not have merged, so the key would depend on the path the
/// request took. For the same reason a bare value may not contain a comma.
fn key_from(
    headers: &axum::http::HeaderMap,
    name: &HeaderName,
) -> Result<Option<String>, &'static str> {
    let mut lines = headers.get_all(name).iter();
    let Some(first) = lines.next() else {
        return Ok(None);
    };
    if lines.next().is_some() {
        return Err("the request has more than one idempotency key header line; send exactly one");
    }
    key_of(first).map(Some)
}

fn key_of(value: &HeaderValue) -> Result<String, &'static str> {
    let s = value
        .to_str()
        .map_err(|_| "the key must be printable ASCII")?
        .trim_matches([' ', '\t']);
    let key = match s.strip_prefix('"') {
        Some(quoted) => sf_string(quoted)?,
        None if s.contains(',') => {
            return Err(
                "a bare key may not contain `,` (it reads as a list of keys); send one key, quoted as a structured-field string if it needs a comma",
            );
        }
        None if s.contains('"') => return Err("the key has a stray `\"`"),
        None => s.to_owned(),
    };
    if key.is_empty() {
        return Err("the key is empty");
    }
    if key.len() > 255 {
        return Err("the key is longer than 255 characters");
    }
    Ok(key)
}

/// The rest of an RFC 8941 sf-string after its opening quote.
fn sf_string(rest: &str) -> Result<String, &'static str> {
    let mut out = String::with_capacity(rest.len());
    let mut chars = rest.chars();
    loop {
        match chars.next() {
            None => return Err("the quoted key has no closing `\"`"),
            Some('"') => break,
            Some('\\') => match chars.next() {
                Some(c @ ('"' | '\\')) => out.push(c),
                _ => return Err("a quoted key may only escape `\"` and `\\`"),
            },
            Some(c) if (' '..='~').contains(&c) => out.push(c),
            Some(_) => return Err("the key must be printable ASCII"),
        }
    }
    if !chars.as_str().trim_matches([' ', '\t']).is_empty() {
        return Err(
            "nothing may follow the quoted key (structured-field parameters are not supported)",
        );
    }
    Ok(out)
}

/// Bytes serialized as bytes (not as a sequence of numbers) for the fingerprint.
fn serde_bytes_view(bytes: &[u8]) -> impl Serialize + '_ {
    struct View<'a>(&'a [u8]);
    impl Serialize for View<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }
    View(bytes)
}

fn error_response(e: &Error) -> Response<Body> {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let title = match e {
        Error::InProgress { .. } => "A request with this idempotency key is in progress",
        Error::PayloadMismatch { .. } => "Idempotency key reused with a different request",
        Error::StoreUnavailable { .. } => "Idempotency store unavailable",
        Error::ResultNotRecorded { .. } => "The response could not be recorded; retry",
        Error::LeaseLost { .. } => "Another request with this idempotency key took over",
        Error::MissingKey { .. } | Error::InvalidKey { .. } => "Invalid idempotency key",
        _ => "Idempotency error",
    };
    let mut resp = problem(status, &e.kind().replace('_', "-"), title, &e.to_string());
    if let Some(after) = e.retry_after() {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
            resp.headers_mut().insert(RETRY_AFTER, v);
        }
    }
    if matches!(e, Error::StoreUnavailable { .. }) {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// An RFC 9457 problem document.
fn problem(status: StatusCode, kind: &str, title: &str, detail: &str) -> Response<Body> {
    let body = serde_json::json!({
        "type": format!("urn:idem:problem:{kind}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    resp
}

/// A JSON response body that `#[idempotent]` can store: `axum::Json` with `Serialize` and
/// `Deserialize`, for handlers annotated directly.
///
/// ```no_run
/// use axum::extract::State;
/// use axum::http::HeaderMap;
/// use idem_runtime::{Error, Idem, idempotent, http::Json};
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Order { id: u64 }
///
/// #[idempotent(key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()), skip(idem, headers), runtime = &idem)]
/// async fn create(State(idem): State<Idem>, headers: HeaderMap) -> Result<Json<Order>, ApiError> {
///     Ok(Json(Order { id: 1 }))
/// }
/// # struct ApiError;
/// # impl From<Error> for ApiError { fn from(_: Error) -> Self { ApiError } }
/// # impl axum::response::IntoResponse for ApiError {
/// #     fn into_response(self) -> axum::response::Response { axum::http::StatusCode::CONFLICT.into_response() }
/// # }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> axum::response::Response {
        axum::Json(self.0).into_response()
    }
}

impl IntoResponse for Error {
    /// The error as a problem document with its status (409 with `Retry-After`, 422, 400, 503).
    fn into_response(self) -> axum::response::Response {
        error_response(&self)
    }
}
