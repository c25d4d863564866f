//! `broker::nats` and `broker::amqp` read the key from messages as the real brokers deliver
//! them, and refuse, with an error that says how to fix the publisher, a message that has
//! no identity. Needs NATS with JetStream and RabbitMQ on 127.0.0.1 (skipped, loudly,
//! without them unless `CI=true`).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use async_nats::jetstream::{self, consumer::pull, message::PublishMessage};
use futures_util::StreamExt;
use idem_runtime::broker::{amqp, nats};
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use support::server_missing;

fn url(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

#[tokio::test]
async fn nats_keys_are_the_message_id_or_the_stream_sequence() {
    let url = url("IDEM_TEST_NATS_URL", "nats://127.0.0.1:4222");
    let client = match async_nats::connect(&url).await {
        Ok(c) => c,
        Err(e) => return server_missing("NATS JetStream", "IDEM_TEST_NATS_URL", &url, &e),
    };
    let js = jetstream::new(client.clone());
    let name = format!("IDEM_KEYS_{:08x}", fastrand::u32(..));
    let subject = format!("idem.keys.{name}");
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            storage: jetstream::stream::StorageType::Memory,
            ..Default::default()
        })
        .await
        .unwrap();
    let publish = [
        PublishMessage::build().message_id("order-1"),
        PublishMessage::build(),
        PublishMessage::build().header("Nats-Msg-Id", ""),
    ];
    for p in publish {
        let p = p.payload("{}".into());
        js.send_publish(subject.clone(), p)
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
        .max_messages(3)
        .messages()
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(got.len(), 3);

    assert_eq!(nats::message_id(&got[0]), Ok("order-1"));
    for (i, msg) in got.iter().enumerate() {
        assert_eq!(nats::stream_sequence(msg), Ok(format!("{name}:{}", i + 1)));
    }
    for msg in &got[1..] {
        let err = nats::message_id(msg).unwrap_err().to_string();
        assert!(
            err.contains("no `Nats-Msg-Id` header") && err.contains("message_id(..)"),
            "{err}"
        );
    }

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
    js.delete_stream(&name).await.unwrap();
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
    assert_eq!(amqp::message_id(&got[0]), Ok("order-1"));
    for msg in &got[1..] {
        let err = amqp::message_id(msg).unwrap_err().to_string();
        assert!(
            err.contains("no `message_id` property") && err.contains("with_message_id(..)"),
            "{err}"
        );
    }
    conn.close(200, "done".into()).await.unwrap();
}
