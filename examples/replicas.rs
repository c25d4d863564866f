//! Several replicas on one shared store: a retry that lands on another replica gets the first
//! result, and a replica killed mid-request has its key taken over by another.
//!
//! ```text
//! cargo run --example replicas                                   # local PostgreSQL
//! cargo run --example replicas -- --store mysql://root@127.0.0.1:3306/test
//! cargo run --example replicas -- --store redis://127.0.0.1:6379
//! cargo run --example replicas -- --store redis+cluster://127.0.0.1:17001,127.0.0.1:17002
//! ```
//!
//! The demo starts this same program three times as replica processes (`serve` mode: they
//! take requests on stdin and answer on stdout) and routes requests to them by hand. The
//! multi-process tests use the `worker` mode: many tasks calling overlapping keys, while the
//! test kills one replica with SIGKILL.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use idem_runtime::store::{
    MySqlStore, MySqlStoreOptions, PgStore, PgStoreOptions, RedisStore, RedisStoreOptions,
    SqliteStore,
};
use idem_runtime::{Error, Idem, Outcome, idempotent, observe};

const DEFAULT_STORE: &str = "postgres://postgres@127.0.0.1:5432/test";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = Opts::parse(&args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match args.first().map(String::as_str) {
        Some("worker") => rt.block_on(worker(opts)),
        Some("serve") => rt.block_on(serve(opts)),
        _ => demo(opts),
    }
}

/// Command-line options, `--name value` pairs.
#[derive(Clone, Debug)]
struct Opts {
    store: String,
    table: String,
    name: String,
    keys: u64,
    copies: u64,
    tasks: usize,
    body_ms: u64,
    lease_ms: u64,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts, String> {
        let mut o = Opts {
            store: std::env::var("IDEM_DEMO_STORE").unwrap_or_else(|_| DEFAULT_STORE.into()),
            table: "idem_replicas_demo".into(),
            name: format!("replica-{}", std::process::id()),
            keys: 100,
            copies: 2,
            tasks: 16,
            body_ms: 200,
            lease_ms: 2_000,
        };
        let mut it = args.iter().skip_while(|a| !a.starts_with("--"));
        while let Some(flag) = it.next() {
            let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let num = || {
                value
                    .parse::<u64>()
                    .map_err(|e| format!("{flag} {value}: {e}"))
            };
            match flag.as_str() {
                "--store" => o.store = value.clone(),
                "--table" => o.table = value.clone(),
                "--name" => o.name = value.clone(),
                "--keys" => o.keys = num()?,
                "--copies" => o.copies = num()?,
                "--tasks" => o.tasks = num()? as usize,
                "--body-ms" => o.body_ms = num()?,
                "--lease-ms" => o.lease_ms = num()?,
                other => return Err(format!("unknown option {other}")),
            }
        }
        Ok(o)
    }

    fn to_args(&self) -> Vec<String> {
        [
            ("--store", self.store.clone()),
            ("--table", self.table.clone()),
            ("--name", self.name.clone()),
            ("--keys", self.keys.to_string()),
            ("--copies", self.copies.to_string()),
            ("--tasks", self.tasks.to_string()),
            ("--body-ms", self.body_ms.to_string()),
            ("--lease-ms", self.lease_ms.to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect()
    }
}

/// The store the replicas share, and a pool on the same database for the "side effects".
enum Backend {
    Pg(PgStore),
    MySql(MySqlStore),
    Sqlite(SqliteStore),
    /// Redis keeps the effects too: a list per key, `<table>_effects:<key>`.
    Redis(RedisStore, RedisEffects),
}

/// A plain Redis connection for the effects lists.
#[derive(Clone)]
enum RedisEffects {
    Node(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Backend {
    async fn connect(o: &Opts) -> Result<Backend, Error> {
        let url = o.store.as_str();
        Ok(if url.starts_with("postgres") {
            Backend::Pg(
                PgStore::connect_with(
                    url,
                    PgStoreOptions::new().table(&o.table).max_connections(8),
                )
                .await?,
            )
        } else if url.starts_with("mysql") {
            let options = MySqlStoreOptions::new().table(&o.table).max_connections(8);
            Backend::MySql(MySqlStore::connect_with(url, options).await?)
        } else if let Some(path) = url.strip_prefix("sqlite://") {
            let options = idem_runtime::store::SqliteStoreOptions::new().table(&o.table);
            Backend::Sqlite(SqliteStore::open_with(path, options).await?)
        } else if url.starts_with("redis") {
            Self::connect_redis(url, &o.table).await?
        } else {
            return Err(Error::Config(format!("unsupported store URL {url}")));
        })
    }

    /// `redis://host:port` or `redis+cluster://host1:port1,host2:port2`; keys under `table`.
    async fn connect_redis(url: &str, table: &str) -> Result<Backend, Error> {
        let options = RedisStoreOptions::new().prefix(table);
        let effects_failed = |e: redis::RedisError| Error::Config(format!("redis: {e}"));
        if let Some(nodes) = url.strip_prefix("redis+cluster://") {
            let nodes: Vec<String> = nodes.split(',').map(|n| format!("redis://{n}")).collect();
            let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
            let store = RedisStore::connect_cluster(&nodes, options).await?;
            let client = redis::cluster::ClusterClient::new(nodes).map_err(effects_failed)?;
            let effects = client
                .get_async_connection()
                .await
                .map_err(effects_failed)?;
            return Ok(Backend::Redis(store, RedisEffects::Cluster(effects)));
        }
        let store = RedisStore::connect_with(url, options).await?;
        let client = redis::Client::open(url).map_err(effects_failed)?;
        let effects = client
            .get_multiplexed_async_connection()
            .await
            .map_err(effects_failed)?;
        Ok(Backend::Redis(store, RedisEffects::Node(effects)))
    }

    fn store(&self) -> Arc<dyn idem_runtime::store::Store> {
        match self {
            Backend::Pg(s) => Arc::new(s.clone()),
            Backend::MySql(s) => Arc::new(s.clone()),
            Backend::Sqlite(s) => Arc::new(s.clone()),
            Backend::Redis(s, _) => Arc::new(s.clone()),
        }
    }

    /// Creates the effects table. Replicas start together and PostgreSQL's `CREATE TABLE IF
    /// NOT EXISTS` can still collide with a concurrent one, so a failure is retried.
    async fn create_effects(&self, table: &str) -> Result<(), sqlx::Error> {
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {table}_effects (k BIGINT NOT NULL, replica VARCHAR(64) NOT NULL, run VARCHAR(64) NOT NULL)"
        );
        let mut attempt = 0;
        loop {
            let sql = sqlx::AssertSqlSafe(create.clone());
            let done = match self {
                Backend::Pg(s) => sqlx::raw_sql(sql).execute(s.pool()).await.map(drop),
                Backend::MySql(s) => sqlx::raw_sql(sql).execute(s.pool()).await.map(drop),
                Backend::Sqlite(s) => sqlx::raw_sql(sql).execute(s.pool()).await.map(drop),
                Backend::Redis(..) => return Ok(()), // lists need no schema
            };
            match done {
                Err(_) if attempt < 5 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    /// Records one execution of the body: the side effect the tests count.
    async fn effect(
        &self,
        table: &str,
        key: u64,
        replica: &str,
        run: &str,
    ) -> Result<(), AppError> {
        let key = key as i64;
        match self {
            Backend::Pg(s) => {
                let insert =
                    format!("INSERT INTO {table}_effects (k, replica, run) VALUES ($1, $2, $3)");
                sqlx::query(sqlx::AssertSqlSafe(insert))
                    .bind(key)
                    .bind(replica)
                    .bind(run)
                    .execute(s.pool())
                    .await?;
            }
            Backend::MySql(s) => {
                let insert =
                    format!("INSERT INTO {table}_effects (k, replica, run) VALUES (?, ?, ?)");
                sqlx::query(sqlx::AssertSqlSafe(insert))
                    .bind(key)
                    .bind(replica)
                    .bind(run)
                    .execute(s.pool())
                    .await?;
            }
            Backend::Sqlite(s) => {
                let insert =
                    format!("INSERT INTO {table}_effects (k, replica, run) VALUES (?1, ?2, ?3)");
                sqlx::query(sqlx::AssertSqlSafe(insert))
                    .bind(key)
                    .bind(replica)
                    .bind(run)
                    .execute(s.pool())
                    .await?;
            }
            Backend::Redis(_, effects) => {
                let mut push = redis::cmd("RPUSH");
                push.arg(format!("{table}_effects:{key}")).arg(replica);
                let pushed: Result<i64, _> = match effects.clone() {
                    RedisEffects::Node(mut c) => push.query_async(&mut c).await,
                    RedisEffects::Cluster(mut c) => push.query_async(&mut c).await,
                };
                pushed.map_err(|e| AppError::Redis(e.to_string()))?;
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
enum AppError {
    Idem(Error),
    Db(sqlx::Error),
    Redis(String),
}

impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        AppError::Idem(e)
    }
}

impl From<sqlx::Error> for AppError {
    fn from(e: sqlx::Error) -> Self {
        AppError::Db(e)
    }
}

impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppError::Idem(e) => write!(f, "{e}"),
            AppError::Db(e) => write!(f, "database: {e}"),
            AppError::Redis(e) => write!(f, "redis: {e}"),
        }
    }
}

struct Replica {
    idem: Idem,
    backend: Backend,
    opts: Opts,
    runs: AtomicU64,
    announce_bodies: bool,
}

/// The handler every replica runs: a side effect (a row in the effects table), some work,
/// and a value that names the replica and the run that produced it.
#[idempotent(key = key, runtime = &replica.idem, name = "replicas.process", wait = "PT60S", skip(replica, body_ms))]
async fn process(replica: &Replica, key: u64, body_ms: u64) -> Result<String, AppError> {
    let run = format!(
        "{}#{}",
        replica.opts.name,
        replica.runs.fetch_add(1, Relaxed)
    );
    replica
        .backend
        .effect(&replica.opts.table, key, &replica.opts.name, &run)
        .await?;
    if replica.announce_bodies {
        // Tells the multi-process test that this process is now inside a body.
        println!("START {key}");
    }
    tokio::time::sleep(Duration::from_millis(body_ms)).await;
    Ok(run)
}

async fn start(
    opts: Opts,
    announce_bodies: bool,
) -> Result<Arc<Replica>, Box<dyn std::error::Error>> {
    let backend = Backend::connect(&opts).await?;
    backend.create_effects(&opts.table).await?;
    let idem = Idem::builder()
        .shared_store(backend.store())
        .executor_id(Some(opts.name.clone()))
        .default_lease(Duration::from_millis(opts.lease_ms))
        .local_cache(0)
        .build()?;
    Ok(Arc::new(Replica {
        idem,
        backend,
        opts,
        runs: AtomicU64::new(0),
        announce_bodies,
    }))
}

/// Batch mode for the multi-process tests: every key `copies` times, shuffled, from `tasks`
/// concurrent tasks. Prints `RESULT <key> <value>` per call, then `DONE`.
async fn worker(opts: Opts) -> Result<(), Box<dyn std::error::Error>> {
    let replica = start(opts.clone(), true).await?;
    let mut rng = fastrand::Rng::new();
    let mut calls: Vec<u64> = (0..opts.keys)
        .flat_map(|k| (0..opts.copies).map(move |_| k))
        .collect();
    rng.shuffle(&mut calls);
    let queue = Arc::new(std::sync::Mutex::new(calls));
    let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
    println!("READY {}", opts.name);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..opts.tasks {
        let (replica, queue, out) = (replica.clone(), queue.clone(), out.clone());
        tasks.spawn(async move {
            loop {
                let Some(key) = queue.lock().expect("queue").pop() else {
                    return;
                };
                let value = loop {
                    match process(&replica, key, replica.opts.body_ms).await {
                        Ok(v) => break v,
                        Err(AppError::Idem(e)) if e.http_status() == 409 => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => panic!("key {key}: {e}"),
                    }
                };
                let mut out = out.lock().expect("stdout");
                let _ = writeln!(out, "RESULT {key} {value}");
                let _ = out.flush();
            }
        });
    }
    while let Some(t) = tasks.join_next().await {
        t?;
    }
    println!("DONE {}", opts.name);
    Ok(())
}

/// Interactive mode for the demo: `<key> <body_ms>` per line on stdin; answers
/// `<key> <value> <outcome>` on stdout.
async fn serve(opts: Opts) -> Result<(), Box<dyn std::error::Error>> {
    let replica = start(opts, false).await?;
    println!("READY {}", replica.opts.name);
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(tokio::io::stdin()));
    while let Some(line) = lines.next_line().await? {
        let mut parts = line.split_whitespace();
        let (Some(key), Some(body_ms)) = (parts.next(), parts.next()) else {
            continue;
        };
        let (key, body_ms): (u64, u64) = (key.parse()?, body_ms.parse()?);
        let (out, how) = observe(process(&replica, key, body_ms)).await;
        let how = how.map_or("-", Outcome::as_str);
        match out {
            Ok(v) => println!("{key} {v} {how}"),
            Err(e) => println!("{key} error {}", e.to_string().replace(' ', "_")),
        }
    }
    Ok(())
}

/// The demo leaves nothing behind in the database it borrowed.
fn drop_demo_tables(opts: &Opts) -> Result<(), Box<dyn std::error::Error>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let backend = Backend::connect(opts).await?;
        if let Backend::Redis(_, effects) = &backend {
            return drop_redis_keys(effects.clone(), &opts.table).await;
        }
        for t in [format!("{}_effects", opts.table), opts.table.clone()] {
            let sql = sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {t}"));
            match &backend {
                Backend::Pg(s) => sqlx::raw_sql(sql).execute(s.pool()).await.map(drop)?,
                Backend::MySql(s) => sqlx::raw_sql(sql).execute(s.pool()).await.map(drop)?,
                Backend::Sqlite(s) => sqlx::raw_sql(sql).execute(s.pool()).await.map(drop)?,
                Backend::Redis(..) => {}
            }
        }
        Ok(())
    })
}

/// Deletes the demo's records and effects lists (on every primary of a cluster).
async fn drop_redis_keys(
    effects: RedisEffects,
    table: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    for pattern in [format!("{table}:*"), format!("{table}_effects:*")] {
        let mut keys = redis::cmd("KEYS");
        keys.arg(pattern);
        let found: Vec<String> = match effects.clone() {
            RedisEffects::Node(mut c) => keys.query_async(&mut c).await?,
            RedisEffects::Cluster(mut c) => keys.query_async(&mut c).await?,
        };
        for key in found {
            let mut del = redis::cmd("DEL");
            del.arg(key);
            let _: i64 = match effects.clone() {
                RedisEffects::Node(mut c) => del.query_async(&mut c).await?,
                RedisEffects::Cluster(mut c) => del.query_async(&mut c).await?,
            };
        }
    }
    Ok(())
}

/// One replica process driven over its stdin/stdout.
struct Proc {
    name: String,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Proc {
    fn spawn(opts: &Opts, name: &str) -> Result<Proc, Box<dyn std::error::Error>> {
        let mut o = opts.clone();
        o.name = name.into();
        let mut child = Command::new(std::env::current_exe()?)
            .arg("serve")
            .args(o.to_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut ready = String::new();
        stdout.read_line(&mut ready)?;
        if !ready.starts_with("READY") {
            return Err(format!("{name} did not start: {ready:?}").into());
        }
        Ok(Proc {
            name: name.into(),
            child,
            stdin,
            stdout,
        })
    }

    fn send(&mut self, key: u64, body_ms: u64) -> Result<(), Box<dyn std::error::Error>> {
        writeln!(self.stdin, "{key} {body_ms}")?;
        Ok(self.stdin.flush()?)
    }

    fn answer(&mut self) -> Result<(String, String), Box<dyn std::error::Error>> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            [_, value, how] => Ok((value.to_string(), how.to_string())),
            _ => Err(format!("{} answered {line:?}", self.name).into()),
        }
    }
}

fn demo(mut opts: Opts) -> Result<(), Box<dyn std::error::Error>> {
    opts.table = format!("idem_demo_{:08x}", fastrand::u32(..));
    opts.lease_ms = 2_000;
    println!(
        "idem replicas demo: three replica processes sharing {}",
        opts.store
    );
    println!(
        "(table {}, lease {} ms; set IDEM_DEMO_STORE or pass --store to use another database)\n",
        opts.table, opts.lease_ms
    );
    let mut a = Proc::spawn(&opts, "replica-a")?;
    let mut b = Proc::spawn(&opts, "replica-b")?;
    let mut c = Proc::spawn(&opts, "replica-c")?;

    println!(
        "1. POST order 1 lands on replica-a; the client times out and retries, landing on replica-b."
    );
    a.send(1, 50)?;
    let (first, how) = a.answer()?;
    println!("   replica-a: {first} ({how})");
    b.send(1, 50)?;
    let (retry, how) = b.answer()?;
    println!("   replica-b: {retry} ({how})");
    println!(
        "   {}\n",
        if first == retry {
            "the retry got the first result; the body ran once"
        } else {
            "MISMATCH"
        }
    );

    println!("2. Order 2 lands on replica-c, which is killed (SIGKILL) in the middle of the body.");
    c.send(2, 60_000)?;
    std::thread::sleep(Duration::from_millis(500));
    c.child.kill()?;
    let _ = c.child.wait();
    println!("   replica-c killed while running order 2; its reservation is still in the store.");
    println!(
        "   The client retries on replica-a, which waits for replica-c's lease to run out and takes over:"
    );
    let started = Instant::now();
    a.send(2, 50)?;
    let (taken, how) = a.answer()?;
    println!(
        "   replica-a: {taken} ({how}) after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    b.send(2, 50)?;
    let (again, how) = b.answer()?;
    println!("   replica-b, another retry: {again} ({how})\n");

    let mut seen = HashMap::new();
    seen.insert("order 1", first == retry);
    seen.insert("order 2", taken == again && how == "replayed");
    for p in [&mut a, &mut b] {
        let _ = p.child.kill();
        let _ = p.child.wait();
    }
    drop_demo_tables(&opts)?;
    if seen.values().all(|ok| *ok) {
        println!("every retry, on any replica, got the one result of its key.");
        Ok(())
    } else {
        Err("a retry saw a different result".into())
    }
}
