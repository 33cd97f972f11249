//! [`Cluster`]: one node of a cluster — the core [`Sessions`] runtime plus lease membership,
//! routing to the owner of a session, the RPC server, the reaper — and its builders.
//!
//! # Layout
//! One idea per file; the node's state is `Node`, grouped into the parts those files own.
//! - `builder`: [`ClusterBuilder`], [`RedisClusterBuilder`]: checks, binding, the first lease.
//! - `postgres` (feature `postgres`): `PostgresClusterBuilder`, tier 2p on Postgres alone.
//! - `route`: where a request goes (local actor, the owner over RPC, a stand-in node) and the
//!   re-routing loop; the peers' clients and the route cache.
//! - `lease`: this node's own lease — the refresh loop, the watchdog that stops serving before
//!   the lease can lapse, and rejoining under a new incarnation once it is lost.
//! - `members`: the member poller, the diff between two polls, [`MemberEvent`]s.
//! - `reaper`: resuming a dead node's eager sessions (rendezvous hashing, rate limit, sweep).
//! - `follow`: [`Cluster::follow`]'s re-subscribing stream.
//! - `serve`: the RPC server task and the cluster's side of `rpc::NodeApi`.

mod builder;
mod follow;
mod lease;
mod members;
#[cfg(feature = "postgres")]
mod postgres;
mod reaper;
mod route;
mod serve;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use normandy_core::{
    Entry, Error, EventStream, Input, InputId, Member, Membership, NodeId, Result, Seq, SessionId,
    SessionRegistry, SessionStore, Sessions, TurnOutcome,
};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

pub use builder::{ClusterBuilder, RedisClusterBuilder};
pub use members::MemberEvent;
#[cfg(feature = "postgres")]
pub use postgres::PostgresClusterBuilder;

use crate::config::ClusterConfig;
use crate::rpc::NodeClient;

/// Counters of one node, for tests, benchmarks and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterStats {
    /// Sessions this node's reaper resumed.
    pub reaped: u64,
    /// Requests this node forwarded to another node.
    pub forwarded: u64,
    /// Times this node stopped serving because its lease was in doubt or lost.
    pub lease_losses: u64,
    /// Times this node rejoined under a new incarnation after losing its lease.
    pub rejoins: u64,
}

/// The counters behind [`ClusterStats`].
#[derive(Default)]
struct Counters {
    reaped: AtomicU64,
    forwarded: AtomicU64,
    lease_losses: AtomicU64,
    rejoins: AtomicU64,
}

/// Whether the node is running, draining or stopped, and what is in flight.
struct Life {
    /// Set by a graceful shutdown.
    draining: AtomicBool,
    /// Set just before a graceful shutdown drops the lease: no refresh may touch it again.
    left: AtomicBool,
    /// Requests being routed; a graceful shutdown waits for them.
    in_flight: AtomicUsize,
    /// Flipped once to stop every background task.
    stop: watch::Sender<bool>,
}

/// The shared state of one node, in the parts the modules of this folder own.
pub(crate) struct Node {
    /// Where the RPC server is bound (the advertised address may be another: a proxy, a NAT).
    bound: SocketAddr,
    /// The address other nodes reach this one at (the same in every incarnation).
    address: String,
    config: ClusterConfig,
    /// The local runtime: live actors of this node. Replaced, with a new node id, when the
    /// node rejoins after losing its lease. std RwLock: read and cloned, never held.
    sessions: RwLock<Sessions>,
    /// How to build that runtime again.
    recipe: builder::Recipe,
    registry: Arc<dyn SessionRegistry>,
    store: Arc<dyn SessionStore>,
    membership: Arc<dyn Membership>,
    /// This node's identity and lease (`lease`).
    lease: lease::Lease,
    /// Clients of peers and the route cache (`route`).
    peers: route::Peers,
    /// Live members as of the last poll, and their changes (`members`).
    view: members::View,
    /// The reaper's switch and rate limit (`reaper`).
    reaper: reaper::Reaper,
    life: Life,
    stats: Counters,
}

/// The node's background tasks, by name.
#[derive(Default)]
struct Tasks {
    /// The RPC server.
    server: Option<JoinHandle<()>>,
    /// The lease refresh loop; stopped before a graceful leave drops the lease.
    lease: Option<JoinHandle<()>>,
    /// Stops serving before the lease can lapse.
    watchdog: Option<JoinHandle<()>>,
    /// Polls the member list; starts reaps and sweeps.
    members: Option<JoinHandle<()>>,
}

impl Tasks {
    fn take_all(&mut self) -> Vec<JoinHandle<()>> {
        [
            self.server.take(),
            self.lease.take(),
            self.watchdog.take(),
            self.members.take(),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// One node of a cluster. Cheap to clone; every clone drives the same node.
///
/// ```no_run
/// use normandy_cluster::Cluster;
/// use normandy_core::{CatalogEntry, ConfigTemplate, ScriptedClient, TemplateCatalog};
///
/// # async fn run() -> normandy_core::Result<()> {
/// let catalog = TemplateCatalog::new().with(
///     ConfigTemplate::new("echo", "scripted"),
///     CatalogEntry::with_client(ScriptedClient::echo()),
/// )?;
/// let node = Cluster::redis(catalog, "redis://127.0.0.1:6379")
///     .prefix("myapp")
///     .node_name("node-a")
///     .secret("a long shared secret")
///     .build()
///     .await?;
/// let id = node.start("echo").await?;
/// let outcome = node.send(&id, "hello").await?; // placed here, or routed to its owner
/// assert_eq!(outcome.text(), "echo: hello");
/// node.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Cluster {
    node: Arc<Node>,
    tasks: Arc<Mutex<Tasks>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let me = self.node.me();
        f.debug_struct("Cluster")
            .field("node", &me.node)
            .field("address", &me.address)
            .field("serving", &self.node.serving())
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// This node's id. It changes when the node rejoins under a new incarnation after losing
    /// its lease.
    pub fn node(&self) -> NodeId {
        self.node.me().node.clone()
    }

    /// The address other nodes reach this node's RPC server at.
    pub fn address(&self) -> &str {
        &self.node.address
    }

    /// The address the RPC server is bound to: [`address`](Self::address) unless the node
    /// advertises another one, and the real port when it was bound to port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.node.bound
    }

    /// The local runtime (sessions live on this node). A node that rejoins after losing its
    /// lease gets a new one: call this again rather than keeping the handle.
    pub fn sessions(&self) -> Sessions {
        self.node.sessions()
    }

    /// Whether this node serves requests: its lease is trusted and it is not draining.
    pub fn is_serving(&self) -> bool {
        self.node.serving()
    }

    /// Live members as this node last saw them (itself included while its lease lives).
    pub fn members(&self) -> Vec<Member> {
        self.node.view.list()
    }

    /// Membership changes from now on.
    pub fn events(&self) -> broadcast::Receiver<MemberEvent> {
        self.node.view.subscribe()
    }

    /// This node's counters.
    pub fn stats(&self) -> ClusterStats {
        let s = &self.node.stats;
        ClusterStats {
            reaped: s.reaped.load(Ordering::Relaxed),
            forwarded: s.forwarded.load(Ordering::Relaxed),
            lease_losses: s.lease_losses.load(Ordering::Relaxed),
            rejoins: s.rejoins.load(Ordering::Relaxed),
        }
    }

    /// A client for another node's RPC service, with this cluster's secret.
    pub fn client(&self, address: &str) -> Result<NodeClient> {
        self.node.peers.client(address, &self.node.config)
    }

    /// Creates a session from template `template_id` (no task starts until its first input).
    pub async fn start(&self, template_id: &str) -> Result<SessionId> {
        self.node.start(template_id, None).await
    }

    /// Creates a session with a chosen id.
    pub async fn start_with_id(&self, template_id: &str, id: SessionId) -> Result<SessionId> {
        self.node.start(template_id, Some(id)).await
    }

    /// Sends an input to the session wherever it lives, and waits for its turn's outcome.
    ///
    /// # Behavior
    /// - Routed by the registry: the local actor if this node owns the session, an RPC to the
    ///   owner otherwise; with no owner, the session is placed here.
    /// - A stale route (the owner moved, died, or was fenced) is retried after a fresh lookup,
    ///   with the same input id, so the input is appended once whatever the retries.
    /// - A retryable error that remains is an `Error::Resend` carrying the input's id (generated
    ///   when the input had none): resend with it, and the input is applied at most once.
    pub async fn send(&self, id: &SessionId, input: impl Into<Input>) -> Result<TurnOutcome> {
        let input = input.into();
        let input_id = input.id.unwrap_or_else(InputId::generate);
        self.node
            .route_send(id, input_id.clone(), input.content)
            .await
            .map_err(|e| e.for_input(&input_id))
    }

    /// Committed entries after `after`, at most `limit` (read from the shared store).
    pub async fn history(&self, id: &SessionId, after: Seq, limit: usize) -> Result<Vec<Entry>> {
        self.node.sessions().history(id, after, limit).await
    }

    /// Every committed entry of the session.
    pub async fn history_all(&self, id: &SessionId) -> Result<Vec<Entry>> {
        self.node.sessions().history_all(id).await
    }

    /// Subscribes to the session's events after `after`, at its owner.
    ///
    /// # Behavior
    /// - Committed entries after `after` first, then live entries and progress events, each seq
    ///   once (see `Sessions::subscribe`); from a remote owner they stream over one RPC.
    /// - The stream is tied to the owner's actor: it ends when the actor passivates or is
    ///   fenced, and ends with a retryable `Unavailable` when the owner dies or the link to it
    ///   fails.
    ///   To follow the session on, subscribe again with the last seq seen: the new owner
    ///   replays from there, so nothing is missed or repeated.
    pub async fn subscribe(&self, id: &SessionId, after: Seq) -> Result<EventStream> {
        self.node.route_subscribe(id, after).await
    }

    /// Follows the session's events after `after` wherever it lives: a
    /// [`subscribe`](Self::subscribe) that subscribes again, after the last seq it yielded, whenever its
    /// stream ends or fails retryably — the owner passivated, died, was fenced, or the link to
    /// it failed.
    ///
    /// # Behavior
    /// - Each committed entry once, in seq order, with no gap across re-subscriptions. Progress
    ///   events (model call started, turn finished) are live only: those emitted while the
    ///   stream was between subscriptions — including while nobody polled it — are not
    ///   replayed; the entries they stand for are.
    /// - Re-subscribing activates the session, so a followed session stays live (or comes back
    ///   after each passivation) for as long as the stream is held.
    /// - Waits between attempts grow from 20 ms to 1 s while they keep failing, and reset once
    ///   an event arrives.
    /// - Ends after a non-retryable error, which it yields (the session was closed or deleted,
    ///   say), and, silently, when this node starts shutting down (follow on through another
    ///   node). Drop the stream to stop following.
    /// - The first subscription is made before this returns (its error is this call's), so no
    ///   event committed after the call is missed.
    pub async fn follow(&self, id: &SessionId, after: Seq) -> Result<EventStream> {
        follow::follow(self.node.clone(), id, after).await
    }

    /// Cancels the session's running turn, at its owner.
    ///
    /// # Behavior
    /// - Cancels the turn running when it is called: it reads which input that is from the
    ///   store, then every attempt (a re-send after a stale route included) names that turn,
    ///   so a retry never cancels the turn that started since. `Ok(false)` if none runs.
    pub async fn cancel(&self, id: &SessionId) -> Result<bool> {
        let record = self
            .node
            .store
            .load(id)
            .await?
            .ok_or_else(|| Error::NotFound {
                session: id.clone(),
            })?;
        match record.state.turn {
            Some(turn) => self.node.route_cancel(id, Some(turn.input_id)).await,
            None => Ok(false),
        }
    }

    /// Cancels the turn of input `input_id` if it is the one running, at the session's owner;
    /// any other turn runs on (`Ok(false)`). Safe to resend.
    pub async fn cancel_turn(&self, id: &SessionId, input_id: &InputId) -> Result<bool> {
        self.node.route_cancel(id, Some(input_id.clone())).await
    }

    /// Closes the session for good, at its owner.
    pub async fn stop(&self, id: &SessionId) -> Result<()> {
        self.node.route_stop(id).await
    }

    /// Leaves the cluster gracefully: stops taking sessions, hands live ones off (passivates
    /// them, releasing their placements, so the next request places them elsewhere; callers
    /// waiting on this node are re-routed with the same input ids, so no committed input is
    /// lost), waits for in-flight requests, drops the lease and stops the server.
    pub async fn shutdown(&self) {
        let node = &self.node;
        let me = node.me().node.clone();
        node.life.draining.store(true, Ordering::SeqCst);
        let sessions = node.sessions();
        sessions.set_accepting(false);
        info!(node = %me, live = sessions.live_count(), "draining");
        let deadline = Instant::now() + node.config.drain_timeout;
        // The core lets each step in flight reach its boundary and commit first; a step that
        // outlasts the drain timeout is abandoned (whoever takes the session re-issues it).
        if tokio::time::timeout(node.config.drain_timeout, sessions.shutdown())
            .await
            .is_err()
        {
            warn!(node = %me, "steps still in flight after the drain timeout; leaving anyway");
        }
        while node.life.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Anything activated meanwhile (it should be nothing) goes too.
        let _ = tokio::time::timeout(Duration::from_secs(1), node.sessions().shutdown()).await;
        node.life.left.store(true, Ordering::SeqCst);
        // Stop the lease loop before dropping the lease, so no late refresh touches it.
        let lease_task = lock(&self.tasks).lease.take();
        if let Some(t) = lease_task {
            t.abort();
            let _ = t.await;
        }
        // The same id as at the start: a draining node does not rejoin.
        // Bounded (the membership is, by the lease's TTL): a backend that does not answer must
        // not hold up the shutdown; the lease then lapses on its own.
        if let Err(e) = node.membership.leave(&me).await {
            warn!(error = %e, "could not drop the lease; it lapses after its TTL");
        }
        let _ = node.life.stop.send(true);
        let tasks = lock(&self.tasks).take_all();
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        info!(node = %me, "left the cluster");
    }
}

/// Locks a std mutex, taking the data of a poisoned one (every critical section here leaves its
/// data consistent at each step).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads a std RwLock, taking the data of a poisoned one.
fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

/// Counts a request as in flight while it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(c: &'a AtomicUsize) -> Self {
        c.fetch_add(1, Ordering::SeqCst);
        Self(c)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Node {
    /// The local runtime now.
    fn sessions(&self) -> Sessions {
        read(&self.sessions).clone()
    }

    /// This node's identity now (it changes when the node rejoins under a new incarnation).
    fn me(&self) -> Arc<Member> {
        self.lease.me()
    }

    /// Whether this node serves: its lease is trusted and it is not draining.
    fn serving(&self) -> bool {
        self.lease.trusted() && !self.life.draining.load(Ordering::SeqCst)
    }

    fn stopped(&self) -> bool {
        *self.life.stop.borrow()
    }

    fn not_serving(&self) -> Error {
        Error::Unavailable {
            backend: "cluster node",
            message: format!(
                "node {} is not serving ({})",
                self.me().node,
                if self.life.draining.load(Ordering::SeqCst) {
                    "shutting down"
                } else {
                    "its lease is in doubt"
                }
            ),
        }
    }

    async fn start(&self, template: &str, id: Option<SessionId>) -> Result<SessionId> {
        if !self.serving() {
            return Err(self.not_serving());
        }
        self.sessions()
            .start_with(
                template,
                normandy_core::StartOptions {
                    id,
                    ..Default::default()
                },
            )
            .await
    }
}
