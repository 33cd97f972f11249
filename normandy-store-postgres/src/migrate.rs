//! Applying and reverting the staged migrations with the store's own connection settings:
//! directly, or through a transaction-pooling pooler, and safe when several processes migrate
//! the same database at once.
//!
//! # Why not sqlx's `Migrator::run`
//! sqlx's migrator serialises concurrent runs with a *session* advisory lock
//! (`pg_advisory_lock`, released by `pg_advisory_unlock` later). Through a transaction pooler
//! the lock, the migrations and the unlock may each run on a different server connection: the
//! lock then stays held by a server connection the pooler hands to someone else, and the unlock
//! fails. It also relies on the connection's `search_path`, which a pooler drops with the
//! startup parameters. So this runner applies each migration in one transaction that
//! 1. sets its own settings (`SET LOCAL search_path`, timeouts) through a pooler,
//! 2. takes a *transaction-scoped* advisory lock (`pg_advisory_xact_lock`) keyed by the schema,
//!    which lives and dies with the transaction on whichever server connection runs it,
//! 3. reads the record table under the lock, and applies the migration and its record only if
//!    the record is absent, then commits both together.
//!
//! Two processes racing: the second waits on the lock until the first commits (or rolls back);
//! its next statement reads a fresh snapshot (`READ COMMITTED`), sees the record and skips. A
//! migration and its record commit atomically, so no crash leaves one without the other.
//!
//! Records go to [`MIGRATIONS_TABLE`] in the format sqlx's migrator uses, so either runner can
//! take over from the other (but do not run both at the same moment: their locks differ).

use std::collections::HashMap;
use std::time::Instant;

use normandy_core::{Error, Result};
use sqlx::migrate::{Migration, MigrationType};
use sqlx::postgres::PgConnection;
use sqlx::{Executor, Row};

use crate::config::PgStoreConfig;
use crate::conn::Db;
use crate::error::{BACKEND, map_sqlx};
use crate::schema::{MIGRATIONS_TABLE, migrator};

/// The first key of the migrations' advisory lock ("NMIG"); the second is a hash of the schema,
/// so migrations of different schemas of one database do not wait for each other.
const LOCK_KEY: i32 = 0x4e4d_4947;

const LOCK_SQL: &str = "SELECT pg_advisory_xact_lock($1, hashtext(coalesce(current_schema(), '')))";
const TABLE_SQL: &str = "CREATE TABLE IF NOT EXISTS normandy_migrations ( \
    version BIGINT PRIMARY KEY, \
    description TEXT NOT NULL, \
    installed_on TIMESTAMPTZ NOT NULL DEFAULT now(), \
    success BOOLEAN NOT NULL, \
    checksum BYTEA NOT NULL, \
    execution_time BIGINT NOT NULL)";
const EXISTS_SQL: &str = "SELECT to_regclass('normandy_migrations') IS NOT NULL";
const RECORDS_SQL: &str = "SELECT version, success, checksum FROM normandy_migrations";
const RECORD_SQL: &str = "INSERT INTO normandy_migrations \
    (version, description, success, checksum, execution_time) VALUES ($1, $2, TRUE, $3, $4)";
const UNRECORD_SQL: &str = "DELETE FROM normandy_migrations WHERE version = $1";

/// Applies the pending migrations up to and including version `up_to` (all when `None`), each
/// in its own transaction; returns the versions this call applied (empty when up to date).
///
/// Connects with `config`'s settings (its schema, timeouts and [`PoolerMode`](crate::PoolerMode)),
/// so it works through a transaction pooler, and any number of processes may run it at once:
/// each migration is applied exactly once (see the module's doc). A migration whose recorded
/// checksum differs from this build's, or a failed one recorded by sqlx, is an error and
/// nothing further is applied.
pub async fn apply_migrations(config: &PgStoreConfig, up_to: Option<i64>) -> Result<Vec<i64>> {
    let db = Db::new(
        crate::conn::connect(&config.clone().max_connections(1)).await?,
        config,
    );
    let applied = apply(&db, up_to).await;
    db.pool.close().await;
    applied
}

/// Reverts applied migrations down to version `down_to` (0: all), newest first, each in its
/// own transaction; returns the versions this call reverted. As safe as
/// [`apply_migrations`] through a pooler and against concurrent runs.
pub async fn revert_migrations(config: &PgStoreConfig, down_to: i64) -> Result<Vec<i64>> {
    let db = Db::new(
        crate::conn::connect(&config.clone().max_connections(1)).await?,
        config,
    );
    let reverted = revert(&db, down_to).await;
    db.pool.close().await;
    reverted
}

/// The versions recorded as applied, ascending (empty when nothing was ever applied).
pub async fn applied_migrations(config: &PgStoreConfig) -> Result<Vec<i64>> {
    let db = Db::new(
        crate::conn::connect(&config.clone().max_connections(1)).await?,
        config,
    );
    let result = async {
        let mut tx = db.begin().await.map_err(map_sqlx)?;
        let exists: bool = sqlx::query_scalar(EXISTS_SQL)
            .persistent(db.persistent())
            .fetch_one(&mut *tx)
            .await
            .map_err(map_sqlx)?;
        let mut versions = Vec::new();
        if exists {
            for (version, (success, _)) in records(&mut tx, db.persistent()).await? {
                if success {
                    versions.push(version);
                }
            }
        }
        tx.commit().await.map_err(map_sqlx)?;
        versions.sort_unstable();
        Ok(versions)
    }
    .await;
    db.pool.close().await;
    result
}

/// [`apply_migrations`] on an open pool.
pub(crate) async fn apply(db: &Db, up_to: Option<i64>) -> Result<Vec<i64>> {
    let m = migrator();
    let mut done = Vec::new();
    for migration in m.iter().filter(|x| x.migration_type.is_up_migration()) {
        if up_to.is_some_and(|last| migration.version > last) {
            break;
        }
        if apply_one(db, migration).await? {
            done.push(migration.version);
        }
    }
    Ok(done)
}

/// Applies one migration unless it is recorded; whether this call applied it.
async fn apply_one(db: &Db, migration: &Migration) -> Result<bool> {
    let failed = |e: sqlx::Error| migration_error(migration.version, "applying", e);
    let p = db.persistent();
    let start = Instant::now();
    let mut tx = db.begin().await.map_err(map_sqlx)?;
    lock(&mut tx, p).await?;
    let records = records(&mut tx, p).await?;
    if let Some((success, checksum)) = records.get(&migration.version) {
        if !success {
            return Err(broken(format!(
                "migration {} is recorded as failed in {MIGRATIONS_TABLE}: repair the database \
                 by hand, delete its record, and migrate again",
                migration.version
            )));
        }
        if checksum.as_slice() != &*migration.checksum {
            return Err(broken(format!(
                "migration {} was changed after it was applied (its checksum differs from \
                 this build's)",
                migration.version
            )));
        }
        tx.commit().await.map_err(map_sqlx)?;
        return Ok(false);
    }
    // The migration's statements go as one simple query, in this transaction.
    (&mut *tx)
        .execute(migration.sql.clone())
        .await
        .map_err(failed)?;
    let elapsed = i64::try_from(start.elapsed().as_nanos()).unwrap_or(i64::MAX);
    sqlx::query(RECORD_SQL)
        .persistent(p)
        .bind(migration.version)
        .bind(&*migration.description)
        .bind(&*migration.checksum)
        .bind(elapsed)
        .execute(&mut *tx)
        .await
        .map_err(failed)?;
    tx.commit().await.map_err(failed)?;
    tracing::info!(version = migration.version, description = %migration.description, "migration applied");
    Ok(true)
}

/// [`revert_migrations`] on an open pool.
pub(crate) async fn revert(db: &Db, down_to: i64) -> Result<Vec<i64>> {
    let m = migrator();
    let mut done = Vec::new();
    let downs: Vec<&Migration> = m
        .iter()
        .filter(|x| x.migration_type == MigrationType::ReversibleDown && x.version > down_to)
        .collect();
    for migration in downs.into_iter().rev() {
        let failed = |e: sqlx::Error| migration_error(migration.version, "reverting", e);
        let p = db.persistent();
        let mut tx = db.begin().await.map_err(map_sqlx)?;
        lock(&mut tx, p).await?;
        let applied = records(&mut tx, p)
            .await?
            .get(&migration.version)
            .is_some_and(|(success, _)| *success);
        if !applied {
            tx.commit().await.map_err(map_sqlx)?;
            continue;
        }
        (&mut *tx)
            .execute(migration.sql.clone())
            .await
            .map_err(failed)?;
        sqlx::query(UNRECORD_SQL)
            .persistent(p)
            .bind(migration.version)
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        tracing::info!(version = migration.version, description = %migration.description, "migration reverted");
        done.push(migration.version);
    }
    Ok(done)
}

/// Takes the migrations' transaction-scoped lock and makes sure the record table exists (under
/// the lock, so two first runs do not both create it).
async fn lock(conn: &mut PgConnection, persistent: bool) -> Result<()> {
    sqlx::query(LOCK_SQL)
        .persistent(persistent)
        .bind(LOCK_KEY)
        .execute(&mut *conn)
        .await
        .map_err(map_sqlx)?;
    (&mut *conn).execute(TABLE_SQL).await.map_err(map_sqlx)?;
    Ok(())
}

/// The record table's rows: version → (success, checksum).
async fn records(
    conn: &mut PgConnection,
    persistent: bool,
) -> Result<HashMap<i64, (bool, Vec<u8>)>> {
    let rows = sqlx::query(RECORDS_SQL)
        .persistent(persistent)
        .fetch_all(&mut *conn)
        .await
        .map_err(map_sqlx)?;
    let mut out = HashMap::with_capacity(rows.len());
    for row in rows {
        let version: i64 = row.try_get(0).map_err(map_sqlx)?;
        let success: bool = row.try_get(1).map_err(map_sqlx)?;
        let checksum: Vec<u8> = row.try_get(2).map_err(map_sqlx)?;
        out.insert(version, (success, checksum));
    }
    Ok(out)
}

fn migration_error(version: i64, doing: &str, e: sqlx::Error) -> Error {
    match map_sqlx(e) {
        // A lost connection stays retryable: the migration's transaction either committed
        // with its record or not at all, so running the migrations again is safe.
        e @ Error::Unavailable { .. } => e,
        e => broken(format!("{doing} migration {version}: {e}")),
    }
}

fn broken(message: String) -> Error {
    Error::Backend {
        backend: BACKEND,
        message,
        retryable: false,
    }
}
