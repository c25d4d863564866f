//! How a call was answered, for callers that need to know (an HTTP layer setting
//! `Idempotent-Replayed`, a consumer counting duplicates).
//!
//! The attribute does not change a fn's signature, so the outcome travels beside the return
//! value: wrap the call in [`observe`] and read it back.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

/// How an idempotent call produced its result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// This call ran the body: it was the first with its key.
    Executed,
    /// This call ran the body after taking over a reservation whose lease had run out (its
    /// first owner stopped without finishing).
    TookOver,
    /// The result was replayed from an earlier call, without running the body.
    Replayed,
    /// The result was replayed after waiting for a concurrent call with the same key.
    Waited,
    /// The fn is `optional` and the key was `None`: the body ran without protection.
    Unprotected,
}

impl Outcome {
    /// Whether the result came from an earlier call rather than from running the body.
    pub fn is_replay(self) -> bool {
        matches!(self, Outcome::Replayed | Outcome::Waited)
    }

    /// A short name for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Executed => "executed",
            Outcome::TookOver => "took_over",
            Outcome::Replayed => "replayed",
            Outcome::Waited => "waited",
            Outcome::Unprotected => "unprotected",
        }
    }

    fn from_u8(v: u8) -> Option<Outcome> {
        Some(match v {
            1 => Outcome::Executed,
            2 => Outcome::TookOver,
            3 => Outcome::Replayed,
            4 => Outcome::Waited,
            5 => Outcome::Unprotected,
            _ => return None,
        })
    }

    fn to_u8(self) -> u8 {
        match self {
            Outcome::Executed => 1,
            Outcome::TookOver => 2,
            Outcome::Replayed => 3,
            Outcome::Waited => 4,
            Outcome::Unprotected => 5,
        }
    }
}

tokio::task_local! {
    static OBSERVED: Arc<AtomicU8>;
}

/// Runs `fut` and reports how the last `#[idempotent]` call that finished inside it was
/// answered (`None` if none finished, or it failed before producing a result).
///
/// ```
/// # use idem_runtime::{idempotent, observe, Outcome, Idem, store::MemoryStore};
/// #[idempotent(key = id, runtime = idem)]
/// async fn charge(idem: &Idem, id: u64) -> Result<u64, idem_runtime::Error> {
///     Ok(id * 100)
/// }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), idem_runtime::Error> {
/// let idem = Idem::builder().store(MemoryStore::new()).build()?;
/// let (first, how) = observe(charge(&idem, 7)).await;
/// assert_eq!((first?, how), (700, Some(Outcome::Executed)));
/// let (again, how) = observe(charge(&idem, 7)).await;
/// assert_eq!((again?, how), (700, Some(Outcome::Replayed)));
/// # Ok(()) }
/// ```
pub async fn observe<F: Future>(fut: F) -> (F::Output, Option<Outcome>) {
    let slot = Arc::new(AtomicU8::new(0));
    let out = OBSERVED.scope(slot.clone(), fut).await;
    (out, Outcome::from_u8(slot.load(Ordering::Relaxed)))
}

pub(crate) fn report(outcome: Outcome) {
    let _ = OBSERVED.try_with(|slot| slot.store(outcome.to_u8(), Ordering::Relaxed));
}
