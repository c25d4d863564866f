use idem_runtime::{Error, idempotent};

// Bytes have no text, and a float's text is not a stable name (`0.1 + 0.2`): neither is a key,
// with or without `Option`.
#[idempotent(key = body)]
async fn upload(body: Vec<u8>) -> Result<u64, Error> {
    Ok(body.len() as u64)
}

#[idempotent(key = amount)]
async fn pay(amount: f64) -> Result<u64, Error> {
    Ok(amount as u64)
}

fn main() {}
