//! `normandy-node`: one cluster node with a demo catalog, or a small client of a node.
//!
//! ```text
//! normandy-node [serve] --name a --bind 127.0.0.1:0 (--redis-url URL | --postgres-url URL) \
//!     (--secret-file FILE | --secret S) [--prefix P] [--postgres-url URL [--postgres-schema S]] [--no-reaper] \
//!     [--lease-ttl-ms 1500] [--rpc-timeout-ms 660000] [--peer-keepalive-ms 5000]
//!     [--wait-replicas N [--wait-timeout-ms 1000] | --accept-commit-loss-on-failover]
//!     [--model-latency-ms 0] [--tool-latency-ms 0] [--tool-log FILE] [--idle-timeout-ms N]
//!     [--worker-threads N] [TLS]
//! normandy-node local --name w1 (--lmdb-dir DIR | --postgres-url URL [--postgres-schema S]) \
//!     [--tool-log FILE] [--model-latency-ms 0] [--tool-latency-ms 0]
//! normandy-node client --to ADDR (--secret-file FILE | --secret S) [TLS] health | start TEMPLATE [ID] | send ID TEXT | history ID
//!
//! TLS: --tls-cert PEM --tls-key PEM --tls-ca PEM [--tls-server-name normandy-node]
//!      [--no-tls-client-cert]
//! ```
//! With `--postgres-url` and no `--redis-url` the node runs on Postgres alone (tier 2p: store,
//! registry and membership in `--postgres-schema`; add `--postgres-transaction-pooler` behind
//! PgBouncer in transaction mode, `--postgres-connections N` for the store's pool, default 16).
//! Every flag also reads `NORMANDY_<FLAG>` from the environment (`--redis-url` ←
//! `NORMANDY_REDIS_URL`). Once the RPC server listens, the node prints
//! `LISTENING <advertised addr> <node> <bound addr>`
//! on stdout; readiness is the `health` RPC.
//!
//! `local` serves one process on a local registry (tiers 0d and 1), driven by JSON lines on
//! stdin: the fault harness's worker (see `local.rs`).
//!
//! Every node serves the demo catalog (`demo.rs`): templates `echo`, `demo` (lazy) and
//! `demo-eager`, whose scripted model echoes, or calls the non-idempotent `count` tool (an input
//! starting with `tool`) or the idempotent `lookup` tool (`idem`); `count` counts its runs per
//! call id in Redis (`<prefix>:toolruns:<session>:<call id>`; on Postgres alone, in the table
//! `normandy_demo_toolruns`), and `--tool-log FILE` appends one JSON line per tool execution.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use normandy_cluster::{Cluster, ClusterConfig, ClusterTls, NodeClient};
use normandy_core::{ContentBlock, InputId, SessionId, TemplateCatalog};

mod demo;
mod local;

use demo::{Counter, DemoTools, ToolLog};

/// mimalloc, not glibc's malloc: a turn served for a remote caller frees on one worker thread
/// what another allocated, and glibc's arena locks then cost the owner node about 2 futex calls
/// per turn.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Flags {
    values: HashMap<String, String>,
    switches: Vec<String>,
    positional: Vec<String>,
}

/// Flags that take no value (beside every `--no-…`).
const SWITCHES: &[&str] = &[
    "help",
    "accept-commit-loss-on-failover",
    "postgres-transaction-pooler",
];

impl Flags {
    fn parse(args: impl Iterator<Item = String>) -> anyhow::Result<Self> {
        let mut values = HashMap::new();
        let mut switches = Vec::new();
        let mut positional = Vec::new();
        let mut args = args.peekable();
        while let Some(a) = args.next() {
            if let Some(name) = a.strip_prefix("--") {
                if let Some((k, v)) = name.split_once('=') {
                    values.insert(k.to_string(), v.to_string());
                } else if SWITCHES.contains(&name) || name.starts_with("no-") {
                    switches.push(name.to_string());
                } else {
                    let v = args
                        .next()
                        .with_context(|| format!("flag --{name} needs a value"))?;
                    values.insert(name.to_string(), v);
                }
            } else {
                positional.push(a);
            }
        }
        Ok(Self {
            values,
            switches,
            positional,
        })
    }

    fn get(&self, name: &str) -> Option<String> {
        self.values.get(name).cloned().or_else(|| {
            let env = format!("NORMANDY_{}", name.to_uppercase().replace('-', "_"));
            std::env::var(env).ok()
        })
    }

    fn need(&self, name: &str) -> anyhow::Result<String> {
        self.get(name).with_context(|| {
            format!(
                "missing --{name} (or NORMANDY_{})",
                name.to_uppercase().replace('-', "_")
            )
        })
    }

    fn ms(&self, name: &str, default: u64) -> anyhow::Result<Duration> {
        Ok(Duration::from_millis(match self.get(name) {
            Some(v) => v
                .parse()
                .with_context(|| format!("--{name} must be milliseconds"))?,
            None => default,
        }))
    }

    fn switch(&self, name: &str) -> bool {
        self.switches.iter().any(|s| s == name)
    }

    /// The cluster secret: from `--secret-file` (or `NORMANDY_SECRET_FILE`), else `--secret`
    /// (or `NORMANDY_SECRET`). A file or the environment keeps it out of `/proc/<pid>/cmdline`,
    /// which every local user can read.
    fn secret(&self) -> anyhow::Result<Option<String>> {
        if let Some(path) = self.get("secret-file") {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read the cluster secret from {path}"))?;
            let secret = text.trim().to_string();
            anyhow::ensure!(!secret.is_empty(), "the secret file {path} is empty");
            return Ok(Some(secret));
        }
        Ok(self.get("secret"))
    }
}

fn main() -> anyhow::Result<()> {
    let flags = Flags::parse(std::env::args().skip(1))?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = flags.get("worker-threads") {
        rt.worker_threads(n.parse().context("--worker-threads must be a number")?);
    }
    rt.enable_all().build()?.block_on(run(flags))
}

async fn run(flags: Flags) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,normandy_cluster=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let flags = &flags;
    if flags.switch("help") {
        println!(
            "{}",
            include_str!("main.rs")
                .lines()
                .take(15)
                .map(|l| l.trim_start_matches("//! ").trim_start_matches("//!"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        return Ok(());
    }
    match flags.positional.first().map(String::as_str) {
        Some("client") => client(flags).await,
        Some("local") => local::local(flags).await,
        None | Some("serve") => serve(flags).await,
        Some(other) => bail!("unknown command {other:?} (serve | local | client)"),
    }
}

async fn serve(flags: &Flags) -> anyhow::Result<()> {
    let name = flags.get("name").unwrap_or_else(|| "node".into());
    let redis_url = flags.get("redis-url");
    let postgres_url = flags.get("postgres-url");
    if redis_url.is_none() && postgres_url.is_none() {
        bail!("missing --redis-url (tiers 2 and 2r) or --postgres-url (tier 2p, Postgres alone)");
    }
    let prefix = flags.get("prefix").unwrap_or_else(|| "normandy".into());
    let secret = flags
        .secret()?
        .context("missing the cluster secret: NORMANDY_SECRET, --secret-file FILE or --secret S")?;
    let bind = flags
        .get("bind")
        .unwrap_or_else(|| "127.0.0.1:0".into())
        .parse()
        .context("--bind must be host:port")?;
    let ttl = flags.ms("lease-ttl-ms", 1500)?;
    let model_latency = flags.ms("model-latency-ms", 0)?;
    let tool_latency = flags.ms("tool-latency-ms", 0)?;

    let counter = match &redis_url {
        Some(url) => {
            let client = redis::Client::open(url.as_str()).context("bad --redis-url")?;
            Counter::Redis(
                client
                    .get_connection_manager()
                    .await
                    .context("cannot connect to Redis for the demo tool")?,
            )
        }
        None => postgres_counter(postgres_url.as_deref().unwrap_or_default(), flags).await?,
    };
    let tools = DemoTools {
        counter,
        prefix: prefix.clone(),
        latency: tool_latency,
        log: flags
            .get("tool-log")
            .map(|p| ToolLog::open(&p))
            .transpose()?,
    };
    let catalog = demo::catalog(tools, model_latency)?;

    let config = ClusterConfig {
        rpc_timeout: flags.ms("rpc-timeout-ms", 660_000)?,
        peer_keepalive: flags.ms("peer-keepalive-ms", 5_000)?,
        ..ClusterConfig::default().with_lease_ttl(ttl)
    };
    let Some(redis_url) = redis_url else {
        let node = postgres_alone(catalog, flags, &name, bind, secret, config).await?;
        return run_until_signalled(node).await;
    };
    let mut builder = Cluster::redis(catalog, &redis_url)
        .prefix(&prefix)
        .node_name(&name)
        .bind(bind)
        .secret(secret)
        .config(config)
        .reaper(!flags.switch("no-reaper"));
    if let Some(a) = flags.get("advertise") {
        builder = builder.advertise(a);
    }
    // Tier 2r's durability: WAIT for replicas, or an explicit opt-out; without either the
    // builder refuses a Redis server that has replicas.
    if let Some(n) = flags.get("wait-replicas") {
        let replicas = n
            .parse()
            .context("--wait-replicas must be a number of replicas")?;
        builder = builder.wait(replicas, flags.ms("wait-timeout-ms", 1_000)?);
    } else if flags.switch("accept-commit-loss-on-failover") {
        builder = builder.accept_commit_loss_on_failover();
    }
    if let Some(ms) = flags.get("idle-timeout-ms") {
        builder = builder.idle_timeout(Duration::from_millis(ms.parse()?));
    }
    if let Some(url) = flags.get("postgres-url") {
        builder = builder.store(postgres_store(&url, flags.get("postgres-schema")).await?);
    }
    if let Some(tls) = tls(flags)? {
        builder = builder.tls(tls);
    }
    run_until_signalled(builder.build().await?).await
}

/// Prints the `LISTENING` line, then serves until SIGTERM or Ctrl-C and shuts down gracefully.
async fn run_until_signalled(node: Cluster) -> anyhow::Result<()> {
    println!(
        "LISTENING {} {} {}",
        node.address(),
        node.node(),
        node.local_addr()
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    node.shutdown().await;
    Ok(())
}

/// Tier 2p: store, registry and membership on Postgres alone.
#[cfg(feature = "postgres")]
async fn postgres_alone(
    catalog: TemplateCatalog,
    flags: &Flags,
    name: &str,
    bind: std::net::SocketAddr,
    secret: String,
    config: ClusterConfig,
) -> anyhow::Result<Cluster> {
    let url = flags.need("postgres-url")?;
    let mut builder = Cluster::postgres(catalog, &url)
        .migrate_on_open(true)
        .transaction_pooler(flags.switch("postgres-transaction-pooler"))
        .store_connections(
            flags
                .get("postgres-connections")
                .map(|n| n.parse())
                .transpose()
                .context("--postgres-connections must be a number")?
                .unwrap_or(16),
        )
        .node_name(name)
        .bind(bind)
        .secret(secret)
        .config(config)
        .reaper(!flags.switch("no-reaper"));
    if let Some(schema) = flags.get("postgres-schema") {
        builder = builder.schema(schema);
    }
    if let Some(a) = flags.get("advertise") {
        builder = builder.advertise(a);
    }
    if let Some(ms) = flags.get("idle-timeout-ms") {
        builder = builder.idle_timeout(Duration::from_millis(ms.parse()?));
    }
    if let Some(tls) = tls(flags)? {
        builder = builder.tls(tls);
    }
    Ok(builder.build().await?)
}

#[cfg(not(feature = "postgres"))]
async fn postgres_alone(
    _catalog: TemplateCatalog,
    _flags: &Flags,
    _name: &str,
    _bind: std::net::SocketAddr,
    _secret: String,
    _config: ClusterConfig,
) -> anyhow::Result<Cluster> {
    bail!("this build has no Postgres support (feature `postgres`)")
}

/// The demo tool's counter on Postgres alone: a table in the node's schema.
#[cfg(feature = "postgres")]
async fn postgres_counter(url: &str, flags: &Flags) -> anyhow::Result<Counter> {
    let mut options: sqlx::postgres::PgConnectOptions =
        url.parse().context("bad --postgres-url")?;
    if let Some(schema) = flags.get("postgres-schema") {
        options = options.options([("search_path", schema)]);
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .context("cannot connect to Postgres for the demo tool")?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS normandy_demo_toolruns (key text PRIMARY KEY, runs bigint NOT NULL)",
    )
    .execute(&pool)
    .await
    .context("cannot create the demo tool's table")?;
    Ok(Counter::Postgres(pool))
}

#[cfg(not(feature = "postgres"))]
async fn postgres_counter(_url: &str, _flags: &Flags) -> anyhow::Result<Counter> {
    bail!("this build has no Postgres support (feature `postgres`)")
}

#[cfg(feature = "postgres")]
pub(crate) async fn postgres_store(
    url: &str,
    schema: Option<String>,
) -> anyhow::Result<Arc<dyn normandy_core::SessionStore>> {
    use normandy_store_postgres::{PgStore, PgStoreConfig};
    let mut config = PgStoreConfig::new(url)?.migrate_on_open(true);
    if let Some(s) = schema {
        config = config.schema(s)?;
    }
    Ok(Arc::new(PgStore::connect(config).await?))
}

#[cfg(not(feature = "postgres"))]
pub(crate) async fn postgres_store(
    _url: &str,
    _schema: Option<String>,
) -> anyhow::Result<Arc<dyn normandy_core::SessionStore>> {
    bail!("this build has no Postgres store (feature `postgres`)")
}

/// The TLS settings the `--tls-*` flags give: all of cert, key and CA, or none.
fn tls(flags: &Flags) -> anyhow::Result<Option<ClusterTls>> {
    let (cert, key, ca) = (
        flags.get("tls-cert"),
        flags.get("tls-key"),
        flags.get("tls-ca"),
    );
    let (Some(cert), Some(key), Some(ca)) = (&cert, &key, &ca) else {
        if cert.is_some()
            || key.is_some()
            || ca.is_some()
            || flags.get("tls-server-name").is_some()
            || flags.switch("no-tls-client-cert")
        {
            bail!("TLS needs all of --tls-cert, --tls-key and --tls-ca");
        }
        return Ok(None);
    };
    let mut tls = ClusterTls::from_files(cert, key, ca)?
        .require_client_cert(!flags.switch("no-tls-client-cert"));
    if let Some(name) = flags.get("tls-server-name") {
        tls = tls.server_name(name);
    }
    Ok(Some(tls))
}

async fn client(flags: &Flags) -> anyhow::Result<()> {
    let to = flags.need("to")?;
    let secret = flags.secret()?;
    let c = NodeClient::connect(
        &to,
        secret.as_deref(),
        flags.ms("timeout-ms", 30_000)?,
        tls(flags)?.as_ref(),
    )?;
    let args = &flags.positional[1..];
    match args.first().map(String::as_str) {
        Some("health") => {
            let h = c.health().await?;
            println!(
                "{} serving={} live={} members={}",
                h.node,
                h.serving,
                h.live,
                h.members.len()
            );
        }
        Some("start") => {
            let template = args.get(1).context("start TEMPLATE [ID]")?;
            let id = args.get(2).map(SessionId::new).transpose()?;
            println!("{}", c.start(template, id).await?);
        }
        Some("send") => {
            let (Some(id), Some(text)) = (args.get(1), args.get(2)) else {
                bail!("send ID TEXT");
            };
            let o = c
                .send(
                    &SessionId::new(id)?,
                    InputId::generate(),
                    vec![ContentBlock::text(text.clone())],
                )
                .await?;
            println!("{}", o.text());
        }
        Some("history") => {
            let id = SessionId::new(args.get(1).context("history ID")?)?;
            for e in c.history(&id, 0, 10_000).await? {
                println!("{}", serde_json::to_string(&e)?);
            }
        }
        _ => bail!("client commands: health | start TEMPLATE [ID] | send ID TEXT | history ID"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        Flags::parse(args.iter().map(|s| s.to_string())).unwrap()
    }

    #[test]
    fn the_secret_comes_from_a_file_before_the_command_line() {
        let path = std::env::temp_dir().join(format!("normandy-secret-{}", std::process::id()));
        std::fs::write(&path, "from-the-file-secret\n").unwrap();
        let file = path.to_str().unwrap();
        let got = flags(&["--secret-file", file, "--secret", "on-the-command-line"])
            .secret()
            .unwrap();
        assert_eq!(got.as_deref(), Some("from-the-file-secret"));
        std::fs::write(&path, "  \n").unwrap();
        let err = flags(&["--secret-file", file]).secret().unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        std::fs::remove_file(&path).unwrap();
        let err = flags(&["--secret-file", "/nonexistent/normandy-secret"])
            .secret()
            .unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/normandy-secret"),
            "{err}"
        );
    }
}
