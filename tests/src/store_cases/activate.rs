//! `activate`: the epoch bump and new owner, unknown and terminal sessions, and concurrent
//! activations of one session.

use std::collections::BTreeSet;
use std::sync::Arc;

use normandy_core::{Epoch, ErrorKind, NewSession, NodeId, ResumePolicy, SessionStatus};

use super::{applied, batch, busy, err, input, load, names, node, ok, sid, snapshot, start};
use crate::harness::StoreHarness;

/// Precondition: none. Each activation — by any node, the same node twice, through either
/// handle — returns a strictly greater epoch, sets the owner, and fences every older epoch.
pub async fn activate_bumps_epoch_and_sets_owner(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let other = h.reopen().await;
    let id = sid("activate");
    ok(
        store
            .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
            .await,
        "create",
    );
    let (a, b) = (node("a"), node("b"));
    let order = [&a, &b, &b, &a, &a, &b];
    let mut last: Epoch = 0;
    for (i, who) in order.iter().enumerate() {
        let handle = if i % 2 == 0 { &store } else { &other };
        let rec = ok(handle.activate(&id, who).await, "activate");
        assert_eq!(rec.id, id);
        assert!(
            rec.epoch > last,
            "activation {i} returned epoch {}, not greater than the previous {last}",
            rec.epoch
        );
        assert_eq!(
            rec.owner.as_ref(),
            Some(*who),
            "activate must set the owner"
        );
        assert_eq!(rec.seq, 0);
        let loaded = load(&*store, &id).await;
        assert_eq!(
            loaded.epoch, rec.epoch,
            "load disagrees with activate's epoch"
        );
        assert_eq!(loaded.owner.as_ref(), Some(*who));
        if last > 0 {
            // Even the same node's older activation is fenced: an epoch is a writer, not a node.
            let e = err(
                store
                    .commit(
                        &id,
                        last,
                        0,
                        &batch(vec![input(1, "late")], busy("late", 1)),
                    )
                    .await,
                ErrorKind::Fenced,
                "commit with the previous epoch",
            );
            names(&e, &id, "Fenced");
        }
        last = rec.epoch;
    }
    applied(
        store
            .commit(
                &id,
                last,
                0,
                &batch(vec![input(1, "late")], busy("late", 1)),
            )
            .await,
        1,
        "commit with the current epoch (the fenced attempts wrote nothing)",
    );
}

/// Precondition: none. `activate` of an unknown id is `NotFound` naming it.
pub async fn activate_unknown_is_not_found(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let id = sid("nobody");
    let e = err(
        store.activate(&id, &node("a")).await,
        ErrorKind::NotFound,
        "activate unknown",
    );
    names(&e, &id, "NotFound");
    assert!(
        ok(store.load(&id).await, "load").is_none(),
        "activate created a session"
    );
}

/// Precondition: none. `activate` of a terminal session is `SessionClosed`, and neither epoch
/// nor owner nor anything else changes.
pub async fn activate_terminal_is_session_closed_and_changes_nothing(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let id = sid("closed");
    let a = node("a");
    let epoch = start(&*store, &id, ResumePolicy::Eager, &a).await;
    applied(
        store
            .commit(
                &id,
                epoch,
                0,
                &batch(vec![input(1, "in-1")], busy("in-1", 1)),
            )
            .await,
        1,
        "commit",
    );
    ok(store.mark_terminal(&id, epoch).await, "mark_terminal");
    let before = snapshot(&*store, &id).await;
    assert_eq!(before.0.status, SessionStatus::Terminal);
    let e = err(
        store.activate(&id, &node("b")).await,
        ErrorKind::SessionClosed,
        "activate a terminal session",
    );
    names(&e, &id, "SessionClosed");
    assert_eq!(
        snapshot(&*store, &id).await,
        before,
        "a refused activation changed the session"
    );
}

/// Precondition: none. Concurrent activations through both handles each get a distinct epoch;
/// the stored epoch is the greatest, and its owner the node that got it.
pub async fn concurrent_activations_get_distinct_epochs(h: Arc<dyn StoreHarness>) {
    let stores = [h.store(), h.reopen().await];
    let id = sid("activate-race");
    ok(
        stores[0]
            .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
            .await,
        "create",
    );
    let n = 20;
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for i in 0..n {
        let store = stores[i % 2].clone();
        let (id, barrier) = (id.clone(), barrier.clone());
        let who = node(&format!("racer{i}"));
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let rec = store.activate(&id, &who).await;
            (who, rec)
        }));
    }
    let mut epochs = BTreeSet::new();
    let mut best: Option<(Epoch, NodeId)> = None;
    for t in tasks {
        let (who, rec) = t.await.expect("activation task panicked");
        let rec = ok(rec, "concurrent activate");
        assert!(
            epochs.insert(rec.epoch),
            "two concurrent activations both got epoch {}",
            rec.epoch
        );
        if best.as_ref().is_none_or(|(e, _)| rec.epoch > *e) {
            best = Some((rec.epoch, who));
        }
    }
    let (max, winner) = best.expect("at least one activation");
    let rec = load(&*stores[0], &id).await;
    assert_eq!(
        rec.epoch, max,
        "stored epoch is not the greatest handed out"
    );
    assert_eq!(
        rec.owner,
        Some(winner),
        "stored owner is not the node that got the greatest epoch"
    );
}
