//! The shared store for many replicas on MySQL or MariaDB (InnoDB).
//!
//! Times come from the database server (`UTC_TIMESTAMP(6)`, independent of session time
//! zones). `reserve` is a plain `INSERT`: a duplicate-key error means the record exists,
//! which is then read. (`INSERT IGNORE` would also hide truncation and other errors, and the
//! affected-row count of `ON DUPLICATE KEY UPDATE` cannot tell "inserted" from "found" with
//! the `FOUND_ROWS` flag the driver sets.) Fenced updates compare on the primary key, the
//! fence and the state, so they lock one row and match at most one.

use std::time::Duration;

use sqlx::MySql;
use sqlx::mysql::{MySqlConnection, MySqlPool, MySqlRow};
use sqlx::{Row, SqlStr};

use super::sql::{
    RawRecord, ServerStoreOptions, check_table_name, connect_pool, millis, statement, unavailable,
    with_claim, with_id,
};
use super::{Claim, Fence, Record, Reservation, Store, StoredResult, TxStatements};
use crate::Error;
use crate::error::StoreError;
use crate::key::RecordId;

/// A [`Store`] in a MySQL or MariaDB table, shared by every replica that points at it.
///
/// ```no_run
/// # async fn demo() -> Result<(), idem_runtime::Error> {
/// use idem_runtime::{Idem, store::MySqlStore};
/// let idem = Idem::builder()
///     .store(MySqlStore::connect("mysql://app@db/app").await?)
///     .install()?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct MySqlStore {
    pool: MySqlPool,
    table: String,
    lock_name: String,
    sql: Statements,
}

#[derive(Clone, Debug)]
struct Statements {
    reserve: SqlStr,
    load: SqlStr,
    load_locking: SqlStr,
    take_over: SqlStr,
    heartbeat: SqlStr,
    finalize: SqlStr,
    release: SqlStr,
    purge: SqlStr,
}

const MIGRATIONS: &[&str] = &[
    // 1: the records table and its expiry index. Binary columns: no collation may fold two
    // keys into one (`A` = `a`, trailing spaces).
    "CREATE TABLE IF NOT EXISTS {t} (
        namespace VARBINARY(512) NOT NULL,
        `key` VARBINARY(255) NOT NULL,
        state VARCHAR(16) NOT NULL,
        fingerprint VARBINARY(16) NULL,
        fence BIGINT NOT NULL,
        owner VARCHAR(255) NOT NULL,
        lease_expires_at DATETIME(6) NULL,
        heartbeat_at DATETIME(6) NULL,
        attempts INT NOT NULL,
        result LONGBLOB NULL,
        codec VARCHAR(32) NULL,
        created_at DATETIME(6) NOT NULL,
        completed_at DATETIME(6) NULL,
        expires_at DATETIME(6) NOT NULL,
        PRIMARY KEY (namespace, `key`),
        KEY {t}_expires_at (expires_at)
    ) ENGINE=InnoDB",
];

const NOW: &str = "UTC_TIMESTAMP(6)";

impl MySqlStore {
    /// Connects to `url` with default options and creates the records table if missing.
    pub async fn connect(url: &str) -> Result<MySqlStore, Error> {
        Self::connect_with(url, ServerStoreOptions::default()).await
    }

    /// Connects to `url` with `options`.
    pub async fn connect_with(url: &str, options: ServerStoreOptions) -> Result<MySqlStore, Error> {
        let pool = connect_pool::<MySql>(url, &options, "MySQL").await?;
        Self::from_pool(pool, &options.table).await
    }

    /// Uses an existing pool, keeping records in `table`, which is created if missing.
    pub async fn from_pool(pool: MySqlPool, table: &str) -> Result<MySqlStore, Error> {
        check_table_name(table)?;
        let lock_name = format!("idem:{table}");
        migrate(&pool, table, &lock_name)
            .await
            .map_err(unavailable)?;
        Ok(MySqlStore {
            sql: Statements::new(table),
            pool,
            table: table.to_string(),
            lock_name,
        })
    }

    /// The connection pool.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// The records table.
    pub fn table(&self) -> &str {
        &self.table
    }
}

async fn migrate(pool: &MySqlPool, table: &str, lock_name: &str) -> Result<(), sqlx::Error> {
    // DDL commits implicitly in MySQL, so a transaction cannot serialise replicas starting
    // together; a named lock on one connection does.
    let mut conn = pool.acquire().await?;
    let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 30)")
        .bind(lock_name)
        .fetch_one(&mut *conn)
        .await?;
    if got != Some(1) {
        return Err(sqlx::Error::Protocol(format!(
            "could not take the migration lock {lock_name:?} within 30 s"
        )));
    }
    let result = async {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS idem_schema (table_name VARCHAR(64) PRIMARY KEY, version INT NOT NULL) ENGINE=InnoDB",
        )
        .execute(&mut *conn)
        .await?;
        let recorded: i32 =
            sqlx::query_scalar("SELECT version FROM idem_schema WHERE table_name = ?")
                .bind(table)
                .fetch_optional(&mut *conn)
                .await?
                .unwrap_or(0);
        // A table dropped by hand starts again from the first migration.
        let exists: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = ?",
        )
        .bind(table)
        .fetch_one(&mut *conn)
        .await?;
        let current = if exists > 0 { recorded } else { 0 };
        for (i, step) in MIGRATIONS.iter().enumerate() {
            let version = i as i32 + 1;
            if version <= current {
                continue;
            }
            sqlx::raw_sql(statement(step, table)).execute(&mut *conn).await?;
            sqlx::query(
                "INSERT INTO idem_schema (table_name, version) VALUES (?, ?)
                 ON DUPLICATE KEY UPDATE version = VALUES(version)",
            )
            .bind(table)
            .bind(version)
            .execute(&mut *conn)
            .await?;
        }
        Ok::<_, sqlx::Error>(())
    }
    .await;
    sqlx::query("SELECT RELEASE_LOCK(?)")
        .bind(lock_name)
        .execute(&mut *conn)
        .await?;
    result
}

impl Statements {
    fn new(t: &str) -> Statements {
        let plus = |param: &str| format!("DATE_ADD({NOW}, INTERVAL {param} * 1000 MICROSECOND)");
        let load = format!(
            "SELECT state, fingerprint, fence, owner, attempts,
                TIMESTAMPDIFF(MICROSECOND, {NOW}, lease_expires_at) DIV 1000 AS lease_remaining_ms,
                TIMESTAMPDIFF(MICROSECOND, {NOW}, expires_at) DIV 1000 AS expires_in_ms,
                result, codec
             FROM {{t}} WHERE namespace = ? AND `key` = ?"
        );
        Statements {
            reserve: statement(
                &format!(
                    "INSERT INTO {{t}} (namespace, `key`, state, fingerprint, fence, owner,
                        lease_expires_at, heartbeat_at, attempts, created_at, expires_at)
                     VALUES (?, ?, 'in_progress', ?, ?, ?, {lease}, {NOW}, 1, {NOW}, {lease})",
                    lease = plus("?"),
                ),
                t,
            ),
            load: statement(&load, t),
            load_locking: statement(&format!("{load} LOCK IN SHARE MODE"), t),
            // MySQL evaluates SET assignments left to right, each seeing the ones before:
            // everything that reads the old `state` comes before `state` is changed.
            take_over: statement(
                &format!(
                    "UPDATE {{t}} SET
                        attempts = CASE WHEN state = 'completed' THEN 1 ELSE attempts + 1 END,
                        created_at = CASE WHEN state = 'completed' THEN {NOW} ELSE created_at END,
                        state = 'in_progress', fingerprint = ?, fence = ?, owner = ?,
                        lease_expires_at = {lease}, heartbeat_at = {NOW}, expires_at = lease_expires_at,
                        result = NULL, codec = NULL, completed_at = NULL
                     WHERE namespace = ? AND `key` = ? AND fence = ?
                       AND ((state = 'in_progress' AND lease_expires_at <= {NOW})
                         OR (state = 'completed' AND expires_at <= {NOW}))",
                    lease = plus("?"),
                ),
                t,
            ),
            heartbeat: statement(
                &format!(
                    "UPDATE {{t}} SET lease_expires_at = {lease}, expires_at = lease_expires_at,
                        heartbeat_at = {NOW}
                     WHERE namespace = ? AND `key` = ? AND fence = ? AND state = 'in_progress'",
                    lease = plus("?"),
                ),
                t,
            ),
            finalize: statement(
                &format!(
                    "UPDATE {{t}} SET state = 'completed', result = ?, codec = ?, completed_at = {NOW},
                        expires_at = {ttl}, lease_expires_at = NULL
                     WHERE namespace = ? AND `key` = ? AND fence = ? AND state = 'in_progress'",
                    ttl = plus("?"),
                ),
                t,
            ),
            release: statement(
                "DELETE FROM {t} WHERE namespace = ? AND `key` = ? AND fence = ? AND state = 'in_progress'",
                t,
            ),
            purge: statement(
                &format!("DELETE FROM {{t}} WHERE expires_at <= {NOW} LIMIT ?"),
                t,
            ),
        }
    }
}

fn record(row: &MySqlRow) -> Result<Record, StoreError> {
    RawRecord {
        state: row.try_get("state")?,
        fingerprint: row.try_get("fingerprint")?,
        fence: row.try_get("fence")?,
        owner: row.try_get("owner")?,
        attempts: i64::from(row.try_get::<i32, _>("attempts")?),
        lease_remaining_ms: row.try_get("lease_remaining_ms")?,
        expires_in_ms: row.try_get::<Option<i64>, _>("expires_in_ms")?.unwrap_or(0),
        result: row.try_get("result")?,
        codec: row.try_get("codec")?,
    }
    .into_record()
}

fn fingerprint_bytes(claim: &Claim<'_>) -> Option<Vec<u8>> {
    claim.fingerprint.map(|fp| fp.as_bytes().to_vec())
}

#[async_trait::async_trait]
impl TxStatements<MySql> for MySqlStore {
    async fn reserve_in(
        &self,
        conn: &mut MySqlConnection,
        claim: &Claim<'_>,
    ) -> Result<Reservation, StoreError> {
        let inserted = with_claim(&self.sql.reserve, claim)
            .bind(millis(claim.lease))
            .bind(millis(claim.lease))
            .execute(&mut *conn)
            .await;
        match inserted {
            Ok(_) => Ok(Reservation::Acquired),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                // A locking read: inside a REPEATABLE READ transaction a plain read would
                // use a snapshot older than the row that just made the insert fail.
                let row = with_id(&self.sql.load_locking, claim.id)
                    .fetch_optional(&mut *conn)
                    .await?;
                Ok(match row.as_ref().map(record).transpose()? {
                    Some(record) => Reservation::Exists(record),
                    None => Reservation::Vanished,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn take_over_in(
        &self,
        conn: &mut MySqlConnection,
        claim: &Claim<'_>,
        observed: Fence,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(self.sql.take_over.clone())
            .bind(fingerprint_bytes(claim))
            .bind(claim.fence.get())
            .bind(claim.owner)
            .bind(millis(claim.lease))
            .bind(claim.id.namespace().as_bytes())
            .bind(claim.id.key().as_bytes())
            .bind(observed.get())
            .execute(&mut *conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn finalize_in(
        &self,
        conn: &mut MySqlConnection,
        id: &RecordId,
        fence: Fence,
        result: &StoredResult,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(self.sql.finalize.clone())
            .bind(result.bytes.as_slice())
            .bind(result.codec.as_str())
            .bind(millis(ttl))
            .bind(id.namespace().as_bytes())
            .bind(id.key().as_bytes())
            .bind(fence.get())
            .execute(&mut *conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn release_in(
        &self,
        conn: &mut MySqlConnection,
        id: &RecordId,
        fence: Fence,
    ) -> Result<bool, StoreError> {
        let done = with_id(&self.sql.release, id)
            .bind(fence.get())
            .execute(&mut *conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }
}

#[async_trait::async_trait]
impl Store for MySqlStore {
    async fn reserve(&self, claim: &Claim<'_>) -> Result<Reservation, StoreError> {
        let mut conn = self.pool.acquire().await?;
        self.reserve_in(&mut conn, claim).await
    }

    async fn load(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        let row = with_id(&self.sql.load, id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(record).transpose()
    }

    async fn take_over(&self, claim: &Claim<'_>, observed: Fence) -> Result<bool, StoreError> {
        let mut conn = self.pool.acquire().await?;
        self.take_over_in(&mut conn, claim, observed).await
    }

    async fn heartbeat(
        &self,
        id: &RecordId,
        fence: Fence,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(self.sql.heartbeat.clone())
            .bind(millis(lease))
            .bind(id.namespace().as_bytes())
            .bind(id.key().as_bytes())
            .bind(fence.get())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn finalize(
        &self,
        id: &RecordId,
        fence: Fence,
        result: &StoredResult,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut conn = self.pool.acquire().await?;
        self.finalize_in(&mut conn, id, fence, result, ttl).await
    }

    async fn release(&self, id: &RecordId, fence: Fence) -> Result<bool, StoreError> {
        let mut conn = self.pool.acquire().await?;
        self.release_in(&mut conn, id, fence).await
    }

    async fn purge(&self, limit: u32) -> Result<u64, StoreError> {
        // One replica purges a table at a time: GET_LOCK with no wait, on one connection.
        let mut conn = self.pool.acquire().await?;
        let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 0)")
            .bind(&self.lock_name)
            .fetch_one(&mut *conn)
            .await?;
        if got != Some(1) {
            return Ok(0);
        }
        let deleted = sqlx::query(self.sql.purge.clone())
            .bind(i64::from(limit))
            .execute(&mut *conn)
            .await;
        sqlx::query("SELECT RELEASE_LOCK(?)")
            .bind(&self.lock_name)
            .execute(&mut *conn)
            .await?;
        Ok(deleted?.rows_affected())
    }

    fn backend(&self) -> &'static str {
        "mysql"
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}
