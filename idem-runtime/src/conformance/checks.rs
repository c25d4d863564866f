//! The checks, one async fn each: what every store must do.

use std::collections::HashSet;
use std::time::Duration;

use super::{
    LEASE, PAST_SHORT, SHORT, TTL, acquire, claim, futures_join_all, id, ns, reserve, result,
};
use crate::codec::Codec;
use crate::key::Fingerprint;
use crate::key::RecordId;
use crate::store::{
    Claim, Fence, Finalize, Heartbeat, RecordState, Release, Reservation, Store, StoredResult,
};

/// The first reserve inserts an in-progress record; a second finds it, with its fence.
pub async fn reserve_acquires_an_absent_record_once(store: &dyn Store) {
    let ns = ns();
    let r = id(&ns, "k");
    let first = acquire(store, &r, LEASE).await;
    match reserve(store, &claim(&r, Fence::random(), None, LEASE)).await {
        Reservation::Exists(rec) => {
            assert_eq!(rec.state, RecordState::InProgress);
            assert_eq!(rec.fence, first);
            assert_eq!(rec.owner, "conformance");
            assert_eq!(rec.attempts, 1);
            assert!(rec.lease_remaining > Duration::ZERO && rec.lease_remaining <= LEASE);
            assert!(rec.result.is_none());
        }
        other => panic!("second reserve: {other:?}"),
    }
}

/// Loading a key nobody reserved finds nothing.
pub async fn load_of_an_absent_record_is_none(store: &dyn Store) {
    let loaded = store.load(&id(&ns(), "nobody")).await.expect("load");
    assert!(loaded.is_none());
}

/// Finalize writes only for the fence that reserved the record.
pub async fn finalize_needs_the_owners_fence(store: &dyn Store) {
    let ns = ns();
    let r = id(&ns, "k");
    let fence = acquire(store, &r, LEASE).await;
    let wrong = store
        .finalize(&r, Fence::random(), &result(b"1"), TTL)
        .await
        .expect("finalize");
    assert!(!wrong, "a foreign fence must not finalize");
    assert!(
        store
            .finalize(&r, fence, &result(b"42"), TTL)
            .await
            .expect("finalize")
    );
    let rec = store.load(&r).await.expect("load").expect("present");
    assert_eq!(rec.state, RecordState::Completed);
    assert_eq!(rec.result, Some(result(b"42")));
    assert!(rec.expires_in > TTL - Duration::from_secs(60) && rec.expires_in <= TTL);
}

/// A completed record cannot be finalized again, even by its owner.
pub async fn finalize_happens_once(store: &dyn Store) {
    let ns = ns();
    let r = id(&ns, "k");
    let fence = acquire(store, &r, LEASE).await;
    assert!(
        store
            .finalize(&r, fence, &result(b"1"), TTL)
            .await
            .expect("finalize")
    );
    assert!(
        !store
            .finalize(&r, fence, &result(b"2"), TTL)
            .await
            .expect("finalize")
    );
    let rec = store.load(&r).await.expect("load").expect("present");
    assert_eq!(rec.result, Some(result(b"1")));
}

/// A heartbeat extends the owner's lease, and nobody else's.
pub async fn heartbeat_extends_only_the_owners_lease(store: &dyn Store) {
    let ns = ns();
    let r = id(&ns, "k");
    let fence = acquire(store, &r, SHORT).await;
    assert!(
        !store
            .heartbeat(&r, Fence::random(), TTL)
            .await
            .expect("heartbeat")
    );
    assert!(store.heartbeat(&r, fence, TTL).await.expect("heartbeat"));
    tokio::time::sleep(PAST_SHORT).await;
    let rec = store.load(&r).await.expect("load").expect("present");
    assert!(
        rec.lease_remaining > SHORT,
        "the lease was extended: {:?}",
        rec.lease_remaining
    );
    assert!(
        !store
            .take_over(&claim(&r, Fence::random(), None, LEASE), fence)
            .await
            .expect("take over"),
        "a live lease cannot be taken over"
    );
    assert!(
        store
            .finalize(&r, fence, &result(b"1"), TTL)
            .await
            .expect("finalize")
    );
    assert!(
        !store.heartbeat(&r, fence, TTL).await.expect("heartbeat"),
        "a completed record has no lease to extend"
    );
}

/// Release deletes the record for its owner only; then the key can be reserved afresh.
pub async fn release_needs_the_owners_fence_and_frees_the_key(store: &dyn Store) {
    let ns = ns();
    let r = id(&ns, "k");
    let fence = acquire(store, &r, LEASE).await;
    assert!(!store.release(&r, Fence::random()).await.expect("release"));
    assert!(store.load(&r).await.expect("load").is_some());
    assert!(store.release(&r, fence).await.expect("release"));
    assert!(store.load(&r).await.expect("load").is_none());
    let again = acquire(store, &r, LEASE).await;
    assert!(
        store
            .finalize(&r, again, &result(b"1"), TTL)
            .await
            .expect("finalize")
    );
    assert!(
        !store.release(&r, again).await.expect("release"),
        "a completed record is not released"
    );
}

/// A record whose owner keeps heartbeating lives on past its first lease, past any time the
/// store keeps expired records (`self_expiry`) and through purges: a long body is never
/// deleted from under its owner.
pub async fn heartbeats_keep_a_record_past_its_first_lease(store: &dyn Store) {
    let ns = ns();
    let r = id(&ns, "k");
    let fence = acquire(store, &r, SHORT).await;
    let until = tokio::time::Instant::now()
        + SHORT
        + store.self_expiry().unwrap_or_default()
        + Duration::from_millis(500);
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(SHORT / 4).await;
        assert!(
            store.heartbeat(&r, fence, SHORT).await.expect("heartbeat"),
            "the owner still holds its lease"
        );
        store.purge(10_000).await.expect("purge");
    }
    let rec = store.load(&r).await.expect("load").expect("still there");
    assert_eq!(rec.state, RecordState::InProgress);
    assert_eq!(rec.fence, fence);
    assert!(
        rec.lease_remaining > Duration::ZERO,
        "{:?}",
        rec.lease_remaining
    );
    assert!(
        store
            .finalize(&r, fence, &result(b"1"), TTL)
            .await
            .expect("finalize")
    );
}

/// Takeover is refused while the lease runs and allowed once it is over, bumping `attempts`.
pub async fn take_over_waits_for_the_lease_to_end(store: &dyn Store) {
    let ns = ns();
    let r = id(&ns, "k");
    let first = acquire(store, &r, SHORT).await;
    let second = Fence::random();
    assert!(
        !store
            .take_over(&claim(&r, second, None, LEASE), first)
            .await
            .expect("take over")
    );
    tokio::time::sleep(PAST_SHORT).await;
    let rec = store.load(&r).await.expect("load").expect("present");
    assert_eq!(rec.lease_remaining, Duration::ZERO, "the lease is over");
    assert!(
        store
            .take_over(&claim(&r, second, None, LEASE), first)
            .await
            .expect("take over")
    );
    let rec = store.load(&r).await.expect("load").expect("present");
    assert_eq!(rec.fence, second);
    assert_eq!(rec.attempts, 2);
    assert_eq!(rec.state, RecordState::InProgress);
    assert!(rec.lease_remaining > Duration::ZERO);
}

/// Takeover succeeds only against the fence the caller observed.
pub async fn take_over_is_a_compare_and_set_on_the_fence(store: &dyn Store) {
    let ns = ns();
    let r = id(&ns, "k");
    acquire(store, &r, SHORT).await;
    tokio::time::sleep(PAST_SHORT).await;
    let stale_view = Fence::random();
    assert!(
        !store
            .take_over(&claim(&r, Fence::random(), None, LEASE), stale_view)
            .await
            .expect("take over"),
        "the observed fence is not the record's"
    );
}

/// After a takeover, the first owner's heartbeat, finalize and release all do nothing.
pub async fn a_stale_owner_cannot_finalize_after_a_takeover(store: &dyn Store) {
    let ns = ns();
    let r = id(&ns, "k");
    let stale = acquire(store, &r, SHORT).await;
    tokio::time::sleep(PAST_SHORT).await;
    let fresh = Fence::random();
    assert!(
        store
            .take_over(&claim(&r, fresh, None, LEASE), stale)
            .await
            .expect("take over")
    );
    assert!(!store.heartbeat(&r, stale, TTL).await.expect("heartbeat"));
    assert!(
        !store
            .finalize(&r, stale, &result(b"stale"), TTL)
            .await
            .expect("finalize")
    );
    assert!(!store.release(&r, stale).await.expect("release"));
    assert!(
        store
            .finalize(&r, fresh, &result(b"fresh"), TTL)
            .await
            .expect("finalize")
    );
    let rec = store.load(&r).await.expect("load").expect("present");
    assert_eq!(rec.result, Some(result(b"fresh")));
}

/// A completed record past its TTL is taken over like an absent one: result cleared,
/// attempts back to one.
pub async fn an_expired_result_is_taken_over_and_reset(store: &dyn Store) {
    let ns = ns();
    let r = id(&ns, "k");
    let first = acquire(store, &r, LEASE).await;
    assert!(
        store
            .finalize(&r, first, &result(b"old"), SHORT)
            .await
            .expect("finalize")
    );
    let fresh = Fence::random();
    assert!(
        !store
            .take_over(&claim(&r, fresh, None, LEASE), first)
            .await
            .expect("take over"),
        "a live result is not taken over"
    );
    tokio::time::sleep(PAST_SHORT).await;
    let rec = store.load(&r).await.expect("load").expect("present");
    assert_eq!(rec.expires_in, Duration::ZERO, "expired");
    assert!(
        store
            .take_over(&claim(&r, fresh, None, LEASE), first)
            .await
            .expect("take over")
    );
    let rec = store.load(&r).await.expect("load").expect("present");
    assert_eq!(rec.state, RecordState::InProgress);
    assert_eq!(rec.attempts, 1);
    assert!(rec.result.is_none());
}

/// Many concurrent reserves of one key: exactly one acquires.
pub async fn concurrent_reserves_have_one_winner(store: &dyn Store) {
    let ns = ns();
    let r = id(&ns, "contended");
    let attempts = (0..32).map(|_| async {
        let fence = Fence::random();
        matches!(
            store
                .reserve(&claim(&r, fence, None, LEASE))
                .await
                .expect("reserve"),
            Reservation::Acquired
        )
    });
    let winners = futures_join_all(attempts)
        .await
        .into_iter()
        .filter(|w| *w)
        .count();
    assert_eq!(winners, 1);
}

/// Many concurrent takeovers of one expired reservation: exactly one succeeds.
pub async fn concurrent_take_overs_have_one_winner(store: &dyn Store) {
    let ns = ns();
    let r = id(&ns, "contended");
    let first = acquire(store, &r, SHORT).await;
    tokio::time::sleep(PAST_SHORT).await;
    let attempts = (0..32).map(|_| async {
        let fence = Fence::random();
        store
            .take_over(&claim(&r, fence, None, LEASE), first)
            .await
            .expect("take over")
    });
    let winners = futures_join_all(attempts)
        .await
        .into_iter()
        .filter(|w| *w)
        .count();
    assert_eq!(winners, 1);
}

/// Purge removes completed records past their TTL and in-progress ones past their lease,
/// and nothing live.
pub async fn purge_deletes_only_what_expired(store: &dyn Store) {
    let ns = ns();
    let live_result = id(&ns, "live-result");
    let dead_result = id(&ns, "dead-result");
    let live_lease = id(&ns, "live-lease");
    let dead_lease = id(&ns, "dead-lease");
    let f = acquire(store, &live_result, LEASE).await;
    assert!(
        store
            .finalize(&live_result, f, &result(b"1"), TTL)
            .await
            .expect("finalize")
    );
    let f = acquire(store, &dead_result, LEASE).await;
    assert!(
        store
            .finalize(&dead_result, f, &result(b"1"), SHORT)
            .await
            .expect("finalize")
    );
    acquire(store, &live_lease, TTL).await;
    acquire(store, &dead_lease, SHORT).await;
    tokio::time::sleep(PAST_SHORT).await;
    // Other checks may share the table: purge until this namespace's expired rows are gone.
    // A store that expires records by itself gets its retention period (and some slack).
    let rounds = match store.self_expiry() {
        Some(retention) => 20 + retention.as_millis() / 50,
        None => 100,
    };
    for _ in 0..rounds {
        store.purge(10_000).await.expect("purge");
        if store.load(&dead_result).await.expect("load").is_none()
            && store.load(&dead_lease).await.expect("load").is_none()
        {
            break;
        }
        if store.self_expiry().is_some() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert!(store.load(&dead_result).await.expect("load").is_none());
    assert!(store.load(&dead_lease).await.expect("load").is_none());
    assert!(store.load(&live_result).await.expect("load").is_some());
    assert!(store.load(&live_lease).await.expect("load").is_some());
}

/// Purge deletes at most `limit` records per call. A store that expires records by itself
/// has nothing to purge, and its expired records are gone after its retention period.
pub async fn purge_respects_its_limit(store: &dyn Store) {
    let ns = ns();
    for i in 0..5 {
        acquire(store, &id(&ns, &i.to_string()), Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    if let Some(retention) = store.self_expiry() {
        assert_eq!(store.purge(2).await.expect("purge"), 0);
        tokio::time::sleep(retention + Duration::from_millis(500)).await;
        for i in 0..5 {
            let record = store.load(&id(&ns, &i.to_string())).await.expect("load");
            assert!(record.is_none(), "record {i} outlived its retention");
        }
        return;
    }
    let n = store.purge(2).await.expect("purge");
    assert!(n <= 2, "deleted {n} with a limit of 2");
    let mut total = n;
    for _ in 0..100 {
        let n = store.purge(2).await.expect("purge");
        total += n;
        if n == 0 {
            break;
        }
    }
    assert!(
        total >= 5,
        "all five expired records went eventually: {total}"
    );
}

/// Keys differing only in case, trailing space, NUL or other odd bytes are distinct.
pub async fn keys_are_compared_byte_for_byte(store: &dyn Store) {
    let ns = ns();
    let long = "k".repeat(crate::MAX_KEY_BYTES);
    let keys = [
        "a",
        "A",
        "a ",
        " a",
        "a\0b",
        "a\0c",
        "line\nbreak",
        "🦀",
        "é",
        "e\u{301}",
        "' OR '1'='1",
        "%",
        "_",
        long.as_str(),
    ];
    for k in keys {
        let r = id(&ns, k);
        let fence = acquire(store, &r, LEASE).await;
        assert!(
            store
                .finalize(&r, fence, &result(k.as_bytes()), TTL)
                .await
                .expect("finalize")
        );
    }
    let mut seen = HashSet::new();
    for k in keys {
        let rec = store
            .load(&id(&ns, k))
            .await
            .expect("load")
            .expect("present");
        let bytes = rec.result.expect("result").bytes;
        assert_eq!(bytes, k.as_bytes(), "key {k:?} read back its own record");
        assert!(seen.insert(bytes));
    }
}

/// The same key in two namespaces names two records.
pub async fn namespaces_keep_records_apart(store: &dyn Store) {
    let (a, b) = (ns(), ns());
    let fa = acquire(store, &id(&a, "k"), LEASE).await;
    let fb = acquire(store, &id(&b, "k"), LEASE).await;
    assert_ne!(fa, fb);
    assert!(store.release(&id(&a, "k"), fa).await.expect("release"));
    assert!(store.load(&id(&b, "k")).await.expect("load").is_some());
}

/// Fingerprints (or their absence), codecs and large results come back as written.
pub async fn fingerprints_and_results_round_trip(store: &dyn Store) {
    let ns = ns();
    let fp = Fingerprint::of(&("payload", 1)).expect("fingerprint");
    let with = id(&ns, "with");
    let fence = Fence::random();
    assert!(matches!(
        reserve(store, &claim(&with, fence, Some(&fp), LEASE)).await,
        Reservation::Acquired
    ));
    let big = StoredResult {
        codec: Codec::JsonError,
        bytes: (0..(1 << 20)).map(|i| (i % 251) as u8).collect(),
    };
    assert!(
        store
            .finalize(&with, fence, &big, TTL)
            .await
            .expect("finalize")
    );
    let rec = store.load(&with).await.expect("load").expect("present");
    assert_eq!(rec.fingerprint, Some(fp));
    assert_eq!(rec.result, Some(big));

    let without = id(&ns, "without");
    acquire(store, &without, LEASE).await;
    let rec = store.load(&without).await.expect("load").expect("present");
    assert_eq!(rec.fingerprint, None);
}

/// A batch of reservations answers each claim as it would be answered alone: absent records
/// are acquired, an in-progress one is found with its owner's fence, a completed one with
/// its result; two claims on one record in one batch never both acquire it.
pub async fn a_batch_of_reservations_answers_each_claim(store: &dyn Store) {
    let ns = ns();
    let (running, done) = (id(&ns, "running"), id(&ns, "done"));
    let running_fence = acquire(store, &running, LEASE).await;
    let done_fence = acquire(store, &done, LEASE).await;
    let stored = result(b"42");
    assert!(
        store
            .finalize(&done, done_fence, &stored, TTL)
            .await
            .expect("finalize")
    );
    let fresh: Vec<RecordId> = (0..5).map(|i| id(&ns, &format!("fresh-{i}"))).collect();
    let twice = id(&ns, "twice");
    let fences: Vec<Fence> = (0..10).map(|_| Fence::random()).collect();
    let mut claims: Vec<Claim<'_>> = fresh
        .iter()
        .zip(&fences)
        .map(|(r, f)| claim(r, *f, None, LEASE))
        .collect();
    claims.push(claim(&running, fences[5], None, LEASE));
    claims.push(claim(&done, fences[6], None, LEASE));
    claims.push(claim(&twice, fences[7], None, LEASE));
    claims.push(claim(&twice, fences[8], None, LEASE));
    let answers = store.reserve_many(&claims).await;
    assert_eq!(answers.len(), claims.len(), "one answer per claim");
    for (i, answer) in answers[..5].iter().enumerate() {
        assert!(
            matches!(answer, Ok(Reservation::Acquired)),
            "fresh {i}: {answer:?}"
        );
        let rec = store.load(&fresh[i]).await.expect("load").expect("present");
        assert_eq!(
            rec.fence, fences[i],
            "fresh {i} holds its own claim's fence"
        );
    }
    match &answers[5] {
        Ok(Reservation::Exists(rec)) => {
            assert_eq!(rec.state, RecordState::InProgress);
            assert_eq!(rec.fence, running_fence);
        }
        other => panic!("in progress: {other:?}"),
    }
    match &answers[6] {
        Ok(Reservation::Exists(rec)) => {
            assert_eq!(rec.state, RecordState::Completed);
            assert_eq!(rec.result.as_ref(), Some(&stored));
        }
        other => panic!("completed: {other:?}"),
    }
    let acquired = answers[7..]
        .iter()
        .filter(|a| matches!(a, Ok(Reservation::Acquired)))
        .count();
    assert_eq!(
        acquired,
        1,
        "one of two claims on one record acquires it: {:?}",
        &answers[7..]
    );
    assert!(
        answers[7..].iter().all(|a| matches!(
            a,
            Ok(Reservation::Acquired | Reservation::Exists(_) | Reservation::Vanished)
        )),
        "{:?}",
        &answers[7..]
    );
}

/// Batched finalizes, heartbeats and releases are each fenced on their own item: a stale
/// owner's item in a batch is refused while the others in the batch are written.
pub async fn batched_writes_are_fenced_item_by_item(store: &dyn Store) {
    let ns = ns();
    let records: Vec<RecordId> = (0..4).map(|i| id(&ns, &format!("k{i}"))).collect();
    let mut fences = Vec::new();
    for r in &records {
        fences.push(acquire(store, r, SHORT).await);
    }
    // Record 0 is abandoned and taken over: its first owner's writes must be refused.
    tokio::time::sleep(PAST_SHORT).await;
    let stale = fences[0];
    let taker = Fence::random();
    let rec0 = &records[0];
    assert!(
        store
            .take_over(&claim(rec0, taker, None, LEASE), stale)
            .await
            .expect("take over")
    );
    for (r, f) in records.iter().zip(&fences).skip(1) {
        assert!(
            store.heartbeat(r, *f, LEASE).await.expect("heartbeat"),
            "{r:?} kept alive"
        );
    }
    let beats: Vec<Heartbeat<'_>> = records
        .iter()
        .zip(&fences)
        .map(|(r, f)| Heartbeat {
            id: r,
            fence: *f,
            lease: LEASE,
        })
        .collect();
    let answers: Vec<bool> = store
        .heartbeat_many(&beats)
        .await
        .into_iter()
        .map(|a| a.expect("heartbeat"))
        .collect();
    assert_eq!(answers, [false, true, true, true]);

    let stored = result(b"\"done\"");
    let finals: Vec<Finalize<'_>> = records[..3]
        .iter()
        .zip(&fences)
        .map(|(r, f)| Finalize {
            id: r,
            fence: *f,
            result: &stored,
            ttl: TTL,
        })
        .collect();
    let answers: Vec<bool> = store
        .finalize_many(&finals)
        .await
        .into_iter()
        .map(|a| a.expect("finalize"))
        .collect();
    assert_eq!(
        answers,
        [false, true, true],
        "the stale owner's finalize alone is refused"
    );
    let rec0 = store.load(rec0).await.expect("load").expect("present");
    assert_eq!(
        (rec0.state, rec0.fence),
        (RecordState::InProgress, taker),
        "the new owner's record is untouched"
    );
    let rec1 = store
        .load(&records[1])
        .await
        .expect("load")
        .expect("present");
    assert_eq!(rec1.result.as_ref(), Some(&stored));

    let releases = [
        Release {
            id: &records[0],
            fence: stale,
        },
        Release {
            id: &records[2],
            fence: fences[2],
        },
        Release {
            id: &records[3],
            fence: fences[3],
        },
    ];
    let answers: Vec<bool> = store
        .release_many(&releases)
        .await
        .into_iter()
        .map(|a| a.expect("release"))
        .collect();
    assert_eq!(
        answers,
        [false, false, true],
        "stale: refused; completed: not released; owned: released"
    );
    assert!(store.load(&records[0]).await.expect("load").is_some());
    assert!(store.load(&records[2]).await.expect("load").is_some());
    assert!(store.load(&records[3]).await.expect("load").is_none());
}
