//! A Normandy [`SessionRegistry`](normandy_core::SessionRegistry) and
//! [`Membership`](normandy_core::Membership) on Postgres alone (tier 2p): placement by a
//! primary key on the session id, node leases with server-side expiry, no Redis.
//!
//! # Layout
//! - [`config`]: [`PgRegistryConfig`] — URL, schema, pool, server timeouts, and the
//!   transaction-pooler switch; opening the pool.
//! - `error`: the one function that maps sqlx errors to [`normandy_core::Error`].
//! - `schema`: the migration (`0001_registry`, recorded in `normandy_registry_migrations`):
//!   [`apply_migration`], safe from many processes at once, sqlx's [`migrator`], and the check
//!   made when a pool opens.
//! - `lease`: node lease rows — the one implementation and policy behind both types below.
//! - [`registry`]: [`PgRegistry`] — `register` / `lookup` / `unregister`, one statement each.
//! - [`membership`]: [`PgMembership`], the cluster's membership on the same lease rows.
//!
//! # How it works
//! `normandy_node_leases` holds one row per node incarnation with `expires_at`, always written
//! as `now() + ttl` and compared with `now()` on the server. A heartbeat is
//! `UPDATE … SET expires_at = now() + ttl WHERE name = $me AND incarnation = $inc AND address =
//! $addr AND expires_at > now()`: zero rows means the lease is lost (never re-created), and the
//! node rejoins under a new incarnation. The column has no index, so each beat is a HOT update
//! (no index entry, less WAL). Survivors poll the member list; nothing rests on `LISTEN`.
//!
//! `normandy_placements` is keyed by session id. `register` is one `INSERT … ON CONFLICT DO
//! UPDATE … WHERE <the old owner's lease has lapsed>` that bumps the id's epoch: of concurrent
//! callers exactly one wins, and taking over a dead node's session is that same statement.
//! `lookup` resolves a placement only while its owner's lease row is alive.
//!
//! Nothing depends on session state, so it all works through PgBouncer in transaction mode
//! ([`PgRegistryConfig::transaction_pooler`], or `?pooler=transaction` on the URL, the store's
//! option): statements are then unnamed, every operation is one transaction opened by `BEGIN;
//! SET LOCAL search_path … statement_timeout …` (a pooler drops startup parameters and hands
//! each transaction any server connection), a join's advisory lock on the node name is
//! transaction-scoped, nothing listens for notifications, and the migration is applied under a
//! transaction-scoped lock.
//!
//! # Why a crate of its own
//! It depends on `normandy-core` and sqlx only — not on `normandy-store-postgres` (DESIGN.md:
//! backends depend on core, never on each other) — so a deployment may pair it with any store,
//! and the store crate stays a store. Doing the placement and the store's epoch bump in one
//! transaction would have needed both in one crate and a seam in core that joins
//! `SessionRegistry::register` and `SessionStore::activate`; it would save one round trip per
//! activation, not buy correctness, since the store's epoch fences a duplicate activation on
//! its own (invariant 1). When the store is the same database, the two share nothing but the
//! server: point both at one URL and schema.
//!
//! # Example
//! ```no_run
//! use std::time::Duration;
//! use normandy_core::{NodeId, SessionId, SessionRegistry};
//! use normandy_registry_postgres::{PgRegistry, PgRegistryConfig};
//!
//! # async fn run() -> normandy_core::Result<()> {
//! let config = PgRegistryConfig::new("postgres://app@db.internal/app")?.migrate_on_open(true);
//! let registry = PgRegistry::connect(config).await?;
//! let me = NodeId::with_fresh_incarnation("node-a")?;
//! registry.acquire_lease(&me, Duration::from_secs(10)).await?;
//! let placement = registry.register(&SessionId::new("s1")?, &me).await?;
//! assert_eq!(placement.owner, me);
//! # Ok(())
//! # }
//! ```

pub mod config;
mod error;
mod lease;
pub mod membership;
pub mod registry;
mod schema;

pub use config::PgRegistryConfig;
pub use membership::PgMembership;
pub use registry::PgRegistry;
pub use schema::{MIGRATIONS_TABLE, apply_migration, migrator};
