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
    use idem_runtime::store::{Fence, Reservation, Store};

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
        let fences: Vec<Fence> = ids.iter().map(|_| Fence::random()).collect();
        let claims = support::claims(&ids, &fences, "test", std::time::Duration::from_secs(60));
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

/// Batches of a few rows run on the one plan the server keeps for each batched statement,
/// not on one planned afresh per batch. (For batches under ten rows the server used to judge
/// a plan made for each batch's values cheaper, and planned every batch: a fifth of its CPU
/// under the HTTP layer went to planning.) Read from `pg_prepared_statements`, on a store
/// with one connection so that every statement is prepared on the session that asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_batches_run_on_one_kept_plan() {
    use idem_runtime::store::{
        Fence, Finalize, Heartbeat, PgStoreOptions, Release, Reservation, Store, StoredResult,
    };
    use idem_runtime::{Codec, RecordId};
    use std::time::Duration;

    let options = PgStoreOptions::new().max_connections(1);
    let Some(fx) = support::postgres_store_with(options).await else {
        return;
    };
    // The counters are PostgreSQL 14's; a server told how to choose plans chooses as told.
    let (version, mode): (String, String) = sqlx::query_as(
        "SELECT current_setting('server_version_num'), current_setting('plan_cache_mode')",
    )
    .fetch_one(fx.store.pool())
    .await
    .unwrap();
    if version.parse::<u32>().unwrap_or(0) < 140_000 || mode != "auto" {
        eprintln!(
            "SKIPPED: plan counts need PostgreSQL 14 or later with plan_cache_mode = auto (server {version}, {mode})"
        );
        return;
    }
    // A table of some size, with statistics: the server weighs plans by them.
    let fill = format!(
        "INSERT INTO {} (namespace, key, state, fence, owner, attempts, created_at, expires_at)
         SELECT convert_to('filler', 'UTF8'), convert_to('f' || n, 'UTF8'), 'completed', n, 'test', 1, now(),
             now() + interval '1 hour'
         FROM generate_series(1, 50000) n",
        fx.store.table()
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(fill))
        .execute(fx.store.pool())
        .await
        .unwrap();
    let analyze = format!("ANALYZE {}", fx.store.table());
    sqlx::raw_sql(sqlx::AssertSqlSafe(analyze))
        .execute(fx.store.pool())
        .await
        .unwrap();
    const ROUNDS: usize = 12;
    let result = StoredResult {
        codec: Codec::Json,
        bytes: b"1".to_vec(),
    };
    for round in 0..ROUNDS {
        let ids: Vec<RecordId> = (0..4)
            .map(|i| RecordId::new("plan-test", format!("k{round}-{i}")))
            .collect();
        let fences: Vec<Fence> = ids.iter().map(|_| Fence::random()).collect();
        let claims = support::claims(&ids, &fences, "test", Duration::from_secs(60));
        let reserved = fx.store.reserve_many(&claims).await;
        assert!(
            reserved
                .iter()
                .all(|r| matches!(r, Ok(Reservation::Acquired))),
            "{reserved:?}"
        );
        let (done, freed) = (0..2, 2..4);
        let beats: Vec<Heartbeat<'_>> = done
            .clone()
            .map(|i| Heartbeat {
                id: &ids[i],
                fence: fences[i],
                lease: Duration::from_secs(60),
            })
            .collect();
        let finals: Vec<Finalize<'_>> = done
            .map(|i| Finalize {
                id: &ids[i],
                fence: fences[i],
                result: &result,
                ttl: Duration::from_secs(60),
            })
            .collect();
        let releases: Vec<Release<'_>> = freed
            .map(|i| Release {
                id: &ids[i],
                fence: fences[i],
            })
            .collect();
        for out in [
            fx.store.heartbeat_many(&beats).await,
            fx.store.finalize_many(&finals).await,
            fx.store.release_many(&releases).await,
        ] {
            assert!(out.iter().all(|r| matches!(r, Ok(true))), "{out:?}");
        }
    }
    let plans: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements
         WHERE statement LIKE '%unnest%' AND statement NOT LIKE '%pg_prepared_statements%'",
    )
    .fetch_all(fx.store.pool())
    .await
    .unwrap();
    assert_eq!(plans.len(), 4, "the four batched statements: {plans:?}");
    for (statement, generic, custom) in plans {
        // The server plans the first five executions for their values, then compares.
        assert!(
            custom <= 5 && generic >= (ROUNDS - 5) as i64,
            "{custom} custom and {generic} generic plans for {statement}"
        );
    }
}
