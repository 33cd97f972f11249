//! Faults on the RPC link between two nodes: real `normandy-node` processes against a real Redis
//! (found as in `cluster.rs`: `NORMANDY_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`), node b
//! advertising a [`Proxy`] in front of its RPC server, so every other node reaches it only through
//! that link — which is then delayed, reset or blackholed. The test's own clients talk to each
//! node directly, and every node's link to Redis is sound.

mod common;

use std::time::Duration;

use common::*;
use normandy_chaos::proxy::Fault;
use normandy_core::{
    ContentBlock, EntryPayload, ErrorKind, InputId, SessionId, SessionRegistry, TurnOutcome,
};
use normandy_registry_redis::{RedisRegistry, RedisRegistryConfig};
use tokio::time::Instant;

/// Node a, and node b whose RPC server the other nodes reach only through the returned proxy.
async fn a_and_b_behind_link(
    prefix: &str,
    a_opts: impl FnOnce(NodeOpts) -> NodeOpts,
    b_opts: impl FnOnce(NodeOpts) -> NodeOpts,
) -> (Node, Node, Proxy) {
    // The proxy listens first, so b can advertise it; it learns b's port once b has bound one
    // (no port is probed and released, so nothing else can take it meanwhile).
    let link = Proxy::pending().await.expect("bind a proxy");
    let a = Node::spawn(a_opts(NodeOpts::new("a", prefix))).await;
    let b = Node::spawn(b_opts(NodeOpts::new("b", prefix).advertising(&link.addr))).await;
    link.point_at(&b.address);
    assert_eq!(b.advertised, link.addr);
    assert_ne!(b.address, link.addr);
    a.wait_members(2).await;
    b.wait_members(2).await;
    (a, b, link)
}

/// A `demo` session placed on `n` (its first input sent there directly).
async fn session_on(prefix: &str, n: &Node) -> SessionId {
    let id = n.client.start("demo", None).await.unwrap();
    n.send(&id, &format!("placed on {}", n.name)).await.unwrap();
    let reg = RedisRegistry::connect(
        RedisRegistryConfig::new(&redis_url())
            .unwrap()
            .prefix(format!("{prefix}:registry"))
            .lease_ttl(Duration::from_millis(1500)),
    )
    .await
    .unwrap();
    let owner = reg.lookup(&id).await.unwrap().expect("placed").owner;
    assert_eq!(owner.to_string(), n.node_id, "{id} placed on {}", n.name);
    id
}

async fn summary(n: &Node, id: &SessionId) -> Summary {
    summarize(&n.client.history(id, 0, 1000).await.unwrap())
}

async fn send_from(
    n: &Node,
    id: &SessionId,
    input: &InputId,
    text: &str,
) -> tokio::task::JoinHandle<normandy_core::Result<TurnOutcome>> {
    let (c, id, input) = (n.client.clone(), id.clone(), input.clone());
    let content = vec![ContentBlock::text(text)];
    tokio::spawn(async move { c.send(&id, input, content).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sends_over_a_slow_link_arrive_once_with_history_intact() {
    let Some(_) = common::redis_or_skip().await else {
        return;
    };
    const DELAY: Duration = Duration::from_millis(40);
    let prefix = unique_prefix("slow");
    let (a, b, link) = a_and_b_behind_link(&prefix, |o| o, |o| o).await;
    link.set(Fault::Delay(DELAY));
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(session_on(&prefix, &b).await);
    }
    // Four inputs per session from a at once (queued behind each other on b), one a tool call.
    let mut calls = Vec::new();
    for id in &ids {
        for k in 0..4 {
            let input = InputId::generate();
            let text = if k == 2 {
                format!("tool slow {k}")
            } else {
                format!("slow {k}")
            };
            let (c, id, t) = (a.client.clone(), id.clone(), text.clone());
            let i = input.clone();
            calls.push((
                id.clone(),
                input,
                text,
                tokio::spawn(async move {
                    let started = Instant::now();
                    let out = c.send(&id, i, vec![ContentBlock::text(t)]).await;
                    (out, started.elapsed())
                }),
            ));
        }
    }
    for (id, input, text, call) in calls {
        let (out, took) = call.await.unwrap();
        let out = out.unwrap_or_else(|e| panic!("send {input} to {id} over the slow link: {e}"));
        let want = if text.starts_with("tool") {
            "done: run 1".to_string()
        } else {
            format!("echo: {text}")
        };
        assert_eq!(out.text(), want);
        assert!(
            took >= DELAY * 2,
            "a reached b through the delayed link (one round trip ≥ {:?}), took {took:?}",
            DELAY * 2
        );
    }
    assert!(link.accepted() >= 1, "a's calls went through the proxy");
    for id in &ids {
        let s = summary(&b, id).await;
        assert_eq!(s.inputs.len(), 5, "placement + 4 inputs: {s:?}");
        assert!(s.inputs.values().all(|n| *n == 1), "each input once: {s:?}");
        assert_eq!(s.ended.len(), 5);
        assert!(s.ended.values().all(|n| *n == 1), "each turn ended once");
        assert_eq!(s.tool_results.len(), 1);
        assert!(s.tool_results.values().all(|n| *n == 1));
    }
    let runs = tool_runs(&prefix).await;
    assert_eq!(runs.len(), 3, "one tool call per session: {runs:?}");
    assert!(runs.values().all(|n| *n == 1), "each ran once: {runs:?}");
    drop((a, b, link));
    cleanup(&prefix).await;
}

/// Where the turn of `input` stands, from the committed entries after its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Input committed, first model call running.
    Model,
    /// The non-idempotent tool started, no result yet.
    Tool,
    /// Tool result recorded, second model call running.
    Answer,
}

async fn phase_of(b: &Node, id: &SessionId, input: &InputId) -> Option<Phase> {
    let entries = b.client.history(id, 0, 1000).await.ok()?;
    let start = entries.iter().position(
        |e| matches!(&e.payload, EntryPayload::Input { input_id, .. } if input_id == input),
    )?;
    let mut phase = Phase::Model;
    for e in &entries[start + 1..] {
        match &e.payload {
            EntryPayload::ToolStarted { .. } => phase = Phase::Tool,
            EntryPayload::ToolResult { .. } => phase = Phase::Answer,
            EntryPayload::TurnEnd { input_id, .. } if input_id == input => return None,
            _ => {}
        }
    }
    Some(phase)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_link_reset_mid_turn_never_appends_an_input_or_runs_a_tool_twice() {
    let Some(_) = common::redis_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("reset");
    let (a, b, link) =
        a_and_b_behind_link(&prefix, |o| o, |o| o.model_latency(1000).tool_latency(1000)).await;
    let id = session_on(&prefix, &b).await;
    // Each turn: model call (tool use) → `count` tool → model call → answer, ~1.8 s on b.
    // The a→b link is reset once in each phase; in the tool phase it keeps resetting every new
    // connection for half a second, so a's retries are refused too.
    let mut inputs = Vec::new();
    let mut answered = 0;
    for (k, phase) in [Phase::Model, Phase::Tool, Phase::Answer]
        .into_iter()
        .enumerate()
    {
        let input = InputId::generate();
        let pending = send_from(&a, &id, &input, &format!("tool reset {k}")).await;
        eventually(
            Duration::from_secs(10),
            &format!("turn {k} reaches {phase:?}"),
            || async { phase_of(&b, &id, &input).await == Some(phase) },
        )
        .await;
        assert!(!pending.is_finished(), "the call is in flight at the reset");
        let before = link.resets();
        if phase == Phase::Tool {
            link.set(Fault::Reset);
            tokio::time::sleep(Duration::from_millis(500)).await;
            link.set(Fault::Pass);
        } else {
            link.reset();
        }
        eventually(
            Duration::from_secs(2),
            "the call's connection reset",
            || {
                let n = link.resets();
                async move { n > before }
            },
        )
        .await;
        let out = tokio::time::timeout(Duration::from_secs(30), pending)
            .await
            .expect("the caller gets an answer in bounded time")
            .unwrap();
        match out {
            // `run 1`: the tool ran once, whatever the retries.
            Ok(out) => {
                assert_eq!(out.text(), "done: run 1", "turn {k}");
                answered += 1;
            }
            Err(e) => assert!(
                matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout),
                "turn {k}: a typed, retryable error, got {e}"
            ),
        }
        // b finishes the turn either way.
        eventually(
            Duration::from_secs(10),
            &format!("turn {k} ended on b"),
            || async { summary(&b, &id).await.ended.contains_key(&input) },
        )
        .await;
        inputs.push(input);
    }
    eprintln!(
        "{answered} of 3 reset calls answered after a transparent retry; {} connections reset",
        link.resets()
    );
    // A link that resets every connection for longer than a's route_timeout (3 × lease TTL +
    // 5 s = 9.5 s): a re-routes until then, and the caller gets a typed error, not a hang.
    link.set(Fault::Reset);
    let refused = InputId::generate();
    let started = Instant::now();
    let err = a
        .send_with(&id, &refused, "refused")
        .await
        .expect_err("no connection to b survives");
    let took = started.elapsed();
    link.set(Fault::Pass);
    eprintln!("send over a resetting link failed after {took:?}: {err}");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(15),
        "a re-routes for route_timeout, then gives up: took {took:?}"
    );
    let after = a.send(&id, "after the resets").await.unwrap();
    assert_eq!(after.text(), "echo: after the resets");
    let s = summary(&b, &id).await;
    for input in &inputs {
        assert_eq!(s.inputs.get(input), Some(&1), "input {input} once: {s:?}");
        assert_eq!(s.ended.get(input), Some(&1), "turn {input} ended once");
    }
    assert!(
        !s.inputs.contains_key(&refused),
        "reset at accept: the refused input never reached b"
    );
    assert_eq!(s.inputs.len(), 5, "placement, 3 tool turns, 1 after: {s:?}");
    assert!(s.inputs.values().all(|n| *n == 1));
    assert!(s.ended.values().all(|n| *n == 1));
    assert_eq!(s.tool_results.len(), 3);
    assert!(s.tool_results.values().all(|n| *n == 1), "{s:?}");
    let runs = tool_runs(&prefix).await;
    assert_eq!(runs.len(), 3, "{runs:?}");
    for (key, n) in &runs {
        assert_eq!(*n, 1, "non-idempotent tool call {key} ran {n} times");
    }
    drop((a, b, link));
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blackholed_link_fails_a_send_in_bounded_time_and_heals() {
    let Some(_) = common::redis_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("dark");
    // a gives a silent connection up after 1 s without an answer to its keep-alive ping.
    let (a, b, link) = a_and_b_behind_link(&prefix, |o| o.peer_keepalive(1000), |o| o).await;
    let on_b = session_on(&prefix, &b).await;
    let on_a = session_on(&prefix, &a).await;
    let mut acked = Vec::new();
    let warm = InputId::generate();
    a.send_with(&on_b, &warm, "before").await.unwrap();
    acked.push(warm);
    assert!(link.accepted() >= 1, "a reaches b through the proxy");
    // Idle past a's keep-alive interval (1 s): the first call over the dark link then pings at
    // once and fails after the keep-alive timeout (1 s), early enough for a to re-route over a
    // new connection — which is dark too.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    link.blackhole(true);
    let connections = link.accepted();
    let lost = InputId::generate();
    let started = Instant::now();
    let pending = send_from(&a, &on_b, &lost, "into the dark").await;
    // Meanwhile b serves its session directly and a its own: only the dark link waits.
    let direct = InputId::generate();
    let out = tokio::time::timeout(
        Duration::from_secs(5),
        b.send_with(&on_b, &direct, "direct on b"),
    )
    .await
    .expect("b answers directly while its link from a is dark")
    .unwrap();
    assert_eq!(out.text(), "echo: direct on b");
    acked.push(direct);
    let out = tokio::time::timeout(Duration::from_secs(5), a.send(&on_a, "a's own"))
        .await
        .expect("a serves its own session while its link to b is dark")
        .unwrap();
    assert_eq!(out.text(), "echo: a's own");

    let err = pending
        .await
        .unwrap()
        .expect_err("a send over a dark link cannot succeed");
    let took = started.elapsed();
    eprintln!("send over the blackholed link failed after {took:?}: {err}");
    // The bound: a's route re-routes an Unavailable until route_timeout (3 × lease TTL + 5 s =
    // 9.5 s) has passed, and each attempt over the dark link ends when HTTP/2 keep-alive gives
    // the connection up (a ping after 1 s without bytes, 1 s to answer it): at most about
    // 9.5 s + 2 s, far below the 120 s rpc_timeout. (Were a to hang, the test's own client would
    // give up after 30 s with a Timeout, not Unavailable.)
    assert!(took < Duration::from_secs(15), "bounded: took {took:?}");
    assert!(
        link.accepted() > connections,
        "a re-routed over a new connection in the dark"
    );
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        err.to_string().contains(&link.addr),
        "the error names the unreachable peer: {err}"
    );
    // b kept its lease and its session the whole time.
    let h = b.client.health().await.unwrap();
    assert!(h.serving);
    assert_eq!(h.lease_losses, 0);
    assert!(h.live >= 1);

    link.blackhole(false);
    // The caller retries the failed input under its id: it lands once, even if the request held
    // in the dark link reaches b as well once it heals.
    let out = a
        .send_with(&on_b, &lost, "into the dark")
        .await
        .expect("the retry after healing succeeds");
    assert_eq!(out.text(), "echo: into the dark");
    acked.push(lost);
    let healed = InputId::generate();
    let out = a.send_with(&on_b, &healed, "healed").await.unwrap();
    assert_eq!(out.text(), "echo: healed");
    acked.push(healed);
    tokio::time::sleep(Duration::from_millis(500)).await; // anything late lands now
    let s = summary(&b, &on_b).await;
    for input in &acked {
        assert_eq!(s.inputs.get(input), Some(&1), "input {input} once: {s:?}");
        assert_eq!(s.ended.get(input), Some(&1), "turn {input} ended once");
    }
    assert_eq!(s.inputs.len(), acked.len() + 1, "placement + acked: {s:?}");
    assert_eq!(s.ended.len(), acked.len() + 1);
    drop((a, b, link));
    cleanup(&prefix).await;
}
