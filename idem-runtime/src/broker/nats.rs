//! The idempotency key of a NATS JetStream message (feature `nats`).
//!
//! Two identities, pick one per consumer:
//!
//! - [`message_id`], the `Nats-Msg-Id` header the publisher sets. Prefer it: it names the
//!   publisher's logical message, so a publisher that retries a publish (after a timeout, or
//!   after a restart) sends the same id. JetStream drops such a duplicate only inside its
//!   duplicate window (2 minutes by default); past it the retry is a new stream message, and
//!   keyed on the id it is still replayed, not applied again.
//! - [`stream_sequence`], `<stream>:<sequence>`, which needs nothing from the publisher. It
//!   names one stored message: a publisher's retry past the duplicate window gets a new
//!   sequence, and so runs again. Sequences start again at 1 if the stream is deleted and
//!   created anew; a new message that meets an old record of the same sequence is refused
//!   with `PayloadMismatch` (its payload differs), not answered with the old result, but it
//!   will not go through until the records expire: give the new stream a new name.
//!
//! Either names a message only among those one handler consumes: when a handler reads from
//! several streams whose publishers may reuse ids, make the stream the call's `scope`.

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::Message;

use super::NoMessageId;

/// The message's `Nats-Msg-Id` header, as the key.
///
/// Fails with [`NoMessageId`] when the header is missing or empty; publish with an id
/// (`async_nats::jetstream::message::PublishMessage::build().message_id(..)`, or the
/// header).
///
/// ```no_run
/// # async fn handle(msg: async_nats::jetstream::Message) -> Result<(), Box<dyn std::error::Error>> {
/// let key = idem_runtime::broker::nats::message_id(&msg)?;
/// # let _ = key; Ok(()) }
/// ```
pub fn message_id(msg: &Message) -> Result<&str, NoMessageId> {
    msg.headers
        .as_ref()
        .and_then(|h| h.get(NATS_MESSAGE_ID))
        .map(|v| v.as_str())
        .filter(|id| !id.is_empty())
        .ok_or(NoMessageId::new(
            "NATS",
            "`Nats-Msg-Id` header",
            "publish it with a message id (`PublishMessage::build().message_id(..)`), or key on the stream sequence (`broker::nats::stream_sequence`)",
        ))
}

/// The message's place in its stream, `<stream>:<sequence>`, as the key.
///
/// Fails with [`NoMessageId`] when the message did not come from a JetStream consumer (it
/// has no `$JS.ACK` reply subject to read the sequence from).
pub fn stream_sequence(msg: &Message) -> Result<String, NoMessageId> {
    let info = msg.info().map_err(|_| {
        NoMessageId::new(
            "NATS",
            "JetStream stream sequence (it was not delivered by a JetStream consumer)",
            "consume it from a JetStream stream, or key on a `Nats-Msg-Id` header (`broker::nats::message_id`)",
        )
    })?;
    Ok(format!("{}:{}", info.stream, info.stream_sequence))
}
