//! Payload fingerprints: a hash of a call's arguments, to tell a retry from a reused key.
//!
//! The arguments are fed through serde into a hashing serializer rather than a text format:
//! nothing is allocated for plain data, and maps hash the same whatever their iteration
//! order, so a `HashMap` argument gives the same fingerprint in every process (a JSON
//! encoding would not). Sets cannot get the same treatment: serde presents a `HashSet` as a
//! plain sequence, indistinguishable from a `Vec` whose order matters, so a `HashSet`
//! argument hashes in its (random) iteration order. Use a `BTreeSet`, `skip` it, or give
//! the attribute a `fingerprint = ..` that sorts it. Every value is written with a type tag and lengths, so different
//! shapes cannot produce the same byte stream. Integer widths are not part of the hash
//! (`5u32` and `5i64` agree) so widening a field does not invalidate in-flight keys;
//! struct and enum *names* are not hashed either, but field and variant names are.

mod sink;

use std::fmt;

use serde::Serialize;

use sink::{FpError, Sink};

/// A 128-bit hash of a call's payload (its non-skipped arguments, or the attribute's
/// `fingerprint = ..` value).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 16]);

impl Fingerprint {
    /// The fingerprint's bytes, as stores keep them.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// A fingerprint read back from a store; `None` when the bytes have the wrong length.
    pub fn from_bytes(bytes: &[u8]) -> Option<Fingerprint> {
        bytes.try_into().ok().map(Fingerprint)
    }

    /// The fingerprint of one serializable value.
    pub fn of<T: Serialize + ?Sized>(value: &T) -> Result<Fingerprint, String> {
        let mut fp = Fingerprinter::new();
        fp.arg(value);
        fp.finish()
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint(")?;
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

/// Accumulates the arguments of one call into a [`Fingerprint`].
pub struct Fingerprinter {
    hasher: Buffered,
    error: Option<String>,
}

/// A hasher fed through a small buffer: the serializer writes many tiny pieces (tags,
/// lengths), and one `update` per piece would cost more than the hashing itself.
pub(super) struct Buffered {
    hasher: blake3::Hasher,
    buf: [u8; 256],
    len: usize,
}

impl Buffered {
    fn new() -> Buffered {
        Buffered {
            hasher: blake3::Hasher::new(),
            buf: [0; 256],
            len: 0,
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() > self.buf.len() {
            self.hasher.update(&self.buf[..self.len]);
            self.len = 0;
            if bytes.len() > self.buf.len() {
                self.hasher.update(bytes);
                return;
            }
        }
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    fn finalize(mut self) -> blake3::Hash {
        self.hasher.update(&self.buf[..self.len]);
        self.hasher.finalize()
    }
}

impl Default for Fingerprinter {
    fn default() -> Self {
        Self::new()
    }
}

impl Fingerprinter {
    /// An empty fingerprint.
    pub fn new() -> Fingerprinter {
        Fingerprinter {
            hasher: Buffered::new(),
            error: None,
        }
    }

    /// Adds the next argument.
    pub fn arg<A: FingerprintArg + ?Sized>(&mut self, arg: &A) {
        if self.error.is_none()
            && let Err(e) = arg.write_to(&mut Sink(&mut self.hasher))
        {
            self.error = Some(e.0);
        }
    }

    /// The fingerprint, or the message of the first argument whose `Serialize` impl failed.
    pub fn finish(self) -> Result<Fingerprint, String> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let mut out = [0u8; 16];
        out.copy_from_slice(&self.hasher.finalize().as_bytes()[..16]);
        Ok(Fingerprint(out))
    }
}

/// An argument that can be part of a payload fingerprint: anything `Serialize`.
#[diagnostic::on_unimplemented(
    message = "`#[idempotent]` cannot fingerprint an argument of type `{Self}`: it is not `Serialize`",
    label = "this argument is part of the payload fingerprint, so it must be `Serialize`",
    note = "derive `serde::Serialize` for it, or leave it out of the fingerprint with `skip(..)` (handles such as pools and clients belong there)"
)]
pub trait FingerprintArg {
    #[doc(hidden)]
    fn write_to(&self, sink: &mut Sink<'_>) -> Result<(), FpError>;
}

impl<T: Serialize + ?Sized> FingerprintArg for T {
    fn write_to(&self, sink: &mut Sink<'_>) -> Result<(), FpError> {
        self.serialize(sink)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde::Serialize;
    use std::collections::{BTreeMap, HashMap};

    fn fp<T: Serialize + ?Sized>(v: &T) -> Fingerprint {
        Fingerprint::of(v).expect("serializable")
    }

    #[derive(Serialize)]
    struct Order {
        customer: String,
        cents: u64,
        note: Option<String>,
    }

    #[test]
    fn equal_payloads_agree_and_different_ones_do_not() {
        let a = Order {
            customer: "c1".into(),
            cents: 100,
            note: None,
        };
        let b = Order {
            customer: "c1".into(),
            cents: 100,
            note: None,
        };
        let c = Order {
            customer: "c1".into(),
            cents: 101,
            note: None,
        };
        assert_eq!(fp(&a), fp(&b));
        assert_ne!(fp(&a), fp(&c));
    }

    #[test]
    fn shapes_do_not_collide() {
        assert_ne!(fp(&("ab", "c")), fp(&("a", "bc")));
        assert_ne!(fp(&vec![vec![1], vec![]]), fp(&vec![vec![], vec![1]]));
        assert_ne!(fp(&Some(())), fp(&()));
        assert_ne!(fp(&None::<u8>), fp(&()));
        assert_ne!(fp(&"1"), fp(&1));
        assert_ne!(fp(&vec![1u8, 2]), fp(&serde_bytes_like(&[1, 2])));
    }

    fn serde_bytes_like(b: &[u8]) -> impl Serialize + '_ {
        struct B<'a>(&'a [u8]);
        impl Serialize for B<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(self.0)
            }
        }
        B(b)
    }

    #[test]
    fn integer_width_does_not_matter() {
        assert_eq!(fp(&5u32), fp(&5i64));
        assert_ne!(fp(&5u32), fp(&6u32));
        assert_ne!(fp(&u128::MAX), fp(&-1i128));
    }

    #[test]
    fn floats_compare_by_value() {
        assert_eq!(fp(&0.0f64), fp(&-0.0f64));
        assert_eq!(fp(&f64::NAN), fp(&-f64::NAN));
        assert_ne!(fp(&1.0f64), fp(&1.5f64));
    }

    #[test]
    fn a_failing_serialize_impl_is_reported() {
        struct Broken;
        impl Serialize for Broken {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("cannot serialize Broken"))
            }
        }
        let mut f = Fingerprinter::new();
        f.arg(&1);
        f.arg(&Broken);
        assert_eq!(f.finish().unwrap_err(), "cannot serialize Broken");
    }

    proptest! {
        #[test]
        fn hash_maps_fingerprint_the_same_in_any_order(entries in proptest::collection::vec((any::<String>(), any::<i64>()), 0..40)) {
            let hashed: HashMap<_, _> = entries.iter().cloned().collect();
            let sorted: BTreeMap<_, _> = entries.iter().cloned().collect();
            // A second HashMap built in reverse has its own random iteration order.
            let reversed: HashMap<_, _> = sorted.iter().rev().map(|(k, v)| (k.clone(), *v)).collect();
            prop_assert_eq!(fp(&hashed), fp(&sorted));
            prop_assert_eq!(fp(&hashed), fp(&reversed));
        }

        #[test]
        fn different_strings_fingerprint_differently(a in any::<String>(), b in any::<String>()) {
            prop_assume!(a != b);
            prop_assert_ne!(fp(&a), fp(&b));
        }
    }
}
