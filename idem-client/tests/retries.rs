//! The client against a real axum server behind idem's `IdempotencyLayer`, through a link
//! that loses responses: one effect per logical request, one key per logical request, the
//! answers that are retried and those that are not, `Retry-After`, and the bounds.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use idem_client::{Error, Retry, RetryingClient};
use idem_runtime::Idem;
use idem_runtime::http::IdempotencyLayer;
use idem_runtime::store::MemoryStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// What the server saw: effects (route bodies that did their work) and every request's key.
#[derive(Clone, Default)]
struct Seen {
    effects: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
    keys: Arc<Mutex<Vec<String>>>,
    statuses: Arc<Mutex<Vec<u16>>>,
    started: Arc<Notify>,
    release: Arc<Notify>,
}

/// A server behind idem's layer (leases of one second, conflicts rejected at once so that a
/// duplicate gets `409` with `Retry-After`), with these routes:
/// - `/charge`: one effect, `201`;
/// - `/busy`: `503` with `Retry-After: 1`, then `429` with `Retry-After: 0`, then as `/charge`;
/// - `/always-busy`: `503` with no `Retry-After`;
/// - `/far`: `503` asking to come back in an hour;
/// - `/slow`: says it started, waits to be released, then as `/charge`.
async fn server() -> (SocketAddr, Seen) {
    let seen = Seen::default();
    let idem = Idem::builder().store(MemoryStore::new()).build().unwrap();
    let effect = |seen: &Seen| {
        let n = seen.effects.fetch_add(1, SeqCst) + 1;
        (StatusCode::CREATED, format!("effect {n}")).into_response()
    };
    let (s1, s2, s3, s4, s5) = (
        seen.clone(),
        seen.clone(),
        seen.clone(),
        seen.clone(),
        seen.clone(),
    );
    let routes = Router::new()
        .route("/charge", post(move || async move { effect(&s1) }))
        .route(
            "/busy",
            post(move || async move {
                match s2.calls.fetch_add(1, SeqCst) {
                    0 => (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "1")]).into_response(),
                    1 => (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "0")]).into_response(),
                    _ => effect(&s2),
                }
            }),
        )
        .route(
            "/always-busy",
            post(move || async move {
                s3.calls.fetch_add(1, SeqCst);
                StatusCode::SERVICE_UNAVAILABLE
            }),
        )
        .route(
            "/far",
            post(move || async move {
                s4.calls.fetch_add(1, SeqCst);
                (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "3600")])
            }),
        )
        .route(
            "/taken",
            // The route's own 409, a final answer: stored and replayed by the layer.
            post(|| async { (StatusCode::CONFLICT, "that name is taken") }),
        )
        .route(
            "/slow",
            post(move || async move {
                s5.started.notify_one();
                s5.release.notified().await;
                effect(&s5)
            }),
        )
        .layer(IdempotencyLayer::new(idem).lease("1s").reject_conflicts());
    let (keys, statuses) = (seen.keys.clone(), seen.statuses.clone());
    let app = routes.layer(middleware::from_fn(move |req: Request, next: Next| {
        let (keys, statuses) = (keys.clone(), statuses.clone());
        async move {
            let key = req.headers().get("idempotency-key");
            let key = key.map(|k| k.to_str().unwrap().to_string());
            keys.lock().unwrap().push(key.unwrap_or_default());
            let response: Response = next.run(req).await;
            statuses.lock().unwrap().push(response.status().as_u16());
            response
        }
    }));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

/// A link to `upstream` that forwards every request, and for the connections `lose` picks
/// (by their order, from 0) lets the response start and then cuts the connection: the server
/// did the work, the client never hears of it.
async fn lossy_link(upstream: SocketAddr, lose: fn(usize) -> bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for n in 0.. {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                if !lose(n) {
                    let (mut client, mut server) = (client, server);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    return;
                }
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                let forward =
                    tokio::spawn(
                        async move { tokio::io::copy(&mut from_client, &mut to_server).await },
                    );
                // The response has started: the route ran. Cut the link before it arrives.
                let mut first = [0u8; 1];
                let _ = from_server.read(&mut first).await;
                forward.abort();
                let _ = to_client.shutdown().await;
                drop(to_client);
            });
        }
    });
    addr
}

/// A client that opens a connection per attempt (so the link's count is the attempts'),
/// with quick backoff.
fn client() -> RetryingClient {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    RetryingClient::builder(http)
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .max_attempts(4)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_response_is_retried_with_the_same_key_and_replayed() {
    let (server, seen) = server().await;
    // Every other connection loses its response: each logical request's first attempt.
    let link = lossy_link(server, |n| n % 2 == 0).await;
    let client = client();
    let mut keys = Vec::new();
    for n in 0..3 {
        let request = client
            .http()
            .post(format!("http://{link}/charge"))
            .body(format!("{{\"order\":{n}}}"));
        let reply = client.send(request).await.unwrap();
        assert_eq!(reply.status(), StatusCode::CREATED);
        assert_eq!(reply.attempts(), 2, "{:?}", reply.retries());
        assert_eq!(reply.retries()[0].reason, "connection");
        assert!(
            reply.replayed(),
            "the second attempt got the first one's response"
        );
        let key: uuid::Uuid = reply.key().parse().unwrap();
        assert_eq!(key.get_version_num(), 4, "a random UUID");
        keys.push(reply.key().to_string());
        assert_eq!(
            reply.into_response().text().await.unwrap(),
            format!("effect {}", n + 1)
        );
    }
    assert_eq!(
        seen.effects.load(SeqCst),
        3,
        "one effect per logical request"
    );
    let sent = seen.keys.lock().unwrap().clone();
    let expected: Vec<String> = keys.iter().flat_map(|k| [k.clone(), k.clone()]).collect();
    assert_eq!(
        sent, expected,
        "each key sent on both attempts, and only there"
    );

    // A key the caller chose is the one sent, on every attempt.
    let request = client
        .http()
        .post(format!("http://{link}/charge"))
        .header("Idempotency-Key", "order-77")
        .body("{}");
    let reply = client.send(request).await.unwrap();
    assert_eq!((reply.key(), reply.attempts()), ("order-77", 2));
    assert!(reply.replayed());
    assert_eq!(seen.effects.load(SeqCst), 4);
    assert_eq!(seen.keys.lock().unwrap()[6..], ["order-77", "order-77"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_answers_are_retried_after_the_wait_the_server_asks_for() {
    let (server, seen) = server().await;
    // A backoff far longer than the server's waits: the waits seen are the server's.
    let http = reqwest::Client::new();
    let client = RetryingClient::builder(http)
        .backoff(Duration::from_secs(20), Duration::from_secs(20))
        .build()
        .unwrap();
    let reply = client
        .send(
            client
                .http()
                .post(format!("http://{server}/busy"))
                .body("{}"),
        )
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::CREATED);
    assert!(!reply.replayed());
    let retry = |reason: &str, secs| Retry {
        reason: reason.into(),
        waited: Duration::from_secs(secs),
        retry_after: true,
    };
    assert_eq!(reply.retries(), [retry("503", 1), retry("429", 0)]);
    assert_eq!(seen.effects.load(SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_in_progress_gets_409_and_then_the_replay() {
    let (server, seen) = server().await;
    let url = format!("http://{server}/slow");
    let first = {
        let url = url.clone();
        tokio::spawn(async move {
            let request = reqwest::Client::new()
                .post(url)
                .header("idempotency-key", "slow-1")
                .body("{}");
            request.send().await.unwrap().status()
        })
    };
    seen.started.notified().await;
    let client = client();
    let duplicate = {
        let request = client
            .http()
            .post(url)
            .header("idempotency-key", "slow-1")
            .body("{}");
        let client = client.clone();
        tokio::spawn(async move { client.send(request).await })
    };
    // The duplicate's first attempt gets 409 with `Retry-After` (the lease, one second);
    // let the first request finish while it waits.
    while !seen.statuses.lock().unwrap().contains(&409) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    seen.release.notify_one();
    assert_eq!(first.await.unwrap(), StatusCode::CREATED);
    let reply = duplicate.await.unwrap().unwrap();
    assert_eq!(reply.status(), StatusCode::CREATED);
    assert!(reply.replayed(), "answered from the first request's record");
    assert_eq!(reply.retries()[0].reason, "409");
    assert!(reply.retries()[0].retry_after, "{:?}", reply.retries());
    assert_eq!(seen.effects.load(SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_are_never_retried() {
    let (server, seen) = server().await;
    let client = client();
    let charge = |body: &str| {
        client
            .http()
            .post(format!("http://{server}/charge"))
            .header("idempotency-key", "k-422")
            .body(body.to_string())
    };
    assert_eq!(
        client.send(charge("{\"a\":1}")).await.unwrap().status(),
        StatusCode::CREATED
    );
    // The same key with another payload: 422, once.
    let reply = client.send(charge("{\"a\":2}")).await.unwrap();
    assert_eq!(reply.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reply.attempts(), 1);
    // No such route: 404, once.
    let request = client.http().post(format!("http://{server}/nowhere"));
    let reply = client.send(request).await.unwrap();
    assert_eq!(
        (reply.status(), reply.attempts()),
        (StatusCode::NOT_FOUND, 1)
    );
    assert_eq!(seen.keys.lock().unwrap().len(), 3);
    assert_eq!(seen.effects.load(SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_at_the_attempts_and_the_total_time() {
    let (server, seen) = server().await;
    let client = client();
    let reply = client
        .send(client.http().post(format!("http://{server}/always-busy")))
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        reply.attempts(),
        4,
        "max_attempts, and the last answer returned"
    );
    assert!(reply.retries().iter().all(|r| !r.retry_after));
    assert_eq!(seen.calls.load(SeqCst), 4);

    // Waiting an hour would end past the total time: the answer is returned at once.
    let reply = client
        .send(client.http().post(format!("http://{server}/far")))
        .await
        .unwrap();
    assert_eq!(
        (reply.status(), reply.attempts()),
        (StatusCode::SERVICE_UNAVAILABLE, 1)
    );

    // Nobody listens: connection errors, retried, then an error naming the key.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let nowhere = closed.local_addr().unwrap();
    drop(closed);
    let request = client.http().post(format!("http://{nowhere}/charge"));
    match client.send(request).await {
        Err(Error::Transport { key, attempts, .. }) => {
            assert_eq!(attempts, 4);
            assert!(key.parse::<uuid::Uuid>().is_ok(), "{key}");
        }
        other => panic!("expected a transport error, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_settings_are_refused() {
    let http = reqwest::Client::new();
    let zero = RetryingClient::builder(http.clone())
        .max_attempts(0)
        .build();
    assert!(matches!(zero, Err(Error::Config(_))));
    let inverted = RetryingClient::builder(http.clone())
        .backoff(Duration::from_secs(2), Duration::from_secs(1))
        .build();
    assert!(matches!(inverted, Err(Error::Config(m)) if m.contains("larger than its max")));
    let header = RetryingClient::builder(http).header("not a header").build();
    assert!(matches!(header, Err(Error::Config(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_conflict_is_final() {
    let (server, seen) = server().await;
    let client = client();
    let taken = || {
        client
            .http()
            .post(format!("http://{server}/taken"))
            .header("idempotency-key", "k-taken")
    };
    // First: the route's own 409, which the layer stores; the client cannot tell it from
    // "in progress" and retries, and the retry is the replay, which ends it.
    let first = client.send(taken()).await.unwrap();
    assert_eq!(first.status(), StatusCode::CONFLICT);
    assert!(first.replayed());
    assert_eq!(first.attempts(), 2);
    // Sent again later: the replayed 409 comes back at once, not retried to the limit.
    let again = client.send(taken()).await.unwrap();
    assert_eq!(
        (again.status(), again.attempts()),
        (StatusCode::CONFLICT, 1)
    );
    assert!(again.replayed());
    assert_eq!(seen.effects.load(SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_never_answers_ends_with_the_total_time() {
    // Accepts connections and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            held.push(conn);
        }
    });
    let client = RetryingClient::builder(reqwest::Client::new())
        .max_elapsed(Duration::from_millis(500))
        .build()
        .unwrap();
    let sent = client.send(client.http().post(format!("http://{addr}/charge")));
    // Bounded by max_elapsed, not by the (absent) reqwest timeout: a hang would stop here.
    let outcome = tokio::time::timeout(Duration::from_secs(30), sent).await;
    let outcome = outcome.expect("send() outlived its total time by far");
    assert!(
        matches!(outcome, Err(Error::Transport { .. })),
        "{outcome:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_total_time_limit_is_a_setting_not_a_panic() {
    let (server, _seen) = server().await;
    let client = RetryingClient::builder(reqwest::Client::new())
        .max_elapsed(Duration::MAX)
        .build()
        .unwrap();
    let reply = client
        .send(client.http().post(format!("http://{server}/charge")))
        .await
        .unwrap();
    assert_eq!(reply.status(), StatusCode::CREATED);
}
