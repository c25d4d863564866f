use idem_runtime::{Error, idempotent};

#[idempotent(key = id, ttl = "P1M")]
async fn charge(id: u64) -> Result<u64, Error> {
    Ok(id)
}

#[idempotent(key = id, ttl = "P1Y")]
async fn refund(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
