use idem_runtime::idempotent;

struct Db;

#[idempotent(key = id, skip = db)]
async fn charge(db: &Db, id: u64) -> Result<u64, idem_runtime::Error> {
    let _ = db;
    Ok(id)
}

fn main() {}
