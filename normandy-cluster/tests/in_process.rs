//! The library API in one process: two nodes over real Redis and real loopback RPC.

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use normandy_cluster::{Cluster, ClusterConfig, MemberEvent, RedisMembership};
use normandy_core::{
    CatalogEntry, ConfigTemplate, ErrorKind, FromClient, JoinOutcome, LeaseStatus, Member,
    Membership, NodeId, ScriptedClient, SessionRegistry, TemplateCatalog, TurnEvent,
};
use support::{cleanup, drain_events, redis_url, unique_prefix, until_turn_end};

fn catalog() -> TemplateCatalog {
    TemplateCatalog::new()
        .with(
            ConfigTemplate::new("echo", "scripted"),
            CatalogEntry::with_client(
                ScriptedClient::echo().with_latency(Duration::from_millis(50)),
            ),
        )
        .unwrap()
}

async fn node(prefix: &str, name: &str) -> Cluster {
    Cluster::redis(catalog(), &redis_url())
        .prefix(prefix)
        .node_name(name)
        .secret("in-process-secret")
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remote_subscription_streams_turn_events_from_the_owner() {
    let Some(_) = support::redis_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("sub");
    let a = node(&prefix, "a").await;
    let b = node(&prefix, "b").await;
    let id = a.start("echo").await.unwrap();
    a.send(&id, "one").await.unwrap(); // owned by a
    let mut events = b.subscribe(&id, 0).await.unwrap(); // routed to a, streamed back
    let mut seen = Vec::new();
    // Replay first: the committed entries of the first turn.
    while seen.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .unwrap()
        {
            Some(Ok(TurnEvent::Entry(e))) => seen.push(e.seq),
            Some(Ok(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let out = b.send(&id, "two").await.unwrap();
    assert_eq!(out.text(), "echo: two");
    let mut finished = false;
    while !finished {
        match tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .unwrap()
        {
            Some(Ok(TurnEvent::TurnFinished(o))) => {
                assert_eq!(o.text(), "echo: two");
                finished = true;
            }
            Some(Ok(TurnEvent::Entry(e))) => {
                assert!(e.seq > *seen.last().unwrap(), "each seq once, in order");
                seen.push(e.seq);
            }
            Some(Ok(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(b.stats().forwarded >= 2);
    assert_eq!(a.sessions().live_count(), 1);
    assert_eq!(b.sessions().live_count(), 0);
    b.shutdown().await;
    a.shutdown().await;
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_sees_nodes_come_and_go() {
    let Some(_) = support::redis_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("members");
    let a = node(&prefix, "a").await;
    let mut events = a.events();
    let b = node(&prefix, "b").await;
    let up = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(up, MemberEvent::Up(m) if m.node == b.node()));
    assert_eq!(a.members().len(), 2);
    b.shutdown().await; // leaves: the lease is dropped at once
    let down = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(down, MemberEvent::Down(b.node().clone()));
    a.shutdown().await;
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_membership_leases_lapse_on_the_server_clock() {
    let Some(_) = support::redis_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("lease");
    let client = redis::Client::open(redis_url()).unwrap();
    let m = RedisMembership::connect(client, &prefix, Duration::from_secs(1))
        .await
        .unwrap();
    let me = Member {
        node: NodeId::new("x", 1).unwrap(),
        address: "127.0.0.1:1".into(),
    };
    assert_eq!(
        m.join(&me, Duration::from_millis(300)).await.unwrap(),
        JoinOutcome::Joined
    );
    assert_eq!(m.members().await.unwrap(), vec![me.clone()]);
    let again = m.join(&me, Duration::from_secs(5)).await.unwrap_err();
    assert!(
        again.to_string().contains("already holds a lease"),
        "a lease is claimed only if absent: {again}"
    );
    assert_eq!(
        m.refresh(&me, Duration::from_millis(300)).await.unwrap(),
        LeaseStatus::Held
    );
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(
        m.members().await.unwrap().is_empty(),
        "lapsed without a refresh"
    );
    // A refresh never brings a lapsed lease back: the node learns it lost it.
    assert_eq!(
        m.refresh(&me, Duration::from_secs(5)).await.unwrap(),
        LeaseStatus::Lost
    );
    assert!(m.members().await.unwrap().is_empty(), "not re-created");
    // A lease holding another node's address is not ours to extend.
    m.join(&me, Duration::from_secs(5)).await.unwrap();
    let impostor = Member {
        address: "127.0.0.1:2".into(),
        ..me.clone()
    };
    assert_eq!(
        m.refresh(&impostor, Duration::from_secs(5)).await.unwrap(),
        LeaseStatus::Lost
    );
    m.leave(&me.node).await.unwrap();
    assert!(m.members().await.unwrap().is_empty(), "left at once");
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_client_credentials_are_refused_with_a_clear_error() {
    let Some(_) = support::redis_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("fromclient");
    let err = Cluster::redis(catalog(), &redis_url())
        .prefix(&prefix)
        .secret("in-process-secret")
        .credentials(Arc::new(FromClient::new()))
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("FromClient"), "{err}");
    let err = Cluster::redis(catalog(), &redis_url())
        .prefix(&prefix)
        .secret("short")
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    let err = Cluster::redis(catalog(), &redis_url())
        .prefix(&prefix)
        .secret("in-process-secret")
        .config(ClusterConfig::default().with_lease_ttl(Duration::from_millis(10)))
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    cleanup(&prefix).await;
}

/// A catalog with one eager template, `id`, whose echo model answers after `latency`.
fn eager_catalog(id: &str, latency: Duration) -> TemplateCatalog {
    TemplateCatalog::new()
        .with(
            ConfigTemplate::new(id, "scripted").resume_policy(normandy_core::ResumePolicy::Eager),
            CatalogEntry::with_client(ScriptedClient::echo().with_latency(latency)),
        )
        .unwrap()
}

/// Nodes named `names` under `prefix`, each with `catalog()` and `config`.
async fn redis_nodes(
    prefix: &str,
    names: &[&str],
    catalog: impl Fn() -> TemplateCatalog,
    config: ClusterConfig,
) -> Vec<Cluster> {
    let mut nodes = Vec::new();
    for name in names {
        nodes.push(
            Cluster::redis(catalog(), &redis_url())
                .prefix(prefix)
                .node_name(*name)
                .secret("in-process-secret")
                .config(config.clone())
                .build()
                .await
                .unwrap(),
        );
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_dropping_every_lease_at_once_starts_no_reaping_storm() {
    let Some(_) = support::redis_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("storm");
    let slow = || eager_catalog("slow-eager", Duration::from_secs(4));
    let nodes = redis_nodes(&prefix, &["a", "b", "c"], slow, ClusterConfig::default()).await;
    for n in &nodes {
        support::eventually(Duration::from_secs(5), "3 members", || async {
            n.members().len() == 3
        })
        .await;
    }
    let a = nodes[0].clone();
    let mut turns = Vec::new();
    for _ in 0..6 {
        let id = a.start("slow-eager").await.unwrap();
        let a2 = a.clone();
        turns.push(tokio::spawn(async move { a2.send(&id, "long turn").await }));
    }
    support::eventually(Duration::from_secs(5), "6 live on a", || async {
        a.sessions().live_count() == 6
    })
    .await;
    // What a Redis failover without persistence does: every lease gone at once.
    let client = redis::Client::open(redis_url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{{prefix}:registry}}:lease:*"))
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(keys.len(), 3);
    let _: i64 = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut con)
        .await
        .unwrap();
    // Each node finds its lease lost at its next refresh, fences its actors and rejoins as a
    // new incarnation; the six interrupted turns go on. No other reaper takes them: the storm
    // guard holds the reapers back while most of the cluster looks gone.
    for n in &nodes {
        support::eventually(Duration::from_secs(10), "rejoined", || async {
            n.stats().rejoins == 1 && n.is_serving()
        })
        .await;
    }
    for t in turns {
        assert_eq!(t.await.unwrap().unwrap().text(), "echo: long turn");
    }
    // a's reaper resumes them, unless a caller's retry placed one first (on a, or on the node
    // it was handed to while a was rejoining); the other reapers take none.
    let stats: Vec<_> = nodes.iter().map(|n| n.stats()).collect();
    assert_eq!(
        stats[1].reaped + stats[2].reaped,
        0,
        "no other node took a's sessions: {stats:?}"
    );
    for n in nodes {
        n.shutdown().await;
    }
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_membership_lease_is_the_registry_lease() {
    let Some(_) = support::redis_or_skip().await else {
        return;
    };
    use normandy_core::SessionId;
    use normandy_registry_redis::{RedisRegistry, RedisRegistryConfig};
    let prefix = unique_prefix("shared-lease");
    let registry = RedisRegistry::connect(
        RedisRegistryConfig::new(&redis_url())
            .unwrap()
            .prefix(&prefix)
            .lease_ttl(Duration::from_secs(5)),
    )
    .await
    .unwrap();
    let client = redis::Client::open(redis_url()).unwrap();
    let m = RedisMembership::connect(client, &prefix, Duration::from_secs(1))
        .await
        .unwrap();
    let me = Member {
        node: NodeId::new("n", 42).unwrap(),
        address: "127.0.0.1:9".into(),
    };
    assert_eq!(m.lease_key(&me.node), registry.lease_key(&me.node));
    m.join(&me, Duration::from_secs(5)).await.unwrap();
    let id = SessionId::new("shared-lease-session").unwrap();
    registry.register(&id, &me.node).await.unwrap();
    assert_eq!(registry.lookup(&id).await.unwrap().unwrap().owner, me.node);
    // Dropping the membership lease is what makes the placement stop resolving.
    m.leave(&me.node).await.unwrap();
    assert_eq!(registry.lookup(&id).await.unwrap(), None);
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follow_keeps_streaming_as_the_owner_passivates_and_moves_then_ends_on_close() {
    let Some(_) = support::redis_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("follow");
    let short = |name: &'static str| {
        let prefix = prefix.clone();
        async move {
            Cluster::redis(catalog(), &redis_url())
                .prefix(&prefix)
                .node_name(name)
                .secret("in-process-secret")
                .idle_timeout(Duration::from_millis(300))
                .build()
                .await
                .unwrap()
        }
    };
    let a = short("a").await;
    let b = short("b").await;
    let id = a.start("echo").await.unwrap();
    a.send(&id, "one").await.unwrap(); // placed on a
    // b follows a's actor remotely; a task drains it all along, as a UI would.
    let (mut rx, drain) = drain_events(b.follow(&id, 0).await.unwrap());
    let mut seqs = Vec::new();
    until_turn_end(&mut rx, &mut seqs).await; // the replay of turn one
    assert_eq!(b.send(&id, "two").await.unwrap().text(), "echo: two");
    until_turn_end(&mut rx, &mut seqs).await; // turn two, live

    // a passivates the session (idle). That ends the stream under `follow`, which subscribes
    // again at once and so places the session anew; `b.send` goes wherever that is.
    support::eventually(
        Duration::from_secs(10),
        "a passivates the session",
        || async { a.sessions().live_count() == 0 },
    )
    .await;
    support::eventually(
        Duration::from_secs(10),
        "the follow re-placed it",
        || async { a.sessions().live_count() + b.sessions().live_count() == 1 },
    )
    .await;
    let out = b.send(&id, "three").await.unwrap();
    assert_eq!(out.text(), "echo: three");
    until_turn_end(&mut rx, &mut seqs).await;
    // Every entry once, in order, no gap, across the re-subscription.
    assert_eq!(seqs.first(), Some(&1));
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "each seq once, in order: {seqs:?}"
    );
    let stored = a.history_all(&id).await.unwrap();
    assert_eq!(seqs.last(), stored.last().map(|e| &e.seq));

    // Closing the session ends the follow with the reason.
    a.stop(&id).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match rx.recv().await {
                None => return None,
                Some(Err(e)) => return Some(e),
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .expect("follow ends once the session is closed")
    .expect("with the reason");
    assert_eq!(end.kind(), ErrorKind::SessionClosed, "{end}");
    tokio::time::timeout(Duration::from_secs(2), drain)
        .await
        .expect("the stream ended")
        .unwrap();
    b.shutdown().await;
    a.shutdown().await;
    cleanup(&prefix).await;
}

/// The bench's baselines: the echo returns its payload, and a waiting echo answers no sooner
/// than asked, and no later than the node's cap however long it is asked to wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_returns_its_payload_after_the_delay_asked_within_the_cap() {
    let Some(_) = support::redis_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("echo");
    let a = node(&prefix, "a").await;
    let client = a.client(a.address()).unwrap();
    assert_eq!(client.echo(b"ping".to_vec()).await.unwrap(), b"ping");
    let t = std::time::Instant::now();
    let back = client
        .echo_after(b"wait".to_vec(), Duration::from_millis(60))
        .await
        .unwrap();
    assert_eq!(back, b"wait");
    assert!(
        t.elapsed() >= Duration::from_millis(60),
        "{:?}",
        t.elapsed()
    );
    let t = std::time::Instant::now();
    tokio::time::timeout(
        Duration::from_secs(10),
        client.echo_after(Vec::new(), Duration::from_secs(3600)),
    )
    .await
    .expect("the node caps the delay")
    .unwrap();
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(u64::from(normandy_cluster::wire::MAX_ECHO_DELAY_MS))
            && waited < Duration::from_secs(10),
        "an hour's delay is capped at {} ms: waited {waited:?}",
        normandy_cluster::wire::MAX_ECHO_DELAY_MS
    );
    a.shutdown().await;
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_refuses_a_store_that_is_not_durable_unless_told_it_is_a_test() {
    let Some(_) = support::redis_or_skip().await else {
        return;
    };
    use normandy_core::{InMemoryStore, LocalRegistry};
    let prefix = unique_prefix("volatile");
    let catalog = || {
        TemplateCatalog::new()
            .with(
                ConfigTemplate::new("echo", "scripted"),
                CatalogEntry::with_client(ScriptedClient::echo()),
            )
            .unwrap()
    };
    let membership = || async {
        let client = redis::Client::open(redis_url()).unwrap();
        Arc::new(
            RedisMembership::connect(client, &prefix, Duration::from_secs(1))
                .await
                .unwrap(),
        )
    };
    let err = Cluster::builder(catalog())
        .store(Arc::new(InMemoryStore::new()))
        .registry(Arc::new(LocalRegistry::new()))
        .membership(membership().await)
        .secret("in-process-secret")
        .build()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    let text = err.to_string();
    assert!(
        text.contains("not durable") && text.contains("volatile_store_for_tests"),
        "{text}"
    );
    let node = Cluster::builder(catalog())
        .store(Arc::new(InMemoryStore::new()))
        .registry(Arc::new(LocalRegistry::new()))
        .membership(membership().await)
        .secret("in-process-secret")
        .volatile_store_for_tests()
        .build()
        .await
        .expect("a test may run a cluster on the in-memory store");
    let id = node.start("echo").await.unwrap();
    assert_eq!(node.send(&id, "hi").await.unwrap().text(), "echo: hi");
    node.shutdown().await;
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_under_a_live_node_name_is_refused_naming_both() {
    let Some(_) = support::redis_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("dup-name");
    let ttl = Duration::from_millis(600);
    let node = |name: &'static str| {
        let prefix = prefix.clone();
        async move {
            Cluster::redis(catalog(), &redis_url())
                .prefix(&prefix)
                .node_name(name)
                .secret("in-process-secret")
                .config(ClusterConfig::default().with_lease_ttl(ttl))
                .build()
                .await
        }
    };
    let a = node("same").await.unwrap();
    let started = tokio::time::Instant::now();
    let err = node("same").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    let text = err.to_string();
    assert!(
        text.contains(&a.node().to_string()) && text.contains("same name"),
        "the error names the live holder: {text}"
    );
    assert!(
        started.elapsed() >= ttl,
        "it waited a lease TTL for a previous life to lapse first"
    );
    // Once the holder has left, the name is free at once.
    let waiting = tokio::spawn(node("same"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.shutdown().await;
    let b = waiting.await.unwrap().expect("joins once the name is free");
    assert_ne!(b.node(), a.node());
    b.shutdown().await;
    cleanup(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_2r_refuses_a_server_with_replicas_unless_it_waits_or_accepts_loss() {
    let Some(_) = support::redis_or_skip().await else {
        return;
    };
    use normandy_tests::redis_server::{have_redis_server, pair};
    if !have_redis_server("tier_2r_refuses_a_server_with_replicas_unless_it_waits_or_accepts_loss")
    {
        return;
    }
    let (primary, _replica) = pair().await;
    let node = |name: &'static str| {
        Cluster::redis(catalog(), &primary.url())
            .prefix("wait-builder")
            .node_name(name)
            .secret("in-process-secret")
    };
    let err = node("plain").build().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    let text = err.to_string();
    assert!(
        text.contains("1 replica") && text.contains("wait(replicas, timeout)"),
        "{text}"
    );
    let waiting = node("waits")
        .wait(1, Duration::from_secs(2))
        .build()
        .await
        .expect("a store that waits for its replica");
    let id = waiting.start("echo").await.unwrap();
    assert_eq!(waiting.send(&id, "hi").await.unwrap().text(), "echo: hi");
    waiting.shutdown().await;
    let lossy = node("accepts")
        .accept_commit_loss_on_failover()
        .build()
        .await
        .expect("said in so many words");
    lossy.shutdown().await;
}

/// Issue 14, hole 3: the sweep took only orphans (last owner not a live member), so an eager
/// session mid-turn whose actor was gone from a live node, and whose placement was released,
/// waited for a request forever. It now resumes any resumable session without a resolving
/// placement, whoever owned it last.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sweep_resumes_an_unplaced_eager_session_of_a_live_node() {
    let Some(_) = support::redis_or_skip().await else {
        return;
    };
    let prefix = unique_prefix("sweep");
    let catalog = || eager_catalog("eager", Duration::from_millis(400));
    let config = ClusterConfig {
        sweep_interval: Duration::from_millis(500),
        ..ClusterConfig::default()
    };
    let nodes = redis_nodes(&prefix, &["a", "b"], catalog, config).await;
    let a = nodes[0].clone();
    let store = a.sessions().store().clone();
    let id = a.start("eager").await.unwrap();
    let (a2, id2) = (a.clone(), id.clone());
    let caller = tokio::spawn(async move { a2.send(&id2, "hi").await });
    support::eventually(
        Duration::from_secs(10),
        "the input is committed",
        || async { matches!(store.load(&id).await, Ok(Some(r)) if r.is_resumable()) },
    )
    .await;
    // The caller goes away, the actor vanishes from its (live) node and the placement is
    // released: nobody will send again, and no node is dead.
    caller.abort();
    let registry = normandy_registry_redis::RedisRegistry::connect(
        normandy_registry_redis::RedisRegistryConfig::new(&redis_url())
            .unwrap()
            .prefix(format!("{prefix}:registry")),
    )
    .await
    .unwrap();
    let owner = registry.lookup(&id).await.unwrap().expect("placed").owner;
    let on = nodes.iter().find(|n| n.node() == owner).expect("a member");
    assert!(on.sessions().kill(&id), "its actor was live on {owner}");
    assert!(registry.unregister(&id, &owner).await.unwrap());
    support::eventually(
        Duration::from_secs(15),
        "the sweep finishes the turn",
        || async { matches!(store.load(&id).await, Ok(Some(r)) if !r.is_resumable()) },
    )
    .await;
    let kinds: Vec<String> = store
        .entries(&id, 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.payload.kind_name().to_string())
        .collect();
    assert_eq!(kinds, ["input", "assistant", "turn_end"]);
    for n in nodes {
        n.shutdown().await;
    }
    cleanup(&prefix).await;
}
