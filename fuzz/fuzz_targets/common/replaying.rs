//! A store whose every record is completed with the result under test.

use std::sync::Mutex;
use std::time::Duration;

use idem_runtime::store::{Claim, Fence, Record, RecordState, Reservation, Store, StoredResult};
use idem_runtime::{RecordId, StoreError};

/// The bytes under test.
pub static RESULT: Mutex<Option<StoredResult>> = Mutex::new(None);

/// A store whose every record is completed with the bytes under test.
pub struct Replaying;

impl Replaying {
    fn record(&self) -> Record {
        Record {
            state: RecordState::Completed,
            fingerprint: None,
            fence: Fence::from_raw(1),
            owner: "fuzz".into(),
            attempts: 1,
            lease_remaining: Duration::ZERO,
            expires_in: Duration::from_secs(60),
            result: RESULT.lock().expect("lock").clone(),
        }
    }
}

#[async_trait::async_trait]
impl Store for Replaying {
    async fn reserve(&self, _: &Claim<'_>) -> Result<Reservation, StoreError> {
        Ok(Reservation::Exists(self.record()))
    }
    async fn load(&self, _: &RecordId) -> Result<Option<Record>, StoreError> {
        Ok(Some(self.record()))
    }
    async fn take_over(&self, _: &Claim<'_>, _: Fence) -> Result<bool, StoreError> {
        Ok(false)
    }
    async fn heartbeat(&self, _: &RecordId, _: Fence, _: Duration) -> Result<bool, StoreError> {
        Ok(false)
    }
    async fn finalize(
        &self,
        _: &RecordId,
        _: Fence,
        _: &StoredResult,
        _: Duration,
    ) -> Result<bool, StoreError> {
        Ok(false)
    }
    async fn release(&self, _: &RecordId, _: Fence) -> Result<bool, StoreError> {
        Ok(false)
    }
    async fn purge(&self, _: u32) -> Result<u64, StoreError> {
        Ok(0)
    }
    fn backend(&self) -> &'static str {
        "fuzz"
    }
}
