//! Real node processes for the multi-node tests: spawned from the `normandy-node` binary in their
//! own process group, killed when the test drops them (and by the kernel if the test process
//! dies: `PR_SET_PDEATHSIG`), ready once their `health` RPC says so — never after a sleep.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use normandy_cluster::NodeClient;
use normandy_core::{ContentBlock, Entry, EntryPayload, InputId, SessionId, TurnOutcome};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[path = "../../../normandy-cluster/tests/support/mod.rs"]
mod support;
pub use support::*;

pub const SECRET: &str = "test-cluster-secret";

/// The Postgres this process's tests use, found once by [`postgres_or_skip`].
static POSTGRES_URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Finds Postgres as every suite does (`normandy_tests::backends`) and keeps it for
/// [`postgres_url`]; `None` after reporting the running test skipped by name.
pub async fn postgres_or_skip() -> Option<String> {
    match normandy_tests::backends::postgres_url().await {
        Some(url) => Some(POSTGRES_URL.get_or_init(|| url).clone()),
        None => {
            normandy_tests::backends::skip_this_test(&normandy_tests::backends::skip_reason());
            None
        }
    }
}

/// The Postgres found by [`postgres_or_skip`], which the test must have called first.
pub fn postgres_url() -> String {
    POSTGRES_URL
        .get()
        .cloned()
        .expect("the test starts with `postgres_or_skip()`, which finds the Postgres server")
}

/// Options of one node.
#[derive(Clone, Debug)]
pub struct NodeOpts {
    pub name: String,
    pub prefix: String,
    pub model_latency_ms: u64,
    pub tool_latency_ms: u64,
    pub lease_ttl_ms: u64,
    pub reaper: bool,
    pub postgres_schema: Option<String>,
    /// Redis URL for this node (default: [`redis_url`]), e.g. through a [`Proxy`].
    pub redis_url: Option<String>,
    /// Address other nodes are told to reach this one at (`--advertise`), e.g. a [`Proxy`]
    /// in front of it, pointed at the bound address once the node prints it.
    pub advertise: Option<String>,
    /// HTTP/2 keep-alive toward peers (`--peer-keepalive-ms`; default: the node's, 5 s).
    pub peer_keepalive_ms: Option<u64>,
    /// Tier 2p: no `--redis-url`, everything in `postgres_schema` on Postgres.
    pub postgres_alone: bool,
    /// Postgres URL for this node (default: [`postgres_url`]), e.g. through a [`Proxy`].
    pub postgres_url: Option<String>,
}

impl NodeOpts {
    pub fn new(name: &str, prefix: &str) -> Self {
        Self {
            name: name.into(),
            prefix: prefix.into(),
            model_latency_ms: 0,
            tool_latency_ms: 0,
            lease_ttl_ms: 1500,
            reaper: true,
            postgres_schema: None,
            redis_url: None,
            advertise: None,
            peer_keepalive_ms: None,
            postgres_alone: false,
            postgres_url: None,
        }
    }

    /// Runs on Postgres alone (tier 2p) in `schema` (created by the test): no Redis at all.
    pub fn postgres_alone(mut self, schema: &str) -> Self {
        self.postgres_schema = Some(schema.into());
        self.postgres_alone = true;
        self
    }

    pub fn peer_keepalive(mut self, ms: u64) -> Self {
        self.peer_keepalive_ms = Some(ms);
        self
    }

    /// Has other nodes reach this one at `advertise` only (the RPC server binds a free port).
    pub fn advertising(mut self, advertise: &str) -> Self {
        self.advertise = Some(advertise.into());
        self
    }

    pub fn model_latency(mut self, ms: u64) -> Self {
        self.model_latency_ms = ms;
        self
    }

    /// Uses the Postgres store in `schema` (created if missing) instead of the Redis store.
    pub fn postgres(mut self, schema: &str) -> Self {
        self.postgres_schema = Some(schema.into());
        self
    }

    pub fn tool_latency(mut self, ms: u64) -> Self {
        self.tool_latency_ms = ms;
        self
    }
}

/// A running node process.
pub struct Node {
    pub name: String,
    /// Where this node's RPC server is reached directly (the test's own client uses it).
    pub address: String,
    /// Where other nodes reach it (`address` unless it advertises another one).
    pub advertised: String,
    pub node_id: String,
    pub client: NodeClient,
    child: Child,
}

impl Node {
    pub async fn spawn(opts: NodeOpts) -> Node {
        let log_dir = std::env::temp_dir().join("normandy-cluster-tests");
        std::fs::create_dir_all(&log_dir).unwrap();
        let log = std::fs::File::create(log_dir.join(format!("{}-{}.log", opts.prefix, opts.name)))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_normandy-node"));
        cmd.arg("serve")
            .args(["--name", &opts.name])
            .args(["--bind", "127.0.0.1:0"])
            .args(["--prefix", &opts.prefix])
            .args(["--secret", SECRET])
            .args(["--lease-ttl-ms", &opts.lease_ttl_ms.to_string()])
            .args(["--model-latency-ms", &opts.model_latency_ms.to_string()])
            .args(["--tool-latency-ms", &opts.tool_latency_ms.to_string()])
            .env("RUST_LOG", "warn,normandy_cluster=debug,normandy_core=info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .process_group(0);
        if !opts.reaper {
            cmd.arg("--no-reaper");
        }
        if let Some(a) = &opts.advertise {
            cmd.args(["--advertise", a]);
        }
        if let Some(ms) = opts.peer_keepalive_ms {
            cmd.args(["--peer-keepalive-ms", &ms.to_string()]);
        }
        if opts.postgres_alone {
            // Several nodes share the test server's 100 connections with other suites.
            cmd.args(["--postgres-connections", "6"]);
        } else {
            cmd.args([
                "--redis-url",
                &opts.redis_url.clone().unwrap_or_else(redis_url),
            ]);
        }
        if let Some(schema) = &opts.postgres_schema {
            let url = opts.postgres_url.clone().unwrap_or_else(postgres_url);
            cmd.args(["--postgres-url", &url])
                .args(["--postgres-schema", schema]);
        }
        normandy_chaos::run::die_with_parent(&mut cmd);
        let mut child = cmd.spawn().expect("spawn normandy-node");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("node {} did not start within 30 s", opts.name))
            .unwrap()
            .unwrap_or_else(|| panic!("node {} exited before listening", opts.name));
        let mut parts = line.split_whitespace();
        assert_eq!(
            parts.next(),
            Some("LISTENING"),
            "unexpected first line {line:?}"
        );
        let advertised = parts.next().unwrap().to_string();
        let node_id = parts.next().unwrap().to_string();
        // The node prints the address it advertises, then the one it is bound to, which the
        // test's own client uses (the same unless it advertises a proxy).
        let address = parts.next().unwrap().to_string();
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let client = NodeClient::new(&address, Some(SECRET), Duration::from_secs(30)).unwrap();
        let node = Node {
            name: opts.name,
            address,
            advertised,
            node_id,
            client,
            child,
        };
        node.wait_ready().await;
        node
    }

    /// Waits until the health probe answers `serving`.
    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(h) = self.client.health().await
                && h.serving
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {} not ready in time",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until this node sees exactly `n` members.
    pub async fn wait_members(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(h) = self.client.health().await
                && h.members.len() == n
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {} never saw {n} members",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id().expect("child running") as i32)
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).expect("signal node");
    }

    /// SIGKILL, then reap the process.
    pub async fn kill9(&mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.child.wait().await;
    }

    /// SIGTERM (graceful shutdown) and wait for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal(Signal::SIGTERM);
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("node did not exit within 30 s of SIGTERM")
            .unwrap()
    }

    pub async fn send(&self, id: &SessionId, text: &str) -> normandy_core::Result<TurnOutcome> {
        self.client
            .send(id, InputId::generate(), vec![ContentBlock::text(text)])
            .await
    }

    pub async fn send_with(
        &self,
        id: &SessionId,
        input: &InputId,
        text: &str,
    ) -> normandy_core::Result<TurnOutcome> {
        self.client
            .send(id, input.clone(), vec![ContentBlock::text(text)])
            .await
    }
}

/// Sends `text` to `id` through `a` in the background; returns once `b` reads the input
/// committed, with the input's id and the pending call.
pub async fn input_committed(
    a: &Node,
    b: &Node,
    id: &SessionId,
    text: &str,
) -> (
    InputId,
    tokio::task::JoinHandle<normandy_core::Result<TurnOutcome>>,
) {
    let first = InputId::generate();
    let c = a.client.clone();
    let (id2, first2, text) = (id.clone(), first.clone(), text.to_string());
    let pending =
        tokio::spawn(async move { c.send(&id2, first2, vec![ContentBlock::text(text)]).await });
    eventually(Duration::from_secs(5), "input committed on a", || {
        let b = b.client.clone();
        let id = id.clone();
        let first = first.clone();
        async move {
            summarize(&b.history(&id, 0, 100).await.unwrap())
                .inputs
                .contains_key(&first)
        }
    })
    .await;
    (first, pending)
}

/// Inputs, turn ends and tool results of a session's history.
#[derive(Debug, Default)]
pub struct Summary {
    pub inputs: HashMap<InputId, usize>,
    pub ended: HashMap<InputId, usize>,
    pub tool_results: HashMap<String, usize>,
}

pub fn summarize(entries: &[Entry]) -> Summary {
    let mut s = Summary::default();
    let mut last = 0;
    for e in entries {
        assert!(e.seq > last, "seqs must grow: {} after {last}", e.seq);
        last = e.seq;
        match &e.payload {
            EntryPayload::Input { input_id, .. } => {
                *s.inputs.entry(input_id.clone()).or_default() += 1
            }
            EntryPayload::TurnEnd { input_id, .. } => {
                *s.ended.entry(input_id.clone()).or_default() += 1
            }
            EntryPayload::ToolResult { call_id, .. } => {
                *s.tool_results.entry(call_id.clone()).or_default() += 1
            }
            _ => {}
        }
    }
    s
}

/// Every `count` tool run counter under `prefix` (call key → runs).
pub async fn tool_runs(prefix: &str) -> HashMap<String, i64> {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:toolruns:*"))
        .query_async(&mut con)
        .await
        .unwrap();
    let mut out = HashMap::new();
    for k in keys {
        let n: i64 = redis::cmd("GET")
            .arg(&k)
            .query_async(&mut con)
            .await
            .unwrap();
        out.insert(k, n);
    }
    out
}

/// Sum of one health field over `nodes`.
pub async fn health_sum(
    nodes: &[&Node],
    f: impl Fn(&normandy_cluster::wire::HealthReply) -> u64,
) -> u64 {
    let mut total = 0;
    for n in nodes {
        total += f(&n.client.health().await.unwrap());
    }
    total
}

/// Creates a fresh Postgres schema for one test.
pub async fn create_schema(name: &str) {
    use sqlx::Connection;
    let mut con = sqlx::PgConnection::connect(&postgres_url())
        .await
        .expect("connect to Postgres");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {name} CASCADE"
    )))
    .execute(&mut con)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}")))
        .execute(&mut con)
        .await
        .unwrap();
}

/// Drops a test's Postgres schema.
pub async fn drop_schema(name: &str) {
    use sqlx::Connection;
    if let Ok(mut con) = sqlx::PgConnection::connect(&postgres_url()).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {name} CASCADE"
        )))
        .execute(&mut con)
        .await;
    }
}

pub use normandy_chaos::proxy::Proxy;

/// A proxy in front of Redis ([`redis_url`]), and the `redis://` URL through it.
pub async fn redis_proxy() -> (Proxy, String) {
    let upstream = redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_string();
    let p = Proxy::to(&upstream).await.expect("bind a proxy");
    let url = format!("redis://{}", p.addr);
    (p, url)
}
