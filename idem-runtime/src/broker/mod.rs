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
//! | NATS JetStream | `nats` | [`nats::message_id`]: `id:<Nats-Msg-Id>`, the publisher's id; or [`nats::stream_sequence`]: `seq:<stream>:<sequence>:<stored at, ns>`, the stored message |
//! | AMQP 0.9.1 (RabbitMQ) | `amqp` | [`amqp::message_id`]: `id:<message_id>`, the publisher's id |
//!
//! Each key starts with its kind (`id:`, `seq:`), so a message whose id is `5` and the fifth
//! message of a stream never share a record, even in a handler that keys some messages on
//! their id and others on their place in the stream.
//!
//! **What is deduplicated.** A key names what it was read from. A publisher's id names the
//! publisher's logical message: a publisher that publishes it again (it timed out waiting for
//! the broker's confirm, or restarted) sends the same id, and the second copy is replayed. A
//! stream sequence names one stored message: its redeliveries are replayed, but a publisher's
//! second publish of the same logical message is a new stored message, with a new sequence
//! and so a new key, and its effect happens again (JetStream drops such a copy itself only
//! inside its duplicate window, and only when it carries a `Nats-Msg-Id`). AMQP has no
//! sequence: a delivery without a `message_id` cannot be deduplicated at all.
//!
//! A message whose identity is missing or unusable (empty, two different ids, too long) is a
//! [`MessageKeyError`], never a made-up key. It will not get better on a redelivery: the
//! consumer should terminate it (JetStream `AckKind::Term`; AMQP reject without requeue, to a
//! dead-letter exchange) and count or alert, rather than apply it unprotected.
//!
//! **Client versions.** [`nats`] and [`amqp`] take the message types of the client crates
//! idem is built with (`async-nats` 0.51, `lapin` 4) and re-export those crates
//! (`idem_runtime::broker::nats::async_nats`, `idem_runtime::broker::amqp::lapin`): consume
//! through the re-export, or depend on the same major version. A consumer on another client
//! (or another version) builds the same keys from plain values with [`id_key`] and
//! [`sequence_key`], which need no feature.

#[cfg(feature = "amqp")]
#[cfg_attr(docsrs, doc(cfg(feature = "amqp")))]
pub mod amqp;
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod nats;

use std::fmt;

/// The longest message id taken as a key, in bytes. An id this long is almost certainly not
/// an id (a payload sent in the wrong header, say); idem would hash it into its key column
/// anyway, so the limit only catches the mistake.
pub const MAX_ID_BYTES: usize = 1024;

/// The key of a message identified by its publisher's id: `id:<id>`.
///
/// Fails when `id` is empty or blank, or longer than [`MAX_ID_BYTES`].
///
/// ```
/// assert_eq!(idem_runtime::broker::id_key("order-7").unwrap(), "id:order-7");
/// assert!(idem_runtime::broker::id_key(" ").is_err());
/// ```
pub fn id_key(id: &str) -> Result<String, MessageKeyError> {
    checked_id("broker", "message id", "", [id].into_iter())
}

/// The key of a message identified by its place in a stream:
/// `seq:<stream>:<sequence>:<stored_at_unix_nanos>`.
///
/// `stored_at_unix_nanos` is when the broker stored the message (JetStream's published time,
/// the same in every redelivery). Sequences start again at 1 when a stream is deleted and
/// created anew; the time tells the new stream's first message from the old one's, so it is
/// never answered with the old message's result.
///
/// ```
/// let key = idem_runtime::broker::sequence_key("ORDERS", 5, 1_764_600_000_000_000_000);
/// assert_eq!(key, "seq:ORDERS:5:1764600000000000000");
/// ```
pub fn sequence_key(stream: &str, sequence: u64, stored_at_unix_nanos: i128) -> String {
    format!("seq:{stream}:{sequence}:{stored_at_unix_nanos}")
}

/// `id:<id>` from the values of a message's id field (a header may be repeated), or what is
/// wrong with them.
pub(crate) fn checked_id<'a>(
    broker: &'static str,
    field: &'static str,
    fix: &'static str,
    mut values: impl Iterator<Item = &'a str>,
) -> Result<String, MessageKeyError> {
    let error = |problem: String| MessageKeyError::new(broker, problem, fix);
    let Some(id) = values.next() else {
        return Err(error(format!("has no {field}")));
    };
    if let Some(other) = values.find(|v| *v != id) {
        return Err(error(format!(
            "has two different {field}s ({} and {} bytes)",
            id.len(),
            other.len()
        )));
    }
    if id.trim().is_empty() {
        return Err(error(format!("has an empty {field}")));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(error(format!(
            "has a {field} of {} bytes (at most {MAX_ID_BYTES})",
            id.len()
        )));
    }
    Ok(format!("id:{id}"))
}

/// The message carries no usable identity to key on (see the [module docs](self)): none,
/// an empty one, two different ones, or one too long.
///
/// Its message says which broker, what is wrong and how the publisher can fix it, never the
/// id itself. It is permanent: a redelivery carries the same identity, so terminate the
/// message (or dead-letter it) instead of sending it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageKeyError {
    broker: &'static str,
    problem: String,
    fix: &'static str,
}

impl MessageKeyError {
    pub(crate) fn new(broker: &'static str, problem: String, fix: &'static str) -> Self {
        MessageKeyError {
            broker,
            problem,
            fix,
        }
    }
}

impl fmt::Display for MessageKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the {} message {}, so it cannot be deduplicated",
            self.broker, self.problem
        )?;
        if !self.fix.is_empty() {
            write!(f, ": {}", self.fix)?;
        }
        Ok(())
    }
}

impl std::error::Error for MessageKeyError {}

#[cfg(test)]
mod tests {
    use super::{MAX_ID_BYTES, id_key, sequence_key};

    #[test]
    fn kinds_are_prefixed_so_an_id_and_a_sequence_never_meet() {
        assert_eq!(id_key("5").unwrap(), "id:5");
        assert_eq!(sequence_key("S", 5, 42), "seq:S:5:42");
        // An id that looks like a sequence key stays an id.
        assert_eq!(id_key("seq:S:5:42").unwrap(), "id:seq:S:5:42");
    }

    #[test]
    fn unusable_ids_are_refused_with_what_is_wrong() {
        let long = "x".repeat(MAX_ID_BYTES + 1);
        for (id, problem) in [
            ("", "has an empty message id"),
            ("  ", "has an empty message id"),
            (
                long.as_str(),
                "has a message id of 1025 bytes (at most 1024)",
            ),
        ] {
            assert_eq!(
                id_key(id).unwrap_err().to_string(),
                format!("the broker message {problem}, so it cannot be deduplicated")
            );
        }
        assert!(id_key(&"x".repeat(MAX_ID_BYTES)).is_ok());
    }

    #[test]
    fn a_repeated_id_field_must_agree() {
        let two = super::checked_id(
            "NATS",
            "`Nats-Msg-Id` header",
            "fix",
            ["a", "b"].into_iter(),
        );
        assert_eq!(
            two.unwrap_err().to_string(),
            "the NATS message has two different `Nats-Msg-Id` headers (1 and 1 bytes), so it cannot be deduplicated: fix"
        );
        let same = super::checked_id(
            "NATS",
            "`Nats-Msg-Id` header",
            "fix",
            ["a", "a"].into_iter(),
        );
        assert_eq!(same.unwrap(), "id:a");
    }
}
