// The README's examples are complete programs that use the SQLite store and the axum layer;
// they are the crate docs (and doctests) when those features are on (docs.rs builds with all
// features, see Cargo.toml).
#![cfg_attr(all(feature = "sqlite", feature = "axum"), doc = include_str!("../../README.md"))]
#![cfg_attr(
    not(all(feature = "sqlite", feature = "axum")),
    doc = "Make async functions safe to retry with `#[idempotent]`. The full guide is the README (built into these docs with the `sqlite` and `axum` features)."
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod broker;
mod cache;
mod codec;
mod config;
#[cfg(feature = "conformance")]
pub mod conformance;
mod engine;
mod error;
#[cfg(feature = "axum")]
pub mod http;
mod key;
pub mod metrics;
mod outcome;
mod purge;
mod runtime;
pub mod store;
mod switch;

#[doc(hidden)]
pub mod __private;

pub use codec::{Codec, IdempotentError, UnknownCodec};
pub use config::{IdemBuilder, IdemConfig, IntoDuration, defaults};
pub use error::{Error, StoreError};
pub use key::{
    DisplayKey, Fingerprint, IntoKey, KeyHash, MAX_KEY_BYTES, MAX_NAMESPACE_BYTES, MAX_SCOPE_BYTES,
    RecordId,
};
pub use outcome::{Outcome, observe};
pub use runtime::Idem;
pub use switch::ENV_VAR as DISABLED_ENV_VAR;

#[cfg(feature = "_sql")]
pub use engine::tx::TxDatabase;

/// Makes an async fn safe to retry. See the [crate docs](crate) for the arguments.
#[cfg(feature = "macros")]
pub use idem_macros::idempotent;
