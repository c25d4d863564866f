//! The foreign-effect consumer's handler: a confirmation email, sent through a provider.
//!
//! The email is not a row in idem's database, so no transaction can tie it to idem's record:
//! the call is leased. It runs at most once while its lease holds, but a consumer that dies
//! after the provider accepted the email and before idem recorded the result leaves a
//! reservation that the next delivery takes over once the lease has run out, and the body
//! runs again: at least once. So the body passes the provider an idempotency key of its own,
//! chained from the message's (`<key>:confirmation`): the provider drops the second send,
//! and the customer gets one email.
//!
//! [`Mailer`] stands in for the provider: each accepted email is a file in a directory (the
//! outbox), named after its idempotency key, and every call is a line in `calls.log`.

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use idem_runtime::{idempotent, observe};
use serde::{Deserialize, Serialize};

use super::chaos::{Before, Chaos};
use super::{AppError, Handled, OrderPlaced};

/// Email bodies run in this process.
pub(crate) static BODIES: AtomicUsize = AtomicUsize::new(0);

/// What the provider answers: the id of the email it sent.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Receipt {
    pub(crate) email_id: String,
}

/// The handler: one confirmation email per message, at least once, and once at the provider.
#[idempotent(key = key, skip(mailer, chaos))]
async fn send_confirmation(
    mailer: &Mailer,
    chaos: &Chaos,
    key: &str,
    order: &OrderPlaced,
) -> Result<Receipt, AppError> {
    BODIES.fetch_add(1, Relaxed);
    // This body may run twice for one message (see the module docs), so the provider gets a
    // key derived from ours: its second send is a no-op that returns the first receipt.
    let provider_key = format!("{key}:confirmation");
    let subject = format!("Order {} confirmed", order.order_ref);
    let receipt = mailer.send(&provider_key, &order.customer, &subject)?;
    if chaos.crash(Before::Record, key).await {
        // (The demo: the email went out, but the consumer dies before idem records it. An
        // `Err` releases the key, so the redelivery runs the body again, as a takeover after
        // a real crash does.)
        return Err(AppError::Crashed);
    }
    Ok(receipt)
}

/// Handles one message for the emails consumer.
pub(crate) async fn confirm(
    mailer: &Mailer,
    key: &str,
    order: &OrderPlaced,
    chaos: &Chaos,
) -> Result<Handled, AppError> {
    let (receipt, outcome) = observe(send_confirmation(mailer, chaos, key, order)).await;
    match receipt {
        Ok(r) => Ok(Handled::Done {
            answer: r.email_id,
            outcome,
        }),
        Err(AppError::Crashed) => Ok(Handled::Crashed),
        Err(e) => Err(e),
    }
}

/// A stand-in for an email provider whose API takes an idempotency key, as payment and
/// messaging providers' APIs commonly do (an `Idempotency-Key` header).
pub(crate) struct Mailer {
    outbox: PathBuf,
}

impl Mailer {
    pub(crate) fn new(outbox: impl Into<PathBuf>) -> std::io::Result<Mailer> {
        let outbox = outbox.into();
        fs::create_dir_all(&outbox)?;
        Ok(Mailer { outbox })
    }

    /// Sends an email once per `idempotency_key`: a key seen before returns the first
    /// receipt and sends nothing. Safe across processes sharing the outbox.
    pub(crate) fn send(
        &self,
        idempotency_key: &str,
        to: &str,
        subject: &str,
    ) -> std::io::Result<Receipt> {
        let mut calls = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.outbox.join("calls.log"))?;
        writeln!(calls, "{idempotency_key}")?;
        let path = self.outbox.join(Self::file_name(idempotency_key));
        let email_id = format!("em_{:016x}", fastrand::u64(..));
        // Written under a temporary name, then linked into place: the link fails if the key
        // was sent before, and a crash never leaves half an email.
        let tmp = self.outbox.join(format!("tmp-{:016x}", fastrand::u64(..)));
        fs::write(&tmp, format!("{email_id}\nTo: {to}\nSubject: {subject}\n"))?;
        let linked = fs::hard_link(&tmp, &path);
        fs::remove_file(&tmp)?;
        match linked {
            Ok(()) => Ok(Receipt { email_id }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(Receipt {
                email_id: Self::read_id(&fs::read_to_string(&path)?),
            }),
            Err(e) => Err(e),
        }
    }

    /// The outbox file of an idempotency key: the key in hex (keys may hold any character).
    pub(crate) fn file_name(idempotency_key: &str) -> String {
        let hex: String = idempotency_key
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{hex}.eml")
    }

    fn read_id(email: &str) -> String {
        email.lines().next().unwrap_or_default().to_string()
    }

    /// Emails sent: one per idempotency key.
    pub(crate) fn sent(&self) -> std::io::Result<usize> {
        Ok(fs::read_dir(&self.outbox)?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".eml"))
            .count())
    }

    /// Calls the provider received, duplicates included.
    pub(crate) fn calls(&self) -> std::io::Result<usize> {
        match fs::read_to_string(self.outbox.join("calls.log")) {
            Ok(log) => Ok(log.lines().count()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }
}
