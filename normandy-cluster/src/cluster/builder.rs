//! [`ClusterBuilder`] and [`RedisClusterBuilder`]: the checks a node makes before it binds or
//! takes a lease (secret, portable credentials, a durable store, TLS material), the first lease,
//! and the node's named tasks.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use normandy_core::{
    CredentialProvider, Error, Member, Membership, NodeId, Result, SessionRegistry, SessionStore,
    Sessions, TemplateCatalog,
};
use normandy_registry_redis::{RedisMembership, RedisRegistry, RedisRegistryConfig};
use normandy_store_redis::{RedisStore, RedisStoreConfig};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Cluster, Counters, Life, Node, Tasks, lease, members, reaper, route, serve};
use crate::config::ClusterConfig;
use crate::rpc::Secret;
use crate::tls::ClusterTls;

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
    volatile_store_for_tests: bool,
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
            volatile_store_for_tests: false,
        }
    }

    /// The Redis combo (tier 2r): Redis store, Redis registry and Redis membership, each on its
    /// own connection, under one key prefix. `url` names one server (`redis://host:port`) or a
    /// Redis Cluster (`redis+cluster://host1:port1,host2:port2`, or a comma-separated list of
    /// `redis://` node URLs): the same code runs on both (see `normandy_redis::RedisTarget`).
    pub fn redis(catalog: TemplateCatalog, url: &str) -> RedisClusterBuilder {
        RedisClusterBuilder {
            inner: Self::builder(catalog),
            url: url.to_string(),
            prefix: "normandy".into(),
            custom_store: false,
            wait: None,
            accept_commit_loss: false,
        }
    }
}

/// What a node needs to build its local runtime again for a new incarnation. It keeps the
/// store and registry as given: the runtime bounds their calls itself.
pub(super) struct Recipe {
    catalog: TemplateCatalog,
    credentials: Arc<dyn CredentialProvider>,
    idle_timeout: Option<Duration>,
    store: Arc<dyn SessionStore>,
    registry: Arc<dyn SessionRegistry>,
}

impl Recipe {
    /// A runtime whose sessions are registered and activated as `node`, committing only while
    /// `clock` says `node`'s lease is surely alive.
    pub(super) fn build(&self, node: NodeId, clock: &Arc<lease::Clock>) -> Result<Sessions> {
        let mut sessions = Sessions::builder(self.catalog.clone())
            .commit_gate(clock.gate(&node))
            .node(node)
            .store(self.store.clone())
            .registry(self.registry.clone())
            .credentials(self.credentials.clone());
        if let Some(t) = self.idle_timeout {
            sessions = sessions.idle_timeout(t);
        }
        sessions.build()
    }
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

    /// Lets the node run on a store that is not durable (the in-memory store), which a cluster
    /// otherwise refuses: its sessions would not survive the node, so no survivor could resume
    /// them. For tests and demos only.
    pub fn volatile_store_for_tests(mut self) -> Self {
        self.volatile_store_for_tests = true;
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
        check_store(&*store, self.volatile_store_for_tests)?;
        // The node's own calls (routing lookups, the reaper's listings) are bounded like its
        // runtime's; the runtime wraps the unbounded ones the recipe keeps itself.
        let bound = normandy_core::bounded::DEFAULT_CALL_TIMEOUT;
        let (raw_store, raw_registry) = (store.clone(), registry.clone());
        let store = normandy_core::BoundedStore::wrap(store, bound);
        let registry = normandy_core::BoundedRegistry::wrap(registry, bound);
        // A lease call answered after the lease's TTL is moot.
        let membership = normandy_core::BoundedMembership::wrap(membership, self.config.lease_ttl);
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
        let recipe = Recipe {
            catalog: self.catalog,
            credentials,
            idle_timeout: self.idle_timeout,
            store: raw_store,
            registry: raw_registry,
        };
        // Renewed from the claim's send time once the lease is ours.
        let clock = lease::Clock::new(&node, lease::LeaseInstant::now());
        let sessions = recipe.build(node.clone(), &clock)?;
        let me = Member {
            node: node.clone(),
            address: address.clone(),
        };
        let sent = lease::join_unique(&*membership, &me, self.config.lease_ttl).await?;
        clock.renew(sent + self.config.lease_ttl);
        let (stop, _) = watch::channel(false);
        let node = Arc::new(Node {
            bound: local,
            address,
            sessions: RwLock::new(sessions),
            recipe,
            registry,
            store,
            membership,
            lease: lease::Lease::new(me.clone(), clock),
            peers: route::Peers::new(Secret::new(&secret), self.tls),
            view: members::View::new(&me),
            reaper: reaper::Reaper::new(self.reaper, self.config.reap_concurrency),
            life: Life {
                draining: Default::default(),
                left: Default::default(),
                in_flight: Default::default(),
                stop,
            },
            stats: Counters::default(),
            config: self.config,
        });
        let tasks = Tasks {
            server: Some(tokio::spawn(serve::serve(node.clone(), listener))),
            lease: Some(tokio::spawn(node.clone().lease_loop())),
            watchdog: Some(tokio::spawn(node.clone().watchdog())),
            members: Some(tokio::spawn(node.clone().member_loop())),
        };
        info!(node = %me.node, address = %me.address, reaper = node.reaper.enabled, "node up");
        Ok(Cluster {
            node,
            tasks: Arc::new(Mutex::new(tasks)),
        })
    }
}

/// Refuses a store no other node could resume a session from.
fn check_store(store: &dyn SessionStore, volatile_for_tests: bool) -> Result<()> {
    let caps = store.capabilities();
    if !caps.durable && !volatile_for_tests {
        return Err(Error::Config(
            "the cluster's store is not durable (the in-memory store?): a session would die \
             with its node and no survivor could resume it; use a durable store (Postgres, \
             Redis, LMDB), or call ClusterBuilder::volatile_store_for_tests() in a test"
                .into(),
        ));
    }
    if caps.durable && !caps.shared_across_hosts {
        warn!(
            "the cluster's store is not shared across hosts: every node of this cluster must \
             run on this host"
        );
    }
    Ok(())
}

/// The Redis-combo builder: see [`Cluster::redis`].
pub struct RedisClusterBuilder {
    inner: ClusterBuilder,
    url: String,
    prefix: String,
    custom_store: bool,
    /// `WAIT` for the Redis store: replicas and timeout.
    wait: Option<(u32, Duration)>,
    /// Set by [`accept_commit_loss_on_failover`](Self::accept_commit_loss_on_failover).
    accept_commit_loss: bool,
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

    /// Reports a commit of the Redis store only once `replicas` replicas have it, waiting up to
    /// `timeout` (`WAIT`, fail-closed: a commit that cannot get them fails with the retryable
    /// `DurabilityNotMet`). Without it, a failover to a replica that missed the last writes
    /// loses acknowledged commits.
    pub fn wait(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait = Some((replicas, timeout));
        self
    }

    /// Runs the Redis store without `WAIT` although the server has replicas. Say so only if a
    /// failover may lose acknowledged commits: a lost `ToolStarted` runs a non-idempotent tool
    /// again, and two activations can get the same epoch. Without this (or
    /// [`wait`](Self::wait)), `build` refuses a server with replicas.
    pub fn accept_commit_loss_on_failover(mut self) -> Self {
        self.accept_commit_loss = true;
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
                .lease_ttl(ttl)
                .require_lease(),
        )
        .await?;
        let target = normandy_redis::RedisTarget::parse(&self.url)
            .map_err(|e| Error::Config(format!("Redis membership: {e}")))?;
        let membership = RedisMembership::connect(target, &registry_prefix, ttl / 3).await?;
        let mut inner = self
            .inner
            .registry(Arc::new(registry))
            .membership(Arc::new(membership));
        if !self.custom_store {
            let mut config =
                RedisStoreConfig::new(&self.url)?.prefix(format!("{}:store", self.prefix));
            match self.wait {
                Some((replicas, timeout)) => config = config.wait(replicas, timeout),
                None if !self.accept_commit_loss => {
                    let replicas = connected_replicas(&self.url).await?;
                    if replicas > 0 {
                        return Err(Error::Config(format!(
                            "the Redis server (a primary, on a cluster) has {replicas} \
                             replica(s) but the tier-2r store \
                             would commit without WAIT: a failover to a replica that missed \
                             the last writes loses acknowledged commits (a non-idempotent tool \
                             could run twice); call RedisClusterBuilder::wait(replicas, timeout), \
                             or accept_commit_loss_on_failover() to run without it"
                        )));
                    }
                }
                None => {}
            }
            let store = RedisStore::connect(config).await?;
            inner = inner.store(Arc::new(store));
        }
        inner.build().await
    }
}

/// How many replicas the Redis server at `url` has connected (`INFO replication`); on a
/// cluster, the most any primary has (a primary with replicas is one a failover can lose
/// commits on).
async fn connected_replicas(url: &str) -> Result<u32> {
    let unavailable = |e: redis::RedisError| Error::Unavailable {
        backend: "redis store",
        message: format!("reading INFO replication: {e}"),
    };
    let target = normandy_redis::RedisTarget::parse(url)
        .map_err(|e| Error::Config(format!("Redis store: {e}")))?;
    let timeout = Duration::from_secs(2);
    let mut con = target
        .connect(normandy_redis::ConnectOptions {
            connect_timeout: timeout,
            response_timeout: timeout,
        })
        .await
        .map_err(unavailable)?;
    let infos = con
        .query_primaries(redis::cmd("INFO").arg("replication"))
        .await
        .map_err(unavailable)?;
    let mut most = 0;
    for info in infos {
        let info: String = redis::from_redis_value(info).map_err(|e| unavailable(e.into()))?;
        let n = info
            .lines()
            .find_map(|l| l.strip_prefix("connected_slaves:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        most = most.max(n);
    }
    Ok(most)
}
