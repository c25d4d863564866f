//! The hashing serializer: every serde value written as tagged, length-prefixed bytes into
//! the fingerprint's hasher, with map entries hashed apart and combined in an
//! order-independent way.

use std::fmt;

use serde::ser::{self, Serialize};

use super::Buffered;

/// The hashing serializer. Public only because [`FingerprintArg`] names it.
#[doc(hidden)]
pub struct Sink<'h>(pub(super) &'h mut Buffered);

/// A `Serialize` impl failed while fingerprinting.
#[doc(hidden)]
#[derive(Debug)]
pub struct FpError(pub(super) String);

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
