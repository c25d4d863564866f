//! Bugs found by driving idem from outside, each test named after what it broke.
//!
//! - A call whose reservation was taken over while the store was slow answered `Ok` with a
//!   value that was never recorded, while the new owner answered `Ok` with another.
//! - Two record names that differ only in how `/` is written (`a/b`, `a%2Fb`) shared records.
//! - A config without a store silently used a private SQLite file.
//! - Heartbeats drifted past a short lease on a slow link (two round trips per beat, slept
//!   between instead of scheduled).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use idem_runtime::store::{PgStore, PgStoreOptions, Store};
use idem_runtime::{Error, Idem, Outcome, idempotent, observe};
use support::{Backend, Instrumented};

#[derive(Debug)]
enum AppError {
    Idem(Error),
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Idem(e)
    }
}

/// A charge whose body takes `hold` and answers with who ran it.
#[idempotent(key = key, runtime = idem, skip(runs, hold, who), lease = "PT1S", wait = "PT10S", name = "tests::charge")]
async fn charge(
    idem: &Idem,
    runs: &AtomicUsize,
    hold: Duration,
    who: &str,
    key: u32,
) -> Result<String, AppError> {
    runs.fetch_add(1, SeqCst);
    tokio::time::sleep(hold).await;
    Ok(format!("charged by {who}"))
}

/// Two replicas on one store whose heartbeats and finalizes take 1.2 s. A reserves with a
/// 1 s lease and runs for 2 s; its first heartbeat lands after B (waiting since 100 ms) took
/// the key over. Returns what A and B were told, and what the record replays.
async fn slow_store_takeover(
    b: &Backend,
    a_store_timeout: &str,
) -> (
    Result<String, AppError>,
    Result<String, AppError>,
    String,
    usize,
) {
    let slow = Instrumented::new(b.store.clone());
    Instrumented::set(&slow.heartbeat_lag, Duration::from_millis(1_200));
    Instrumented::set(&slow.finalize_lag, Duration::from_millis(1_200));
    let replica = |timeout: &str| {
        Idem::builder()
            .shared_store(slow.clone())
            .store_timeout(timeout)
            .build()
            .unwrap()
    };
    let (a, b_idem) = (replica(a_store_timeout), replica("PT5S"));
    let runs = Arc::new(AtomicUsize::new(0));
    let (ra, rb) = (runs.clone(), runs.clone());
    let first = tokio::spawn(async move { charge(&a, &ra, Duration::from_secs(2), "A", 7).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second =
        tokio::spawn(async move { charge(&b_idem, &rb, Duration::from_millis(100), "B", 7).await });
    let (a_out, b_out) = (first.await.unwrap(), second.await.unwrap());
    let third = Idem::builder()
        .shared_store(b.store.clone())
        .build()
        .unwrap();
    let recorded = charge(&third, &runs, Duration::ZERO, "C", 7)
        .await
        .expect("the record replays");
    (a_out, b_out, recorded, runs.load(SeqCst))
}

async fn a_call_whose_lease_was_taken_over_is_never_answered_ok(b: Backend) {
    let (a, b_out, recorded, runs) = slow_store_takeover(&b, "PT5S").await;
    assert!(
        matches!(a, Err(AppError::Idem(Error::LeaseLost { .. }))),
        "A lost its reservation and must say so: {a:?}"
    );
    assert_eq!(b_out.unwrap(), "charged by B");
    assert_eq!(recorded, "charged by B", "the record holds B's result");
    assert_eq!(
        runs, 2,
        "the leased guarantee re-ran the body once, after the lease ran out"
    );
}

async fn a_result_not_recorded_in_time_is_never_answered_ok(b: Backend) {
    // A gives up on its slow statements after 0.8 s (the patience the engine had before):
    // its finalize's outcome is unknown when it must answer.
    let (a, b_out, recorded, _) = slow_store_takeover(&b, "800ms").await;
    match a {
        Err(AppError::Idem(e @ (Error::LeaseLost { .. } | Error::ResultNotRecorded { .. }))) => {
            assert!(matches!(e.http_status(), 409 | 503), "{e}");
        }
        other => panic!("A's result was not recorded; it must not be Ok: {other:?}"),
    }
    assert_eq!(
        b_out.unwrap(),
        recorded,
        "the one Ok answer is the recorded one"
    );
}

for_each_store!(
    a_call_whose_lease_was_taken_over_is_never_answered_ok,
    a_result_not_recorded_in_time_is_never_answered_ok,
);

/// The loss is counted, once, where the README's alert table says.
#[tokio::test(flavor = "current_thread")]
async fn a_lost_lease_is_counted_and_its_result_counted_as_not_stored() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // A current-thread runtime: every task of the test records through this thread's recorder.
    let _guard = metrics::set_default_local_recorder(&recorder);
    let b = support::memory_backend().await.unwrap();
    let (a, _, _, _) = slow_store_takeover(&b, "PT5S").await;
    assert!(matches!(a, Err(AppError::Idem(Error::LeaseLost { .. }))));
    // A snapshot drains the counters: take one.
    let snapshot = snapshotter.snapshot().into_vec();
    let count = |name: &str, label: Option<(&str, &str)>| -> u64 {
        snapshot
            .iter()
            .filter(|(k, _, _, _)| {
                k.key().name() == name
                    && label.is_none_or(|(lk, lv)| {
                        k.key().labels().any(|l| l.key() == lk && l.value() == lv)
                    })
            })
            .map(|(_, _, _, v)| match v {
                DebugValue::Counter(c) => *c,
                _ => 0,
            })
            .sum()
    };
    assert_eq!(count("idem_leases_lost_total", None), 1);
    assert_eq!(
        count(
            "idem_results_not_stored_total",
            Some(("reason", "lease_lost"))
        ),
        1
    );
    assert_eq!(count("idem_errors_total", Some(("kind", "lease_lost"))), 1);
}

#[idempotent(key = key, runtime = idem, skip(runs), name = "orders/create")]
async fn create_slash(idem: &Idem, runs: &AtomicUsize, key: u32) -> Result<String, Error> {
    runs.fetch_add(1, SeqCst);
    Ok("slash".into())
}

#[idempotent(key = key, runtime = idem, skip(runs), name = "orders%2Fcreate")]
async fn create_escaped(idem: &Idem, runs: &AtomicUsize, key: u32) -> Result<String, Error> {
    runs.fetch_add(1, SeqCst);
    Ok("escaped".into())
}

#[tokio::test]
async fn names_that_differ_only_in_escapes_do_not_share_records() {
    let idem = Idem::builder()
        .store(idem_runtime::store::MemoryStore::new())
        .build()
        .unwrap();
    let runs = AtomicUsize::new(0);
    assert_eq!(create_slash(&idem, &runs, 1).await.unwrap(), "slash");
    assert_eq!(create_escaped(&idem, &runs, 1).await.unwrap(), "escaped");
    assert_eq!(runs.load(SeqCst), 2, "each fn ran its own body");
}

#[tokio::test]
async fn a_config_without_a_store_is_an_error_naming_it() {
    let config: idem_runtime::IdemConfig =
        serde_json::from_str(r#"{ "default_ttl": "PT1H" }"#).unwrap();
    match Idem::from_config(&config).await {
        Err(Error::Config(msg)) => assert!(msg.starts_with("store:"), "{msg}"),
        other => panic!("no silent default store: {other:?}"),
    }
    assert!(
        !std::path::Path::new("idem.db").exists(),
        "no file was created in the working directory"
    );
}

#[idempotent(key = key, runtime = idem, skip(runs), lease = "PT1S", wait = "PT10S", name = "tests::long")]
async fn long_charge(idem: &Idem, runs: &AtomicUsize, key: u32) -> Result<usize, AppError> {
    let run = runs.fetch_add(1, SeqCst) + 1;
    tokio::time::sleep(Duration::from_secs(3)).await;
    Ok(run)
}

/// A 3 s body with a 1 s lease, reserved through a link with 200 ms of latency each way:
/// its heartbeats must keep the lease, so a duplicate on another replica waits for the result
/// instead of taking the key over and charging again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_hold_a_short_lease_over_a_slow_link() {
    let url = support::postgres_url();
    let proxy = support::proxy::Proxy::start(support::proxy::upstream(&url, 5432)).await;
    let table = support::unique_table();
    let options = PgStoreOptions::new().table(table.clone());
    let slow =
        match PgStore::connect_with(&support::proxy::through(&url, proxy.addr), options).await {
            Ok(s) => s,
            Err(e) => {
                return support::server_missing("PostgreSQL", "IDEM_TEST_POSTGRES_URL", &url, &e);
            }
        };
    let near = PgStore::connect_with(&url, PgStoreOptions::new().table(table.clone()))
        .await
        .unwrap();
    let far = Idem::builder().store(slow.clone()).build().unwrap();
    let local = Idem::builder().store(near.clone()).build().unwrap();
    // A warm pool, as in a running service: a few connections are open and idle.
    let warm: Vec<_> = (0..4)
        .map(|_| {
            let pool = slow.pool().clone();
            tokio::spawn(async move { sqlx::query("SELECT pg_sleep(0.05)").execute(&pool).await })
        })
        .collect();
    for w in warm {
        w.await.unwrap().unwrap();
    }
    proxy.set_latency(Duration::from_millis(200));
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let first = tokio::spawn(async move { observe(long_charge(&far, &r, 1)).await });
    // The duplicate arrives while the first body runs.
    while runs.load(SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (second, how) = observe(long_charge(&local, &runs, 1)).await;
    let (first, first_how) = first.await.unwrap();
    assert_eq!(first.unwrap(), 1);
    assert_eq!(first_how, Some(Outcome::Executed));
    assert_eq!(
        second.unwrap(),
        1,
        "the duplicate got the first call's result"
    );
    assert_eq!(
        how,
        Some(Outcome::Waited),
        "it waited; it did not take over"
    );
    assert_eq!(runs.load(SeqCst), 1, "the body ran once");
    let store: &dyn Store = &near;
    let record = store
        .load(&idem_runtime::RecordId::new("tests::long/v0", "1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.attempts, 1, "never taken over");
    drop_pg_table(&url, &table).await;
}

async fn drop_pg_table(url: &str, table: &str) {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
    let sql = sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}"));
    sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
}

#[idempotent(key = key, runtime = idem, skip(runs, hold), lease = "300ms", wait = "PT10S", name = "tests::short_lease")]
async fn short_lease(
    idem: &Idem,
    runs: &AtomicUsize,
    hold: Duration,
    key: u32,
) -> Result<usize, AppError> {
    let run = runs.fetch_add(1, SeqCst) + 1;
    tokio::time::sleep(hold).await;
    Ok(run)
}

/// A heartbeat found the reservation taken over, and the finalize's outcome is still unknown
/// when the caller must answer: the caller is told `LeaseLost`, never `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_with_an_unknown_finalize_is_lease_lost() {
    let store = Instrumented::new(Arc::new(idem_runtime::store::MemoryStore::new()));
    let replica = |timeout: &str| {
        Idem::builder()
            .shared_store(store.clone())
            .store_timeout(timeout)
            .build()
            .unwrap()
    };
    let (a, b) = (replica("PT1S"), replica("PT5S"));
    let runs = Arc::new(AtomicUsize::new(0));
    // A's heartbeats cannot get through, so its lease runs out and B takes the key over.
    Instrumented::set(&store.heartbeat_lag, Duration::from_secs(5));
    let r = runs.clone();
    let first =
        tokio::spawn(async move { short_lease(&a, &r, Duration::from_millis(1_200), 1).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = short_lease(&b, &runs, Duration::from_millis(50), 1).await;
    assert_eq!(second.unwrap(), 2, "B took over and ran the body");
    // Now A's heartbeats get through and find the record B's; its finalize then outlasts its
    // store timeout.
    Instrumented::set(&store.heartbeat_lag, Duration::ZERO);
    Instrumented::set(&store.finalize_stall, Duration::from_millis(1_500));
    match first.await.unwrap() {
        Err(AppError::Idem(Error::LeaseLost { .. })) => {}
        other => panic!("A lost its reservation: {other:?}"),
    }
}
