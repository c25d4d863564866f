//! The idempotency key of a NATS JetStream message (feature `nats`).
//!
//! Two identities, pick one per consumer:
//!
//! - [`message_id`], `id:<Nats-Msg-Id>`, the header the publisher sets. Prefer it: it names
//!   the publisher's logical message, so a publisher that publishes again (after a timeout,
//!   or after a restart) sends the same id. JetStream drops such a copy only inside its
//!   duplicate window (2 minutes by default); past it the copy is a new stream message, and
//!   keyed on the id it is still replayed, not applied again.
//! - [`stream_sequence`], `seq:<stream>:<sequence>:<stored at, ns>`, which needs nothing from
//!   the publisher. It names one stored message, and deduplicates its redeliveries only: a
//!   publisher's second publish of the same order is stored again, under a new sequence, so
//!   it gets a new key and its effect happens again (inside the duplicate window JetStream
//!   drops it only if it carries a `Nats-Msg-Id`, and then there is an id to key on). The
//!   time at which the stream stored the message is part of the key because sequences start
//!   again at 1 when a stream is deleted and created anew: the new stream's first message
//!   has the old first message's sequence, not its time, so it is never answered with the
//!   old result.
//!
//! Either names a message only among those one handler consumes: when a handler reads from
//! several streams whose publishers may reuse ids, make the stream the call's `scope`.
//!
//! Both take the [`async_nats`] types of the version idem is built with, re-exported here.

/// The NATS client these helpers take messages from (0.51), so that a consumer can use the
/// same version without pinning it itself: `idem_runtime::broker::nats::async_nats`.
pub use async_nats;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::Message;

use super::{MessageKeyError, checked_id, sequence_key};

/// The message's `Nats-Msg-Id` header, as the key `id:<Nats-Msg-Id>`.
///
/// Fails with [`MessageKeyError`] when the header is missing, empty, repeated with different
/// values, or longer than [`MAX_ID_BYTES`](super::MAX_ID_BYTES); publish with an id
/// (`async_nats::jetstream::message::PublishMessage::build().message_id(..)`, or the
/// header). (A header that is not UTF-8 never gets here: the client refuses the message.)
///
/// ```no_run
/// # async fn handle(msg: async_nats::jetstream::Message) -> Result<(), Box<dyn std::error::Error>> {
/// let key = idem_runtime::broker::nats::message_id(&msg)?; // "id:order-7"
/// # let _ = key; Ok(()) }
/// ```
pub fn message_id(msg: &Message) -> Result<String, MessageKeyError> {
    let values = msg
        .headers
        .iter()
        .flat_map(|h| h.get_all(NATS_MESSAGE_ID))
        .map(|v| v.as_str());
    checked_id(
        "NATS",
        "`Nats-Msg-Id` header",
        "publish it with one message id (`PublishMessage::build().message_id(..)`) that stays the same when the publish is retried, or key on the stream sequence (`broker::nats::stream_sequence`)",
        values,
    )
}

/// The message's place in its stream, as the key
/// `seq:<stream>:<sequence>:<stored at, unix ns>` (see the [module docs](self) for what it
/// deduplicates and what it does not).
///
/// Fails with [`MessageKeyError`] when the message did not come from a JetStream consumer
/// (it has no `$JS.ACK` reply subject to read the sequence from).
///
/// ```no_run
/// # async fn handle(msg: async_nats::jetstream::Message) -> Result<(), Box<dyn std::error::Error>> {
/// let key = idem_runtime::broker::nats::stream_sequence(&msg)?; // "seq:ORDERS:5:1764600000123456789"
/// # let _ = key; Ok(()) }
/// ```
pub fn stream_sequence(msg: &Message) -> Result<String, MessageKeyError> {
    let not_jetstream = || {
        MessageKeyError::new(
            "NATS",
            "has no JetStream stream sequence (it was not delivered by a JetStream consumer)"
                .into(),
            "consume it from a JetStream stream, or key on a `Nats-Msg-Id` header (`broker::nats::message_id`)",
        )
    };
    let info = msg.info().map_err(|_| not_jetstream())?;
    let reply = msg.reply.as_deref().unwrap_or_default();
    let stored_at = stored_at_nanos(reply).ok_or_else(not_jetstream)?;
    Ok(sequence_key(info.stream, info.stream_sequence, stored_at))
}

/// The time the stream stored the message, in nanoseconds since the Unix epoch, as its ack
/// subject carries it (ADR-15: `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer
/// seq>.<time>.<pending>`, or with `<domain>.<account hash>.` before the stream and an
/// optional token after). Read as the integer itself: `Info::published` is a `time` or a
/// `chrono` type depending on the features the whole build turns on, and a key must not
/// change with a dependency's features.
fn stored_at_nanos(reply: &str) -> Option<i128> {
    let tokens: Vec<&str> = reply.strip_prefix("$JS.ACK.")?.split('.').collect();
    let at = match tokens.len() {
        7 => 5,
        n if n >= 9 => 7,
        _ => return None,
    };
    tokens.get(at)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::stored_at_nanos;

    #[test]
    fn the_stored_time_is_read_from_both_ack_subject_formats() {
        let v1 = "$JS.ACK.ORDERS.worker.1.5.5.1764600000123456789.0";
        let v2 = "$JS.ACK._.acc.ORDERS.worker.2.5.6.1764600000123456789.0";
        let v2_token = "$JS.ACK.hub.acc.ORDERS.worker.2.5.6.1764600000123456789.0.tok";
        for reply in [v1, v2, v2_token] {
            assert_eq!(
                stored_at_nanos(reply),
                Some(1_764_600_000_123_456_789),
                "{reply}"
            );
        }
        for reply in [
            "_INBOX.abc",
            "$JS.ACK.ORDERS.worker.1.5",
            "$JS.ACK.a.b.c.d.e.x.g",
        ] {
            assert_eq!(stored_at_nanos(reply), None, "{reply}");
        }
    }
}
