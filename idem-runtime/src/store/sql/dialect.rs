//! What differs between the SQL databases, as data, and the one place that talks to sqlx.
//!
//! A [`Dialect`] is a marker type (`Postgres`, `MySql`, `Sqlite`) that names its sqlx database
//! and supplies what really differs: the statement texts (with the order their parameters are
//! bound in, since MySQL's `?` placeholders are positional), how a conflicting insert shows
//! itself, the migrations, the lock that serialises migrations and purges across replicas, and
//! which error codes mean "lost a conflict with a concurrent transaction". The clock is part of
//! the statement texts: every time is computed by the database (`clock_timestamp()`,
//! `UTC_TIMESTAMP(6)`, SQLite's `julianday('now')`), never bound from the caller.
//!
//! [`Driver`] is implemented once, generically, for every sqlx database with the types idem
//! binds and reads: it runs a [`Statement`] with its parameters taken from [`Values`].
//!
//! The items here are `pub` inside a private module: the sealed [`Dialect`] names them, so they
//! must be as visible as it is, yet no user can reach them.
#![allow(unreachable_pub)]

use std::future::Future;
use std::time::Duration;

use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Row, SqlStr, Type};

use crate::codec::Codec;
use crate::key::{Fingerprint, RecordId};
use crate::store::{Claim, Fence, StoredResult};

use super::RawRecord;

/// A SQL database idem can keep records in (feature `postgres`, `mysql` or `sqlite`).
///
/// Implemented by [`Postgres`](super::Postgres), [`MySql`](super::MySql) and
/// [`Sqlite`](super::Sqlite) only: it is sealed, and its items are internal.
pub trait Dialect: sealed::Sealed + Send + Sync + Sized + 'static {}

pub(crate) mod sealed {
    use super::{Answers, BoxFuture, Driver, Statements, Writes};
    use crate::error::StoreError;
    use crate::store::{Claim, Reservation};

    /// The dialect's parts, hidden from users.
    pub trait Sealed {
        /// The sqlx database.
        type Db: Driver;
        /// The store's name in logs and metrics (`"postgres"`).
        const BACKEND: &'static str;
        /// The database's name in messages (`"PostgreSQL"`).
        const NAME: &'static str;
        /// How many batches of one verb run well at once ([`Store::batch_concurrency`]).
        ///
        /// [`Store::batch_concurrency`]: crate::store::Store::batch_concurrency
        const BATCH_CONCURRENCY: usize = crate::store::BATCH_CONCURRENCY;
        /// Whether batches of different verbs share one transaction
        /// ([`Store::combine_verbs`]): for a database with one writer at a time.
        ///
        /// [`Store::combine_verbs`]: crate::store::Store::combine_verbs
        const COMBINE_VERBS: bool = false;
        /// What to check when the store cannot be opened (its message says so).
        const OPEN_CHECK: &'static str = crate::error::CHECK_SERVER;
        /// The statement that begins a migration's or a purge's transaction.
        const BEGIN: &'static str;
        /// The record statements for `table`.
        fn statements(table: &str) -> Statements;
        /// The migrations that create and evolve the records table, in order (`{t}` is the
        /// table). Each entry may hold several statements.
        fn migrations() -> Vec<String>;
        /// The name a lock on `table` is taken under (a number, as text, on PostgreSQL).
        fn lock_name(table: &str) -> String;
        /// Whether `err` means the statement lost a conflict with a concurrent transaction (a
        /// deadlock, a serialization failure, a lock wait timeout): its transaction is gone,
        /// and retrying it is the remedy.
        fn is_conflict(err: &sqlx::Error) -> bool;

        /// A batch of reservations as one statement (over arrays, or a list of rows), with
        /// an answer per claim (a record that cannot be read fails its own claim alone);
        /// `None`: the store runs the batch as one transaction of single statements.
        fn reserve_as_one<'c>(
            _conn: &'c mut <Self::Db as sqlx::Database>::Connection,
            _sql: &'c Statements,
            _claims: &'c [Claim<'c>],
        ) -> Option<BoxFuture<'c, Result<Answers<Reservation>, StoreError>>> {
            None
        }

        /// A batch of fenced writes as one statement, with an answer per write.
        fn write_as_one<'c>(
            _conn: &'c mut <Self::Db as sqlx::Database>::Connection,
            _sql: &'c Statements,
            _writes: Writes<'c>,
        ) -> Option<BoxFuture<'c, Result<Answers<bool>, StoreError>>> {
            None
        }
    }
}

/// A batch's answers, one per item, in the batch's order.
pub type Answers<O> = Vec<Result<O, crate::error::StoreError>>;

/// A future a dialect hands back, boxed so the sealed trait can name it.
pub type BoxFuture<'c, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'c>>;

/// A batch of one kind of fenced write.
#[derive(Clone, Copy)]
pub enum Writes<'c> {
    Finalize(&'c [crate::store::Finalize<'c>]),
    Heartbeat(&'c [crate::store::Heartbeat<'c>]),
    Release(&'c [crate::store::Release<'c>]),
}

impl Writes<'_> {
    pub fn len(&self) -> usize {
        match self {
            Writes::Finalize(items) => items.len(),
            Writes::Heartbeat(items) => items.len(),
            Writes::Release(items) => items.len(),
        }
    }
}

/// One parameter of a statement, by meaning; [`Values`] says what each is for one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    Namespace,
    Key,
    Fingerprint,
    /// The caller's fence: the one it writes, or the one its write is fenced on.
    Fence,
    Owner,
    /// The lease, in milliseconds.
    Lease,
    /// The fence a takeover expects to find.
    Observed,
    /// The stored result's bytes.
    ResultBytes,
    Codec,
    /// The TTL, in milliseconds.
    Ttl,
    /// How many rows a purge deletes at most.
    Limit,
    /// The name of the migration and purge lock.
    #[cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(dead_code))]
    LockName,
    /// The records table's name (in the schema table).
    TableName,
    /// A migration's version number.
    Version,
}

/// A statement's text and the order its parameters are bound in.
#[derive(Clone, Debug)]
pub struct Statement {
    pub(crate) sql: SqlStr,
    pub(crate) params: &'static [Param],
}

impl Statement {
    pub(crate) fn new(template: &str, table: &str, params: &'static [Param]) -> Statement {
        Statement {
            sql: super::statement(template, table),
            params,
        }
    }
}

/// How an insert of a key that already exists shows itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conflict {
    /// It affects no rows (`ON CONFLICT DO NOTHING`).
    NoRows,
    /// It fails with a unique violation (MySQL: `INSERT IGNORE` would hide other errors too).
    Fails,
}

/// Every statement a dialect supplies. Each returns the record columns (`state, fingerprint,
/// fence, owner, attempts, lease_remaining_ms, expires_in_ms, result, codec`, integers as
/// 64-bit) where it reads a record, and is fenced where it writes one.
#[derive(Clone, Debug)]
pub struct Statements {
    /// Insert an in-progress record if none exists.
    pub(crate) insert: Statement,
    pub(crate) conflict: Conflict,
    /// Insert if absent, or else return the existing record, in one statement (with an
    /// `inserted` column). `None`: insert, then load after a conflict.
    pub(crate) insert_or_load: Option<Statement>,
    pub(crate) load: Statement,
    /// What a transaction reads after its insert conflicted: a locking read where the
    /// isolation level would otherwise hide a row committed after the transaction began.
    pub(crate) load_in_transaction: Statement,
    pub(crate) take_over: Statement,
    pub(crate) heartbeat: Statement,
    pub(crate) finalize: Statement,
    pub(crate) release: Statement,
    pub(crate) purge: Statement,
    /// The lock that serialises migrations of one table across replicas (held until the
    /// transaction ends, or until `unlock`). Returns 1 once held. `None`: `BEGIN` serialises.
    pub(crate) lock: Option<Statement>,
    /// The same lock, without waiting: 1 if taken, anything else if not.
    pub(crate) try_lock: Option<Statement>,
    /// Releases a lock held by the session rather than by the transaction.
    pub(crate) unlock: Option<Statement>,
    /// Creates the schema table (`table_name`, `version`) if missing.
    pub(crate) create_schema: Statement,
    /// The recorded version of a table (0 rows: none).
    pub(crate) schema_version: Statement,
    /// 1 if the records table exists, 0 if not (it may have been dropped by hand).
    pub(crate) table_exists: Statement,
    /// Records a table's version.
    pub(crate) record_version: Statement,
    /// One-statement forms of the batched verbs, for a dialect that runs them itself
    /// ([`sealed::Sealed::reserve_as_one`]).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) many: Option<ManyStatements>,
    /// The batched verbs as single statements over a list of rows, for a dialect without
    /// arrays that runs them itself.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(crate) rows: Option<RowsStatements>,
}

/// The batched verbs as single statements over a list of rows, `VALUES (..), (..)` (SQLite):
/// a batch is one statement, so one round trip to the database's thread and one commit.
#[derive(Clone, Debug)]
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
pub struct RowsStatements {
    /// Inserts the rows that are absent; returns `namespace, key, fence` of each it inserted.
    pub(crate) reserve: Rows,
    /// The records of the rows' `(namespace, key)`, with those two columns first.
    pub(crate) load: Rows,
    /// Each returns `namespace, key, fence` of every record it changed.
    pub(crate) finalize: Rows,
    pub(crate) heartbeat: Rows,
}

/// A statement over a list of rows. A batch's list is padded with rows of NULLs (which match
/// nothing and insert nothing) to the next power of two, so that a verb has a handful of texts
/// for the connection to prepare once and keep, rather than one per batch size.
#[derive(Clone, Debug)]
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
pub struct Rows {
    /// The text with the table filled in, and `{rows}` where the list goes.
    template: String,
    /// Parameters per row.
    pub(crate) params: usize,
    /// The text for 2^i rows, made on first use.
    texts: [std::sync::OnceLock<SqlStr>; Rows::SIZES],
}

#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
impl Rows {
    /// Lists of up to 2^15 rows; a longer batch is not carried as one statement.
    const SIZES: usize = 16;
    /// SQLite's limit on a statement's parameters (`SQLITE_MAX_VARIABLE_NUMBER`).
    const MAX_PARAMS: usize = 32_766;

    pub(crate) fn new(template: &str, table: &str, params: usize) -> Rows {
        Rows {
            template: template.replace("{t}", table),
            params,
            texts: Default::default(),
        }
    }

    /// The text for `n` rows and the padded number of rows it lists, or `None` if `n` rows do
    /// not fit in one statement.
    pub(crate) fn sql(&self, n: usize) -> Option<(SqlStr, usize)> {
        let padded = n.max(1).checked_next_power_of_two()?;
        let slot = self.texts.get(padded.trailing_zeros() as usize)?;
        if padded.checked_mul(self.params)? > Self::MAX_PARAMS {
            return None;
        }
        let text = slot.get_or_init(|| {
            let row = format!("({})", vec!["?"; self.params].join(", "));
            let rows = vec![row.as_str(); padded].join(", ");
            let sql: std::sync::Arc<str> = self.template.replace("{rows}", &rows).into();
            sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(sql))
        });
        Some((text.clone(), padded))
    }
}

/// The batched verbs' statements over arrays (PostgreSQL).
#[derive(Clone, Debug)]
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub struct ManyStatements {
    pub(crate) reserve: SqlStr,
    pub(crate) finalize: SqlStr,
    pub(crate) heartbeat: SqlStr,
    pub(crate) release: SqlStr,
    /// Refreshes the table's statistics, and with them every cached plan on it, unless
    /// another session holds a conflicting lock.
    pub(crate) analyze: SqlStr,
    /// Whether to: 1 if the table's statistics count fewer rows than `$1` (or none), 0 if
    /// they are already past it, 2 if the store's role may not analyze the table.
    pub(crate) should_analyze: Statement,
}

/// The values a statement's parameters are taken from. A parameter whose value a call does
/// not provide is bound as NULL, which matches no record and violates every `NOT NULL`.
#[derive(Clone, Copy, Default)]
pub struct Values<'a> {
    pub(crate) id: Option<&'a RecordId>,
    pub(crate) fence: Option<Fence>,
    pub(crate) fingerprint: Option<&'a Fingerprint>,
    pub(crate) owner: Option<&'a str>,
    pub(crate) lease: Option<Duration>,
    pub(crate) observed: Option<Fence>,
    pub(crate) result: Option<&'a StoredResult>,
    pub(crate) ttl: Option<Duration>,
    pub(crate) limit: Option<i64>,
    pub(crate) lock_name: Option<&'a str>,
    pub(crate) table: Option<&'a str>,
    pub(crate) version: Option<i64>,
}

impl<'a> Values<'a> {
    pub(crate) fn record(id: &'a RecordId) -> Values<'a> {
        Values {
            id: Some(id),
            ..Values::default()
        }
    }

    pub(crate) fn claim(claim: &'a Claim<'a>) -> Values<'a> {
        Values {
            id: Some(claim.id),
            fence: Some(claim.fence),
            fingerprint: claim.fingerprint,
            owner: Some(claim.owner),
            lease: Some(claim.lease),
            ..Values::default()
        }
    }

    pub(crate) fn fenced(id: &'a RecordId, fence: Fence) -> Values<'a> {
        Values {
            id: Some(id),
            fence: Some(fence),
            ..Values::default()
        }
    }
}

/// The result of an insert-or-load statement.
pub enum Inserted {
    Yes,
    No(RawRecord),
}

/// The number of rows a statement changed.
pub trait RowsAffected {
    /// The count.
    fn rows(&self) -> u64;
}

macro_rules! rows_affected {
    ($($feature:literal => $result:ty),*) => {$(
        #[cfg(feature = $feature)]
        impl RowsAffected for $result {
            fn rows(&self) -> u64 {
                self.rows_affected()
            }
        }
    )*};
}
rows_affected!(
    "postgres" => sqlx::postgres::PgQueryResult,
    "mysql" => sqlx::mysql::MySqlQueryResult,
    "sqlite" => sqlx::sqlite::SqliteQueryResult
);

/// Runs statements on one connection of a sqlx database that has the types idem needs.
///
/// Implemented once for every such database: this is the only sqlx-generic code, so its
/// bounds are written once.
pub trait Driver: Database {
    /// Runs `st` and returns how many rows it changed.
    fn execute<'a>(
        conn: &'a mut Self::Connection,
        st: &'a Statement,
        values: Values<'a>,
    ) -> impl Future<Output = Result<u64, sqlx::Error>> + Send + 'a;

    /// Runs `st` and reads the record it returns, if any.
    fn fetch_record<'a>(
        conn: &'a mut Self::Connection,
        st: &'a Statement,
        values: Values<'a>,
    ) -> impl Future<Output = Result<Option<RawRecord>, sqlx::Error>> + Send + 'a;

    /// Runs an insert-or-load statement.
    fn fetch_inserted<'a>(
        conn: &'a mut Self::Connection,
        st: &'a Statement,
        values: Values<'a>,
    ) -> impl Future<Output = Result<Option<Inserted>, sqlx::Error>> + Send + 'a;

    /// Runs `st` and reads the integer in the first column of its first row, if any.
    fn fetch_integer<'a>(
        conn: &'a mut Self::Connection,
        st: &'a Statement,
        values: Values<'a>,
    ) -> impl Future<Output = Result<Option<i64>, sqlx::Error>> + Send + 'a;

    /// Runs a script of statements without parameters (a migration).
    fn execute_script(
        conn: &mut Self::Connection,
        script: SqlStr,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send + '_;
}

impl<DB> Driver for DB
where
    DB: Database,
    DB::QueryResult: RowsAffected,
    DB::Arguments: IntoArguments<DB>,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> Option<Vec<u8>>: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> Option<String>: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> Option<bool>: Decode<'q, DB> + Type<DB>,
    for<'q> String: Decode<'q, DB> + Type<DB>,
    for<'q> i64: Decode<'q, DB> + Type<DB>,
    usize: ColumnIndex<DB::Row>,
    for<'s> &'s str: ColumnIndex<DB::Row>,
{
    async fn execute<'a>(
        conn: &'a mut DB::Connection,
        st: &'a Statement,
        values: Values<'a>,
    ) -> Result<u64, sqlx::Error> {
        Ok(query::<DB>(st, values).execute(conn).await?.rows())
    }

    async fn fetch_record<'a>(
        conn: &'a mut DB::Connection,
        st: &'a Statement,
        values: Values<'a>,
    ) -> Result<Option<RawRecord>, sqlx::Error> {
        let row = query::<DB>(st, values).fetch_optional(conn).await?;
        row.as_ref().map(raw_record::<DB>).transpose()
    }

    async fn fetch_inserted<'a>(
        conn: &'a mut DB::Connection,
        st: &'a Statement,
        values: Values<'a>,
    ) -> Result<Option<Inserted>, sqlx::Error> {
        let Some(row) = query::<DB>(st, values).fetch_optional(conn).await? else {
            return Ok(None);
        };
        if row.try_get::<Option<bool>, _>("inserted")? == Some(true) {
            return Ok(Some(Inserted::Yes));
        }
        Ok(Some(Inserted::No(raw_record::<DB>(&row)?)))
    }

    async fn fetch_integer<'a>(
        conn: &'a mut DB::Connection,
        st: &'a Statement,
        values: Values<'a>,
    ) -> Result<Option<i64>, sqlx::Error> {
        let row = query::<DB>(st, values).fetch_optional(conn).await?;
        Ok(match row {
            Some(row) => row.try_get::<Option<i64>, _>(0usize)?,
            None => None,
        })
    }

    async fn execute_script(conn: &mut DB::Connection, script: SqlStr) -> Result<(), sqlx::Error> {
        sqlx::raw_sql(script).execute(conn).await.map(drop)
    }
}

/// `st` with its parameters bound from `values`, in the statement's order.
fn query<'a, DB>(st: &Statement, v: Values<'a>) -> sqlx::query::Query<'a, DB, DB::Arguments>
where
    DB: Database,
    DB::Arguments: IntoArguments<DB>,
    for<'q> Option<Vec<u8>>: Encode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB> + Type<DB>,
    for<'q> Option<String>: Encode<'q, DB> + Type<DB>,
{
    let bytes = |b: &[u8]| Some(b.to_vec());
    let text = |s: &str| Some(s.to_owned());
    let mut q = sqlx::query(st.sql.clone());
    for param in st.params {
        q = match param {
            Param::Namespace => q.bind(v.id.and_then(|id| bytes(id.namespace().as_bytes()))),
            Param::Key => q.bind(v.id.and_then(|id| bytes(id.key().as_bytes()))),
            Param::Fingerprint => q.bind(v.fingerprint.and_then(|f| bytes(f.as_bytes()))),
            Param::Fence => q.bind(v.fence.map(Fence::get)),
            Param::Owner => q.bind(v.owner.and_then(text)),
            Param::Lease => q.bind(v.lease.map(super::millis)),
            Param::Observed => q.bind(v.observed.map(Fence::get)),
            Param::ResultBytes => q.bind(v.result.and_then(|r| bytes(&r.bytes))),
            Param::Codec => q.bind(v.result.map(|r| Codec::as_str(r.codec).to_owned())),
            Param::Ttl => q.bind(v.ttl.map(super::millis)),
            Param::Limit => q.bind(v.limit),
            Param::LockName => q.bind(v.lock_name.and_then(text)),
            Param::TableName => q.bind(v.table.and_then(text)),
            Param::Version => q.bind(v.version),
        };
    }
    q
}

pub(super) fn raw_record<DB>(row: &DB::Row) -> Result<RawRecord, sqlx::Error>
where
    DB: Database,
    for<'q> Option<Vec<u8>>: Decode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Decode<'q, DB> + Type<DB>,
    for<'q> Option<String>: Decode<'q, DB> + Type<DB>,
    for<'q> String: Decode<'q, DB> + Type<DB>,
    for<'q> i64: Decode<'q, DB> + Type<DB>,
    for<'s> &'s str: ColumnIndex<DB::Row>,
{
    Ok(RawRecord {
        state: row.try_get("state")?,
        fingerprint: row.try_get("fingerprint")?,
        fence: row.try_get("fence")?,
        owner: row.try_get("owner")?,
        attempts: row.try_get("attempts")?,
        lease_remaining_ms: row.try_get("lease_remaining_ms")?,
        expires_in_ms: row.try_get::<Option<i64>, _>("expires_in_ms")?.unwrap_or(0),
        result: row.try_get("result")?,
        codec: row.try_get("codec")?,
    })
}
