//! A route's response as it is stored and replayed.

use axum::body::Body;
use axum::http::header::{HeaderName, HeaderValue};
use axum::http::{Response, StatusCode};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::REPLAYED;

/// A response as it is replayed: status, the allowlisted headers, and the body.
///
/// Stored as JSON `{"status", "headers": [[name, bytes]], "body": {"Text": ..} | {"Base64": ..}}`:
/// text bodies (most API responses) stay readable in the store; others are base64, a third
/// larger (JSON would write bytes as an array of numbers, three to four times larger). A
/// stored response that does not decode into a valid one (a bad status, header or base64) is
/// an [`Error::Decode`], never a made-up response.
#[derive(Debug, Deserialize)]
#[serde(try_from = "StoredForm")]
pub(super) struct StoredResponse {
    pub(super) status: StatusCode,
    pub(super) headers: Vec<(HeaderName, HeaderValue)>,
    pub(super) body: Bytes,
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
        // RFC 9110 defines 100 to 599; the `http` crate would take any three digits.
        let status = StatusCode::from_u16(form.status)
            .ok()
            .filter(|s| s.as_u16() <= 599)
            .ok_or_else(|| format!("stored status {} is not an HTTP status", form.status))?;
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

impl StoredResponse {
    /// The stored response, as a replay.
    pub(super) fn replayed(self) -> Response<Body> {
        let mut resp = Response::new(Body::from(self.body));
        *resp.status_mut() = self.status;
        for (name, value) in self.headers {
            resp.headers_mut().append(name, value);
        }
        resp.headers_mut()
            .insert(REPLAYED, HeaderValue::from_static("true"));
        resp
    }
}
