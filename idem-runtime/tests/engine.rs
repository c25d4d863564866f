//! The protocol end to end through `#[idempotent]`, on every store: replay, payload checks,
//! waiting, takeover, fencing, release on error/panic/cancel, expiry, versions, limits.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use idem_runtime::store::Store;
use idem_runtime::{Error, Idem, IdempotentError, Outcome, idempotent, observe};
use serde::{Deserialize, Serialize};
use support::{Backend, Instrumented};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    id: String,
    cents: u64,
    run: usize,
}

#[derive(Debug)]
enum AppError {
    Idem(Error),
    Declined,
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Idem(e)
    }
}

impl AppError {
    fn idem(self) -> Error {
        match self {
            AppError::Idem(e) => e,
            AppError::Declined => panic!("expected an idem error, got Declined"),
        }
    }
}

fn idem_on(store: Arc<dyn Store>) -> Idem {
    Idem::builder()
        .shared_store(store)
        .default_lease("PT1S")
        .build()
        .expect("idem")
}

/// A second process on the same store: its own cache, its own single flight.
fn other_replica(store: Arc<dyn Store>) -> Idem {
    idem_on(store)
}

#[idempotent(key = key, runtime = idem, skip(runs))]
async fn create_order(
    idem: &Idem,
    runs: &AtomicUsize,
    key: &str,
    cents: u64,
) -> Result<Order, AppError> {
    let run = runs.fetch_add(1, SeqCst) + 1;
    Ok(Order {
        id: format!("order-{key}"),
        cents,
        run,
    })
}

async fn executes_once_then_replays(b: Backend) {
    let idem = idem_on(b.store.clone());
    let runs = AtomicUsize::new(0);
    let (first, how) = observe(create_order(&idem, &runs, "k1", 500)).await;
    let first = first.expect("first call");
    assert_eq!(how, Some(Outcome::Executed));
    let (again, how) = observe(create_order(&idem, &runs, "k1", 500)).await;
    assert_eq!(again.expect("replay"), first);
    assert_eq!(how, Some(Outcome::Replayed));
    // Another replica, with an empty cache, replays from the store.
    let replica = other_replica(b.store.clone());
    let (there, how) = observe(create_order(&replica, &runs, "k1", 500)).await;
    assert_eq!(there.expect("replay from store"), first);
    assert_eq!(how, Some(Outcome::Replayed));
    assert_eq!(runs.load(SeqCst), 1, "the body ran once");
}

async fn a_reused_key_with_another_payload_is_refused(b: Backend) {
    let idem = idem_on(b.store.clone());
    let runs = AtomicUsize::new(0);
    create_order(&idem, &runs, "k", 500).await.expect("first");
    // From the local cache...
    let err = create_order(&idem, &runs, "k", 999)
        .await
        .unwrap_err()
        .idem();
    assert!(matches!(err, Error::PayloadMismatch { .. }), "{err}");
    assert_eq!(err.http_status(), 422);
    // ...and from the store.
    let replica = other_replica(b.store.clone());
    let err = create_order(&replica, &runs, "k", 999)
        .await
        .unwrap_err()
        .idem();
    assert!(matches!(err, Error::PayloadMismatch { .. }), "{err}");
    assert_eq!(runs.load(SeqCst), 1);
    assert!(
        !err.to_string().contains("\"k\""),
        "messages do not show the key: {err}"
    );
}

#[idempotent(key = key, runtime = idem, skip(runs))]
async fn flaky(idem: &Idem, runs: &AtomicUsize, key: &str) -> Result<usize, AppError> {
    let run = runs.fetch_add(1, SeqCst) + 1;
    if run == 1 {
        Err(AppError::Declined)
    } else {
        Ok(run)
    }
}

async fn an_error_releases_the_key(b: Backend) {
    let idem = idem_on(b.store.clone());
    let runs = AtomicUsize::new(0);
    assert!(matches!(
        flaky(&idem, &runs, "k").await,
        Err(AppError::Declined)
    ));
    assert_eq!(flaky(&idem, &runs, "k").await.expect("the retry runs"), 2);
    assert_eq!(flaky(&idem, &runs, "k").await.expect("then replays"), 2);
    assert_eq!(runs.load(SeqCst), 2);
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum PaymentError {
    Declined { reason: String },
    Idem(String),
}

impl From<Error> for PaymentError {
    fn from(e: Error) -> Self {
        PaymentError::Idem(e.to_string())
    }
}

#[idempotent(key = key, runtime = idem, skip(runs), cache_errors = true)]
async fn charge(idem: &Idem, runs: &AtomicUsize, key: &str) -> Result<u64, PaymentError> {
    runs.fetch_add(1, SeqCst);
    Err(PaymentError::Declined {
        reason: "insufficient funds".into(),
    })
}

async fn cached_errors_are_replayed(b: Backend) {
    let idem = idem_on(b.store.clone());
    let runs = AtomicUsize::new(0);
    let first = charge(&idem, &runs, "k").await.unwrap_err();
    let replica = other_replica(b.store.clone());
    let (again, how) = observe(charge(&replica, &runs, "k")).await;
    assert_eq!(again.unwrap_err(), first);
    assert_eq!(how, Some(Outcome::Replayed));
    assert_eq!(runs.load(SeqCst), 1);
}

/// Mixes a final error (a declined card: the answer, replayed) with a transient one (a
/// timeout: the retry runs again).
#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum PayError {
    Declined { reason: String },
    Timeout,
    Idem(String),
}

impl From<Error> for PayError {
    fn from(e: Error) -> Self {
        PayError::Idem(e.to_string())
    }
}

impl IdempotentError for PayError {
    fn is_final(&self) -> bool {
        matches!(self, PayError::Declined { .. })
    }
}

/// The card `"declined"` is always declined; any other card times out on its first run.
#[idempotent(key = card, runtime = idem, skip(runs), cache_errors = "final")]
async fn pay(idem: &Idem, runs: &AtomicUsize, card: &str) -> Result<u64, PayError> {
    let run = runs.fetch_add(1, SeqCst) + 1;
    match card {
        "declined" => Err(PayError::Declined {
            reason: "insufficient funds".into(),
        }),
        _ if run == 1 => Err(PayError::Timeout),
        _ => Ok(run as u64),
    }
}

async fn final_errors_are_replayed_and_transient_ones_run_again(b: Backend) {
    let idem = idem_on(b.store.clone());
    let replica = other_replica(b.store.clone());

    let declined = AtomicUsize::new(0);
    let (first, how) = observe(pay(&idem, &declined, "declined")).await;
    assert!(matches!(first, Err(PayError::Declined { .. })), "{first:?}");
    assert_eq!(how, Some(Outcome::Executed));
    let (again, how) = observe(pay(&replica, &declined, "declined")).await;
    assert_eq!(again, first, "the final error is replayed from the store");
    assert_eq!(how, Some(Outcome::Replayed));
    assert_eq!(declined.load(SeqCst), 1, "the body ran once");

    let flaky = AtomicUsize::new(0);
    assert_eq!(pay(&idem, &flaky, "visa").await, Err(PayError::Timeout));
    let (retry, how) = observe(pay(&replica, &flaky, "visa")).await;
    assert_eq!(retry, Ok(2), "the transient error released the key");
    assert_eq!(how, Some(Outcome::Executed));
    let (replay, how) = observe(pay(&idem, &flaky, "visa")).await;
    assert_eq!((replay, how), (Ok(2), Some(Outcome::Replayed)));
    assert_eq!(flaky.load(SeqCst), 2);
}

#[idempotent(key = key, runtime = idem, skip(runs, hold))]
async fn slow(
    idem: &Idem,
    runs: &AtomicUsize,
    hold: Duration,
    key: &str,
) -> Result<usize, AppError> {
    let run = runs.fetch_add(1, SeqCst) + 1;
    tokio::time::sleep(hold).await;
    Ok(run)
}

#[idempotent(key = key, runtime = idem, skip(runs))]
async fn explodes(idem: &Idem, runs: &AtomicUsize, key: &str) -> Result<usize, AppError> {
    if runs.fetch_add(1, SeqCst) == 0 {
        panic!("boom");
    }
    Ok(2)
}

async fn a_panic_releases_the_key(b: Backend) {
    let idem = idem_on(b.store.clone());
    let runs = Arc::new(AtomicUsize::new(0));
    let (i, r) = (idem.clone(), runs.clone());
    let panicked = tokio::spawn(async move { explodes(&i, &r, "k").await }).await;
    assert!(panicked.is_err(), "the panic reached the caller");
    // The release happens in the background right after the panic; give it a moment, far
    // less than the 1 s lease.
    let start = Instant::now();
    let value = loop {
        match explodes(&idem, &runs, "k").await {
            Ok(v) => break v,
            Err(AppError::Idem(Error::InProgress { .. })) => {}
            Err(e) => panic!("{e:?}"),
        }
    };
    assert_eq!(value, 2);
    assert!(
        start.elapsed() < Duration::from_millis(900),
        "released, not expired"
    );
}

async fn a_dropped_call_releases_the_key(b: Backend) {
    let idem = idem_on(b.store.clone());
    let runs = AtomicUsize::new(0);
    let cancelled = tokio::time::timeout(
        Duration::from_millis(50),
        slow(&idem, &runs, Duration::from_secs(3600), "k"),
    )
    .await;
    assert!(
        cancelled.is_err(),
        "timed out, so the call was dropped mid-body"
    );
    let start = Instant::now();
    let value = slow(&idem, &runs, Duration::ZERO, "k")
        .await
        .expect("second call");
    assert_eq!(value, 2, "the body ran again");
    assert!(
        start.elapsed() < Duration::from_millis(900),
        "released, not expired"
    );
}

async fn a_dead_owners_key_is_taken_over_after_its_lease(b: Backend) {
    let idem = idem_on(b.store.clone());
    let runs = AtomicUsize::new(0);
    let dead = Idem::builder()
        .shared_store(b.store.clone())
        .default_lease("300ms")
        .build()
        .expect("idem");
    // A replica reserves the key and dies mid-body: its future is leaked after the body
    // started, so no heartbeat, finalize or release ever runs for it.
    let started = Arc::new(tokio::sync::Notify::new());
    let fut = {
        let started = started.clone();
        let dead = dead.clone();
        async move {
            let runs = AtomicUsize::new(0);
            slow_signal(&dead, &runs, &started, "k").await
        }
    };
    let mut fut = Box::pin(fut);
    tokio::select! {
        _ = &mut fut => panic!("never finishes"),
        () = started.notified() => {}
    }
    std::mem::forget(fut);
    let (out, how) = observe(slow_signal_done(&idem, &runs, "k")).await;
    assert_eq!(out.expect("took over"), 7);
    assert_eq!(how, Some(Outcome::TookOver));
}

#[idempotent(key = key, runtime = idem, skip(runs, started), name = "tests::takeover")]
async fn slow_signal(
    idem: &Idem,
    runs: &AtomicUsize,
    started: &tokio::sync::Notify,
    key: &str,
) -> Result<u32, AppError> {
    runs.fetch_add(1, SeqCst);
    started.notify_one();
    std::future::pending::<()>().await;
    Ok(0)
}

#[idempotent(key = key, runtime = idem, skip(runs), name = "tests::takeover", wait = "PT3S")]
async fn slow_signal_done(idem: &Idem, runs: &AtomicUsize, key: &str) -> Result<u32, AppError> {
    runs.fetch_add(1, SeqCst);
    Ok(7)
}

async fn a_stale_owner_is_told_it_lost_the_lease(b: Backend) {
    let flaky_store = Instrumented::new(b.store.clone());
    let stale = Idem::builder()
        .shared_store(flaky_store.clone())
        .default_lease("300ms")
        .build()
        .expect("idem");
    flaky_store.heartbeats_fail.store(true, SeqCst);
    let runs = Arc::new(AtomicUsize::new(0));
    let (s, r) = (stale.clone(), runs.clone());
    let first = tokio::spawn(async move { slow(&s, &r, Duration::from_millis(900), "k").await });
    tokio::time::sleep(Duration::from_millis(450)).await;
    // The stale owner's lease ran out (its heartbeats were dropped); another replica takes over.
    let fresh = other_replica(b.store.clone());
    let (second, how) = observe(slow(&fresh, &runs, Duration::ZERO, "k")).await;
    assert_eq!(second.expect("took over"), 2);
    assert_eq!(how, Some(Outcome::TookOver));
    let err = first.await.expect("no panic").unwrap_err().idem();
    assert!(matches!(err, Error::LeaseLost { .. }), "{err}");
    assert!(
        Instrumented::count(&flaky_store.heartbeats) >= 1,
        "it did try to heartbeat"
    );
    // The newer owner's result stands.
    let replay = slow(&other_replica(b.store.clone()), &runs, Duration::ZERO, "k").await;
    assert_eq!(replay.expect("replay"), 2);
}

async fn a_long_body_keeps_its_lease(b: Backend) {
    let owner = Idem::builder()
        .shared_store(b.store.clone())
        .default_lease("300ms")
        .build()
        .expect("idem");
    let runs = Arc::new(AtomicUsize::new(0));
    let (o, r) = (owner.clone(), runs.clone());
    let first = tokio::spawn(async move { slow(&o, &r, Duration::from_millis(1_200), "k").await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Well past one lease: without heartbeats this would be taken over.
    let other = Idem::builder()
        .shared_store(b.store.clone())
        .default_wait("PT3S")
        .build()
        .expect("idem");
    let (second, how) = observe(slow(&other, &runs, Duration::ZERO, "k")).await;
    assert_eq!(first.await.expect("no panic").expect("first"), 1);
    assert_eq!(second.expect("waited for it"), 1);
    assert_eq!(how, Some(Outcome::Waited));
    assert_eq!(runs.load(SeqCst), 1);
}

#[idempotent(key = key, runtime = idem, skip(runs, hold), on_conflict = "reject", name = "tests::slow")]
async fn slow_or_reject(
    idem: &Idem,
    runs: &AtomicUsize,
    hold: Duration,
    key: &str,
) -> Result<usize, AppError> {
    runs.fetch_add(1, SeqCst);
    tokio::time::sleep(hold).await;
    Ok(0)
}

#[idempotent(key = key, runtime = idem, skip(runs, hold), wait = "200ms", name = "tests::slow")]
async fn slow_or_wait_briefly(
    idem: &Idem,
    runs: &AtomicUsize,
    hold: Duration,
    key: &str,
) -> Result<usize, AppError> {
    runs.fetch_add(1, SeqCst);
    tokio::time::sleep(hold).await;
    Ok(0)
}

async fn an_in_progress_duplicate_waits_briefly_or_is_rejected(b: Backend) {
    let idem = idem_on(b.store.clone());
    let runs = Arc::new(AtomicUsize::new(0));
    let (i, r) = (idem.clone(), runs.clone());
    let first = tokio::spawn(async move {
        slow_or_wait_briefly(&i, &r, Duration::from_millis(2_500), "k").await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let replica = other_replica(b.store.clone());

    let start = Instant::now();
    let err = slow_or_reject(&replica, &runs, Duration::ZERO, "k")
        .await
        .unwrap_err()
        .idem();
    assert!(matches!(err, Error::InProgress { .. }), "{err}");
    assert!(
        start.elapsed() < Duration::from_millis(150),
        "rejected at once"
    );
    assert!(err.retry_after().expect("retry_after") > Duration::ZERO);
    assert_eq!(err.http_status(), 409);

    let start = Instant::now();
    let err = slow_or_wait_briefly(&replica, &runs, Duration::ZERO, "k")
        .await
        .unwrap_err()
        .idem();
    assert!(matches!(err, Error::InProgress { .. }), "{err}");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(190),
        "waited its budget: {waited:?}"
    );

    // In this process too, a duplicate of a running call is rejected.
    let err = slow_or_reject(&idem, &runs, Duration::ZERO, "k")
        .await
        .unwrap_err()
        .idem();
    assert!(matches!(err, Error::InProgress { .. }), "{err}");
    first.await.expect("no panic").expect("first");
    assert_eq!(runs.load(SeqCst), 1);
}

#[idempotent(key = key, runtime = idem, skip(runs), ttl = "1s")]
async fn short_lived(idem: &Idem, runs: &AtomicUsize, key: &str) -> Result<usize, AppError> {
    Ok(runs.fetch_add(1, SeqCst) + 1)
}

async fn after_the_ttl_the_body_runs_again(b: Backend) {
    let idem = idem_on(b.store.clone());
    let runs = AtomicUsize::new(0);
    assert_eq!(short_lived(&idem, &runs, "k").await.expect("first"), 1);
    assert_eq!(short_lived(&idem, &runs, "k").await.expect("replay"), 1);
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let (again, how) = observe(short_lived(&idem, &runs, "k")).await;
    assert_eq!(again.expect("expired, runs again"), 2);
    assert_eq!(how, Some(Outcome::Executed));
    let replica = other_replica(b.store.clone());
    assert_eq!(short_lived(&replica, &runs, "k").await.expect("replay"), 2);
}

#[idempotent(key = key, runtime = idem, skip(runs), name = "tests::versioned", version = 1)]
async fn v1(idem: &Idem, runs: &AtomicUsize, key: &str) -> Result<u32, AppError> {
    runs.fetch_add(1, SeqCst);
    Ok(1)
}

#[derive(Debug, Serialize, Deserialize)]
struct V2Result {
    total: u64,
    currency: String,
}

#[idempotent(key = key, runtime = idem, skip(runs), name = "tests::versioned", version = 1)]
async fn v1_changed_type(idem: &Idem, runs: &AtomicUsize, key: &str) -> Result<V2Result, AppError> {
    runs.fetch_add(1, SeqCst);
    Ok(V2Result {
        total: 2,
        currency: "EUR".into(),
    })
}

#[idempotent(key = key, runtime = idem, skip(runs), name = "tests::versioned", version = 2)]
async fn v2(idem: &Idem, runs: &AtomicUsize, key: &str) -> Result<V2Result, AppError> {
    runs.fetch_add(1, SeqCst);
    Ok(V2Result {
        total: 2,
        currency: "EUR".into(),
    })
}

async fn a_changed_return_type_needs_a_new_version(b: Backend) {
    let idem = idem_on(b.store.clone());
    let runs = AtomicUsize::new(0);
    v1(&idem, &runs, "k").await.expect("v1");
    let replica = other_replica(b.store.clone());
    let err = v1_changed_type(&replica, &runs, "k")
        .await
        .unwrap_err()
        .idem();
    assert!(matches!(err, Error::Decode { version: 1, .. }), "{err}");
    assert!(err.to_string().contains("bump `version`"), "{err}");
    let fresh = v2(&replica, &runs, "k")
        .await
        .expect("version 2 is its own namespace");
    assert_eq!(fresh.total, 2);
    assert_eq!(runs.load(SeqCst), 2);
}

#[idempotent(key = key, runtime = idem, skip(runs))]
async fn big(idem: &Idem, runs: &AtomicUsize, key: &str) -> Result<String, AppError> {
    runs.fetch_add(1, SeqCst);
    Ok("x".repeat(1000))
}

async fn a_result_over_the_limit_is_returned_but_not_stored(b: Backend) {
    let idem = Idem::builder()
        .shared_store(b.store.clone())
        .max_result_bytes(100)
        .build()
        .expect("idem");
    let runs = AtomicUsize::new(0);
    assert_eq!(big(&idem, &runs, "k").await.expect("value").len(), 1000);
    assert_eq!(big(&idem, &runs, "k").await.expect("value").len(), 1000);
    assert_eq!(runs.load(SeqCst), 2, "released, so the retry ran again");
}

#[idempotent(key = key, runtime = idem, skip(runs))]
async fn keyed_by_option(
    idem: &Idem,
    runs: &AtomicUsize,
    key: Option<String>,
) -> Result<usize, AppError> {
    Ok(runs.fetch_add(1, SeqCst) + 1)
}

#[idempotent(key = key, runtime = idem, skip(runs), optional)]
async fn optionally_keyed(
    idem: &Idem,
    runs: &AtomicUsize,
    key: Option<String>,
) -> Result<usize, AppError> {
    Ok(runs.fetch_add(1, SeqCst) + 1)
}

async fn missing_empty_and_odd_keys(b: Backend) {
    let idem = idem_on(b.store.clone());
    let runs = AtomicUsize::new(0);
    let err = keyed_by_option(&idem, &runs, None)
        .await
        .unwrap_err()
        .idem();
    assert!(
        matches!(err, Error::MissingKey { part: "key", .. }),
        "{err}"
    );
    assert_eq!(err.http_status(), 400);
    let err = keyed_by_option(&idem, &runs, Some(String::new()))
        .await
        .unwrap_err()
        .idem();
    assert!(matches!(err, Error::InvalidKey { .. }), "{err}");
    assert_eq!(runs.load(SeqCst), 0, "no body ran without a key");

    let (a, how) = observe(optionally_keyed(&idem, &runs, None)).await;
    assert_eq!(how, Some(Outcome::Unprotected));
    let b2 = optionally_keyed(&idem, &runs, None)
        .await
        .expect("unprotected");
    assert_eq!(
        (a.expect("unprotected"), b2),
        (1, 2),
        "each None runs the body"
    );

    // Long keys sharing a 300-byte prefix stay distinct (hashed, not truncated).
    let prefix = "p".repeat(300);
    let k1 = keyed_by_option(&idem, &runs, Some(format!("{prefix}1"))).await;
    let k2 = keyed_by_option(&idem, &runs, Some(format!("{prefix}2"))).await;
    assert_ne!(k1.expect("long key"), k2.expect("long key"));
    let again = keyed_by_option(&idem, &runs, Some(format!("{prefix}1"))).await;
    assert_eq!(again.expect("replay"), 3);

    // Odd bytes are just bytes.
    for k in ["a\0b", "🦀", "line\nbreak", "' OR 1=1 --"] {
        let first = keyed_by_option(&idem, &runs, Some(k.into()))
            .await
            .expect("odd key");
        let replica = other_replica(b.store.clone());
        let again = keyed_by_option(&replica, &runs, Some(k.into()))
            .await
            .expect("odd key");
        assert_eq!(first, again, "{k:?}");
    }
}

#[idempotent(key = key, scope = tenant, runtime = idem, skip(runs))]
async fn scoped(
    idem: &Idem,
    runs: &AtomicUsize,
    tenant: &str,
    key: &str,
) -> Result<usize, AppError> {
    Ok(runs.fetch_add(1, SeqCst) + 1)
}

async fn scopes_keep_tenants_apart(b: Backend) {
    let idem = idem_on(b.store.clone());
    let runs = AtomicUsize::new(0);
    assert_eq!(scoped(&idem, &runs, "tenant-a", "k").await.expect("a"), 1);
    assert_eq!(scoped(&idem, &runs, "tenant-b", "k").await.expect("b"), 2);
    assert_eq!(
        scoped(&idem, &runs, "tenant-a", "k")
            .await
            .expect("a again"),
        1
    );
}

async fn concurrent_callers_share_one_reservation(b: Backend) {
    let counting = Instrumented::new(b.store.clone());
    let idem = Idem::builder()
        .shared_store(counting.clone())
        .build()
        .expect("idem");
    let runs = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let (i, r) = (idem.clone(), runs.clone());
        tasks.spawn(async move { slow(&i, &r, Duration::from_millis(200), "storm").await });
    }
    let mut values = Vec::new();
    while let Some(v) = tasks.join_next().await {
        values.push(v.expect("no panic").expect("value"));
    }
    assert!(values.iter().all(|v| *v == 1), "{values:?}");
    assert_eq!(runs.load(SeqCst), 1);
    assert_eq!(
        Instrumented::count(&counting.reserves),
        1,
        "one reservation for 50 callers"
    );
    assert_eq!(Instrumented::count(&counting.finalizes), 1);
}

async fn a_store_that_is_down_fails_closed(b: Backend) {
    let counting = Instrumented::new(b.store.clone());
    let idem = Idem::builder()
        .shared_store(counting.clone())
        .build()
        .expect("idem");
    let runs = AtomicUsize::new(0);
    counting.down.store(true, SeqCst);
    let err = create_order(&idem, &runs, "k", 1).await.unwrap_err().idem();
    assert!(matches!(err, Error::StoreUnavailable { .. }), "{err}");
    assert_eq!(err.http_status(), 503);
    assert_eq!(
        runs.load(SeqCst),
        0,
        "the body never runs without a reservation"
    );
    counting.down.store(false, SeqCst);
    create_order(&idem, &runs, "k", 1)
        .await
        .expect("works again");
    assert_eq!(runs.load(SeqCst), 1);
}

fn instrumented_idem(b: &Backend, lease: &str) -> (Idem, Arc<Instrumented>) {
    let store = Instrumented::new(b.store.clone());
    let idem = Idem::builder()
        .shared_store(store.clone())
        .default_lease(lease)
        .build()
        .expect("idem");
    (idem, store)
}

async fn a_call_dropped_after_its_body_still_stores_the_result(b: Backend) {
    let (idem, store) = instrumented_idem(&b, "PT5S");
    Instrumented::set(&store.finalize_lag, Duration::from_millis(300));
    let runs = AtomicUsize::new(0);
    // The body is quick; the call is dropped while its result is being stored.
    let dropped = tokio::time::timeout(
        Duration::from_millis(100),
        create_order(&idem, &runs, "k", 5),
    )
    .await;
    assert!(dropped.is_err(), "dropped during finalize");
    Instrumented::set(&store.finalize_lag, Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let replica = other_replica(b.store.clone());
    let (again, how) = observe(create_order(&replica, &runs, "k", 5)).await;
    again.expect("the stored result");
    assert_eq!(how, Some(Outcome::Replayed), "stored, not released");
    assert_eq!(runs.load(SeqCst), 1, "the payment ran once");
}

async fn a_call_dropped_during_reserve_does_not_strand_the_key(b: Backend) {
    let (idem, store) = instrumented_idem(&b, "PT30S");
    Instrumented::set(&store.reserve_lag, Duration::from_millis(300));
    let runs = AtomicUsize::new(0);
    let dropped = tokio::time::timeout(
        Duration::from_millis(100),
        create_order(&idem, &runs, "k", 5),
    )
    .await;
    assert!(
        dropped.is_err(),
        "dropped while the reservation's reply was on its way"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let replica = other_replica(b.store.clone());
    let start = Instant::now();
    create_order(&replica, &runs, "k", 5)
        .await
        .expect("the key was released, not held for the 30 s lease");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(runs.load(SeqCst), 1);
}

async fn a_call_dropped_during_release_does_not_strand_the_key(b: Backend) {
    let (idem, store) = instrumented_idem(&b, "PT30S");
    Instrumented::set(&store.release_lag, Duration::from_millis(300));
    let runs = AtomicUsize::new(0);
    // flaky's first run fails, so the call releases the key; it is dropped mid-release.
    let dropped = tokio::time::timeout(Duration::from_millis(100), flaky(&idem, &runs, "k")).await;
    assert!(dropped.is_err());
    Instrumented::set(&store.release_lag, Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let replica = other_replica(b.store.clone());
    assert_eq!(flaky(&replica, &runs, "k").await.expect("runs again"), 2);
}

async fn a_lost_finalize_reply_is_not_a_lost_lease(b: Backend) {
    let (idem, store) = instrumented_idem(&b, "PT30S");
    store.lose_finalize_reply.store(true, SeqCst);
    let runs = AtomicUsize::new(0);
    let first = create_order(&idem, &runs, "k", 5)
        .await
        .expect("stored despite the lost reply");
    let replica = other_replica(b.store.clone());
    assert_eq!(
        create_order(&replica, &runs, "k", 5).await.expect("replay"),
        first
    );
    assert_eq!(runs.load(SeqCst), 1);
}

#[idempotent(key = key, runtime = idem, skip(runs, hold), name = "tests::purged")]
async fn purged_mid_body(
    idem: &Idem,
    runs: &AtomicUsize,
    hold: Duration,
    key: &str,
) -> Result<usize, AppError> {
    let run = runs.fetch_add(1, SeqCst) + 1;
    tokio::time::sleep(hold).await;
    Ok(run)
}

async fn a_result_whose_row_vanished_is_written_back(b: Backend) {
    let idem = idem_on(b.store.clone());
    let runs = Arc::new(AtomicUsize::new(0));
    let (i, r) = (idem.clone(), runs.clone());
    let call =
        tokio::spawn(async move { purged_mid_body(&i, &r, Duration::from_millis(300), "k").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // An operator (or an over-eager purge) deletes the in-progress row mid-body.
    let id = idem_runtime::RecordId::new("tests::purged/v0", "k");
    let record = b.store.load(&id).await.expect("load").expect("in progress");
    assert!(b.store.release(&id, record.fence).await.expect("release"));
    assert_eq!(call.await.expect("no panic").expect("stored"), 1);
    let replica = other_replica(b.store.clone());
    let replay = purged_mid_body(&replica, &runs, Duration::ZERO, "k").await;
    assert_eq!(replay.expect("replayed"), 1);
    assert_eq!(runs.load(SeqCst), 1);
}

#[idempotent(key = key, runtime = idem, skip(runs, started), name = "tests::abandoned")]
async fn abandoned(
    idem: &Idem,
    runs: &AtomicUsize,
    started: &tokio::sync::Notify,
    key: &str,
    cents: u64,
) -> Result<u64, AppError> {
    runs.fetch_add(1, SeqCst);
    started.notify_one();
    std::future::pending::<()>().await;
    Ok(cents)
}

#[idempotent(key = key, runtime = idem, skip(runs), name = "tests::abandoned", wait = "PT3S")]
async fn resumed(idem: &Idem, runs: &AtomicUsize, key: &str, cents: u64) -> Result<u64, AppError> {
    runs.fetch_add(1, SeqCst);
    Ok(cents)
}

async fn only_the_same_payload_takes_over_an_abandoned_call(b: Backend) {
    let dead = Idem::builder()
        .shared_store(b.store.clone())
        .default_lease("200ms")
        .build()
        .expect("idem");
    let started = Arc::new(tokio::sync::Notify::new());
    let mut fut = Box::pin({
        let (dead, started) = (dead.clone(), started.clone());
        async move {
            let runs = AtomicUsize::new(0);
            abandoned(&dead, &runs, &started, "k", 10_000).await
        }
    });
    tokio::select! {
        _ = &mut fut => panic!("never finishes"),
        () = started.notified() => {}
    }
    std::mem::forget(fut);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idem = idem_on(b.store.clone());
    let runs = AtomicUsize::new(0);
    let err = resumed(&idem, &runs, "k", 5).await.unwrap_err().idem();
    assert!(matches!(err, Error::PayloadMismatch { .. }), "{err}");
    let (out, how) = observe(resumed(&idem, &runs, "k", 10_000)).await;
    assert_eq!(out.expect("the same request takes over"), 10_000);
    assert_eq!(how, Some(Outcome::TookOver));
    assert_eq!(runs.load(SeqCst), 1);
}

for_each_store!(
    executes_once_then_replays,
    a_reused_key_with_another_payload_is_refused,
    an_error_releases_the_key,
    cached_errors_are_replayed,
    final_errors_are_replayed_and_transient_ones_run_again,
    a_panic_releases_the_key,
    a_dropped_call_releases_the_key,
    a_dead_owners_key_is_taken_over_after_its_lease,
    a_stale_owner_is_told_it_lost_the_lease,
    a_long_body_keeps_its_lease,
    an_in_progress_duplicate_waits_briefly_or_is_rejected,
    after_the_ttl_the_body_runs_again,
    a_changed_return_type_needs_a_new_version,
    a_result_over_the_limit_is_returned_but_not_stored,
    missing_empty_and_odd_keys,
    scopes_keep_tenants_apart,
    concurrent_callers_share_one_reservation,
    a_store_that_is_down_fails_closed,
    a_call_dropped_after_its_body_still_stores_the_result,
    a_call_dropped_during_reserve_does_not_strand_the_key,
    a_call_dropped_during_release_does_not_strand_the_key,
    a_lost_finalize_reply_is_not_a_lost_lease,
    a_result_whose_row_vanished_is_written_back,
    only_the_same_payload_takes_over_an_abandoned_call,
);

mod instantiations {
    //! A trait's default method and a generic fn are one fn in the source but several at
    //! run time; each implementer and each type argument keeps its own records.
    use super::*;

    trait Notifier {
        fn idem(&self) -> &Idem;
        fn sent(&self) -> &AtomicUsize;
        fn channel(&self) -> &'static str;

        #[idempotent(key = id, runtime = self.idem())]
        async fn notify(&self, id: u64) -> Result<String, AppError> {
            self.sent().fetch_add(1, SeqCst);
            Ok(format!("{} {id}", self.channel()))
        }
    }

    struct Email(Idem, AtomicUsize);
    struct Sms(Idem, AtomicUsize);

    impl Notifier for Email {
        fn idem(&self) -> &Idem {
            &self.0
        }
        fn sent(&self) -> &AtomicUsize {
            &self.1
        }
        fn channel(&self) -> &'static str {
            "email"
        }
    }

    impl Notifier for Sms {
        fn idem(&self) -> &Idem {
            &self.0
        }
        fn sent(&self) -> &AtomicUsize {
            &self.1
        }
        fn channel(&self) -> &'static str {
            "sms"
        }
    }

    trait Provider {
        const NAME: &'static str;
    }
    struct Stripe;
    struct Adyen;
    impl Provider for Stripe {
        const NAME: &'static str = "stripe";
    }
    impl Provider for Adyen {
        const NAME: &'static str = "adyen";
    }

    #[idempotent(key = id, runtime = idem, skip(provider))]
    async fn charge<P: Provider>(idem: &Idem, provider: &P, id: u64) -> Result<String, AppError> {
        let _ = provider;
        Ok(P::NAME.to_string())
    }

    #[tokio::test]
    async fn default_methods_and_generic_fns_keep_records_per_instantiation() {
        let idem = idem_on(Arc::new(idem_runtime::store::MemoryStore::new()));
        let email = Email(idem.clone(), AtomicUsize::new(0));
        let sms = Sms(idem.clone(), AtomicUsize::new(0));
        assert_eq!(email.notify(1).await.unwrap(), "email 1");
        assert_eq!(sms.notify(1).await.unwrap(), "sms 1", "the sms is sent too");
        assert_eq!(email.notify(1).await.unwrap(), "email 1");
        assert_eq!((email.1.load(SeqCst), sms.1.load(SeqCst)), (1, 1));

        assert_eq!(charge(&idem, &Stripe, 9).await.unwrap(), "stripe");
        assert_eq!(charge(&idem, &Adyen, 9).await.unwrap(), "adyen");
    }
}

#[tokio::test]
async fn an_in_memory_sqlite_url_is_refused() {
    let err = idem_runtime::store::SqliteStore::open(":memory:")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("MemoryStore"), "{err}");
    let cfg: idem_runtime::IdemConfig =
        serde_json::from_str(r#"{"store": "sqlite::memory:"}"#).unwrap();
    assert!(Idem::from_config(&cfg).await.is_err());
}
