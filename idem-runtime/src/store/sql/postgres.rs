//! PostgreSQL: the shared store for many replicas.
//!
//! The clock is `clock_timestamp()`: the time of the statement, not of the start of the
//! transaction it runs in, which matters for transactional calls in a long transaction.
//! `reserve` is one statement that inserts if absent and otherwise returns the existing row
//! (one round trip for a replay); `take_over` is one compare-and-set `UPDATE`. Concurrent
//! writers to one row are serialised by the row lock, and PostgreSQL re-checks the `WHERE`
//! clause against the row a winner left behind, so of many concurrent takeovers exactly one
//! matches. Migrations and purges take a transaction-scoped advisory lock.

use sqlx::postgres::PgConnection;
use sqlx::{Row, SqlStr};

use super::dialect::{
    Answers, BoxFuture, Conflict, Dialect, ManyStatements, Param, Statement, Statements, Writes,
    raw_record, sealed::Sealed,
};
use super::{ServerStoreOptions, SqlStore, millis, statement};
use crate::Error;
use crate::error::StoreError;
use crate::store::{Claim, Reservation};

use Param::{
    Codec, Fence, Fingerprint, Key, Lease, Limit, Namespace, Observed, Owner, ResultBytes, Ttl,
};

/// PostgreSQL, for [`SqlStore`]: see [`PgStore`](crate::store::PgStore).
#[derive(Clone, Copy, Debug)]
pub struct Postgres;

impl Dialect for Postgres {}

const NOW: &str = "clock_timestamp()";

/// The record columns, with the times as milliseconds left on the server's clock.
const RECORD: &str = "state, fingerprint, fence, owner, attempts::BIGINT AS attempts,
    (EXTRACT(EPOCH FROM (lease_expires_at - clock_timestamp())) * 1000)::BIGINT AS lease_remaining_ms,
    (EXTRACT(EPOCH FROM (expires_at - clock_timestamp())) * 1000)::BIGINT AS expires_in_ms,
    result, codec";

/// `now + $n milliseconds`.
fn plus(n: u8) -> String {
    format!("{NOW} + ${n}::BIGINT * interval '1 millisecond'")
}

impl Sealed for Postgres {
    type Db = sqlx::Postgres;
    const BACKEND: &'static str = "postgres";
    const NAME: &'static str = "PostgreSQL";
    const BEGIN: &'static str = "BEGIN";

    fn statements(t: &str) -> Statements {
        let claim: &[Param] = &[Namespace, Key, Fingerprint, Fence, Owner, Lease];
        let columns = "(namespace, key, state, fingerprint, fence, owner, lease_expires_at,
            heartbeat_at, attempts, created_at, expires_at)";
        let lease = plus(6);
        let load = format!("SELECT {RECORD} FROM {{t}} WHERE namespace = $1 AND key = $2");
        Statements {
            // Inside a caller's transaction the common case is a first execution, and every
            // statement is a round trip the caller's transaction pays for: a plain insert.
            insert: Statement::new(
                &format!(
                    "INSERT INTO {{t}} {columns}
                     VALUES ($1, $2, 'in_progress', $3, $4, $5, {lease}, {NOW}, 1, {NOW}, {lease})
                     ON CONFLICT (namespace, key) DO NOTHING"
                ),
                t,
                claim,
            ),
            conflict: Conflict::NoRows,
            // The existing row is read first, so a replay costs a primary-key lookup and no
            // insert attempt. (Both parts see the snapshot from before the statement: a row
            // committed by a racing insert in the meantime makes the insert do nothing and is
            // not visible to the read, so nothing comes back: `Vanished`, reserve again.)
            insert_or_load: Some(Statement::new(
                &format!(
                    "WITH existing AS (
                        SELECT {RECORD} FROM {{t}} WHERE namespace = $1 AND key = $2
                    ), ins AS (
                        INSERT INTO {{t}} {columns}
                        SELECT $1::BYTEA, $2::BYTEA, 'in_progress', $3::BYTEA, $4::BIGINT, $5::TEXT,
                            {lease}, {NOW}, 1, {NOW}, {lease}
                        WHERE NOT EXISTS (SELECT 1 FROM existing)
                        ON CONFLICT (namespace, key) DO NOTHING
                        RETURNING 1
                    )
                    SELECT TRUE AS inserted, NULL::TEXT AS state, NULL::BYTEA AS fingerprint,
                           NULL::BIGINT AS fence, NULL::TEXT AS owner, NULL::BIGINT AS attempts,
                           NULL::BIGINT AS lease_remaining_ms, NULL::BIGINT AS expires_in_ms,
                           NULL::BYTEA AS result, NULL::TEXT AS codec
                    FROM ins
                    UNION ALL
                    SELECT FALSE, existing.* FROM existing"
                ),
                t,
                claim,
            )),
            load: Statement::new(&load, t, &[Namespace, Key]),
            // READ COMMITTED: a statement after the conflicting insert sees the committed row.
            load_in_transaction: Statement::new(&load, t, &[Namespace, Key]),
            take_over: Statement::new(
                &format!(
                    "UPDATE {{t}} SET state = 'in_progress', fingerprint = $3, fence = $4, owner = $5,
                        lease_expires_at = {lease}, heartbeat_at = {NOW}, expires_at = {lease},
                        attempts = CASE WHEN state = 'completed' THEN 1 ELSE attempts + 1 END,
                        created_at = CASE WHEN state = 'completed' THEN {NOW} ELSE created_at END,
                        result = NULL, codec = NULL, completed_at = NULL
                     WHERE namespace = $1 AND key = $2 AND fence = $7
                       AND ((state = 'in_progress' AND lease_expires_at <= {NOW})
                         OR (state = 'completed' AND expires_at <= {NOW}))"
                ),
                t,
                &[Namespace, Key, Fingerprint, Fence, Owner, Lease, Observed],
            ),
            heartbeat: Statement::new(
                &format!(
                    "UPDATE {{t}} SET lease_expires_at = {lease}, expires_at = {lease}, heartbeat_at = {NOW}
                     WHERE namespace = $1 AND key = $2 AND fence = $3 AND state = 'in_progress'",
                    lease = plus(4)
                ),
                t,
                &[Namespace, Key, Fence, Lease],
            ),
            finalize: Statement::new(
                &format!(
                    "UPDATE {{t}} SET state = 'completed', result = $3, codec = $4, completed_at = {NOW},
                        expires_at = {ttl}, lease_expires_at = NULL
                     WHERE namespace = $1 AND key = $2 AND fence = $6 AND state = 'in_progress'",
                    ttl = plus(5)
                ),
                t,
                &[Namespace, Key, ResultBytes, Codec, Ttl, Fence],
            ),
            release: Statement::new(
                "DELETE FROM {t} WHERE namespace = $1 AND key = $2 AND fence = $3 AND state = 'in_progress'",
                t,
                &[Namespace, Key, Fence],
            ),
            purge: Statement::new(
                "DELETE FROM {t} WHERE ctid IN
                    (SELECT ctid FROM {t} WHERE expires_at <= now() LIMIT $1)",
                t,
                &[Limit],
            ),
            lock: Some(Statement::new(
                "SELECT 1::BIGINT FROM pg_advisory_xact_lock($1::TEXT::BIGINT)",
                t,
                &[Param::LockName],
            )),
            try_lock: Some(Statement::new(
                "SELECT pg_try_advisory_xact_lock($1::TEXT::BIGINT)::INT::BIGINT",
                t,
                &[Param::LockName],
            )),
            unlock: None,
            create_schema: Statement::new(
                "CREATE TABLE IF NOT EXISTS idem_schema (table_name TEXT PRIMARY KEY, version INTEGER NOT NULL)",
                t,
                &[],
            ),
            schema_version: Statement::new(
                "SELECT version::BIGINT FROM idem_schema WHERE table_name = $1",
                t,
                &[Param::TableName],
            ),
            table_exists: Statement::new(
                "SELECT (to_regclass($1) IS NOT NULL)::INT::BIGINT",
                t,
                &[Param::TableName],
            ),
            record_version: Statement::new(
                "INSERT INTO idem_schema (table_name, version) VALUES ($1, $2::BIGINT)
                 ON CONFLICT (table_name) DO UPDATE SET version = excluded.version",
                t,
                &[Param::TableName, Param::Version],
            ),
            many: Some(many(t)),
            rows: None,
        }
    }

    fn migrations() -> Vec<String> {
        vec![
            // 1: the records table and its expiry index.
            super::records_table("BYTEA", "BIGINT", "INTEGER", "TIMESTAMPTZ"),
            // 2: every record is written twice (reserved, then completed); room on each page
            // lets the second write be a heap-only update, with no new index entries.
            "ALTER TABLE {t} SET (fillfactor = 80);".into(),
        ]
    }

    fn lock_name(table: &str) -> String {
        // The advisory lock's key: 64 bits of a hash of the table name.
        let digest = blake3::hash(format!("idem:{table}").as_bytes());
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&digest.as_bytes()[..8]);
        i64::from_le_bytes(bytes).to_string()
    }

    fn is_conflict(err: &sqlx::Error) -> bool {
        // 40001: serialization failure; 40P01: deadlock; 55P03: lock timeout.
        matches!(err, sqlx::Error::Database(db)
            if matches!(db.code().as_deref(), Some("40001" | "40P01" | "55P03")))
    }

    fn reserve_as_one<'c>(
        conn: &'c mut PgConnection,
        sql: &'c Statements,
        claims: &'c [Claim<'c>],
    ) -> Option<BoxFuture<'c, Result<Answers<Reservation>, StoreError>>> {
        let statement = sql.many.as_ref()?.reserve.clone();
        Some(Box::pin(reserve_many(conn, statement, claims)))
    }

    fn write_as_one<'c>(
        conn: &'c mut PgConnection,
        sql: &'c Statements,
        writes: Writes<'c>,
    ) -> Option<BoxFuture<'c, Result<Answers<bool>, StoreError>>> {
        Some(Box::pin(write_many(conn, sql.many.as_ref()?, writes)))
    }
}

/// The rows of a batch, as a `FROM` item named `i`: the array parameters `$1..`, one per
/// column (`name`, element type), unnested into rows numbered `n` from 1.
///
/// The arrays are read in a subquery the planner may not flatten (`OFFSET 0`), so it never
/// sees how long they are, and every plan of the statement counts on the ten rows it guesses
/// for an array it cannot see. Without the fence, the server plans the first five executions
/// for their values; for a batch under ten rows such a plan looks cheaper than the kept one
/// (which assumes ten), so the server went on planning every execution afresh: a fifth of its
/// CPU under the HTTP layer, in a profile of 2026-12-02.
///
/// The price: every batch runs on the plan kept, and a plan made while the table was nearly
/// empty or never analyzed scans the whole table, until the statistics change and the server
/// plans again. The store's own early `ANALYZE` as the table fills bounds that
/// ([`maintain`](super::maintain)).
fn rows(columns: &[(&str, &str)]) -> String {
    let list = |f: &dyn Fn(usize, &str, &str) -> String| {
        let items: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(n, (name, ty))| f(n + 1, name, ty))
            .collect();
        items.join(", ")
    };
    format!(
        "(SELECT {} OFFSET 0) a CROSS JOIN LATERAL unnest({}) WITH ORDINALITY AS i({}, n)",
        list(&|n, name, ty| format!("${n}::{ty}[] AS {name}")),
        list(&|_, name, _| format!("a.{name}")),
        list(&|_, name, _| name.to_owned()),
    )
}

/// The batched verbs as single statements over arrays: `unnest` turns the arrays into rows
/// (numbered, to answer each item), and each statement writes or reads them all at once.
fn many(t: &str) -> ManyStatements {
    let lease = format!("{NOW} + i.lease_ms * interval '1 millisecond'");
    ManyStatements {
        // Existing rows are read first (a replay is then a lookup, not an insert attempt);
        // the others are inserted in the batch's order (sorted by record). An item neither
        // inserted nor found conflicted with a row committed during the statement: `Vanished`.
        reserve: statement(
            &format!(
                "WITH i AS (
                    SELECT i.* FROM {}
                ), existing AS (
                    SELECT i.n, r.state, r.fingerprint, r.fence, r.owner,
                        r.attempts::BIGINT AS attempts,
                        (EXTRACT(EPOCH FROM (r.lease_expires_at - {NOW})) * 1000)::BIGINT
                            AS lease_remaining_ms,
                        (EXTRACT(EPOCH FROM (r.expires_at - {NOW})) * 1000)::BIGINT AS expires_in_ms,
                        r.result, r.codec
                    FROM i JOIN {{t}} r ON r.namespace = i.namespace AND r.key = i.key
                ), ins AS (
                    INSERT INTO {{t}} (namespace, key, state, fingerprint, fence, owner,
                        lease_expires_at, heartbeat_at, attempts, created_at, expires_at)
                    SELECT i.namespace, i.key, 'in_progress', i.fingerprint, i.fence, i.owner,
                        {lease}, {NOW}, 1, {NOW}, {lease}
                    FROM i WHERE NOT EXISTS (SELECT 1 FROM existing e WHERE e.n = i.n)
                    ORDER BY i.n
                    ON CONFLICT (namespace, key) DO NOTHING
                    RETURNING namespace, key, fence
                )
                SELECT i.n, ins.fence IS NOT NULL AS inserted, e.state, e.fingerprint, e.fence,
                    e.owner, e.attempts, e.lease_remaining_ms, e.expires_in_ms, e.result, e.codec
                FROM i
                LEFT JOIN ins ON ins.namespace = i.namespace AND ins.key = i.key
                    AND ins.fence = i.fence
                LEFT JOIN existing e ON e.n = i.n
                ORDER BY i.n",
                rows(&[
                    ("namespace", "BYTEA"),
                    ("key", "BYTEA"),
                    ("fingerprint", "BYTEA"),
                    ("fence", "BIGINT"),
                    ("owner", "TEXT"),
                    ("lease_ms", "BIGINT"),
                ])
            ),
            t,
        ),
        finalize: statement(
            &format!(
                "UPDATE {{t}} r SET state = 'completed', result = i.result, codec = i.codec,
                    completed_at = {NOW}, lease_expires_at = NULL,
                    expires_at = {NOW} + i.ttl_ms * interval '1 millisecond'
                 FROM {}
                 WHERE r.namespace = i.namespace AND r.key = i.key AND r.fence = i.fence
                   AND r.state = 'in_progress'
                 RETURNING i.n",
                rows(&[
                    ("namespace", "BYTEA"),
                    ("key", "BYTEA"),
                    ("fence", "BIGINT"),
                    ("result", "BYTEA"),
                    ("codec", "TEXT"),
                    ("ttl_ms", "BIGINT"),
                ])
            ),
            t,
        ),
        heartbeat: statement(
            &format!(
                "UPDATE {{t}} r SET lease_expires_at = {lease}, expires_at = {lease}, heartbeat_at = {NOW}
                 FROM {}
                 WHERE r.namespace = i.namespace AND r.key = i.key AND r.fence = i.fence
                   AND r.state = 'in_progress'
                 RETURNING i.n",
                rows(&[
                    ("namespace", "BYTEA"),
                    ("key", "BYTEA"),
                    ("fence", "BIGINT"),
                    ("lease_ms", "BIGINT"),
                ])
            ),
            t,
        ),
        // One simple query, so one implicit transaction: the time limit is the server's too.
        analyze: statement(
            &format!(
                "SET LOCAL statement_timeout = '{}s'; ANALYZE (SKIP_LOCKED) {{t}}",
                super::maintain::ANALYZE_PATIENCE.as_secs()
            ),
            t,
        ),
        // `ANALYZE` by a role that may not analyze the table only warns, and does nothing; a
        // role that does not own it is not trusted to (database owners and, on PostgreSQL 17,
        // roles with MAINTAIN may; they are left to autovacuum here).
        should_analyze: Statement::new(
            "SELECT CASE WHEN NOT pg_has_role(c.relowner, 'USAGE') THEN 2
                         WHEN c.reltuples >= $1 THEN 0 ELSE 1 END::BIGINT
             FROM pg_class c WHERE c.oid = '{t}'::regclass",
            t,
            &[Limit],
        ),
        release: statement(
            &format!(
                "DELETE FROM {{t}} r
                 USING {}
                 WHERE r.namespace = i.namespace AND r.key = i.key AND r.fence = i.fence
                   AND r.state = 'in_progress'
                 RETURNING i.n",
                rows(&[("namespace", "BYTEA"), ("key", "BYTEA"), ("fence", "BIGINT")])
            ),
            t,
        ),
    }
}

fn bytes<'a>(items: impl Iterator<Item = &'a str>) -> Vec<Vec<u8>> {
    items.map(|s| s.as_bytes().to_vec()).collect()
}

async fn reserve_many(
    conn: &mut PgConnection,
    sql: SqlStr,
    claims: &[Claim<'_>],
) -> Result<Answers<Reservation>, StoreError> {
    let rows = sqlx::query(sql)
        .bind(bytes(claims.iter().map(|c| c.id.namespace())))
        .bind(bytes(claims.iter().map(|c| c.id.key())))
        .bind(
            claims
                .iter()
                .map(|c| c.fingerprint.map(|f| f.as_bytes().to_vec()))
                .collect::<Vec<_>>(),
        )
        .bind(claims.iter().map(|c| c.fence.get()).collect::<Vec<_>>())
        .bind(
            claims
                .iter()
                .map(|c| c.owner.to_owned())
                .collect::<Vec<_>>(),
        )
        .bind(claims.iter().map(|c| millis(c.lease)).collect::<Vec<_>>())
        .fetch_all(conn)
        .await?;
    // The statement has committed: a row this side cannot read may be a reservation written.
    Ok(rows
        .iter()
        .map(|row| {
            let inserted = row.try_get::<bool, _>("inserted");
            if inserted.map_err(|e| StoreError::from(e).maybe_applied())? {
                return Ok(Reservation::Acquired);
            }
            // The row of a record that vanished between the insert and the read has no state.
            if row.try_get::<Option<String>, _>("state")?.is_none() {
                return Ok(Reservation::Vanished);
            }
            let raw = raw_record::<sqlx::Postgres>(row)?;
            Ok(Reservation::Exists(raw.into_record()?))
        })
        .collect())
}

async fn write_many(
    conn: &mut PgConnection,
    sql: &ManyStatements,
    writes: Writes<'_>,
) -> Result<Answers<bool>, StoreError> {
    let query = match writes {
        Writes::Finalize(items) => sqlx::query(sql.finalize.clone())
            .bind(bytes(items.iter().map(|f| f.id.namespace())))
            .bind(bytes(items.iter().map(|f| f.id.key())))
            .bind(items.iter().map(|f| f.fence.get()).collect::<Vec<_>>())
            .bind(
                items
                    .iter()
                    .map(|f| f.result.bytes.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(
                items
                    .iter()
                    .map(|f| f.result.codec.as_str().to_owned())
                    .collect::<Vec<_>>(),
            )
            .bind(items.iter().map(|f| millis(f.ttl)).collect::<Vec<_>>()),
        Writes::Heartbeat(items) => sqlx::query(sql.heartbeat.clone())
            .bind(bytes(items.iter().map(|h| h.id.namespace())))
            .bind(bytes(items.iter().map(|h| h.id.key())))
            .bind(items.iter().map(|h| h.fence.get()).collect::<Vec<_>>())
            .bind(items.iter().map(|h| millis(h.lease)).collect::<Vec<_>>()),
        Writes::Release(items) => sqlx::query(sql.release.clone())
            .bind(bytes(items.iter().map(|r| r.id.namespace())))
            .bind(bytes(items.iter().map(|r| r.id.key())))
            .bind(items.iter().map(|r| r.fence.get()).collect::<Vec<_>>()),
    };
    let mut changed = vec![false; writes.len()];
    for row in query.fetch_all(conn).await? {
        // Committed: an answer this side cannot read may be a write applied.
        let n: i64 = row
            .try_get("n")
            .map_err(|e| StoreError::from(e).maybe_applied())?;
        if let Some(slot) = usize::try_from(n - 1).ok().and_then(|i| changed.get_mut(i)) {
            *slot = true;
        }
    }
    Ok(changed.into_iter().map(Ok).collect())
}

/// A [`Store`](crate::store::Store) in a PostgreSQL table, shared by every replica that points
/// at it (feature `postgres`).
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
pub type PgStore = SqlStore<Postgres>;

impl SqlStore<Postgres> {
    /// Connects to `url` with default options and creates the records table if missing.
    pub async fn connect(url: &str) -> Result<PgStore, Error> {
        Self::connect_with(url, ServerStoreOptions::default()).await
    }

    /// Connects to `url` with `options`.
    pub async fn connect_with(url: &str, options: ServerStoreOptions) -> Result<PgStore, Error> {
        Self::connect_server(url, &options).await
    }
}
