use idem_runtime::{Error, idempotent};

#[idempotent(key = id, tx = tx, lease = "PT30S")]
async fn charge(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>, id: u64) -> Result<u64, Error> {
    let _ = tx;
    Ok(id)
}

fn main() {}
