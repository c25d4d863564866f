//! What the SQL backends share: table-name checks, statement templates, row decoding.

use std::sync::Arc;
use std::time::Duration;

use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Database, Encode, SqlStr, Type};

use crate::Error;
use crate::codec::Codec;
use crate::error::StoreError;
use crate::key::{Fingerprint, RecordId};
use crate::store::{Claim, Fence, Record, RecordState, StoredResult};

/// `sqlx::query(sql)` with the record's namespace and key bound as its first parameters.
pub(crate) fn with_id<DB>(sql: &SqlStr, id: &RecordId) -> Query<'static, DB, DB::Arguments>
where
    DB: Database,
    Vec<u8>: for<'q> Encode<'q, DB> + Type<DB>,
{
    sqlx::query(sql.clone())
        .bind(id.namespace().as_bytes().to_vec())
        .bind(id.key().as_bytes().to_vec())
}

/// [`with_id`], then the claim's fingerprint, fence and owner.
pub(crate) fn with_claim<DB>(sql: &SqlStr, claim: &Claim<'_>) -> Query<'static, DB, DB::Arguments>
where
    DB: Database,
    Vec<u8>: for<'q> Encode<'q, DB> + Type<DB>,
    Option<Vec<u8>>: for<'q> Encode<'q, DB> + Type<DB>,
    i64: for<'q> Encode<'q, DB> + Type<DB>,
    String: for<'q> Encode<'q, DB> + Type<DB>,
{
    with_id(sql, claim.id)
        .bind(claim.fingerprint.map(|fp| fp.as_bytes().to_vec()))
        .bind(claim.fence.get())
        .bind(claim.owner.to_string())
}

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

#[cfg(any(feature = "postgres", feature = "mysql"))]
impl ServerStoreOptions {
    /// Default options: table `idem_records`, 16 connections, 3 s to get a connection.
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

    /// How long a call waits for a connection before failing with `StoreUnavailable`. Keep it
    /// short: while the database is away, callers should hear so quickly.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }
}

/// A store that could not be reached while it was being opened.
pub(crate) fn unavailable(err: sqlx::Error) -> Error {
    Error::StoreUnavailable {
        function: "idem",
        source: StoreError::new(err),
    }
}

/// A pool on `url` sized and timed by `options` (`what` names the database in errors).
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) async fn connect_pool<DB: Database>(
    url: &str,
    options: &ServerStoreOptions,
    what: &str,
) -> Result<sqlx::Pool<DB>, Error> {
    check_table_name(&options.table)?;
    let connect: <DB::Connection as sqlx::Connection>::Options = url
        .parse()
        .map_err(|e| Error::Config(format!("invalid {what} URL: {e}")))?;
    let pool = sqlx::pool::PoolOptions::<DB>::new()
        .max_connections(options.max_connections)
        .acquire_timeout(options.acquire_timeout)
        // No ping before each statement: it doubles the round trips of every statement (a
        // heartbeat would cost two). A connection that died is found by the statement that
        // uses it, which fails like any store error (fail closed) and drops the connection.
        .test_before_acquire(false)
        .connect_with(connect.clone())
        .await;
    match pool {
        Ok(pool) => Ok(pool),
        // The pool only says it timed out; one plain connection attempt says why
        // ("connection refused", "password authentication failed", ...).
        Err(sqlx::Error::PoolTimedOut) => {
            match <DB::Connection as sqlx::Connection>::connect_with(&connect).await {
                Err(e) => Err(unavailable(e)),
                Ok(_) => Err(unavailable(sqlx::Error::PoolTimedOut)),
            }
        }
        Err(e) => Err(unavailable(e)),
    }
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

/// A statement with the table name filled in, ready to hand to `sqlx::query` many times.
pub(crate) fn statement(template: &str, table: &str) -> SqlStr {
    let sql: Arc<str> = Arc::from(template.replace("{t}", table));
    sqlx::SqlSafeStr::into_sql_str(AssertSqlSafe(sql))
}

/// Milliseconds as a duration; negative means "already past" and becomes zero.
pub(crate) fn remaining(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// A duration as whole milliseconds for a bind parameter, rounded up so a lease of 0.5 ms
/// is not stored as already over. Durations are capped at ten years by config parsing.
pub(crate) fn millis(d: Duration) -> i64 {
    let ms = d.as_millis() + u128::from(!d.subsec_nanos().is_multiple_of(1_000_000));
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// The columns of a loaded row, as every backend selects them, before interpretation.
pub(crate) struct RawRecord {
    pub(crate) state: String,
    pub(crate) fingerprint: Option<Vec<u8>>,
    pub(crate) fence: i64,
    pub(crate) owner: String,
    pub(crate) attempts: i64,
    pub(crate) lease_remaining_ms: Option<i64>,
    pub(crate) expires_in_ms: i64,
    pub(crate) result: Option<Vec<u8>>,
    pub(crate) codec: Option<String>,
}

impl RawRecord {
    pub(crate) fn into_record(self) -> Result<Record, StoreError> {
        let state = RecordState::parse(&self.state)
            .ok_or_else(|| StoreError::msg(format!("unknown record state {:?}", self.state)))?;
        let fingerprint = match self.fingerprint {
            None => None,
            Some(bytes) => Some(Fingerprint::from_bytes(&bytes).ok_or_else(|| {
                StoreError::msg(format!(
                    "fingerprint has {} bytes, expected 16",
                    bytes.len()
                ))
            })?),
        };
        let result = match (self.result, self.codec) {
            (Some(bytes), Some(codec)) => Some(StoredResult {
                codec: codec.parse::<Codec>().map_err(StoreError::new)?,
                bytes,
            }),
            _ => None,
        };
        Ok(Record {
            state,
            fingerprint,
            fence: Fence::from_raw(self.fence),
            owner: self.owner,
            attempts: u32::try_from(self.attempts).unwrap_or(0),
            lease_remaining: match state {
                RecordState::InProgress => remaining(self.lease_remaining_ms.unwrap_or(0)),
                RecordState::Completed => Duration::ZERO,
            },
            expires_in: remaining(self.expires_in_ms),
            result,
        })
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

    #[test]
    fn millis_round_up() {
        assert_eq!(millis(Duration::from_micros(500)), 1);
        assert_eq!(millis(Duration::from_millis(30)), 30);
        assert_eq!(remaining(-5), Duration::ZERO);
    }
}
