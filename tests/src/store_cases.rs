//! The store conformance suite: one case per `# Behavior` bullet of
//! [`SessionStore`] and per store invariant of DESIGN.md (1–4, 7).
//!
//! Every case is a plain `pub async fn case(h: Arc<dyn StoreHarness>)` that panics on a
//! violation; [`store_conformance!`](crate::store_conformance) stamps one test per case. Each
//! case's doc names its precondition: unless it says otherwise, only an empty, isolated harness.
//! Cases make their own sessions with fresh random ids and node names, so they stay correct even
//! on a namespace that other cases share.

use std::collections::{BTreeSet, VecDeque};
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use normandy_core::codec::{self, BlobKind, FORMAT_VERSION};
use normandy_core::{
    ActiveTurn, CatalogEntry, CommitAck, CommitBatch, ConfigTemplate, ContentBlock, Credentials,
    Entry, EntryPayload, Epoch, Error, ErrorKind, InputId, LlmClient, LocalRegistry, Message,
    NewSession, NodeId, OwnerFilter, Phase, QueuedInput, Result, ResumableSession, ResumePolicy,
    ScriptedClient, Seq, SessionId, SessionRecord, SessionStatus, SessionStore, Sessions,
    StaticCredentials, StopReason, TemplateCatalog, TurnState, Usage,
};
use uuid::Uuid;

use crate::harness::StoreHarness;
use crate::logs;

/// A page size larger than any session of this suite, for "read everything".
const ALL: usize = 10_000;

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

fn token() -> String {
    Uuid::now_v7().simple().to_string()
}

/// A fresh session id: `tag-<uuid>`.
fn sid(tag: &str) -> SessionId {
    SessionId::new(format!("{tag}-{}", token())).expect("valid session id")
}

/// A fresh node id, so owner filters of one case never see another case's sessions.
fn node(tag: &str) -> NodeId {
    NodeId::new(format!("{tag}-{}", token()), 1).expect("valid node id")
}

fn iid(s: &str) -> InputId {
    InputId::new(s).expect("valid input id")
}

fn parent_of(seq: Seq) -> Option<Seq> {
    (seq > 1).then(|| seq - 1)
}

/// An `Input` entry at `seq` with input id `input_id`.
fn input(seq: Seq, input_id: &str) -> Entry {
    Entry {
        seq,
        parent: parent_of(seq),
        at_ms: 1_700_000_000_000 + seq,
        payload: EntryPayload::Input {
            input_id: iid(input_id),
            content: vec![ContentBlock::text(format!("input {input_id}"))],
        },
    }
}

/// An `Assistant` entry at `seq` whose text names the seq.
fn reply(seq: Seq) -> Entry {
    Entry {
        seq,
        parent: parent_of(seq),
        at_ms: 1_700_000_000_000 + seq,
        payload: EntryPayload::Assistant {
            message: Message::assistant(format!("reply {seq}")),
            stop_reason: StopReason::EndTurn,
            usage: Usage {
                input_tokens: seq,
                output_tokens: 1,
            },
        },
    }
}

/// A turn in flight for `input_id`, whose `input_seq` is `seq` (the atomicity case uses it to
/// tie a state to the batch that produced it).
fn busy(input_id: &str, seq: Seq) -> TurnState {
    TurnState {
        phase: Phase::CallingModel,
        turn: Some(ActiveTurn {
            input_id: iid(input_id),
            input_seq: seq,
            steps: 1,
            usage: Usage::default(),
            started_at_ms: 1_700_000_000_000,
            answer_seq: None,
        }),
        queued: VecDeque::new(),
        ..TurnState::default()
    }
}

/// No turn in flight, but input waiting: still work to resume.
fn queued(input_id: &str, seq: Seq) -> TurnState {
    TurnState {
        phase: Phase::Idle,
        turn: None,
        queued: VecDeque::from([QueuedInput {
            input_id: iid(input_id),
            seq,
        }]),
        ..TurnState::default()
    }
}

fn idle() -> TurnState {
    TurnState::default()
}

fn batch(entries: Vec<Entry>, state: TurnState) -> CommitBatch {
    CommitBatch { entries, state }
}

#[track_caller]
fn ok<T>(res: Result<T>, what: &str) -> T {
    match res {
        Ok(v) => v,
        Err(e) => panic!("{what}: unexpected error ({:?}): {e}", e.kind()),
    }
}

/// Asserts `res` failed with `kind` and returns the error.
#[track_caller]
fn err<T: Debug>(res: Result<T>, kind: ErrorKind, what: &str) -> Error {
    match res {
        Ok(v) => panic!("{what}: expected a {kind:?} error, got Ok({v:?})"),
        Err(e) => {
            assert_eq!(
                e.kind(),
                kind,
                "{what}: expected a {kind:?} error, got {:?}: {e}",
                e.kind()
            );
            e
        }
    }
}

/// Asserts the error's message names the session, so an operator can tell which one is broken.
#[track_caller]
fn names(e: &Error, id: &SessionId, what: &str) {
    let msg = e.to_string();
    assert!(
        msg.contains(id.as_str()),
        "{what}: error message does not name session {id}: {msg}"
    );
}

#[track_caller]
fn applied(res: Result<CommitAck>, seq: Seq, what: &str) {
    match res {
        Ok(CommitAck::Applied { seq: got }) => {
            assert_eq!(got, seq, "{what}: Applied with the wrong new seq")
        }
        Ok(other) => panic!("{what}: expected Applied {{ seq: {seq} }}, got {other:?}"),
        Err(e) => panic!("{what}: expected Applied {{ seq: {seq} }}, got error: {e}"),
    }
}

#[track_caller]
fn duplicate(res: Result<CommitAck>, input_id: &str, seq: Seq, what: &str) {
    let want = CommitAck::DuplicateInput {
        input_id: iid(input_id),
        seq,
    };
    match res {
        Ok(ack) => assert_eq!(ack, want, "{what}"),
        Err(e) => panic!("{what}: expected {want:?}, got error: {e}"),
    }
}

async fn load(store: &dyn SessionStore, id: &SessionId) -> SessionRecord {
    match store.load(id).await {
        Ok(Some(r)) => r,
        Ok(None) => panic!("load({id}): session missing"),
        Err(e) => panic!("load({id}): {e}"),
    }
}

async fn all_entries(store: &dyn SessionStore, id: &SessionId) -> Vec<Entry> {
    ok(store.entries(id, 0, ALL).await, "entries(all)")
}

/// The record and every entry: what "nothing written" compares.
async fn snapshot(store: &dyn SessionStore, id: &SessionId) -> (SessionRecord, Vec<Entry>) {
    (load(store, id).await, all_entries(store, id).await)
}

/// Creates a bare session with `policy` and activates it on `owner`; returns its epoch.
async fn start(
    store: &dyn SessionStore,
    id: &SessionId,
    policy: ResumePolicy,
    owner: &NodeId,
) -> Epoch {
    ok(
        store.create(NewSession::bare(id.clone(), policy)).await,
        "create",
    );
    ok(store.activate(id, owner).await, "activate").epoch
}

/// Ids of a `list_resumable` page that belong to `mine` (other sessions may share a namespace).
fn listed_among(sessions: &[ResumableSession], mine: &[&SessionId]) -> BTreeSet<SessionId> {
    sessions
        .iter()
        .filter(|s| mine.contains(&&s.id))
        .map(|s| s.id.clone())
        .collect()
}

/// Every session `list_resumable` returns for `owner`, following cursors with page size
/// `limit`, checking each page's size and that the listing ends.
async fn list_all(
    store: &dyn SessionStore,
    owner: &OwnerFilter,
    limit: usize,
) -> Vec<ResumableSession> {
    let mut out: Vec<ResumableSession> = Vec::new();
    let mut cursor: Option<SessionId> = None;
    for _ in 0..10_000 {
        let page = ok(
            store.list_resumable(owner, cursor.as_ref(), limit).await,
            "list_resumable",
        );
        assert!(
            page.sessions.len() <= limit,
            "list_resumable returned {} sessions for limit {limit}",
            page.sessions.len()
        );
        if let Some(next) = &page.next {
            assert!(
                cursor.as_ref() != Some(next),
                "list_resumable returned its own cursor {next} as next: it would loop forever"
            );
        }
        let empty = page.sessions.is_empty();
        out.extend(page.sessions);
        match page.next {
            Some(next) => {
                assert!(
                    !empty,
                    "list_resumable returned an empty page with a next cursor"
                );
                cursor = Some(next);
            }
            None => return out,
        }
    }
    panic!("list_resumable kept returning pages")
}

fn ids(sessions: &[ResumableSession]) -> BTreeSet<SessionId> {
    sessions.iter().map(|s| s.id.clone()).collect()
}

// ---------------------------------------------------------------------------------------------
// create / load
// ---------------------------------------------------------------------------------------------

/// Precondition: none. `create` stores a session at epoch 0, seq 0, idle, no owner, with its
/// template and policy, and `load` returns exactly that record.
pub async fn create_returns_a_fresh_record(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let id = sid("create");
    let mut template = ConfigTemplate::new("conformance-template", "model-x")
        .system_prompt("Be brief.")
        .resume_policy(ResumePolicy::Eager)
        .credential("api-key");
    template
        .params
        .insert("temperature".into(), serde_json::json!(0.25));
    let created = ok(
        store
            .create(NewSession::from_template(id.clone(), template.clone()))
            .await,
        "create",
    );
    assert_eq!(created.id, id);
    assert_eq!(created.epoch, 0, "a new session has epoch 0");
    assert_eq!(created.seq, 0, "a new session has seq 0");
    assert_eq!(created.owner, None, "a new session has no owner");
    assert_eq!(created.status, SessionStatus::Active);
    assert_eq!(created.resume_policy, ResumePolicy::Eager);
    assert_eq!(created.template.as_ref(), Some(&template));
    assert_eq!(created.state, TurnState::default(), "a new session is idle");
    assert!(!created.is_resumable(), "an idle session is not resumable");
    assert_eq!(
        load(&*store, &id).await,
        created,
        "load must return what create returned"
    );
    assert!(all_entries(&*store, &id).await.is_empty());

    let bare = sid("create-bare");
    let created = ok(
        store
            .create(NewSession::bare(bare.clone(), ResumePolicy::Lazy))
            .await,
        "create bare",
    );
    assert_eq!(created.template, None);
    assert_eq!(created.resume_policy, ResumePolicy::Lazy);
    assert_eq!(load(&*store, &bare).await, created);
}

/// Precondition: none. Creating an id that exists is `AlreadyExists` naming it, and the stored
/// session (record, epoch, owner, entries) is unchanged.
pub async fn create_existing_is_already_exists_and_changes_nothing(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let id = sid("exists");
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
        "first commit",
    );
    let before = snapshot(&*store, &id).await;

    let other = ConfigTemplate::new("other-template", "model-y");
    let e = err(
        store
            .create(NewSession::from_template(id.clone(), other))
            .await,
        ErrorKind::AlreadyExists,
        "create an existing id",
    );
    names(&e, &id, "AlreadyExists");
    err(
        store
            .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
            .await,
        ErrorKind::AlreadyExists,
        "create an existing id (bare)",
    );
    assert_eq!(
        snapshot(&*store, &id).await,
        before,
        "a refused create changed the stored session"
    );
}

/// Precondition: none. `load` of an unknown id is `Ok(None)`, not an error.
pub async fn load_unknown_is_none(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let got = ok(store.load(&sid("unknown")).await, "load unknown");
    assert!(got.is_none(), "load of an unknown id returned {got:?}");
}

// ---------------------------------------------------------------------------------------------
// activate
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// commit
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Atomic boundary commits (invariant 2)
// ---------------------------------------------------------------------------------------------

// The atomicity case's plan: batch sizes cycle 1, 2, 3, so batches are [1], [2, 3], [4, 5, 6],
// [7], ... — a closed form, so readers can check any seq without sharing the writer's list.

/// Whether `seq` ends a batch of the atomicity case (0: before the first).
fn atomic_is_end(seq: Seq) -> bool {
    matches!(seq % 6, 0 | 1 | 3)
}

/// The first seq of the batch holding `seq` (`seq` ≥ 1).
fn atomic_first(seq: Seq) -> Seq {
    match seq % 6 {
        1 | 2 | 4 => seq,
        3 | 5 => seq - 1,
        _ => seq - 2,
    }
}

/// The batch of the atomicity case that starts after `seq` (a batch end).
fn atomic_batch(seq: Seq) -> CommitBatch {
    let first = seq + 1;
    let mut end = first;
    while !atomic_is_end(end) {
        end += 1;
    }
    let entries = (first..=end).map(|s| atomic_entry(s, first)).collect();
    batch(entries, busy(&format!("w-{first}"), end))
}

/// The entry at `seq` of the atomicity case: the first of each batch an input, others replies.
fn atomic_entry(seq: Seq, first_of_batch: Seq) -> Entry {
    debug_assert_eq!(atomic_first(seq), first_of_batch);
    if seq == first_of_batch {
        input(seq, &format!("w-{seq}"))
    } else {
        reply(seq)
    }
}

/// Record loads per poll of the atomicity case: loads are the cheap read, and each one is a
/// chance to catch a record whose state and seq were written apart.
const LOADS_PER_POLL: usize = 4;

/// What one reader of the atomicity case has verified so far.
#[derive(Default)]
struct AtomicReader {
    /// Entries `1..=verified` were read and matched the plan (entries are append-only, so each
    /// poll reads only the ones after: short reads make dense polls).
    verified: Seq,
    /// The greatest record seq seen.
    last_seen: Seq,
}

impl AtomicReader {
    /// Reads the entries after `verified`, checks they continue the plan up to a batch end, and
    /// returns the last seq visible.
    async fn read_entries(
        &mut self,
        store: &dyn SessionStore,
        id: &SessionId,
    ) -> std::result::Result<Seq, String> {
        let list = store
            .entries(id, self.verified, ALL)
            .await
            .map_err(|e| format!("entries: {e}"))?;
        for (i, e) in list.iter().enumerate() {
            let at = self.verified + 1 + i as u64;
            if e.seq != at || *e != atomic_entry(at, atomic_first(at)) {
                return Err(format!(
                    "entries are not the contiguous committed ones: at seq {at} found {e:?}"
                ));
            }
        }
        let last = list.last().map_or(self.verified, |e| e.seq);
        if !atomic_is_end(last) {
            return Err(format!(
                "part of a batch is visible: last entry seq {last} is not a batch end"
            ));
        }
        self.verified = last;
        Ok(last)
    }

    /// One poll: entries, then a few records, then entries again. Returns the last record's seq.
    async fn poll(
        &mut self,
        store: &dyn SessionStore,
        id: &SessionId,
    ) -> std::result::Result<Seq, String> {
        let first_last = self.read_entries(store, id).await?;
        let mut records = Vec::with_capacity(LOADS_PER_POLL);
        for _ in 0..LOADS_PER_POLL {
            let rec = store
                .load(id)
                .await
                .map_err(|e| format!("load: {e}"))?
                .ok_or("session vanished")?;
            records.push(rec);
        }
        let second_last = self.read_entries(store, id).await?;
        for rec in &records {
            if !atomic_is_end(rec.seq) {
                return Err(format!("record seq {} is not a batch end", rec.seq));
            }
            if rec.seq < first_last {
                return Err(format!(
                    "entries up to seq {first_last} were visible before a record at seq {}: \
                     entries without their turn state",
                    rec.seq
                ));
            }
            if second_last < rec.seq {
                return Err(format!(
                    "record at seq {} was visible but a later read found entries only up to \
                     {second_last}: turn state without its entries",
                    rec.seq
                ));
            }
            let state_seq = rec.state.turn.as_ref().map_or(0, |t| t.input_seq);
            if state_seq != rec.seq {
                return Err(format!(
                    "record seq {} carries the turn state of the batch ending at {state_seq}",
                    rec.seq
                ));
            }
            if rec.seq < self.last_seen {
                return Err(format!(
                    "record seq went back from {} to {}",
                    self.last_seen, rec.seq
                ));
            }
            self.last_seen = rec.seq;
        }
        Ok(self.last_seen)
    }
}

/// Precondition: none. While one task commits many batches (of 1–3 entries, each with a turn
/// state naming the batch's last seq), readers on both handles poll entries → records → entries
/// and must never see part of a batch, entries ahead of the record, a record ahead of its
/// entries, a state from another batch, or the seq go back.
pub async fn entries_and_state_are_never_seen_apart(h: Arc<dyn StoreHarness>) {
    // The writer runs at least MIN_BATCHES and until each reader has polled MIN_POLLS times
    // (at most MAX_BATCHES), so fast and slow backends alike get real overlap.
    const MIN_BATCHES: u64 = 150;
    const MIN_POLLS: u64 = 150;
    const MAX_BATCHES: u64 = 3_000;
    let store = h.store();
    let id = sid("atomic");
    let epoch = start(&*store, &id, ResumePolicy::Lazy, &node("writer")).await;
    let done = Arc::new(AtomicBool::new(false));
    let polls: Arc<[std::sync::atomic::AtomicU64; 2]> = Arc::new(Default::default());

    let mut readers = Vec::new();
    for (n, reader) in [h.store(), h.reopen().await].into_iter().enumerate() {
        let (id, done, polls) = (id.clone(), done.clone(), polls.clone());
        readers.push(tokio::spawn(async move {
            let mut view = AtomicReader::default();
            loop {
                // Read the flag first: a poll that starts after the writer finished sees the end.
                let finished = done.load(Ordering::Acquire);
                let seq = view.poll(&*reader, &id).await?;
                polls[n].fetch_add(1, Ordering::Relaxed);
                if finished {
                    return Ok::<_, String>(seq);
                }
                tokio::task::yield_now().await;
            }
        }));
    }

    let mut seq = 0;
    let mut batches = 0;
    loop {
        let least = polls
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        if batches >= MIN_BATCHES && (least >= MIN_POLLS || batches >= MAX_BATCHES) {
            break;
        }
        // A reader that failed stops polling: stop writing and report it below.
        if readers.iter().any(|r| r.is_finished()) {
            break;
        }
        let b = atomic_batch(seq);
        applied(
            store.commit(&id, epoch, seq, &b).await,
            b.new_seq(seq),
            "writer commit",
        );
        seq = b.new_seq(seq);
        batches += 1;
    }
    done.store(true, Ordering::Release);
    for r in readers {
        match r.await.expect("reader task panicked") {
            Ok(final_seq) => {
                assert_eq!(
                    final_seq, seq,
                    "a reader's last poll missed the final commit"
                )
            }
            Err(violation) => panic!("invariant 2 violated after {batches} batches: {violation}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// entries
// ---------------------------------------------------------------------------------------------

/// Precondition: none. `entries(after, limit)` returns entries with seq > `after`, ascending, at
/// most `limit`, exactly as committed; past the end or with limit 0 it is empty; a huge limit
/// is fine.
pub async fn entries_pages_by_after_and_limit(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let id = sid("paging");
    let epoch = start(&*store, &id, ResumePolicy::Lazy, &node("a")).await;
    let written: Vec<Entry> = vec![
        input(1, "in-1"),
        reply(2),
        reply(3),
        input(4, "in-2"),
        reply(5),
        reply(6),
        input(7, "in-3"),
        reply(8),
        reply(9),
        reply(10),
    ];
    let mut seq = 0;
    for chunk in [&written[0..3], &written[3..6], &written[6..10]] {
        let b = batch(chunk.to_vec(), idle());
        applied(
            store.commit(&id, epoch, seq, &b).await,
            b.new_seq(seq),
            "commit",
        );
        seq = b.new_seq(seq);
    }
    let seqs = |es: Vec<Entry>| es.iter().map(|e| e.seq).collect::<Vec<_>>();
    let page = |after: Seq, limit: usize| {
        let store = store.clone();
        let id = id.clone();
        async move { ok(store.entries(&id, after, limit).await, "entries") }
    };
    assert_eq!(seqs(page(0, 3).await), vec![1, 2, 3]);
    assert_eq!(seqs(page(3, 3).await), vec![4, 5, 6]);
    assert_eq!(seqs(page(6, 3).await), vec![7, 8, 9]);
    assert_eq!(seqs(page(9, 3).await), vec![10]);
    assert_eq!(seqs(page(4, 2).await), vec![5, 6]);
    assert!(
        page(10, 3).await.is_empty(),
        "entries after the last must be empty"
    );
    assert!(
        page(50, 3).await.is_empty(),
        "entries far past the end must be empty"
    );
    assert!(page(0, 0).await.is_empty(), "limit 0 must return nothing");
    assert_eq!(page(0, usize::MAX).await, written, "limit usize::MAX");
    assert_eq!(
        page(0, 100).await,
        written,
        "entries differ from what was committed"
    );
    assert_eq!(page(7, 100).await, written[7..].to_vec());
}

/// Precondition: none. `entries` of an unknown id is `NotFound` naming it, not an empty list.
pub async fn entries_unknown_is_not_found(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let id = sid("no-entries");
    let e = err(
        store.entries(&id, 0, 10).await,
        ErrorKind::NotFound,
        "entries of an unknown id",
    );
    names(&e, &id, "NotFound");
}

// ---------------------------------------------------------------------------------------------
// list_resumable
// ---------------------------------------------------------------------------------------------

/// Precondition: none. Only eager, open sessions with work (a turn in flight or queued input)
/// are listed — by their owner and by `Any`, with owner and current epoch; idle, never-committed,
/// never-activated, lazy and terminal sessions are not.
pub async fn list_resumable_lists_only_eager_open_sessions_with_work(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let a = node("a");
    let busy_id = sid("r-busy");
    let queued_id = sid("r-queued");
    let idle_id = sid("r-idle");
    let fresh_id = sid("r-fresh");
    let lazy_id = sid("r-lazy");
    let closed_id = sid("r-closed");
    let unowned_id = sid("r-unowned");
    let templated_id = sid("r-template");

    let mut epochs = std::collections::HashMap::new();
    for (id, policy, state) in [
        (&busy_id, ResumePolicy::Eager, Some(busy("in-1", 1))),
        (&queued_id, ResumePolicy::Eager, Some(queued("in-1", 1))),
        (&idle_id, ResumePolicy::Eager, Some(idle())),
        (&fresh_id, ResumePolicy::Eager, None),
        (&lazy_id, ResumePolicy::Lazy, Some(busy("in-1", 1))),
        (&closed_id, ResumePolicy::Eager, Some(busy("in-1", 1))),
    ] {
        let epoch = start(&*store, id, policy, &a).await;
        if let Some(state) = state {
            applied(
                store
                    .commit(id, epoch, 0, &batch(vec![input(1, "in-1")], state))
                    .await,
                1,
                "commit",
            );
        }
        epochs.insert(id.clone(), epoch);
    }
    ok(
        store.mark_terminal(&closed_id, epochs[&closed_id]).await,
        "mark_terminal",
    );
    ok(
        store
            .create(NewSession::bare(unowned_id.clone(), ResumePolicy::Eager))
            .await,
        "create",
    );
    // The policy comes from the template when created from one.
    let template =
        ConfigTemplate::new("eager-template", "model").resume_policy(ResumePolicy::Eager);
    ok(
        store
            .create(NewSession::from_template(templated_id.clone(), template))
            .await,
        "create from template",
    );
    let epoch = ok(store.activate(&templated_id, &a).await, "activate").epoch;
    applied(
        store
            .commit(
                &templated_id,
                epoch,
                0,
                &batch(vec![input(1, "in-1")], busy("in-1", 1)),
            )
            .await,
        1,
        "commit",
    );
    epochs.insert(templated_id.clone(), epoch);

    let want: BTreeSet<SessionId> = [&busy_id, &queued_id, &templated_id]
        .into_iter()
        .cloned()
        .collect();
    let by_owner = list_all(&*store, &OwnerFilter::Node(a.clone()), 100).await;
    assert_eq!(
        ids(&by_owner),
        want,
        "list_resumable(Node) must list exactly the eager, open sessions with work"
    );
    for s in &by_owner {
        assert_eq!(s.owner.as_ref(), Some(&a), "listed with the wrong owner");
        assert_eq!(s.epoch, epochs[&s.id], "listed with the wrong epoch");
    }
    let mine = [
        &busy_id,
        &queued_id,
        &idle_id,
        &fresh_id,
        &lazy_id,
        &closed_id,
        &unowned_id,
        &templated_id,
    ];
    let any = list_all(&*store, &OwnerFilter::Any, 100).await;
    assert_eq!(
        listed_among(&any, &mine),
        want,
        "list_resumable(Any) must list exactly the eager, open sessions with work"
    );
}

/// Precondition: none. `Node(n)` lists only sessions whose last activation was by `n` — the
/// same name with another incarnation is another node — and `Any` lists every owner's.
pub async fn list_resumable_filters_by_owner(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let (a, b, c) = (node("a"), node("b"), node("c"));
    let (a1, a2, b1) = (sid("own-a1"), sid("own-a2"), sid("own-b1"));
    for (id, owner) in [(&a1, &a), (&a2, &a), (&b1, &b)] {
        let epoch = start(&*store, id, ResumePolicy::Eager, owner).await;
        applied(
            store
                .commit(
                    id,
                    epoch,
                    0,
                    &batch(vec![input(1, "in-1")], busy("in-1", 1)),
                )
                .await,
            1,
            "commit",
        );
    }
    let set = |v: &[&SessionId]| v.iter().map(|s| (*s).clone()).collect::<BTreeSet<_>>();
    assert_eq!(
        ids(&list_all(&*store, &OwnerFilter::Node(a.clone()), 100).await),
        set(&[&a1, &a2])
    );
    assert_eq!(
        ids(&list_all(&*store, &OwnerFilter::Node(b.clone()), 100).await),
        set(&[&b1])
    );
    let page = ok(
        store
            .list_resumable(&OwnerFilter::Node(c.clone()), None, 100)
            .await,
        "list_resumable for a node without sessions",
    );
    assert!(page.sessions.is_empty() && page.next.is_none(), "{page:?}");
    let reborn = NodeId::new(a.name(), a.incarnation() + 1).expect("node id");
    assert!(
        list_all(&*store, &OwnerFilter::Node(reborn), 100)
            .await
            .is_empty(),
        "a node's next incarnation must not list its previous life's sessions"
    );
    let any = list_all(&*store, &OwnerFilter::Any, 100).await;
    assert_eq!(listed_among(&any, &[&a1, &a2, &b1]), set(&[&a1, &a2, &b1]));
    for s in any.iter().filter(|s| s.id == b1) {
        assert_eq!(
            s.owner.as_ref(),
            Some(&b),
            "Any listed b1 with the wrong owner"
        );
    }
}

/// Precondition: none. Pages hold at most `limit` sessions in ascending id order; following
/// `next` lists every session exactly once and ends with `next: None`; a cursor resumes after
/// itself. Checked for `Node` and `Any`, page sizes 1, 3 and 100.
pub async fn list_resumable_pages_with_cursor(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let a = node("a");
    // One shared prefix and zero-padded suffixes: the ascending order is the same under any
    // collation a backend may use.
    let prefix = format!("page-{}", token());
    let all: Vec<SessionId> = (0..7)
        .map(|i| SessionId::new(format!("{prefix}-{i:02}")).expect("id"))
        .collect();
    // Created out of order, so insertion order cannot pass for id order.
    for i in [3usize, 0, 6, 1, 5, 2, 4] {
        let epoch = start(&*store, &all[i], ResumePolicy::Eager, &a).await;
        applied(
            store
                .commit(
                    &all[i],
                    epoch,
                    0,
                    &batch(vec![input(1, "in-1")], busy("in-1", 1)),
                )
                .await,
            1,
            "commit",
        );
    }
    let mine: Vec<&SessionId> = all.iter().collect();
    for limit in [1, 3, 100] {
        for filter in [OwnerFilter::Node(a.clone()), OwnerFilter::Any] {
            let listed = list_all(&*store, &filter, limit).await;
            let got: Vec<SessionId> = listed
                .iter()
                .filter(|s| mine.contains(&&s.id))
                .map(|s| s.id.clone())
                .collect();
            assert_eq!(
                got, all,
                "list_resumable({filter:?}) with limit {limit} must list each session once, \
                 in ascending id order"
            );
        }
    }
    let page = ok(
        store
            .list_resumable(&OwnerFilter::Node(a.clone()), Some(&all[2]), 2)
            .await,
        "list_resumable from a cursor",
    );
    let got: Vec<SessionId> = page.sessions.iter().map(|s| s.id.clone()).collect();
    assert_eq!(
        got,
        vec![all[3].clone(), all[4].clone()],
        "a cursor resumes after itself"
    );
    assert!(
        page.next.is_some(),
        "sessions remain after this page: next must be set"
    );
}

/// Precondition: none. When another node activates a session (through another handle), it
/// moves from the old owner's listing to the new owner's, with the new epoch.
pub async fn list_resumable_follows_reactivation_by_another_node(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let other = h.reopen().await;
    let (a, b) = (node("a"), node("b"));
    let id = sid("moved");
    let e1 = start(&*store, &id, ResumePolicy::Eager, &a).await;
    applied(
        store
            .commit(&id, e1, 0, &batch(vec![input(1, "in-1")], busy("in-1", 1)))
            .await,
        1,
        "commit",
    );
    assert!(ids(&list_all(&*store, &OwnerFilter::Node(a.clone()), 100).await).contains(&id));
    let e2 = ok(
        other.activate(&id, &b).await,
        "takeover on the other handle",
    )
    .epoch;
    for handle in [&store, &other] {
        assert!(
            !ids(&list_all(&**handle, &OwnerFilter::Node(a.clone()), 100).await).contains(&id),
            "the old owner still lists a session another node activated"
        );
        let by_b = list_all(&**handle, &OwnerFilter::Node(b.clone()), 100).await;
        let entry = by_b
            .iter()
            .find(|s| s.id == id)
            .expect("the new owner must list the session it activated");
        assert_eq!(entry.owner.as_ref(), Some(&b));
        assert_eq!(entry.epoch, e2, "listed with a stale epoch");
        let any = list_all(&**handle, &OwnerFilter::Any, 100).await;
        let entry = any.iter().find(|s| s.id == id).expect("Any must list it");
        assert_eq!(entry.owner.as_ref(), Some(&b), "Any lists the old owner");
    }
}

/// Precondition: none. Listing follows each commit: work → listed, idle → gone, queued input →
/// listed again, terminal → gone; a deleted session is gone.
pub async fn list_resumable_tracks_work_terminal_and_delete(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let a = node("a");
    let owner = OwnerFilter::Node(a.clone());
    let id = sid("track");
    let listed = |store: Arc<dyn SessionStore>, id: SessionId, owner: OwnerFilter| async move {
        let by_owner = ids(&list_all(&*store, &owner, 100).await).contains(&id);
        let any = ids(&list_all(&*store, &OwnerFilter::Any, 100).await).contains(&id);
        assert_eq!(by_owner, any, "Node and Any listings disagree about {id}");
        by_owner
    };
    let epoch = start(&*store, &id, ResumePolicy::Eager, &a).await;
    assert!(
        !listed(store.clone(), id.clone(), owner.clone()).await,
        "listed before any work"
    );
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
        "start a turn",
    );
    assert!(
        listed(store.clone(), id.clone(), owner.clone()).await,
        "a turn in flight must be listed"
    );
    applied(
        store
            .commit(&id, epoch, 1, &batch(vec![reply(2)], idle()))
            .await,
        2,
        "finish the turn",
    );
    assert!(
        !listed(store.clone(), id.clone(), owner.clone()).await,
        "an idle session was listed"
    );
    applied(
        store
            .commit(
                &id,
                epoch,
                2,
                &batch(vec![input(3, "in-2")], queued("in-2", 3)),
            )
            .await,
        3,
        "queue input",
    );
    assert!(
        listed(store.clone(), id.clone(), owner.clone()).await,
        "queued input must be listed"
    );
    ok(store.mark_terminal(&id, epoch).await, "mark_terminal");
    assert!(
        !listed(store.clone(), id.clone(), owner.clone()).await,
        "a terminal session was listed"
    );

    let doomed = sid("track-deleted");
    let epoch = start(&*store, &doomed, ResumePolicy::Eager, &a).await;
    applied(
        store
            .commit(
                &doomed,
                epoch,
                0,
                &batch(vec![input(1, "in-1")], busy("in-1", 1)),
            )
            .await,
        1,
        "commit",
    );
    assert!(listed(store.clone(), doomed.clone(), owner.clone()).await);
    assert!(ok(store.delete(&doomed).await, "delete"));
    assert!(
        !listed(store.clone(), doomed.clone(), owner.clone()).await,
        "a deleted session was listed"
    );
}

// ---------------------------------------------------------------------------------------------
// mark_terminal / delete
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Bad data (invariant 7)
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// No secret at rest (invariant 4)
// ---------------------------------------------------------------------------------------------

/// Precondition: the test binary has no other global tracing subscriber. A real session runs
/// through `Sessions` on this store, with a template naming a credential that a
/// `StaticCredentials` provider resolves to a fresh `sk-canary-<uuid>` and the client builder
/// reads. The canary (nor its uuid) appears neither in `raw_bytes()` nor in the DEBUG logs
/// captured meanwhile — while the input text does appear in the raw bytes and the session id
/// in the logs, proving both scans see real data.
pub async fn canary_secret_never_stored_or_logged(h: Arc<dyn StoreHarness>) {
    let logs = logs::capture().unwrap_or_else(|e| panic!("{e}"));
    let secret_token = token();
    let canary = format!("sk-canary-{secret_token}");
    let marker = format!("probe-{}", token());
    let template_id = format!("canary-template-{}", token());
    let template = ConfigTemplate::new(template_id.clone(), "scripted-model")
        .system_prompt("You are the canary test.")
        .resume_policy(ResumePolicy::Eager)
        .credential("api-key");

    let read_secret = Arc::new(AtomicBool::new(false));
    let entry = {
        let (canary, read_secret) = (canary.clone(), read_secret.clone());
        CatalogEntry::new(move |_template, creds: &Credentials| {
            let secret = creds.expose("api-key")?;
            if secret != canary {
                return Err(Error::Credentials {
                    reason: "api-key resolved to something other than the canary".into(),
                });
            }
            read_secret.store(true, Ordering::SeqCst);
            Ok(Arc::new(ScriptedClient::echo()) as Arc<dyn LlmClient>)
        })
    };
    let catalog = TemplateCatalog::new()
        .with(template, entry)
        .expect("valid template");
    let sessions = Sessions::builder(catalog)
        .node(node("canary-node"))
        .store(h.store())
        .registry(Arc::new(LocalRegistry::new()))
        .credentials(Arc::new(StaticCredentials::new(
            Credentials::new().with("api-key", canary.clone()),
        )))
        .build()
        .expect("build Sessions");

    let id = ok(sessions.start(&template_id).await, "start");
    let out = ok(sessions.send(&id, format!("hello {marker}")).await, "send");
    assert_eq!(out.text(), format!("echo: hello {marker}"));
    let out = ok(sessions.send(&id, "second input").await, "send again");
    assert_eq!(out.text(), "echo: second input");
    sessions.shutdown().await;
    assert!(
        read_secret.load(Ordering::SeqCst),
        "the client builder never read the credential: the case tested nothing"
    );

    let store = h.store();
    let rec = load(&*store, &id).await;
    let stored_template = rec.template.expect("the session's template is stored");
    assert_eq!(
        stored_template.credentials,
        vec!["api-key".to_string()],
        "the stored template names its credential"
    );
    assert!(
        all_entries(&*store, &id).await.len() >= 4,
        "two turns must have committed entries"
    );

    let raw = h.raw_bytes().await;
    assert!(
        logs::find(&raw, marker.as_bytes()),
        "raw_bytes() does not contain the input text just committed: the canary scan would \
         prove nothing ({} bytes scanned)",
        raw.len()
    );
    assert!(
        !logs::find(&raw, canary.as_bytes()),
        "the canary credential is stored in the backend's raw bytes"
    );
    assert!(
        !logs::find(&raw, secret_token.as_bytes()),
        "the canary's random part is stored in the backend's raw bytes"
    );
    assert!(
        logs.contains(id.as_str().as_bytes()),
        "the captured logs never mention the session: log capture is not working"
    );
    assert!(
        !logs.contains(canary.as_bytes()) && !logs.contains(secret_token.as_bytes()),
        "the canary credential appears in the logs"
    );
}

// ---------------------------------------------------------------------------------------------
// Single writer across handles (invariant 1)
// ---------------------------------------------------------------------------------------------

/// Precondition: none. Two handles (`store()` and `reopen()`) each activate one session: the
/// older epoch's commits are `Fenced` and write nothing, the newer one's apply, and both
/// handles see the same data.
pub async fn older_handle_is_fenced_after_reopen_activates(h: Arc<dyn StoreHarness>) {
    let first = h.store();
    let second = h.reopen().await;
    let id = sid("two-handles");
    let e1 = start(&*first, &id, ResumePolicy::Eager, &node("a")).await;
    let e2 = ok(
        second.activate(&id, &node("b")).await,
        "activate on the second handle",
    )
    .epoch;
    assert!(e2 > e1);
    err(
        first
            .commit(&id, e1, 0, &batch(vec![input(1, "in-a")], busy("in-a", 1)))
            .await,
        ErrorKind::Fenced,
        "commit through the older handle's epoch",
    );
    applied(
        second
            .commit(&id, e2, 0, &batch(vec![input(1, "in-b"), reply(2)], idle()))
            .await,
        2,
        "commit with the newer epoch",
    );
    let seen = snapshot(&*first, &id).await;
    assert_eq!(seen, snapshot(&*second, &id).await, "the handles disagree");
    assert_eq!(seen.0.seq, 2);
    assert_eq!(seen.1, vec![input(1, "in-b"), reply(2)]);
    err(
        first
            .commit(&id, e1, 2, &batch(vec![input(3, "in-a")], idle()))
            .await,
        ErrorKind::Fenced,
        "the older epoch at the current seq",
    );
    assert_eq!(snapshot(&*second, &id).await, seen, "a fenced commit wrote");
}

/// Precondition: none. Many tasks, across both handles, commit different batches at the same
/// (epoch, seq), three rounds: each round exactly one is `Applied`, every other is `Conflict`,
/// and the stored entries are the winners' batches.
pub async fn racing_commits_exactly_one_applies(h: Arc<dyn StoreHarness>) {
    const RACERS: usize = 16;
    let stores = [h.store(), h.reopen().await];
    let id = sid("race");
    let epoch = start(&*stores[0], &id, ResumePolicy::Lazy, &node("a")).await;
    let mut expected: Vec<Entry> = Vec::new();
    let mut seq = 0;
    for round in 0..3 {
        let barrier = Arc::new(tokio::sync::Barrier::new(RACERS));
        let mut tasks = Vec::new();
        for i in 0..RACERS {
            let store = stores[i % 2].clone();
            let (id, barrier) = (id.clone(), barrier.clone());
            let b = batch(
                vec![input(seq + 1, &format!("r{round}-{i}")), reply(seq + 2)],
                busy(&format!("r{round}-{i}"), seq + 1),
            );
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let res = store.commit(&id, epoch, seq, &b).await;
                (b, res)
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            let (b, res) = t.await.expect("racer panicked");
            match res {
                Ok(CommitAck::Applied { seq: got }) => {
                    assert_eq!(got, seq + 2, "round {round}: Applied with the wrong seq");
                    winners.push(b);
                }
                Ok(other) => panic!("round {round}: a racer got {other:?}"),
                Err(e) => assert_eq!(
                    e.kind(),
                    ErrorKind::Conflict,
                    "round {round}: a losing racer must get Conflict, got {e}"
                ),
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "round {round}: {} commits at one (epoch, seq) applied",
            winners.len()
        );
        let winner = winners.pop().expect("one winner");
        expected.extend(winner.entries.clone());
        seq += 2;
        let (rec, entries) = snapshot(&*stores[0], &id).await;
        assert_eq!(rec.seq, seq);
        assert_eq!(
            rec.state, winner.state,
            "round {round}: state is not the winner's"
        );
        assert_eq!(
            entries, expected,
            "round {round}: entries are not the winners'"
        );
    }
}
