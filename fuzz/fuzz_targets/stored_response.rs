//! Replaying stored HTTP responses that are arbitrary bytes: the client gets the stored
//! response (marked as replayed) or a 500 problem saying the record does not decode, never a
//! made-up response and never a panic.
#![no_main]

use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use idem_runtime::http::IdempotencyLayer;
use idem_runtime::store::StoredResult;
use idem_runtime::{Codec, Idem};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

#[path = "common/replaying.rs"]
mod replaying;
use replaying::{RESULT, Replaying};

fn setup() -> &'static (tokio::runtime::Runtime, axum::Router) {
    static SETUP: OnceLock<(tokio::runtime::Runtime, axum::Router)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let app = rt.block_on(async {
            let idem = Idem::builder()
                .store(Replaying)
                .local_cache(0)
                .build()
                .expect("idem");
            axum::Router::new()
                .route("/orders", post(|| async { "never runs" }))
                .layer(IdempotencyLayer::new(idem))
        });
        (rt, app)
    })
}

fuzz_target!(|bytes: &[u8]| {
    let (rt, app) = setup();
    *RESULT.lock().expect("lock") = Some(StoredResult {
        codec: Codec::Json,
        bytes: bytes.to_vec(),
    });
    rt.block_on(async {
        let request = Request::post("/orders")
            .header("idempotency-key", "k")
            .body(Body::empty())
            .expect("request");
        let response = app.clone().oneshot(request).await.expect("infallible");
        let replayed = response
            .headers()
            .contains_key(idem_runtime::http::REPLAYED);
        assert!(
            replayed
                || response.status() == StatusCode::INTERNAL_SERVER_ERROR
                || response.status() == StatusCode::UNPROCESSABLE_ENTITY,
            "{} without the replay header",
            response.status()
        );
    });
});
