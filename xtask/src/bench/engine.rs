//! `cargo xtask bench engine`: turns per second through the turn engine (zero-latency scripted
//! model, in-memory store) at 1, 100 and 10,000 concurrent sessions, beside a bare tokio actor
//! doing the same number of mpsc + oneshot round trips; memory per live idle session beside a
//! bare actor's; and a million passivated sessions holding no task.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use normandy_core::{
    CatalogEntry, ConfigTemplate, InMemoryStore, Input, ScriptedClient, SessionId, Sessions,
    StartOptions, TemplateCatalog,
};
use tokio::sync::{mpsc, oneshot};

use super::report;
use crate::alloc::{allocated, set_counting};

pub(crate) fn run(quick: bool) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        println!("bench engine (2 worker threads, in-memory store, zero-latency scripted model)");
        // Memory first, while nothing else allocates or frees: a figure is the change in bytes
        // held across the window, so another phase's teardown would pollute it.
        println!("memory per live idle session (history excluded), ours vs a bare actor:");
        let n = 10_000;
        let base = bare_actor_bytes(n).await;
        let ours = live_session_bytes(n).await?;
        println!(
            "  {:<44} {ours:>10.0} B    {:<34} {base:>10.0} B    ratio {:.2}",
            format!("live idle session ({n} live)"),
            "bare actor (mpsc + task)",
            ours / base
        );
        println!("turns/s, ours vs a bare actor doing the same mpsc+oneshot round trips:");
        let scale = if quick { 10 } else { 1 };
        for (sessions, turns) in [(1, 50_000), (100, 500_000), (10_000, 500_000)] {
            let turns = turns / scale;
            let base = bare_actor_round_trips(sessions, turns).await;
            let ours = engine_turns(sessions, turns).await?;
            report::throughput(
                &format!("engine turns, {sessions} sessions"),
                ours,
                "bare actor round trips",
                base,
            );
        }
        let passivated = if quick { 100_000 } else { 1_000_000 };
        passivated_sessions_hold_no_task(passivated).await?;
        Ok(())
    })
}

fn catalog() -> Result<TemplateCatalog> {
    Ok(TemplateCatalog::new().with(
        ConfigTemplate::new("bench", "scripted"),
        CatalogEntry::with_client(ScriptedClient::echo()),
    )?)
}

async fn engine_turns(sessions: usize, turns: usize) -> Result<f64> {
    let runtime = Sessions::builder(catalog()?)
        .store(Arc::new(InMemoryStore::new()))
        .build()?;
    let mut ids = Vec::with_capacity(sessions);
    for i in 0..sessions {
        let id = runtime
            .start_with(
                "bench",
                StartOptions {
                    id: Some(SessionId::new(format!("bench-{i}"))?),
                    ..Default::default()
                },
            )
            .await?;
        // Activate first so the figure measures turns, not first activations.
        runtime.resume(&id).await?;
        ids.push(id);
    }
    let per = turns / sessions;
    let started = Instant::now();
    let tasks: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let runtime = runtime.clone();
            tokio::spawn(async move {
                for _ in 0..per {
                    runtime.send(&id, Input::text("hi")).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed();
    runtime.shutdown().await;
    Ok((per * sessions) as f64 / elapsed.as_secs_f64())
}

enum Req {
    Turn(Box<str>, oneshot::Sender<usize>),
}

fn spawn_bare_actor() -> mpsc::Sender<Req> {
    let (tx, mut rx) = mpsc::channel::<Req>(64);
    tokio::spawn(async move {
        let mut count = 0usize;
        while let Some(Req::Turn(text, reply)) = rx.recv().await {
            count += text.len();
            let _ = reply.send(count);
        }
    });
    tx
}

async fn bare_actor_round_trips(sessions: usize, turns: usize) -> f64 {
    let actors: Vec<_> = (0..sessions).map(|_| spawn_bare_actor()).collect();
    let per = turns / sessions;
    let started = Instant::now();
    let tasks: Vec<_> = actors
        .into_iter()
        .map(|tx| {
            tokio::spawn(async move {
                for _ in 0..per {
                    let (reply, rx) = oneshot::channel();
                    let _ = tx.send(Req::Turn("hi".into(), reply)).await;
                    let _ = rx.await;
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    (per * sessions) as f64 / started.elapsed().as_secs_f64()
}

async fn settle() {
    // Let spawned tasks reach their first await and freed memory be returned.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
}

async fn bare_actor_bytes(n: usize) -> f64 {
    settle().await;
    set_counting(true);
    let before = allocated();
    let actors: Vec<_> = (0..n).map(|_| spawn_bare_actor()).collect();
    settle().await;
    let after = allocated();
    set_counting(false);
    drop(actors);
    (after - before) as f64 / n as f64
}

async fn live_session_bytes(n: usize) -> Result<f64> {
    let runtime = Sessions::builder(catalog()?)
        .store(Arc::new(InMemoryStore::new()))
        .build()?;
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(
            runtime
                .start_with(
                    "bench",
                    StartOptions {
                        id: Some(SessionId::new(format!("mem-{i}"))?),
                        ..Default::default()
                    },
                )
                .await?,
        );
    }
    settle().await;
    set_counting(true);
    let before = allocated();
    for id in &ids {
        runtime.resume(id).await?;
    }
    settle().await;
    let after = allocated();
    set_counting(false);
    ensure!(runtime.live_count() == n, "not all sessions live");
    runtime.shutdown().await;
    Ok((after - before) as f64 / n as f64)
}

async fn passivated_sessions_hold_no_task(n: usize) -> Result<()> {
    let runtime = Sessions::builder(catalog()?)
        .store(Arc::new(InMemoryStore::new()))
        .idle_timeout(Duration::from_millis(200))
        .build()?;
    let started = Instant::now();
    // Each session runs one turn, then passivates; at most 10,000 run at once.
    let workers = 10_000.min(n);
    let per = n / workers;
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let runtime = runtime.clone();
            tokio::spawn(async move {
                for i in 0..per {
                    let id = runtime
                        .start_with(
                            "bench",
                            StartOptions {
                                id: Some(SessionId::new(format!("p-{w}-{i}"))?),
                                ..Default::default()
                            },
                        )
                        .await?;
                    runtime.send(&id, "hi").await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let ran = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60);
    while runtime.live_count() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    settle().await;
    let metrics = tokio::runtime::Handle::current().metrics();
    let tasks = metrics.num_alive_tasks();
    println!(
        "passivated sessions: {} sessions ran a turn each in {:.1} s, then passivated: \
         live actors {}, tokio tasks alive {} (target: no task per passivated session)",
        workers * per,
        ran.as_secs_f64(),
        runtime.live_count(),
        tasks
    );
    ensure!(
        runtime.live_count() == 0,
        "sessions still live after idle timeout"
    );
    ensure!(tasks < 10, "passivated sessions still hold tasks: {tasks}");
    Ok(())
}
