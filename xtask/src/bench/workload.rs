//! The commit workload the store benches share: the same entry and state bytes for our store and
//! for each raw baseline, and the concurrent-sessions loop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use normandy_core::{
    CommitAck, CommitBatch, ContentBlock, Entry, EntryPayload, Epoch, InputId, QueuedInput, Seq,
    SessionId, SessionStore, TurnState,
};

/// The text of every benchmark input.
pub(crate) const TEXT: &str =
    "The quick brown fox jumps over the lazy dog while the agent thinks about it.";
/// Concurrent sessions in the throughput benches.
pub(crate) const SESSIONS: usize = 64;

/// The input entry with seq `seq`.
pub(crate) fn entry(seq: Seq) -> Entry {
    Entry {
        seq,
        parent: seq.checked_sub(1).filter(|p| *p > 0),
        at_ms: 1_700_000_000_000,
        payload: EntryPayload::Input {
            input_id: InputId::new(format!("input-{seq}")).expect("valid input id"),
            content: vec![ContentBlock::text(TEXT)],
        },
    }
}

/// The turn state after entry `seq` (its input queued, so the session has work).
pub(crate) fn state_after(seq: Seq) -> Result<TurnState> {
    let mut state = TurnState::default();
    state.queued.push_back(QueuedInput {
        input_id: InputId::new(format!("input-{seq}"))?,
        seq,
    });
    Ok(state)
}

/// One commit of one entry on top of `expected`.
pub(crate) fn one_entry_batch(expected: Seq) -> Result<CommitBatch> {
    Ok(CommitBatch {
        entries: vec![entry(expected + 1)],
        state: state_after(expected + 1)?,
    })
}

/// Each session commits `per_round` times in sequence, all sessions at once, from seq `first`;
/// returns the wall time.
pub(crate) async fn commit_concurrently<S: SessionStore>(
    store: &Arc<S>,
    ids: &[(SessionId, Epoch)],
    first: Seq,
    per_round: usize,
) -> Result<Duration> {
    let t = Instant::now();
    let tasks: Vec<_> = ids
        .iter()
        .cloned()
        .map(|(id, epoch)| {
            let store = store.clone();
            tokio::spawn(async move {
                for s in first..first + per_round as u64 {
                    let ack = store.commit(&id, epoch, s, &one_entry_batch(s)?).await?;
                    ensure!(
                        ack == CommitAck::Applied { seq: s + 1 },
                        "unexpected {ack:?}"
                    );
                }
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(t.elapsed())
}

/// Rehydrates a 1,000-entry session (`load` + all entries) once; returns the time it took.
pub(crate) async fn rehydrate_once<S: SessionStore>(store: &S, id: &SessionId) -> Result<Duration> {
    let t = Instant::now();
    let rec = store.load(id).await?.context("rehydrate session missing")?;
    let entries = store.entries(id, 0, 1000).await?;
    let elapsed = t.elapsed();
    ensure!(
        rec.seq == 1000 && entries.len() == 1000,
        "incomplete rehydrate"
    );
    Ok(elapsed)
}
