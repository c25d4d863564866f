//! idem's errors as RFC 9457 problem documents (`application/problem+json`).

use axum::body::Body;
use axum::http::header::{HeaderValue, RETRY_AFTER};
use axum::http::{Response, StatusCode};
use axum::response::IntoResponse;

use crate::Error;

/// The problem document for an idem error, with its status and `Retry-After`.
pub(super) fn error_response(e: &Error) -> Response<Body> {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let title = match e {
        Error::InProgress { .. } => "A request with this idempotency key is in progress",
        Error::PayloadMismatch { .. } => "Idempotency key reused with a different request",
        Error::StoreUnavailable { .. } => "Idempotency store unavailable",
        Error::ResultNotRecorded { .. } => "The response could not be recorded; retry",
        Error::NotCommitted { .. } => "The request was not committed; retry",
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
    if matches!(
        e,
        Error::StoreUnavailable { .. } | Error::NotCommitted { .. }
    ) {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// An RFC 9457 problem document.
pub(super) fn problem(status: StatusCode, kind: &str, title: &str, detail: &str) -> Response<Body> {
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

impl IntoResponse for Error {
    /// The error as a problem document with its status (409 with `Retry-After`, 422, 400, 503).
    fn into_response(self) -> axum::response::Response {
        error_response(&self)
    }
}
