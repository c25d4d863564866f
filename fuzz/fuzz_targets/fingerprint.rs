//! The payload fingerprint over serde values of any shape: it never panics, equal values
//! give equal fingerprints, and a map's fingerprint does not depend on its entries' order.
#![no_main]

use arbitrary::Arbitrary;
use idem_runtime::Fingerprint;
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};

/// A value using most of serde's data model.
#[derive(Arbitrary, Clone, Debug, Serialize)]
enum Value {
    Unit,
    Bool(bool),
    I8(i8),
    I64(i64),
    I128(i128),
    U16(u16),
    U128(u128),
    F32(f32),
    F64(f64),
    Char(char),
    Text(String),
    Bytes(#[serde(serialize_with = "as_bytes")] Vec<u8>),
    Option(Option<Box<Value>>),
    Seq(Vec<Value>),
    Tuple((u8, Box<Value>, String)),
    Struct { a: Box<Value>, b: Option<u32> },
    Map(#[serde(serialize_with = "as_map")] Vec<(String, Value)>),
    Keyed(#[serde(serialize_with = "as_map")] Vec<(i32, Value)>),
}

fn as_bytes<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(b)
}

fn as_map<S: Serializer, K: Serialize>(entries: &[(K, Value)], s: S) -> Result<S::Ok, S::Error> {
    let mut map = s.serialize_map(Some(entries.len()))?;
    for (k, v) in entries {
        map.serialize_entry(k, v)?;
    }
    map.end()
}

/// The same value with every map's entries in reverse order (keys made unique first).
fn reversed(v: &Value) -> Value {
    fn unique<K: PartialEq + Clone>(entries: &[(K, Value)]) -> Vec<(K, Value)> {
        let mut out: Vec<(K, Value)> = Vec::new();
        for (k, v) in entries {
            if !out.iter().any(|(seen, _)| seen == k) {
                out.push((k.clone(), reversed(v)));
            }
        }
        out.reverse();
        out
    }
    match v {
        Value::Option(Some(inner)) => Value::Option(Some(Box::new(reversed(inner)))),
        Value::Seq(items) => Value::Seq(items.iter().map(reversed).collect()),
        Value::Tuple((a, inner, c)) => Value::Tuple((*a, Box::new(reversed(inner)), c.clone())),
        Value::Struct { a, b } => Value::Struct {
            a: Box::new(reversed(a)),
            b: *b,
        },
        Value::Map(entries) => Value::Map(unique(entries)),
        Value::Keyed(entries) => Value::Keyed(unique(entries)),
        other => other.clone(),
    }
}

/// `v` with map keys made unique, in their first order.
fn deduped(v: &Value) -> Value {
    reversed(&reversed(v))
}

fuzz_target!(|value: Value| {
    let fp = Fingerprint::of(&value).expect("a plain value fingerprints");
    assert_eq!(
        Fingerprint::of(&value.clone()).ok(),
        Some(fp),
        "equal values"
    );
    let unique = deduped(&value);
    assert_eq!(
        Fingerprint::of(&unique).ok(),
        Fingerprint::of(&reversed(&unique)).ok(),
        "map order"
    );
});
