use idem_runtime::{Error, idempotent};

#[derive(serde::Serialize)]
struct Request {
    id: u64,
}

#[idempotent(key = req)]
async fn charge(req: Request) -> Result<u64, Error> {
    Ok(req.id)
}

fn main() {}
