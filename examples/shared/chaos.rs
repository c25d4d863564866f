//! The demo's bookkeeping: what each consumer counted, the crashes it simulates, and, for the
//! kill tests, the point at which a worker process stops so that the test can SIGKILL it there.

use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use idem_runtime::Outcome;

/// Where a consumer can die while it handles a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Before {
    /// The order row and idem's record are written in the transaction, not committed.
    Commit,
    /// The email went out; idem has not recorded the result (leased mode).
    Record,
    /// Committed (or recorded), not acked.
    Ack,
}

impl Before {
    pub(crate) fn parse(s: &str) -> Option<Before> {
        match s {
            "before-commit" => Some(Before::Commit),
            "before-record" => Some(Before::Record),
            "before-ack" => Some(Before::Ack),
            _ => None,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Before::Commit => "before-commit",
            Before::Record => "before-record",
            Before::Ack => "before-ack",
        }
    }
}

/// What one consumer (all its tasks) counted.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) deliveries: AtomicUsize,
    pub(crate) redeliveries: AtomicUsize,
    pub(crate) crashes_before_commit: AtomicUsize,
    pub(crate) crashes_before_record: AtomicUsize,
    pub(crate) crashes_before_ack: AtomicUsize,
    /// Committed messages sent back on purpose: nacked, ack withheld, channel closed.
    pub(crate) forced_redeliveries: AtomicUsize,
    pub(crate) replays: AtomicUsize,
    /// Messages terminated (JetStream) or rejected without requeue (AMQP): no id, not an
    /// order, or refused by idem (`PayloadMismatch`).
    pub(crate) terminated: AtomicUsize,
    /// Worker mode: print one line per event for the kill tests to read.
    pub(crate) lines: bool,
}

impl Tally {
    pub(crate) fn for_worker() -> Tally {
        Tally {
            lines: true,
            ..Tally::default()
        }
    }

    /// A delivery of the message `key` arrived.
    pub(crate) fn got(&self, key: &str, redelivered: bool) {
        self.deliveries.fetch_add(1, Relaxed);
        if redelivered {
            self.redeliveries.fetch_add(1, Relaxed);
        }
        self.line(format_args!("GOT {key} {}", u8::from(redelivered)));
    }

    /// The message `key` is handled: its effect committed with this answer.
    pub(crate) fn done(&self, key: &str, answer: &str, outcome: Option<Outcome>) {
        if outcome.is_some_and(Outcome::is_replay) {
            self.replays.fetch_add(1, Relaxed);
        }
        let how = outcome.map_or("-", Outcome::as_str);
        self.line(format_args!("DONE {key} {answer} {how}"));
    }

    /// The message `key` (`-` without one) cannot be used, for `reason`: it is terminated.
    pub(crate) fn terminated(&self, key: &str, reason: &str) {
        self.terminated.fetch_add(1, Relaxed);
        self.line(format_args!("TERM {key} {reason}"));
    }

    /// Handling the message `key` failed in a way that may pass (`kind`): it goes back to
    /// the broker.
    pub(crate) fn failed(&self, key: &str, kind: &str) {
        self.line(format_args!("ERR {key} {kind}"));
    }

    fn line(&self, line: std::fmt::Arguments<'_>) {
        if self.lines {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }

    /// Prints the counts, one line each (crashes only where there were some).
    pub(crate) fn print(&self, bodies: usize) {
        let n = |c: &AtomicUsize| c.load(Relaxed);
        super::line("  deliveries", n(&self.deliveries), "");
        super::line("  redeliveries", n(&self.redeliveries), "");
        let crashes = [
            (
                &self.crashes_before_commit,
                "  crashes before the commit",
                "row and record rolled back together",
            ),
            (
                &self.crashes_before_record,
                "  crashes between the send and its record",
                "the body ran again",
            ),
            (
                &self.crashes_before_ack,
                "  crashes after storing the result, before the ack",
                "redelivered, then replayed",
            ),
        ];
        for (count, what, then) in crashes {
            if n(count) > 0 {
                super::line(what, n(count), then);
            }
        }
        super::line(
            "  committed messages nacked or never acked",
            n(&self.forced_redeliveries),
            "redelivered, then replayed",
        );
        super::line("  deliveries answered by a replay", n(&self.replays), "");
        super::line(
            "  unusable messages terminated",
            n(&self.terminated),
            "not redelivered",
        );
        super::line("  bodies run", bodies, "");
    }
}

/// One consumer task's faults: simulated crashes and forced redeliveries (the demo), or the
/// one point where it stops for good (a kill-test worker).
pub(crate) struct Chaos {
    rng: Mutex<fastrand::Rng>,
    /// The share of messages at each point where the demo simulates a crash.
    crash_rate: f64,
    /// The share of committed messages sent back to the broker instead of acked.
    redeliver_rate: f64,
    /// Stop forever at this point of the n-th message handled (1-based), or of the first
    /// message after it that reaches the point.
    hang: Option<(Before, u64)>,
    handled: AtomicU64,
    pub(crate) tally: std::sync::Arc<Tally>,
}

impl Chaos {
    pub(crate) fn new(
        seed: u64,
        crash_rate: f64,
        redeliver_rate: f64,
        hang: Option<(Before, u64)>,
        tally: std::sync::Arc<Tally>,
    ) -> Chaos {
        Chaos {
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            crash_rate,
            redeliver_rate,
            hang,
            handled: AtomicU64::new(0),
            tally,
        }
    }

    /// `--hang before-commit:3`: stop before the commit of the third message handled.
    pub(crate) fn parse_hang(spec: &str) -> Result<(Before, u64), String> {
        let bad =
            || format!("--hang {spec:?}: expected <before-commit|before-record|before-ack>:<n>");
        let (point, n) = spec.split_once(':').ok_or_else(bad)?;
        Ok((
            Before::parse(point).ok_or_else(bad)?,
            n.parse().map_err(|_| bad())?,
        ))
    }

    /// A message starts being handled (after its key and body were read).
    pub(crate) fn start(&self, key: &str, redelivered: bool) {
        self.handled.fetch_add(1, Relaxed);
        self.tally.got(key, redelivered);
    }

    fn roll(&self, rate: f64) -> bool {
        rate > 0.0 && self.rng.lock().map(|mut r| r.f64() < rate).unwrap_or(false)
    }

    /// Whether the consumer dies at `point` of the current message `key`. In the demo that is
    /// a coin toss, and the caller drops what it holds, as a dead process would. A kill-test
    /// worker that reaches its hang point (on its n-th message or, if that one does not pass
    /// there, a replay say, the first after it that does) prints `HANG` and never returns:
    /// the test kills it.
    pub(crate) async fn crash(&self, point: Before, key: &str) -> bool {
        if self
            .hang
            .is_some_and(|(p, n)| p == point && self.handled.load(Relaxed) >= n)
        {
            print_hang(key, point);
            std::future::pending::<()>().await;
        }
        let crashed = self.roll(self.crash_rate);
        if crashed {
            let counter = match point {
                Before::Commit => &self.tally.crashes_before_commit,
                Before::Record => &self.tally.crashes_before_record,
                Before::Ack => &self.tally.crashes_before_ack,
            };
            counter.fetch_add(1, Relaxed);
        }
        crashed
    }

    /// Whether to send this committed message back to the broker instead of acking it.
    pub(crate) fn redeliver(&self) -> bool {
        let again = self.roll(self.redeliver_rate);
        if again {
            self.tally.forced_redeliveries.fetch_add(1, Relaxed);
        }
        again
    }

    /// A second coin, for the broker to pick how it sends a message back.
    pub(crate) fn coin(&self) -> bool {
        self.rng.lock().map(|mut r| r.bool()).unwrap_or(true)
    }
}

/// Tells the kill test where this worker stopped (only kill-test workers have hang points).
fn print_hang(key: &str, point: Before) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "HANG {key} {}", point.as_str());
    let _ = out.flush();
}
