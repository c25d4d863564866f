//! A chaos soak: replica processes on one shared database, killed with SIGKILL and restarted
//! every few seconds, their database connections cut now and then, while clients retry
//! through the HTTP layer and through `#[idempotent]`. At the end it checks the invariants and
//! prints the figures.
//!
//! ```text
//! cargo run --release --example chaos -- --seconds 600                       # local PostgreSQL
//! cargo run --release --example chaos -- --store mysql://root@127.0.0.1:3306/test --seconds 600
//! ```
//!
//! The controller (this program without a mode) starts `--replicas` copies of itself in
//! `replica` mode, each an axum service on its own port whose idem store reaches the database
//! through a TCP proxy that the controller cuts every `--cut-every-ms` milliseconds. Every
//! `--kill-every-ms` milliseconds it SIGKILLs one replica and starts it again. Clients send
//! each request (a fresh key) from two senders at once to random replicas, retrying on refused
//! connections, 409s and 5xx until they get an answer, alternately to a route behind
//! `IdempotencyLayer` and to one calling an `#[idempotent]` fn. Every execution of a body
//! writes an effect row straight to the database (not through the proxy).
//!
//! Invariants checked at the end (exit status 1 and the list if any fails):
//! - every request got an answer, and every answer for a key is the same;
//! - the answer is an execution that happened, and each key has one completed record and
//!   nothing is left in progress (nothing stuck past its lease);
//! - every other execution of a key was in flight at a kill (its replica incarnation was
//!   killed before it answered) or was told its result could not be recorded (the store was cut off: lease lost
//!   or result not recorded, answered with an error, so the client retried).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use idem_runtime::http::IdempotencyLayer;
use idem_runtime::store::{MySqlStore, MySqlStoreOptions, PgStore, PgStoreOptions};
use idem_runtime::{Error, Idem, idempotent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[allow(dead_code, unreachable_pub)]
#[path = "../idem-runtime/tests/support/proxy.rs"]
mod proxy;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = Opts::parse(&args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if args.first().map(String::as_str) == Some("replica") {
        return rt.block_on(replica(opts));
    }
    let ok = rt.block_on(controller(opts))?;
    std::process::exit(if ok { 0 } else { 1 });
}

/// Command-line options, `--name value` pairs.
#[derive(Clone, Debug)]
struct Opts {
    store: String,
    /// Replica mode: the URL its idem store uses (through the proxy).
    via: String,
    table: String,
    name: String,
    port: u16,
    seconds: u64,
    replicas: usize,
    clients: usize,
    kill_every_ms: u64,
    cut_every_ms: u64,
    body_ms: u64,
    lease_ms: u64,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts, String> {
        let mut o = Opts {
            store: std::env::var("IDEM_DEMO_STORE")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
            via: String::new(),
            table: format!("idem_chaos_{:08x}", fastrand::u32(..)),
            name: String::new(),
            port: 0,
            seconds: 60,
            replicas: 3,
            clients: 12,
            kill_every_ms: 3_000,
            cut_every_ms: 7_000,
            body_ms: 100,
            lease_ms: 1_500,
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
                "--via" => o.via = value.clone(),
                "--table" => o.table = value.clone(),
                "--name" => o.name = value.clone(),
                "--port" => o.port = num()? as u16,
                "--seconds" => o.seconds = num()?,
                "--replicas" => o.replicas = num()?.max(1) as usize,
                "--clients" => o.clients = num()?.max(1) as usize,
                "--kill-every-ms" => o.kill_every_ms = num()?,
                "--cut-every-ms" => o.cut_every_ms = num()?,
                "--body-ms" => o.body_ms = num()?,
                "--lease-ms" => o.lease_ms = num()?,
                other => return Err(format!("unknown option {other}")),
            }
        }
        Ok(o)
    }
}

// ---------------------------------------------------------------------------------------
// The effects table: one row per execution of a body, written straight to the database.

#[derive(Clone)]
enum Effects {
    Pg(sqlx::PgPool),
    My(sqlx::MySqlPool),
}

impl Effects {
    async fn connect(url: &str) -> Result<Effects, sqlx::Error> {
        Ok(if url.starts_with("mysql") {
            Effects::My(
                sqlx::mysql::MySqlPoolOptions::new()
                    .max_connections(8)
                    .connect(url)
                    .await?,
            )
        } else {
            Effects::Pg(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(8)
                    .connect(url)
                    .await?,
            )
        })
    }

    async fn run(&self, sql: String) -> Result<(), sqlx::Error> {
        let sql = sqlx::AssertSqlSafe(sql);
        match self {
            Effects::Pg(p) => sqlx::raw_sql(sql).execute(p).await.map(drop),
            Effects::My(p) => sqlx::raw_sql(sql).execute(p).await.map(drop),
        }
    }

    /// Values are numbers and names this program makes, so they are written inline.
    async fn executed(
        &self,
        table: &str,
        key: &str,
        exec: u64,
        replica: &str,
    ) -> Result<(), sqlx::Error> {
        self.run(format!(
            "INSERT INTO {table}_effects (k, exec, replica, unrecorded) VALUES ('{key}', {exec}, '{replica}', 0)"
        ))
        .await
    }

    /// The execution's handler has its outcome and answers: it was no longer in flight.
    async fn answered(&self, table: &str, exec: u64) -> Result<(), sqlx::Error> {
        self.run(format!(
            "UPDATE {table}_effects SET answered = 1 WHERE exec = {exec}"
        ))
        .await
    }

    async fn unrecorded(&self, table: &str, exec: u64) -> Result<(), sqlx::Error> {
        self.run(format!(
            "UPDATE {table}_effects SET unrecorded = 1 WHERE exec = {exec}"
        ))
        .await
    }

    /// (key, exec, replica incarnation, unrecorded, answered) for every execution.
    async fn all(&self, table: &str) -> Result<Vec<Execution>, sqlx::Error> {
        let sql = format!("SELECT k, exec, replica, unrecorded, answered FROM {table}_effects");
        let sql = sqlx::AssertSqlSafe(sql);
        Ok(match self {
            Effects::Pg(p) => {
                sqlx::query_as::<_, (String, i64, String, i32, i32)>(sql)
                    .fetch_all(p)
                    .await?
            }
            Effects::My(p) => {
                sqlx::query_as::<_, (String, i64, String, i32, i32)>(sql)
                    .fetch_all(p)
                    .await?
            }
        }
        .into_iter()
        .map(|(k, e, r, u, a)| (k, e as u64, r, u != 0, a != 0))
        .collect())
    }

    /// (key, state) of every record in idem's table.
    async fn records(&self, table: &str) -> Result<Vec<(String, String)>, sqlx::Error> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT `key`, state FROM {table}"));
        let rows: Vec<(Vec<u8>, String)> = match self {
            Effects::Pg(p) => {
                let sql = sqlx::AssertSqlSafe(format!("SELECT key, state FROM {table}"));
                sqlx::query_as(sql).fetch_all(p).await?
            }
            Effects::My(p) => sqlx::query_as(sql).fetch_all(p).await?,
        };
        Ok(rows
            .into_iter()
            .map(|(k, s)| (String::from_utf8_lossy(&k).into_owned(), s))
            .collect())
    }
}

// ---------------------------------------------------------------------------------------
// Replica mode.

#[derive(Clone)]
struct App {
    idem: Idem,
    effects: Effects,
    table: Arc<str>,
    name: Arc<str>,
    body: Duration,
}

/// Where a body says which execution it was, for the code around the call.
type ExecSlot = Arc<Mutex<Option<u64>>>;

async fn execute(app: &App, key: &str, slot: &ExecSlot) -> Result<u64, Error> {
    let exec = fastrand::u64(1..i64::MAX as u64);
    *slot.lock().expect("slot") = Some(exec);
    app.effects
        .executed(&app.table, key, exec, &app.name)
        .await
        .map_err(|e| Error::Config(format!("effects: {e}")))?;
    tokio::time::sleep(app.body).await;
    Ok(exec)
}

#[idempotent(key = key, runtime = &app.idem, skip(app, slot))]
async fn charge(app: &App, key: &str, slot: &ExecSlot) -> Result<u64, Error> {
    execute(app, key, slot).await
}

/// One body execution: key, exec id, replica incarnation, marked unrecorded, answered.
type Execution = (String, u64, String, bool, bool);

/// `POST /attr/{key}`: the attribute.
async fn by_attribute(State(app): State<App>, Path(key): Path<String>) -> Response {
    let slot = ExecSlot::default();
    let got = charge(&app, &key, &slot).await;
    let ran = *slot.lock().expect("slot");
    if let Some(exec) = ran {
        let _ = app.effects.answered(&app.table, exec).await;
    }
    match got {
        Ok(exec) => (StatusCode::OK, exec.to_string()).into_response(),
        Err(e) => {
            let ran = *slot.lock().expect("slot");
            if let Some(exec) = ran {
                let _ = app.effects.unrecorded(&app.table, exec).await;
            }
            let status =
                StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (status, e.to_string()).into_response()
        }
    }
}

/// `POST /layer`: a route behind `IdempotencyLayer`.
async fn by_layer(State(app): State<App>, headers: HeaderMap, request: Request) -> Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let slot = request
        .extensions()
        .get::<ExecSlot>()
        .cloned()
        .unwrap_or_default();
    match execute(&app, &key, &slot).await {
        Ok(exec) => (StatusCode::CREATED, exec.to_string()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Outside the layer: a route execution whose response the layer did not deliver as the
/// answer (it could not record it) is marked unrecorded.
async fn watch_layer(State(app): State<App>, mut request: Request, next: Next) -> Response {
    let slot = ExecSlot::default();
    request.extensions_mut().insert(slot.clone());
    let response = next.run(request).await;
    let ran = *slot.lock().expect("slot");
    if let Some(exec) = ran {
        if !response.status().is_success() {
            let _ = app.effects.unrecorded(&app.table, exec).await;
        }
        let _ = app.effects.answered(&app.table, exec).await;
    }
    response
}

async fn replica(o: Opts) -> Result<(), BoxError> {
    let lease = Duration::from_millis(o.lease_ms);
    let idem = if o.via.starts_with("mysql") {
        let options = MySqlStoreOptions::new().table(&o.table).max_connections(8);
        Idem::builder().store(MySqlStore::connect_with(&o.via, options).await?)
    } else {
        let options = PgStoreOptions::new().table(&o.table).max_connections(8);
        Idem::builder().store(PgStore::connect_with(&o.via, options).await?)
    }
    .default_lease(lease)
    .default_wait(Duration::from_secs(2))
    .store_timeout(Duration::from_secs(2))
    .executor_id(o.name.clone())
    .purge_interval(Some(Duration::from_secs(2)))
    .build()?;
    let app = App {
        idem: idem.clone(),
        effects: Effects::connect(&o.store).await?,
        table: o.table.as_str().into(),
        name: o.name.as_str().into(),
        body: Duration::from_millis(o.body_ms),
    };
    let layered = axum::Router::new()
        .route("/layer", post(by_layer))
        .layer(
            IdempotencyLayer::new(idem)
                .lease(lease)
                .wait(Duration::from_secs(2)),
        )
        .layer(middleware::from_fn_with_state(app.clone(), watch_layer));
    let router = axum::Router::new()
        .route("/attr/{key}", post(by_attribute))
        .merge(layered)
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", o.port)).await?;
    println!("ready");
    axum::serve(listener, router).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Controller mode.

/// One replica slot: its port, its current process and incarnation name.
struct Slot {
    port: u16,
    child: Child,
    name: String,
}

fn spawn_replica(o: &Opts, via: &str, port: u16, name: &str) -> Result<Child, BoxError> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("replica")
        .args([
            "--store", &o.store, "--via", via, "--table", &o.table, "--name", name,
        ])
        .args([
            "--port",
            &port.to_string(),
            "--body-ms",
            &o.body_ms.to_string(),
        ])
        .args(["--lease-ms", &o.lease_ms.to_string()])
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() != "ready" {
        let _ = child.kill();
        return Err(format!("replica {name} did not start: {line:?}").into());
    }
    Ok(child)
}

/// A free port on 127.0.0.1 (the replica in a slot keeps it across restarts).
fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One HTTP/1.1 POST, connection closed after: status and body.
async fn post_once(port: u16, path: &str, key: &str) -> Result<(u16, String), BoxError> {
    let mut stream = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await??;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nIdempotency-Key: {key}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut reply)).await??;
    let reply = String::from_utf8_lossy(&reply);
    let (head, body) = reply.split_once("\r\n\r\n").ok_or("no header end")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status")?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((
        status,
        if chunked {
            dechunk(body)?
        } else {
            body.to_string()
        },
    ))
}

/// A chunked body's content.
fn dechunk(mut rest: &str) -> Result<String, BoxError> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").ok_or("bad chunk")?;
        let size = usize::from_str_radix(size.trim(), 16)?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(after.get(..size).ok_or("short chunk")?);
        rest = after.get(size + 2..).ok_or("short chunk")?;
    }
}

#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    sends: AtomicU64,
    refused: AtomicU64,
    statuses: Mutex<BTreeMap<u16, u64>>,
    /// Per key: every answer, and how long the request took (first send to first answer).
    answers: Mutex<HashMap<String, Vec<String>>>,
    latencies: Mutex<Vec<Duration>>,
    unanswered: Mutex<Vec<String>>,
}

/// Sends one key until it gets a 2xx, retrying with backoff, until `deadline`.
async fn send_until_answered(
    ports: Arc<Vec<u16>>,
    path: String,
    key: String,
    tally: Arc<Tally>,
    deadline: Instant,
) -> Option<String> {
    let mut pause = Duration::from_millis(20);
    while Instant::now() < deadline {
        let port = ports[fastrand::usize(..ports.len())];
        tally.sends.fetch_add(1, Relaxed);
        match post_once(port, &path, &key).await {
            Ok((status, body)) => {
                *tally
                    .statuses
                    .lock()
                    .expect("tally")
                    .entry(status)
                    .or_default() += 1;
                if (200..300).contains(&status) {
                    return Some(body);
                }
            }
            Err(_) => {
                tally.refused.fetch_add(1, Relaxed);
            }
        }
        tokio::time::sleep(pause.mul_f64(fastrand::f64() + 0.5)).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
    None
}

async fn client(
    run: Arc<str>,
    next: Arc<AtomicU64>,
    ports: Arc<Vec<u16>>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    drain: Duration,
) {
    while !stop.load(Relaxed) {
        let n = next.fetch_add(1, Relaxed);
        let key = format!("{run}-{n}");
        let path = if n.is_multiple_of(2) {
            "/layer".to_string()
        } else {
            format!("/attr/{key}")
        };
        tally.requests.fetch_add(1, Relaxed);
        let started = Instant::now();
        // Two senders at once: a duplicate from the start.
        let deadline = Instant::now() + drain;
        let (a, b) = tokio::join!(
            send_until_answered(
                ports.clone(),
                path.clone(),
                key.clone(),
                tally.clone(),
                deadline
            ),
            send_until_answered(ports.clone(), path, key.clone(), tally.clone(), deadline),
        );
        let got: Vec<String> = [a, b].into_iter().flatten().collect();
        if got.len() < 2 {
            tally.unanswered.lock().expect("tally").push(key.clone());
        }
        if !got.is_empty() {
            tally
                .latencies
                .lock()
                .expect("tally")
                .push(started.elapsed());
            tally
                .answers
                .lock()
                .expect("tally")
                .entry(key)
                .or_default()
                .extend(got);
        }
    }
}

async fn controller(o: Opts) -> Result<bool, BoxError> {
    let effects = Effects::connect(&o.store).await?;
    let backend = if o.store.starts_with("mysql") {
        "MariaDB/MySQL"
    } else {
        "PostgreSQL"
    };
    effects
        .run(format!(
            "CREATE TABLE IF NOT EXISTS {}_effects (k VARCHAR(64) NOT NULL, exec BIGINT NOT NULL PRIMARY KEY, replica VARCHAR(64) NOT NULL, unrecorded INT NOT NULL, answered INT NOT NULL DEFAULT 0)",
            o.table
        ))
        .await?;
    let hostport = o
        .store
        .split_once("://")
        .and_then(|(_, r)| r.split('/').next())
        .map(|a| a.rsplit('@').next().unwrap_or(a).to_string())
        .ok_or("store URL without host")?;
    let upstream = tokio::net::lookup_host(&hostport)
        .await?
        .next()
        .ok_or("no address")?;
    let proxy = proxy::Proxy::start(upstream).await;
    let via = {
        let (scheme, rest) = o.store.split_once("://").ok_or("URL without scheme")?;
        let (auth, tail) = rest.split_once('/').unwrap_or((rest, ""));
        let user = auth
            .rsplit_once('@')
            .map(|(u, _)| format!("{u}@"))
            .unwrap_or_default();
        format!("{scheme}://{user}{}/{tail}", proxy.addr)
    };

    let mut slots = Vec::new();
    for i in 0..o.replicas {
        let port = free_port()?;
        let name = format!("r{i}-0");
        slots.push(Slot {
            port,
            child: spawn_replica(&o, &via, port, &name)?,
            name,
        });
    }
    let ports = Arc::new(slots.iter().map(|s| s.port).collect::<Vec<_>>());
    let run: Arc<str> = format!("{:08x}", fastrand::u32(..)).into();
    let (stop, next, tally) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(Tally::default()),
    );
    let drain = Duration::from_millis(o.lease_ms * 4) + Duration::from_secs(30);
    let clients: Vec<_> = (0..o.clients)
        .map(|_| {
            tokio::spawn(client(
                run.clone(),
                next.clone(),
                ports.clone(),
                stop.clone(),
                tally.clone(),
                drain,
            ))
        })
        .collect();

    // The chaos: kills and restarts, connection cuts.
    let started = Instant::now();
    let end = started + Duration::from_secs(o.seconds);
    let (mut kills, mut cuts, mut killed) = (0u64, 0u64, HashSet::new());
    let (mut next_kill, mut next_cut) = (
        started + Duration::from_millis(o.kill_every_ms),
        started + Duration::from_millis(o.cut_every_ms),
    );
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = Instant::now();
        if o.kill_every_ms > 0 && now >= next_kill {
            next_kill = now + Duration::from_millis(o.kill_every_ms);
            let i = fastrand::usize(..slots.len());
            let slot = &mut slots[i];
            slot.child.kill()?; // SIGKILL
            slot.child.wait()?;
            killed.insert(slot.name.clone());
            kills += 1;
            slot.name = format!("r{i}-{kills}");
            let (via, port, name, o2) = (via.clone(), slot.port, slot.name.clone(), o.clone());
            slot.child = tokio::task::spawn_blocking(move || {
                spawn_replica(&o2, &via, port, &name).map_err(|e| e.to_string())
            })
            .await??;
        }
        if o.cut_every_ms > 0 && now >= next_cut {
            next_cut = now + Duration::from_millis(o.cut_every_ms);
            proxy.cut().await;
            cuts += 1;
            tokio::time::sleep(Duration::from_millis(fastrand::u64(200..1_000))).await;
            proxy.restore();
        }
    }
    stop.store(true, Relaxed);
    for c in clients {
        c.await?;
    }
    let elapsed = started.elapsed();
    // Every request is answered: wait out the leases, then read what happened.
    tokio::time::sleep(Duration::from_millis(o.lease_ms)).await;
    for slot in &mut slots {
        let _ = slot.child.kill();
        let _ = slot.child.wait();
    }

    let execs = effects.all(&o.table).await?;
    let records = effects.records(&o.table).await?;
    let answers = std::mem::take(&mut *tally.answers.lock().expect("tally"));
    let mut violations: Vec<String> = tally
        .unanswered
        .lock()
        .expect("tally")
        .iter()
        .map(|k| format!("{k}: a sender got no answer before its deadline"))
        .collect();
    let mut by_key: HashMap<&str, Vec<&Execution>> = HashMap::new();
    for e in &execs {
        by_key.entry(e.0.as_str()).or_default().push(e);
    }
    let mut states: HashMap<&str, Vec<&str>> = HashMap::new();
    for (k, s) in &records {
        states.entry(k.as_str()).or_default().push(s.as_str());
    }
    let (mut reexec_kill, mut reexec_unrecorded) = (0u64, 0u64);
    for (key, got) in &answers {
        let first = &got[0];
        if got.iter().any(|g| g != first) {
            violations.push(format!("{key}: different answers {got:?}"));
        }
        let answer: u64 = first.trim().parse().unwrap_or(0);
        let ran = by_key.get(key.as_str()).cloned().unwrap_or_default();
        if !ran.iter().any(|e| e.1 == answer) {
            violations.push(format!("{key}: the answer {answer} is no execution"));
        }
        if states.get(key.as_str()).map(Vec::as_slice) != Some(&["completed"][..]) {
            violations.push(format!(
                "{key}: records {:?}, not one completed",
                states.get(key.as_str())
            ));
        }
        for e in ran.iter().filter(|e| e.1 != answer) {
            // Excused by a kill only if the killed replica never answered it: it was in flight.
            if killed.contains(&e.2) && !e.4 {
                reexec_kill += 1;
            } else if e.3 {
                reexec_unrecorded += 1;
            } else {
                violations.push(format!(
                    "{key}: execution {} on {} ran again, with no kill or outage to explain it",
                    e.1, e.2
                ));
            }
        }
    }
    let in_progress = records.iter().filter(|(_, s)| s == "in_progress").count();
    if in_progress > 0 {
        violations.push(format!(
            "{in_progress} records still in progress after every request was answered"
        ));
    }

    let mut lat = std::mem::take(&mut *tally.latencies.lock().expect("tally"));
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or_default()
    };
    let statuses = tally.statuses.lock().expect("tally").clone();
    println!(
        "chaos soak on {backend}: {} replicas, {} clients x 2 senders, {:.0} s",
        o.replicas,
        o.clients,
        elapsed.as_secs_f64()
    );
    println!(
        "  requests (keys): {}, answered: {}",
        tally.requests.load(Relaxed),
        answers.len()
    );
    println!(
        "  HTTP sends: {}, refused or cut: {}, statuses: {statuses:?}",
        tally.sends.load(Relaxed),
        tally.refused.load(Relaxed)
    );
    println!("  SIGKILLs: {kills}, database cuts: {cuts}");
    println!(
        "  executions: {}, re-executions: {} after a kill, {} after an unrecorded result",
        execs.len(),
        reexec_kill,
        reexec_unrecorded
    );
    println!(
        "  time to answer: p50 {:?}, p99 {:?}, max {:?}",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    println!("  invariant violations: {}", violations.len());
    for v in violations.iter().take(20) {
        println!("    {v}");
    }
    let _ = effects
        .run(format!("DROP TABLE IF EXISTS {}_effects", o.table))
        .await;
    let _ = effects
        .run(format!("DROP TABLE IF EXISTS {}", o.table))
        .await;
    Ok(violations.is_empty())
}
