//! Keys and scopes of any text through `#[idempotent]`: a key either names a record (the
//! second call with it replays the first call's result, and another payload under it is a
//! payload mismatch) or is refused with a clear error; nothing panics.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use idem_runtime::{Error, Idem, idempotent};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    key: String,
    scope: Option<String>,
}

#[idempotent(key = key, scope = scope, runtime = idem)]
async fn echo(idem: &Idem, key: &str, scope: Option<&str>, payload: u8) -> Result<u8, Error> {
    Ok(payload)
}

/// One runtime and one store for the whole run: inputs repeat, so each key's payload is
/// derived from the key and scope, and a repeated input is a replay like any other.
fn setup() -> &'static (tokio::runtime::Runtime, Idem) {
    static SETUP: OnceLock<(tokio::runtime::Runtime, Idem)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let idem = rt.block_on(async {
            Idem::builder()
                .store(idem_runtime::store::MemoryStore::new())
                .local_cache(0)
                .build()
                .expect("idem")
        });
        (rt, idem)
    })
}

fn payload_of(input: &Input) -> u8 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&(&input.key, &input.scope), &mut h);
    std::hash::Hasher::finish(&h) as u8
}

fuzz_target!(|input: Input| {
    let (rt, idem) = setup();
    let payload = payload_of(&input);
    rt.block_on(async {
        let scope = input.scope.as_deref();
        let first = echo(idem, &input.key, scope, payload).await;
        let again = echo(idem, &input.key, scope, payload).await;
        match (&first, &again) {
            (Ok(a), Ok(b)) => assert_eq!(a, b),
            (Err(a), Err(b)) => {
                assert_eq!(a.kind(), b.kind());
                assert!(matches!(a.kind(), "invalid_key" | "missing_key"), "{a}");
            }
            _ => panic!("{first:?} then {again:?}"),
        }
        if first.is_ok() {
            let other = echo(idem, &input.key, scope, payload.wrapping_add(1)).await;
            assert!(
                matches!(&other, Err(e) if e.kind() == "payload_mismatch"),
                "{other:?}"
            );
        }
    });
});
