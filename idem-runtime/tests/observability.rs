//! What an operator sees: `metrics` counters and histograms, and the `tracing` span of each
//! call with its outcome, and never a raw key. One test per process-global recorder, so this
//! file holds one test.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_runtime::store::{Claim, Fence, MemoryStore, Store};
use idem_runtime::{Error, Idem, idempotent};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tracing::span;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

#[idempotent(key = key, runtime = idem, skip(runs), name = "ops.charge")]
async fn charge(idem: &Idem, runs: &AtomicUsize, key: &str, cents: u64) -> Result<u64, Error> {
    runs.fetch_add(1, SeqCst);
    Ok(cents)
}

/// A metric's name, labels and value, as the test reads them.
type Metric = (String, Vec<(String, String)>, DebugValue);

/// Records every field value of `idempotent` spans, by span.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<HashMap<String, String>>>>);

struct Fields<'a>(&'a mut HashMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

struct Index(usize);

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Spans {
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != "idempotent" {
            return;
        }
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        let mut all = self.0.lock().unwrap();
        all.push(fields);
        ctx.span(id)
            .unwrap()
            .extensions_mut()
            .insert(Index(all.len() - 1));
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        let span = ctx.span(id).unwrap();
        if let Some(Index(i)) = span.extensions().get::<Index>() {
            values.record(&mut Fields(&mut self.0.lock().unwrap()[*i]));
        }
    }
}

fn counter(snapshot: &[Metric], name: &str, labels: &[(&str, &str)]) -> u64 {
    snapshot
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| match v {
            DebugValue::Counter(c) => *c,
            _ => 0,
        })
        .sum()
}

fn histogram_samples(snapshot: &[Metric], name: &str, labels: &[(&str, &str)]) -> usize {
    snapshot
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| match v {
            DebugValue::Histogram(h) => h.len(),
            _ => 0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_spans_report_every_outcome() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::set_global_recorder(recorder).unwrap();
    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry().with(spans.clone());
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let store = Arc::new(MemoryStore::new());
    let idem = Idem::builder()
        .shared_store(store.clone())
        .default_lease("200ms")
        .build()
        .unwrap();
    let runs = AtomicUsize::new(0);

    charge(&idem, &runs, "card-4242-secret", 100).await.unwrap(); // executed
    charge(&idem, &runs, "card-4242-secret", 100).await.unwrap(); // replayed
    let mismatch = charge(&idem, &runs, "card-4242-secret", 999).await; // payload mismatch
    assert!(matches!(mismatch, Err(Error::PayloadMismatch { .. })));
    // A reservation abandoned by a dead replica, taken over after its lease.
    let id = idem_runtime::RecordId::new("ops.charge/v0", "abandoned");
    let claim = Claim {
        id: &id,
        fence: Fence::random(),
        owner: "dead-replica",
        fingerprint: None,
        lease: Duration::from_millis(50),
    };
    store.reserve(&claim).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    charge(&idem, &runs, "abandoned", 5).await.unwrap(); // took over
    // Something to purge.
    let expired = idem_runtime::RecordId::new("ops.other/v0", "old");
    let claim = Claim {
        id: &expired,
        ..claim
    };
    store.reserve(&claim).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(idem.purge_expired(100).await.unwrap(), 1);

    let snapshot: Vec<Metric> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let labels = key
                .key()
                .labels()
                .map(|l| (l.key().to_string(), l.value().to_string()))
                .collect();
            (key.key().name().to_string(), labels, value)
        })
        .collect();
    let f = ("function", "ops.charge");
    assert_eq!(
        counter(&snapshot, "idem_calls_total", &[f, ("outcome", "executed")]),
        1
    );
    assert_eq!(
        counter(&snapshot, "idem_calls_total", &[f, ("outcome", "replayed")]),
        1
    );
    assert_eq!(
        counter(
            &snapshot,
            "idem_calls_total",
            &[f, ("outcome", "took_over")]
        ),
        1
    );
    assert_eq!(
        counter(
            &snapshot,
            "idem_errors_total",
            &[f, ("kind", "payload_mismatch")]
        ),
        1
    );
    assert_eq!(counter(&snapshot, "idem_takeovers_total", &[f]), 1);
    assert_eq!(
        counter(
            &snapshot,
            "idem_purged_records_total",
            &[("backend", "memory")]
        ),
        1
    );
    assert!(histogram_samples(&snapshot, "idem_store_seconds", &[("op", "reserve")]) >= 2);
    assert!(histogram_samples(&snapshot, "idem_store_seconds", &[("op", "take_over")]) >= 1);
    assert!(histogram_samples(&snapshot, "idem_store_seconds", &[("op", "finalize")]) >= 2);
    assert_eq!(histogram_samples(&snapshot, "idem_stored_bytes", &[f]), 2);

    let spans = spans.0.lock().unwrap().clone();
    let outcomes: Vec<&str> = spans
        .iter()
        .filter_map(|s| s.get("outcome").map(String::as_str))
        .collect();
    assert_eq!(outcomes, ["executed", "replayed", "rejected", "took_over"]);
    assert_eq!(
        spans[2].get("error").map(String::as_str),
        Some("payload_mismatch"),
        "a rejection names its reason"
    );
    for s in &spans {
        assert_eq!(s.get("function").map(String::as_str), Some("ops.charge"));
        let key = s.get("key").unwrap();
        assert_eq!(key.len(), 16, "the key appears as a 16-digit hash: {key}");
        assert!(
            s.values().all(|v| !v.contains("4242")),
            "no raw key in spans: {s:?}"
        );
    }
}
