//! Group commit: first executions per second with it on and off, against the same statements
//! issued by hand one call at a time, in alternating rounds of one run, on SQLite and on the
//! local PostgreSQL; then the sizes of the batches the "on" rounds sent.
//!
//! `cargo bench -p idem-runtime --features postgres --bench group_commit`
//! (`IDEM_TEST_POSTGRES_URL` picks the server; `IDEM_BENCH_BATCH_CONCURRENCY=1,2,4` runs
//! group commit with each of those numbers of batches in flight, instead of the default;
//! `IDEM_BENCH_TASKS=16` runs only those numbers of tasks, and `IDEM_BENCH_STORES=postgres`
//! only that store, `sqlite` or `postgres`, for a profile of one case).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{median, rate};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

use idem_runtime::store::{PgStore, PgStoreOptions, SqliteStore, Store};
use idem_runtime::{Error, Idem, idempotent};

const ROUND: Duration = Duration::from_secs(2);
const ROUNDS: usize = 3;

#[idempotent(key = key, runtime = idem, skip_all, name = "bench.group")]
async fn first(idem: &Idem, key: String) -> Result<u64, Error> {
    Ok(42)
}

/// The raw floor: the store's reserve and finalize issued one call at a time, through the
/// store itself (its own pool and statements), with no engine around them.
async fn raw_first(store: &dyn Store, n: u64) {
    use idem_runtime::store::{Claim, Fence, Reservation, StoredResult};
    let id = idem_runtime::RecordId::new("bench.raw/v0", format!("r{n}-{}", fastrand::u64(..)));
    let fence = Fence::random();
    let claim = Claim {
        id: &id,
        fence,
        owner: "bench",
        fingerprint: None,
        lease: Duration::from_secs(30),
    };
    let got = store.reserve(&claim).await.expect("reserve");
    assert!(matches!(got, Reservation::Acquired));
    let result = StoredResult {
        codec: idem_runtime::Codec::Json,
        bytes: b"42".to_vec(),
    };
    let day = Duration::from_secs(86_400);
    assert!(
        store
            .finalize(&id, fence, &result, day)
            .await
            .expect("finalize")
    );
}

fn idem(store: Arc<dyn Store>, batches: Option<usize>) -> Idem {
    let mut builder = Idem::builder()
        .shared_store(store)
        .local_cache(0)
        .group_commit(batches.is_some());
    if let Some(n) = batches.filter(|n| *n > 0) {
        builder = builder.batch_concurrency(n);
    }
    builder.build().expect("idem")
}

/// The numbers in the environment variable `var` (a comma-separated list), or `default`.
fn numbers(var: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(var)
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| default.to_vec())
}

/// The numbers of batches in flight to try (`0`: the default).
fn concurrencies() -> Vec<usize> {
    numbers("IDEM_BENCH_BATCH_CONCURRENCY", &[0])
}

/// The stores this bench knows.
const STORES: [&str; 2] = ["sqlite", "postgres"];

/// The stores to run (`IDEM_BENCH_STORES`, by default every store); a name it does not know
/// stops the bench rather than run nothing.
fn stores() -> Vec<String> {
    let Ok(list) = std::env::var("IDEM_BENCH_STORES") else {
        return STORES.map(String::from).to_vec();
    };
    let stores: Vec<String> = list.split(',').map(|s| s.trim().to_owned()).collect();
    let unknown: Vec<&String> = stores
        .iter()
        .filter(|s| !STORES.contains(&s.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "IDEM_BENCH_STORES: unknown {unknown:?}; the stores are {STORES:?}"
    );
    stores
}

async fn compare(name: &str, store: Arc<dyn Store>, tasks_list: &[usize], snap: &Snapshotter) {
    let off = idem(store.clone(), None);
    let on: Vec<(usize, Idem)> = concurrencies()
        .into_iter()
        .map(|c| (c, idem(store.clone(), Some(c))))
        .collect();
    println!("== {name}: first executions/s ({ROUNDS} alternating rounds of {ROUND:?})");
    for &tasks in tasks_list {
        let (mut raw, mut without) = (Vec::new(), Vec::new());
        let mut with: Vec<Vec<f64>> = vec![Vec::new(); on.len()];
        for round in 0..ROUNDS {
            let s = store.clone();
            raw.push(
                rate(tasks, ROUND, move |n| {
                    let s = s.clone();
                    async move { raw_first(&*s, n).await }
                })
                .await,
            );
            let contenders = std::iter::once((&off, &mut without, "off".to_string())).chain(
                on.iter()
                    .zip(with.iter_mut())
                    .map(|((c, i), out)| (i, out, format!("on{c}"))),
            );
            for (runtime, out, tag) in contenders {
                let i = runtime.clone();
                out.push(
                    rate(tasks, ROUND, move |n| {
                        let i = i.clone();
                        let tag = tag.clone();
                        async move {
                            let key = format!("{tag}{tasks}-{round}-{n}-{}", fastrand::u32(..));
                            first(&i, key).await.expect("first");
                        }
                    })
                    .await,
                );
            }
        }
        let (raw, without) = (median(raw), median(without));
        println!("{tasks:>3} tasks: off {without:>7.0}/s, raw {raw:>7.0}/s");
        for ((c, _), rates) in on.iter().zip(with) {
            let with = median(rates);
            let label = if *c == 0 {
                "default".to_string()
            } else {
                c.to_string()
            };
            println!(
                "      group commit on ({label} in flight) {with:>7.0}/s = {:.2}x off, {:.2}x raw",
                with / without,
                with / raw
            );
        }
        print_batches(snap);
    }
}

/// The batch sizes recorded since the last snapshot, per verb.
fn print_batches(snap: &Snapshotter) {
    for (key, _, _, value) in snap.snapshot().into_vec() {
        if key.key().name() != "idem_store_batch_size" {
            continue;
        }
        let DebugValue::Histogram(mut sizes) = value else {
            continue;
        };
        if sizes.is_empty() {
            continue;
        }
        sizes.sort();
        let op = key
            .key()
            .labels()
            .find(|l| l.key() == "op")
            .map_or("?", |l| l.value());
        let total: f64 = sizes.iter().map(|s| s.into_inner()).sum();
        let at = |q: f64| sizes[((sizes.len() - 1) as f64 * q) as usize].into_inner();
        println!(
            "      {op:>9} batches: {:>6}, calls per batch: mean {:>5.1}, p50 {:>3}, p90 {:>3}, max {:>3}",
            sizes.len(),
            total / sizes.len() as f64,
            at(0.5),
            at(0.9),
            at(1.0)
        );
    }
}

fn main() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    metrics::set_global_recorder(recorder).expect("recorder");
    let stores = stores();
    let runs = |store: &str| stores.iter().any(|s| s == store);
    let tasks = numbers("IDEM_BENCH_TASKS", &[1, 16, 64]);
    common::runtime().block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        if runs("sqlite") {
            let sqlite = SqliteStore::open(dir.path().join("bench.db"))
                .await
                .expect("sqlite");
            compare(
                "SQLite (synchronous = FULL)",
                Arc::new(sqlite),
                &tasks,
                &snap,
            )
            .await;
        }
        if !runs("postgres") {
            return;
        }

        let url = std::env::var("IDEM_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let table = format!("bench_group_{:08x}", fastrand::u32(..));
        let options = PgStoreOptions::new().table(&table).max_connections(32);
        match PgStore::connect_with(&url, options).await {
            Ok(pg) => {
                let pool = pg.pool().clone();
                compare("PostgreSQL", Arc::new(pg), &tasks, &snap).await;
                let drop = sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {table}"));
                sqlx::raw_sql(drop).execute(&pool).await.expect("cleanup");
            }
            Err(e) => println!("skipped PostgreSQL: not reachable at {url}: {e}"),
        }
    });
}
