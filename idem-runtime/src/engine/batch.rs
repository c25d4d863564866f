//! Group commit: the store statements of concurrent calls, carried together.
//!
//! Each verb (reserve, finalize, heartbeat, release) has a lane. A call puts its statement in
//! its lane's queue and waits for the answer. While fewer than `max_in_flight` batches of the
//! lane are running, a new runner takes everything queued (up to `max_rows` rows and
//! `max_bytes` bytes) and sends it as one batch through the store's `_many` verb; when it
//! returns, the runner answers each call and takes what queued up meanwhile. Nothing waits on
//! a timer: a call that arrives alone goes at once, and calls that arrive while a batch is in
//! flight share the next one. The queue is bounded (`max_queued`): past it, callers wait for
//! room, which is their back-pressure.
//!
//! Batching decides nothing. Each call gets the answer its own statement would get: the
//! store's `_many` verbs answer per item, and the engine decides from each answer as before.
//! Batches are sorted by record, so two batches lock rows in one global order.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::error::StoreError;
use crate::key::{Fingerprint, RecordId};
use crate::store::{Claim, Fence, Finalize, Heartbeat, Release, Reservation, Store, StoredResult};

/// The bounds of group commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BatchLimits {
    /// The most rows one batch carries.
    pub(crate) max_rows: usize,
    /// The most result bytes one finalize batch carries (at least one row goes).
    pub(crate) max_bytes: usize,
    /// How many batches of one verb may be in flight at once.
    pub(crate) max_in_flight: usize,
    /// How many statements of one verb may wait in its queue.
    pub(crate) max_queued: usize,
}

/// A reservation's claim, owned, to travel to the batch that carries it.
pub(crate) struct OwnedClaim {
    pub(crate) id: RecordId,
    pub(crate) fence: Fence,
    pub(crate) owner: Arc<str>,
    pub(crate) fingerprint: Option<Fingerprint>,
    pub(crate) lease: Duration,
}

impl OwnedClaim {
    fn claim(&self) -> Claim<'_> {
        Claim {
            id: &self.id,
            fence: self.fence,
            owner: &self.owner,
            fingerprint: self.fingerprint.as_ref(),
            lease: self.lease,
        }
    }
}

/// One call's statement in a lane, and where its answer goes.
struct Job<I, O> {
    item: I,
    reply: oneshot::Sender<Result<O, StoreError>>,
    /// Room in the queue, given back when the job is answered.
    _room: OwnedSemaphorePermit,
}

struct Queue<I, O> {
    jobs: VecDeque<Job<I, O>>,
    running: usize,
}

/// One verb's queue and its runners.
struct Lane<I, O> {
    queue: Mutex<Queue<I, O>>,
    room: Arc<Semaphore>,
}

impl<I, O> Lane<I, O> {
    fn new(limits: &BatchLimits) -> Lane<I, O> {
        Lane {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                running: 0,
            }),
            room: Arc::new(Semaphore::new(limits.max_queued.max(1))),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue<I, O>> {
        // Critical sections only push, pop and count; a poisoned queue is still consistent.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The lanes of one runtime.
pub(crate) struct Batcher {
    store: Arc<dyn Store>,
    timeout: Duration,
    limits: BatchLimits,
    reserve: Lane<OwnedClaim, Reservation>,
    finalize: Lane<(RecordId, Fence, StoredResult, Duration), bool>,
    heartbeat: Lane<(RecordId, Fence, Duration), bool>,
    release: Lane<(RecordId, Fence), bool>,
}

/// What a lane's batch does: the verb, and how its items are sized and ordered.
trait Verb<I, O>: Sized {
    const OP: &'static str;
    fn lane(batcher: &Batcher) -> &Lane<I, O>;
    fn id(item: &I) -> &RecordId;
    fn bytes(_item: &I) -> usize {
        0
    }
    fn run(
        store: &dyn Store,
        items: &[&I],
    ) -> impl std::future::Future<Output = Vec<Result<O, StoreError>>> + Send;
    /// A caller stopped waiting for its answer; undo what must not outlive it.
    fn orphaned(_batcher: &Arc<Batcher>, _item: I, _out: &Result<O, StoreError>) {}
}

struct ReserveVerb;
struct FinalizeVerb;
struct HeartbeatVerb;
struct ReleaseVerb;

impl Verb<OwnedClaim, Reservation> for ReserveVerb {
    const OP: &'static str = "reserve";
    fn lane(b: &Batcher) -> &Lane<OwnedClaim, Reservation> {
        &b.reserve
    }
    fn id(item: &OwnedClaim) -> &RecordId {
        &item.id
    }
    async fn run(store: &dyn Store, items: &[&OwnedClaim]) -> Vec<Result<Reservation, StoreError>> {
        let claims: Vec<Claim<'_>> = items.iter().map(|c| c.claim()).collect();
        store.reserve_many(&claims).await
    }
    fn orphaned(batcher: &Arc<Batcher>, item: OwnedClaim, out: &Result<Reservation, StoreError>) {
        // Its caller is gone, and would have released this reservation: release it here.
        if matches!(out, Ok(Reservation::Acquired)) {
            let (batcher, OwnedClaim { id, fence, .. }) = (batcher.clone(), item);
            tokio::spawn(async move { drop(batcher.release(id, fence).await) });
        }
    }
}

impl Verb<(RecordId, Fence, StoredResult, Duration), bool> for FinalizeVerb {
    const OP: &'static str = "finalize";
    fn lane(b: &Batcher) -> &Lane<(RecordId, Fence, StoredResult, Duration), bool> {
        &b.finalize
    }
    fn id(item: &(RecordId, Fence, StoredResult, Duration)) -> &RecordId {
        &item.0
    }
    fn bytes(item: &(RecordId, Fence, StoredResult, Duration)) -> usize {
        item.2.bytes.len()
    }
    async fn run(
        store: &dyn Store,
        items: &[&(RecordId, Fence, StoredResult, Duration)],
    ) -> Vec<Result<bool, StoreError>> {
        let items: Vec<Finalize<'_>> = items
            .iter()
            .map(|(id, fence, result, ttl)| Finalize {
                id,
                fence: *fence,
                result,
                ttl: *ttl,
            })
            .collect();
        store.finalize_many(&items).await
    }
}

impl Verb<(RecordId, Fence, Duration), bool> for HeartbeatVerb {
    const OP: &'static str = "heartbeat";
    fn lane(b: &Batcher) -> &Lane<(RecordId, Fence, Duration), bool> {
        &b.heartbeat
    }
    fn id(item: &(RecordId, Fence, Duration)) -> &RecordId {
        &item.0
    }
    async fn run(
        store: &dyn Store,
        items: &[&(RecordId, Fence, Duration)],
    ) -> Vec<Result<bool, StoreError>> {
        let items: Vec<Heartbeat<'_>> = items
            .iter()
            .map(|(id, fence, lease)| Heartbeat {
                id,
                fence: *fence,
                lease: *lease,
            })
            .collect();
        store.heartbeat_many(&items).await
    }
}

impl Verb<(RecordId, Fence), bool> for ReleaseVerb {
    const OP: &'static str = "release";
    fn lane(b: &Batcher) -> &Lane<(RecordId, Fence), bool> {
        &b.release
    }
    fn id(item: &(RecordId, Fence)) -> &RecordId {
        &item.0
    }
    async fn run(store: &dyn Store, items: &[&(RecordId, Fence)]) -> Vec<Result<bool, StoreError>> {
        let items: Vec<Release<'_>> = items
            .iter()
            .map(|(id, fence)| Release { id, fence: *fence })
            .collect();
        store.release_many(&items).await
    }
}

impl Batcher {
    pub(crate) fn new(store: Arc<dyn Store>, timeout: Duration, limits: BatchLimits) -> Batcher {
        Batcher {
            store,
            timeout,
            limits,
            reserve: Lane::new(&limits),
            finalize: Lane::new(&limits),
            heartbeat: Lane::new(&limits),
            release: Lane::new(&limits),
        }
    }

    pub(crate) async fn reserve(
        self: &Arc<Self>,
        claim: OwnedClaim,
    ) -> Result<Reservation, StoreError> {
        self.submit::<_, _, ReserveVerb>(claim).await
    }

    pub(crate) async fn finalize(
        self: &Arc<Self>,
        id: RecordId,
        fence: Fence,
        result: StoredResult,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.submit::<_, _, FinalizeVerb>((id, fence, result, ttl))
            .await
    }

    pub(crate) async fn heartbeat(
        self: &Arc<Self>,
        id: RecordId,
        fence: Fence,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.submit::<_, _, HeartbeatVerb>((id, fence, lease)).await
    }

    pub(crate) async fn release(
        self: &Arc<Self>,
        id: RecordId,
        fence: Fence,
    ) -> Result<bool, StoreError> {
        self.submit::<_, _, ReleaseVerb>((id, fence)).await
    }

    /// Sends `item` through its lane: at once on its own when the lane is idle (no queue,
    /// room to run), else queued for the next batch, with a runner started if the lane has
    /// room for one. Waits for the answer.
    async fn submit<I, O, V>(self: &Arc<Self>, item: I) -> Result<O, StoreError>
    where
        I: Send + Sync + 'static,
        O: Send + 'static,
        V: Verb<I, O> + 'static,
    {
        let lane = V::lane(self);
        let room = lane.room.clone().acquire_owned().await;
        let room = room.map_err(|_| StoreError::msg("the runtime is shutting down"))?;
        let max = self.limits.max_in_flight.max(1);
        let alone = {
            let mut queue = lane.lock();
            let alone = queue.jobs.is_empty() && queue.running < max;
            if alone {
                queue.running += 1;
            }
            alone
        };
        if alone {
            // Nothing to share the statement with: no hop to a runner, no wait. The slot is
            // given back (and queued calls picked up) even if this call is dropped mid-way.
            let _slot = Slot::<I, O, V> {
                batcher: self,
                _types: std::marker::PhantomData,
            };
            let out = self.run_batch::<I, O, V>(&[&item]).await;
            drop(room);
            return out.into_iter().next().unwrap_or_else(|| Err(lost()));
        }
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut queue = lane.lock();
            queue.jobs.push_back(Job {
                item,
                reply,
                _room: room,
            });
            let start = queue.running < max;
            if start {
                queue.running += 1;
            }
            start
        };
        if start {
            tokio::spawn(self.clone().run_lane::<I, O, V>());
        }
        answer.await.unwrap_or_else(|_| Err(lost()))
    }

    /// One batch through the store, bounded by the store timeout, timed and counted.
    async fn run_batch<I, O, V: Verb<I, O>>(&self, items: &[&I]) -> Vec<Result<O, StoreError>> {
        let start = Instant::now();
        let outs = match tokio::time::timeout(self.timeout, V::run(&*self.store, items)).await {
            Ok(outs) if outs.len() == items.len() => outs,
            Ok(outs) => {
                let e = format!(
                    "the store answered {} of {} statements",
                    outs.len(),
                    items.len()
                );
                every(items.len(), &StoreError::msg(e))
            }
            Err(_elapsed) => {
                let e = format!(
                    "no answer from the store within {:?} ({})",
                    self.timeout,
                    V::OP
                );
                every(items.len(), &StoreError::timed_out(e))
            }
        };
        crate::metrics::batch(self.store.backend(), V::OP, items.len(), start.elapsed());
        outs
    }

    /// Runs batches of one lane until its queue is empty.
    async fn run_lane<I, O, V>(self: Arc<Self>)
    where
        I: Send + Sync + 'static,
        O: Send + 'static,
        V: Verb<I, O>,
    {
        loop {
            let mut batch = {
                let mut queue = V::lane(&self).lock();
                let batch = self.take::<I, O, V>(&mut queue.jobs);
                if batch.is_empty() {
                    queue.running -= 1;
                    return;
                }
                batch
            };
            // One global lock order: two batches touching the same rows cannot deadlock.
            batch.sort_by(|a, b| V::id(&a.item).cmp(V::id(&b.item)));
            let items: Vec<&I> = batch.iter().map(|job| &job.item).collect();
            let outs = self.run_batch::<I, O, V>(&items).await;
            for (job, out) in batch.into_iter().zip(outs) {
                if let Err(out) = job.reply.send(out) {
                    V::orphaned(&self, job.item, &out);
                }
            }
        }
    }

    /// The next batch: the oldest jobs, up to the row and byte limits (at least one).
    fn take<I, O, V: Verb<I, O>>(&self, jobs: &mut VecDeque<Job<I, O>>) -> Vec<Job<I, O>> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(job) = jobs.front() {
            let size = V::bytes(&job.item);
            let full = batch.len() >= self.limits.max_rows.max(1)
                || (!batch.is_empty() && bytes + size > self.limits.max_bytes);
            if full {
                break;
            }
            bytes += size;
            batch.extend(jobs.pop_front());
        }
        batch
    }
}

/// `n` copies of one failure.
fn every<O>(n: usize, e: &StoreError) -> Vec<Result<O, StoreError>> {
    (0..n).map(|_| Err(e.clone())).collect()
}

fn lost() -> StoreError {
    StoreError::msg("the batch carrying this statement was lost")
}

/// A lane slot held by a call running its statement on its own. Given back on drop, when a
/// runner is started for whatever queued meanwhile.
struct Slot<'b, I, O, V>
where
    I: Send + Sync + 'static,
    O: Send + 'static,
    V: Verb<I, O> + 'static,
{
    batcher: &'b Arc<Batcher>,
    _types: std::marker::PhantomData<fn(I, O, V)>,
}

impl<I, O, V> Drop for Slot<'_, I, O, V>
where
    I: Send + Sync + 'static,
    O: Send + 'static,
    V: Verb<I, O> + 'static,
{
    fn drop(&mut self) {
        let start = {
            let mut queue = V::lane(self.batcher).lock();
            // Hand the slot to a runner if calls queued meanwhile; else give it back.
            if queue.jobs.is_empty() {
                queue.running -= 1;
                false
            } else {
                true
            }
        };
        if !start {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn(self.batcher.clone().run_lane::<I, O, V>())),
            // No runtime to run anything on: give the slot back.
            Err(_) => V::lane(self.batcher).lock().running -= 1,
        }
    }
}
