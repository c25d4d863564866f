//! Transactional calls on the local PostgreSQL: first executions per second through
//! `#[idempotent(tx = tx)]` against the same business INSERT done alone in a transaction by
//! hand (begin, insert, commit), in alternating rounds of the same run.
//!
//! `cargo bench -p idem-runtime --features postgres --bench transactional`

mod common;

use std::time::Duration;

use common::{median, rate};

use idem_runtime::store::{PgStore, PgStoreOptions};
use idem_runtime::{Error, Idem, idempotent};
use sqlx::{PgPool, Postgres, Transaction};

const ROUND: Duration = Duration::from_secs(2);
const ROUNDS: usize = 5;
const POOL: u32 = 32;

async fn business_insert(tx: &mut Transaction<'_, Postgres>, key: &str) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO bench_orders (order_key, cents) VALUES ($1, $2)")
        .bind(key)
        .bind(1_299i64)
        .execute(&mut **tx)
        .await
        .map(drop)
}

/// A more typical order transaction: the order, a stock decrement, an outbox event.
async fn business_order(tx: &mut Transaction<'_, Postgres>, key: &str) -> Result<(), sqlx::Error> {
    business_insert(tx, key).await?;
    sqlx::query("UPDATE bench_stock SET available = available - 1 WHERE sku = $1")
        .bind(fastrand::i64(0..64))
        .execute(&mut **tx)
        .await?;
    sqlx::query("INSERT INTO bench_outbox (order_key, event) VALUES ($1, 'order.created')")
        .bind(key)
        .execute(&mut **tx)
        .await
        .map(drop)
}

#[derive(Debug)]
enum AppError {
    Idem(#[allow(dead_code)] Error),
    Db(#[allow(dead_code)] sqlx::Error),
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

#[idempotent(key = key, tx = tx, runtime = idem, skip_all, name = "bench.tx")]
async fn place(
    idem: &Idem,
    tx: &mut Transaction<'_, Postgres>,
    key: String,
) -> Result<u64, AppError> {
    business_insert(tx, &key).await?;
    Ok(42)
}

#[idempotent(key = key, tx = tx, runtime = idem, skip_all, name = "bench.tx.order")]
async fn order(
    idem: &Idem,
    tx: &mut Transaction<'_, Postgres>,
    key: String,
) -> Result<u64, AppError> {
    business_order(tx, &key).await?;
    Ok(42)
}

fn main() {
    common::runtime().block_on(run());
}

async fn run() {
    let url = std::env::var("IDEM_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let table = format!("bench_tx_{:08x}", fastrand::u32(..));
    let options = PgStoreOptions::new().table(&table).max_connections(POOL);
    let store = match PgStore::connect_with(&url, options).await {
        Ok(s) => s,
        Err(e) => {
            println!("skipped: PostgreSQL not reachable at {url}: {e}");
            return;
        }
    };
    let pool: PgPool = store.pool().clone();
    sqlx::query("DROP TABLE IF EXISTS bench_orders")
        .execute(&pool)
        .await
        .expect("drop");
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS bench_stock; DROP TABLE IF EXISTS bench_outbox;
         CREATE TABLE bench_orders (order_key TEXT PRIMARY KEY, cents BIGINT NOT NULL);
         CREATE TABLE bench_stock (sku BIGINT PRIMARY KEY, available BIGINT NOT NULL);
         INSERT INTO bench_stock SELECT g, 1000000000 FROM generate_series(0, 63) g;
         CREATE TABLE bench_outbox (id BIGSERIAL PRIMARY KEY, order_key TEXT NOT NULL, event TEXT NOT NULL);",
    )
    .execute(&pool)
    .await
    .expect("tables");
    let idem = Idem::builder().store(store).build().expect("idem");

    println!("== PostgreSQL transactional calls ({ROUNDS} alternating rounds of {ROUND:?})");
    for tasks in [1usize, 16, 64] {
        let (mut raw, mut ours) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let p = pool.clone();
            raw.push(
                rate(tasks, ROUND, move |n| {
                    let p = p.clone();
                    async move {
                        let mut tx = p.begin().await.expect("begin");
                        business_insert(&mut tx, &format!("raw-{tasks}-{round}-{n}"))
                            .await
                            .expect("insert");
                        tx.commit().await.expect("commit");
                    }
                })
                .await,
            );
            let (p, i) = (pool.clone(), idem.clone());
            ours.push(
                rate(tasks, ROUND, move |n| {
                    let (p, i) = (p.clone(), i.clone());
                    async move {
                        let mut tx = p.begin().await.expect("begin");
                        place(&i, &mut tx, format!("idem-{tasks}-{round}-{n}"))
                            .await
                            .expect("place");
                        tx.commit().await.expect("commit");
                    }
                })
                .await,
            );
        }
        let (raw, ours) = (median(raw), median(ours));
        println!(
            "first executions, {tasks:>2} tasks: idem {ours:>7.0}/s, INSERT alone in a transaction {raw:>7.0}/s = {:.2} of it (target >= 0.85)",
            ours / raw
        );
    }
    for tasks in [1usize, 16] {
        let (mut raw, mut ours) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let p = pool.clone();
            raw.push(
                rate(tasks, ROUND, move |n| {
                    let p = p.clone();
                    async move {
                        let mut tx = p.begin().await.expect("begin");
                        business_order(&mut tx, &format!("raw-order-{tasks}-{round}-{n}"))
                            .await
                            .expect("order");
                        tx.commit().await.expect("commit");
                    }
                })
                .await,
            );
            let (p, i) = (pool.clone(), idem.clone());
            ours.push(
                rate(tasks, ROUND, move |n| {
                    let (p, i) = (p.clone(), i.clone());
                    async move {
                        let mut tx = p.begin().await.expect("begin");
                        order(&i, &mut tx, format!("idem-order-{tasks}-{round}-{n}"))
                            .await
                            .expect("order");
                        tx.commit().await.expect("commit");
                    }
                })
                .await,
            );
        }
        let (raw, ours) = (median(raw), median(ours));
        println!(
            "3-statement order transaction, {tasks:>2} tasks: idem {ours:>7.0}/s, by hand {raw:>7.0}/s = {:.2} of it",
            ours / raw
        );
    }
    for t in [
        table.as_str(),
        "bench_orders",
        "bench_stock",
        "bench_outbox",
    ] {
        let sql = sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {t}"));
        sqlx::raw_sql(sql).execute(&pool).await.expect("cleanup");
    }
}
