//! Requests per second through a route with and without `IdempotencyLayer`, on loopback, in
//! alternating rounds of one run: SQLite and PostgreSQL stores, a fresh key per request
//! (every request is a first execution: reserve, route, finalize).
//!
//! On PostgreSQL, a route inserting a row four ways, alternating: bare (no key), under the
//! leased layer, under the transactional layer (the row in the layer's transaction), and the
//! floor the transactional layer is measured against: the same route written by hand the
//! way careful teams do it without a library (BEGIN; insert the key row; the route's insert;
//! store the response; COMMIT).
//!
//! `cargo bench -p idem-runtime --features axum,postgres --bench http`

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{median, median_ratio, rate};

use axum::Router;
use axum::routing::post;
use idem_runtime::Idem;
use idem_runtime::http::{IdemTx, IdempotencyLayer};
use idem_runtime::store::Store;

const ROUND: Duration = Duration::from_secs(2);
const ROUNDS: usize = 3;
/// The transactional comparison's rounds: its ratios are the close ones.
const TX_ROUNDS: usize = 9;
const CLIENTS: usize = 16;

async fn create_order(body: String) -> (axum::http::StatusCode, String) {
    (
        axum::http::StatusCode::CREATED,
        format!(r#"{{"order":{},"ok":true}}"#, body.len()),
    )
}

/// A route with real work: one order row in the same database as the idem records.
#[derive(Clone)]
enum Db {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

async fn insert_order(
    axum::extract::State(db): axum::extract::State<Db>,
    body: String,
) -> (axum::http::StatusCode, String) {
    let len = body.len() as i64;
    match &db {
        Db::Sqlite(p) => sqlx::query("INSERT INTO bench_http_orders (len) VALUES (?1)")
            .bind(len)
            .execute(p)
            .await
            .map(drop),
        Db::Postgres(p) => sqlx::query("INSERT INTO bench_http_orders (len) VALUES ($1)")
            .bind(len)
            .execute(p)
            .await
            .map(drop),
    }
    .expect("insert");
    (
        axum::http::StatusCode::CREATED,
        format!(r#"{{"order":{len}}}"#),
    )
}

/// The route inserting a row in the transactional layer's transaction.
async fn insert_order_tx(
    mut tx: IdemTx<sqlx::Postgres>,
    body: String,
) -> (axum::http::StatusCode, String) {
    let len = body.len() as i64;
    sqlx::query("INSERT INTO bench_http_orders (len) VALUES ($1)")
        .bind(len)
        .execute(&mut *tx)
        .await
        .expect("insert");
    (
        axum::http::StatusCode::CREATED,
        format!(r#"{{"order":{len}}}"#),
    )
}

/// The floor: the same route made idempotent by hand, in one transaction. (A key that is
/// already there would be answered from its row; with fresh keys it never is.)
async fn insert_order_by_hand(
    axum::extract::State(pool): axum::extract::State<sqlx::PgPool>,
    headers: axum::http::HeaderMap,
    body: String,
) -> (axum::http::StatusCode, String) {
    let key = headers["idempotency-key"].to_str().expect("key").to_owned();
    let mut tx = pool.begin().await.expect("begin");
    let fresh = sqlx::query("INSERT INTO bench_http_keys (key) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(&key)
        .execute(&mut *tx)
        .await
        .expect("key row");
    assert_eq!(fresh.rows_affected(), 1, "fresh keys only");
    let len = body.len() as i64;
    sqlx::query("INSERT INTO bench_http_orders (len) VALUES ($1)")
        .bind(len)
        .execute(&mut *tx)
        .await
        .expect("insert");
    let response = format!(r#"{{"order":{len}}}"#);
    sqlx::query("UPDATE bench_http_keys SET status = 201, body = $2 WHERE key = $1")
        .bind(&key)
        .bind(&response)
        .execute(&mut *tx)
        .await
        .expect("response");
    tx.commit().await.expect("commit");
    (axum::http::StatusCode::CREATED, response)
}

/// The four ways of the route inserting a row, on PostgreSQL.
async fn serve_transactional(pg: idem_runtime::store::PgStore) -> String {
    let pool = pg.pool().clone();
    for create in [
        "CREATE TABLE IF NOT EXISTS bench_http_orders (len BIGINT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS bench_http_keys (key TEXT PRIMARY KEY, status INT, body TEXT)",
    ] {
        sqlx::query(create).execute(&pool).await.expect("table");
    }
    let idem = Idem::builder().store(pg).build().expect("idem");
    let leased = IdempotencyLayer::new(idem);
    let transactional = leased.clone().transactional();
    let app = Router::new()
        .route("/bare", post(insert_order))
        .route("/leased", post(insert_order).layer(leased))
        .with_state(Db::Postgres(pool.clone()))
        .route("/transactional", post(insert_order_tx).layer(transactional))
        .route("/floor", post(insert_order_by_hand).with_state(pool));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

async fn compare_transactional(pg: idem_runtime::store::PgStore) {
    let pool = pg.pool().clone();
    let base = serve_transactional(pg).await;
    let client = reqwest::Client::new();
    let ways = [
        ("bare", Keys::None),
        ("floor", Keys::Fresh),
        ("leased", Keys::Fresh),
        ("transactional", Keys::Fresh),
    ];
    // For profiling one way alone: IDEM_BENCH_HTTP_WAY=transactional.
    if let Ok(way) = std::env::var("IDEM_BENCH_HTTP_WAY") {
        let keys = ways.iter().find(|w| w.0 == way).expect("a way").1;
        for _ in 0..ROUNDS * 4 {
            let rate = rate_of(&client, &format!("{base}/{way}"), keys).await;
            println!("{way}: {rate:.0} req/s");
        }
        return;
    }
    let mut rates = vec![Vec::new(); ways.len()];
    for _ in 0..TX_ROUNDS {
        for ((path, keys), rates) in ways.iter().zip(&mut rates) {
            // Each round starts from a clean checkpoint, so none pays for another's writes
            // (ignored where the role may not checkpoint).
            let _ = sqlx::raw_sql("CHECKPOINT").execute(&pool).await;
            rates.push(rate_of(&client, &format!("{base}/{path}"), *keys).await);
        }
    }
    let [bare, floor, leased, tx] = [0, 1, 2, 3].map(|i| median(rates[i].clone()));
    println!(
        "PostgreSQL, route inserting a row, fresh keys: bare {bare:.0} req/s, by hand in one transaction (floor) {floor:.0}, leased layer {leased:.0}, transactional layer {tx:.0}"
    );
    // Each ratio: the median over rounds of the two ways' rates in that round.
    let ratio = |a: usize, b: usize| median_ratio(&rates[a], &rates[b]);
    println!(
        "  transactional / floor = {:.2}, transactional / bare = {:.2}, transactional / leased = {:.2}, leased / bare = {:.2}",
        ratio(3, 1),
        ratio(3, 0),
        ratio(3, 2),
        ratio(2, 0)
    );
}

async fn serve(store: Arc<dyn Store>, db: Db) -> String {
    let create = "CREATE TABLE IF NOT EXISTS bench_http_orders (len BIGINT NOT NULL)";
    match &db {
        Db::Sqlite(p) => sqlx::query(create).execute(p).await.map(drop),
        Db::Postgres(p) => sqlx::query(create).execute(p).await.map(drop),
    }
    .expect("orders table");
    let idem = Idem::builder().shared_store(store).build().expect("idem");
    let layer = IdempotencyLayer::new(idem);
    let app = Router::new()
        .route("/plain", post(create_order))
        .route("/idem", post(create_order).layer(layer.clone()))
        .route("/plain-db", post(insert_order))
        .route("/idem-db", post(insert_order).layer(layer))
        .with_state(db);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[derive(Clone, Copy, PartialEq)]
enum Keys {
    None,
    Fresh,
    Same,
}

async fn rate_of(client: &reqwest::Client, url: &str, keys: Keys) -> f64 {
    let (client, url) = (client.clone(), url.to_string());
    rate(CLIENTS, ROUND, move |n| {
        let mut req = client.post(&url).body(r#"{"sku":"tea","quantity":1}"#);
        match keys {
            Keys::None => {}
            Keys::Fresh => {
                let key = format!("k-{}-{n}", fastrand::u64(..));
                req = req.header("Idempotency-Key", key);
            }
            Keys::Same => req = req.header("Idempotency-Key", "the-same-key"),
        }
        async move {
            let resp = req.send().await.expect("request");
            assert_eq!(resp.status(), 201);
            resp.bytes().await.expect("body");
        }
    })
    .await
}

async fn compare(name: &str, store: Arc<dyn Store>, db: Db) {
    let base = serve(store, db).await;
    let client = reqwest::Client::new();
    for (what, plain_path, idem_path, keys) in [
        ("empty route, fresh keys", "/plain", "/idem", Keys::Fresh),
        ("empty route, replays", "/plain", "/idem", Keys::Same),
        (
            "route inserting a row, fresh keys",
            "/plain-db",
            "/idem-db",
            Keys::Fresh,
        ),
    ] {
        let (mut plain, mut idem) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            plain.push(rate_of(&client, &format!("{base}{plain_path}"), Keys::None).await);
            idem.push(rate_of(&client, &format!("{base}{idem_path}"), keys).await);
        }
        let ratio = median_ratio(&idem, &plain);
        let (plain, idem) = (median(plain), median(idem));
        println!(
            "{name:<28} {what:<34} with the layer {idem:>7.0} req/s, without {plain:>7.0} req/s = {ratio:.2}"
        );
    }
}

fn main() {
    common::runtime().block_on(async {
        println!("== HTTP on loopback, {CLIENTS} clients, fresh key per request ({ROUNDS} alternating rounds of {ROUND:?})");
        let dir = tempfile::tempdir().expect("dir");
        let sqlite = idem_runtime::store::SqliteStore::open(dir.path().join("http.db")).await.expect("sqlite");
        let db = Db::Sqlite(sqlite.pool().clone());
        let one_way = std::env::var("IDEM_BENCH_HTTP_WAY").is_ok();
        if !one_way {
            compare("SQLite", Arc::new(sqlite), db).await;
        }
        let url = std::env::var("IDEM_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let table = format!("bench_http_{:08x}", fastrand::u32(..));
        let options = idem_runtime::store::PgStoreOptions::new().table(&table);
        match idem_runtime::store::PgStore::connect_with(&url, options).await {
            Ok(pg) => {
                let pool = pg.pool().clone();
                if !one_way {
                    compare("PostgreSQL", Arc::new(pg.clone()), Db::Postgres(pool.clone())).await;
                }
                compare_transactional(pg).await;
                for t in [table.as_str(), "bench_http_orders", "bench_http_keys"] {
                    let sql = sqlx::AssertSqlSafe(format!("DROP TABLE IF EXISTS {t}"));
                    let _ = sqlx::raw_sql(sql).execute(&pool).await;
                }
            }
            Err(e) => println!("PostgreSQL: skipped ({e})"),
        }
    });
}
