//! Tier 2p, Postgres alone: real `normandy-node` processes on loopback whose store, registry,
//! membership (and demo tool counter) all live in one Postgres schema per test — no Redis.
//! Faults by SIGKILL, SIGSTOP/SIGCONT, and a TCP proxy cutting one node's link to Postgres.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use normandy_core::{InputId, NodeId, SessionId, SessionRegistry, TurnStatus};
use normandy_registry_postgres::{PgRegistry, PgRegistryConfig};

/// A fresh schema for one test, dropped when the test passes.
struct Schema(String);

impl Schema {
    async fn new(tag: &str) -> Schema {
        let name = format!("n2p_{tag}_{}", uuid_like());
        create_schema(&name).await;
        Schema(name)
    }

    /// A registry handle on the test's schema (what a node sees).
    async fn registry(&self) -> PgRegistry {
        PgRegistry::connect(
            PgRegistryConfig::new(&postgres_url())
                .unwrap()
                .schema(&self.0)
                .unwrap()
                .max_connections(1),
        )
        .await
        .expect("registry on the test schema")
    }

    /// Every `count` tool run counter (call key → runs), from the demo tool's table.
    async fn tool_runs(&self) -> HashMap<String, i64> {
        use sqlx::Connection;
        let mut con = sqlx::PgConnection::connect(&postgres_url()).await.unwrap();
        let rows: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT key, runs FROM {}.normandy_demo_toolruns",
            self.0
        )))
        .fetch_all(&mut con)
        .await
        .unwrap();
        rows.into_iter().collect()
    }

    async fn drop(self) {
        drop_schema(&self.0).await;
    }
}

/// A unique lowercase suffix (process id and a clock), for schema names.
fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}_{:x}", std::process::id(), nanos & 0xffff_ffff_ffff)
}

async fn nodes(schema: &Schema, names: &[&str], f: impl Fn(NodeOpts) -> NodeOpts) -> Vec<Node> {
    let mut out = Vec::new();
    for n in names {
        out.push(Node::spawn(f(NodeOpts::new(n, &schema.0).postgres_alone(&schema.0))).await);
    }
    for n in &out {
        n.wait_members(names.len()).await;
    }
    out
}

async fn history_summary(n: &Node, id: &SessionId) -> Summary {
    summarize(&n.client.history(id, 0, 1000).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lazy_and_eager_sessions_survive_the_owners_sigkill_on_postgres_alone() {
    let Some(_) = common::postgres_or_skip().await else {
        return;
    };
    let schema = Schema::new("kill").await;
    const EAGER: usize = 12;
    let mut ns = nodes(&schema, &["a", "b", "c"], |o| {
        o.model_latency(600).tool_latency(300)
    })
    .await;
    let mut lazy = Vec::new();
    for i in 0..5 {
        let id = ns[0].client.start("demo", None).await.unwrap();
        ns[0].send(&id, &format!("before {i}")).await.unwrap();
        lazy.push(id);
    }
    let mut work = Vec::new();
    for i in 0..EAGER {
        let id = ns[0].client.start("demo-eager", None).await.unwrap();
        work.push((id, InputId::generate(), i));
    }
    // Every eager turn: model call (tool use) → count tool → model call → answer.
    let mut inflight = Vec::new();
    for (id, input, i) in &work {
        let c = ns[0].client.clone();
        let (id, input, text) = (id.clone(), input.clone(), format!("tool {i}"));
        inflight.push(tokio::spawn(async move {
            c.send(&id, input, vec![normandy_core::ContentBlock::text(text)])
                .await
        }));
    }
    let probe = ns[1].client.clone();
    let ids: Vec<SessionId> = work.iter().map(|w| w.0.clone()).collect();
    eventually(
        Duration::from_secs(15),
        "every eager input committed",
        || {
            let (probe, ids) = (probe.clone(), ids.clone());
            async move {
                for id in &ids {
                    let h = probe.history(id, 0, 1000).await.unwrap();
                    if summarize(&h).inputs.is_empty() {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    ns[0].kill9().await;
    for t in inflight {
        let _ = t.await; // the caller's connection died with the node
    }
    // No request for the eager ones: the reapers on b and c finish every turn.
    eventually(
        Duration::from_secs(40),
        "every eager turn finished by the survivors",
        || {
            let (probe, work) = (probe.clone(), work.clone());
            async move {
                for (id, input, _) in &work {
                    let s = summarize(&probe.history(id, 0, 1000).await.unwrap());
                    if !s.ended.contains_key(input) {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await;
    for (id, input, _) in &work {
        let s = history_summary(&ns[1], id).await;
        assert_eq!(s.inputs.get(input), Some(&1), "input appended exactly once");
        assert_eq!(s.ended.get(input), Some(&1), "turn ended exactly once");
        for (call, n) in &s.tool_results {
            assert_eq!(*n, 1, "call {call} of {id} has one recorded result");
        }
    }
    for (key, n) in schema.tool_runs().await {
        assert!(n <= 1, "non-idempotent tool call {key} ran {n} times");
    }
    let reaped: u64 = health_sum(&[&ns[1], &ns[2]], |h| h.reaped).await;
    assert!(
        reaped >= 1,
        "the survivors' reapers resumed the eager sessions"
    );
    // The lazy ones continue on the next request, wherever it lands; nothing was lost.
    for (i, id) in lazy.iter().enumerate() {
        let via = &ns[1 + i % 2];
        let out = via.send(id, &format!("after {i}")).await.unwrap();
        assert_eq!(out.text(), format!("echo: after {i}"));
        let s = history_summary(via, id).await;
        assert_eq!(s.inputs.len(), 2, "history intact: both inputs");
        assert!(s.inputs.values().all(|n| *n == 1));
        assert_eq!(s.ended.len(), 2);
    }
    let registry = schema.registry().await;
    let dead: NodeId = ns[0].node_id.parse().unwrap();
    for id in lazy.iter().chain(&ids) {
        let p = registry
            .lookup(id)
            .await
            .unwrap()
            .expect("placed on a survivor");
        assert_ne!(p.owner, dead, "{id} still resolves to the dead node");
    }
    drop(ns);
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_owner_is_fenced_after_a_survivor_takes_over_on_postgres_alone() {
    let Some(_) = common::postgres_or_skip().await else {
        return;
    };
    let schema = Schema::new("pause").await;
    let ns = nodes(&schema, &["a", "b"], |o| o.model_latency(2000)).await;
    let (a, b) = (&ns[0], &ns[1]);
    let id = a.client.start("demo", None).await.unwrap();
    a.send(&id, "warm up").await.unwrap(); // placed on a
    let (first, pending) = input_committed(a, b, &id, "slow one").await;
    a.signal(Signal::SIGSTOP);
    // Past a's lease (1.5 s, expiry on the server's clock): b takes the session over in one
    // statement (epoch bump), continues the interrupted turn, then runs the new input.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let second = InputId::generate();
    let out = b.send_with(&id, &second, "after pause").await.unwrap();
    assert_eq!(out.text(), "echo: after pause");
    let registry = schema.registry().await;
    assert_eq!(
        registry
            .lookup(&id)
            .await
            .unwrap()
            .unwrap()
            .owner
            .to_string(),
        b.node_id
    );
    let before = b.client.history(&id, 0, 1000).await.unwrap();

    a.signal(Signal::SIGCONT);
    // a's model call finishes; its commit is refused (its lease is lost, and the store fences
    // its epoch); a drops the session and rejoins under a new incarnation.
    eventually(Duration::from_secs(10), "a dropped the session", || {
        let a = a.client.clone();
        async move { matches!(a.health().await, Ok(h) if h.live == 0) }
    })
    .await;
    let _ = pending.await;
    assert!(a.client.health().await.unwrap().lease_losses >= 1);
    tokio::time::sleep(Duration::from_millis(2500)).await; // a's step would have committed by now
    let after = b.client.history(&id, 0, 1000).await.unwrap();
    assert_eq!(
        before, after,
        "the paused node wrote nothing after the takeover"
    );
    let s = summarize(&after);
    assert_eq!(s.inputs.len(), 3);
    assert!(s.inputs.values().all(|n| *n == 1));
    assert_eq!(
        s.ended.get(&first),
        Some(&1),
        "the interrupted turn ended once"
    );
    assert_eq!(s.ended.get(&second), Some(&1));
    // The session keeps working, routed to b from a as well.
    a.wait_ready().await;
    assert_eq!(a.send(&id, "again").await.unwrap().text(), "echo: again");
    assert_eq!(
        registry
            .lookup(&id)
            .await
            .unwrap()
            .unwrap()
            .owner
            .to_string(),
        b.node_id
    );
    drop(ns);
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_racing_to_place_100_sessions_on_postgres_give_each_exactly_one_owner() {
    let Some(_) = common::postgres_or_skip().await else {
        return;
    };
    let schema = Schema::new("race").await;
    let ns = nodes(&schema, &["a", "b"], |o| o).await;
    let mut ids = Vec::new();
    for _ in 0..100 {
        ids.push(ns[0].client.start("demo", None).await.unwrap());
    }
    // Both nodes send to every (unplaced) session at once: each id is placed by exactly one.
    let mut calls = Vec::new();
    for id in &ids {
        for n in &ns {
            let (c, id, name) = (n.client.clone(), id.clone(), n.name.clone());
            calls.push(tokio::spawn(async move {
                c.send(
                    &id,
                    InputId::generate(),
                    vec![normandy_core::ContentBlock::text(name)],
                )
                .await
            }));
        }
    }
    for c in calls {
        let out = c.await.unwrap().unwrap();
        assert_eq!(out.status, TurnStatus::Completed);
    }
    let registry = schema.registry().await;
    let mut owners: HashSet<NodeId> = HashSet::new();
    for id in &ids {
        let p = registry.lookup(id).await.unwrap().expect("placed");
        owners.insert(p.owner);
        let s = history_summary(&ns[0], id).await;
        assert_eq!(s.inputs.len(), 2);
        assert_eq!(s.ended.len(), 2);
    }
    let live: u64 = health_sum(&[&ns[0], &ns[1]], |h| h.live).await;
    assert_eq!(live, 100, "every session live on exactly one node");
    assert!(owners.len() <= 2);
    drop(ns);
    schema.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_from_postgres_stops_serving_and_never_reaps() {
    let Some(_) = common::postgres_or_skip().await else {
        return;
    };
    let schema = Schema::new("cut").await;
    let upstream = postgres_url()
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("127.0.0.1:5432")
        .to_string();
    let proxy = Proxy::to(&upstream).await.expect("bind a proxy");
    let through_proxy = postgres_url().replacen(&upstream, &proxy.addr, 1);
    let a = Node::spawn(NodeOpts {
        postgres_url: Some(through_proxy),
        ..NodeOpts::new("a", &schema.0)
            .postgres_alone(&schema.0)
            .model_latency(1500)
    })
    .await;
    let b = Node::spawn(
        NodeOpts::new("b", &schema.0)
            .postgres_alone(&schema.0)
            .model_latency(1500),
    )
    .await;
    a.wait_members(2).await;
    b.wait_members(2).await;
    let lazy = a.client.start("demo", None).await.unwrap();
    a.send(&lazy, "on a").await.unwrap();
    let eager = a.client.start("demo-eager", None).await.unwrap();
    let (input, pending) = input_committed(&a, &b, &eager, "tool cut").await;

    proxy.blackhole(true);
    let cut = tokio::time::Instant::now();
    // a notices before its lease can lapse (TTL 1.5 s) and says so on its health probe.
    eventually(
        Duration::from_millis(1500),
        "a stops serving before its lease lapses",
        || {
            let a = a.client.clone();
            async move { matches!(a.health().await, Ok(h) if !h.serving) }
        },
    )
    .await;
    assert!(cut.elapsed() < Duration::from_millis(1500));
    // b takes the eager session over without a request and finishes its turn.
    eventually(Duration::from_secs(25), "b finishes the eager turn", || {
        let (b, eager, input) = (b.client.clone(), eager.clone(), input.clone());
        async move {
            summarize(&b.history(&eager, 0, 100).await.unwrap())
                .ended
                .contains_key(&input)
        }
    })
    .await;
    // The lazy one moves on the next request.
    assert_eq!(b.send(&lazy, "on b").await.unwrap().text(), "echo: on b");
    let h = a.client.health().await.unwrap();
    assert_eq!(h.reaped, 0, "a never reaps while its own refresh fails");
    assert!(!h.serving);

    proxy.blackhole(false);
    a.wait_ready().await;
    assert!(a.client.health().await.unwrap().lease_losses >= 1);
    let _ = pending.await;
    tokio::time::sleep(Duration::from_secs(3)).await; // whatever a still had in flight lands (fenced)
    for id in [&lazy, &eager] {
        let s = history_summary(&b, id).await;
        assert!(s.inputs.values().all(|n| *n == 1), "each input once: {s:?}");
        assert!(
            s.ended.values().all(|n| *n == 1),
            "each turn ended once: {s:?}"
        );
        assert_eq!(s.inputs.len(), s.ended.len());
    }
    for (key, n) in schema.tool_runs().await {
        assert!(n <= 1, "tool call {key} ran {n} times");
    }
    // Healed, a routes to b.
    assert_eq!(
        a.send(&lazy, "from a").await.unwrap().text(),
        "echo: from a"
    );
    drop((a, b, proxy));
    schema.drop().await;
}
