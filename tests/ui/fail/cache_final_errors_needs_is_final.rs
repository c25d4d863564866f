use idem_runtime::{Error, idempotent};

#[derive(Debug, serde::Serialize, serde::Deserialize)]
enum PayError {
    Declined,
    Idem(String),
}

impl From<Error> for PayError {
    fn from(e: Error) -> Self {
        PayError::Idem(e.to_string())
    }
}

// Serializable, but it does not say which of its errors are final.
#[idempotent(key = id, cache_errors = "final")]
async fn pay(id: u64) -> Result<u64, PayError> {
    Ok(id)
}

fn main() {}
