//! Opening a store, or a runtime from a config, is a future `tokio::spawn` takes: services
//! often open their store in a task of their own.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};

use idem_runtime::store::{MySqlStore, PgStore, RedisStore, SqliteStore};
use idem_runtime::{Idem, IdemConfig, idempotent};

/// Compiles only for a future that may be spawned; it is not run.
fn spawnable<F: Future + Send + 'static>(_: F) {}

#[test]
fn opening_any_store_is_a_future_that_may_be_spawned() {
    spawnable(SqliteStore::open("/nonexistent/idem.db"));
    spawnable(PgStore::connect("postgres://127.0.0.1/none"));
    spawnable(MySqlStore::connect("mysql://127.0.0.1/none"));
    spawnable(RedisStore::connect("redis://127.0.0.1"));
    let config = IdemConfig::default();
    spawnable(async move { Idem::from_config(&config).await });
}

static RUNS: AtomicU32 = AtomicU32::new(0);

#[idempotent(key = key, runtime = idem, skip_all, name = "spawned.open")]
async fn counted(idem: &Idem, key: &str) -> Result<u32, idem_runtime::Error> {
    Ok(RUNS.fetch_add(1, Ordering::SeqCst))
}

#[tokio::test]
async fn a_sqlite_store_opened_in_a_spawned_task_works() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spawned.db");
    let store = tokio::spawn(async move { SqliteStore::open(path).await })
        .await
        .expect("the task")
        .expect("the store");
    let idem = Idem::builder().store(store).build().expect("idem");
    assert_eq!(counted(&idem, "k").await.expect("first"), 0);
    assert_eq!(
        counted(&idem, "k").await.expect("replay"),
        0,
        "the first result, replayed"
    );
    assert_eq!(RUNS.load(Ordering::SeqCst), 1);
}
