use idem_runtime::{Error, idempotent};

struct Pool;

#[idempotent(key = id)]
async fn charge(pool: &Pool, id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
