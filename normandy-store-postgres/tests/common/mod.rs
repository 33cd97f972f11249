//! A fresh schema per harness, migrated as a test asks, dropped when the harness goes.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;

use normandy_core::{CommitBatch, QueuedInput};
use normandy_core::{
    Entry, EntryPayload, InputId, Message, Seq, SessionId, SessionStore, TurnState,
};
use normandy_store_postgres::{PgStore, PgStoreConfig, PoolerMode, apply_migrations, migrator};
use normandy_tests::StoreHarness;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Row};

/// Which migrations a harness applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migrate {
    None,
    /// Up to and including this version.
    UpTo(i64),
    All,
}

/// One isolated schema `n_<uuid>` on the test server.
pub struct PgHarness {
    /// The server, directly: the admin pool and the schema's creation and removal use it.
    pub url: String,
    /// What the store connects to: `url`, or a transaction pooler in front of the same server.
    pub store_url: String,
    /// How the store talks to `store_url`.
    pub pooler: PoolerMode,
    pub schema: String,
    /// Reported by the store's connections in `pg_stat_activity`.
    pub app_name: String,
    /// A separate pool on the same schema, for raw reads and writes.
    pub admin: PgPool,
    store: Option<Arc<PgStore>>,
}

impl PgHarness {
    /// A migrated schema with a store on it.
    pub async fn new(url: &str) -> Self {
        let mut h = Self::bare(url, Migrate::All).await;
        h.store = Some(Arc::new(h.open().await.expect("open store")));
        h
    }

    /// A schema on the server of `url` whose store talks through the transaction pooler at
    /// `pooler_url` (in front of the same server) in [`PoolerMode::Transaction`]; the schema is
    /// migrated through the pooler too, by the store crate's own runner.
    pub async fn through_pooler(url: &str, pooler_url: &str) -> Self {
        let mut h = Self::bare(url, Migrate::None).await;
        h.store_url = pooler_url.to_string();
        h.pooler = PoolerMode::Transaction;
        apply_migrations(&h.config(), None)
            .await
            .expect("migrate through the pooler");
        h.store = Some(Arc::new(h.open().await.expect("open store")));
        h
    }

    /// A schema migrated as asked, with no store opened yet.
    pub async fn bare(url: &str, migrate: Migrate) -> Self {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let schema = format!("n_{id}");
        let app_name = format!("nt_{id}");
        // Schema names are generated here from a UUID: safe to splice.
        let root = PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .expect("connect to the test database");
        sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&root)
            .await
            .expect("create schema");
        root.close().await;
        let admin = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(
                url.parse::<sqlx::postgres::PgConnectOptions>()
                    .expect("url")
                    .options([("search_path", schema.as_str())]),
            )
            .await
            .expect("connect admin pool");
        match migrate {
            Migrate::None => {}
            Migrate::UpTo(v) => migrator().run_to(v, &admin).await.expect("migrate"),
            Migrate::All => migrator().run(&admin).await.expect("migrate"),
        }
        Self {
            url: url.to_string(),
            store_url: url.to_string(),
            pooler: PoolerMode::None,
            schema,
            app_name,
            admin,
            store: None,
        }
    }

    /// The config every store of this harness uses.
    pub fn config(&self) -> PgStoreConfig {
        PgStoreConfig::new(&self.store_url)
            .expect("config")
            .pooler(self.pooler)
            .schema(self.schema.clone())
            .expect("schema")
            .application_name(self.app_name.clone())
            .max_connections(8)
    }

    /// Opens a new store on the schema.
    pub async fn open(&self) -> normandy_core::Result<PgStore> {
        PgStore::connect(self.config()).await
    }

    pub fn pg(&self) -> Arc<PgStore> {
        self.store.clone().expect("harness opened without a store")
    }
}

impl Drop for PgHarness {
    fn drop(&mut self) {
        // Drop the schema from a thread of its own: Drop cannot await, and the test's runtime
        // may be shutting down.
        let url = self.url.clone();
        let schema = self.schema.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok(pool) = PgPoolOptions::new().max_connections(1).connect(&url).await {
                    let _ = sqlx::query(AssertSqlSafe(format!(
                        "DROP SCHEMA IF EXISTS {schema} CASCADE"
                    )))
                    .execute(&pool)
                    .await;
                    pool.close().await;
                }
            });
        })
        .join();
    }
}

#[normandy_core::async_trait]
impl StoreHarness for PgHarness {
    fn store(&self) -> Arc<dyn SessionStore> {
        self.pg()
    }

    async fn reopen(&self) -> Arc<dyn SessionStore> {
        Arc::new(self.open().await.expect("reopen store"))
    }

    async fn raw_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let rows = sqlx::query("SELECT convert_to(id || coalesce(owner, '') || status, 'UTF8'), turn_state, coalesce(template, ''::bytea) FROM normandy_sessions")
            .fetch_all(&self.admin)
            .await
            .expect("read sessions");
        for row in rows {
            for i in 0..3 {
                let b: Vec<u8> = row.get(i);
                out.extend_from_slice(&b);
            }
        }
        let rows = sqlx::query("SELECT convert_to(kind || coalesce(input_id, ''), 'UTF8'), payload FROM normandy_entries")
            .fetch_all(&self.admin)
            .await
            .expect("read entries");
        for row in rows {
            for i in 0..2 {
                let b: Vec<u8> = row.get(i);
                out.extend_from_slice(&b);
            }
        }
        out
    }

    async fn overwrite_state(&self, id: &SessionId, bytes: &[u8]) {
        sqlx::query("UPDATE normandy_sessions SET turn_state = $2 WHERE id = $1")
            .bind(id.as_str())
            .bind(bytes)
            .execute(&self.admin)
            .await
            .expect("overwrite state");
    }

    async fn overwrite_entry(&self, id: &SessionId, seq: Seq, bytes: &[u8]) {
        sqlx::query("UPDATE normandy_entries SET payload = $3 WHERE session_id = $1 AND seq = $2")
            .bind(id.as_str())
            .bind(seq as i64)
            .bind(bytes)
            .execute(&self.admin)
            .await
            .expect("overwrite entry");
    }
}

/// The test database URL (`NORMANDY_TEST_DATABASE_URL`, else the local default server when it
/// answers, else a container, else `None`: the running test is reported skipped by name, or fails
/// under `NORMANDY_REQUIRE_BACKENDS=1`).
pub async fn url() -> Option<String> {
    let url = normandy_tests::backends::postgres_url().await;
    if url.is_none() {
        normandy_tests::backends::skip_this_test(&normandy_tests::backends::skip_reason());
    }
    url
}

pub fn sid(s: &str) -> SessionId {
    SessionId::new(s).expect("session id")
}

/// An `Input` entry at `seq` carrying `input`.
pub fn input_entry(seq: Seq, input: &str) -> Entry {
    Entry {
        seq,
        parent: seq.checked_sub(1).filter(|p| *p > 0),
        at_ms: 1,
        payload: EntryPayload::Input {
            input_id: InputId::new(input).expect("input id"),
            content: Message::user(format!("hello {input}")).content,
        },
    }
}

/// A batch of one input after `expected_seq`, leaving it queued (so the state has work).
pub fn input_batch(expected_seq: Seq, input: &str) -> CommitBatch {
    let mut state = TurnState::default();
    state.queued.push_back(QueuedInput {
        input_id: InputId::new(input).expect("input id"),
        seq: expected_seq + 1,
    });
    CommitBatch {
        entries: vec![input_entry(expected_seq + 1, input)],
        state,
    }
}

/// The test database URL and the transaction pooler in front of it
/// (`NORMANDY_TEST_PGBOUNCER_URL`), else `None`: the running test is reported skipped by name,
/// or fails under `NORMANDY_REQUIRE_BACKENDS=1`.
pub async fn pooler_urls() -> Option<(String, String)> {
    let direct = url().await?;
    let pooler = normandy_tests::backends::pgbouncer_url().await;
    if pooler.is_none() {
        normandy_tests::backends::skip_this_test(&normandy_tests::backends::skip_reason());
    }
    Some((direct, pooler?))
}
