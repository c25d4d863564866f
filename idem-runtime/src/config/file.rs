//! [`IdemConfig`]: the runtime's settings as data, for an application's own config file or
//! environment, and the store URL it connects to.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{IdemBuilder, IntoDuration, defaults};
use crate::store::{MemoryStore, Store};
use crate::{Error, Idem};

/// The runtime's settings as data, for an application's own config file or environment.
///
/// Durations use the attribute's rules (`"PT24H"`, `"30s"`). `store` is a URL and has no
/// default (a replica that silently used a file of its own instead of the shared database
/// would split the replicas): `sqlite://path/to/idem.db` (feature `sqlite`), `postgres://..`
/// (feature `postgres`), `mysql://..` or `mariadb://..` (feature `mysql`), `redis://..` or
/// `redis+cluster://host1:port1,host2:port2` (feature `redis`), or `memory:`.
/// Every other field has the default shown in [`defaults`], except `batch_concurrency`,
/// whose default is the store's own.
///
/// What each mistake gives: an unknown field is refused by your deserializer (the type
/// denies unknown fields, so serde's error names it); a missing or empty `store`, a store URL
/// this build does not support, or a bad duration is an [`Error::Config`] from
/// [`Idem::from_config`] naming the setting.
///
/// ```
/// # async fn demo() -> Result<(), idem_runtime::Error> {
/// let config: idem_runtime::IdemConfig = serde_json::from_str(
///     r#"{ "store": "memory:", "default_ttl": "PT1H", "local_cache": 1000 }"#,
/// ).expect("valid config");
/// let idem = idem_runtime::Idem::from_config(&config).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdemConfig {
    /// Where records live: a store URL (`sqlite://idem.db`, `postgres://..`, `memory:`).
    /// Required: left empty, [`Idem::from_config`] fails.
    pub store: String,
    /// The records table (for Redis: the prefix of every key).
    pub table: String,
    /// Local cache size in entries; 0 turns it off.
    pub local_cache: u64,
    /// Default TTL.
    pub default_ttl: String,
    /// Default lease.
    pub default_lease: String,
    /// Default wait for in-progress duplicates.
    pub default_wait: String,
    /// Largest stored result in bytes.
    pub max_result_bytes: usize,
    /// Executor id; derived from host name and pid when absent.
    pub executor_id: Option<String>,
    /// How often to purge expired records; `null` turns purging off.
    pub purge_interval: Option<String>,
    /// How long one store statement may take.
    pub store_timeout: String,
    /// Group commit: concurrent calls share statements and commits.
    pub group_commit: bool,
    /// Group commit: the most calls one batch carries.
    pub batch_max_rows: usize,
    /// Group commit: the most result bytes one batch of finalizes carries.
    pub batch_max_bytes: usize,
    /// Group commit: how many batches of one verb may be in flight at once. Left out (the
    /// default; `null` in JSON): as many as the store runs well (1 on SQLite, 2 on the
    /// others).
    pub batch_concurrency: Option<usize>,
    /// Run every body unprotected (see [`IdemBuilder::disabled`]; a release build also needs
    /// [`IdemBuilder::allow_disabled_in_release`] in code).
    pub disabled: bool,
}

impl Default for IdemConfig {
    fn default() -> Self {
        IdemConfig {
            store: String::new(),
            table: crate::store::DEFAULT_TABLE.into(),
            local_cache: defaults::LOCAL_CACHE,
            default_ttl: iso8601(defaults::TTL),
            default_lease: iso8601(defaults::LEASE),
            default_wait: iso8601(defaults::WAIT),
            max_result_bytes: defaults::MAX_RESULT_BYTES,
            executor_id: None,
            purge_interval: Some(iso8601(defaults::PURGE_INTERVAL)),
            store_timeout: iso8601(defaults::STORE_TIMEOUT),
            group_commit: true,
            batch_max_rows: defaults::BATCH_MAX_ROWS,
            batch_max_bytes: defaults::BATCH_MAX_BYTES,
            batch_concurrency: None,
            disabled: false,
        }
    }
}

/// A duration as an ISO-8601 literal in its largest whole unit (`PT24H`, `PT30S`, `PT0.25S`).
fn iso8601(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        _ if ms.is_multiple_of(3_600_000) => format!("PT{}H", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) => format!("PT{}M", ms / 60_000),
        _ if ms.is_multiple_of(1_000) => format!("PT{}S", ms / 1_000),
        _ => format!("PT{}.{:03}S", ms / 1_000, ms % 1_000),
    }
}

impl IdemConfig {
    /// A builder with these settings and this config's store, connected.
    pub async fn builder(&self) -> Result<IdemBuilder, Error> {
        let purge_interval = match &self.purge_interval {
            None => None,
            Some(s) => Some(
                s.as_str()
                    .into_duration()
                    .map_err(|e| Error::Config(format!("purge_interval: {e}")))?,
            ),
        };
        let builder = Idem::builder()
            .local_cache(self.local_cache)
            .default_ttl(self.default_ttl.as_str())
            .default_lease(self.default_lease.as_str())
            .default_wait(self.default_wait.as_str())
            .max_result_bytes(self.max_result_bytes)
            .executor_id(self.executor_id.clone())
            .purge_interval(purge_interval)
            .store_timeout(self.store_timeout.as_str())
            .group_commit(self.group_commit)
            .batch_max(self.batch_max_rows, self.batch_max_bytes)
            .disabled(self.disabled);
        let builder = match self.batch_concurrency {
            Some(n) => builder.batch_concurrency(n),
            None => builder,
        };
        // Check the durations before connecting, so a typo is reported as such.
        if let Some(e) = &builder.error {
            return Err(e.clone());
        }
        Ok(builder.shared_store(self.connect_store().await?))
    }

    async fn connect_store(&self) -> Result<Arc<dyn Store>, Error> {
        let url = self.store.trim();
        if url.is_empty() {
            return Err(Error::Config(
                "store: no store URL is set; set `store` to the shared database (`postgres://..`, `mysql://..`), a file (`sqlite://idem.db`) or `memory:`".into(),
            ));
        }
        if url == "memory:" || url == "memory://" {
            return Ok(Arc::new(MemoryStore::new()));
        }
        #[cfg(feature = "sqlite")]
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            let options = crate::store::SqliteStoreOptions::new().table(self.table.clone());
            return Ok(Arc::new(
                crate::store::SqliteStore::open_with(path, options).await?,
            ));
        }
        #[cfg(feature = "postgres")]
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = crate::store::PgStoreOptions::new().table(self.table.clone());
            return Ok(Arc::new(
                crate::store::PgStore::connect_with(url, options).await?,
            ));
        }
        #[cfg(feature = "mysql")]
        if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            let url = url.replacen("mariadb://", "mysql://", 1);
            let options = crate::store::MySqlStoreOptions::new().table(self.table.clone());
            return Ok(Arc::new(
                crate::store::MySqlStore::connect_with(&url, options).await?,
            ));
        }
        #[cfg(feature = "redis")]
        if let Some(store) = crate::store::RedisStore::connect_url(url, &self.table).await? {
            return Ok(Arc::new(store));
        }
        // Only the scheme: the rest of a URL may hold credentials, and this error is logged.
        // Text before the first `:` that is no scheme (`token@host:6379`) is not shown either.
        let scheme = match url.split_once(':') {
            Some((s, _))
                if s.starts_with(|c: char| c.is_ascii_alphabetic())
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')) =>
            {
                s
            }
            _ => "(not a URL)",
        };
        Err(Error::Config(format!(
            "store URL with scheme {scheme:?} is not a store URL this build supports (`sqlite://path`, `postgres://..`, `mysql://..`, `redis://..`, `redis+cluster://..`, `memory:`); is the backend's cargo feature on?"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's configuration example says its values are the defaults.
    #[test]
    fn the_readme_config_example_shows_the_defaults() {
        let readme = include_str!("../../../README.md");
        let section = readme
            .find("### Configuration from a file")
            .expect("the README's config section");
        let readme = &readme[section..];
        let start = readme
            .find("serde_json::from_str(r#\"")
            .expect("the README's config example")
            + "serde_json::from_str(r#\"".len();
        let end = start + readme[start..].find("\"#)").expect("its end");
        let shown: IdemConfig = serde_json::from_str(&readme[start..end]).expect("it parses");
        let defaults = IdemConfig {
            store: shown.store.clone(),
            ..IdemConfig::default()
        };
        assert_eq!(
            serde_json::to_value(&shown).unwrap(),
            serde_json::to_value(&defaults).unwrap()
        );
    }

    /// Opening `store` fails with `StoreUnavailable` saying it could not be opened: the
    /// error and its message.
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    async fn not_opened(store: String) -> (Error, String) {
        let cfg = IdemConfig {
            store,
            ..IdemConfig::default()
        };
        let err = Idem::from_config(&cfg).await.unwrap_err();
        assert!(matches!(err, Error::StoreUnavailable { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("could not be opened"), "{msg}");
        (err, msg)
    }

    /// A store that cannot be opened is not a call that did not run: the message says what
    /// to check, and which file.
    #[cfg(feature = "sqlite")]
    #[tokio::test]
    async fn a_store_that_cannot_be_opened_says_which_and_what_to_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("records.db");
        let (err, msg) = not_opened(format!("sqlite://{}", path.display())).await;
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("directory exists"), "{msg}");
        assert!(!msg.contains("the call did not run"), "{msg}");
        // The driver's error is still there, as the cause.
        let source = std::error::Error::source(&err).expect("the store error");
        assert!(std::error::Error::source(source).is_some(), "{msg}");
    }

    /// A server that refuses the connection: what to check, not "retry later".
    #[cfg(feature = "postgres")]
    #[tokio::test]
    async fn a_server_store_that_cannot_be_reached_says_what_to_check() {
        let (_, msg) = not_opened("postgres://nobody@127.0.0.1:1/none".into()).await;
        assert!(msg.contains("check its URL, credentials"), "{msg}");
        assert!(!msg.contains("retry later"), "{msg}");
    }

    /// A call that finds the store down is told to retry, whatever its name.
    #[test]
    fn a_call_named_idem_that_finds_the_store_down_is_told_to_retry() {
        let err = Error::StoreUnavailable {
            function: "idem",
            source: crate::StoreError::msg("connection refused"),
        };
        let msg = err.to_string();
        assert!(msg.contains("retry later"), "{msg}");
        assert!(!msg.contains("could not be opened"), "{msg}");
    }

    /// Refused before the store is opened: no file created, no server asked.
    #[tokio::test]
    async fn a_result_limit_of_zero_is_refused_before_the_store_is_opened() {
        let cfg: IdemConfig = serde_json::from_str(
            r#"{"store": "postgres://nobody@127.0.0.1:1/none", "max_result_bytes": 0}"#,
        )
        .expect("json");
        let err = Idem::from_config(&cfg).await.unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err:?}");
        assert!(err.to_string().contains("max_result_bytes is 0"), "{err}");
        let built = Idem::builder()
            .store(crate::store::MemoryStore::new())
            .max_result_bytes(0)
            .build();
        assert!(matches!(built, Err(Error::Config(_))));
    }

    #[tokio::test]
    async fn config_files_use_the_attribute_rules() {
        let cfg: IdemConfig =
            serde_json::from_str(r#"{"store": "memory:", "default_ttl": "1h30m"}"#).expect("json");
        let idem = Idem::from_config(&cfg).await.expect("builds");
        assert_eq!(
            idem.engine().settings.default_ttl,
            Duration::from_secs(5_400)
        );

        let cfg: IdemConfig =
            serde_json::from_str(r#"{"store": "memory:", "default_lease": "P1Y"}"#).expect("json");
        let msg = Idem::from_config(&cfg).await.unwrap_err().to_string();
        assert!(msg.contains("default_lease"), "{msg}");

        let unknown = serde_json::from_str::<IdemConfig>(r#"{"ttl": "1h"}"#);
        assert!(unknown.is_err(), "unknown fields are refused");

        // A scheme no store has; `redis://` was this example before the Redis store, and
        // still is in a build without the `redis` feature.
        let unsupported = if cfg!(feature = "redis") {
            "mongodb://x"
        } else {
            "redis://x"
        };
        let cfg = IdemConfig {
            store: unsupported.into(),
            ..IdemConfig::default()
        };
        let msg = Idem::from_config(&cfg).await.unwrap_err().to_string();
        assert!(msg.contains("not a store URL"), "{msg}");

        // The error is logged: a password in the URL does not go with it.
        let cfg = IdemConfig {
            store: "rediss+cluster://:s3cret@10.0.0.1:6379,admin:hunter2@10.0.0.2:6379/0".into(),
            ..IdemConfig::default()
        };
        let msg = Idem::from_config(&cfg).await.unwrap_err().to_string();
        assert!(msg.contains("not a store URL"), "{msg}");
        assert!(!msg.contains("s3cret") && !msg.contains("hunter2"), "{msg}");
        assert!(msg.contains("scheme \"rediss+cluster\""), "{msg}");
        for url in [
            "redis://:pa/ss@host",
            "user:secret@host:6379",
            "postgresx://h/db?password=secret",
            "secret@host:6379",
            "postgres//alice:secret@h/db",
        ] {
            let cfg = IdemConfig {
                store: url.into(),
                ..IdemConfig::default()
            };
            let msg = Idem::from_config(&cfg).await.unwrap_err().to_string();
            assert!(!msg.contains("secret") && !msg.contains("ss@"), "{msg}");
        }
    }

    #[test]
    fn default_durations_are_written_once() {
        let config = IdemConfig::default();
        assert_eq!(config.default_ttl, "PT24H");
        assert_eq!(config.default_lease, "PT30S");
        for (literal, d) in [
            (config.default_ttl, defaults::TTL),
            (config.store_timeout, defaults::STORE_TIMEOUT),
            (
                iso8601(Duration::from_millis(1_250)),
                Duration::from_millis(1_250),
            ),
        ] {
            assert_eq!(idem_duration::parse(&literal), Ok(d), "{literal}");
        }
    }
}
