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
    Answers, BoxFuture, Conflict, Dialect, Param, Rows, RowsStatements, Statement, Statements,
    Writes, raw_record, sealed::Sealed,
};
use super::{RawRecord, SqlStore, millis};
use crate::Error;
use crate::error::StoreError;
use crate::store::{Claim, DEFAULT_TABLE, Record, Reservation};

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
    /// One writer at a time: a batch of reservations would wait for a batch of results to
    /// commit, where one commit can carry both.
    const COMBINE_VERBS: bool = true;
    const OPEN_CHECK: &'static str =
        "check that the file's directory exists and that this process may write there";

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
    ) -> Option<BoxFuture<'c, Result<Answers<Reservation>, StoreError>>> {
        let rows = sql.rows.as_ref()?;
        let insert = rows.reserve.sql(claims.len())?;
        Some(Box::pin(reserve_rows(conn, rows, insert, claims)))
    }

    fn write_as_one<'c>(
        conn: &'c mut SqliteConnection,
        sql: &'c Statements,
        writes: Writes<'c>,
    ) -> Option<BoxFuture<'c, Result<Answers<bool>, StoreError>>> {
        let rows = sql.rows.as_ref()?;
        let statement = match writes {
            Writes::Finalize(_) => &rows.finalize,
            Writes::Heartbeat(_) => &rows.heartbeat,
            Writes::Release(_) => return None,
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
                other => {
                    // SQLite's "unable to open database file" does not say which file.
                    break other.map_err(|source| {
                        let path = path.display().to_string();
                        let at_file = StoreError::new(AtFile { path, source });
                        crate::error::not_opened(at_file, Sqlite::OPEN_CHECK)
                    })?;
                }
            }
        };
        Self::from_pool(pool, &options.table).await
    }
}

/// A database file that could not be opened, and why: SQLite's own message does not say
/// which file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
struct AtFile {
    path: String,
    source: sqlx::Error,
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

/// The batched verbs over a list of rows. Rows of NULLs, which pad the list, match nothing
/// and insert nothing. Where a statement reads records, the list drives a `CROSS JOIN` (which
/// SQLite never reorders) and each of its rows looks a record up by primary key, whatever the
/// table's statistics say: in a plain join SQLite may index the list and scan the table
/// instead, as it does for a table analyzed while it was small, and a row-value
/// `IN (VALUES ..)` scans the table too. So the fenced writes, which must read the record to
/// fence it, are upserts of rows read that way: every row read conflicts with its own record,
/// and the `DO UPDATE` writes it, still only under the row's fence (`UPDATE .. FROM` has no
/// join order to force). Releases are left to the transaction of single statements: a
/// batch of them is rare (they follow failures), and `DELETE` has no such form.
fn rows(t: &str) -> RowsStatements {
    let fenced = "CROSS JOIN {t} AS r ON r.namespace = v.column1 AND r.key = v.column2
        AND r.fence = v.column3 AND r.state = 'in_progress'";
    // The written record's columns the insert half needs (it never inserts: each row conflicts).
    let kept = "r.namespace, r.key, r.state, r.fence, r.owner, r.attempts, r.created_at";
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
                 FROM (VALUES {{rows}}) AS v
                 CROSS JOIN {{t}} AS r ON r.namespace = v.column1 AND r.key = v.column2"
            ),
            t,
            2,
        ),
        finalize: Rows::new(
            &format!(
                "INSERT INTO {{t}} (namespace, key, state, fence, owner, attempts, created_at,
                    result, codec, expires_at)
                 SELECT {kept}, v.column4, v.column5, {NOW} + v.column6
                 FROM (VALUES {{rows}}) AS v {fenced} WHERE true
                 ON CONFLICT (namespace, key) DO UPDATE SET state = 'completed',
                    result = excluded.result, codec = excluded.codec, completed_at = {NOW},
                    expires_at = excluded.expires_at, lease_expires_at = NULL
                    WHERE fence = excluded.fence AND state = 'in_progress'
                 RETURNING namespace, key, fence"
            ),
            t,
            6,
        ),
        heartbeat: Rows::new(
            &format!(
                "INSERT INTO {{t}} (namespace, key, state, fence, owner, attempts, created_at,
                    expires_at)
                 SELECT {kept}, {NOW} + v.column4
                 FROM (VALUES {{rows}}) AS v {fenced} WHERE true
                 ON CONFLICT (namespace, key) DO UPDATE SET lease_expires_at = excluded.expires_at,
                    expires_at = excluded.expires_at, heartbeat_at = {NOW}
                    WHERE fence = excluded.fence AND state = 'in_progress'
                 RETURNING namespace, key, fence"
            ),
            t,
            4,
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

/// `query` with a record's namespace and key bound next, as the single statements bind them.
fn bind_record(query: SqliteQuery, id: &crate::RecordId) -> SqliteQuery {
    query
        .bind(id.namespace().as_bytes().to_vec())
        .bind(id.key().as_bytes().to_vec())
}

/// A record a statement wrote: its namespace, key and fence.
type Written = (Vec<u8>, Vec<u8>, i64);

/// Each returned row's `namespace, key, fence`: the records a statement wrote. The statement
/// has committed, so a row this side cannot read may be a write applied.
fn written(rows: &[sqlx::sqlite::SqliteRow]) -> Result<Vec<Written>, StoreError> {
    rows.iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(|e| StoreError::from(e).maybe_applied())
}

/// Whether `written` holds the record of `id` under `fence`, taking it out if so: each
/// record written answers one item, so an item sent twice in one batch is answered as it
/// would be alone: a reservation or a finalize once (the second finds the record no longer as
/// it expects, and is not written), a heartbeat each time it was written.
fn took(written: &mut Vec<Written>, id: &crate::RecordId, fence: crate::store::Fence) -> bool {
    let found = written.iter().position(|(namespace, key, f)| {
        *f == fence.get() && namespace == id.namespace().as_bytes() && key == id.key().as_bytes()
    });
    found.map(|i| written.swap_remove(i)).is_some()
}

/// A batch of reservations: one insert of every claim whose record is absent, in autocommit
/// (one commit); then, if some were present, one read of those records. Each claim is answered
/// as alone: one that inserted its record has acquired it, whatever the read does; one that
/// did not gets its record, or the read's error (its own insert wrote nothing), or `Vanished`.
/// A record that cannot be decoded fails its own claims alone.
async fn reserve_rows(
    conn: &mut SqliteConnection,
    rows: &RowsStatements,
    (insert, padded): (sqlx::SqlStr, usize),
    claims: &[Claim<'_>],
) -> Result<Answers<Reservation>, StoreError> {
    let mut query = sqlx::query(insert);
    for c in claims {
        query = bind_record(query, c.id)
            .bind(c.fingerprint.map(|f| f.as_bytes().to_vec()))
            .bind(c.fence.get())
            .bind(c.owner.to_owned())
            .bind(millis(c.lease));
    }
    let query = pad(query, rows.reserve.params * (padded - claims.len()));
    let mut inserted = written(&query.fetch_all(&mut *conn).await?)?;
    let acquired: Vec<bool> = claims
        .iter()
        .map(|c| took(&mut inserted, c.id, c.fence))
        .collect();
    let present: Vec<&Claim<'_>> = claims
        .iter()
        .zip(&acquired)
        .filter_map(|(c, acquired)| (!acquired).then_some(c))
        .collect();
    if present.is_empty() {
        return Ok(claims.iter().map(|_| Ok(Reservation::Acquired)).collect());
    }
    let found = load_rows(conn, &rows.load, &present).await;
    Ok(claims
        .iter()
        .zip(acquired)
        .map(|(c, acquired)| {
            if acquired {
                return Ok(Reservation::Acquired);
            }
            let found = found.as_ref().map_err(Clone::clone)?;
            let record = found.iter().find(|(namespace, key, _)| {
                namespace == c.id.namespace().as_bytes() && key == c.id.key().as_bytes()
            });
            match record {
                Some((_, _, Ok(r))) => Ok(Reservation::Exists(r.clone())),
                Some((_, _, Err(e))) => Err(e.clone()),
                // Gone between the insert and the read (released or purged).
                None => Ok(Reservation::Vanished),
            }
        })
        .collect())
}

/// The records of `claims`, each with its namespace and key, and each read on its own: one
/// that cannot be decoded is an error for its claims alone.
async fn load_rows(
    conn: &mut SqliteConnection,
    load: &Rows,
    claims: &[&Claim<'_>],
) -> Result<Vec<(Vec<u8>, Vec<u8>, Result<Record, StoreError>)>, StoreError> {
    let (sql, padded) = load
        .sql(claims.len())
        .ok_or_else(|| StoreError::msg("too many records to read in one statement"))?;
    let mut query = sqlx::query(sql);
    for c in claims {
        query = bind_record(query, c.id);
    }
    let query = pad(query, load.params * (padded - claims.len()));
    query
        .fetch_all(conn)
        .await?
        .iter()
        .map(|row| {
            let record = raw_record::<sqlx::Sqlite>(row)
                .map_err(StoreError::from)
                .and_then(RawRecord::into_record);
            Ok((row.try_get(0)?, row.try_get(1)?, record))
        })
        .collect()
}

/// A batch of finalizes or heartbeats as one statement (one commit): which of them changed
/// their record.
async fn write_rows(
    conn: &mut SqliteConnection,
    statement: &Rows,
    (sql, padded): (sqlx::SqlStr, usize),
    writes: Writes<'_>,
) -> Result<Answers<bool>, StoreError> {
    let mut query = sqlx::query(sql);
    let targets: Vec<(&crate::RecordId, crate::store::Fence)> = match writes {
        Writes::Finalize(items) => {
            for f in items {
                query = bind_record(query, f.id)
                    .bind(f.fence.get())
                    .bind(f.result.bytes.clone())
                    .bind(f.result.codec.as_str().to_owned())
                    .bind(millis(f.ttl));
            }
            items.iter().map(|f| (f.id, f.fence)).collect()
        }
        Writes::Heartbeat(items) => {
            for h in items {
                query = bind_record(query, h.id)
                    .bind(h.fence.get())
                    .bind(millis(h.lease));
            }
            items.iter().map(|h| (h.id, h.fence)).collect()
        }
        // `write_as_one` leaves releases to the transaction of single statements.
        Writes::Release(_) => {
            return Err(StoreError::msg(
                "releases are not batched as one statement on SQLite",
            ));
        }
    };
    let query = pad(query, statement.params * (padded - targets.len()));
    let mut changed = written(&query.fetch_all(conn).await?)?;
    Ok(targets
        .into_iter()
        .map(|(id, fence)| Ok(took(&mut changed, id, fence)))
        .collect())
}

#[cfg(test)]
mod tests {
    use sqlx::Row;

    use super::*;

    /// Every batched statement looks each of its rows up by the primary key, on the SQLite
    /// this crate bundles, for one row and for many: on a table without statistics (idem
    /// never analyzes it), and on one analyzed while it was tiny (by an application sharing
    /// the file, say), whose statistics then make a scan look cheap. A plan that scans the
    /// records table makes each batch slower as the table grows.
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
        ];
        for analyzed in [false, true] {
            if analyzed {
                for i in 0..10 {
                    let id = crate::RecordId::new("plans", format!("k{i}"));
                    let claim = Claim {
                        id: &id,
                        fence: crate::store::Fence::random(),
                        owner: "test",
                        fingerprint: None,
                        lease: Duration::from_secs(30),
                    };
                    crate::store::Store::reserve(&store, &claim)
                        .await
                        .expect("reserve");
                }
                sqlx::query("ANALYZE")
                    .execute(store.pool())
                    .await
                    .expect("analyze");
            }
            for (verb, statement) in statements {
                for n in [1, 2, 64] {
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
                        .filter(|step| {
                            // The table is `r` in a join, or named; the list is `v`.
                            let table = step.split_whitespace().nth(1);
                            step.starts_with("SCAN") && matches!(table, Some("r" | "idem_records"))
                        })
                        .collect();
                    assert!(
                        scans.is_empty(),
                        "{verb} of {n} rows (analyzed: {analyzed}) scans: {plan:?}"
                    );
                }
            }
        }
    }

    /// A batch answers each item as it would be answered alone: a finalize sent twice in one
    /// batch is applied once and answered `true` once; a record that cannot be read fails
    /// only the claims on it, and the claims on absent records beside it still acquire them.
    #[tokio::test]
    async fn each_item_of_a_batch_gets_its_own_answer() {
        use crate::store::{Fence, Finalize, Store, StoredResult};
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(dir.path().join("items.db"))
            .await
            .expect("open");
        fn claim(id: &crate::RecordId, fence: Fence) -> Claim<'_> {
            Claim {
                id,
                fence,
                owner: "test",
                fingerprint: None,
                lease: Duration::from_secs(30),
            }
        }
        let done = &crate::RecordId::new("t", "done");
        let fence = Fence::random();
        assert!(matches!(
            store.reserve(&claim(done, fence)).await,
            Ok(Reservation::Acquired)
        ));
        let result = StoredResult {
            codec: crate::codec::Codec::Json,
            bytes: b"42".to_vec(),
        };
        let twice = Finalize {
            id: done,
            fence,
            result: &result,
            ttl: Duration::from_secs(60),
        };
        let answers: Vec<bool> = store
            .finalize_many(&[twice, twice])
            .await
            .into_iter()
            .map(|a| a.expect("finalize"))
            .collect();
        assert_eq!(answers, [true, false], "applied once, answered once");

        // A codec this version does not know (written by a newer one, say).
        sqlx::query("UPDATE idem_records SET codec = 'msgpack' WHERE key = ?1")
            .bind(b"done".to_vec())
            .execute(store.pool())
            .await
            .expect("corrupt");
        let fresh: Vec<crate::RecordId> = (0..3)
            .map(|i| crate::RecordId::new("t", format!("fresh-{i}")))
            .collect();
        let mut claims: Vec<Claim<'_>> =
            fresh.iter().map(|id| claim(id, Fence::random())).collect();
        claims.insert(1, claim(done, Fence::random()));
        let answers = store.reserve_many(&claims).await;
        assert!(
            answers[1].is_err(),
            "the unreadable record: {:?}",
            answers[1]
        );
        for i in [0, 2, 3] {
            assert!(
                matches!(answers[i], Ok(Reservation::Acquired)),
                "claim {i}: {:?}",
                answers[i]
            );
        }
    }

    /// Batches of several verbs share one transaction and one commit (results first,
    /// reservations last), and each item is answered as it would be alone; if the database refuses one row, the
    /// transaction rolls back and each verb's batch runs on its own, so that row's call alone
    /// gets the error and nothing is applied twice.
    #[tokio::test]
    async fn batches_of_several_verbs_commit_together_and_answer_each_as_alone() {
        use crate::store::{
            Combined, Fence, Finalize, Heartbeat, RecordState, Release, Store, StoredResult,
        };
        let dir = tempfile::tempdir().expect("temp dir");
        // Every commit on the store's connections, counted.
        let commits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = commits.clone();
        let pool = SqlitePoolOptions::new()
            .after_connect(move |conn, _| {
                let count = count.clone();
                Box::pin(async move {
                    conn.lock_handle().await?.set_commit_hook(move || {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        true
                    });
                    Ok(())
                })
            })
            .connect_with(
                SqliteConnectOptions::new()
                    .filename(dir.path().join("combined.db"))
                    .create_if_missing(true),
            )
            .await
            .expect("pool");
        let store = SqliteStore::from_pool(pool, DEFAULT_TABLE)
            .await
            .expect("store");
        assert!(store.combine_verbs());
        let ids: Vec<crate::RecordId> = ["a", "b", "c", "d", "e", "fresh-1", "fresh-2", "bad"]
            .iter()
            .map(|k| crate::RecordId::new("t", *k))
            .collect();
        let [a, b, c, d, e, fresh_1, fresh_2, bad] = &ids[..] else {
            unreachable!()
        };
        let claim = |id, fence| Claim {
            id,
            fence,
            owner: "test",
            fingerprint: None,
            lease: Duration::from_secs(30),
        };
        let fences: Vec<Fence> = (0..5).map(|_| Fence::random()).collect();
        for (id, fence) in [a, b, c, d, e].into_iter().zip(&fences) {
            let got = store.reserve(&claim(id, *fence)).await.expect("reserve");
            assert!(matches!(got, Reservation::Acquired));
        }
        let result = StoredResult {
            codec: crate::codec::Codec::Json,
            bytes: b"7".to_vec(),
        };
        let day = Duration::from_secs(86_400);
        let finalize = [
            Finalize {
                id: a,
                fence: fences[0],
                result: &result,
                ttl: day,
            },
            Finalize {
                id: b,
                fence: Fence::random(),
                result: &result,
                ttl: day,
            },
        ];
        let heartbeat = [Heartbeat {
            id: d,
            fence: fences[3],
            lease: day,
        }];
        let release = [Release {
            id: c,
            fence: fences[2],
        }];
        // `a` is reserved again in the same batch: it sees the result written before it.
        let reserve = [claim(a, Fence::random()), claim(fresh_1, Fence::random())];
        let before = commits.load(std::sync::atomic::Ordering::SeqCst);
        let out = store
            .run_combined(Combined {
                reserve: &reserve,
                finalize: &finalize,
                heartbeat: &heartbeat,
                release: &release,
            })
            .await;
        assert_eq!(
            commits.load(std::sync::atomic::Ordering::SeqCst),
            before + 1,
            "four verbs' batches, one commit"
        );
        let answers = |v: &[Result<bool, StoreError>]| -> Vec<bool> {
            v.iter().map(|r| *r.as_ref().expect("answer")).collect()
        };
        assert_eq!(
            answers(&out.finalize),
            [true, false],
            "each under its own fence"
        );
        assert_eq!(answers(&out.heartbeat), [true]);
        assert_eq!(answers(&out.release), [true]);
        match &out.reserve[0] {
            Ok(Reservation::Exists(r)) => assert_eq!(r.state, RecordState::Completed),
            other => panic!("a: {other:?}"),
        }
        assert!(matches!(out.reserve[1], Ok(Reservation::Acquired)));
        assert!(store.load(c).await.expect("load").is_none(), "released");
        let held = store.load(d).await.expect("load").expect("d");
        assert!(held.lease_remaining > Duration::from_secs(3_600), "beaten");

        // A row the database refuses, in the reservations of a combined batch.
        sqlx::query(
            "CREATE TRIGGER refuse BEFORE INSERT ON idem_records
             WHEN NEW.key = CAST('bad' AS BLOB) BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
        )
        .execute(store.pool())
        .await
        .expect("trigger");
        let finalize = [Finalize {
            id: e,
            fence: fences[4],
            result: &result,
            ttl: day,
        }];
        let reserve = [claim(bad, Fence::random()), claim(fresh_2, Fence::random())];
        let out = store
            .run_combined(Combined {
                reserve: &reserve,
                finalize: &finalize,
                ..Combined::default()
            })
            .await;
        assert_eq!(
            answers(&out.finalize),
            [true],
            "applied once: the combined transaction rolled back before it ran again"
        );
        assert!(out.reserve[0].is_err(), "bad: {:?}", out.reserve[0]);
        assert!(matches!(out.reserve[1], Ok(Reservation::Acquired)));
        let e = store.load(e).await.expect("load").expect("e");
        assert_eq!(e.state, RecordState::Completed);
        assert!(store.load(bad).await.expect("load").is_none());
    }

    #[test]
    fn a_batch_is_padded_to_a_power_of_two_and_bounded_by_the_parameter_limit() {
        let rows = rows("idem_records");
        let (sql, padded) = rows.heartbeat.sql(5).expect("fits");
        assert_eq!(padded, 8);
        assert_eq!(sql.as_str().matches("(?, ?, ?, ?)").count(), 8);
        // 4,096 rows of 4 parameters fit SQLite's 32,766; 8,192 do not.
        assert!(rows.heartbeat.sql(4_096).is_some());
        assert!(rows.heartbeat.sql(4_097).is_none());
        assert!(rows.reserve.sql(usize::MAX).is_none());
    }
}
