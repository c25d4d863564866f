//! Queue consumers on real brokers, SIGKILLed and redelivered: effectively once.
//!
//! Each test publishes `MESSAGES` order messages, each with its id, to a NATS JetStream
//! stream or a RabbitMQ queue of its own, and keeps three consumer processes running (the
//! `nats` or `rabbitmq` example in `worker` mode). Each worker is told a random point at
//! which to stop, where it prints `HANG`; the test SIGKILLs it there and starts a fresh one:
//! between the effect and the commit, between the commit and the ack, and, for the leased
//! email consumer, between the provider's send and idem's record. The workers also send
//! committed messages back on purpose (JetStream: a nak, or no ack until the one-second ack
//! wait runs out; RabbitMQ: a nack with requeue, or their channel closed), and SIGKILLed
//! workers leave their unacked messages to be redelivered. When the kills are done and the
//! workers have gone idle, a publisher reuses a message's id for another body, and a last
//! worker sweeps the broker. Two more messages are unusable from the start (no id; a body
//! that is not an order). Afterwards:
//!
//! - the kills happened: three at each point, and each killed worker's message was
//!   redelivered (and, killed after its commit, answered by a replay);
//! - orders (`tx = ..`): exactly one row per message, holding the answer (the order number)
//!   that every delivery of the message was given;
//! - emails (leased, chained provider key): exactly one email per message at the provider,
//!   whose id every delivery was given, and as many provider calls as messages plus the
//!   re-runs the kills between the send and the record explain (and the failures that may
//!   leave a run unrecorded), no more: fewer calls than deliveries;
//! - one committed execution per message, every idem record completed (none left in
//!   progress), and nothing left in the broker;
//! - the three unusable messages terminated (rejected without requeue on RabbitMQ), each
//!   for its reason, and nothing else.
//!
//! The workers are the examples' binaries as built from this tree (`support::example_binary`
//! builds them when a source is newer). The test's stream or queue and tables are removed
//! when it ends, passed or failed.
//!
//! Runs on both brokers, on PostgreSQL, MariaDB and SQLite. Outside CI, a broker or database
//! server that is not running makes the test say it was skipped; with `CI=true` it fails.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

const MESSAGES: u64 = 120;
const WORKERS: usize = 3;
/// JetStream redelivers a message that was not acked within this.
const ACK_WAIT: Duration = Duration::from_secs(1);
/// The share of committed messages a worker sends back instead of acking.
const REDELIVER_RATE: &str = "0.1";
/// SIGKILLs at each of a role's two kill points.
const KILLS_AT_EACH_POINT: usize = 3;

#[derive(Clone, Copy, PartialEq)]
enum Broker {
    Nats,
    RabbitMq,
}

#[derive(Clone, Copy, PartialEq)]
enum Role {
    /// An order row per message, `#[idempotent(tx = tx)]`.
    Orders,
    /// A confirmation email per message, leased, with a chained provider key.
    Emails,
}

impl Role {
    /// Where its workers are SIGKILLed.
    fn kill_points(self) -> [&'static str; 2] {
        match self {
            Role::Orders => ["before-commit", "before-ack"],
            Role::Emails => ["before-record", "before-ack"],
        }
    }
}

/// Where the brokers and databases are (the examples' defaults, or the environment).
fn env(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

fn nats_url() -> String {
    env("IDEM_TEST_NATS_URL", "nats://127.0.0.1:4222")
}

fn amqp_url() -> String {
    env(
        "IDEM_TEST_AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    )
}

fn server_missing(what: &str, var: &str, url: &str, err: &dyn std::fmt::Display) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{what} is not reachable at {url} ({err}); CI=true requires it");
    }
    eprintln!(
        "SKIPPED: {what} is not reachable at {url} ({err}); start it (scripts/services.sh) or set {var}"
    );
}

/// One runtime per test thread: a connection opened in one runtime dies with it.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
    }
    RT.with(|rt| rt.block_on(f))
}

/// Messages no consumer can use, published after the good ones: one without an id, one
/// whose body is not an order. Each must be terminated (JetStream) or rejected without
/// requeue (RabbitMQ), once, not redelivered forever; the workers print `TERM <key> <why>`.
fn unusable() -> [(Option<String>, Vec<u8>); 2] {
    [
        (None, message(0).1),
        (Some("poison-1".into()), b"not json".to_vec()),
    ]
}

/// A copy of message 1 with another body: a publisher that reused an id. Published before
/// the sweep, when message 1 is long done, it must be refused by idem (`PayloadMismatch`),
/// and terminated, not answered with message 1's result nor redelivered forever.
fn conflicting_copy() -> (Option<String>, Vec<u8>) {
    let (id, _) = message(1);
    (Some(id), message(2).1)
}

/// What the workers must have terminated: (key, reason).
fn expected_terminations() -> BTreeSet<(String, String)> {
    [
        ("-", "no-id"),
        ("id:poison-1", "not-an-order"),
        ("id:order-1", "payload_mismatch"),
    ]
    .iter()
    .map(|(k, r)| (k.to_string(), r.to_string()))
    .collect()
}

fn message(n: u64) -> (String, Vec<u8>) {
    let body = serde_json::json!({
        "order_ref": n,
        "customer": format!("customer-{}@example.com", n % 17),
        "sku": format!("sku-{}", n % 9),
        "quantity": 1 + n % 4,
    });
    (format!("order-{n}"), serde_json::to_vec(&body).unwrap())
}

/// The test's own stream and durable consumer, or queue, holding `MESSAGES` messages.
struct Queue {
    broker: Broker,
    /// NATS: the stream (the durable consumer is `worker`); RabbitMQ: the queue.
    name: String,
}

impl Queue {
    /// Creates it and publishes the messages, and the unusable ones (see [`unusable`]);
    /// `Err` when the broker is not reachable. What it created is deleted when the `Queue` is
    /// dropped, also when this fails halfway.
    fn create(broker: Broker, suffix: &str) -> Result<Queue, String> {
        let name = match broker {
            Broker::Nats => format!("IDEM_TEST_{suffix}"),
            Broker::RabbitMq => format!("idem-test-{suffix}"),
        };
        let queue = Queue { broker, name };
        match broker {
            Broker::Nats => block_on(async {
                let client = async_nats::connect(nats_url())
                    .await
                    .map_err(|e| e.to_string())?;
                let js = jetstream::new(client.clone());
                let stream = js
                    .create_stream(jetstream::stream::Config {
                        name: queue.name.clone(),
                        subjects: vec![queue.subject()],
                        storage: jetstream::stream::StorageType::Memory,
                        // A short duplicate window, so that the copy `publish_conflict`
                        // sends is stored, as a publisher's late copy past the window is.
                        duplicate_window: Duration::from_secs(1),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                stream
                    .create_consumer(pull::Config {
                        durable_name: Some("worker".into()),
                        ack_policy: jetstream::consumer::AckPolicy::Explicit,
                        ack_wait: ACK_WAIT,
                        max_ack_pending: 64,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                Ok::<_, String>(())
            })?,
            Broker::RabbitMq => block_on(async {
                let conn = amqp().await?;
                let channel = conn.create_channel().await.unwrap();
                channel
                    .queue_declare(
                        queue.name.as_str().into(),
                        QueueDeclareOptions::durable(),
                        FieldTable::default(),
                    )
                    .await
                    .unwrap();
                conn.close(200, "declared".into()).await.unwrap();
                Ok::<_, String>(())
            })?,
        }
        let mut messages: Vec<_> = (1..=MESSAGES)
            .map(|n| {
                let (id, body) = message(n);
                (Some(id), body)
            })
            .collect();
        messages.extend(unusable());
        queue.publish(&messages);
        Ok(queue)
    }

    fn subject(&self) -> String {
        format!("idem.test.{}", self.name)
    }

    /// Publishes each `(id, body)`, waiting for the broker's confirm.
    fn publish(&self, messages: &[(Option<String>, Vec<u8>)]) {
        block_on(async {
            match self.broker {
                Broker::Nats => {
                    let client = async_nats::connect(nats_url()).await.unwrap();
                    let js = jetstream::new(client.clone());
                    for (id, body) in messages {
                        let mut publish = jetstream::message::PublishMessage::build();
                        if let Some(id) = id {
                            publish = publish.message_id(id);
                        }
                        js.send_publish(self.subject(), publish.payload(body.clone().into()))
                            .await
                            .unwrap()
                            .await
                            .unwrap();
                    }
                    client.flush().await.unwrap();
                }
                Broker::RabbitMq => {
                    let conn = amqp().await.unwrap();
                    let channel = conn.create_channel().await.unwrap();
                    channel
                        .confirm_select(ConfirmSelectOptions::default())
                        .await
                        .unwrap();
                    for (id, body) in messages {
                        let mut properties =
                            lapin::BasicProperties::default().with_delivery_mode(2);
                        if let Some(id) = id {
                            properties = properties.with_message_id(id.as_str().into());
                        }
                        let confirm = channel
                            .basic_publish(
                                "".into(),
                                self.name.as_str().into(),
                                BasicPublishOptions::default(),
                                body,
                                properties,
                            )
                            .await
                            .unwrap()
                            .await
                            .unwrap();
                        assert!(confirm.is_ack(), "RabbitMQ refused a message");
                    }
                    conn.close(200, "published".into()).await.unwrap();
                }
            }
        })
    }

    fn worker_args(&self) -> Vec<String> {
        match self.broker {
            Broker::Nats => [
                "--stream",
                &self.name,
                "--consumer",
                "worker",
                "--nats",
                &nats_url(),
            ]
            .map(String::from)
            .to_vec(),
            Broker::RabbitMq => ["--queue", &self.name, "--amqp", &amqp_url()]
                .map(String::from)
                .to_vec(),
        }
    }

    /// Messages the broker still holds for a consumer: not yet delivered, or delivered and
    /// not acked.
    fn left(&self) -> u64 {
        block_on(async {
            match self.broker {
                Broker::Nats => {
                    let client = async_nats::connect(nats_url()).await.unwrap();
                    let js = jetstream::new(client);
                    let stream = js.get_stream(&self.name).await.unwrap();
                    let mut consumer: jetstream::consumer::PullConsumer =
                        stream.get_consumer("worker").await.unwrap();
                    let info = consumer.info().await.unwrap();
                    info.num_pending + info.num_ack_pending as u64
                }
                Broker::RabbitMq => {
                    // With no consumer connected, unacked messages are back in the queue.
                    let conn = amqp().await.unwrap();
                    let channel = conn.create_channel().await.unwrap();
                    let passive = QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    };
                    let q = channel
                        .queue_declare(self.name.as_str().into(), passive, FieldTable::default())
                        .await
                        .unwrap();
                    let _ = conn.close(200, "checked".into()).await;
                    u64::from(q.message_count())
                }
            }
        })
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        let name = self.name.clone();
        let broker = self.broker;
        // A thread of its own: this may run while a test thread unwinds out of `block_on`.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                match broker {
                    Broker::Nats => {
                        if let Ok(client) = async_nats::connect(nats_url()).await {
                            let _ = jetstream::new(client).delete_stream(&name).await;
                        }
                    }
                    Broker::RabbitMq => {
                        if let Ok(conn) = amqp().await {
                            if let Ok(channel) = conn.create_channel().await {
                                let _ = channel
                                    .queue_delete(name.as_str().into(), Default::default())
                                    .await;
                            }
                            let _ = conn.close(200, "cleaned up".into()).await;
                        }
                    }
                }
            });
        })
        .join();
    }
}

async fn amqp() -> Result<lapin::Connection, String> {
    lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .map_err(|e| e.to_string())
}

/// A consumer process, killed (SIGKILL) if still running when dropped.
struct Worker {
    child: Child,
    generation: u64,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the workers printed, across all of them.
#[derive(Default)]
struct Seen {
    deliveries: usize,
    redeliveries: usize,
    replays: usize,
    /// message -> every answer printed for it.
    answers: BTreeMap<String, BTreeSet<String>>,
    /// message -> deliveries that ran the body and committed (not replays).
    executions: BTreeMap<String, usize>,
    /// Messages delivered again (a `GOT` flagged as a redelivery).
    redelivered: BTreeSet<String>,
    /// Messages answered by a replay at least once.
    replayed: BTreeSet<String>,
    /// Kills: (the point the worker stopped at, the message it was handling).
    kills: Vec<(String, String)>,
    /// Messages terminated, and why.
    terminated: BTreeSet<(String, String)>,
    /// Transient failures (the message was sent back), by kind.
    failures: BTreeMap<String, usize>,
}

impl Seen {
    fn read(&mut self, line: &str) {
        let mut parts = line.split_whitespace();
        match parts.next() {
            Some("GOT") => {
                let (key, again) = (parts.next().unwrap(), parts.next() == Some("1"));
                self.deliveries += 1;
                if again {
                    self.redeliveries += 1;
                    self.redelivered.insert(key.to_string());
                }
            }
            Some("DONE") => {
                let (key, answer, how) = (parts.next(), parts.next(), parts.next());
                let (key, answer, how) = (key.unwrap(), answer.unwrap(), how.unwrap());
                self.answers
                    .entry(key.to_string())
                    .or_default()
                    .insert(answer.to_string());
                if how == "replayed" || how == "waited" {
                    self.replays += 1;
                    self.replayed.insert(key.to_string());
                } else {
                    *self.executions.entry(key.to_string()).or_default() += 1;
                }
            }
            Some("TERM") => {
                let (key, why) = (parts.next().unwrap(), parts.next().unwrap());
                self.terminated.insert((key.to_string(), why.to_string()));
            }
            Some("ERR") => {
                let kind = parts.nth(1).unwrap();
                *self.failures.entry(kind.to_string()).or_default() += 1;
            }
            Some("HANG") => {
                let (key, point) = (parts.next().unwrap(), parts.next().unwrap());
                self.kills.push((point.to_string(), key.to_string()));
            }
            _ => {}
        }
    }

    fn kills_at(&self, point: &str) -> usize {
        self.kills.iter().filter(|(p, _)| p == point).count()
    }

    fn kills_by_point(&self) -> BTreeMap<&str, usize> {
        let mut by = BTreeMap::new();
        for (p, _) in &self.kills {
            *by.entry(p.as_str()).or_default() += 1;
        }
        by
    }
}

/// Runs the workers: three at a time, each with the next stop of `plan` until it runs out,
/// SIGKILLed where they stop and replaced, until all are idle; then one last sweep.
fn run_workers(queue: &Queue, base: &[String], plan: &[(&str, u64)], seed: u64) -> Seen {
    let bin = support::example_binary(match queue.broker {
        Broker::Nats => "nats",
        Broker::RabbitMq => "rabbitmq",
    });
    let (events, rx) = mpsc::channel::<(usize, u64, String)>();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut generation = 0;
    let mut spawn = |slot: usize, hang: Option<(&str, u64)>, redeliver: bool| {
        generation += 1;
        let mut cmd = Command::new(&bin);
        cmd.arg("worker").args(base).args(queue.worker_args());
        cmd.args(["--seed", &rng.u64(..).to_string()]);
        if redeliver {
            cmd.args(["--redeliver-rate", REDELIVER_RATE]);
        }
        if let Some((point, n)) = hang {
            cmd.args(["--hang", &format!("{point}:{n}")]);
        }
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let events = events.clone();
        let g = generation;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = events.send((slot, g, line));
            }
            let _ = events.send((slot, g, "EXIT".into()));
        });
        Worker {
            child,
            generation: g,
        }
    };

    let mut seen = Seen::default();
    // A guard against a run that never ends (workers failing the same messages over and
    // over keep printing), not a measure of speed: a run takes seconds.
    let deadline = Instant::now() + Duration::from_secs(180);
    let unfinished = |seen: &Seen| {
        format!(
            "the workers did not finish in 180 s: {} of {MESSAGES} messages answered",
            seen.answers.len()
        )
    };
    let mut plan = plan.iter().copied();
    let mut slots: Vec<Option<Worker>> = (0..WORKERS)
        .map(|slot| Some(spawn(slot, plan.next(), true)))
        .collect();
    while slots.iter().any(Option::is_some) {
        assert!(Instant::now() < deadline, "{}", unfinished(&seen));
        let (slot, generation, line) = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no worker printed anything for 60 s"));
        let Some(worker) = slots[slot].as_mut() else {
            continue;
        };
        if worker.generation != generation {
            continue; // a killed worker's last words
        }
        seen.read(&line);
        if line.starts_with("HANG") {
            worker.child.kill().unwrap(); // SIGKILL, right where it stopped
            worker.child.wait().unwrap();
            slots[slot] = Some(spawn(slot, plan.next(), true));
        } else if line == "EXIT" {
            let status = worker.child.wait().unwrap();
            assert!(status.success(), "worker {slot} failed: {status}");
            slots[slot] = None;
        }
    }
    assert!(plan.next().is_none(), "every planned kill happened");

    // The sweep: one worker, no faults, alone on the queue; whatever it finds is redelivered
    // to it, and it leaves once nothing has come for a while. Before it starts, a publisher
    // reuses message 1's id for another body.
    queue.publish(&[conflicting_copy()]);
    let sweeper = spawn(0, None, false);
    loop {
        assert!(Instant::now() < deadline, "{}", unfinished(&seen));
        let (_, generation, line) = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("the sweeping worker printed nothing for 60 s"));
        if generation != sweeper.generation {
            continue;
        }
        seen.read(&line);
        if line == "EXIT" {
            break;
        }
    }
    let mut sweeper = sweeper;
    let status = sweeper.child.wait().unwrap();
    assert!(status.success(), "the sweeping worker failed: {status}");
    seen
}

/// What the database held afterwards.
struct Stored {
    /// message -> order numbers in its rows (orders), or email id at the provider (emails).
    answers: BTreeMap<String, Vec<String>>,
    /// idem records: (completed, in progress).
    records: (i64, i64),
    /// Calls the provider received (emails).
    provider_calls: usize,
}

/// Reads the orders table and idem's records through `$conn` (a `&mut` connection), then
/// drops the tables.
macro_rules! read_and_drop {
    ($conn:expr, $t:expr) => {{
        use sqlx::Row;
        let conn = $conn;
        let mut answers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let q = format!("SELECT message_key, order_no FROM {}_orders", $t);
        for row in sqlx::query(sqlx::AssertSqlSafe(q))
            .fetch_all(&mut *conn)
            .await
            .unwrap()
        {
            let order_no: i64 = row.get(1);
            answers
                .entry(row.get(0))
                .or_default()
                .push(order_no.to_string());
        }
        let count = |state: &str| format!("SELECT COUNT(*) FROM {} WHERE state = '{state}'", $t);
        let completed: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(count("completed")))
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        let in_progress: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(count("in_progress")))
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        for sql in [
            format!("DROP TABLE IF EXISTS {}_orders", $t),
            format!("DROP TABLE IF EXISTS {}", $t),
            format!("DELETE FROM idem_schema WHERE table_name = '{}'", $t),
        ] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut *conn)
                .await
                .unwrap();
        }
        (answers, (completed, in_progress))
    }};
}

/// Drops a test's tables on a server database when the test ends, passed or failed.
struct Tables {
    store: String,
    table: String,
}

impl Drop for Tables {
    fn drop(&mut self) {
        let (store, t) = (self.store.clone(), self.table.clone());
        let sql = [
            format!("DROP TABLE IF EXISTS {t}_orders"),
            format!("DROP TABLE IF EXISTS {t}"),
            format!("DELETE FROM idem_schema WHERE table_name = '{t}'"),
        ];
        // A thread of its own: this may run while a test thread unwinds out of `block_on`.
        let _ = std::thread::spawn(move || {
            use sqlx::Connection;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if store.starts_with("postgres") {
                    if let Ok(mut c) = sqlx::PgConnection::connect(&store).await {
                        for q in sql {
                            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(q)).execute(&mut c).await;
                        }
                    }
                } else if store.starts_with("mysql")
                    && let Ok(mut c) = sqlx::MySqlConnection::connect(&store).await
                {
                    for q in sql {
                        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(q)).execute(&mut c).await;
                    }
                }
            });
        })
        .join();
    }
}

/// The emails the provider sent: message -> email id, and how many calls it received.
fn outbox(dir: &Path) -> (BTreeMap<String, Vec<String>>, usize) {
    let mut sent: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let Some(hex) = name.strip_suffix(".eml") else {
            continue;
        };
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let provider_key = String::from_utf8(bytes).unwrap();
        let key = provider_key
            .strip_suffix(":confirmation")
            .unwrap_or_else(|| panic!("an email under an unchained key {provider_key:?}"))
            .to_string();
        let email = std::fs::read_to_string(dir.join(&name)).unwrap();
        let id = email.lines().next().unwrap().to_string();
        sent.entry(key).or_default().push(id);
    }
    let calls = std::fs::read_to_string(dir.join("calls.log"))
        .map(|log| log.lines().count())
        .unwrap_or(0);
    (sent, calls)
}

#[derive(Clone, Copy)]
enum Database {
    Postgres,
    MariaDb,
    Sqlite,
}

/// One test: `role` consumers on `broker`, with idem (and the orders) on `db`.
fn consumers_survive_kills(broker: Broker, db: Database, role: Role) {
    let start = Instant::now();
    let suffix = format!("{:08x}", fastrand::u32(..));
    let dir = tempfile::tempdir().unwrap();
    let store = match db {
        Database::Postgres => env(
            "IDEM_TEST_POSTGRES_URL",
            "postgres://postgres@127.0.0.1:5432/test",
        ),
        Database::MariaDb => env("IDEM_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test"),
        Database::Sqlite => format!("sqlite://{}", dir.path().join("idem.db").display()),
    };
    // The database is reachable (or the test is skipped), and stays connected for the end.
    let mut pg = None;
    let mut my = None;
    {
        use sqlx::Connection;
        match db {
            Database::Postgres => match block_on(sqlx::PgConnection::connect(&store)) {
                Ok(c) => pg = Some(c),
                Err(e) => {
                    return server_missing("PostgreSQL", "IDEM_TEST_POSTGRES_URL", &store, &e);
                }
            },
            Database::MariaDb => match block_on(sqlx::MySqlConnection::connect(&store)) {
                Ok(c) => my = Some(c),
                Err(e) => {
                    return server_missing("MySQL/MariaDB", "IDEM_TEST_MYSQL_URL", &store, &e);
                }
            },
            Database::Sqlite => {}
        }
    }
    let queue = match Queue::create(broker, &suffix) {
        Ok(q) => q,
        Err(e) => {
            return match broker {
                Broker::Nats => {
                    server_missing("NATS JetStream", "IDEM_TEST_NATS_URL", &nats_url(), &e)
                }
                Broker::RabbitMq => {
                    server_missing("RabbitMQ", "IDEM_TEST_AMQP_URL", &amqp_url(), &e)
                }
            };
        }
    };

    let table = format!("idem_queue_{suffix}");
    let outbox_dir = dir.path().join("outbox");
    let mut base: Vec<String> = ["--store", &store, "--table", &table]
        .iter()
        .map(|a| a.to_string())
        .collect();
    base.extend(["--lease-ms".into(), "1000".into()]);
    let points = role.kill_points();
    match role {
        Role::Orders => base.extend(["--role".into(), "orders".into()]),
        Role::Emails => {
            base.extend(["--role".into(), "emails".into()]);
            base.extend(["--outbox".into(), outbox_dir.display().to_string()]);
        }
    }
    let seed = std::env::var("IDEM_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    // Three kills at each point, each after a random number of messages.
    let plan: Vec<(&str, u64)> = (0..2 * KILLS_AT_EACH_POINT)
        .map(|i| (points[i % 2], rng.u64(1..=5)))
        .collect();

    let _tables = Tables {
        store: store.clone(),
        table: table.clone(),
    };
    let seen = run_workers(&queue, &base, &plan, seed);
    let left = queue.left();
    drop(queue);

    let (mut stored, records) = match db {
        Database::Postgres => block_on(async { read_and_drop!(pg.as_mut().unwrap(), table) }),
        Database::MariaDb => block_on(async { read_and_drop!(my.as_mut().unwrap(), table) }),
        Database::Sqlite => {
            use sqlx::Connection;
            let mut c = block_on(sqlx::SqliteConnection::connect(&store)).unwrap();
            block_on(async { read_and_drop!(&mut c, table) })
        }
    };
    let mut provider_calls = 0;
    if role == Role::Emails {
        let (sent, calls) = outbox(&outbox_dir);
        assert!(stored.is_empty(), "the emails consumer wrote no order rows");
        stored = sent;
        provider_calls = calls;
    }
    let stored = Stored {
        answers: stored,
        records,
        provider_calls,
    };
    report_and_check(broker, db, role, seed, start, &seen, &stored, left);
}

#[allow(clippy::too_many_arguments)]
fn report_and_check(
    broker: Broker,
    db: Database,
    role: Role,
    seed: u64,
    start: Instant,
    seen: &Seen,
    stored: &Stored,
    left: u64,
) {
    let what = format!(
        "{}/{}/{}",
        match broker {
            Broker::Nats => "nats",
            Broker::RabbitMq => "rabbitmq",
        },
        match db {
            Database::Postgres => "postgres",
            Database::MariaDb => "mariadb",
            Database::Sqlite => "sqlite",
        },
        match role {
            Role::Orders => "orders",
            Role::Emails => "emails",
        }
    );
    let effects: usize = stored.answers.values().map(Vec::len).sum();
    println!(
        "{what} (seed {seed}): {MESSAGES} messages, {} SIGKILLs {:?}, {} deliveries ({} redelivered), \
         {} answered by a replay, {} committed executions, {effects} {}{}, {} terminated, \
         transient failures {:?}, {left} left in the broker, {:.1} s",
        seen.kills.len(),
        seen.kills_by_point(),
        seen.deliveries,
        seen.redeliveries,
        seen.replays,
        seen.executions.values().sum::<usize>(),
        if role == Role::Orders {
            "order rows"
        } else {
            "emails sent"
        },
        if role == Role::Emails {
            format!(" ({} provider calls)", stored.provider_calls)
        } else {
            String::new()
        },
        seen.terminated.len(),
        seen.failures,
        start.elapsed().as_secs_f64(),
    );
    let kills_at = |p: &str| seen.kills_at(p);
    // The kills happened: a run that killed nothing would prove nothing.
    for point in role.kill_points() {
        assert_eq!(
            kills_at(point),
            KILLS_AT_EACH_POINT,
            "{what}: SIGKILLs {point} (the plan asks for {KILLS_AT_EACH_POINT})"
        );
    }
    // And each killed worker's message came back, as a redelivery, to another worker.
    for (point, key) in &seen.kills {
        assert!(
            seen.redelivered.contains(key),
            "{what}: message {key}, whose worker was killed {point}, was not redelivered"
        );
        if point == "before-ack" {
            assert!(
                seen.replayed.contains(key),
                "{what}: message {key}, whose worker was killed after its commit, was not answered by a replay"
            );
        }
    }
    assert!(
        seen.redeliveries >= seen.kills.len(),
        "{what}: the broker redelivered ({} redeliveries)",
        seen.redeliveries
    );
    assert_eq!(
        seen.terminated,
        expected_terminations(),
        "{what}: the unusable messages (no id, not an order, an id reused with another body) were terminated, and nothing else"
    );
    assert_eq!(
        stored.answers.len() as u64,
        MESSAGES,
        "{what}: every message has its effect"
    );
    for (key, effects) in &stored.answers {
        assert_eq!(
            effects.len(),
            1,
            "{what}: message {key} took effect {effects:?}"
        );
        let answered = seen.answers.get(key);
        assert_eq!(
            answered.map(|a| a.iter().collect::<Vec<_>>()),
            Some(vec![&effects[0]]),
            "{what}: message {key} was answered with something other than its committed effect"
        );
    }
    for (key, n) in &seen.executions {
        assert_eq!(
            *n, 1,
            "{what}: message {key} was executed and committed {n} times"
        );
    }
    assert_eq!(
        stored.records,
        (MESSAGES as i64, 0),
        "{what}: one completed record per message, none left in progress"
    );
    assert_eq!(left, 0, "{what}: messages left in the broker");
    if role == Role::Emails {
        // The provider drops a second send with the same key, so one email per message
        // proves nothing by itself. What idem bounds is the calls: without it every
        // delivery would call the provider. With it, a message's body runs once, again after
        // each kill between the send and the record (its lease runs out and a redelivery
        // takes it over), and again after a failure that may leave the body's run unrecorded
        // (lost lease, result not recorded), which the workers print. Nothing else.
        let reruns_allowed = kills_at("before-record")
            + ["lease_lost", "result_not_recorded"]
                .iter()
                .map(|k| seen.failures.get(*k).copied().unwrap_or(0))
                .sum::<usize>();
        assert!(
            stored.provider_calls >= MESSAGES as usize + kills_at("before-record"),
            "{what}: a body killed between the send and the record ran again ({} calls)",
            stored.provider_calls
        );
        assert!(
            stored.provider_calls <= MESSAGES as usize + reruns_allowed,
            "{what}: {} provider calls for {MESSAGES} messages; only {reruns_allowed} re-runs are explained",
            stored.provider_calls
        );
        assert!(
            seen.deliveries > stored.provider_calls,
            "{what}: redeliveries were answered without calling the provider ({} deliveries, {} calls)",
            seen.deliveries,
            stored.provider_calls
        );
    }
}

macro_rules! queue_test {
    ($name:ident, $broker:ident, $db:ident, $role:ident) => {
        #[test]
        fn $name() {
            consumers_survive_kills(Broker::$broker, Database::$db, Role::$role);
        }
    };
}

queue_test!(
    nats_postgres_orders_once_across_sigkills,
    Nats,
    Postgres,
    Orders
);
queue_test!(
    nats_sqlite_orders_once_across_sigkills,
    Nats,
    Sqlite,
    Orders
);
queue_test!(
    nats_mariadb_orders_once_across_sigkills,
    Nats,
    MariaDb,
    Orders
);
queue_test!(
    nats_sqlite_emails_once_at_the_provider_across_sigkills,
    Nats,
    Sqlite,
    Emails
);
queue_test!(
    rabbitmq_postgres_orders_once_across_sigkills,
    RabbitMq,
    Postgres,
    Orders
);
queue_test!(
    rabbitmq_sqlite_orders_once_across_sigkills,
    RabbitMq,
    Sqlite,
    Orders
);
queue_test!(
    rabbitmq_mariadb_orders_once_across_sigkills,
    RabbitMq,
    MariaDb,
    Orders
);
queue_test!(
    rabbitmq_sqlite_emails_once_at_the_provider_across_sigkills,
    RabbitMq,
    Sqlite,
    Emails
);
