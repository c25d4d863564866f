//! Keys, scopes, record names and payload fingerprints.
//!
//! A record is named by a namespace (scope, fn path, version) and a key. Both are composed
//! here, once, with the size rules the stores rely on: a key longer than [`MAX_KEY_BYTES`]
//! is replaced by its digest, never truncated, so two long keys that share a prefix never
//! share a record. Keys are stored as bytes, so any string (NUL, newlines, emoji) is a key,
//! distinct from every other string; no collation folds `"A"` into `"a"`.

mod fingerprint;

use std::borrow::Cow;
use std::fmt;
use std::rc::Rc;
use std::sync::Arc;

pub use fingerprint::{Fingerprint, FingerprintArg, Fingerprinter};

/// Keys longer than this many bytes are stored as their digest (`#` and 64 hex digits).
pub const MAX_KEY_BYTES: usize = 255;
/// Scopes longer than this many bytes are stored as their digest.
pub const MAX_SCOPE_BYTES: usize = 128;
/// Namespaces longer than this many bytes are stored as their digest; stores size their
/// namespace column for it.
pub const MAX_NAMESPACE_BYTES: usize = 512;

/// Marks a digest standing in for a long key, scope or namespace. A user value that itself
/// starts with it is digested too, so a user cannot name another key's digest.
const DIGEST_MARK: char = '#';

/// A value that can be an idempotency key or scope.
///
/// `#[idempotent(key = ..)]` and `scope = ..` accept anything implementing it: strings,
/// integers, `char`, `uuid::Uuid` (feature `uuid`), `ulid::Ulid` (feature `ulid`), references
/// to them, and `Option`s of them (`None` means "no key":
/// [`Error::MissingKey`](crate::Error::MissingKey), or an unprotected call for `optional` fns).
///
/// Any other `Display` type is a key through [`DisplayKey`], on purpose and visibly: its text
/// becomes the record's name, so a type whose `Display` changes between releases (or prints
/// floats, or prints less than the whole value) would silently change or merge records.
/// Implement this trait for your own id types instead when they have a canonical text.
///
/// ```
/// use std::borrow::Cow;
/// struct OrderId(u64);
/// impl idem_runtime::IntoKey for OrderId {
///     fn to_key(&self) -> Option<Cow<'_, str>> {
///         Some(Cow::Owned(format!("order-{}", self.0)))
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be used as an idempotency key",
    label = "expected a string, an integer, a UUID, or an `Option` of one",
    note = "`#[idempotent]` keys and scopes accept `&str`, `String`, integers, `char`, `uuid::Uuid` (feature `uuid`), `ulid::Ulid` (feature `ulid`) and `Option`s of them; wrap another `Display` type in `idem_runtime::DisplayKey(&value)`, or implement `idem_runtime::IntoKey`"
)]
pub trait IntoKey {
    /// The key as a string, or `None` when there is no key.
    fn to_key(&self) -> Option<Cow<'_, str>>;
}

impl IntoKey for str {
    fn to_key(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(self))
    }
}

macro_rules! into_key_via_deref_str {
    ($($ty:ty),*) => {$(
        impl IntoKey for $ty {
            fn to_key(&self) -> Option<Cow<'_, str>> {
                Some(Cow::Borrowed(&**self))
            }
        }
    )*};
}
into_key_via_deref_str!(String, Cow<'_, str>, Box<str>, Arc<str>, Rc<str>);

macro_rules! into_key_via_display {
    ($($ty:ty),*) => {$(
        impl IntoKey for $ty {
            fn to_key(&self) -> Option<Cow<'_, str>> {
                Some(Cow::Owned(self.to_string()))
            }
        }
    )*};
}
into_key_via_display!(
    char, u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize
);

#[cfg(feature = "uuid")]
#[cfg_attr(docsrs, doc(cfg(feature = "uuid")))]
impl IntoKey for uuid::Uuid {
    /// Hyphenated and lowercase (`67e55044-10b1-426f-9247-bb680e5fe0c8`), the form most
    /// clients send in `Idempotency-Key`, so a key read from a header as a string and the same
    /// key parsed as a `Uuid` name the same record.
    fn to_key(&self) -> Option<Cow<'_, str>> {
        let mut buf = uuid::Uuid::encode_buffer();
        Some(Cow::Owned(
            self.hyphenated().encode_lower(&mut buf).to_owned(),
        ))
    }
}

#[cfg(feature = "ulid")]
#[cfg_attr(docsrs, doc(cfg(feature = "ulid")))]
impl IntoKey for ulid::Ulid {
    /// The canonical 26 characters of Crockford base 32 (uppercase).
    fn to_key(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Owned(self.to_string()))
    }
}

/// Any `Display` value as a key or scope: its text.
///
/// The explicit route for id types idem does not know. Wrap a reference, so the key is read
/// before the body takes the argument: `key = DisplayKey(&req.order_id)`.
///
/// ```
/// use idem_runtime::{DisplayKey, Error, idempotent};
///
/// struct OrderId(u64);
/// impl std::fmt::Display for OrderId {
///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
///         write!(f, "order-{}", self.0)
///     }
/// }
/// # #[derive(serde::Serialize)] struct Ship { order: u64 }
///
/// #[idempotent(key = DisplayKey(&order), skip(order))]
/// async fn ship(order: OrderId, req: Ship) -> Result<u64, Error> {
///     Ok(order.0)
/// }
/// ```
///
/// The text is the record's name: use it only for types whose `Display` is a stable,
/// complete and unambiguous rendering of the value (not floats, not messages).
#[derive(Clone, Copy, Debug)]
pub struct DisplayKey<T>(pub T);

impl<T: fmt::Display> IntoKey for DisplayKey<T> {
    fn to_key(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Owned(self.0.to_string()))
    }
}

impl<T: IntoKey + ?Sized> IntoKey for &T {
    fn to_key(&self) -> Option<Cow<'_, str>> {
        (**self).to_key()
    }
}

impl<T: IntoKey> IntoKey for Option<T> {
    fn to_key(&self) -> Option<Cow<'_, str>> {
        self.as_ref().and_then(IntoKey::to_key)
    }
}

/// The name of one record in a store: a namespace (scope, fn path, version) and a key.
///
/// Built by the engine; a [`Store`](crate::store::Store) reads it and writes both parts as
/// bytes. The namespace is at most [`MAX_NAMESPACE_BYTES`] bytes and the key at most
/// [`MAX_KEY_BYTES`].
/// Records order by namespace, then key, byte for byte: the order of the stores' primary
/// key, in which batches lock rows.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordId {
    namespace: Arc<str>,
    key: String,
}

impl RecordId {
    /// A record name from parts already composed (for store tests and tools). The engine
    /// composes names from the fn path, version, scope and key itself.
    pub fn new(namespace: impl Into<Arc<str>>, key: impl Into<String>) -> RecordId {
        RecordId {
            namespace: namespace.into(),
            key: key.into(),
        }
    }

    /// The namespace: `[scope/]fn-path/v<version>`.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The key as stored (a digest for long keys).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The key's hash, computed only if it is displayed (for span fields).
    pub(crate) fn lazy_hash(&self) -> LazyHash<'_> {
        LazyHash(self)
    }

    /// A short hash that identifies this record in messages without revealing the key.
    pub fn hash(&self) -> KeyHash {
        let mut h = blake3::Hasher::new();
        h.update(self.namespace.as_bytes());
        h.update(&[0xff]); // never part of UTF-8, so the boundary is unambiguous
        h.update(self.key.as_bytes());
        let mut out = [0u8; 8];
        out.copy_from_slice(&h.finalize().as_bytes()[..8]);
        KeyHash(out)
    }
}

impl fmt::Debug for RecordId {
    // Keys can carry customer data: debug output shows the namespace and the key's hash only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordId({}, key {})", self.namespace, self.hash())
    }
}

/// A namespace for one fn at one version, reused across calls.
///
/// An unscoped namespace is the same on every call, so the engine builds it once per fn.
#[derive(Clone, Debug)]
pub(crate) struct Namespace(Arc<str>);

impl Namespace {
    pub(crate) fn new(path: &str, version: u32, scope: Option<&str>) -> Namespace {
        // The path (a Rust path, or a `name = ".."` that may hold anything) has its '/'
        // escaped, so the last two '/'-separated parts are always the path and the version and
        // whatever comes before them is the scope, which needs no escaping. Escaping '%' first
        // keeps it injective: `a/b` and `a%2Fb` stay two names. Names without '%' are written
        // as they always were, so their records keep working.
        let path = escape(path, b"/");
        let ns = match scope {
            None => format!("{path}/v{version}"),
            Some(scope) => {
                let scope = fit(scope, MAX_SCOPE_BYTES);
                format!("{scope}/{path}/v{version}")
            }
        };
        Namespace(Arc::from(fit(&ns, MAX_NAMESPACE_BYTES)))
    }

    pub(crate) fn record(&self, key: String) -> RecordId {
        let key = match fit(&key, MAX_KEY_BYTES) {
            Cow::Borrowed(_) => key,
            Cow::Owned(digest) => digest,
        };
        RecordId {
            namespace: self.0.clone(),
            key,
        }
    }
}

/// `s` with `%` and each of the ASCII chars in `special` percent-encoded (`%` -> `%25`,
/// `/` -> `%2F`, ` ` -> `%20`): an injective map, so no two inputs share an output, and a
/// string with none of them is unchanged.
pub(crate) fn escape<'a>(s: &'a str, special: &[u8]) -> Cow<'a, str> {
    let escaped = |c: char| c == '%' || (c.is_ascii() && special.contains(&(c as u8)));
    if !s.contains(escaped) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if escaped(c) {
            // ASCII, so exactly two hex digits.
            out.push_str(&format!("%{:02X}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `s` itself when it is short enough and cannot be mistaken for a digest; its digest otherwise.
fn fit(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max && !s.starts_with(DIGEST_MARK) {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(format!(
            "{DIGEST_MARK}{}",
            blake3::hash(s.as_bytes()).to_hex()
        ))
    }
}

/// Displays a record's [`KeyHash`], hashing only when formatted.
pub(crate) struct LazyHash<'a>(&'a RecordId);

impl fmt::Display for LazyHash<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hash(), f)
    }
}

/// The first 8 bytes of a record's hash, shown as 16 hex digits.
///
/// Messages, logs and spans use it instead of the key itself.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash([u8; 8]);

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_common_types() {
        assert_eq!("a".to_key().as_deref(), Some("a"));
        assert_eq!(String::from("b").to_key().as_deref(), Some("b"));
        assert_eq!(42u64.to_key().as_deref(), Some("42"));
        assert_eq!((-7i32).to_key().as_deref(), Some("-7"));
        assert_eq!(Some("c").to_key().as_deref(), Some("c"));
        assert_eq!(None::<String>.to_key(), None);
        assert_eq!((&&"d").to_key().as_deref(), Some("d"));
        assert_eq!(Some(Some(5u8)).to_key().as_deref(), Some("5"));
    }

    #[test]
    fn display_types_are_keys_through_the_wrapper() {
        struct Ticket(u32);
        impl fmt::Display for Ticket {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "T-{}", self.0)
            }
        }
        let t = Ticket(9);
        assert_eq!(DisplayKey(&t).to_key().as_deref(), Some("T-9"));
        assert_eq!(Some(DisplayKey(&t)).to_key().as_deref(), Some("T-9"));
    }

    #[cfg(feature = "uuid")]
    #[test]
    fn uuids_are_keys_in_the_header_form() {
        let text = "67e55044-10b1-426f-9247-bb680e5fe0c8";
        let id: uuid::Uuid = text.to_uppercase().parse().expect("a uuid");
        assert_eq!(id.to_key().as_deref(), Some(text));
        assert_eq!(Some(id).to_key().as_deref(), Some(text));
    }

    #[cfg(feature = "ulid")]
    #[test]
    fn ulids_are_keys_in_their_canonical_form() {
        let text = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
        let id: ulid::Ulid = text.to_lowercase().parse().expect("a ulid");
        assert_eq!(id.to_key().as_deref(), Some(text));
    }

    #[test]
    fn namespaces_are_injective() {
        let a = Namespace::new("m::f", 0, Some("a/b"));
        let b = Namespace::new("b::f", 0, Some("a"));
        assert_ne!(a.0, b.0);
        assert_ne!(
            Namespace::new("m::f", 0, None).0,
            Namespace::new("m::f", 1, None).0
        );
        assert_ne!(
            Namespace::new("m::f", 0, None).0,
            Namespace::new("m::f", 0, Some("")).0
        );
        assert_eq!(&*Namespace::new("m::f", 3, Some("t1")).0, "t1/m::f/v3");
    }

    #[test]
    fn names_that_differ_only_in_escapes_stay_apart() {
        // The regression: `%` was not escaped, so these two names shared records.
        assert_ne!(
            Namespace::new("orders/create", 0, None).0,
            Namespace::new("orders%2Fcreate", 0, None).0
        );
        assert_eq!(
            &*Namespace::new("orders::create", 0, Some("t/1")).0,
            "t/1/orders::create/v0",
            "names and scopes without `%` are written as before"
        );
        assert_eq!(escape("a b%", b" "), "a%20b%25");
    }

    proptest::proptest! {
        #[test]
        fn distinct_names_scopes_and_versions_never_share_a_namespace(
            a in ("[a/%2F ]{1,6}", proptest::option::of("[a/%2F ]{0,6}"), 0u32..3),
            b in ("[a/%2F ]{1,6}", proptest::option::of("[a/%2F ]{0,6}"), 0u32..3),
        ) {
            let ns = |(path, scope, version): &(String, Option<String>, u32)| {
                Namespace::new(path, *version, scope.as_deref()).0
            };
            proptest::prop_assert_eq!(a == b, ns(&a) == ns(&b));
        }

        #[test]
        fn escaping_is_injective(a in "[a/%2F ]{0,8}", b in "[a/%2F ]{0,8}") {
            proptest::prop_assert_eq!(a == b, escape(&a, b"/ ") == escape(&b, b"/ "));
        }
    }

    #[test]
    fn long_keys_are_digested_not_truncated() {
        let ns = Namespace::new("m::f", 0, None);
        let long_a = format!("{}a", "x".repeat(300));
        let long_b = format!("{}b", "x".repeat(300));
        let (a, b) = (ns.record(long_a), ns.record(long_b));
        assert_ne!(a.key(), b.key());
        assert!(a.key().len() <= MAX_KEY_BYTES && a.key().starts_with('#'));
        let exact = "k".repeat(MAX_KEY_BYTES);
        assert_eq!(
            ns.record(exact.clone()).key(),
            exact,
            "a key at the limit is kept as is"
        );
    }

    #[test]
    fn a_key_cannot_impersonate_a_digest() {
        let ns = Namespace::new("m::f", 0, None);
        let long = "y".repeat(400);
        let digest = ns.record(long).key().to_string();
        assert_ne!(ns.record(digest.clone()).key(), digest);
    }

    #[test]
    fn odd_bytes_are_kept_verbatim() {
        let ns = Namespace::new("m::f", 0, None);
        for k in ["a\0b", "line\nbreak", "🦀", "A", "a", "a ", "' OR 1=1 --"] {
            assert_eq!(ns.record(k.to_string()).key(), k);
        }
    }

    #[test]
    fn debug_output_hides_the_key() {
        let id = Namespace::new("m::f", 0, None).record("card-4242".into());
        let shown = format!("{id:?}");
        assert!(!shown.contains("4242"), "{shown}");
        assert_eq!(id.hash().to_string().len(), 16);
    }
}
