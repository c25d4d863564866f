//! Work that outlives its caller without costing a task hop when it does not need to.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::runtime::Handle;

/// A future run by whoever polls it and, if dropped before it is done, finished in a task of
/// its own on `rt`. The caller pays no hop to another task; the work still completes when the
/// caller goes away (a client that hangs up, a timeout that stops waiting). A panic in the
/// work is caught, as a task would catch it, and answered as [`Panicked`].
pub(crate) struct Detach<F: Future + Send + 'static>
where
    F::Output: Send + 'static,
{
    rt: Handle,
    /// `None` once done, or after a poll that panicked (nothing is left to finish).
    work: Option<Pin<Box<F>>>,
}

impl<F: Future + Send + 'static> Detach<F>
where
    F::Output: Send + 'static,
{
    pub(crate) fn new(rt: Handle, work: F) -> Self {
        Detach {
            rt,
            work: Some(Box::pin(work)),
        }
    }
}

/// The detached work panicked (the panic was reported by the panic hook as usual).
#[derive(Debug)]
pub(crate) struct Panicked;

impl<F: Future + Send + 'static> Future for Detach<F>
where
    F::Output: Send + 'static,
{
    type Output = Result<F::Output, Panicked>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Out of its slot while it runs: if it panics, it is dropped here, not handed to a
        // task on drop.
        let mut work = self.work.take().expect("Detach polled after it finished");
        match catch_unwind(AssertUnwindSafe(|| work.as_mut().poll(cx))) {
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Ok(Poll::Pending) => {
                self.work = Some(work);
                Poll::Pending
            }
            Err(_) => Poll::Ready(Err(Panicked)),
        }
    }
}

impl<F: Future + Send + 'static> Drop for Detach<F>
where
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        if let Some(work) = self.work.take() {
            drop(self.rt.spawn(work));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn runs_in_place_and_finishes_in_a_task_when_dropped() {
        assert_eq!(
            Detach::new(Handle::current(), async { 7 }).await.ok(),
            Some(7)
        );
        let panics = Detach::new(Handle::current(), async { panic!("the work panics") });
        assert!(panics.await.is_err(), "a panic is an answer, not an unwind");

        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let work = Detach::new(Handle::current(), async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            flag.store(true, Ordering::SeqCst);
        });
        let stopped = tokio::time::timeout(Duration::from_millis(5), work).await;
        assert!(stopped.is_err(), "the caller stopped waiting");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(done.load(Ordering::SeqCst), "the work finished without it");
    }
}
