//! The store conformance suite against a real PostgreSQL (`IDEM_TEST_POSTGRES_URL`), each
//! test on its own table.

mod support;

idem_runtime::store_conformance_tests!(optional: support::postgres_store());

/// A fresh table filled by batches gets its statistics early: the store runs `ANALYZE` once
/// it has reserved 4,096 rows in batches, so the plans PostgreSQL cached for the batched
/// statements while the table was empty (whole-table scans) are made again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_filled_by_batches_is_analyzed_early() {
    use idem_runtime::RecordId;
    use idem_runtime::store::{Claim, Fence, Reservation, Store};

    let Some(fx) = support::postgres_store().await else {
        return;
    };
    let analyzed = || async {
        let sql = "SELECT last_analyze IS NOT NULL FROM pg_stat_user_tables WHERE relname = $1";
        sqlx::query_scalar::<_, bool>(sql)
            .bind(fx.store.table())
            .fetch_one(fx.store.pool())
            .await
            .unwrap()
    };
    let mut reserved = 0;
    for batch in 0..65 {
        let ids: Vec<RecordId> = (0..64)
            .map(|i| RecordId::new("analyze-test", format!("k{batch}-{i}")))
            .collect();
        let claims: Vec<Claim<'_>> = ids
            .iter()
            .map(|id| Claim {
                id,
                fence: Fence::random(),
                owner: "test",
                fingerprint: None,
                lease: std::time::Duration::from_secs(60),
            })
            .collect();
        let out = fx.store.reserve_many(&claims).await;
        reserved += out
            .iter()
            .filter(|r| matches!(r, Ok(Reservation::Acquired)))
            .count();
        if reserved < 4_096 {
            assert!(!analyzed().await, "not analyzed at {reserved} rows");
        }
    }
    assert_eq!(reserved, 65 * 64);
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !analyzed().await {
        assert!(
            std::time::Instant::now() < give_up,
            "the table was not analyzed after 4,096 batched rows"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
