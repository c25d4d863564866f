//! The idempotency key of a broker message, for queue consumers.
//!
//! Every broker delivers at least once: a message comes back after a nack, an ack timeout or
//! a consumer that died before its ack. A consumer is safe against that when its handler is
//! keyed on the message's identity, which stays the same across redeliveries, and when it
//! acks only after the handler's effects are committed. These helpers read that identity; the
//! README's "Queue consumers" section shows the whole loop.
//!
//! | broker | feature | key |
//! | --- | --- | --- |
//! | NATS JetStream | `nats` | [`nats::message_id`]: the publisher's `Nats-Msg-Id` header; or [`nats::stream_sequence`]: `<stream>:<sequence>` |
//! | AMQP 0.9.1 (RabbitMQ) | `amqp` | [`amqp::message_id`]: the `message_id` property |
//!
//! A message without the identity asked for is a [`NoMessageId`] error, never a made-up key:
//! such a message cannot be deduplicated, so the consumer should reject it (dead-letter it)
//! rather than apply it unprotected.

#[cfg(feature = "amqp")]
pub mod amqp;
#[cfg(feature = "nats")]
pub mod nats;

use std::fmt;

/// The message carries no identity to key on (see the [module docs](self)).
///
/// Its message says which broker, what is missing and how the publisher can send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoMessageId {
    broker: &'static str,
    missing: &'static str,
    fix: &'static str,
}

impl NoMessageId {
    pub(crate) fn new(broker: &'static str, missing: &'static str, fix: &'static str) -> Self {
        NoMessageId {
            broker,
            missing,
            fix,
        }
    }
}

impl fmt::Display for NoMessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the {} message has no {}, so it cannot be deduplicated: {}",
            self.broker, self.missing, self.fix
        )
    }
}

impl std::error::Error for NoMessageId {}
