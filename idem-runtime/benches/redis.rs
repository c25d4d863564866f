//! idem on the local Redis against the raw commands a hand-written guard would issue, and
//! against the best-known peer (Powertools for AWS Lambda on redis-py), in one run.
//!
//! - First executions per second at 1 and 16 concurrent tasks: a fresh key each call,
//!   through `#[idempotent]` (the reserve script, the body, the finalize script) against
//!   `SET key NX PX` then `SET key XX PX` issued by hand on an identical connection.
//! - Replays served from Redis (local cache off) against a raw `GET`.
//!
//! Rounds alternate (raw, idem, peer, raw, idem, peer, ...) so machine noise lands on all;
//! each rate is the median of its rounds, each ratio the median of the ratios of rounds run
//! back to back; every key expires within eleven minutes, so an interrupted run leaves nothing
//! for long. `cargo bench -p idem-runtime --bench redis --features redis`
//! (`IDEM_TEST_REDIS_URL` picks the server). The peer runs only where
//! `IDEM_BENCH_PEER_PYTHON` names a Python that has it (`scripts/peer-venv.sh` makes one);
//! without it idem is compared with the peer's figures from the issue instead.

mod common;

use std::time::Duration;

use common::{median, median_ratio, rate};

use idem_runtime::store::{RedisStore, RedisStoreOptions};
use idem_runtime::{Error, Idem, idempotent};
use redis::aio::ConnectionManager;

const ROUND: Duration = Duration::from_secs(1);
const ROUNDS: usize = 11;

/// Powertools for AWS Lambda 3.37 with redis-py against a local Redis, on this machine kind
/// (from the issue): first executions on 1 and 16 threads, replays on 1 thread. Used when the
/// peer cannot run here.
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

/// The peer's calls per second over one round of `case` (`first1`, `first16`, `replay1`), or
/// `None` where no Python with it is configured.
async fn peer(case: &'static str, prefix: String) -> Option<f64> {
    let python = peer_python()?;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/peer/powertools_redis.py"
    );
    let seconds = ROUND.as_secs_f64().to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .args([script, case, &seconds, &prefix])
            .output()
    })
    .await
    .expect("peer task")
    .expect("the peer's Python (IDEM_BENCH_PEER_PYTHON) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    match text.trim().parse() {
        Ok(rate) if out.status.success() => Some(rate),
        _ => panic!(
            "the peer failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The Python that runs the peer: `IDEM_BENCH_PEER_PYTHON`, unless unset or empty (what
/// `$(scripts/peer-venv.sh)` gives when that script failed).
fn peer_python() -> Option<String> {
    std::env::var("IDEM_BENCH_PEER_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
}

/// How idem compares with the peer: the median of back-to-back ratios where it ran, else
/// against its published figure.
fn against_peer(ours: &[f64], peers: &[f64], published: f64) -> String {
    if peers.is_empty() {
        return format!(
            "{:.1}x the peer's published {published:.0}/s",
            median(ours.to_vec()) / published
        );
    }
    format!(
        "{:.1}x the peer's {:.0}/s in this run",
        median_ratio(ours, peers),
        median(peers.to_vec())
    )
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

    println!(
        "== Redis: idem against the raw commands and the peer ({ROUNDS} alternating rounds of {ROUND:?})"
    );
    if peer_python().is_none() {
        println!(
            "(the peer does not run: IDEM_BENCH_PEER_PYTHON=$(scripts/peer-venv.sh) runs it in the same rounds)"
        );
    }
    for (tasks, case, published) in [
        (1usize, "first1", PEER_FIRST_1),
        (16, "first16", PEER_FIRST_16),
    ] {
        let (mut raws, mut ours, mut peers) = (Vec::new(), Vec::new(), Vec::new());
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
            peers.extend(peer(case, format!("{prefix}-peer")).await);
        }
        let ratio = median_ratio(&ours, &raws);
        let peer = against_peer(&ours, &peers, published);
        let (raws, ours) = (median(raws), median(ours));
        println!(
            "first executions, {tasks:>2} tasks: idem {ours:>8.0}/s, raw {raws:>8.0}/s = {ratio:.2} of raw; {peer}"
        );
    }

    // Replays from Redis: 1,000 completed records, read back in turn.
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
        let (mut raws, mut ours, mut peers) = (Vec::new(), Vec::new(), Vec::new());
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
            if tasks == 1 {
                peers.extend(peer("replay1", format!("{prefix}-peer")).await);
            }
        }
        let ratio = median_ratio(&ours, &raws);
        let peer = if tasks == 1 {
            format!("; {}", against_peer(&ours, &peers, PEER_REPLAY_1))
        } else {
            String::new()
        };
        let (raws, ours) = (median(raws), median(ours));
        println!(
            "replays from Redis, {tasks:>2} tasks: idem {ours:>8.0}/s, raw GET {raws:>8.0}/s = {ratio:.2} of raw{peer}",
        );
    }

    // Leave nothing behind.
    let mut conn = raw.clone();
    for pattern in [
        format!("{prefix}:*"),
        format!("{prefix}-raw:*"),
        format!("{prefix}-peer*"),
    ] {
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
