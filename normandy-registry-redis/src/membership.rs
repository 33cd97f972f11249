//! [`RedisMembership`]: the [`Membership`] of a Redis cluster — node leases (`lease.rs`), the
//! very keys [`RedisRegistry`](crate::RedisRegistry) checks to decide whether a placement
//! still resolves, so one refresh keeps both the member entry and the node's placements alive.

use std::time::Duration;

use crate::lease::{Joined, Leases, taken};
use crate::registry::bounded_connect;
use normandy_core::{
    Error, JoinOutcome, LeaseStatus, Member, Membership, NodeId, Result, async_trait,
};

/// Node leases in Redis, with the policy of [`Membership`]: claimed only if absent, refreshed
/// only while present and holding this node's address, never re-created. Cheap to clone.
#[derive(Clone)]
pub struct RedisMembership {
    leases: Leases,
}

impl std::fmt::Debug for RedisMembership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisMembership").finish_non_exhaustive()
    }
}

impl RedisMembership {
    /// Connects to `target` (a [`redis::Client`] or a [`normandy_redis::RedisTarget`], one
    /// server or a cluster) with its own connection, under the registry key prefix `prefix`
    /// (the same prefix as the [`RedisRegistry`](crate::RedisRegistry)'s, so the leases are
    /// shared). Commands time out after `timeout`: a lease refresh that hangs must fail in time
    /// for the node to stop serving before its lease can lapse. Connecting is one attempt of at
    /// most `max(timeout, 500 ms)`; a server that refuses or does not answer is `Unavailable`.
    pub async fn connect(
        target: impl Into<normandy_redis::RedisTarget>,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self> {
        let target = target.into();
        if prefix.is_empty() || prefix.chars().any(|c| c.is_whitespace()) {
            return Err(Error::Config(format!(
                "membership key prefix {prefix:?} must be non-empty and without whitespace"
            )));
        }
        let con = bounded_connect(
            &target,
            timeout.max(Duration::from_millis(500)),
            timeout,
            |con| async { Ok(con) },
        )
        .await?;
        Ok(Self {
            leases: Leases::new(con, prefix),
        })
    }

    /// The lease key of `node` (the registry's lease key for it).
    pub fn lease_key(&self, node: &NodeId) -> String {
        self.leases.key(node)
    }
}

#[async_trait]
impl Membership for RedisMembership {
    async fn join(&self, me: &Member, ttl: Duration) -> Result<JoinOutcome> {
        match self.leases.join(&me.node, &me.address, ttl, true).await? {
            Joined::Claimed => Ok(JoinOutcome::Joined),
            Joined::Held(holder) => Err(taken(&me.node, &holder)),
            Joined::NameInUse(node, address) => Ok(JoinOutcome::NameInUse(Member {
                node: node.parse()?,
                address,
            })),
        }
    }

    async fn refresh(&self, me: &Member, ttl: Duration) -> Result<LeaseStatus> {
        let held = self
            .leases
            .refresh(&me.node, Some(&me.address), ttl, true)
            .await?;
        Ok(if held {
            LeaseStatus::Held
        } else {
            LeaseStatus::Lost
        })
    }

    async fn members(&self) -> Result<Vec<Member>> {
        let mut out = Vec::new();
        for (node, value) in self.leases.members().await? {
            // A lease the registry created on a node's behalf holds no address ("1").
            if !value.contains(':') {
                continue;
            }
            match node.parse::<NodeId>() {
                Ok(node) => out.push(Member {
                    node,
                    address: value,
                }),
                Err(e) => tracing::warn!(entry = %node, error = %e, "ignoring bad member entry"),
            }
        }
        out.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(out)
    }

    async fn leave(&self, node: &NodeId) -> Result<()> {
        self.leases.leave(node).await.map(|_| ())
    }
}
