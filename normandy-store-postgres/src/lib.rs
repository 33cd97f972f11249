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
//! - `error`: the one function that maps sqlx errors to [`normandy_core::Error`].
//! - `conn`: the connection pool (size, timeouts, `search_path`, `application_name`), and how
//!   one operation gets a connection: directly, or as one transaction through a
//!   transaction-pooling pooler ([`PoolerMode`]).
//! - `schema`: [`migrator`], [`SchemaLevel`] (which staged migrations a database has, read from
//!   the catalog) and the check a store makes when it opens.
//! - `sql`: every statement the store runs, with the variants for older schemas.
//! - `record`: a session row's columns to a [`SessionRecord`](normandy_core::SessionRecord).
//! - `store`: [`PgStore`], the [`SessionStore`](normandy_core::SessionStore) implementation:
//!   reads, creation, activation, the resumable index; commits are handed to `group`.
//! - `group`: group commit: the gatherer task, the fenced single and group commit statements,
//!   and finding out why a commit was refused; [`WriteStats`].
//! - `migrate`: [`apply_migrations`] / [`revert_migrations`] / [`applied_migrations`], the
//!   migration runner that works through a transaction pooler and under concurrent runs.
//! - `migrations/` (in the crate directory): the staged schema as plain up/down SQL files,
//!   `0001_base`, `0002_template`, `0003_resume_policy`, embedded here by [`migrator`] and meant
//!   to be copied into an application's own migrations if it prefers.
//!
//! # Poolers
//! Behind PgBouncer in transaction mode, RDS Proxy or Supavisor, open the store with
//! `?pooler=transaction` on the URL (or [`PgStoreConfig::pooler`]): see [`PoolerMode`] for what
//! changes and what it costs.
//!
//! # Migrations
//! [`apply_migrations`] and [`migrator`] record what they applied in their own table,
//! `normandy_migrations`, so they never collide with an application's `_sqlx_migrations`. The store itself detects the schema from
//! the catalog, so it works however the files were applied. A database with only `0001_base`
//! works (a tier-1 deployment may stop there): sessions then have no template and are all lazy,
//! and creating a session that needs more fails with `MissingMigration` naming the migration.

mod config;
mod conn;
mod error;
mod group;
mod migrate;
mod record;
mod schema;
mod sql;
mod store;

pub use config::{PgStoreConfig, PoolerMode, ServerTimeouts};
pub use group::WriteStats;
pub use migrate::{applied_migrations, apply_migrations, revert_migrations};
pub use schema::{MIGRATIONS_TABLE, SchemaLevel, migrator};
pub use store::PgStore;
