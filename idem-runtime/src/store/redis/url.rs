//! Store URLs for Redis in a config file: `redis://..` and `redis+cluster://..`, with the
//! store's own options as query parameters.

use std::time::Duration;

use super::{RedisStore, RedisStoreOptions};
use crate::Error;

impl RedisStore {
    /// Connects to a store URL from a config file, or `None` if it is not a Redis URL.
    ///
    /// `redis://host:port/db` (one node) or `redis+cluster://host1:port1,host2:port2` (a Redis
    /// Cluster, reached through any node listed; give each node its `user:password@` if the
    /// cluster needs one). Query parameters `retention`, `wait_replicas` and `wait_timeout`
    /// (durations as in the attribute: `PT60S`, `500ms`) set [`RedisStoreOptions`]; the client's
    /// own `protocol` and a fragment (`#insecure`) go to it, and any other parameter is a
    /// config error. `prefix` is the key prefix.
    pub(crate) async fn connect_url(url: &str, prefix: &str) -> Result<Option<RedisStore>, Error> {
        let cluster = url.strip_prefix("redis+cluster://");
        if cluster.is_none() && !url.starts_with("redis://") && !url.starts_with("rediss://") {
            return Ok(None);
        }
        // A fragment (`#insecure`, for TLS) is the client's: set aside, put back on its URL.
        // Only a `rediss://` URL has a use for one; anywhere else it would be ignored.
        let (url, fragment) = match url.split_once('#') {
            Some(_) if !url.starts_with("rediss://") => {
                return Err(Error::Config(
                    "store URL: a `#` fragment (`#insecure`) applies to `rediss://` URLs only; \
                     percent-encode a `#` in a password (`%23`)"
                        .into(),
                ));
            }
            Some((url, fragment)) => (url, format!("#{fragment}")),
            None => (url, String::new()),
        };
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let (options, rest) = options(query, RedisStoreOptions::new().prefix(prefix))?;
        let with_rest = |u: &str| match rest.is_empty() {
            true => format!("{u}{fragment}"),
            false => format!("{u}?{rest}{fragment}"),
        };
        let Some(nodes) = base.strip_prefix("redis+cluster://") else {
            return RedisStore::connect_with(&with_rest(base), options)
                .await
                .map(Some);
        };
        let nodes: Vec<String> = nodes
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| with_rest(&format!("redis://{n}")))
            .collect();
        if nodes.is_empty() {
            return Err(Error::Config(
                "store: `redis+cluster://` names no node; list them as `redis+cluster://host1:port1,host2:port2`".into(),
            ));
        }
        let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
        RedisStore::connect_cluster(&nodes, options).await.map(Some)
    }
}

/// The client's own URL parameter for TCP URLs, passed on to it: anything else is refused, so
/// that a misspelt option (`wait_replica=1`) is an error rather than a safety setting silently
/// off. (The client reads `db`, `user` and `pass` only from Unix-socket URLs: on a TCP URL they
/// would be ignored, so they are refused with where they go instead.)
const CLIENT_PARAMETERS: [&str; 1] = ["protocol"];

/// Takes the store's parameters out of `query`; returns the options and the client's.
fn options(
    query: &str,
    mut options: RedisStoreOptions,
) -> Result<(RedisStoreOptions, String), Error> {
    let bad = |m: String| Error::Config(format!("store URL: {m}"));
    let duration = |name: &str, v: &str| {
        idem_duration::parse(v).map_err(|e| bad(format!("{name}={v:?}: {e}")))
    };
    let mut rest = Vec::new();
    let (mut replicas, mut timeout) = (None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "retention" => options = options.retention(duration(name, value)?),
            "wait_replicas" => {
                let n = value.parse::<u32>().map_err(|_| {
                    bad(format!("wait_replicas={value:?}: not a number of replicas"))
                })?;
                replicas = Some(n);
            }
            "wait_timeout" => timeout = Some(duration(name, value)?),
            _ if CLIENT_PARAMETERS.contains(&name) => rest.push(pair),
            "db" => {
                return Err(bad(
                    "`db=` is ignored by the client: give the database as the \
                     path, `redis://host:6379/3`"
                        .into(),
                ));
            }
            "user" | "pass" => {
                return Err(bad(format!(
                    "`{name}=` is ignored by the client: give credentials as \
                     `redis://user:password@host:6379`"
                )));
            }
            _ => {
                // The name is shown only if it looks like one: a raw `?` in a password puts
                // the rest of the URL here.
                let shown = match name.len() <= 32
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    true => format!("{name:?}"),
                    false => "(not shown: percent-encode `?` and `#` in a password)".into(),
                };
                return Err(bad(format!(
                    "unknown parameter {shown} (the store's: retention, wait_replicas, \
                     wait_timeout; the client's: {})",
                    CLIENT_PARAMETERS.join(", ")
                )));
            }
        }
    }
    match (replicas, timeout) {
        // One second unless said otherwise: replicas on a LAN answer in a millisecond or two.
        (Some(n), t) => options = options.wait_replicas(n, t.unwrap_or(Duration::from_secs(1))),
        (None, Some(_)) => return Err(bad("wait_timeout without wait_replicas".into())),
        (None, None) => {}
    }
    Ok((options, rest.join("&")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stores_parameters_are_taken_and_the_clients_kept() {
        let (o, rest) = options(
            "protocol=resp3&retention=PT2M&wait_replicas=2&wait_timeout=250ms",
            RedisStoreOptions::new(),
        )
        .expect("valid");
        assert_eq!(rest, "protocol=resp3");
        assert_eq!(o.retention, Duration::from_secs(120));
        assert_eq!(o.wait_replicas, Some((2, Duration::from_millis(250))));
    }

    #[tokio::test]
    async fn a_fragment_only_goes_with_tls() {
        for url in [
            "redis://127.0.0.1:1#insecure",
            "redis+cluster://a:1,b:2#insecure",
        ] {
            let Err(err) = RedisStore::connect_url(url, "p").await else {
                panic!("{url} was accepted");
            };
            assert!(
                matches!(&err, Error::Config(m) if m.contains("`rediss://` URLs only")),
                "{url}: {err}"
            );
        }
    }

    #[test]
    fn bad_parameters_are_config_errors() {
        for (query, says) in [
            ("retention=soon", "retention"),
            ("wait_replicas=two", "wait_replicas"),
            ("wait_timeout=1s", "without wait_replicas"),
            ("wait_replica=1", "unknown parameter \"wait_replica\""),
            (
                "protocol=resp3&retension=PT1M",
                "unknown parameter \"retension\"",
            ),
            ("db=3", "as the path"),
            ("pass=secret", "user:password@"),
            ("ss@host:6379", "(not shown"),
        ] {
            let err = options(query, RedisStoreOptions::new()).unwrap_err();
            assert!(
                matches!(&err, Error::Config(m) if m.contains(says)),
                "{query}: {err}"
            );
        }
    }
}
