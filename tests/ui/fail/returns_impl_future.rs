use std::future::Future;

use idem_runtime::{Error, idempotent};

#[idempotent(key = id)]
fn charge(id: u64) -> impl Future<Output = Result<u64, Error>> {
    async move { Ok(id) }
}

fn main() {}
