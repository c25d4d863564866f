//! The off switch: `IDEM_DISABLED` and `IdemBuilder::disabled` run bodies unprotected, counted
//! and traced as `unprotected`, with one warning at startup. The environment and the metrics
//! recorder are process-wide, so this file holds one test, in the order it sets them.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::routing::post;
use idem_runtime::http::IdempotencyLayer;
use idem_runtime::store::MemoryStore;
use idem_runtime::{DISABLED_ENV_VAR, Error, Idem, Outcome, idempotent, observe};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tracing::span;
use tracing_subscriber::layer::{Context, SubscriberExt};

#[idempotent(key = key, runtime = idem, skip(runs), name = "off.charge")]
async fn charge(idem: &Idem, runs: &AtomicUsize, key: &str) -> Result<usize, Error> {
    Ok(runs.fetch_add(1, SeqCst) + 1)
}

/// The `outcome` of every `idempotent` span, and every warning's message.
#[derive(Clone, Default)]
struct Seen {
    outcomes: Arc<Mutex<Vec<String>>>,
    warnings: Arc<Mutex<Vec<String>>>,
}

struct Field<'a>(&'static str, &'a mut Option<String>);

impl tracing::field::Visit for Field<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == self.0 {
            *self.1 = Some(format!("{value:?}"));
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == self.0 {
            *self.1 = Some(value.to_string());
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Seen {
    fn on_new_span(&self, attrs: &span::Attributes<'_>, _: &span::Id, _: Context<'_, S>) {
        let mut outcome = None;
        attrs.record(&mut Field("outcome", &mut outcome));
        if attrs.metadata().name() == "idempotent"
            && let Some(outcome) = outcome
        {
            self.outcomes.lock().unwrap().push(outcome);
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if *event.metadata().level() == tracing::Level::WARN {
            let mut message = None;
            event.record(&mut Field("message", &mut message));
            self.warnings.lock().unwrap().extend(message);
        }
    }
}

fn unprotected_calls(snapshotter: &Snapshotter) -> u64 {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, _, _, _)| {
            let key = key.key();
            key.name() == "idem_calls_total"
                && key
                    .labels()
                    .any(|l| l.key() == "outcome" && l.value() == "unprotected")
        })
        .map(|(_, _, _, v)| match v {
            DebugValue::Counter(c) => c,
            _ => 0,
        })
        .sum()
}

fn builder() -> idem_runtime::IdemBuilder {
    Idem::builder()
        .store(MemoryStore::new())
        .allow_disabled_in_release(true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switched_off_runtime_runs_bodies_unprotected() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::set_global_recorder(recorder).unwrap();
    let seen = Seen::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(seen.clone()))
        .unwrap();
    // `allow_disabled_in_release` below keeps this test true in a release build too (what a
    // release build does without it is `switch.rs`'s unit tests, which pass the build kind in).

    // Off by default: duplicates replay.
    let on = builder().build().unwrap();
    assert!(!on.is_disabled());
    let runs = AtomicUsize::new(0);
    charge(&on, &runs, "k").await.unwrap();
    let (again, how) = observe(charge(&on, &runs, "k")).await;
    assert_eq!((again.unwrap(), how), (1, Some(Outcome::Replayed)));
    assert!(seen.warnings.lock().unwrap().is_empty());

    // The builder setting: every call runs its body, counted and traced as unprotected.
    let off = builder().disabled(true).build().unwrap();
    assert!(off.is_disabled());
    let warnings = seen.warnings.lock().unwrap().clone();
    assert_eq!(warnings.len(), 1, "one warning at startup: {warnings:?}");
    assert!(warnings[0].contains("DISABLED"), "{warnings:?}");
    let runs = AtomicUsize::new(0);
    let before = unprotected_calls(&snapshotter);
    for expected in 1..=3 {
        let (out, how) = observe(charge(&off, &runs, "k")).await;
        assert_eq!((out.unwrap(), how), (expected, Some(Outcome::Unprotected)));
    }
    assert_eq!(unprotected_calls(&snapshotter) - before, 3);
    let outcomes = seen.outcomes.lock().unwrap().clone();
    assert_eq!(
        outcomes.iter().filter(|o| *o == "unprotected").count(),
        3,
        "{outcomes:?}"
    );
    assert_eq!(seen.warnings.lock().unwrap().len(), 1, "calls do not warn");

    // The HTTP layer on a switched-off runtime: the route runs for every duplicate and no
    // response says it was replayed.
    let effects = Arc::new(AtomicUsize::new(0));
    let count = effects.clone();
    let app = Router::new()
        .route(
            "/orders",
            post(move || {
                let n = count.fetch_add(1, SeqCst) + 1;
                async move { format!("order {n}") }
            }),
        )
        .layer(IdempotencyLayer::new(off.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::new();
    for n in 1..=2 {
        let resp = http
            .post(format!("http://{addr}/orders"))
            .header("idempotency-key", "same")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert!(resp.headers().get("idempotent-replayed").is_none());
        assert_eq!(resp.text().await.unwrap(), format!("order {n}"));
    }
    assert_eq!(effects.load(SeqCst), 2);

    // The environment variable wins over the builder, both ways, and a typo is refused.
    // SAFETY: this is the only test in this process, and no other thread reads or writes the
    // environment while it runs.
    unsafe { std::env::set_var(DISABLED_ENV_VAR, "true") };
    assert!(builder().disabled(false).build().unwrap().is_disabled());
    unsafe { std::env::set_var(DISABLED_ENV_VAR, "false") };
    assert!(!builder().disabled(true).build().unwrap().is_disabled());
    unsafe { std::env::set_var(DISABLED_ENV_VAR, "sometimes") };
    let msg = builder().build().unwrap_err().to_string();
    assert!(
        msg.contains("IDEM_DISABLED") && msg.contains("sometimes"),
        "{msg}"
    );
    unsafe { std::env::remove_var(DISABLED_ENV_VAR) };

    // The config file's setting.
    let config: idem_runtime::IdemConfig =
        serde_json::from_str(r#"{ "store": "memory:", "disabled": true }"#).unwrap();
    let from_file = config.builder().await.unwrap();
    let from_file = from_file.allow_disabled_in_release(true).build().unwrap();
    assert!(from_file.is_disabled());
}
