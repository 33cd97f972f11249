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

/// What a refresh found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStatus {
    /// The lease was there, held by this node, and now lives one more TTL.
    Held,
    /// The lease was gone (it lapsed, or was dropped) or held by someone else. Nothing was
    /// written. The node must stop serving, fence its live actors and rejoin under a new
    /// incarnation: other nodes may already have taken its sessions.
    Lost,
}

/// What a [`Membership::join`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinOutcome {
    /// The lease was absent and is now this node's.
    Joined,
    /// Another incarnation of the same node name holds a live lease (another process runs
    /// under this name, or this node's previous life has not lapsed yet); nothing was written.
    NameInUse(Member),
}

/// Node leases in a coordination backend.
///
/// # Policy
/// One lapse policy for every backend: a lease is claimed only if absent
/// ([`join`](Self::join)), refreshed only while it is present and this node's
/// ([`refresh`](Self::refresh)), and never silently re-created. A node whose refresh reports
/// [`LeaseStatus::Lost`] stops serving and comes back as a new incarnation, so nothing it did
/// before the loss can be mistaken for the new life's.
///
/// Implement it with [`#[normandy_core::async_trait]`](crate::async_trait) on the `impl`:
/// `#[async_trait] impl Membership for MyLeases { async fn join(&self, me: &Member, ttl:
/// Duration) -> Result<JoinOutcome> { … } … }`.
#[async_trait]
pub trait Membership: Send + Sync + 'static {
    /// Claims `me`'s lease for `ttl`, the expiry being set by the server.
    ///
    /// # Behavior
    /// - `NameInUse(other)`, writing nothing, while another incarnation of `me.node`'s name
    ///   holds a live lease: two processes never run under one node name.
    /// - Only if no lease for `me.node` exists: otherwise nothing is written and a `Config`
    ///   error names the node and the address holding its lease.
    /// - After it returns `Joined`, `members` lists `me` until `ttl` passes without a refresh.
    async fn join(&self, me: &Member, ttl: Duration) -> Result<JoinOutcome>;

    /// Extends `me`'s lease by `ttl`, if it is still there and still `me`'s.
    ///
    /// # Behavior
    /// - `Held`: the lease lives `ttl` from the server's receipt of this call.
    /// - `Lost`: the lease had lapsed, was dropped, or holds another node's address; nothing is
    ///   written (the lease is never re-created here).
    /// - An error means the outcome is unknown: the lease may lapse, and the caller must stop
    ///   serving before it can.
    async fn refresh(&self, me: &Member, ttl: Duration) -> Result<LeaseStatus>;

    /// Nodes whose lease is alive.
    async fn members(&self) -> Result<Vec<Member>>;

    /// Drops `node`'s lease now (graceful leave).
    async fn leave(&self, node: &NodeId) -> Result<()>;
}
