//! The layer's transactional mode ([`IdempotencyLayer::transactional`](super::IdempotencyLayer::transactional)):
//! the record and the route's own writes commit in one database transaction.
//!
//! For a request with a key the layer begins a transaction on a connection of the store's
//! pool, reserves the record in it (the same statements and decisions as `#[idempotent(tx =
//! ..)]`), lends the transaction to the route through the [`IdemTx`] extractor, reads the
//! route's whole response (bounded by `max_response_bytes`), records it in the same
//! transaction and commits; only then does the response go out. A duplicate sent meanwhile
//! blocks on the record's row inside the database and, once the first transaction ends,
//! replays its committed response, or runs the route itself if the first rolled back.
//!
//! A response the layer does not store (5xx, 401, 403, 408, 429 by default), one over the size
//! limit, a broken body, or a failed record: the transaction rolls back with everything the
//! route wrote, and the key stays free. A failed commit is [`Error::NotCommitted`] (503): the
//! route's response is never sent for writes that were not kept.
//!
//! A route should return its database errors, not go on past them. One that does: on
//! PostgreSQL the failed statement aborted the transaction, so nothing the route wrote is kept;
//! a success answer becomes a 500 (`transaction-aborted`) and an error answer goes out
//! unrecorded. On MySQL/MariaDB a deadlock rolls back the whole transaction (as SQLite does
//! after a full disk or an I/O error), and later statements run outside any transaction (as
//! with any sqlx transaction): the record's fenced write then finds no reservation, so the
//! client gets a 503 and nothing is recorded, but what the route wrote after the deadlock
//! stays. A request that records nothing (no key, idem switched off) has no fenced write to
//! find that out: it carries a savepoint of the layer's instead, released before a success
//! goes out (PostgreSQL answers the `COMMIT` of an aborted transaction with a rollback that
//! is not an error).

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{Request, Response, StatusCode};
use axum::response::IntoResponse;
use http_body_util::BodyExt;
use sqlx::{Database, Transaction};
use tower::{Service, ServiceExt};
use tracing::Instrument;

use super::Config;
use super::problem::{error_response, problem};
use super::service::{call_for, into_response, read_body};
use super::stored::StoredResponse;
use crate::Error;
use crate::codec::ValuesOnly;
use crate::engine::detach::Detach;
use crate::engine::tx::{self, TxBegin, TxDatabase};
use crate::engine::{Call, Spec};
use crate::error::StoreError;
use crate::store::{Store, TxStatements};

/// The layer's database transaction, lent to a route: use it like a `&mut
/// sqlx::Transaction` (`sqlx::query(..).execute(&mut *tx)`).
///
/// A route wrapped in a transactional [`IdempotencyLayer`](super::IdempotencyLayer) takes it as
/// an argument; its writes then commit together with the recorded response, once per key, or
/// not at all. The layer commits or rolls back after the route returns: the route does
/// neither, and must not keep the transaction beyond its response (a route that does gets a
/// 500 and nothing is committed). Savepoints (`tx.begin()`) work as usual, and
/// [`IdemTx::transaction`] hands the transaction itself to code that takes one, such as an
/// `#[idempotent(tx = ..)]` fn.
///
/// ```no_run
/// # #[cfg(feature = "postgres")]
/// # mod demo {
/// use idem_runtime::http::IdemTx;
/// use sqlx::Postgres;
///
/// async fn pay(mut tx: IdemTx<Postgres>, body: String) -> (axum::http::StatusCode, String) {
///     sqlx::query("INSERT INTO ledger (entry) VALUES ($1)")
///         .bind(&body)
///         .execute(&mut *tx)
///         .await
///         .unwrap();
///     (axum::http::StatusCode::CREATED, "paid".into())
/// }
/// # }
/// ```
///
/// On a route without a transactional layer (or with one on another database) extracting it
/// fails with a 500 problem document that says so.
pub struct IdemTx<DB: Database> {
    /// `Some` from extraction until drop, when it goes back to the layer.
    tx: Option<Transaction<'static, DB>>,
    slot: Slot<DB>,
}

/// Where the layer keeps its transaction while the route has it.
type Slot<DB> = Arc<Mutex<Option<Transaction<'static, DB>>>>;

/// The request extension the layer lends its transaction through.
struct Lent<DB: Database>(Slot<DB>);

impl<DB: Database> Clone for Lent<DB> {
    fn clone(&self) -> Self {
        Lent(self.0.clone())
    }
}

const HELD: &str = "an IdemTx holds its transaction until it is dropped";

impl<DB: Database> IdemTx<DB> {
    /// The transaction itself, for code that takes a `&mut sqlx::Transaction`.
    pub fn transaction(&mut self) -> &mut Transaction<'static, DB> {
        self.tx.as_mut().expect(HELD)
    }
}

impl<DB: Database> Deref for IdemTx<DB> {
    type Target = DB::Connection;
    fn deref(&self) -> &DB::Connection {
        self.tx.as_ref().expect(HELD)
    }
}

impl<DB: Database> DerefMut for IdemTx<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        self.tx.as_mut().expect(HELD)
    }
}

impl<DB: Database> Drop for IdemTx<DB> {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        }
    }
}

impl<DB: Database> std::fmt::Debug for IdemTx<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdemTx")
            .field("database", &DB::NAME)
            .finish_non_exhaustive()
    }
}

impl<DB: Database, S: Send + Sync> FromRequestParts<S> for IdemTx<DB> {
    type Rejection = Response<Body>;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response<Body>> {
        let refused = |detail: String| {
            let title = "No idempotency transaction for this route";
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "no-transaction",
                title,
                &detail,
            )
        };
        let Some(Lent(slot)) = parts.extensions.get::<Lent<DB>>().cloned() else {
            return Err(refused(format!(
                "`IdemTx<{}>` needs the route wrapped in `IdempotencyLayer::transactional()` on a {} store",
                DB::NAME,
                DB::NAME
            )));
        };
        let tx = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        match tx {
            Some(tx) => Ok(IdemTx { tx: Some(tx), slot }),
            None => Err(refused(
                "the route takes `IdemTx` more than once; take it once and pass it on".into(),
            )),
        }
    }
}

/// A request in the layer's transactional mode, finished in a task of its own if the client
/// hangs up: that does not cancel a route whose transaction is about to commit.
pub(super) async fn handle<S>(
    mode: Arc<dyn Mode>,
    config: Arc<Config>,
    inner: S,
    parts: Parts,
    body: Body,
    key: Option<String>,
) -> Response<Body>
where
    S: Service<Request<Body>, Error = Infallible> + Send + 'static,
    S::Response: IntoResponse,
    S::Future: Send + 'static,
{
    let (body, call) = match key {
        None => (body, None),
        Some(key) => {
            let bytes = match read_body(body, config.max_request_bytes).await {
                Ok(bytes) => bytes,
                Err(refused) => return refused,
            };
            let call = call_for(&config, &parts, key, &bytes);
            (Body::from(bytes), Some(call))
        }
    };
    let route: Route =
        Box::new(move |req| Box::pin(async move { into_response(inner.oneshot(req).await) }));
    let job = Job {
        config,
        route,
        parts,
        body,
        call,
    };
    // Run here; if the client hangs up, the rest goes on in a task of its own (in the
    // request's span; task-local values of outer layers do not follow it there).
    let run = mode.run(job).in_current_span();
    match Detach::new(tokio::runtime::Handle::current(), run).await {
        Ok(response) => response,
        // The route (or the layer after it) panicked; the transaction rolled back as it
        // unwound.
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Whether recording failed because the route's transaction was already aborted: on
/// PostgreSQL a failed statement aborts the transaction, and every later one is refused with
/// SQLSTATE 25P02 until it rolls back.
fn aborted(e: &Error) -> bool {
    let Error::StoreUnavailable { source, .. } = e else {
        return false;
    };
    matches!(source.downcast_ref::<sqlx::Error>(),
        Some(sqlx::Error::Database(db)) if db.code().as_deref() == Some("25P02"))
}

/// The route a transactional request runs: the inner service, boxed so that the database's
/// type can be chosen when the layer is built.
pub(super) type Route =
    Box<dyn FnOnce(Request<Body>) -> BoxFuture<Response<Body>> + Send + 'static>;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// One request for the transactional mode.
pub(super) struct Job {
    pub(super) config: Arc<Config>,
    pub(super) route: Route,
    pub(super) parts: Parts,
    pub(super) body: Body,
    /// `None`: a request without a key on a layer that does not require one; the route still
    /// gets its transaction, but nothing is recorded.
    pub(super) call: Option<Call>,
}

/// The transactional mode for one database.
pub(super) trait Mode: Send + Sync {
    fn run(&self, job: Job) -> BoxFuture<Response<Body>>;
}

struct For<DB>(PhantomData<fn() -> DB>);

impl<DB: TxDatabase> Mode for For<DB> {
    fn run(&self, job: Job) -> BoxFuture<Response<Body>> {
        Box::pin(run::<DB>(job))
    }
}

/// The mode for `store`'s database; `None` for a store that cannot lend a transaction.
pub(super) fn mode_for(store: &dyn Store) -> Option<Arc<dyn Mode>> {
    let any = store.as_any()?;
    #[cfg(feature = "postgres")]
    if any.is::<crate::store::PgStore>() {
        return Some(Arc::new(For::<sqlx::Postgres>(PhantomData)));
    }
    #[cfg(feature = "mysql")]
    if any.is::<crate::store::MySqlStore>() {
        return Some(Arc::new(For::<sqlx::MySql>(PhantomData)));
    }
    #[cfg(feature = "sqlite")]
    if any.is::<crate::store::SqliteStore>() {
        return Some(Arc::new(For::<sqlx::Sqlite>(PhantomData)));
    }
    let _ = any;
    None
}

async fn run<DB: TxDatabase>(job: Job) -> Response<Body> {
    let Job {
        config,
        route,
        mut parts,
        body,
        call,
    } = job;
    let spec: &'static Spec = config.spec();
    let site = spec.site::<()>();
    let function = site.path;
    let engine = config.idem.engine().clone();
    let Some(store) = engine
        .store
        .as_any()
        .and_then(|a| a.downcast_ref::<DB::Store>())
    else {
        let detail = "the layer's store changed database after the layer was built";
        let title = "The idempotency layer is misconfigured";
        return problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "misconfigured",
            title,
            detail,
        );
    };
    let mut tx = match store.begin().await {
        Ok(tx) => tx,
        Err(source) => return error_response(&Error::StoreUnavailable { function, source }),
    };
    let token = match call {
        None => None,
        Some(call) => {
            let begin = engine.tx_begin::<StoredResponse, Error, ValuesOnly, DB>(
                spec,
                site,
                &[],
                call,
                &mut *tx,
            );
            match begin.await {
                // A replay or a refusal: nothing was written; dropping the transaction rolls
                // it back as its connection returns to the pool.
                TxBegin::Done(Ok(stored)) => return stored.replayed(),
                TxBegin::Done(Err(e)) => return error_response(&e),
                TxBegin::Run(token) => Some(token),
            }
        }
    };
    // A request that records nothing has no fenced write to find out, at the end, whether
    // its transaction is still the live one; a mark does (a savepoint, checked before a
    // success goes out).
    let recorded = token.as_ref().is_some_and(|t| t.records());
    if !recorded && let Err(source) = store.mark_in(&mut *tx).await {
        return error_response(&Error::StoreUnavailable { function, source });
    }

    let slot: Slot<DB> = Arc::new(Mutex::new(Some(tx)));
    parts.extensions.insert(Lent(slot.clone()));
    let response = route(Request::from_parts(parts, body)).await;
    let (head, body) = response.into_parts();
    let tx = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    let rolled_back = |token: Option<tx::TxToken<ValuesOnly>>, why: &str, detail: &str| {
        if let Some(token) = token {
            tx::abandon(token);
        }
        tracing::warn!(
            function,
            why,
            "idem: the route's transaction is rolled back"
        );
        let title = "The route's response cannot be recorded; nothing was committed";
        problem(StatusCode::INTERNAL_SERVER_ERROR, why, title, detail)
    };
    let Some(mut tx) = tx else {
        let detail = "the route kept its `IdemTx` beyond its response (in a task it spawned?), so the layer could not commit it; its writes are rolled back";
        return rolled_back(token, "transaction-kept", detail);
    };
    if !(config.store_status)(head.status) {
        // Not stored: the route's writes roll back with the reservation, the key stays free.
        drop(tx);
        if head.status.is_success() || head.status.is_redirection() {
            // A success must not be sent for writes that were just rolled back.
            let detail = format!(
                "the route answered {}, a status the layer's `store_status` does not store, so its writes were rolled back",
                head.status
            );
            return rolled_back(token, "status-not-stored", &detail);
        }
        if let Some(token) = token {
            tx::abandon(token);
        }
        return Response::from_parts(head, body);
    }
    // The whole body, before anything is committed or sent: it is part of the record.
    let limit = config.max_response_bytes;
    let body = http_body_util::Limited::new(body, limit).collect().await;
    let body = match body {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            drop(tx); // rolled back as its connection returns to the pool
            if e.is::<http_body_util::LengthLimitError>() {
                let detail = format!(
                    "the response body is over max_response_bytes ({limit}), so it cannot be recorded with the route's writes; they are rolled back"
                );
                return rolled_back(token, "response-too-large", &detail);
            }
            let detail =
                format!("the route's response body failed ({e}); its writes are rolled back");
            return rolled_back(token, "response-failed", &detail);
        }
    };
    let success = head.status.is_success() || head.status.is_redirection();
    let written = match token {
        Some(token) => {
            let stored = StoredResponse {
                status: head.status,
                headers: config.replayed_headers(&head.headers),
                body: body.clone(),
            };
            let finish =
                tx::finish::<StoredResponse, Error, ValuesOnly, DB>(token, &mut *tx, Ok(stored));
            finish.await.map(drop)
        }
        None => Ok(()),
    };
    // Nothing recorded (no key, or a switched-off runtime): no statement has told yet whether
    // the transaction can still commit. PostgreSQL answers the `COMMIT` of an aborted one
    // with a rollback that is not an error, and after a MySQL deadlock the route's later
    // writes committed on their own: either way the mark is gone. Check before a success.
    let mut ended = false;
    let written = match written {
        Ok(()) if success && !recorded => match store.check_in(&mut *tx).await {
            Ok(()) => Ok(()),
            Err(source) => {
                // The database refused: the transaction is not the one the route began in.
                ended = source
                    .downcast_ref::<sqlx::Error>()
                    .is_some_and(|e| matches!(e, sqlx::Error::Database(_)));
                Err(Error::StoreUnavailable { function, source })
            }
        },
        other => other,
    };
    if let Err(e) = written {
        // Dropping the transaction rolls the route's writes back with it.
        drop(tx);
        if !ended && !aborted(&e) {
            return error_response(&e);
        }
        // The route went on after one of its statements failed, and that aborted (PostgreSQL)
        // or ended (a MySQL deadlock) its transaction: what it wrote before is not kept.
        // An error answer still tells the truth and goes out, unrecorded (the key stays
        // free); a success would not, so it becomes a 500 that says why.
        if success {
            let detail = format!(
                "the route answered {} after one of its statements failed, which aborted or ended its transaction; what it wrote in it is not kept",
                head.status
            );
            return rolled_back(None, "transaction-aborted", &detail);
        }
        tracing::warn!(
            function,
            status = %head.status,
            "idem: the route's transaction was aborted by a failed statement; its error answer goes out unrecorded"
        );
        return Response::from_parts(head, Body::from(body));
    }
    match tx.commit().await {
        Ok(()) => Response::from_parts(head, Body::from(body)),
        Err(e) => {
            let source = StoreError::from(e);
            tracing::warn!(function, error = %source, "idem: the route's transaction did not commit; its response is not sent");
            error_response(&Error::NotCommitted { function, source })
        }
    }
}
