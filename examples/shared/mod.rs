//! What the `nats` and `rabbitmq` examples share, so each of them shows only its broker: the
//! message they consume, the two handlers (an order row written exactly once with `tx = ..`;
//! a confirmation email sent through a provider, leased, with a chained key), the database,
//! and the demo's bookkeeping (counts, simulated crashes, and the hang points at which the
//! kill tests SIGKILL a worker).

pub(crate) mod chaos;
pub(crate) mod emails;
pub(crate) mod orders;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use idem_runtime::{Error, Outcome};
use serde::{Deserialize, Serialize};

/// The message both consumers receive: an order was placed. Its body is this, as JSON; its
/// identity (the idempotency key) travels beside it, as the broker's message id.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct OrderPlaced {
    pub(crate) order_ref: u64,
    pub(crate) customer: String,
    pub(crate) sku: String,
    pub(crate) quantity: u32,
}

impl OrderPlaced {
    /// The demo's `n`th order, and the message id its publisher gives it.
    pub(crate) fn numbered(n: u64) -> (String, OrderPlaced) {
        let order = OrderPlaced {
            order_ref: n,
            customer: format!("customer-{}@example.com", n % 17),
            sku: format!("sku-{}", n % 9),
            quantity: 1 + (n % 4) as u32,
        };
        (format!("order-{n}"), order)
    }
}

/// A consumer's error: idem's own, the database's, the email provider's, or a crash the demo
/// simulates inside a body.
#[derive(Debug)]
pub(crate) enum AppError {
    Idem(Error),
    Db(sqlx::Error),
    Provider(std::io::Error),
    Crashed,
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Idem(e)
    }
}

impl From<sqlx::Error> for AppError {
    fn from(e: sqlx::Error) -> Self {
        AppError::Db(e)
    }
}

impl From<std::io::Error> for AppError {
    fn from(e: std::io::Error) -> Self {
        AppError::Provider(e)
    }
}

impl AppError {
    /// Whether the message itself is at fault, so that every redelivery would fail the same
    /// way: terminate (or dead-letter) it instead of sending it back. That is what an HTTP
    /// API would answer with a 4xx: idem's `PayloadMismatch` (its id reused with another
    /// payload: 422) and a key idem refuses (400). The rest (a store or a provider that is
    /// down, a key in progress elsewhere) may pass: redeliver.
    pub(crate) fn is_permanent(&self) -> bool {
        match self {
            AppError::Idem(e) => matches!(e.http_status(), 400 | 422),
            AppError::Db(_) | AppError::Provider(_) | AppError::Crashed => false,
        }
    }

    /// A short name for the counts.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            AppError::Idem(e) => e.kind(),
            AppError::Db(_) => "database",
            AppError::Provider(_) => "provider",
            AppError::Crashed => "crashed",
        }
    }
}

impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppError::Idem(e) => write!(f, "{e}"),
            AppError::Db(e) => write!(f, "database: {e}"),
            AppError::Provider(e) => write!(f, "email provider: {e}"),
            AppError::Crashed => write!(f, "crashed (simulated)"),
        }
    }
}

impl std::error::Error for AppError {}

/// What a handler did with a message.
pub(crate) enum Handled {
    /// Its effect is committed (or was already): ack the message. `answer` is what the
    /// handler returned (the order number, the email id), the same for every delivery.
    Done {
        answer: String,
        outcome: Option<Outcome>,
    },
    /// The demo simulated a crash before the commit (or before the result was recorded):
    /// the consumer drops the message unacked, as a dead process would.
    Crashed,
}

/// The two consumers of the demo: one handler each.
pub(crate) enum Handler {
    /// Writes an order row per message, exactly once (`tx = ..`).
    Orders(Arc<orders::Db>),
    /// Sends a confirmation email per message, at least once, deduplicated by the provider
    /// through a chained key.
    Emails(Arc<emails::Mailer>),
}

impl Handler {
    /// Handles one message whose identity is `key`.
    pub(crate) async fn handle(
        &self,
        key: &str,
        order: &OrderPlaced,
        chaos: &chaos::Chaos,
    ) -> Result<Handled, AppError> {
        match self {
            Handler::Orders(db) => db.place(key, order, chaos).await,
            Handler::Emails(mailer) => emails::confirm(mailer, key, order, chaos).await,
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Handler::Orders(_) => "orders",
            Handler::Emails(_) => "emails",
        }
    }
}

/// The value of `--name value` among the arguments.
pub(crate) fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// A parsed `--name value`, or `default` when absent.
pub(crate) fn flag_or<T: std::str::FromStr>(
    args: &[String],
    name: &str,
    default: T,
) -> Result<T, String> {
    match flag(args, name) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| format!("{name}: cannot parse {v:?}")),
    }
}

/// The errors the examples return: any, from any task.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One line of the demo's counts.
pub(crate) fn line(what: &str, n: impl std::fmt::Display, note: &str) {
    if note.is_empty() {
        println!("{what:<52}{n:>6}");
    } else {
        println!("{what:<52}{n:>6}   ({note})");
    }
}

/// Prints what each consumer counted, and whether every message has exactly one order row
/// and one email, with nothing left unacked.
pub(crate) async fn report(
    db: &orders::Db,
    mailer: &emails::Mailer,
    tallies: &[Arc<chaos::Tally>],
    messages: u64,
    unusable: usize,
    left_unacked: u64,
) -> Result<bool, BoxError> {
    let (rows, distinct) = db.count().await?;
    let (sent, calls) = (mailer.sent()?, mailer.calls()?);
    println!("\norders: an order row per message, #[idempotent(tx = tx)], ack after commit");
    tallies[0].print(orders::BODIES.load(Relaxed));
    line(
        "  rows in the orders table",
        rows,
        &format!("{distinct} distinct messages"),
    );
    println!(
        "\nemails: a confirmation email per message, leased, provider key `<key>:confirmation`"
    );
    tallies[1].print(emails::BODIES.load(Relaxed));
    line("  calls to the provider", calls, "");
    line(
        "  emails the provider sent",
        sent,
        &format!("{} second sends dropped by their key", calls - sent),
    );
    line("\nmessages left unacked in the broker", left_unacked, "");
    let terminated = |t: &chaos::Tally| t.terminated.load(Relaxed);
    let want = messages as i64;
    Ok(rows == want
        && distinct == want
        && sent as i64 == want
        && left_unacked == 0
        && tallies.iter().all(|t| terminated(t) == unusable))
}

/// The demo's exit: an error unless every message was handled exactly once.
pub(crate) fn verdict(report: Result<bool, BoxError>) -> Result<(), BoxError> {
    if report? {
        println!(
            "\none order row and one email per message, the unusable messages terminated, nothing left unacked."
        );
        Ok(())
    } else {
        Err("the orders table or the outbox does not hold one entry per message, or an unusable message was not terminated exactly once".into())
    }
}

/// A kill-test worker's handler and faults, from `--role orders|emails --store URL --table T
/// [--outbox DIR] [--hang POINT:N] [--seed N] [--redeliver-rate R] [--lease-ms MS]
/// [--idle-ms MS]`, and how long it waits for a message before it stops.
pub(crate) async fn worker(
    args: &[String],
    idle_ms: u64,
) -> Result<(Arc<Handler>, chaos::Chaos, std::time::Duration), BoxError> {
    let need = |name: &str| flag(args, name).ok_or_else(|| format!("worker: {name} is required"));
    let lease = std::time::Duration::from_millis(flag_or(args, "--lease-ms", 1_000)?);
    let db = orders::Db::connect(&need("--store")?, &need("--table")?, lease).await?;
    let handler = match need("--role")?.as_str() {
        "orders" => Handler::Orders(Arc::new(db)),
        "emails" => Handler::Emails(Arc::new(emails::Mailer::new(need("--outbox")?)?)),
        other => return Err(format!("--role {other:?}: expected orders or emails").into()),
    };
    let hang = flag(args, "--hang")
        .map(|h| chaos::Chaos::parse_hang(&h))
        .transpose()?;
    let chaos = chaos::Chaos::new(
        flag_or(args, "--seed", 1)?,
        0.0,
        flag_or(args, "--redeliver-rate", 0.0)?,
        hang,
        Arc::new(chaos::Tally::for_worker()),
    );
    let idle = std::time::Duration::from_millis(flag_or(args, "--idle-ms", idle_ms)?);
    Ok((Arc::new(handler), chaos, idle))
}
