//! idem on the local PostgreSQL against the raw SQL it issues, in one run.
//!
//! - First executions per second at 1, 16 and 64 concurrent tasks: a fresh key each call,
//!   through `#[idempotent]` (reserve, body, finalize) against the same two statements issued
//!   by hand on an identical table and pool.
//! - Replays served from the store (local cache off) against a raw `SELECT` of the record.
//!
//! Rounds alternate (raw, idem, raw, idem, ...) so machine noise lands on both; each figure
//! is the median of its rounds. `cargo bench -p idem-runtime --bench postgres`
//! (`IDEM_TEST_POSTGRES_URL` picks the server).

mod common;

use std::time::Duration;

use common::{median, rate};

use idem_runtime::store::{PgStore, PgStoreOptions};
use idem_runtime::{Error, Idem, idempotent};
use sqlx::PgPool;

const ROUND: Duration = Duration::from_secs(2);
const ROUNDS: usize = 5;
const POOL: u32 = 32;

#[idempotent(key = key, runtime = idem, skip_all, name = "bench.first")]
async fn first(idem: &Idem, key: String) -> Result<u64, Error> {
    Ok(42)
}

#[idempotent(key = key, runtime = idem, skip_all, name = "bench.replay")]
async fn replayed(idem: &Idem, key: String) -> Result<u64, Error> {
    Ok(42)
}

/// The reserve and finalize statements of `PgStore`, written out by hand (same text, same
/// binds).
async fn raw_first(pool: &PgPool, key: &str) {
    let fence = fastrand::i64(..);
    let inserted: Option<bool> = sqlx::query_scalar(
        "WITH existing AS (
            SELECT state, fingerprint, fence, owner, attempts,
                (EXTRACT(EPOCH FROM (lease_expires_at - now())) * 1000)::BIGINT AS lease_remaining_ms,
                (EXTRACT(EPOCH FROM (expires_at - now())) * 1000)::BIGINT AS expires_in_ms,
                result, codec
            FROM bench_raw WHERE namespace = $1 AND key = $2
        ), ins AS (
            INSERT INTO bench_raw (namespace, key, state, fingerprint, fence, owner,
                lease_expires_at, heartbeat_at, attempts, created_at, expires_at)
            SELECT $1::BYTEA, $2::BYTEA, 'in_progress', $3::BYTEA, $4::BIGINT, $5::TEXT,
                now() + $6::BIGINT * interval '1 millisecond', now(), 1, now(),
                now() + $6::BIGINT * interval '1 millisecond'
            WHERE NOT EXISTS (SELECT 1 FROM existing)
            ON CONFLICT (namespace, key) DO NOTHING
            RETURNING 1
        )
        SELECT TRUE FROM ins",
    )
    .bind(b"bench.first/v0".as_slice())
    .bind(key.as_bytes())
    .bind(None::<Vec<u8>>)
    .bind(fence)
    .bind("bench")
    .bind(30_000i64)
    .fetch_optional(pool)
    .await
    .expect("reserve");
    assert_eq!(inserted, Some(true));
    let done = sqlx::query(
        "UPDATE bench_raw SET state = 'completed', result = $3, codec = $4, completed_at = now(),
            expires_at = now() + $5 * interval '1 millisecond', lease_expires_at = NULL
         WHERE namespace = $1 AND key = $2 AND fence = $6 AND state = 'in_progress'",
    )
    .bind(b"bench.first/v0".as_slice())
    .bind(key.as_bytes())
    .bind(b"42".as_slice())
    .bind("json")
    .bind(86_400_000i64)
    .bind(fence)
    .execute(pool)
    .await
    .expect("finalize");
    assert_eq!(done.rows_affected(), 1);
}

async fn raw_select(pool: &PgPool, key: &str) {
    let row: Option<(String, Option<Vec<u8>>)> =
        sqlx::query_as("SELECT state, result FROM bench_raw WHERE namespace = $1 AND key = $2")
            .bind(b"bench.replay/v0".as_slice())
            .bind(key.as_bytes())
            .fetch_optional(pool)
            .await
            .expect("select");
    assert!(row.is_some());
}

fn main() {
    common::runtime().block_on(run());
}

async fn run() {
    let url = std::env::var("IDEM_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let table = format!("bench_idem_{:08x}", fastrand::u32(..));
    let options = PgStoreOptions::new().table(&table).max_connections(POOL);
    let store = match PgStore::connect_with(&url, options).await {
        Ok(s) => s,
        Err(e) => {
            println!("skipped: PostgreSQL not reachable at {url}: {e}");
            return;
        }
    };
    // The same pool settings as idem's own (no ping before each statement), so the floor is
    // the best one-call-at-a-time code, not a slower pool.
    let raw_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(POOL)
        .test_before_acquire(false)
        .connect(&url)
        .await
        .expect("raw pool");
    sqlx::query("DROP TABLE IF EXISTS bench_raw")
        .execute(&raw_pool)
        .await
        .expect("drop");
    PgStore::from_pool(raw_pool.clone(), "bench_raw")
        .await
        .expect("raw table");
    let idem = Idem::builder()
        .store(store.clone())
        .local_cache(0)
        .build()
        .expect("idem");

    println!(
        "== PostgreSQL: idem against the raw statements it issues ({ROUNDS} alternating rounds of {ROUND:?})"
    );
    for tasks in [1usize, 16, 64] {
        let (mut raw, mut ours) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let pool = raw_pool.clone();
            raw.push(
                rate(tasks, ROUND, move |n| {
                    let pool = pool.clone();
                    async move { raw_first(&pool, &format!("r{tasks}-{round}-{n}")).await }
                })
                .await,
            );
            let i = idem.clone();
            ours.push(
                rate(tasks, ROUND, move |n| {
                    let i = i.clone();
                    async move {
                        first(&i, format!("i{tasks}-{round}-{n}"))
                            .await
                            .expect("first");
                    }
                })
                .await,
            );
        }
        let (raw, ours) = (median(raw), median(ours));
        println!(
            "first executions, {tasks:>2} tasks: idem {ours:>8.0}/s, raw {raw:>8.0}/s = {:.2} of raw (target >= 0.90)",
            ours / raw
        );
    }

    // Replays from the store: 1,000 completed records, read back at random.
    for k in 0..1_000u64 {
        replayed(&idem, format!("k{k}")).await.expect("seed");
        sqlx::query(
            "INSERT INTO bench_raw (namespace, key, state, fence, owner, attempts, result, codec,
                created_at, completed_at, expires_at)
             VALUES ($1, $2, 'completed', 1, 'bench', 1, $3, 'json', now(), now(), now() + interval '1 day')",
        )
        .bind(b"bench.replay/v0".as_slice())
        .bind(format!("k{k}").as_bytes())
        .bind(b"42".as_slice())
        .execute(&raw_pool)
        .await
        .expect("seed raw");
    }
    for tasks in [1usize, 16] {
        let (mut raw, mut ours) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let pool = raw_pool.clone();
            raw.push(
                rate(tasks, ROUND, move |n| {
                    let pool = pool.clone();
                    async move { raw_select(&pool, &format!("k{}", n % 1_000)).await }
                })
                .await,
            );
            let i = idem.clone();
            ours.push(
                rate(tasks, ROUND, move |n| {
                    let i = i.clone();
                    async move {
                        replayed(&i, format!("k{}", n % 1_000))
                            .await
                            .expect("replay");
                    }
                })
                .await,
            );
        }
        let (raw, ours) = (median(raw), median(ours));
        println!(
            "replays from the store (cache off), {tasks:>2} tasks: idem {ours:>8.0}/s, raw SELECT {raw:>8.0}/s = {:.2} of raw",
            ours / raw
        );
    }

    for t in [table.as_str(), "bench_raw"] {
        let sql = sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {t}"));
        sqlx::raw_sql(sql)
            .execute(&raw_pool)
            .await
            .expect("cleanup");
    }
}
