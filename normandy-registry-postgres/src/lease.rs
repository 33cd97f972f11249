//! Node leases in Postgres — the one implementation behind [`PgMembership`](crate::PgMembership)
//! and the lease methods of [`PgRegistry`](crate::PgRegistry), with one policy:
//!
//! - a lease is claimed only if absent (or lapsed): a live lease is never overwritten;
//! - a refresh extends a lease only while it is alive and this node's
//!   (`WHERE name = $me AND incarnation = $inc AND address = $addr AND expires_at > now()`);
//!   zero rows means the lease is lost, and it is never re-created by a refresh;
//! - every expiry is written as `now() + ttl` and compared with `now()` on the server, never
//!   with a client's clock.
//!
//! A join takes a transaction-scoped advisory lock on the node's name (released at commit, so
//! it is safe behind a transaction-pooling pooler, unlike a session lock) so that two processes
//! starting under one name cannot both see the name free.

use std::time::Duration;

use normandy_core::{Error, NodeId, Result};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{AssertSqlSafe, Postgres, Row, Transaction};

use crate::error::{corrupt_row, map_sqlx};

/// A pool and how statements go over it. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Db {
    pub(crate) pool: PgPool,
    /// Statements are named prepared statements unless a transaction pooler sits in between.
    pub(crate) persistent: bool,
    /// Behind a transaction pooler: `BEGIN; SET LOCAL …` (search path and timeouts), opening
    /// every operation's own transaction. A pooler may drop startup parameters and hands each
    /// transaction whichever server connection is free, and sqlx parses an unnamed statement
    /// and binds it in two round trips, which only a transaction keeps on one connection.
    pub(crate) begin: Option<String>,
}

/// The connection one operation runs on: a pooled connection as it is, or (behind a
/// transaction pooler) a transaction that set its own search path and timeouts.
pub(crate) enum Conn {
    Direct(PoolConnection<Postgres>),
    Tx(Transaction<'static, Postgres>),
}

impl Conn {
    /// The connection to run statements on.
    pub(crate) fn get(&mut self) -> &mut PgConnection {
        match self {
            Conn::Direct(c) => c,
            Conn::Tx(t) => t,
        }
    }

    /// Ends the operation (commits its transaction, if it has one).
    pub(crate) async fn finish(self) -> Result<()> {
        match self {
            Conn::Direct(_) => Ok(()),
            Conn::Tx(t) => t.commit().await.map_err(map_sqlx),
        }
    }
}

/// What [`Db::join`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Joined {
    /// The lease was absent (or lapsed) and is now ours.
    Claimed,
    /// A live lease of this very node id was there already, with this address; nothing written.
    Held(String),
    /// Another incarnation of the name, `(node, address)`, holds a live member lease; nothing
    /// was written.
    NameInUse(NodeId, String),
}

/// `node`'s incarnation as the `bigint` column holds it.
pub(crate) fn incarnation(node: &NodeId) -> Result<i64> {
    i64::try_from(node.incarnation()).map_err(|_| {
        Error::Config(format!(
            "node {node}: incarnation {} does not fit Postgres' bigint",
            node.incarnation()
        ))
    })
}

/// A node id read back from a row.
pub(crate) fn node_from_row(name: String, incarnation: i64) -> Result<NodeId> {
    let inc = u64::try_from(incarnation).map_err(|_| corrupt_row("incarnation", incarnation))?;
    NodeId::new(&name, inc).map_err(|e| corrupt_row("node name", e))
}

/// The TTL as the seconds `make_interval` takes (at least a millisecond).
pub(crate) fn secs(ttl: Duration) -> f64 {
    ttl.as_secs_f64().max(0.001)
}

const LOCK_NAME: &str =
    "SELECT pg_advisory_xact_lock(hashtextextended('normandy_node_leases:' || $1, 0))";

/// Lapsed leases of the name: nothing resolves through them any more, so a join clears them
/// (a node name that restarts leaves at most one row per live incarnation behind).
const DELETE_LAPSED: &str =
    "DELETE FROM normandy_node_leases WHERE name = $1 AND expires_at <= now()";

const OTHER_LIVE: &str = "SELECT incarnation, address FROM normandy_node_leases \
     WHERE name = $1 AND incarnation <> $2 AND member AND expires_at > now() LIMIT 1";

/// Claims the lease if absent or lapsed; a live one is left untouched (no row returned).
const CLAIM: &str = "INSERT INTO normandy_node_leases AS l \
         (name, incarnation, address, member, expires_at) \
     VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5)) \
     ON CONFLICT (name, incarnation) DO UPDATE \
         SET address = EXCLUDED.address, member = EXCLUDED.member, \
             expires_at = EXCLUDED.expires_at \
       WHERE l.expires_at <= now() \
     RETURNING true";

const HOLDER: &str =
    "SELECT address FROM normandy_node_leases WHERE name = $1 AND incarnation = $2";

/// The heartbeat. Scoped to the owner and its live lease: zero rows means lost.
const REFRESH: &str = "UPDATE normandy_node_leases \
     SET expires_at = now() + make_interval(secs => $4) \
     WHERE name = $1 AND incarnation = $2 AND ($3::text IS NULL OR address = $3) \
       AND expires_at > now()";

const MEMBERS: &str = "SELECT name, incarnation, address FROM normandy_node_leases \
     WHERE member AND expires_at > now() ORDER BY name, incarnation";

const LEAVE: &str = "DELETE FROM normandy_node_leases WHERE name = $1 AND incarnation = $2";

const ALIVE: &str = "SELECT EXISTS (SELECT 1 FROM normandy_node_leases \
     WHERE name = $1 AND incarnation = $2 AND expires_at > now())";

impl Db {
    /// A database handle; `begin` as [`Db::begin`] documents (None: Postgres directly).
    pub(crate) fn new(pool: PgPool, begin: Option<String>) -> Self {
        Self {
            pool,
            persistent: begin.is_none(),
            begin,
        }
    }

    /// A transaction (with `SET LOCAL` behind a pooler).
    pub(crate) async fn tx(&self) -> Result<Transaction<'static, Postgres>> {
        match &self.begin {
            Some(sql) => self.pool.begin_with(AssertSqlSafe(sql.clone())).await,
            None => self.pool.begin().await,
        }
        .map_err(map_sqlx)
    }

    /// The connection for one single-statement operation: a pooled connection, or behind a
    /// pooler a transaction of its own.
    pub(crate) async fn conn(&self) -> Result<Conn> {
        if self.begin.is_some() {
            return Ok(Conn::Tx(self.tx().await?));
        }
        Ok(Conn::Direct(self.pool.acquire().await.map_err(map_sqlx)?))
    }

    /// Claims `node`'s lease with `address` for `ttl` if it is absent or lapsed. A `member`
    /// is listed by [`members`](Self::members) and is refused while another incarnation of its
    /// name holds a live member lease.
    pub(crate) async fn join(
        &self,
        node: &NodeId,
        address: &str,
        ttl: Duration,
        member: bool,
    ) -> Result<Joined> {
        let inc = incarnation(node)?;
        let mut tx = self.tx().await?;
        if member {
            sqlx::query(LOCK_NAME)
                .bind(node.name())
                .persistent(self.persistent)
                .execute(&mut *tx)
                .await
                .map_err(map_sqlx)?;
            sqlx::query(DELETE_LAPSED)
                .bind(node.name())
                .persistent(self.persistent)
                .execute(&mut *tx)
                .await
                .map_err(map_sqlx)?;
            let other = sqlx::query(OTHER_LIVE)
                .bind(node.name())
                .bind(inc)
                .persistent(self.persistent)
                .fetch_optional(&mut *tx)
                .await
                .map_err(map_sqlx)?;
            if let Some(row) = other {
                let other_inc: i64 = row.try_get(0).map_err(map_sqlx)?;
                let address: String = row.try_get(1).map_err(map_sqlx)?;
                tx.rollback().await.map_err(map_sqlx)?;
                let other = node_from_row(node.name().to_string(), other_inc)?;
                return Ok(Joined::NameInUse(other, address));
            }
        }
        let claimed = sqlx::query(CLAIM)
            .bind(node.name())
            .bind(inc)
            .bind(address)
            .bind(member)
            .bind(secs(ttl))
            .persistent(self.persistent)
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_sqlx)?;
        if claimed.is_some() {
            tx.commit().await.map_err(map_sqlx)?;
            return Ok(Joined::Claimed);
        }
        let holder: Option<String> = sqlx::query_scalar(HOLDER)
            .bind(node.name())
            .bind(inc)
            .persistent(self.persistent)
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_sqlx)?;
        tx.rollback().await.map_err(map_sqlx)?;
        Ok(Joined::Held(holder.unwrap_or_default()))
    }

    /// Extends `node`'s lease to `now() + ttl` if it is alive and, when `address` is given,
    /// holds that address. Returns whether it did; a lapsed lease is never re-created.
    pub(crate) async fn refresh(
        &self,
        node: &NodeId,
        address: Option<&str>,
        ttl: Duration,
    ) -> Result<bool> {
        let mut conn = self.conn().await?;
        let done = sqlx::query(REFRESH)
            .bind(node.name())
            .bind(incarnation(node)?)
            .bind(address)
            .bind(secs(ttl))
            .persistent(self.persistent)
            .execute(conn.get())
            .await
            .map_err(map_sqlx)?;
        conn.finish().await?;
        Ok(done.rows_affected() == 1)
    }

    /// Drops `node`'s lease. Returns whether one was there (live or lapsed).
    pub(crate) async fn leave(&self, node: &NodeId) -> Result<bool> {
        let mut conn = self.conn().await?;
        let done = sqlx::query(LEAVE)
            .bind(node.name())
            .bind(incarnation(node)?)
            .persistent(self.persistent)
            .execute(conn.get())
            .await
            .map_err(map_sqlx)?;
        conn.finish().await?;
        Ok(done.rows_affected() == 1)
    }

    /// Whether `node`'s lease is alive.
    pub(crate) async fn alive(&self, node: &NodeId) -> Result<bool> {
        let mut conn = self.conn().await?;
        let alive = sqlx::query_scalar(ALIVE)
            .bind(node.name())
            .bind(incarnation(node)?)
            .persistent(self.persistent)
            .fetch_one(conn.get())
            .await
            .map_err(map_sqlx)?;
        conn.finish().await?;
        Ok(alive)
    }

    /// `(node, address)` of every member whose lease is alive, ordered by node.
    pub(crate) async fn members(&self) -> Result<Vec<(NodeId, String)>> {
        let mut conn = self.conn().await?;
        let rows = sqlx::query(MEMBERS)
            .persistent(self.persistent)
            .fetch_all(conn.get())
            .await
            .map_err(map_sqlx)?;
        conn.finish().await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let name: String = row.try_get(0).map_err(map_sqlx)?;
            let inc: i64 = row.try_get(1).map_err(map_sqlx)?;
            let address: String = row.try_get(2).map_err(map_sqlx)?;
            match node_from_row(name, inc) {
                Ok(node) => out.push((node, address)),
                Err(e) => tracing::warn!(error = %e, "ignoring a bad member row"),
            }
        }
        Ok(out)
    }
}
