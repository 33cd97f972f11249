//! [`RedisTarget`]: one Redis server or a Redis Cluster, and connecting to it.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::{AsyncConnectionConfig, ConnectionInfo, IntoConnectionInfo, RedisResult};

use crate::conn::RedisConn;

/// How many times a cluster request is resent after `MOVED`, `ASK`, `TRYAGAIN` or a lost node
/// connection before its error is returned. A slot migration answers `ASK` (one resend) and,
/// while a session's keys are split between the two nodes, `TRYAGAIN` (resent after a short
/// wait); eight resends cover a migration of a slot's keys with room to spare, and the
/// overall response timeout bounds them all.
const CLUSTER_RETRIES: u32 = 8;

/// Where a Redis backend connects: one server, or the nodes of a Redis Cluster.
///
/// - `redis://host:port/db` (or `rediss://`, `redis+unix://`): one server (a primary, with or
///   without replicas and Sentinel).
/// - `redis+cluster://host1:port1,host2:port2` (or `rediss+cluster://`, with an optional
///   `user:password@` before the first node, applied to every node): a Redis Cluster, found
///   from any of these seed nodes. The same cluster can be given as a comma-separated list of
///   node URLs (`redis://h1:p1,redis://h2:p2`), or with [`RedisTarget::cluster`].
///
/// ```
/// use normandy_redis::RedisTarget;
///
/// assert!(!RedisTarget::parse("redis://127.0.0.1:6379").unwrap().is_cluster());
/// let cluster = RedisTarget::parse("redis+cluster://127.0.0.1:7000,127.0.0.1:7001").unwrap();
/// assert!(cluster.is_cluster());
/// assert_eq!(cluster.describe(), "cluster 127.0.0.1:7000,127.0.0.1:7001");
/// ```
#[derive(Debug, Clone)]
pub enum RedisTarget {
    /// One server.
    Server(redis::Client),
    /// The seed nodes of a Redis Cluster (the rest of the cluster is discovered from them).
    Cluster(Vec<ConnectionInfo>),
}

impl From<redis::Client> for RedisTarget {
    fn from(client: redis::Client) -> Self {
        Self::Server(client)
    }
}

/// Bounds of a connection: one connect attempt, then each reply.
#[derive(Debug, Clone, Copy)]
pub struct ConnectOptions {
    /// TCP connect plus handshake, per node.
    pub connect_timeout: Duration,
    /// How long one reply may take (for a cluster request, all its redirects and resends
    /// together may take this plus the connect timeout).
    pub response_timeout: Duration,
}

impl RedisTarget {
    /// Parses a server URL, a `redis+cluster://` URL, or a comma-separated list of node URLs
    /// (see the type's docs). The error says what is wrong without echoing a password.
    pub fn parse(url: &str) -> Result<Self, String> {
        let url = url.trim();
        for (scheme, base) in [
            ("redis+cluster://", "redis://"),
            ("rediss+cluster://", "rediss://"),
        ] {
            if let Some(rest) = url.strip_prefix(scheme) {
                return Self::cluster(expand_cluster(base, rest)?);
            }
        }
        if url.contains(',') {
            return Self::cluster(url.split(',').map(str::trim));
        }
        redis::Client::open(url)
            .map(Self::Server)
            .map_err(|e| format!("invalid Redis URL: {e}"))
    }

    /// A cluster from its seed node URLs (`redis://host:port` each; at least one).
    pub fn cluster<I, S>(urls: I) -> Result<Self, String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut nodes = Vec::new();
        for url in urls {
            let url = url.as_ref();
            if url.is_empty() {
                continue;
            }
            nodes.push(
                url.into_connection_info()
                    .map_err(|e| format!("invalid Redis Cluster node URL: {e}"))?,
            );
        }
        if nodes.is_empty() {
            return Err("a Redis Cluster needs at least one node URL".into());
        }
        // Checks the nodes agree on credentials and the like now, not at first connect.
        ClusterClient::new(nodes.clone())
            .map_err(|e| format!("invalid Redis Cluster configuration: {e}"))?;
        Ok(Self::Cluster(nodes))
    }

    /// Whether this is a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// `host:port`, or `cluster host1:port1,host2:port2`: for errors and logs (never a
    /// password).
    pub fn describe(&self) -> String {
        match self {
            Self::Server(client) => client.get_connection_info().addr().to_string(),
            Self::Cluster(nodes) => format!(
                "cluster {}",
                nodes
                    .iter()
                    .map(|n| n.addr().to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }

    /// The shared connection: a reconnecting multiplexed connection to the server (no retry
    /// loop inside the client: one attempt per call, so an outage fails fast and retrying
    /// stays the caller's), or a cluster connection that follows `MOVED`/`ASK` and refreshes
    /// its slot map.
    pub async fn connect(&self, opts: ConnectOptions) -> RedisResult<RedisConn> {
        match self {
            Self::Server(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_number_of_retries(0)
                    .set_response_timeout(Some(opts.response_timeout))
                    .set_connection_timeout(Some(opts.connect_timeout));
                let con: ConnectionManager =
                    client.get_connection_manager_with_config(config).await?;
                Ok(RedisConn::Manager(con))
            }
            Self::Cluster(nodes) => connect_cluster(nodes, opts).await,
        }
    }

    /// A connection of its own (not shared with other callers): a multiplexed connection to
    /// the server, or a cluster connection of its own. The Redis store sends each `WAIT`
    /// commit on one, so a blocking `WAIT` stalls nobody else and always follows its own
    /// script on the same socket.
    pub async fn connect_dedicated(&self, opts: ConnectOptions) -> RedisResult<RedisConn> {
        match self {
            Self::Server(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(opts.connect_timeout))
                    .set_response_timeout(Some(opts.response_timeout));
                Ok(RedisConn::Multiplexed(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            Self::Cluster(nodes) => connect_cluster(nodes, opts).await,
        }
    }
}

async fn connect_cluster(nodes: &[ConnectionInfo], opts: ConnectOptions) -> RedisResult<RedisConn> {
    let client = ClusterClient::builder(nodes.to_vec())
        .retries(CLUSTER_RETRIES)
        .connection_timeout(opts.connect_timeout)
        .response_timeout(opts.response_timeout)
        // Redirects and resends of one request share this bound: a reply, plus one reconnect.
        .overall_response_timeout(Some(opts.response_timeout + opts.connect_timeout))
        .build()?;
    let config = ClusterConfig::new()
        .set_connection_timeout(opts.connect_timeout)
        .set_response_timeout(opts.response_timeout);
    Ok(RedisConn::Cluster(
        client.get_async_connection_with_config(config).await?,
    ))
}

/// `host1:port1,host2:port2[/…]` after `redis+cluster://`, with an optional `user:pass@` first,
/// into one URL per node.
fn expand_cluster(base: &str, rest: &str) -> Result<Vec<String>, String> {
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((auth, hosts)) => (format!("{auth}@"), hosts),
        None => (String::new(), rest),
    };
    // A path or query after the last node applies to every node.
    let (hosts, suffix) = match hosts.find(['/', '?']) {
        Some(i) => hosts.split_at(i),
        None => (hosts, ""),
    };
    let urls: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| format!("{base}{auth}{h}{suffix}"))
        .collect();
    if urls.is_empty() {
        return Err("a redis+cluster:// URL needs at least one host:port".into());
    }
    Ok(urls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_expand_to_one_url_per_node() {
        assert_eq!(
            expand_cluster("redis://", "u:p@h1:1,h2:2/?protocol=resp3").unwrap(),
            vec![
                "redis://u:p@h1:1/?protocol=resp3",
                "redis://u:p@h2:2/?protocol=resp3"
            ]
        );
        assert!(expand_cluster("redis://", ",").is_err());
    }

    #[test]
    fn targets_parse() {
        assert!(
            !RedisTarget::parse("redis://127.0.0.1:6379/2")
                .unwrap()
                .is_cluster()
        );
        let list = RedisTarget::parse("redis://127.0.0.1:7000, redis://127.0.0.1:7001").unwrap();
        assert_eq!(list.describe(), "cluster 127.0.0.1:7000,127.0.0.1:7001");
        assert!(RedisTarget::parse("redis+cluster://").is_err());
        assert!(RedisTarget::parse("nonsense://x").is_err());
        let secret = RedisTarget::parse("redis+cluster://:hunter2@127.0.0.1:7000").unwrap();
        assert!(!secret.describe().contains("hunter2"));
        assert!(!format!("{:?}", RedisTarget::cluster(["bad url"]).unwrap_err()).is_empty());
    }
}
