//! Node leases on Postgres: the one lapse policy of `Membership`, with expiry on the server's
//! clock, and the registry resolving placements through the same rows.

mod common;

use std::time::Duration;

use common::Schema;
use normandy_core::{
    ErrorKind, JoinOutcome, LeaseStatus, Member, Membership, NodeId, SessionId, SessionRegistry,
};
use normandy_tests::backends::{postgres_url, skip, skip_reason};

async fn schema(test: &str) -> Option<Schema> {
    match postgres_url().await {
        Some(url) => Some(Schema::new(&url).await),
        None => {
            skip(test, &skip_reason());
            None
        }
    }
}

fn member(name: &str, inc: u64, port: u16) -> Member {
    Member {
        node: NodeId::new(name, inc).unwrap(),
        address: format!("127.0.0.1:{port}"),
    }
}

/// Polls `f` every 20 ms until it is true, for at most 10 s.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn join_refresh_lapse_and_rejoin_follow_the_one_policy() {
    let Some(s) = schema("join_refresh_lapse_and_rejoin").await else {
        return;
    };
    let m = s.membership().await;
    let ttl = Duration::from_millis(400);
    let a1 = member("a", 1, 7001);
    let b1 = member("b", 1, 7002);
    assert_eq!(m.join(&a1, ttl).await.unwrap(), JoinOutcome::Joined);
    assert_eq!(
        m.join(&b1, Duration::from_secs(60)).await.unwrap(),
        JoinOutcome::Joined
    );
    let listed = m.members().await.unwrap();
    assert_eq!(listed, vec![a1.clone(), b1.clone()]);

    // The same node id again: its lease is live, so nothing is written and the error names it.
    let err = m.join(&a1, ttl).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("127.0.0.1:7001"), "{err}");
    // Another incarnation of a live name is told who holds it.
    let a2 = member("a", 2, 7003);
    match m.join(&a2, ttl).await.unwrap() {
        JoinOutcome::NameInUse(holder) => assert_eq!(holder, a1),
        other => panic!("expected NameInUse, got {other:?}"),
    }
    // A refresh with another address is not this node's lease: lost, nothing written.
    let imposter = Member {
        address: "10.0.0.9:1".into(),
        ..a1.clone()
    };
    assert_eq!(m.refresh(&imposter, ttl).await.unwrap(), LeaseStatus::Lost);
    assert_eq!(m.refresh(&a1, ttl).await.unwrap(), LeaseStatus::Held);

    // a#1 stops refreshing: it drops out of the list once its TTL passes on the server.
    eventually("a#1 drops out of the member list", || async {
        m.members().await.unwrap() == vec![b1.clone()]
    })
    .await;
    // A late refresh finds it lost and does not bring it back.
    assert_eq!(m.refresh(&a1, ttl).await.unwrap(), LeaseStatus::Lost);
    assert_eq!(m.members().await.unwrap(), vec![b1.clone()]);
    // The next incarnation of the name joins; the old one stays lost.
    assert_eq!(m.join(&a2, ttl).await.unwrap(), JoinOutcome::Joined);
    assert_eq!(m.refresh(&a1, ttl).await.unwrap(), LeaseStatus::Lost);
    // Leaving drops the lease at once.
    m.leave(&b1.node).await.unwrap();
    assert_eq!(m.members().await.unwrap(), vec![a2.clone()]);
    assert_eq!(m.refresh(&b1, ttl).await.unwrap(), LeaseStatus::Lost);
    s.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_concurrent_joins_under_one_name_exactly_one_wins() {
    let Some(s) = schema("of_concurrent_joins_under_one_name").await else {
        return;
    };
    let (m1, m2) = (s.membership().await, s.membership().await);
    for round in 0..10u64 {
        let name = format!("n{round}");
        let (x, y) = (member(&name, 1, 7100), member(&name, 2, 7101));
        let (rx, ry) = tokio::join!(
            m1.join(&x, Duration::from_secs(60)),
            m2.join(&y, Duration::from_secs(60))
        );
        let outcomes = [rx.unwrap(), ry.unwrap()];
        let joined = outcomes
            .iter()
            .filter(|o| **o == JoinOutcome::Joined)
            .count();
        assert_eq!(joined, 1, "round {round}: {outcomes:?}");
        let listed: Vec<_> = m1
            .members()
            .await
            .unwrap()
            .into_iter()
            .filter(|m| m.node.name() == name)
            .collect();
        assert_eq!(listed.len(), 1, "round {round}: {listed:?}");
    }
    s.drop().await;
}

#[tokio::test]
async fn a_placement_resolves_only_while_its_owners_member_lease_lives() {
    let Some(s) = schema("a_placement_resolves_only_while").await else {
        return;
    };
    let m = s.membership().await;
    let registry = s.registry().await;
    let ttl = Duration::from_millis(400);
    let (a, b) = (member("a", 1, 7201), member("b", 1, 7202));
    let id = SessionId::new("s1").unwrap();
    // No lease, no placement: a node must join before it places anything.
    let err = registry.register(&id, &a.node).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("no live lease"), "{err}");
    assert_eq!(registry.lookup(&id).await.unwrap(), None);

    m.join(&a, ttl).await.unwrap();
    m.join(&b, Duration::from_secs(60)).await.unwrap();
    let first = registry.register(&id, &a.node).await.unwrap();
    assert_eq!(first.owner, a.node);
    // Kept alive by refreshes across several TTLs.
    for _ in 0..4 {
        tokio::time::sleep(ttl / 3).await;
        assert_eq!(m.refresh(&a, ttl).await.unwrap(), LeaseStatus::Held);
        assert_eq!(registry.lookup(&id).await.unwrap(), Some(first.clone()));
        let e = registry.register(&id, &b.node).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyRegistered);
    }
    // a stops refreshing: its placement stops resolving, and b takes the id over with a
    // greater epoch in one statement.
    eventually("a's placement stops resolving", || async {
        registry.lookup(&id).await.unwrap().is_none()
    })
    .await;
    let taken = registry.register(&id, &b.node).await.unwrap();
    assert_eq!(taken.owner, b.node);
    assert!(taken.epoch > first.epoch);
    // The lapsed node can neither refresh nor place again.
    assert_eq!(m.refresh(&a, ttl).await.unwrap(), LeaseStatus::Lost);
    let err = registry
        .register(&SessionId::new("s2").unwrap(), &a.node)
        .await;
    assert_eq!(err.unwrap_err().kind(), ErrorKind::Unavailable);
    s.drop().await;
}

#[tokio::test]
async fn a_database_without_the_migration_is_refused_with_the_command_to_run() {
    let Some(s) = schema("a_database_without_the_migration").await else {
        return;
    };
    let err = normandy_registry_postgres::PgRegistry::connect(s.config().migrate_on_open(false))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MissingMigration, "{err}");
    assert!(err.to_string().contains("0001_registry"), "{err}");
    s.drop().await;
}

/// Eight nodes starting at once on an empty schema, straight to Postgres: every one opens, and
/// the migration is applied once. Afterwards `apply_migration` finds nothing to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_at_once_on_an_empty_schema_all_open_and_migrate_once() {
    let Some(s) = schema("nodes_starting_at_once_on_an_empty_schema").await else {
        return;
    };
    let opens: Vec<_> = (0..8)
        .map(|_| {
            let config = s.config();
            tokio::spawn(
                async move { normandy_registry_postgres::PgRegistry::connect(config).await },
            )
        })
        .collect();
    for o in opens {
        o.await.unwrap().expect("every node opens");
    }
    let root = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&s.url)
        .await
        .unwrap();
    let applied: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}.normandy_registry_migrations",
        s.name
    )))
    .fetch_one(&root)
    .await
    .unwrap();
    assert_eq!(applied, 1, "the migration was applied once");
    root.close().await;
    let again = normandy_registry_postgres::apply_migration(&s.config())
        .await
        .unwrap();
    assert!(!again, "a migrated database has nothing to apply");
    s.drop().await;
}

/// Through PgBouncer in transaction mode (`NORMANDY_TEST_PGBOUNCER_URL`): four nodes starting
/// at once apply the migration once, into the schema asked for (the pooler drops the
/// `search_path` startup parameter, so only `SET LOCAL` puts it there), and the lease policy
/// holds on whichever server connection each call lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_transaction_pooler_the_migration_applies_once_and_leases_hold() {
    let Some(url) = postgres_url().await else {
        skip("through_a_transaction_pooler", &skip_reason());
        return;
    };
    let Some(pooler) = common::pgbouncer_url() else {
        skip(
            "through_a_transaction_pooler",
            &format!("{} is not set", common::PGBOUNCER_URL_VAR),
        );
        return;
    };
    let s = Schema::pooled(&url, &pooler).await;
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let config = s.config();
            tokio::spawn(
                async move { normandy_registry_postgres::PgMembership::connect(config).await },
            )
        })
        .collect();
    let mut ms = Vec::new();
    for o in opens {
        ms.push(o.await.unwrap().expect("connect through the pooler"));
    }
    let root = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let applied: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}.normandy_registry_migrations",
        s.name
    )))
    .fetch_one(&root)
    .await
    .unwrap();
    assert_eq!(applied, 1, "the migration was applied once");
    let ttl = Duration::from_millis(500);
    let a = member("a", 1, 7301);
    assert_eq!(ms[0].join(&a, ttl).await.unwrap(), JoinOutcome::Joined);
    for m in &ms {
        assert_eq!(m.refresh(&a, ttl).await.unwrap(), LeaseStatus::Held);
        assert_eq!(m.members().await.unwrap(), vec![a.clone()]);
    }
    let leases: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}.normandy_node_leases",
        s.name
    )))
    .fetch_one(&root)
    .await
    .unwrap();
    assert_eq!(leases, 1, "the lease row is in the test's schema");
    eventually("a's lease lapses", || async {
        ms[1].members().await.unwrap().is_empty()
    })
    .await;
    assert_eq!(ms[2].refresh(&a, ttl).await.unwrap(), LeaseStatus::Lost);
    root.close().await;
    s.drop().await;
}
