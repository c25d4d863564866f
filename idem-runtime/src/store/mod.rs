//! The durable record: the [`Store`] trait and its backends.
//!
//! A store executes the protocol's statements and nothing else. It never decides whether to
//! wait, retry, replay or take over; the engine does, from what the store returns. Each verb
//! is one statement (or one statement and a read, where a backend cannot return the
//! conflicting row from the insert), and every write after `reserve` is fenced: it changes
//! the row only while the row still holds the caller's fence token and is in progress.
//!
//! Durations, not instants, cross this boundary. A store computes `now + lease` and "is the
//! lease over?" with its own clock (the database server's clock where there is one), so
//! replicas with skewed clocks agree on who owns a record.
//!
//! Backends: [`MemoryStore`] (tests, single process) implements the trait directly; the SQL
//! stores are one generic store over a dialect ([`sql`]): `SqliteStore` (feature `sqlite`,
//! the embedded default), `PgStore` (feature `postgres`) and `MySqlStore` (feature `mysql`,
//! for MySQL and MariaDB), the shared stores for many replicas.

mod memory;
#[cfg(feature = "redis")]
mod redis;
#[cfg(feature = "_sql")]
pub mod sql;

use std::fmt;
use std::time::Duration;

pub use memory::MemoryStore;
#[cfg(feature = "redis")]
pub use redis::{RedisStore, RedisStoreOptions};
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub use sql::ServerStoreOptions;
#[cfg(feature = "sqlite")]
pub use sql::SqliteStoreOptions;
#[cfg(feature = "mysql")]
pub use sql::mysql::MySqlStore;
#[cfg(feature = "postgres")]
pub use sql::postgres::PgStore;
#[cfg(feature = "sqlite")]
pub use sql::sqlite::SqliteStore;

/// How [`PgStore::connect_with`] connects (feature `postgres`).
#[cfg(feature = "postgres")]
pub type PgStoreOptions = ServerStoreOptions;

/// How [`MySqlStore::connect_with`] connects (feature `mysql`).
#[cfg(feature = "mysql")]
pub type MySqlStoreOptions = ServerStoreOptions;

use crate::codec::Codec;
use crate::error::StoreError;
use crate::key::{Fingerprint, RecordId};

/// The table name used when none is configured.
pub const DEFAULT_TABLE: &str = "idem_records";

/// How many batches of one verb run at once on a store that does not say otherwise
/// ([`Store::batch_concurrency`]).
pub(crate) const BATCH_CONCURRENCY: usize = 2;

/// The token that makes a reservation this caller's own.
///
/// Every reservation and takeover writes a fresh random fence; heartbeat, finalize and
/// release change the row only while it still holds that fence. A caller whose record was
/// taken over (even by the same process) therefore cannot overwrite the new owner's work.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fence(i64);

impl Fence {
    /// A fresh fence token (random, never zero).
    pub fn random() -> Fence {
        loop {
            let v = fastrand::i64(..);
            if v != 0 {
                return Fence(v);
            }
        }
    }

    /// The token as stored.
    pub fn get(self) -> i64 {
        self.0
    }

    /// A token read back from a store.
    pub fn from_raw(v: i64) -> Fence {
        Fence(v)
    }
}

impl fmt::Debug for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fence({:016x})", self.0)
    }
}

/// The two states a record can be in. A released or purged record is simply absent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordState {
    /// A caller holds the reservation and is running the body.
    InProgress,
    /// The body finished; `result` holds what to replay until the record expires.
    Completed,
}

impl RecordState {
    /// The value stored in the `state` column.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordState::InProgress => "in_progress",
            RecordState::Completed => "completed",
        }
    }

    /// Parses the `state` column.
    pub fn parse(s: &str) -> Option<RecordState> {
        match s {
            "in_progress" => Some(RecordState::InProgress),
            "completed" => Some(RecordState::Completed),
            _ => None,
        }
    }
}

/// A stored result: the encoded bytes of the fn's value (or error) and how they are encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResult {
    /// How `bytes` are encoded and whether they hold an error.
    pub codec: Codec,
    /// The encoded result.
    pub bytes: Vec<u8>,
}

/// A record as a store reads it back.
#[derive(Clone, Debug)]
pub struct Record {
    /// In progress or completed.
    pub state: RecordState,
    /// The payload fingerprint of the call that created (or took over) the record, if it had one.
    pub fingerprint: Option<Fingerprint>,
    /// The current owner's fence token.
    pub fence: Fence,
    /// The executor id of the current (or last) owner, for operators.
    pub owner: String,
    /// How many times a body has started for this record (1 + takeovers).
    pub attempts: u32,
    /// For an in-progress record: how long its lease still runs, by the store's clock.
    /// Zero once the lease is over (the record may be taken over).
    pub lease_remaining: Duration,
    /// How long until the record expires, by the store's clock; zero once it has expired
    /// (a completed record is then reused by the next caller).
    pub expires_in: Duration,
    /// For a completed record: the result to replay.
    pub result: Option<StoredResult>,
}

/// What a caller asks a store to write when it reserves or takes over a record.
#[derive(Clone, Copy, Debug)]
pub struct Claim<'a> {
    /// The record.
    pub id: &'a RecordId,
    /// The caller's fresh fence token.
    pub fence: Fence,
    /// The caller's executor id.
    pub owner: &'a str,
    /// The caller's payload fingerprint, if the fn has one.
    pub fingerprint: Option<&'a Fingerprint>,
    /// How long the reservation lasts without a heartbeat.
    pub lease: Duration,
}

/// What `reserve` found.
#[derive(Clone, Debug)]
pub enum Reservation {
    /// The record did not exist; it is now in progress and the caller owns it.
    Acquired,
    /// The record exists; here it is as read just after the failed insert.
    Exists(Record),
    /// The insert conflicted, but the record was gone by the time it was read (released or
    /// purged in between). Reserving again will usually succeed.
    Vanished,
}

/// One fenced `finalize` of a batch: see [`Store::finalize`].
#[derive(Clone, Copy, Debug)]
pub struct Finalize<'a> {
    /// The record.
    pub id: &'a RecordId,
    /// The caller's fence.
    pub fence: Fence,
    /// What to store.
    pub result: &'a StoredResult,
    /// How long to replay it.
    pub ttl: Duration,
}

/// One fenced `heartbeat` of a batch: see [`Store::heartbeat`].
#[derive(Clone, Copy, Debug)]
pub struct Heartbeat<'a> {
    /// The record.
    pub id: &'a RecordId,
    /// The caller's fence.
    pub fence: Fence,
    /// The lease, from now.
    pub lease: Duration,
}

/// One fenced `release` of a batch: see [`Store::release`].
#[derive(Clone, Copy, Debug)]
pub struct Release<'a> {
    /// The record.
    pub id: &'a RecordId,
    /// The caller's fence.
    pub fence: Fence,
}

/// Batches of several verbs, carried in one transaction and one commit by a store that runs
/// one write at a time: see [`Store::combine_verbs`].
#[derive(Clone, Copy, Debug, Default)]
#[non_exhaustive]
pub struct Combined<'a> {
    /// Reservations, as for [`Store::reserve_many`].
    pub reserve: &'a [Claim<'a>],
    /// Finalizes, as for [`Store::finalize_many`].
    pub finalize: &'a [Finalize<'a>],
    /// Heartbeats, as for [`Store::heartbeat_many`].
    pub heartbeat: &'a [Heartbeat<'a>],
    /// Releases, as for [`Store::release_many`].
    pub release: &'a [Release<'a>],
}

impl Combined<'_> {
    /// How many items the batches carry in all.
    pub fn len(&self) -> usize {
        self.reserve.len() + self.finalize.len() + self.heartbeat.len() + self.release.len()
    }

    /// Whether they carry none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each verb's batch through its own `_many` verb, one after another: the default of
    /// [`Store::run_combined`].
    pub async fn run_each<S: Store + ?Sized>(self, store: &S) -> CombinedAnswers {
        let mut out = CombinedAnswers::default();
        if !self.heartbeat.is_empty() {
            out.heartbeat = store.heartbeat_many(self.heartbeat).await;
        }
        if !self.finalize.is_empty() {
            out.finalize = store.finalize_many(self.finalize).await;
        }
        if !self.release.is_empty() {
            out.release = store.release_many(self.release).await;
        }
        if !self.reserve.is_empty() {
            out.reserve = store.reserve_many(self.reserve).await;
        }
        out
    }
}

/// The answers to a [`Combined`] batch: one per item of each verb, in the order given.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct CombinedAnswers {
    /// Answers to [`Combined::reserve`].
    pub reserve: Vec<Result<Reservation, StoreError>>,
    /// Answers to [`Combined::finalize`].
    pub finalize: Vec<Result<bool, StoreError>>,
    /// Answers to [`Combined::heartbeat`].
    pub heartbeat: Vec<Result<bool, StoreError>>,
    /// Answers to [`Combined::release`].
    pub release: Vec<Result<bool, StoreError>>,
}

impl CombinedAnswers {
    /// `e` for every item of `batches`: they failed as a whole.
    pub fn every(batches: &Combined<'_>, e: &StoreError) -> CombinedAnswers {
        CombinedAnswers {
            reserve: every(batches.reserve.len(), e),
            finalize: every(batches.finalize.len(), e),
            heartbeat: every(batches.heartbeat.len(), e),
            release: every(batches.release.len(), e),
        }
    }
}

/// `n` copies of one failure: the answers to a batch that failed as a whole.
pub(crate) fn every<O>(n: usize, e: &StoreError) -> Vec<Result<O, StoreError>> {
    (0..n).map(|_| Err(e.clone())).collect()
}

/// The protocol's statements against one durable table.
///
/// Implementations must make `reserve` and `take_over` atomic single statements (insert if
/// absent; compare-and-set on the observed fence), fence every later write, and use their own
/// clock for every time comparison. The store conformance suite (feature `conformance`)
/// checks all of this; a new backend should pass it.
///
/// The `_many` verbs carry the statements of concurrent calls together (group commit: one
/// round trip and one commit for many calls). Each item gets exactly the answer it would get
/// alone, in the order given; a failure of the whole batch fails every item. Their defaults
/// loop over the single verbs, so a store that does not batch works unchanged; one that does
/// says so with [`Store::group_commit`].
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Inserts an in-progress record owned by `claim` if none exists for `claim.id`.
    async fn reserve(&self, claim: &Claim<'_>) -> Result<Reservation, StoreError>;

    /// Reads a record.
    async fn load(&self, id: &RecordId) -> Result<Option<Record>, StoreError>;

    /// Makes `claim` the owner of a record that still holds `observed` and is reclaimable
    /// (in progress with its lease over, or completed and expired). Returns whether it did;
    /// `false` means another caller changed the record first.
    async fn take_over(&self, claim: &Claim<'_>, observed: Fence) -> Result<bool, StoreError>;

    /// Extends the lease of an in-progress record the caller still owns. `false`: it no
    /// longer does.
    async fn heartbeat(
        &self,
        id: &RecordId,
        fence: Fence,
        lease: Duration,
    ) -> Result<bool, StoreError>;

    /// Marks an in-progress record the caller still owns as completed with `result`, to be
    /// replayed for `ttl`. `false`: the caller no longer owns it, and nothing was written.
    async fn finalize(
        &self,
        id: &RecordId,
        fence: Fence,
        result: &StoredResult,
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// Deletes an in-progress record the caller still owns, so the next caller runs the body.
    async fn release(&self, id: &RecordId, fence: Fence) -> Result<bool, StoreError>;

    /// Deletes up to `limit` records that have expired (completed past their TTL, or in
    /// progress with their lease over) and returns how many it deleted.
    async fn purge(&self, limit: u32) -> Result<u64, StoreError>;

    /// `reserve` for each claim. Claims name distinct records unless the store handles
    /// duplicates (the engine never sends two claims on one record in a batch).
    async fn reserve_many(&self, claims: &[Claim<'_>]) -> Vec<Result<Reservation, StoreError>> {
        let mut out = Vec::with_capacity(claims.len());
        for claim in claims {
            out.push(self.reserve(claim).await);
        }
        out
    }

    /// `finalize` for each item.
    async fn finalize_many(&self, items: &[Finalize<'_>]) -> Vec<Result<bool, StoreError>> {
        let mut out = Vec::with_capacity(items.len());
        for f in items {
            out.push(self.finalize(f.id, f.fence, f.result, f.ttl).await);
        }
        out
    }

    /// `heartbeat` for each item.
    async fn heartbeat_many(&self, items: &[Heartbeat<'_>]) -> Vec<Result<bool, StoreError>> {
        let mut out = Vec::with_capacity(items.len());
        for h in items {
            out.push(self.heartbeat(h.id, h.fence, h.lease).await);
        }
        out
    }

    /// `release` for each item.
    async fn release_many(&self, items: &[Release<'_>]) -> Vec<Result<bool, StoreError>> {
        let mut out = Vec::with_capacity(items.len());
        for r in items {
            out.push(self.release(r.id, r.fence).await);
        }
        out
    }

    /// Whether concurrent calls' statements should be carried together through the `_many`
    /// verbs (`true` for a store whose `_many` verbs cost about one statement). The default,
    /// `false`, sends each call's statement on its own.
    fn group_commit(&self) -> bool {
        false
    }

    /// With group commit, how many batches of one verb to run at once unless the runtime is
    /// told ([`IdemBuilder::batch_concurrency`](crate::IdemBuilder::batch_concurrency)): the
    /// default is 2, one batch in flight while the next gathers. A store that runs one write
    /// at a time (SQLite) answers 1: a second batch would only wait for the first one's lock,
    /// and the calls it carries would have made the next batch larger.
    fn batch_concurrency(&self) -> usize {
        BATCH_CONCURRENCY
    }

    /// With group commit, whether the engine should carry the batches of all four verbs
    /// together through [`Store::run_combined`], one combined batch at a time, instead of one
    /// lane per verb. `true` suits a store that runs one write at a time (SQLite): there a
    /// batch of reservations only waits for a batch of results to commit, and one commit can
    /// carry both. The default, `false`, keeps the lanes apart. The engine combines only
    /// when one batch may be in flight at a time: [`Store::batch_concurrency`] 1, unless the
    /// runtime's [`batch_concurrency`](crate::IdemBuilder::batch_concurrency) says otherwise.
    /// A combined batch has one store timeout for all its verbs.
    fn combine_verbs(&self) -> bool {
        false
    }

    /// The batches of several verbs: each item gets exactly the answer it would get alone,
    /// and a failure of the whole fails every item, as for the `_many` verbs. A store that
    /// says [`Store::combine_verbs`] runs them in one transaction; the default runs each
    /// verb's `_many` in turn (heartbeats, finalizes, releases, then reservations).
    async fn run_combined(&self, batches: Combined<'_>) -> CombinedAnswers {
        batches.run_each(self).await
    }

    /// Whether the store deletes expired records by itself, and how long after their lease
    /// or result expired (Redis: its key TTL). `None` (the default): expired records stay
    /// until [`Store::purge`] deletes them.
    fn self_expiry(&self) -> Option<Duration> {
        None
    }

    /// A short name for logs and metrics (`"memory"`, `"sqlite"`, ...).
    fn backend(&self) -> &'static str;

    /// The store as `Any`, for transactional calls, which need the concrete SQL store of
    /// the caller's database. Stores that cannot join a caller's transaction keep the
    /// default (`None`).
    #[doc(hidden)]
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
}

/// The statements of a transactional call (`#[idempotent(tx = ..)]`), issued on the
/// caller's own connection inside the caller's transaction, so the record commits or rolls
/// back with the caller's writes. Implemented by the SQL stores for their database.
#[cfg(feature = "_sql")]
#[async_trait::async_trait]
pub trait TxStatements<DB: sqlx::Database>: Send + Sync {
    /// A transaction on a connection of the store's own pool, begun the way its database
    /// wants a transaction that writes records (`BEGIN IMMEDIATE` on SQLite, so two writers
    /// queue at the start instead of failing at their first write). The HTTP layer's
    /// transactional mode runs a route in one.
    async fn begin(&self) -> Result<sqlx::Transaction<'static, DB>, StoreError>;

    /// `Store::reserve` on `conn`. Reading an existing row is a locking read where the
    /// database's isolation would otherwise hide a row committed after the transaction began.
    async fn reserve_in(
        &self,
        conn: &mut DB::Connection,
        claim: &Claim<'_>,
    ) -> Result<Reservation, StoreError>;

    /// `Store::take_over` on `conn`.
    async fn take_over_in(
        &self,
        conn: &mut DB::Connection,
        claim: &Claim<'_>,
        observed: Fence,
    ) -> Result<bool, StoreError>;

    /// `Store::finalize` on `conn`.
    async fn finalize_in(
        &self,
        conn: &mut DB::Connection,
        id: &RecordId,
        fence: Fence,
        result: &StoredResult,
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// Marks the transaction on `conn` (a savepoint), so that [`check_in`](Self::check_in)
    /// can later tell whether it is still the same, live transaction. The HTTP layer marks a
    /// transaction whose request records nothing.
    async fn mark_in(&self, conn: &mut DB::Connection) -> Result<(), StoreError> {
        let _ = conn;
        Ok(())
    }

    /// Whether the transaction marked by [`mark_in`](Self::mark_in) can still commit: an
    /// error if it cannot. PostgreSQL refuses every statement of a transaction that a failed
    /// statement aborted, and answers its `COMMIT` with a rollback that is not an error; a
    /// MySQL deadlock ends the transaction, and the statements after it commit on their own.
    /// Either way the mark is gone. The HTTP layer asks before it sends a success it did not
    /// record.
    async fn check_in(&self, conn: &mut DB::Connection) -> Result<(), StoreError> {
        let _ = conn;
        Ok(())
    }

    /// `Store::release` on `conn`.
    async fn release_in(
        &self,
        conn: &mut DB::Connection,
        id: &RecordId,
        fence: Fence,
    ) -> Result<bool, StoreError>;
}
