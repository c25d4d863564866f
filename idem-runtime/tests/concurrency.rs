//! Many concurrent duplicate calls: the body's side effects are counted, never guessed.
//!
//! 1,000 calls over 100 keys (10 per key), spread over four runtimes sharing one store (four
//! "replicas" in one process, each with its own cache and single flight), all started at once.
//! Every key's body must run exactly once and every caller of a key must get the same value.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use idem_runtime::{Error, Idem, Outcome, idempotent, observe};
use support::Backend;
use tokio::sync::Barrier;

#[idempotent(key = order_id, runtime = idem, skip(effects), wait = "PT30S")]
async fn place_order(
    idem: &Idem,
    effects: &AtomicUsize,
    order_id: u32,
    cents: u64,
) -> Result<(u32, usize), Error> {
    // The side effect: a counter stands in for "charge the card".
    let serial = effects.fetch_add(1, SeqCst);
    // Long enough that duplicates arrive while the first is still running.
    tokio::time::sleep(Duration::from_millis(5 + u64::from(order_id % 7))).await;
    Ok((order_id, serial))
}

async fn thousand_calls_hundred_keys(b: Backend) {
    const KEYS: u32 = 100;
    const PER_KEY: u32 = 10;
    let replicas: Vec<Idem> = (0..4)
        .map(|_| {
            Idem::builder()
                .shared_store(b.store.clone())
                .build()
                .expect("idem")
        })
        .collect();
    let effects = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new((KEYS * PER_KEY) as usize));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..KEYS * PER_KEY {
        let key = i % KEYS;
        let idem = replicas[(i as usize / 3) % replicas.len()].clone();
        let (effects, barrier) = (effects.clone(), barrier.clone());
        tasks.spawn(async move {
            barrier.wait().await;
            let (out, how) = observe(place_order(&idem, &effects, key, 100)).await;
            (key, out, how)
        });
    }
    let mut by_key: HashMap<u32, Vec<(u32, usize)>> = HashMap::new();
    let mut outcomes: HashMap<&'static str, usize> = HashMap::new();
    while let Some(joined) = tasks.join_next().await {
        let (key, out, how) = joined.expect("no panic");
        let value = out.unwrap_or_else(|e| panic!("key {key}: {e}"));
        by_key.entry(key).or_default().push(value);
        *outcomes
            .entry(how.map_or("none", Outcome::as_str))
            .or_default() += 1;
    }
    let effects = effects.load(SeqCst);
    println!(
        "{} calls, {} keys, {effects} side effects, outcomes {outcomes:?}",
        KEYS * PER_KEY,
        by_key.len()
    );
    assert_eq!(effects, KEYS as usize, "exactly one side effect per key");
    assert_eq!(by_key.len(), KEYS as usize);
    for (key, values) in &by_key {
        assert_eq!(values.len(), PER_KEY as usize);
        assert!(
            values.iter().all(|v| v == &values[0]),
            "key {key}: callers saw different values {values:?}"
        );
    }
    let executed = outcomes.get("executed").copied().unwrap_or(0);
    assert_eq!(executed, KEYS as usize, "one executed outcome per key");
}

for_each_store!(thousand_calls_hundred_keys);
