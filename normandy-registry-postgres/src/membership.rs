//! [`PgMembership`]: the [`Membership`] of a Postgres cluster — node lease rows (`lease.rs`),
//! the very rows [`PgRegistry`](crate::PgRegistry) checks to decide whether a placement still
//! resolves, so one refresh keeps both the member entry and the node's placements alive.

use std::time::Duration;

use normandy_core::{
    Error, JoinOutcome, LeaseStatus, Member, Membership, NodeId, Result, async_trait,
};
use sqlx::postgres::PgPool;

use crate::config::PgRegistryConfig;
use crate::lease::{Db, Joined};

/// Node leases in Postgres, with the policy of [`Membership`]: claimed only if absent,
/// refreshed only while alive and holding this node's address, never re-created. Deaths are
/// found by polling [`members`](Membership::members) (no `LISTEN`: it does not cross a
/// transaction pooler). Cheap to clone.
#[derive(Clone)]
pub struct PgMembership {
    db: Db,
}

impl std::fmt::Debug for PgMembership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgMembership").finish_non_exhaustive()
    }
}

impl PgMembership {
    /// Opens its own pool as `config` says (give it a small one, apart from the registry's and
    /// the store's, so a refresh never waits behind their queries for a connection) and
    /// refuses a database without the registry's tables.
    pub async fn connect(config: PgRegistryConfig) -> Result<Self> {
        Ok(Self {
            db: config.open().await?,
        })
    }

    /// Membership on an existing pool straight to Postgres (already migrated, tables in the
    /// connections' `search_path`). Behind a transaction pooler, use
    /// [`connect`](Self::connect) with [`PgRegistryConfig::transaction_pooler`].
    pub fn with_pool(pool: PgPool) -> Self {
        Self {
            db: Db::new(pool, None),
        }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.db.pool
    }
}

#[async_trait]
impl Membership for PgMembership {
    async fn join(&self, me: &Member, ttl: Duration) -> Result<JoinOutcome> {
        match self.db.join(&me.node, &me.address, ttl, true).await? {
            Joined::Claimed => Ok(JoinOutcome::Joined),
            Joined::Held(holder) => Err(Error::Config(format!(
                "node {} already holds a lease (address {holder:?}): is another process running \
                 as this node? A node claims its lease only if absent",
                me.node
            ))),
            Joined::NameInUse(node, address) => {
                Ok(JoinOutcome::NameInUse(Member { node, address }))
            }
        }
    }

    async fn refresh(&self, me: &Member, ttl: Duration) -> Result<LeaseStatus> {
        Ok(
            if self.db.refresh(&me.node, Some(&me.address), ttl).await? {
                LeaseStatus::Held
            } else {
                LeaseStatus::Lost
            },
        )
    }

    async fn members(&self) -> Result<Vec<Member>> {
        Ok(self
            .db
            .members()
            .await?
            .into_iter()
            .map(|(node, address)| Member { node, address })
            .collect())
    }

    async fn leave(&self, node: &NodeId) -> Result<()> {
        self.db.leave(node).await.map(|_| ())
    }
}
