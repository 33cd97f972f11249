//! Multi-node scenarios: real `normandy-node` processes on loopback against a real Redis
//! (`NORMANDY_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`), faults by SIGKILL, SIGSTOP/SIGCONT
//! and SIGTERM. Nothing is mocked at the process boundary.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use nix::sys::signal::Signal;
use normandy_cluster::Cluster;
use normandy_core::{
    CatalogEntry, ConfigTemplate, ErrorKind, InputId, NodeId, ScriptedClient, SessionId,
    SessionRegistry, TemplateCatalog, TurnEvent, TurnStatus,
};
use normandy_registry_redis::{RedisRegistry, RedisRegistryConfig};
use tonic::Code;

async fn nodes(prefix: &str, names: &[&str], f: impl Fn(NodeOpts) -> NodeOpts) -> Vec<Node> {
    let mut out = Vec::new();
    for n in names {
        out.push(Node::spawn(f(NodeOpts::new(n, prefix))).await);
    }
    for n in &out {
        n.wait_members(names.len()).await;
    }
    out
}

async fn registry(prefix: &str) -> RedisRegistry {
    RedisRegistry::connect(
        RedisRegistryConfig::new(&redis_url())
            .unwrap()
            .prefix(format!("{prefix}:registry"))
            .lease_ttl(Duration::from_millis(1500)),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_started_on_each_node_are_reachable_from_every_node() {
    let Some(_) = common::redis_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("route");
    let ns = nodes(&prefix, &["a", "b", "c"], |o| o).await;
    let reg = registry(&prefix).await;
    let mut sessions = Vec::new();
    for (i, n) in ns.iter().enumerate() {
        for j in 0..3 {
            let id = n.client.start("demo", None).await.unwrap();
            let out = n.send(&id, &format!("first {i}.{j}")).await.unwrap();
            assert_eq!(out.text(), format!("echo: first {i}.{j}"));
            let owner = reg.lookup(&id).await.unwrap().expect("placed").owner;
            assert_eq!(
                owner.to_string(),
                n.node_id,
                "the first request places it where it lands"
            );
            sessions.push((id, i));
        }
    }
    for (id, owner) in &sessions {
        for (k, n) in ns.iter().enumerate() {
            let out = n.send(id, &format!("from {k}")).await.unwrap();
            assert_eq!(out.text(), format!("echo: from {k}"));
        }
        // Still placed on the node that first served it: the others routed to it.
        let placed = reg.lookup(id).await.unwrap().unwrap().owner;
        assert_eq!(placed.to_string(), ns[*owner].node_id);
        let history = ns[(owner + 1) % 3]
            .client
            .history(id, 0, 1000)
            .await
            .unwrap();
        let s = summarize(&history);
        assert_eq!(s.inputs.len(), 4);
        assert!(s.inputs.values().all(|n| *n == 1));
        assert_eq!(s.ended.len(), 4);
    }
    for n in &ns {
        let h = n.client.health().await.unwrap();
        assert_eq!(
            h.live, 3,
            "node {} should hold exactly its own 3 sessions",
            n.name
        );
    }
    drop(ns);
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_rpc_is_rejected_and_malformed_payload_is_an_error() {
    let Some(_) = common::redis_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("auth");
    let ns = nodes(&prefix, &["a"], |o| o).await;
    let a = &ns[0];
    let anon = normandy_cluster::NodeClient::new(&a.address, None, Duration::from_secs(5)).unwrap();
    let status = anon.health_status().await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let err = anon.start("demo", None).await.unwrap_err();
    assert_eq!(err.kind(), normandy_core::ErrorKind::Config, "{err}");
    let wrong = normandy_cluster::NodeClient::new(
        &a.address,
        Some("not-the-secret"),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(
        wrong.health_status().await.unwrap_err().code(),
        Code::Unauthenticated
    );

    // Malformed payloads: an error each, and the node keeps serving.
    for garbage in [
        vec![0xc1],
        b"not msgpack at all".to_vec(),
        vec![0x93, 0x01],
        Vec::new(),
    ] {
        let status = a.client.send_raw(garbage.clone()).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{garbage:?}: {status:?}"
        );
    }
    // A well-formed message with an invalid session id is refused too.
    let bad_id = rmp_serde::to_vec_named(&serde_json::json!({
        "session": "has space", "input_id": "x", "content": [], "forwarded": false
    }))
    .unwrap();
    assert_eq!(
        a.client.send_raw(bad_id).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let id = a.client.start("demo", None).await.unwrap();
    assert_eq!(
        a.send(&id, "still here").await.unwrap().text(),
        "echo: still here"
    );
    assert!(a.client.health().await.unwrap().serving);
    drop(ns);
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lazy_sessions_continue_on_another_node_after_owner_sigkill() {
    let Some(_) = common::redis_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("lazy");
    let mut ns = nodes(&prefix, &["a", "b", "c"], |o| o).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        let id = ns[0].client.start("demo", None).await.unwrap();
        ns[0].send(&id, &format!("before {i}")).await.unwrap();
        ids.push(id);
    }
    assert_eq!(ns[0].client.health().await.unwrap().live, 10);
    ns[0].kill9().await;
    // No waiting for the lease to lapse: the survivors re-route until it has.
    for (i, id) in ids.iter().enumerate() {
        let via = &ns[1 + i % 2];
        let out = via.send(id, &format!("after {i}")).await.unwrap();
        assert_eq!(out.text(), format!("echo: after {i}"));
        let s = summarize(&via.client.history(id, 0, 1000).await.unwrap());
        assert_eq!(s.inputs.len(), 2, "history intact: both inputs");
        assert!(s.inputs.values().all(|n| *n == 1));
        assert_eq!(s.ended.len(), 2);
    }
    // Idle sessions cost nothing: the survivors only hold the ones asked for.
    let live: u64 = health_sum(&[&ns[1], &ns[2]], |h| h.live).await;
    assert_eq!(live, 10);
    drop(ns);
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_remote_subscription_ends_when_its_owner_dies_and_resumes_from_the_last_seq() {
    let Some(_) = common::redis_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("sub-kill");
    let mut ns = nodes(&prefix, &["a", "b"], |o| o).await;
    let id = ns[0].client.start("demo", None).await.unwrap();
    ns[0].send(&id, "one").await.unwrap(); // owned by a
    // Subscribed through b: routed to a, streamed back over RPC.
    let mut events = ns[1].client.subscribe(&id, 0).await.unwrap();
    let mut seqs = Vec::new();
    while seqs.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("replay arrives")
        {
            Some(Ok(TurnEvent::Entry(e))) => seqs.push(e.seq),
            Some(Ok(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    ns[0].kill9().await;
    // The stream does not hang on a dead owner: it ends, or fails retryably, in bounded time.
    let end = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match events.next().await {
                None => return None,
                Some(Err(e)) => return Some(e),
                Some(Ok(TurnEvent::Entry(e))) => panic!("no entry after the kill: {}", e.seq),
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .expect("the subscription ends after its owner's death");
    if let Some(e) = end {
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    }
    // Following on: subscribe again after the last seq seen. The session comes back on b (lazy
    // rehydrate) and the new stream holds exactly what came after.
    let last = *seqs.last().unwrap();
    let mut events = ns[1].client.subscribe(&id, last).await.unwrap();
    let out = ns[1].send(&id, "two").await.unwrap();
    assert_eq!(out.text(), "echo: two");
    let mut after = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("live events after resubscribing")
        {
            Some(Ok(TurnEvent::Entry(e))) => after.push(e.seq),
            Some(Ok(TurnEvent::TurnFinished(o))) => {
                assert_eq!(o.text(), "echo: two");
                break;
            }
            Some(Ok(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(!after.is_empty());
    assert_eq!(
        after[0],
        last + 1,
        "no gap and no repeat after the last seq"
    );
    assert!(after.windows(2).all(|w| w[1] == w[0] + 1), "{after:?}");
    drop(ns);
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follow_streams_on_across_the_owners_sigkill_without_gap_or_repeat() {
    let Some(_) = common::redis_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("follow-kill");
    let mut ns = nodes(&prefix, &["a"], |o| o).await;
    // This test process is a node too (library API), with the `echo` template the binary has.
    let catalog = TemplateCatalog::new()
        .with(
            ConfigTemplate::new("echo", "scripted"),
            CatalogEntry::with_client(ScriptedClient::echo()),
        )
        .unwrap();
    let me = Cluster::redis(catalog, &redis_url())
        .prefix(&prefix)
        .node_name("me")
        .secret(SECRET)
        .build()
        .await
        .unwrap();
    ns[0].wait_members(2).await;
    let id = ns[0].client.start("echo", None).await.unwrap();
    ns[0].send(&id, "one").await.unwrap(); // owned by a
    let follow = me.follow(&id, 0).await.unwrap();
    let (mut rx, drain) = drain_events(follow);
    let mut seqs = Vec::new();
    until_turn_end(&mut rx, &mut seqs).await; // the replay of turn one
    ns[0].kill9().await;
    // The next request re-routes until a's lease lapses, then the session comes back here.
    let out = me.send(&id, "two").await.unwrap();
    assert_eq!(out.text(), "echo: two");
    until_turn_end(&mut rx, &mut seqs).await; // turn two, followed across the owner's death
    assert_eq!(seqs.first(), Some(&1));
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "each seq once, in order: {seqs:?}"
    );
    let s = summarize(&me.history_all(&id).await.unwrap());
    assert_eq!(s.inputs.len(), 2);
    assert!(s.inputs.values().all(|n| *n == 1));
    drain.abort();
    me.shutdown().await;
    drop(ns);
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eager_sessions_resume_on_survivors_after_owner_sigkill_mid_turn() {
    let Some(_) = common::redis_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("eager");
    const N: usize = 30;
    let mut ns = nodes(&prefix, &["a", "b", "c"], |o| {
        o.model_latency(600).tool_latency(300)
    })
    .await;
    let mut work = Vec::new();
    for i in 0..N {
        let id = ns[0].client.start("demo-eager", None).await.unwrap();
        work.push((id, InputId::generate(), i));
    }
    // Every turn: model call (tool use) → count tool → model call → answer, ~1.5 s.
    let mut inflight = Vec::new();
    for (id, input, i) in &work {
        let c = ns[0].client.clone();
        let (id, input, text) = (id.clone(), input.clone(), format!("tool {i}"));
        inflight.push(tokio::spawn(async move {
            c.send(&id, input, vec![normandy_core::ContentBlock::text(text)])
                .await
        }));
    }
    // Mid-turn: every input accepted, the first model call done for most.
    let probe = ns[1].client.clone();
    let ids: Vec<SessionId> = work.iter().map(|w| w.0.clone()).collect();
    eventually(Duration::from_secs(10), "every input committed", || {
        let probe = probe.clone();
        let ids = ids.clone();
        async move {
            for id in &ids {
                if summarize(&probe.history(id, 0, 1000).await.unwrap())
                    .inputs
                    .is_empty()
                {
                    return false;
                }
            }
            true
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    ns[0].kill9().await;
    for t in inflight {
        let _ = t.await; // the caller's connection died with the node
    }
    // No request from here on: the reapers on b and c must finish every turn.
    eventually(
        Duration::from_secs(30),
        "every turn finished by the survivors",
        || {
            let probe = probe.clone();
            let work = work.clone();
            async move {
                for (id, input, _) in &work {
                    let s = summarize(&probe.history(id, 0, 1000).await.unwrap());
                    if s.ended.get(input).copied().unwrap_or(0) == 0 {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await;
    let runs = tool_runs(&prefix).await;
    for (id, input, _) in &work {
        let s = summarize(&probe.history(id, 0, 1000).await.unwrap());
        assert_eq!(s.inputs.get(input), Some(&1), "input appended exactly once");
        assert_eq!(s.inputs.len(), 1);
        assert_eq!(s.ended.get(input), Some(&1), "turn ended exactly once");
        for (call, n) in &s.tool_results {
            assert_eq!(*n, 1, "call {call} of {id} has one recorded result");
        }
    }
    for (key, n) in &runs {
        assert!(*n <= 1, "non-idempotent tool call {key} ran {n} times");
    }
    let reaped: u64 = health_sum(&[&ns[1], &ns[2]], |h| h.reaped).await;
    assert!(reaped >= 1, "the survivors' reapers resumed the sessions");
    drop(ns);
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_paused_past_its_lease_rejoins_as_a_new_incarnation_and_its_old_actors_commit_nothing()
 {
    let Some(_) = common::redis_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("rejoin");
    // A 3 s model call: still in flight when the pause starts (~1 s in), done when it ends.
    let ns = nodes(&prefix, &["a", "b"], |o| o.model_latency(3000)).await;
    let (a, b) = (&ns[0], &ns[1]);
    let old: NodeId = a.node_id.parse().unwrap();
    let id = a.client.start("demo", None).await.unwrap(); // lazy: no reaper takes it over
    a.send(&id, "warm up").await.unwrap(); // placed on a
    let (first, pending) = input_committed(a, b, &id, "slow one").await;
    // The caller goes away; a's actor runs the turn on (a caller still waiting would have a
    // retry the new incarnation serves, which may rightly commit).
    pending.abort();
    let _ = pending.await;
    // Time for a to see the stream reset and drop the call's route loop (loopback: well under
    // this on a loaded machine).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = b.client.history(&id, 0, 1000).await.unwrap();
    // Past a's lease (1.5 s), with the model call in flight; nobody else touches the session,
    // so its epoch stays a's: only a's own fencing keeps the woken actor from committing.
    a.signal(Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    a.signal(Signal::SIGCONT);
    eventually(Duration::from_secs(10), "a rejoined", || {
        let a = a.client.clone();
        let old = old.clone();
        async move {
            matches!(a.health().await, Ok(h) if h.serving && h.node != old
                && h.node.name() == old.name() && h.node.incarnation() > old.incarnation())
        }
    })
    .await;
    assert!(a.client.health().await.unwrap().lease_losses >= 1);
    // The woken model call finished long ago: had the old actor committed, it would show.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        b.client.history(&id, 0, 1000).await.unwrap(),
        before,
        "an actor of a's old incarnation committed after its lease was lost"
    );
    let reg = registry(&prefix).await;
    assert_ne!(
        reg.lookup(&id).await.unwrap().map(|p| p.owner),
        Some(old.clone()),
        "the old incarnation's placement resolves"
    );
    // The next request continues the interrupted turn, once, wherever it is placed.
    let out = a.send(&id, "after pause").await.unwrap();
    assert_eq!(out.text(), "echo: after pause");
    let s = summarize(&b.client.history(&id, 0, 1000).await.unwrap());
    assert_eq!(s.inputs.len(), 3);
    assert!(s.inputs.values().all(|n| *n == 1), "{:?}", s.inputs);
    assert_eq!(
        s.ended.get(&first),
        Some(&1),
        "the interrupted turn ended once"
    );
    drop(ns);
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paused_owner_is_fenced_after_a_survivor_takes_over() {
    let Some(_) = common::redis_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("pause");
    let ns = nodes(&prefix, &["a", "b"], |o| o.model_latency(2000)).await;
    let (a, b) = (&ns[0], &ns[1]);
    let id = a.client.start("demo", None).await.unwrap();
    a.send(&id, "warm up").await.unwrap(); // placed on a
    let (first, pending) = input_committed(a, b, &id, "slow one").await;
    a.signal(Signal::SIGSTOP);
    // Past a's lease: b takes the session over (epoch bump), continues the interrupted turn,
    // then runs the new input.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let second = InputId::generate();
    let out = b.send_with(&id, &second, "after pause").await.unwrap();
    assert_eq!(out.text(), "echo: after pause");
    let reg = registry(&prefix).await;
    assert_eq!(
        reg.lookup(&id).await.unwrap().unwrap().owner.to_string(),
        b.node_id
    );
    let before = b.client.history(&id, 0, 1000).await.unwrap();

    a.signal(Signal::SIGCONT);
    // a's model call finishes; its commit is fenced; a drops the session. Its watchdog saw
    // the lease out of date on waking and stopped serving meanwhile.
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
        reg.lookup(&id).await.unwrap().unwrap().owner.to_string(),
        b.node_id
    );
    drop(ns);
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_racing_to_place_100_sessions_give_each_exactly_one_owner() {
    let Some(_) = common::redis_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("race");
    let ns = nodes(&prefix, &["a", "b"], |o| o).await;
    let mut ids = Vec::new();
    for _ in 0..100 {
        ids.push(ns[0].client.start("demo", None).await.unwrap());
    }
    let mut calls = Vec::new();
    for id in &ids {
        for n in &ns {
            let c = n.client.clone();
            let id = id.clone();
            let name = n.name.clone();
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
    let reg = registry(&prefix).await;
    let mut owners: HashSet<NodeId> = HashSet::new();
    for id in &ids {
        let p = reg.lookup(id).await.unwrap().expect("placed");
        owners.insert(p.owner);
        let s = summarize(&ns[0].client.history(id, 0, 100).await.unwrap());
        assert_eq!(s.inputs.len(), 2);
        assert_eq!(s.ended.len(), 2);
    }
    let live: u64 = health_sum(&[&ns[0], &ns[1]], |h| h.live).await;
    assert_eq!(live, 100, "every session live on exactly one node");
    assert!(owners.len() <= 2);
    drop(ns);
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_under_load_loses_no_input() {
    let Some(_) = common::redis_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("drain");
    let mut ns = nodes(&prefix, &["a", "b", "c"], |o| o.model_latency(100)).await;
    let mut ids = Vec::new();
    for _ in 0..12 {
        let id = ns[0].client.start("demo", None).await.unwrap();
        ns[0].send(&id, "placed on a").await.unwrap();
        ids.push(id);
    }
    let clients = [ns[1].client.clone(), ns[2].client.clone()];
    let mut load = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let c = clients[i % 2].clone();
        let id = id.clone();
        load.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for k in 0..15 {
                let input = InputId::generate();
                let out = c
                    .send(
                        &id,
                        input.clone(),
                        vec![normandy_core::ContentBlock::text(format!("load {k}"))],
                    )
                    .await;
                sent.push((input, out));
            }
            sent
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let status = ns[0].terminate().await;
    assert!(
        status.success(),
        "graceful shutdown exits cleanly: {status:?}"
    );
    for (t, id) in load.into_iter().zip(&ids) {
        let sent = t.await.unwrap();
        let s = summarize(&ns[1].client.history(id, 0, 1000).await.unwrap());
        for (input, out) in sent {
            let out = out.unwrap_or_else(|e| panic!("send to {id} failed during shutdown: {e}"));
            assert_eq!(out.status, TurnStatus::Completed);
            assert_eq!(
                s.inputs.get(&input),
                Some(&1),
                "input committed exactly once"
            );
            assert_eq!(s.ended.get(&input), Some(&1));
        }
    }
    drop(ns);
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_store_cluster_survives_sigkill_lazy_and_eager() {
    let Some(_) = common::redis_or_skip().await else {
        return;
    };
    let Some(_) = common::postgres_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("pg");
    let schema = format!("nct_pg_{}", std::process::id());
    create_schema(&schema).await;
    let mut ns = nodes(&prefix, &["a", "b"], |o| {
        o.postgres(&schema).model_latency(500)
    })
    .await;
    let lazy = ns[0].client.start("demo", None).await.unwrap();
    ns[0].send(&lazy, "lazy one").await.unwrap();
    let eager = ns[0].client.start("demo-eager", None).await.unwrap();
    let input = InputId::generate();
    let c = ns[0].client.clone();
    let (e2, i2) = (eager.clone(), input.clone());
    let pending = tokio::spawn(async move {
        c.send(&e2, i2, vec![normandy_core::ContentBlock::text("tool now")])
            .await
    });
    let probe = ns[1].client.clone();
    eventually(Duration::from_secs(10), "eager input committed", || {
        let (probe, eager, input) = (probe.clone(), eager.clone(), input.clone());
        async move {
            summarize(&probe.history(&eager, 0, 100).await.unwrap())
                .inputs
                .contains_key(&input)
        }
    })
    .await;
    ns[0].kill9().await;
    let _ = pending.await;
    eventually(
        Duration::from_secs(20),
        "eager turn finished on b without a request",
        || {
            let (probe, eager, input) = (probe.clone(), eager.clone(), input.clone());
            async move {
                summarize(&probe.history(&eager, 0, 100).await.unwrap())
                    .ended
                    .contains_key(&input)
            }
        },
    )
    .await;
    assert_eq!(
        ns[1].send(&lazy, "lazy two").await.unwrap().text(),
        "echo: lazy two"
    );
    let s = summarize(&ns[1].client.history(&lazy, 0, 100).await.unwrap());
    assert_eq!(s.inputs.len(), 2);
    assert_eq!(s.ended.len(), 2);
    for (key, n) in tool_runs(&prefix).await {
        assert!(n <= 1, "tool call {key} ran {n} times");
    }
    drop(ns);
    drop_schema(&schema).await;
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_from_redis_stops_serving_and_never_reaps() {
    let Some(_) = common::redis_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("cut");
    let (proxy, a_url) = redis_proxy().await;
    let a = Node::spawn(NodeOpts {
        redis_url: Some(a_url),
        ..NodeOpts::new("a", &prefix).model_latency(1500)
    })
    .await;
    let b = Node::spawn(NodeOpts::new("b", &prefix).model_latency(1500)).await;
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
    eventually(Duration::from_secs(20), "b finishes the eager turn", || {
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
        let s = summarize(&b.client.history(id, 0, 100).await.unwrap());
        assert!(s.inputs.values().all(|n| *n == 1), "each input once: {s:?}");
        assert!(
            s.ended.values().all(|n| *n == 1),
            "each turn ended once: {s:?}"
        );
        assert_eq!(s.inputs.len(), s.ended.len());
    }
    for (key, n) in tool_runs(&prefix).await {
        assert!(n <= 1, "tool call {key} ran {n} times");
    }
    // Healed, a routes to b.
    assert_eq!(
        a.send(&lazy, "from a").await.unwrap().text(),
        "echo: from a"
    );
    drop((a, b, proxy));
    cleanup(&prefix).await;
}
