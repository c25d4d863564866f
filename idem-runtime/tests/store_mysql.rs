//! The store conformance suite against a real MySQL or MariaDB (`IDEM_TEST_MYSQL_URL`), each
//! test on its own table.

mod support;

idem_runtime::store_conformance_tests!(optional: support::mysql_store());

/// Regression: on MariaDB, fenced writes and reservations failed with "Deadlock found"
/// beside purges. Reserving a key a purge (or a release) has just deleted takes a shared lock
/// on the deleted row and then an exclusive one; a heartbeat or takeover of that row queued in
/// between deadlocks with it, and InnoDB fails one of two callers that did nothing wrong (a
/// batch split into single statements met the same). A statement that lost a deadlock had no
/// effect, so the store now sends it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_beside_purges_do_not_fail_with_deadlocks() {
    #![allow(clippy::unwrap_used)] // tests: a panic is the failure report
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use std::time::Duration;

    use idem_runtime::Codec;
    use idem_runtime::RecordId;
    use idem_runtime::store::{Fence, Finalize, Store, StoredResult};

    let Some(fixture) = support::mysql_store().await else {
        return;
    };
    let store: Arc<dyn Store> = Arc::new(fixture.store.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let purger = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let mut failures = vec![];
            while !stop.load(SeqCst) {
                if let Err(e) = store.purge(50).await {
                    failures.push(e.to_string());
                }
            }
            failures
        })
    };
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut failures = vec![];
                let result = StoredResult {
                    codec: Codec::Json,
                    bytes: b"1".to_vec(),
                };
                for i in 0..60u32 {
                    // Alone and in batches (one transaction locking rows in key order).
                    let ids: Vec<RecordId> = (0..6)
                        .map(|k| RecordId::new("purge-deadlock/v0", format!("{}-{k}", (w + i) % 4)))
                        .collect();
                    let fences: Vec<Fence> = ids.iter().map(|_| Fence::random()).collect();
                    let claims = support::claims(&ids, &fences, "t", Duration::ZERO);
                    for r in store.reserve_many(&claims).await {
                        if let Err(e) = r {
                            failures.push(format!("reserve_many: {e}"));
                        }
                    }
                    for (claim, id) in claims.iter().zip(&ids) {
                        let writes = async {
                            let tag = |what: &'static str| move |e| format!("{what}: {e}");
                            if let Some(rec) = store.load(id).await.map_err(tag("load"))? {
                                store
                                    .take_over(claim, rec.fence)
                                    .await
                                    .map_err(tag("take_over"))?;
                            }
                            store
                                .heartbeat(id, claim.fence, Duration::ZERO)
                                .await
                                .map_err(tag("heartbeat"))?;
                            Ok::<_, String>(())
                        };
                        if let Err(e) = writes.await {
                            failures.push(e);
                        }
                    }
                    let items: Vec<Finalize<'_>> = ids
                        .iter()
                        .zip(&fences)
                        .map(|(id, fence)| Finalize {
                            id,
                            fence: *fence,
                            result: &result,
                            ttl: Duration::ZERO,
                        })
                        .collect();
                    for r in store.finalize_many(&items).await {
                        if let Err(e) = r {
                            failures.push(format!("finalize_many: {e}"));
                        }
                    }
                }
                failures
            })
        })
        .collect();
    let mut failures = vec![];
    for w in writers {
        failures.extend(w.await.unwrap());
    }
    stop.store(true, SeqCst);
    let purge_failures = purger.await.unwrap();
    let kinds: std::collections::BTreeSet<&str> = failures
        .iter()
        .map(|f| f.split(':').next().unwrap_or(""))
        .collect();
    assert!(
        failures.is_empty(),
        "{} writes ({kinds:?}) failed beside purges, e.g. {:?}",
        failures.len(),
        failures.first()
    );
    assert!(
        purge_failures.is_empty(),
        "{} purges failed, e.g. {:?}",
        purge_failures.len(),
        purge_failures.first()
    );
}
