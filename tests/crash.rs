//! Exactly once for database effects, under real crashes.
//!
//! A consumer process (the `consumer` example in `crash-worker` mode) applies messages one
//! by one, each in its own transaction through `#[idempotent(tx = tx)]`. The test SIGKILLs it
//! many times: between a message's effect and its commit, and between the commit and the
//! next step. Each restart processes every message again from the start, as a redelivering
//! queue would. Afterwards the orders table holds exactly one row per message, and every
//! answer a worker printed for a message is the committed one.
//!
//! Runs on PostgreSQL, MariaDB (skipped, loudly, without them unless `CI=true`) and SQLite.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const KEYS: u64 = 20;
const KILL_BEFORE_COMMIT: [u64; 6] = [2, 5, 8, 11, 14, 17];
const KILL_AFTER_COMMIT: [u64; 3] = [4, 10, 16];

fn example_binary() -> PathBuf {
    support::example_binary("consumer")
}

struct Worker {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Worker {
    fn start(store: &str, table: &str, extra: &[String]) -> Worker {
        let mut child = Command::new(example_binary())
            .args(["crash-worker", "--store", store, "--table", table])
            .args(["--keys", &KEYS.to_string()])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Worker { child, lines }
    }

    /// Reads lines until one starts with `stop`, collecting `DONE` answers on the way.
    fn until(&mut self, stop: &str, answers: &mut BTreeMap<u64, BTreeSet<String>>) {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("waiting for {stop:?}: {e}"));
            let mut parts = line.split_whitespace();
            if parts.next() == Some("DONE") {
                let key: u64 = parts.next().unwrap().parse().unwrap();
                answers
                    .entry(key)
                    .or_default()
                    .insert(parts.next().unwrap().to_string());
            }
            if line.starts_with(stop) {
                return;
            }
        }
    }
}

/// Kills workers at the planned points, then lets one finish. Returns every answer printed.
fn crash_many_times(store: &str, table: &str) -> BTreeMap<u64, BTreeSet<String>> {
    let mut answers = BTreeMap::new();
    for k in KILL_BEFORE_COMMIT {
        let mut w = Worker::start(
            store,
            table,
            &["--hang-before-commit".into(), k.to_string()],
        );
        w.until(&format!("HANG {k}"), &mut answers);
        w.child.kill().unwrap(); // SIGKILL: the transaction is never committed
        w.child.wait().unwrap();
    }
    for k in KILL_AFTER_COMMIT {
        let mut w = Worker::start(store, table, &["--hang-after-commit".into(), k.to_string()]);
        w.until(&format!("HANG {k}"), &mut answers);
        w.child.kill().unwrap(); // committed, but the worker dies before going on
        w.child.wait().unwrap();
    }
    let mut w = Worker::start(store, table, &[]);
    w.until("FINISHED", &mut answers);
    assert!(w.child.wait().unwrap().success());
    answers
}

fn check(store: &str, answers: &BTreeMap<u64, BTreeSet<String>>, rows: i64, distinct: i64) {
    println!(
        "{store}: {KEYS} messages, {} SIGKILLs between effect and commit, {} after commit, {rows} order rows ({distinct} distinct)",
        KILL_BEFORE_COMMIT.len(),
        KILL_AFTER_COMMIT.len()
    );
    assert_eq!(
        rows, KEYS as i64,
        "one order row per message: the effect happened once"
    );
    assert_eq!(distinct, KEYS as i64);
    assert_eq!(answers.len() as u64, KEYS, "every message was answered");
    for (key, values) in answers {
        assert_eq!(
            values.len(),
            1,
            "message {key} was answered differently: {values:?}"
        );
    }
}

fn table() -> String {
    format!("idem_crash_{:08x}", fastrand::u32(..))
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
    }
    RT.with(|rt| rt.block_on(f))
}

fn server_missing(what: &str, var: &str, url: &str, err: &dyn std::fmt::Display) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{what} is not reachable at {url} ({err}); CI=true requires it");
    }
    eprintln!(
        "SKIPPED: {what} is not reachable at {url} ({err}); start it (scripts/services.sh) or set {var}"
    );
}

/// Counts the orders rows and drops the test's tables.
macro_rules! count_and_drop {
    ($conn:expr, $t:expr) => {{
        use sqlx::Row;
        let q = format!(
            "SELECT COUNT(*), COUNT(DISTINCT message_id) FROM {}_orders",
            $t
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(q))
            .fetch_one(&mut $conn)
            .await
            .unwrap();
        let counts: (i64, i64) = (row.get(0), row.get(1));
        for t in [format!("{}_orders", $t), $t.to_string()] {
            let sql = sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {t}"));
            sqlx::raw_sql(sql).execute(&mut $conn).await.unwrap();
        }
        counts
    }};
}

/// Connects with `$Conn` to `$url`; a missing server skips the test (fails under CI).
macro_rules! crash_test {
    ($name:ident, $Conn:ty, $var:literal, $default:literal, $what:literal) => {
        #[test]
        fn $name() {
            use sqlx::Connection;
            let url = std::env::var($var).unwrap_or_else(|_| $default.into());
            let mut conn = match block_on(<$Conn>::connect(&url)) {
                Ok(c) => c,
                Err(e) => return server_missing($what, $var, &url, &e),
            };
            let t = table();
            let answers = crash_many_times(&url, &t);
            let (rows, distinct) = block_on(async { count_and_drop!(conn, t) });
            check(&url, &answers, rows, distinct);
        }
    };
}

crash_test!(
    postgres_effects_happen_once_across_sigkills,
    sqlx::PgConnection,
    "IDEM_TEST_POSTGRES_URL",
    "postgres://postgres@127.0.0.1:5432/test",
    "PostgreSQL"
);

crash_test!(
    mariadb_effects_happen_once_across_sigkills,
    sqlx::MySqlConnection,
    "IDEM_TEST_MYSQL_URL",
    "mysql://root@127.0.0.1:3306/test",
    "MySQL/MariaDB"
);

#[test]
fn sqlite_effects_happen_once_across_sigkills() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("crash.db").display());
    let t = table();
    let answers = crash_many_times(&url, &t);
    let mut conn = block_on(sqlx::SqliteConnection::connect(&url)).unwrap();
    let (rows, distinct) = block_on(async { count_and_drop!(conn, t) });
    check(&url, &answers, rows, distinct);
}
