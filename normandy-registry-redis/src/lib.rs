//! A Normandy [`SessionRegistry`](normandy_core::SessionRegistry) on Redis: atomic placement by
//! Lua script, per-id registry epochs, and node leases with a server-side TTL.
//!
//! # Layout
//! - [`config`]: [`RedisRegistryConfig`] — its own URL or client (a connection separate from the
//!   store's), key prefix, lease TTL, timeouts.
//! - [`registry`]: [`RedisRegistry`] — `register` / `lookup` / `unregister` scripts, the node
//!   lease methods and the [`LeaseRefresher`] task.
//! - `lease`: node leases — the one implementation and policy (claimed only if absent,
//!   refreshed only while present, never re-created) behind the registry's lease methods,
//!   [`LeaseRefresher`] and [`RedisMembership`].
//! - [`membership`]: [`RedisMembership`], the cluster's
//!   [`Membership`](normandy_core::Membership) on those leases.
//! - Connections come from `normandy-redis`: one server or a Redis Cluster
//!   (`redis+cluster://h1:p1,h2:p2`), the same code on both; placements, leases and the member
//!   set each stay within one hash slot per script.
//! - `error`: the one function that maps Redis errors to [`normandy_core::Error`].
//!
//! # How placement works
//! `register(id, owner)` reads the placement and, if the id has an owner, whether its lease key
//! is alive: then the caller gets `AlreadyRegistered` naming that owner and its epoch; otherwise
//! the caller takes the id with a compare-and-set script on the placement (`epoch = HINCRBY` of
//! the id's counter, only if owner and epoch are still what it read), so of any number of
//! concurrent callers, on any number of processes, exactly one wins, and a re-registration after a lapse has a higher
//! epoch. `lookup` resolves a placement only while its owner's lease exists. Leases expire on the
//! server's clock (`PX`), never on a client's; a node renews its lease every TTL/3
//! ([`RedisRegistry::spawn_lease_refresher`]) and should stop serving once
//! [`LeaseRefresher::is_valid`] turns false. Correctness never rests on the lease alone: the
//! store's epoch fences a paused owner that still believes it holds a session.
//!
//! The registry does not `WAIT`: a failover to a replica that missed recent writes can forget a
//! placement (the session is simply placed again) or an epoch bump (a registry epoch repeats).
//! That is acceptable because registry epochs only order placements; the single-writer
//! guarantee comes from the store's epochs.
//!
//! # Example
//! ```no_run
//! use normandy_core::{NodeId, SessionId, SessionRegistry};
//! use normandy_registry_redis::{RedisRegistry, RedisRegistryConfig};
//!
//! # async fn run() -> normandy_core::Result<()> {
//! let registry = RedisRegistry::connect(RedisRegistryConfig::new("redis://127.0.0.1:6379")?).await?;
//! let me = NodeId::with_fresh_incarnation("node-a")?;
//! let _lease = registry.spawn_lease_refresher(&me).await?;
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

pub use config::RedisRegistryConfig;
pub use membership::RedisMembership;
pub use registry::{LeaseRefresher, RedisRegistry};
