//! The connection to Redis, replaced when a command on it was abandoned.
//!
//! The client's own reconnect covers a connection the server or the network closed. It does
//! not cover one that stays open but goes silent (a black-holed path, a stalled proxy): every
//! command sent on it waits, the engine gives up on each after its `store_timeout`, and the
//! next ones queue behind them on the same multiplexed connection, for as long as TCP takes
//! to notice (many minutes). So a command that was dropped before its reply came (the
//! engine's timeout, or a cancelled call) or that timed out marks its connection suspect: in
//! the background the connection is pinged, and if the ping gets no answer in time a fresh
//! connection replaces it (the old one closes when its last command ends). A cancelled call on
//! a healthy connection costs one ping.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, RedisError, RedisResult, Value};

/// One node (reconnecting by itself after the connection drops) or a cluster.
#[derive(Clone)]
pub(super) enum Connection {
    Node(ConnectionManager),
    Cluster(ClusterConnection),
}

/// How to open a fresh connection.
#[derive(Clone)]
pub(super) enum Opener {
    Node(redis::Client, ConnectionManagerConfig),
    Cluster(ClusterClient),
}

impl Opener {
    pub(super) async fn open(&self) -> RedisResult<Connection> {
        match self {
            Opener::Node(client, config) => {
                ConnectionManager::new_with_config(client.clone(), config.clone())
                    .await
                    .map(Connection::Node)
            }
            Opener::Cluster(client) => client.get_async_connection().await.map(Connection::Cluster),
        }
    }
}

/// The current connection and its generation, and how to replace it.
pub(super) struct Link {
    current: RwLock<(u64, Connection)>,
    opener: Opener,
    /// A check of a suspect connection is under way.
    checking: AtomicBool,
    /// How long a suspect connection has to answer a ping before it is replaced.
    patience: Duration,
    /// The runtime the store was opened on, which drives its connections: replacements are
    /// opened there too, whichever runtime the abandoned call ran on.
    runtime: tokio::runtime::Handle,
}

/// How long a suspect connection has to answer a ping before it is replaced (plus the
/// `WAIT` timeout on the connections waited writes use).
pub(super) const PING_PATIENCE: Duration = Duration::from_secs(1);

impl Link {
    pub(super) async fn open(opener: Opener, patience: Duration) -> RedisResult<Arc<Link>> {
        let conn = opener.open().await?;
        Ok(Arc::new(Link {
            current: RwLock::new((0, conn)),
            opener,
            checking: AtomicBool::new(false),
            patience,
            runtime: tokio::runtime::Handle::current(),
        }))
    }

    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.opener, Opener::Cluster(_))
    }

    fn current(&self) -> (u64, Connection) {
        let guard = self.current.read().unwrap_or_else(|p| p.into_inner());
        (guard.0, guard.1.clone())
    }

    /// A command on the connection of `generation` (to `key`'s node) got no reply: ping that
    /// node on it in the background and replace the connection if the ping gets no answer.
    /// One check at a time; a connection already replaced is left alone.
    fn suspect(self: &Arc<Self>, generation: u64, key: &str) {
        if self.current().0 != generation || self.checking.swap(true, Ordering::AcqRel) {
            return;
        }
        let (link, key) = (Arc::clone(self), key.to_owned());
        self.runtime.spawn(async move {
            let _done = Checked(&link.checking);
            let (now, conn) = link.current();
            if now != generation {
                return;
            }
            let ping = tokio::time::timeout(link.patience, ping(conn, &key)).await;
            if matches!(ping, Ok(Ok(()))) {
                return;
            }
            match link.opener.open().await {
                Ok(fresh) => {
                    let mut current = link.current.write().unwrap_or_else(|p| p.into_inner());
                    if current.0 == generation {
                        *current = (generation + 1, fresh);
                        tracing::warn!("idem: replaced a Redis connection that stopped answering");
                    }
                }
                // Still unreachable: the next abandoned command checks again.
                Err(e) => tracing::debug!(error = %e, "idem: reopening Redis failed"),
            }
        });
    }

    /// Sends `cmd` to `key`'s node, followed on the same connection, in one pipeline, by
    /// `WAIT` for `replicas` if given (so the count covers this write, even if the
    /// connection was replaced between the two). Returns the command's reply, or an error if
    /// too few replicas acknowledged it in time.
    pub(super) async fn send(
        self: &Arc<Self>,
        cmd: &Cmd,
        key: &str,
        replicas: Option<(u32, Duration)>,
    ) -> RedisResult<Value> {
        let (generation, conn) = self.current();
        let mut pending = Pending {
            link: self,
            generation,
            key,
            armed: true,
        };
        let out = send_on(conn, cmd, key, replicas).await;
        pending.armed = false;
        if out.as_ref().is_err_and(RedisError::is_timeout) {
            self.suspect(generation, key);
        }
        out
    }

    /// Loads a script into the server (every primary, for a cluster).
    pub(super) async fn load(&self, script: &redis::Script) -> RedisResult<String> {
        let load = script.prepare_invoke();
        match self.current().1 {
            Connection::Node(mut c) => load.load_async(&mut c).await,
            Connection::Cluster(mut c) => load.load_async(&mut c).await,
        }
    }
}

/// Marks the connection suspect if dropped while armed: the command never got its reply.
struct Pending<'a> {
    link: &'a Arc<Link>,
    generation: u64,
    key: &'a str,
    armed: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.link.suspect(self.generation, self.key);
        }
    }
}

/// Clears the "check under way" flag however the check ends (even if its task is dropped).
struct Checked<'a>(&'a AtomicBool);

impl Drop for Checked<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// `PING` to `key`'s node on `conn`.
async fn ping(conn: Connection, key: &str) -> RedisResult<()> {
    let ping = redis::cmd("PING");
    match conn {
        Connection::Node(mut c) => ping.query_async::<()>(&mut c).await,
        Connection::Cluster(mut c) => {
            let route = SingleNodeRoutingInfo::SpecificNode(Route::with_key(key, SlotAddr::Master));
            c.route_command(ping, RoutingInfo::SingleNode(route))
                .await
                .map(drop)
        }
    }
}

async fn send_on(
    conn: Connection,
    cmd: &Cmd,
    key: &str,
    replicas: Option<(u32, Duration)>,
) -> RedisResult<Value> {
    let Some((replicas, timeout)) = replicas else {
        return match conn {
            Connection::Node(mut c) => cmd.query_async(&mut c).await,
            Connection::Cluster(mut c) => cmd.query_async(&mut c).await,
        };
    };
    // Whole milliseconds, rounded up: `WAIT n 0` would wait forever.
    let ms = u64::try_from(timeout.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    let mut pipe = redis::pipe();
    pipe.add_command(cmd.clone())
        .cmd("WAIT")
        .arg(replicas)
        .arg(ms);
    let replies: Vec<Value> = match conn {
        Connection::Node(mut c) => pipe.query_async(&mut c).await?,
        Connection::Cluster(mut c) => {
            // WAIT names no key: the pipeline goes whole to the primary holding this one.
            let route = SingleNodeRoutingInfo::SpecificNode(Route::with_key(key, SlotAddr::Master));
            c.route_pipeline(pipe, 0, 2, route).await?
        }
    };
    let client_error = |what: &'static str, detail: String| {
        RedisError::from((redis::ErrorKind::Client, what, detail))
    };
    let [reply, acked]: [Value; 2] = replies
        .try_into()
        .map_err(|r: Vec<Value>| client_error("WAIT pipeline", format!("{} replies", r.len())))?;
    // A routed pipeline hands back server errors as values: the script's (`NOSCRIPT`, say)
    // must reach the caller as the error it is.
    let reply = reply.extract_error()?;
    let acked: i64 =
        redis::from_redis_value(acked).map_err(|e| client_error("WAIT reply", e.to_string()))?;
    if acked < i64::from(replicas) {
        return Err(client_error(
            "too few Redis replicas acknowledged the write",
            format!("{acked} of {replicas} within {timeout:?}"),
        ));
    }
    Ok(reply)
}
