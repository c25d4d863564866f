//! The idempotency key of an AMQP 0.9.1 delivery, as RabbitMQ sends it (feature `amqp`).
//!
//! AMQP has one message identity, the `message_id` property, set by the publisher. The
//! delivery tag is not one: it numbers deliveries on one channel, and a redelivery gets a new
//! one. Publishers must set a `message_id` that stays the same when they retry a publish (a
//! UUID made once per logical message, or the business id it carries). When a handler reads
//! from queues fed by publishers that may reuse each other's ids, make the queue (or the
//! publisher's `app_id`) the call's `scope`.

use lapin::message::Delivery;

use super::NoMessageId;

/// The delivery's `message_id` property, as the key.
///
/// Fails with [`NoMessageId`] when the property is missing or empty; publish with
/// `BasicProperties::default().with_message_id(..)`.
///
/// ```no_run
/// # async fn handle(delivery: lapin::message::Delivery) -> Result<(), Box<dyn std::error::Error>> {
/// let key = idem_runtime::broker::amqp::message_id(&delivery)?;
/// # let _ = key; Ok(()) }
/// ```
pub fn message_id(delivery: &Delivery) -> Result<&str, NoMessageId> {
    delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str())
        .filter(|id| !id.is_empty())
        .ok_or(NoMessageId::new(
            "AMQP",
            "`message_id` property",
            "publish it with one (`BasicProperties::default().with_message_id(..)`) that stays the same when the publish is retried",
        ))
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
        assert_eq!(message_id(&d), Ok("order-7"));
    }

    #[test]
    fn a_delivery_without_a_message_id_is_refused_with_the_fix() {
        for properties in [
            BasicProperties::default(),
            BasicProperties::default().with_message_id("".into()),
        ] {
            let err = message_id(&delivery(properties)).unwrap_err().to_string();
            assert_eq!(
                err,
                "the AMQP message has no `message_id` property, so it cannot be deduplicated: publish it with one (`BasicProperties::default().with_message_id(..)`) that stays the same when the publish is retried"
            );
        }
    }
}
