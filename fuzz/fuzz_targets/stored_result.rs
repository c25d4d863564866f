//! Replaying stored results that are arbitrary bytes (a changed type, a corrupted row): each
//! call gets the decoded value or a clear `Decode` error, never a panic.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use idem_runtime::store::StoredResult;
use idem_runtime::{Codec, Error, Idem, idempotent};
use libfuzzer_sys::fuzz_target;
use serde::{Deserialize, Serialize};

#[path = "common/replaying.rs"]
mod replaying;
use replaying::{RESULT, Replaying};

#[derive(Arbitrary, Debug)]
struct Input {
    bytes: Vec<u8>,
    as_error: bool,
}

#[derive(Serialize, Deserialize, Debug)]
struct Order {
    id: u64,
    lines: Vec<(String, i32)>,
    note: Option<String>,
}

#[derive(Serialize, Deserialize, Debug)]
enum AppError {
    Idem(String),
    Declined { reason: String },
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Idem(e.kind().to_string())
    }
}

#[idempotent(key = "k", runtime = idem, skip_all)]
async fn order(idem: &Idem) -> Result<Order, AppError> {
    unreachable!("the record is always completed")
}

#[idempotent(key = "k", runtime = idem, skip_all, cache_errors = true)]
async fn order_or_error(idem: &Idem) -> Result<Order, AppError> {
    unreachable!("the record is always completed")
}

fn setup() -> &'static (tokio::runtime::Runtime, Idem) {
    static SETUP: OnceLock<(tokio::runtime::Runtime, Idem)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let idem = rt.block_on(async {
            Idem::builder()
                .store(Replaying)
                .local_cache(0)
                .build()
                .expect("idem")
        });
        (rt, idem)
    })
}

fuzz_target!(|input: Input| {
    let (rt, idem) = setup();
    let codec = if input.as_error {
        Codec::JsonError
    } else {
        Codec::Json
    };
    *RESULT.lock().expect("lock") = Some(StoredResult {
        codec,
        bytes: input.bytes.clone(),
    });
    rt.block_on(async {
        for (which, got) in [
            ("values only", order(idem).await),
            ("values and errors", order_or_error(idem).await),
        ] {
            match got {
                Ok(_) => {}
                Err(AppError::Idem(kind)) => {
                    assert_eq!(kind, "decode", "{which}: {:?}", input)
                }
                Err(AppError::Declined { .. }) => {
                    assert!(input.as_error && which == "values and errors", "{which}")
                }
            }
        }
    });
});
