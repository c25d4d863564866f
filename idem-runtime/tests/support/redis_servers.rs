//! Private `redis-server` processes for tests that need a topology of their own: a primary
//! with a replica, or a cluster (whose nodes may announce other addresses, such as proxies).
//! Each test picks fixed loopback ports of its own; the processes die with the value.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Running `redis-server` processes, killed (and their files deleted) on drop.
pub struct Servers {
    nodes: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
    }
}

/// Whether `redis-server` and `redis-cli` can be run; says so (a failure in CI) if not.
pub fn available() -> bool {
    match Command::new("redis-server").arg("--version").output() {
        Ok(_) => true,
        Err(e) => {
            super::server_missing(
                "redis-server (for private test servers)",
                "PATH",
                "PATH",
                &e,
            );
            false
        }
    }
}

impl Servers {
    pub fn new() -> Servers {
        Servers {
            nodes: Vec::new(),
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// Starts `redis-server` on `port` with `args`, keeping nothing on disk, and waits until
    /// it answers.
    pub fn start(&mut self, port: u16, args: &[String]) {
        let node = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.nodes.push(node);
        let url = format!("redis://127.0.0.1:{port}");
        let up = (0..100).any(|_| {
            let ok = connect(&url).is_some();
            if !ok {
                std::thread::sleep(Duration::from_millis(50));
            }
            ok
        });
        assert!(up, "redis-server on port {port} did not start");
    }

    /// A cluster node's settings: config file in the servers' directory, a short node timeout.
    pub fn cluster_args(&self, port: u16) -> Vec<String> {
        let conf = self.dir.path().join(format!("nodes-{port}.conf"));
        vec![
            "--cluster-enabled".into(),
            "yes".into(),
            "--cluster-node-timeout".into(),
            "2000".into(),
            "--cluster-config-file".into(),
            conf.display().to_string(),
        ]
    }
}

pub fn connect(url: &str) -> Option<redis::Connection> {
    redis::Client::open(url).ok()?.get_connection().ok()
}

/// Polls `check` every 50 ms for up to 10 s.
pub fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let ok = (0..200).any(|_| {
        let ok = check();
        if !ok {
            std::thread::sleep(Duration::from_millis(50));
        }
        ok
    });
    assert!(ok, "{what}");
}

/// `INFO <section>` of the node at `port`.
pub fn info(port: u16, section: &str) -> String {
    let mut conn = connect(&format!("redis://127.0.0.1:{port}")).expect("connect");
    redis::cmd("INFO")
        .arg(section)
        .query(&mut conn)
        .unwrap_or_default()
}

/// A primary on `port` and its replica on `port + 1`, the replica in sync.
pub fn primary_with_replica(port: u16) -> Servers {
    let mut servers = Servers::new();
    servers.start(port, &[]);
    servers.start(
        port + 1,
        &["--replicaof".into(), "127.0.0.1".into(), port.to_string()],
    );
    wait_until("the replica did not come in sync", || {
        info(port, "replication").contains("connected_slaves:1")
            && info(port + 1, "replication").contains("master_link_status:up")
    });
    servers
}

/// A cluster of one primary on `port` holding every slot and its replica on `port + 1`.
pub fn cluster_with_replica(port: u16) -> Servers {
    let mut servers = Servers::new();
    for p in [port, port + 1] {
        let args = servers.cluster_args(p);
        servers.start(p, &args);
    }
    let mut primary = connect(&format!("redis://127.0.0.1:{port}")).expect("primary");
    let mut replica = connect(&format!("redis://127.0.0.1:{}", port + 1)).expect("replica");
    let _: () = redis::cmd("CLUSTER")
        .arg("ADDSLOTSRANGE")
        .arg(0)
        .arg(16383)
        .query(&mut primary)
        .expect("add slots");
    let id: String = redis::cmd("CLUSTER")
        .arg("MYID")
        .query(&mut primary)
        .expect("id");
    let _: () = redis::cmd("CLUSTER")
        .arg("MEET")
        .arg("127.0.0.1")
        .arg(port)
        .query(&mut replica)
        .expect("meet");
    wait_until("the replica did not learn of the primary", || {
        redis::cmd("CLUSTER")
            .arg("NODES")
            .query::<String>(&mut replica)
            .is_ok_and(|nodes| nodes.contains(&id))
    });
    let _: () = redis::cmd("CLUSTER")
        .arg("REPLICATE")
        .arg(&id)
        .query(&mut replica)
        .expect("replicate");
    wait_until("the cluster with a replica did not become ok", || {
        info(port, "replication").contains("connected_slaves:1")
            && info(port + 1, "replication").contains("master_link_status:up")
            && redis::cmd("CLUSTER")
                .arg("INFO")
                .query::<String>(&mut primary)
                .is_ok_and(|i| i.contains("cluster_state:ok"))
    });
    servers
}

/// A three-node cluster on `ports`, each node announcing the port in `announce` (a proxy in
/// front of it) to clients, its cluster bus direct.
pub fn cluster_announcing(ports: [u16; 3], announce: [u16; 3]) -> Servers {
    let mut servers = Servers::new();
    for (port, shown) in ports.into_iter().zip(announce) {
        let mut args = servers.cluster_args(port);
        args.extend(
            [
                "--cluster-announce-ip",
                "127.0.0.1",
                "--cluster-announce-port",
                &shown.to_string(),
                "--cluster-announce-bus-port",
                &(port + 10_000).to_string(),
            ]
            .map(String::from),
        );
        servers.start(port, &args);
    }
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let status = Command::new("redis-cli")
        .arg("--cluster")
        .arg("create")
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdout(Stdio::null())
        .status()
        .expect("redis-cli");
    assert!(status.success(), "redis-cli --cluster create failed");
    let mut conn = connect(&format!("redis://{}", addrs[0])).expect("node");
    wait_until("the private Redis Cluster did not become ok", || {
        redis::cmd("CLUSTER")
            .arg("INFO")
            .query::<String>(&mut conn)
            .is_ok_and(|i| i.contains("cluster_state:ok"))
    });
    servers
}
