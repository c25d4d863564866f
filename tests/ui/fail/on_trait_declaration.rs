use idem_runtime::{Error, idempotent};

trait Payments {
    #[idempotent(key = id)]
    async fn charge(&self, id: u64) -> Result<u64, Error>;
}

fn main() {}
