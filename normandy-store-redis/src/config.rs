//! [`RedisStoreConfig`]: where the store connects, its key prefix, and its durability policy.

use std::time::Duration;

use normandy_core::{Error, Result};
use normandy_redis::RedisTarget;

/// Replica acknowledgement asked of every commit (`WAIT numreplicas timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// Replicas that must acknowledge a commit before it is reported committed.
    pub replicas: u32,
    /// How long a commit waits for them before failing with `DurabilityNotMet`.
    pub timeout: Duration,
}

/// Configuration of a [`RedisStore`](crate::RedisStore).
///
/// The store runs on one server (`redis://host:port/db`) or on a Redis Cluster
/// (`redis+cluster://host1:port1,host2:port2`, or [`RedisStoreConfig::cluster`] with a list of
/// node URLs): see [`RedisTarget`] for the URL forms, and the crate docs for the key layout on a
/// cluster.
///
/// ```
/// use std::time::Duration;
/// use normandy_store_redis::RedisStoreConfig;
///
/// let config = RedisStoreConfig::new("redis://127.0.0.1:6379")
///     .unwrap()
///     .prefix("myapp")
///     .wait(1, Duration::from_millis(500)); // fail closed unless one replica has each commit
/// assert_eq!(config.key_prefix(), "myapp");
/// ```
#[derive(Debug, Clone)]
pub struct RedisStoreConfig {
    pub(crate) target: RedisTarget,
    pub(crate) prefix: String,
    pub(crate) wait: Option<Wait>,
    pub(crate) wait_connections: usize,
    pub(crate) response_timeout: Duration,
    pub(crate) connect_timeout: Duration,
}

impl RedisStoreConfig {
    /// A configuration for the server at `url` (`redis://host:port/db`) or the cluster at
    /// `redis+cluster://host1:port1,host2:port2` (see [`RedisTarget::parse`]), with prefix
    /// `normandy`, no replica acknowledgement, and a 2 s response timeout.
    pub fn new(url: &str) -> Result<Self> {
        let target =
            RedisTarget::parse(url).map_err(|e| Error::Config(format!("Redis store: {e}")))?;
        Ok(Self::with_target(target))
    }

    /// A configuration for the Redis Cluster whose seed nodes are `urls` (`redis://host:port`
    /// each).
    pub fn cluster<I, S>(urls: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let target =
            RedisTarget::cluster(urls).map_err(|e| Error::Config(format!("Redis store: {e}")))?;
        Ok(Self::with_target(target))
    }

    /// A configuration over an existing client (so a caller can share TLS or auth settings).
    pub fn with_client(client: redis::Client) -> Self {
        Self::with_target(RedisTarget::Server(client))
    }

    /// A configuration for `target`, one server or a cluster.
    pub fn with_target(target: RedisTarget) -> Self {
        Self {
            target,
            prefix: "normandy".into(),
            wait: None,
            wait_connections: 16,
            response_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
        }
    }

    /// Key prefix: every key of this store starts with `{<prefix>:` or `<prefix>:`, so several
    /// stores (or test runs) can share one server without seeing each other's data.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Makes every commit wait for `replicas` replica acknowledgements, up to `timeout`; a commit
    /// with fewer acknowledgements fails with the retryable `DurabilityNotMet` (fail closed).
    pub fn wait(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait = Some(Wait { replicas, timeout });
        self
    }

    /// Turns replica acknowledgement off (the default).
    pub fn no_wait(mut self) -> Self {
        self.wait = None;
        self
    }

    /// How many dedicated connections carry `WAIT` commits at once (default 16). Each is used by
    /// one commit at a time, so a `WAIT` never stalls another caller's command behind it.
    pub fn wait_connections(mut self, n: usize) -> Self {
        self.wait_connections = n.max(1);
        self
    }

    /// How long any command may take before it fails with `Unavailable` (default 2 s). The
    /// dedicated `WAIT` connections add the `WAIT` timeout on top.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How long one connection attempt may take, TCP connect and handshake (default 2 s) (the shared connection and each dedicated `WAIT` connection).
    /// There is one attempt, no retry loop: `connect` fails with `Unavailable` naming the
    /// address once the server refuses, or after this plus one
    /// [`response_timeout`](Self::response_timeout) (loading the scripts) at most; a reconnect
    /// after an outage is likewise one attempt per call.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Where the store connects.
    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    /// The key prefix.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// The replica acknowledgement policy, if any.
    pub fn wait_policy(&self) -> Option<Wait> {
        self.wait
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.prefix.is_empty()
            || self
                .prefix
                .chars()
                .any(|c| c.is_whitespace() || "{}".contains(c))
        {
            return Err(Error::Config(format!(
                "Redis store key prefix {:?} must be non-empty, without whitespace or braces \
                 (braces would break the per-session hash tag)",
                self.prefix
            )));
        }
        if let Some(w) = self.wait {
            if w.replicas == 0 {
                return Err(Error::Config(
                    "Redis store wait: replicas must be at least 1 (use no_wait() to turn WAIT off)"
                        .into(),
                ));
            }
            if w.timeout.is_zero() {
                // WAIT with timeout 0 blocks forever: a commit could hang for good.
                return Err(Error::Config(
                    "Redis store wait: a zero timeout would block commits forever".into(),
                ));
            }
        }
        Ok(())
    }
}
