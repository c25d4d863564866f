//! The Idempotency-Key layer on a real axum server on 127.0.0.1, driven by a real HTTP
//! client: status codes, byte-for-byte replay, tenant isolation, concurrency, disconnects,
//! streaming and oversized bodies, and a handler annotated with `#[idempotent]` directly.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use idem_runtime::http::{IdempotencyLayer, Json};
use idem_runtime::store::{MemoryStore, Store};
use idem_runtime::{Error, Idem, idempotent};
use serde::Deserialize;

#[derive(Clone)]
struct App {
    idem: Idem,
    orders: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
}

#[derive(Deserialize, Default)]
struct Opts {
    #[serde(default)]
    sleep_ms: u64,
    #[serde(default)]
    size: usize,
}

async fn create_order(State(app): State<App>, Query(opts): Query<Opts>, body: String) -> Response {
    app.calls.fetch_add(1, SeqCst);
    // The effect first, then the slow part: a client that gives up in between must not cause
    // a second order.
    let n = app.orders.fetch_add(1, SeqCst) + 1;
    tokio::time::sleep(Duration::from_millis(opts.sleep_ms)).await;
    let json = format!(r#"{{"order_id":{n},"request":{body:?}}}"#);
    (
        StatusCode::CREATED,
        [
            ("content-type", "application/json".to_string()),
            ("location", format!("/orders/{n}")),
            ("x-request-id", format!("req-{}", fastrand::u64(..))),
        ],
        json,
    )
        .into_response()
}

/// Fails with 503 on odd calls: a failure that must not be stored.
async fn flaky(State(app): State<App>) -> Response {
    if app.calls.fetch_add(1, SeqCst) % 2 == 0 {
        return (StatusCode::SERVICE_UNAVAILABLE, "try again").into_response();
    }
    let n = app.orders.fetch_add(1, SeqCst) + 1;
    (StatusCode::CREATED, format!("order {n}")).into_response()
}

async fn big(State(app): State<App>, Query(opts): Query<Opts>) -> Response {
    app.orders.fetch_add(1, SeqCst);
    (StatusCode::OK, "x".repeat(opts.size)).into_response()
}

/// A binary body (not UTF-8): stored base64, replayed byte for byte.
async fn binary(State(app): State<App>) -> Response {
    let n = app.orders.fetch_add(1, SeqCst) as u8;
    let body: Vec<u8> = (0..=255u8).cycle().take(5_000).map(|b| b ^ n).collect();
    ([("content-type", "application/octet-stream")], body).into_response()
}

/// A first chunk at once, the rest two seconds later: the client must not wait for the end.
async fn slow_stream(State(app): State<App>) -> Response {
    app.orders.fetch_add(1, SeqCst);
    let stream = futures_util::stream::unfold(0, |i| async move {
        match i {
            0 => Some((Ok::<_, std::io::Error>(b"first\n".to_vec()), 1)),
            1 => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                Some((Ok(b"second\n".to_vec()), 2))
            }
            _ => None,
        }
    });
    Response::new(Body::from_stream(stream))
}

async fn stream(State(app): State<App>) -> Response {
    let n = app.orders.fetch_add(1, SeqCst) + 1;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..50)
        .map(|i| Ok(format!("chunk {i} of order {n}\n").into_bytes()))
        .collect();
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/plain")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap()
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Receipt {
    order_id: usize,
}

#[derive(Debug)]
struct ApiError(Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.0.into_response()
    }
}

/// A handler made idempotent with the attribute instead of the layer.
#[idempotent(
    key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()),
    runtime = &app.idem,
    skip(app, headers)
)]
async fn attributed(
    State(app): State<App>,
    headers: HeaderMap,
    body: String,
) -> Result<Json<Receipt>, ApiError> {
    let _ = body;
    Ok(Json(Receipt {
        order_id: app.orders.fetch_add(1, SeqCst) + 1,
    }))
}

struct Server {
    url: String,
    app: App,
    client: reqwest::Client,
}

async fn serve(store: Arc<dyn Store>) -> Server {
    let idem = Idem::builder()
        .shared_store(store)
        .default_wait("PT2S")
        .build()
        .unwrap();
    let app = App {
        idem: idem.clone(),
        orders: Arc::default(),
        calls: Arc::default(),
    };
    let layer = IdempotencyLayer::new(idem.clone())
        .principal(|req| {
            req.headers
                .get("x-tenant")?
                .to_str()
                .ok()
                .map(str::to_owned)
        })
        .replay_header("x-order-source")
        .max_response_bytes(64 * 1024)
        .max_request_bytes(16 * 1024);
    let router = Router::new()
        .route("/orders", post(create_order).layer(layer.clone()))
        .route(
            "/optional",
            post(create_order).layer(layer.clone().required(false)),
        )
        .route(
            "/reject",
            post(create_order).layer(layer.clone().reject_conflicts()),
        )
        .route("/flaky", post(flaky).layer(layer.clone()))
        .route("/big", post(big).layer(layer.clone()))
        .route("/stream", post(stream).layer(layer.clone()))
        .route("/binary", post(binary).layer(layer.clone()))
        .route("/slow-stream", post(slow_stream).layer(layer))
        .route("/attributed", post(attributed))
        .with_state(app.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    Server {
        url: format!("http://{addr}"),
        app,
        client: reqwest::Client::new(),
    }
}

async fn memory_server() -> Server {
    serve(Arc::new(MemoryStore::new())).await
}

impl Server {
    async fn post(&self, path: &str, key: Option<&str>, body: &str) -> reqwest::Response {
        let mut req = self
            .client
            .post(format!("{}{path}", self.url))
            .body(body.to_string());
        if let Some(key) = key {
            req = req.header("Idempotency-Key", key);
        }
        req.send().await.unwrap()
    }
}

async fn problem(resp: reqwest::Response, status: u16) -> serde_json::Value {
    assert_eq!(resp.status().as_u16(), status);
    assert_eq!(
        resp.headers()["content-type"],
        "application/problem+json",
        "errors are problem documents"
    );
    let json: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(json["status"], status);
    assert!(
        json["type"]
            .as_str()
            .unwrap()
            .starts_with("urn:idem:problem:")
    );
    json
}

#[tokio::test]
async fn a_retry_gets_the_first_response_byte_for_byte() {
    let s = memory_server().await;
    let first = s.post("/orders", Some("key-1"), r#"{"sku":"tea"}"#).await;
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_headers = first.headers().clone();
    let first_body = first.bytes().await.unwrap();

    let retry = s.post("/orders", Some("key-1"), r#"{"sku":"tea"}"#).await;
    assert_eq!(retry.status(), 201);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.headers()["location"], first_headers["location"]);
    assert_eq!(
        retry.headers()["content-type"],
        first_headers["content-type"]
    );
    assert!(
        retry.headers().get("x-request-id").is_none(),
        "headers outside the allowlist are not replayed"
    );
    assert_eq!(retry.bytes().await.unwrap(), first_body);
    assert_eq!(s.app.orders.load(SeqCst), 1);
}

#[tokio::test]
async fn the_standard_status_codes() {
    let s = memory_server().await;
    // Missing key on a route that requires one.
    let json = problem(s.post("/orders", None, "{}").await, 400).await;
    assert_eq!(json["type"], "urn:idem:problem:missing-key");
    // ...and on a route where it is optional, the request just runs.
    assert_eq!(s.post("/optional", None, "{}").await.status(), 201);
    // An empty key.
    problem(s.post("/orders", Some(""), "{}").await, 400).await;
    // Same key, different request.
    assert_eq!(
        s.post("/orders", Some("k"), r#"{"sku":"tea"}"#)
            .await
            .status(),
        201
    );
    let json = problem(
        s.post("/orders", Some("k"), r#"{"sku":"coffee"}"#).await,
        422,
    )
    .await;
    assert_eq!(json["type"], "urn:idem:problem:payload-mismatch");
    // Still in progress, on a route that rejects rather than waits.
    let slow = {
        let (client, url) = (s.client.clone(), s.url.clone());
        tokio::spawn(async move {
            client
                .post(format!("{url}/reject?sleep_ms=800"))
                .header("Idempotency-Key", "slow")
                .body("{}")
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resp = s.post("/reject?sleep_ms=800", Some("slow"), "{}").await;
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    problem(resp, 409).await;
    assert_eq!(slow.await.unwrap(), 201);
    // Too large a request to fingerprint.
    problem(
        s.post("/orders", Some("huge"), &"y".repeat(20_000)).await,
        413,
    )
    .await;
}

#[tokio::test]
async fn the_store_being_down_is_503() {
    struct Down;
    #[async_trait::async_trait]
    impl Store for Down {
        async fn reserve(
            &self,
            _: &idem_runtime::store::Claim<'_>,
        ) -> Result<idem_runtime::store::Reservation, idem_runtime::StoreError> {
            Err(idem_runtime::StoreError::msg("connection refused"))
        }
        async fn load(
            &self,
            _: &idem_runtime::RecordId,
        ) -> Result<Option<idem_runtime::store::Record>, idem_runtime::StoreError> {
            Err(idem_runtime::StoreError::msg("connection refused"))
        }
        async fn take_over(
            &self,
            _: &idem_runtime::store::Claim<'_>,
            _: idem_runtime::store::Fence,
        ) -> Result<bool, idem_runtime::StoreError> {
            Err(idem_runtime::StoreError::msg("connection refused"))
        }
        async fn heartbeat(
            &self,
            _: &idem_runtime::RecordId,
            _: idem_runtime::store::Fence,
            _: Duration,
        ) -> Result<bool, idem_runtime::StoreError> {
            Err(idem_runtime::StoreError::msg("connection refused"))
        }
        async fn finalize(
            &self,
            _: &idem_runtime::RecordId,
            _: idem_runtime::store::Fence,
            _: &idem_runtime::store::StoredResult,
            _: Duration,
        ) -> Result<bool, idem_runtime::StoreError> {
            Err(idem_runtime::StoreError::msg("connection refused"))
        }
        async fn release(
            &self,
            _: &idem_runtime::RecordId,
            _: idem_runtime::store::Fence,
        ) -> Result<bool, idem_runtime::StoreError> {
            Err(idem_runtime::StoreError::msg("connection refused"))
        }
        async fn purge(&self, _: u32) -> Result<u64, idem_runtime::StoreError> {
            Ok(0)
        }
        fn backend(&self) -> &'static str {
            "down"
        }
    }
    let s = serve(Arc::new(Down)).await;
    let resp = s.post("/orders", Some("k"), "{}").await;
    assert!(resp.headers().contains_key("retry-after"));
    let json = problem(resp, 503).await;
    assert_eq!(json["type"], "urn:idem:problem:store-unavailable");
    assert_eq!(
        s.app.calls.load(SeqCst),
        0,
        "fails closed: the route did not run"
    );
}

#[tokio::test]
async fn tenants_never_see_each_others_responses() {
    let s = memory_server().await;
    let send = |tenant: &'static str| {
        s.client
            .post(format!("{}/orders", s.url))
            .header("Idempotency-Key", "shared-key")
            .header("X-Tenant", tenant)
            .body("{}")
            .send()
    };
    let a = send("tenant-a").await.unwrap().text().await.unwrap();
    let b = send("tenant-b").await.unwrap();
    assert!(
        b.headers().get("idempotent-replayed").is_none(),
        "B ran fresh"
    );
    assert_ne!(b.text().await.unwrap(), a);
    let a_again = send("tenant-a").await.unwrap();
    assert_eq!(a_again.headers()["idempotent-replayed"], "true");
    assert_eq!(a_again.text().await.unwrap(), a);
    assert_eq!(s.app.orders.load(SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_create_one_order() {
    let s = memory_server().await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let (client, url) = (s.client.clone(), s.url.clone());
        tasks.spawn(async move {
            let resp = client
                .post(format!("{url}/orders?sleep_ms=200"))
                .header("Idempotency-Key", "storm")
                .body(r#"{"sku":"tea"}"#)
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        });
    }
    let mut bodies = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (status, body) = r.unwrap();
        assert_eq!(status, 201, "{body}");
        bodies.push(body);
    }
    assert!(
        bodies.iter().all(|b| b == &bodies[0]),
        "every client got the same order"
    );
    assert_eq!(s.app.orders.load(SeqCst), 1, "one order for 40 requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_leaves_no_stuck_key() {
    let s = memory_server().await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let gone = impatient
        .post(format!("{}/orders?sleep_ms=400", s.url))
        .header("Idempotency-Key", "hung-up")
        .body("{}")
        .send()
        .await;
    assert!(
        gone.is_err(),
        "the client gave up and closed the connection"
    );
    // The route had already placed the order: the retry gets that order back, whether it
    // arrives while the route still runs (it waits) or after (it is replayed).
    let retry = s.post("/orders?sleep_ms=400", Some("hung-up"), "{}").await;
    assert_eq!(retry.status(), 201);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(
        s.app.orders.load(SeqCst),
        1,
        "one order, though the first client hung up"
    );
}

#[tokio::test]
async fn binary_bodies_replay_byte_for_byte() {
    let s = memory_server().await;
    let first = s
        .post("/binary", Some("bin"), "")
        .await
        .bytes()
        .await
        .unwrap();
    let again = s.post("/binary", Some("bin"), "").await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["content-type"], "application/octet-stream");
    assert_eq!(again.bytes().await.unwrap(), first);
}

#[tokio::test]
async fn a_streamed_response_reaches_the_client_as_it_is_produced() {
    let s = memory_server().await;
    let start = std::time::Instant::now();
    let mut resp = s.post("/slow-stream", Some("sse"), "").await;
    let first = resp.chunk().await.unwrap().unwrap();
    assert_eq!(&first[..], b"first\n");
    assert!(
        start.elapsed() < Duration::from_millis(1_500),
        "not held back until the end"
    );
    assert_eq!(&resp.chunk().await.unwrap().unwrap()[..], b"second\n");
    let again = s.post("/slow-stream", Some("sse"), "").await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.text().await.unwrap(), "first\nsecond\n");
}

#[tokio::test]
async fn a_principal_named_like_the_anonymous_scope_is_still_its_own() {
    let s = memory_server().await;
    let anon = s
        .post("/orders", Some("k"), "{}")
        .await
        .text()
        .await
        .unwrap();
    for name in ["-", "anonymous"] {
        let resp = s
            .client
            .post(format!("{}/orders", s.url))
            .header("Idempotency-Key", "k")
            .header("X-Tenant", name)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert!(
            resp.headers().get("idempotent-replayed").is_none(),
            "{name}"
        );
        assert_ne!(resp.text().await.unwrap(), anon);
    }
}

#[tokio::test]
async fn an_unreadable_request_body_is_400_not_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = memory_server().await;
    let addr = s.url.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(
        b"POST /orders HTTP/1.1\r\nHost: x\r\nIdempotency-Key: k\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nnot hex\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let mut reply = vec![0; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut reply))
        .await
        .unwrap()
        .unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]);
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert_eq!(s.app.calls.load(SeqCst), 0);
}

#[tokio::test]
async fn failures_are_not_stored() {
    let s = memory_server().await;
    assert_eq!(s.post("/flaky", Some("f"), "{}").await.status(), 503);
    let retry = s.post("/flaky", Some("f"), "{}").await;
    assert_eq!(retry.status(), 201, "the retry ran the route again");
    assert!(retry.headers().get("idempotent-replayed").is_none());
    let again = s.post("/flaky", Some("f"), "{}").await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
}

#[tokio::test]
async fn streamed_bodies_are_replayed_and_oversized_ones_pass_through() {
    let s = memory_server().await;
    let first = s
        .post("/stream", Some("s"), "")
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        first
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count(),
        50
    );
    let again = s.post("/stream", Some("s"), "").await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.bytes().await.unwrap(), first);

    // 100 KiB is over the 64 KiB limit: sent in full, not stored, key released.
    let big = s.post("/big?size=102400", Some("b"), "").await;
    assert_eq!(big.status(), 200);
    assert_eq!(big.bytes().await.unwrap().len(), 102_400);
    let big_again = s.post("/big?size=102400", Some("b"), "").await;
    assert!(big_again.headers().get("idempotent-replayed").is_none());
    assert_eq!(big_again.bytes().await.unwrap().len(), 102_400);
    assert_eq!(
        s.app.orders.load(SeqCst),
        3,
        "the stream once, the big body twice"
    );
}

#[tokio::test]
async fn a_handler_with_the_attribute_works_too() {
    let s = memory_server().await;
    let first = s.post("/attributed", Some("a1"), "hello").await;
    assert_eq!(first.status(), 200);
    let body = first.text().await.unwrap();
    assert_eq!(body, r#"{"order_id":1}"#);
    let again = s.post("/attributed", Some("a1"), "hello").await;
    assert_eq!(again.text().await.unwrap(), body);
    let other = s.post("/attributed", Some("a1"), "bye").await;
    assert_eq!(
        other.status(),
        422,
        "the attribute fingerprints the body too"
    );
    assert_eq!(s.app.orders.load(SeqCst), 1);
}

#[tokio::test]
async fn responses_survive_in_a_sqlite_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = idem_runtime::store::SqliteStore::open(dir.path().join("http.db"))
        .await
        .unwrap();
    let s = serve(Arc::new(store.clone())).await;
    let first = s
        .post("/orders", Some("persist"), "{}")
        .await
        .text()
        .await
        .unwrap();
    // Another server process on the same database (its own empty cache).
    let s2 = serve(Arc::new(store)).await;
    let again = s2.post("/orders", Some("persist"), "{}").await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.text().await.unwrap(), first);
}

/// Regression: two `Idempotency-Key` lines ran under the first; RFC 9110 reads them as one
/// comma-joined value, so the key would depend on whether a proxy merged them.
#[tokio::test]
async fn two_key_header_lines_are_refused() {
    let s = memory_server().await;
    let resp = s
        .client
        .post(format!("{}/orders", s.url))
        .header("Idempotency-Key", "key-a")
        .header("Idempotency-Key", "key-b")
        .body("{}")
        .send()
        .await
        .unwrap();
    let json = problem(resp, 400).await;
    assert_eq!(json["type"], "urn:idem:problem:invalid-key");
    assert!(
        json["detail"].as_str().unwrap().contains("more than one"),
        "{json}"
    );
    // The merged form is refused too, rather than read as one key.
    problem(s.post("/orders", Some("key-a, key-b"), "{}").await, 400).await;
    assert_eq!(s.app.orders.load(SeqCst), 0, "the route never ran");
}

/// The draft's header is a structured-field string: `"abc"` is the key `abc`.
#[tokio::test]
async fn a_quoted_key_is_the_key_it_quotes() {
    let s = memory_server().await;
    assert_eq!(s.post("/orders", Some("abc"), "{}").await.status(), 201);
    let quoted = s.post("/orders", Some(r#""abc""#), "{}").await;
    assert_eq!(quoted.headers()["idempotent-replayed"], "true");
    let escaped = s.post("/orders", Some(r#""a\"b,c""#), "{}").await;
    assert_eq!(
        escaped.status(),
        201,
        "escapes and commas inside quotes are fine"
    );
    for bad in [r#""abc"#, r#""a\bc""#, r#""abc";p=1"#, r#"ab"c"#] {
        problem(s.post("/orders", Some(bad), "{}").await, 400).await;
    }
    assert_eq!(s.app.orders.load(SeqCst), 2);
}

/// Regression: the response reached the client before its record was written, so a client
/// that sent the request again as soon as it had the whole response (a double submit) was
/// told 409 "still in progress". Now the response completes only once its record is written.
async fn a_double_submit_after_the_response_is_replayed(store: Arc<dyn Store>) {
    let s = serve(store).await;
    for route in ["/reject", "/orders"] {
        let mut conflicts = 0;
        for i in 0..200 {
            let key = format!("double-{route}-{i}");
            let first = s.post(route, Some(&key), "{}").await;
            assert_eq!(first.status(), 201);
            let body = first.bytes().await.unwrap();
            let second = s.post(route, Some(&key), "{}").await;
            match second.status().as_u16() {
                201 => {
                    assert_eq!(second.headers()["idempotent-replayed"], "true");
                    assert_eq!(second.bytes().await.unwrap(), body);
                }
                409 => conflicts += 1,
                other => panic!("{route}: {other}"),
            }
        }
        assert_eq!(
            conflicts, 0,
            "{route}: a finished request was called in progress"
        );
    }
    assert_eq!(s.app.orders.load(SeqCst), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_submits_are_replayed_on_memory() {
    a_double_submit_after_the_response_is_replayed(Arc::new(MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_submits_are_replayed_on_sqlite() {
    let fixture = support::sqlite_store().await;
    a_double_submit_after_the_response_is_replayed(Arc::new(fixture.store.clone())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_submits_are_replayed_on_postgres() {
    if let Some(fixture) = support::postgres_store().await {
        a_double_submit_after_the_response_is_replayed(Arc::new(fixture.store.clone())).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_submits_are_replayed_on_mariadb() {
    if let Some(fixture) = support::mysql_store().await {
        a_double_submit_after_the_response_is_replayed(Arc::new(fixture.store.clone())).await;
    }
}

/// Regression: a layer namespace with `%2F` in it shared records with one with `/`.
#[tokio::test]
async fn layer_namespaces_that_differ_only_in_escapes_are_apart() {
    let idem = Idem::builder().store(MemoryStore::new()).build().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let client = reqwest::Client::new();
    // Two services on one store, their layers named apart only by how `/` is written, each
    // with the same route: the same key must still be two records.
    for ns in ["orders/create", "orders%2Fcreate"] {
        let count = count.clone();
        let router = Router::new().route(
            "/orders",
            post(move || async move { format!("run {}", count.fetch_add(1, SeqCst)) })
                .layer(IdempotencyLayer::new(idem.clone()).namespace(ns)),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/orders", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        let resp = client
            .post(url)
            .header("Idempotency-Key", "k")
            .send()
            .await
            .unwrap();
        assert!(resp.headers().get("idempotent-replayed").is_none(), "{ns}");
    }
    assert_eq!(count.load(SeqCst), 2);
}

/// A server whose finalizes can be slowed past the store timeout, for the break-off paths.
async fn slow_finalize_server() -> (String, Arc<support::Instrumented>, Arc<AtomicUsize>) {
    let store = support::Instrumented::new(Arc::new(MemoryStore::new()));
    let idem = Idem::builder()
        .shared_store(store.clone())
        .store_timeout("PT1S")
        .build()
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let layer = IdempotencyLayer::new(idem).reject_conflicts();
    let (r1, r2, r3) = (runs.clone(), runs.clone(), runs.clone());
    let router = Router::new()
        .route(
            "/chunked",
            post(move || async move {
                r1.fetch_add(1, SeqCst);
                let chunks = ["one ", "two ", "three"].map(Ok::<_, std::io::Error>);
                Body::from_stream(futures_util::stream::iter(chunks))
            })
            .layer(layer.clone()),
        )
        .route(
            "/sized",
            post(move || async move {
                r2.fetch_add(1, SeqCst);
                ([("content-length", "11")], "hello world")
            })
            .layer(layer.clone()),
        )
        .route(
            "/empty",
            post(move || async move {
                r3.fetch_add(1, SeqCst);
                StatusCode::NO_CONTENT
            })
            .layer(layer),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (format!("http://{addr}"), store, runs)
}

/// The piece that completes a response (the end of a chunked body, the last chunk of a body
/// with a `Content-Length`, the head of a response without a body) waits for the record: a
/// request sent again as soon as the first one's response is complete is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_response_completes_after_its_record() {
    let (url, _store, runs) = slow_finalize_server().await;
    let client = reqwest::Client::new();
    for path in ["/chunked", "/sized", "/empty"] {
        for i in 0..50 {
            let key = format!("{path}-{i}");
            let send = || {
                client
                    .post(format!("{url}{path}"))
                    .header("Idempotency-Key", &key)
                    .send()
            };
            let first = send().await.unwrap();
            let status = first.status();
            let body = first.bytes().await.unwrap();
            let second = send().await.unwrap();
            assert_eq!(
                second.status(),
                status,
                "{path}: a finished request was called in progress"
            );
            assert_eq!(second.headers()["idempotent-replayed"], "true");
            assert_eq!(second.bytes().await.unwrap(), body);
        }
    }
    assert_eq!(runs.load(SeqCst), 150);
}

/// A response whose record cannot be written in time is not completed: a streamed body is
/// broken off (the client sees an error, not a short body) and a response without a body is
/// replaced by the 503 problem. The client's retry then gets the recorded response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_that_cannot_be_recorded_is_broken_off() {
    let (url, store, runs) = slow_finalize_server().await;
    let client = reqwest::Client::new();
    support::Instrumented::set(&store.finalize_stall, Duration::from_millis(1_500));
    for path in ["/chunked", "/sized"] {
        let resp = client
            .post(format!("{url}{path}"))
            .header("Idempotency-Key", path)
            .send()
            .await
            .unwrap();
        assert!(
            resp.bytes().await.is_err(),
            "{path}: an unrecorded response must not arrive complete"
        );
    }
    let empty = client
        .post(format!("{url}/empty"))
        .header("Idempotency-Key", "empty")
        .send()
        .await
        .unwrap();
    assert_eq!(empty.status(), 503);
    support::Instrumented::set(&store.finalize_stall, Duration::ZERO);
    // Recording went on in the background: the retries are replays of what the routes did.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    for path in ["/chunked", "/sized", "/empty"] {
        let key = if path == "/empty" { "empty" } else { path };
        let retry = client
            .post(format!("{url}{path}"))
            .header("Idempotency-Key", key)
            .send()
            .await
            .unwrap();
        assert_eq!(retry.headers()["idempotent-replayed"], "true", "{path}");
    }
    assert_eq!(runs.load(SeqCst), 3, "each route ran once");
}

/// An HTTP/1.0 client cannot tell a body broken off from a complete one (the body ends when
/// the connection closes), so it gets the whole response once it is recorded, or an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_clients_get_the_whole_response_or_an_error() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (url, store, _runs) = slow_finalize_server().await;
    let addr = url.trim_start_matches("http://").to_string();
    let raw = |key: &'static str| {
        let addr = addr.clone();
        async move {
            let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = format!(
                "POST /chunked HTTP/1.0\r\nIdempotency-Key: {key}\r\nContent-Length: 0\r\n\r\n"
            );
            conn.write_all(request.as_bytes()).await.unwrap();
            let mut response = String::new();
            conn.read_to_string(&mut response).await.unwrap();
            response
        }
    };
    let ok = raw("h10-ok").await;
    assert!(ok.starts_with("HTTP/1.0 200"), "{ok}");
    assert!(
        ok.to_ascii_lowercase().contains("content-length: 13"),
        "{ok}"
    );
    assert!(ok.ends_with("one two three"), "{ok}");
    support::Instrumented::set(&store.finalize_stall, Duration::from_millis(1_500));
    let unrecorded = raw("h10-slow").await;
    assert!(unrecorded.starts_with("HTTP/1.0 503"), "{unrecorded}");
    assert!(!unrecorded.contains("one two three"), "{unrecorded}");
}

/// A stored response that does not decode into a valid one is an error, never a made-up
/// response (it used to be replayed as an empty 200).
#[tokio::test]
async fn a_stored_response_that_does_not_decode_is_a_500_problem() {
    use idem_runtime::store::{Claim, Fence, Reservation, StoredResult};
    let store = Arc::new(MemoryStore::new());
    let s = serve(store.clone()).await;
    let garbage: [&[u8]; 4] = [
        br#"{"status":999,"headers":[],"body":{"Text":"x"}}"#,
        br#"{"status":201,"headers":[],"body":{"Base64":"not base64!"}}"#,
        br#"{"status":201,"headers":[["bad header","x"]],"body":{"Text":"x"}}"#,
        b"not json",
    ];
    for (i, bytes) in garbage.into_iter().enumerate() {
        let key = format!("garbled-{i}");
        let id = idem_runtime::RecordId::new("anonymous POST /orders/http/v0", key.as_str());
        let fence = Fence::random();
        let claim = Claim {
            id: &id,
            fence,
            owner: "test",
            fingerprint: None,
            lease: Duration::from_secs(30),
        };
        assert!(matches!(
            store.reserve(&claim).await.unwrap(),
            Reservation::Acquired
        ));
        let result = StoredResult {
            codec: idem_runtime::Codec::Json,
            bytes: bytes.to_vec(),
        };
        assert!(
            store
                .finalize(&id, fence, &result, Duration::from_secs(60))
                .await
                .unwrap()
        );
        let json = problem(s.post("/orders", Some(&key), "{}").await, 500).await;
        assert_eq!(json["type"], "urn:idem:problem:decode", "{json}");
    }
    assert_eq!(
        s.app.orders.load(SeqCst),
        0,
        "nothing ran and nothing was made up"
    );
}

/// A setting the layer cannot use fails `check()` (for startup), and until then every
/// request through the layer, with a key or without, gets a 500 problem that names it; the
/// route never runs.
#[tokio::test]
async fn a_misconfigured_layer_fails_check_and_answers_500_naming_the_setting() {
    let idem = Idem::builder().store(MemoryStore::new()).build().unwrap();
    let good = IdempotencyLayer::new(idem.clone());
    good.check().expect("a layer with its defaults is fine");
    let bad_header = IdempotencyLayer::new(idem.clone()).header("not a header");
    let e = bad_header.check().unwrap_err().to_string();
    assert!(e.contains("\"not a header\" is not a header name"), "{e}");
    // The first setting that failed is the one reported.
    let layer = IdempotencyLayer::new(idem.clone()).ttl("soon").lease("P1Y");
    let e = layer.check().unwrap_err().to_string();
    assert!(e.contains("ttl"), "{e}");

    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let router = Router::new().route(
        "/orders",
        post(move || {
            counted.fetch_add(1, SeqCst);
            async { StatusCode::CREATED }
        })
        .layer(layer),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let client = reqwest::Client::new();
    for key in [Some("k1"), None] {
        let mut req = client.post(format!("http://{addr}/orders"));
        if let Some(key) = key {
            req = req.header("Idempotency-Key", key);
        }
        let json = problem(req.send().await.unwrap(), 500).await;
        assert!(
            json["type"].as_str().unwrap().ends_with("misconfigured"),
            "{json}"
        );
        assert!(json["detail"].as_str().unwrap().contains("ttl"), "{json}");
    }
    assert_eq!(runs.load(SeqCst), 0, "the route never ran");
}
