//! The idem demo: an order service on the embedded SQLite default, and clients that retry.
//!
//! Every customer places one order. The link between client and server is lossy: it drops
//! some requests on the way in (the server never sees them) and some responses on the way
//! out (the server did the work, the client never hears). Clients retry with the same
//! idempotency token until they get an answer, and some fire several copies at once.
//!
//! Everything printed is counted from real calls: requests the clients sent, handler calls
//! that reached the server, rows in the `orders` table, and responses that idem replayed.
//!
//! ```text
//! cargo run --example orders
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use idem_runtime::store::SqliteStore;
use idem_runtime::{Error, Idem, Outcome, idempotent, observe};
use serde::{Deserialize, Serialize};
use sqlx::SqlitePool;

const CUSTOMERS: u64 = 200;
const DROP_REQUEST: f64 = 0.3;
const DROP_RESPONSE: f64 = 0.3;
/// Every fifth customer fires this many copies of its first attempt at once.
const STORM: usize = 4;

#[derive(Debug, Clone, Serialize)]
struct CreateOrder {
    customer_id: u64,
    client_token: String,
    sku: String,
    quantity: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    order_id: i64,
    customer_id: u64,
    sku: String,
    quantity: u32,
}

#[derive(Debug)]
enum ApiError {
    Idem(Error),
    Db(sqlx::Error),
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError::Idem(e)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Db(e)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiError::Idem(e) => write!(f, "{} {}", e.http_status(), e),
            ApiError::Db(e) => write!(f, "500 database error: {e}"),
        }
    }
}

/// The handler. The token is unique per customer and the scope is the customer, so two
/// customers that happen to pick the same token never see each other's orders.
#[idempotent(key = req.client_token, scope = req.customer_id, ttl = "PT24H", skip(db))]
async fn create_order(db: &SqlitePool, req: CreateOrder) -> Result<Order, ApiError> {
    // The side effect that must happen once: a row in the orders table.
    let order_id: i64 = sqlx::query_scalar(
        "INSERT INTO orders (customer_id, sku, quantity) VALUES (?1, ?2, ?3) RETURNING id",
    )
    .bind(req.customer_id as i64)
    .bind(&req.sku)
    .bind(req.quantity)
    .fetch_one(db)
    .await?;
    // Some work after the effect, so concurrent duplicates overlap with it.
    tokio::time::sleep(Duration::from_millis(5)).await;
    Ok(Order {
        order_id,
        customer_id: req.customer_id,
        sku: req.sku,
        quantity: req.quantity,
    })
}

#[derive(Default)]
struct Tally {
    sent: AtomicUsize,
    reached_server: AtomicUsize,
    replays: AtomicUsize,
    executed: AtomicUsize,
    lost_responses: AtomicUsize,
}

/// One request over the lossy link. `None` when the client heard nothing back.
async fn send(
    db: &SqlitePool,
    req: &CreateOrder,
    tally: &Tally,
    rng: &mut fastrand::Rng,
) -> Option<Result<Order, ApiError>> {
    tally.sent.fetch_add(1, Relaxed);
    if rng.f64() < DROP_REQUEST {
        return None;
    }
    tally.reached_server.fetch_add(1, Relaxed);
    let (result, outcome) = observe(create_order(db, req.clone())).await;
    match outcome {
        Some(o) if o.is_replay() => tally.replays.fetch_add(1, Relaxed),
        Some(Outcome::Executed | Outcome::TookOver) => tally.executed.fetch_add(1, Relaxed),
        _ => 0,
    };
    if rng.f64() < DROP_RESPONSE {
        tally.lost_responses.fetch_add(1, Relaxed);
        return None;
    }
    Some(result)
}

/// A client: retries with the same token until it hears back.
async fn client(db: SqlitePool, customer_id: u64, tally: Arc<Tally>) -> Order {
    let mut rng = fastrand::Rng::with_seed(customer_id);
    let req = CreateOrder {
        customer_id,
        client_token: format!("tok-{:08x}", rng.u32(..)),
        sku: format!("sku-{}", customer_id % 7),
        quantity: 1 + (customer_id % 3) as u32,
    };
    if customer_id.is_multiple_of(5) {
        // An impatient client: several copies of the same request at once.
        let copies = (0..STORM).map(|i| {
            let (db, req, tally) = (db.clone(), req.clone(), tally.clone());
            tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(customer_id * 1_000 + i as u64);
                send(&db, &req, &tally, &mut rng).await
            })
        });
        for copy in copies {
            if let Ok(Some(Ok(order))) = copy.await {
                return order;
            }
        }
    }
    let mut backoff = Duration::from_millis(2);
    loop {
        match send(&db, &req, &tally, &mut rng).await {
            Some(Ok(order)) => return order,
            Some(Err(ApiError::Idem(e))) if e.http_status() == 409 => {}
            Some(Err(e)) => panic!("customer {customer_id}: {e}"),
            None => {}
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(50));
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("idem-demo.db");
    let store = SqliteStore::open(&path).await?;
    let db = store.pool().clone();
    sqlx::query(
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL,
                              sku TEXT NOT NULL, quantity INTEGER NOT NULL)",
    )
    .execute(&db)
    .await?;
    Idem::builder()
        .store(store)
        .default_ttl("PT24H")
        .install()?;

    println!("idem demo: an order service on SQLite ({})", path.display());
    println!(
        "{CUSTOMERS} customers place one order each over a link that drops {:.0}% of requests and {:.0}% of responses;",
        DROP_REQUEST * 100.0,
        DROP_RESPONSE * 100.0
    );
    println!("clients retry with the same token, and every fifth fires {STORM} copies at once.\n");

    let tally = Arc::new(Tally::default());
    let clients: Vec<_> = (1..=CUSTOMERS)
        .map(|c| tokio::spawn(client(db.clone(), c, tally.clone())))
        .collect();
    let mut answers = Vec::new();
    for c in clients {
        answers.push(c.await?);
    }
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orders")
        .fetch_one(&db)
        .await?;
    let distinct_ids = {
        let mut ids: Vec<i64> = answers.iter().map(|o| o.order_id).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    };

    println!(
        "requests sent by clients          {:>6}",
        tally.sent.load(Relaxed)
    );
    println!(
        "requests that reached the server  {:>6}",
        tally.reached_server.load(Relaxed)
    );
    println!(
        "responses lost on the way back    {:>6}",
        tally.lost_responses.load(Relaxed)
    );
    println!(
        "bodies executed (orders created)  {:>6}",
        tally.executed.load(Relaxed)
    );
    println!("rows in the orders table          {rows:>6}");
    println!(
        "responses that were replays       {:>6}",
        tally.replays.load(Relaxed)
    );
    println!("customers with an order           {:>6}", answers.len());
    println!("distinct order ids they were told {distinct_ids:>6}");

    // A client bug: the same token reused for a different order.
    let first = &answers[0];
    let reused = CreateOrder {
        customer_id: first.customer_id,
        client_token: {
            let mut rng = fastrand::Rng::with_seed(first.customer_id);
            format!("tok-{:08x}", rng.u32(..))
        },
        sku: "sku-something-else".into(),
        quantity: 99,
    };
    match create_order(&db, reused).await {
        Err(e) => println!("\nsame token, different order ->\n  {e}"),
        Ok(order) => println!("\nsame token, different order -> unexpectedly accepted: {order:?}"),
    }

    let ok = rows == CUSTOMERS as i64 && distinct_ids == CUSTOMERS as usize;
    println!(
        "\n{}",
        if ok {
            "exactly one order per customer, and every retry got that order back."
        } else {
            "MISMATCH: idem failed to deduplicate."
        }
    );
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
