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

use sqlx::{Row, SqliteConnection};

use super::dialect::{
    BoxFuture, Conflict, Dialect, Param, Rows, RowsStatements, Statement, Statements, Writes,
    raw_record, sealed::Sealed,
};
use super::{SqlStore, millis, unavailable};
use crate::Error;
use crate::error::StoreError;
use crate::store::{Claim, DEFAULT_TABLE, Reservation};

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
    /// One writer at a time: a second batch would wait for the first one's lock (sleeping in
    /// SQLite's busy handler), where its calls would have joined the next batch.
    const BATCH_CONCURRENCY: usize = 1;

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
            rows: Some(rows(t)),
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

    fn reserve_as_one<'c>(
        conn: &'c mut SqliteConnection,
        sql: &'c Statements,
        claims: &'c [Claim<'c>],
    ) -> Option<BoxFuture<'c, Result<Vec<Reservation>, StoreError>>> {
        let rows = sql.rows.as_ref()?;
        let insert = rows.reserve.sql(claims.len())?;
        Some(Box::pin(reserve_rows(conn, rows, insert, claims)))
    }

    fn write_as_one<'c>(
        conn: &'c mut SqliteConnection,
        sql: &'c Statements,
        writes: Writes<'c>,
    ) -> Option<BoxFuture<'c, Result<Vec<bool>, StoreError>>> {
        let rows = sql.rows.as_ref()?;
        let statement = match writes {
            Writes::Finalize(_) => &rows.finalize,
            Writes::Heartbeat(_) => &rows.heartbeat,
            Writes::Release(_) => &rows.release,
        };
        let text = statement.sql(writes.len())?;
        Some(Box::pin(write_rows(conn, statement, text, writes)))
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

/// The batched verbs over a list of rows. The list joins the table on its primary key, each
/// of its rows a lookup: the list's columns are written `+v.columnN`, which keeps SQLite from
/// indexing the list and scanning the table instead (as it plans a join of a table without
/// statistics), and a row-value `IN (VALUES ..)` would scan the table too. Rows of NULLs,
/// which pad the list, match nothing and insert nothing.
fn rows(t: &str) -> RowsStatements {
    let record = "r.namespace = +v.column1 AND r.key = +v.column2";
    let fenced = format!("{record} AND r.fence = +v.column3 AND r.state = 'in_progress'");
    RowsStatements {
        // In the list's order (the batch's, sorted by record); `WHERE` is what SQLite needs
        // to read `ON CONFLICT` as the insert's, not a join's.
        reserve: Rows::new(
            &format!(
                "INSERT INTO {{t}} (namespace, key, state, fingerprint, fence, owner,
                    lease_expires_at, heartbeat_at, attempts, created_at, expires_at)
                 SELECT v.column1, v.column2, 'in_progress', v.column3, v.column4, v.column5,
                    {NOW} + v.column6, {NOW}, 1, {NOW}, {NOW} + v.column6
                 FROM (VALUES {{rows}}) AS v WHERE v.column1 IS NOT NULL
                 ON CONFLICT (namespace, key) DO NOTHING
                 RETURNING namespace, key, fence"
            ),
            t,
            6,
        ),
        load: Rows::new(
            &format!(
                "SELECT r.namespace AS namespace, r.key AS key, r.state AS state,
                    r.fingerprint AS fingerprint, r.fence AS fence, r.owner AS owner,
                    r.attempts AS attempts, r.lease_expires_at - {NOW} AS lease_remaining_ms,
                    r.expires_at - {NOW} AS expires_in_ms, r.result AS result, r.codec AS codec
                 FROM (VALUES {{rows}}) AS v JOIN {{t}} AS r ON {record}"
            ),
            t,
            2,
        ),
        finalize: Rows::new(
            &format!(
                "UPDATE {{t}} AS r SET state = 'completed', result = v.column4, codec = v.column5,
                    completed_at = {NOW}, expires_at = {NOW} + v.column6, lease_expires_at = NULL
                 FROM (VALUES {{rows}}) AS v WHERE {fenced}
                 RETURNING namespace, key, fence"
            ),
            t,
            6,
        ),
        heartbeat: Rows::new(
            &format!(
                "UPDATE {{t}} AS r SET lease_expires_at = {NOW} + v.column4,
                    expires_at = {NOW} + v.column4, heartbeat_at = {NOW}
                 FROM (VALUES {{rows}}) AS v WHERE {fenced}
                 RETURNING namespace, key, fence"
            ),
            t,
            4,
        ),
        release: Rows::new(
            &format!(
                "DELETE FROM {{t}} WHERE rowid IN (
                    SELECT r.rowid FROM (VALUES {{rows}}) AS v JOIN {{t}} AS r ON {fenced})
                 RETURNING namespace, key, fence"
            ),
            t,
            3,
        ),
    }
}

type SqliteQuery = sqlx::query::Query<'static, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>;

/// `query` with `n` NULL parameters more: the padding rows.
fn pad(mut query: SqliteQuery, n: usize) -> SqliteQuery {
    for _ in 0..n {
        query = query.bind(None::<i64>);
    }
    query
}

/// A record a statement wrote: its namespace, key and fence.
type Written = (Vec<u8>, Vec<u8>, i64);

/// Each returned row's `namespace, key, fence`: the records a statement wrote.
fn written(rows: &[sqlx::sqlite::SqliteRow]) -> Result<Vec<Written>, sqlx::Error> {
    rows.iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
        .collect()
}

/// Whether `written` holds the record of `id` under `fence`.
fn wrote(written: &[Written], id: &crate::RecordId, fence: crate::store::Fence) -> bool {
    written.iter().any(|(namespace, key, f)| {
        *f == fence.get() && namespace == id.namespace().as_bytes() && key == id.key().as_bytes()
    })
}

/// A batch of reservations: one insert of every claim whose record is absent, in autocommit
/// (one commit); then, if some were present, one read of those records. The insert has
/// committed by then, so a read that fails fails every claim as a statement that may have been
/// applied: the engine then releases what each may hold, rather than running the claims again
/// one by one (which would find their own rows).
async fn reserve_rows(
    conn: &mut SqliteConnection,
    rows: &RowsStatements,
    (insert, padded): (sqlx::SqlStr, usize),
    claims: &[Claim<'_>],
) -> Result<Vec<Reservation>, StoreError> {
    let mut query = sqlx::query(insert);
    for c in claims {
        query = query
            .bind(c.id.namespace().as_bytes().to_vec())
            .bind(c.id.key().as_bytes().to_vec())
            .bind(c.fingerprint.map(|f| f.as_bytes().to_vec()))
            .bind(c.fence.get())
            .bind(c.owner.to_owned())
            .bind(millis(c.lease));
    }
    let query = pad(query, rows.reserve.params * (padded - claims.len()));
    let inserted = written(&query.fetch_all(&mut *conn).await?)?;
    let present: Vec<&Claim<'_>> = claims
        .iter()
        .filter(|c| !wrote(&inserted, c.id, c.fence))
        .collect();
    if present.is_empty() {
        return Ok(claims.iter().map(|_| Reservation::Acquired).collect());
    }
    let found = load_rows(conn, &rows.load, &present).await.map_err(|e| {
        StoreError::msg(format!(
            "reading the records a batch of reservations found failed after the batch was written: {e}"
        ))
        .maybe_applied()
    })?;
    Ok(claims
        .iter()
        .map(|c| {
            if wrote(&inserted, c.id, c.fence) {
                return Reservation::Acquired;
            }
            let record = found.iter().find(|(namespace, key, _)| {
                namespace == c.id.namespace().as_bytes() && key == c.id.key().as_bytes()
            });
            // Gone between the insert and the read (released or purged): `Vanished`.
            record.map_or(Reservation::Vanished, |(_, _, r)| {
                Reservation::Exists(r.clone())
            })
        })
        .collect())
}

/// The records of `claims`, each with its namespace and key.
async fn load_rows(
    conn: &mut SqliteConnection,
    load: &Rows,
    claims: &[&Claim<'_>],
) -> Result<Vec<(Vec<u8>, Vec<u8>, crate::store::Record)>, StoreError> {
    let (sql, padded) = load
        .sql(claims.len())
        .ok_or_else(|| StoreError::msg("too many records to read in one statement"))?;
    let mut query = sqlx::query(sql);
    for c in claims {
        query = query
            .bind(c.id.namespace().as_bytes().to_vec())
            .bind(c.id.key().as_bytes().to_vec());
    }
    let query = pad(query, load.params * (padded - claims.len()));
    query
        .fetch_all(conn)
        .await?
        .iter()
        .map(|row| {
            let record = raw_record::<sqlx::Sqlite>(row)?.into_record()?;
            Ok((row.try_get(0)?, row.try_get(1)?, record))
        })
        .collect()
}

/// A batch of fenced writes as one statement (one commit): which of them changed their record.
async fn write_rows(
    conn: &mut SqliteConnection,
    statement: &Rows,
    (sql, padded): (sqlx::SqlStr, usize),
    writes: Writes<'_>,
) -> Result<Vec<bool>, StoreError> {
    let record = |id: &crate::RecordId| {
        (
            id.namespace().as_bytes().to_vec(),
            id.key().as_bytes().to_vec(),
        )
    };
    let mut query = sqlx::query(sql);
    let targets: Vec<(&crate::RecordId, crate::store::Fence)> = match writes {
        Writes::Finalize(items) => {
            for f in items {
                let (namespace, key) = record(f.id);
                query = query
                    .bind(namespace)
                    .bind(key)
                    .bind(f.fence.get())
                    .bind(f.result.bytes.clone())
                    .bind(f.result.codec.as_str().to_owned())
                    .bind(millis(f.ttl));
            }
            items.iter().map(|f| (f.id, f.fence)).collect()
        }
        Writes::Heartbeat(items) => {
            for h in items {
                let (namespace, key) = record(h.id);
                query = query
                    .bind(namespace)
                    .bind(key)
                    .bind(h.fence.get())
                    .bind(millis(h.lease));
            }
            items.iter().map(|h| (h.id, h.fence)).collect()
        }
        Writes::Release(items) => {
            for r in items {
                let (namespace, key) = record(r.id);
                query = query.bind(namespace).bind(key).bind(r.fence.get());
            }
            items.iter().map(|r| (r.id, r.fence)).collect()
        }
    };
    let query = pad(query, statement.params * (padded - targets.len()));
    let changed = written(&query.fetch_all(conn).await?)?;
    Ok(targets
        .into_iter()
        .map(|(id, fence)| wrote(&changed, id, fence))
        .collect())
}

#[cfg(test)]
mod tests {
    use sqlx::Row;

    use super::*;

    /// Every batched statement looks each of its rows up by the primary key, on the SQLite
    /// this crate bundles, for small and large batches: a plan that scans the records table
    /// makes each batch slower as the table grows.
    #[tokio::test]
    async fn batched_statements_look_records_up_by_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(dir.path().join("plans.db"))
            .await
            .expect("open");
        let rows = store.sql.rows.as_ref().expect("SQLite batches over rows");
        let statements = [
            ("reserve", &rows.reserve),
            ("load", &rows.load),
            ("finalize", &rows.finalize),
            ("heartbeat", &rows.heartbeat),
            ("release", &rows.release),
        ];
        for (verb, statement) in statements {
            for n in [2, 64] {
                let (sql, padded) = statement.sql(n).expect("fits");
                assert_eq!(padded, n);
                let explain = format!("EXPLAIN QUERY PLAN {}", sql.as_str());
                let plan: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(explain))
                    .fetch_all(store.pool())
                    .await
                    .expect("explain")
                    .iter()
                    .map(|row| row.try_get::<String, _>("detail").expect("detail"))
                    .collect();
                let scans: Vec<&String> = plan
                    .iter()
                    .filter(|step| step.starts_with("SCAN") && !step.contains("VALUES"))
                    .collect();
                assert!(scans.is_empty(), "{verb} of {n} rows scans: {plan:?}");
            }
        }
    }

    #[test]
    fn a_batch_is_padded_to_a_power_of_two_and_bounded_by_the_parameter_limit() {
        let rows = rows("idem_records");
        let (sql, padded) = rows.release.sql(5).expect("fits");
        assert_eq!(padded, 8);
        assert_eq!(sql.as_str().matches("(?, ?, ?)").count(), 8);
        // 8,192 rows of 3 parameters fit SQLite's 32,766; 16,384 do not.
        assert!(rows.release.sql(8_192).is_some());
        assert!(rows.release.sql(8_193).is_none());
        assert!(rows.reserve.sql(usize::MAX).is_none());
    }
}
