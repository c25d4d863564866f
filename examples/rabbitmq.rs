//! RabbitMQ (AMQP 0.9.1) consumers made safe to redeliver with idem.
//!
//! ```text
//! cargo run --example rabbitmq                   # RabbitMQ at 127.0.0.1:5672; idem and the orders on SQLite
//! cargo run --example rabbitmq -- --store postgres://postgres@127.0.0.1:5432/test
//! cargo run --example rabbitmq -- --amqp amqp://guest:guest@127.0.0.1:5672/%2f --messages 500
//! ```
//!
//! The demo declares a fanout exchange with two queues bound to it, publishes "order placed"
//! messages to it, each with a `message_id` (some twice, as a publisher that retries would:
//! RabbitMQ keeps both copies), and runs two consumers, three connections each, at most ten
//! unacked deliveries per channel:
//!
//! - `orders` writes an order row per message through `#[idempotent(tx = tx)]` and acks
//!   after the commit: the row and idem's record commit together, exactly once.
//! - `emails` sends a confirmation email through a provider, in leased mode: at least once,
//!   so the provider gets a key chained from the message's and drops a second send.
//!
//! Both key their calls on the message's `message_id` (`idem_runtime::broker::amqp`). The
//! consumers misbehave on purpose: some crash between the effect and the commit, some
//! between the commit and the ack (their channel closes, and RabbitMQ requeues every unacked
//! delivery on it), some nack a committed message or close their channel instead of acking
//! it. Two more messages cannot be used at all (one has no id, one is not an order): they are
//! rejected without requeue, not redelivered forever. Then the demo counts what happened,
//! and checks that there is one order row and one email per message.
//!
//! `rabbitmq worker ..` consumes in a process of its own, for `tests/queue_consumers.rs`,
//! which SIGKILLs such workers at the points where they print `HANG`.

#[path = "shared/mod.rs"]
mod shared;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use idem_runtime::broker;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use shared::chaos::{Before, Chaos, Tally};
use shared::emails::Mailer;
use shared::orders::Db;
use shared::{BoxError, Handled, Handler, OrderPlaced, flag, flag_or};

const DEFAULT_AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// One consumer: handles deliveries from `queue` until none has come for `idle`.
async fn consume(
    conn: &Connection,
    queue: &str,
    handler: Arc<Handler>,
    chaos: Chaos,
    idle: Duration,
) -> Result<(), BoxError> {
    'channel: loop {
        // A channel with at most ten unacked deliveries on it at a time (without a prefetch
        // limit RabbitMQ pushes the whole queue to the first consumer).
        let channel = conn.create_channel().await?;
        channel.basic_qos(10, BasicQosOptions::default()).await?;
        let options = BasicConsumeOptions::default(); // no_ack: false, so acks are explicit
        let mut deliveries = channel
            .basic_consume(queue.into(), "".into(), options, FieldTable::default())
            .await?;
        while let Ok(Some(next)) = tokio::time::timeout(idle, deliveries.next()).await {
            let delivery = match next {
                Ok(delivery) => delivery,
                Err(e) => {
                    // The channel failed: its unacked deliveries go back to the queue. Open
                    // another one.
                    eprintln!("amqp: {e}");
                    continue 'channel;
                }
            };
            // 1. The key is the message's identity, the same in every redelivery. A message
            //    without one cannot be deduplicated, and a redelivery will not give it one:
            //    reject it without requeue (to the queue's dead-letter exchange, if it has
            //    one) rather than apply it unprotected.
            let key = match broker::amqp::message_id(&delivery) {
                Ok(key) => key,
                Err(e) => {
                    eprintln!("{e}");
                    chaos.tally.terminated("-", "no-id");
                    settle(&delivery, Settle::Reject).await;
                    continue;
                }
            };
            let order: OrderPlaced = match serde_json::from_slice(&delivery.data) {
                Ok(order) => order,
                Err(e) => {
                    eprintln!("message {key}: not an order ({e})");
                    chaos.tally.terminated(&key, "not-an-order");
                    settle(&delivery, Settle::Reject).await;
                    continue;
                }
            };
            chaos.start(&key, delivery.redelivered);
            // 2. The effect, committed with its record; or, for a message handled before,
            //    the committed answer replayed.
            match handler.handle(&key, &order, &chaos).await {
                Ok(Handled::Done { answer, outcome }) => chaos.tally.done(&key, &answer, outcome),
                Ok(Handled::Crashed) => {
                    // (The demo's crash: the channel goes away with its unacked deliveries,
                    // and RabbitMQ requeues them, as it does for a consumer that died.)
                    let _ = channel.close(200, "crashed".into()).await;
                    continue 'channel;
                }
                Err(e) if e.is_permanent() => {
                    // The message itself is wrong (its id reused with another payload, say):
                    // every redelivery would fail the same way. Reject it, and count it.
                    eprintln!("message {key}: {e}; rejected");
                    chaos.tally.terminated(&key, e.kind());
                    settle(&delivery, Settle::Reject).await;
                    continue;
                }
                Err(e) => {
                    // Nothing is committed, and it may work next time (the database was down,
                    // another consumer holds the key): back to the queue.
                    eprintln!("message {key}: {e}");
                    chaos.tally.failed(&key, e.kind());
                    settle(&delivery, Settle::Requeue).await;
                    continue;
                }
            }
            // 3. Ack only now. A consumer that dies before this line gets its deliveries
            //    requeued, and the redelivery is answered by a replay.
            if chaos.crash(Before::Ack, &key).await {
                let _ = channel.close(200, "crashed".into()).await;
                continue 'channel;
            }
            if chaos.redeliver() {
                // (The demo sends some committed messages back: a nack with requeue, or a
                // channel closed with the delivery unacked.)
                if chaos.coin() {
                    settle(&delivery, Settle::Requeue).await;
                    continue;
                }
                let _ = channel.close(200, "closed".into()).await;
                continue 'channel;
            }
            settle(&delivery, Settle::Ack).await;
        }
        let _ = channel.close(200, "idle".into()).await;
        return Ok(());
    }
}

/// What a consumer does with a delivery once it is handled.
enum Settle {
    Ack,
    /// Back to the queue, to be delivered again.
    Requeue,
    /// Dropped (or dead-lettered): never delivered again.
    Reject,
}

/// Acks, requeues or rejects `delivery`. A failure is logged, not fatal: the channel is gone
/// with its unacked deliveries, which RabbitMQ delivers again, and a redelivery of a handled
/// message is answered by a replay.
async fn settle(delivery: &lapin::message::Delivery, how: Settle) {
    let done = match how {
        Settle::Ack => delivery.ack(BasicAckOptions::default()).await,
        Settle::Requeue => {
            let requeue = BasicNackOptions {
                requeue: true,
                ..Default::default()
            };
            delivery.nack(requeue).await
        }
        Settle::Reject => delivery.reject(BasicRejectOptions { requeue: false }).await,
    };
    if let Err(e) = done {
        eprintln!("amqp: ack: {e}; the message will be redelivered");
    }
}

async fn connect(url: &str) -> Result<Connection, BoxError> {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|e| {
            format!("RabbitMQ at {url}: {e}; start it (scripts/services.sh) or pass --amqp URL")
                .into()
        })
}

/// Declares the fanout exchange `exchange` with the two consumers' queues bound to it.
async fn declare(conn: &Connection, exchange: &str) -> Result<(), BoxError> {
    let channel = conn.create_channel().await?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
    for consumer in ["orders", "emails"] {
        let queue = format!("{exchange}.{consumer}");
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Deletes what `declare` made.
async fn undeclare(conn: &Connection, exchange: &str) -> Result<(), BoxError> {
    let channel = conn.create_channel().await?;
    for consumer in ["orders", "emails"] {
        let queue = format!("{exchange}.{consumer}");
        channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?;
    }
    channel
        .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await?;
    Ok(())
}

async fn demo(args: &[String], url: &str) -> Result<(), BoxError> {
    let messages: u64 = flag_or(args, "--messages", 200)?;
    let dir = tempfile::tempdir()?;
    let store = flag(args, "--store")
        .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("demo.db").display()));
    let suffix = format!("{:08x}", fastrand::u32(..));
    let table = format!("idem_amqp_demo_{suffix}");
    let exchange = format!("idem-demo-{suffix}");
    println!("idem RabbitMQ demo: exchange {exchange} on {url}, store {store}\n");

    let conn = connect(url).await?;
    declare(&conn, &exchange).await?;
    let db = Arc::new(Db::connect(&store, &table, Duration::from_secs(2)).await?);
    let outbox = dir.path().join("outbox");
    let out = run_demo(&conn, url, &exchange, messages, &db, &outbox).await;
    let _ = undeclare(&conn, &exchange).await;
    let _ = conn.close(200, "done".into()).await;
    db.drop_tables(&table).await;
    shared::verdict(out)
}

async fn run_demo(
    conn: &Connection,
    url: &str,
    exchange: &str,
    messages: u64,
    db: &Arc<Db>,
    outbox: &std::path::Path,
) -> Result<bool, BoxError> {
    // The publisher: each message carries its identity as `message_id`, and is persistent.
    // One in ten is published twice, as a publisher that timed out would; RabbitMQ keeps
    // both copies, so the consumers see the second as a new message with a known id.
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut rng = fastrand::Rng::with_seed(7);
    let mut retries = 0u64;
    for n in 1..=messages {
        let (id, order) = OrderPlaced::numbered(n);
        let copies = if rng.f64() < 0.1 { 2 } else { 1 };
        for copy in 0..copies {
            let properties = BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_content_type("application/json".into())
                .with_delivery_mode(2);
            channel
                .basic_publish(
                    exchange.into(),
                    "".into(),
                    BasicPublishOptions::default(),
                    &serde_json::to_vec(&order)?,
                    properties,
                )
                .await?
                .await?; // the broker's confirm: the message is stored
            retries += copy;
        }
    }

    // And two messages no consumer can use: one without an id, one whose body is not an
    // order. The consumers reject both, and count them.
    let poison = [
        (
            BasicProperties::default(),
            serde_json::to_vec(&OrderPlaced::numbered(0).1)?,
        ),
        (
            BasicProperties::default().with_message_id("poison-1".into()),
            b"not json".to_vec(),
        ),
    ];
    for (properties, body) in poison {
        channel
            .basic_publish(
                exchange.into(),
                "".into(),
                BasicPublishOptions::default(),
                &body,
                properties.with_delivery_mode(2),
            )
            .await?
            .await?;
    }

    let mailer = Arc::new(Mailer::new(outbox)?);
    let orders = Arc::new(Handler::Orders(db.clone()));
    let emails = Arc::new(Handler::Emails(mailer.clone()));
    let mut tasks = tokio::task::JoinSet::new();
    let mut tallies = Vec::new();
    for handler in [&orders, &emails] {
        let tally = Arc::new(Tally::default());
        let queue = format!("{exchange}.{}", handler.name());
        for task in 0..3 {
            let chaos = Chaos::new(rng.u64(..) + task, 0.08, 0.08, None, tally.clone());
            let (handler, queue, url) = (handler.clone(), queue.clone(), url.to_string());
            tasks.spawn(async move {
                let conn = connect(&url).await?;
                let out =
                    consume(&conn, &queue, handler, chaos, Duration::from_millis(1_500)).await;
                let _ = conn.close(200, "done".into()).await;
                out
            });
        }
        tallies.push(tally);
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }

    let left = left_in_queues(&channel, exchange).await?;
    let line = shared::line;
    line("messages published (each with a message_id)", messages, "");
    line(
        "  publisher retries (same message_id)",
        retries,
        "RabbitMQ keeps both copies",
    );
    line("messages no consumer can use (no id; not an order)", 2, "");
    shared::report(db, &mailer, &tallies, messages, 2, left).await
}

/// Messages still in the two queues (with no consumer connected, unacked ones are back).
async fn left_in_queues(channel: &lapin::Channel, exchange: &str) -> Result<u64, BoxError> {
    let mut left = 0;
    for consumer in ["orders", "emails"] {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let queue = format!("{exchange}.{consumer}");
        let q = channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await?;
        left += u64::from(q.message_count());
    }
    Ok(left)
}

/// `rabbitmq worker --queue Q ..` (and the options of `shared::worker`): one consumer in this
/// process, printing a line per event for `tests/queue_consumers.rs`, and `FINISHED` when it
/// went idle.
async fn worker(args: &[String], url: &str) -> Result<(), BoxError> {
    let queue = flag(args, "--queue").ok_or("worker: --queue is required")?;
    let (handler, chaos, idle) = shared::worker(args, 1_500).await?;
    let conn = connect(url).await?;
    println!("READY");
    consume(&conn, &queue, handler, chaos, idle).await?;
    conn.close(200, "done".into()).await?; // the last acks reach the broker first
    println!("FINISHED");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url = flag(&args, "--amqp").unwrap_or_else(|| DEFAULT_AMQP.into());
    if args.first().map(String::as_str) == Some("worker") {
        worker(&args, &url).await
    } else {
        demo(&args, &url).await
    }
}
