//! One fault run: the servers, the processes with a proxy on each link, the workload and the
//! nemesis side by side, a settle phase once every fault is healed, the final log read
//! straight from the store, the run's files, and the checker's verdict.

mod backend;
mod nemesis;
mod procs;
mod workload;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

pub use backend::Tier;
use backend::{FinalStore, RedisPair, create_schema, host_port};
use nemesis::{NemesisLog, World, schedule};
pub use procs::die_with_parent;
use procs::{Link, Proc, ProcKind, SECRET};
use workload::History;

use crate::history::Files;
use crate::proxy::Proxy;
use crate::{Report, check};

/// A run's settings.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The deployment.
    pub tier: Tier,
    /// Faults to inject.
    pub faults: usize,
    /// Seed of the fault schedule and of the clients' choices.
    pub seed: u64,
    /// Where the files go.
    pub out: PathBuf,
    /// Concurrent clients.
    pub clients: usize,
    /// Sessions (half lazy, half eager).
    pub sessions: usize,
    /// The `normandy-node` binary.
    pub node_bin: PathBuf,
    /// Postgres for tiers 1, 2 and 2p.
    pub postgres_url: String,
    /// Redis for tier 2's registry.
    pub redis_url: String,
    /// Tier 2r: WAIT for one replica (the durable rung); `false` accepts commit loss.
    pub wait: bool,
    /// Print a progress line.
    pub progress: bool,
}

/// What a run found.
#[derive(Debug)]
pub struct RunSummary {
    /// The checker's report.
    pub report: Report,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, usize>,
    /// Faults that could not be injected or healed.
    pub fault_errors: Vec<String>,
    /// Postgres backends terminated.
    pub terminated: u64,
    /// Sessions that took no input once every fault was healed, with the last error.
    pub unsettled: Vec<(String, String)>,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl RunSummary {
    /// The promise held and every session took input at the end.
    pub fn passed(&self) -> bool {
        self.report.is_valid() && self.unsettled.is_empty()
    }

    /// The table the run prints and writes to `summary.txt`.
    pub fn table(&self, config: &RunConfig) -> String {
        let mut t = String::new();
        let r = &self.report;
        let faults: usize = self.faults.values().sum();
        t += &format!(
            "tier {}  seed {}  faults {}  clients {}  sessions {}  {:.0} s\n",
            config.tier.name(),
            config.seed,
            faults,
            config.clients,
            config.sessions,
            self.elapsed.as_secs_f64()
        );
        let by_kind: Vec<String> = self
            .faults
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        t += &format!("faults by kind    {}\n", by_kind.join(", "));
        if self.terminated > 0 {
            t += &format!("pg backends killed {}\n", self.terminated);
        }
        t += &format!(
            "operations       {} invoked: ok {}, fail {}, info {} (of their inputs: \
             acknowledged on a resend {}, stored {}, never stored {})\n",
            r.invoked,
            r.ok,
            r.failed,
            r.info,
            r.info_resolved.len(),
            r.info_stored.len(),
            r.info_absent.len()
        );
        t += &format!(
            "tool results     {} (in doubt {}); executions without a result {}\n",
            r.tool_results, r.tool_in_doubt, r.executed_without_result
        );
        if r.violations.is_empty() {
            t += "violations       none\n";
        } else {
            for (kind, n) in r.by_kind() {
                t += &format!("violations       {kind:?} {n}\n");
            }
            for v in r.violations.iter().take(20) {
                t += &format!("  {:?} in {}: {}\n", v.kind, v.session, v.detail);
            }
        }
        t += &format!(
            "after healing    {} of {} sessions took input\n",
            config.sessions - self.unsettled.len(),
            config.sessions
        );
        for (s, e) in &self.unsettled {
            t += &format!("  {s} did not: {e}\n");
        }
        for e in &self.fault_errors {
            t += &format!("fault error      {e}\n");
        }
        t
    }
}

/// The lease of the run's nodes (a pause outlasts it).
const LEASE: Duration = Duration::from_millis(1500);

/// Runs one fault run and writes its files into `config.out`.
pub async fn run(config: &RunConfig) -> anyhow::Result<RunSummary> {
    let started = Instant::now();
    std::fs::create_dir_all(&config.out)
        .with_context(|| format!("cannot create {}", config.out.display()))?;
    // Absolute: redis-server opens its log file after changing into its `--dir`, and the
    // processes are handed paths they must resolve the same way.
    let out = &config
        .out
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", config.out.display()))?;
    // A run starts from nothing: what an earlier run left in `out` is removed (its store, its
    // Redis files, its logs and files).
    for dir in ["lmdb", "redis", "logs"] {
        let _ = std::fs::remove_dir_all(out.join(dir));
    }
    for file in ["history", "final", "tools", "events", "info"] {
        let _ = std::fs::remove_file(out.join(format!("{file}.jsonl")));
    }
    let _ = std::fs::remove_file(out.join("summary.txt"));
    std::fs::create_dir_all(out.join("logs"))
        .with_context(|| format!("cannot create {}", out.display()))?;
    let tool_log = out.join("tools.jsonl");
    std::fs::write(&tool_log, "")?;
    let tag = format!(
        "chaos_{}_{}",
        config.tier.name(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );

    // The servers.
    let pg = if config.tier.uses_postgres() {
        Some(create_schema(&config.postgres_url, &tag).await?)
    } else {
        None
    };
    let redis = if config.tier == Tier::RedisStore {
        Some(RedisPair::start(&out.join("redis")).await?)
    } else {
        None
    };
    let redis_upstream = match &redis {
        Some(pair) => Some(pair.primary_addr()),
        None if config.tier.uses_redis() => Some(host_port(&config.redis_url)?),
        None => None,
    };
    let pg_upstream = host_port(&config.postgres_url)?;

    // The processes, each with a proxy on every link.
    // LMDB is one process per environment: tier 0d is one worker, killed and restarted.
    let count = match config.tier {
        Tier::Lmdb => 1,
        Tier::Postgres => 2,
        _ => 3,
    };
    let mut procs = Vec::new();
    for i in 0..count {
        let name = format!(
            "{}{}",
            if config.tier.is_cluster() { "n" } else { "w" },
            i + 1
        );
        let mut links = Vec::new();
        let mut args: Vec<String> = vec![
            "--name".into(),
            name.clone(),
            "--tool-log".into(),
            tool_log.display().to_string(),
            "--model-latency-ms".into(),
            "5".into(),
            "--tool-latency-ms".into(),
            "5".into(),
        ];
        let mut arg = |k: &str, v: String| {
            args.push(k.into());
            args.push(v);
        };
        if config.tier.uses_postgres() {
            let proxy = Proxy::to(&pg_upstream).await?;
            let url = config.postgres_url.replacen(&pg_upstream, &proxy.addr, 1);
            let url = if url == config.postgres_url {
                format!("postgres://postgres@{}/test", proxy.addr)
            } else {
                url
            };
            arg("--postgres-url", url);
            arg("--postgres-schema", tag.clone());
            links.push((Link::Postgres, proxy));
        }
        if let Some(upstream) = &redis_upstream {
            let proxy = Proxy::to(upstream).await?;
            arg("--redis-url", format!("redis://{}", proxy.addr));
            links.push((Link::Redis, proxy));
        }
        let kind = if config.tier.is_cluster() {
            let peer = Proxy::pending().await?;
            arg("--advertise", peer.addr.clone());
            arg("--bind", "127.0.0.1:0".into());
            arg("--secret", SECRET.into());
            arg("--prefix", tag.clone());
            arg("--lease-ttl-ms", LEASE.as_millis().to_string());
            arg("--rpc-timeout-ms", "8000".into());
            arg("--peer-keepalive-ms", "1000".into());
            if config.tier == Tier::PostgresAlone {
                arg("--postgres-connections", "6".into());
            }
            if config.tier == Tier::RedisStore {
                if config.wait {
                    arg("--wait-replicas", "1".into());
                    arg("--wait-timeout-ms", "1000".into());
                } else {
                    args.push("--accept-commit-loss-on-failover".into());
                }
            }
            links.push((Link::Peer, peer));
            ProcKind::Node
        } else {
            if config.tier == Tier::Lmdb {
                arg("--lmdb-dir", out.join("lmdb").display().to_string());
            }
            ProcKind::Local
        };
        procs.push(Proc::new(
            &name,
            kind,
            &config.node_bin,
            args,
            &out.join("logs"),
            links,
        ));
    }
    for p in &mut procs {
        p.start().await?;
    }
    let slots: Arc<Vec<_>> = Arc::new(procs.iter().map(|p| p.slot.clone()).collect());

    // The sessions: half lazy, half eager.
    let sessions: Arc<Vec<String>> =
        Arc::new((1..=config.sessions).map(|i| format!("s{i}")).collect());
    let first = slots[0].conn().context("the first process is not up")?;
    for (i, s) in sessions.iter().enumerate() {
        let template = if i % 2 == 0 { "demo" } else { "demo-eager" };
        first
            .start(s, template)
            .await
            .map_err(|(k, m)| anyhow::anyhow!("cannot start session {s}: {k}: {m}"))?;
    }

    // Workload and nemesis, side by side.
    let history = History::new();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..config.clients as u64)
        .map(|i| {
            tokio::spawn(workload::client(
                i,
                config.clients as u64,
                config.seed,
                sessions.clone(),
                slots.clone(),
                history.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let events = workload::Events::default();
    let stop_subscribers = Arc::new(AtomicBool::new(false));
    let subscribers: Vec<_> = sessions
        .iter()
        .enumerate()
        .map(|(i, s)| {
            tokio::spawn(workload::subscriber(
                i as u64 + 1,
                config.seed,
                s.clone(),
                slots.clone(),
                events.clone(),
                stop_subscribers.clone(),
            ))
        })
        .collect();
    let plan = schedule(config.tier, procs.len(), config.faults, config.seed, LEASE);
    let mut world = World {
        procs,
        redis,
        pg: pg.clone(),
    };
    let mut log = NemesisLog::default();
    for (i, fault) in plan.iter().enumerate() {
        tokio::time::sleep(fault.gap).await;
        world.inject(fault, &mut log).await;
        if config.progress {
            progress(i + 1, plan.len(), &history, started);
        }
    }
    if config.progress && std::io::stderr().is_terminal() {
        eprintln!();
    }
    if let Err(e) = world.heal().await {
        log.errors.push(format!("healing at the end: {e:#}"));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }

    // Every session must take input again; then the final log, from the store.
    let unsettled = workload::settle(
        &sessions,
        &slots,
        &history,
        1_000_000,
        Duration::from_secs(120),
    )
    .await;
    stop_subscribers.store(true, Ordering::Relaxed);
    for s in subscribers {
        let _ = s.await;
    }
    for p in &mut world.procs {
        p.stop().await;
    }
    let final_store = match config.tier {
        Tier::Lmdb => FinalStore::Lmdb(out.join("lmdb")),
        Tier::RedisStore => FinalStore::Redis {
            url: format!(
                "redis://{}",
                world
                    .redis
                    .as_ref()
                    .map(RedisPair::primary_addr)
                    .unwrap_or_default()
            ),
            prefix: format!("{tag}:store"),
        },
        _ => FinalStore::Postgres {
            url: config.postgres_url.clone(),
            schema: tag.clone(),
        },
    };
    let stored = final_store.read(&sessions).await;

    // Leave the servers as they were, whether the final log could be read or not.
    if let Some(r) = &mut world.redis {
        r.shutdown().await;
    }
    if let Some(pool) = &pg {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {tag} CASCADE"
        )))
        .execute(pool)
        .await;
    }
    if config.tier == Tier::RedisPostgres {
        drop_keys(&config.redis_url, &tag).await;
    }

    let files = Files {
        history: history.ops(),
        stored: stored?,
        tools: crate::history::read_lines(&tool_log)?,
        events: std::mem::take(&mut *events.lock().unwrap_or_else(|p| p.into_inner())),
    };
    files.write(out)?;
    let report = check(&files);
    write_info(out, &report)?;
    let summary = RunSummary {
        report,
        faults: log.by_kind,
        fault_errors: log.errors,
        terminated: log.terminated,
        unsettled: unsettled
            .into_iter()
            .map(|(s, (k, m))| (s, format!("{k}: {m}")))
            .collect(),
        elapsed: started.elapsed(),
    };
    std::fs::write(out.join("summary.txt"), summary.table(config))?;
    Ok(summary)
}

/// The progress line: redrawn on a terminal, else one line per tenth of the run (CI logs).
fn progress(done: usize, total: usize, history: &History, started: Instant) {
    let terminal = std::io::stderr().is_terminal();
    if !terminal && !done.is_multiple_of(total.div_ceil(10)) && done != total {
        return;
    }
    let c = |i: usize| history.counts[i].load(Ordering::Relaxed);
    eprint!(
        "{}  faults {done}/{total}  ops {}: ok {} fail {} info {}  {:.0} s{}",
        if terminal { "\r" } else { "" },
        c(0),
        c(1),
        c(2),
        c(3),
        started.elapsed().as_secs_f64(),
        if terminal { "   " } else { "\n" }
    );
    let _ = std::io::stderr().flush();
}

/// `info.jsonl`: what became of each input whose send had an unknown outcome,
/// `{"input_id": "c2-41", "stored_seq": 7}` (`null`: never stored).
fn write_info(out: &std::path::Path, report: &Report) -> anyhow::Result<()> {
    let mut text = String::new();
    let stored = report
        .info_stored
        .iter()
        .map(|(id, s)| (id, Some(*s), false));
    let absent = report.info_absent.iter().map(|id| (id, None, false));
    let resolved = report.info_resolved.iter().map(|id| (id, None, true));
    for (id, seq, resolved) in stored.chain(absent).chain(resolved) {
        let line = if resolved {
            serde_json::json!({"input_id": id, "acknowledged_on_resend": true})
        } else {
            serde_json::json!({"input_id": id, "stored_seq": seq})
        };
        text += &line.to_string();
        text.push('\n');
    }
    std::fs::write(out.join("info.jsonl"), text)?;
    Ok(())
}

/// Deletes the run's keys from the shared Redis (best effort).
async fn drop_keys(url: &str, tag: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut con) = client.get_multiplexed_async_connection().await else {
        return;
    };
    for pattern in [format!("{tag}:*"), format!("{{{tag}:*")] {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut con)
            .await
            .unwrap_or_default();
        for chunk in keys.chunks(500) {
            let _: Result<i64, _> = redis::cmd("DEL").arg(chunk).query_async(&mut con).await;
        }
    }
}
