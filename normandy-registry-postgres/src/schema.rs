//! The registry's schema: the embedded migration and the check made when a pool opens.

use normandy_core::Result;
use sqlx::postgres::PgPool;

use crate::error::{BACKEND, map_sqlx, missing_migration};

/// The table in which [`migrator`] records what it applied (not the store's
/// `normandy_migrations`, nor an application's `_sqlx_migrations`).
pub const MIGRATIONS_TABLE: &str = "normandy_registry_migrations";

/// The one migration, by the name its files carry.
pub(crate) const MIGRATION_NAME: &str = "0001_registry";

/// The registry's migration (`0001_registry`: the node leases and placements tables),
/// embedded at build time, recording into [`MIGRATIONS_TABLE`]. Tables go in the connection's
/// `search_path`. Run it with `migrator().run(&pool)`.
///
/// The migrator takes a session advisory lock while it runs, which a transaction-pooling
/// pooler cannot hold for it: behind one, apply the migration directly against Postgres (or
/// once, from one process: [`PgRegistryConfig::migrate_on_open`](crate::PgRegistryConfig)
/// then runs it without the lock).
pub fn migrator() -> sqlx::migrate::Migrator {
    let mut m = sqlx::migrate!("./migrations");
    m.dangerous_set_table_name(MIGRATIONS_TABLE);
    m
}

/// Applies the migration if asked, then refuses a database without the registry's tables.
pub(crate) async fn check(pool: &PgPool, migrate: bool, pooled: bool) -> Result<()> {
    if migrate {
        let mut m = migrator();
        // A session advisory lock does not survive a transaction pooler.
        m.set_locking(!pooled);
        m.run(pool)
            .await
            .map_err(|e| normandy_core::Error::Backend {
                backend: BACKEND,
                message: format!("applying the registry migration: {e}"),
                retryable: false,
            })?;
    }
    let present: bool = sqlx::query_scalar(
        "SELECT to_regclass('normandy_node_leases') IS NOT NULL \
           AND to_regclass('normandy_placements') IS NOT NULL",
    )
    .persistent(!pooled)
    .fetch_one(pool)
    .await
    .map_err(map_sqlx)?;
    if present {
        Ok(())
    } else {
        Err(missing_migration())
    }
}
