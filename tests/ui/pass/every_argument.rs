//! Every argument at once, and the ones that change payload handling.
use idem_runtime::{Error, Idem, idempotent, store::MemoryStore};
use serde::Serialize;

struct Db;

#[derive(Serialize)]
struct CreateOrder {
    customer: u64,
    cents: u64,
}

#[idempotent(
    key = format!("{}:{}", req.customer, token),
    scope = tenant,
    ttl = "PT24H",
    lease = "30s",
    wait = "PT2S",
    on_conflict = "wait",
    version = 2,
    skip(_db),
    runtime = idem,
    name = "orders.create",
)]
async fn create(idem: &Idem, _db: &Db, tenant: &str, token: &str, req: CreateOrder) -> Result<u64, Error> {
    Ok(req.cents)
}

#[idempotent(key = key, optional, skip_all, cache_errors = true, on_conflict = "reject", runtime = idem)]
async fn notify(idem: &Idem, key: Option<u32>) -> Result<(), NotifyError> {
    Ok(())
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct NotifyError(std::string::String);

impl From<Error> for NotifyError {
    fn from(e: Error) -> Self {
        NotifyError(e.to_string())
    }
}

#[idempotent(key = key, fingerprint = (req.customer, req.cents), runtime = idem)]
async fn by_fingerprint(idem: &Idem, key: u32, req: CreateOrder) -> Result<u64, Error> {
    Ok(req.customer)
}

/// A renamed path to the runtime, as a crate with a renamed dependency would have.
mod renamed {
    use idem_runtime as idem_rt;
    #[idem_rt::idempotent(key = id, runtime = idem, crate = idem_rt)]
    pub async fn get(idem: &idem_rt::Idem, id: u8) -> Result<u8, idem_rt::Error> {
        Ok(id)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let idem = Idem::builder().store(MemoryStore::new()).build().unwrap();
    let req = CreateOrder { customer: 1, cents: 250 };
    assert_eq!(create(&idem, &Db, "t1", "tok", req).await.unwrap(), 250);
    notify(&idem, None).await.unwrap();
    let req = CreateOrder { customer: 3, cents: 1 };
    assert_eq!(by_fingerprint(&idem, 1, req).await.unwrap(), 3);
    assert_eq!(renamed::get(&idem, 4).await.unwrap(), 4);
}
