//! The store conformance suite against a real Redis: one node (`IDEM_TEST_REDIS_URL`) and a
//! Redis Cluster (`IDEM_TEST_REDIS_CLUSTER`, started by `scripts/redis-cluster.sh`), each test
//! under its own key prefix.

mod support;

mod node {
    use super::support;
    idem_runtime::store_conformance_tests!(optional: support::redis_store());
}

mod cluster {
    use super::support;
    idem_runtime::store_conformance_tests!(optional: support::redis_cluster_store());
}

/// The settings only Redis has: its URLs in `IdemConfig`, and `WAIT` for replicas.
mod settings {
    #![allow(clippy::unwrap_used)] // tests: a panic is the failure report

    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::time::Duration;

    use idem_runtime::store::{RedisStore, RedisStoreOptions};
    use idem_runtime::{Error, Idem, IdemConfig, idempotent};

    use super::support;

    #[idempotent(key = key, runtime = idem, skip(runs))]
    async fn charge(idem: &Idem, runs: &AtomicUsize, key: &str) -> Result<usize, Error> {
        Ok(runs.fetch_add(1, SeqCst) + 1)
    }

    /// Keys under `prefix` on the node at `url`.
    fn keys(url: &str, prefix: &str) -> Vec<String> {
        let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
        redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query(&mut conn)
            .unwrap()
    }

    /// Deletes the keys a test left under `prefix` (they would otherwise live a day).
    fn clear(url: &str, prefix: &str) {
        let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
        for key in keys(url, prefix) {
            let _: i64 = redis::cmd("DEL").arg(key).query(&mut conn).unwrap();
        }
    }

    async fn runs_once_through_config(store: String) -> Option<String> {
        let prefix = format!("idem-test-{:016x}", fastrand::u64(..));
        let config = IdemConfig {
            store,
            table: prefix.clone(),
            ..IdemConfig::default()
        };
        let idem = match Idem::from_config(&config).await {
            Ok(idem) => idem,
            Err(e) => {
                support::server_missing("Redis", "IDEM_TEST_REDIS_URL", &config.store, &e);
                return None;
            }
        };
        let runs = AtomicUsize::new(0);
        let first = charge(&idem, &runs, "order-1").await.unwrap();
        let again = charge(&idem, &runs, "order-1").await.unwrap();
        assert_eq!((first, again, runs.load(SeqCst)), (1, 1, 1));
        Some(prefix)
    }

    #[tokio::test]
    async fn a_redis_url_in_the_config_reaches_one_node() {
        let url = support::redis_url();
        if let Some(prefix) = runs_once_through_config(url.clone()).await {
            let found = keys(&url, &prefix);
            assert_eq!(
                found.len(),
                1,
                "one record under the table prefix: {found:?}"
            );
            assert!(found[0].starts_with(&format!("{prefix}:{{")), "{found:?}");
            clear(&url, &prefix);
        }
    }

    #[tokio::test]
    async fn a_redis_cluster_url_in_the_config_reaches_the_cluster() {
        let nodes: Vec<String> = support::redis_cluster_urls()
            .split(',')
            .map(|n| n.trim().trim_start_matches("redis://").to_string())
            .collect();
        let url = format!("redis+cluster://{}", nodes.join(","));
        if let Some(prefix) = runs_once_through_config(url).await {
            let found: usize = nodes
                .iter()
                .map(|n| keys(&format!("redis://{n}"), &prefix).len())
                .sum();
            assert_eq!(found, 1, "one record in the whole cluster");
            for n in &nodes {
                clear(&format!("redis://{n}"), &prefix);
            }
        }
    }

    #[tokio::test]
    async fn a_cluster_url_without_nodes_is_a_config_error() {
        let config = IdemConfig {
            store: "redis+cluster://".into(),
            ..IdemConfig::default()
        };
        let err = Idem::from_config(&config).await.unwrap_err();
        assert!(
            matches!(&err, Error::Config(m) if m.contains("names no node")),
            "{err}"
        );
    }

    /// With `wait_replicas` and no replica to acknowledge, nothing counts as written: the
    /// call fails closed before its body, and the reservation it did write is released, so
    /// the key is free for the next caller at once (not after a lease).
    #[tokio::test]
    async fn writes_too_few_replicas_acknowledge_fail_closed() {
        let Some(fixture) = support::redis_store().await else {
            return;
        };
        let url = support::redis_url();
        let prefix = format!("idem-test-{:016x}", fastrand::u64(..));
        let waiting = RedisStoreOptions::new()
            .prefix(prefix.clone())
            .wait_replicas(1, Duration::from_millis(100));
        let waiting = RedisStore::connect_with(&url, waiting).await.unwrap();
        let idem = Idem::builder()
            .store(waiting)
            .default_lease("PT30S")
            .build()
            .unwrap();
        let runs = AtomicUsize::new(0);
        let err = charge(&idem, &runs, "k").await.unwrap_err();
        assert!(matches!(err, Error::StoreUnavailable { .. }), "{err}");
        assert!(err.to_string().contains("replicas"), "{err}");
        assert_eq!(runs.load(SeqCst), 0, "the body never ran");

        // The released reservation is gone well within the 30 s lease.
        let plain = RedisStore::connect_with(&url, RedisStoreOptions::new().prefix(prefix.clone()))
            .await
            .unwrap();
        let plain = Idem::builder().store(plain).build().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !keys(&url, &prefix).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the reservation was not released"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(charge(&plain, &runs, "k").await.unwrap(), 1);
        clear(&url, &prefix);
        drop(fixture);
    }
}
