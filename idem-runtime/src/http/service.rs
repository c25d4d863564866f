//! The service the layer wraps a route in: read the key, fingerprint the request, and run the
//! route once per key through the engine, streaming its response while a copy is recorded.
//!
//! The piece of the response that completes it for its client is held back until the engine
//! has written the record (or released the key): see [`Held`].

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::MatchedPath;
use axum::http::request::Parts;
use axum::http::{Method, Request, Response, StatusCode, Version, header, response};
use axum::response::IntoResponse;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tower::{Service, ServiceExt};

use super::Config;
use super::key::key_from;
use super::problem::{error_response, problem};
use super::stored::StoredResponse;
use crate::Error;
use crate::codec::ValuesOnly;
use crate::engine::{Call, Payload, Scope};
use crate::key::Fingerprinter;
use crate::outcome::observe;

/// The service [`IdempotencyLayer`](super::IdempotencyLayer) wraps a route in.
#[derive(Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> IdempotencyService<S> {
    pub(super) fn new(inner: S, config: Arc<Config>) -> Self {
        IdempotencyService { inner, config }
    }
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
        let title = "The idempotency layer is misconfigured";
        return problem(StatusCode::INTERNAL_SERVER_ERROR, "misconfigured", title, e);
    }
    let (parts, body) = req.into_parts();
    let key = match key_from(&parts.headers, &config.header) {
        Ok(Some(key)) => Some(key),
        Err(why) => {
            let title = "Invalid idempotency key";
            return problem(StatusCode::BAD_REQUEST, "invalid-key", title, why);
        }
        Ok(None) if config.required => {
            let detail = format!("this request needs an `{}` header", config.header);
            let title = "Idempotency key required";
            return problem(StatusCode::BAD_REQUEST, "missing-key", title, &detail);
        }
        Ok(None) => None,
    };
    #[cfg(feature = "_sql")]
    if let Some(mode) = config.transactional.clone() {
        return super::tx::handle(mode, config, inner, parts, body, key).await;
    }
    let Some(key) = key else {
        return into_response(inner.oneshot(Request::from_parts(parts, body)).await);
    };
    let bytes = match read_body(body, config.max_request_bytes).await {
        Ok(bytes) => bytes,
        Err(refused) => return refused,
    };
    let call = call_for(&config, &parts, key, &bytes);

    // The call runs in a task of its own: a client that hangs up must not cancel a route
    // that has already done its work, or the retry would do it again.
    let (head_tx, head_rx) = oneshot::channel();
    let tail: Arc<Mutex<Option<Held>>> = Arc::default();
    let spec = config.spec();
    let engine = config.idem.engine().clone();
    let route_run = run_route(config, inner, parts, bytes, head_tx, tail.clone());
    let task = tokio::spawn(async move {
        let site = spec.site::<()>();
        let run = engine.run::<StoredResponse, NotStored, _, ValuesOnly>(
            spec,
            site,
            &[],
            call,
            route_run,
        );
        let out = observe(run).await;
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
    // Either the route ran here, and its response comes through `head` (whole once recorded,
    // or streaming if it is not stored), or the engine answered without it (a replay, a
    // conflict, an error).
    if let Ok(response) = head_rx.await {
        return response;
    }
    match task.await {
        Ok((Ok(stored), _)) => stored.replayed(),
        Ok((Err(NotStored::Idem(e)), _)) => error_response(&e),
        Ok((Err(NotStored::Sent), _)) | Err(_) => {
            // The route ran but its response never reached us: it panicked.
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// The engine's call for a request with a key.
pub(super) fn call_for(config: &Config, parts: &Parts, key: String, body: &[u8]) -> Call {
    Call {
        key: Some(key),
        scope: Scope::Value(scope(config, parts)),
        payload: fingerprint(config, parts, body),
    }
}

/// The request body, read to be fingerprinted; a problem response if it cannot be.
pub(super) async fn read_body(body: Body, limit: usize) -> Result<Bytes, Response<Body>> {
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request-too-large",
            "Request body too large",
            &format!("requests with an idempotency key may carry at most {limit} bytes"),
        )),
        Err(e) => Err(problem(
            StatusCode::BAD_REQUEST,
            "unreadable-body",
            "The request body could not be read",
            &e.to_string(),
        )),
    }
}

/// The request's scope: its principal (or the anonymous scope), method and route. `p:` keeps
/// every principal apart from the anonymous scope, whatever it is called; methods and matched
/// routes hold no spaces, so the principal is whatever precedes the last two words.
fn scope(config: &Config, parts: &Parts) -> String {
    let route = parts
        .extensions
        .get::<MatchedPath>()
        .map_or_else(|| parts.uri.path(), MatchedPath::as_str);
    match (config.principal)(parts) {
        Some(principal) => format!("p:{principal} {} {route}", parts.method),
        None => format!("anonymous {} {route}", parts.method),
    }
}

/// The request's fingerprint: method, path and query, and the body (or the part of it the
/// layer's `fingerprint_body` keeps).
fn fingerprint(config: &Config, parts: &Parts, body: &[u8]) -> Payload {
    let mut fp = Fingerprinter::new();
    fp.arg(parts.method.as_str());
    fp.arg(parts.uri.path_and_query().map_or("/", |p| p.as_str()));
    match &config.body_view {
        Some(view) => fp.arg(&SerdeBytes(&view(body))),
        None => fp.arg(&SerdeBytes(body)),
    }
    Payload::from(fp.finish())
}

/// Bytes serialized as bytes (not as a sequence of numbers) for the fingerprint.
struct SerdeBytes<'a>(&'a [u8]);

impl Serialize for SerdeBytes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

type BodySender = mpsc::Sender<Result<Bytes, axum::Error>>;

/// The piece of a response that completes it for its client, held back by `run_route` until
/// the engine has written the record (or released the key). A client that has the whole
/// response and sends the request again then finds the record and gets the replay, never a
/// "still in progress" 409; and a response idem cannot stand behind (its reservation was
/// taken over, or its record could not be written) is broken off instead of completed.
/// Dropped without being completed (a panic, a runtime shutting down), it breaks off too.
struct Held(Option<Piece>);

enum Piece {
    /// The whole response, sent at once: one with no body (HEAD, 204, 304,
    /// `content-length: 0`), whose head completes it, or one to an HTTP/1.0 client, which
    /// cannot tell a body broken off from a complete one. Broken off, it is a 5xx problem.
    Whole(oneshot::Sender<Response<Body>>, Response<Body>),
    /// A stored response whose body came in one piece, kept whole. Broken off, its head goes
    /// out and its body fails.
    Kept(oneshot::Sender<Response<Body>>, response::Parts, Bytes),
    /// A body whose length the headers declare: its last chunk completes it.
    LastChunk(BodySender, Bytes),
    /// A chunked body: its end completes it (the sender's drop).
    End(BodySender),
}

impl Held {
    fn complete(mut self) {
        match self.0.take() {
            Some(Piece::Whole(tx, resp)) => {
                let _ = tx.send(resp);
            }
            Some(Piece::Kept(tx, parts, body)) => {
                let _ = tx.send(Response::from_parts(parts, Body::from(body)));
            }
            // The channel holds 16 chunks and the client may be slow: never wait here.
            Some(Piece::LastChunk(tx, chunk)) => {
                tokio::spawn(async move {
                    let _ = tx.send(Ok(chunk)).await;
                });
            }
            Some(Piece::End(tx)) => drop(tx),
            None => {}
        }
    }

    fn abort(mut self, e: &Error) {
        tracing::warn!(error = %e, "idem: the route ran but its response could not be recorded; the response is broken off so the client retries");
        if let Some(piece) = self.0.take() {
            break_off(piece, Some(e));
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(piece) = self.0.take() {
            break_off(piece, None);
        }
    }
}

/// Ends a response in a way its client cannot mistake for a complete one.
fn break_off(piece: Piece, e: Option<&Error>) {
    match piece {
        Piece::Whole(tx, _) => {
            let resp = match e {
                Some(e) => error_response(e),
                None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            };
            let _ = tx.send(resp);
        }
        Piece::Kept(tx, parts, _) => {
            let why = e.map_or_else(
                || "the response could not be completed".into(),
                Error::to_string,
            );
            let failing = FailingBody(Some(axum::Error::new(why)), false);
            let _ = tx.send(Response::from_parts(parts, Body::new(failing)));
        }
        Piece::LastChunk(tx, _) | Piece::End(tx) => {
            let why = e.map_or_else(
                || "the response could not be completed".into(),
                Error::to_string,
            );
            let frame = Err(axum::Error::new(why));
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = tx.send(frame).await;
                });
            }
        }
    }
}

/// Whether the client has the whole response once it has the head: no body follows it.
fn complete_at_head(method: &Method, parts: &response::Parts) -> bool {
    let declared_empty = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() == b"0");
    method == Method::HEAD
        || parts.status.is_informational()
        || matches!(parts.status.as_u16(), 204 | 304)
        || declared_empty
}

/// The body length the headers declare, if any.
fn declared_length(parts: &response::Parts) -> Option<u64> {
    parts
        .headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Where the route's response goes while the route produces it.
enum Client {
    /// The head is out and chunks go as they come.
    Streaming(BodySender),
    /// Nothing is out yet: the response goes whole once recorded (the body is the kept copy).
    Holding(oneshot::Sender<Response<Body>>, response::Parts),
    /// Nothing more goes out: the response has no body, or the client hung up.
    Gone,
}

impl Client {
    fn streaming(head: oneshot::Sender<Response<Body>>, parts: response::Parts) -> Client {
        let (tx, rx) = mpsc::channel(16);
        let _ = head.send(Response::from_parts(parts, Body::new(ChannelBody { rx })));
        Client::Streaming(tx)
    }
}

/// The route, run once for a key. A response the status policy stores is kept whole and goes
/// to the client through `head` once recorded; one that is not stored, or outgrows the size
/// limit, streams through `head` as the route produces it. The piece that completes the response is left
/// in `tail` for the caller to send once the engine is done with the record.
async fn run_route<S>(
    config: Arc<Config>,
    inner: S,
    parts: Parts,
    bytes: Bytes,
    head: oneshot::Sender<Response<Body>>,
    tail: Arc<Mutex<Option<Held>>>,
) -> Result<StoredResponse, NotStored>
where
    S: Service<Request<Body>, Error = Infallible> + Send + 'static,
    S::Response: IntoResponse,
    S::Future: Send + 'static,
{
    let (method, version) = (parts.method.clone(), parts.version);
    let request = Request::from_parts(parts, Body::from(bytes));
    let (parts, mut body) = into_response(inner.oneshot(request).await).into_parts();
    let stored = (config.store_status)(parts.status);
    let status = parts.status;
    let headers = config.replayed_headers(&parts.headers);
    let mut copy = Copier {
        length_left: declared_length(&parts),
        // A response that is not stored is not copied, only streamed.
        kept: stored.then(BytesMut::new),
        max: config.max_response_bytes,
        hung_up: false,
        whole: false,
        tail: &tail,
        client: Client::Gone,
    };
    copy.client = if complete_at_head(&method, &parts) {
        hold(
            &tail,
            Piece::Whole(head, Response::from_parts(parts, Body::empty())),
        );
        Client::Gone
    } else if stored {
        // Held until recorded, and sent whole if the body ends in one piece (a JSON answer):
        // head and body then leave in one write. Sending the head first and holding only the
        // last piece takes two, and on a socket without TCP_NODELAY (the default of
        // `axum::serve`) the second waits out the client's delayed ACK, ~40 ms a request.
        Client::Holding(head, parts)
    } else {
        Client::streaming(head, parts)
    };
    // An HTTP/1.0 client cannot tell a body broken off from a complete one: it gets the
    // whole response or an error, never a stream.
    copy.whole = version <= Version::HTTP_10;
    while let Some(frame) = body.frame().await {
        match frame.map(http_body::Frame::into_data) {
            Ok(Ok(data)) => {
                if !copy
                    .chunk(data, http_body::Body::is_end_stream(&body))
                    .await
                {
                    return Err(NotStored::Sent);
                }
            }
            Ok(Err(_trailers)) => {}
            Err(e) => {
                copy.failed(e).await;
                return Err(NotStored::Sent);
            }
        }
    }
    let body = copy.finish().ok_or(NotStored::Sent)?;
    Ok(StoredResponse {
        status,
        headers,
        body,
    })
}

/// The route's body on its way to its client and into the record.
struct Copier<'t> {
    client: Client,
    /// The copy being kept for the record; `None` once it is not stored.
    kept: Option<BytesMut>,
    max: usize,
    /// What is left of the length the headers declare, if they do.
    length_left: Option<u64>,
    hung_up: bool,
    /// Hold the response whole to the end, however its body comes (HTTP/1.0).
    whole: bool,
    tail: &'t Mutex<Option<Held>>,
}

/// Leaves `piece` for the caller to send (or break off) once the record is settled.
fn hold(tail: &Mutex<Option<Held>>, piece: Piece) {
    *tail.lock().unwrap_or_else(|p| p.into_inner()) = Some(Held(Some(piece)));
}

impl Copier<'_> {
    /// Takes the next chunk of the body (`ended`: the body says no more follow). `false`:
    /// nothing is left to do with the rest (the client is gone and nothing is being stored).
    async fn chunk(&mut self, data: Bytes, ended: bool) -> bool {
        let last = ended
            || self
                .length_left
                .is_some_and(|left| left <= data.len() as u64);
        if !last && !self.whole {
            self.stream_from_here().await;
        }
        self.keep(&data).await;
        if self.hung_up && self.kept.is_none() {
            return false;
        }
        if !matches!(self.client, Client::Streaming(_)) {
            return true;
        }
        if let Some(left) = &mut self.length_left {
            *left = left.saturating_sub(data.len() as u64);
            if *left == 0
                && let Client::Streaming(tx) = std::mem::replace(&mut self.client, Client::Gone)
            {
                // The chunk that completes the declared length waits for the record.
                hold(self.tail, Piece::LastChunk(tx, data));
                return true;
            }
        }
        if let Client::Streaming(tx) = &self.client
            && tx.send(Ok(data)).await.is_err()
        {
            self.client = Client::Gone;
            self.hung_up = true;
        }
        true
    }

    /// A held response whose body comes in pieces streams from here: its head and what is
    /// kept so far go out now (the piece that completes it is still held).
    async fn stream_from_here(&mut self) {
        if !matches!(self.client, Client::Holding(..)) {
            return;
        }
        if let Client::Holding(head, parts) = std::mem::replace(&mut self.client, Client::Gone) {
            self.client = Client::streaming(head, parts);
            let so_far = self.kept.as_ref().map(|k| k.clone().freeze());
            if let (Client::Streaming(tx), Some(so_far)) = (&self.client, so_far)
                && !so_far.is_empty()
            {
                let _ = tx.send(Ok(so_far)).await;
            }
        }
    }

    /// Adds `data` to the copy for the record, unless that grows past the limit: then the
    /// response is not stored, and not held either, so what was held goes out now.
    async fn keep(&mut self, data: &Bytes) {
        let Some(buf) = &mut self.kept else {
            return;
        };
        if buf.len() + data.len() <= self.max {
            buf.extend_from_slice(data);
            return;
        }
        tracing::warn!(
            limit = self.max,
            "idem: response body too large to store; sent but not stored"
        );
        crate::metrics::not_stored("http", "too_large");
        let so_far = std::mem::take(buf).freeze();
        self.kept = None;
        if !matches!(self.client, Client::Holding(..)) {
            return;
        }
        if let Client::Holding(head, parts) = std::mem::replace(&mut self.client, Client::Gone) {
            self.client = Client::streaming(head, parts);
        }
        if let Client::Streaming(tx) = &self.client {
            let _ = tx.send(Ok(so_far)).await;
        }
    }

    /// The body failed: its client gets the failure, not a complete response.
    async fn failed(self, e: axum::Error) {
        tracing::warn!(error = %e, "idem: the response body failed; not stored");
        match self.client {
            Client::Streaming(tx) => drop(tx.send(Err(e)).await),
            Client::Holding(head, _) => drop(head.send(StatusCode::BAD_GATEWAY.into_response())),
            Client::Gone => {}
        }
    }

    /// The body ended: hold the piece that completes it, and return the copy to store.
    fn finish(self) -> Option<Bytes> {
        let Copier {
            client,
            kept,
            tail,
            whole,
            ..
        } = self;
        let kept = kept.map(BytesMut::freeze);
        let last = match (client, &kept) {
            (Client::Streaming(tx), _) => Some(Piece::End(tx)),
            (Client::Holding(head, parts), Some(body)) if whole => {
                let whole = Response::from_parts(parts, Body::from(body.clone()));
                Some(Piece::Whole(head, whole))
            }
            (Client::Holding(head, parts), Some(body)) => {
                Some(Piece::Kept(head, parts, body.clone()))
            }
            (Client::Holding(..) | Client::Gone, _) => None,
        };
        if let Some(piece) = last {
            hold(tail, piece);
        }
        kept
    }
}

/// The client's end of a response body being copied by `run_route`.
struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, axum::Error>>,
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

/// A body that fails once its head is out: it is pending on its first poll (the server then
/// sends the head), and fails on the next.
struct FailingBody(Option<axum::Error>, bool);

impl http_body::Body for FailingBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        if !self.1 {
            self.1 = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(self.0.take().map(Err))
    }
}

pub(super) fn into_response<R: IntoResponse>(resp: Result<R, Infallible>) -> Response<Body> {
    match resp {
        Ok(r) => r.into_response(),
        Err(never) => match never {},
    }
}
