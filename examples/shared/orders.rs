//! The transactional consumer's handler: one order row per message, written in the same
//! database transaction as idem's record of the message, so that the row and the record
//! commit or roll back together. A redelivered message finds the committed record and gets
//! its answer back instead of writing a second row: exactly once.
//!
//! The handler is generic over the database so that the demo runs on SQLite, PostgreSQL or
//! MariaDB; an application writes it for its one database, with concrete types.

use std::error::Error as StdError;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use idem_runtime::store::{
    MySqlStore, MySqlStoreOptions, PgStore, PgStoreOptions, SqliteStore, SqliteStoreOptions,
};
use idem_runtime::{Idem, Outcome, TxDatabase, idempotent, observe};
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, Database, MySql, Pool, Postgres, Sqlite, Transaction};

use super::chaos::{Before, Chaos};
use super::{AppError, Handled, OrderPlaced};

/// Order bodies run in this process (a body whose transaction rolled back counts too).
pub(crate) static BODIES: AtomicUsize = AtomicUsize::new(0);

/// What the handler answers: the number of the order it created.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Confirmation {
    pub(crate) order_no: i64,
}

/// The SQL that differs between databases.
pub(crate) trait Dialect: Database + TxDatabase {
    const BEGIN: &'static str;
    const INSERT: &'static str;
}

impl Dialect for Sqlite {
    // SQLite has one writer: take the write lock up front, so that two transactions never
    // wait on each other to upgrade a read lock.
    const BEGIN: &'static str = "BEGIN IMMEDIATE";
    const INSERT: &'static str = "INSERT INTO {orders} (message_key, order_ref, order_no, sku, quantity) VALUES (?1, ?2, ?3, ?4, ?5)";
}

impl Dialect for Postgres {
    const BEGIN: &'static str = "BEGIN";
    const INSERT: &'static str = "INSERT INTO {orders} (message_key, order_ref, order_no, sku, quantity) VALUES ($1, $2, $3, $4, $5)";
}

impl Dialect for MySql {
    const BEGIN: &'static str = "BEGIN";
    const INSERT: &'static str = "INSERT INTO {orders} (message_key, order_ref, order_no, sku, quantity) VALUES (?, ?, ?, ?, ?)";
}

/// The handler: one order row, in the caller's transaction, beside idem's record of `key`.
///
/// `order_no` is drawn afresh each time the body runs, so an answer that was replayed is
/// recognisable as the committed one.
#[idempotent(key = key, tx = tx, skip(orders))]
async fn insert_order<DB>(
    tx: &mut Transaction<'_, DB>,
    orders: &str,
    key: &str,
    order: &OrderPlaced,
) -> Result<Confirmation, AppError>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
{
    BODIES.fetch_add(1, Relaxed);
    let order_no = fastrand::i64(1..i64::MAX);
    sqlx::query(AssertSqlSafe(DB::INSERT.replace("{orders}", orders)))
        .bind(key)
        .bind(order.order_ref as i64)
        .bind(order_no)
        .bind(order.sku.as_str())
        .bind(i64::from(order.quantity))
        .execute(&mut **tx)
        .await?;
    Ok(Confirmation { order_no })
}

/// The orders table and the pool it lives in (with idem's table, in the same database).
pub(crate) struct Orders<DB: Database> {
    pool: Pool<DB>,
    table: String,
}

impl<DB> Orders<DB>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
    for<'r> i64: sqlx::Decode<'r, DB>,
    (i64, i64): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    async fn create(pool: Pool<DB>, idem_table: &str) -> Result<Self, sqlx::Error> {
        let table = format!("{idem_table}_orders");
        // No unique constraint on message_key: the point is to see that idem alone keeps
        // it to one row per message.
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {table} (message_key VARCHAR(255) NOT NULL, order_ref BIGINT NOT NULL, order_no BIGINT NOT NULL, sku VARCHAR(64) NOT NULL, quantity BIGINT NOT NULL)"
        );
        // Consumers that start together race on it: PostgreSQL fails all but one
        // `CREATE TABLE IF NOT EXISTS` of a new table (a unique violation in its catalog).
        // The others find the table on their next try.
        let mut tries = 0;
        while let Err(e) = sqlx::raw_sql(AssertSqlSafe(ddl.clone()))
            .execute(&pool)
            .await
        {
            tries += 1;
            if tries == 3 {
                return Err(e);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Orders { pool, table })
    }

    /// Handles one message: the order row and idem's record in one transaction, committed
    /// before the caller acks.
    async fn place(
        &self,
        key: &str,
        order: &OrderPlaced,
        chaos: &Chaos,
    ) -> Result<Handled, AppError> {
        let mut tx = self.pool.begin_with(DB::BEGIN).await?;
        let (confirmation, outcome) = observe(insert_order(&mut tx, &self.table, key, order)).await;
        // An error drops the transaction: no row, no record; the message goes back.
        let confirmation = confirmation?;
        let effect = !outcome.is_some_and(Outcome::is_replay);
        if effect && chaos.crash(Before::Commit, key).await {
            // (The demo: a crash between the effect and the commit. Dropping the transaction
            // rolls back the row and the record together.)
            return Ok(Handled::Crashed);
        }
        tx.commit().await?;
        Ok(Handled::Done {
            answer: confirmation.order_no.to_string(),
            outcome,
        })
    }

    /// Rows in the orders table, and distinct messages among them.
    async fn count(&self) -> Result<(i64, i64), sqlx::Error> {
        let sql = format!(
            "SELECT COUNT(*), COUNT(DISTINCT message_key) FROM {}",
            self.table
        );
        sqlx::query_as(AssertSqlSafe(sql))
            .fetch_one(&self.pool)
            .await
    }

    async fn drop_tables(&self, idem_table: &str) {
        for t in [self.table.as_str(), idem_table] {
            let sql = format!("DROP TABLE IF EXISTS {t}");
            let _ = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&self.pool).await;
        }
    }
}

/// The orders table on one of the three databases.
pub(crate) enum Db {
    Sqlite(Orders<Sqlite>),
    Postgres(Orders<Postgres>),
    MySql(Orders<MySql>),
}

macro_rules! each {
    ($db:expr, $o:ident => $e:expr) => {
        match $db {
            Db::Sqlite($o) => $e,
            Db::Postgres($o) => $e,
            Db::MySql($o) => $e,
        }
    };
}

impl Db {
    /// Opens the idem store at `url` (`sqlite://path`, `postgres://..`, `mysql://..`) with its
    /// table named `table`, installs the runtime every `#[idempotent]` fn here uses (leases
    /// of `lease`), and creates the orders table beside it.
    pub(crate) async fn connect(
        url: &str,
        table: &str,
        lease: Duration,
    ) -> Result<Db, Box<dyn StdError + Send + Sync>> {
        let builder = Idem::builder().default_lease(lease);
        if let Some(path) = url.strip_prefix("sqlite://") {
            let options = SqliteStoreOptions::new().table(table);
            let store = SqliteStore::open_with(path, options).await?;
            let pool = store.pool().clone();
            builder.store(store).install()?;
            Ok(Db::Sqlite(Orders::create(pool, table).await?))
        } else if url.starts_with("postgres") {
            let options = PgStoreOptions::new().table(table);
            let store = PgStore::connect_with(url, options).await?;
            let pool = store.pool().clone();
            builder.store(store).install()?;
            Ok(Db::Postgres(Orders::create(pool, table).await?))
        } else if url.starts_with("mysql") {
            let options = MySqlStoreOptions::new().table(table);
            let store = MySqlStore::connect_with(url, options).await?;
            let pool = store.pool().clone();
            builder.store(store).install()?;
            Ok(Db::MySql(Orders::create(pool, table).await?))
        } else {
            Err(format!("--store {url:?}: expected sqlite://, postgres:// or mysql://").into())
        }
    }

    pub(crate) async fn place(
        &self,
        key: &str,
        order: &OrderPlaced,
        chaos: &Chaos,
    ) -> Result<Handled, AppError> {
        each!(self, o => o.place(key, order, chaos).await)
    }

    /// Rows in the orders table, and distinct messages among them.
    pub(crate) async fn count(&self) -> Result<(i64, i64), sqlx::Error> {
        each!(self, o => o.count().await)
    }

    /// Drops the orders table and idem's table `idem_table`.
    pub(crate) async fn drop_tables(&self, idem_table: &str) {
        each!(self, o => o.drop_tables(idem_table).await)
    }
}
