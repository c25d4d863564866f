//! The shared store for many replicas: PostgreSQL.
//!
//! Every time comparison and every `now + lease` uses the database server's clock
//! (`clock_timestamp()`: the time of the statement, not of the start of the transaction it
//! runs in, which matters for transactional calls in a long transaction), so replicas with
//! skewed clocks agree on who owns a record. `reserve` is one statement that
//! inserts if absent and otherwise returns the existing row (one round trip for a replay);
//! `take_over` is one compare-and-set `UPDATE`. Concurrent writers to one row are serialised
//! by the row lock, and PostgreSQL re-checks the `WHERE` clause against the row a winner left
//! behind, so of many concurrent takeovers exactly one matches.

use std::time::Duration;

use sqlx::Postgres;
use sqlx::postgres::{PgConnection, PgPool, PgRow};
use sqlx::{Row, SqlStr};

use super::sql::{
    RawRecord, ServerStoreOptions, check_table_name, connect_pool, millis, statement, unavailable,
    with_claim, with_id,
};
use super::{Claim, Fence, Record, Reservation, Store, StoredResult, TxStatements};
use crate::Error;
use crate::error::StoreError;
use crate::key::RecordId;

/// A [`Store`] in a PostgreSQL table, shared by every replica that points at it.
///
/// ```no_run
/// # async fn demo() -> Result<(), idem_runtime::Error> {
/// use idem_runtime::{Idem, store::PgStore};
/// let idem = Idem::builder()
///     .store(PgStore::connect("postgres://app@db/app").await?)
///     .executor_id(std::env::var("POD_NAME").ok())
///     .install()?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
    table: String,
    lock_key: i64,
    sql: Statements,
}

#[derive(Clone, Debug)]
struct Statements {
    reserve: SqlStr,
    reserve_tx: SqlStr,
    load: SqlStr,
    take_over: SqlStr,
    heartbeat: SqlStr,
    finalize: SqlStr,
    release: SqlStr,
    purge: SqlStr,
}

const MIGRATIONS: &[&str] = &[
    // 1: the records table and its expiry index.
    "CREATE TABLE IF NOT EXISTS {t} (
        namespace BYTEA NOT NULL,
        key BYTEA NOT NULL,
        state TEXT NOT NULL,
        fingerprint BYTEA,
        fence BIGINT NOT NULL,
        owner TEXT NOT NULL,
        lease_expires_at TIMESTAMPTZ,
        heartbeat_at TIMESTAMPTZ,
        attempts INTEGER NOT NULL,
        result BYTEA,
        codec TEXT,
        created_at TIMESTAMPTZ NOT NULL,
        completed_at TIMESTAMPTZ,
        expires_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (namespace, key)
    );
    CREATE INDEX IF NOT EXISTS {t}_expires_at ON {t} (expires_at);",
    // 2: every record is written twice (reserved, then completed); room on each page lets
    // the second write be a heap-only update, with no new index entries.
    "ALTER TABLE {t} SET (fillfactor = 80);",
];

/// The columns `load` and `reserve` read, with the times as milliseconds left on the
/// server's clock.
const RECORD_COLUMNS: &str = "state, fingerprint, fence, owner, attempts,
    (EXTRACT(EPOCH FROM (lease_expires_at - clock_timestamp())) * 1000)::BIGINT AS lease_remaining_ms,
    (EXTRACT(EPOCH FROM (expires_at - clock_timestamp())) * 1000)::BIGINT AS expires_in_ms,
    result, codec";

impl PgStore {
    /// Connects to `url` with default options and creates the records table if missing.
    pub async fn connect(url: &str) -> Result<PgStore, Error> {
        Self::connect_with(url, ServerStoreOptions::default()).await
    }

    /// Connects to `url` with `options`.
    pub async fn connect_with(url: &str, options: ServerStoreOptions) -> Result<PgStore, Error> {
        let pool = connect_pool::<Postgres>(url, &options, "PostgreSQL").await?;
        Self::from_pool(pool, &options.table).await
    }

    /// Uses an existing pool (for example the application's own), keeping records in
    /// `table`, which is created if missing.
    pub async fn from_pool(pool: PgPool, table: &str) -> Result<PgStore, Error> {
        check_table_name(table)?;
        let lock_key = lock_key(table);
        migrate(&pool, table, lock_key).await.map_err(unavailable)?;
        Ok(PgStore {
            sql: Statements::new(table),
            pool,
            table: table.to_string(),
            lock_key,
        })
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The records table.
    pub fn table(&self) -> &str {
        &self.table
    }
}

/// The advisory lock that serialises migrations and purges of one table across replicas.
fn lock_key(table: &str) -> i64 {
    let digest = blake3::hash(format!("idem:{table}").as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest.as_bytes()[..8]);
    i64::from_le_bytes(bytes)
}

async fn migrate(pool: &PgPool, table: &str, lock_key: i64) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Replicas starting together would race on CREATE TABLE; one migrates at a time.
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(lock_key)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS idem_schema (table_name TEXT PRIMARY KEY, version INTEGER NOT NULL)",
    )
    .execute(&mut *tx)
    .await?;
    let recorded: i32 = sqlx::query_scalar("SELECT version FROM idem_schema WHERE table_name = $1")
        .bind(table)
        .fetch_optional(&mut *tx)
        .await?
        .unwrap_or(0);
    // A table dropped by hand starts again from the first migration.
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(table)
        .fetch_one(&mut *tx)
        .await?;
    let current = if exists { recorded } else { 0 };
    for (i, step) in MIGRATIONS.iter().enumerate() {
        let version = i as i32 + 1;
        if version <= current {
            continue;
        }
        sqlx::raw_sql(statement(step, table))
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO idem_schema (table_name, version) VALUES ($1, $2)
             ON CONFLICT (table_name) DO UPDATE SET version = excluded.version",
        )
        .bind(table)
        .bind(version)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

impl Statements {
    fn new(t: &str) -> Statements {
        // `reserve` binds the lease as $6, `take_over` as $7 (after the observed fence).
        let lease6 = "clock_timestamp() + $6::BIGINT * interval '1 millisecond'";
        let lease = "clock_timestamp() + $7 * interval '1 millisecond'";
        Statements {
            // Insert if absent; otherwise return the row that is there, in the same round
            // trip. The existing row is read first, so a replay costs a primary-key lookup
            // and no insert attempt. (Both parts see the snapshot from before the statement:
            // a row committed by a racing insert in the meantime makes the insert do nothing
            // and is not visible to the read, so nothing comes back; the engine calls that
            // `Vanished` and reserves again.)
            reserve: statement(
                &format!(
                    "WITH existing AS (
                        SELECT {RECORD_COLUMNS} FROM {{t}} WHERE namespace = $1 AND key = $2
                    ), ins AS (
                        INSERT INTO {{t}} (namespace, key, state, fingerprint, fence, owner,
                            lease_expires_at, heartbeat_at, attempts, created_at, expires_at)
                        SELECT $1::BYTEA, $2::BYTEA, 'in_progress', $3::BYTEA, $4::BIGINT, $5::TEXT,
                            {lease6}, clock_timestamp(), 1, clock_timestamp(), {lease6}
                        WHERE NOT EXISTS (SELECT 1 FROM existing)
                        ON CONFLICT (namespace, key) DO NOTHING
                        RETURNING 1
                    )
                    SELECT TRUE AS inserted, NULL::TEXT AS state, NULL::BYTEA AS fingerprint,
                           NULL::BIGINT AS fence, NULL::TEXT AS owner, NULL::INTEGER AS attempts,
                           NULL::BIGINT AS lease_remaining_ms, NULL::BIGINT AS expires_in_ms,
                           NULL::BYTEA AS result, NULL::TEXT AS codec
                    FROM ins
                    UNION ALL
                    SELECT FALSE, existing.* FROM existing"
                ),
                t,
            ),
            // Inside a caller's transaction the common case is a first execution, and every
            // statement is a round trip the caller's transaction pays for: a plain insert.
            reserve_tx: statement(
                &format!(
                    "INSERT INTO {{t}} (namespace, key, state, fingerprint, fence, owner,
                        lease_expires_at, heartbeat_at, attempts, created_at, expires_at)
                     VALUES ($1, $2, 'in_progress', $3, $4, $5, {lease6}, clock_timestamp(), 1,
                        clock_timestamp(), {lease6})
                     ON CONFLICT (namespace, key) DO NOTHING"
                ),
                t,
            ),
            load: statement(
                &format!("SELECT {RECORD_COLUMNS} FROM {{t}} WHERE namespace = $1 AND key = $2"),
                t,
            ),
            take_over: statement(
                &format!(
                    "UPDATE {{t}} SET state = 'in_progress', fingerprint = $3, fence = $4, owner = $5,
                        lease_expires_at = {lease}, heartbeat_at = clock_timestamp(), expires_at = {lease},
                        attempts = CASE WHEN state = 'completed' THEN 1 ELSE attempts + 1 END,
                        created_at = CASE WHEN state = 'completed' THEN clock_timestamp() ELSE created_at END,
                        result = NULL, codec = NULL, completed_at = NULL
                     WHERE namespace = $1 AND key = $2 AND fence = $6
                       AND ((state = 'in_progress' AND lease_expires_at <= clock_timestamp())
                         OR (state = 'completed' AND expires_at <= clock_timestamp()))"
                ),
                t,
            ),
            heartbeat: statement(
                "UPDATE {t} SET lease_expires_at = clock_timestamp() + $4 * interval '1 millisecond',
                    expires_at = clock_timestamp() + $4 * interval '1 millisecond', heartbeat_at = clock_timestamp()
                 WHERE namespace = $1 AND key = $2 AND fence = $3 AND state = 'in_progress'",
                t,
            ),
            finalize: statement(
                "UPDATE {t} SET state = 'completed', result = $3, codec = $4, completed_at = clock_timestamp(),
                    expires_at = clock_timestamp() + $5 * interval '1 millisecond', lease_expires_at = NULL
                 WHERE namespace = $1 AND key = $2 AND fence = $6 AND state = 'in_progress'",
                t,
            ),
            release: statement(
                "DELETE FROM {t} WHERE namespace = $1 AND key = $2 AND fence = $3 AND state = 'in_progress'",
                t,
            ),
            purge: statement(
                "DELETE FROM {t} WHERE ctid IN
                    (SELECT ctid FROM {t} WHERE expires_at <= now() LIMIT $1)",
                t,
            ),
        }
    }
}

fn record(row: &PgRow) -> Result<Record, StoreError> {
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

#[async_trait::async_trait]
impl TxStatements<Postgres> for PgStore {
    async fn reserve_in(
        &self,
        conn: &mut PgConnection,
        claim: &Claim<'_>,
    ) -> Result<Reservation, StoreError> {
        let done = with_claim(&self.sql.reserve_tx, claim)
            .bind(millis(claim.lease))
            .execute(&mut *conn)
            .await?;
        if done.rows_affected() == 1 {
            return Ok(Reservation::Acquired);
        }
        // The insert waited for any transaction holding the key and found a row; under READ
        // COMMITTED this next statement sees it.
        let row = with_id(&self.sql.load, claim.id)
            .fetch_optional(&mut *conn)
            .await?;
        Ok(match row.as_ref().map(record).transpose()? {
            Some(record) => Reservation::Exists(record),
            None => Reservation::Vanished,
        })
    }

    async fn take_over_in(
        &self,
        conn: &mut PgConnection,
        claim: &Claim<'_>,
        observed: Fence,
    ) -> Result<bool, StoreError> {
        let done = with_claim(&self.sql.take_over, claim)
            .bind(observed.get())
            .bind(millis(claim.lease))
            .execute(&mut *conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn finalize_in(
        &self,
        conn: &mut PgConnection,
        id: &RecordId,
        fence: Fence,
        result: &StoredResult,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let done = with_id(&self.sql.finalize, id)
            .bind(result.bytes.clone())
            .bind(result.codec.as_str())
            .bind(millis(ttl))
            .bind(fence.get())
            .execute(&mut *conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn release_in(
        &self,
        conn: &mut PgConnection,
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
impl Store for PgStore {
    async fn reserve(&self, claim: &Claim<'_>) -> Result<Reservation, StoreError> {
        let row = with_claim(&self.sql.reserve, claim)
            .bind(millis(claim.lease))
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else {
            return Ok(Reservation::Vanished);
        };
        if row.try_get::<bool, _>("inserted")? {
            Ok(Reservation::Acquired)
        } else {
            Ok(Reservation::Exists(record(&row)?))
        }
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
        let done = with_id(&self.sql.heartbeat, id)
            .bind(fence.get())
            .bind(millis(lease))
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
        // One replica purges a table at a time: the others find the lock taken and skip.
        let mut tx = self.pool.begin().await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(self.lock_key)
            .fetch_one(&mut *tx)
            .await?;
        if !got {
            return Ok(0);
        }
        let done = sqlx::query(self.sql.purge.clone())
            .bind(i64::from(limit))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}
