//! [`RedisRegistry`]: the [`SessionRegistry`] on Redis, with node leases.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use normandy_core::{Error, NodeId, Placement, Result, SessionId, SessionRegistry, async_trait};
use normandy_redis::{ConnectOptions, RedisConn, RedisTarget};
use redis::aio::ConnectionLike;
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
    redis_target: &RedisTarget,
    connect_timeout: Duration,
    response_timeout: Duration,
    setup: F,
) -> Result<RedisConn>
where
    F: FnOnce(RedisConn) -> Fut,
    Fut: std::future::Future<Output = Result<RedisConn>>,
{
    let target = format!(
        "{} (connect timeout {} ms, response timeout {} ms)",
        redis_target.describe(),
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
    let connect = async {
        let con = redis_target
            .connect(ConnectOptions {
                connect_timeout,
                response_timeout,
            })
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

/// KEYS: placement. ARGV: the owner and epoch the caller read ('' when none), the caller.
///
/// Takes the id for the caller, with the per-id epoch counter bumped (so each new registration
/// has a greater epoch), only if the placement still holds what the caller read — and judged
/// dead by its lease — so of any number of concurrent callers exactly one wins; the others get
/// `{'moved'}` and read again. (The lease lives in another slot, so it is checked before this
/// script, not inside it.)
const CLAIM: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if (cur[1] or '') ~= ARGV[1] or (cur[2] or '') ~= ARGV[2] then return {'moved'} end
local e = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[3])
return {'won', tostring(e)}
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
    claim: Script,
    unregister: Script,
}

/// How often `register` reads a placement again after another caller changed it under it.
const REGISTER_ATTEMPTS: usize = 16;

/// The tier-2 registry: placements in Redis, resolved only while their node's lease is alive.
///
/// # Data layout
/// - `{<prefix>:<id>}:p`, a hash per session id: `owner` (`name#incarnation`) and `epoch` (the
///   per-id counter, `HINCRBY` at every new registration; kept after `unregister` so epochs keep
///   growing — one small hash per id ever registered).
/// - `{<prefix>}:lease:<name#incarnation>`, one key per node with a server-side TTL (`PX`), renewed
///   by [`refresh_lease`](Self::refresh_lease) or a [`LeaseRefresher`].
///
/// Entries carry no TTL of their own: when a node's lease lapses, every placement pointing at it
/// stops resolving at once, and the next `register` of such an id takes it with a higher epoch.
/// A restarted node has a new incarnation, hence a new lease key: its previous life's placements
/// never come back.
///
/// The same layout on one server and on a Redis Cluster: a placement and its lease live in
/// different slots, so `register` and `lookup` read the lease with its own command, and
/// `register` then claims the placement with a compare-and-set script on the placement's slot
/// alone (see `CLAIM`): of concurrent registrations exactly one wins on either deployment.
/// Placements keep the key layout of release 0.1; the lease keys gained the hash tag
/// `{<prefix>}` (see the crate's `lease` module).
pub struct RedisRegistry {
    con: RedisConn,
    prefix: String,
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
            &config.target,
            config.connect_timeout,
            config.response_timeout,
        );
        let scripts = Scripts {
            claim: Script::new(CLAIM),
            unregister: Script::new(UNREGISTER),
        };
        let con = bounded_connect(client, connect_timeout, response_timeout, |mut con| {
            let scripts = &scripts;
            async move {
                for s in [&scripts.claim, &scripts.unregister] {
                    s.load_async(&mut con).await.map_err(error::map)?;
                }
                Ok(con)
            }
        })
        .await?;
        Ok(Self {
            leases: Leases::new(con.clone(), &config.prefix),
            con,
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
        for pattern in [
            format!("{{{escaped}:*"),
            format!("{{{escaped}}}:*"),
            format!("{escaped}:*"),
        ] {
            let keys = con.scan_match(&pattern).await.map_err(error::map)?;
            for chunk in keys.chunks(500) {
                // One UNLINK per key: placements of different ids live in different slots.
                let cmds = chunk
                    .iter()
                    .map(|key| {
                        let mut cmd = redis::cmd("UNLINK");
                        cmd.arg(key);
                        cmd
                    })
                    .collect();
                for reply in con.query_each(cmds).await.map_err(error::map)? {
                    if let Value::Int(n) = reply.map_err(error::map)? {
                        deleted += usize::try_from(n).unwrap_or(0);
                    }
                }
            }
        }
        Ok(deleted)
    }

    /// The placement's owner (`None` when the id has none) and epoch counter (`""` when the id
    /// was never registered; it outlives `unregister`).
    async fn read_placement(&self, id: &SessionId) -> Result<(Option<String>, String)> {
        let mut con = self.con.clone();
        let (owner, epoch): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(self.placement_key(id))
            .arg("owner")
            .arg("epoch")
            .query_async(&mut con)
            .await
            .map_err(error::map)?;
        Ok((owner, epoch.unwrap_or_default()))
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
        let me = owner.to_string();
        // The caller's lease first: registering asserts the caller is alive (its lease is
        // created if absent), unless the config requires a lease claimed at join.
        if self.require_lease {
            if !self.leases.alive(owner).await? {
                return Err(Error::Unavailable {
                    backend: "redis registry",
                    message: format!(
                        "node {owner} has no live lease (it lapsed or was never claimed), so it \
                         may not place session {id}; it must rejoin first"
                    ),
                });
            }
        } else {
            self.leases.ensure(owner, self.lease_ttl).await?;
        }
        for _ in 0..REGISTER_ATTEMPTS {
            let (current, epoch) = self.read_placement(id).await?;
            if let Some(holder) = &current {
                let epoch = &epoch;
                if *holder == me {
                    return Ok(Placement {
                        owner: owner.clone(),
                        epoch: parse_u64(epoch.as_bytes())
                            .ok_or_else(|| bad_placement(id, holder, epoch))?,
                    });
                }
                let holder_node = parse_node(holder.as_bytes())
                    .ok_or_else(|| bad_placement(id, holder, epoch))?;
                if self.leases.alive(&holder_node).await? {
                    return Err(Error::AlreadyRegistered {
                        session: id.clone(),
                        owner: holder_node,
                        epoch: parse_u64(epoch.as_bytes())
                            .ok_or_else(|| bad_placement(id, holder, epoch))?,
                    });
                }
            }
            let (seen_owner, seen_epoch) = (current.unwrap_or_default(), epoch);
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(self.scripts.claim.get_hash())
                .arg(1)
                .arg(self.placement_key(id))
                .arg(seen_owner)
                .arg(seen_epoch)
                .arg(&me);
            let reply = self.eval(&self.scripts.claim, &cmd).await?;
            let bad = || error::unexpected("register", &reply);
            match as_items(&reply).as_slice() {
                [Some(b"won"), Some(epoch)] => {
                    return Ok(Placement {
                        owner: owner.clone(),
                        epoch: parse_u64(epoch).ok_or_else(bad)?,
                    });
                }
                [Some(b"moved")] => {
                    debug!(session = %id, "placement changed under register; reading again")
                }
                _ => return Err(bad()),
            }
        }
        Err(Error::Unavailable {
            backend: "redis registry",
            message: format!(
                "session {id}: placement kept changing during register ({REGISTER_ATTEMPTS} attempts)"
            ),
        })
    }

    async fn lookup(&self, id: &SessionId) -> Result<Option<Placement>> {
        let (Some(holder), epoch) = self.read_placement(id).await? else {
            return Ok(None);
        };
        let node =
            parse_node(holder.as_bytes()).ok_or_else(|| bad_placement(id, &holder, &epoch))?;
        if !self.leases.alive(&node).await? {
            return Ok(None);
        }
        Ok(Some(Placement {
            owner: node,
            epoch: parse_u64(epoch.as_bytes()).ok_or_else(|| bad_placement(id, &holder, &epoch))?,
        }))
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

/// A placement hash whose owner or epoch does not parse.
fn bad_placement(id: &SessionId, owner: &str, epoch: &str) -> Error {
    Error::Backend {
        backend: error::BACKEND,
        message: format!("session {id}: placement holds owner {owner:?}, epoch {epoch:?}"),
        retryable: false,
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
