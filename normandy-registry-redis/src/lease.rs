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
//! All under the hash tag `{<prefix>}`, so on a Redis Cluster they share one slot and each
//! script below touches one slot, every key declared in `KEYS`:
//! - `{<prefix>}:lease:<name#incarnation>`: one per node, with a server-side TTL; its value is
//!   the node's RPC address (`1` when the registry created it on the node's behalf at
//!   `register`). The registry resolves a placement only while its owner's lease key exists.
//! - `{<prefix>}:members`: the set of nodes that joined; `members` reads it, then the lease
//!   keys of those members in one script, and drops those whose lease is gone.
//!
//! (Release 0.1 named these `<prefix>:lease:…` and `<prefix>:members`, without the tag. Leases
//! live one TTL, so nothing durable is lost, but nodes of 0.1 and of this version do not see
//! each other's leases: upgrade a deployment by stopping every node, not one by one.)

use std::sync::LazyLock;
use std::time::Duration;

use normandy_core::{Error, NodeId, Result};
use normandy_redis::RedisConn;
use redis::{Script, Value};

use crate::error;

/// KEYS: lease, members set, then the leases of the other members of the node's name that the
/// caller read from the set. ARGV: value, TTL ms, node (empty: not a member), the node's name
/// followed by `#` (empty: no name check), then those members (in the order of their keys).
/// Returns 1 when claimed; `{'name', node, value}` when another incarnation of the name holds a
/// live lease; `{'again'}` when the set gained a member of the name the caller did not read
/// (it reads the set again); else `{'held', value}` of the lease already there. Writes nothing
/// unless claimed.
const JOIN: &str = r"
if ARGV[4] ~= '' then
  local given = {}
  for i = 5, #ARGV do
    given[ARGV[i]] = true
    local v = redis.call('GET', KEYS[i - 2])
    if v then return {'name', ARGV[i], v} end
  end
  for _, m in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    if m ~= ARGV[3] and string.sub(m, 1, #ARGV[4]) == ARGV[4] and not given[m] then
      return {'again'}
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

/// KEYS: members set, then the lease of each member the caller read from it. ARGV: those
/// members, in the order of their keys. Returns `{node, value, ...}` for live leases and
/// drops from the set the nodes whose lease is gone. (A member that joined after the caller's
/// read shows in its next call.)
const MEMBERS: &str = r"
local out = {}
for i = 1, #ARGV do
  local v = redis.call('GET', KEYS[i + 1])
  if v then
    table.insert(out, ARGV[i])
    table.insert(out, v)
  else
    redis.call('SREM', KEYS[1], ARGV[i])
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

/// How often `join` reads the member set again when it changed under it.
const JOIN_ATTEMPTS: usize = 8;

static JOIN_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(JOIN));
static REFRESH_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(REFRESH));
static MEMBERS_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(MEMBERS));
static LEAVE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(LEAVE));

/// The lease keys under one prefix, on one connection. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Leases {
    con: RedisConn,
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
    pub(crate) fn new(con: RedisConn, prefix: &str) -> Self {
        Self {
            con,
            lease_prefix: format!("{{{prefix}}}:lease:"),
            members_key: format!("{{{prefix}}}:members"),
        }
    }

    /// The nodes in the member set.
    async fn member_names(&self) -> Result<Vec<String>> {
        let mut con = self.con.clone();
        redis::cmd("SMEMBERS")
            .arg(&self.members_key)
            .query_async(&mut con)
            .await
            .map_err(error::map)
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
        let mut reply = Value::Nil;
        // The set rarely changes between the read and the script; when it does, read again.
        for _ in 0..JOIN_ATTEMPTS {
            let others: Vec<String> = if member {
                self.member_names()
                    .await?
                    .into_iter()
                    .filter(|m| *m != node_arg && m.starts_with(&name_arg))
                    .collect()
            } else {
                Vec::new()
            };
            let mut invocation = JOIN_SCRIPT.key(self.key(node));
            invocation.key(&self.members_key);
            for other in &others {
                invocation.key(format!("{}{other}", self.lease_prefix));
            }
            invocation
                .arg(value)
                .arg(ttl_ms(ttl))
                .arg(&node_arg)
                .arg(&name_arg)
                .arg(&others);
            reply = invocation
                .invoke_async(&mut con)
                .await
                .map_err(error::map)?;
            if !matches!(&reply, Value::Array(items) if items.len() == 1) {
                break;
            }
        }
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

    /// Creates `node`'s lease (value `1`) for `ttl` if absent; a lease already there is left
    /// as it is.
    pub(crate) async fn ensure(&self, node: &NodeId, ttl: Duration) -> Result<()> {
        let mut con = self.con.clone();
        let _: Value = redis::cmd("SET")
            .arg(self.key(node))
            .arg("1")
            .arg("PX")
            .arg(ttl_ms(ttl))
            .arg("NX")
            .query_async(&mut con)
            .await
            .map_err(error::map)?;
        Ok(())
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
        let names = self.member_names().await?;
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut con = self.con.clone();
        let mut invocation = MEMBERS_SCRIPT.key(&self.members_key);
        for name in &names {
            invocation.key(format!("{}{name}", self.lease_prefix));
        }
        let flat: Vec<String> = invocation
            .arg(&names)
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
