//! Opening a SQL store: the options of the server stores, the pool, and the checks on what
//! is spliced into SQL text.

#[cfg(any(feature = "postgres", feature = "mysql"))]
use std::time::Duration;

use super::dialect::Dialect;
#[cfg(any(feature = "postgres", feature = "mysql"))]
use super::{Connection, SqlStore};
use crate::Error;
use crate::error::StoreError;

#[cfg(any(feature = "postgres", feature = "mysql"))]
/// How a server store (`PgStore`, `MySqlStore`) connects: its table, pool size, and how long
/// a call waits for a connection.
#[derive(Clone, Debug)]
pub struct ServerStoreOptions {
    pub(crate) table: String,
    pub(crate) max_connections: u32,
    pub(crate) acquire_timeout: Duration,
}

#[cfg(any(feature = "postgres", feature = "mysql"))]
impl Default for ServerStoreOptions {
    fn default() -> Self {
        ServerStoreOptions {
            table: crate::store::DEFAULT_TABLE.to_string(),
            max_connections: 16,
            acquire_timeout: Duration::from_secs(3),
        }
    }
}

/// The settings every SQL store's options have: `new`, `table` and `max_connections`.
macro_rules! common_options {
    ($options:ty, $defaults:literal) => {
        impl $options {
            #[doc = concat!("Default options: ", $defaults, ".")]
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
        }
    };
}
#[cfg(feature = "sqlite")]
pub(crate) use common_options;

#[cfg(any(feature = "postgres", feature = "mysql"))]
common_options!(
    ServerStoreOptions,
    "table `idem_records`, 16 connections, 3 s to get a connection"
);

#[cfg(any(feature = "postgres", feature = "mysql"))]
impl ServerStoreOptions {
    /// How long a call waits for a connection before failing with `StoreUnavailable`. Keep it
    /// short: while the database is away, callers should hear so quickly.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }
}

#[cfg(any(feature = "postgres", feature = "mysql"))]
impl<D: Dialect> SqlStore<D> {
    /// Connects to a server at `url` with `options` and creates the records table if missing.
    pub(crate) async fn connect_server(
        url: &str,
        options: &ServerStoreOptions,
    ) -> Result<SqlStore<D>, Error> {
        check_table_name(&options.table)?;
        let connect: <Connection<D> as sqlx::Connection>::Options = url
            .parse()
            .map_err(|e| Error::Config(format!("invalid {} URL: {e}", D::NAME)))?;
        let pool = sqlx::pool::PoolOptions::<D::Db>::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            // No ping before each statement: it doubles the round trips of every statement (a
            // heartbeat would cost two). A connection that died is found by the statement that
            // uses it, which fails like any store error (fail closed) and drops the connection.
            .test_before_acquire(false)
            .connect_with(connect.clone())
            .await;
        let pool = match pool {
            Ok(pool) => pool,
            // The pool only says it timed out; one plain connection attempt says why
            // ("connection refused", "password authentication failed", ...).
            Err(sqlx::Error::PoolTimedOut) => {
                return Err(
                    match <Connection<D> as sqlx::Connection>::connect_with(&connect).await {
                        Err(e) => unavailable::<D>(e),
                        Ok(_) => unavailable::<D>(sqlx::Error::PoolTimedOut),
                    },
                );
            }
            Err(e) => return Err(unavailable::<D>(e)),
        };
        Self::from_pool(pool, &options.table).await
    }
}

/// A store that could not be reached while it was being opened.
pub(crate) fn unavailable<D: Dialect>(err: sqlx::Error) -> Error {
    crate::error::not_opened(StoreError::new(err), D::OPEN_CHECK)
}

/// Checks a configured table name. It is spliced into SQL text (a table name cannot be a bind
/// parameter), so only plain identifiers are accepted.
pub(crate) fn check_table_name(name: &str) -> Result<(), Error> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if first_ok && name.len() <= 48 && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "table name {name:?} is not a plain identifier (letters, digits and `_`, at most 48, not starting with a digit)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_must_be_identifiers() {
        for ok in ["idem_records", "_t", "Orders2"] {
            assert!(check_table_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1t",
            "a-b",
            "a b",
            "t;drop table x",
            "schema.t",
            &"x".repeat(49),
        ] {
            assert!(check_table_name(bad).is_err(), "{bad}");
        }
    }
}
