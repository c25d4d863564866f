//! An in-memory store: one map behind a mutex, on this process's monotonic clock.
//!
//! For tests and for single-process programs that need retries deduplicated only while the
//! process lives. Nothing survives a restart.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Claim, Fence, Record, RecordState, Reservation, Store, StoredResult};
use crate::error::StoreError;
use crate::key::{Fingerprint, RecordId};

/// A [`Store`] that keeps records in this process's memory.
///
/// ```
/// let idem = idem_runtime::Idem::builder()
///     .store(idem_runtime::store::MemoryStore::new())
///     .build()?;
/// # Ok::<(), idem_runtime::Error>(())
/// ```
#[derive(Default)]
pub struct MemoryStore {
    rows: Mutex<HashMap<RecordId, Row>>,
}

#[derive(Clone)]
struct Row {
    state: RecordState,
    fingerprint: Option<Fingerprint>,
    fence: Fence,
    owner: String,
    attempts: u32,
    lease_until: Instant,
    expires_at: Instant,
    result: Option<StoredResult>,
}

impl Row {
    fn new(claim: &Claim<'_>, now: Instant, attempts: u32) -> Row {
        let lease_until = now + claim.lease;
        Row {
            state: RecordState::InProgress,
            fingerprint: claim.fingerprint.copied(),
            fence: claim.fence,
            owner: claim.owner.to_string(),
            attempts,
            lease_until,
            expires_at: lease_until,
            result: None,
        }
    }

    fn reclaimable(&self, now: Instant) -> bool {
        match self.state {
            RecordState::InProgress => self.lease_until <= now,
            RecordState::Completed => self.expires_at <= now,
        }
    }

    fn owned_by(&self, fence: Fence) -> bool {
        self.fence == fence && self.state == RecordState::InProgress
    }

    fn read(&self, now: Instant) -> Record {
        Record {
            state: self.state,
            fingerprint: self.fingerprint,
            fence: self.fence,
            owner: self.owner.clone(),
            attempts: self.attempts,
            lease_remaining: match self.state {
                RecordState::InProgress => self.lease_until.saturating_duration_since(now),
                RecordState::Completed => Duration::ZERO,
            },
            expires_in: self.expires_at.saturating_duration_since(now),
            result: self.result.clone(),
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// How many records it holds, expired ones included (for tests).
    pub fn len(&self) -> usize {
        self.rows().len()
    }

    /// Whether it holds no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn rows(&self) -> MutexGuard<'_, HashMap<RecordId, Row>> {
        // A panic while holding this lock can only come from a bug in this file; the map is
        // still consistent (every update is a single insert/remove/field write), so go on.
        self.rows
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    async fn reserve(&self, claim: &Claim<'_>) -> Result<Reservation, StoreError> {
        let now = Instant::now();
        let mut rows = self.rows();
        match rows.get(claim.id) {
            Some(row) => Ok(Reservation::Exists(row.read(now))),
            None => {
                rows.insert(claim.id.clone(), Row::new(claim, now, 1));
                Ok(Reservation::Acquired)
            }
        }
    }

    async fn load(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        let now = Instant::now();
        Ok(self.rows().get(id).map(|row| row.read(now)))
    }

    async fn take_over(&self, claim: &Claim<'_>, observed: Fence) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut rows = self.rows();
        let Some(row) = rows.get_mut(claim.id) else {
            return Ok(false);
        };
        if row.fence != observed || !row.reclaimable(now) {
            return Ok(false);
        }
        let attempts = match row.state {
            RecordState::InProgress => row.attempts.saturating_add(1),
            RecordState::Completed => 1,
        };
        *row = Row::new(claim, now, attempts);
        Ok(true)
    }

    async fn heartbeat(
        &self,
        id: &RecordId,
        fence: Fence,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut rows = self.rows();
        match rows.get_mut(id) {
            Some(row) if row.owned_by(fence) => {
                row.lease_until = now + lease;
                row.expires_at = row.lease_until;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn finalize(
        &self,
        id: &RecordId,
        fence: Fence,
        result: &StoredResult,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut rows = self.rows();
        match rows.get_mut(id) {
            Some(row) if row.owned_by(fence) => {
                row.state = RecordState::Completed;
                row.expires_at = now + ttl;
                row.result = Some(result.clone());
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release(&self, id: &RecordId, fence: Fence) -> Result<bool, StoreError> {
        let mut rows = self.rows();
        match rows.get(id) {
            Some(row) if row.owned_by(fence) => {
                rows.remove(id);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn purge(&self, limit: u32) -> Result<u64, StoreError> {
        let now = Instant::now();
        let mut rows = self.rows();
        let expired: Vec<RecordId> = rows
            .iter()
            .filter(|(_, row)| row.expires_at <= now)
            .map(|(id, _)| id.clone())
            .take(limit as usize)
            .collect();
        for id in &expired {
            rows.remove(id);
        }
        Ok(expired.len() as u64)
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}
