use idem_runtime::{Error, idempotent};

#[idempotent(key = id, skip(db))]
async fn charge(pool: u8, id: u64) -> Result<u64, Error> {
    Ok(id)
}

fn main() {}
