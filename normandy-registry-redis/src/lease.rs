//! Node leases in Redis — the one implementation behind [`RedisMembership`]
//! (crate::RedisMembership), the registry's lease methods and [`LeaseRefresher`]
//! (crate::LeaseRefresher), with one policy:
//!
//! - a lease is claimed only if absent (`SET NX PX`): a present lease is never overwritten;
//! - a refresh extends a lease only while it is there (and, for a cluster member, still holds
//!   its address); a lapsed lease is never re-created by a refresh, so a node that lost it
//!   learns so and rejoins under a new incarnation;
//! - expiry is the server's (`PX`), never a client's clock.
//!
//! # Keys
//! - `<prefix>:lease:<name#incarnation>`: one per node, with a server-side TTL; its value is the
//!   node's RPC address (`1` when the registry created it on the node's behalf at `register`).
//!   The registry resolves a placement only while its owner's lease key exists.
//! - `<prefix>:members`: the set of nodes that joined; `members` reads it with the lease keys
//!   in one script and drops those whose lease is gone.

use std::sync::LazyLock;
use std::time::Duration;

use normandy_core::{Error, NodeId, Result};
use redis::aio::ConnectionManager;
use redis::{Script, Value};

use crate::error;

/// KEYS: lease, members set. ARGV: value, TTL ms, node (empty: not a member), the node's
/// name followed by `#` (empty: no name check), lease prefix.
/// Returns 1 when claimed; `{'name', node, value}` when another incarnation of the name holds a
/// live lease; else `{'held', value}` of the lease already there. Writes nothing unless claimed.
const JOIN: &str = r"
if ARGV[4] ~= '' then
  for _, m in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    if m ~= ARGV[3] and string.sub(m, 1, #ARGV[4]) == ARGV[4] then
      local v = redis.call('GET', ARGV[5] .. m)
      if v then return {'name', m, v} end
    end
  end
end
if redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX') then
  if ARGV[3] ~= '' then redis.call('SADD', KEYS[2], ARGV[3]) end
  return 1
end
return {'held', redis.call('GET', KEYS[1]) or ''}
";

/// KEYS: lease, members set. ARGV: TTL ms, expected value (empty: any), node (empty: not a
/// member). 1 when the lease was there (and held the expected value) and was extended; 0, with
/// nothing written, otherwise.
const REFRESH: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
if ARGV[2] ~= '' and v ~= ARGV[2] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if ARGV[3] ~= '' then redis.call('SADD', KEYS[2], ARGV[3]) end
return 1
";

/// KEYS: members set. ARGV: lease prefix. Returns `{node, value, ...}` for live leases and
/// drops from the set the nodes whose lease is gone.
const MEMBERS: &str = r"
local out = {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local v = redis.call('GET', ARGV[1] .. node)
  if v then
    table.insert(out, node)
    table.insert(out, v)
  else
    redis.call('SREM', KEYS[1], node)
  end
end
return out
";

/// KEYS: lease, members set. ARGV: node. 1 if a lease was there.
const LEAVE: &str = r"
local n = redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return n
";

static JOIN_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(JOIN));
static REFRESH_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(REFRESH));
static MEMBERS_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(MEMBERS));
static LEAVE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(LEAVE));

/// The lease keys under one prefix, on one connection. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Leases {
    con: ConnectionManager,
    lease_prefix: String,
    members_key: String,
}

/// What [`Leases::join`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Joined {
    /// The lease was absent and is now ours.
    Claimed,
    /// A lease was there already, with this value; nothing was written.
    Held(String),
    /// Another incarnation of the node's name (node, lease value) holds a live lease; nothing
    /// was written.
    NameInUse(String, String),
}

impl Leases {
    /// The leases under `prefix` (the registry's key prefix).
    pub(crate) fn new(con: ConnectionManager, prefix: &str) -> Self {
        Self {
            con,
            lease_prefix: format!("{prefix}:lease:"),
            members_key: format!("{prefix}:members"),
        }
    }

    /// The lease key of `node`.
    pub(crate) fn key(&self, node: &NodeId) -> String {
        format!("{}{node}", self.lease_prefix)
    }

    /// Claims `node`'s lease with `value` for `ttl`, if absent; a member (`member`) is also
    /// added to the member set, and is refused while another incarnation of its name holds a
    /// live lease in it.
    pub(crate) async fn join(
        &self,
        node: &NodeId,
        value: &str,
        ttl: Duration,
        member: bool,
    ) -> Result<Joined> {
        let mut con = self.con.clone();
        let (node_arg, name_arg) = if member {
            (node.to_string(), format!("{}#", node.name()))
        } else {
            (String::new(), String::new())
        };
        let reply: Value = JOIN_SCRIPT
            .key(self.key(node))
            .key(&self.members_key)
            .arg(value)
            .arg(ttl_ms(ttl))
            .arg(node_arg)
            .arg(name_arg)
            .arg(&self.lease_prefix)
            .invoke_async(&mut con)
            .await
            .map_err(error::map)?;
        let text = |v: &Value| match v {
            Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        };
        match &reply {
            Value::Int(1) => Ok(Joined::Claimed),
            Value::Array(items) => match items.iter().map(text).collect::<Vec<_>>().as_slice() {
                [Some(tag), Some(value)] if tag == "held" => Ok(Joined::Held(value.clone())),
                [Some(tag), Some(other), Some(value)] if tag == "name" => {
                    Ok(Joined::NameInUse(other.clone(), value.clone()))
                }
                _ => Err(error::unexpected("lease join", &reply)),
            },
            _ => Err(error::unexpected("lease join", &reply)),
        }
    }

    /// Extends `node`'s lease by `ttl` if it is there and, when `expect` is given, holds that
    /// value. Returns whether it did; a missing lease is never re-created.
    pub(crate) async fn refresh(
        &self,
        node: &NodeId,
        expect: Option<&str>,
        ttl: Duration,
        member: bool,
    ) -> Result<bool> {
        let mut con = self.con.clone();
        let renewed: i64 = REFRESH_SCRIPT
            .key(self.key(node))
            .key(&self.members_key)
            .arg(ttl_ms(ttl))
            .arg(expect.unwrap_or(""))
            .arg(if member {
                node.to_string()
            } else {
                String::new()
            })
            .invoke_async(&mut con)
            .await
            .map_err(error::map)?;
        Ok(renewed == 1)
    }

    /// Drops `node`'s lease and its member entry. Returns whether a lease existed.
    pub(crate) async fn leave(&self, node: &NodeId) -> Result<bool> {
        let mut con = self.con.clone();
        let n: i64 = LEAVE_SCRIPT
            .key(self.key(node))
            .key(&self.members_key)
            .arg(node.to_string())
            .invoke_async(&mut con)
            .await
            .map_err(error::map)?;
        Ok(n == 1)
    }

    /// Whether `node`'s lease is alive.
    pub(crate) async fn alive(&self, node: &NodeId) -> Result<bool> {
        let mut con = self.con.clone();
        redis::cmd("EXISTS")
            .arg(self.key(node))
            .query_async(&mut con)
            .await
            .map_err(error::map)
    }

    /// `(node, lease value)` of every member whose lease is alive.
    pub(crate) async fn members(&self) -> Result<Vec<(String, String)>> {
        let mut con = self.con.clone();
        let flat: Vec<String> = MEMBERS_SCRIPT
            .key(&self.members_key)
            .arg(&self.lease_prefix)
            .invoke_async(&mut con)
            .await
            .map_err(error::map)?;
        Ok(flat
            .chunks_exact(2)
            .map(|p| (p[0].clone(), p[1].clone()))
            .collect())
    }
}

fn ttl_ms(ttl: Duration) -> u64 {
    ttl.as_millis().clamp(1, u128::from(u64::MAX)) as u64
}

/// The error for a node whose lease another process holds.
pub(crate) fn taken(node: &NodeId, holder: &str) -> Error {
    Error::Config(format!(
        "node {node} already holds a lease (address {holder:?}): is another process running \
         as this node? A node claims its lease only if absent"
    ))
}
