//! A queue consumer that is exactly once for its database effects.
//!
//! The broker is an in-process channel with at-least-once delivery: it redelivers every
//! message that is not acknowledged in time, and sometimes delivers a message twice. The
//! consumers write an order row for each message through an `#[idempotent(tx = tx)]` fn, so
//! the idempotency record and the order row are written in the same transaction. Consumers
//! also "crash": some between the effect and the commit (the transaction is dropped, so the
//! row and the record roll back together), some between the commit and the ack (the message
//! comes back and is replayed, not re-applied).
//!
//! ```text
//! cargo run --example consumer                      # SQLite, no server
//! cargo run --example consumer -- postgres://postgres@127.0.0.1:5432/test
//! ```
//!
//! `consumer crash-worker ...` is a mode for `tests/crash.rs`, which SIGKILLs real processes
//! between the effect and the commit.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_runtime::{Error, Idem, Outcome, idempotent, observe};
use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, Database, Pool, Transaction};

const MESSAGES: u64 = 300;
const CONSUMERS: usize = 4;

#[derive(Clone, Debug, Serialize)]
struct Message {
    id: u64,
    sku: String,
    quantity: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Confirmation {
    order_id: u64,
    message_id: u64,
}

#[derive(Debug)]
enum AppError {
    Idem(Error),
    Db(sqlx::Error),
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
        }
    }
}

/// The SQL that differs between databases: placeholders and how to begin a transaction.
trait Dialect: Database {
    const INSERT: &'static str;
    const BEGIN: &'static str;
}

impl Dialect for sqlx::Sqlite {
    const INSERT: &'static str = "INSERT INTO {} (message_id, sku, quantity) VALUES (?1, ?2, ?3)";
    // SQLite has one writer: take the write lock up front so two transactions never wait
    // on each other to upgrade a read lock.
    const BEGIN: &'static str = "BEGIN IMMEDIATE";
}

impl Dialect for sqlx::Postgres {
    const INSERT: &'static str = "INSERT INTO {} (message_id, sku, quantity) VALUES ($1, $2, $3)";
    const BEGIN: &'static str = "BEGIN";
}

impl Dialect for sqlx::MySql {
    const INSERT: &'static str = "INSERT INTO {} (message_id, sku, quantity) VALUES (?, ?, ?)";
    const BEGIN: &'static str = "BEGIN";
}

/// The handler: one order row per message, in the caller's transaction, with the record.
#[idempotent(key = msg.id, tx = tx, runtime = idem, skip(orders, effects))]
async fn apply<DB>(
    idem: &Idem,
    tx: &mut Transaction<'_, DB>,
    orders: &str,
    effects: &AtomicUsize,
    msg: &Message,
) -> Result<Confirmation, AppError>
where
    DB: Dialect + idem_runtime::TxDatabase,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
{
    effects.fetch_add(1, Relaxed);
    let sql = DB::INSERT.replace("{}", orders);
    sqlx::query(AssertSqlSafe(sql))
        .bind(msg.id as i64)
        .bind(msg.sku.as_str())
        .bind(i64::from(msg.quantity))
        .execute(&mut **tx)
        .await?;
    // An id the caller keeps: each body run gets a fresh one, so a replay is recognisable.
    Ok(Confirmation {
        order_id: effects.load(Relaxed) as u64 * 1_000_000 + msg.id,
        message_id: msg.id,
    })
}

#[derive(Default)]
struct Tally {
    deliveries: AtomicUsize,
    effects: AtomicUsize,
    replays: AtomicUsize,
    crashed_before_commit: AtomicUsize,
    crashed_before_ack: AtomicUsize,
}

/// At-least-once delivery: unacked messages come back, and some arrive twice.
struct Broker {
    unacked: Mutex<HashSet<u64>>,
    tx: tokio::sync::mpsc::UnboundedSender<Message>,
}

impl Broker {
    fn deliver(&self, msg: &Message, tally: &Tally) {
        tally.deliveries.fetch_add(1, Relaxed);
        let _ = self.tx.send(msg.clone());
    }

    fn ack(&self, id: u64) {
        self.unacked.lock().expect("broker").remove(&id);
    }
}

async fn consume<DB>(
    idem: Idem,
    pool: Pool<DB>,
    orders: String,
    broker: Arc<Broker>,
    rx: Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Message>>>,
    tally: Arc<Tally>,
    seed: u64,
) where
    DB: Dialect + idem_runtime::TxDatabase,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
{
    let mut rng = fastrand::Rng::with_seed(seed);
    loop {
        let msg = {
            let mut rx = rx.lock().await;
            match tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
                Ok(Some(m)) => m,
                _ => return,
            }
        };
        let mut tx = pool.begin_with(DB::BEGIN).await.expect("begin");
        let (out, how) = observe(apply(&idem, &mut tx, &orders, &tally.effects, &msg)).await;
        let confirmation = match out {
            Ok(c) => c,
            Err(e) => {
                // Nothing is committed: the message will be redelivered.
                eprintln!("message {}: {e}", msg.id);
                continue;
            }
        };
        if rng.f64() < 0.1 {
            // Crash between the effect and the commit: the transaction is dropped.
            tally.crashed_before_commit.fetch_add(1, Relaxed);
            drop(tx);
            continue;
        }
        tx.commit().await.expect("commit");
        if how.is_some_and(Outcome::is_replay) {
            tally.replays.fetch_add(1, Relaxed);
        }
        let _ = confirmation;
        if rng.f64() < 0.1 {
            // Crash between the commit and the ack: the broker will deliver it again.
            tally.crashed_before_ack.fetch_add(1, Relaxed);
            continue;
        }
        broker.ack(msg.id);
    }
}

async fn demo<DB>(
    idem: Idem,
    pool: Pool<DB>,
    orders: String,
) -> Result<(), Box<dyn std::error::Error>>
where
    DB: Dialect + idem_runtime::TxDatabase,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
    for<'r> i64: sqlx::Decode<'r, DB>,
    (i64,): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    let messages: Vec<Message> = (1..=MESSAGES)
        .map(|id| Message {
            id,
            sku: format!("sku-{}", id % 9),
            quantity: 1 + (id % 4) as u32,
        })
        .collect();
    let broker = Arc::new(Broker {
        unacked: Mutex::new(messages.iter().map(|m| m.id).collect()),
        tx: sender,
    });
    let tally = Arc::new(Tally::default());
    let mut rng = fastrand::Rng::with_seed(7);
    for m in &messages {
        broker.deliver(m, &tally);
        if rng.f64() < 0.2 {
            broker.deliver(m, &tally); // a duplicate delivery
        }
    }
    let rx = Arc::new(tokio::sync::Mutex::new(receiver));
    let by_id: HashMap<u64, Message> = messages.iter().map(|m| (m.id, m.clone())).collect();
    loop {
        let consumers: Vec<_> = (0..CONSUMERS)
            .map(|i| {
                tokio::spawn(consume(
                    idem.clone(),
                    pool.clone(),
                    orders.clone(),
                    broker.clone(),
                    rx.clone(),
                    tally.clone(),
                    i as u64 + rng.u64(..),
                ))
            })
            .collect();
        for c in consumers {
            c.await?;
        }
        // Redeliver whatever was not acknowledged.
        let unacked: Vec<u64> = broker
            .unacked
            .lock()
            .expect("broker")
            .iter()
            .copied()
            .collect();
        if unacked.is_empty() {
            break;
        }
        for id in unacked {
            broker.deliver(&by_id[&id], &tally);
        }
    }
    let rows: (i64,) = sqlx::query_as(AssertSqlSafe(format!("SELECT COUNT(*) FROM {orders}")))
        .fetch_one(&pool)
        .await?;
    let distinct: (i64,) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT COUNT(DISTINCT message_id) FROM {orders}"
    )))
    .fetch_one(&pool)
    .await?;
    println!("messages                               {MESSAGES:>6}");
    println!(
        "deliveries (redeliveries, duplicates)  {:>6}",
        tally.deliveries.load(Relaxed)
    );
    println!(
        "bodies run (effects attempted)         {:>6}",
        tally.effects.load(Relaxed)
    );
    println!(
        "crashes between effect and commit      {:>6}  (rolled back with their record)",
        tally.crashed_before_commit.load(Relaxed)
    );
    println!(
        "crashes between commit and ack         {:>6}  (redelivered, then replayed)",
        tally.crashed_before_ack.load(Relaxed)
    );
    println!(
        "deliveries answered by a replay        {:>6}",
        tally.replays.load(Relaxed)
    );
    println!("rows in the orders table               {:>6}", rows.0);
    println!("distinct messages in the orders table  {:>6}", distinct.0);
    if rows.0 == MESSAGES as i64 && distinct.0 == MESSAGES as i64 {
        println!("\nexactly one order row per message.");
        Ok(())
    } else {
        Err("the orders table does not hold one row per message".into())
    }
}

/// For `tests/crash.rs`: applies messages `0..keys` one by one, each in its own transaction,
/// printing `DONE <id> <order_id> <outcome>` after each commit. With `--hang-before-commit
/// N` it stops forever between message N's effect and its commit (printing `HANG N`), so
/// the test can SIGKILL it there; `--hang-after-commit N` stops after the commit instead.
async fn crash_worker<DB>(
    idem: Idem,
    pool: Pool<DB>,
    orders: String,
    args: &[String],
) -> Result<(), Box<dyn std::error::Error>>
where
    DB: Dialect + idem_runtime::TxDatabase,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
{
    let flag = |name: &str| -> Option<u64> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
    };
    let keys = flag("--keys").unwrap_or(10);
    let hang_before = flag("--hang-before-commit");
    let hang_after = flag("--hang-after-commit");
    let effects = AtomicUsize::new(0);
    println!("READY");
    for id in 0..keys {
        let msg = Message {
            id,
            sku: format!("sku-{}", id % 9),
            quantity: 1,
        };
        let mut tx = pool.begin_with(DB::BEGIN).await?;
        let (out, how) = observe(apply(&idem, &mut tx, &orders, &effects, &msg)).await;
        let confirmation = out.map_err(|e| e.to_string())?;
        if hang_before == Some(id) {
            println!("HANG {id}");
            std::future::pending::<()>().await;
        }
        tx.commit().await?;
        println!(
            "DONE {id} {} {}",
            confirmation.order_id,
            how.map_or("-", Outcome::as_str)
        );
        if hang_after == Some(id) {
            println!("HANG {id}");
            std::future::pending::<()>().await;
        }
    }
    println!("FINISHED");
    Ok(())
}

async fn run_on<DB>(
    idem: Idem,
    pool: Pool<DB>,
    table: &str,
    args: &[String],
) -> Result<(), Box<dyn std::error::Error>>
where
    DB: Dialect + idem_runtime::TxDatabase,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
    for<'r> i64: sqlx::Decode<'r, DB>,
    (i64,): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let orders = format!("{table}_orders");
    let create = format!(
        "CREATE TABLE IF NOT EXISTS {orders} (message_id BIGINT NOT NULL, sku VARCHAR(64) NOT NULL, quantity BIGINT NOT NULL)"
    );
    sqlx::raw_sql(AssertSqlSafe(create)).execute(&pool).await?;
    if args.first().map(String::as_str) == Some("crash-worker") {
        crash_worker(idem, pool, orders, args).await
    } else {
        let out = demo(idem, pool.clone(), orders.clone()).await;
        for t in [orders, table.to_string()] {
            let _ = sqlx::raw_sql(AssertSqlSafe(format!("DROP TABLE IF EXISTS {t}")))
                .execute(&pool)
                .await;
        }
        out
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let store = flag("--store").or_else(|| args.first().filter(|a| a.contains("://")).cloned());
    let table = flag("--table").unwrap_or_else(|| format!("consumer_{:08x}", fastrand::u32(..)));
    let dir = tempfile::tempdir()?;
    let store =
        store.unwrap_or_else(|| format!("sqlite://{}", dir.path().join("consumer.db").display()));
    println!("idem consumer demo on {store}");
    if let Some(path) = store.strip_prefix("sqlite://") {
        let options = idem_runtime::store::SqliteStoreOptions::new().table(&table);
        let s = idem_runtime::store::SqliteStore::open_with(path, options).await?;
        let pool = s.pool().clone();
        let idem = Idem::builder().store(s).build()?;
        run_on(idem, pool, &table, &args).await
    } else if store.starts_with("postgres") {
        let options = idem_runtime::store::PgStoreOptions::new().table(&table);
        let s = idem_runtime::store::PgStore::connect_with(&store, options).await?;
        let pool = s.pool().clone();
        let idem = Idem::builder().store(s).build()?;
        run_on(idem, pool, &table, &args).await
    } else if store.starts_with("mysql") {
        let options = idem_runtime::store::MySqlStoreOptions::new().table(&table);
        let s = idem_runtime::store::MySqlStore::connect_with(&store, options).await?;
        let pool = s.pool().clone();
        let idem = Idem::builder().store(s).build()?;
        run_on(idem, pool, &table, &args).await
    } else {
        Err(format!("unsupported store {store}").into())
    }
}
