//! A fresh schema per test on the test server, migrated by the registry when it opens, dropped
//! after a passing test.

#![allow(dead_code, unreachable_pub)]

use normandy_registry_postgres::{PgMembership, PgRegistry, PgRegistryConfig};
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgPoolOptions;

/// One schema `nr_<uuid>`.
pub struct Schema {
    pub url: String,
    pub name: String,
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
        }
    }

    pub fn config(&self) -> PgRegistryConfig {
        PgRegistryConfig::new(&self.url)
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
