//! A pooled connection lent to one verb, closed rather than pooled if the verb is cut short.

use std::future::Future;
use std::time::Duration;

use super::{Connection, Dialect, SqlStore};
use crate::error::StoreError;

/// How many times a statement that lost a deadlock is sent again (pauses of about 2, 4, 8
/// and 16 ms).
const CONFLICT_RETRIES: u32 = 4;

impl<D: Dialect> SqlStore<D> {
    /// Runs `statement` (one statement in its own transaction) again while it loses a
    /// deadlock or a serialization conflict, a few times, after a short random pause. The
    /// database rolled the loser back, so it had no effect, and nothing was wrong with it:
    /// on InnoDB, an insert of a key just deleted (released or purged) takes a shared lock
    /// and then an exclusive one, and a fenced write of that row in between deadlocks with
    /// it, which fails one of two callers that did nothing wrong.
    pub(super) async fn again_after_conflicts<T, F, Fut>(
        &self,
        statement: F,
    ) -> Result<T, StoreError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut pause = Duration::from_millis(2);
        for _ in 0..CONFLICT_RETRIES {
            match statement().await {
                Err(e) if e.is_transaction_conflict() => {
                    tokio::time::sleep(pause.mul_f64(fastrand::f64() + 0.5)).await;
                    pause *= 2;
                }
                done => return done,
            }
        }
        statement().await
    }

    pub(super) async fn checkout(&self) -> Result<Checkout<D>, StoreError> {
        let conn = self.pool.acquire().await.map_err(|e| self.error(e))?;
        Ok(Checkout {
            conn,
            finished: false,
        })
    }
}

/// A pooled connection lent to one verb. If the verb's future is dropped before it finishes
/// (its statement timed out, or its caller went away), the connection may be mid-statement or
/// stuck on a dead socket: it is closed rather than returned to the pool, where sqlx would
/// ping it, with no time limit, before anyone could use it again.
pub(super) struct Checkout<D: Dialect> {
    conn: sqlx::pool::PoolConnection<D::Db>,
    finished: bool,
}

impl<D: Dialect> Checkout<D> {
    /// The verb is done with the connection: it goes back to the pool.
    pub(super) fn finish<T>(mut self, out: T) -> T {
        self.finished = true;
        out
    }
}

impl<D: Dialect> std::ops::Deref for Checkout<D> {
    type Target = Connection<D>;
    fn deref(&self) -> &Connection<D> {
        &self.conn
    }
}

impl<D: Dialect> std::ops::DerefMut for Checkout<D> {
    fn deref_mut(&mut self) -> &mut Connection<D> {
        &mut self.conn
    }
}

impl<D: Dialect> Drop for Checkout<D> {
    fn drop(&mut self) {
        if !self.finished {
            self.conn.close_on_drop();
        }
    }
}
