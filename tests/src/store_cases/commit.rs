//! `commit`: applying a batch, and every way one is refused — a stale epoch (fencing), a moved
//! seq (conflict), an input id already recorded (also across a reopen), bad numbering, an
//! unknown or terminal session.

use std::sync::Arc;

use normandy_core::{Entry, Error, ErrorKind, ResumePolicy};

use super::{
    all_entries, applied, batch, busy, duplicate, err, idle, input, load, names, node, ok, queued,
    reply, sid, snapshot, start,
};
use crate::harness::StoreHarness;

/// Precondition: none. A commit at the current (epoch, seq) writes its entries and state,
/// returns the new seq, and the next commit continues from it.
pub async fn commit_applies_and_returns_new_seq(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let id = sid("commit");
    let epoch = start(&*store, &id, ResumePolicy::Lazy, &node("a")).await;
    let first = batch(vec![input(1, "in-1"), reply(2)], busy("in-1", 1));
    applied(store.commit(&id, epoch, 0, &first).await, 2, "first commit");
    let rec = load(&*store, &id).await;
    assert_eq!(rec.seq, 2);
    assert_eq!(
        rec.state, first.state,
        "stored state differs from the committed one"
    );
    assert_eq!(rec.epoch, epoch, "a commit must not change the epoch");
    assert_eq!(all_entries(&*store, &id).await, first.entries);

    let second = batch(vec![input(3, "in-2"), reply(4), reply(5)], idle());
    applied(
        store.commit(&id, epoch, 2, &second).await,
        5,
        "second commit",
    );
    let rec = load(&*store, &id).await;
    assert_eq!(rec.seq, 5);
    assert_eq!(rec.state, idle());
    let mut want = first.entries.clone();
    want.extend(second.entries.clone());
    assert_eq!(all_entries(&*store, &id).await, want);
    assert!(
        rec.updated_at_ms >= rec.created_at_ms,
        "updated_at_ms precedes created_at_ms"
    );
}

/// Precondition: none. A batch with no entries is valid: it replaces the turn state and leaves
/// the seq where it was.
pub async fn commit_without_entries_updates_only_state(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let id = sid("state-only");
    let epoch = start(&*store, &id, ResumePolicy::Lazy, &node("a")).await;
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
    applied(
        store.commit(&id, epoch, 1, &batch(vec![], idle())).await,
        1,
        "state-only commit",
    );
    let (rec, entries) = snapshot(&*store, &id).await;
    assert_eq!(rec.seq, 1);
    assert_eq!(
        rec.state,
        idle(),
        "a state-only commit did not replace the state"
    );
    assert_eq!(entries, vec![input(1, "in-1")]);
}

/// Precondition: none. A commit with an epoch other than the current one (older, or never
/// handed out) is `Fenced` with both epochs, and NOTHING is written: record and entries are
/// unchanged and its input id is not remembered.
pub async fn commit_stale_epoch_is_fenced_and_writes_nothing(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let id = sid("fenced");
    let e1 = start(&*store, &id, ResumePolicy::Eager, &node("a")).await;
    applied(
        store
            .commit(
                &id,
                e1,
                0,
                &batch(vec![input(1, "in-1"), reply(2)], busy("in-1", 1)),
            )
            .await,
        2,
        "commit before the takeover",
    );
    let e2 = ok(store.activate(&id, &node("b")).await, "takeover").epoch;
    let before = snapshot(&*store, &id).await;

    let late = batch(vec![input(3, "in-late"), reply(4)], idle());
    let e = err(
        store.commit(&id, e1, 2, &late).await,
        ErrorKind::Fenced,
        "commit with the old epoch",
    );
    names(&e, &id, "Fenced");
    match &e {
        Error::Fenced {
            session,
            epoch,
            current,
        } => {
            assert_eq!(session, &id);
            assert_eq!(*epoch, e1, "Fenced must report the epoch the writer used");
            assert_eq!(*current, e2, "Fenced must report the current epoch");
        }
        other => panic!("expected Error::Fenced, got {other:?}"),
    }
    assert_eq!(
        snapshot(&*store, &id).await,
        before,
        "a fenced commit wrote something"
    );
    err(
        store.commit(&id, e2 + 1000, 2, &late).await,
        ErrorKind::Fenced,
        "commit with an epoch never handed out",
    );
    assert_eq!(
        snapshot(&*store, &id).await,
        before,
        "a fenced commit wrote something"
    );
    // Had a fenced attempt recorded "in-late", this would be DuplicateInput.
    applied(
        store.commit(&id, e2, 2, &late).await,
        4,
        "the same batch with the current epoch",
    );
}

/// Precondition: none. A commit whose `expected_seq` is behind or ahead of the stored seq is
/// `Conflict` with both seqs, and nothing is written.
pub async fn commit_moved_seq_is_conflict_and_writes_nothing(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let id = sid("conflict");
    let epoch = start(&*store, &id, ResumePolicy::Lazy, &node("a")).await;
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
    let before = snapshot(&*store, &id).await;

    let behind = batch(vec![input(1, "in-x"), reply(2)], idle());
    let e = err(
        store.commit(&id, epoch, 0, &behind).await,
        ErrorKind::Conflict,
        "commit behind the stored seq",
    );
    names(&e, &id, "Conflict");
    match &e {
        Error::Conflict {
            expected, actual, ..
        } => {
            assert_eq!(
                (*expected, *actual),
                (0, 2),
                "Conflict reports the wrong seqs"
            );
        }
        other => panic!("expected Error::Conflict, got {other:?}"),
    }
    assert_eq!(
        snapshot(&*store, &id).await,
        before,
        "a conflicting commit wrote"
    );

    let ahead = batch(vec![input(6, "in-y")], idle());
    err(
        store.commit(&id, epoch, 5, &ahead).await,
        ErrorKind::Conflict,
        "commit ahead of the stored seq",
    );
    assert_eq!(
        snapshot(&*store, &id).await,
        before,
        "a conflicting commit wrote"
    );

    applied(
        store
            .commit(
                &id,
                epoch,
                2,
                &batch(vec![input(3, "in-x"), input(4, "in-y")], idle()),
            )
            .await,
        4,
        "the refused input ids at the right seq (they were not recorded)",
    );
}

/// Precondition: none. A batch carrying an input id already stored returns
/// `DuplicateInput { seq }` of the original `Input` entry and writes nothing — whether retried
/// as is (stale expected seq), at the current seq, or mixed with a new input.
pub async fn commit_duplicate_input_returns_original_seq(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let id = sid("dup");
    let epoch = start(&*store, &id, ResumePolicy::Lazy, &node("a")).await;
    let original = batch(vec![input(1, "in-1"), reply(2)], busy("in-1", 1));
    applied(store.commit(&id, epoch, 0, &original).await, 2, "original");
    applied(
        store
            .commit(
                &id,
                epoch,
                2,
                &batch(vec![reply(3), input(4, "in-2")], queued("in-2", 4)),
            )
            .await,
        4,
        "second batch",
    );
    let before = snapshot(&*store, &id).await;

    duplicate(
        store.commit(&id, epoch, 0, &original).await,
        "in-1",
        1,
        "the original batch retried as is",
    );
    duplicate(
        store
            .commit(&id, epoch, 4, &batch(vec![input(5, "in-1")], idle()))
            .await,
        "in-1",
        1,
        "the input again at the current seq",
    );
    duplicate(
        store
            .commit(&id, epoch, 4, &batch(vec![input(5, "in-2")], idle()))
            .await,
        "in-2",
        4,
        "an input that was not first in its batch",
    );
    duplicate(
        store
            .commit(
                &id,
                epoch,
                4,
                &batch(vec![input(5, "in-new"), input(6, "in-1")], idle()),
            )
            .await,
        "in-1",
        1,
        "a batch mixing a new input with a stored one",
    );
    assert_eq!(
        snapshot(&*store, &id).await,
        before,
        "a duplicate input was written"
    );
    applied(
        store
            .commit(&id, epoch, 4, &batch(vec![input(5, "in-new")], idle()))
            .await,
        5,
        "the new input alone (the mixed batch must not have stored it)",
    );
}

/// Precondition: none. Input ids are durable state, not a handle's cache: after a takeover
/// through a second handle, resubmitting a stored input id is still `DuplicateInput`.
pub async fn duplicate_input_is_detected_across_reopen(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let id = sid("dup-reopen");
    let e1 = start(&*store, &id, ResumePolicy::Lazy, &node("a")).await;
    applied(
        store
            .commit(&id, e1, 0, &batch(vec![input(1, "in-1"), reply(2)], idle()))
            .await,
        2,
        "original",
    );
    let other = h.reopen().await;
    let e2 = ok(other.activate(&id, &node("b")).await, "activate on reopen").epoch;
    let before = snapshot(&*other, &id).await;
    duplicate(
        other
            .commit(&id, e2, 2, &batch(vec![input(3, "in-1")], idle()))
            .await,
        "in-1",
        1,
        "resubmission through the reopened handle",
    );
    duplicate(
        store
            .commit(&id, e2, 2, &batch(vec![input(3, "in-1")], idle()))
            .await,
        "in-1",
        1,
        "resubmission through the first handle with the new epoch",
    );
    assert_eq!(
        snapshot(&*store, &id).await,
        before,
        "a duplicate was written"
    );
}

/// Precondition: none. Entries that do not continue `expected_seq` one by one (wrong start,
/// gap, repeat) or that carry one input id twice are `InvalidInput` naming the session, and
/// nothing is written.
pub async fn commit_bad_numbering_is_invalid_input(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let id = sid("numbering");
    let epoch = start(&*store, &id, ResumePolicy::Lazy, &node("a")).await;
    applied(
        store
            .commit(
                &id,
                epoch,
                0,
                &batch(vec![input(1, "in-1"), reply(2)], idle()),
            )
            .await,
        2,
        "commit",
    );
    let before = snapshot(&*store, &id).await;
    let bad: [(&str, Vec<Entry>); 5] = [
        ("a batch starting past expected_seq + 1", vec![reply(4)]),
        ("a batch restarting at seq 1", vec![reply(1)]),
        ("a batch with a gap", vec![reply(3), reply(5)]),
        ("a batch repeating a seq", vec![reply(3), reply(3)]),
        (
            "a batch carrying one input id twice",
            vec![input(3, "in-x"), input(4, "in-x")],
        ),
    ];
    for (what, entries) in bad {
        let e = err(
            store.commit(&id, epoch, 2, &batch(entries, idle())).await,
            ErrorKind::InvalidInput,
            what,
        );
        names(&e, &id, what);
        assert_eq!(
            snapshot(&*store, &id).await,
            before,
            "{what} wrote something"
        );
    }
}

/// Precondition: none. A commit to an unknown id is `NotFound` and creates nothing.
pub async fn commit_unknown_session_is_not_found(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let id = sid("ghost");
    let e = err(
        store
            .commit(&id, 1, 0, &batch(vec![input(1, "in-1")], idle()))
            .await,
        ErrorKind::NotFound,
        "commit to an unknown id",
    );
    names(&e, &id, "NotFound");
    assert!(
        ok(store.load(&id).await, "load").is_none(),
        "commit created a session"
    );
}

/// Precondition: none. After `mark_terminal`, a commit with the current epoch is
/// `SessionClosed` and nothing is written; history stays readable.
pub async fn commit_after_terminal_is_session_closed(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let id = sid("after-close");
    let epoch = start(&*store, &id, ResumePolicy::Eager, &node("a")).await;
    applied(
        store
            .commit(
                &id,
                epoch,
                0,
                &batch(vec![input(1, "in-1"), reply(2)], idle()),
            )
            .await,
        2,
        "commit",
    );
    ok(store.mark_terminal(&id, epoch).await, "mark_terminal");
    let before = snapshot(&*store, &id).await;
    assert_eq!(before.1.len(), 2, "history must stay readable after close");
    let e = err(
        store
            .commit(
                &id,
                epoch,
                2,
                &batch(vec![input(3, "in-2")], busy("in-2", 3)),
            )
            .await,
        ErrorKind::SessionClosed,
        "commit to a terminal session",
    );
    names(&e, &id, "SessionClosed");
    assert_eq!(
        snapshot(&*store, &id).await,
        before,
        "a commit to a terminal session wrote"
    );
}
