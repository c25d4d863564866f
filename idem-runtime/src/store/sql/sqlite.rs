//! SQLite: the embedded default store, one file in WAL mode.
//!
//! SQLite runs inside this process, so "the store's clock" is this machine's wall clock, read
//! by SQLite itself (`julianday('now')`, the same value throughout one statement); times are
//! stored as milliseconds since the UNIX epoch. Writes are single autocommit statements;
//! SQLite serialises them and `busy_timeout` makes a writer wait its turn instead of failing.
//! `synchronous = FULL` is the default so that a completed record survives a power cut, not
//! just a process crash. There is one writer at a time, so no lock is needed beyond
//! `BEGIN IMMEDIATE`.

use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use super::dialect::{Conflict, Dialect, Param, Statement, Statements, sealed::Sealed};
use super::{SqlStore, unavailable};
use crate::Error;
use crate::store::DEFAULT_TABLE;

use Param::{
    Codec, Fence, Fingerprint, Key, Lease, Limit, Namespace, Observed, Owner, ResultBytes, Ttl,
};

/// SQLite, for [`SqlStore`]: see [`SqliteStore`](crate::store::SqliteStore).
#[derive(Clone, Copy, Debug)]
pub struct Sqlite;

impl Dialect for Sqlite {}

/// Milliseconds since the UNIX epoch, by this machine's clock.
const NOW: &str = "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";

impl Sealed for Sqlite {
    type Db = sqlx::Sqlite;
    const BACKEND: &'static str = "sqlite";
    const NAME: &'static str = "SQLite";
    const BEGIN: &'static str = "BEGIN IMMEDIATE";

    fn statements(t: &str) -> Statements {
        let load = format!(
            "SELECT state, fingerprint, fence, owner, attempts,
                lease_expires_at - {NOW} AS lease_remaining_ms, expires_at - {NOW} AS expires_in_ms,
                result, codec
             FROM {{t}} WHERE namespace = ?1 AND key = ?2"
        );
        Statements {
            insert: Statement::new(
                &format!(
                    "INSERT INTO {{t}} (namespace, key, state, fingerprint, fence, owner,
                        lease_expires_at, heartbeat_at, attempts, created_at, expires_at)
                     VALUES (?1, ?2, 'in_progress', ?3, ?4, ?5, {NOW} + ?6, {NOW}, 1, {NOW}, {NOW} + ?6)
                     ON CONFLICT (namespace, key) DO NOTHING"
                ),
                t,
                &[Namespace, Key, Fingerprint, Fence, Owner, Lease],
            ),
            conflict: Conflict::NoRows,
            insert_or_load: None,
            load: Statement::new(&load, t, &[Namespace, Key]),
            // One writer at a time: nothing committed can hide from this transaction.
            load_in_transaction: Statement::new(&load, t, &[Namespace, Key]),
            take_over: Statement::new(
                &format!(
                    "UPDATE {{t}} SET state = 'in_progress', fingerprint = ?3, fence = ?4, owner = ?5,
                        lease_expires_at = {NOW} + ?6, heartbeat_at = {NOW}, expires_at = {NOW} + ?6,
                        attempts = CASE WHEN state = 'completed' THEN 1 ELSE attempts + 1 END,
                        created_at = CASE WHEN state = 'completed' THEN {NOW} ELSE created_at END,
                        result = NULL, codec = NULL, completed_at = NULL
                     WHERE namespace = ?1 AND key = ?2 AND fence = ?7
                       AND ((state = 'in_progress' AND lease_expires_at <= {NOW})
                         OR (state = 'completed' AND expires_at <= {NOW}))"
                ),
                t,
                &[Namespace, Key, Fingerprint, Fence, Owner, Lease, Observed],
            ),
            heartbeat: Statement::new(
                &format!(
                    "UPDATE {{t}} SET lease_expires_at = {NOW} + ?4, expires_at = {NOW} + ?4,
                        heartbeat_at = {NOW}
                     WHERE namespace = ?1 AND key = ?2 AND fence = ?3 AND state = 'in_progress'"
                ),
                t,
                &[Namespace, Key, Fence, Lease],
            ),
            finalize: Statement::new(
                &format!(
                    "UPDATE {{t}} SET state = 'completed', result = ?3, codec = ?4,
                        completed_at = {NOW}, expires_at = {NOW} + ?5, lease_expires_at = NULL
                     WHERE namespace = ?1 AND key = ?2 AND fence = ?6 AND state = 'in_progress'"
                ),
                t,
                &[Namespace, Key, ResultBytes, Codec, Ttl, Fence],
            ),
            release: Statement::new(
                "DELETE FROM {t} WHERE namespace = ?1 AND key = ?2 AND fence = ?3 AND state = 'in_progress'",
                t,
                &[Namespace, Key, Fence],
            ),
            purge: Statement::new(
                &format!(
                    "DELETE FROM {{t}} WHERE rowid IN
                        (SELECT rowid FROM {{t}} WHERE expires_at <= {NOW} LIMIT ?1)"
                ),
                t,
                &[Limit],
            ),
            lock: None,
            try_lock: None,
            unlock: None,
            create_schema: Statement::new(
                "CREATE TABLE IF NOT EXISTS idem_schema (table_name TEXT PRIMARY KEY, version INTEGER NOT NULL)",
                t,
                &[],
            ),
            schema_version: Statement::new(
                "SELECT version FROM idem_schema WHERE table_name = ?1",
                t,
                &[Param::TableName],
            ),
            table_exists: Statement::new(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                t,
                &[Param::TableName],
            ),
            record_version: Statement::new(
                "INSERT INTO idem_schema (table_name, version) VALUES (?1, ?2)
                 ON CONFLICT (table_name) DO UPDATE SET version = excluded.version",
                t,
                &[Param::TableName, Param::Version],
            ),
            many: None,
        }
    }

    fn migrations() -> Vec<String> {
        // 1: the records table and its expiry index; times are milliseconds since the epoch.
        vec![super::records_table(
            "BLOB", "INTEGER", "INTEGER", "INTEGER",
        )]
    }

    fn lock_name(table: &str) -> String {
        table.to_owned()
    }

    fn is_conflict(_: &sqlx::Error) -> bool {
        // One writer at a time, waited for with `busy_timeout`: nothing to lose a conflict to.
        false
    }
}

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

super::connect::common_options!(
    SqliteStoreOptions,
    "table `idem_records`, 4 connections, 5 s busy timeout, durable commits"
);

impl SqliteStoreOptions {
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

/// A [`Store`](crate::store::Store) in a SQLite database file (feature `sqlite`, the default).
///
/// ```no_run
/// # async fn demo() -> Result<(), idem_runtime::Error> {
/// use idem_runtime::{Idem, store::SqliteStore};
/// let idem = Idem::builder()
///     .store(SqliteStore::open("idem.db").await?)
///     .install()?;
/// # Ok(()) }
/// ```
pub type SqliteStore = SqlStore<Sqlite>;

impl SqlStore<Sqlite> {
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
        super::check_table_name(&options.table)?;
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
}

/// `SQLITE_BUSY`, or one of its extended codes (`SQLITE_BUSY_RECOVERY` after a crash,
/// `SQLITE_BUSY_SNAPSHOT`): another connection holds a lock this one cannot wait for.
fn is_locked(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    let code = db.code().and_then(|c| c.parse::<i32>().ok());
    code.is_some_and(|c| c & 0xff == 5)
}
