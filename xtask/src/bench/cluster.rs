//! `cargo xtask bench cluster`: failover time and the cost of a remote owner.
//!
//! - **Failover**: three `normandy-node` processes (release build) on loopback against Redis
//!   (`NORMANDY_BENCH_REDIS_URL`, else `NORMANDY_TEST_REDIS_URL`, else `redis://127.0.0.1:6379`),
//!   then the same on Postgres alone (tier 2p, `NORMANDY_BENCH_DATABASE_URL`, else
//!   `NORMANDY_TEST_DATABASE_URL`), followed by the Postgres heartbeat's WAL cost
//!   (`cluster_pg.rs`). `--failover-only` stops there.
//!   1,000 eager sessions (200 with `--quick`) are mid-turn on node A (a slow model call), then A
//!   is SIGKILLed. Printed separately: *detection* (kill → B no longer lists A) and *resume*
//!   (detection → every session live again on B or C, by their reapers, with no request).
//!   Target: the sum ≤ 3 s with the default 1.5 s lease.
//! - **Remote send**: this process runs a node itself (library API) beside node B (a process).
//!   Turns/s and p50/p99 of `send` with the owner here (local) vs with the owner on B (routed
//!   over RPC), beside the baseline: a bare unary `Echo` RPC over the same channel, codec and
//!   auth between the same two processes. The row that matters is the remote overhead
//!   (remote − local) over the echo: target ≤ 1.5×. First with one caller, the paths taking
//!   turns call by call (the latency one caller sees); then with 16 callers, the paths in
//!   alternating rounds, each with the CPU that this process, node B and Redis spent per call.
//!   A last phase, an echo that node B answers only after 2 ms, shows what waiting alone costs
//!   the two processes (a remote turn waits about that long with 16 callers).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use normandy_cluster::{Cluster, NodeClient};
use normandy_core::{
    CatalogEntry, ConfigTemplate, ContentBlock, InputId, ScriptedClient, SessionId, TemplateCatalog,
};

use super::report;

const SECRET: &str = "bench-cluster-secret";

/// How long the waiting echo waits: about what a remote turn takes with 16 callers here.
const SLOW_ECHO: Duration = Duration::from_millis(2);

pub(crate) fn run(quick: bool) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(bench(quick))
}

fn redis_url() -> String {
    std::env::var("NORMANDY_BENCH_REDIS_URL")
        .or_else(|_| std::env::var("NORMANDY_TEST_REDIS_URL"))
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Builds the node binary in release and returns its path.
fn node_binary() -> Result<std::path::PathBuf> {
    let sh = xshell::Shell::new()?;
    xshell::cmd!(sh, "cargo build --release -q -p normandy-node").run()?;
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        root.join("target").to_string_lossy().into_owned()
    });
    let path = std::path::Path::new(&target).join("release/normandy-node");
    ensure!(
        path.exists(),
        "built node binary not found at {}",
        path.display()
    );
    Ok(path)
}

/// A node process, SIGKILLed on drop.
struct Proc {
    child: Child,
    address: String,
    client: NodeClient,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a node process keeps its state.
pub(super) enum Backend {
    /// Tier 2r: Redis store, registry and membership under a key prefix.
    Redis,
    /// Tier 2p: store, registry and membership in this Postgres schema, nothing in Redis.
    Postgres {
        /// The database URL.
        url: String,
    },
}

fn spawn(bin: &std::path::Path, name: &str, prefix: &str, model_ms: u64) -> Result<Proc> {
    spawn_on(bin, name, prefix, model_ms, &Backend::Redis)
}

/// A node on `backend`: `prefix` is the Redis key prefix, or the Postgres schema.
fn spawn_on(
    bin: &std::path::Path,
    name: &str,
    prefix: &str,
    model_ms: u64,
    backend: &Backend,
) -> Result<Proc> {
    let mut cmd = Command::new(bin);
    match backend {
        Backend::Redis => cmd.args(["--redis-url", &redis_url()]),
        Backend::Postgres { url } => cmd.args(["--postgres-url", url, "--postgres-schema", prefix]),
    };
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which is
    // async-signal-safe. The kernel SIGKILLs the node if this process dies without dropping it
    // (interrupted bench), so no node outlives the bench.
    #[allow(unsafe_code)]
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd
        .args(["serve", "--name", name, "--bind", "127.0.0.1:0"])
        .args(["--prefix", prefix, "--secret", SECRET])
        .args(["--model-latency-ms", &model_ms.to_string()])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawn normandy-node")?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let line = lines.next().context("node exited before listening")??;
    let address = line
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("unexpected node output {line:?}"))?
        .to_string();
    std::thread::spawn(move || for _ in lines.by_ref() {});
    let client = NodeClient::new(&address, Some(SECRET), Duration::from_secs(60))?;
    Ok(Proc {
        child,
        address,
        client,
    })
}

async fn wait_members(c: &NodeClient, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(h) = c.health().await
            && h.serving
            && h.members.len() == n
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("nodes did not see each other in time")
}

async fn cleanup(prefix: &str) -> Result<()> {
    let client = redis::Client::open(redis_url())?;
    let mut con = client.get_multiplexed_async_connection().await?;
    for pattern in [format!("{prefix}:*"), format!("{{{prefix}:*")] {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut con)
            .await?;
        for chunk in keys.chunks(500) {
            let _: i64 = redis::cmd("DEL").arg(chunk).query_async(&mut con).await?;
        }
    }
    Ok(())
}

async fn bench(quick: bool) -> Result<()> {
    let bin = node_binary()?;
    let pg_url = super::cluster_pg::database_url();
    let only_failover = std::env::args().any(|a| a == "--failover-only");
    println!("cluster (Redis {}, lease TTL 1.5 s):", redis_url());
    failover(&bin, quick, &Backend::Redis).await?;
    println!("cluster on Postgres alone (tier 2p, lease TTL 1.5 s):");
    failover(
        &bin,
        quick,
        &Backend::Postgres {
            url: pg_url.clone(),
        },
    )
    .await?;
    super::cluster_pg::heartbeat_wal(&pg_url, quick).await?;
    if !only_failover {
        remote_send(&bin, quick).await?;
    }
    Ok(())
}

async fn failover(bin: &std::path::Path, quick: bool, backend: &Backend) -> Result<()> {
    let n = if quick { 200 } else { 1000 };
    let prefix = match backend {
        Backend::Redis => {
            let prefix = format!("bench-failover-{}", std::process::id());
            cleanup(&prefix).await?;
            prefix
        }
        Backend::Postgres { url } => super::cluster_pg::fresh_schema(url, "failover").await?,
    };
    // A slow model keeps every turn mid-flight when A dies.
    let a = spawn_on(bin, "a", &prefix, 30_000, backend)?;
    let b = spawn_on(bin, "b", &prefix, 30_000, backend)?;
    let c = spawn_on(bin, "c", &prefix, 30_000, backend)?;
    for p in [&a, &b, &c] {
        wait_members(&p.client, 3).await?;
    }
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(a.client.start("demo-eager", None).await?);
    }
    let mut sends = Vec::with_capacity(n);
    for id in &ids {
        let cl = a.client.clone();
        let id = id.clone();
        sends.push(tokio::spawn(async move {
            let _ = cl
                .send(&id, InputId::generate(), vec![ContentBlock::text("work")])
                .await;
        }));
    }
    // Every session live on A, mid-turn.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let h = a.client.health().await?;
        if h.live as usize == n {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "only {} of {n} sessions went live on A",
            h.live
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // inputs committed
    let mut a = a;
    let killed = Instant::now();
    a.child.kill()?;
    let _ = a.child.wait();
    let a_id = a.client.clone();
    drop(a_id);
    // Detection: B's member list drops A.
    let detected = loop {
        let h = b.client.health().await?;
        if h.members.len() == 2 {
            break Instant::now();
        }
        ensure!(
            killed.elapsed() < Duration::from_secs(30),
            "B never noticed A's death"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    // Resume: every session live on B or C, with no request.
    let resumed = loop {
        let lb = b.client.health().await?;
        let lc = c.client.health().await?;
        if (lb.live + lc.live) as usize >= n {
            println!(
                "  failover: {n} eager sessions mid-turn; reaped by B {} / C {}",
                lb.reaped, lc.reaped
            );
            break Instant::now();
        }
        ensure!(
            killed.elapsed() < Duration::from_secs(60),
            "only {} of {n} sessions resumed after 60 s",
            lb.live + lc.live
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let detect = detected - killed;
    let resume = resumed - detected;
    println!(
        "  {:<44} {:>10.0} ms   (lease TTL {:>5} ms, ratio {:.2})",
        "detection (SIGKILL → survivor sees Down)",
        detect.as_secs_f64() * 1e3,
        1500,
        detect.as_secs_f64() / 1.5
    );
    println!(
        "  {:<44} {:>10.0} ms   ({:.0} sessions/s)",
        "resume (Down → all live on B/C)¹",
        resume.as_secs_f64() * 1e3,
        n as f64 / resume.as_secs_f64().max(1e-9)
    );
    println!(
        "  {:<44} {:>10.0} ms   target ≤ 3000 ms",
        "failover total",
        (resumed - killed).as_secs_f64() * 1e3
    );
    println!(
        "  ¹ includes the {} ms a node must stay down before it is reaped (confirm_down)",
        750
    );
    for s in sends {
        s.abort();
    }
    drop((b, c));
    match backend {
        Backend::Redis => cleanup(&prefix).await?,
        Backend::Postgres { url } => super::cluster_pg::drop_schema(url, &prefix).await?,
    }
    Ok(())
}

async fn remote_send(bin: &std::path::Path, quick: bool) -> Result<()> {
    let prefix = format!("bench-remote-{}", std::process::id());
    cleanup(&prefix).await?;
    let b = spawn(bin, "b", &prefix, 0)?;
    let catalog = TemplateCatalog::new().with(
        ConfigTemplate::new("echo", "scripted"),
        CatalogEntry::with_client(ScriptedClient::echo()),
    )?;
    let there = Cluster::redis(catalog.clone(), &redis_url())
        .prefix(&prefix)
        .node_name("bench-peer")
        .secret(SECRET)
        .build()
        .await?;
    let here = Cluster::redis(catalog, &redis_url())
        .prefix(&prefix)
        .node_name("bench")
        .secret(SECRET)
        .build()
        .await?;
    wait_members(&b.client, 3).await?;
    let tasks = 16;
    let per_task = if quick { 100 } else { 500 };
    let mut local_ids = Vec::new();
    let mut remote_ids = Vec::new();
    let mut peer_ids = Vec::new();
    // Each path gets its own sessions, so every session's history grows alike.
    let mut direct_ids = Vec::new();
    for _ in 0..tasks {
        let id = b.client.start("echo", None).await?;
        b.client
            .send(
                &id,
                InputId::generate(),
                vec![ContentBlock::text("place on b")],
            )
            .await?;
        direct_ids.push(id);
        let id = there.start("echo").await?;
        there.send(&id, "place on the in-process peer").await?;
        peer_ids.push(id);
        let id = here.start("echo").await?;
        here.send(&id, "place here").await?;
        local_ids.push(id);
        let id = b.client.start("echo", None).await?;
        b.client
            .send(
                &id,
                InputId::generate(),
                vec![ContentBlock::text("place on b")],
            )
            .await?;
        remote_ids.push(id);
    }
    let here = Arc::new(here);
    let echo_client = here.client(&b.address)?;
    let pids = [std::process::id(), b.child.id(), redis_pid().await?];
    // Latency at concurrency 1 (what one caller sees: the overhead the target is about), then
    // throughput with every session busy (on a small machine that is CPU cost: a remote turn
    // pays a client and a server side). The throughput phases alternate in rounds so noise hits
    // every side alike, and print the CPU each process spent per call.
    for (label, ids_n) in [("latency, 1 caller", 1usize), ("throughput", tasks)] {
        let per = if ids_n == 1 { per_task * 4 } else { per_task } / 4;
        let count = (ids_n * per * 4) as f64;
        println!("  remote send, {label} ({ids_n} concurrent sessions, {count} calls each):");
        // Per path — local, remote, echo, direct, peer — every call's latency and the wall time
        // of all of them.
        let mut samples: [Vec<Duration>; 5] = Default::default();
        let mut wall = [Duration::ZERO; 5];
        if ids_n == 1 {
            // One caller: the paths take turns call by call (the first path rotating), so a
            // slow spell of this shared VM lands on every path alike, not on one phase.
            let ids = [&local_ids[0], &remote_ids[0], &direct_ids[0], &peer_ids[0]];
            samples = interleaved(&here, &echo_client, ids, per * 4).await?;
            for (w, s) in wall.iter_mut().zip(&samples) {
                *w = s.iter().sum();
            }
        } else {
            // The paths in alternating rounds, with the CPU each process spent on each path,
            // and last the echo that waits (not a latency baseline: it shows what waiting alone
            // costs the two processes).
            let mut cpu = [Cpu::default(); 6];
            for _round in 0..4 {
                for (i, c) in cpu.iter_mut().enumerate() {
                    let before = Cpu::now(pids);
                    let (s, t) = match i {
                        0 => run_sends(&here, &local_ids[..ids_n], per).await?,
                        1 => run_sends(&here, &remote_ids[..ids_n], per).await?,
                        2 => run_echo(&echo_client, ids_n, per, Duration::ZERO).await?,
                        3 => run_direct(&echo_client, &direct_ids[..ids_n], per).await?,
                        4 => run_sends(&here, &peer_ids[..ids_n], per).await?,
                        _ => run_echo(&echo_client, ids_n, per, SLOW_ECHO).await?,
                    };
                    c.add(Cpu::now(pids).since(before));
                    if let (Some(all), Some(w)) = (samples.get_mut(i), wall.get_mut(i)) {
                        all.extend(s);
                        *w += t;
                    }
                }
            }
            for (c, name) in cpu.iter().zip([
                "send, owner local",
                "send, owner remote (B)",
                "echo RPC",
                "send, client → B directly",
                "send, owner 2nd node here",
                "echo RPC, node waits 2 ms",
            ]) {
                c.print(name, count);
            }
        }
        let [mut local, mut remote, mut echo, mut direct, mut peer] = samples;
        let [t_local, t_remote, t_echo, t_direct, t_peer] = wall;
        report::throughput(
            "send, owner local (turns)",
            count / t_local.as_secs_f64(),
            "echo RPC (calls)",
            count / t_echo.as_secs_f64(),
        );
        report::throughput(
            "send, owner remote (turns)",
            count / t_remote.as_secs_f64(),
            "echo RPC (calls)",
            count / t_echo.as_secs_f64(),
        );
        report::throughput(
            "send straight to the owner (client → B)",
            count / t_direct.as_secs_f64(),
            "echo RPC (calls)",
            count / t_echo.as_secs_f64(),
        );
        report::throughput(
            "send, owner = 2nd node in this process",
            count / t_peer.as_secs_f64(),
            "echo RPC (calls)",
            count / t_echo.as_secs_f64(),
        );
        for (p, name) in [(0.5, "p50"), (0.99, "p99")] {
            let pe = report::percentile(&mut peer, p);
            let d = report::percentile(&mut direct, p);
            let l = report::percentile(&mut local, p);
            let r = report::percentile(&mut remote, p);
            let e = report::percentile(&mut echo, p);
            report::latency(
                &format!("send {name}, owner local"),
                l,
                &format!("echo RPC {name}"),
                e,
            );
            report::latency(
                &format!("send {name}, owner remote"),
                r,
                &format!("echo RPC {name}"),
                e,
            );
            report::latency(
                &format!("send {name}, owner = node in this process"),
                pe,
                &format!("echo RPC {name}"),
                e,
            );
            report::latency(
                &format!("  its overhead {name} (− local)"),
                pe.saturating_sub(l),
                &format!("echo RPC {name}"),
                e,
            );
            report::latency(
                &format!("send {name}, client → owner B directly"),
                d,
                &format!("echo RPC {name}"),
                e,
            );
            report::latency(
                &format!("routing hop {name} (via node − direct)"),
                r.saturating_sub(d),
                &format!("echo RPC {name}"),
                e,
            );
            report::latency(
                &format!("remote overhead {name} (remote − local)"),
                r.saturating_sub(l),
                &format!("echo RPC {name} (target ratio ≤ 1.5)"),
                e,
            );
        }
    }
    drop(echo_client);
    if let Ok(h) = Arc::try_unwrap(here) {
        h.shutdown().await;
    }
    there.shutdown().await;
    drop(b);
    cleanup(&prefix).await?;
    Ok(())
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Duration {
    if pid == 0 {
        return Duration::ZERO;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may hold spaces) start at the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the state field.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Duration::from_millis((ticks(11) + ticks(12)) * 10) // USER_HZ is 100 on Linux
}

/// CPU used by each process of a phase: this process, node B, the Redis server.
#[derive(Default, Clone, Copy)]
struct Cpu([Duration; 3]);

impl Cpu {
    fn now(pids: [u32; 3]) -> Self {
        Self(pids.map(cpu_time))
    }

    fn since(self, before: Self) -> Self {
        Self(std::array::from_fn(|i| {
            self.0[i].saturating_sub(before.0[i])
        }))
    }

    fn add(&mut self, other: Self) {
        for i in 0..3 {
            self.0[i] += other.0[i];
        }
    }

    fn print(&self, label: &str, calls: f64) {
        let per = |d: Duration| d.as_secs_f64() * 1e6 / calls;
        println!(
            "  CPU per call, {label:<31} here {:>6.1} µs   node B {:>6.1} µs   redis {:>6.1} µs   total {:>6.1} µs",
            per(self.0[0]),
            per(self.0[1]),
            per(self.0[2]),
            per(self.0[0] + self.0[1] + self.0[2]),
        );
    }
}

async fn redis_pid() -> Result<u32> {
    let client = redis::Client::open(redis_url())?;
    let mut con = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut con)
        .await?;
    let pid: u32 = info
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|v| v.trim().parse().ok())
        .context("redis INFO has no process_id")?;
    // A server in a container or on another host reports a pid of another namespace: measure
    // it only if that pid here is a redis-server (else its column reads 0).
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() == "redis-server" {
        Ok(pid)
    } else {
        println!("  (Redis is not a local process: its CPU column is not measured)");
        Ok(0)
    }
}

/// Runs `callers` concurrent tasks, task `i` making `per_task` calls of `call(i)` one after
/// another: the latency of every call, and the wall time of the whole. Each call's future is made
/// before its clock starts.
async fn run_calls<F, Fut>(
    callers: usize,
    per_task: usize,
    call: F,
) -> Result<(Vec<Duration>, Duration)>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..callers {
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(per_task);
            for _ in 0..per_task {
                let next = call(i);
                let t = Instant::now();
                next.await?;
                samples.push(t.elapsed());
            }
            anyhow::Ok(samples)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((all, started.elapsed()))
}

/// One caller making `rounds` calls on each path — local send, remote send, echo, send straight
/// to B, send to the second node here — one call of each path in turn, the first path rotating
/// each round. `ids`: the local, remote, direct and peer sessions. Latencies by path, in that
/// order.
async fn interleaved(
    here: &Cluster,
    echo: &NodeClient,
    ids: [&SessionId; 4],
    rounds: usize,
) -> Result<[Vec<Duration>; 5]> {
    let [local, remote, direct, peer] = ids;
    let mut samples: [Vec<Duration>; 5] = Default::default();
    for round in 0..rounds {
        for k in 0..5 {
            let path = (round + k) % 5;
            let input = InputId::generate();
            let t = Instant::now();
            match path {
                0 => {
                    here.send(local, "ping").await?;
                }
                1 => {
                    here.send(remote, "ping").await?;
                }
                2 => {
                    echo.echo(b"ping".to_vec()).await?;
                }
                3 => {
                    echo.send(direct, input, vec![ContentBlock::text("ping")])
                        .await?;
                }
                _ => {
                    here.send(peer, "ping").await?;
                }
            }
            samples[path].push(t.elapsed());
        }
    }
    Ok(samples)
}

/// `Cluster::send` from this process to each of `ids`, one caller per session.
async fn run_sends(
    here: &Arc<Cluster>,
    ids: &[SessionId],
    per_task: usize,
) -> Result<(Vec<Duration>, Duration)> {
    let (here, ids) = (here.clone(), Arc::new(ids.to_vec()));
    run_calls(ids.len(), per_task, move |i| {
        let (here, ids) = (here.clone(), ids.clone());
        async move {
            here.send(&ids[i], "ping").await?;
            Ok(())
        }
    })
    .await
}

/// A `send` RPC straight to the owner through `client`, one caller per session.
async fn run_direct(
    client: &NodeClient,
    ids: &[SessionId],
    per_task: usize,
) -> Result<(Vec<Duration>, Duration)> {
    let (client, ids) = (client.clone(), Arc::new(ids.to_vec()));
    run_calls(ids.len(), per_task, move |i| {
        let (c, ids) = (client.clone(), ids.clone());
        async move {
            c.send(
                &ids[i],
                InputId::generate(),
                vec![ContentBlock::text("ping")],
            )
            .await?;
            Ok(())
        }
    })
    .await
}

/// The bare echo RPC through `client`, from `callers` concurrent tasks.
async fn run_echo(
    client: &NodeClient,
    callers: usize,
    per_task: usize,
    delay: Duration,
) -> Result<(Vec<Duration>, Duration)> {
    let client = client.clone();
    run_calls(callers, per_task, move |_| {
        let c = client.clone();
        async move {
            c.echo_after(b"ping".to_vec(), delay).await?;
            Ok(())
        }
    })
    .await
}
