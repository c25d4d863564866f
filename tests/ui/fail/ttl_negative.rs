use idem_runtime::{Error, idempotent};

#[idempotent(key = id, ttl = "-PT5M")]
async fn charge(id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
