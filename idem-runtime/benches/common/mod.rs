//! What the throughput benchmarks share: a timed round of concurrent calls, and medians.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Calls per second of `op` from `tasks` concurrent tasks over one round of `round`. `op`
/// gets a number unique to the call (for fresh keys).
pub(crate) async fn rate<F, Fut>(tasks: usize, round: Duration, op: F) -> f64
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let (op, next) = (op.clone(), next.clone());
        set.spawn(async move {
            let mut n = 0u64;
            while start.elapsed() < round {
                op(next.fetch_add(1, Relaxed)).await;
                n += 1;
            }
            n
        });
    }
    let mut total = 0;
    while let Some(n) = set.join_next().await {
        total += n.expect("task");
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// The median of some rates.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The median over rounds of `ours[i] / base[i]`: each ratio compares two rounds run back to
/// back, so a stretch where the shared machine is slow lands on both sides of it.
#[allow(dead_code)] // not every bench compares pairs of rounds
pub(crate) fn median_ratio(ours: &[f64], base: &[f64]) -> f64 {
    median(ours.iter().zip(base).map(|(o, b)| o / b).collect())
}

/// A multi-threaded runtime with two workers, like the machines these numbers come from.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}
