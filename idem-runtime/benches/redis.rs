//! idem on the local Redis against the raw commands a hand-written guard would issue, in one
//! run, and against the published figures of the best-known peer.
//!
//! - First executions per second at 1 and 16 concurrent tasks: a fresh key each call,
//!   through `#[idempotent]` (the reserve script, the body, the finalize script) against
//!   `SET key NX PX` then `SET key XX PX` issued by hand on an identical connection.
//! - Replays served from Redis (local cache off) against a raw `GET`.
//!
//! Rounds alternate (raw, idem, raw, idem, ...) so machine noise lands on both; each rate is
//! the median of its rounds, each ratio the median of the ratios of rounds run back to back;
//! every key expires within ten minutes, so an interrupted run leaves nothing for long. `cargo bench -p idem-runtime --bench redis --features redis`
//! (`IDEM_TEST_REDIS_URL` picks the server).

mod common;

use std::time::Duration;

use common::{median, median_ratio, rate};

use idem_runtime::store::{RedisStore, RedisStoreOptions};
use idem_runtime::{Error, Idem, idempotent};
use redis::aio::ConnectionManager;

const ROUND: Duration = Duration::from_secs(1);
const ROUNDS: usize = 11;

/// Powertools for AWS Lambda 3.37 with redis-py against a local Redis, on this machine kind
/// (from the issue): first executions on 1 and 16 threads, replays on 1 thread.
const PEER_FIRST_1: f64 = 2_960.0;
const PEER_FIRST_16: f64 = 2_892.0;
const PEER_REPLAY_1: f64 = 2_303.0;

#[idempotent(key = key, runtime = idem, skip_all, name = "bench.first", ttl = "PT10M")]
async fn first(idem: &Idem, key: String) -> Result<u64, Error> {
    Ok(42)
}

#[idempotent(key = key, runtime = idem, skip_all, name = "bench.replay", ttl = "PT10M")]
async fn replayed(idem: &Idem, key: String) -> Result<u64, Error> {
    Ok(42)
}

/// The unfenced guard: claim the key if absent, then overwrite it with the result.
async fn raw_first(mut conn: ConnectionManager, key: String) {
    let claimed: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg("in_progress")
        .arg("NX")
        .arg("PX")
        .arg(30_000)
        .query_async(&mut conn)
        .await
        .expect("claim");
    assert!(claimed.is_some());
    let done: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg("42")
        .arg("XX")
        .arg("PX")
        .arg(600_000)
        .query_async(&mut conn)
        .await
        .expect("result");
    assert!(done.is_some());
}

async fn raw_get(mut conn: ConnectionManager, key: String) {
    let v: Option<Vec<u8>> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("get");
    assert!(v.is_some());
}

fn main() {
    common::runtime().block_on(run());
}

async fn run() {
    let url =
        std::env::var("IDEM_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("bench-idem-{:08x}", fastrand::u32(..));
    let options = RedisStoreOptions::new().prefix(&prefix);
    let store = match RedisStore::connect_with(&url, options).await {
        Ok(s) => s,
        Err(e) => {
            println!("skipped: Redis not reachable at {url}: {e}");
            return;
        }
    };
    let client = redis::Client::open(url.as_str()).expect("url");
    let config = redis::aio::ConnectionManagerConfig::new().set_response_timeout(None);
    let raw = ConnectionManager::new_with_config(client, config)
        .await
        .expect("raw connection");
    let idem = Idem::builder()
        .store(store)
        .local_cache(0)
        .build()
        .expect("idem");

    println!("== Redis: idem against the raw commands ({ROUNDS} alternating rounds of {ROUND:?})");
    for (tasks, peer) in [(1usize, PEER_FIRST_1), (16, PEER_FIRST_16)] {
        let (mut raws, mut ours) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS {
            let (conn, p) = (raw.clone(), prefix.clone());
            raws.push(
                rate(tasks, ROUND, move |n| {
                    raw_first(conn.clone(), format!("{p}-raw:{tasks}-{round}-{n}"))
                })
                .await,
            );
            let i = idem.clone();
            ours.push(
                rate(tasks, ROUND, move |n| {
                    let i = i.clone();
                    async move {
                        first(&i, format!("{tasks}-{round}-{n}"))
                            .await
                            .expect("first");
                    }
                })
                .await,
            );
        }
        let ratio = median_ratio(&ours, &raws);
        let (raws, ours) = (median(raws), median(ours));
        println!(
            "first executions, {tasks:>2} tasks: idem {ours:>8.0}/s, raw {raws:>8.0}/s = {ratio:.2} of raw; {:.1}x the peer's {peer:.0}/s",
            ours / peer
        );
    }

    // Replays from Redis: 1,000 completed records, read back at random.
    let mut seed = raw.clone();
    for k in 0..1_000u64 {
        replayed(&idem, format!("k{k}")).await.expect("seed");
        let _: () = redis::cmd("SET")
            .arg(format!("{prefix}-raw:k{k}"))
            .arg("42")
            .arg("PX")
            .arg(600_000)
            .query_async(&mut seed)
            .await
            .expect("seed raw");
    }
    for tasks in [1usize, 16] {
        let (mut raws, mut ours) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let (conn, p) = (raw.clone(), prefix.clone());
            raws.push(
                rate(tasks, ROUND, move |n| {
                    raw_get(conn.clone(), format!("{p}-raw:k{}", n % 1_000))
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
        let ratio = median_ratio(&ours, &raws);
        let (raws, ours) = (median(raws), median(ours));
        let peer = if tasks == 1 {
            format!(
                "; {:.1}x the peer's {PEER_REPLAY_1:.0}/s",
                ours / PEER_REPLAY_1
            )
        } else {
            String::new()
        };
        println!(
            "replays from Redis, {tasks:>2} tasks: idem {ours:>8.0}/s, raw GET {raws:>8.0}/s = {ratio:.2} of raw{peer}",
        );
    }

    // Leave nothing behind.
    let mut conn = raw.clone();
    for pattern in [format!("{prefix}:*"), format!("{prefix}-raw:*")] {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut conn)
            .await
            .expect("keys");
        for chunk in keys.chunks(500) {
            let _: i64 = redis::cmd("DEL")
                .arg(chunk)
                .query_async(&mut conn)
                .await
                .expect("del");
        }
    }
}
