//! The HTTP layer's header handling: requests with any headers (key lines of any bytes, any
//! other fields) get an answer, never a panic; a request the layer accepted once is replayed
//! the second time, and a key it refused is a 400.
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use axum::body::{Body, to_bytes};
use axum::http::{HeaderName, HeaderValue, Request, StatusCode};
use axum::routing::post;
use idem_runtime::Idem;
use idem_runtime::http::{IdempotencyLayer, REPLAYED};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Idempotency-Key lines (zero, one or several), as raw bytes.
    keys: Vec<Vec<u8>>,
    /// Other header lines.
    others: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// A service whose route answers how many times it ran, on one store for the whole run
/// (inputs repeat: a first request that is already a replay or a mismatch is checked only for
/// its status).
fn app() -> axum::Router {
    static APP: OnceLock<axum::Router> = OnceLock::new();
    APP.get_or_init(|| runtime().block_on(async { build_app() }))
        .clone()
}

fn build_app() -> axum::Router {
    let idem = Idem::builder()
        .store(idem_runtime::store::MemoryStore::new())
        .build()
        .expect("idem");
    let counter = Arc::new(AtomicU64::new(0));
    axum::Router::new()
        .route(
            "/orders",
            post(move || async move { counter.fetch_add(1, Ordering::SeqCst).to_string() }),
        )
        .layer(IdempotencyLayer::new(idem).max_request_bytes(4096))
}

fn request(input: &Input) -> Request<Body> {
    let mut request = Request::post("/orders")
        .body(Body::from(input.body.clone()))
        .expect("request");
    let headers = request.headers_mut();
    for (name, value) in &input.others {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    let key_header = HeaderName::from_static("idempotency-key");
    headers.remove(&key_header);
    for key in &input.keys {
        if let Ok(value) = HeaderValue::from_bytes(key) {
            headers.append(&key_header, value);
        }
    }
    request
}

fuzz_target!(|input: Input| {
    let app = app();
    runtime().block_on(async {
        let first = app
            .clone()
            .oneshot(request(&input))
            .await
            .expect("infallible");
        let status = first.status();
        assert!(!status.is_server_error(), "{status}");
        let replayable = status.is_success() && !first.headers().contains_key(REPLAYED);
        let body = to_bytes(first.into_body(), usize::MAX).await.expect("body");
        let second = app
            .clone()
            .oneshot(request(&input))
            .await
            .expect("infallible");
        if replayable && !input.keys.is_empty() {
            assert_eq!(second.status(), status);
            assert!(second.headers().contains_key(REPLAYED));
            let again = to_bytes(second.into_body(), usize::MAX)
                .await
                .expect("body");
            assert_eq!(again, body);
        } else if status == StatusCode::BAD_REQUEST {
            assert_eq!(second.status(), StatusCode::BAD_REQUEST);
        }
    });
});
