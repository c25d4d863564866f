//! Methods of a trait impl under `#[async_trait]`, and a native `async fn` in a trait impl.
use idem_runtime::{Error, Idem, idempotent, store::MemoryStore};
use std::sync::atomic::{AtomicU32, Ordering};

#[async_trait::async_trait]
trait Handler {
    async fn handle(&self, message_id: u64, body: String) -> Result<usize, Error>;
}

struct Mailer {
    idem: Idem,
    sent: AtomicU32,
}

#[async_trait::async_trait]
impl Handler for Mailer {
    #[idempotent(key = message_id, runtime = &self.idem)]
    async fn handle(&self, message_id: u64, body: String) -> Result<usize, Error> {
        self.sent.fetch_add(1, Ordering::SeqCst);
        Ok(body.len())
    }
}

trait NativeHandler {
    async fn handle(&self, message_id: u64) -> Result<u64, Error>;
}

struct Audit {
    idem: Idem,
}

impl NativeHandler for Audit {
    #[idempotent(key = message_id, runtime = &self.idem)]
    async fn handle(&self, message_id: u64) -> Result<u64, Error> {
        Ok(message_id * 2)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let idem = Idem::builder().store(MemoryStore::new()).build().unwrap();
    let m = Mailer { idem: idem.clone(), sent: AtomicU32::new(0) };
    assert_eq!(m.handle(9, "hello".into()).await.unwrap(), 5);
    assert_eq!(m.handle(9, "hello".into()).await.unwrap(), 5);
    assert_eq!(m.sent.load(Ordering::SeqCst), 1);
    // The same message id in another impl is another record, not Mailer's result.
    let a = Audit { idem };
    assert_eq!(a.handle(9).await.unwrap(), 18);
}
