//! The `#[idempotent]` attribute. Use it through `idem_runtime`, which re-exports it and
//! holds everything it expands to; this crate only parses, checks and rewrites the fn.

mod args;
mod expand;

use proc_macro::TokenStream;

/// Makes an async fn safe to retry: the first call with a key runs the body and stores its
/// `Ok` value; later calls with the same key get that value back. See `idem_runtime`.
#[proc_macro_attribute]
pub fn idempotent(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::idempotent(attr.into(), item.into()).into()
}
