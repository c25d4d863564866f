//! The embedded default store: one SQLite file in WAL mode.
//!
//! SQLite runs inside this process, so "the store's clock" is this machine's wall clock:
//! times are stored as milliseconds since the UNIX epoch and computed here. Writes are
//! single autocommit statements; SQLite serialises them and `busy_timeout` makes a writer wait
//! its turn instead of failing. `synchronous = FULL` is the default so that a completed record
//! survives a power cut, not just a process crash.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::Sqlite;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlStr};

use super::sql::{
    RawRecord, check_table_name, millis, statement, unavailable, with_claim, with_id,
};
use super::{Claim, DEFAULT_TABLE, Fence, Record, Reservation, Store, StoredResult, TxStatements};
use crate::Error;
use crate::error::StoreError;
use crate::key::RecordId;

/// How [`SqliteStore::open_with`] opens the database.
#[derive(Clone, Debug)]
pub struct SqliteStoreOptions {
    table: String,
    max_connections: u32,
    busy_timeout: Duration,
    durable: bool,
}

impl Default for SqliteStoreOptions {
    fn default() -> Self {
        SqliteStoreOptions {
            table: DEFAULT_TABLE.to_string(),
            max_connections: 4,
            busy_timeout: Duration::from_secs(5),
            durable: true,
        }
    }
}

impl SqliteStoreOptions {
    /// Default options: table `idem_records`, 4 connections, 5 s busy timeout, durable commits.
    pub fn new() -> Self {
        Self::default()
    }

    /// The table to keep records in (a plain identifier; created if missing).
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The size of the connection pool.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long a write waits for the database lock before failing.
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// `true` (the default): every commit is synced to disk (`synchronous = FULL`), so a
    /// completed record survives a power cut. `false` (`synchronous = NORMAL`): faster, and
    /// still safe against a process crash, but the last commits can be lost on power loss.
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }
}

/// A [`Store`] in a SQLite database file.
///
/// ```no_run
/// # async fn demo() -> Result<(), idem_runtime::Error> {
/// use idem_runtime::{Idem, store::SqliteStore};
/// let idem = Idem::builder()
///     .store(SqliteStore::open("idem.db").await?)
///     .install()?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    table: String,
    sql: Statements,
}

#[derive(Clone, Debug)]
struct Statements {
    reserve: SqlStr,
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
        namespace BLOB NOT NULL,
        key BLOB NOT NULL,
        state TEXT NOT NULL,
        fingerprint BLOB,
        fence INTEGER NOT NULL,
        owner TEXT NOT NULL,
        lease_expires_at INTEGER,
        heartbeat_at INTEGER,
        attempts INTEGER NOT NULL,
        result BLOB,
        codec TEXT,
        created_at INTEGER NOT NULL,
        completed_at INTEGER,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, key)
    );
    CREATE INDEX IF NOT EXISTS {t}_expires_at ON {t} (expires_at);",
];

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` with default options, and
    /// creates the records table if it is missing.
    pub async fn open(path: impl AsRef<Path>) -> Result<SqliteStore, Error> {
        Self::open_with(path, SqliteStoreOptions::default()).await
    }

    /// Opens the database file at `path` with `options`.
    pub async fn open_with(
        path: impl AsRef<Path>,
        options: SqliteStoreOptions,
    ) -> Result<SqliteStore, Error> {
        check_table_name(&options.table)?;
        let path = path.as_ref();
        let name = path.to_string_lossy();
        if name.is_empty() || name.contains(":memory:") || name.starts_with("file:") {
            // Every pooled connection would get its own private database: records would
            // vanish between calls. MemoryStore is the in-memory store.
            return Err(Error::Config(format!(
                "SQLite path {name:?} is not a database file; give a file path (use `MemoryStore` for an in-memory store)"
            )));
        }
        let connect = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if options.durable {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            })
            .busy_timeout(options.busy_timeout);
        // Turning a new file to WAL takes an exclusive lock that SQLite's busy timeout does not
        // wait for, so processes opening one new file together can find it locked: they retry,
        // within the busy timeout.
        let give_up = std::time::Instant::now() + options.busy_timeout;
        let mut pause = Duration::from_millis(5);
        let pool = loop {
            let pool = SqlitePoolOptions::new()
                .max_connections(options.max_connections)
                .connect_with(connect.clone())
                .await;
            match pool {
                Err(e) if is_locked(&e) && std::time::Instant::now() + pause < give_up => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                other => break other.map_err(unavailable)?,
            }
        };
        Self::from_pool(pool, &options.table).await
    }

    /// Uses an existing pool (for example the application's own), keeping records in
    /// `table`, which is created if it is missing.
    pub async fn from_pool(pool: SqlitePool, table: &str) -> Result<SqliteStore, Error> {
        check_table_name(table)?;
        migrate(&pool, table).await.map_err(unavailable)?;
        Ok(SqliteStore {
            sql: Statements::new(table),
            pool,
            table: table.to_string(),
        })
    }

    /// The connection pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The records table.
    pub fn table(&self) -> &str {
        &self.table
    }
}

async fn migrate(pool: &SqlitePool, table: &str) -> Result<(), sqlx::Error> {
    // The write lock up front: processes opening one file together would otherwise each start
    // reading, then fail to upgrade to writing ("database is locked", which busy_timeout does
    // not retry). With it, they take turns.
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS idem_schema (table_name TEXT PRIMARY KEY, version INTEGER NOT NULL)",
    )
    .execute(&mut *tx)
    .await?;
    let recorded: i64 = sqlx::query_scalar("SELECT version FROM idem_schema WHERE table_name = ?1")
        .bind(table)
        .fetch_optional(&mut *tx)
        .await?
        .unwrap_or(0);
    // A table dropped by hand starts again from the first migration.
    let exists: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1")
            .bind(table)
            .fetch_one(&mut *tx)
            .await?;
    let current = if exists > 0 { recorded } else { 0 };
    for (i, step) in MIGRATIONS.iter().enumerate() {
        let version = i as i64 + 1;
        if version <= current {
            continue;
        }
        sqlx::raw_sql(statement(step, table))
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO idem_schema (table_name, version) VALUES (?1, ?2)
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
        Statements {
            reserve: statement(
                "INSERT INTO {t} (namespace, key, state, fingerprint, fence, owner,
                    lease_expires_at, heartbeat_at, attempts, created_at, expires_at)
                 VALUES (?1, ?2, 'in_progress', ?3, ?4, ?5, ?6 + ?7, ?6, 1, ?6, ?6 + ?7)
                 ON CONFLICT (namespace, key) DO NOTHING",
                t,
            ),
            load: statement(
                "SELECT state, fingerprint, fence, owner, attempts,
                        lease_expires_at - ?3 AS lease_remaining_ms,
                        expires_at - ?3 AS expires_in_ms, result, codec
                 FROM {t} WHERE namespace = ?1 AND key = ?2",
                t,
            ),
            take_over: statement(
                "UPDATE {t} SET state = 'in_progress', fingerprint = ?3, fence = ?4, owner = ?5,
                    lease_expires_at = ?6 + ?7, heartbeat_at = ?6, expires_at = ?6 + ?7,
                    attempts = CASE WHEN state = 'completed' THEN 1 ELSE attempts + 1 END,
                    created_at = CASE WHEN state = 'completed' THEN ?6 ELSE created_at END,
                    result = NULL, codec = NULL, completed_at = NULL
                 WHERE namespace = ?1 AND key = ?2 AND fence = ?8
                   AND ((state = 'in_progress' AND lease_expires_at <= ?6)
                     OR (state = 'completed' AND expires_at <= ?6))",
                t,
            ),
            heartbeat: statement(
                "UPDATE {t} SET lease_expires_at = ?3 + ?4, expires_at = ?3 + ?4, heartbeat_at = ?3
                 WHERE namespace = ?1 AND key = ?2 AND fence = ?5 AND state = 'in_progress'",
                t,
            ),
            finalize: statement(
                "UPDATE {t} SET state = 'completed', result = ?3, codec = ?4, completed_at = ?5,
                    expires_at = ?5 + ?6, lease_expires_at = NULL
                 WHERE namespace = ?1 AND key = ?2 AND fence = ?7 AND state = 'in_progress'",
                t,
            ),
            release: statement(
                "DELETE FROM {t} WHERE namespace = ?1 AND key = ?2 AND fence = ?3 AND state = 'in_progress'",
                t,
            ),
            purge: statement(
                "DELETE FROM {t} WHERE rowid IN
                    (SELECT rowid FROM {t} WHERE expires_at <= ?1 LIMIT ?2)",
                t,
            ),
        }
    }
}

/// `SQLITE_BUSY`: another connection holds a lock this one cannot wait for.
fn is_locked(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("5"))
}

fn now_ms() -> i64 {
    // A clock before 1970 is a broken machine; treat it as the epoch rather than panic.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn raw_record(row: &SqliteRow) -> Result<Record, StoreError> {
    RawRecord {
        state: row.try_get("state")?,
        fingerprint: row.try_get("fingerprint")?,
        fence: row.try_get("fence")?,
        owner: row.try_get("owner")?,
        attempts: row.try_get("attempts")?,
        lease_remaining_ms: row.try_get("lease_remaining_ms")?,
        expires_in_ms: row.try_get("expires_in_ms")?,
        result: row.try_get("result")?,
        codec: row.try_get("codec")?,
    }
    .into_record()
}

#[async_trait::async_trait]
impl TxStatements<Sqlite> for SqliteStore {
    async fn reserve_in(
        &self,
        conn: &mut SqliteConnection,
        claim: &Claim<'_>,
    ) -> Result<Reservation, StoreError> {
        let done = with_claim(&self.sql.reserve, claim)
            .bind(now_ms())
            .bind(millis(claim.lease))
            .execute(&mut *conn)
            .await?;
        if done.rows_affected() == 1 {
            return Ok(Reservation::Acquired);
        }
        let row = with_id(&self.sql.load, claim.id)
            .bind(now_ms())
            .fetch_optional(&mut *conn)
            .await?;
        Ok(match row.as_ref().map(raw_record).transpose()? {
            Some(record) => Reservation::Exists(record),
            None => Reservation::Vanished,
        })
    }

    async fn take_over_in(
        &self,
        conn: &mut SqliteConnection,
        claim: &Claim<'_>,
        observed: Fence,
    ) -> Result<bool, StoreError> {
        let done = with_claim(&self.sql.take_over, claim)
            .bind(now_ms())
            .bind(millis(claim.lease))
            .bind(observed.get())
            .execute(&mut *conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn finalize_in(
        &self,
        conn: &mut SqliteConnection,
        id: &RecordId,
        fence: Fence,
        result: &StoredResult,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let done = with_id(&self.sql.finalize, id)
            .bind(result.bytes.clone())
            .bind(result.codec.as_str())
            .bind(now_ms())
            .bind(millis(ttl))
            .bind(fence.get())
            .execute(&mut *conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn release_in(
        &self,
        conn: &mut SqliteConnection,
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
impl Store for SqliteStore {
    async fn reserve(&self, claim: &Claim<'_>) -> Result<Reservation, StoreError> {
        let mut conn = self.pool.acquire().await?;
        self.reserve_in(&mut conn, claim).await
    }

    async fn load(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        let row = with_id(&self.sql.load, id)
            .bind(now_ms())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(raw_record).transpose()
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
            .bind(now_ms())
            .bind(millis(lease))
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
        let done = sqlx::query(self.sql.purge.clone())
            .bind(now_ms())
            .bind(i64::from(limit))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}
