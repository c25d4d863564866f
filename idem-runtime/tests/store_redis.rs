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

    /// A claim on `id` by the tests' owner, without a fingerprint.
    fn claim(
        id: &idem_runtime::RecordId,
        fence: idem_runtime::store::Fence,
        lease: Duration,
    ) -> idem_runtime::store::Claim<'_> {
        idem_runtime::store::Claim {
            id,
            fence,
            owner: "test",
            fingerprint: None,
            lease,
        }
    }

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

    /// `SCRIPT FLUSH` on each node behind `urls` (what a restart or a failover does).
    fn flush_scripts(urls: &[String]) {
        for url in urls {
            let mut conn = redis::Client::open(url.as_str())
                .unwrap()
                .get_connection()
                .unwrap();
            let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut conn).unwrap();
        }
    }

    async fn survives_a_script_flush(store: RedisStore, urls: &[String]) {
        let idem = Idem::builder().store(store).build().unwrap();
        let runs = AtomicUsize::new(0);
        assert_eq!(charge(&idem, &runs, "before").await.unwrap(), 1);
        flush_scripts(urls);
        assert_eq!(charge(&idem, &runs, "after").await.unwrap(), 2);
        assert_eq!(charge(&idem, &runs, "after").await.unwrap(), 2, "replayed");
    }

    /// Regression: a server that forgot idem's scripts (a restart, a failover) failed every
    /// write from then on, on a cluster with `wait_replicas`. The scripts are loaded again.
    #[tokio::test]
    async fn scripts_a_node_forgot_are_loaded_again() {
        if let Some(fixture) = support::redis_store().await {
            survives_a_script_flush(fixture.store.clone(), &[support::redis_url()]).await;
        }
    }

    #[tokio::test]
    async fn scripts_a_cluster_forgot_are_loaded_again() {
        if let Some(fixture) = support::redis_cluster_store().await {
            let urls: Vec<String> = support::redis_cluster_urls()
                .split(',')
                .map(|u| u.trim().to_string())
                .collect();
            survives_a_script_flush(fixture.store.clone(), &urls).await;
        }
    }

    /// With `wait_replicas(1, ..)` and a replica in sync, writes count once the replica has
    /// them: the record is on the replica when the call returns, also after the primary
    /// forgot its scripts.
    async fn waits_for_its_replica(store: RedisStore, primary: u16, replica: u16, prefix: &str) {
        survives_a_script_flush(store, &[format!("redis://127.0.0.1:{primary}")]).await;
        let on_replica = keys(&format!("redis://127.0.0.1:{replica}"), prefix);
        assert_eq!(
            on_replica.len(),
            2,
            "both records reached the replica: {on_replica:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_waits_for_the_replica_of_a_node() {
        if !support::redis_servers::available() {
            return;
        }
        let servers =
            tokio::task::spawn_blocking(|| support::redis_servers::primary_with_replica(17121))
                .await
                .unwrap();
        let (prefix, options) = support::redis_options();
        let options = options.wait_replicas(1, Duration::from_secs(2));
        let store = RedisStore::connect_with("redis://127.0.0.1:17121", options)
            .await
            .unwrap();
        waits_for_its_replica(store, 17121, 17122, &prefix).await;
        drop(servers);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_waits_for_the_replica_of_a_cluster_primary() {
        if !support::redis_servers::available() {
            return;
        }
        let servers =
            tokio::task::spawn_blocking(|| support::redis_servers::cluster_with_replica(17131))
                .await
                .unwrap();
        let (prefix, options) = support::redis_options();
        let options = options.wait_replicas(1, Duration::from_secs(2));
        let store = RedisStore::connect_cluster(&["redis://127.0.0.1:17131"], options)
            .await
            .unwrap();
        waits_for_its_replica(store, 17131, 17132, &prefix).await;
        drop(servers);
    }

    /// A reservation or takeover the client sent again (after a dropped connection) writes
    /// something on the server although the record is already the caller's: a `WAIT` sent
    /// after it on a fresh connection counts only that connection's writes (Redis 7.2 and
    /// later), so without a write it would return at once and a reservation that never
    /// reached a replica would count as replicated. The server's count of changes shows it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_sent_again_writes_so_that_wait_covers_it() {
        use idem_runtime::RecordId;
        use idem_runtime::store::{Fence, Store};
        if !support::redis_servers::available() {
            return;
        }
        let servers = tokio::task::spawn_blocking(|| {
            let mut servers = support::redis_servers::Servers::new();
            servers.start(17141, &[]);
            servers
        })
        .await
        .unwrap();
        let (_, options) = support::redis_options();
        let store = RedisStore::connect_with("redis://127.0.0.1:17141", options)
            .await
            .unwrap();
        let changes = || {
            let info = support::redis_servers::info(17141, "persistence");
            info.lines()
                .find_map(|l| l.strip_prefix("rdb_changes_since_last_save:"))
                .and_then(|n| n.trim().parse::<u64>().ok())
                .expect("rdb_changes_since_last_save")
        };
        let id = RecordId::new("resend-wait/v0", "k");
        let claim = |fence, lease| claim(&id, fence, lease);
        let (first, second) = (Fence::random(), Fence::random());
        let short = Duration::from_millis(100);
        store.reserve(&claim(first, short)).await.unwrap();
        let before = changes();
        store.reserve(&claim(first, short)).await.unwrap();
        assert!(changes() > before, "a reservation sent again wrote nothing");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let lease = Duration::from_secs(30);
        assert!(store.take_over(&claim(second, lease), first).await.unwrap());
        let before = changes();
        assert!(store.take_over(&claim(second, lease), first).await.unwrap());
        assert!(changes() > before, "a takeover sent again wrote nothing");
        drop(servers);
    }

    #[tokio::test]
    async fn options_that_would_misbehave_are_refused() {
        let url = support::redis_url();
        for (options, says) in [
            (RedisStoreOptions::new().prefix("a{b}"), "prefix"),
            (RedisStoreOptions::new().prefix(""), "prefix"),
            (
                RedisStoreOptions::new().retention(Duration::ZERO),
                "retention",
            ),
            (
                RedisStoreOptions::new().retention(Duration::MAX),
                "retention",
            ),
            (
                RedisStoreOptions::new().wait_replicas(1, Duration::from_micros(500)),
                "wait_replicas",
            ),
        ] {
            let err = RedisStore::connect_with(&url, options).await.unwrap_err();
            assert!(
                matches!(&err, Error::Config(m) if m.contains(says)),
                "{says}: {err}"
            );
        }
    }

    /// The cluster client sends a command again after a dropped connection, so a reservation
    /// or takeover may run twice: the second finds the caller's own fence and says so, rather
    /// than report the caller's own record as someone else's (which would block the key for a
    /// lease).
    #[tokio::test]
    async fn a_claim_sent_twice_is_still_the_callers() {
        use idem_runtime::RecordId;
        use idem_runtime::store::{Fence, Reservation, Store};
        let Some(fixture) = support::redis_store().await else {
            return;
        };
        let id = RecordId::new("resend/v0", "k");
        let claim = |fence, lease| claim(&id, fence, lease);
        let (first, second, third) = (Fence::random(), Fence::random(), Fence::random());
        let short = Duration::from_millis(200);
        for _ in 0..2 {
            let r = fixture.reserve(&claim(first, short)).await.unwrap();
            assert!(matches!(r, Reservation::Acquired), "{r:?}");
        }
        let other = fixture.reserve(&claim(second, short)).await.unwrap();
        assert!(matches!(other, Reservation::Exists(_)), "{other:?}");
        tokio::time::sleep(Duration::from_millis(400)).await;
        let lease = Duration::from_secs(30);
        assert!(
            fixture
                .take_over(&claim(second, lease), first)
                .await
                .unwrap()
        );
        assert!(
            fixture
                .take_over(&claim(second, lease), first)
                .await
                .unwrap(),
            "sent again"
        );
        assert!(
            !fixture
                .take_over(&claim(third, lease), first)
                .await
                .unwrap()
        );
        let record = fixture.load(&id).await.unwrap().unwrap();
        assert_eq!((record.fence, record.attempts), (second, 2));
    }

    /// Two stores with different retentions behind one caller (a wrapper that sends one
    /// call's verbs to either) would see the caller's own reservation as someone else's,
    /// and answer a lost lease: instead each fenced write says so, as an error. A record
    /// completed under the fence is simply not the caller's reservation any more.
    #[tokio::test]
    async fn a_reservation_written_with_another_retention_is_an_error_not_a_lost_lease() {
        use idem_runtime::store::{Fence, Reservation, Store, StoredResult};
        use idem_runtime::{Codec, RecordId};
        let Some(fixture) = support::redis_store().await else {
            return;
        };
        let other = RedisStore::connect_with(
            &support::redis_url(),
            RedisStoreOptions::new()
                .prefix(fixture.prefix())
                .retention(Duration::from_secs(7)),
        )
        .await
        .unwrap();
        let id = RecordId::new("two-retentions/v0", "k");
        let fence = Fence::random();
        let lease = Duration::from_secs(30);
        let r = fixture.reserve(&claim(&id, fence, lease)).await.unwrap();
        assert!(matches!(r, Reservation::Acquired), "{r:?}");
        let result = StoredResult {
            codec: Codec::Json,
            bytes: b"1".to_vec(),
        };
        let ttl = Duration::from_secs(60);
        let heartbeat = other.heartbeat(&id, fence, lease).await;
        assert!(heartbeat.is_err(), "{heartbeat:?}");
        let finalized = other.finalize(&id, fence, &result, ttl).await;
        assert!(finalized.is_err(), "{finalized:?}");
        let released = other.release(&id, fence).await;
        assert!(released.is_err(), "{released:?}");
        assert!(fixture.finalize(&id, fence, &result, ttl).await.unwrap());
        assert!(!other.release(&id, fence).await.unwrap());
        assert!(!other.heartbeat(&id, fence, lease).await.unwrap());
    }

    /// A record's lease and expiry are its key's TTL, so a key made persistent by hand
    /// (`PERSIST`) says nothing about them: it is refused as malformed, not read as expired
    /// (which would run a completed call again, or take over a running one). A value whose
    /// numbers the store did not write is refused too (malformed for a takeover, not the
    /// caller's for the fenced writes), and left as it was. (One node: the test reaches the
    /// key directly.)
    #[tokio::test]
    async fn a_key_without_a_ttl_or_a_foreign_value_is_refused_not_expired() {
        use idem_runtime::store::{Fence, Reservation, Store, StoredResult};
        use idem_runtime::{Codec, RecordId};
        let Some(fixture) = support::redis_store().await else {
            return;
        };
        let id = RecordId::new("persisted/v0", "k");
        let (first, second) = (Fence::random(), Fence::random());
        let r = fixture
            .reserve(&claim(&id, first, Duration::from_millis(100)))
            .await
            .unwrap();
        assert!(matches!(r, Reservation::Acquired), "{r:?}");
        let keys = fixture.keys();
        assert_eq!(keys.len(), 1, "{keys:?}");
        let persisted: i64 = fixture.command(redis::cmd("PERSIST").arg(&keys[0]));
        assert_eq!(persisted, 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(fixture.load(&id).await.is_err(), "read without a TTL");
        let lease = Duration::from_secs(30);
        assert!(
            !fixture
                .take_over(&claim(&id, second, lease), first)
                .await
                .unwrap(),
            "taken over without a TTL"
        );

        let foreign = format!("i{}|1e300|1|0|0|", first.get());
        let _: () = fixture.command(
            redis::cmd("SET")
                .arg(&keys[0])
                .arg(&foreign)
                .arg("PX")
                .arg(60_000),
        );
        // Not the caller's (its retention is not the one the caller wrote): refused.
        let heartbeat = fixture.heartbeat(&id, first, lease).await;
        assert!(!matches!(heartbeat, Ok(true)), "{heartbeat:?}");
        let result = StoredResult {
            codec: Codec::Json,
            bytes: b"1".to_vec(),
        };
        let ttl = Duration::from_secs(60);
        let finalized = fixture.finalize(&id, first, &result, ttl).await;
        assert!(!matches!(finalized, Ok(true)), "{finalized:?}");
        assert!(fixture.load(&id).await.is_err());
        let taken = fixture.take_over(&claim(&id, second, lease), first).await;
        assert!(taken.is_err(), "{taken:?}");
        let kept: Option<String> = fixture.command(redis::cmd("GET").arg(&keys[0]));
        assert_eq!(
            kept.as_deref(),
            Some(foreign.as_str()),
            "the value was changed"
        );
        let ttl: i64 = fixture.command(redis::cmd("PTTL").arg(&keys[0]));
        assert!(ttl > 50_000, "the TTL was changed: {ttl} ms");
    }
}
