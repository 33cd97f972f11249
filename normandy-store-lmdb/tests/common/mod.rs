//! Helpers shared by this crate's integration tests.
#![allow(dead_code, unreachable_pub)]

use normandy_core::{
    CommitBatch, ContentBlock, Entry, EntryPayload, InputId, NodeId, QueuedInput, Seq, SessionId,
    TurnState,
};

pub fn sid(s: &str) -> SessionId {
    SessionId::new(s).unwrap()
}

pub fn node(s: &str) -> NodeId {
    NodeId::new(s, 1).unwrap()
}

/// An `Input` entry at `seq` with input id `in-{seq}` and `text`.
pub fn input_entry(seq: Seq, text: &str) -> Entry {
    Entry {
        seq,
        parent: seq.checked_sub(1).filter(|p| *p > 0),
        at_ms: 1,
        payload: EntryPayload::Input {
            input_id: InputId::new(format!("in-{seq}")).unwrap(),
            content: vec![ContentBlock::text(text)],
        },
    }
}

/// `n` input entries after `expected_seq`, with a state whose queue names the last one (so a
/// reader can check state and entries belong together).
pub fn batch(expected_seq: Seq, n: u64, text: &str) -> CommitBatch {
    let entries: Vec<Entry> = (1..=n)
        .map(|i| input_entry(expected_seq + i, text))
        .collect();
    let last = expected_seq + n;
    let mut state = TurnState::default();
    if n > 0 {
        state.queued.push_back(QueuedInput {
            input_id: InputId::new(format!("in-{last}")).unwrap(),
            seq: last,
        });
    }
    CommitBatch { entries, state }
}
