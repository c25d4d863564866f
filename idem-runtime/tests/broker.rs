//! `broker::nats` and `broker::amqp` read the key from messages as the real brokers deliver
//! them (`id:..` or `seq:..`, the same in a redelivery, never the same for a stream created
//! anew), and refuse, with an error that says how to fix the publisher, a message that has
//! no usable identity (none, empty, two different ones, too long). Needs NATS with JetStream and RabbitMQ on 127.0.0.1 (skipped, loudly,
//! without them unless `CI=true`).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use futures_util::StreamExt;
use idem_runtime::broker::{amqp, nats};
// The clients as idem re-exports them: a consumer needs no version of its own to match.
use amqp::lapin::{
    self,
    options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions},
    types::FieldTable,
};
use nats::async_nats::{
    self,
    jetstream::{self, consumer::pull, message::PublishMessage},
};
use support::server_missing;

fn url(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

/// A stream of its own (in memory), deleted when the test ends, passed or failed.
struct Stream {
    js: jetstream::Context,
    name: String,
}

impl Stream {
    async fn create(js: &jetstream::Context, name: &str) -> jetstream::stream::Stream {
        js.create_stream(jetstream::stream::Config {
            name: name.to_string(),
            subjects: vec![format!("idem.keys.{name}")],
            storage: jetstream::stream::StorageType::Memory,
            ..Default::default()
        })
        .await
        .unwrap()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let (js, name) = (self.js.clone(), self.name.clone());
        // A thread and runtime of its own: this may run while the test's runtime unwinds.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let _ = rt.block_on(js.delete_stream(&name));
        })
        .join();
    }
}

/// Publishes each message to `name`'s subject, then fetches them all from a new consumer.
async fn publish_and_fetch(
    js: &jetstream::Context,
    stream: &jetstream::stream::Stream,
    name: &str,
    publish: Vec<PublishMessage>,
) -> Vec<jetstream::Message> {
    let n = publish.len();
    for p in publish {
        js.send_publish(format!("idem.keys.{name}"), p.payload("{}".into()))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(pull::Config::default())
        .await
        .unwrap();
    let got: Vec<jetstream::Message> = consumer
        .fetch()
        .max_messages(n)
        .messages()
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(got.len(), n);
    got
}

async fn nats() -> Option<(async_nats::Client, jetstream::Context)> {
    let url = url("IDEM_TEST_NATS_URL", "nats://127.0.0.1:4222");
    match async_nats::connect(&url).await {
        Ok(c) => Some((c.clone(), jetstream::new(c))),
        Err(e) => {
            server_missing("NATS JetStream", "IDEM_TEST_NATS_URL", &url, &e);
            None
        }
    }
}

#[tokio::test]
async fn nats_keys_are_the_message_id_or_the_stream_sequence() {
    let Some((client, js)) = nats().await else {
        return;
    };
    let name = format!("IDEM_KEYS_{:08x}", fastrand::u32(..));
    let _cleanup = Stream {
        js: js.clone(),
        name: name.clone(),
    };
    let stream = Stream::create(&js, &name).await;
    let mut two_ids = async_nats::HeaderMap::new();
    two_ids.append("Nats-Msg-Id", "order-2");
    two_ids.append("Nats-Msg-Id", "order-3");
    let mut same_id_twice = async_nats::HeaderMap::new();
    same_id_twice.append("Nats-Msg-Id", "order-4");
    same_id_twice.append("Nats-Msg-Id", "order-4");
    let long = "x".repeat(idem_runtime::broker::MAX_ID_BYTES + 1);
    let publish = vec![
        PublishMessage::build().message_id("order-1"),
        PublishMessage::build(),
        PublishMessage::build().header("Nats-Msg-Id", ""),
        PublishMessage::build().headers(two_ids),
        PublishMessage::build().headers(same_id_twice),
        PublishMessage::build().message_id(long.as_str()),
    ];
    let got = publish_and_fetch(&js, &stream, &name, publish).await;

    // The key names its kind: a publisher's id is `id:..`, a place in a stream `seq:..`.
    assert_eq!(nats::message_id(&got[0]).unwrap(), "id:order-1");
    assert_eq!(nats::message_id(&got[4]).unwrap(), "id:order-4");
    let mut stored_at = Vec::new();
    for (i, msg) in got.iter().enumerate() {
        let key = nats::stream_sequence(msg).unwrap();
        let prefix = format!("seq:{name}:{}:", i + 1);
        let nanos = key.strip_prefix(&prefix).unwrap_or_else(|| panic!("{key}"));
        stored_at.push(nanos.parse::<i128>().unwrap());
    }
    assert!(stored_at.windows(2).all(|w| w[0] <= w[1]), "{stored_at:?}");
    let refused = |msg: &jetstream::Message| nats::message_id(msg).unwrap_err().to_string();
    for (msg, problem) in [
        (&got[1], "has no `Nats-Msg-Id` header"),
        (&got[2], "has an empty `Nats-Msg-Id` header"),
        (
            &got[3],
            "has two different `Nats-Msg-Id` headers (7 and 7 bytes)",
        ),
        (
            &got[5],
            "has a `Nats-Msg-Id` header of 1025 bytes (at most 1024)",
        ),
    ] {
        let err = refused(msg);
        assert!(
            err.starts_with(&format!("the NATS message {problem}, so it cannot be deduplicated: publish it with one message id")),
            "{err}"
        );
        assert!(!err.contains("order-"), "the error names no id: {err}");
    }

    // A redelivery keeps both keys.
    let consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("again".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let first = fetch_one(&consumer).await;
    assert_eq!(first.info().unwrap().stream_sequence, 1);
    first.ack_with(jetstream::AckKind::Nak(None)).await.unwrap();
    let again = loop {
        let msg = fetch_one(&consumer).await;
        if msg.info().unwrap().stream_sequence == 1 {
            break msg;
        }
        msg.ack().await.unwrap(); // the others, still to be delivered a first time
    };
    assert_eq!(again.info().unwrap().delivered, 2, "it is a redelivery");
    assert_eq!(
        nats::stream_sequence(&again).unwrap(),
        nats::stream_sequence(&got[0]).unwrap()
    );
    assert_eq!(nats::message_id(&again).unwrap(), "id:order-1");

    // Deleted and created anew, the stream numbers its messages from 1 again: its new first
    // message must not get the old first message's key (and so its result).
    js.delete_stream(&name).await.unwrap();
    let stream = Stream::create(&js, &name).await;
    let got_again = publish_and_fetch(&js, &stream, &name, vec![PublishMessage::build()]).await;
    let new_first = nats::stream_sequence(&got_again[0]).unwrap();
    assert!(
        new_first.starts_with(&format!("seq:{name}:1:")),
        "{new_first}"
    );
    assert_ne!(new_first, nats::stream_sequence(&got[0]).unwrap());

    // A core NATS message (not from a JetStream consumer) has no stream sequence.
    let mut sub = client.subscribe(format!("idem.core.{name}")).await.unwrap();
    client
        .publish(format!("idem.core.{name}"), "{}".into())
        .await
        .unwrap();
    let core = jetstream::Message {
        message: sub.next().await.unwrap(),
        context: js.clone(),
    };
    let err = nats::stream_sequence(&core).unwrap_err().to_string();
    assert!(
        err.contains("not delivered by a JetStream consumer"),
        "{err}"
    );
}

async fn fetch_one(consumer: &jetstream::consumer::PullConsumer) -> jetstream::Message {
    for _ in 0..50 {
        let mut batch = consumer.fetch().max_messages(1).messages().await.unwrap();
        if let Some(msg) = batch.next().await {
            return msg.unwrap();
        }
    }
    panic!("no message came in 50 fetches");
}

#[tokio::test]
async fn amqp_keys_are_the_message_id() {
    let url = url(
        "IDEM_TEST_AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    );
    let conn = match lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await
    {
        Ok(c) => c,
        Err(e) => return server_missing("RabbitMQ", "IDEM_TEST_AMQP_URL", &url, &e),
    };
    let channel = conn.create_channel().await.unwrap();
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    let queue = channel
        .queue_declare("".into(), exclusive, FieldTable::default())
        .await
        .unwrap();
    let properties = [
        lapin::BasicProperties::default().with_message_id("order-1".into()),
        lapin::BasicProperties::default(),
        lapin::BasicProperties::default().with_message_id("".into()),
    ];
    for p in properties {
        channel
            .basic_publish(
                "".into(),
                queue.name().clone(),
                BasicPublishOptions::default(),
                b"{}",
                p,
            )
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..500 {
        if got.len() == 3 {
            break;
        }
        let options = BasicGetOptions { no_ack: true };
        match channel
            .basic_get(queue.name().clone(), options)
            .await
            .unwrap()
        {
            Some(m) => got.push(m),
            None => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
    assert_eq!(got.len(), 3, "the three messages came back");
    assert_eq!(amqp::message_id(&got[0]).unwrap(), "id:order-1");
    for (msg, problem) in [
        (&got[1], "has no `message_id` property"),
        (&got[2], "has an empty `message_id` property"),
    ] {
        let err = amqp::message_id(msg).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "the AMQP message {problem}, so it cannot be deduplicated"
            )) && err.contains("with_message_id(..)"),
            "{err}"
        );
    }
    conn.close(200, "done".into()).await.unwrap();
}
