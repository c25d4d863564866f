use idem_runtime::idempotent;

#[idempotent(key = id, version = "2")]
async fn charge(id: u64) -> Result<u64, idem_runtime::Error> {
    Ok(id)
}

fn main() {}
