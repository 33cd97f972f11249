//! The Postgres session store of Normandy (tier 1 and 2): durable, shared by every node, fenced
//! by epochs, with group commit across sessions.
//!
//! ```no_run
//! use normandy_store_postgres::{PgStore, PgStoreConfig, migrator};
//!
//! # async fn run() -> normandy_core::Result<()> {
//! let config = PgStoreConfig::new("postgres://normandy@db.internal/app")?;
//! let store = PgStore::connect(config).await?;
//! // Or let the store apply its own migrations: `PgStoreConfig::migrate_on_open(true)`.
//! # migrator().run(store.pool()).await.ok();
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! - `config`: [`PgStoreConfig`], where to connect and how to batch commits.
//! - `store`: [`PgStore`], the [`SessionStore`](normandy_core::SessionStore) implementation, and
//!   [`SchemaLevel`], which staged migrations a database has.
//! - `error`: the one function that maps sqlx errors to [`normandy_core::Error`].
//! - `migrations/` (in the crate directory): the staged schema as plain up/down SQL files,
//!   `0001_base`, `0002_template`, `0003_resume_policy`, embedded here by [`migrator`] and meant
//!   to be copied into an application's own migrations if it prefers.
//!
//! # Migrations
//! [`migrator`] records what it applied in its own table, `normandy_migrations`, so it never
//! collides with an application's `_sqlx_migrations`. The store itself detects the schema from
//! the catalog, so it works however the files were applied. A database with only `0001_base`
//! works (a tier-1 deployment may stop there): sessions then have no template and are all lazy,
//! and creating a session that needs more fails with `MissingMigration` naming the migration.

mod config;
mod error;
mod store;

pub use config::PgStoreConfig;
pub use store::{PgStore, SchemaLevel, WriteStats};

/// The table in which [`migrator`] records applied migrations.
pub const MIGRATIONS_TABLE: &str = "normandy_migrations";

/// The staged migrations, embedded at build time, recording into [`MIGRATIONS_TABLE`].
///
/// Versions are 1 (`base`), 2 (`template`) and 3 (`resume_policy`); run all with
/// `migrator().run(&pool)`, only the base with `migrator().run_to(1, &pool)`, and revert with
/// `migrator().undo(&pool, target)`. Tables are created in the connection's `search_path`.
pub fn migrator() -> sqlx::migrate::Migrator {
    let mut m = sqlx::migrate!("./migrations");
    m.dangerous_set_table_name(MIGRATIONS_TABLE);
    m
}
