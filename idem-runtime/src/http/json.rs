//! [`Json`]: a response body `#[idempotent]` can store.

use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};

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
