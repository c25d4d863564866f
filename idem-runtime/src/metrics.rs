//! The `metrics` an operator alerts on, in one place with their names.
//!
//! | name | kind | labels | meaning |
//! | --- | --- | --- | --- |
//! | `idem_calls_total` | counter | `function`, `outcome` | calls by how they were answered: `executed`, `took_over`, `replayed`, `waited`, `unprotected` |
//! | `idem_errors_total` | counter | `function`, `kind` | calls that ended in an idem error: `in_progress`, `payload_mismatch`, `store_unavailable`, `lease_lost`, ... |
//! | `idem_takeovers_total` | counter | `function` | reservations taken over after their lease ran out (a replica died mid-body) |
//! | `idem_leases_lost_total` | counter | `function` | bodies whose reservation was taken over while they ran (their result is not the recorded one) |
//! | `idem_results_not_stored_total` | counter | `function`, `reason` | results not recorded: `too_large`, `encode` (returned anyway), `store` (recording gave up), `lease_lost` (another owner's is recorded) |
//! | `idem_store_seconds` | histogram | `backend`, `op` | latency of each store statement (a batch's, under group commit) |
//! | `idem_store_batch_size` | histogram | `backend`, `op` | calls carried by each batch (group commit) |
//! | `idem_store_batches_split_total` | counter | `backend` | batches that failed on one statement (a refused row, a lost deadlock) and were run again row by row |
//! | `idem_stored_bytes` | histogram | `function` | size of stored results |
//! | `idem_purged_records_total` | counter | `backend` | expired records deleted |
//!
//! Nothing is recorded unless the application installs a `metrics` recorder (for example a
//! Prometheus exporter).

use std::future::Future;
use std::time::Instant;

use metrics::{Key, Label, Metadata};

use crate::outcome::Outcome;

/// The labels of `idem_calls_total` for one fn, built once per fn so that counting a call
/// (the hot path: every replay) allocates nothing.
pub(crate) struct CallLabels {
    by_outcome: [&'static [Label; 2]; 5],
}

/// Every outcome, in the order of [`slot`].
const OUTCOMES: [Outcome; 5] = [
    Outcome::Executed,
    Outcome::TookOver,
    Outcome::Replayed,
    Outcome::Waited,
    Outcome::Unprotected,
];

/// An outcome's place in [`OUTCOMES`]. Exhaustive, so a new outcome cannot be counted as
/// another one: it fails to compile until it has a slot.
fn slot(outcome: Outcome) -> usize {
    match outcome {
        Outcome::Executed => 0,
        Outcome::TookOver => 1,
        Outcome::Replayed => 2,
        Outcome::Waited => 3,
        Outcome::Unprotected => 4,
    }
}

impl CallLabels {
    pub(crate) fn new(function: &'static str) -> CallLabels {
        // Leaked once per annotated fn (a handful of bytes each, bounded by the program).
        CallLabels {
            by_outcome: OUTCOMES.map(|o| {
                &*Box::leak(Box::new([
                    Label::from_static_parts("function", function),
                    Label::from_static_parts("outcome", o.as_str()),
                ]))
            }),
        }
    }
}

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

pub(crate) fn call(labels: &CallLabels, outcome: Outcome) {
    let key = Key::from_static_parts("idem_calls_total", labels.by_outcome[slot(outcome)]);
    metrics::with_recorder(|r| r.register_counter(&key, &METADATA).increment(1));
}

pub(crate) fn error(function: &'static str, kind: &'static str) {
    metrics::counter!("idem_errors_total", "function" => function, "kind" => kind).increment(1);
}

pub(crate) fn takeover(function: &'static str) {
    metrics::counter!("idem_takeovers_total", "function" => function).increment(1);
}

pub(crate) fn lease_lost(function: &'static str) {
    metrics::counter!("idem_leases_lost_total", "function" => function).increment(1);
}

pub(crate) fn not_stored(function: &'static str, reason: &'static str) {
    metrics::counter!("idem_results_not_stored_total", "function" => function, "reason" => reason)
        .increment(1);
}

pub(crate) fn stored_bytes(function: &'static str, bytes: usize) {
    metrics::histogram!("idem_stored_bytes", "function" => function).record(bytes as f64);
}

pub(crate) fn purged(backend: &'static str, n: u64) {
    metrics::counter!("idem_purged_records_total", "backend" => backend).increment(n);
}

/// One batch of group commit: its size and how long its statement took.
pub(crate) fn batch(
    backend: &'static str,
    op: &'static str,
    rows: usize,
    took: std::time::Duration,
) {
    metrics::histogram!("idem_store_batch_size", "backend" => backend, "op" => op)
        .record(rows as f64);
    metrics::histogram!("idem_store_seconds", "backend" => backend, "op" => op)
        .record(took.as_secs_f64());
}

/// A batch that failed on one of its statements and was run again row by row.
#[cfg(feature = "_sql")]
pub(crate) fn batch_split(backend: &'static str) {
    metrics::counter!("idem_store_batches_split_total", "backend" => backend).increment(1);
}

/// Runs one store statement and records its latency.
pub(crate) async fn timed<T>(
    backend: &'static str,
    op: &'static str,
    fut: impl Future<Output = T>,
) -> T {
    let start = Instant::now();
    let out = fut.await;
    metrics::histogram!("idem_store_seconds", "backend" => backend, "op" => op)
        .record(start.elapsed().as_secs_f64());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_has_its_own_slot() {
        for (i, outcome) in OUTCOMES.into_iter().enumerate() {
            assert_eq!(slot(outcome), i, "{outcome:?}");
        }
    }
}
