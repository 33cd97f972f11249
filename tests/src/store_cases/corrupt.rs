//! Bad data (invariant 7): corrupt turn-state and entry bytes and a newer format version are
//! typed errors naming the session, never a panic.

use std::sync::Arc;

use normandy_core::codec::{self, BlobKind, FORMAT_VERSION};
use normandy_core::{Error, ErrorKind, OwnerFilter, ResumePolicy, Seq, SessionId};

use super::{
    all_entries, applied, batch, busy, err, idle, input, load, names, node, ok, reply, sid,
    snapshot, start,
};
use crate::harness::StoreHarness;

fn corrupt_variants(kind: BlobKind) -> Vec<(&'static str, Vec<u8>)> {
    let other_kind = if kind == BlobKind::Entry {
        codec::encode(BlobKind::TurnState, &idle()).expect("encode")
    } else {
        codec::encode(BlobKind::Entry, &reply(1)).expect("encode")
    };
    vec![
        ("garbage", b"definitely not a normandy blob".to_vec()),
        ("empty bytes", Vec::new()),
        (
            "a valid header over broken MessagePack",
            vec![b'N', b'M', FORMAT_VERSION, kind as u8, 0xc1, 0xff, 0x00],
        ),
        ("a blob of another kind", other_kind),
    ]
}

#[track_caller]
fn corrupt_names(e: &Error, id: &SessionId, what: &str) {
    names(e, id, what);
    match e {
        Error::Corrupt { session, .. } => {
            assert_eq!(
                session.as_ref(),
                Some(id),
                "{what}: Corrupt must carry the session"
            )
        }
        other => panic!("{what}: expected Error::Corrupt, got {other:?}"),
    }
}

/// Precondition: the harness can overwrite turn-state bytes. Corrupt turn-state bytes make
/// `load` and `activate` fail with `Corrupt` naming the session — no panic — while its entries,
/// `list_resumable` and other sessions keep working.
pub async fn corrupt_turn_state_is_typed_error(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let a = node("a");
    let (bad, good) = (sid("corrupt-state"), sid("healthy"));
    for id in [&bad, &good] {
        let epoch = start(&*store, id, ResumePolicy::Eager, &a).await;
        applied(
            store
                .commit(
                    id,
                    epoch,
                    0,
                    &batch(vec![input(1, "in-1"), reply(2)], busy("in-1", 1)),
                )
                .await,
            2,
            "commit",
        );
    }
    let good_before = snapshot(&*store, &good).await;
    for (what, bytes) in corrupt_variants(BlobKind::TurnState) {
        h.overwrite_state(&bad, &bytes).await;
        let e = err(store.load(&bad).await, ErrorKind::Corrupt, what);
        corrupt_names(&e, &bad, what);
        let e = err(store.activate(&bad, &a).await, ErrorKind::Corrupt, what);
        corrupt_names(&e, &bad, what);
        assert_eq!(
            all_entries(&*store, &bad).await.len(),
            2,
            "{what}: entries of a session with a corrupt state must stay readable"
        );
        ok(
            store.list_resumable(&OwnerFilter::Any, None, 100).await,
            "list_resumable with a corrupt session stored",
        );
        assert_eq!(
            snapshot(&*store, &good).await,
            good_before,
            "{what}: another session was affected"
        );
    }
    let epoch = ok(
        store.activate(&good, &a).await,
        "activate the healthy session",
    )
    .epoch;
    applied(
        store
            .commit(&good, epoch, 2, &batch(vec![reply(3)], idle()))
            .await,
        3,
        "commit to the healthy session",
    );
}

/// Precondition: the harness can overwrite entry bytes. A corrupt entry makes `entries` that
/// cover it fail with `Corrupt` naming the session — no panic — while pages after it, `load`
/// and other sessions keep working.
pub async fn corrupt_entry_is_typed_error(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let a = node("a");
    let (bad, good) = (sid("corrupt-entry"), sid("healthy"));
    for id in [&bad, &good] {
        let epoch = start(&*store, id, ResumePolicy::Lazy, &a).await;
        applied(
            store
                .commit(
                    id,
                    epoch,
                    0,
                    &batch(vec![input(1, "in-1"), reply(2), reply(3)], idle()),
                )
                .await,
            3,
            "commit",
        );
    }
    let good_entries = all_entries(&*store, &good).await;
    for (what, bytes) in corrupt_variants(BlobKind::Entry) {
        h.overwrite_entry(&bad, 2, &bytes).await;
        let e = err(store.entries(&bad, 0, 10).await, ErrorKind::Corrupt, what);
        corrupt_names(&e, &bad, what);
        err(store.entries(&bad, 1, 1).await, ErrorKind::Corrupt, what);
        let after: Vec<Seq> = ok(
            store.entries(&bad, 2, 10).await,
            "entries after the corrupt one",
        )
        .iter()
        .map(|e| e.seq)
        .collect();
        assert_eq!(after, vec![3], "{what}: entries after the corrupt one");
        assert_eq!(
            load(&*store, &bad).await.seq,
            3,
            "{what}: load must not need entries"
        );
        assert_eq!(
            all_entries(&*store, &good).await,
            good_entries,
            "{what}: other session"
        );
    }
}

/// Precondition: the harness can overwrite entry bytes. A well-formed entry stored at another
/// seq than the one it holds (a stray copy, a restore gone wrong) makes `entries` over it fail
/// with `Corrupt` naming the session and the entry's seq — history never comes back out of
/// order — and a damaged entry's error names its seq too.
pub async fn entry_stored_under_another_seq_is_corrupt(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let id = sid("misplaced");
    let epoch = start(&*store, &id, ResumePolicy::Lazy, &node("a")).await;
    applied(
        store
            .commit(
                &id,
                epoch,
                0,
                &batch(vec![input(1, "in-1"), reply(2), reply(3), reply(4)], idle()),
            )
            .await,
        4,
        "commit",
    );
    let third = codec::encode(BlobKind::Entry, &reply(3)).expect("encode");
    h.overwrite_entry(&id, 4, &third).await;
    let e = err(
        store.entries(&id, 0, 10).await,
        ErrorKind::Corrupt,
        "entry 3 stored again at seq 4",
    );
    corrupt_names(&e, &id, "misplaced entry");
    assert!(e.to_string().contains("entry 4"), "names the seq: {e}");
    let before: Vec<Seq> = ok(store.entries(&id, 0, 3).await, "entries before it")
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(before, vec![1, 2, 3]);
    h.overwrite_entry(&id, 2, b"\xff\x00garbage").await;
    let e = err(
        store.entries(&id, 1, 1).await,
        ErrorKind::Corrupt,
        "damaged entry 2",
    );
    assert!(e.to_string().contains("entry 2"), "names the seq: {e}");
}

/// Precondition: the harness can overwrite state and entry bytes. A blob whose header carries a
/// newer format version is `UnsupportedVersion` naming the session and both versions.
pub async fn newer_format_version_is_unsupported_version(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let id = sid("future");
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
    let newer = FORMAT_VERSION + 1;
    let check = |e: &Error, what: &str| {
        names(e, &id, what);
        match e {
            Error::UnsupportedVersion {
                session,
                found,
                supported,
                ..
            } => {
                assert_eq!(
                    session.as_ref(),
                    Some(&id),
                    "{what}: must carry the session"
                );
                assert_eq!(*found, u32::from(newer), "{what}: wrong version found");
                assert_eq!(*supported, u32::from(FORMAT_VERSION), "{what}");
            }
            other => panic!("{what}: expected Error::UnsupportedVersion, got {other:?}"),
        }
    };

    let mut entry = codec::encode(BlobKind::Entry, &reply(2)).expect("encode");
    entry[2] = newer;
    h.overwrite_entry(&id, 2, &entry).await;
    let e = err(
        store.entries(&id, 0, 10).await,
        ErrorKind::UnsupportedVersion,
        "an entry from a newer format",
    );
    check(&e, "entry");

    let mut state = codec::encode(BlobKind::TurnState, &busy("in-1", 1)).expect("encode");
    state[2] = newer;
    h.overwrite_state(&id, &state).await;
    let e = err(
        store.load(&id).await,
        ErrorKind::UnsupportedVersion,
        "a turn state from a newer format",
    );
    check(&e, "turn state");
}
