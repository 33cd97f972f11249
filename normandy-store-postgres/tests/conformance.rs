//! The store conformance suite on Postgres: every case in a fresh, fully migrated schema,
//! directly (`postgres_*`) and through PgBouncer in transaction-pooling mode with the store in
//! `PoolerMode::Transaction` (`postgres_pgbouncer_*`, from `NORMANDY_TEST_PGBOUNCER_URL`).

mod common;

normandy_tests::store_conformance!(postgres, async {
    let url = normandy_tests::backends::postgres_url().await?;
    Some(common::PgHarness::new(&url).await)
});

normandy_tests::store_conformance!(postgres_pgbouncer, async {
    let url = normandy_tests::backends::postgres_url().await?;
    let pooler = normandy_tests::backends::pgbouncer_url().await?;
    Some(common::PgHarness::through_pooler(&url, &pooler).await)
});
