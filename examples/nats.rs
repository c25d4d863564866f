//! NATS JetStream consumers made safe to redeliver with idem.
//!
//! ```text
//! cargo run --example nats                       # NATS at 127.0.0.1:4222; idem and the orders on SQLite
//! cargo run --example nats -- --store postgres://postgres@127.0.0.1:5432/test
//! cargo run --example nats -- --nats nats://127.0.0.1:4222 --messages 500
//! ```
//!
//! The demo creates a stream, publishes "order placed" messages to it, each with a
//! `Nats-Msg-Id` (some twice, as a publisher that retries would), and runs two durable pull
//! consumers on it, three tasks each, with a one-second ack wait:
//!
//! - `orders` writes an order row per message through `#[idempotent(tx = tx)]` and acks
//!   after the commit: the row and idem's record commit together, exactly once.
//! - `emails` sends a confirmation email through a provider, in leased mode: at least once,
//!   so the provider gets a key chained from the message's and drops a second send.
//!
//! Both key their calls on the message's `Nats-Msg-Id` (`idem_runtime::broker::nats`). The
//! consumers misbehave on purpose: some crash between the effect and the commit, some
//! between the commit and the ack (JetStream redelivers once the ack wait is over), some nak
//! a committed message or never ack it. Two more messages cannot be used at all (one has no
//! id, one is not an order): they are terminated, not redelivered forever. Then the demo
//! counts what happened, and checks that there is one order row and one email per message.
//!
//! `nats worker ..` consumes in a process of its own, for `tests/queue_consumers.rs`, which
//! SIGKILLs such workers at the points where they print `HANG`.

#[path = "shared/mod.rs"]
mod shared;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, AckKind};
use futures_util::StreamExt;
use idem_runtime::broker;
use shared::chaos::{Before, Chaos, Tally};
use shared::emails::Mailer;
use shared::orders::Db;
use shared::{BoxError, Handled, Handler, OrderPlaced, flag, flag_or};

const DEFAULT_NATS: &str = "nats://127.0.0.1:4222";

/// One consumer task: handles messages from a durable pull consumer until none has come for
/// `idle`.
async fn consume(
    consumer: PullConsumer,
    handler: Arc<Handler>,
    chaos: Chaos,
    idle: Duration,
) -> Result<(), BoxError> {
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(10)
        .messages()
        .await?;
    while let Ok(Some(next)) = tokio::time::timeout(idle, messages.next()).await {
        let msg = match next {
            Ok(msg) => msg,
            Err(e) => {
                eprintln!("nats: {e}"); // the client reconnects; the message comes back
                continue;
            }
        };
        // 1. The key is the message's identity, the same in every redelivery. A message
        //    without one cannot be deduplicated, and a redelivery will not give it one:
        //    terminate it (JetStream never redelivers it; a real consumer also alerts)
        //    rather than apply it unprotected.
        let key = match broker::nats::message_id(&msg) {
            Ok(key) => key,
            Err(e) => {
                eprintln!("{e}");
                chaos.tally.terminated("-", "no-id");
                settle(&msg, AckKind::Term).await;
                continue;
            }
        };
        let order: OrderPlaced = match serde_json::from_slice(&msg.payload) {
            Ok(order) => order,
            Err(e) => {
                eprintln!("message {key}: not an order ({e})");
                chaos.tally.terminated(&key, "not-an-order");
                settle(&msg, AckKind::Term).await;
                continue;
            }
        };
        chaos.start(&key, msg.info().is_ok_and(|i| i.delivered > 1));
        // 2. The effect, committed with its record; or, for a message handled before, the
        //    committed answer replayed.
        match handler.handle(&key, &order, &chaos).await {
            Ok(Handled::Done { answer, outcome }) => chaos.tally.done(&key, &answer, outcome),
            // (The demo's crash: no ack. JetStream redelivers it once the ack wait is over.)
            Ok(Handled::Crashed) => continue,
            Err(e) if e.is_permanent() => {
                // The message itself is wrong (its id reused with another payload, say):
                // every redelivery would fail the same way. Terminate it, and count it.
                eprintln!("message {key}: {e}; terminated");
                chaos.tally.terminated(&key, e.kind());
                settle(&msg, AckKind::Term).await;
                continue;
            }
            Err(e) => {
                // Nothing is committed, and it may work next time (the database was down,
                // another consumer holds the key): let JetStream deliver it again, later.
                eprintln!("message {key}: {e}");
                chaos.tally.failed(&key, e.kind());
                settle(&msg, AckKind::Nak(Some(Duration::from_millis(100)))).await;
                continue;
            }
        }
        // 3. Ack only now. A consumer that dies before this line gets the message again
        //    after the ack wait, and the redelivery is answered by a replay.
        if chaos.crash(Before::Ack, &key).await {
            continue;
        }
        if chaos.redeliver() {
            // (The demo sends some committed messages back: a nak redelivers at once; no ack
            // at all, after the ack wait.)
            if chaos.coin() {
                settle(&msg, AckKind::Nak(None)).await;
            }
            continue;
        }
        settle(&msg, AckKind::Ack).await;
    }
    Ok(())
}

/// Acks, naks or terminates `msg`. A failure is logged, not fatal: a message whose ack was
/// lost is redelivered after the ack wait, and the redelivery is answered by a replay.
async fn settle(msg: &jetstream::Message, kind: AckKind) {
    if let Err(e) = msg.ack_with(kind).await {
        eprintln!("nats: ack: {e}; the message will be redelivered");
    }
}

/// The durable pull consumer `name` on `stream`: explicit acks, redelivered after `ack_wait`.
fn consumer_config(name: &str, ack_wait: Duration) -> pull::Config {
    pull::Config {
        durable_name: Some(name.to_string()),
        ack_policy: AckPolicy::Explicit,
        ack_wait,
        max_ack_pending: 64,
        ..Default::default()
    }
}

async fn connect(url: &str) -> Result<async_nats::Client, BoxError> {
    async_nats::connect(url).await.map_err(|e| {
        format!("NATS at {url}: {e}; start it (scripts/services.sh) or pass --nats URL").into()
    })
}

async fn demo(args: &[String], url: &str) -> Result<(), BoxError> {
    let messages: u64 = flag_or(args, "--messages", 200)?;
    let dir = tempfile::tempdir()?;
    let store = flag(args, "--store")
        .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("demo.db").display()));
    let suffix = format!("{:08x}", fastrand::u32(..));
    let table = format!("idem_nats_demo_{suffix}");
    let stream_name = format!("IDEM_DEMO_{suffix}");
    let subject = format!("idem.demo.{suffix}.orders");
    println!("idem NATS JetStream demo: stream {stream_name} on {url}, store {store}\n");

    let client = connect(url).await?;
    let js = jetstream::new(client.clone());
    js.create_stream(jetstream::stream::Config {
        name: stream_name.clone(),
        subjects: vec![subject.clone()],
        ..Default::default()
    })
    .await?;
    let db = Arc::new(Db::connect(&store, &table, Duration::from_secs(2)).await?);
    let outbox = dir.path().join("outbox");
    let out = run_demo(&js, &stream_name, &subject, messages, &db, &outbox).await;
    let _ = js.delete_stream(&stream_name).await;
    db.drop_tables(&table).await;
    shared::verdict(out)
}

async fn run_demo(
    js: &jetstream::Context,
    stream_name: &str,
    subject: &str,
    messages: u64,
    db: &Arc<Db>,
    outbox: &std::path::Path,
) -> Result<bool, BoxError> {
    // The publisher: each message carries its identity as `Nats-Msg-Id`. One in ten is
    // published twice, as a publisher that timed out would; inside its duplicate window
    // JetStream stores it once.
    let mut rng = fastrand::Rng::with_seed(7);
    let (mut retries, mut dropped) = (0u64, 0u64);
    for n in 1..=messages {
        let (id, order) = OrderPlaced::numbered(n);
        let copies = if rng.f64() < 0.1 { 2 } else { 1 };
        for copy in 0..copies {
            let publish = PublishMessage::build()
                .message_id(&id)
                .payload(serde_json::to_vec(&order)?.into());
            let ack = js.send_publish(subject.to_string(), publish).await?.await?;
            retries += copy;
            dropped += u64::from(ack.duplicate);
        }
    }

    // And two messages no consumer can use: one without an id, one whose body is not an
    // order. The consumers terminate both, and count them.
    let poison = [
        PublishMessage::build().payload(serde_json::to_vec(&OrderPlaced::numbered(0).1)?.into()),
        PublishMessage::build()
            .message_id("poison-1")
            .payload("not json".into()),
    ];
    for publish in poison {
        js.send_publish(subject.to_string(), publish).await?.await?;
    }

    let stream = js.get_stream(stream_name).await?;
    let ack_wait = Duration::from_secs(1);
    let mailer = Arc::new(Mailer::new(outbox)?);
    let orders = Arc::new(Handler::Orders(db.clone()));
    let emails = Arc::new(Handler::Emails(mailer.clone()));
    let mut tasks = tokio::task::JoinSet::new();
    let mut tallies = Vec::new();
    for handler in [&orders, &emails] {
        let consumer: PullConsumer = stream
            .create_consumer(consumer_config(handler.name(), ack_wait))
            .await?;
        let tally = Arc::new(Tally::default());
        for task in 0..3 {
            let seed = rng.u64(..) + task;
            let chaos = Chaos::new(seed, 0.08, 0.08, None, tally.clone());
            let idle = 2 * ack_wait + Duration::from_millis(500);
            tasks.spawn(consume(consumer.clone(), handler.clone(), chaos, idle));
        }
        tallies.push(tally);
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }

    let mut left = 0;
    for name in ["orders", "emails"] {
        let mut consumer: PullConsumer = stream.get_consumer(name).await?;
        let info = consumer.info().await?;
        left += info.num_ack_pending as u64 + info.num_pending;
    }
    let line = shared::line;
    line("messages published (each with a Nats-Msg-Id)", messages, "");
    line("  publisher retries (same Nats-Msg-Id)", retries, "");
    line("  dropped by JetStream as duplicates", dropped, "");
    line("messages no consumer can use (no id; not an order)", 2, "");
    shared::report(db, &mailer, &tallies, messages, 2, left).await
}

/// `nats worker --stream S --consumer C ..` (and the options of `shared::worker`): one
/// consumer task in this process, printing a line per event for `tests/queue_consumers.rs`,
/// and `FINISHED` when it went idle.
async fn worker(args: &[String], url: &str) -> Result<(), BoxError> {
    let need = |name: &str| flag(args, name).ok_or_else(|| format!("worker: {name} is required"));
    let (stream, consumer) = (need("--stream")?, need("--consumer")?);
    let (handler, chaos, idle) = shared::worker(args, 3_000).await?;
    let client = connect(url).await?;
    let js = jetstream::new(client.clone());
    let consumer: PullConsumer = js
        .get_stream(&stream)
        .await?
        .get_consumer(&consumer)
        .await?;
    println!("READY");
    consume(consumer, handler, chaos, idle).await?;
    client.flush().await?; // the last acks reach the server before the process ends
    println!("FINISHED");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url = flag(&args, "--nats").unwrap_or_else(|| DEFAULT_NATS.into());
    if args.first().map(String::as_str) == Some("worker") {
        worker(&args, &url).await
    } else {
        demo(&args, &url).await
    }
}
