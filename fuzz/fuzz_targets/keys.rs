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
    payload: u8,
}

#[idempotent(key = key, scope = scope, runtime = idem)]
async fn echo(idem: &Idem, key: &str, scope: Option<&str>, payload: u8) -> Result<u8, Error> {
    Ok(payload)
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|input: Input| {
    runtime().block_on(async {
        let idem = Idem::builder()
            .store(idem_runtime::store::MemoryStore::new())
            .local_cache(0)
            .build()
            .expect("idem");
        let scope = input.scope.as_deref();
        let first = echo(&idem, &input.key, scope, input.payload).await;
        let again = echo(&idem, &input.key, scope, input.payload).await;
        match (&first, &again) {
            (Ok(a), Ok(b)) => assert_eq!(a, b),
            (Err(a), Err(b)) => {
                assert_eq!(a.kind(), b.kind());
                assert!(matches!(a.kind(), "invalid_key" | "missing_key"), "{a}");
            }
            _ => panic!("{first:?} then {again:?}"),
        }
        if first.is_ok() {
            let other = echo(&idem, &input.key, scope, input.payload.wrapping_add(1)).await;
            assert!(
                matches!(&other, Err(e) if e.kind() == "payload_mismatch"),
                "{other:?}"
            );
        }
    });
});
