use idem_runtime::idempotent;

#[derive(Debug)]
enum ChargeError {
    Declined,
}

#[idempotent(key = id)]
async fn charge(id: u64) -> Result<u64, ChargeError> {
    Err(ChargeError::Declined)
}

fn main() {}
