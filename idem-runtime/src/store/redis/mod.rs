//! Redis (feature `redis`): one node, or a Redis Cluster.
//!
//! Each record is one Redis string, under a key whose hash tag is the whole record id
//! (`idem_records:{<blake3 of namespace and key>}`), so a record lives in one slot of a
//! cluster and keys never appear in Redis in the clear. Every verb is one Lua script, so it
//! is atomic on the server: `reserve` inserts if absent (and otherwise returns the record),
//! `take_over` is a compare-and-set on the fence, and heartbeat, finalize and release change
//! the record only while it holds the caller's fence and is in progress. Leases and expiry
//! are the key's TTL, set and read on the server (`PX`, `PTTL`), so replicas with skewed
//! clocks agree (the value's layout is in `scripts`).
//!
//! Redis deletes records by itself: each key expires a retention period
//! (default 60 s) after its lease or its result expires, the time in which an abandoned
//! reservation can still be taken over (and counted as such) and an expired result is still
//! seen as expired rather than absent. So there is no purge job: [`Store::purge`] does
//! nothing.
//!
//! How durable a record is depends on the server's persistence, not on idem: see the README
//! ("Redis: what survives a restart"). [`RedisStoreOptions::wait_replicas`] makes every write
//! wait for replicas (`WAIT`) before it counts.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManagerConfig;
use redis::{Cmd, Script, Value};

use self::link::{Link, Opener, PING_PATIENCE};
use self::scripts::{Scripts, claim_value, own_prefix, record, result_value};
use super::{Claim, Fence, Record, Reservation, Store, StoredResult};
use crate::Error;
use crate::error::StoreError;
use crate::key::RecordId;

mod link;
mod scripts;
mod url;

/// How a [`RedisStore`] keeps its records.
#[derive(Clone, Debug)]
pub struct RedisStoreOptions {
    prefix: String,
    retention: Duration,
    wait_replicas: Option<(u32, Duration)>,
    connect_timeout: Duration,
}

impl Default for RedisStoreOptions {
    fn default() -> Self {
        RedisStoreOptions {
            prefix: super::DEFAULT_TABLE.into(),
            retention: Duration::from_secs(60),
            wait_replicas: None,
            connect_timeout: Duration::from_secs(3),
        }
    }
}

impl RedisStoreOptions {
    /// Default options: prefix `idem_records` (the SQL stores' default table), 60 s
    /// retention, no `WAIT`, 3 s to connect.
    pub fn new() -> Self {
        Self::default()
    }

    /// The prefix of every key (`<prefix>:{..}`), to keep services sharing one Redis apart.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long a record is kept after its lease or result expired, before Redis deletes it
    /// (default 60 s): in that time an abandoned reservation is taken over, and counted as a
    /// takeover, rather than found absent.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Every write (a reservation, a takeover, a heartbeat, a result, a release) counts only
    /// once `replicas` replicas have acknowledged it, waited for at most `timeout` (`WAIT`).
    /// Fewer in time fail the statement: the call fails closed before its body, or keeps
    /// retrying its result. Off by default.
    ///
    /// `WAIT` holds the connection it is sent on until the replicas answer, so waited writes
    /// go over four connections of their own, and `timeout` should be
    /// well under the runtime's `store_timeout`. It is counted in whole milliseconds, at
    /// least 1 and at most an hour ([`Error::Config`] otherwise, when connecting).
    pub fn wait_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait_replicas = (replicas > 0).then_some((replicas, timeout));
        self
    }

    /// How long connecting may take (default 3 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
}

/// How many connections carry writes that wait for replicas (`WAIT` blocks its connection).
const WAIT_CONNECTIONS: usize = 4;

/// The longest retention, and the longest `WAIT`, a store accepts.
const MAX_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
const MAX_WAIT: Duration = Duration::from_secs(3600);

impl RedisStoreOptions {
    /// Refuses settings that would misbehave on the server: a prefix with a hash tag (every
    /// record would land in one cluster slot), a zero or huge retention, a `WAIT` timeout
    /// that rounds to 0 ms (which waits forever) or is huge.
    fn check(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Config(m));
        if self.prefix.is_empty() || self.prefix.contains(['{', '}']) {
            return bad(format!(
                "Redis prefix {:?}: must be non-empty and free of `{{` and `}}` (the record's hash tag follows it)",
                self.prefix
            ));
        }
        if self.retention.is_zero() || self.retention > MAX_RETENTION {
            return bad(format!(
                "Redis retention {:?}: must be more than 0 and at most 30 days",
                self.retention
            ));
        }
        if let Some((_, timeout)) = self.wait_replicas
            && (timeout < Duration::from_millis(1) || timeout > MAX_WAIT)
        {
            return bad(format!(
                "Redis wait_replicas timeout {timeout:?}: must be at least 1 ms and at most an hour"
            ));
        }
        Ok(())
    }
}

/// A [`Store`] in Redis: one node (`redis://`) or a Redis Cluster (feature `redis`).
///
/// ```no_run
/// # async fn demo() -> Result<(), idem_runtime::Error> {
/// use idem_runtime::{Idem, store::RedisStore};
/// let idem = Idem::builder()
///     .store(RedisStore::connect("redis://127.0.0.1:6379").await?)
///     .install()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    link: Arc<Link>,
    /// With `wait_replicas`: the connections waited writes go out on, one per record (by a
    /// hash of its key), so one record's writes stay in order: a fenced release sent after an
    /// abandoned reservation cannot overtake it on another connection. (Within one connection:
    /// a connection replaced meanwhile, or a cluster client resending after `MOVED`, can
    /// still reorder them, and the reservation then holds its key until its lease ends.)
    writers: Arc<[Arc<Link>]>,
    prefix: Arc<str>,
    retention: Duration,
    wait_replicas: Option<(u32, Duration)>,
    scripts: Arc<Scripts>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.link.is_cluster() {
            "cluster"
        } else {
            "node"
        };
        f.debug_struct("RedisStore")
            .field("connection", &kind)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: redis::RedisError) -> Error {
    crate::error::not_opened(StoreError::new(e), crate::error::CHECK_SERVER)
}

impl RedisStore {
    /// Connects to one Redis node at `url` (`redis://host:port/db`) with default options.
    pub async fn connect(url: &str) -> Result<RedisStore, Error> {
        Self::connect_with(url, RedisStoreOptions::default()).await
    }

    /// Connects to one Redis node at `url` with `options`. The connection reconnects by
    /// itself after the server goes away.
    pub async fn connect_with(url: &str, options: RedisStoreOptions) -> Result<RedisStore, Error> {
        options.check()?;
        let client = redis::Client::open(url)
            .map_err(|e| Error::Config(format!("invalid Redis URL: {e}")))?;
        // No response timeout of the client's own (its default is 500 ms, shorter than a
        // `WAIT` may take): the engine bounds every call with its `store_timeout`.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(None)
            .set_number_of_retries(1);
        Self::with(Opener::Node(client, config), options).await
    }

    /// Connects to a Redis Cluster through any of its `nodes` (`redis://host:port` each).
    pub async fn connect_cluster(
        nodes: &[&str],
        options: RedisStoreOptions,
    ) -> Result<RedisStore, Error> {
        options.check()?;
        let client = redis::cluster::ClusterClientBuilder::new(nodes.to_vec())
            .connection_timeout(options.connect_timeout)
            .build()
            .map_err(|e| Error::Config(format!("invalid Redis Cluster nodes: {e}")))?;
        Self::with(Opener::Cluster(client), options).await
    }

    async fn with(opener: Opener, options: RedisStoreOptions) -> Result<RedisStore, Error> {
        let mut writers = Vec::new();
        if let Some((_, wait)) = options.wait_replicas {
            for _ in 0..WAIT_CONNECTIONS {
                // A ping on such a connection may queue behind a `WAIT`: it gets that long too.
                let link = Link::open(opener.clone(), PING_PATIENCE + wait).await;
                writers.push(link.map_err(unavailable)?);
            }
        }
        let store = RedisStore {
            link: Link::open(opener, PING_PATIENCE)
                .await
                .map_err(unavailable)?,
            writers: writers.into(),
            prefix: options.prefix.into(),
            retention: options.retention,
            wait_replicas: options.wait_replicas,
            scripts: Arc::new(Scripts::new()),
        };
        // Reachable now, not at the first call.
        let probe = store.key(&RecordId::new("idem", "probe"));
        let load = store.invoke(&store.scripts.load, &probe, 0);
        store
            .eval::<Value>(&store.scripts.load, &load, &probe, false)
            .await
            .map_err(|source| crate::error::not_opened(source, crate::error::CHECK_SERVER))?;
        store.warn_if_evicting().await;
        Ok(store)
    }

    /// Every record has a TTL, so a `volatile-*` or `allkeys-*` eviction policy lets Redis
    /// drop reservations and results under memory pressure: say so at startup. (Managed
    /// servers may refuse `CONFIG`; then nothing is said.)
    async fn warn_if_evicting(&self) {
        let mut get = redis::cmd("CONFIG");
        get.arg("GET").arg("maxmemory-policy");
        let probe = self.key(&RecordId::new("idem", "probe"));
        let Ok(reply) = self.link.send(&get, &probe, None).await else {
            return;
        };
        let policy = redis::from_redis_value::<Vec<String>>(reply)
            .ok()
            .and_then(|v| v.into_iter().nth(1));
        if let Some(policy) = policy.filter(|p| p != "noeviction") {
            tracing::warn!(
                policy,
                "idem: Redis may evict keys under memory pressure (maxmemory-policy is not noeviction): a lost reservation or result lets a retry run the body again"
            );
        }
    }

    /// The Redis key of a record: its whole id, hashed, as the hash tag.
    fn key(&self, id: &RecordId) -> String {
        let mut h = blake3::Hasher::new();
        h.update(id.namespace().as_bytes());
        h.update(&[0xff]); // never part of UTF-8, so the boundary is unambiguous
        h.update(id.key().as_bytes());
        let hex = h.finalize().to_hex();
        let mut key = String::with_capacity(self.prefix.len() + 35);
        key.push_str(&self.prefix);
        key.push_str(":{");
        key.push_str(&hex[..32]);
        key.push('}');
        key
    }

    /// The start of a call of `script` on `key`, sized for arguments of about `data` bytes;
    /// the caller adds them.
    fn invoke(&self, script: &Script, key: &str, data: usize) -> Cmd {
        let mut cmd = Cmd::with_capacity(8, 64 + key.len() + data);
        cmd.arg("EVALSHA").arg(script.get_hash()).arg(1).arg(key);
        cmd
    }

    /// Runs `cmd`, a call of `script` on `key`'s node; a write (`write` true) then waits for
    /// the configured replicas.
    async fn eval<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        cmd: &Cmd,
        key: &str,
        write: bool,
    ) -> Result<T, StoreError> {
        let replicas = if write { self.wait_replicas } else { None };
        let link = match replicas {
            Some(_) => &self.writers[writer_of(key, self.writers.len())],
            None => &self.link,
        };
        let value = match link.send(cmd, key, replicas).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                // The server forgot its scripts (restarted, or a new cluster node): load them.
                link.load(script).await.map_err(StoreError::new)?;
                link.send(cmd, key, replicas).await
            }
            other => other,
        }
        .map_err(|e| {
            // A write whose reply went missing, or that too few replicas acknowledged, may
            // have been applied: the engine then releases it, fenced, rather than assume it
            // was not. A refused connection or a server error means it was not, except on a
            // cluster, whose client resends a command after a lost reply by itself and can
            // end on a server error (`TRYAGAIN`, `CLUSTERDOWN`, `MOVED`) after a try that was
            // applied: there every failed write is unsure (an extra fenced release is
            // harmless).
            let unsure = write
                && (self.link.is_cluster()
                    || (e.is_io_error() && !e.is_connection_refusal())
                    || e.kind() == redis::ErrorKind::Client);
            let error = StoreError::new(e);
            if unsure { error.maybe_applied() } else { error }
        })?;
        redis::from_redis_value(value)
            .map_err(|e| StoreError::msg(format!("malformed Redis reply: {e}")))
    }
}

/// A duration in whole milliseconds for a TTL: at least 1 (0 is refused by `PX`), and at most
/// about 31,000 years, so even with the retention added it stays far inside what Redis and
/// Lua's doubles hold exactly.
fn millis(d: Duration) -> u64 {
    const MAX_MS: u64 = 1_000_000_000_000_000;
    u64::try_from(d.as_millis())
        .unwrap_or(MAX_MS)
        .clamp(1, MAX_MS)
}

#[async_trait::async_trait]
impl Store for RedisStore {
    async fn reserve(&self, claim: &Claim<'_>) -> Result<Reservation, StoreError> {
        let key = self.key(claim.id);
        let retention = millis(self.retention);
        let (head, tail) = claim_value(claim, retention);
        let script = &self.scripts.reserve;
        let mut cmd = self.invoke(script, &key, 2 * head.len() + tail.len());
        cmd.arg(&head[..])
            .arg([&head[..], b"1", &tail[..]].concat())
            .arg(millis(claim.lease) + retention);
        match self.eval::<Value>(script, &cmd, &key, true).await? {
            Value::Int(1) => Ok(Reservation::Acquired),
            found => match found_record(found, "reserve")? {
                Some(record) => Ok(Reservation::Exists(record)),
                None => Err(StoreError::msg("malformed Redis reply to reserve")),
            },
        }
    }

    async fn load(&self, id: &RecordId) -> Result<Option<Record>, StoreError> {
        let (key, script) = (self.key(id), &self.scripts.load);
        let cmd = self.invoke(script, &key, 0);
        found_record(self.eval(script, &cmd, &key, false).await?, "load")
    }

    async fn take_over(&self, claim: &Claim<'_>, observed: Fence) -> Result<bool, StoreError> {
        let key = self.key(claim.id);
        let retention = millis(self.retention);
        let (head, tail) = claim_value(claim, retention);
        let script = &self.scripts.take_over;
        let mut cmd = self.invoke(script, &key, head.len() + tail.len() + 40);
        cmd.arg(head)
            .arg(tail)
            .arg(millis(claim.lease) + retention)
            .arg(observed.get());
        Ok(self.eval::<i64>(script, &cmd, &key, true).await? == 1)
    }

    async fn heartbeat(
        &self,
        id: &RecordId,
        fence: Fence,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let (key, script) = (self.key(id), &self.scripts.heartbeat);
        let retention = millis(self.retention);
        let mut cmd = self.invoke(script, &key, 64);
        cmd.arg(own_prefix(fence, retention))
            .arg(millis(lease) + retention);
        Ok(self.eval::<i64>(script, &cmd, &key, true).await? == 1)
    }

    async fn finalize(
        &self,
        id: &RecordId,
        fence: Fence,
        result: &StoredResult,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let (key, script) = (self.key(id), &self.scripts.finalize);
        let retention = millis(self.retention);
        let result = result_value(result);
        let mut cmd = self.invoke(script, &key, 64 + result.len());
        cmd.arg(own_prefix(fence, retention))
            .arg(result)
            .arg(millis(ttl) + retention);
        Ok(self.eval::<i64>(script, &cmd, &key, true).await? == 1)
    }

    async fn release(&self, id: &RecordId, fence: Fence) -> Result<bool, StoreError> {
        let (key, script) = (self.key(id), &self.scripts.release);
        let mut cmd = self.invoke(script, &key, 48);
        cmd.arg(own_prefix(fence, millis(self.retention)));
        Ok(self.eval::<i64>(script, &cmd, &key, true).await? == 1)
    }

    /// Nothing to do: Redis deletes each record by itself, its retention period after its
    /// lease or result expired ([`RedisStoreOptions::retention`]).
    async fn purge(&self, _limit: u32) -> Result<u64, StoreError> {
        Ok(0)
    }

    fn self_expiry(&self) -> Option<Duration> {
        Some(self.retention)
    }

    fn backend(&self) -> &'static str {
        "redis"
    }
}

/// A record as a script returns it (`{value, ttl}`), or `None` for nil; anything else is a
/// malformed reply to `verb`.
fn found_record(reply: Value, verb: &str) -> Result<Option<Record>, StoreError> {
    match reply {
        Value::Nil => Ok(None),
        Value::Array(v) => match v.as_slice() {
            [Value::BulkString(value), Value::Int(ttl)] => record(value, *ttl).map(Some),
            _ => Err(StoreError::msg(format!("malformed Redis reply to {verb}"))),
        },
        _ => Err(StoreError::msg(format!("malformed Redis reply to {verb}"))),
    }
}

/// The writer connection of `key` among `n`: the same for every write to one record.
fn writer_of(key: &str, n: usize) -> usize {
    let digest = blake3::hash(key.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest.as_bytes()[..8]);
    (u64::from_le_bytes(bytes) % n.max(1) as u64) as usize
}
