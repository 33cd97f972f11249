//! [`RedisMembership`]: node leases in Redis, shared with the Redis registry's lease keys.
//!
//! Each node's lease is the key `<prefix>:lease:<name#incarnation>` — the very key
//! [`RedisRegistry`](normandy_registry_redis::RedisRegistry) checks to decide whether a placement
//! still resolves — holding the node's RPC address, with a server-side `PX` TTL. One refresh
//! therefore keeps both the membership entry and the registry's placements alive: there is a
//! single lease per node, refreshed by a single loop. Discovery is the set `<prefix>:members`;
//! `members` reads it and the lease keys in one script, so a node is listed exactly while its
//! lease key exists (the server's clock decides, never ours).

use std::time::Duration;

use normandy_core::{Error, Member, Membership, NodeId, Result, async_trait};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Script, Value};

/// KEYS: lease, members set. ARGV: address, TTL ms, node.
const REFRESH: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
return 1
";

/// KEYS: members set. ARGV: lease prefix. Returns `{node, address, ...}` for live leases and
/// drops from the set the nodes whose lease is gone (a node that was only paused re-adds itself
/// with its next refresh; see `RedisMembership::refresh`).
const MEMBERS: &str = r"
local out = {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local addr = redis.call('GET', ARGV[1] .. node)
  if addr then
    table.insert(out, node)
    table.insert(out, addr)
  else
    redis.call('SREM', KEYS[1], node)
  end
end
return out
";

/// KEYS: lease, members set. ARGV: node.
const LEAVE: &str = r"
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
";

/// Node leases in Redis (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct RedisMembership {
    con: ConnectionManager,
    lease_prefix: String,
    members_key: String,
    refresh: Script,
    members: Script,
    leave: Script,
}

impl std::fmt::Debug for RedisMembership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisMembership")
            .field("members_key", &self.members_key)
            .finish_non_exhaustive()
    }
}

impl RedisMembership {
    /// Connects to `client` with its own connection, using the registry key prefix `prefix` (the
    /// same prefix as the [`RedisRegistry`](normandy_registry_redis::RedisRegistry)'s, so the
    /// leases are shared). Commands time out after `timeout`: a lease refresh that hangs must fail
    /// in time for the node to stop serving before its lease can lapse.
    pub async fn connect(client: redis::Client, prefix: &str, timeout: Duration) -> Result<Self> {
        if prefix.is_empty() || prefix.chars().any(|c| c.is_whitespace()) {
            return Err(Error::Config(format!(
                "membership key prefix {prefix:?} must be non-empty and without whitespace"
            )));
        }
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(500))));
        let con = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(map)?;
        Ok(Self {
            con,
            lease_prefix: format!("{prefix}:lease:"),
            members_key: format!("{prefix}:members"),
            refresh: Script::new(REFRESH),
            members: Script::new(MEMBERS),
            leave: Script::new(LEAVE),
        })
    }

    /// The lease key of `node` (the registry's lease key for it).
    pub fn lease_key(&self, node: &NodeId) -> String {
        format!("{}{node}", self.lease_prefix)
    }
}

#[async_trait]
impl Membership for RedisMembership {
    async fn refresh(&self, me: &Member, ttl: Duration) -> Result<()> {
        let mut con = self.con.clone();
        // The lease is (re)created rather than only extended: after a lapse, placements that
        // other nodes took carry their owner and a higher epoch, so a returning incarnation
        // steals nothing; the store's epochs fence whatever it still had in flight.
        let _: Value = self
            .refresh
            .key(self.lease_key(&me.node))
            .key(&self.members_key)
            .arg(&me.address)
            .arg(ttl.as_millis().max(1) as u64)
            .arg(me.node.to_string())
            .invoke_async(&mut con)
            .await
            .map_err(map)?;
        Ok(())
    }

    async fn members(&self) -> Result<Vec<Member>> {
        let mut con = self.con.clone();
        let flat: Vec<String> = self
            .members
            .key(&self.members_key)
            .arg(&self.lease_prefix)
            .invoke_async(&mut con)
            .await
            .map_err(map)?;
        let mut out = Vec::with_capacity(flat.len() / 2);
        for pair in flat.chunks_exact(2) {
            // A lease the registry created on a node's behalf holds no address yet ("1"); the
            // node's own refresh writes it within TTL/3.
            if !pair[1].contains(':') {
                continue;
            }
            match pair[0].parse::<NodeId>() {
                Ok(node) => out.push(Member {
                    node,
                    address: pair[1].clone(),
                }),
                Err(e) => tracing::warn!(entry = %pair[0], error = %e, "ignoring bad member entry"),
            }
        }
        out.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(out)
    }

    async fn leave(&self, node: &NodeId) -> Result<()> {
        let mut con = self.con.clone();
        let _: Value = self
            .leave
            .key(self.lease_key(node))
            .key(&self.members_key)
            .arg(node.to_string())
            .invoke_async(&mut con)
            .await
            .map_err(map)?;
        Ok(())
    }
}

/// The one place this crate maps Redis errors: connection trouble is a retryable `Unavailable`,
/// anything else a `Backend` error.
fn map(err: RedisError) -> Error {
    if err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
    {
        Error::Unavailable {
            backend: "redis membership",
            message: err.to_string(),
        }
    } else {
        Error::Backend {
            backend: "redis membership",
            message: err.to_string(),
            retryable: false,
        }
    }
}
