use idem_runtime::idempotent;

#[idempotent(key = id)]
async fn charge(id: u64) {}

fn main() {}
