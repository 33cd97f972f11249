//! Atomic boundary commits (invariant 2): readers polling during many commits never see a
//! batch's entries apart from its turn state.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use normandy_core::{CommitBatch, Entry, ResumePolicy, Seq, SessionId, SessionStore};

use super::{ALL, applied, batch, busy, input, node, reply, sid, start};
use crate::harness::StoreHarness;

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
