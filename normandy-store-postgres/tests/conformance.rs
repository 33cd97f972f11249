//! The store conformance suite on Postgres: every case in a fresh, fully migrated schema.

mod common;

normandy_tests::store_conformance!(postgres, async {
    let url = normandy_tests::backends::postgres_url().await?;
    Some(common::PgHarness::new(&url).await)
});
