//! The connection to Redis, replaced when a command on it was abandoned.
//!
//! The client's own reconnect covers a connection the server or the network closed. It does
//! not cover one that stays open but goes silent (a black-holed path, a stalled proxy): every
//! command sent on it waits, the engine gives up on each after its `store_timeout`, and the
//! next ones queue behind them on the same multiplexed connection, for as long as TCP takes
//! to notice (many minutes). So a command that was dropped before its reply came (the
//! engine's timeout, or a cancelled call) marks its connection suspect: a fresh one is opened
//! in the background and replaces it, and the old one closes when its last command ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, RedisError, RedisResult, Value};

/// One node (reconnecting by itself after the connection drops) or a cluster.
#[derive(Clone)]
pub(super) enum Connection {
    Node(ConnectionManager),
    Cluster(ClusterConnection),
}

/// How to open a fresh connection.
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
    replacing: AtomicBool,
}

impl Link {
    pub(super) async fn open(opener: Opener) -> RedisResult<Arc<Link>> {
        let conn = opener.open().await?;
        Ok(Arc::new(Link {
            current: RwLock::new((0, conn)),
            opener,
            replacing: AtomicBool::new(false),
        }))
    }

    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.opener, Opener::Cluster(_))
    }

    fn current(&self) -> (u64, Connection) {
        let guard = self.current.read().unwrap_or_else(|p| p.into_inner());
        (guard.0, guard.1.clone())
    }

    /// The connection of `generation` had a command abandoned: open a fresh one in the
    /// background, unless that already happened or is happening.
    fn suspect(self: &Arc<Self>, generation: u64) {
        if self.current().0 != generation || self.replacing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.replacing.store(false, Ordering::Release);
            return;
        };
        let link = Arc::clone(self);
        runtime.spawn(async move {
            match link.opener.open().await {
                Ok(fresh) => {
                    let mut current = link.current.write().unwrap_or_else(|p| p.into_inner());
                    if current.0 == generation {
                        *current = (generation + 1, fresh);
                        tracing::debug!("idem: replaced a Redis connection that went silent");
                    }
                }
                // Still unreachable: the next abandoned command tries again.
                Err(e) => tracing::debug!(error = %e, "idem: reopening Redis failed"),
            }
            link.replacing.store(false, Ordering::Release);
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
            armed: true,
        };
        let out = send_on(conn, cmd, key, replicas).await;
        pending.armed = false;
        if out.as_ref().is_err_and(RedisError::is_timeout) {
            self.suspect(generation);
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
    armed: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.link.suspect(self.generation);
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
    let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
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
