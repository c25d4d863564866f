//! `#[idempotent(tx = tx)]`: the record and the body's rows commit or roll back together.
//!
//! The same scenarios run on PostgreSQL, MariaDB and SQLite: commit then replay, rollback
//! leaves nothing, an error or a panic leaves nothing, a duplicate blocks until the first
//! transaction ends, and many concurrent duplicates produce one row per key without deadlocks.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use idem_runtime::{Error, Outcome};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Order {
    id: i64,
    sku: String,
}

/// What the body does after its effect.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Mode {
    Ok,
    Refuse,
    Panic,
}

#[derive(Debug)]
pub(crate) enum AppError {
    Idem(#[allow(dead_code)] Error),
    Db(#[allow(dead_code)] sqlx::Error),
    Refused,
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Idem(e)
    }
}

impl From<sqlx::Error> for AppError {
    fn from(e: sqlx::Error) -> Self {
        AppError::Db(e)
    }
}

/// One module per database: the fn under test and the scenarios, on that database's types.
macro_rules! transactional_tests {
    ($db:ident, $Db:ty, $Store:ty, $insert:literal, $count:literal, $connect:expr, $begin:literal) => {
        mod $db {
            use super::*;
            use idem_runtime::{Idem, idempotent, observe};
            use sqlx::Pool;

            pub(crate) struct Fixture {
                idem: Idem,
                store: $Store,
                pool: Pool<$Db>,
                orders: String,
                _store: Box<dyn std::any::Any + Send + Sync>,
            }

            async fn fixture() -> Option<Fixture> {
                let (store, guard): ($Store, Box<dyn std::any::Any + Send + Sync>) = $connect.await?;
                let pool = store.pool().clone();
                let orders = format!("orders_{}", store.table());
                let create = format!(
                    "CREATE TABLE {orders} (id BIGINT NOT NULL, sku VARCHAR(64) NOT NULL, order_key VARCHAR(64) NOT NULL)"
                );
                sqlx::raw_sql(sqlx::AssertSqlSafe(create)).execute(&pool).await.unwrap();
                let idem = Idem::builder().store(store.clone()).build().unwrap();
                Some(Fixture { idem, store, pool, orders, _store: guard })
            }

            impl Drop for Fixture {
                fn drop(&mut self) {
                    let (pool, orders) = (self.pool.clone(), self.orders.clone());
                    let _ = std::thread::spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                        rt.block_on(async {
                            let sql = sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {orders}"));
                            let _ = sqlx::raw_sql(sql).execute(&pool).await;
                        });
                    })
                    .join();
                }
            }

            async fn begin(f: &Fixture) -> sqlx::Transaction<'static, $Db> {
                f.pool.begin_with($begin).await.unwrap()
            }

            async fn count(f: &Fixture) -> i64 {
                let sql = format!($count, f.orders);
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(&f.pool).await.unwrap()
            }

            /// The body: an order row in the caller's transaction.
            #[idempotent(key = key, tx = tx, runtime = &f.idem, skip(f, effects, hold, mode))]
            async fn place(
                f: &Fixture,
                tx: &mut sqlx::Transaction<'_, $Db>,
                effects: &AtomicUsize,
                hold: Duration,
                mode: Mode,
                key: &str,
                sku: &str,
            ) -> Result<Order, AppError> {
                let id = effects.fetch_add(1, SeqCst) as i64 + 1;
                let sql = format!($insert, f.orders);
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(id)
                    .bind(sku)
                    .bind(key)
                    .execute(&mut **tx)
                    .await?;
                tokio::time::sleep(hold).await;
                match mode {
                    Mode::Ok => {}
                    Mode::Refuse => return Err(AppError::Refused),
                    Mode::Panic => panic!("a crash after the effect, before the commit"),
                }
                Ok(Order { id, sku: sku.to_string() })
            }

            /// The same body with a one-second TTL.
            #[idempotent(key = key, tx = tx, runtime = &f.idem, skip(f, effects), ttl = "1s", name = "short")]
            async fn place_briefly(
                f: &Fixture,
                tx: &mut sqlx::Transaction<'_, $Db>,
                effects: &AtomicUsize,
                key: &str,
            ) -> Result<Order, AppError> {
                place(f, tx, effects, Duration::ZERO, Mode::Ok, key, "tea").await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn the_ttl_counts_from_the_commit_not_from_begin() {
                let Some(f) = fixture().await else { return };
                let effects = AtomicUsize::new(0);
                let mut tx = begin(&f).await;
                // A transaction open longer than the TTL before the call.
                tokio::time::sleep(Duration::from_millis(1_200)).await;
                place_briefly(&f, &mut tx, &effects, "k").await.unwrap();
                tx.commit().await.unwrap();
                let mut tx = begin(&f).await;
                let (again, how) = observe(place_briefly(&f, &mut tx, &effects, "k")).await;
                tx.commit().await.unwrap();
                again.unwrap();
                assert_eq!(how, Some(Outcome::Replayed), "still within its TTL");
                assert_eq!(effects.load(SeqCst), 1);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_disabled_runtime_runs_every_body_in_its_transaction() {
                let Some(mut f) = fixture().await else { return };
                f.idem = Idem::builder()
                    .store(f.store.clone())
                    .disabled(true)
                    .allow_disabled_in_release(true)
                    .build()
                    .unwrap();
                let effects = AtomicUsize::new(0);
                for _ in 0..2 {
                    let mut tx = begin(&f).await;
                    let (out, how) =
                        observe(place(&f, &mut tx, &effects, Duration::ZERO, Mode::Ok, "k", "tea")).await;
                    out.unwrap();
                    tx.commit().await.unwrap();
                    assert_eq!(how, Some(Outcome::Unprotected));
                }
                assert_eq!((effects.load(SeqCst), count(&f).await), (2, 2), "no record, no replay");
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_cancelled_call_committed_anyway_does_not_block_the_key() {
                let Some(f) = fixture().await else { return };
                let effects = AtomicUsize::new(0);
                let mut tx = begin(&f).await;
                let cancelled = tokio::time::timeout(
                    Duration::from_millis(100),
                    place(&f, &mut tx, &effects, Duration::from_secs(3600), Mode::Ok, "k", "tea"),
                )
                .await;
                assert!(cancelled.is_err());
                tx.commit().await.unwrap(); // the caller commits whatever was written
                let mut tx = begin(&f).await;
                let (out, how) =
                    observe(place(&f, &mut tx, &effects, Duration::ZERO, Mode::Ok, "k", "tea")).await;
                out.unwrap();
                tx.commit().await.unwrap();
                assert_eq!(how, Some(Outcome::TookOver), "the stopped call's row is taken over at once");
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_result_too_large_to_record_fails_the_call() {
                let Some(mut f) = fixture().await else { return };
                f.idem = Idem::builder()
                    .shared_store(std::sync::Arc::new(f.store.clone()))
                    .max_result_bytes(10)
                    .build()
                    .unwrap();
                let effects = AtomicUsize::new(0);
                let mut tx = begin(&f).await;
                let out = place(&f, &mut tx, &effects, Duration::ZERO, Mode::Ok, "k", "a-long-sku-name").await;
                assert!(
                    matches!(out, Err(AppError::Idem(Error::ResultTooLarge { .. }))),
                    "{out:?}"
                );
                tx.rollback().await.unwrap();
                assert_eq!(count(&f).await, 0, "rolled back with the missing record");
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn waiting_duplicates_never_see_a_store_error() {
                let Some(f) = fixture().await else { return };
                let f = Arc::new(f);
                let effects = Arc::new(AtomicUsize::new(0));
                // The first holds the key and rolls back while two duplicates wait on it.
                let (f1, e1) = (f.clone(), effects.clone());
                let first = tokio::spawn(async move {
                    let mut tx = begin(&f1).await;
                    place(&f1, &mut tx, &e1, Duration::from_millis(500), Mode::Ok, "k", "tea")
                        .await
                        .unwrap();
                    tx.rollback().await.unwrap();
                });
                tokio::time::sleep(Duration::from_millis(100)).await;
                let mut waiters = tokio::task::JoinSet::new();
                for _ in 0..2 {
                    let (f, effects) = (f.clone(), effects.clone());
                    waiters.spawn(async move {
                        loop {
                            let mut tx = begin(&f).await;
                            match place(&f, &mut tx, &effects, Duration::ZERO, Mode::Ok, "k", "tea").await {
                                Ok(o) => {
                                    tx.commit().await.unwrap();
                                    return o;
                                }
                                // A lost conflict is a retry, never a 503.
                                Err(AppError::Idem(Error::InProgress { .. })) => {
                                    let _ = tx.rollback().await;
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                                Err(e) => panic!("{e:?}"),
                            }
                        }
                    });
                }
                first.await.unwrap();
                let a = waiters.join_next().await.unwrap().unwrap();
                let b = waiters.join_next().await.unwrap().unwrap();
                assert_eq!(a, b);
                assert_eq!(count(&f).await, 1);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn commit_then_replay_without_writing() {
                let Some(f) = fixture().await else { return };
                let effects = AtomicUsize::new(0);
                let mut tx = begin(&f).await;
                let (first, how) =
                    observe(place(&f, &mut tx, &effects, Duration::ZERO, Mode::Ok, "k1", "tea")).await;
                let first = first.unwrap();
                assert_eq!(how, Some(Outcome::Executed));
                tx.commit().await.unwrap();

                let mut tx = begin(&f).await;
                let (again, how) =
                    observe(place(&f, &mut tx, &effects, Duration::ZERO, Mode::Ok, "k1", "tea")).await;
                tx.commit().await.unwrap();
                assert_eq!(again.unwrap(), first);
                assert_eq!(how, Some(Outcome::Replayed));
                assert_eq!(count(&f).await, 1);
                assert_eq!(effects.load(SeqCst), 1);

                let mut tx = begin(&f).await;
                let other = place(&f, &mut tx, &effects, Duration::ZERO, Mode::Ok, "k1", "coffee").await;
                assert!(matches!(other, Err(AppError::Idem(Error::PayloadMismatch { .. }))), "{other:?}");
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn rollback_leaves_no_record_and_no_effect() {
                let Some(f) = fixture().await else { return };
                let effects = AtomicUsize::new(0);
                // Dropped without commit: rolled back.
                {
                    let mut tx = begin(&f).await;
                    place(&f, &mut tx, &effects, Duration::ZERO, Mode::Ok, "k", "tea").await.unwrap();
                }
                // An error from the body: the caller rolls back.
                {
                    let mut tx = begin(&f).await;
                    let out = place(&f, &mut tx, &effects, Duration::ZERO, Mode::Refuse, "k", "tea").await;
                    assert!(matches!(out, Err(AppError::Refused)));
                    tx.rollback().await.unwrap();
                }
                // An error, and a caller that commits anyway: the effect stays (its choice),
                // but the key is not recorded as done.
                {
                    let mut tx = begin(&f).await;
                    let out = place(&f, &mut tx, &effects, Duration::ZERO, Mode::Refuse, "k", "tea").await;
                    assert!(matches!(out, Err(AppError::Refused)));
                    tx.commit().await.unwrap();
                }
                assert_eq!(count(&f).await, 1, "only the committed error's row");
                // A panic in the body unwinds through the caller, dropping its transaction.
                let f = Arc::new(f);
                let f2 = f.clone();
                let panicked = tokio::spawn(async move {
                    let mut tx = begin(&f2).await;
                    let effects = AtomicUsize::new(100);
                    let _ = place(&f2, &mut tx, &effects, Duration::ZERO, Mode::Panic, "k", "tea").await;
                })
                .await;
                assert!(panicked.is_err(), "the panic reached the caller");
                let mut tx = begin(&f).await;
                let (out, how) =
                    observe(place(&f, &mut tx, &effects, Duration::ZERO, Mode::Ok, "k", "tea")).await;
                out.unwrap();
                tx.commit().await.unwrap();
                assert_eq!(how, Some(Outcome::Executed), "nothing was recorded before");
                assert_eq!(count(&f).await, 2);
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_duplicate_waits_for_the_first_transaction() {
                let Some(f) = fixture().await else { return };
                let f = Arc::new(f);
                let effects = Arc::new(AtomicUsize::new(0));
                for commit in [true, false] {
                    let key = format!("k-{commit}");
                    let (f1, e1, k1) = (f.clone(), effects.clone(), key.clone());
                    let first = tokio::spawn(async move {
                        let mut tx = begin(&f1).await;
                        let out = place(&f1, &mut tx, &e1, Duration::from_millis(600), Mode::Ok, &k1, "tea")
                            .await
                            .unwrap();
                        if commit {
                            tx.commit().await.unwrap();
                        } else {
                            tx.rollback().await.unwrap();
                        }
                        out
                    });
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    let start = Instant::now();
                    let mut tx = begin(&f).await;
                    let (second, how) =
                        observe(place(&f, &mut tx, &effects, Duration::ZERO, Mode::Ok, &key, "tea")).await;
                    tx.commit().await.unwrap();
                    let first = first.await.unwrap();
                    assert!(start.elapsed() >= Duration::from_millis(300), "it waited for the first");
                    if commit {
                        assert_eq!(second.unwrap(), first, "the committed result");
                        assert_eq!(how, Some(Outcome::Replayed));
                    } else {
                        assert_ne!(second.unwrap().id, first.id, "rolled back: it ran the body itself");
                        assert_eq!(how, Some(Outcome::Executed));
                    }
                }
                assert_eq!(count(&f).await, 2, "one row per key: the rolled-back one is gone");
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn many_concurrent_duplicates_make_one_row_per_key() {
                let Some(f) = fixture().await else { return };
                let f = Arc::new(f);
                let effects = Arc::new(AtomicUsize::new(0));
                const KEYS: usize = 16;
                const TASKS: usize = 64;
                let mut tasks = tokio::task::JoinSet::new();
                for i in 0..TASKS {
                    let (f, effects) = (f.clone(), effects.clone());
                    tasks.spawn(async move {
                        let key = format!("order-{}", i % KEYS);
                        loop {
                            let mut tx = begin(&f).await;
                            match place(&f, &mut tx, &effects, Duration::from_millis(5), Mode::Ok, &key, "tea").await {
                                Ok(order) => {
                                    tx.commit().await.unwrap();
                                    return (key, order);
                                }
                                Err(e) => panic!("{key}: {e:?}"),
                            }
                        }
                    });
                }
                let mut by_key = std::collections::HashMap::<String, Vec<Order>>::new();
                while let Some(t) = tasks.join_next().await {
                    let (key, order) = t.unwrap();
                    by_key.entry(key).or_default().push(order);
                }
                assert_eq!(count(&f).await, KEYS as i64, "effect rows equal keys");
                for (key, orders) in &by_key {
                    assert!(orders.iter().all(|o| o == &orders[0]), "{key}: {orders:?}");
                }
                println!("{}: {TASKS} transactions over {KEYS} keys, {} bodies committed", stringify!($db), count(&f).await);
            }
        }
    };
}

transactional_tests!(
    postgres,
    sqlx::Postgres,
    idem_runtime::store::PgStore,
    "INSERT INTO {} (id, sku, order_key) VALUES ($1, $2, $3)",
    "SELECT COUNT(*) FROM {}",
    async {
        let f = support::postgres_store().await?;
        let store = f.store.clone();
        Some((store, Box::new(f) as Box<dyn std::any::Any + Send + Sync>))
    },
    "BEGIN"
);

transactional_tests!(
    mysql,
    sqlx::MySql,
    idem_runtime::store::MySqlStore,
    "INSERT INTO {} (id, sku, order_key) VALUES (?, ?, ?)",
    "SELECT COUNT(*) FROM {}",
    async {
        let f = support::mysql_store().await?;
        let store = f.store.clone();
        Some((store, Box::new(f) as Box<dyn std::any::Any + Send + Sync>))
    },
    "BEGIN"
);

transactional_tests!(
    sqlite,
    sqlx::Sqlite,
    idem_runtime::store::SqliteStore,
    "INSERT INTO {} (id, sku, order_key) VALUES (?1, ?2, ?3)",
    "SELECT COUNT(*) FROM {}",
    async {
        let f = support::sqlite_store().await;
        let store = f.store.clone();
        Some((store, Box::new(f) as Box<dyn std::any::Any + Send + Sync>))
    },
    "BEGIN IMMEDIATE"
);
