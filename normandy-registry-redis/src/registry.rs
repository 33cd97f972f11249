//! [`RedisRegistry`]: the [`SessionRegistry`] on Redis, with node leases.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use normandy_core::{Error, NodeId, Placement, Result, SessionId, SessionRegistry, async_trait};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Script, ServerErrorKind, Value};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, error, warn};

use crate::config::RedisRegistryConfig;
use crate::error;
use crate::lease::Leases;

/// Opens a connection manager to `client` and runs `setup` on it, within `connect_timeout +
/// response_timeout` in all: one connection attempt (the client's connect timeout covers the
/// TCP connect and the handshake), then the setup's commands. A server that refuses or does
/// not answer is `Unavailable`, naming the address and the bounds.
///
/// No retries inside the client: its default (6, with exponential backoff) made a closed port
/// take 9.5 s and a silent listener 13 s with 500 ms timeouts configured (issue 15). The same
/// setting governs its reconnects, so a call during an outage waits for one attempt, not for
/// the client's backoff; retrying is the caller's (the lease refresh loop, the router).
pub(crate) async fn bounded_connect<F, Fut>(
    client: &redis::Client,
    connect_timeout: Duration,
    response_timeout: Duration,
    setup: F,
) -> Result<ConnectionManager>
where
    F: FnOnce(ConnectionManager) -> Fut,
    Fut: std::future::Future<Output = Result<ConnectionManager>>,
{
    let target = format!(
        "{} (connect timeout {} ms, response timeout {} ms)",
        client.get_connection_info().addr(),
        connect_timeout.as_millis(),
        response_timeout.as_millis()
    );
    let bound = connect_timeout + response_timeout;
    let named = |e: Error| match e {
        Error::Unavailable { backend, message } => Error::Unavailable {
            backend,
            message: format!("cannot connect to {target}: {message}"),
        },
        other => other,
    };
    let manager_config = ConnectionManagerConfig::new()
        .set_number_of_retries(0)
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(connect_timeout));
    let connect = async {
        let con = client
            .get_connection_manager_with_config(manager_config)
            .await
            .map_err(error::map)?;
        setup(con).await
    };
    match tokio::time::timeout(bound, connect).await {
        Ok(result) => result.map_err(named),
        Err(_) => Err(Error::Unavailable {
            backend: error::BACKEND,
            message: format!(
                "cannot connect to {target}: no answer within {} ms",
                bound.as_millis()
            ),
        }),
    }
}

/// KEYS: placement. ARGV: owner, lease prefix, lease TTL in ms, '1' if the caller's lease must
/// exist already.
///
/// A live owner (its lease key exists) keeps the id; otherwise the caller takes it with the
/// per-id epoch counter bumped, so each new registration has a greater epoch. Unless ARGV[4] is
/// '1', the caller's lease is created if absent (registering on behalf of a node asserts that it
/// is alive); with '1', a caller without a lease gets `nolease` and nothing changes.
const REGISTER: &str = r"
if ARGV[4] == '1' and redis.call('EXISTS', ARGV[2] .. ARGV[1]) == 0 then
  return {'nolease', ARGV[1], '0'}
end
local cur = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if cur[1] then
  if cur[1] == ARGV[1] then
    redis.call('SET', ARGV[2] .. ARGV[1], '1', 'PX', ARGV[3], 'NX')
    return {'mine', cur[1], cur[2]}
  end
  if redis.call('EXISTS', ARGV[2] .. cur[1]) == 1 then
    return {'taken', cur[1], cur[2]}
  end
end
local e = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
redis.call('SET', ARGV[2] .. ARGV[1], '1', 'PX', ARGV[3], 'NX')
return {'won', ARGV[1], tostring(e)}
";

/// KEYS: placement. ARGV: lease prefix. `{owner, epoch}` when the owner's lease is alive.
const LOOKUP: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if not cur[1] then return {} end
if redis.call('EXISTS', ARGV[1] .. cur[1]) == 0 then return {} end
return {cur[1], cur[2]}
";

/// KEYS: placement. ARGV: owner. Releases the id only if `owner` holds it. The epoch counter
/// stays, so a later registration still gets a greater epoch.
const UNREGISTER: &str = r"
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'owner')
  return 1
end
return 0
";

#[derive(Debug)]
struct Scripts {
    register: Script,
    lookup: Script,
    unregister: Script,
}

/// The tier-2 registry: placements in Redis, resolved only while their node's lease is alive.
///
/// # Data layout
/// - `{<prefix>:<id>}:p`, a hash per session id: `owner` (`name#incarnation`) and `epoch` (the
///   per-id counter, `HINCRBY` at every new registration; kept after `unregister` so epochs keep
///   growing — one small hash per id ever registered).
/// - `<prefix>:lease:<name#incarnation>`, one key per node with a server-side TTL (`PX`), renewed
///   by [`refresh_lease`](Self::refresh_lease) or a [`LeaseRefresher`].
///
/// Entries carry no TTL of their own: when a node's lease lapses, every placement pointing at it
/// stops resolving at once, and the next `register` of such an id takes it with a higher epoch.
/// A restarted node has a new incarnation, hence a new lease key: its previous life's placements
/// never come back.
///
/// The scripts read a lease key of another slot than the placement: fine on a single Redis (and
/// Sentinel), refused by Redis Cluster — the same caveat as the Redis store.
pub struct RedisRegistry {
    con: ConnectionManager,
    prefix: String,
    lease_prefix: String,
    leases: Leases,
    lease_ttl: Duration,
    /// Registrations need the caller's lease to exist (see
    /// [`RedisRegistryConfig::require_lease`]).
    require_lease: bool,
    scripts: Arc<Scripts>,
}

impl std::fmt::Debug for RedisRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRegistry")
            .field("prefix", &self.prefix)
            .field("lease_ttl", &self.lease_ttl)
            .finish_non_exhaustive()
    }
}

impl RedisRegistry {
    /// Connects and loads the scripts, within the configured connect timeout plus response
    /// timeout in all: a server that refuses, or does not answer in time, is `Unavailable`
    /// naming its address and those bounds (one attempt; retrying is the caller's).
    pub async fn connect(config: RedisRegistryConfig) -> Result<Self> {
        config.validate()?;
        let (client, connect_timeout, response_timeout) = (
            &config.client,
            config.connect_timeout,
            config.response_timeout,
        );
        let scripts = Scripts {
            register: Script::new(REGISTER),
            lookup: Script::new(LOOKUP),
            unregister: Script::new(UNREGISTER),
        };
        let con = bounded_connect(client, connect_timeout, response_timeout, |mut con| {
            let scripts = &scripts;
            async move {
                for s in [&scripts.register, &scripts.lookup, &scripts.unregister] {
                    s.load_async(&mut con).await.map_err(error::map)?;
                }
                Ok(con)
            }
        })
        .await?;
        Ok(Self {
            leases: Leases::new(con.clone(), &config.prefix),
            con,
            lease_prefix: format!("{}:lease:", config.prefix),
            prefix: config.prefix,
            lease_ttl: config.lease_ttl,
            require_lease: config.require_lease,
            scripts: Arc::new(scripts),
        })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The configured lease TTL.
    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// The lease key of `node`.
    pub fn lease_key(&self, node: &NodeId) -> String {
        self.leases.key(node)
    }

    fn placement_key(&self, id: &SessionId) -> String {
        format!("{{{}:{id}}}:p", self.prefix)
    }

    fn ttl_ms(&self) -> u64 {
        self.lease_ttl.as_millis().max(1) as u64
    }

    /// Claims `node`'s lease for one TTL (server-side expiry) if it has none; a lease already
    /// there is left as it is (see the crate's lease policy: a lease is never overwritten).
    /// Returns whether this call claimed it.
    pub async fn acquire_lease(&self, node: &NodeId) -> Result<bool> {
        let joined = self.leases.join(node, "1", self.lease_ttl, false).await?;
        Ok(joined == crate::lease::Joined::Claimed)
    }

    /// Renews `node`'s lease for one TTL. `Ok(false)` if it had already lapsed: the lease is
    /// *not* recreated, because the node's placements may have been taken meanwhile; such a node
    /// should stop serving and rejoin with a new incarnation.
    pub async fn refresh_lease(&self, node: &NodeId) -> Result<bool> {
        self.leases.refresh(node, None, self.lease_ttl, false).await
    }

    /// Deletes `node`'s lease (a graceful leave, or a test simulating death): its placements stop
    /// resolving at once. Returns whether a lease existed.
    pub async fn release_lease(&self, node: &NodeId) -> Result<bool> {
        self.leases.leave(node).await
    }

    /// Whether `node`'s lease is alive.
    pub async fn lease_alive(&self, node: &NodeId) -> Result<bool> {
        self.leases.alive(node).await
    }

    /// Acquires `node`'s lease and starts a task that refreshes it every TTL/3. The lease stays
    /// alive while the returned handle lives; dropping the handle stops refreshing (the lease
    /// then lapses after one TTL — call [`release_lease`](Self::release_lease) to leave at once).
    pub async fn spawn_lease_refresher(&self, node: &NodeId) -> Result<LeaseRefresher> {
        let sent = Instant::now();
        self.acquire_lease(node).await?;
        let state = Arc::new(Mutex::new(LeaseState {
            valid_until: sent + self.lease_ttl,
            lapsed: false,
        }));
        let registry = Self {
            con: self.con.clone(),
            prefix: self.prefix.clone(),
            lease_prefix: self.lease_prefix.clone(),
            leases: self.leases.clone(),
            lease_ttl: self.lease_ttl,
            require_lease: self.require_lease,
            scripts: self.scripts.clone(),
        };
        let node = node.clone();
        let task_state = state.clone();
        let period = self.lease_ttl / 3;
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first tick is immediate; the lease was just acquired
            loop {
                tick.tick().await;
                // Timed from the send, not the reply: the server's TTL started no earlier.
                let sent = Instant::now();
                match registry.refresh_lease(&node).await {
                    Ok(true) => {
                        let mut s = task_state.lock().unwrap_or_else(|p| p.into_inner());
                        s.valid_until = sent + registry.lease_ttl;
                        debug!(node = %node, "lease refreshed");
                    }
                    Ok(false) => {
                        error!(node = %node, "lease lapsed before it could be refreshed; \
                            this incarnation's placements are void, stop serving and rejoin");
                        task_state.lock().unwrap_or_else(|p| p.into_inner()).lapsed = true;
                        return;
                    }
                    Err(e) => warn!(node = %node, error = %e, "lease refresh failed; retrying"),
                }
            }
        });
        Ok(LeaseRefresher { state, task })
    }

    /// Deletes every key under this registry's prefix — placements, epoch counters and leases
    /// (teardown of a test namespace or a deployment). Returns how many keys were deleted.
    pub async fn purge(&self) -> Result<usize> {
        let mut con = self.con.clone();
        let escaped = escape_glob(&self.prefix);
        let mut deleted = 0;
        for pattern in [format!("{{{escaped}:*"), format!("{escaped}:*")] {
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut con)
                    .await
                    .map_err(error::map)?;
                if !keys.is_empty() {
                    // One UNLINK per key: placements of different ids live in different slots.
                    let mut pipe = redis::pipe();
                    for key in &keys {
                        pipe.cmd("UNLINK").arg(key);
                    }
                    let counts: Vec<usize> =
                        pipe.query_async(&mut con).await.map_err(error::map)?;
                    deleted += counts.into_iter().sum::<usize>();
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        Ok(deleted)
    }

    async fn eval(&self, script: &Script, cmd: &Cmd) -> Result<Value> {
        let mut con = self.con.clone();
        eval_on(&mut con, script, cmd).await
    }
}

#[derive(Debug)]
struct LeaseState {
    valid_until: Instant,
    lapsed: bool,
}

/// A running lease refresher (see [`RedisRegistry::spawn_lease_refresher`]). Dropping it stops
/// refreshing.
#[derive(Debug)]
pub struct LeaseRefresher {
    // std Mutex: two fields copied in and out, never held across an await.
    state: Arc<Mutex<LeaseState>>,
    task: JoinHandle<()>,
}

impl LeaseRefresher {
    /// Until when the lease is surely alive, on this process's monotonic clock: the send time of
    /// the last good refresh plus the TTL. A node should stop serving before this instant passes.
    pub fn valid_until(&self) -> Instant {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .valid_until
    }

    /// Whether the lease is still surely alive (not lapsed, and within [`valid_until`](Self::valid_until)).
    pub fn is_valid(&self) -> bool {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        !s.lapsed && Instant::now() < s.valid_until
    }

    /// Stops refreshing (the lease lapses one TTL after the last refresh).
    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for LeaseRefresher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[async_trait]
impl SessionRegistry for RedisRegistry {
    async fn register(&self, id: &SessionId, owner: &NodeId) -> Result<Placement> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.scripts.register.get_hash())
            .arg(1)
            .arg(self.placement_key(id))
            .arg(owner.to_string())
            .arg(&self.lease_prefix)
            .arg(self.ttl_ms())
            .arg(if self.require_lease { "1" } else { "0" });
        let reply = self.eval(&self.scripts.register, &cmd).await?;
        let bad = || error::unexpected("register", &reply);
        let items = as_items(&reply);
        let [Some(outcome), Some(who), Some(epoch)] = items.as_slice() else {
            return Err(bad());
        };
        let who = parse_node(who).ok_or_else(bad)?;
        let epoch = parse_u64(epoch).ok_or_else(bad)?;
        match *outcome {
            b"won" | b"mine" => Ok(Placement { owner: who, epoch }),
            b"taken" => Err(Error::AlreadyRegistered {
                session: id.clone(),
                owner: who,
                epoch,
            }),
            b"nolease" => Err(Error::Unavailable {
                backend: "redis registry",
                message: format!(
                    "node {owner} has no live lease (it lapsed or was never claimed), so it may \
                     not place session {id}; it must rejoin first"
                ),
            }),
            _ => Err(bad()),
        }
    }

    async fn lookup(&self, id: &SessionId) -> Result<Option<Placement>> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.scripts.lookup.get_hash())
            .arg(1)
            .arg(self.placement_key(id))
            .arg(&self.lease_prefix);
        let reply = self.eval(&self.scripts.lookup, &cmd).await?;
        let bad = || error::unexpected("lookup", &reply);
        match as_items(&reply).as_slice() {
            [] => Ok(None),
            [Some(who), Some(epoch)] => Ok(Some(Placement {
                owner: parse_node(who).ok_or_else(bad)?,
                epoch: parse_u64(epoch).ok_or_else(bad)?,
            })),
            _ => Err(bad()),
        }
    }

    async fn unregister(&self, id: &SessionId, owner: &NodeId) -> Result<bool> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.scripts.unregister.get_hash())
            .arg(1)
            .arg(self.placement_key(id))
            .arg(owner.to_string());
        let reply = self.eval(&self.scripts.unregister, &cmd).await?;
        match reply {
            Value::Int(n) => Ok(n == 1),
            other => Err(error::unexpected("unregister", &other)),
        }
    }
}

/// Sends an `EVALSHA`, loading the script and resending once on `NOSCRIPT`.
async fn eval_on(con: &mut impl ConnectionLike, script: &Script, cmd: &Cmd) -> Result<Value> {
    match cmd.query_async::<Value>(con).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(ServerErrorKind::NoScript) => {
            script.load_async(con).await.map_err(error::map)?;
            cmd.query_async(con).await.map_err(error::map)
        }
        other => other.map_err(error::map),
    }
}

fn as_items(value: &Value) -> Vec<Option<&[u8]>> {
    match value {
        Value::Array(items) => items
            .iter()
            .map(|v| match v {
                Value::BulkString(b) => Some(b.as_slice()),
                Value::SimpleString(s) => Some(s.as_bytes()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn parse_u64(b: &[u8]) -> Option<u64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

fn parse_node(b: &[u8]) -> Option<NodeId> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// Escapes `SCAN MATCH` glob metacharacters.
fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
