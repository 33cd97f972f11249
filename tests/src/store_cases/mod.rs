//! The store conformance suite: one case per `# Behavior` bullet of
//! [`SessionStore`] and per store invariant of DESIGN.md (1–4, 7).
//!
//! Every case is a plain `pub async fn case(h: Arc<dyn StoreHarness>)` that panics on a
//! violation; [`store_conformance!`](crate::store_conformance) stamps one test per case. Each
//! case's doc names its precondition: unless it says otherwise, only an empty, isolated harness.
//! Cases make their own sessions with fresh random ids and node names, so they stay correct even
//! on a namespace that other cases share.
//!
//! # Layout
//! One file per theme, each case re-exported here (the stamping macro calls
//! `store_cases::<case>`); the fixtures and assertion helpers the themes share live below.
//! - `create`: `create` and `load`.
//! - `activate`: epochs and owners, unknown and terminal sessions, concurrent activations.
//! - `commit`: applying a batch; fencing, conflicts, duplicate input, bad numbering.
//! - `atomic`: entries and turn state are never seen apart (invariant 2).
//! - `entries`: paging by `after` and `limit`.
//! - `resumable`: `list_resumable`.
//! - `lifecycle`: `mark_terminal` and `delete`.
//! - `corrupt`: bad data is a typed error (invariant 7).
//! - `canary`: no secret at rest or in the logs (invariant 4).
//! - `single_writer`: one writer across handles (invariant 1).

mod activate;
mod atomic;
mod canary;
mod commit;
mod corrupt;
mod create;
mod entries;
mod lifecycle;
mod resumable;
mod single_writer;

pub use activate::{
    activate_bumps_epoch_and_sets_owner, activate_terminal_is_session_closed_and_changes_nothing,
    activate_unknown_is_not_found, concurrent_activations_get_distinct_epochs,
};
pub use atomic::entries_and_state_are_never_seen_apart;
pub use canary::canary_secret_never_stored_or_logged;
pub use commit::{
    commit_after_terminal_is_session_closed, commit_applies_and_returns_new_seq,
    commit_bad_numbering_is_invalid_input, commit_duplicate_input_returns_original_seq,
    commit_moved_seq_is_conflict_and_writes_nothing,
    commit_stale_epoch_is_fenced_and_writes_nothing, commit_unknown_session_is_not_found,
    commit_without_entries_updates_only_state, duplicate_input_is_detected_across_reopen,
};
pub use corrupt::{
    corrupt_entry_is_typed_error, corrupt_turn_state_is_typed_error,
    entry_stored_under_another_seq_is_corrupt, newer_format_version_is_unsupported_version,
};
pub use create::{
    create_existing_is_already_exists_and_changes_nothing, create_returns_a_fresh_record,
    load_unknown_is_none,
};
pub use entries::{
    entries_pages_by_after_and_limit, entries_unknown_is_not_found,
    provider_content_is_stored_exactly,
};
pub use lifecycle::{
    delete_removes_session_and_entries, mark_terminal_is_fenced_and_idempotent,
    mark_terminal_unknown_is_not_found,
};
pub use resumable::{
    list_resumable_filters_by_owner, list_resumable_follows_reactivation_by_another_node,
    list_resumable_lists_only_eager_open_sessions_with_work, list_resumable_pages_with_cursor,
    list_resumable_tracks_work_terminal_and_delete,
};
pub use single_writer::{
    older_handle_is_fenced_after_reopen_activates, racing_commits_exactly_one_applies,
};

use std::collections::VecDeque;
use std::fmt::Debug;

use normandy_core::{
    ActiveTurn, CommitAck, CommitBatch, ContentBlock, Entry, EntryPayload, Epoch, Error, ErrorKind,
    InputId, Message, NewSession, NodeId, Phase, QueuedInput, Result, ResumePolicy, Seq, SessionId,
    SessionRecord, SessionStore, StopReason, TurnState, Usage,
};
use uuid::Uuid;

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
            usage: Usage::new(seq, 1),
            call: Default::default(),
            incomplete: false,
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
            ran_ms: Some(1_234),
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
