//! The fenced commit at each boundary of a turn: the next entries and the turn state, written
//! together under the epoch the actor got from `activate`. A retryable failure is retried with
//! backoff, after confirming from the store whether an ambiguous attempt had landed; anything
//! else ends the actor (a fresh one reloads from the store).

use std::time::Duration;

use tracing::{debug, warn};

use super::TurnState;
use super::actor::Actor;
use crate::error::{Error, Result};
use crate::model::{Entry, EntryPayload};
use crate::store::{CommitAck, CommitBatch, now_ms};

/// How long a retryable commit failure is retried before the actor gives the session up.
const COMMIT_RETRIES: u32 = 5;

impl Actor {
    /// Commits `payloads` (as the next entries) with `state`, fenced by this actor's epoch.
    /// Retryable failures are retried with backoff; anything else ends the actor.
    pub(super) async fn commit(
        &mut self,
        payloads: Vec<EntryPayload>,
        mut state: TurnState,
    ) -> Result<CommitAck> {
        self.stamp_run_time(&mut state);
        let at_ms = if payloads.is_empty() { 0 } else { now_ms() };
        let entries: Vec<Entry> = payloads
            .into_iter()
            .enumerate()
            .map(|(i, payload)| {
                let seq = self.seq + 1 + i as u64;
                Entry {
                    seq,
                    parent: (seq > 1).then(|| seq - 1),
                    at_ms,
                    payload,
                }
            })
            .collect();
        let batch = CommitBatch { entries, state };
        let mut attempt = 0;
        // Set once a store call failed retryably: that attempt may have landed, so a later
        // `Conflict` or `DuplicateInput` may be its own write, not another writer's.
        let mut ambiguous = false;
        let ack = loop {
            // The gate is asked at every attempt: a retry after a pause must ask again.
            let sent = match self.gate.as_ref().map_or(Ok(()), |gate| gate()) {
                Ok(()) => {
                    let sent = self
                        .store
                        .commit(&self.id, self.epoch, self.seq, &batch)
                        .await;
                    // `DurabilityNotMet` is no doubt about whether the write landed (it did, on
                    // the primary) but about its replicas, which only the store can settle.
                    ambiguous |= sent.as_ref().is_err_and(|e| {
                        e.is_retryable() && !matches!(e, Error::DurabilityNotMet { .. })
                    });
                    sent
                }
                Err(e) => Err(e),
            };
            match sent {
                Ok(ack @ CommitAck::Applied { .. }) => break ack,
                // The earlier attempt may have landed just after our confirmation read it
                // missing (a server finishing a write its client gave up on).
                Ok(ack @ CommitAck::DuplicateInput { .. }) if ambiguous => {
                    match self.confirm(&batch).await? {
                        Some(applied) => break applied,
                        None => break ack,
                    }
                }
                Err(e @ Error::Conflict { .. }) if ambiguous => match self.confirm(&batch).await? {
                    Some(applied) => break applied,
                    None => return Err(e),
                },
                Ok(ack) => break ack,
                Err(e)
                    if e.is_retryable()
                        && !matches!(e, Error::Conflict { .. })
                        && attempt < COMMIT_RETRIES =>
                {
                    attempt += 1;
                    warn!(error = %e, attempt, "commit failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                    // Resent as is, never confirmed by reading first: a store that replicates
                    // (Redis with WAIT) shows a write its replicas lack, which must not pass as
                    // done. The store's own answer to the resend — `DuplicateInput` (given, with
                    // WAIT, once the replicas have it) or `Conflict` — comes first, and only
                    // then is it confirmed below.
                }
                Err(e) => return Err(e),
            }
        };
        if let CommitAck::Applied { seq } = ack {
            debug!(seq, entries = batch.entries.len(), "committed");
            let CommitBatch { entries, state } = batch;
            let new_turn = state.turn.as_ref().map(|t| &t.input_id)
                != self.state.turn.as_ref().map(|t| &t.input_id);
            self.seq = seq;
            self.state = state;
            if new_turn {
                self.time_turn();
            }
            for entry in entries {
                self.view.apply(&entry);
                self.emit_entry(entry);
            }
        }
        Ok(ack)
    }

    /// Whether `batch`, committed after `self.seq`, is what the store holds there: `Some`
    /// (applied, at the stored seq) if so, `None` if nothing was written after `self.seq`, and
    /// `Conflict` if something else was (or `Fenced` if another writer took the session).
    ///
    /// The entries are compared whole (seq, parent, timestamp, payload): the timestamp and the
    /// payload's ids (input id, tool call ids, the model's answer) make another batch equal to
    /// this one all but impossible. The turn state needs no comparison: it is written atomically
    /// with the entries, and only this epoch's writer (this actor) can have written either. An
    /// entry that does not survive the store's round trip exactly reads as a conflict, which
    /// ends the actor, and a fresh one reloads — the safe answer.
    async fn confirm(&self, batch: &CommitBatch) -> Result<Option<CommitAck>> {
        let record = self
            .store
            .load(&self.id)
            .await?
            .ok_or_else(|| Error::NotFound {
                session: self.id.clone(),
            })?;
        if record.epoch != self.epoch {
            return Err(Error::Fenced {
                session: self.id.clone(),
                epoch: self.epoch,
                current: record.epoch,
            });
        }
        if record.seq == self.seq {
            return Ok(None);
        }
        let new_seq = batch.new_seq(self.seq);
        if record.seq == new_seq && !batch.entries.is_empty() {
            let stored = self
                .store
                .entries(&self.id, self.seq, batch.entries.len())
                .await?;
            if stored == batch.entries {
                debug!(seq = new_seq, "an ambiguous commit had landed");
                return Ok(Some(CommitAck::Applied { seq: new_seq }));
            }
        }
        Err(Error::Conflict {
            session: self.id.clone(),
            expected: self.seq,
            actual: record.seq,
        })
    }
}
