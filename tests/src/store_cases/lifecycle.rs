//! The end of a session's life: `mark_terminal` (fenced, idempotent) and `delete`.

use std::sync::Arc;

use normandy_core::{ErrorKind, NewSession, ResumePolicy, SessionStatus};

use super::{
    applied, batch, busy, err, idle, input, load, names, node, ok, reply, sid, snapshot, start,
};
use crate::harness::StoreHarness;

/// Precondition: none. `mark_terminal` with a stale epoch is `Fenced` and leaves the session
/// open; with the current epoch it closes it (epoch unchanged, history kept), and again is Ok.
pub async fn mark_terminal_is_fenced_and_idempotent(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let id = sid("terminal");
    let e1 = start(&*store, &id, ResumePolicy::Eager, &node("a")).await;
    applied(
        store
            .commit(&id, e1, 0, &batch(vec![input(1, "in-1"), reply(2)], idle()))
            .await,
        2,
        "commit",
    );
    let e2 = ok(store.activate(&id, &node("b")).await, "takeover").epoch;
    let before = snapshot(&*store, &id).await;
    let e = err(
        store.mark_terminal(&id, e1).await,
        ErrorKind::Fenced,
        "mark_terminal with a stale epoch",
    );
    names(&e, &id, "Fenced");
    assert_eq!(
        snapshot(&*store, &id).await,
        before,
        "a fenced mark_terminal changed the session"
    );
    ok(store.mark_terminal(&id, e2).await, "mark_terminal");
    let (rec, entries) = snapshot(&*store, &id).await;
    assert_eq!(rec.status, SessionStatus::Terminal);
    assert_eq!(rec.epoch, e2, "mark_terminal must not change the epoch");
    assert_eq!(rec.seq, 2);
    assert_eq!(entries, before.1, "mark_terminal must keep the history");
    ok(
        store.mark_terminal(&id, e2).await,
        "mark_terminal again (idempotent)",
    );
    let again = load(&*store, &id).await;
    assert_eq!(again.status, SessionStatus::Terminal);
    assert_eq!((again.epoch, again.seq), (e2, 2));
}

/// Precondition: none. `mark_terminal` of an unknown id is `NotFound`.
pub async fn mark_terminal_unknown_is_not_found(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let id = sid("no-terminal");
    let e = err(
        store.mark_terminal(&id, 1).await,
        ErrorKind::NotFound,
        "mark_terminal of an unknown id",
    );
    names(&e, &id, "NotFound");
}

/// Precondition: none. `delete` removes the session and its entries (`Ok(true)`), then reports
/// `Ok(false)`; every operation sees it gone; other sessions are untouched; the id can be
/// created afresh, with no memory of its old entries or input ids.
pub async fn delete_removes_session_and_entries(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let a = node("a");
    let (id, keep) = (sid("delete"), sid("keep"));
    let epoch = start(&*store, &id, ResumePolicy::Eager, &a).await;
    applied(
        store
            .commit(
                &id,
                epoch,
                0,
                &batch(vec![input(1, "in-1"), reply(2)], busy("in-1", 1)),
            )
            .await,
        2,
        "commit",
    );
    let keep_epoch = start(&*store, &keep, ResumePolicy::Lazy, &a).await;
    applied(
        store
            .commit(&keep, keep_epoch, 0, &batch(vec![input(1, "in-1")], idle()))
            .await,
        1,
        "commit",
    );
    let kept = snapshot(&*store, &keep).await;

    assert!(
        ok(store.delete(&id).await, "delete"),
        "delete of a stored session returned false"
    );
    assert!(
        ok(store.load(&id).await, "load").is_none(),
        "load still finds a deleted session"
    );
    err(
        store.entries(&id, 0, 10).await,
        ErrorKind::NotFound,
        "entries of a deleted session",
    );
    err(
        store.activate(&id, &a).await,
        ErrorKind::NotFound,
        "activate a deleted session",
    );
    err(
        store
            .commit(&id, epoch, 2, &batch(vec![reply(3)], idle()))
            .await,
        ErrorKind::NotFound,
        "commit to a deleted session",
    );
    assert!(
        !ok(store.delete(&id).await, "delete again"),
        "second delete returned true"
    );
    assert_eq!(
        snapshot(&*store, &keep).await,
        kept,
        "delete touched another session"
    );

    ok(
        store
            .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
            .await,
        "create the deleted id again",
    );
    let (rec, entries) = snapshot(&*store, &id).await;
    assert_eq!(rec.seq, 0, "a re-created session starts at seq 0");
    assert_eq!(rec.status, SessionStatus::Active);
    assert!(
        entries.is_empty(),
        "a re-created session shows the old entries"
    );
    let epoch = ok(store.activate(&id, &a).await, "activate").epoch;
    applied(
        store
            .commit(&id, epoch, 0, &batch(vec![input(1, "in-1")], idle()))
            .await,
        1,
        "an input id of the deleted session (forgotten with it)",
    );
}
