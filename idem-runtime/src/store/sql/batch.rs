//! Group commit in the SQL store: many calls' statements in one round trip and one commit.

use super::dialect::{Answers, BoxFuture, Statements};
use super::{Connection, Dialect, SqlStore};
use crate::error::StoreError;

impl<D: Dialect> SqlStore<D> {
    /// Runs a batch: as one statement where the dialect has one (`as_one`), or else one
    /// statement per item in one transaction; either way one commit for the batch (group
    /// commit), items in the order given (the engine sorts them by record, so batches lock
    /// rows in one global order). If the batch fails on a statement (the database refused one
    /// row, or the batch lost a deadlock), each item runs again on its own, so one row's
    /// failure never fails the others; if it fails for the connection, every item does.
    pub(super) async fn batch<I, O>(
        &self,
        items: &[I],
        as_one: AsOne<D, I, O>,
        each: impl for<'c> Fn(
            &'c Self,
            &'c mut Connection<D>,
            &'c I,
        ) -> BoxFuture<'c, Result<O, StoreError>>
        + Send
        + Sync,
    ) -> Vec<Result<O, StoreError>>
    where
        I: Sync,
        O: Send,
    {
        let mut conn = match self.checkout().await {
            Ok(conn) => conn,
            Err(e) => return items.iter().map(|_| Err(e.clone())).collect(),
        };
        if let [item] = items {
            // Alone: its own statement, in autocommit, one round trip.
            let out = each(self, &mut conn, item).await;
            let out = conn.finish(out);
            if matches!(&out, Err(e) if e.is_transaction_conflict()) {
                return vec![self.one_by_one(item, &each).await];
            }
            return vec![out];
        }
        let batched = if let Some(one) = as_one(&mut conn, &self.sql, items) {
            match one.await {
                Ok(answers) if answers.len() == items.len() => Ok(answers),
                Ok(answers) => {
                    let e = format!(
                        "the batch answered {} of {} rows",
                        answers.len(),
                        items.len()
                    );
                    Err(StoreError::msg(e).maybe_applied())
                }
                Err(e) => Err(e),
            }
        } else {
            let in_transaction = async {
                let mut tx = sqlx::Connection::begin_with(&mut *conn, D::BEGIN).await?;
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    out.push(each(self, &mut tx, item).await?);
                }
                tx.commit().await?;
                Ok::<_, StoreError>(out.into_iter().map(Ok).collect())
            };
            in_transaction.await
        };
        let failure = match conn.finish(batched) {
            Ok(answers) => return answers,
            Err(e) => e,
        };
        // Only a statement the database refused (and so rolled back) runs again row by row;
        // one that may have been applied is never sent twice.
        if failure.is_timeout()
            || !matches!(
                failure.downcast_ref::<sqlx::Error>(),
                Some(sqlx::Error::Database(_))
            )
        {
            return items.iter().map(|_| Err(failure.clone())).collect();
        }
        tracing::debug!(backend = D::BACKEND, error = %failure, rows = items.len(),
            "idem: a batch failed on a statement; running its rows one by one");
        crate::metrics::batch_split(D::BACKEND);
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            out.push(self.one_by_one(item, &each).await);
        }
        out
    }

    /// One item of a batch on its own, in autocommit, sent again after a lost conflict.
    async fn one_by_one<I, O>(
        &self,
        item: &I,
        each: &(
             impl for<'c> Fn(
            &'c Self,
            &'c mut Connection<D>,
            &'c I,
        ) -> BoxFuture<'c, Result<O, StoreError>>
             + Send
             + Sync
         ),
    ) -> Result<O, StoreError>
    where
        I: Sync,
        O: Send,
    {
        self.again_after_conflicts(|| async move {
            let mut conn = self.checkout().await?;
            let result = each(self, &mut conn, item).await;
            conn.finish(result)
        })
        .await
    }
}

/// A dialect's one-statement form of a batch, if it has one.
pub(super) type AsOne<D, I, O> =
    for<'c> fn(
        &'c mut Connection<D>,
        &'c Statements,
        &'c [I],
    ) -> Option<BoxFuture<'c, Result<Answers<O>, StoreError>>>;
