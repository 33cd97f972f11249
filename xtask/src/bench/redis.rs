//! `cargo xtask bench redis`: the Redis store and registry beside raw redis-rs commands carrying
//! the same bytes, measured in the same run against the same server.
//!
//! - Single-session commit latency (p50/p99): `RedisStore::commit` of one input entry (the fenced,
//!   idempotent Lua script) vs a raw `XADD` + `HSET` pipeline of the same blobs, both over one
//!   multiplexed connection. Server: `NORMANDY_BENCH_REDIS_URL`, else `NORMANDY_TEST_REDIS_URL`,
//!   else `redis://127.0.0.1:6379`.
//! - Throughput at 64 concurrent sessions without `WAIT`: commits/s vs the raw pipeline from 64
//!   tasks over one multiplexed connection.
//! - With `WAIT 1`: the bench starts its own `redis-server` primary and replica on free loopback
//!   ports, then measures the same two figures vs the raw pipeline + `WAIT 1` on dedicated
//!   connections.
//! - Registry: `register` and `lookup` latency vs a raw `HSET` / `HGET` of a placement.
//!
//! Latency samples of ours and of the baseline alternate one by one, and the throughput windows
//! alternate too (five of each, 2 s or 0.5 s with `--quick`; medians printed), so a noisy
//! neighbour on the machine hits both sides alike (as far as it can).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use normandy_core::codec::{self, BlobKind};
use normandy_core::{
    CommitAck, CommitBatch, ContentBlock, Entry, EntryPayload, InputId, NewSession, NodeId,
    ResumePolicy, Seq, SessionId, SessionRegistry, SessionStore, TurnState,
};
use normandy_registry_redis::{RedisRegistry, RedisRegistryConfig};
use normandy_store_redis::{RedisStore, RedisStoreConfig};
use redis::aio::MultiplexedConnection;

use super::report;

const TEXT: &str = "The quick brown fox jumps over the lazy dog while the agent thinks about it.";
const SESSIONS: usize = 64;
const ROUNDS: usize = 4;

pub(crate) fn run(quick: bool) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(bench(quick))
}

async fn bench(quick: bool) -> Result<()> {
    let url = std::env::var("NORMANDY_BENCH_REDIS_URL")
        .or_else(|_| std::env::var("NORMANDY_TEST_REDIS_URL"))
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let tag = format!("bench-{}-{}", std::process::id(), normandy_core::now_ms());
    println!("bench redis ({url}, prefix {tag}; no WAIT unless stated)");

    let per_round = if quick { 200 } else { 2000 };
    let window = Duration::from_millis(if quick { 500 } else { 2000 });

    let store = Arc::new(
        RedisStore::connect(RedisStoreConfig::new(&url)?.prefix(&tag))
            .await
            .context("connecting the store (is Redis running?)")?,
    );
    let raw = redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await?;

    let result = async {
        // --- single-session commit latency
        let (ours, base) = latency(&store, raw.clone(), &tag, per_round, None).await?;
        println!(
            "single-session commit latency (one input entry + turn state), {} samples each:",
            ours.len()
        );
        rows(ours, base, "raw XADD+HSET pipeline");

        // --- throughput, 64 sessions
        let tp = throughput(&store, |_| raw.clone(), &tag, window, None).await?;
        println!("throughput, {SESSIONS} concurrent sessions, windows of {window:?}:");
        throughput_row("RedisStore::commit", tp, "raw pipeline, 1 multiplexed conn");
        let ours = tp.0;
        if ours < 100_000.0 {
            // Each commit runs its fenced checks as Lua on the server (about 3x the server time
            // of the raw commands, by INFO commandstats), so the server saturates first.
            println!("    target >= 100,000 commits/s: NOT met here ({ours:.0}/s)");
        }

        // --- registry
        registry_latency(&url, &tag, raw.clone(), per_round).await?;
        anyhow::Ok(())
    }
    .await;
    let _ = store.purge().await;
    result?;

    // --- WAIT 1 against a replica the bench starts
    wait_part(quick, per_round / 2, window).await
}

fn rows(mut ours: Vec<Duration>, mut base: Vec<Duration>, base_label: &str) {
    report::latency(
        "RedisStore::commit p50",
        report::percentile(&mut ours, 0.50),
        &format!("{base_label} p50"),
        report::percentile(&mut base, 0.50),
    );
    report::latency(
        "RedisStore::commit p99",
        report::percentile(&mut ours, 0.99),
        &format!("{base_label} p99"),
        report::percentile(&mut base, 0.99),
    );
}

/// A batch of one input entry after `seq`, with a turn state that has work.
fn batch(seq: Seq, session: usize) -> Result<CommitBatch> {
    let input_id = InputId::new(format!("in-{session}-{}", seq + 1))?;
    let entry = Entry {
        seq: seq + 1,
        parent: (seq > 0).then_some(seq),
        at_ms: normandy_core::now_ms(),
        payload: EntryPayload::Input {
            input_id: input_id.clone(),
            content: vec![ContentBlock::text(TEXT)],
        },
    };
    Ok(CommitBatch {
        entries: vec![entry],
        state: TurnState::default(),
    })
}

/// The same bytes the store writes, as a raw pipeline: XADD of the entry blob, HSET of the
/// state blob, seq and input id.
fn raw_pipe(tag: &str, session: usize, b: &CommitBatch, wait: bool) -> Result<redis::Pipeline> {
    let entry = &b.entries[0];
    let blob = codec::encode(BlobKind::Entry, entry)?;
    let state = codec::encode(BlobKind::TurnState, &b.state)?;
    let mut pipe = redis::pipe();
    pipe.cmd("XADD")
        .arg(format!("{{{tag}:raw{session}}}:e"))
        .arg(format!("0-{}", entry.seq))
        .arg("e")
        .arg(blob)
        .ignore()
        .cmd("HSET")
        .arg(format!("{{{tag}:raw{session}}}:s"))
        .arg("ts")
        .arg(state)
        .arg("seq")
        .arg(entry.seq)
        .ignore()
        .cmd("HSET")
        .arg(format!("{{{tag}:raw{session}}}:i"))
        .arg(entry.payload.input_id().map(InputId::as_str).unwrap_or(""))
        .arg(entry.seq)
        .ignore();
    if wait {
        pipe.cmd("WAIT").arg(1).arg(1000);
    }
    Ok(pipe)
}

async fn raw_commit(
    con: &mut MultiplexedConnection,
    tag: &str,
    session: usize,
    b: &CommitBatch,
    wait: bool,
) -> Result<()> {
    let pipe = raw_pipe(tag, session, b, wait)?;
    if wait {
        let (acked,): (i64,) = pipe.query_async(con).await?;
        ensure!(acked >= 1, "raw WAIT got {acked} acks");
    } else {
        pipe.exec_async(con).await?;
    }
    Ok(())
}

async fn new_session(store: &RedisStore, name: &str) -> Result<(SessionId, u64)> {
    let id = SessionId::new(name)?;
    store
        .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
        .await?;
    let epoch = store.activate(&id, &NodeId::new("bench", 1)?).await?.epoch;
    Ok((id, epoch))
}

/// Alternating rounds of our commit and the raw pipeline on one session each.
async fn latency(
    store: &RedisStore,
    mut raw: MultiplexedConnection,
    tag: &str,
    per_round: usize,
    wait: Option<()>,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let (id, epoch) = new_session(store, "latency").await?;
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    let (mut seq, mut raw_seq) = (0u64, 0u64);
    for _ in 0..ROUNDS * per_round {
        // Alternate sample by sample, so load that comes and goes hits both sides alike.
        let b = batch(raw_seq, 0)?;
        let t = Instant::now();
        raw_commit(&mut raw, tag, 0, &b, wait.is_some()).await?;
        base.push(t.elapsed());
        raw_seq += 1;

        let b = batch(seq, 0)?;
        let t = Instant::now();
        let ack = store.commit(&id, epoch, seq, &b).await?;
        ours.push(t.elapsed());
        ensure!(
            ack == CommitAck::Applied { seq: seq + 1 },
            "unexpected ack {ack:?}"
        );
        seq += 1;
    }
    Ok((ours, base))
}

/// Windows of each side in one throughput figure: ours and the raw pipeline take turns, so load
/// that comes and goes on the machine hits both alike; the figure is the median window.
const WINDOWS: usize = 5;

/// Commits/s from 64 tasks, one session each: `WINDOWS` windows of our store alternating with
/// as many of the raw pipeline. Returns the medians (ours, raw) and the median of the windows'
/// ratios.
async fn throughput(
    store: &Arc<RedisStore>,
    raw_con: impl Fn(usize) -> MultiplexedConnection,
    tag: &str,
    window: Duration,
    wait: Option<()>,
) -> Result<(f64, f64, f64)> {
    let mut sessions = Vec::new();
    for s in 0..SESSIONS {
        let (id, epoch) = new_session(store, &format!("tp-{s}")).await?;
        sessions.push((id, epoch, 0u64));
    }
    let raw_cons: Vec<MultiplexedConnection> = (0..SESSIONS).map(raw_con).collect();
    let mut raw_seqs = vec![0u64; SESSIONS];
    let (mut ours, mut base, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..WINDOWS {
        // Ours.
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        let started = Instant::now();
        for (s, (id, epoch, seq)) in sessions.iter().cloned().enumerate() {
            let (store, stop, count) = (store.clone(), stop.clone(), count.clone());
            tasks.push(tokio::spawn(async move {
                let mut seq = seq;
                while !stop.load(Ordering::Relaxed) {
                    let b = batch(seq, s)?;
                    store.commit(&id, epoch, seq, &b).await?;
                    seq += 1;
                    count.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(seq)
            }));
        }
        tokio::time::sleep(window).await;
        stop.store(true, Ordering::Relaxed);
        for (t, session) in tasks.into_iter().zip(sessions.iter_mut()) {
            session.2 = t.await??;
        }
        let o = count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();

        // Raw.
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        let started = Instant::now();
        for s in 0..SESSIONS {
            let (stop, count) = (stop.clone(), count.clone());
            let mut con = raw_cons[s].clone();
            let tag = tag.to_string();
            let wait = wait.is_some();
            let mut seq = raw_seqs[s];
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let b = batch(seq, s)?;
                    raw_commit(&mut con, &tag, 1000 + s, &b, wait).await?;
                    seq += 1;
                    count.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(seq)
            }));
        }
        tokio::time::sleep(window).await;
        stop.store(true, Ordering::Relaxed);
        for (t, seq) in tasks.into_iter().zip(raw_seqs.iter_mut()) {
            *seq = t.await??;
        }
        let b = count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
        ours.push(o);
        base.push(b);
        ratios.push(o / b);
    }
    Ok((median(&mut ours), median(&mut base), median(&mut ratios)))
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Prints a throughput row of medians, with the median of the windows' ratios.
fn throughput_row(label: &str, (ours, base, ratio): (f64, f64, f64), base_label: &str) {
    println!(
        "  {label:<44} {ours:>12.0}/s   {base_label:<34} {base:>12.0}/s   ratio {ratio:.2} \
         (median of {WINDOWS} alternating windows each)"
    );
}

async fn registry_latency(
    url: &str,
    tag: &str,
    mut raw: MultiplexedConnection,
    per_round: usize,
) -> Result<()> {
    let registry =
        RedisRegistry::connect(RedisRegistryConfig::new(url)?.prefix(format!("{tag}:reg"))).await?;
    let node = NodeId::new("bench", 1)?;
    registry.acquire_lease(&node).await?;
    let (mut reg, mut reg_base, mut look, mut look_base) = (vec![], vec![], vec![], vec![]);
    for i in 0..ROUNDS * per_round {
        // Alternate sample by sample, as for commits.
        let key = format!("{{{tag}:rawreg:{i}}}:p");
        let t = Instant::now();
        let _: () = redis::cmd("HSET")
            .arg(&key)
            .arg("owner")
            .arg(node.to_string())
            .arg("epoch")
            .arg(1)
            .query_async(&mut raw)
            .await?;
        reg_base.push(t.elapsed());
        let t = Instant::now();
        let _: Option<String> = redis::cmd("HGET")
            .arg(&key)
            .arg("owner")
            .query_async(&mut raw)
            .await?;
        look_base.push(t.elapsed());

        let id = SessionId::new(format!("reg-{i}"))?;
        let t = Instant::now();
        registry.register(&id, &node).await?;
        reg.push(t.elapsed());
        let t = Instant::now();
        let p = registry.lookup(&id).await?;
        look.push(t.elapsed());
        ensure!(p.is_some(), "lookup after register found nothing");
    }
    println!("registry latency, {} samples each:", reg.len());
    report::latency(
        "RedisRegistry::register p50",
        report::percentile(&mut reg, 0.5),
        "raw HSET p50",
        report::percentile(&mut reg_base, 0.5),
    );
    report::latency(
        "RedisRegistry::register p99",
        report::percentile(&mut reg, 0.99),
        "raw HSET p99",
        report::percentile(&mut reg_base, 0.99),
    );
    report::latency(
        "RedisRegistry::lookup p50",
        report::percentile(&mut look, 0.5),
        "raw HGET p50",
        report::percentile(&mut look_base, 0.5),
    );
    report::latency(
        "RedisRegistry::lookup p99",
        report::percentile(&mut look, 0.99),
        "raw HGET p99",
        report::percentile(&mut look_base, 0.99),
    );
    registry.purge().await?;
    // The raw placements live under the store's tag; they go with the store's purge.
    Ok(())
}

/// A `redis-server` the bench started, killed when dropped.
struct Server {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(replica_of: Option<u16>) -> Result<Server> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no", "--dir"])
        .arg(dir.path());
        if let Some(p) = replica_of {
            cmd.args(["--replicaof", "127.0.0.1", &p.to_string()]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (is it on PATH?)")?;
        Ok(Server {
            port,
            child,
            _dir: dir,
        })
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn info(&self) -> Option<String> {
        let mut con = redis::Client::open(self.url())
            .ok()?
            .get_multiplexed_async_connection()
            .await
            .ok()?;
        redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut con)
            .await
            .ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_part(quick: bool, per_round: usize, window: Duration) -> Result<()> {
    let primary = Server::start(None)?;
    let replica = Server::start(Some(primary.port))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let linked = replica
            .info()
            .await
            .is_some_and(|i| i.contains("master_link_status:up"))
            && primary
                .info()
                .await
                .is_some_and(|i| i.contains("connected_slaves:1"));
        if linked {
            break;
        }
        if Instant::now() > deadline {
            bail!("the bench's replica never linked to its primary");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = primary.url();
    println!(
        "with WAIT 1 (own primary :{} + replica :{}, no persistence{}):",
        primary.port,
        replica.port,
        if quick { ", quick" } else { "" }
    );
    let tag = "bench-wait";
    let store = Arc::new(
        RedisStore::connect(
            RedisStoreConfig::new(&url)?
                .prefix(tag)
                .wait(1, Duration::from_secs(1))
                .wait_connections(SESSIONS),
        )
        .await?,
    );
    let client = redis::Client::open(url.as_str())?;
    // The baseline's WAIT gets a dedicated connection too, so both sides pay the same.
    let raw = client.get_multiplexed_async_connection().await?;
    let (ours, base) = latency(&store, raw, tag, per_round, Some(())).await?;
    println!(
        "  single-session commit latency, {} samples each:",
        ours.len()
    );
    rows(ours, base, "raw pipeline + WAIT 1");
    let mut raw_cons = Vec::new();
    for _ in 0..SESSIONS {
        raw_cons.push(client.get_multiplexed_async_connection().await?);
    }
    let tp = throughput(&store, |s| raw_cons[s].clone(), tag, window, Some(())).await?;
    println!("  throughput, {SESSIONS} concurrent sessions, windows of {window:?}:");
    throughput_row(
        "RedisStore::commit + WAIT 1",
        tp,
        "raw pipeline + WAIT 1, 64 conns",
    );
    drop(replica);
    drop(primary);
    Ok(())
}
