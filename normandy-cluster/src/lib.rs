//! Normandy clusters: the same configuration runs one node or N; sessions survive a node's death.
//!
//! A node is the core [`Sessions`](normandy_core::Sessions) runtime plus:
//! - **membership** from leases in the coordination backend, behind
//!   [`Membership`](normandy_core::Membership), implemented in the backend's crate
//!   ([`RedisMembership`], from `normandy-registry-redis`: a key per node with a server-side TTL
//!   holding its RPC address, refreshed every TTL/3 — the same key the Redis registry checks,
//!   so one refresh keeps both alive). A node whose refreshes fail stops serving before its
//!   lease can lapse, timed on its monotonic clock from the send of its last good refresh, and
//!   never reaps meanwhile; a node whose lease is found gone rejoins under a new incarnation.
//!   No gossip, no consensus of our own; correctness rests on the store's epochs, not on leases.
//! - **routing**: a request goes to the session's owner as the registry says — the local actor,
//!   or an RPC (tonic, MessagePack codec, one HTTP/2 channel per peer, deadlines on both sides,
//!   a shared cluster secret on every call, optionally over mutual TLS: [`ClusterTls`]). A stale route is retried after a fresh lookup with
//!   the same input id.
//! - **placement**: no owner → this node registers (atomic), activates (epoch bump) and runs the
//!   session; the loser of a race routes to the winner; a fenced actor stops and its caller is
//!   routed to the new owner.
//! - **the reaper**: when a node goes down, survivors resume its interrupted eager sessions,
//!   spread by rendezvous hashing (XXH3, pinned) and rate-limited.
//!
//! # Layout
//! - [`cluster`]: [`Cluster`] and its state, one file per idea: `builder` ([`ClusterBuilder`],
//!   [`RedisClusterBuilder`]), `route`, `lease` (refresh loop, watchdog, rejoin), `members`,
//!   `reaper`, `follow`, `serve` (the cluster's side of the RPC).
//! - [`config`]: [`ClusterConfig`], the timing knobs.
//! - [`rpc`]: the gRPC adapter over the node's `NodeApi`, the secret check, [`NodeClient`].
//! - [`wire`]: RPC messages, the MessagePack codec, `Error` ⇄ `Status`.
//! - [`tls`]: [`ClusterTls`], rustls on the node-to-node RPC.
//! - [`hash`]: rendezvous hashing.

pub mod cluster;
pub mod config;
pub mod hash;
pub mod rpc;
pub mod tls;
pub mod wire;

#[cfg(feature = "postgres")]
pub use cluster::PostgresClusterBuilder;
pub use cluster::{Cluster, ClusterBuilder, ClusterStats, MemberEvent, RedisClusterBuilder};
pub use config::ClusterConfig;
/// Node leases in Postgres (feature `postgres`); re-exported from the backend crate.
#[cfg(feature = "postgres")]
pub use normandy_registry_postgres::PgMembership;
/// Node leases in Redis; re-exported from the backend crate that implements them.
pub use normandy_registry_redis::RedisMembership;
pub use rpc::NodeClient;
pub use tls::ClusterTls;
