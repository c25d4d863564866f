//! Group commit in the SQL store: many calls' statements in one round trip and one commit.

use super::dialect::{Answers, BoxFuture, Statements, Values, Writes};
use super::{Connection, Dialect, Driver, SqlStore};
use crate::error::StoreError;
use crate::store::{
    Claim, Combined, CombinedAnswers, Finalize, Heartbeat, Release, Reservation, TxStatements,
    every,
};

/// One item's statements on a connection (in autocommit, or inside a batch's transaction).
pub(super) trait Each<D: Dialect, I, O>:
    for<'c> Fn(
        &'c SqlStore<D>,
        &'c mut Connection<D>,
        &'c I,
    ) -> BoxFuture<'c, Result<O, StoreError>>
    + Send
    + Sync
{
}

impl<D: Dialect, I, O, F> Each<D, I, O> for F where
    F: for<'c> Fn(
            &'c SqlStore<D>,
            &'c mut Connection<D>,
            &'c I,
        ) -> BoxFuture<'c, Result<O, StoreError>>
        + Send
        + Sync
{
}

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
        each: impl Each<D, I, O>,
    ) -> Vec<Result<O, StoreError>>
    where
        I: Sync,
        O: Send,
    {
        let mut conn = match self.checkout().await {
            Ok(conn) => conn,
            Err(e) => return every(items.len(), &e),
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
            answered(one.await, items.len())
        } else {
            let in_transaction = async {
                let mut tx = sqlx::Connection::begin_with(&mut *conn, super::begin::<D>()).await?;
                let out = self.each_of(&mut tx, items, &each).await?;
                tx.commit().await?;
                Ok::<_, StoreError>(out)
            };
            in_transaction.await
        };
        let failure = match conn.finish(batched) {
            Ok(answers) => return answers,
            Err(e) => e,
        };
        if !refused(&failure) {
            return every(items.len(), &failure);
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

    /// The batches of several verbs in one transaction, for a database with one writer at a
    /// time: one commit for all of them, where each verb's batch would otherwise wait for the
    /// others' commits. Inside it each verb's batch runs as it would alone (one statement
    /// where the dialect has one), results first and reservations last. If the database
    /// refuses one of its statements, the transaction rolls back and each verb's batch runs
    /// again on its own (and so, if it is refused again, row by row); if it fails for the
    /// connection, every item does.
    pub(super) async fn combined(&self, batches: Combined<'_>) -> CombinedAnswers {
        let verbs = [
            batches.reserve.len(),
            batches.finalize.len(),
            batches.heartbeat.len(),
            batches.release.len(),
        ];
        if verbs.iter().filter(|n| **n > 0).count() < 2 {
            // One verb: its own batch, with its single-statement form when alone.
            return batches.run_each(self).await;
        }
        let mut conn = match self.checkout().await {
            Ok(conn) => conn,
            Err(e) => return CombinedAnswers::every(&batches, &e),
        };
        let together = async {
            let mut tx = sqlx::Connection::begin_with(&mut *conn, super::begin::<D>()).await?;
            let heartbeat = self
                .statements_of(
                    &mut tx,
                    batches.heartbeat,
                    Self::heartbeat_as_one,
                    Self::heartbeat_each,
                )
                .await?;
            let finalize = self
                .statements_of(
                    &mut tx,
                    batches.finalize,
                    Self::finalize_as_one,
                    Self::finalize_each,
                )
                .await?;
            let release = self
                .statements_of(
                    &mut tx,
                    batches.release,
                    Self::release_as_one,
                    Self::release_each,
                )
                .await?;
            let reserve = self
                .statements_of(
                    &mut tx,
                    batches.reserve,
                    Self::reserve_as_one,
                    Self::reserve_each,
                )
                .await?;
            tx.commit().await?;
            Ok::<_, StoreError>(CombinedAnswers {
                reserve,
                finalize,
                heartbeat,
                release,
            })
        };
        let together = together.await;
        let failure = match conn.finish(together) {
            Ok(answers) => {
                self.reserved_in_batch(batches.reserve.len(), &answers.reserve);
                return answers;
            }
            Err(e) => e,
        };
        if !refused(&failure) {
            return CombinedAnswers::every(&batches, &failure);
        }
        tracing::debug!(backend = D::BACKEND, error = %failure, rows = batches.len(),
            "idem: a combined batch failed on a statement; running each verb's batch on its own");
        crate::metrics::batch_split(D::BACKEND);
        batches.run_each(self).await
    }

    /// A batch's statements on `conn`, inside a transaction already open: as one statement
    /// where the dialect has one, or else one per item. An error is the whole batch's (the
    /// transaction is then rolled back).
    async fn statements_of<I, O>(
        &self,
        conn: &mut Connection<D>,
        items: &[I],
        as_one: AsOne<D, I, O>,
        each: impl Each<D, I, O>,
    ) -> Result<Answers<O>, StoreError>
    where
        I: Sync,
        O: Send,
    {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(one) = as_one(conn, &self.sql, items) {
            answered(one.await, items.len())
        } else {
            self.each_of(conn, items, &each).await
        }
    }

    /// Each item's own statements, one after another, on a connection in a transaction.
    async fn each_of<I, O>(
        &self,
        conn: &mut Connection<D>,
        items: &[I],
        each: &impl Each<D, I, O>,
    ) -> Result<Answers<O>, StoreError>
    where
        I: Sync,
        O: Send,
    {
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            out.push(Ok(each(self, conn, item).await?));
        }
        Ok(out)
    }

    /// One item of a batch on its own, in autocommit, sent again after a lost conflict.
    async fn one_by_one<I, O>(&self, item: &I, each: &impl Each<D, I, O>) -> Result<O, StoreError>
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

    /// Counts the records a batch of `sent` reservations acquired (for the store's own
    /// `ANALYZE` as the table fills).
    pub(super) fn reserved_in_batch(&self, sent: usize, out: &[Result<Reservation, StoreError>]) {
        if sent > 1 {
            let acquired = out
                .iter()
                .filter(|r| matches!(r, Ok(Reservation::Acquired)));
            self.analyze_as_it_fills(acquired.count());
        }
    }

    pub(super) fn reserve_as_one<'c>(
        conn: &'c mut Connection<D>,
        sql: &'c Statements,
        claims: &'c [Claim<'_>],
    ) -> Option<BoxFuture<'c, Result<Answers<Reservation>, StoreError>>> {
        D::reserve_as_one(conn, sql, claims)
    }

    pub(super) fn finalize_as_one<'c>(
        conn: &'c mut Connection<D>,
        sql: &'c Statements,
        items: &'c [Finalize<'_>],
    ) -> Option<BoxFuture<'c, Result<Answers<bool>, StoreError>>> {
        D::write_as_one(conn, sql, Writes::Finalize(items))
    }

    pub(super) fn heartbeat_as_one<'c>(
        conn: &'c mut Connection<D>,
        sql: &'c Statements,
        items: &'c [Heartbeat<'_>],
    ) -> Option<BoxFuture<'c, Result<Answers<bool>, StoreError>>> {
        D::write_as_one(conn, sql, Writes::Heartbeat(items))
    }

    pub(super) fn release_as_one<'c>(
        conn: &'c mut Connection<D>,
        sql: &'c Statements,
        items: &'c [Release<'_>],
    ) -> Option<BoxFuture<'c, Result<Answers<bool>, StoreError>>> {
        D::write_as_one(conn, sql, Writes::Release(items))
    }

    /// A reservation's own statements. Inside a batch's transaction a conflicting row is read
    /// the way a transaction must read it (a locking read on MySQL).
    pub(super) fn reserve_each<'c>(
        &'c self,
        conn: &'c mut Connection<D>,
        claim: &'c Claim<'_>,
    ) -> BoxFuture<'c, Result<Reservation, StoreError>> {
        Box::pin(async move {
            match &self.sql.insert_or_load {
                Some(_) => self.reserve_on(conn, claim).await,
                None => {
                    let load = &self.sql.load_in_transaction;
                    self.insert_then_load(conn, claim, load).await
                }
            }
        })
    }

    pub(super) fn finalize_each<'c>(
        &'c self,
        conn: &'c mut Connection<D>,
        f: &'c Finalize<'_>,
    ) -> BoxFuture<'c, Result<bool, StoreError>> {
        Box::pin(self.finalize_in(conn, f.id, f.fence, f.result, f.ttl))
    }

    pub(super) fn heartbeat_each<'c>(
        &'c self,
        conn: &'c mut Connection<D>,
        h: &'c Heartbeat<'_>,
    ) -> BoxFuture<'c, Result<bool, StoreError>> {
        Box::pin(async move {
            let values = Values {
                lease: Some(h.lease),
                ..Values::fenced(h.id, h.fence)
            };
            let done = D::Db::execute(conn, &self.sql.heartbeat, values).await;
            Ok(done.map_err(|e| self.error(e))? == 1)
        })
    }

    pub(super) fn release_each<'c>(
        &'c self,
        conn: &'c mut Connection<D>,
        r: &'c Release<'_>,
    ) -> BoxFuture<'c, Result<bool, StoreError>> {
        Box::pin(self.release_in(conn, r.id, r.fence))
    }
}

/// A one-statement batch's answers, which must be one per item.
fn answered<O>(
    answers: Result<Answers<O>, StoreError>,
    items: usize,
) -> Result<Answers<O>, StoreError> {
    let answers = answers?;
    if answers.len() == items {
        return Ok(answers);
    }
    let e = format!("the batch answered {} of {items} rows", answers.len());
    Err(StoreError::msg(e).maybe_applied())
}

/// Whether a batch failed on a statement the database refused (and so rolled back): only
/// such a batch runs again, on smaller pieces; one that may have been applied is never sent
/// twice.
fn refused(failure: &StoreError) -> bool {
    !failure.is_timeout()
        && matches!(
            failure.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::Database(_))
        )
}

/// A dialect's one-statement form of a batch, if it has one.
pub(super) type AsOne<D, I, O> =
    for<'c> fn(
        &'c mut Connection<D>,
        &'c Statements,
        &'c [I],
    ) -> Option<BoxFuture<'c, Result<Answers<O>, StoreError>>>;
