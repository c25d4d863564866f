//! MySQL and MariaDB (InnoDB): the shared store for many replicas.
//!
//! The clock is `UTC_TIMESTAMP(6)`, independent of session time zones. `reserve` is a plain
//! `INSERT`: a duplicate-key error means the record exists, which is then read. (`INSERT
//! IGNORE` would also hide truncation and other errors, and the affected-row count of `ON
//! DUPLICATE KEY UPDATE` cannot tell "inserted" from "found" with the `FOUND_ROWS` flag the
//! driver sets.) Fenced updates compare on the primary key, the fence and the state, so they
//! lock one row and match at most one. Placeholders are positional: each statement lists its
//! parameters in the order they appear. DDL commits implicitly, so migrations and purges are
//! serialised by a named lock held by the session (`GET_LOCK`), not by a transaction.

use super::dialect::{Conflict, Dialect, Param, Statement, Statements, sealed::Sealed};
use super::{ServerStoreOptions, SqlStore};
use crate::Error;

use Param::{
    Codec, Fence, Fingerprint, Key, Lease, Limit, Namespace, Observed, Owner, ResultBytes, Ttl,
};

/// MySQL and MariaDB, for [`SqlStore`]: see [`MySqlStore`](crate::store::MySqlStore).
#[derive(Clone, Copy, Debug)]
pub struct MySql;

impl Dialect for MySql {}

const MIGRATIONS: [&str; 1] = [
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

/// `now + ? milliseconds`.
const PLUS: &str = "DATE_ADD(UTC_TIMESTAMP(6), INTERVAL ? * 1000 MICROSECOND)";

impl Sealed for MySql {
    type Db = sqlx::MySql;
    const BACKEND: &'static str = "mysql";
    const NAME: &'static str = "MySQL";
    const BEGIN: &'static str = "BEGIN";

    fn statements(t: &str) -> Statements {
        let load = format!(
            "SELECT state, fingerprint, fence, owner, attempts,
                TIMESTAMPDIFF(MICROSECOND, {NOW}, lease_expires_at) DIV 1000 AS lease_remaining_ms,
                TIMESTAMPDIFF(MICROSECOND, {NOW}, expires_at) DIV 1000 AS expires_in_ms,
                result, codec
             FROM {{t}} WHERE namespace = ? AND `key` = ?"
        );
        let fenced = "WHERE namespace = ? AND `key` = ? AND fence = ? AND state = 'in_progress'";
        Statements {
            // A value list may refer to the columns set before it: the lease is bound once.
            insert: Statement::new(
                &format!(
                    "INSERT INTO {{t}} (namespace, `key`, state, fingerprint, fence, owner,
                        lease_expires_at, heartbeat_at, attempts, created_at, expires_at)
                     VALUES (?, ?, 'in_progress', ?, ?, ?, {PLUS}, {NOW}, 1, {NOW}, lease_expires_at)"
                ),
                t,
                &[Namespace, Key, Fingerprint, Fence, Owner, Lease],
            ),
            conflict: Conflict::Fails,
            insert_or_load: None,
            load: Statement::new(&load, t, &[Namespace, Key]),
            // Inside a REPEATABLE READ transaction a plain read would use a snapshot older
            // than the row that just made the insert fail: read it with a lock.
            load_in_transaction: Statement::new(
                &format!("{load} LOCK IN SHARE MODE"),
                t,
                &[Namespace, Key],
            ),
            // MySQL evaluates SET assignments left to right, each seeing the ones before:
            // everything that reads the old `state` comes before `state` is changed.
            take_over: Statement::new(
                &format!(
                    "UPDATE {{t}} SET
                        attempts = CASE WHEN state = 'completed' THEN 1 ELSE attempts + 1 END,
                        created_at = CASE WHEN state = 'completed' THEN {NOW} ELSE created_at END,
                        state = 'in_progress', fingerprint = ?, fence = ?, owner = ?,
                        lease_expires_at = {PLUS}, heartbeat_at = {NOW}, expires_at = lease_expires_at,
                        result = NULL, codec = NULL, completed_at = NULL
                     WHERE namespace = ? AND `key` = ? AND fence = ?
                       AND ((state = 'in_progress' AND lease_expires_at <= {NOW})
                         OR (state = 'completed' AND expires_at <= {NOW}))"
                ),
                t,
                &[Fingerprint, Fence, Owner, Lease, Namespace, Key, Observed],
            ),
            heartbeat: Statement::new(
                &format!(
                    "UPDATE {{t}} SET lease_expires_at = {PLUS}, expires_at = lease_expires_at,
                        heartbeat_at = {NOW} {fenced}"
                ),
                t,
                &[Lease, Namespace, Key, Fence],
            ),
            finalize: Statement::new(
                &format!(
                    "UPDATE {{t}} SET state = 'completed', result = ?, codec = ?, completed_at = {NOW},
                        expires_at = {PLUS}, lease_expires_at = NULL {fenced}"
                ),
                t,
                &[ResultBytes, Codec, Ttl, Namespace, Key, Fence],
            ),
            release: Statement::new(
                &format!("DELETE FROM {{t}} {fenced}"),
                t,
                &[Namespace, Key, Fence],
            ),
            purge: Statement::new(
                &format!("DELETE FROM {{t}} WHERE expires_at <= {NOW} LIMIT ?"),
                t,
                &[Limit],
            ),
            lock: Some(Statement::new(
                "SELECT GET_LOCK(?, 30)",
                t,
                &[Param::LockName],
            )),
            try_lock: Some(Statement::new(
                "SELECT GET_LOCK(?, 0)",
                t,
                &[Param::LockName],
            )),
            unlock: Some(Statement::new(
                "SELECT RELEASE_LOCK(?)",
                t,
                &[Param::LockName],
            )),
            create_schema: Statement::new(
                "CREATE TABLE IF NOT EXISTS idem_schema (table_name VARCHAR(64) PRIMARY KEY, version INT NOT NULL) ENGINE=InnoDB",
                t,
                &[],
            ),
            schema_version: Statement::new(
                "SELECT version FROM idem_schema WHERE table_name = ?",
                t,
                &[Param::TableName],
            ),
            table_exists: Statement::new(
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = ?",
                t,
                &[Param::TableName],
            ),
            record_version: Statement::new(
                "INSERT INTO idem_schema (table_name, version) VALUES (?, ?)
                 ON DUPLICATE KEY UPDATE version = VALUES(version)",
                t,
                &[Param::TableName, Param::Version],
            ),
            many: None,
            rows: None,
        }
    }

    fn migrations() -> Vec<String> {
        MIGRATIONS.map(String::from).to_vec()
    }

    fn lock_name(table: &str) -> String {
        format!("idem:{table}")
    }

    fn is_conflict(err: &sqlx::Error) -> bool {
        let sqlx::Error::Database(db) = err else {
            return false;
        };
        // 40001: deadlock or serialization failure; error 1205: lock wait timeout exceeded.
        db.code().as_deref() == Some("40001")
            || db
                .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                .is_some_and(|my| my.number() == 1205)
    }
}

/// A [`Store`](crate::store::Store) in a MySQL or MariaDB table, shared by every replica that
/// points at it (feature `mysql`).
///
/// ```no_run
/// # async fn demo() -> Result<(), idem_runtime::Error> {
/// use idem_runtime::{Idem, store::MySqlStore};
/// let idem = Idem::builder()
///     .store(MySqlStore::connect("mysql://app@db/app").await?)
///     .install()?;
/// # Ok(()) }
/// ```
pub type MySqlStore = SqlStore<MySql>;

impl SqlStore<MySql> {
    /// Connects to `url` with default options and creates the records table if missing.
    pub async fn connect(url: &str) -> Result<MySqlStore, Error> {
        Self::connect_with(url, ServerStoreOptions::default()).await
    }

    /// Connects to `url` with `options`.
    pub async fn connect_with(url: &str, options: ServerStoreOptions) -> Result<MySqlStore, Error> {
        Self::connect_server(url, &options).await
    }
}
