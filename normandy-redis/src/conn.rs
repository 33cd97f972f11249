//! [`RedisConn`]: one connection type over a single server or a Redis Cluster.

use std::collections::HashMap;

use futures::future::join_all;
use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{
    Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, ServerErrorKind, Value,
};

/// A connection to one server or to a cluster. Cheap to clone (every variant is a handle to a
/// multiplexed connection); clones share the underlying sockets.
///
/// Through [`ConnectionLike`] it runs commands, scripts and pipelines as any redis-rs
/// connection does; on a cluster each is routed to the primary of its first key's slot (a
/// pipeline's keyed commands must share one slot; unkeyed ones such as `WAIT` go with them),
/// and `MOVED`, `ASK` and `TRYAGAIN` are followed by the client.
#[derive(Clone)]
pub enum RedisConn {
    /// The shared, reconnecting connection to one server.
    Manager(ConnectionManager),
    /// A dedicated connection to one server (no reconnect: a broken one is replaced).
    Multiplexed(MultiplexedConnection),
    /// A cluster connection.
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Manager(_) => "RedisConn::Manager",
            Self::Multiplexed(_) => "RedisConn::Multiplexed",
            Self::Cluster(_) => "RedisConn::Cluster",
        })
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Manager(c) => c.req_packed_command(cmd),
            Self::Multiplexed(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Manager(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Multiplexed(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Manager(c) => c.get_db(),
            Self::Multiplexed(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisConn {
    /// Whether this is a cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// Runs `cmds`, single-key commands whose key is their first argument (`HMGET key …`,
    /// `UNLINK key`, `ZRANGEBYLEX key …`) and may lie in different slots, and returns each
    /// reply in order
    /// (an error reply stays that command's own). On one server they go out as one pipeline.
    /// On a cluster (where one pipeline must stay within one slot for the client's routing)
    /// they are grouped by the primary that serves each command's slot, per `CLUSTER SLOTS`,
    /// and each group goes to its primary as one pipeline; a command whose slot moved
    /// meanwhile (`MOVED`/`ASK`) is sent again on its own, through the client's routing.
    pub async fn query_each(&mut self, cmds: Vec<Cmd>) -> RedisResult<Vec<RedisResult<Value>>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        let Self::Cluster(c) = self else {
            let mut pipe = redis::pipe();
            for cmd in cmds {
                pipe.add_command(cmd);
            }
            return pipe.ignore_errors().query_async(self).await;
        };
        let owners = cluster_slot_owners(c).await?;
        let mut groups: HashMap<(String, u16), Vec<usize>> = HashMap::new();
        for (i, cmd) in cmds.iter().enumerate() {
            let slot = cmd.args_iter().nth(1).map_or(0, |arg| match arg {
                redis::Arg::Simple(key) => crate::slot(key),
                _ => 0,
            });
            let node = owners[usize::from(slot)].clone();
            groups.entry(node).or_default().push(i);
        }
        let mut out: Vec<Option<RedisResult<Value>>> = (0..cmds.len()).map(|_| None).collect();
        let sends = groups.into_iter().map(|((host, port), idx)| {
            let mut c = c.clone();
            let mut pipe = redis::pipe();
            for &i in &idx {
                pipe.add_command(cmds[i].clone());
            }
            async move {
                let n = idx.len();
                let routing = SingleNodeRoutingInfo::ByAddress { host, port };
                (idx, c.route_pipeline(pipe, 0, n, routing).await)
            }
        });
        for (idx, replies) in join_all(sends).await {
            match replies {
                Ok(values) => {
                    for (i, v) in idx.into_iter().zip(values) {
                        out[i] = Some(v.extract_error());
                    }
                }
                Err(e) => {
                    for i in idx {
                        out[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        // A slot that moved since `CLUSTER SLOTS`, or a node that failed: once more through
        // the client's own routing, which follows redirects.
        let again: Vec<usize> = (0..cmds.len())
            .filter(|&i| match &out[i] {
                Some(Err(e)) => {
                    matches!(
                        e.kind(),
                        ErrorKind::Server(ServerErrorKind::Moved | ServerErrorKind::Ask)
                    ) || e.is_io_error()
                        || e.is_connection_dropped()
                }
                _ => false,
            })
            .collect();
        let resent = join_all(again.iter().map(|&i| {
            let mut c = c.clone();
            let cmd = cmds[i].clone();
            async move { cmd.query_async::<Value>(&mut c).await }
        }))
        .await;
        for (i, r) in again.into_iter().zip(resent) {
            out[i] = Some(r);
        }
        Ok(out
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Ok(Value::Nil)))
            .collect())
    }

    /// The primaries' `(host, port)` (`CLUSTER NODES`); on one server, an empty list.
    pub async fn primaries(&mut self) -> RedisResult<Vec<(String, u16)>> {
        match self {
            Self::Cluster(c) => cluster_primaries(c).await,
            _ => Ok(Vec::new()),
        }
    }

    /// Runs `cmd` on the server, or on a cluster on every primary, and returns each reply
    /// (for commands about a node rather than a key, such as `INFO replication`).
    pub async fn query_primaries(&mut self, cmd: &Cmd) -> RedisResult<Vec<Value>> {
        let Self::Cluster(c) = self else {
            return Ok(vec![cmd.query_async(self).await?]);
        };
        let mut out = Vec::new();
        for (host, port) in cluster_primaries(c).await? {
            let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
            out.push(c.route_command(cmd.clone(), routing).await?);
        }
        Ok(out)
    }

    /// Every key matching `pattern` (`SCAN … MATCH`, so no server is blocked): on a cluster,
    /// on every primary. Keys may repeat (a `SCAN` guarantee); a slot migrating during the
    /// scan may hide keys, so this is for teardown and test support, not for correctness.
    pub async fn scan_match(&mut self, pattern: &str) -> RedisResult<Vec<Vec<u8>>> {
        let mut keys = Vec::new();
        if let Self::Cluster(c) = self {
            for (host, port) in cluster_primaries(c).await? {
                let routing =
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
                let mut cursor: u64 = 0;
                loop {
                    let reply = c
                        .route_command(scan_cmd(cursor, pattern), routing.clone())
                        .await?;
                    let (next, batch): (u64, Vec<Vec<u8>>) = redis::from_redis_value(reply)?;
                    keys.extend(batch);
                    cursor = next;
                    if cursor == 0 {
                        break;
                    }
                }
            }
            return Ok(keys);
        }
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<Vec<u8>>) =
                scan_cmd(cursor, pattern).query_async(self).await?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        Ok(keys)
    }
}

/// For every slot, the `(host, port)` of the primary serving it (`CLUSTER SLOTS`); slots no
/// node serves map to the first primary listed (its `MOVED`/`CLUSTERDOWN` then says so).
async fn cluster_slot_owners(c: &mut ClusterConnection) -> RedisResult<Vec<(String, u16)>> {
    let reply = c
        .route_command(
            redis::cmd("CLUSTER").arg("SLOTS").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        )
        .await?;
    let bad = || RedisError::from((ErrorKind::Client, "unexpected CLUSTER SLOTS reply"));
    let Value::Array(ranges) = reply else {
        return Err(bad());
    };
    let mut owners: Vec<Option<(String, u16)>> = vec![None; usize::from(crate::slot::SLOTS)];
    let mut first = None;
    for range in ranges {
        let Value::Array(parts) = range else {
            return Err(bad());
        };
        let [
            Value::Int(start),
            Value::Int(end),
            Value::Array(primary),
            ..,
        ] = parts.as_slice()
        else {
            return Err(bad());
        };
        let (host, port) = match primary.as_slice() {
            [host, Value::Int(port), ..] => {
                let host: String = redis::from_redis_value(host.clone())?;
                (host, u16::try_from(*port).map_err(|_| bad())?)
            }
            _ => return Err(bad()),
        };
        first.get_or_insert_with(|| (host.clone(), port));
        let (start, end) = (
            usize::try_from(*start).map_err(|_| bad())?,
            usize::try_from(*end).map_err(|_| bad())?,
        );
        for owner in owners.iter_mut().take(end + 1).skip(start) {
            *owner = Some((host.clone(), port));
        }
    }
    let first = first.ok_or_else(bad)?;
    Ok(owners
        .into_iter()
        .map(|o| o.unwrap_or_else(|| first.clone()))
        .collect())
}

async fn cluster_primaries(c: &mut ClusterConnection) -> RedisResult<Vec<(String, u16)>> {
    let reply = c
        .route_command(
            redis::cmd("CLUSTER").arg("NODES").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        )
        .await?;
    let text: String = redis::from_redis_value(reply)?;
    let mut out = Vec::new();
    for line in text.lines() {
        // <id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <state> <slots…>
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, addr, flags, ..] = fields.as_slice() else {
            continue;
        };
        let flags: Vec<&str> = flags.split(',').collect();
        if !flags.contains(&"master") || flags.contains(&"fail") || flags.contains(&"noaddr") {
            continue;
        }
        let hostport = addr.split(['@', ',']).next().unwrap_or_default();
        let Some((host, port)) = hostport.rsplit_once(':') else {
            continue;
        };
        let Ok(port) = port.parse() else { continue };
        out.push((host.to_string(), port));
    }
    if out.is_empty() {
        return Err(RedisError::from((
            ErrorKind::Client,
            "CLUSTER NODES listed no reachable primary",
        )));
    }
    Ok(out)
}

fn scan_cmd(cursor: u64, pattern: &str) -> Cmd {
    let mut cmd = redis::cmd("SCAN");
    cmd.arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(1000);
    cmd
}
