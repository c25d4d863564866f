//! The idempotency key of an AMQP 0.9.1 delivery, as RabbitMQ sends it (feature `amqp`).
//!
//! AMQP has one message identity, the `message_id` property, set by the publisher; the key is
//! `id:<message_id>`. The delivery tag is not one: it numbers deliveries on one channel, and
//! a redelivery gets a new one. Nor is there a sequence to fall back on: a delivery without a
//! `message_id` cannot be deduplicated, not even against its own redeliveries. Publishers must
//! set a `message_id` that stays the same when they publish the message again (a UUID made
//! once per logical message, or the business id it carries). When a handler reads from
//! queues fed by publishers that may reuse each other's ids, make the queue (or the
//! publisher's `app_id`) the call's `scope`.
//!
//! [`message_id`] takes the [`lapin`] types of the version idem is built with, re-exported
//! here.

/// The AMQP client [`message_id`] takes deliveries from (4.x), so that a consumer can use
/// the same version without pinning it itself: `idem_runtime::broker::amqp::lapin`.
pub use lapin;

use lapin::message::Delivery;

use super::{MessageKeyError, checked_id};

/// The delivery's `message_id` property, as the key `id:<message_id>`.
///
/// Fails with [`MessageKeyError`] when the property is missing or empty (or over
/// [`MAX_ID_BYTES`](super::MAX_ID_BYTES), which AMQP's 255-byte short strings never are);
/// publish with `BasicProperties::default().with_message_id(..)`. (A `message_id` that is
/// not UTF-8 never gets here: lapin refuses the frame.)
///
/// ```no_run
/// # async fn handle(delivery: lapin::message::Delivery) -> Result<(), Box<dyn std::error::Error>> {
/// let key = idem_runtime::broker::amqp::message_id(&delivery)?; // "id:order-7"
/// # let _ = key; Ok(()) }
/// ```
pub fn message_id(delivery: &Delivery) -> Result<String, MessageKeyError> {
    let id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str());
    checked_id(
        "AMQP",
        "`message_id` property",
        "publish it with one (`BasicProperties::default().with_message_id(..)`) that stays the same when the publish is retried",
        id.into_iter(),
    )
}

#[cfg(test)]
mod tests {
    use lapin::BasicProperties;
    use lapin::message::Delivery;

    use super::message_id;

    fn delivery(properties: BasicProperties) -> Delivery {
        let mut d = Delivery::mock(1, "".into(), "orders".into(), true, b"{}".to_vec());
        d.properties = properties;
        d
    }

    #[test]
    fn the_key_is_the_message_id_and_a_redelivery_keeps_it() {
        let d = delivery(BasicProperties::default().with_message_id("order-7".into()));
        assert_eq!(message_id(&d).unwrap(), "id:order-7");
    }

    #[test]
    fn a_delivery_without_a_message_id_is_refused_with_the_fix() {
        for (properties, problem) in [
            (BasicProperties::default(), "no `message_id` property"),
            (
                BasicProperties::default().with_message_id("".into()),
                "an empty `message_id` property",
            ),
            (
                BasicProperties::default().with_message_id(" ".into()),
                "an empty `message_id` property",
            ),
        ] {
            let err = message_id(&delivery(properties)).unwrap_err().to_string();
            assert_eq!(
                err,
                format!(
                    "the AMQP message has {problem}, so it cannot be deduplicated: publish it with one (`BasicProperties::default().with_message_id(..)`) that stays the same when the publish is retried"
                )
            );
        }
    }
}
