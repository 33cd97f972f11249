//! [`PgRegistry`]: the [`SessionRegistry`] on Postgres, resolved through the node leases.

use std::time::Duration;

use normandy_core::{Error, NodeId, Placement, Result, SessionId, SessionRegistry, async_trait};
use sqlx::Row;
use sqlx::postgres::PgPool;

use crate::config::PgRegistryConfig;
use crate::error::{corrupt_row, map_sqlx, unavailable};
use crate::lease::{Db, Joined, incarnation, node_from_row};

/// Places `$1` on node (`$2`, `$3`) in one statement, if the caller's lease is alive and the id
/// has no live owner: a new id gets epoch 1; an id released, or held by a node whose lease has
/// lapsed, is taken over with its epoch bumped. `INSERT … ON CONFLICT DO UPDATE … WHERE` locks
/// the id's row and checks the old owner's lease on the newest committed version, so of any
/// number of concurrent callers exactly one wins. Returns (caller live, epoch won or NULL).
const REGISTER: &str = "WITH me AS ( \
       SELECT EXISTS (SELECT 1 FROM normandy_node_leases \
         WHERE name = $2 AND incarnation = $3 AND expires_at > now()) AS live \
     ), won AS ( \
       INSERT INTO normandy_placements AS p (session_id, owner_name, owner_incarnation, epoch) \
       SELECT $1, $2, $3, 1 FROM me WHERE me.live \
       ON CONFLICT (session_id) DO UPDATE \
         SET owner_name = EXCLUDED.owner_name, \
             owner_incarnation = EXCLUDED.owner_incarnation, \
             epoch = p.epoch + 1 \
         WHERE p.owner_name IS NULL OR NOT EXISTS ( \
           SELECT 1 FROM normandy_node_leases l \
            WHERE l.name = p.owner_name AND l.incarnation = p.owner_incarnation \
              AND l.expires_at > now()) \
       RETURNING p.epoch \
     ) \
     SELECT (SELECT live FROM me), (SELECT epoch FROM won)";

/// The placement of `$1` and whether its owner's lease is alive (a separate statement, so it
/// sees a concurrent winner that committed after `REGISTER`'s snapshot).
const CURRENT: &str = "SELECT p.owner_name, p.owner_incarnation, p.epoch, \
       EXISTS (SELECT 1 FROM normandy_node_leases l \
         WHERE l.name = p.owner_name AND l.incarnation = p.owner_incarnation \
           AND l.expires_at > now()) \
     FROM normandy_placements p WHERE p.session_id = $1";

const LOOKUP: &str = "SELECT p.owner_name, p.owner_incarnation, p.epoch \
     FROM normandy_placements p JOIN normandy_node_leases l \
       ON l.name = p.owner_name AND l.incarnation = p.owner_incarnation \
     WHERE p.session_id = $1 AND l.expires_at > now()";

/// Releases `$1` if (`$2`, `$3`) holds it. The row and its epoch stay, so the next
/// registration still gets a greater epoch.
const UNREGISTER: &str = "UPDATE normandy_placements \
     SET owner_name = NULL, owner_incarnation = NULL \
     WHERE session_id = $1 AND owner_name = $2 AND owner_incarnation = $3";

/// How often `register` re-reads after losing to an owner that then vanished (released, or
/// its lease lapsed between the two statements) before giving up with a retryable error.
const REGISTER_TRIES: usize = 5;

/// The tier-2p registry: placements in a Postgres table keyed by session id, resolved only
/// while their owner's lease row (`normandy_node_leases`, kept by
/// [`PgMembership`](crate::PgMembership)) is alive.
///
/// A registration needs the caller's lease to be alive: a cluster node claims it once, at join,
/// and a node whose lease lapsed cannot bring it back by placing a session before it notices.
/// Outside a cluster, claim one with [`acquire_lease`](Self::acquire_lease).
///
/// Cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct PgRegistry {
    db: Db,
}

impl std::fmt::Debug for PgRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgRegistry")
            .field("persistent_statements", &self.db.persistent)
            .finish_non_exhaustive()
    }
}

impl PgRegistry {
    /// Opens a pool as `config` says, applies the migration if asked, and refuses a database
    /// without the registry's tables (`MissingMigration`, naming the command to run).
    pub async fn connect(config: PgRegistryConfig) -> Result<Self> {
        Ok(Self {
            db: config.open().await?,
        })
    }

    /// A registry on an existing pool straight to Postgres (already migrated, tables in the
    /// connections' `search_path`). Behind a transaction pooler, use [`connect`](Self::connect)
    /// with [`PgRegistryConfig::transaction_pooler`].
    pub fn with_pool(pool: PgPool) -> Self {
        Self {
            db: Db::new(pool, None),
        }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.db.pool
    }

    /// Claims `node`'s lease for `ttl` (server-side expiry) if it has none, without joining the
    /// member list: for a node that places sessions without running a cluster's membership.
    /// Returns whether this call claimed it (a live lease is left as it is).
    pub async fn acquire_lease(&self, node: &NodeId, ttl: Duration) -> Result<bool> {
        Ok(self.db.join(node, "", ttl, false).await? == Joined::Claimed)
    }

    /// Extends `node`'s lease to `now() + ttl` if it is still alive. `Ok(false)` if it had
    /// lapsed: it is not re-created, because its placements may have been taken meanwhile.
    pub async fn refresh_lease(&self, node: &NodeId, ttl: Duration) -> Result<bool> {
        self.db.refresh(node, None, ttl).await
    }

    /// Deletes `node`'s lease (a graceful leave, or a test simulating a death): its placements
    /// stop resolving at once. Returns whether a lease was there.
    pub async fn release_lease(&self, node: &NodeId) -> Result<bool> {
        self.db.leave(node).await
    }

    /// Whether `node`'s lease is alive.
    pub async fn lease_alive(&self, node: &NodeId) -> Result<bool> {
        self.db.alive(node).await
    }
}

fn placement(row: &sqlx::postgres::PgRow) -> Result<Option<(Placement, bool)>> {
    let name: Option<String> = row.try_get(0).map_err(map_sqlx)?;
    let inc: Option<i64> = row.try_get(1).map_err(map_sqlx)?;
    let epoch: i64 = row.try_get(2).map_err(map_sqlx)?;
    let live: bool = row.try_get(3).unwrap_or(true);
    let epoch = u64::try_from(epoch).map_err(|_| corrupt_row("epoch", epoch))?;
    match (name, inc) {
        (Some(name), Some(inc)) => Ok(Some((
            Placement {
                owner: node_from_row(name, inc)?,
                epoch,
            },
            live,
        ))),
        _ => Ok(None),
    }
}

#[async_trait]
impl SessionRegistry for PgRegistry {
    async fn register(&self, id: &SessionId, owner: &NodeId) -> Result<Placement> {
        let inc = incarnation(owner)?;
        for _ in 0..REGISTER_TRIES {
            let mut conn = self.db.conn().await?;
            let row = sqlx::query(REGISTER)
                .bind(id.as_str())
                .bind(owner.name())
                .bind(inc)
                .persistent(self.db.persistent)
                .fetch_one(conn.get())
                .await
                .map_err(map_sqlx)?;
            conn.finish().await?;
            let live: bool = row.try_get(0).map_err(map_sqlx)?;
            if let Some(epoch) = row.try_get::<Option<i64>, _>(1).map_err(map_sqlx)? {
                let epoch = u64::try_from(epoch).map_err(|_| corrupt_row("epoch", epoch))?;
                return Ok(Placement {
                    owner: owner.clone(),
                    epoch,
                });
            }
            // Not placed: the id is held by a live node (this one, or another), or the caller
            // has no live lease. A live holder is named first: that answer is true either way.
            let mut conn = self.db.conn().await?;
            let row = sqlx::query(CURRENT)
                .bind(id.as_str())
                .persistent(self.db.persistent)
                .fetch_optional(conn.get())
                .await
                .map_err(map_sqlx)?;
            conn.finish().await?;
            match row.as_ref().map(placement).transpose()?.flatten() {
                Some((p, true)) if &p.owner == owner => return Ok(p),
                Some((p, true)) => {
                    return Err(Error::AlreadyRegistered {
                        session: id.clone(),
                        owner: p.owner,
                        epoch: p.epoch,
                    });
                }
                _ if !live => {
                    return Err(unavailable(format!(
                        "node {owner} has no live lease (it lapsed or was never claimed), so it \
                         may not place session {id}; it must rejoin first"
                    )));
                }
                // Released, or its owner's lease lapsed, since the claim was refused: try again.
                _ => continue,
            }
        }
        Err(Error::Backend {
            backend: crate::error::BACKEND,
            message: format!(
                "session {id}: its placement kept changing under {REGISTER_TRIES} attempts to \
                 register it"
            ),
            retryable: true,
        })
    }

    async fn lookup(&self, id: &SessionId) -> Result<Option<Placement>> {
        let mut conn = self.db.conn().await?;
        let row = sqlx::query(LOOKUP)
            .bind(id.as_str())
            .persistent(self.db.persistent)
            .fetch_optional(conn.get())
            .await
            .map_err(map_sqlx)?;
        conn.finish().await?;
        Ok(row
            .as_ref()
            .map(placement)
            .transpose()?
            .flatten()
            .map(|(p, _)| p))
    }

    async fn unregister(&self, id: &SessionId, owner: &NodeId) -> Result<bool> {
        let mut conn = self.db.conn().await?;
        let done = sqlx::query(UNREGISTER)
            .bind(id.as_str())
            .bind(owner.name())
            .bind(incarnation(owner)?)
            .persistent(self.db.persistent)
            .execute(conn.get())
            .await
            .map_err(map_sqlx)?;
        conn.finish().await?;
        Ok(done.rows_affected() == 1)
    }
}
