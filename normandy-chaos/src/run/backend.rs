//! The servers behind a run: a Postgres schema of its own, a Redis key prefix of its own, and
//! on tier 2r a Redis primary and replica of its own (AOF, `appendfsync always`) that the
//! nemesis may restart or fail over; then the final log, read straight from the store.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use normandy_core::{EntryPayload, SessionId, SessionStore};
use tokio::process::{Child, Command};

use crate::history::StoredEntry;

/// Which deployment a run tries to break.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// 0d: one local worker on an LMDB directory (one process per environment).
    Lmdb,
    /// 1: two local workers on one Postgres schema.
    Postgres,
    /// 2: three nodes, Redis registry, Postgres store.
    RedisPostgres,
    /// 2p: three nodes on Postgres alone.
    PostgresAlone,
    /// 2r: three nodes, Redis registry and Redis store (WAIT for a replica).
    RedisStore,
}

impl Tier {
    /// Parses `0d`, `1`, `2`, `2p` or `2r`.
    pub fn parse(s: &str) -> anyhow::Result<Tier> {
        Ok(match s {
            "0d" => Tier::Lmdb,
            "1" => Tier::Postgres,
            "2" => Tier::RedisPostgres,
            "2p" => Tier::PostgresAlone,
            "2r" => Tier::RedisStore,
            other => bail!("unknown tier {other:?}: 0d, 1, 2, 2p or 2r"),
        })
    }

    /// The tier's name, as the command line gives it.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Lmdb => "0d",
            Tier::Postgres => "1",
            Tier::RedisPostgres => "2",
            Tier::PostgresAlone => "2p",
            Tier::RedisStore => "2r",
        }
    }

    /// A cluster of nodes (else local workers).
    pub(crate) fn is_cluster(self) -> bool {
        !matches!(self, Tier::Lmdb | Tier::Postgres)
    }

    /// Whether the store or the registry is on Postgres.
    pub(crate) fn uses_postgres(self) -> bool {
        matches!(
            self,
            Tier::Postgres | Tier::RedisPostgres | Tier::PostgresAlone
        )
    }

    /// Whether anything is on Redis.
    pub(crate) fn uses_redis(self) -> bool {
        matches!(self, Tier::RedisPostgres | Tier::RedisStore)
    }
}

/// `host:port` of a `scheme://[user@]host:port[/…]` URL.
pub(crate) fn host_port(url: &str) -> anyhow::Result<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let hp = rest.split(['/', '?']).next().unwrap_or_default();
    if hp.is_empty() {
        bail!("no host:port in {url:?}");
    }
    Ok(if hp.contains(':') {
        hp.to_string()
    } else if url.starts_with("redis") {
        format!("{hp}:6379")
    } else {
        format!("{hp}:5432")
    })
}

/// Creates the run's Postgres schema.
pub(crate) async fn create_schema(url: &str, schema: &str) -> anyhow::Result<sqlx::PgPool> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .with_context(|| format!("cannot connect to Postgres at {url}"))?;
    // The schema name is ours (`chaos_<tier>_<millis>`), never input.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS {schema}"
    )))
    .execute(&pool)
    .await?;
    Ok(pool)
}

/// Terminates the Postgres backends whose client side is one of `ports` (the upstream
/// connections of one process's Postgres proxy); how many.
pub(crate) async fn terminate_backends(pool: &sqlx::PgPool, ports: &[u16]) -> anyhow::Result<u64> {
    if ports.is_empty() {
        return Ok(0);
    }
    let ports: Vec<i32> = ports.iter().map(|&p| i32::from(p)).collect();
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE client_port = ANY($1) AND pid <> pg_backend_pid()) t",
    )
    .bind(&ports)
    .fetch_one(pool)
    .await?;
    Ok(n as u64)
}

/// One `redis-server` of the run's own pair.
struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn start(&mut self, replica_of: Option<u16>) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .kill_on_drop(true);
        super::procs::die_with_parent(&mut cmd);
        if let Some(p) = replica_of {
            cmd.args(["--replicaof", "127.0.0.1", &p.to_string()]);
        }
        self.child = Some(cmd.spawn().context("cannot start redis-server")?);
        let url = format!("redis://{}", self.addr());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(v) = query::<String>(&url, redis::cmd("PING")).await
                && v == "PONG"
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("redis-server on port {} did not answer", self.port);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    fn signal(&self, stop: bool) {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            use nix::sys::signal::Signal;
            let s = if stop {
                Signal::SIGSTOP
            } else {
                Signal::SIGCONT
            };
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), s);
        }
    }
}

async fn query<T: redis::FromRedisValue>(url: &str, cmd: redis::Cmd) -> anyhow::Result<T> {
    let client = redis::Client::open(url)?;
    let mut con = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .context("connect timed out")??;
    let v = tokio::time::timeout(Duration::from_secs(5), cmd.query_async(&mut con))
        .await
        .context("query timed out")??;
    Ok(v)
}

/// A free loopback port (bound, then released).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Tier 2r's own Redis: a primary and a replica, either of which the nemesis may restart.
pub(crate) struct RedisPair {
    servers: [RedisServer; 2],
    primary: usize,
}

impl RedisPair {
    pub(crate) async fn start(dir: &Path) -> anyhow::Result<Self> {
        let mut servers = [0, 1].map(|i| RedisServer {
            port: 0,
            dir: dir.join(format!("redis-{i}")),
            child: None,
        });
        for s in &mut servers {
            s.port = free_port()?;
        }
        let primary_port = servers[0].port;
        servers[0].start(None).await?;
        servers[1].start(Some(primary_port)).await?;
        let pair = Self {
            servers,
            primary: 0,
        };
        pair.wait_replica_linked().await?;
        Ok(pair)
    }

    /// `host:port` of the primary now.
    pub(crate) fn primary_addr(&self) -> String {
        self.servers[self.primary].addr()
    }

    async fn wait_replica_linked(&self) -> anyhow::Result<()> {
        let replica = &self.servers[1 - self.primary];
        let url = format!("redis://{}", replica.addr());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let info: String = query(&url, redis::cmd("INFO").arg("replication").clone())
                .await
                .unwrap_or_default();
            if info.contains("master_link_status:up") {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the Redis replica did not link to its primary within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL of the primary and a restart in place from its AOF.
    pub(crate) async fn restart_primary(&mut self) -> anyhow::Result<()> {
        let p = &mut self.servers[self.primary];
        p.kill().await;
        p.start(None).await?;
        self.wait_replica_linked().await
    }

    /// SIGKILL of the primary, promotion of the replica, and the old primary back as the new
    /// one's replica. Returns the new primary's `host:port`.
    pub(crate) async fn fail_over(&mut self) -> anyhow::Result<String> {
        let old = self.primary;
        self.servers[old].kill().await;
        let new = 1 - old;
        // A replica paused before (a stale failover) is promoted as it is.
        self.servers[new].signal(false);
        let url = format!("redis://{}", self.servers[new].addr());
        let _: String = query(&url, redis::cmd("REPLICAOF").arg("NO").arg("ONE").clone()).await?;
        self.primary = new;
        let new_port = self.servers[new].port;
        self.servers[old].start(Some(new_port)).await?;
        Ok(self.primary_addr())
    }

    /// Re-links the replica after a failover (callers wait for it before the next fault).
    pub(crate) async fn settle(&self) -> anyhow::Result<()> {
        self.wait_replica_linked().await
    }

    /// SIGSTOP (`true`) or SIGCONT of the replica.
    pub(crate) fn pause_replica(&self, stop: bool) {
        self.servers[1 - self.primary].signal(stop);
    }

    /// Both servers running, the replica going and linked to the primary — whatever a fault
    /// that failed half-way left.
    pub(crate) async fn heal(&mut self) -> anyhow::Result<()> {
        let primary_port = self.servers[self.primary].port;
        if self.servers[self.primary].child.is_none() {
            self.servers[self.primary].start(None).await?;
        }
        let replica = &mut self.servers[1 - self.primary];
        replica.signal(false);
        if replica.child.is_none() {
            replica.start(Some(primary_port)).await?;
        }
        self.wait_replica_linked().await
    }

    pub(crate) async fn shutdown(&mut self) {
        self.pause_replica(false);
        for s in &mut self.servers {
            s.kill().await;
        }
    }
}

/// Where the final log is read from.
pub(crate) enum FinalStore {
    Lmdb(PathBuf),
    Postgres { url: String, schema: String },
    Redis { url: String, prefix: String },
}

impl FinalStore {
    async fn open(&self) -> anyhow::Result<Arc<dyn SessionStore>> {
        Ok(match self {
            FinalStore::Lmdb(dir) => Arc::new(normandy_store_lmdb::LmdbStore::open(
                normandy_store_lmdb::LmdbConfig::new(dir),
            )?),
            FinalStore::Postgres { url, schema } => {
                let config = normandy_store_postgres::PgStoreConfig::new(url)?
                    .schema(schema.clone())?
                    .max_connections(4);
                Arc::new(normandy_store_postgres::PgStore::connect(config).await?)
            }
            FinalStore::Redis { url, prefix } => {
                let config = normandy_store_redis::RedisStoreConfig::new(url)?
                    .prefix(prefix.clone())
                    .wait(1, Duration::from_secs(2));
                Arc::new(normandy_store_redis::RedisStore::connect(config).await?)
            }
        })
    }

    /// Every entry of `sessions`, straight from the store.
    pub(crate) async fn read(&self, sessions: &[String]) -> anyhow::Result<Vec<StoredEntry>> {
        let store = self
            .open()
            .await
            .context("cannot open the store to read the final log")?;
        let mut out = Vec::new();
        for s in sessions {
            let id = SessionId::new(s)?;
            let Some(record) = store.load(&id).await? else {
                continue;
            };
            let mut after = 0;
            loop {
                let page = store.entries(&id, after, 1000).await?;
                let Some(last) = page.last() else { break };
                after = last.seq;
                for e in &page {
                    out.push(stored_entry(s, e, record.epoch));
                }
            }
        }
        Ok(out)
    }
}

/// One entry as `final.jsonl` carries it. Entries do not record the epoch of their writer, so
/// every entry carries the session's epoch at the end of the run.
fn stored_entry(session: &str, e: &normandy_core::Entry, epoch: u64) -> StoredEntry {
    let f = EntryFields::of(e);
    StoredEntry {
        session: session.into(),
        seq: e.seq,
        kind: f.kind,
        input_id: f.input_id,
        call_id: f.call_id,
        epoch,
        in_doubt: f.in_doubt,
    }
}

/// What the files say of an entry.
pub(crate) struct EntryFields {
    pub(crate) kind: String,
    pub(crate) input_id: Option<String>,
    pub(crate) call_id: Option<String>,
    pub(crate) in_doubt: bool,
}

impl EntryFields {
    pub(crate) fn of(e: &normandy_core::Entry) -> Self {
        let (input_id, call_id) = match &e.payload {
            EntryPayload::Input { input_id, .. } | EntryPayload::TurnEnd { input_id, .. } => {
                (Some(input_id.to_string()), None)
            }
            EntryPayload::ToolStarted { call_id, .. }
            | EntryPayload::ToolResult { call_id, .. } => (None, Some(call_id.clone())),
            EntryPayload::Assistant { .. } => (None, None),
        };
        let (kind, in_doubt) = (
            e.payload.kind_name().to_string(),
            e.payload.in_doubt().is_some(),
        );
        Self {
            kind,
            input_id,
            call_id,
            in_doubt,
        }
    }
}
