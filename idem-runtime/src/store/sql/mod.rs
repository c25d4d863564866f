//! One SQL store, written once over a [`Dialect`]: PostgreSQL, MySQL/MariaDB and SQLite.
//!
//! [`SqlStore`] runs the protocol's statements, the migrations and the purge for any dialect;
//! a dialect file (`postgres.rs`, `mysql.rs`, `sqlite.rs`) holds only what differs: statement
//! texts, the clock expression inside them, the lock, the migrations and the error codes, plus
//! how a pool is opened. [`PgStore`](crate::store::PgStore), `MySqlStore` and `SqliteStore` are
//! `SqlStore` with their dialect. To add a database, write a dialect file (copy the closest
//! one) and run the store conformance suite against it.
//!
//! Every time comparison and every `now + lease` happens in the database, with its clock, so
//! replicas with skewed clocks agree on who owns a record. Writes after `reserve` are fenced:
//! they change a row only while it holds the caller's fence and is in progress.

mod batch;
mod checkout;
mod connect;
mod dialect;
mod maintain;
#[cfg(feature = "mysql")]
pub(crate) mod mysql;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
mod record;
#[cfg(feature = "sqlite")]
pub(crate) mod sqlite;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use sqlx::{AssertSqlSafe, SqlStr};

#[cfg(any(feature = "postgres", feature = "mysql"))]
pub use connect::ServerStoreOptions;
pub(crate) use connect::{check_table_name, unavailable};
pub use dialect::Dialect;
use dialect::sealed::Sealed;
use dialect::{Conflict, Driver, Inserted, Statement, Statements, Values};
#[cfg(feature = "mysql")]
pub use mysql::MySql;
#[cfg(feature = "postgres")]
pub use postgres::Postgres;
#[cfg(feature = "sqlite")]
pub use sqlite::{Sqlite, SqliteStoreOptions};

use crate::Error;
use crate::error::StoreError;
use crate::key::RecordId;
use crate::store::{
    Claim, Combined, CombinedAnswers, Fence, Finalize, Heartbeat, Record, Release, Reservation,
    Store, StoredResult, TxStatements,
};
pub(crate) use record::{RawRecord, millis};

/// A [`Store`] in a SQL table, for the database `D` ([`Postgres`], [`MySql`] or [`Sqlite`]).
///
/// Use it by its database's name: [`PgStore`](crate::store::PgStore),
/// [`MySqlStore`](crate::store::MySqlStore) or [`SqliteStore`](crate::store::SqliteStore).
pub struct SqlStore<D: Dialect> {
    pool: sqlx::Pool<D::Db>,
    table: String,
    lock_name: String,
    sql: Arc<Statements>,
    /// Rows this store has reserved in batches (see `analyze_as_it_fills`).
    batched: Arc<AtomicU64>,
}

impl<D: Dialect> Clone for SqlStore<D> {
    fn clone(&self) -> Self {
        SqlStore {
            pool: self.pool.clone(),
            table: self.table.clone(),
            lock_name: self.lock_name.clone(),
            sql: self.sql.clone(),
            batched: self.batched.clone(),
        }
    }
}

impl<D: Dialect> std::fmt::Debug for SqlStore<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore")
            .field("backend", &D::BACKEND)
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

pub(crate) type Connection<D> = <<D as Sealed>::Db as sqlx::Database>::Connection;

impl<D: Dialect> SqlStore<D> {
    /// Uses an existing pool (for example the application's own), keeping records in
    /// `table`, which is created if missing.
    pub async fn from_pool(pool: sqlx::Pool<D::Db>, table: &str) -> Result<SqlStore<D>, Error> {
        check_table_name(table)?;
        let store = SqlStore {
            pool,
            table: table.to_string(),
            lock_name: D::lock_name(table),
            sql: Arc::new(D::statements(table)),
            batched: Arc::default(),
        };
        store.migrate().await.map_err(unavailable::<D>)?;
        Ok(store)
    }

    /// The connection pool.
    pub fn pool(&self) -> &sqlx::Pool<D::Db> {
        &self.pool
    }

    /// The records table.
    pub fn table(&self) -> &str {
        &self.table
    }

    fn lock(&self) -> Values<'_> {
        Values {
            lock_name: Some(&self.lock_name),
            ..Values::default()
        }
    }

    /// The record after an insert conflicted, read on `conn`.
    async fn load_on(
        &self,
        conn: &mut Connection<D>,
        st: &Statement,
        id: &RecordId,
    ) -> Result<Reservation, StoreError> {
        Ok(
            match D::Db::fetch_record(conn, st, Values::record(id)).await? {
                Some(raw) => Reservation::Exists(raw.into_record()?),
                None => Reservation::Vanished,
            },
        )
    }

    /// Insert if absent on `conn`; after a conflict, the record read with `load`.
    async fn insert_then_load(
        &self,
        conn: &mut Connection<D>,
        claim: &Claim<'_>,
        load: &Statement,
    ) -> Result<Reservation, StoreError> {
        let sql = &*self.sql;
        match D::Db::execute(conn, &sql.insert, Values::claim(claim)).await {
            Ok(1) => Ok(Reservation::Acquired),
            Ok(_) if sql.conflict == Conflict::NoRows => self.load_on(conn, load, claim.id).await,
            Err(sqlx::Error::Database(e))
                if sql.conflict == Conflict::Fails && e.is_unique_violation() =>
            {
                self.load_on(conn, load, claim.id).await
            }
            Ok(n) => Err(StoreError::msg(format!("the insert changed {n} rows"))),
            Err(e) => Err(self.error(e)),
        }
    }

    fn error(&self, e: sqlx::Error) -> StoreError {
        store_error::<D>(e)
    }

    async fn reserve_on(
        &self,
        conn: &mut Connection<D>,
        claim: &Claim<'_>,
    ) -> Result<Reservation, StoreError> {
        let Some(one_statement) = &self.sql.insert_or_load else {
            return self.insert_then_load(conn, claim, &self.sql.load).await;
        };
        let values = Values::claim(claim);
        let inserted = D::Db::fetch_inserted(conn, one_statement, values).await;
        Ok(match inserted.map_err(|e| self.error(e))? {
            Some(Inserted::Yes) => Reservation::Acquired,
            Some(Inserted::No(raw)) => Reservation::Exists(raw.into_record()?),
            // The insert conflicted with a row committed after the statement's snapshot, which
            // the read could not see either: reserving again will find it.
            None => Reservation::Vanished,
        })
    }
}

/// A sqlx error as a store error, marked as a lost conflict where the dialect says so.
fn store_error<D: Dialect>(e: sqlx::Error) -> StoreError {
    let conflict = D::is_conflict(&e);
    StoreError::new(e).conflicting(conflict)
}

impl<D: Dialect> SqlStore<D> {
    /// A fixed statement without parameters on `conn`.
    async fn script_in(
        &self,
        conn: &mut Connection<D>,
        sql: &'static str,
    ) -> Result<(), StoreError> {
        let sql = sqlx::SqlSafeStr::into_sql_str(AssertSqlSafe(sql));
        D::Db::execute_script(conn, sql)
            .await
            .map_err(|e| self.error(e))
    }
}

#[async_trait::async_trait]
impl<D: Dialect> TxStatements<D::Db> for SqlStore<D> {
    async fn begin(&self) -> Result<sqlx::Transaction<'static, D::Db>, StoreError> {
        self.pool
            .begin_with(begin::<D>())
            .await
            .map_err(|e| self.error(e))
    }

    async fn reserve_in(
        &self,
        conn: &mut Connection<D>,
        claim: &Claim<'_>,
    ) -> Result<Reservation, StoreError> {
        self.insert_then_load(conn, claim, &self.sql.load_in_transaction)
            .await
    }

    async fn mark_in(&self, conn: &mut Connection<D>) -> Result<(), StoreError> {
        self.script_in(conn, "SAVEPOINT idem_layer").await
    }

    async fn check_in(&self, conn: &mut Connection<D>) -> Result<(), StoreError> {
        self.script_in(conn, "RELEASE SAVEPOINT idem_layer").await
    }

    async fn take_over_in(
        &self,
        conn: &mut Connection<D>,
        claim: &Claim<'_>,
        observed: Fence,
    ) -> Result<bool, StoreError> {
        let values = Values {
            observed: Some(observed),
            ..Values::claim(claim)
        };
        let done = D::Db::execute(conn, &self.sql.take_over, values).await;
        Ok(done.map_err(|e| self.error(e))? == 1)
    }

    async fn finalize_in(
        &self,
        conn: &mut Connection<D>,
        id: &RecordId,
        fence: Fence,
        result: &StoredResult,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let values = Values {
            result: Some(result),
            ttl: Some(ttl),
            ..Values::fenced(id, fence)
        };
        let done = D::Db::execute(conn, &self.sql.finalize, values).await;
        Ok(done.map_err(|e| self.error(e))? == 1)
    }

    async fn release_in(
        &self,
        conn: &mut Connection<D>,
        id: &RecordId,
        fence: Fence,
    ) -> Result<bool, StoreError> {
        let values = Values::fenced(id, fence);
        let done = D::Db::execute(conn, &self.sql.release, values).await;
        Ok(done.map_err(|e| self.error(e))? == 1)
    }
}

#[async_trait::async_trait]
impl<D: Dialect> Store for SqlStore<D> {
    async fn reserve(&self, claim: &Claim<'_>) -> Result<Reservation, StoreError> {
        self.again_after_conflicts(|| async move {
            let mut conn = self.checkout().await?;
            let out = self.reserve_on(&mut conn, claim).await;
            conn.finish(out)
        })
        .await
    }

    async fn load(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        let mut conn = self.checkout().await?;
        let raw = D::Db::fetch_record(&mut conn, &self.sql.load, Values::record(id)).await;
        let raw = conn.finish(raw).map_err(|e| self.error(e))?;
        raw.map(RawRecord::into_record).transpose()
    }

    async fn take_over(&self, claim: &Claim<'_>, observed: Fence) -> Result<bool, StoreError> {
        self.again_after_conflicts(|| async move {
            let mut conn = self.checkout().await?;
            let out = self.take_over_in(&mut conn, claim, observed).await;
            conn.finish(out)
        })
        .await
    }

    async fn heartbeat(
        &self,
        id: &RecordId,
        fence: Fence,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.again_after_conflicts(|| async move {
            let mut conn = self.checkout().await?;
            let values = Values {
                lease: Some(lease),
                ..Values::fenced(id, fence)
            };
            let done = D::Db::execute(&mut conn, &self.sql.heartbeat, values).await;
            Ok(conn.finish(done).map_err(|e| self.error(e))? == 1)
        })
        .await
    }

    async fn finalize(
        &self,
        id: &RecordId,
        fence: Fence,
        result: &StoredResult,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.again_after_conflicts(|| async move {
            let mut conn = self.checkout().await?;
            let out = self.finalize_in(&mut conn, id, fence, result, ttl).await;
            conn.finish(out)
        })
        .await
    }

    async fn release(&self, id: &RecordId, fence: Fence) -> Result<bool, StoreError> {
        self.again_after_conflicts(|| async move {
            let mut conn = self.checkout().await?;
            let out = self.release_in(&mut conn, id, fence).await;
            conn.finish(out)
        })
        .await
    }

    async fn reserve_many(&self, claims: &[Claim<'_>]) -> Vec<Result<Reservation, StoreError>> {
        let out = self
            .batch(claims, Self::reserve_as_one, Self::reserve_each)
            .await;
        self.reserved_in_batch(claims.len(), &out);
        out
    }

    async fn finalize_many(&self, items: &[Finalize<'_>]) -> Vec<Result<bool, StoreError>> {
        self.batch(items, Self::finalize_as_one, Self::finalize_each)
            .await
    }

    async fn heartbeat_many(&self, items: &[Heartbeat<'_>]) -> Vec<Result<bool, StoreError>> {
        self.batch(items, Self::heartbeat_as_one, Self::heartbeat_each)
            .await
    }

    async fn release_many(&self, items: &[Release<'_>]) -> Vec<Result<bool, StoreError>> {
        self.batch(items, Self::release_as_one, Self::release_each)
            .await
    }

    fn combine_verbs(&self) -> bool {
        D::COMBINE_VERBS
    }

    async fn run_combined(&self, batches: Combined<'_>) -> CombinedAnswers {
        if D::COMBINE_VERBS {
            self.combined(batches).await
        } else {
            batches.run_each(self).await
        }
    }

    fn group_commit(&self) -> bool {
        true
    }

    fn batch_concurrency(&self) -> usize {
        D::BATCH_CONCURRENCY
    }

    async fn purge(&self, limit: u32) -> Result<u64, StoreError> {
        self.again_after_conflicts(|| async move {
            let mut conn = self.checkout().await?;
            let out = self.purge_on(&mut conn, limit).await;
            conn.finish(out).map_err(|e| self.error(e))
        })
        .await
    }

    fn backend(&self) -> &'static str {
        D::BACKEND
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

impl From<sqlx::Error> for StoreError {
    /// A sqlx error, marked as a lost conflict if any compiled-in dialect reads it as one.
    fn from(err: sqlx::Error) -> Self {
        let conflict = is_conflict(&err);
        StoreError::new(err).conflicting(conflict)
    }
}

/// Whether any compiled-in dialect reads `err` as a lost conflict with a concurrent
/// transaction (for errors made into store errors without knowing their database).
pub(crate) fn is_conflict(err: &sqlx::Error) -> bool {
    #[cfg(feature = "postgres")]
    if Postgres::is_conflict(err) {
        return true;
    }
    #[cfg(feature = "mysql")]
    if MySql::is_conflict(err) {
        return true;
    }
    #[cfg(feature = "sqlite")]
    if Sqlite::is_conflict(err) {
        return true;
    }
    let _ = err;
    false
}

/// The dialect's `BEGIN`, as an owned statement: a `&'static str` handed to sqlx's
/// `begin_with` made every future that awaits it fail to prove `Send` for `tokio::spawn`
/// (the compiler cannot see the `'static` through the future's generics).
pub(crate) fn begin<D: Dialect>() -> SqlStr {
    sqlx::SqlSafeStr::into_sql_str(D::BEGIN)
}

/// A statement with the table name filled in, ready to hand to `sqlx::query` many times.
pub(crate) fn statement(template: &str, table: &str) -> SqlStr {
    let sql: Arc<str> = Arc::from(template.replace("{t}", table));
    sqlx::SqlSafeStr::into_sql_str(AssertSqlSafe(sql))
}

/// The records table and its expiry index, for the dialects whose DDL differs only in column
/// types: bytes, 64-bit integers, 32-bit integers and times. (MySQL, whose DDL also differs in
/// shape, writes its own.)
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) fn records_table(bytes: &str, int64: &str, int32: &str, time: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {{t}} (
            namespace {bytes} NOT NULL, key {bytes} NOT NULL, state TEXT NOT NULL,
            fingerprint {bytes}, fence {int64} NOT NULL, owner TEXT NOT NULL,
            lease_expires_at {time}, heartbeat_at {time}, attempts {int32} NOT NULL,
            result {bytes}, codec TEXT,
            created_at {time} NOT NULL, completed_at {time}, expires_at {time} NOT NULL,
            PRIMARY KEY (namespace, key)
        );
        CREATE INDEX IF NOT EXISTS {{t}}_expires_at ON {{t}} (expires_at);"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The placeholders in `sql`: the highest `$n`/`?n` index, or the number of bare `?`.
    fn placeholders(sql: &str) -> usize {
        let bytes = sql.as_bytes();
        let (mut bare, mut highest) = (0, 0);
        for (i, b) in bytes.iter().enumerate() {
            if *b != b'$' && *b != b'?' {
                continue;
            }
            let digits: String = sql[i + 1..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            match digits.parse::<usize>() {
                Ok(n) => highest = highest.max(n),
                Err(_) if *b == b'?' => bare += 1,
                Err(_) => {}
            }
        }
        bare.max(highest)
    }

    fn each_statement(sql: &Statements) -> Vec<(&'static str, &Statement)> {
        let mut all = vec![
            ("insert", &sql.insert),
            ("load", &sql.load),
            ("load_in_transaction", &sql.load_in_transaction),
            ("take_over", &sql.take_over),
            ("heartbeat", &sql.heartbeat),
            ("finalize", &sql.finalize),
            ("release", &sql.release),
            ("purge", &sql.purge),
            ("create_schema", &sql.create_schema),
            ("schema_version", &sql.schema_version),
            ("table_exists", &sql.table_exists),
            ("record_version", &sql.record_version),
        ];
        for (name, st) in [
            ("insert_or_load", &sql.insert_or_load),
            ("lock", &sql.lock),
            ("try_lock", &sql.try_lock),
            ("unlock", &sql.unlock),
        ] {
            if let Some(st) = st {
                all.push((name, st));
            }
        }
        all
    }

    /// Every statement binds exactly as many parameters as its text has placeholders, so a
    /// dialect file cannot drift out of step with its parameter lists.
    #[test]
    fn every_statement_binds_each_placeholder() {
        let mut dialects: Vec<(&str, Statements)> = Vec::new();
        #[cfg(feature = "postgres")]
        dialects.push(("postgres", Postgres::statements("t")));
        #[cfg(feature = "mysql")]
        dialects.push(("mysql", MySql::statements("t")));
        #[cfg(feature = "sqlite")]
        dialects.push(("sqlite", Sqlite::statements("t")));
        for (dialect, sql) in &dialects {
            for (name, st) in each_statement(sql) {
                assert_eq!(
                    placeholders(st.sql.as_str()),
                    st.params.len(),
                    "{dialect} {name}: {}",
                    st.sql.as_str()
                );
            }
        }
    }
}
