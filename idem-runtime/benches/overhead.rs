//! What idem costs over the floor it wraps, measured in one run and reported as ratios.
//!
//! - `replay`: a call answered from the local (moka) tier, against a bare moka `get` plus the
//!   JSON decode of the same value. Once with the payload check off (`skip_all`), once on.
//! - first execution: a call with a fresh key on the SQLite store (reserve, body, finalize),
//!   against the same two statements issued by hand on an identical database, alternating
//!   call by call (criterion runs one function after the other, which on a shared disk
//!   measures the disk's mood as much as the code).
//!
//! `cargo bench -p idem-runtime --bench overhead`; the ratios are printed at the end.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::Criterion;
use idem_runtime::store::{SqliteStore, SqliteStoreOptions};
use idem_runtime::{Error, Idem, idempotent};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Order {
    order_id: u64,
    customer: String,
    sku: String,
    cents: u64,
    paid: bool,
}

fn order(id: u64) -> Order {
    Order {
        order_id: id,
        customer: "cus_4242424242".into(),
        sku: "sku-tea-green-500g".into(),
        cents: 1_299,
        paid: true,
    }
}

#[derive(Serialize)]
struct Request {
    customer: String,
    sku: String,
    cents: u64,
}

fn request() -> Request {
    Request {
        customer: "cus_4242424242".into(),
        sku: "sku-tea-green-500g".into(),
        cents: 1_299,
    }
}

#[idempotent(key = key, runtime = idem, skip_all)]
async fn unchecked(idem: &Idem, key: &str, req: Request) -> Result<Order, Error> {
    let _ = req;
    Ok(order(1))
}

#[idempotent(key = key, runtime = idem)]
async fn checked(idem: &Idem, key: &str, req: Request) -> Result<Order, Error> {
    let _ = req;
    Ok(order(1))
}

#[idempotent(key = key, runtime = idem, skip_all)]
async fn first(idem: &Idem, key: String) -> Result<Order, Error> {
    Ok(order(2))
}

fn replay(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let idem = Idem::builder()
        .store(idem_runtime::store::MemoryStore::new())
        .build()
        .expect("idem");
    rt.block_on(async {
        unchecked(&idem, "order-123456", request())
            .await
            .expect("warm");
        checked(&idem, "order-123456", request())
            .await
            .expect("warm");
    });
    let floor: moka::sync::Cache<String, Arc<[u8]>> = moka::sync::Cache::new(10_000);
    let bytes: Arc<[u8]> = serde_json::to_vec(&order(1)).expect("encode").into();
    floor.insert("unchecked/v0\u{0}order-123456".to_string(), bytes);
    let floor_key = "unchecked/v0\u{0}order-123456".to_string();

    let mut g = c.benchmark_group("replay");
    // Measured through the same async harness as the idem calls, so both pay for it alike.
    g.bench_function("moka_get_decode", |b| {
        b.to_async(rt).iter(|| async {
            let hit = floor.get(&floor_key).expect("hit");
            let v: Order = serde_json::from_slice(&hit).expect("decode");
            v
        })
    });
    g.bench_function("idem_unchecked", |b| {
        b.to_async(rt).iter(|| async {
            unchecked(&idem, "order-123456", request())
                .await
                .expect("replay")
        })
    });
    g.bench_function("idem_checked", |b| {
        b.to_async(rt).iter(|| async {
            checked(&idem, "order-123456", request())
                .await
                .expect("replay")
        })
    });
    g.finish();
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The two statements a first execution wraps, issued by hand: insert-if-absent, then the
/// fenced update that stores the result. Same SQL and binds as the SQLite store.
async fn raw_first_execution(pool: &sqlx::SqlitePool, key: &str, result: &[u8]) {
    let now = now_ms();
    let fence = fastrand::i64(..);
    let reserved = sqlx::query(
        "INSERT INTO idem_records (namespace, key, state, fingerprint, fence, owner,
            lease_expires_at, heartbeat_at, attempts, created_at, expires_at)
         VALUES (?1, ?2, 'in_progress', ?3, ?4, ?5, ?6 + ?7, ?6, 1, ?6, ?6 + ?7)
         ON CONFLICT (namespace, key) DO NOTHING",
    )
    .bind(b"overhead::first/v0".as_slice())
    .bind(key.as_bytes())
    .bind(None::<Vec<u8>>)
    .bind(fence)
    .bind("bench-host-1")
    .bind(now)
    .bind(30_000i64)
    .execute(pool)
    .await
    .expect("reserve");
    assert_eq!(reserved.rows_affected(), 1);
    let now = now_ms();
    sqlx::query(
        "UPDATE idem_records SET state = 'completed', result = ?3, codec = ?4, completed_at = ?5,
            expires_at = ?5 + ?6, lease_expires_at = NULL
         WHERE namespace = ?1 AND key = ?2 AND fence = ?7 AND state = 'in_progress'",
    )
    .bind(b"overhead::first/v0".as_slice())
    .bind(key.as_bytes())
    .bind(result)
    .bind("json")
    .bind(now)
    .bind(86_400_000i64)
    .bind(fence)
    .execute(pool)
    .await
    .expect("finalize");
}

/// First executions on SQLite: idem against the raw statements, each on its own fresh
/// database file with the same options, alternating call by call so that disk and machine
/// noise land on both alike. Returns the two medians.
fn first_execution(
    rt: &tokio::runtime::Runtime,
    durable: bool,
    rounds: usize,
) -> (Duration, Duration) {
    let dir = tempfile::tempdir().expect("temp dir");
    rt.block_on(async {
        let open = |name: &str| {
            let options = SqliteStoreOptions::new().durable(durable);
            SqliteStore::open_with(dir.path().join(name), options)
        };
        let raw = open("raw.db").await.expect("sqlite");
        let idem = Idem::builder()
            .store(open("idem.db").await.expect("sqlite"))
            .build()
            .expect("idem");
        let result = serde_json::to_vec(&order(2)).expect("encode");
        let (mut raw_times, mut idem_times) = (Vec::new(), Vec::new());
        for i in 0..rounds + 50 {
            let key = format!("order-{i:08}");
            let time_raw = || async {
                let start = Instant::now();
                raw_first_execution(raw.pool(), &key, &result).await;
                start.elapsed()
            };
            let time_idem = || async {
                let start = Instant::now();
                first(&idem, key.clone()).await.expect("first execution");
                start.elapsed()
            };
            let (r, d) = if i % 2 == 0 {
                let r = time_raw().await;
                (r, time_idem().await)
            } else {
                let d = time_idem().await;
                (time_raw().await, d)
            };
            if i >= 50 {
                raw_times.push(r);
                idem_times.push(d);
            }
        }
        (median(&mut raw_times), median(&mut idem_times))
    })
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn estimate(dir: &std::path::Path, group: &str, id: &str) -> Option<f64> {
    let path = dir.join(group).join(id).join("new").join("estimates.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    json["median"]["point_estimate"].as_f64()
}

fn report(dir: &std::path::Path, first: &[(&str, (Duration, Duration))]) {
    println!("\n== idem overhead (median per call, ratio to the floor measured in this run)");
    let rows = [
        (
            "replay",
            "moka_get_decode",
            "idem_unchecked",
            "replay from moka, payload check off",
            2.0,
        ),
        (
            "replay",
            "moka_get_decode",
            "idem_checked",
            "replay from moka, payload check on",
            f64::NAN,
        ),
    ];
    for (group, floor, ours, what, target) in rows {
        match (estimate(dir, group, floor), estimate(dir, group, ours)) {
            (Some(f), Some(o)) => {
                let target = if target.is_nan() {
                    String::new()
                } else {
                    format!("  (target <= {target}x)")
                };
                println!(
                    "{what:<48} {:>10.0} ns vs floor {:>10.0} ns = {:.2}x{target}",
                    o,
                    f,
                    o / f
                );
            }
            _ => println!("{what:<48} (not measured in this run)"),
        }
    }
    for (what, (raw, idem)) in first {
        println!(
            "{what:<48} {:>10.0} ns vs floor {:>10.0} ns = {:.2}x  (target <= 1.2x)",
            idem.as_nanos() as f64,
            raw.as_nanos() as f64,
            idem.as_secs_f64() / raw.as_secs_f64()
        );
    }
}

fn main() {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("criterion");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut c = Criterion::default()
        .output_directory(&dir)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    replay(&mut c, &rt);
    c.final_summary();
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let first = if filter
        .iter()
        .all(|f| "first_execution".contains(f.as_str()))
    {
        println!("first executions: 1,000 alternating pairs per durability setting...");
        vec![
            (
                "first execution, SQLite (synchronous=FULL)",
                first_execution(&rt, true, 1_000),
            ),
            (
                "first execution, SQLite (synchronous=NORMAL)",
                first_execution(&rt, false, 1_000),
            ),
        ]
    } else {
        Vec::new()
    };
    report(&dir, &first);
}
