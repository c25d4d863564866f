//! `&self` methods, with the runtime taken from `self`.
use idem_runtime::{Error, Idem, idempotent, store::MemoryStore};
use std::sync::atomic::{AtomicU32, Ordering};

struct Payments {
    idem: Idem,
    charges: AtomicU32,
}

impl Payments {
    #[idempotent(key = payment_id, runtime = &self.idem, ttl = "PT1H")]
    async fn charge(&self, payment_id: &str, cents: u64) -> Result<u64, Error> {
        self.charges.fetch_add(1, Ordering::SeqCst);
        Ok(cents)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let idem = Idem::builder().store(MemoryStore::new()).build().unwrap();
    let p = Payments { idem, charges: AtomicU32::new(0) };
    assert_eq!(p.charge("p-1", 500).await.unwrap(), 500);
    assert_eq!(p.charge("p-1", 500).await.unwrap(), 500);
    assert_eq!(p.charges.load(Ordering::SeqCst), 1);
}
