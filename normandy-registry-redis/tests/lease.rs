//! Node leases: a node that stops refreshing loses its placements after one TTL, and the id's
//! next registration gets a higher epoch; a refreshed lease keeps them. Each test runs on the
//! single server and again on a Redis Cluster (`NORMANDY_TEST_REDIS_CLUSTER_URLS`).

use std::time::Duration;

use normandy_core::{ErrorKind, NodeId, SessionId, SessionRegistry};
use normandy_registry_redis::{RedisRegistry, RedisRegistryConfig};
use normandy_tests::backends::{redis_cluster_url, redis_url, skip, skip_reason, unique_name};

async fn open(url: &str, ttl: Duration) -> RedisRegistry {
    let config = RedisRegistryConfig::new(url)
        .unwrap()
        .prefix(unique_name("lease"))
        .lease_ttl(ttl);
    RedisRegistry::connect(config).await.expect("connect")
}

/// Stamps `$body(url)` as a test on the single server and one on the cluster; a missing
/// server skips its test by name.
macro_rules! on_both {
    ($(#[$m:meta])* $name:ident, $cluster:ident, $body:ident) => {
        $(#[$m])*
        async fn $name() {
            match redis_url().await {
                Some(url) => $body(url).await,
                None => skip(stringify!($name), &skip_reason()),
            }
        }

        $(#[$m])*
        async fn $cluster() {
            match redis_cluster_url().await {
                Some(url) => $body(url).await,
                None => skip(stringify!($cluster), &skip_reason()),
            }
        }
    };
}

on_both!(
    #[tokio::test]
    a_lapsed_lease_loses_its_entries_and_the_next_registration_has_a_higher_epoch,
    on_a_cluster_a_lapsed_lease_loses_its_entries,
    lapsed
);
on_both!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    a_refreshed_lease_keeps_entries_until_the_refresher_stops,
    on_a_cluster_a_refreshed_lease_keeps_entries,
    refreshed
);
on_both!(
    #[tokio::test]
    with_require_lease_a_node_without_a_lease_places_nothing_and_gets_no_lease,
    on_a_cluster_with_require_lease_a_node_without_a_lease_places_nothing,
    require_lease
);

async fn lapsed(url: String) {
    let registry = open(&url, Duration::from_millis(300)).await;
    let a = NodeId::new("node-a", 1).unwrap();
    let b = NodeId::new("node-b", 1).unwrap();
    let ids: Vec<SessionId> = (0..3)
        .map(|i| SessionId::new(format!("s{i}")).unwrap())
        .collect();
    let mut first = Vec::new();
    for id in &ids {
        first.push(registry.register(id, &a).await.unwrap().epoch);
        assert_eq!(registry.lookup(id).await.unwrap().unwrap().owner, a);
    }
    let err = registry.register(&ids[0], &b).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyRegistered);

    // A stops refreshing: after one TTL nothing of it resolves.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in &ids {
        assert_eq!(
            registry.lookup(id).await.unwrap(),
            None,
            "{id} still resolves"
        );
    }
    assert!(!registry.lease_alive(&a).await.unwrap());
    // A late refresh does not bring the lease (and its placements) back.
    assert!(!registry.refresh_lease(&a).await.unwrap());
    assert_eq!(registry.lookup(&ids[0]).await.unwrap(), None);

    // B takes the ids, each with a higher epoch than A had.
    for (id, old) in ids.iter().zip(&first) {
        let p = registry.register(id, &b).await.unwrap();
        assert_eq!(p.owner, b);
        assert!(p.epoch > *old, "{id}: epoch {} not above {old}", p.epoch);
    }
    // A restarted A (new incarnation) is told B owns them.
    let a2 = NodeId::new("node-a", 2).unwrap();
    match registry.register(&ids[1], &a2).await {
        Err(normandy_core::Error::AlreadyRegistered { owner, .. }) => assert_eq!(owner, b),
        other => panic!("expected AlreadyRegistered, got {other:?}"),
    }
    registry.purge().await.unwrap();
}

async fn refreshed(url: String) {
    let ttl = Duration::from_millis(300);
    let registry = open(&url, ttl).await;
    let a = NodeId::new("node-a", 1).unwrap();
    let lease = registry.spawn_lease_refresher(&a).await.unwrap();
    let id = SessionId::new("kept").unwrap();
    let epoch = registry.register(&id, &a).await.unwrap().epoch;
    // Several TTLs pass: the refresher (every TTL/3) keeps the placement alive.
    for _ in 0..5 {
        tokio::time::sleep(ttl / 2).await;
        let p = registry.lookup(&id).await.unwrap().expect("still placed");
        assert_eq!((p.owner, p.epoch), (a.clone(), epoch));
    }
    assert!(lease.is_valid());
    lease.stop();
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert_eq!(registry.lookup(&id).await.unwrap(), None);
    registry.purge().await.unwrap();
}

/// Issue 14 (hole 5's follow-up): `register` re-created a lapsed lease for its caller, so a node
/// whose lease lapsed, registering a session before it noticed, came back under its old
/// incarnation for up to a TTL. With `require_lease` (what a cluster node uses) it is refused
/// and nothing is written.
async fn require_lease(url: String) {
    let registry = RedisRegistry::connect(
        RedisRegistryConfig::new(&url)
            .unwrap()
            .prefix(unique_name("lease-required"))
            .lease_ttl(Duration::from_secs(5))
            .require_lease(),
    )
    .await
    .expect("connect");
    let a = NodeId::new("node-a", 1).unwrap();
    let id = SessionId::new("s").unwrap();
    let err = registry.register(&id, &a).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.is_retryable());
    assert!(err.to_string().contains("no live lease"), "{err}");
    assert!(
        !registry.lease_alive(&a).await.unwrap(),
        "no lease was created"
    );
    assert_eq!(registry.lookup(&id).await.unwrap(), None);
    // Once the node holds its lease, it places sessions as before.
    assert!(registry.acquire_lease(&a).await.unwrap());
    assert_eq!(registry.register(&id, &a).await.unwrap().owner, a);
    registry.purge().await.unwrap();
}
