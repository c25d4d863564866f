//! Generic fns: one record path for every instantiation, the payload told apart by value.
use idem_runtime::{Error, Idem, idempotent, store::MemoryStore};
use serde::{Serialize, de::DeserializeOwned};

#[idempotent(key = key, runtime = idem)]
async fn echo<T>(idem: &Idem, key: u64, value: T) -> Result<T, Error>
where
    T: Serialize + DeserializeOwned + Send,
{
    Ok(value)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let idem = Idem::builder().store(MemoryStore::new()).build().unwrap();
    assert_eq!(echo(&idem, 1, String::from("a")).await.unwrap(), "a");
    assert_eq!(echo(&idem, 2, 7u32).await.unwrap(), 7);
    // Same key, other payload: refused rather than replaying "a".
    assert!(echo(&idem, 1, String::from("b")).await.is_err());
}
