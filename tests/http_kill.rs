//! Exactly once for an HTTP route's rows, under real crashes.
//!
//! The `http` example serves `POST /payments` under the transactional layer: each payment is
//! a ledger row written in the layer's transaction, committed with the recorded response.
//! The test drives it with a real HTTP client, several payments at once, each route pausing
//! after its insert, and SIGKILLs the server process at a random moment, many times; each
//! restart is sent every payment that has no answer yet again (with the same key), as a
//! client would. Afterwards every payment has been answered, every answer a payment ever got
//! is the same one, and the ledger holds exactly one row per payment: as many rows as
//! completed records.
//!
//! Runs on PostgreSQL, MariaDB (skipped, loudly, without them unless `CI=true`) and SQLite.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// SIGKILLs, each after a new batch of payments was sent.
const KILLS: usize = 10;
/// New payments per round.
const PER_ROUND: usize = 5;

fn example_binary() -> PathBuf {
    // Built here if a source is newer than the binary: never a stale one.
    support::example_binary("http")
}

/// The demo server, on a port of its own.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(db: &str, prefix: &str) -> Server {
        let mut child = Command::new(example_binary())
            .arg(db)
            .env("IDEM_DEMO_ADDR", "127.0.0.1:0")
            .env("IDEM_DEMO_LOSSY_ADDR", "127.0.0.1:0")
            .env("IDEM_DEMO_PREFIX", prefix)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("orders service on ") {
                    let url = rest.split_whitespace().next().unwrap().to_owned();
                    let _ = tx.send(url);
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the demo server did not start");
        Server { child, url }
    }

    fn kill(&mut self) {
        self.child.kill().unwrap(); // SIGKILL: no transaction in flight commits
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    /// A test that fails leaves no server behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One payment: its key, its body and how long its route pauses after the insert.
#[derive(Clone)]
struct Payment {
    key: String,
    body: String,
    delay_ms: u64,
}

/// Sends `payment`; its answer if the server gave one before it died.
async fn send(client: &reqwest::Client, url: &str, p: &Payment) -> Option<(u16, String)> {
    let resp = client
        .post(format!("{url}/payments?delay_ms={}", p.delay_ms))
        .header("Idempotency-Key", &p.key)
        .header("X-Api-Key", "kill-test")
        .header("Content-Type", "application/json")
        .body(p.body.clone())
        .send()
        .await
        .ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.ok()?))
}

/// What the rounds saw: every 201 body each payment got, and how many requests the kills cut.
struct Seen {
    answers: BTreeMap<String, BTreeSet<String>>,
    payments: usize,
    cut: usize,
    unavailable: usize,
}

async fn crash_many_times(db: &str, prefix: &str) -> Seen {
    let client = reqwest::Client::new();
    let mut payments: Vec<Payment> = Vec::new();
    let mut answers: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let (mut cut, mut unavailable) = (0, 0);
    for round in 0..=KILLS {
        let mut server = Server::start(db, prefix);
        if round < KILLS {
            for i in 0..PER_ROUND {
                let n = payments.len();
                payments.push(Payment {
                    key: format!("pay-{round}-{i}"),
                    body: format!(r#"{{"account":"acct-{n}","amount_cents":{}}}"#, 100 + n),
                    delay_ms: fastrand::u64(20..250),
                });
            }
        }
        // Every payment without an answer yet is sent (again) in this round; the last round,
        // which nothing kills, sends every payment again, answered or not.
        let last = round == KILLS;
        let tasks: Vec<_> = payments
            .iter()
            .filter(|p| last || !answers.contains_key(&p.key))
            .map(|p| {
                let (client, url, p) = (client.clone(), server.url.clone(), p.clone());
                tokio::spawn(async move {
                    // A client retries a 503 (with `Retry-After`) with the same key; the last
                    // round, which nothing kills, keeps at it until it has an answer.
                    let mut answer = send(&client, &url, &p).await;
                    for _ in 0..50 {
                        if !last || !matches!(answer, Some((503, _))) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        answer = send(&client, &url, &p).await;
                    }
                    (p.key.clone(), answer)
                })
            })
            .collect();
        if !last {
            // The kill lands at a random moment: before, between or after the routes'
            // inserts and their commits.
            tokio::time::sleep(Duration::from_millis(fastrand::u64(10..300))).await;
            server.kill();
        }
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap());
        }
        for (key, answer) in results {
            match answer {
                Some((201, body)) => {
                    answers.entry(key).or_default().insert(body);
                }
                // The store could not serve the request (on SQLite, right after a restart,
                // a lock SQLite does not wait for): nothing was committed, and the payment is
                // sent again next round, as a client would retry it.
                Some((503, body)) if !last => {
                    assert!(body.contains("urn:idem:problem:"), "a 503 problem: {body}");
                    unavailable += 1;
                }
                Some((status, body)) => panic!("payment {key}: {status} {body}"),
                None if last => panic!("payment {key}: no answer from a server nothing killed"),
                None => cut += 1,
            }
        }
        if last {
            server.kill();
        }
    }
    Seen {
        answers,
        payments: payments.len(),
        cut,
        unavailable,
    }
}

fn check(db: &str, seen: &Seen, rows: i64, completed: i64) {
    println!(
        "{db}: {} payments over {KILLS} SIGKILLs ({} requests cut by a kill, {} answered 503 and sent again), {rows} ledger rows, {completed} completed records",
        seen.payments, seen.cut, seen.unavailable
    );
    assert!(seen.cut > 0, "the kills cut requests in flight");
    assert_eq!(
        seen.answers.len(),
        seen.payments,
        "every payment was answered"
    );
    for (key, bodies) in &seen.answers {
        assert_eq!(
            bodies.len(),
            1,
            "payment {key} was answered differently: {bodies:?}"
        );
    }
    assert_eq!(rows, seen.payments as i64, "one ledger row per payment");
    assert_eq!(rows, completed, "as many ledger rows as completed records");
}

fn prefix() -> String {
    format!("idem_httpkill_{:08x}", fastrand::u32(..))
}

fn server_missing(what: &str, var: &str, url: &str, err: &dyn std::fmt::Display) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{what} is not reachable at {url} ({err}); CI=true requires it");
    }
    eprintln!(
        "SKIPPED: {what} is not reachable at {url} ({err}); start it (scripts/services.sh) or set {var}"
    );
}

/// Counts the ledger rows and completed records, and drops the test's tables.
macro_rules! count_and_drop {
    ($conn:expr, $p:expr) => {{
        let count = |sql: String| sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql));
        let rows = count(format!("SELECT COUNT(*) FROM {}_ledger", $p))
            .fetch_one(&mut $conn)
            .await
            .unwrap();
        let completed = count(format!(
            "SELECT COUNT(*) FROM {}_idem_records WHERE state = 'completed'",
            $p
        ))
        .fetch_one(&mut $conn)
        .await
        .unwrap();
        for t in ["ledger", "orders", "idem_records"] {
            let sql = sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {}_{t}", $p));
            sqlx::raw_sql(sql).execute(&mut $conn).await.unwrap();
        }
        (rows, completed)
    }};
}

macro_rules! kill_test {
    ($name:ident, $Conn:ty, $var:literal, $default:literal, $what:literal) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            use sqlx::Connection;
            let url = std::env::var($var).unwrap_or_else(|_| $default.into());
            let mut conn = match <$Conn>::connect(&url).await {
                Ok(c) => c,
                Err(e) => return server_missing($what, $var, &url, &e),
            };
            let p = prefix();
            let seen = crash_many_times(&url, &p).await;
            let (rows, completed) = count_and_drop!(conn, p);
            check($what, &seen, rows, completed);
        }
    };
}

kill_test!(
    postgres_payments_happen_once_across_sigkills,
    sqlx::PgConnection,
    "IDEM_TEST_POSTGRES_URL",
    "postgres://postgres@127.0.0.1:5432/test",
    "PostgreSQL"
);

kill_test!(
    mariadb_payments_happen_once_across_sigkills,
    sqlx::MySqlConnection,
    "IDEM_TEST_MYSQL_URL",
    "mysql://root@127.0.0.1:3306/test",
    "MySQL/MariaDB"
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_payments_happen_once_across_sigkills() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("payments.db");
    let url = format!("sqlite://{}", path.display());
    let p = prefix();
    let seen = crash_many_times(&url, &p).await;
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let (rows, completed) = count_and_drop!(conn, p);
    check("SQLite", &seen, rows, completed);
}
