//! An orders and payments service whose `POST /orders` and `POST /payments` honour the
//! `Idempotency-Key` header.
//!
//! ```text
//! cargo run --example http                                   # SQLite file in a temp dir
//! cargo run --example http -- postgres://postgres@127.0.0.1:5432/test
//! cargo run --example http -- mysql://root@127.0.0.1:3306/test
//! cargo run --example http -- sqlite:///tmp/demo.db          # a SQLite file that stays
//! ```
//!
//! `POST /orders` is under the leased layer: the order row commits on its own, before its
//! response is recorded. `POST /payments` is under the transactional layer: its ledger row is
//! written in the layer's transaction ([`IdemTx`]) and commits together with the recorded
//! response, or not at all.
//!
//! It listens on 127.0.0.1:3000 (`IDEM_DEMO_ADDR` to change). The README shows the `curl`
//! calls to try: a first POST, its retry (replayed), the same key with another body (422),
//! and two concurrent duplicates. `X-Api-Key` names the caller; keys are scoped by it.
//! `IDEM_DEMO_PREFIX` prefixes the tables' names (the kill test keeps its runs apart with it).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use idem_runtime::Idem;
use idem_runtime::http::{IdemTx, IdempotencyLayer};
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, MySql, Postgres, Sqlite};

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
    let url = std::env::args().nth(1);
    let prefix = std::env::var("IDEM_DEMO_PREFIX").unwrap_or_else(|_| "demo".into());
    let records = format!("{prefix}_idem_records");
    let dir = tempfile::tempdir()?;
    let (idem, db) = match url.as_deref() {
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
            let path = match other.and_then(|u| u.strip_prefix("sqlite://")) {
                Some(path) => path.into(),
                None => dir.path().join("orders.db"),
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
        .wait("PT2S");
    // The same settings, with the ledger row and the record in one transaction.
    let transactional = idempotent.clone().transactional();
    let pay = match db {
        Db::Postgres(_) => post(pay_postgres),
        Db::MySql(_) => post(pay_mysql),
        Db::Sqlite(_) => post(pay_sqlite),
    };
    let app = Router::new()
        .route(
            "/orders",
            post(create_order).layer(idempotent).get(count_orders),
        )
        .route("/payments", pay.layer(transactional).get(count_payments))
        .with_state(App { db, tables });
    let addr = std::env::var("IDEM_DEMO_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!(
        "orders service on http://{} (POST /orders and /payments need an Idempotency-Key; GET counts)",
        listener.local_addr()?
    );
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
