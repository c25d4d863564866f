//! How a fn's result is turned into stored bytes and back.
//!
//! Results are JSON. It is self-describing, so a return type that changed shape fails to
//! decode with a message (and the caller gets [`Error::Decode`](crate::Error::Decode))
//! instead of silently decoding into the wrong fields, as a positional binary format would.
//! The `codec` column records the encoding and whether the bytes are the fn's value or a
//! stored error (`cache_errors = true`), so other encodings can be added later without
//! reinterpreting old rows.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// How a stored result's bytes are encoded, and what they hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Codec {
    /// JSON of the fn's `Ok` value.
    Json,
    /// JSON of the fn's `Err` value (fns declared with `cache_errors = true`).
    JsonError,
}

impl Codec {
    /// The name stored in the `codec` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Codec::Json => "json",
            Codec::JsonError => "json+error",
        }
    }

    /// Whether the bytes hold an error rather than a value.
    pub fn is_error(self) -> bool {
        matches!(self, Codec::JsonError)
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `codec` column holding a name this version of idem does not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownCodec(pub String);

impl fmt::Display for UnknownCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown codec {:?}", self.0)
    }
}

impl std::error::Error for UnknownCodec {}

impl FromStr for Codec {
    type Err = UnknownCodec;

    fn from_str(s: &str) -> Result<Codec, UnknownCodec> {
        match s {
            "json" => Ok(Codec::Json),
            "json+error" => Ok(Codec::JsonError),
            other => Err(UnknownCodec(other.to_string())),
        }
    }
}

/// How a fn's results are stored: its `Ok` values only, or its `Err` values too.
pub trait ResultCodec<T, E> {
    /// What to store for `out`; `None` when it is not stored (an `Err` of a fn that does not
    /// cache errors).
    fn encode(out: &Result<T, E>) -> Option<(Codec, Result<Vec<u8>, String>)>;
    /// The stored result back.
    fn decode(codec: Codec, bytes: &[u8]) -> Result<Result<T, E>, String>;
}

/// Stores `Ok` values; an `Err` releases the key so a retry runs again.
pub struct ValuesOnly;

impl<T: Serialize + DeserializeOwned, E> ResultCodec<T, E> for ValuesOnly {
    fn encode(out: &Result<T, E>) -> Option<(Codec, Result<Vec<u8>, String>)> {
        match out {
            Ok(v) => Some((Codec::Json, encode(v))),
            Err(_) => None,
        }
    }

    fn decode(codec: Codec, bytes: &[u8]) -> Result<Result<T, E>, String> {
        match codec {
            Codec::Json => decode(bytes).map(Ok),
            Codec::JsonError => {
                Err("the record holds a stored error, but this fn no longer caches errors".into())
            }
        }
    }
}

/// Stores `Ok` and `Err` values (`cache_errors = true`).
pub struct ValuesAndErrors;

impl<T, E> ResultCodec<T, E> for ValuesAndErrors
where
    T: Serialize + DeserializeOwned,
    E: Serialize + DeserializeOwned,
{
    fn encode(out: &Result<T, E>) -> Option<(Codec, Result<Vec<u8>, String>)> {
        Some(match out {
            Ok(v) => (Codec::Json, encode(v)),
            Err(e) => (Codec::JsonError, encode(e)),
        })
    }

    fn decode(codec: Codec, bytes: &[u8]) -> Result<Result<T, E>, String> {
        match codec {
            Codec::Json => decode(bytes).map(Ok),
            Codec::JsonError => decode(bytes).map(Err),
        }
    }
}

/// An error type that tells final errors from transient ones, for
/// `#[idempotent(cache_errors = "final")]`.
///
/// A final error is the answer to this request, however often it is sent (a declined card, an
/// unknown account): it is stored and replayed like a value, so a retry does not run the body
/// again. A transient one (a timeout, a dependency that was down) releases the key, so the
/// retry runs the body again and may succeed.
///
/// ```
/// use idem_runtime::{Error, IdempotentError, idempotent};
///
/// #[derive(Debug, serde::Serialize, serde::Deserialize)]
/// enum PayError {
///     Declined,
///     Timeout,
///     Idem(String),
/// }
///
/// impl IdempotentError for PayError {
///     fn is_final(&self) -> bool {
///         matches!(self, PayError::Declined)
///     }
/// }
/// # impl From<Error> for PayError {
/// #     fn from(e: Error) -> Self { PayError::Idem(e.to_string()) }
/// # }
///
/// #[idempotent(key = id, cache_errors = "final")]
/// async fn pay(id: u64) -> Result<u64, PayError> {
///     Err(PayError::Declined)
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`#[idempotent(cache_errors = \"final\")]` needs `{Self}: idem_runtime::IdempotentError` to tell final errors from transient ones",
    label = "`{Self}` does not say which of its errors are final",
    note = "implement `idem_runtime::IdempotentError` for the error type (`fn is_final(&self) -> bool`), or use `cache_errors = true` to store every error"
)]
pub trait IdempotentError {
    /// Whether this error is the final answer (stored and replayed) rather than a transient
    /// failure (the key is released so a retry runs the body again).
    fn is_final(&self) -> bool;
}

/// Stores `Ok` values and the final `Err` values (`cache_errors = "final"`); a transient
/// `Err` releases the key.
pub struct ValuesAndFinalErrors;

impl<T, E> ResultCodec<T, E> for ValuesAndFinalErrors
where
    T: Serialize + DeserializeOwned,
    E: IdempotentError + Serialize + DeserializeOwned,
{
    fn encode(out: &Result<T, E>) -> Option<(Codec, Result<Vec<u8>, String>)> {
        match out {
            Err(e) if !e.is_final() => None,
            stored => ValuesAndErrors::encode(stored),
        }
    }

    fn decode(codec: Codec, bytes: &[u8]) -> Result<Result<T, E>, String> {
        <ValuesAndErrors as ResultCodec<T, E>>::decode(codec, bytes)
    }
}

pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec(value).map_err(|e| e.to_string())
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_names_round_trip() {
        for c in [Codec::Json, Codec::JsonError] {
            assert_eq!(c.as_str().parse::<Codec>(), Ok(c));
        }
        assert!("msgpack".parse::<Codec>().is_err());
    }

    #[test]
    fn a_changed_type_fails_to_decode() {
        #[derive(serde::Serialize)]
        struct V1 {
            id: u32,
        }
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct V2 {
            id: u32,
            total: u64,
        }
        let bytes = encode(&V1 { id: 1 }).expect("encodes");
        let err = decode::<V2>(&bytes).unwrap_err();
        assert!(err.contains("total"), "{err}");
    }
}
