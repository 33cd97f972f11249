//! [`RedisRegistryConfig`]: where the registry connects, its key prefix, and the node lease TTL.

use std::time::Duration;

use normandy_core::{Error, Result};
use normandy_redis::RedisTarget;

/// Configuration of a [`RedisRegistry`](crate::RedisRegistry).
///
/// It takes its own URL or [`redis::Client`], so the registry can use a server (or at least a
/// connection) separate from the store's: a slow commit never delays a placement. The URL may
/// name one server (`redis://host:port`) or a Redis Cluster
/// (`redis+cluster://host1:port1,host2:port2`; see [`RedisTarget`]).
///
/// ```
/// use std::time::Duration;
/// use normandy_registry_redis::RedisRegistryConfig;
///
/// let config = RedisRegistryConfig::new("redis://127.0.0.1:6379")
///     .unwrap()
///     .prefix("myapp:registry")
///     .lease_ttl(Duration::from_secs(6));
/// assert_eq!(config.lease_ttl_value(), Duration::from_secs(6));
/// ```
#[derive(Debug, Clone)]
pub struct RedisRegistryConfig {
    pub(crate) target: RedisTarget,
    pub(crate) prefix: String,
    pub(crate) lease_ttl: Duration,
    pub(crate) response_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) require_lease: bool,
}

impl RedisRegistryConfig {
    /// A configuration for the server at `url`, prefix `normandy:registry`, lease TTL 10 s.
    pub fn new(url: &str) -> Result<Self> {
        let target =
            RedisTarget::parse(url).map_err(|e| Error::Config(format!("Redis registry: {e}")))?;
        Ok(Self::with_target(target))
    }

    /// A configuration for the Redis Cluster whose seed nodes are `urls` (`redis://host:port`
    /// each).
    pub fn cluster<I, S>(urls: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let target = RedisTarget::cluster(urls)
            .map_err(|e| Error::Config(format!("Redis registry: {e}")))?;
        Ok(Self::with_target(target))
    }

    /// A configuration over an existing client.
    pub fn with_client(client: redis::Client) -> Self {
        Self::with_target(RedisTarget::Server(client))
    }

    /// A configuration for `target`, one server or a cluster.
    pub fn with_target(target: RedisTarget) -> Self {
        Self {
            target,
            prefix: "normandy:registry".into(),
            lease_ttl: Duration::from_secs(10),
            response_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            require_lease: false,
        }
    }

    /// Refuses a registration by a node whose lease is absent, instead of creating the lease
    /// (the default, for users who register without leases of their own). A cluster node sets
    /// it: its lease is claimed once, at join, and a node whose lease lapsed must not bring it
    /// back under its old incarnation by registering a session before it notices — its
    /// placements would resolve again, for up to a TTL, to a node that is rejoining.
    pub fn require_lease(mut self) -> Self {
        self.require_lease = true;
        self
    }

    /// Key prefix (several registries or test runs can share one server).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long a node's lease lives without a refresh (default 10 s). Refreshers renew it every
    /// third of this; a node that stops refreshing loses its placements after it.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// How long a command may take before it fails with `Unavailable` (default 2 s).
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How long one connection attempt may take, TCP connect and handshake (default 2 s).
    /// There is one attempt, no retry loop: `connect` fails with `Unavailable` naming the
    /// address once the server refuses, or after this plus one
    /// [`response_timeout`](Self::response_timeout) (loading the scripts) at most; a reconnect
    /// after an outage is likewise one attempt per call.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Where the registry connects.
    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    /// The key prefix.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// The lease TTL.
    pub fn lease_ttl_value(&self) -> Duration {
        self.lease_ttl
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.prefix.is_empty()
            || self
                .prefix
                .chars()
                .any(|c| c.is_whitespace() || "{}".contains(c))
        {
            return Err(Error::Config(format!(
                "Redis registry key prefix {:?} must be non-empty, without whitespace or braces",
                self.prefix
            )));
        }
        if self.lease_ttl < Duration::from_millis(30) {
            return Err(Error::Config(format!(
                "Redis registry lease TTL {:?} is too short to refresh (minimum 30 ms)",
                self.lease_ttl
            )));
        }
        Ok(())
    }
}
