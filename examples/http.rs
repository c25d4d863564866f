//! An orders service whose `POST /orders` honours the `Idempotency-Key` header.
//!
//! ```text
//! cargo run --example http                                   # SQLite file in a temp dir
//! cargo run --example http -- postgres://postgres@127.0.0.1:5432/test
//! ```
//!
//! It listens on 127.0.0.1:3000 (`IDEM_DEMO_ADDR` to change). The README shows the `curl`
//! calls to try: a first POST, its retry (replayed), the same key with another body (422),
//! and two concurrent duplicates. `X-Api-Key` names the caller; keys are scoped by it.

use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use idem_runtime::Idem;
use idem_runtime::http::IdempotencyLayer;
use serde::{Deserialize, Serialize};

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
}

#[derive(Clone)]
struct App {
    db: Db,
}

/// The orders table lives in the same database as the idem records.
#[derive(Clone)]
enum Db {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl Db {
    async fn setup(&self) -> Result<(), sqlx::Error> {
        match self {
            Db::Sqlite(p) => sqlx::query("CREATE TABLE IF NOT EXISTS demo_orders (id INTEGER PRIMARY KEY, sku TEXT NOT NULL, quantity INTEGER NOT NULL)").execute(p).await.map(drop),
            Db::Postgres(p) => sqlx::query("CREATE TABLE IF NOT EXISTS demo_orders (id BIGSERIAL PRIMARY KEY, sku TEXT NOT NULL, quantity INTEGER NOT NULL)").execute(p).await.map(drop),
        }
    }

    async fn insert(&self, sku: &str, quantity: u32) -> Result<i64, sqlx::Error> {
        match self {
            Db::Sqlite(p) => {
                sqlx::query_scalar(
                    "INSERT INTO demo_orders (sku, quantity) VALUES (?1, ?2) RETURNING id",
                )
                .bind(sku)
                .bind(i64::from(quantity))
                .fetch_one(p)
                .await
            }
            Db::Postgres(p) => {
                sqlx::query_scalar(
                    "INSERT INTO demo_orders (sku, quantity) VALUES ($1, $2) RETURNING id",
                )
                .bind(sku)
                .bind(i64::from(quantity) as i32)
                .fetch_one(p)
                .await
            }
        }
    }

    async fn count(&self) -> Result<i64, sqlx::Error> {
        match self {
            Db::Sqlite(p) => {
                sqlx::query_scalar("SELECT COUNT(*) FROM demo_orders")
                    .fetch_one(p)
                    .await
            }
            Db::Postgres(p) => {
                sqlx::query_scalar("SELECT COUNT(*) FROM demo_orders")
                    .fetch_one(p)
                    .await
            }
        }
    }
}

async fn create_order(
    State(app): State<App>,
    Query(slow): Query<Slow>,
    Json(req): Json<CreateOrder>,
) -> impl IntoResponse {
    tokio::time::sleep(Duration::from_millis(slow.delay_ms)).await;
    match app.db.insert(&req.sku, req.quantity).await {
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
    match app.db.count().await {
        Ok(n) => format!("{n} orders\n").into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args().nth(1);
    let dir = tempfile::tempdir()?;
    let (idem, db) = match url.as_deref() {
        Some(url) if url.starts_with("postgres") => {
            let store = idem_runtime::store::PgStore::connect(url).await?;
            let db = Db::Postgres(store.pool().clone());
            (Idem::builder().store(store).build()?, db)
        }
        _ => {
            let path = dir.path().join("orders.db");
            let store = idem_runtime::store::SqliteStore::open(&path).await?;
            let db = Db::Sqlite(store.pool().clone());
            println!("SQLite database: {}", path.display());
            (Idem::builder().store(store).build()?, db)
        }
    };
    db.setup().await?;
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
    let app = Router::new()
        .route(
            "/orders",
            post(create_order).layer(idempotent).get(count_orders),
        )
        .with_state(App { db });
    let addr = std::env::var("IDEM_DEMO_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!(
        "orders service on http://{addr} (POST /orders needs an Idempotency-Key; GET /orders counts)"
    );
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
