use idem_runtime::{Error, idempotent};

struct Receipt {
    cents: u64,
}

#[idempotent(key = id)]
async fn charge(id: u64) -> Result<Receipt, Error> {
    Ok(Receipt { cents: id })
}

fn main() {}
