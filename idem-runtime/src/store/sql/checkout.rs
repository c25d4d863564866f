//! A pooled connection lent to one verb, closed rather than pooled if the verb is cut short.

use super::{Connection, Dialect, SqlStore};
use crate::error::StoreError;

impl<D: Dialect> SqlStore<D> {
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
