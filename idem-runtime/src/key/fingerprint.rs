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

use std::fmt;

use serde::ser::{self, Serialize};

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

/// The hashing serializer. Public only because [`FingerprintArg`] names it.
#[doc(hidden)]
pub struct Sink<'h>(&'h mut Buffered);

/// A `Serialize` impl failed while fingerprinting.
#[doc(hidden)]
#[derive(Debug)]
pub struct FpError(String);

impl fmt::Display for FpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FpError {}

impl ser::Error for FpError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        FpError(msg.to_string())
    }
}

// One tag byte per kind of value. Containers end with END so that a sequence of values is
// never mistaken for a longer or shorter one.
const BOOL: u8 = 1;
const INT: u8 = 2;
const BIG_UINT: u8 = 3;
const FLOAT: u8 = 4;
const CHAR: u8 = 5;
const STR: u8 = 6;
const BYTES: u8 = 7;
const NONE: u8 = 8;
const SOME: u8 = 9;
const UNIT: u8 = 10;
const VARIANT: u8 = 11;
const SEQ: u8 = 12;
const MAP: u8 = 13;
const STRUCT: u8 = 14;
const END: u8 = 15;

impl Sink<'_> {
    fn tag(&mut self, tag: u8) {
        self.0.write(&[tag]);
    }

    fn len_prefixed(&mut self, tag: u8, bytes: &[u8]) {
        self.tag(tag);
        self.0.write(&(bytes.len() as u64).to_le_bytes());
        self.0.write(bytes);
    }

    fn int(&mut self, v: i128) {
        self.tag(INT);
        self.0.write(&v.to_le_bytes());
    }
}

macro_rules! signed {
    ($($name:ident: $ty:ty),*) => {$(
        fn $name(self, v: $ty) -> Result<(), FpError> {
            self.int(i128::from(v));
            Ok(())
        }
    )*};
}

impl<'a, 'h> ser::Serializer for &'a mut Sink<'h> {
    type Ok = ();
    type Error = FpError;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = MapSink<'a, 'h>;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn serialize_bool(self, v: bool) -> Result<(), FpError> {
        self.0.write(&[BOOL, u8::from(v)]);
        Ok(())
    }

    signed!(serialize_i8: i8, serialize_i16: i16, serialize_i32: i32, serialize_i64: i64,
        serialize_i128: i128, serialize_u8: u8, serialize_u16: u16, serialize_u32: u32,
        serialize_u64: u64);

    fn serialize_u128(self, v: u128) -> Result<(), FpError> {
        match i128::try_from(v) {
            Ok(v) => self.int(v),
            Err(_) => {
                self.tag(BIG_UINT);
                self.0.write(&v.to_le_bytes());
            }
        }
        Ok(())
    }

    fn serialize_f32(self, v: f32) -> Result<(), FpError> {
        self.serialize_f64(f64::from(v))
    }

    fn serialize_f64(self, v: f64) -> Result<(), FpError> {
        // -0.0 == 0.0 and every NaN is a NaN: equal values hash equally.
        let v = if v == 0.0 {
            0.0
        } else if v.is_nan() {
            f64::NAN
        } else {
            v
        };
        self.tag(FLOAT);
        self.0.write(&v.to_bits().to_le_bytes());
        Ok(())
    }

    fn serialize_char(self, v: char) -> Result<(), FpError> {
        self.tag(CHAR);
        self.0.write(&u32::from(v).to_le_bytes());
        Ok(())
    }

    fn serialize_str(self, v: &str) -> Result<(), FpError> {
        self.len_prefixed(STR, v.as_bytes());
        Ok(())
    }

    fn serialize_bytes(self, v: &[u8]) -> Result<(), FpError> {
        self.len_prefixed(BYTES, v);
        Ok(())
    }

    fn serialize_none(self) -> Result<(), FpError> {
        self.tag(NONE);
        Ok(())
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), FpError> {
        self.tag(SOME);
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<(), FpError> {
        self.tag(UNIT);
        Ok(())
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), FpError> {
        self.serialize_unit()
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<(), FpError> {
        self.len_prefixed(VARIANT, variant.as_bytes());
        self.serialize_unit()
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), FpError> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), FpError> {
        self.len_prefixed(VARIANT, variant.as_bytes());
        value.serialize(self)
    }

    fn serialize_seq(self, _len: Option<usize>) -> Result<Self, FpError> {
        self.tag(SEQ);
        Ok(self)
    }

    fn serialize_tuple(self, len: usize) -> Result<Self, FpError> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<Self, FpError> {
        self.serialize_seq(Some(len))
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self, FpError> {
        self.len_prefixed(VARIANT, variant.as_bytes());
        self.serialize_seq(Some(len))
    }

    fn serialize_map(self, _len: Option<usize>) -> Result<MapSink<'a, 'h>, FpError> {
        Ok(MapSink {
            outer: self,
            entries: Vec::new(),
            entry: None,
        })
    }

    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<Self, FpError> {
        self.tag(STRUCT);
        Ok(self)
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self, FpError> {
        self.len_prefixed(VARIANT, variant.as_bytes());
        self.tag(STRUCT);
        Ok(self)
    }
}

macro_rules! seq_like {
    ($($trait:ident :: $method:ident),*) => {$(
        impl ser::$trait for &mut Sink<'_> {
            type Ok = ();
            type Error = FpError;

            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), FpError> {
                value.serialize(&mut **self)
            }

            fn end(self) -> Result<(), FpError> {
                self.tag(END);
                Ok(())
            }
        }
    )*};
}
seq_like!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

macro_rules! struct_like {
    ($($trait:ident),*) => {$(
        impl ser::$trait for &mut Sink<'_> {
            type Ok = ();
            type Error = FpError;

            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> Result<(), FpError> {
                self.len_prefixed(STR, key.as_bytes());
                value.serialize(&mut **self)
            }

            fn end(self) -> Result<(), FpError> {
                self.tag(END);
                Ok(())
            }
        }
    )*};
}
struct_like!(SerializeStruct, SerializeStructVariant);

/// Hashes each entry on its own and combines the sorted entry hashes, so the map's hash does
/// not depend on iteration order.
#[doc(hidden)]
pub struct MapSink<'a, 'h> {
    outer: &'a mut Sink<'h>,
    entries: Vec<[u8; 32]>,
    entry: Option<Buffered>,
}

impl ser::SerializeMap for MapSink<'_, '_> {
    type Ok = ();
    type Error = FpError;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), FpError> {
        let mut hasher = Buffered::new();
        key.serialize(&mut Sink(&mut hasher))?;
        self.entry = Some(hasher);
        Ok(())
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), FpError> {
        let mut hasher = self
            .entry
            .take()
            .ok_or_else(|| FpError("map value serialized before its key".into()))?;
        value.serialize(&mut Sink(&mut hasher))?;
        self.entries.push(*hasher.finalize().as_bytes());
        Ok(())
    }

    fn end(mut self) -> Result<(), FpError> {
        self.entries.sort_unstable();
        self.outer.tag(MAP);
        self.outer
            .0
            .write(&(self.entries.len() as u64).to_le_bytes());
        for entry in &self.entries {
            self.outer.0.write(entry);
        }
        self.outer.tag(END);
        Ok(())
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
