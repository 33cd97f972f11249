//! The registry conformance suite: one case per `# Behavior` bullet of
//! [`SessionRegistry`](normandy_core::SessionRegistry) and DESIGN.md's registry contract.
//!
//! Every case is a plain `pub async fn case(h: Arc<dyn RegistryHarness>)`;
//! [`registry_conformance!`](crate::registry_conformance) stamps one test per case. Each case's
//! doc names its precondition; cases use fresh random ids and node names.

use std::sync::Arc;
use std::time::Duration;

use normandy_core::{Error, ErrorKind, NodeId, Placement, Result, SessionId};
use uuid::Uuid;

use crate::harness::RegistryHarness;

fn token() -> String {
    Uuid::now_v7().simple().to_string()
}

fn sid(tag: &str) -> SessionId {
    SessionId::new(format!("{tag}-{}", token())).expect("valid session id")
}

/// A fresh node id, made live in the harness (a lease, where the registry needs one).
async fn node(h: &Arc<dyn RegistryHarness>, tag: &str) -> NodeId {
    let n = NodeId::new(format!("{tag}-{}", token()), 1).expect("valid node id");
    h.make_live(&n).await;
    n
}

/// `n`'s name with the next incarnation (what the node is after a restart), made live.
async fn reborn(h: &Arc<dyn RegistryHarness>, n: &NodeId) -> NodeId {
    let r = NodeId::new(n.name(), n.incarnation() + 1).expect("valid node id");
    h.make_live(&r).await;
    r
}

#[track_caller]
fn ok<T>(res: Result<T>, what: &str) -> T {
    match res {
        Ok(v) => v,
        Err(e) => panic!("{what}: unexpected error ({:?}): {e}", e.kind()),
    }
}

/// Asserts `res` is `AlreadyRegistered` naming `id` and `owner`; returns the epoch it reports.
#[track_caller]
fn already_registered(res: Result<Placement>, id: &SessionId, owner: &NodeId, what: &str) -> u64 {
    match res {
        Ok(p) => panic!("{what}: expected AlreadyRegistered, got Ok({p:?})"),
        Err(Error::AlreadyRegistered {
            session,
            owner: holder,
            epoch,
        }) => {
            assert_eq!(
                &session, id,
                "{what}: AlreadyRegistered names the wrong session"
            );
            assert_eq!(
                &holder, owner,
                "{what}: AlreadyRegistered names the wrong owner"
            );
            epoch
        }
        Err(e) => panic!(
            "{what}: expected AlreadyRegistered, got {:?}: {e}",
            e.kind()
        ),
    }
}

/// Precondition: none. `register` places an id on its owner, `lookup` resolves it from both
/// handles, `unregister` by the owner releases it (`Ok(true)`), after which nothing resolves.
pub async fn register_lookup_unregister(h: Arc<dyn RegistryHarness>) {
    let reg = h.registry();
    let other = h.reopen().await;
    let (id, a) = (sid("reg"), node(&h, "a").await);
    let placed = ok(reg.register(&id, &a).await, "register");
    assert_eq!(placed.owner, a, "register placed the id on another node");
    for handle in [&reg, &other] {
        assert_eq!(
            ok(handle.lookup(&id).await, "lookup"),
            Some(placed.clone()),
            "lookup must return the placement register returned"
        );
    }
    assert!(
        ok(reg.unregister(&id, &a).await, "unregister"),
        "unregister by the owner returned false"
    );
    for handle in [&reg, &other] {
        assert_eq!(
            ok(handle.lookup(&id).await, "lookup"),
            None,
            "an unregistered id still resolves"
        );
    }
    assert!(
        !ok(reg.unregister(&id, &a).await, "unregister again"),
        "unregistering a released id returned true"
    );
}

/// Precondition: none. `lookup` of an id never registered is `Ok(None)`; `unregister` of it is
/// `Ok(false)`.
pub async fn lookup_and_unregister_unknown(h: Arc<dyn RegistryHarness>) {
    let reg = h.registry();
    let id = sid("nobody");
    assert_eq!(ok(reg.lookup(&id).await, "lookup unknown"), None);
    assert!(!ok(
        reg.unregister(&id, &node(&h, "a").await).await,
        "unregister unknown"
    ));
}

/// Precondition: none. Registering again by the current owner (through either handle) returns
/// its existing placement, same epoch.
pub async fn reregister_by_owner_returns_same_placement(h: Arc<dyn RegistryHarness>) {
    let reg = h.registry();
    let other = h.reopen().await;
    let (id, a) = (sid("again"), node(&h, "a").await);
    let first = ok(reg.register(&id, &a).await, "register");
    for handle in [&reg, &other] {
        assert_eq!(
            ok(
                handle.register(&id, &a).await,
                "register again by the owner"
            ),
            first,
            "re-registering by the owner must return the existing placement"
        );
    }
    assert_eq!(ok(reg.lookup(&id).await, "lookup"), Some(first));
}

/// Precondition: none. Registering an id another node holds is `AlreadyRegistered` naming the
/// holder and its epoch — also for the holder's name with another incarnation — and the
/// placement is unchanged.
pub async fn register_by_another_node_is_already_registered(h: Arc<dyn RegistryHarness>) {
    let reg = h.registry();
    let other = h.reopen().await;
    let (id, a, b) = (sid("taken"), node(&h, "a").await, node(&h, "b").await);
    let placed = ok(reg.register(&id, &a).await, "register");
    let next_life = reborn(&h, &a).await;
    for (handle, who) in [(&reg, &b), (&other, &b), (&reg, &next_life)] {
        let epoch = already_registered(
            handle.register(&id, who).await,
            &id,
            &a,
            "register a held id",
        );
        assert_eq!(
            epoch, placed.epoch,
            "AlreadyRegistered reports the wrong epoch"
        );
        let msg = handle
            .register(&id, who)
            .await
            .expect_err("still held")
            .to_string();
        assert!(
            msg.contains(id.as_str()) && msg.contains(a.name()),
            "AlreadyRegistered's message must name the session and the owner: {msg}"
        );
    }
    assert_eq!(
        ok(reg.lookup(&id).await, "lookup"),
        Some(placed),
        "a refused register changed the placement"
    );
}

/// Precondition: none. `unregister` by a node that is not the owner (another node, or the
/// owner's name with another incarnation) releases nothing: `Ok(false)`, placement unchanged.
pub async fn unregister_by_non_owner_is_a_noop(h: Arc<dyn RegistryHarness>) {
    let reg = h.registry();
    let other = h.reopen().await;
    let (id, a, b) = (sid("keep"), node(&h, "a").await, node(&h, "b").await);
    let placed = ok(reg.register(&id, &a).await, "register");
    let next_life = reborn(&h, &a).await;
    for (handle, who) in [(&reg, &b), (&other, &b), (&reg, &next_life)] {
        assert!(
            !ok(
                handle.unregister(&id, who).await,
                "unregister by a non-owner"
            ),
            "unregister by {who} (not the owner) returned true"
        );
        assert_eq!(
            ok(reg.lookup(&id).await, "lookup"),
            Some(placed.clone()),
            "unregister by a non-owner changed the placement"
        );
    }
}

/// Precondition: none. Each new registration of an id — by another node or the same one, after
/// an unregister, through either handle — has a greater epoch than the last.
pub async fn epochs_grow_across_reregistration(h: Arc<dyn RegistryHarness>) {
    let handles = [h.registry(), h.reopen().await];
    let id = sid("epochs");
    let (a, b) = (node(&h, "a").await, node(&h, "b").await);
    let mut last = None;
    for (i, who) in [&a, &b, &b, &a, &a].into_iter().enumerate() {
        let reg = &handles[i % 2];
        let placed = ok(reg.register(&id, who).await, "register");
        assert_eq!(&placed.owner, who);
        if let Some(prev) = last {
            assert!(
                placed.epoch > prev,
                "registration {i} got epoch {}, not greater than the previous {prev}",
                placed.epoch
            );
        }
        last = Some(placed.epoch);
        assert!(ok(reg.unregister(&id, who).await, "unregister"));
    }
}

/// Precondition: none. Placements of different ids are independent: each can be held by a
/// different node, and releasing one leaves the other.
pub async fn distinct_ids_are_independent(h: Arc<dyn RegistryHarness>) {
    let reg = h.registry();
    let (x, y) = (sid("x"), sid("y"));
    let (a, b) = (node(&h, "a").await, node(&h, "b").await);
    let px = ok(reg.register(&x, &a).await, "register x");
    let py = ok(reg.register(&y, &b).await, "register y on another node");
    assert!(ok(reg.unregister(&x, &a).await, "unregister x"));
    assert_eq!(ok(reg.lookup(&x).await, "lookup x"), None);
    assert_eq!(ok(reg.lookup(&y).await, "lookup y"), Some(py));
    assert_eq!(px.owner, a);
}

/// Precondition: none. 100 concurrent registrations of one id by 100 different nodes, split
/// across `registry()` and `reopen()` handles: exactly one wins, every loser gets
/// `AlreadyRegistered` naming the winner and its epoch, and lookup resolves to the winner.
pub async fn concurrent_registrations_have_one_winner(h: Arc<dyn RegistryHarness>) {
    const RACERS: usize = 100;
    let handles = [h.registry(), h.reopen().await];
    let id = sid("race");
    let barrier = Arc::new(tokio::sync::Barrier::new(RACERS));
    let mut tasks = Vec::new();
    for i in 0..RACERS {
        let reg = handles[i % 2].clone();
        let (id, barrier) = (id.clone(), barrier.clone());
        let who = NodeId::new(format!("racer-{i}-{}", token()), i as u64).expect("node id");
        h.make_live(&who).await;
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let res = reg.register(&id, &who).await;
            (who, res)
        }));
    }
    let mut winners = Vec::new();
    let mut losers = Vec::new();
    for t in tasks {
        let (who, res) = t.await.expect("racer panicked");
        match res {
            Ok(p) => {
                assert_eq!(p.owner, who, "the winner's placement names another node");
                winners.push(p);
            }
            Err(Error::AlreadyRegistered {
                session,
                owner,
                epoch,
            }) => {
                assert_eq!(session, id);
                losers.push((who, owner, epoch));
            }
            Err(e) => panic!(
                "a racer got {:?} instead of AlreadyRegistered: {e}",
                e.kind()
            ),
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "{} concurrent registrations won",
        winners.len()
    );
    let winner = winners.pop().expect("one winner");
    assert_eq!(losers.len(), RACERS - 1);
    for (who, owner, epoch) in &losers {
        assert_ne!(who, &winner.owner);
        assert_eq!(owner, &winner.owner, "a loser was told another node won");
        assert_eq!(*epoch, winner.epoch, "a loser was told another epoch");
    }
    for reg in &handles {
        assert_eq!(
            ok(reg.lookup(&id).await, "lookup"),
            Some(winner.clone()),
            "lookup does not resolve to the winner"
        );
    }
    let loser = &losers[0].0;
    assert!(!ok(
        handles[1].unregister(&id, loser).await,
        "unregister by a loser"
    ));
    assert!(ok(
        handles[1].unregister(&id, &winner.owner).await,
        "unregister by the winner"
    ));
}

/// Precondition: the harness declares leases (`has_leases`); otherwise the case passes with a
/// note. After a node's lease lapses its placements stop resolving (other nodes' do not), and
/// another node can register the id with a greater epoch.
pub async fn expired_lease_stops_resolving(h: Arc<dyn RegistryHarness>) {
    if !h.has_leases() {
        eprintln!("expired_lease_stops_resolving: backend declares no leases; nothing to check");
        return;
    }
    let reg = h.registry();
    let other = h.reopen().await;
    let (id, kept) = (sid("leased"), sid("survivor"));
    let (dead, alive, heir) = (
        node(&h, "dead").await,
        node(&h, "alive").await,
        node(&h, "heir").await,
    );
    let old = ok(
        reg.register(&id, &dead).await,
        "register on the node about to die",
    );
    let survivor = ok(reg.register(&kept, &alive).await, "register on a live node");
    h.expire_node(&dead).await;
    // A lapse may take a moment to be observed (server-side expiry); never more than seconds.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let a = ok(reg.lookup(&id).await, "lookup");
        let b = ok(other.lookup(&id).await, "lookup on the other handle");
        if a.is_none() && b.is_none() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a placement of an expired node still resolves after 10 s: {a:?} / {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        ok(reg.lookup(&kept).await, "lookup"),
        Some(survivor),
        "another node's placement stopped resolving"
    );
    let placed = ok(
        other.register(&id, &heir).await,
        "register after the lease lapsed",
    );
    assert_eq!(placed.owner, heir);
    assert!(
        placed.epoch > old.epoch,
        "the new owner's epoch {} is not greater than the dead owner's {}",
        placed.epoch,
        old.epoch
    );
    assert_eq!(ok(reg.lookup(&id).await, "lookup"), Some(placed.clone()));
    let e = reg.register(&id, &dead).await;
    assert_eq!(
        e.as_ref().map_err(Error::kind).err(),
        Some(ErrorKind::AlreadyRegistered),
        "the dead node re-registering must lose to the heir: {e:?}"
    );
}
