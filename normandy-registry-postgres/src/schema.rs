//! The registry's schema: the embedded migration and the check made when a pool opens.

use normandy_core::Result;

use crate::PgRegistryConfig;
use crate::error::{map_sqlx, missing_migration};
use crate::lease::Db;

/// The table in which [`migrator`] records what it applied (not the store's
/// `normandy_migrations`, nor an application's `_sqlx_migrations`).
pub const MIGRATIONS_TABLE: &str = "normandy_registry_migrations";

/// The one migration, by the name its files carry.
pub(crate) const MIGRATION_NAME: &str = "0001_registry";

/// The registry's migration (`0001_registry`: the node leases and placements tables),
/// embedded at build time, recording into [`MIGRATIONS_TABLE`]. Tables go in the connection's
/// `search_path`.
///
/// This is sqlx's migrator, for tools that take one. The registry itself
/// ([`PgRegistryConfig::migrate_on_open`](crate::PgRegistryConfig::migrate_on_open)) and
/// [`apply_migration`] do not run it: its session advisory lock and its reliance on the
/// `search_path` do not survive a transaction-pooling pooler, and a lock of its own would let
/// a node that connects directly and one behind a pooler apply the migration at the same
/// moment. Both paths take the one transaction-scoped lock instead.
pub fn migrator() -> sqlx::migrate::Migrator {
    let mut m = sqlx::migrate!("./migrations");
    m.dangerous_set_table_name(MIGRATIONS_TABLE);
    m
}

/// Applies the registry's migration (`0001_registry`) with `config`'s connection settings —
/// its schema, and its [transaction-pooler](PgRegistryConfig::transaction_pooler) mode — unless
/// it is applied already. Any number of processes may run it at once, directly or through a
/// pooler: it is applied once (see `migrate_on_open`, which does the same when a registry
/// opens). `cargo xtask migrate up --registry` runs it.
///
/// Returns whether this call applied it (false: the database had it).
pub async fn apply_migration(config: &PgRegistryConfig) -> Result<bool> {
    let db = config
        .clone()
        .migrate_on_open(false)
        .max_connections(1)
        .open_unchecked()
        .await?;
    let applied = apply_locked(&db).await;
    db.pool.close().await;
    applied
}

/// Applies the migration if asked, then refuses a database without the registry's tables.
pub(crate) async fn check(db: &Db, migrate: bool) -> Result<()> {
    if migrate {
        apply_locked(db).await?;
    }
    let mut conn = db.conn().await?;
    let present: bool = sqlx::query_scalar(
        "SELECT to_regclass('normandy_node_leases') IS NOT NULL \
           AND to_regclass('normandy_placements') IS NOT NULL",
    )
    .persistent(db.persistent)
    .fetch_one(conn.get())
    .await
    .map_err(map_sqlx)?;
    conn.finish().await?;
    if present {
        Ok(())
    } else {
        Err(missing_migration())
    }
}

/// Applies the migration in one transaction that holds a transaction-scoped advisory lock on
/// the schema *before* it creates the record table, reads the record under the lock and commits
/// the migration with its record, in sqlx's table format. Concurrent starts (directly or
/// through a transaction pooler, whose connections change between transactions) apply it once,
/// and [`migrator`] later sees it applied.
async fn apply_locked(db: &Db) -> Result<bool> {
    let m = migrator();
    let mut tx = db.tx().await?;
    let mut applied = false;
    let run = async {
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtextextended('normandy_registry_migrations:' \
             || current_schema(), 0))",
        )
        .persistent(false)
        .execute(&mut *tx)
        .await?;
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS normandy_registry_migrations ( \
               version BIGINT PRIMARY KEY, description TEXT NOT NULL, \
               installed_on TIMESTAMPTZ NOT NULL DEFAULT now(), success BOOLEAN NOT NULL, \
               checksum BYTEA NOT NULL, execution_time BIGINT NOT NULL)",
        )
        .execute(&mut *tx)
        .await?;
        for migration in m.iter().filter(|m| m.migration_type.is_up_migration()) {
            let done: Option<i64> = sqlx::query_scalar(
                "SELECT version FROM normandy_registry_migrations WHERE version = $1",
            )
            .bind(migration.version)
            .persistent(false)
            .fetch_optional(&mut *tx)
            .await?;
            if done.is_some() {
                continue;
            }
            applied = true;
            let started = std::time::Instant::now();
            sqlx::raw_sql(migration.sql.clone())
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO normandy_registry_migrations \
                   (version, description, success, checksum, execution_time) \
                 VALUES ($1, $2, true, $3, $4)",
            )
            .bind(migration.version)
            .bind(migration.description.as_ref())
            .bind(migration.checksum.as_ref())
            .bind(i64::try_from(started.elapsed().as_nanos()).unwrap_or(i64::MAX))
            .persistent(false)
            .execute(&mut *tx)
            .await?;
        }
        Ok::<(), sqlx::Error>(())
    };
    run.await.map_err(map_sqlx)?;
    tx.commit().await.map_err(map_sqlx)?;
    Ok(applied)
}
