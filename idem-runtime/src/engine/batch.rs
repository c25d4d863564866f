//! Group commit: the store statements of concurrent calls, carried together.
//!
//! Each verb (reserve, finalize, heartbeat, release) has a lane. A call puts its statement in
//! its lane's queue and waits for the answer. While fewer than `max_in_flight` batches of the
//! lane are running, a new runner takes everything queued (up to `max_rows` rows and
//! `max_bytes` bytes) and sends it as one batch through the store's `_many` verb; when it
//! returns, the runner answers each call and takes what queued up meanwhile. Nothing waits on
//! a timer: a call that arrives alone goes at once, and calls that arrive while a batch is in
//! flight share the next one. A runner started for the first call in an idle lane while other
//! calls wait on the lanes yields once first, so that the callers one batch just answered,
//! woken together, also reach the next lane together. The queue is bounded (`max_queued`):
//! past it, callers wait for room, which is their back-pressure.
//!
//! Batching decides nothing. Each call gets the answer its own statement would get: the
//! store's `_many` verbs answer per item, and the engine decides from each answer as before.
//! Batches are sorted by record, so two batches lock rows in one global order.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::error::StoreError;
use crate::key::{Fingerprint, RecordId};
use crate::store::{
    Claim, Combined, Fence, Finalize, Heartbeat, Release, Reservation, Store, StoredResult, every,
};

/// The bounds of group commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BatchLimits {
    /// The most rows one batch carries.
    pub(crate) max_rows: usize,
    /// The most result bytes one finalize batch carries (at least one row goes).
    pub(crate) max_bytes: usize,
    /// How many batches of one verb may be in flight at once; `None`: as many as the store
    /// runs well ([`Store::batch_concurrency`]).
    pub(crate) max_in_flight: Option<usize>,
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

/// A queued finalize, in the store's view.
fn finalize_of(
    (id, fence, result, ttl): &(RecordId, Fence, StoredResult, Duration),
) -> Finalize<'_> {
    Finalize {
        id,
        fence: *fence,
        result,
        ttl: *ttl,
    }
}

/// A queued heartbeat, in the store's view.
fn heartbeat_of((id, fence, lease): &(RecordId, Fence, Duration)) -> Heartbeat<'_> {
    Heartbeat {
        id,
        fence: *fence,
        lease: *lease,
    }
}

/// A queued release, in the store's view.
fn release_of((id, fence): &(RecordId, Fence)) -> Release<'_> {
    Release { id, fence: *fence }
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
    /// When a batch of the lane last started. A lane whose every place is taken and that has
    /// started nothing for twice the store timeout (which bounds every batch of a runtime
    /// that is driven) has its runners stuck on a runtime no longer driven: the next call
    /// starts one more runner beyond `max_in_flight`, so the lane keeps serving.
    started: Instant,
    /// Since when a runner has been letting the tasks already woken run before it takes its
    /// first batch (one yield): what they queue meanwhile goes in that batch, so no other
    /// runner is started for them. A gathering older than [`STALE_GATHERING`] no longer holds
    /// anyone back (its runner is not being run: its runtime is blocked or not driven).
    gathering: Option<Instant>,
}

/// How long a runner's gathering may hold back the start of other runners: a yield takes
/// microseconds, so a gathering this old means its runner is not being run.
const STALE_GATHERING: Duration = Duration::from_millis(5);

impl<I, O> Queue<I, O> {
    /// Whether a runner is gathering, recently enough to hold back other runners.
    fn gathers(&self) -> bool {
        self.gathering
            .is_some_and(|since| since.elapsed() < STALE_GATHERING)
    }
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
                started: Instant::now(),
                gathering: None,
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
    /// How many batches of one verb may be in flight at once (at least one).
    max_in_flight: usize,
    reserve: Lane<OwnedClaim, Reservation>,
    finalize: Lane<(RecordId, Fence, StoredResult, Duration), bool>,
    heartbeat: Lane<(RecordId, Fence, Duration), bool>,
    release: Lane<(RecordId, Fence), bool>,
    /// Calls in any lane (waiting for room, a batch or an answer), counted on entry: with none
    /// but itself, a call that finds its lane idle has no one to wait for and sends at once.
    waiting: AtomicUsize,
    /// The lanes are combined ([`Store::combine_verbs`], one batch in flight): a runner holds
    /// `gate` while it takes what every lane has queued and sends it as one combined batch.
    combine: bool,
    gate: Gate,
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
    /// How many of this verb's calls combined lanes took.
    fn taken(taken: &Taken) -> usize;
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
        // Its caller is gone, and would have released this reservation (or one its batch may
        // have written before failing): release it here, under its own fence.
        let maybe_written = matches!(out, Err(e) if e.is_timeout());
        if matches!(out, Ok(Reservation::Acquired)) || maybe_written {
            let (batcher, OwnedClaim { id, fence, .. }) = (batcher.clone(), item);
            tokio::spawn(async move { drop(batcher.release(id, fence).await) });
        }
    }
    fn taken(taken: &Taken) -> usize {
        taken.reserve.len()
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
        let items: Vec<Finalize<'_>> = items.iter().map(|f| finalize_of(f)).collect();
        store.finalize_many(&items).await
    }
    fn taken(taken: &Taken) -> usize {
        taken.finalize.len()
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
        let items: Vec<Heartbeat<'_>> = items.iter().map(|h| heartbeat_of(h)).collect();
        store.heartbeat_many(&items).await
    }
    fn taken(taken: &Taken) -> usize {
        taken.heartbeat.len()
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
        let items: Vec<Release<'_>> = items.iter().map(|r| release_of(r)).collect();
        store.release_many(&items).await
    }
    fn taken(taken: &Taken) -> usize {
        taken.release.len()
    }
}

impl Batcher {
    pub(crate) fn new(store: Arc<dyn Store>, timeout: Duration, limits: BatchLimits) -> Batcher {
        let max_in_flight = limits
            .max_in_flight
            .unwrap_or_else(|| store.batch_concurrency())
            .max(1);
        let combine = store.combine_verbs() && max_in_flight == 1;
        Batcher {
            store,
            timeout,
            limits,
            max_in_flight,
            reserve: Lane::new(&limits),
            finalize: Lane::new(&limits),
            heartbeat: Lane::new(&limits),
            release: Lane::new(&limits),
            waiting: AtomicUsize::new(0),
            combine,
            gate: Gate::default(),
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

    /// Sends `item` through its lane and waits for the answer. A call that finds the lane
    /// idle (no queue, room to run, no one gathering) with no other call waiting on any lane
    /// runs its statement itself, at once, with no hop to a runner. Otherwise the call is
    /// queued, and a runner is started if the lane has room for one. A runner started by the
    /// first call in an idle lane while others wait yields once before it takes its batch, so
    /// that the tasks already woken (typically the callers a batch just answered, now on their
    /// next step) join this statement instead of each finding the lane busy and queueing for
    /// the one after. No timer either way.
    async fn submit<I, O, V>(self: &Arc<Self>, item: I) -> Result<O, StoreError>
    where
        I: Send + Sync + 'static,
        O: Send + 'static,
        V: Verb<I, O> + 'static,
    {
        let lane = V::lane(self);
        let _waiting = Waiting::new(&self.waiting);
        let room = lane.room.clone().acquire_owned().await;
        let room = room.map_err(|_| StoreError::msg("the runtime is shutting down"))?;
        let max = self.max_in_flight;
        // Others are waiting on the lanes: some may be about to reach this one.
        let company = self.waiting.load(Ordering::Relaxed) > 1;
        let alone = !company && {
            let mut queue = lane.lock();
            let alone = queue.jobs.is_empty() && queue.running < max && !queue.gathers();
            if alone {
                queue.running += 1;
                queue.started = Instant::now();
            }
            alone
        };
        if alone {
            // The slot is given back (and queued calls picked up) even if this call is
            // dropped mid-way.
            let _slot = Slot::<I, O, V> {
                batcher: self,
                _types: std::marker::PhantomData,
            };
            // No gate, even for combined lanes: with no company there is nothing to combine,
            // and a caller that stops polling must not hold up anyone (the database orders
            // this write with a runner's, if one starts meanwhile).
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
            let stuck = queue.running >= max && queue.started.elapsed() > self.timeout * 2;
            let start = (queue.running < max && !queue.gathers()) || stuck;
            // First in an idle lane, with others waiting: gather.
            let gather = start && !stuck && company && queue.jobs.len() == 1;
            if start {
                queue.running += 1;
            }
            if stuck {
                // One more runner per stuck period, not one per call.
                queue.started = Instant::now();
                tracing::warn!(
                    op = V::OP,
                    "idem: a group-commit lane made no progress for twice the store timeout (its runners are on a runtime no longer driven?); starting another runner"
                );
            }
            if gather {
                queue.gathering = Some(Instant::now());
            }
            start.then_some(gather)
        };
        if let Some(gather) = start {
            self.spawn_runner::<I, O, V>(gather);
        }
        answer.await.unwrap_or_else(|_| Err(lost()))
    }

    /// One batch through the store, bounded by the store timeout, timed and counted.
    async fn run_batch<I, O, V: Verb<I, O>>(&self, items: &[&I]) -> Vec<Result<O, StoreError>> {
        let start = Instant::now();
        let outs = match tokio::time::timeout(self.timeout, V::run(&*self.store, items)).await {
            Ok(outs) => one_each(outs, items.len()),
            Err(_elapsed) => every(items.len(), &self.timed_out(V::OP)),
        };
        crate::metrics::batch(self.store.backend(), V::OP, items.len(), start.elapsed());
        outs
    }

    fn timed_out(&self, op: &str) -> StoreError {
        let e = format!("no answer from the store within {:?} ({op})", self.timeout);
        StoreError::timed_out(e)
    }

    /// The gate of combined lanes (`None` when they are not combined), held for at most twice
    /// the store timeout (which bounds every batch of a runtime that is driven): a holder
    /// past that is a runner on a runtime no longer driven, and the gate passes to the next
    /// caller, which the database then orders with the stale holder's write, as it does
    /// between processes.
    async fn gate(&self) -> Option<GateGuard<'_>> {
        if !self.combine {
            return None;
        }
        Some(self.gate.enter(self.timeout * 2).await)
    }

    /// Takes what every lane has queued, up to each lane's limits: one combined batch.
    fn take_all(&self) -> Taken {
        fn from<I, O, V: Verb<I, O>>(batcher: &Batcher) -> Vec<Job<I, O>> {
            let mut queue = V::lane(batcher).lock();
            // Every lane is served by this round, whichever runner it has waiting at the
            // gate: none of them is stuck.
            queue.started = Instant::now();
            batcher.take::<I, O, V>(&mut queue.jobs)
        }
        Taken {
            reserve: from::<_, _, ReserveVerb>(self),
            finalize: from::<_, _, FinalizeVerb>(self),
            heartbeat: from::<_, _, HeartbeatVerb>(self),
            release: from::<_, _, ReleaseVerb>(self),
        }
    }

    /// One combined batch through the store ([`Store::run_combined`]), bounded by the store
    /// timeout, timed and counted per verb; then each call's answer.
    async fn run_taken(self: &Arc<Self>, mut taken: Taken) {
        let start = Instant::now();
        let reserve: Vec<Claim<'_>> = sorted::<_, _, ReserveVerb>(&mut taken.reserve)
            .into_iter()
            .map(OwnedClaim::claim)
            .collect();
        let finalize: Vec<Finalize<'_>> = sorted::<_, _, FinalizeVerb>(&mut taken.finalize)
            .into_iter()
            .map(finalize_of)
            .collect();
        let heartbeat: Vec<Heartbeat<'_>> = sorted::<_, _, HeartbeatVerb>(&mut taken.heartbeat)
            .into_iter()
            .map(heartbeat_of)
            .collect();
        let release: Vec<Release<'_>> = sorted::<_, _, ReleaseVerb>(&mut taken.release)
            .into_iter()
            .map(release_of)
            .collect();
        let batches = Combined {
            reserve: &reserve,
            finalize: &finalize,
            heartbeat: &heartbeat,
            release: &release,
        };
        let run = self.store.run_combined(batches);
        let outs = match tokio::time::timeout(self.timeout, run).await {
            Ok(outs) => outs,
            Err(_elapsed) => {
                crate::store::CombinedAnswers::every(&batches, &self.timed_out("combined"))
            }
        };
        let elapsed = start.elapsed();
        let backend = self.store.backend();
        let sizes = [
            (ReserveVerb::OP, reserve.len()),
            (FinalizeVerb::OP, finalize.len()),
            (HeartbeatVerb::OP, heartbeat.len()),
            (ReleaseVerb::OP, release.len()),
        ];
        for (op, n) in sizes.into_iter().filter(|(_, n)| *n > 0) {
            crate::metrics::batch(backend, op, n, elapsed);
        }
        let (reserve, finalize) = (reserve.len(), finalize.len());
        let (heartbeat, release) = (heartbeat.len(), release.len());
        self.answer::<_, _, ReserveVerb>(taken.reserve, one_each(outs.reserve, reserve));
        self.answer::<_, _, FinalizeVerb>(taken.finalize, one_each(outs.finalize, finalize));
        self.answer::<_, _, HeartbeatVerb>(taken.heartbeat, one_each(outs.heartbeat, heartbeat));
        self.answer::<_, _, ReleaseVerb>(taken.release, one_each(outs.release, release));
    }

    /// Each job's answer to its caller; a caller that stopped waiting gets its statement
    /// undone where it must be.
    fn answer<I, O, V: Verb<I, O>>(
        self: &Arc<Self>,
        jobs: Vec<Job<I, O>>,
        outs: Vec<Result<O, StoreError>>,
    ) {
        for (job, out) in jobs.into_iter().zip(outs) {
            if let Err(out) = job.reply.send(out) {
                V::orphaned(self, job.item, &out);
            }
        }
    }

    /// Starts a runner on a slot of the lane already counted in `running` (and, with
    /// `gather`, the lane's `gathering` already set for it). With no runtime to run it on, the
    /// slot is given back.
    fn spawn_runner<I, O, V>(self: &Arc<Self>, gather: bool)
    where
        I: Send + Sync + 'static,
        O: Send + 'static,
        V: Verb<I, O> + 'static,
    {
        // Built before the task: dropped unpolled (its runtime shutting down), it still
        // gives the slot back.
        let runner = Runner::<I, O, V> {
            batcher: self.clone(),
            gathering: gather,
            done: false,
            _types: std::marker::PhantomData,
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let run: BoxFuture<()> = Box::pin(runner.run());
            drop(rt.spawn(run));
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

/// One call counted in [`Batcher::waiting`] while it is in a lane.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A runner of one lane: runs batches until the queue is empty, holding one of the lane's
/// slots (`running`) from the moment it is made. Dropped before it is done (its runtime shut
/// down before or while it ran, or the store panicked), it gives the slot back and ends the
/// gathering it was doing, and if no runner is left, the calls still queued are answered
/// "lost" at once: the lane does not stall, and the next call to arrive starts a runner.
struct Runner<I, O, V>
where
    I: Send + Sync + 'static,
    O: Send + 'static,
    V: Verb<I, O> + 'static,
{
    batcher: Arc<Batcher>,
    /// Yields once before its first batch, for the calls about to join it (the lane is
    /// `gathering` until then).
    gathering: bool,
    /// Gave its slot back itself, on finding the queue empty.
    done: bool,
    _types: std::marker::PhantomData<fn(I, O, V)>,
}

impl<I, O, V> Runner<I, O, V>
where
    I: Send + Sync + 'static,
    O: Send + 'static,
    V: Verb<I, O> + 'static,
{
    async fn run(mut self) {
        let batcher = self.batcher.clone();
        let lane = V::lane(&batcher);
        if self.gathering {
            tokio::task::yield_now().await;
            lane.lock().gathering = None;
            self.gathering = false;
        }
        if batcher.combine {
            return self.run_combined().await;
        }
        let max = batcher.max_in_flight;
        loop {
            let (mut batch, another) = {
                let mut queue = lane.lock();
                let batch = batcher.take::<I, O, V>(&mut queue.jobs);
                queue.started = Instant::now();
                if batch.is_empty() {
                    queue.running -= 1;
                    self.done = true;
                    return;
                }
                // More than this batch carries, and room for another runner: start one.
                let another = !queue.jobs.is_empty() && queue.running < max;
                if another {
                    queue.running += 1;
                }
                (batch, another)
            };
            if another {
                batcher.spawn_runner::<I, O, V>(false);
            }
            let items = sorted::<I, O, V>(&mut batch);
            let outs = batcher.run_batch::<I, O, V>(&items).await;
            batcher.answer::<I, O, V>(batch, outs);
        }
    }

    /// The runner of combined lanes: under the gate, takes what every lane has queued and
    /// sends it as one batch, until its own lane is empty. Other lanes' runners find their
    /// queues emptied by it and end; a call queued in a lane always has that lane's runner to
    /// carry it if no other runner does.
    async fn run_combined(mut self) {
        let batcher = self.batcher.clone();
        let lane = V::lane(&batcher);
        loop {
            let gate = batcher.gate().await;
            let taken = batcher.take_all();
            let own = V::taken(&taken);
            if !taken.is_empty() {
                batcher.run_taken(taken).await;
            }
            drop(gate);
            // The gate takes no turns: let the runners it just woke try for it before this
            // one is back (one of them may end, its lane served).
            tokio::task::yield_now().await;
            if own == 0 {
                // Its own lane had nothing: the other lanes' calls it carried have their own
                // runners, so it ends while its lane is quiet.
                let mut queue = lane.lock();
                if queue.jobs.is_empty() {
                    queue.running -= 1;
                    self.done = true;
                    return;
                }
            }
        }
    }
}

impl<I, O, V> Drop for Runner<I, O, V>
where
    I: Send + Sync + 'static,
    O: Send + 'static,
    V: Verb<I, O> + 'static,
{
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let lane = V::lane(&self.batcher);
        let orphans = {
            let mut queue = lane.lock();
            queue.running -= 1;
            if self.gathering {
                queue.gathering = None;
            }
            // No runner left for what is queued, and none can be started from here (on a
            // runtime shutting down it would be dropped at once, and so on): those calls are
            // answered "lost" now, their room given back, rather than left waiting.
            if queue.running == 0 {
                std::mem::take(&mut queue.jobs)
            } else {
                VecDeque::new()
            }
        };
        drop(orphans);
    }
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// The gate of combined lanes: one holder at a time, and a holder is passed over once it has
/// held the gate longer than the caller's `stale` (it is not being run), so a runner frozen
/// on a runtime no longer driven, holding the gate or first in line for it, holds up no one
/// for good. Every waiter is woken when the gate frees and checks again.
#[derive(Default)]
struct Gate {
    /// The holder's number and since when it holds the gate.
    held: Mutex<(Option<(u64, Instant)>, u64)>,
    freed: tokio::sync::Notify,
}

/// The gate held; freed on drop unless it passed on meanwhile.
struct GateGuard<'g> {
    gate: &'g Gate,
    number: u64,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, (Option<(u64, Instant)>, u64)> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn enter(&self, stale: Duration) -> GateGuard<'_> {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the check: a gate freed after it wakes this waiter.
            freed.as_mut().enable();
            let wait = {
                let mut state = self.lock();
                let (held, next) = &mut *state;
                let left = held.map(|(_, since)| stale.saturating_sub(since.elapsed()));
                match left {
                    Some(left) if !left.is_zero() => left,
                    stale_or_free => {
                        if stale_or_free.is_some() {
                            tracing::warn!(
                                "idem: a combined group-commit batch has held its gate for twice the store timeout (its runner is on a runtime no longer driven?); passing it on"
                            );
                        }
                        *next += 1;
                        *held = Some((*next, Instant::now()));
                        return GateGuard {
                            gate: self,
                            number: *next,
                        };
                    }
                }
            };
            drop(tokio::time::timeout(wait, freed).await);
        }
    }
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.gate.lock();
        if state.0.is_some_and(|(number, _)| number == self.number) {
            state.0 = None;
            drop(state);
            self.gate.freed.notify_waiters();
        }
    }
}

/// `jobs` sorted by record: one global lock order, so two batches touching the same rows
/// cannot deadlock.
fn sorted<I, O, V: Verb<I, O>>(jobs: &mut [Job<I, O>]) -> Vec<&I> {
    jobs.sort_by(|a, b| V::id(&a.item).cmp(V::id(&b.item)));
    jobs.iter().map(|job| &job.item).collect()
}

/// What combined lanes took for one batch: every verb's jobs.
struct Taken {
    reserve: Vec<Job<OwnedClaim, Reservation>>,
    finalize: Vec<Job<(RecordId, Fence, StoredResult, Duration), bool>>,
    heartbeat: Vec<Job<(RecordId, Fence, Duration), bool>>,
    release: Vec<Job<(RecordId, Fence), bool>>,
}

impl Taken {
    fn is_empty(&self) -> bool {
        self.reserve.is_empty()
            && self.finalize.is_empty()
            && self.heartbeat.is_empty()
            && self.release.is_empty()
    }
}

/// A batch's answers, which must be one per statement sent: a store that answered fewer ran
/// them all the same, so any may have been applied.
fn one_each<O>(outs: Vec<Result<O, StoreError>>, sent: usize) -> Vec<Result<O, StoreError>> {
    if outs.len() == sent {
        return outs;
    }
    let e = format!("the store answered {} of {sent} statements", outs.len());
    every(sent, &StoreError::msg(e).maybe_applied())
}

/// The answer to a statement whose batch was lost: it may have been applied (the engine then
/// keeps its guard armed, and releases what it may have reserved).
fn lost() -> StoreError {
    StoreError::msg("the batch carrying this statement was lost").maybe_applied()
}

/// A lane slot held by a call running its statement on its own, in its own task. Given back
/// on drop, when a runner is started for whatever queued meanwhile.
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
        self.batcher.spawn_runner::<I, O, V>(false);
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::Context;

    use super::*;
    use crate::store::{MemoryStore, Record, StoredResult};

    /// A memory store that batches, and remembers the size of every reservation batch.
    struct Counting {
        inner: MemoryStore,
        batches: Mutex<Vec<usize>>,
        /// The task each batch ran in (`None`: the test's own `block_on`, not a task).
        tasks: Mutex<Vec<Option<tokio::task::Id>>>,
        /// What the store says of itself: how many batches it runs well at once.
        concurrency: usize,
        /// Reservation batches in flight now, and the most there were at once.
        in_flight: AtomicUsize,
        most_in_flight: AtomicUsize,
        /// Reservation batches are written, and then their answers lost (a connection that
        /// dropped after the commit): every item is an error that may have been applied.
        lose_answers: std::sync::atomic::AtomicBool,
        /// Reservation batches are written, and the store answers one item fewer than it
        /// was sent (a store breaking the `_many` contract).
        answer_short: std::sync::atomic::AtomicBool,
        /// Says it combines its verbs' batches ([`Store::combine_verbs`]).
        combine: bool,
        /// The shape of every combined batch: reservations, finalizes, heartbeats, releases.
        combined: Mutex<Vec<[usize; 4]>>,
        /// The next combined batch with reservations takes half a second.
        slow_combined: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl Store for Counting {
        async fn reserve(&self, claim: &Claim<'_>) -> Result<Reservation, StoreError> {
            self.inner.reserve(claim).await
        }
        async fn load(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
            self.inner.load(id).await
        }
        async fn take_over(&self, claim: &Claim<'_>, observed: Fence) -> Result<bool, StoreError> {
            self.inner.take_over(claim, observed).await
        }
        async fn heartbeat(
            &self,
            id: &RecordId,
            fence: Fence,
            lease: Duration,
        ) -> Result<bool, StoreError> {
            self.inner.heartbeat(id, fence, lease).await
        }
        async fn finalize(
            &self,
            id: &RecordId,
            fence: Fence,
            result: &StoredResult,
            ttl: Duration,
        ) -> Result<bool, StoreError> {
            self.inner.finalize(id, fence, result, ttl).await
        }
        async fn release(&self, id: &RecordId, fence: Fence) -> Result<bool, StoreError> {
            self.inner.release(id, fence).await
        }
        async fn purge(&self, limit: u32) -> Result<u64, StoreError> {
            self.inner.purge(limit).await
        }
        async fn reserve_many(&self, claims: &[Claim<'_>]) -> Vec<Result<Reservation, StoreError>> {
            self.batches.lock().unwrap().push(claims.len());
            self.tasks.lock().unwrap().push(tokio::task::try_id());
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_in_flight.fetch_max(now, Ordering::SeqCst);
            // A round trip: the batch is in flight for a while.
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            let out = self.inner.reserve_many(claims).await;
            if self.lose_answers.load(Ordering::SeqCst) {
                let lost = StoreError::msg("test: answers lost after the commit").maybe_applied();
                return every(out.len(), &lost);
            }
            if self.answer_short.load(Ordering::SeqCst) {
                let mut out = out;
                out.pop();
                return out;
            }
            out
        }
        fn group_commit(&self) -> bool {
            true
        }
        fn batch_concurrency(&self) -> usize {
            self.concurrency
        }
        fn combine_verbs(&self) -> bool {
            self.combine
        }
        async fn run_combined(&self, batches: Combined<'_>) -> crate::store::CombinedAnswers {
            let shape = [
                batches.reserve.len(),
                batches.finalize.len(),
                batches.heartbeat.len(),
                batches.release.len(),
            ];
            self.combined.lock().unwrap().push(shape);
            // A round trip: the batch is in flight for a while (the first one, much longer
            // when the test says so).
            let slow = shape[0] > 0 && self.slow_combined.swap(false, Ordering::SeqCst);
            let pause = if slow { 500 } else { 5 };
            tokio::time::sleep(Duration::from_millis(pause)).await;
            batches.run_each(&self.inner).await
        }
        fn backend(&self) -> &'static str {
            "counting"
        }
    }

    fn batcher(max_in_flight: usize) -> (Arc<Batcher>, Arc<Counting>) {
        batcher_timing_out(max_in_flight, Duration::from_secs(5))
    }

    fn batcher_timing_out(
        max_in_flight: usize,
        timeout: Duration,
    ) -> (Arc<Batcher>, Arc<Counting>) {
        let limits = BatchLimits {
            max_rows: 128,
            max_bytes: 1 << 20,
            max_in_flight: Some(max_in_flight),
            max_queued: 1024,
        };
        batcher_with(limits, 2, timeout, false)
    }

    /// A batcher with `limits` on a counting store that says it runs `concurrency` batches
    /// well at once.
    fn batcher_with(
        limits: BatchLimits,
        concurrency: usize,
        timeout: Duration,
        combine: bool,
    ) -> (Arc<Batcher>, Arc<Counting>) {
        let store = Arc::new(Counting {
            inner: MemoryStore::new(),
            batches: Mutex::new(Vec::new()),
            tasks: Mutex::new(Vec::new()),
            concurrency,
            in_flight: AtomicUsize::new(0),
            most_in_flight: AtomicUsize::new(0),
            lose_answers: std::sync::atomic::AtomicBool::new(false),
            answer_short: std::sync::atomic::AtomicBool::new(false),
            combine,
            combined: Mutex::new(Vec::new()),
            slow_combined: std::sync::atomic::AtomicBool::new(false),
        });
        let batcher = Batcher::new(store.clone(), timeout, limits);
        (Arc::new(batcher), store)
    }

    /// The limits of the combined-lane tests: the store's own number in flight.
    const COMBINED: BatchLimits = BatchLimits {
        max_rows: 128,
        max_bytes: 1 << 20,
        max_in_flight: None,
        max_queued: 1024,
    };

    /// A batcher on a counting store that runs one batch at a time and combines its verbs.
    fn combined_batcher(timeout: Duration) -> (Arc<Batcher>, Arc<Counting>) {
        batcher_with(COMBINED, 1, timeout, true)
    }

    /// Reserves `key`, which must be acquired: its record and fence, for later writes.
    async fn hold(batcher: &Arc<Batcher>, key: &str) -> (RecordId, Fence) {
        let held = claim(key);
        let (id, fence) = (held.id.clone(), held.fence);
        acquires(batcher.reserve(held), key).await;
        (id, fence)
    }

    fn claim(key: &str) -> OwnedClaim {
        OwnedClaim {
            id: RecordId::new("batch-test", key),
            fence: Fence::random(),
            owner: "test".into(),
            fingerprint: None,
            lease: Duration::from_secs(30),
        }
    }

    /// A reservation of `key` in a task of its own, started now; its answer when awaited.
    fn spawn_reserve(
        batcher: &Arc<Batcher>,
        key: &str,
    ) -> impl Future<Output = Result<Reservation, StoreError>> + use<> {
        let (batcher, claim) = (batcher.clone(), claim(key));
        let task = tokio::spawn(async move { batcher.reserve(claim).await });
        async move { task.await.expect("task") }
    }

    /// Waits (at most 5 s) for a reservation, which must acquire its record.
    async fn acquires(call: impl Future<Output = Result<Reservation, StoreError>>, why: &str) {
        let got = tokio::time::timeout(Duration::from_secs(5), call).await;
        assert!(
            matches!(got.expect(why), Ok(Reservation::Acquired)),
            "{why}"
        );
    }

    /// Polls `call` once, with a waker that does nothing: whether it is still pending.
    fn pending_after_one_poll<F: Future>(call: Pin<&mut F>) -> bool {
        let waker = futures_util::task::noop_waker();
        call.poll(&mut Context::from_waker(&waker)).is_pending()
    }

    /// A runtime of its own, to shut down under a runner.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// A call in flight (in a task of its own), so that the next call has company.
    async fn busy(
        batcher: &Arc<Batcher>,
    ) -> impl Future<Output = Result<Reservation, StoreError>> + use<> {
        let busy = spawn_reserve(batcher, "busy");
        tokio::task::yield_now().await;
        busy
    }

    /// Waits (at most 5 s) until the store no longer holds `id`'s record.
    async fn released(store: &Counting, id: &RecordId, why: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while store.inner.load(id).await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "{why}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Unless the runtime is told otherwise, a lane runs as many batches at once as its store
    /// says it runs well: one, for a store with one writer (SQLite), however many calls queue.
    #[tokio::test(flavor = "current_thread")]
    async fn a_lane_runs_as_many_batches_at_once_as_its_store_runs_well() {
        for (configured, store_says, most) in [(None, 1, 1), (None, 2, 2), (Some(2), 1, 2)] {
            let limits = BatchLimits {
                // Small batches: 24 queued calls need several, so a lane with room runs more
                // than one at once.
                max_rows: 4,
                max_bytes: 1 << 20,
                max_in_flight: configured,
                max_queued: 1024,
            };
            let (batcher, store) = batcher_with(limits, store_says, Duration::from_secs(5), false);
            let calls: Vec<_> = (0..24)
                .map(|i| spawn_reserve(&batcher, &format!("k{i}")))
                .collect();
            for call in calls {
                acquires(call, "queued behind the batches in flight").await;
            }
            assert_eq!(
                store.most_in_flight.load(Ordering::SeqCst),
                most,
                "configured {configured:?}, the store says {store_says}"
            );
        }
    }

    /// Calls answered by one batch and sending their next statement at once share one
    /// statement: the first to find the lane idle lets the others, already woken, join it,
    /// instead of going alone and leaving them the next one.
    #[tokio::test(flavor = "current_thread")]
    async fn calls_answered_together_share_their_next_statement() {
        for max_in_flight in [1, 2] {
            let (batcher, store) = batcher(max_in_flight);
            // A lone call: no one else waits, so it goes at once and alone.
            let lone = busy(&batcher).await;
            let calls: Vec<_> = (0..8)
                .map(|i| {
                    let batcher = batcher.clone();
                    tokio::spawn(async move {
                        let first = batcher.reserve(claim(&format!("a{i}"))).await?;
                        let second = batcher.reserve(claim(&format!("b{i}"))).await?;
                        Ok::<_, StoreError>([first, second])
                    })
                })
                .collect();
            acquires(lone, "the lone call").await;
            for call in calls {
                let got = call.await.expect("task").expect("reserve");
                assert!(got.iter().all(|r| matches!(r, Reservation::Acquired)));
            }
            let batches = store.batches.lock().unwrap().clone();
            assert_eq!(batches, vec![1, 8, 8], "{max_in_flight} in flight");
        }
    }

    /// A call with no other call waiting goes at once, on its own, in its caller's task.
    #[tokio::test(flavor = "current_thread")]
    async fn a_lone_call_goes_on_its_own() {
        let (batcher, store) = batcher(2);
        for i in 0..3 {
            acquires(batcher.reserve(claim(&format!("k{i}"))), "alone").await;
        }
        // Each went as a batch of one, nothing waiting for company, sent from the caller's
        // own future (here the test's `block_on`), not from a runner task.
        assert_eq!(store.batches.lock().unwrap().clone(), vec![1, 1, 1]);
        assert_eq!(store.tasks.lock().unwrap().clone(), vec![None; 3]);
        assert!(store.inner.load(&claim("k2").id).await.unwrap().is_some());
    }

    /// The call that starts a gathering runner is not needed for the others to be carried:
    /// left unpolled (its caller busy elsewhere), it holds up no one, and its answer waits.
    #[tokio::test(flavor = "current_thread")]
    async fn an_unpolled_caller_holds_up_no_one() {
        let (batcher, store) = batcher(2);
        let busy = busy(&batcher).await;
        let mut first = Box::pin(batcher.reserve(claim("first")));
        assert!(
            pending_after_one_poll(first.as_mut()),
            "queued for its runner"
        );
        let others: Vec<_> = (0..3)
            .map(|i| spawn_reserve(&batcher, &format!("k{i}")))
            .collect();
        for call in others {
            acquires(call, "not held up").await;
        }
        acquires(busy, "busy").await;
        acquires(batcher.reserve(claim("after")), "the lane is free").await;
        acquires(first, "its answer waited").await;
        let batches = store.batches.lock().unwrap().clone();
        assert_eq!(
            batches[..2],
            [1, 4],
            "the first call and the three that joined it"
        );
    }

    /// A caller gone before its gathered batch runs: the others are answered, its own
    /// reservation (acquired for no one) is released, and the lane still serves.
    #[tokio::test(flavor = "current_thread")]
    async fn a_caller_gone_while_its_batch_gathers_leaves_nothing_behind() {
        let (batcher, store) = batcher(2);
        let busy = busy(&batcher).await;
        let gone = claim("gone");
        let gone_id = gone.id.clone();
        let mut first = Box::pin(batcher.reserve(gone));
        assert!(pending_after_one_poll(first.as_mut()));
        drop(first);
        let others: Vec<_> = (0..2)
            .map(|i| spawn_reserve(&batcher, &format!("k{i}")))
            .collect();
        for call in others {
            acquires(call, "answered").await;
        }
        acquires(busy, "busy").await;
        // The release of the orphaned reservation runs in a task of its own.
        released(&store, &gone_id, "the orphaned reservation was released").await;
        acquires(batcher.reserve(claim("after")), "the lane is free").await;
    }

    /// A caller gone while its batch is in flight, whose batch wrote its reservation and then
    /// lost the answers: the reservation it may hold (acquired for no one) is released, under
    /// its own fence, rather than left held for its whole lease.
    #[tokio::test(flavor = "current_thread")]
    async fn a_gone_callers_reservation_its_batch_may_have_written_is_released() {
        let (batcher, store) = batcher(2);
        store.lose_answers.store(true, Ordering::SeqCst);
        let busy = busy(&batcher).await;
        let gone = claim("gone");
        let gone_id = gone.id.clone();
        let mut first = Box::pin(batcher.reserve(gone));
        assert!(pending_after_one_poll(first.as_mut()), "queued");
        drop(first);
        let answer = busy.await;
        assert!(
            matches!(&answer, Err(e) if e.is_timeout()),
            "a lost answer may have been applied: {answer:?}"
        );
        // Its batch (the second) wrote the reservation; a task of its own then releases it.
        assert_eq!(store.batches.lock().unwrap()[..], [1, 1]);
        released(
            &store,
            &gone_id,
            "the maybe-written reservation was released",
        )
        .await;
    }

    /// A store that answers fewer items than its batch carried ran the batch: every call in
    /// it gets an error that may have been applied (so the engine releases what it may hold),
    /// never an answer meant for another call.
    #[tokio::test(flavor = "current_thread")]
    async fn a_batch_answered_short_may_have_been_applied_for_every_call() {
        let (batcher, store) = batcher(1);
        store.answer_short.store(true, Ordering::SeqCst);
        // One call alone, answered with nothing; then two calls queued behind it share a
        // batch, answered with one item: neither takes it.
        let busy = busy(&batcher).await;
        let queued = [
            spawn_reserve(&batcher, "queued-1"),
            spawn_reserve(&batcher, "queued-2"),
        ];
        tokio::task::yield_now().await;
        let mut answers = vec![busy.await];
        for call in queued {
            answers.push(call.await);
        }
        assert_eq!(store.batches.lock().unwrap()[..], [1, 2]);
        for answer in answers {
            assert!(
                matches!(&answer, Err(e) if e.is_timeout()),
                "a short answer may have been applied: {answer:?}"
            );
        }
    }

    /// A runner whose runtime shuts down before it runs (a runtime shared across tests, or a
    /// service's runtime stopping) gives its slot back and stops gathering: the lane still
    /// serves calls from another runtime instead of leaving them queued with no runner.
    #[test]
    fn a_runner_dropped_unrun_does_not_stall_its_lane() {
        let (batcher, _store) = batcher(1);
        let first = runtime();
        first.block_on(async {
            {
                let mut queue = batcher.reserve.lock();
                queue.running += 1;
                queue.gathering = Some(Instant::now());
            }
            batcher.spawn_runner::<OwnedClaim, Reservation, ReserveVerb>(true);
        });
        // Shut down with the runner never polled.
        drop(first);
        {
            let queue = batcher.reserve.lock();
            assert_eq!(queue.running, 0, "the slot was given back");
            assert!(queue.gathering.is_none(), "the gathering ended");
        }
        runtime().block_on(acquires(batcher.reserve(claim("later")), "the lane serves"));
    }

    /// A runner dropped with calls still queued and no other runner left (its runtime shut
    /// down): the calls are answered "lost" at once, as an outcome that may have been applied,
    /// and their room in the queue is given back, instead of waiting for a runner that will
    /// never come.
    #[test]
    fn calls_queued_behind_a_dropped_runner_are_answered_at_once() {
        let (batcher, _store) = batcher(1);
        let free = batcher.reserve.room.available_permits();
        // Another call somewhere in the lanes: this one queues and starts a runner.
        let _other = Waiting::new(&batcher.waiting);
        let mut call = Box::pin(batcher.reserve(claim("queued")));
        let first = runtime();
        first.block_on(async {
            assert!(
                pending_after_one_poll(call.as_mut()),
                "queued, its runner spawned"
            );
        });
        // Shut down with the runner never run.
        drop(first);
        assert_eq!(
            batcher.reserve.lock().running,
            0,
            "its place was given back"
        );
        assert_eq!(
            batcher.reserve.room.available_permits(),
            free,
            "and the call's room"
        );
        let got = runtime().block_on(async {
            tokio::time::timeout(Duration::from_secs(5), call)
                .await
                .expect("answered, not left waiting")
        });
        let e = got.expect_err("lost");
        assert!(e.is_timeout(), "lost means it may have been applied: {e}");
    }

    /// A gathering whose runner is not being run (its runtime blocked or no longer driven)
    /// holds back other runners only briefly: a call from elsewhere starts its own.
    #[tokio::test(flavor = "current_thread")]
    async fn a_stale_gathering_holds_no_one_back() {
        let (batcher, _store) = batcher(2);
        {
            // A runner that started gathering a while ago and has not run since.
            let mut queue = batcher.reserve.lock();
            queue.running += 1;
            queue.gathering = Some(Instant::now());
        }
        tokio::time::sleep(STALE_GATHERING * 2).await;
        // Another call somewhere in the lanes, so this one queues (and would wait for the
        // gathering runner) instead of going alone.
        let _other = Waiting::new(&batcher.waiting);
        acquires(batcher.reserve(claim("later")), "not held back").await;
    }

    /// A lane whose runners are all stuck (on a runtime no longer driven, where even the
    /// store timeout cannot fire) for twice the store timeout gets one more runner from the
    /// next call, instead of leaving every later call to time out.
    #[tokio::test(flavor = "current_thread")]
    async fn a_lane_whose_runners_are_stuck_starts_another() {
        let (batcher, _store) = batcher_timing_out(1, Duration::from_millis(20));
        {
            // The lane's one runner, stuck since now.
            let mut queue = batcher.reserve.lock();
            queue.running += 1;
            queue.started = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
        let _other = Waiting::new(&batcher.waiting);
        acquires(batcher.reserve(claim("later")), "served").await;
        // The stuck runner still holds its place; the extra one gave its own back.
        assert_eq!(batcher.reserve.lock().running, 1);
    }

    /// A store that runs one write at a time combines its lanes: the reservations and the
    /// results queued while a statement was in flight go together in the next batch, one
    /// store call, and each call still gets its own answer. With two batches in flight the
    /// lanes stay apart (a store that does not combine: every other test here).
    #[tokio::test(flavor = "current_thread")]
    async fn combined_lanes_carry_reservations_and_results_in_one_batch() {
        let (batcher, store) = combined_batcher(Duration::from_secs(5));
        let (id, fence) = hold(&batcher, "done").await;
        assert!(
            store.combined.lock().unwrap().is_empty(),
            "alone: its own verb"
        );

        acquires(batcher.reserve(claim("a")), "a, before").await;
        let first = busy(&batcher).await;
        let (a, b) = (spawn_reserve(&batcher, "a"), spawn_reserve(&batcher, "b"));
        let result = StoredResult {
            codec: crate::codec::Codec::Json,
            bytes: b"1".to_vec(),
        };
        let finalize = {
            let batcher = batcher.clone();
            let (id, ttl) = (id.clone(), Duration::from_secs(60));
            tokio::spawn(async move { batcher.finalize(id, fence, result, ttl).await })
        };
        let wrong = {
            let batcher = batcher.clone();
            let id = id.clone();
            tokio::spawn(async move { batcher.release(id, Fence::random()).await })
        };
        acquires(first, "busy").await;
        assert!(
            matches!(a.await, Ok(Reservation::Exists(_))),
            "a was reserved before: its own answer"
        );
        acquires(b, "b").await;
        assert!(
            finalize.await.expect("task").expect("finalize"),
            "its own fence"
        );
        assert!(
            !wrong.await.expect("task").expect("release"),
            "not its fence"
        );
        assert_eq!(
            *store.combined.lock().unwrap(),
            [[2, 1, 0, 1]],
            "what queued behind the busy call went as one combined batch"
        );
        let record = store.inner.load(&id).await.expect("load").expect("record");
        assert_eq!(record.state, crate::store::RecordState::Completed);

        // Two batches in flight: the lanes stay apart.
        let limits = BatchLimits {
            max_in_flight: Some(2),
            ..COMBINED
        };
        let (batcher, store) = batcher_with(limits, 1, Duration::from_secs(5), true);
        let first = busy(&batcher).await;
        let (a, b) = (spawn_reserve(&batcher, "a"), spawn_reserve(&batcher, "b"));
        acquires(first, "busy").await;
        acquires(a, "a").await;
        acquires(b, "b").await;
        assert!(store.combined.lock().unwrap().is_empty());
        assert!(!store.batches.lock().unwrap().is_empty());
    }

    /// A lone call on combined lanes takes no gate: polled once and then left pending, it
    /// holds up no later call, whose batch goes at once.
    #[tokio::test(flavor = "current_thread")]
    async fn a_lone_call_left_pending_holds_up_no_combined_batch() {
        let (batcher, _store) = combined_batcher(Duration::from_secs(5));
        let (id, fence) = hold(&batcher, "held").await;
        let lone = batcher.reserve(claim("lone"));
        tokio::pin!(lone);
        assert!(pending_after_one_poll(lone.as_mut()), "in its store call");
        // Another lane's call, with company (the lone call still waits): a combined batch.
        let later = {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.release(id, fence).await })
        };
        let got = tokio::time::timeout(Duration::from_secs(2), later).await;
        let got = got.expect("not held up").expect("task");
        assert!(got.expect("release"), "released under its own fence");
    }

    /// The gate of combined lanes passes on from a holder that has held it too long (a runner
    /// frozen on a runtime no longer driven), and that holder's late release frees nothing;
    /// a waiter that is never polled again holds up none of the others.
    #[tokio::test(flavor = "current_thread")]
    async fn a_stale_gate_passes_on_and_a_frozen_waiter_holds_up_no_one() {
        let gate = Gate::default();
        let stale = Duration::from_secs(1);
        let frozen = gate.enter(stale).await;
        let start = Instant::now();
        let second = gate.enter(stale).await;
        assert!(start.elapsed() >= stale, "waited for the holder first");
        drop(frozen);
        let third = gate.enter(stale);
        tokio::pin!(third);
        assert!(
            pending_after_one_poll(third.as_mut()),
            "the stale holder's release did not free the gate its successor holds"
        );
        drop(second);
        let third = tokio::time::timeout(Duration::from_secs(2), third).await;
        let third = third.expect("freed");

        // A waiter polled once and then left alone, and one that is run.
        let gate = Arc::new(Gate::default());
        let long = Duration::from_secs(60);
        let holder = gate.enter(long).await;
        let frozen_waiter = gate.enter(long);
        tokio::pin!(frozen_waiter);
        assert!(pending_after_one_poll(frozen_waiter.as_mut()));
        let runs = {
            let gate = gate.clone();
            tokio::spawn(async move { drop(gate.enter(long).await) })
        };
        tokio::task::yield_now().await;
        drop(holder);
        let ran = tokio::time::timeout(Duration::from_secs(2), runs).await;
        ran.expect("woken when the gate freed").expect("task");
        drop(third);
    }

    /// A lane whose calls other runners carry in their combined rounds is served, even while
    /// its own runner waits at the gate all along: a call arriving long after its last one
    /// does not take that runner for one stuck on a runtime no longer driven (which would
    /// start another, and log that the runtime is not driven).
    #[tokio::test(flavor = "current_thread")]
    async fn a_lane_served_by_combined_rounds_is_not_taken_for_stuck() {
        // Stuck means nothing started for twice the timeout: 400 ms here.
        let (batcher, _store) = combined_batcher(Duration::from_millis(200));
        let (id, fence) = hold(&batcher, "held").await;
        // Company for the whole test, so that the beats queue rather than go alone.
        let lone = batcher.reserve(claim("lone"));
        tokio::pin!(lone);
        assert!(pending_after_one_poll(lone.as_mut()));
        let beat = |batcher: &Arc<Batcher>| {
            let (batcher, id) = (batcher.clone(), id.clone());
            tokio::spawn(async move { batcher.heartbeat(id, fence, Duration::from_secs(30)).await })
        };
        // This test is the holder that never lets go for long: it re-takes the gate at once
        // each time it gives it back, and serves every lane in its rounds.
        let mut gate = batcher.gate().await;
        let first = beat(&batcher);
        tokio::task::yield_now().await;
        assert_eq!(
            batcher.heartbeat.lock().running,
            1,
            "its runner, at the gate"
        );
        for _ in 0..25 {
            drop(gate);
            gate = batcher.gate().await;
            let taken = batcher.take_all();
            if !taken.is_empty() {
                batcher.run_taken(taken).await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            first.await.expect("task").expect("beat"),
            "carried by a round"
        );
        let second = beat(&batcher);
        tokio::task::yield_now().await;
        assert_eq!(
            batcher.heartbeat.lock().running,
            1,
            "no second runner for a lane the rounds kept serving"
        );
        drop(gate);
        let second = tokio::time::timeout(Duration::from_secs(2), second).await;
        assert!(second.expect("served").expect("task").expect("beat"));
    }

    /// A combined batch that outlasts the store timeout: every call it carried gets a timeout
    /// (a statement that may have been applied, so the engine keeps its guard), and the lanes
    /// serve the next calls.
    #[tokio::test(flavor = "current_thread")]
    async fn a_combined_batch_past_the_timeout_times_out_every_call_it_carried() {
        let (batcher, store) = combined_batcher(Duration::from_millis(100));
        let (id, fence) = hold(&batcher, "held").await;
        let first = busy(&batcher).await;
        store.slow_combined.store(true, Ordering::SeqCst);
        let (a, b) = (spawn_reserve(&batcher, "a"), spawn_reserve(&batcher, "b"));
        let beat = {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.heartbeat(id, fence, Duration::from_secs(30)).await })
        };
        acquires(first, "busy").await;
        for (name, got) in [("a", a.await), ("b", b.await)] {
            assert!(matches!(&got, Err(e) if e.is_timeout()), "{name}: {got:?}");
        }
        let beat = beat.await.expect("task");
        assert!(matches!(&beat, Err(e) if e.is_timeout()), "beat: {beat:?}");
        assert_eq!(store.combined.lock().unwrap()[0], [2, 0, 1, 0]);
        acquires(batcher.reserve(claim("after")), "the lanes serve on").await;
    }
}
