//! The layer's transactional mode on a real axum server on 127.0.0.1, driven by a real HTTP
//! client, on SQLite, PostgreSQL and MariaDB: the route's ledger row and the recorded response
//! commit together or not at all.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod support;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use idem_runtime::Idem;
use idem_runtime::http::{IdemTx, IdempotencyLayer};
use idem_runtime::store::{MemoryStore, Store};
use serde::Deserialize;
use sqlx::{Database, MySql, Pool, Postgres, Sqlite};

/// What the tests need of a database: the route's insert, and counting from outside.
trait Ledger: Database {
    /// Inserts one ledger row (and, with `orphan`, a row a deferred foreign key refuses at
    /// commit).
    fn insert(
        conn: &mut Self::Connection,
        table: &str,
        entry: &str,
        run: i64,
        orphan: bool,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
    fn count(pool: &Pool<Self>, sql: String) -> impl Future<Output = i64> + Send;
    fn exec(pool: &Pool<Self>, sql: String) -> impl Future<Output = ()> + Send;
    /// Runs `sql` on the route's connection.
    fn run(
        conn: &mut Self::Connection,
        sql: &str,
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
    /// Whether the database can refuse a commit (a deferred constraint).
    const DEFERRED: bool;
    /// Whether a failed statement aborts the whole transaction (PostgreSQL), rather than
    /// being undone alone (MySQL, SQLite).
    const ABORTS: bool;
}

macro_rules! ledger {
    ($db:ty, $insert:literal, $deferred:expr, $aborts:expr) => {
        impl Ledger for $db {
            async fn insert(
                conn: &mut Self::Connection,
                table: &str,
                entry: &str,
                run: i64,
                orphan: bool,
            ) -> Result<(), sqlx::Error> {
                let sql = format!($insert, table);
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(entry.to_owned())
                    .bind(run)
                    .execute(&mut *conn)
                    .await?;
                if orphan {
                    let sql = format!("INSERT INTO {table}_child (parent) VALUES (42)");
                    sqlx::query(sqlx::AssertSqlSafe(sql))
                        .execute(&mut *conn)
                        .await?;
                }
                Ok(())
            }
            async fn count(pool: &Pool<Self>, sql: String) -> i64 {
                sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql))
                    .fetch_one(pool)
                    .await
                    .unwrap()
            }
            async fn exec(pool: &Pool<Self>, sql: String) {
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(pool)
                    .await
                    .unwrap();
            }
            async fn run(conn: &mut Self::Connection, sql: &str) -> Result<(), sqlx::Error> {
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                    .execute(&mut *conn)
                    .await
                    .map(drop)
            }
            const DEFERRED: bool = $deferred;
            const ABORTS: bool = $aborts;
        }
    };
}

ledger!(
    Postgres,
    "INSERT INTO {} (entry, run) VALUES ($1, $2)",
    true,
    true
);
ledger!(
    Sqlite,
    "INSERT INTO {} (entry, run) VALUES (?1, ?2)",
    true,
    false
);
// MySQL and MariaDB check constraints at each statement: nothing is left for the commit.
ledger!(
    MySql,
    "INSERT INTO {} (entry, run) VALUES (?, ?)",
    false,
    false
);

#[derive(Clone)]
struct App {
    ledger: Arc<str>,
    runs: Arc<AtomicUsize>,
    /// The next run answers 503 after its insert (and a pause), then this turns off.
    fail_next: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Deserialize, Default)]
struct Opts {
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    sleep_ms: u64,
    #[serde(default)]
    size: usize,
    #[serde(default)]
    orphan: bool,
    /// After its insert, run a statement that fails and go on as if it had not.
    #[serde(default)]
    ignore_failure: bool,
    /// End the transaction (`ROLLBACK`) before the insert, as a deadlock does on MySQL.
    #[serde(default)]
    end_tx: bool,
    /// Panic after the insert.
    #[serde(default)]
    panic: bool,
}

/// A payment: one ledger row in the layer's transaction, then the answer.
async fn pay<DB: Ledger>(
    State(app): State<App>,
    Query(opts): Query<Opts>,
    mut tx: IdemTx<DB>,
    body: String,
) -> Response {
    let run = app.runs.fetch_add(1, SeqCst) as i64 + 1;
    if opts.end_tx {
        DB::run(&mut *tx, "ROLLBACK").await.unwrap();
    }
    if let Err(e) = DB::insert(&mut *tx, &app.ledger, &body, run, opts.orphan).await {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    if opts.ignore_failure {
        let failed = DB::run(&mut *tx, "SELECT no_such_column FROM no_such_table").await;
        assert!(failed.is_err());
    }
    assert!(!opts.panic, "the route panics after its insert");
    tokio::time::sleep(Duration::from_millis(opts.sleep_ms)).await;
    if app.fail_next.swap(false, SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "failed after its insert").into_response();
    }
    let status = StatusCode::from_u16(opts.status.unwrap_or(201)).unwrap();
    let json = format!(
        r#"{{"payment":{run},"entry":{body:?},"pad":"{}"}}"#,
        "x".repeat(opts.size)
    );
    (status, [("content-type", "application/json")], json).into_response()
}

/// A route under the transactional layer that does not take the transaction.
async fn plain(State(app): State<App>) -> String {
    let run = app.runs.fetch_add(1, SeqCst) + 1;
    format!("plain {run}")
}

struct Server<DB: Database> {
    url: String,
    pool: Pool<DB>,
    ledger: String,
    records: String,
    app: App,
    client: reqwest::Client,
}

async fn serve<DB: Ledger>(store: Arc<dyn Store>, pool: Pool<DB>, records: &str) -> Server<DB> {
    let idem = Idem::builder().shared_store(store).build().unwrap();
    let ledger = format!("{records}_ledger");
    DB::exec(
        &pool,
        format!(
            "CREATE TABLE {ledger} (entry VARCHAR(200) NOT NULL, run BIGINT NOT NULL);
             CREATE TABLE {ledger}_parent (id BIGINT PRIMARY KEY)"
        ),
    )
    .await;
    if DB::DEFERRED {
        DB::exec(
            &pool,
            format!(
                "CREATE TABLE {ledger}_child (parent BIGINT REFERENCES {ledger}_parent (id) DEFERRABLE INITIALLY DEFERRED)"
            ),
        )
        .await;
    }
    let app = App {
        ledger: ledger.clone().into(),
        runs: Arc::default(),
        fail_next: Arc::default(),
    };
    let layer = IdempotencyLayer::new(idem)
        .transactional()
        .principal(|req| {
            req.headers
                .get("x-tenant")?
                .to_str()
                .ok()
                .map(str::to_owned)
        })
        .max_response_bytes(8 * 1024);
    let router = Router::new()
        .route("/payments", post(pay::<DB>).layer(layer.clone()))
        .route(
            "/optional",
            post(pay::<DB>).layer(layer.clone().required(false)),
        )
        .route(
            "/accepted",
            post(pay::<DB>).layer(layer.clone().store_status(|s| s != StatusCode::ACCEPTED)),
        )
        .route("/plain", post(plain).layer(layer))
        .with_state(app.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    Server {
        url: format!("http://{addr}"),
        pool,
        ledger,
        records: records.to_owned(),
        app,
        client: reqwest::Client::new(),
    }
}

impl<DB: Ledger> Server<DB> {
    async fn post(
        &self,
        path: &str,
        key: Option<&str>,
        tenant: &str,
        body: &str,
    ) -> reqwest::Response {
        let mut req = self
            .client
            .post(format!("{}{path}", self.url))
            .header("x-tenant", tenant)
            .body(body.to_owned());
        if let Some(key) = key {
            req = req.header("Idempotency-Key", key);
        }
        req.send().await.unwrap()
    }

    async fn rows(&self) -> i64 {
        DB::count(&self.pool, format!("SELECT COUNT(*) FROM {}", self.ledger)).await
    }

    async fn records(&self) -> i64 {
        DB::count(&self.pool, format!("SELECT COUNT(*) FROM {}", self.records)).await
    }

    async fn completed(&self) -> i64 {
        let sql = format!(
            "SELECT COUNT(*) FROM {} WHERE state = 'completed'",
            self.records
        );
        DB::count(&self.pool, sql).await
    }

    async fn drop_ledger(&self) {
        let l = &self.ledger;
        DB::exec(&self.pool, format!("DROP TABLE IF EXISTS {l}_child")).await;
        DB::exec(&self.pool, format!("DROP TABLE IF EXISTS {l}_parent")).await;
        DB::exec(&self.pool, format!("DROP TABLE IF EXISTS {l}")).await;
    }
}

async fn problem(resp: reqwest::Response, status: u16) -> serde_json::Value {
    assert_eq!(resp.status().as_u16(), status);
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let json: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(json["status"], status);
    json
}

async fn scenarios<DB: Ledger>(s: Server<DB>) {
    concurrent_duplicates_make_one_row(&s).await;
    a_duplicate_waiting_on_a_first_that_rolls_back_runs_the_route(&s).await;
    a_route_that_fails_leaves_no_row_and_no_record(&s).await;
    a_success_the_policy_does_not_store_is_not_sent_for_rolled_back_writes(&s).await;
    tenants_and_reused_keys(&s).await;
    an_oversized_response_commits_nothing(&s).await;
    a_failed_commit_is_503_and_never_the_routes_response(&s).await;
    a_route_that_goes_on_after_a_failed_statement(&s).await;
    a_route_that_ends_the_transaction_is_never_told_success(&s).await;
    a_panicking_route_is_a_500_and_commits_nothing(&s).await;
    a_client_that_hangs_up_does_not_stop_the_commit(&s).await;
    requests_without_a_key_and_routes_without_the_transaction(&s).await;
    s.drop_ledger().await;
}

async fn concurrent_duplicates_make_one_row<DB: Ledger>(s: &Server<DB>) {
    let (rows, runs) = (s.rows().await, s.app.runs.load(SeqCst));
    let answers = futures_util::future::join_all((0..16).map(|_| async {
        let resp = s
            .post("/payments?sleep_ms=300", Some("dup"), "a", "tea")
            .await;
        let replayed = resp.headers().get("idempotent-replayed").is_some();
        (resp.status().as_u16(), replayed, resp.text().await.unwrap())
    }))
    .await;
    assert_eq!(
        s.rows().await,
        rows + 1,
        "one ledger row for sixteen duplicates"
    );
    assert_eq!(s.app.runs.load(SeqCst), runs + 1, "the route ran once");
    let first = &answers[0].2;
    for (status, _, body) in &answers {
        assert_eq!(*status, 201);
        assert_eq!(
            body, first,
            "every duplicate gets the one committed response"
        );
    }
    let fresh = answers.iter().filter(|(_, replayed, _)| !replayed).count();
    assert_eq!(
        fresh, 1,
        "one response is the route's, the others are replays"
    );
}

async fn a_duplicate_waiting_on_a_first_that_rolls_back_runs_the_route<DB: Ledger>(s: &Server<DB>) {
    let (rows, runs) = (s.rows().await, s.app.runs.load(SeqCst));
    s.app.fail_next.store(true, SeqCst);
    let first = s.post("/payments?sleep_ms=300", Some("retry-me"), "a", "tea");
    let second = async {
        // Sent while the first holds the record's row (its insert is done, its answer not).
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.post("/payments?sleep_ms=300", Some("retry-me"), "a", "tea")
            .await
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(first.status(), 503, "the first fails after its insert");
    assert_eq!(
        second.status(),
        201,
        "the duplicate ran the route once the first rolled back"
    );
    assert!(second.headers().get("idempotent-replayed").is_none());
    assert_eq!(s.app.runs.load(SeqCst), runs + 2);
    assert_eq!(
        s.rows().await,
        rows + 1,
        "the first's row rolled back; the second's committed"
    );
}

async fn a_route_that_fails_leaves_no_row_and_no_record<DB: Ledger>(s: &Server<DB>) {
    let (rows, records) = (s.rows().await, s.records().await);
    for status in [500, 503, 401, 403, 408, 429] {
        let resp = s
            .post(
                &format!("/payments?status={status}"),
                Some("fails"),
                "a",
                "coffee",
            )
            .await;
        assert_eq!(
            resp.status().as_u16(),
            status,
            "the route's own answer goes out"
        );
        assert!(resp.text().await.unwrap().contains("coffee"));
        assert_eq!(s.rows().await, rows, "its insert rolled back ({status})");
        assert_eq!(s.records().await, records, "no record is left ({status})");
    }
    // The key is free: the same request, succeeding now, runs and commits once.
    let resp = s
        .post("/payments?status=500", Some("later"), "a", "cake")
        .await;
    assert_eq!(resp.status(), 500);
    let resp = s.post("/payments", Some("later"), "a", "cake").await;
    assert_eq!(resp.status(), 201);
    assert_eq!(s.rows().await, rows + 1);
    assert_eq!(s.completed().await, records + 1);
}

/// A `store_status` policy that does not store a 2xx (here 202): the writes roll back with
/// the reservation, so the client must not be told they happened.
async fn a_success_the_policy_does_not_store_is_not_sent_for_rolled_back_writes<DB: Ledger>(
    s: &Server<DB>,
) {
    let (rows, records) = (s.rows().await, s.records().await);
    let resp = s
        .post("/accepted?status=202", Some("accepted"), "a", "job")
        .await;
    let json = problem(resp, 500).await;
    assert_eq!(
        json["type"]
            .as_str()
            .map(|t| t.ends_with("status-not-stored")),
        Some(true),
        "{json}"
    );
    assert_eq!(s.rows().await, rows, "the route's insert rolled back");
    assert_eq!(s.records().await, records, "no record is left");
}

async fn tenants_and_reused_keys<DB: Ledger>(s: &Server<DB>) {
    let rows = s.rows().await;
    let a = s
        .post("/payments", Some("shared"), "a", "tea")
        .await
        .text()
        .await
        .unwrap();
    let b = s
        .post("/payments", Some("shared"), "b", "tea")
        .await
        .text()
        .await
        .unwrap();
    assert_ne!(a, b, "two tenants' requests with one key are two payments");
    assert_eq!(s.rows().await, rows + 2);
    let again = s.post("/payments", Some("shared"), "b", "tea").await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.text().await.unwrap(), b);
    let other = s
        .post("/payments", Some("shared"), "a", "a different body")
        .await;
    let json = problem(other, 422).await;
    assert_eq!(json["type"], "urn:idem:problem:payload-mismatch");
    assert_eq!(s.rows().await, rows + 2, "a refused request writes nothing");
}

async fn an_oversized_response_commits_nothing<DB: Ledger>(s: &Server<DB>) {
    let (rows, records) = (s.rows().await, s.records().await);
    let resp = s
        .post("/payments?size=20000", Some("big"), "a", "tea")
        .await;
    let json = problem(resp, 500).await;
    assert_eq!(json["type"], "urn:idem:problem:response-too-large");
    assert_eq!(s.rows().await, rows);
    assert_eq!(s.records().await, records);
}

async fn a_failed_commit_is_503_and_never_the_routes_response<DB: Ledger>(s: &Server<DB>) {
    if !DB::DEFERRED {
        return;
    }
    let (rows, records) = (s.rows().await, s.records().await);
    let resp = s
        .post("/payments?orphan=true", Some("orphan"), "a", "tea")
        .await;
    assert_eq!(resp.headers()["retry-after"], "1");
    let json = problem(resp, 503).await;
    assert_eq!(json["type"], "urn:idem:problem:not-committed");
    assert_eq!(s.rows().await, rows, "the commit failed: no row");
    assert_eq!(s.records().await, records, "and no record");
    // A retry runs the route again (here without the orphan: a new request, a new key).
    let resp = s.post("/payments", Some("orphan-fixed"), "a", "tea").await;
    assert_eq!(resp.status(), 201);
    assert_eq!(s.rows().await, rows + 1);
}

/// A route that ignores a failed statement and answers anyway. On PostgreSQL the failure
/// aborted the transaction, so nothing the route wrote can be kept: a success becomes a 500
/// that says why, and an error answer goes out unrecorded, its key free. MySQL and SQLite undo
/// the failed statement alone, and the rest commits as usual.
async fn a_route_that_goes_on_after_a_failed_statement<DB: Ledger>(s: &Server<DB>) {
    let (rows, records) = (s.rows().await, s.records().await);
    // Without a key nothing is recorded, so only the commit could tell; it must not be
    // trusted to (PostgreSQL answers the COMMIT of an aborted transaction with a rollback).
    let unkeyed = s
        .post("/optional?ignore_failure=true", None, "a", "tea")
        .await;
    let resp = s
        .post("/payments?ignore_failure=true", Some("went-on"), "a", "tea")
        .await;
    if !DB::ABORTS {
        assert_eq!(unkeyed.status(), 201);
        assert_eq!(resp.status(), 201);
        assert_eq!(s.rows().await, rows + 2);
        assert_eq!(s.records().await, records + 1);
        return;
    }
    let json = problem(unkeyed, 500).await;
    assert_eq!(json["type"], "urn:idem:problem:transaction-aborted");
    let json = problem(resp, 500).await;
    assert_eq!(json["type"], "urn:idem:problem:transaction-aborted");
    assert_eq!(s.rows().await, rows, "nothing the route wrote is kept");
    assert_eq!(s.records().await, records, "and nothing is recorded");
    for _ in 0..2 {
        let resp = s
            .post(
                "/payments?ignore_failure=true&status=409",
                Some("went-on-409"),
                "a",
                "tea",
            )
            .await;
        assert_eq!(resp.status(), 409, "the route's error answer goes out");
        assert!(resp.headers().get("idempotent-replayed").is_none());
        assert!(resp.text().await.unwrap().contains("tea"));
    }
    assert_eq!(s.rows().await, rows);
    assert_eq!(s.records().await, records, "unrecorded: the key stays free");
}

/// A route whose transaction ended under it (a `ROLLBACK`, or a deadlock on MySQL, which
/// rolls back the whole transaction) writes outside it from then on. The layer's fenced
/// record then finds no reservation: the client is never told the request succeeded, and
/// nothing is recorded, so a retry runs the route again.
async fn a_route_that_ends_the_transaction_is_never_told_success<DB: Ledger>(s: &Server<DB>) {
    if DB::NAME == "SQLite" {
        // SQLite never ends a transaction under its statements (a busy error leaves it open),
        // and a `ROLLBACK` behind sqlx's back upsets its connection's bookkeeping.
        return;
    }
    let completed = s.completed().await;
    let resp = s
        .post("/payments?end_tx=true", Some("ended"), "a", "tea")
        .await;
    let json = problem(resp, 503).await;
    assert_eq!(json["type"], "urn:idem:problem:store-unavailable");
    assert_eq!(s.completed().await, completed, "no record for it");
    // Without a key there is no record to find missing: the layer's own mark is.
    let resp = s.post("/optional?end_tx=true", None, "a", "tea").await;
    let json = problem(resp, 500).await;
    assert_eq!(json["type"], "urn:idem:problem:transaction-aborted");
}

async fn a_panicking_route_is_a_500_and_commits_nothing<DB: Ledger>(s: &Server<DB>) {
    let (rows, records) = (s.rows().await, s.records().await);
    let resp = s
        .post("/payments?panic=true", Some("panics"), "a", "tea")
        .await;
    assert_eq!(resp.status(), 500);
    assert_eq!(s.rows().await, rows, "its insert rolled back");
    assert_eq!(s.records().await, records, "and the key is free");
}

async fn a_client_that_hangs_up_does_not_stop_the_commit<DB: Ledger>(s: &Server<DB>) {
    let (rows, completed) = (s.rows().await, s.completed().await);
    let gone = tokio::time::timeout(
        Duration::from_millis(100),
        s.post("/payments?sleep_ms=400", Some("hung-up"), "a", "tea"),
    )
    .await;
    assert!(gone.is_err(), "the client hung up while the route ran");
    let give_up = std::time::Instant::now() + Duration::from_secs(10);
    while s.completed().await == completed {
        assert!(
            std::time::Instant::now() < give_up,
            "the route did not finish and commit after its client hung up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.rows().await, rows + 1, "the route finished and committed");
    let again = s
        .post("/payments?sleep_ms=400", Some("hung-up"), "a", "tea")
        .await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(s.rows().await, rows + 1);
}

async fn requests_without_a_key_and_routes_without_the_transaction<DB: Ledger>(s: &Server<DB>) {
    let (rows, records) = (s.rows().await, s.records().await);
    let resp = s.post("/optional", None, "a", "tea").await;
    assert_eq!(
        resp.status(),
        201,
        "no key, not required: the route still has its transaction"
    );
    assert_eq!(s.rows().await, rows + 1);
    assert_eq!(s.records().await, records, "and nothing is recorded");
    let resp = s.post("/optional?status=500", None, "a", "tea").await;
    assert_eq!(resp.status(), 500);
    assert_eq!(
        s.rows().await,
        rows + 1,
        "an unkeyed failure rolls back too"
    );

    let first = s
        .post("/plain", Some("p"), "a", "")
        .await
        .text()
        .await
        .unwrap();
    let again = s.post("/plain", Some("p"), "a", "").await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.text().await.unwrap(), first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite() {
    let fx = support::sqlite_store().await;
    let pool = fx.store.pool().clone();
    let table = fx.store.table().to_owned();
    scenarios(serve::<Sqlite>(Arc::new(fx.store.clone()), pool, &table).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres() {
    let Some(fx) = support::postgres_store().await else {
        return;
    };
    let pool = fx.store.pool().clone();
    let table = fx.store.table().to_owned();
    scenarios(serve::<Postgres>(Arc::new(fx.store.clone()), pool, &table).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_mariadb() {
    let Some(fx) = support::mysql_store().await else {
        return;
    };
    let pool = fx.store.pool().clone();
    let table = fx.store.table().to_owned();
    scenarios(serve::<MySql>(Arc::new(fx.store.clone()), pool, &table).await).await;
}

/// Misuse answers with a problem document that says what to change.
#[tokio::test]
async fn misuse_is_a_500_that_says_what_to_change() {
    let idem = Idem::builder()
        .shared_store(Arc::new(MemoryStore::new()))
        .build()
        .unwrap();
    let fx = support::sqlite_store().await;
    let app = App {
        ledger: "nowhere".into(),
        runs: Arc::default(),
        fail_next: Arc::default(),
    };
    let router = Router::new()
        // A transactional layer on a store that cannot lend a transaction.
        .route(
            "/memory",
            post(plain).layer(IdempotencyLayer::new(idem.clone()).transactional()),
        )
        // `IdemTx` under a leased layer.
        .route(
            "/leased",
            post(pay::<Sqlite>).layer(IdempotencyLayer::new(idem)),
        )
        .with_state(app.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let client = reqwest::Client::new();
    let send = |path: &str| {
        client
            .post(format!("{url}{path}"))
            .header("Idempotency-Key", "k")
            .send()
    };
    let json = problem(send("/memory").await.unwrap(), 500).await;
    assert!(
        json["detail"].as_str().unwrap().contains("`memory`"),
        "{json}"
    );
    let json = problem(send("/leased").await.unwrap(), 500).await;
    assert_eq!(json["type"], "urn:idem:problem:no-transaction");
    assert!(
        json["detail"].as_str().unwrap().contains("transactional()"),
        "{json}"
    );
    assert_eq!(app.runs.load(SeqCst), 0);
    drop(fx);
}
