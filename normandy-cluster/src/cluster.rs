//! [`Cluster`]: one node of a cluster — the core [`Sessions`] runtime plus lease membership,
//! routing to the owner of a session, the RPC server, the reaper — and its builders.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::StreamExt;
use normandy_core::{
    CredentialProvider, Entry, Error, EventStream, Input, InputId, Member, Membership, NodeId,
    OwnerFilter, Result, Seq, SessionId, SessionRegistry, SessionStore, Sessions, StartOptions,
    TemplateCatalog, TurnOutcome,
};
use normandy_registry_redis::{RedisRegistry, RedisRegistryConfig};
use normandy_store_redis::{RedisStore, RedisStoreConfig};
use tokio::sync::{Semaphore, broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::config::ClusterConfig;
use crate::hash;
use crate::membership::RedisMembership;
use crate::rpc::{NodeClient, NodeService, Secret, auth_interceptor};
use crate::tls::ClusterTls;
use crate::wire::{
    HealthReply, HistoryRequest, SendRequest, SessionRequest, StartReply, StartRequest,
    SubscribeRequest,
};

/// A change in membership, as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    /// A node's lease appeared.
    Up(Member),
    /// A node's lease lapsed or was dropped.
    Down(NodeId),
}

/// Counters of one node, for tests, benchmarks and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterStats {
    /// Sessions this node's reaper resumed.
    pub reaped: u64,
    /// Requests this node forwarded to another node.
    pub forwarded: u64,
    /// Times this node stopped serving because its lease was in doubt.
    pub lease_losses: u64,
}

/// Shared state of one node.
pub(crate) struct ClusterInner {
    me: Member,
    /// Where the RPC server is bound (the advertised address may be another: a proxy, a NAT).
    bound: SocketAddr,
    sessions: Sessions,
    registry: Arc<dyn SessionRegistry>,
    store: Arc<dyn SessionStore>,
    membership: Arc<dyn Membership>,
    config: ClusterConfig,
    secret: Secret,
    /// TLS of the RPC server and of the clients to peers; `None`: plaintext.
    tls: Option<ClusterTls>,
    reaper: bool,
    /// Clients of peers by address; one HTTP/2 connection each. std Mutex: map access only.
    peers: Mutex<HashMap<String, NodeClient>>,
    /// Last known remote owner of sessions this node forwarded to, so the hot path skips the
    /// registry lookup. Dropped on any stale-route error; a forwarded request that reaches a
    /// node that no longer owns the session is answered `NotOwner`, so a stale entry costs one
    /// round trip, never a wrong answer. std Mutex: map access only.
    routes: Mutex<HashMap<SessionId, NodeId>>,
    /// Live members as of the last poll. std RwLock: never held across an await.
    members: RwLock<BTreeMap<NodeId, String>>,
    /// Until when our lease is surely alive: send time of the last good refresh + TTL, on this
    /// process's monotonic clock.
    valid_until: Mutex<Instant>,
    /// Whether the last refresh succeeded. A node never reaps while its refresh fails.
    refresh_ok: AtomicBool,
    /// Whether the lease is trusted (cleared by the watchdog before it can lapse).
    lease_ok: AtomicBool,
    /// The passivation a lease loss started; serving resumes only once it is done, so it
    /// cannot passivate sessions placed after the lease came back.
    lease_shutdown: Mutex<Option<JoinHandle<()>>>,
    /// Set by a graceful shutdown.
    draining: AtomicBool,
    /// Set just before a graceful shutdown drops the lease: no refresh may recreate it.
    left: AtomicBool,
    in_flight: AtomicUsize,
    events: broadcast::Sender<MemberEvent>,
    stop: watch::Sender<bool>,
    /// Spaces the reaper's claims `1 / reap_rate` apart.
    next_claim: Mutex<Instant>,
    claims: Arc<Semaphore>,
    reaped: AtomicU64,
    forwarded: AtomicU64,
    lease_losses: AtomicU64,
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
    inner: Arc<ClusterInner>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.inner.me.node)
            .field("address", &self.inner.me.address)
            .field("serving", &self.inner.serving())
            .finish_non_exhaustive()
    }
}

/// Builds a [`Cluster`] node from parts: registry, store, membership, catalog, credentials.
pub struct ClusterBuilder {
    catalog: TemplateCatalog,
    name: String,
    registry: Option<Arc<dyn SessionRegistry>>,
    store: Option<Arc<dyn SessionStore>>,
    membership: Option<Arc<dyn Membership>>,
    credentials: Option<Arc<dyn CredentialProvider>>,
    bind: SocketAddr,
    advertise: Option<String>,
    secret: Option<String>,
    tls: Option<ClusterTls>,
    config: ClusterConfig,
    reaper: bool,
    idle_timeout: Option<Duration>,
}

impl std::fmt::Debug for ClusterBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterBuilder")
            .field("name", &self.name)
            .field("bind", &self.bind)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// A builder over `catalog`; registry, store, membership and secret are required.
    pub fn builder(catalog: TemplateCatalog) -> ClusterBuilder {
        ClusterBuilder {
            catalog,
            name: "node".into(),
            registry: None,
            store: None,
            membership: None,
            credentials: None,
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            secret: None,
            tls: None,
            config: ClusterConfig::default(),
            reaper: true,
            idle_timeout: None,
        }
    }

    /// The Redis combo (tier 2r): Redis store, Redis registry and Redis membership, each on its
    /// own connection, under one key prefix.
    pub fn redis(catalog: TemplateCatalog, url: &str) -> RedisClusterBuilder {
        RedisClusterBuilder {
            inner: Self::builder(catalog),
            url: url.to_string(),
            prefix: "normandy".into(),
            custom_store: false,
        }
    }

    /// This node's id.
    pub fn node(&self) -> &NodeId {
        &self.inner.me.node
    }

    /// The address other nodes reach this node's RPC server at.
    pub fn address(&self) -> &str {
        &self.inner.me.address
    }

    /// The address the RPC server is bound to: [`address`](Self::address) unless the node
    /// advertises another one, and the real port when it was bound to port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.bound
    }

    /// The local runtime (sessions live on this node).
    pub fn sessions(&self) -> &Sessions {
        &self.inner.sessions
    }

    /// Whether this node serves requests: its lease is trusted and it is not draining.
    pub fn is_serving(&self) -> bool {
        self.inner.serving()
    }

    /// Live members as this node last saw them (itself included while its lease lives).
    pub fn members(&self) -> Vec<Member> {
        self.inner.member_list()
    }

    /// Membership changes from now on.
    pub fn events(&self) -> broadcast::Receiver<MemberEvent> {
        self.inner.events.subscribe()
    }

    /// This node's counters.
    pub fn stats(&self) -> ClusterStats {
        ClusterStats {
            reaped: self.inner.reaped.load(Ordering::Relaxed),
            forwarded: self.inner.forwarded.load(Ordering::Relaxed),
            lease_losses: self.inner.lease_losses.load(Ordering::Relaxed),
        }
    }

    /// A client for another node's RPC service, with this cluster's secret.
    pub fn client(&self, address: &str) -> Result<NodeClient> {
        self.inner.peer(address)
    }

    /// Creates a session from template `template_id` (no task starts until its first input).
    pub async fn start(&self, template_id: &str) -> Result<SessionId> {
        self.inner.start(template_id, None).await
    }

    /// Creates a session with a chosen id.
    pub async fn start_with_id(&self, template_id: &str, id: SessionId) -> Result<SessionId> {
        self.inner.start(template_id, Some(id)).await
    }

    /// Sends an input to the session wherever it lives, and waits for its turn's outcome.
    ///
    /// # Behavior
    /// - Routed by the registry: the local actor if this node owns the session, an RPC to the
    ///   owner otherwise; with no owner, the session is placed here.
    /// - A stale route (the owner moved, died, or was fenced) is retried after a fresh lookup,
    ///   with the same input id, so the input is appended once whatever the retries.
    pub async fn send(&self, id: &SessionId, input: impl Into<Input>) -> Result<TurnOutcome> {
        let input = input.into();
        let input_id = input.id.unwrap_or_else(InputId::generate);
        self.inner
            .route_send(id, input_id, input.content, false)
            .await
    }

    /// Committed entries after `after`, at most `limit` (read from the shared store).
    pub async fn history(&self, id: &SessionId, after: Seq, limit: usize) -> Result<Vec<Entry>> {
        self.inner.sessions.history(id, after, limit).await
    }

    /// Every committed entry of the session.
    pub async fn history_all(&self, id: &SessionId) -> Result<Vec<Entry>> {
        self.inner.sessions.history_all(id).await
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
        self.inner.route_subscribe(id, after, false).await
    }

    /// Follows the session's events after `after` wherever it lives: a [`subscribe`]
    /// (Self::subscribe) that subscribes again, after the last seq it yielded, whenever its
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
        let first = self.inner.route_subscribe(id, after, false).await?;
        struct Follow {
            inner: Arc<ClusterInner>,
            stop: watch::Receiver<bool>,
            id: SessionId,
            last: Seq,
            current: Option<EventStream>,
            failures: u32,
        }
        let state = Follow {
            stop: self.inner.stop.subscribe(),
            inner: self.inner.clone(),
            id: id.clone(),
            last: after,
            current: Some(first),
            failures: 0,
        };
        Ok(Box::pin(futures::stream::unfold(
            Some(state),
            |state| async move {
                let mut st = state?;
                loop {
                    // A node that drains or stops ends its follows (their callers follow on through
                    // another node); nothing here holds up its shutdown.
                    if st.inner.stopped() || st.inner.draining.load(Ordering::SeqCst) {
                        return None;
                    }
                    let mut stream = match st.current.take() {
                        Some(stream) => stream,
                        None => {
                            if st.failures > 0 {
                                let wait = Duration::from_millis(20)
                                    .saturating_mul(1 << (st.failures - 1).min(6))
                                    .min(Duration::from_secs(1));
                                tokio::select! {
                                    _ = tokio::time::sleep(wait) => {}
                                    _ = st.stop.wait_for(|s| *s) => return None,
                                }
                            }
                            let subscribed = tokio::select! {
                                r = st.inner.route_subscribe(&st.id, st.last, false) => r,
                                _ = st.stop.wait_for(|s| *s) => return None,
                            };
                            match subscribed {
                                Ok(stream) => stream,
                                Err(e) if follow_on(&e) => {
                                    debug!(session = %st.id, error = %e, "follow: subscribing again");
                                    st.failures += 1;
                                    continue;
                                }
                                Err(e) => return Some((Err(e), None)),
                            }
                        }
                    };
                    let next = tokio::select! {
                        next = stream.next() => next,
                        _ = st.stop.wait_for(|s| *s) => return None,
                    };
                    match next {
                        Some(Ok(event)) => {
                            st.current = Some(stream);
                            if let Some(seq) = event.seq() {
                                if seq <= st.last {
                                    continue; // already yielded before a re-subscription
                                }
                                st.last = seq;
                            }
                            st.failures = 0;
                            return Some((Ok(event), Some(st)));
                        }
                        Some(Err(e)) if follow_on(&e) => {
                            debug!(session = %st.id, error = %e, "follow: stream failed; subscribing again");
                            st.failures += 1;
                        }
                        Some(Err(e)) => return Some((Err(e), None)),
                        // The owner's actor went away (passivated, fenced, moved): follow it.
                        None => st.failures += 1,
                    }
                }
            },
        )))
    }

    /// Cancels the session's running turn, at its owner.
    pub async fn cancel(&self, id: &SessionId) -> Result<bool> {
        self.inner.route_cancel(id, false).await
    }

    /// Closes the session for good, at its owner.
    pub async fn stop(&self, id: &SessionId) -> Result<()> {
        self.inner.route_stop(id, false).await
    }

    /// Leaves the cluster gracefully: stops taking sessions, hands live ones off (passivates
    /// them, releasing their placements, so the next request places them elsewhere; callers
    /// waiting on this node are re-routed with the same input ids, so no committed input is
    /// lost), waits for in-flight requests, drops the lease and stops the server.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        inner.draining.store(true, Ordering::SeqCst);
        inner.sessions.set_accepting(false);
        info!(node = %inner.me.node, live = inner.sessions.live_count(), "draining");
        let deadline = Instant::now() + inner.config.drain_timeout;
        // The core lets each step in flight reach its boundary and commit first; a step that
        // outlasts the drain timeout is abandoned (whoever takes the session re-issues it).
        if tokio::time::timeout(inner.config.drain_timeout, inner.sessions.shutdown())
            .await
            .is_err()
        {
            warn!(node = %inner.me.node, "steps still in flight after the drain timeout; leaving anyway");
        }
        while inner.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Anything activated meanwhile (it should be nothing) goes too.
        let _ = tokio::time::timeout(Duration::from_secs(1), inner.sessions.shutdown()).await;
        inner.left.store(true, Ordering::SeqCst);
        // Stop the lease loop before dropping the lease, so no late refresh recreates it.
        let lease_task = lock(&self.tasks).get(1).map(|t| t.abort_handle());
        if let Some(t) = lease_task {
            t.abort();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        if let Err(e) = inner.membership.leave(&inner.me.node).await {
            warn!(error = %e, "could not drop the lease; it lapses after its TTL");
        }
        let _ = inner.stop.send(true);
        let tasks: Vec<_> = std::mem::take(&mut *lock(&self.tasks));
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        info!(node = %inner.me.node, "left the cluster");
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ClusterBuilder {
    /// This node's stable name (an incarnation is added at every start).
    pub fn node_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The registry (shared by every node).
    pub fn registry(mut self, registry: Arc<dyn SessionRegistry>) -> Self {
        self.registry = Some(registry);
        self
    }

    /// The store (shared by every node).
    pub fn store(mut self, store: Arc<dyn SessionStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Where node leases live.
    pub fn membership(mut self, membership: Arc<dyn Membership>) -> Self {
        self.membership = Some(membership);
        self
    }

    /// The credential provider; must be portable (not `FromClient`).
    pub fn credentials(mut self, provider: Arc<dyn CredentialProvider>) -> Self {
        self.credentials = Some(provider);
        self
    }

    /// Address the RPC server binds (default `127.0.0.1:0`, a free port).
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = addr;
        self
    }

    /// Address other nodes use to reach this one (default: the bound address).
    pub fn advertise(mut self, address: impl Into<String>) -> Self {
        self.advertise = Some(address.into());
        self
    }

    /// The shared cluster secret every RPC must present.
    pub fn secret(mut self, secret: impl Into<String>) -> Self {
        self.secret = Some(secret.into());
        self
    }

    /// TLS on the node-to-node RPC (default: none, plaintext HTTP/2). Every node of a cluster
    /// must use it alike.
    pub fn tls(mut self, tls: ClusterTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Timing knobs.
    pub fn config(mut self, config: ClusterConfig) -> Self {
        self.config = config;
        self
    }

    /// Whether this node resumes eager sessions of dead nodes (default true).
    pub fn reaper(mut self, enabled: bool) -> Self {
        self.reaper = enabled;
        self
    }

    /// How long a live session may sit idle before it passivates.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = Some(timeout);
        self
    }

    /// Binds the server, takes the lease, and starts the node's tasks.
    pub async fn build(self) -> Result<Cluster> {
        self.config.validate()?;
        let missing = |what: &str| {
            Error::Config(format!(
                "a cluster node needs a shared {what}: call ClusterBuilder::{what}(...)"
            ))
        };
        let registry = self.registry.ok_or_else(|| missing("registry"))?;
        let store = self.store.ok_or_else(|| missing("store"))?;
        let membership = self.membership.ok_or_else(|| missing("membership"))?;
        let secret = self.secret.ok_or_else(|| missing("secret"))?;
        if secret.len() < 8 || !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::Config(
                "the cluster secret must be at least 8 printable ASCII characters without spaces"
                    .into(),
            ));
        }
        let credentials = self
            .credentials
            .unwrap_or_else(|| Arc::new(normandy_core::EnvCredentials::new()));
        if !credentials.is_portable() {
            return Err(Error::Config(
                "FromClient credentials only exist in the process that received them, so no \
                 other node could rebuild such a session after a failure; a cluster needs a \
                 portable CredentialProvider (environment, vault)"
                    .into(),
            ));
        }
        if let Some(tls) = &self.tls {
            // Fail here, with the reason, rather than in the server task after startup or on
            // the first forwarded request.
            tonic::transport::Server::builder()
                .tls_config(tls.server_config())
                .map_err(|e| Error::Config(format!("cluster TLS server settings: {e}")))?;
            tonic::transport::Endpoint::from_static("https://127.0.0.1:1")
                .tls_config(tls.client_config())
                .map_err(|e| Error::Config(format!("cluster TLS client settings: {e}")))?;
        }
        let node = NodeId::with_fresh_incarnation(&self.name)?;
        let listener = tokio::net::TcpListener::bind(self.bind)
            .await
            .map_err(|e| {
                Error::Config(format!("cannot bind the RPC server to {}: {e}", self.bind))
            })?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::Internal(format!("bound socket has no address: {e}")))?;
        let address = self.advertise.unwrap_or_else(|| local.to_string());
        let mut sessions = Sessions::builder(self.catalog)
            .node(node.clone())
            .store(store.clone())
            .registry(registry.clone())
            .credentials(credentials);
        if let Some(t) = self.idle_timeout {
            sessions = sessions.idle_timeout(t);
        }
        let sessions = sessions.build()?;
        let me = Member {
            node: node.clone(),
            address,
        };
        let sent = Instant::now();
        membership.refresh(&me, self.config.lease_ttl).await?;
        let (stop, _) = watch::channel(false);
        let inner = Arc::new(ClusterInner {
            me: me.clone(),
            bound: local,
            sessions,
            registry,
            store,
            membership,
            secret: Secret::new(&secret),
            tls: self.tls,
            reaper: self.reaper,
            peers: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
            members: RwLock::new(BTreeMap::from([(node.clone(), me.address.clone())])),
            valid_until: Mutex::new(sent + self.config.lease_ttl),
            refresh_ok: AtomicBool::new(true),
            lease_ok: AtomicBool::new(true),
            lease_shutdown: Mutex::new(None),
            draining: AtomicBool::new(false),
            left: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            events: broadcast::channel(256).0,
            stop,
            next_claim: Mutex::new(Instant::now()),
            claims: Arc::new(Semaphore::new(self.config.reap_concurrency)),
            reaped: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            lease_losses: AtomicU64::new(0),
            config: self.config,
        });
        // The lease loop's index (1) is relied on by `shutdown`.
        let tasks = vec![
            tokio::spawn(serve(inner.clone(), listener)),
            tokio::spawn(inner.clone().lease_loop()),
            tokio::spawn(inner.clone().watchdog()),
            tokio::spawn(inner.clone().member_loop()),
        ];
        info!(node = %node, address = %me.address, reaper = inner.reaper, "node up");
        Ok(Cluster {
            inner,
            tasks: Arc::new(Mutex::new(tasks)),
        })
    }
}

/// The Redis-combo builder: see [`Cluster::redis`].
pub struct RedisClusterBuilder {
    inner: ClusterBuilder,
    url: String,
    prefix: String,
    custom_store: bool,
}

impl std::fmt::Debug for RedisClusterBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClusterBuilder")
            .field("prefix", &self.prefix)
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl RedisClusterBuilder {
    /// Key prefix of every key (default `normandy`): store keys under `<prefix>:store`, registry
    /// and leases under `<prefix>:registry`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Uses another store (Postgres, say) instead of the Redis store.
    pub fn store(mut self, store: Arc<dyn SessionStore>) -> Self {
        self.inner = self.inner.store(store);
        self.custom_store = true;
        self
    }

    /// See [`ClusterBuilder::node_name`].
    pub fn node_name(mut self, name: impl Into<String>) -> Self {
        self.inner = self.inner.node_name(name);
        self
    }

    /// See [`ClusterBuilder::bind`].
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.inner = self.inner.bind(addr);
        self
    }

    /// See [`ClusterBuilder::advertise`].
    pub fn advertise(mut self, address: impl Into<String>) -> Self {
        self.inner = self.inner.advertise(address);
        self
    }

    /// See [`ClusterBuilder::secret`].
    pub fn secret(mut self, secret: impl Into<String>) -> Self {
        self.inner = self.inner.secret(secret);
        self
    }

    /// See [`ClusterBuilder::credentials`].
    pub fn credentials(mut self, provider: Arc<dyn CredentialProvider>) -> Self {
        self.inner = self.inner.credentials(provider);
        self
    }

    /// See [`ClusterBuilder::tls`].
    pub fn tls(mut self, tls: ClusterTls) -> Self {
        self.inner = self.inner.tls(tls);
        self
    }

    /// See [`ClusterBuilder::config`].
    pub fn config(mut self, config: ClusterConfig) -> Self {
        self.inner = self.inner.config(config);
        self
    }

    /// See [`ClusterBuilder::reaper`].
    pub fn reaper(mut self, enabled: bool) -> Self {
        self.inner = self.inner.reaper(enabled);
        self
    }

    /// See [`ClusterBuilder::idle_timeout`].
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.inner = self.inner.idle_timeout(timeout);
        self
    }

    /// Connects store, registry and membership (separate connections) and builds the node.
    pub async fn build(self) -> Result<Cluster> {
        let ttl = self.inner.config.lease_ttl;
        let registry_prefix = format!("{}:registry", self.prefix);
        let registry = RedisRegistry::connect(
            RedisRegistryConfig::new(&self.url)?
                .prefix(&registry_prefix)
                .lease_ttl(ttl),
        )
        .await?;
        let client = redis::Client::open(self.url.as_str())
            .map_err(|e| Error::Config(format!("invalid Redis URL for membership: {e}")))?;
        let membership = RedisMembership::connect(client, &registry_prefix, ttl / 3).await?;
        let mut inner = self
            .inner
            .registry(Arc::new(registry))
            .membership(Arc::new(membership));
        if !self.custom_store {
            let store = RedisStore::connect(
                RedisStoreConfig::new(&self.url)?.prefix(format!("{}:store", self.prefix)),
            )
            .await?;
            inner = inner.store(Arc::new(store));
        }
        inner.build().await
    }
}

/// Runs the RPC server until the node stops.
async fn serve(inner: Arc<ClusterInner>, listener: tokio::net::TcpListener) {
    let mut stop = inner.stop.subscribe();
    let svc = tonic::service::interceptor::InterceptedService::new(
        NodeService {
            cluster: inner.clone(),
        },
        auth_interceptor(inner.secret.clone()),
    );
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut server = tonic::transport::Server::builder().timeout(inner.config.rpc_timeout);
    if let Some(tls) = &inner.tls {
        server = match server.tls_config(tls.server_config()) {
            Ok(s) => s,
            Err(e) => {
                // Checked in `build`, so this does not happen; never serve plaintext instead.
                error!(error = %e, "RPC server TLS settings rejected; not serving");
                return;
            }
        };
    }
    let result = server
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        error!(error = %e, "RPC server failed");
    }
}

/// Entries of the route cache before it is cleared.
const ROUTE_CACHE_MAX: usize = 100_000;

/// Whether a follow subscribes again after `e`: whatever a request would re-route, and any
/// other retryable error.
fn follow_on(e: &Error) -> bool {
    reroutable(e) || e.is_retryable()
}

/// Whether a failed request should be retried after a fresh lookup.
fn reroutable(e: &Error) -> bool {
    matches!(
        e,
        Error::Fenced { .. }
            | Error::AlreadyRegistered { .. }
            | Error::NotOwner { .. }
            | Error::Unavailable { .. }
    )
}

/// A request that goes to a session's owner.
enum Op {
    Send {
        input_id: InputId,
        content: Vec<normandy_core::ContentBlock>,
    },
    Subscribe {
        after: Seq,
    },
    Cancel,
    Stop,
}

enum OpResult {
    Outcome(TurnOutcome),
    Stream(EventStream),
    Bool(bool),
    Unit,
}

/// One attempt of `op` at a peer; the peer serves it locally or answers where to go.
async fn run_remote(peer: &NodeClient, id: &SessionId, op: &Op) -> Result<OpResult> {
    Ok(match op {
        Op::Send { input_id, content } => OpResult::Outcome(
            peer.send_inner(id, input_id.clone(), content.clone(), true)
                .await?,
        ),
        Op::Subscribe { after } => OpResult::Stream(peer.subscribe_inner(id, *after, true).await?),
        Op::Cancel => OpResult::Bool(peer.cancel_inner(id, true).await?),
        Op::Stop => {
            peer.stop_inner(id, true).await?;
            OpResult::Unit
        }
    })
}

/// Where one attempt of a request goes.
enum Route {
    Local,
    Remote(NodeClient),
}

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

impl ClusterInner {
    fn serving(&self) -> bool {
        self.lease_ok.load(Ordering::SeqCst) && !self.draining.load(Ordering::SeqCst)
    }

    fn not_serving(&self) -> Error {
        Error::Unavailable {
            backend: "cluster node",
            message: format!(
                "node {} is not serving ({})",
                self.me.node,
                if self.draining.load(Ordering::SeqCst) {
                    "shutting down"
                } else {
                    "its lease is in doubt"
                }
            ),
        }
    }

    fn member_list(&self) -> Vec<Member> {
        self.members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(node, address)| Member {
                node: node.clone(),
                address: address.clone(),
            })
            .collect()
    }

    pub(crate) fn health(&self) -> HealthReply {
        HealthReply {
            node: self.me.node.clone(),
            serving: self.serving(),
            live: self.sessions.live_count() as u64,
            members: self
                .members
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .cloned()
                .collect(),
            reaped: self.reaped.load(Ordering::Relaxed),
            lease_losses: self.lease_losses.load(Ordering::Relaxed),
        }
    }

    fn peer(&self, address: &str) -> Result<NodeClient> {
        let mut peers = lock(&self.peers);
        if let Some(c) = peers.get(address) {
            return Ok(c.clone());
        }
        let c = NodeClient::connect_with(
            address,
            Some(self.secret.expose()),
            self.config.rpc_timeout,
            self.config.peer_keepalive,
            self.tls.as_ref(),
        )?;
        peers.insert(address.to_string(), c.clone());
        Ok(c)
    }

    /// The address of `node`, from the last poll or, failing that, a fresh read.
    async fn address_of(&self, node: &NodeId) -> Option<String> {
        if let Some(a) = self
            .members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
        {
            return Some(a.clone());
        }
        let list = self.membership.members().await.ok()?;
        list.into_iter()
            .find(|m| &m.node == node)
            .map(|m| m.address)
    }

    /// Where the next attempt for `id` goes. A `forwarded` request never goes on to a third
    /// node: it is served here or answered with `NotOwner`.
    async fn pick_route(
        &self,
        id: &SessionId,
        forwarded: bool,
        hint: Option<NodeId>,
    ) -> Result<Route> {
        if hint.is_none() && self.serving() && self.sessions.is_live(id) {
            // Live here: no lookup on the hot path. Should another node have taken the session
            // meanwhile, the actor's next commit is fenced and the request re-routed.
            return Ok(Route::Local);
        }
        let cached = if hint.is_none() && !forwarded {
            lock(&self.routes).get(id).cloned()
        } else {
            None
        };
        let owner = match (hint, cached) {
            (Some(o), _) | (None, Some(o)) => Some(o),
            (None, None) => {
                let owner = self.registry.lookup(id).await?.map(|p| p.owner);
                if let Some(o) = owner.as_ref().filter(|o| **o != self.me.node && !forwarded) {
                    let mut routes = lock(&self.routes);
                    if routes.len() >= ROUTE_CACHE_MAX {
                        routes.clear(); // crude bound; the next requests repopulate it
                    }
                    routes.insert(id.clone(), o.clone());
                }
                owner
            }
        };
        match owner {
            Some(o) if o != self.me.node => {
                if forwarded {
                    return Err(Error::NotOwner {
                        session: id.clone(),
                        node: self.me.node.clone(),
                    });
                }
                let Some(addr) = self.address_of(&o).await else {
                    return Err(Error::Unavailable {
                        backend: "cluster routing",
                        message: format!("owner {o} of session {id} has no known address"),
                    });
                };
                Ok(Route::Remote(self.peer(&addr)?))
            }
            _ if self.serving() => Ok(Route::Local),
            _ if forwarded => Err(self.not_serving()),
            _ => {
                // Not taking sessions here (draining, lease in doubt): hand the request to the
                // node rendezvous hashing picks among the others.
                let others: Vec<NodeId> = self
                    .members
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .keys()
                    .filter(|n| **n != self.me.node)
                    .cloned()
                    .collect();
                let Some(target) = hash::owner(id, &others).cloned() else {
                    return Err(self.not_serving());
                };
                let addr = self
                    .address_of(&target)
                    .await
                    .ok_or_else(|| self.not_serving())?;
                Ok(Route::Remote(self.peer(&addr)?))
            }
        }
    }

    /// Runs one request with re-routing: each attempt goes where `pick_route` says; a stale
    /// route is retried after a fresh lookup until `route_timeout`.
    async fn route(&self, id: &SessionId, forwarded: bool, op: &Op) -> Result<OpResult> {
        let _guard = InFlight::new(&self.in_flight);
        let deadline = Instant::now() + self.config.route_timeout;
        let mut backoff = Duration::from_millis(10);
        let mut hint = None;
        loop {
            let result = match self.pick_route(id, forwarded, hint.take()).await {
                Ok(Route::Local) => self.run_local(id, op).await,
                Ok(Route::Remote(peer)) => {
                    self.forwarded.fetch_add(1, Ordering::Relaxed);
                    run_remote(&peer, id, op).await
                }
                Err(e) => Err(e),
            };
            match result {
                Err(e) if reroutable(&e) && !forwarded && Instant::now() < deadline => {
                    debug!(session = %id, error = %e, "stale route; looking up again");
                    lock(&self.routes).remove(id);
                    if let Error::AlreadyRegistered { owner, .. } = &e {
                        // The winner of a placement race is the route: go there at once.
                        hint = Some(owner.clone());
                        continue;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(250));
                }
                other => return other,
            }
        }
    }

    async fn run_local(&self, id: &SessionId, op: &Op) -> Result<OpResult> {
        Ok(match op {
            Op::Send { input_id, content } => {
                let input = Input {
                    id: Some(input_id.clone()),
                    content: content.clone(),
                };
                OpResult::Outcome(self.sessions.send(id, input).await?)
            }
            Op::Subscribe { after } => OpResult::Stream(self.sessions.subscribe(id, *after).await?),
            Op::Cancel => OpResult::Bool(self.sessions.cancel(id).await?),
            Op::Stop => {
                self.sessions.stop(id).await?;
                OpResult::Unit
            }
        })
    }

    pub(crate) async fn route_send(
        &self,
        id: &SessionId,
        input_id: InputId,
        content: Vec<normandy_core::ContentBlock>,
        forwarded: bool,
    ) -> Result<TurnOutcome> {
        match self
            .route(id, forwarded, &Op::Send { input_id, content })
            .await?
        {
            OpResult::Outcome(o) => Ok(o),
            _ => Err(Error::Internal("send routed to a non-send result".into())),
        }
    }

    pub(crate) async fn route_subscribe(
        &self,
        id: &SessionId,
        after: Seq,
        forwarded: bool,
    ) -> Result<EventStream> {
        match self.route(id, forwarded, &Op::Subscribe { after }).await? {
            OpResult::Stream(s) => Ok(s),
            _ => Err(Error::Internal(
                "subscribe routed to a non-stream result".into(),
            )),
        }
    }

    pub(crate) async fn route_cancel(&self, id: &SessionId, forwarded: bool) -> Result<bool> {
        match self.route(id, forwarded, &Op::Cancel).await? {
            OpResult::Bool(b) => Ok(b),
            _ => Err(Error::Internal("cancel routed to a non-bool result".into())),
        }
    }

    pub(crate) async fn route_stop(&self, id: &SessionId, forwarded: bool) -> Result<()> {
        self.route(id, forwarded, &Op::Stop).await.map(|_| ())
    }

    async fn start(&self, template: &str, id: Option<SessionId>) -> Result<SessionId> {
        if !self.serving() {
            return Err(self.not_serving());
        }
        self.sessions
            .start_with(
                template,
                StartOptions {
                    id,
                    ..StartOptions::default()
                },
            )
            .await
    }

    pub(crate) async fn serve_start(&self, r: StartRequest) -> Result<StartReply> {
        Ok(StartReply {
            id: self.start(&r.template, r.id).await?,
        })
    }

    pub(crate) async fn serve_send(&self, r: SendRequest) -> Result<TurnOutcome> {
        if r.forwarded && !self.serving() {
            return Err(self.not_serving());
        }
        self.route_send(&r.session, r.input_id, r.content, r.forwarded)
            .await
    }

    pub(crate) async fn serve_history(&self, r: HistoryRequest) -> Result<Vec<Entry>> {
        let limit = usize::try_from(r.limit).unwrap_or(usize::MAX).min(10_000);
        self.sessions.history(&r.session, r.after, limit).await
    }

    pub(crate) async fn serve_subscribe(&self, r: SubscribeRequest) -> Result<EventStream> {
        self.route_subscribe(&r.session, r.after, r.forwarded).await
    }

    pub(crate) async fn serve_stop(&self, r: SessionRequest) -> Result<()> {
        self.route_stop(&r.session, r.forwarded).await
    }

    pub(crate) async fn serve_cancel(&self, r: SessionRequest) -> Result<bool> {
        self.route_cancel(&r.session, r.forwarded).await
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Refreshes the lease every TTL/3. Timed from each refresh's send: the server's TTL started
    /// no earlier than that.
    async fn lease_loop(self: Arc<Self>) {
        let period = self.config.lease_ttl / 3;
        let mut stop = self.stop.subscribe();
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // immediate; the lease was just taken
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if self.left.load(Ordering::SeqCst) {
                return;
            }
            let sent = Instant::now();
            match tokio::time::timeout(
                period,
                self.membership.refresh(&self.me, self.config.lease_ttl),
            )
            .await
            {
                Ok(Ok(())) => {
                    *lock(&self.valid_until) = sent + self.config.lease_ttl;
                    self.refresh_ok.store(true, Ordering::SeqCst);
                    if !self.lease_ok.load(Ordering::SeqCst) {
                        self.clone().regain_lease();
                    }
                }
                Ok(Err(e)) => {
                    self.refresh_ok.store(false, Ordering::SeqCst);
                    warn!(node = %self.me.node, error = %e, "lease refresh failed");
                }
                Err(_) => {
                    self.refresh_ok.store(false, Ordering::SeqCst);
                    warn!(node = %self.me.node, "lease refresh timed out");
                }
            }
        }
    }

    /// Stops serving before the lease can lapse when refreshes fail (or the process was paused).
    async fn watchdog(self: Arc<Self>) {
        let step = (self.config.lease_ttl / 30).max(Duration::from_millis(5));
        let margin = self.config.stop_margin();
        while !self.stopped() {
            tokio::time::sleep(step).await;
            let until = *lock(&self.valid_until);
            if self.draining.load(Ordering::SeqCst) {
                continue;
            }
            if self.lease_ok.load(Ordering::SeqCst) && Instant::now() + margin >= until {
                self.lease_ok.store(false, Ordering::SeqCst);
                self.lease_losses.fetch_add(1, Ordering::Relaxed);
                self.sessions.set_accepting(false);
                error!(node = %self.me.node, "lease in doubt: stopped serving, passivating live sessions");
                let sessions = self.sessions.clone();
                *lock(&self.lease_shutdown) =
                    Some(tokio::spawn(async move { sessions.shutdown().await }));
            }
        }
    }

    /// After a good refresh following a lease loss: serve again, and take back our own
    /// interrupted eager sessions that nobody else resumed meanwhile.
    fn regain_lease(self: Arc<Self>) {
        if self.draining.load(Ordering::SeqCst) {
            return;
        }
        if lock(&self.lease_shutdown)
            .as_ref()
            .is_some_and(|t| !t.is_finished())
        {
            // Still passivating what it had; the next good refresh tries again.
            return;
        }
        info!(node = %self.me.node, "lease refreshed again: serving");
        self.sessions.set_accepting(true);
        self.lease_ok.store(true, Ordering::SeqCst);
        if self.reaper {
            let me = self.me.node.clone();
            tokio::spawn(async move { self.reap_node(&me, true).await });
        }
    }

    /// Polls the member list and reacts to changes.
    async fn member_loop(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        let mut tick = tokio::time::interval(self.config.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sweep: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let list = match self.membership.members().await {
                Ok(l) => l,
                Err(e) => {
                    warn!(error = %e, "could not read members");
                    continue;
                }
            };
            let now: BTreeMap<NodeId, String> =
                list.into_iter().map(|m| (m.node, m.address)).collect();
            let prev = std::mem::replace(
                &mut *self.members.write().unwrap_or_else(|p| p.into_inner()),
                now.clone(),
            );
            for (node, address) in &now {
                if !prev.contains_key(node) && *node != self.me.node {
                    debug!(node = %node, "member up");
                    let _ = self.events.send(MemberEvent::Up(Member {
                        node: node.clone(),
                        address: address.clone(),
                    }));
                }
            }
            let downs: Vec<NodeId> = prev
                .keys()
                .filter(|n| !now.contains_key(*n) && **n != self.me.node)
                .cloned()
                .collect();
            for node in &downs {
                info!(node = %node, "member down");
                if let Some(addr) = prev.get(node) {
                    lock(&self.peers).remove(addr);
                }
                let _ = self.events.send(MemberEvent::Down(node.clone()));
            }
            if !self.reaper {
                continue;
            }
            if !downs.is_empty() {
                let others_before = prev.keys().filter(|n| **n != self.me.node).count();
                let me = self.clone();
                tokio::spawn(async move { me.reap_downs(downs, others_before).await });
            }
            if last_sweep.is_none_or(|t| t.elapsed() >= self.config.sweep_interval) {
                last_sweep = Some(Instant::now());
                let me = self.clone();
                tokio::spawn(async move { me.sweep().await });
            }
        }
    }

    /// Whether this node may reap now: its own lease is fine.
    fn may_reap(&self) -> bool {
        self.serving() && self.refresh_ok.load(Ordering::SeqCst)
    }

    async fn reap_downs(self: Arc<Self>, mut downs: Vec<NodeId>, others_before: usize) {
        // A node must stay down for a refresh period: one whose lease the backend dropped
        // (failover, eviction) recreates it within that time.
        tokio::time::sleep(self.config.confirm_down).await;
        if !self.still_down(&mut downs).await {
            return;
        }
        if others_before >= 2 && downs.len() * 2 > others_before {
            // Most of the cluster vanished at once: more likely the backend lost every lease
            // than most nodes died. Wait a whole TTL more, then reap only the ones still gone.
            warn!(
                down = downs.len(),
                of = others_before,
                "mass lease loss; confirming before reaping"
            );
            tokio::time::sleep(self.config.lease_ttl).await;
            if !self.still_down(&mut downs).await {
                return;
            }
        }
        for dead in downs {
            self.reap_node(&dead, false).await;
        }
    }

    /// Keeps in `downs` the nodes still absent; false if none is, or if this node may not reap.
    async fn still_down(&self, downs: &mut Vec<NodeId>) -> bool {
        if !self.may_reap() {
            warn!("not reaping: this node's own lease is in doubt");
            return false;
        }
        match self.membership.members().await {
            Ok(list) => downs.retain(|d| !list.iter().any(|m| &m.node == d)),
            Err(e) => {
                warn!(error = %e, "cannot confirm members; not reaping");
                return false;
            }
        }
        !downs.is_empty()
    }

    /// Resumes the interrupted eager sessions last owned by `dead`: first the ones rendezvous
    /// hashing gives this node, then, after a grace period, any still unclaimed (their chosen
    /// survivor may have died too). `all` claims every one at once (our own, after a lease loss).
    async fn reap_node(&self, dead: &NodeId, all: bool) {
        let started = Instant::now();
        let filter = OwnerFilter::Node(dead.clone());
        let claimed = self
            .reap_pass(&filter, if all { Pass::All } else { Pass::Mine })
            .await;
        if !all {
            tokio::time::sleep(self.config.poll_interval * 2 + self.config.lease_ttl / 3).await;
            let late = self.reap_pass(&filter, Pass::Unclaimed).await;
            info!(dead = %dead, claimed, late, elapsed = ?started.elapsed(), "reaped");
        }
    }

    /// A rare sweep over every resumable session, for owners that died while no reaper watched.
    async fn sweep(self: Arc<Self>) {
        let n = self.reap_pass(&OwnerFilter::Any, Pass::MineIfOrphan).await;
        if n > 0 {
            info!(resumed = n, "sweep resumed orphaned sessions");
        }
    }

    async fn reap_pass(&self, filter: &OwnerFilter, pass: Pass) -> usize {
        let mut cursor: Option<SessionId> = None;
        let mut claims = tokio::task::JoinSet::new();
        let mut queued = 0;
        loop {
            if !self.may_reap() {
                break;
            }
            let page = match self
                .store
                .list_resumable(filter, cursor.as_ref(), 256)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    warn!(error = %e, "could not list resumable sessions");
                    break;
                }
            };
            let live: Vec<NodeId> = self
                .members
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .cloned()
                .collect();
            for s in page.sessions {
                let take = match pass {
                    Pass::All | Pass::Unclaimed => true,
                    Pass::Mine => hash::owner(&s.id, &live) == Some(&self.me.node),
                    Pass::MineIfOrphan => {
                        s.owner.as_ref().is_none_or(|o| !live.contains(o))
                            && hash::owner(&s.id, &live) == Some(&self.me.node)
                    }
                };
                if !take {
                    continue;
                }
                let Ok(permit) = self.claims.clone().acquire_owned().await else {
                    break;
                };
                // Rate limit: claims spaced 1/reap_rate apart, across every pass of this node.
                let slot = {
                    let mut next = lock(&self.next_claim);
                    let slot = (*next).max(Instant::now());
                    *next = slot + Duration::from_secs(1) / self.config.reap_rate;
                    slot
                };
                tokio::time::sleep_until(slot).await;
                let sessions = self.sessions.clone();
                let registry = self.registry.clone();
                let check_unclaimed = matches!(pass, Pass::Unclaimed | Pass::MineIfOrphan);
                queued += 1;
                claims.spawn(async move {
                    let _permit = permit;
                    if check_unclaimed && matches!(registry.lookup(&s.id).await, Ok(Some(_))) {
                        return false;
                    }
                    match sessions.resume(&s.id).await {
                        Ok(()) => true,
                        Err(Error::AlreadyRegistered { .. }) => false,
                        Err(e) => {
                            warn!(session = %s.id, error = %e, "could not resume");
                            false
                        }
                    }
                });
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        let mut resumed = 0;
        while let Some(r) = claims.join_next().await {
            if matches!(r, Ok(true)) {
                resumed += 1;
            }
        }
        debug!(queued, resumed, "reap pass done");
        self.reaped.fetch_add(resumed as u64, Ordering::Relaxed);
        resumed
    }
}

#[derive(Clone, Copy)]
enum Pass {
    /// The sessions rendezvous hashing gives this node.
    Mine,
    /// Every listed session that no node holds.
    Unclaimed,
    /// Every listed session.
    All,
    /// Orphans (owner not a live member) that rendezvous hashing gives this node.
    MineIfOrphan,
}
