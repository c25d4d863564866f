//! The expansion uses absolute paths only: shadowing prelude names changes nothing.
#![allow(dead_code, non_camel_case_types)]

use idem_runtime::{Idem, idempotent, store::MemoryStore};

struct Result;
struct Ok;
struct Err;
struct Option;
struct Some;
struct None;
struct Box;
struct Vec;
struct String;
struct Future;
mod core {}
mod std {}

#[idempotent(key = id, runtime = idem)]
async fn lookup(idem: &Idem, id: u64) -> ::core::result::Result<u64, idem_runtime::Error> {
    ::core::result::Result::Ok(id + 1)
}

fn main() {
    let rt = ::tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let idem = Idem::builder().store(MemoryStore::new()).build().unwrap();
        assert_eq!(lookup(&idem, 1).await.unwrap(), 2);
    });
}
