//! Keeping the table: its migrations, run by one replica at a time under the dialect's lock,
//! and the purge of expired rows.

use std::sync::atomic::Ordering;

use super::dialect::{Driver, Values};
use super::{Connection, Dialect, SqlStore, statement};

/// How many rows reserved in batches trigger an `ANALYZE` of a table as it first fills.
const ANALYZE_AT: [u64; 3] = [4_096, 32_768, 262_144];

/// How long that `ANALYZE` may take before it is abandoned (the statement carries the same
/// limit to the server).
pub(super) const ANALYZE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

impl<D: Dialect> SqlStore<D> {
    /// Brings the table to the newest migration, one replica at a time.
    pub(super) async fn migrate(&self) -> Result<(), sqlx::Error> {
        let sql = &*self.sql;
        let mut conn = self.pool.acquire().await?;
        let mut tx = sqlx::Connection::begin_with(&mut *conn, super::begin::<D>()).await?;
        // Replicas starting together would race on `CREATE TABLE`; one migrates at a time.
        if let Some(lock) = &sql.lock {
            let held = D::Db::fetch_integer(&mut tx, lock, self.lock()).await?;
            if held != Some(1) {
                return Err(sqlx::Error::Protocol(format!(
                    "could not take the migration lock for table {}",
                    self.table
                )));
            }
        }
        let done = match self.run_migrations(&mut tx).await {
            Ok(()) => tx.commit().await,
            Err(e) => {
                drop(tx); // rolled back
                Err(e)
            }
        };
        if let Some(unlock) = &sql.unlock {
            D::Db::execute(&mut conn, unlock, self.lock()).await?;
        }
        done
    }

    pub(super) async fn run_migrations(&self, conn: &mut Connection<D>) -> Result<(), sqlx::Error> {
        let sql = &*self.sql;
        let table = Values {
            table: Some(&self.table),
            ..Values::default()
        };
        D::Db::execute(conn, &sql.create_schema, Values::default()).await?;
        let recorded = D::Db::fetch_integer(conn, &sql.schema_version, table).await?;
        // A table dropped by hand starts again from the first migration.
        let exists = D::Db::fetch_integer(conn, &sql.table_exists, table).await? == Some(1);
        let current = if exists { recorded.unwrap_or(0) } else { 0 };
        for (step, version) in D::migrations().iter().zip(1i64..) {
            if version <= current {
                continue;
            }
            D::Db::execute_script(conn, statement(step, &self.table)).await?;
            let record = Values {
                version: Some(version),
                ..table
            };
            D::Db::execute(conn, &sql.record_version, record).await?;
        }
        Ok(())
    }

    /// Refreshes the table's statistics in the background when the rows this store has
    /// reserved in batches pass one of `ANALYZE_AT` (PostgreSQL). Each batched statement is
    /// planned once per connection and its plan kept until the table's statistics change; a
    /// plan made while the table was nearly empty scans the whole table, on every batch, as the
    /// table grows, until autovacuum gets round to it (a minute or more). `ANALYZE` makes every
    /// session plan again, from a table large enough for key lookups to win. Skipped when the
    /// statistics already count that many rows (a long-lived table), when the store's role
    /// does not own the table, and when another session holds a conflicting lock (a migration,
    /// another replica's `ANALYZE`).
    pub(super) fn analyze_as_it_fills(&self, acquired: usize) {
        let Some(many) = &self.sql.many else {
            return;
        };
        let acquired = acquired as u64;
        let before = self.batched.fetch_add(acquired, Ordering::Relaxed);
        let after = before.saturating_add(acquired);
        let Some(&threshold) = ANALYZE_AT.iter().find(|&&at| before < at && at <= after) else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, many) = (self.clone(), many.clone());
        rt.spawn(async move {
            let table = store.table.clone();
            let analyzed = async {
                let mut conn = store.pool.acquire().await?;
                let values = Values {
                    limit: Some(threshold as i64),
                    ..Values::default()
                };
                let should = D::Db::fetch_integer(&mut conn, &many.should_analyze, values).await?;
                if should == Some(1) {
                    D::Db::execute_script(&mut conn, many.analyze).await?;
                }
                Ok::<_, sqlx::Error>(should)
            };
            // Bounded: a connection of the pool is not held for long by housekeeping.
            match tokio::time::timeout(ANALYZE_PATIENCE, analyzed).await {
                Ok(Ok(Some(1))) => tracing::debug!(table, rows = after, "idem: analyzed the records table as it fills (unless another session held it)"),
                Ok(Ok(Some(2))) => tracing::info!(table, "idem: the store's role does not own the records table, so the store leaves analyzing it to autovacuum"),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::info!(table, error = %e, "idem: could not analyze the records table as it fills; autovacuum will, later"),
                Err(_) => tracing::info!(table, "idem: analyzing the records table took too long and was abandoned; autovacuum will do it"),
            }
        });
    }

    /// Deletes up to `limit` expired rows, if this replica gets the purge lock.
    pub(super) async fn purge_on(
        &self,
        conn: &mut Connection<D>,
        limit: u32,
    ) -> Result<u64, sqlx::Error> {
        let sql = &*self.sql;
        let purged = async {
            let mut tx = sqlx::Connection::begin_with(&mut *conn, super::begin::<D>()).await?;
            // One replica purges a table at a time: the others find the lock taken and skip.
            if let Some(try_lock) = &sql.try_lock
                && D::Db::fetch_integer(&mut tx, try_lock, self.lock()).await? != Some(1)
            {
                return Ok(None);
            }
            let limit = Values {
                limit: Some(i64::from(limit)),
                ..Values::default()
            };
            let deleted = D::Db::execute(&mut tx, &sql.purge, limit).await?;
            tx.commit().await?;
            Ok(Some(deleted))
        }
        .await;
        let deleted = match purged {
            Ok(None) => return Ok(0),
            Ok(Some(n)) => Ok(n),
            Err(e) => Err(e),
        };
        if let Some(unlock) = &sql.unlock {
            D::Db::execute(conn, unlock, self.lock()).await?;
        }
        deleted
    }
}
