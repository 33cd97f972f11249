//! A fresh schema per test on the test server, migrated by the registry when it opens, dropped
//! after a passing test.

#![allow(dead_code, unreachable_pub)]

use normandy_registry_postgres::{PgMembership, PgRegistry, PgRegistryConfig};
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgPoolOptions;

/// The env var naming a PgBouncer in transaction-pooling mode in front of the test server
/// (the store's pooler suite reads the same one).
pub const PGBOUNCER_URL_VAR: &str = "NORMANDY_TEST_PGBOUNCER_URL";

/// The PgBouncer URL, or `None` (the caller skips by name, or fails under
/// `NORMANDY_REQUIRE_BACKENDS=1`).
pub fn pgbouncer_url() -> Option<String> {
    std::env::var(PGBOUNCER_URL_VAR)
        .ok()
        .filter(|u| !u.is_empty())
}

/// One schema `nr_<uuid>`.
pub struct Schema {
    pub url: String,
    pub name: String,
    /// Where the registry connects: the server itself, or a transaction pooler in front of it
    /// (with `?pooler=transaction`).
    pub registry_url: String,
}

impl Schema {
    pub async fn new(url: &str) -> Self {
        let name = format!("nr_{}", uuid::Uuid::now_v7().simple());
        let root = PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .expect("connect to the test database");
        // Generated from a UUID here: safe to splice.
        sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .execute(&root)
            .await
            .expect("create schema");
        root.close().await;
        Self {
            url: url.to_string(),
            name,
            registry_url: url.to_string(),
        }
    }

    /// A schema on the server of `url`, used through the transaction pooler at `pooler`.
    pub async fn pooled(url: &str, pooler: &str) -> Self {
        let mut s = Self::new(url).await;
        s.registry_url = format!("{pooler}?pooler=transaction");
        s
    }

    pub fn config(&self) -> PgRegistryConfig {
        PgRegistryConfig::new(&self.registry_url)
            .unwrap()
            .schema(&self.name)
            .unwrap()
            .migrate_on_open(true)
    }

    pub async fn registry(&self) -> PgRegistry {
        PgRegistry::connect(self.config())
            .await
            .expect("connect registry")
    }

    pub async fn membership(&self) -> PgMembership {
        PgMembership::connect(self.config())
            .await
            .expect("connect membership")
    }

    /// Rows in the schema's `normandy_registry_migrations` (read straight from the server).
    pub async fn migrations_recorded(&self) -> i64 {
        let root = PgPoolOptions::new()
            .max_connections(1)
            .connect(&self.url)
            .await
            .expect("connect to the test database");
        let n = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {}.normandy_registry_migrations",
            self.name
        )))
        .fetch_one(&root)
        .await
        .expect("count the migration records");
        root.close().await;
        n
    }

    pub async fn drop(&self) {
        if let Ok(root) = PgPoolOptions::new()
            .max_connections(1)
            .connect(&self.url)
            .await
        {
            let _ = sqlx::query(AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                self.name
            )))
            .execute(&root)
            .await;
            root.close().await;
        }
    }
}
