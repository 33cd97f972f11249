//! [`Membership`]: which nodes are alive, from leases kept in a coordination backend.
//!
//! A node holds one lease (its [`NodeId`] — name plus incarnation — and its RPC address) with an
//! expiry set by the server, and refreshes it well before it lapses. Survivors poll the member
//! list and see a node as down once its lease is gone. Correctness never rests on leases: epochs
//! in the store fence a paused owner. Implementations live in backend crates (Redis keys with a
//! TTL; a Postgres lease row would be another).

use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;
use crate::model::NodeId;

/// A live node as membership knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Member {
    /// The node.
    pub node: NodeId,
    /// Where its RPC server listens (`host:port`).
    pub address: String,
}

/// Node leases in a coordination backend.
#[async_trait]
pub trait Membership: Send + Sync + 'static {
    /// Creates or refreshes `me`'s lease for `ttl`, the expiry being set by the server.
    ///
    /// # Behavior
    /// - After it returns `Ok`, `members` lists `me` until `ttl` passes without another refresh.
    /// - A failure means the lease may lapse: the caller must stop serving before it can.
    async fn refresh(&self, me: &Member, ttl: Duration) -> Result<()>;

    /// Nodes whose lease is alive.
    async fn members(&self) -> Result<Vec<Member>>;

    /// Drops `node`'s lease now (graceful leave).
    async fn leave(&self, node: &NodeId) -> Result<()>;
}
