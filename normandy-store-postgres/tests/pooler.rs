//! The store and its migrations through PgBouncer in transaction-pooling mode
//! (`NORMANDY_TEST_PGBOUNCER_URL`, started by `.ci/pgbouncer.sh`): what users saw without the
//! pooler setting, that the setting fixes it, that its settings reach the server in every
//! transaction, and that concurrent migrations through the pooler apply each migration once.
//! The whole conformance suite also runs through the pooler (`conformance.rs`).

mod common;

use std::time::Duration;

use common::{Migrate, PgHarness, input_batch, pooler_urls, sid};
use normandy_core::{CommitAck, ErrorKind, NewSession, NodeId, ResumePolicy, SessionStore};
use normandy_store_postgres::{
    PgStore, PgStoreConfig, PoolerMode, SchemaLevel, ServerTimeouts, applied_migrations,
    apply_migrations, revert_migrations,
};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, Executor};

fn node(name: &str) -> NodeId {
    NodeId::new(name, 1).unwrap()
}

/// `url` with its database replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let cut = base.rfind('/').expect("a URL with a database");
    let mut out = format!("{}/{db}", &base[..cut]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// A database of its own, migrated directly in its default schema (`public`), as a user's
/// application database is; dropped (with the pooler's server connections to it) at the end.
struct Database {
    admin_url: String,
    name: String,
}

impl Database {
    async fn new(url: &str) -> Self {
        let name = normandy_tests::backends::unique_name("pooler");
        let root = PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .unwrap();
        // The name is generated from a UUID: safe to splice.
        root.execute(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .unwrap();
        root.close().await;
        apply_migrations(
            &PgStoreConfig::new(&with_database(url, &name)).unwrap(),
            None,
        )
        .await
        .unwrap();
        Self {
            admin_url: url.to_string(),
            name,
        }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                if let Ok(pool) = PgPoolOptions::new().max_connections(1).connect(&url).await {
                    let _ = pool
                        .execute(AssertSqlSafe(format!(
                            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                        )))
                        .await;
                    pool.close().await;
                }
            });
        })
        .join();
    }
}

/// Two stores (two client connections each) doing a little of everything at once; returns the
/// first error, if any.
async fn workload(a: &PgStore, b: &PgStore, tag: &str) -> Option<normandy_core::Error> {
    let run = |store: PgStore, who: String| async move {
        for i in 0..20u64 {
            let id = sid(&format!("{who}-{i}"));
            store
                .create(NewSession::bare(id.clone(), ResumePolicy::Eager))
                .await?;
            let epoch = store.activate(&id, &node(&who)).await?.epoch;
            let ack = store.commit(&id, epoch, 0, &input_batch(0, "in-1")).await?;
            assert_eq!(ack, CommitAck::Applied { seq: 1 });
            assert_eq!(store.load(&id).await?.map(|r| r.seq), Some(1));
            assert_eq!(store.entries(&id, 0, 10).await?.len(), 1);
        }
        Ok::<_, normandy_core::Error>(())
    };
    let (ra, rb) = tokio::join!(
        run(a.clone(), format!("{tag}-a")),
        run(b.clone(), format!("{tag}-b"))
    );
    ra.err().or(rb.err())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_pooler_setting_pgbouncer_breaks_the_store_and_with_it_all_works() {
    let Some((url, pooler)) = pooler_urls().await else {
        return;
    };
    let db = Database::new(&url).await;
    let through = with_database(&pooler, &db.name);
    let open = |mode: PoolerMode| {
        let config = PgStoreConfig::new(&through)
            .unwrap()
            .pooler(mode)
            .max_connections(2);
        async move { PgStore::connect(config).await }
    };

    // What users saw: named statements of one client clash with (or miss) another client's on
    // the server connections the pooler shares between them.
    let mut failure = None;
    for round in 0..5 {
        let a = open(PoolerMode::None).await;
        let b = open(PoolerMode::None).await;
        failure = match (a, b) {
            (Ok(a), Ok(b)) => workload(&a, &b, &format!("named{round}")).await,
            (Err(e), _) | (_, Err(e)) => Some(e),
        };
        if failure.is_some() {
            break;
        }
    }
    let err = failure.expect("named statements through a transaction pooler never failed");
    let msg = err.to_string();
    assert!(
        msg.contains("prepared statement \"sqlx_s_"),
        "expected sqlx's named statements to clash through the pooler, got: {msg}"
    );

    // With the setting, the same workload through the same pooler passes.
    let a = open(PoolerMode::Transaction).await.unwrap();
    let b = PgStore::connect(
        PgStoreConfig::new(&format!("{through}?pooler=transaction"))
            .unwrap()
            .max_connections(2),
    )
    .await
    .unwrap();
    assert_eq!(a.schema_level(), SchemaLevel::LATEST);
    for round in 0..3 {
        let err = workload(&a, &b, &format!("unnamed{round}")).await;
        assert!(
            err.is_none(),
            "through the pooler in transaction mode: {err:?}"
        );
    }
    let page = a
        .list_resumable(&normandy_core::OwnerFilter::Any, None, 500)
        .await
        .unwrap();
    assert_eq!(page.sessions.len(), 3 * 2 * 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pooler_mode_sets_schema_and_timeouts_in_every_transaction() {
    let Some((url, pooler)) = pooler_urls().await else {
        return;
    };
    // The harness's schema is not the server's default: every statement finds the tables only
    // through the `SET LOCAL search_path` of its transaction.
    let h = PgHarness::through_pooler(&url, &pooler).await;
    let timeouts = ServerTimeouts {
        lock: Duration::from_millis(300),
        ..Default::default()
    };
    let store = PgStore::connect(h.config().server_timeouts(timeouts))
        .await
        .unwrap();
    let id = sid("locked");
    store
        .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
        .await
        .unwrap();
    let epoch = store.activate(&id, &node("a")).await.unwrap().epoch;
    let mut stuck = h.admin.begin().await.unwrap();
    sqlx::query("SELECT id FROM normandy_sessions WHERE id = $1 FOR UPDATE")
        .bind(id.as_str())
        .execute(&mut *stuck)
        .await
        .unwrap();
    // PgBouncer drops the `options` startup parameter, so only `SET LOCAL lock_timeout` can end
    // this wait (the server's default lock_timeout is 0: no limit).
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        store.commit(&id, epoch, 0, &input_batch(0, "in-1")),
    )
    .await
    .expect("the commit must not wait on the lock without end")
    .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("55P03"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    stuck.rollback().await.unwrap();
    let ack = store
        .commit(&id, epoch, 0, &input_batch(0, "in-1"))
        .await
        .unwrap();
    assert_eq!(ack, CommitAck::Applied { seq: 1 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_through_the_pooler_apply_each_migration_once() {
    let Some((url, pooler)) = pooler_urls().await else {
        return;
    };
    let mut h = PgHarness::bare(&url, Migrate::None).await;
    h.store_url = pooler.clone();
    h.pooler = PoolerMode::Transaction;
    let config = h.config();

    // Four processes' worth of runners, at once, through the pooler.
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let config = config.clone();
            tokio::spawn(async move { apply_migrations(&config, None).await })
        })
        .collect();
    let mut applied = Vec::new();
    for run in runs {
        applied.extend(run.await.unwrap().unwrap());
    }
    applied.sort_unstable();
    assert_eq!(
        applied,
        vec![1, 2, 3],
        "each migration applied exactly once"
    );
    assert_eq!(applied_migrations(&config).await.unwrap(), vec![1, 2, 3]);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM normandy_migrations")
        .fetch_one(&h.admin)
        .await
        .unwrap();
    assert_eq!(rows, 3);
    // No advisory lock outlives its transaction on a server connection the pooler keeps.
    // (The runner's lock is keyed ("NMIG", hashtext(schema)).)
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
         AND classid = 1313687879 AND objid = hashtext($1)::oid AND objsubid = 2",
    )
    .bind(&h.schema)
    .fetch_one(&h.admin)
    .await
    .unwrap();
    assert_eq!(held, 0, "an advisory lock is still held");
    assert_eq!(
        PgStore::connect(config.clone())
            .await
            .unwrap()
            .schema_level(),
        SchemaLevel::LATEST
    );
    // Up to date: nothing more to apply.
    assert!(apply_migrations(&config, None).await.unwrap().is_empty());

    // Reverting through the pooler, in stages, and again at once.
    assert_eq!(revert_migrations(&config, 1).await.unwrap(), vec![3, 2]);
    assert_eq!(
        PgStore::connect(config.clone())
            .await
            .unwrap()
            .schema_level(),
        SchemaLevel::Base
    );
    let (a, b) = tokio::join!(revert_migrations(&config, 0), revert_migrations(&config, 0));
    let mut reverted = a.unwrap();
    reverted.extend(b.unwrap());
    assert_eq!(reverted, vec![1]);
    let err = PgStore::connect(config.clone()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MissingMigration, "{err}");

    // And the store migrates itself on open through the pooler.
    let store = PgStore::connect(config.migrate_on_open(true))
        .await
        .unwrap();
    assert_eq!(store.schema_level(), SchemaLevel::LATEST);
    assert_eq!(
        applied_migrations(&h.config()).await.unwrap(),
        vec![1, 2, 3]
    );
}
