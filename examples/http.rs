//! An orders and payments service whose `POST /orders` and `POST /payments` honour the
//! `Idempotency-Key` header, and a client that retries through a lossy link with one key per
//! order.
//!
//! ```text
//! cargo run --example http                                   # SQLite file in a temp dir
//! cargo run --example http -- sqlite:///tmp/idem-demo.db     # a SQLite file that outlives the process
//! cargo run --example http -- postgres://postgres@127.0.0.1:5432/test
//! cargo run --example http -- mysql://root@127.0.0.1:3306/test   # or: -- --store URL
//! cargo run --example http -- client URL BODY [KEY]          # one order, retried with idem-client
//! ```
//!
//! `POST /orders` is under the leased layer: the order row commits on its own, before its
//! response is recorded. `POST /payments` is under the transactional layer: its ledger row is
//! written in the layer's transaction ([`IdemTx`]) and commits together with the recorded
//! response, or not at all.
//!
//! The service listens on 127.0.0.1:3000 (`IDEM_DEMO_ADDR` to change), serves its metrics in
//! Prometheus' text format at `GET /metrics`, and opens a lossy link to itself on
//! 127.0.0.1:3001 (`IDEM_DEMO_LOSSY_ADDR`) that cuts every other connection once the response
//! has started: the order is made, its client never hears of it. The README shows the `curl`
//! calls to try: a first POST, its retry (replayed), the same key with another body (422), two
//! concurrent duplicates, a payment, the client through the lossy link (a replay), and a server
//! killed mid-request (a takeover). `X-Api-Key` names the caller; keys are scoped by it.
//! `IDEM_DEMO_PREFIX` prefixes the tables' names (the kill test keeps its runs apart with it).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use idem_client::RetryingClient;
use idem_runtime::Idem;
use idem_runtime::http::{IdemTx, IdempotencyLayer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, MySql, Postgres, Sqlite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Deserialize)]
struct CreateOrder {
    sku: String,
    quantity: u32,
}

#[derive(Serialize)]
struct Order {
    id: i64,
    sku: String,
    quantity: u32,
}

#[derive(Deserialize)]
struct Slow {
    /// Makes the handler take this long: to see a concurrent duplicate wait or get 409.
    #[serde(default)]
    delay_ms: u64,
    /// Makes `POST /payments` answer 503 after its insert: to see the row roll back.
    #[serde(default)]
    fail: bool,
}

#[derive(Clone)]
struct App {
    db: Db,
    tables: Tables,
}

/// The demo's tables, in the same database as the idem records.
#[derive(Clone)]
struct Tables {
    orders: Arc<str>,
    ledger: Arc<str>,
}

#[derive(Clone)]
enum Db {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
    MySql(sqlx::MySqlPool),
}

impl Db {
    async fn setup(&self, t: &Tables) -> Result<(), sqlx::Error> {
        let (orders, ledger) = (&t.orders, &t.ledger);
        let id = match self {
            Db::Sqlite(_) => "INTEGER PRIMARY KEY",
            Db::Postgres(_) => "BIGSERIAL PRIMARY KEY",
            Db::MySql(_) => "BIGINT AUTO_INCREMENT PRIMARY KEY",
        };
        for sql in [
            format!(
                "CREATE TABLE IF NOT EXISTS {orders} (id {id}, sku VARCHAR(100) NOT NULL, quantity INTEGER NOT NULL)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ledger} (id {id}, account VARCHAR(100) NOT NULL, amount_cents BIGINT NOT NULL)"
            ),
        ] {
            let sql = AssertSqlSafe(sql);
            match self {
                Db::Sqlite(p) => sqlx::raw_sql(sql).execute(p).await.map(drop)?,
                Db::Postgres(p) => sqlx::raw_sql(sql).execute(p).await.map(drop)?,
                Db::MySql(p) => sqlx::raw_sql(sql).execute(p).await.map(drop)?,
            }
        }
        Ok(())
    }

    /// An order row, committed on its own (the leased layer's route).
    async fn insert(&self, t: &Tables, sku: &str, quantity: u32) -> Result<i64, sqlx::Error> {
        let q = i64::from(quantity);
        let sql = |p: &str| {
            AssertSqlSafe(format!(
                "INSERT INTO {} (sku, quantity) VALUES ({p})",
                t.orders
            ))
        };
        Ok(match self {
            Db::Sqlite(p) => sqlx::query(sql("?1, ?2"))
                .bind(sku)
                .bind(q)
                .execute(p)
                .await?
                .last_insert_rowid(),
            Db::Postgres(p) => {
                let sql = AssertSqlSafe(format!(
                    "INSERT INTO {} (sku, quantity) VALUES ($1, $2) RETURNING id",
                    t.orders
                ));
                sqlx::query_scalar(sql)
                    .bind(sku)
                    .bind(q as i32)
                    .fetch_one(p)
                    .await?
            }
            Db::MySql(p) => sqlx::query(sql("?, ?"))
                .bind(sku)
                .bind(q)
                .execute(p)
                .await?
                .last_insert_id() as i64,
        })
    }

    async fn count(&self, table: &str) -> Result<i64, sqlx::Error> {
        let sql = || AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}"));
        match self {
            Db::Sqlite(p) => sqlx::query_scalar(sql()).fetch_one(p).await,
            Db::Postgres(p) => sqlx::query_scalar(sql()).fetch_one(p).await,
            Db::MySql(p) => sqlx::query_scalar(sql()).fetch_one(p).await,
        }
    }
}

async fn create_order(
    State(app): State<App>,
    Query(slow): Query<Slow>,
    Json(req): Json<CreateOrder>,
) -> impl IntoResponse {
    tokio::time::sleep(Duration::from_millis(slow.delay_ms)).await;
    match app.db.insert(&app.tables, &req.sku, req.quantity).await {
        Ok(id) => (
            StatusCode::CREATED,
            [("location", format!("/orders/{id}"))],
            Json(Order {
                id,
                sku: req.sku,
                quantity: req.quantity,
            }),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn count_orders(State(app): State<App>) -> impl IntoResponse {
    match app.db.count(&app.tables.orders).await {
        Ok(n) => format!("{n} orders\n").into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn count_payments(State(app): State<App>) -> impl IntoResponse {
    match app.db.count(&app.tables.ledger).await {
        Ok(n) => format!("{n} payments\n").into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[derive(Deserialize)]
struct Pay {
    account: String,
    amount_cents: i64,
}

#[derive(Serialize)]
struct Payment {
    id: i64,
    account: String,
    amount_cents: i64,
}

/// `POST /payments`: the ledger row goes into the layer's transaction, with the record of
/// this response. One route per database, as `IdemTx` names its database; they share
/// [`paid`].
async fn pay_postgres(
    State(app): State<App>,
    Query(slow): Query<Slow>,
    mut tx: IdemTx<Postgres>,
    Json(p): Json<Pay>,
) -> axum::response::Response {
    let sql = format!(
        "INSERT INTO {} (account, amount_cents) VALUES ($1, $2) RETURNING id",
        app.tables.ledger
    );
    let id = sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(&p.account)
        .bind(p.amount_cents);
    paid(id.fetch_one(&mut *tx).await, p, slow).await
}

async fn pay_mysql(
    State(app): State<App>,
    Query(slow): Query<Slow>,
    mut tx: IdemTx<MySql>,
    Json(p): Json<Pay>,
) -> axum::response::Response {
    let sql = format!(
        "INSERT INTO {} (account, amount_cents) VALUES (?, ?)",
        app.tables.ledger
    );
    let done = sqlx::query(AssertSqlSafe(sql))
        .bind(&p.account)
        .bind(p.amount_cents);
    let id = done
        .execute(&mut *tx)
        .await
        .map(|r| r.last_insert_id() as i64);
    paid(id, p, slow).await
}

async fn pay_sqlite(
    State(app): State<App>,
    Query(slow): Query<Slow>,
    mut tx: IdemTx<Sqlite>,
    Json(p): Json<Pay>,
) -> axum::response::Response {
    let sql = format!(
        "INSERT INTO {} (account, amount_cents) VALUES (?1, ?2)",
        app.tables.ledger
    );
    let done = sqlx::query(AssertSqlSafe(sql))
        .bind(&p.account)
        .bind(p.amount_cents);
    let id = done.execute(&mut *tx).await.map(|r| r.last_insert_rowid());
    paid(id, p, slow).await
}

/// The answer once the ledger row is inserted (not yet committed: the layer commits it).
async fn paid(id: Result<i64, sqlx::Error>, p: Pay, slow: Slow) -> axum::response::Response {
    let id = match id {
        Ok(id) => id,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    // The slow part comes after the insert: a kill or a duplicate meanwhile finds the row
    // written but not committed.
    tokio::time::sleep(Duration::from_millis(slow.delay_ms)).await;
    if slow.fail {
        let detail = "the ledger is busy; try again";
        return (StatusCode::SERVICE_UNAVAILABLE, detail).into_response();
    }
    let payment = Payment {
        id,
        account: p.account,
        amount_cents: p.amount_cents,
    };
    let location = format!("/payments/{id}");
    (StatusCode::CREATED, [("location", location)], Json(payment)).into_response()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("client") => client(&args[1..]).await,
        // `--store URL`, as the other examples take it, or the URL alone.
        Some("--store") => match args.get(1) {
            Some(url) => serve(Some(url)).await,
            None => Err("--store needs a URL".into()),
        },
        url => serve(url).await,
    }
}

/// One order, sent with idem-client: one key (`KEY`, or a fresh UUID) on every attempt.
async fn client(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let (Some(url), Some(body)) = (args.first(), args.get(1)) else {
        return Err("usage: http client URL BODY [KEY]".into());
    };
    // Patient enough to outlast a server restart and a dead replica's 5 s lease.
    let client = RetryingClient::builder(reqwest::Client::new())
        .max_attempts(30)
        .max_elapsed(Duration::from_secs(60))
        .backoff(Duration::from_millis(200), Duration::from_secs(2))
        .build()?;
    let mut request = client
        .http()
        .post(url)
        .header("x-api-key", "alice")
        .header("content-type", "application/json")
        .body(body.clone());
    if let Some(key) = args.get(2) {
        request = request.header("idempotency-key", key);
    }
    let reply = client.send(request).await?;
    println!("key {}", reply.key());
    for (n, retry) in reply.retries().iter().enumerate() {
        let why = if retry.retry_after {
            "Retry-After"
        } else {
            "backoff"
        };
        println!(
            "attempt {}: {}, retried after {:?} ({why})",
            n + 1,
            retry.reason,
            retry.waited
        );
    }
    println!(
        "attempt {}: {} (replayed: {})",
        reply.attempts(),
        reply.status(),
        reply.replayed()
    );
    println!("{}", reply.into_response().text().await?);
    Ok(())
}

async fn serve(url: Option<&str>) -> Result<(), Box<dyn std::error::Error>> {
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    let prefix = std::env::var("IDEM_DEMO_PREFIX").unwrap_or_else(|_| "demo".into());
    let records = format!("{prefix}_idem_records");
    let dir = tempfile::tempdir()?;
    let (idem, db) = match url {
        Some(url) if url.starts_with("postgres") => {
            let options = idem_runtime::store::PgStoreOptions::new().table(&records);
            let store = idem_runtime::store::PgStore::connect_with(url, options).await?;
            let db = Db::Postgres(store.pool().clone());
            (Idem::builder().store(store).build()?, db)
        }
        Some(url) if url.starts_with("mysql") || url.starts_with("mariadb") => {
            let options = idem_runtime::store::MySqlStoreOptions::new().table(&records);
            let store = idem_runtime::store::MySqlStore::connect_with(url, options).await?;
            let db = Db::MySql(store.pool().clone());
            (Idem::builder().store(store).build()?, db)
        }
        other => {
            let file = other.map(|u| u.strip_prefix("sqlite://").or(u.strip_prefix("sqlite:")));
            let path = match file {
                None => dir.path().join("orders.db"),
                Some(Some(path)) => path.into(),
                // Not a store this demo keeps its own rows in: say so rather than fall back
                // to a temporary file the user did not ask for.
                Some(None) => {
                    // The scheme only: a URL may carry a password.
                    let url = other.unwrap_or_default();
                    let scheme = url.split_once(':').map_or(url, |(scheme, _)| scheme);
                    return Err(format!(
                        "a {scheme:?} URL is not a store this demo serves from: give sqlite://PATH, postgres://.. or mysql://.. (the orders and the ledger live in the same database), or nothing for a temporary SQLite file"
                    )
                    .into());
                }
            };
            let options = idem_runtime::store::SqliteStoreOptions::new().table(&records);
            let store = idem_runtime::store::SqliteStore::open_with(&path, options).await?;
            let db = Db::Sqlite(store.pool().clone());
            println!("SQLite database: {}", path.display());
            (Idem::builder().store(store).build()?, db)
        }
    };
    let tables = Tables {
        orders: format!("{prefix}_orders").into(),
        ledger: format!("{prefix}_ledger").into(),
    };
    db.setup(&tables).await?;
    let idempotent = IdempotencyLayer::new(idem)
        .principal(|req| {
            req.headers
                .get("x-api-key")?
                .to_str()
                .ok()
                .map(str::to_owned)
        })
        .ttl("PT24H")
        .wait("PT2S")
        // A replica that dies mid-request holds its key this long; then a retry takes over.
        .lease("PT5S");
    // The same settings, with the ledger row and the record in one transaction.
    let transactional = idempotent.clone().transactional();
    let pay = match db {
        Db::Postgres(_) => post(pay_postgres),
        Db::MySql(_) => post(pay_mysql),
        Db::Sqlite(_) => post(pay_sqlite),
    };
    let metrics = {
        let prometheus = prometheus.clone();
        move || async move { prometheus.render() }
    };
    let app = Router::new()
        .route(
            "/orders",
            post(create_order).layer(idempotent).get(count_orders),
        )
        .route("/payments", pay.layer(transactional).get(count_payments))
        .route("/metrics", get(metrics))
        .with_state(App { db, tables });
    tokio::spawn(upkeep(prometheus));
    let addr = std::env::var("IDEM_DEMO_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = TcpListener::bind(&addr).await?;
    let server = listener.local_addr()?;
    let lossy = std::env::var("IDEM_DEMO_LOSSY_ADDR").unwrap_or_else(|_| "127.0.0.1:3001".into());
    let lossy = TcpListener::bind(&lossy).await?;
    println!(
        "orders service on http://{server} (POST /orders and /payments need an Idempotency-Key; GET counts them; GET /metrics)"
    );
    println!(
        "lossy link on http://{} (cuts every other response)",
        lossy.local_addr()?
    );
    tokio::spawn(lossy_link(lossy, server));
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// Histogram upkeep, which the exporter's own listener would otherwise do.
async fn upkeep(prometheus: PrometheusHandle) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        prometheus.run_upkeep();
    }
}

/// Forwards connections to `server`, and cuts every other one once its response has started.
async fn lossy_link(listener: TcpListener, server: SocketAddr) {
    let count = AtomicUsize::new(0);
    while let Ok((client, _)) = listener.accept().await {
        let cut = count.fetch_add(1, Ordering::Relaxed).is_multiple_of(2);
        tokio::spawn(async move {
            let Ok(upstream) = TcpStream::connect(server).await else {
                return;
            };
            if !cut {
                let (mut client, mut upstream) = (client, upstream);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                return;
            }
            let (mut from_client, mut to_client) = client.into_split();
            let (mut from_server, mut to_server) = upstream.into_split();
            let forward =
                tokio::spawn(
                    async move { tokio::io::copy(&mut from_client, &mut to_server).await },
                );
            let mut first = [0u8; 1];
            let _ = from_server.read(&mut first).await;
            forward.abort();
            let _ = to_client.shutdown().await;
        });
    }
}
