//! The store conformance suite: what every [`Store`] must do, as tests (feature `conformance`).
//!
//! Each check is an async fn taking the store under test. [`store_conformance_tests!`](crate::store_conformance_tests)
//! turns them all into `#[tokio::test]`s for one backend:
//!
//! ```no_run
//! idem_runtime::store_conformance_tests!(async { idem_runtime::store::MemoryStore::new() });
//! ```
//!
//! The expression is evaluated once per test and must yield something that dereferences to
//! the store (a store, a `Box`, or a fixture that also owns, say, a temporary directory).
//! For a store whose server may be missing, write `store_conformance_tests!(optional: ..)`
//! with an expression yielding an `Option` of that; `None` skips the check.
//! Every check works in its own random namespace, so the suite may share one table.
//!
//! The checks use short leases and TTLs (hundreds of milliseconds) and real sleeps: they test
//! the store's own clock, which cannot be faked from here.
//!
//! Two of them are model-based: [`model_sequences`] and [`model_concurrent_steps`] generate
//! random runs of the protocol's statements (reserve, load, take over, heartbeat, finalize,
//! release, alone or batched through the `_many` verbs, purge, sleeps) by three simulated
//! owners on two keys, and check every answer against a reference model of the protocol; the
//! concurrent one sends up to three statements at once and accepts the answers of any order
//! of them. A failing run is shrunk and printed with its seed. `IDEM_MODEL_CASES` (runs,
//! default 24; the concurrent check does half), `IDEM_MODEL_STEPS` (longest run, default 24)
//! and `IDEM_MODEL_SEED` (replay a reported run) tune them.

use std::time::Duration;

use crate::codec::Codec;
use crate::key::{Fingerprint, RecordId};
use crate::store::{Claim, Fence, Reservation, Store, StoredResult};

/// Generates one `#[tokio::test]` per conformance check for the store `$make` builds.
#[macro_export]
macro_rules! store_conformance_tests {
    (optional: $make:expr) => {
        $crate::store_conformance_tests!(@checks optional $make);
    };
    ($make:expr) => {
        $crate::store_conformance_tests!(@checks required $make);
    };
    (@checks $mode:ident $make:expr) => {
        $crate::store_conformance_tests!(@each $mode $make;
            reserve_acquires_an_absent_record_once,
            load_of_an_absent_record_is_none,
            finalize_needs_the_owners_fence,
            finalize_happens_once,
            heartbeat_extends_only_the_owners_lease,
            heartbeats_keep_a_record_past_its_first_lease,
            release_needs_the_owners_fence_and_frees_the_key,
            take_over_waits_for_the_lease_to_end,
            take_over_is_a_compare_and_set_on_the_fence,
            a_stale_owner_cannot_finalize_after_a_takeover,
            an_expired_result_is_taken_over_and_reset,
            concurrent_reserves_have_one_winner,
            concurrent_take_overs_have_one_winner,
            purge_deletes_only_what_expired,
            purge_respects_its_limit,
            keys_are_compared_byte_for_byte,
            namespaces_keep_records_apart,
            fingerprints_and_results_round_trip,
            a_batch_of_reservations_answers_each_claim,
            batched_writes_are_fenced_item_by_item,
            model_sequences,
            model_concurrent_steps
        );
    };
    (@each required $make:expr; $($check:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $check() {
            let store = $make.await;
            $crate::conformance::$check(&*store).await;
        }
    )*};
    (@each optional $make:expr; $($check:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $check() {
            // `None`: the store's server is not available and the fixture said so.
            if let Some(store) = $make.await {
                $crate::conformance::$check(&*store).await;
            }
        }
    )*};
}

// Long enough that a loaded CI machine does not run out a "live" lease between two
// statements; short enough to keep the suite quick.
const LEASE: Duration = Duration::from_millis(1_000);
const SHORT: Duration = Duration::from_millis(400);
const PAST_SHORT: Duration = Duration::from_millis(800);
const TTL: Duration = Duration::from_secs(3600);

mod checks;
mod explore;
mod model;
mod ops;

pub use checks::*;
pub use explore::{model_concurrent_steps, model_sequences};

fn ns() -> String {
    format!("conformance-{:016x}/m::f/v0", fastrand::u64(..))
}

fn id(ns: &str, key: &str) -> RecordId {
    RecordId::new(ns, key)
}

fn claim<'a>(
    id: &'a RecordId,
    fence: Fence,
    fp: Option<&'a Fingerprint>,
    lease: Duration,
) -> Claim<'a> {
    Claim {
        id,
        fence,
        owner: "conformance",
        fingerprint: fp,
        lease,
    }
}

fn result(bytes: &[u8]) -> StoredResult {
    StoredResult {
        codec: Codec::Json,
        bytes: bytes.to_vec(),
    }
}

async fn reserve(store: &dyn Store, c: &Claim<'_>) -> Reservation {
    store.reserve(c).await.expect("reserve")
}

async fn acquire(store: &dyn Store, id: &RecordId, lease: Duration) -> Fence {
    let fence = Fence::random();
    let got = reserve(store, &claim(id, fence, None, lease)).await;
    assert!(
        matches!(got, Reservation::Acquired),
        "expected to acquire {id:?}, got {got:?}"
    );
    fence
}

/// Polls every future to completion concurrently (a tiny `join_all`, to avoid a dependency).
async fn futures_join_all<F: std::future::Future>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut pending: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all_done = true;
        for (fut, out) in pending.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *out = Some(v),
                    std::task::Poll::Pending => all_done = false,
                }
            }
        }
        if all_done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}
