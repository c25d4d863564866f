//! Acquiring a record: reserve it, or find out why not (replay, wait, take over, refuse),
//! and the guard that releases an owned reservation when its call stops without a result.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Engine;
use super::call::ResolvedCall;
use super::decide::{Decision, decide};
use super::spec::OnConflict;
use super::store_call;
use crate::Error;
use crate::error::StoreError;
use crate::key::{Fingerprint, RecordId};
use crate::store::{Claim, Fence, Record, RecordState, Reservation, StoredResult};

/// What the leader got from the store before running anything.
pub(crate) enum Acquired<'a> {
    /// The caller owns the record and runs the body.
    Owned {
        guard: OwnedRecord<'a>,
        took_over: bool,
        /// When the statement that started the lease was sent.
        since: Instant,
    },
    /// The record is completed with this result.
    Replay {
        result: StoredResult,
        fingerprint: Option<Fingerprint>,
        expires_in: Duration,
        waited: bool,
    },
}

impl ResolvedCall {
    /// Reserves the record, or finds out why not: replay, wait (until `deadline`), take over,
    /// refuse.
    pub(crate) async fn acquire(&self, deadline: Instant) -> Result<Acquired<'_>, Error> {
        let mut backoff = Backoff::default();
        let mut waited = false;
        let mut races = 0u32;
        loop {
            // Armed before the statement runs: if this call is dropped while `reserve` is in
            // flight, the row it may have written is released instead of stuck for a lease.
            let mut guard =
                OwnedRecord::new(&self.engine, &self.id, Fence::random(), self.function());
            let since = Instant::now();
            let reserved = self.engine.reserve(&self.claim(guard.fence)).await;
            let record = match reserved {
                Ok(Reservation::Acquired) => {
                    let took_over = false;
                    return Ok(Acquired::Owned {
                        guard,
                        took_over,
                        since,
                    });
                }
                Ok(Reservation::Exists(record)) => {
                    guard.disarm();
                    record
                }
                Ok(Reservation::Vanished) => {
                    guard.disarm();
                    races += 1;
                    self.pace_race(races, &mut backoff, deadline).await?;
                    continue;
                }
                Err(e) => return Err(self.write_failed(guard, e)),
            };
            match decide(&record, self.fingerprint.as_ref()) {
                Decision::Replay => {
                    let result = record.result.ok_or_else(|| {
                        self.unavailable(StoreError::msg("a completed record has no result"))
                    })?;
                    return Ok(Acquired::Replay {
                        result,
                        fingerprint: record.fingerprint,
                        expires_in: record.expires_in,
                        waited,
                    });
                }
                Decision::PayloadMismatch => {
                    return Err(Error::PayloadMismatch {
                        function: self.function(),
                        key: self.id.hash(),
                    });
                }
                Decision::TakeOver => {
                    if let Some(owned) = self.take_over(guard, &record).await? {
                        return Ok(owned);
                    }
                    races += 1;
                    self.pace_race(races, &mut backoff, deadline).await?;
                }
                Decision::Wait { retry_after } => {
                    let now = Instant::now();
                    if self.on_conflict == OnConflict::Reject || now >= deadline {
                        return Err(self.in_progress(retry_after));
                    }
                    waited = true;
                    tokio::time::sleep(backoff.next().min(deadline - now)).await;
                }
            }
        }
    }

    /// This call's claim on its record, with a fresh `fence`.
    fn claim(&self, fence: Fence) -> Claim<'_> {
        Claim {
            id: &self.id,
            fence,
            owner: &self.engine.settings.executor_id,
            fingerprint: self.fingerprint.as_ref(),
            lease: self.lease,
        }
    }

    /// Takes over an abandoned or expired `record` (a compare-and-set on its fence). `None`:
    /// another caller changed it first.
    async fn take_over<'a>(
        &'a self,
        mut guard: OwnedRecord<'a>,
        record: &Record,
    ) -> Result<Option<Acquired<'a>>, Error> {
        let store = &*self.engine.store;
        let timeout = self.engine.settings.store_timeout;
        guard.rearm();
        let since = Instant::now();
        let claim = self.claim(guard.fence);
        let take = store.take_over(&claim, record.fence);
        match store_call(store, "take_over", timeout, take).await {
            Ok(true) => {
                let took_over = record.state == RecordState::InProgress;
                Ok(Some(Acquired::Owned {
                    guard,
                    took_over,
                    since,
                }))
            }
            Ok(false) => {
                guard.disarm();
                Ok(None)
            }
            Err(e) => Err(self.write_failed(guard, e)),
        }
    }

    /// A reservation or takeover that failed. One that timed out may still land: the guard,
    /// left armed, releases it in the background (fenced, so harmless if it did not). One
    /// that failed outright wrote nothing.
    fn write_failed(&self, mut guard: OwnedRecord<'_>, e: StoreError) -> Error {
        if !e.is_timeout() {
            guard.disarm();
        }
        self.unavailable(e)
    }

    /// After losing a race (the record changed between two statements), go again at once a
    /// few times, then back off so a pathological churn cannot spin.
    async fn pace_race(
        &self,
        races: u32,
        backoff: &mut Backoff,
        deadline: Instant,
    ) -> Result<(), Error> {
        if races <= 3 {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(self.in_progress(backoff.next()));
        }
        tokio::time::sleep(backoff.next().min(deadline - now)).await;
        Ok(())
    }
}

/// Exponential backoff with jitter for polling an in-progress record: 5 ms doubling to
/// 250 ms, each pause drawn from [50%, 100%] of the step so waiters spread out.
#[derive(Default)]
pub(crate) struct Backoff {
    step: u32,
}

impl Backoff {
    pub(crate) fn next(&mut self) -> Duration {
        let base = Duration::from_millis(5) * 2u32.pow(self.step.min(6));
        self.step = self.step.saturating_add(1);
        let cap = base.min(Duration::from_millis(250));
        cap.mul_f64(0.5 + fastrand::f64() * 0.5)
    }
}

/// An owned reservation. Dropped while armed (the body panicked, or the call's future was
/// dropped mid-body) it releases the record in the background, so the key is free again
/// at once instead of after the lease.
pub(crate) struct OwnedRecord<'a> {
    engine: &'a Arc<Engine>,
    id: &'a RecordId,
    pub(crate) fence: Fence,
    function: &'static str,
    armed: bool,
}

impl<'a> OwnedRecord<'a> {
    fn new(
        engine: &'a Arc<Engine>,
        id: &'a RecordId,
        fence: Fence,
        function: &'static str,
    ) -> Self {
        OwnedRecord {
            engine,
            id,
            fence,
            function,
            armed: true,
        }
    }

    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }

    fn rearm(&mut self) {
        self.armed = true;
    }

    pub(crate) async fn release(&mut self) {
        // Still armed while the statement runs: dropped mid-release, the guard releases again.
        if let Err(e) = self.engine.release(self.id, self.fence).await {
            tracing::warn!(function = self.function, key = %self.id.hash(), error = %e,
                "idem: could not release the key; it frees itself when the lease runs out");
        }
        self.armed = false;
    }
}

impl Drop for OwnedRecord<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let engine = self.engine.clone();
        let (id, fence, function) = (self.id.clone(), self.fence, self.function);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if let Err(e) = engine.release(&id, fence).await {
                        tracing::warn!(function, key = %id.hash(), error = %e,
                            "idem: could not release an abandoned key; it frees itself when the lease runs out");
                    }
                });
            }
            Err(_) => tracing::warn!(function, key = %id.hash(),
                "idem: call abandoned outside a tokio runtime; the key frees itself when the lease runs out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::default();
        let first = b.next();
        assert!(first <= Duration::from_millis(5));
        for _ in 0..20 {
            assert!(b.next() <= Duration::from_millis(250));
        }
    }
}
