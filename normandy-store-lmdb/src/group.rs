//! Group commit: one thread owns every write of this process and folds the writes queued while
//! the previous transaction was syncing into one LMDB write transaction.
//!
//! LMDB has a single writer per environment and each write transaction costs one `fsync`, so
//! writes from many sessions share a transaction. Each write keeps its own outcome: every check
//! (existence, terminal, epoch, duplicate input, seq) runs inside the transaction before that
//! write touches anything, and a write whose check fails writes nothing and does not disturb the
//! others. Outcomes are sent only after the transaction commits; if the transaction itself fails,
//! nothing of it is written, and its writes are run again one per transaction, so each gets its
//! own outcome. Because the checks run inside the write transaction, which LMDB
//! serializes across processes, fencing holds for every process sharing the environment.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use heed::{MdbError, RwTxn};
use normandy_core::{
    CommitAck, Epoch, Error, InputId, NewSession, NodeId, Result, Seq, SessionId, SessionRecord,
    SessionStatus, TurnState, now_ms,
};
use tokio::sync::oneshot;

mod writes;

use writes::{activate, commit, create, delete, mark_terminal};

use crate::conn::EnvCore;
use crate::error::from_heed;
use crate::schema::Dbs;

/// Where a write's outcome goes.
pub(crate) type Reply<T> = oneshot::Sender<Result<T>>;

/// One entry of a commit, encoded by the caller (outside the writer thread).
#[derive(Debug)]
pub(crate) struct EncodedEntry {
    pub(crate) seq: Seq,
    pub(crate) input: Option<InputId>,
    pub(crate) blob: Vec<u8>,
}

/// A write, as queued to the writer thread.
#[derive(Debug)]
pub(crate) enum Op {
    Create {
        new: NewSession,
        template_blob: Option<Vec<u8>>,
        state_blob: Vec<u8>,
        reply: Reply<SessionRecord>,
    },
    Activate {
        id: SessionId,
        node: NodeId,
        reply: Reply<SessionRecord>,
    },
    Commit {
        id: SessionId,
        epoch: Epoch,
        expected_seq: Seq,
        entries: Vec<EncodedEntry>,
        /// The new state, to compute whether the session becomes resumable.
        state: TurnState,
        state_blob: Vec<u8>,
        reply: Reply<CommitAck>,
    },
    MarkTerminal {
        id: SessionId,
        epoch: Epoch,
        reply: Reply<()>,
    },
    Delete {
        id: SessionId,
        reply: Reply<bool>,
    },
    /// Test support: overwrites an existing value (to plant corruption).
    Overwrite {
        db: RawDb,
        key: Vec<u8>,
        value: Vec<u8>,
        reply: Reply<bool>,
    },
}

/// Which database an [`Op::Overwrite`] targets.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RawDb {
    States,
    Entries,
}

/// What an applied write produced (before commit).
enum Done {
    Created { now: u64 },
    Record(Box<SessionRecord>),
    Ack(CommitAck),
    Unit,
    Bool(bool),
}

impl Op {
    /// Sends the outcome to the caller (who may have gone: then nothing happens).
    fn respond(self, out: Result<Done>) {
        fn mismatch<T>() -> Result<T> {
            Err(Error::Internal(
                "LMDB writer produced the wrong outcome kind".into(),
            ))
        }
        match self {
            Op::Create { new, reply, .. } => {
                let _ = reply.send(out.and_then(|d| match d {
                    Done::Created { now } => Ok(SessionRecord {
                        id: new.id,
                        epoch: 0,
                        seq: 0,
                        owner: None,
                        status: SessionStatus::Active,
                        resume_policy: new.resume_policy,
                        template: new.template,
                        state: TurnState::default(),
                        created_at_ms: now,
                        updated_at_ms: now,
                    }),
                    _ => mismatch(),
                }));
            }
            Op::Activate { reply, .. } => {
                let _ = reply.send(out.and_then(|d| match d {
                    Done::Record(r) => Ok(*r),
                    _ => mismatch(),
                }));
            }
            Op::Commit { reply, .. } => {
                let _ = reply.send(out.and_then(|d| match d {
                    Done::Ack(a) => Ok(a),
                    _ => mismatch(),
                }));
            }
            Op::MarkTerminal { reply, .. } => {
                let _ = reply.send(out.and_then(|d| match d {
                    Done::Unit => Ok(()),
                    _ => mismatch(),
                }));
            }
            Op::Delete { reply, .. } | Op::Overwrite { reply, .. } => {
                let _ = reply.send(out.and_then(|d| match d {
                    Done::Bool(b) => Ok(b),
                    _ => mismatch(),
                }));
            }
        }
    }

    fn fail(self, err: Error) {
        self.respond(Err(err));
    }
}

/// Handle on the writer thread. Dropping it drains the queue and joins the thread.
#[derive(Debug)]
pub(crate) struct Writer {
    tx: Option<mpsc::Sender<Op>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts the writer thread of `core`.
    pub(crate) fn spawn(core: Arc<EnvCore>, max_batch: usize, linger: Duration) -> Result<Self> {
        // Unbounded on purpose: every caller awaits its reply before writing again, so the queue
        // never holds more than one write per concurrent caller, and a bounded std channel
        // would block an async caller's thread when full.
        let (tx, rx) = mpsc::channel::<Op>();
        let thread = std::thread::Builder::new()
            .name("normandy-lmdb-writer".into())
            .spawn(move || run(&core, &rx, max_batch, linger))
            .map_err(|e| Error::Internal(format!("cannot start the LMDB writer thread: {e}")))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues a write.
    pub(crate) fn submit(&self, op: Op) -> Result<()> {
        let stopped = || Error::Internal("the LMDB writer thread has stopped".into());
        self.tx
            .as_ref()
            .ok_or_else(stopped)?
            .send(op)
            .map_err(|_| stopped())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop once the queued writes are done.
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(core: &EnvCore, rx: &mpsc::Receiver<Op>, max_batch: usize, linger: Duration) {
    // Size and duration of the previous transaction: several writers seen means more are
    // likely on their way back (their commits were just acknowledged).
    let mut last_len = 0usize;
    let mut last_took = Duration::ZERO;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        // Everything queued while the previous transaction synced joins this one.
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        if last_len > 1 && !linger.is_zero() {
            let deadline = Instant::now() + last_took / 2;
            while batch.len() < max_batch {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match rx.recv_timeout(linger.min(left)) {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
        }
        last_len = batch.len();
        let started = Instant::now();
        // A panic (a bug) aborts the transaction as it unwinds and drops the batch's replies,
        // so its callers get an error; the thread keeps serving later writes.
        if catch_unwind(AssertUnwindSafe(|| process(core, batch))).is_err() {
            tracing::error!(path = %core.path.display(), "LMDB writer panicked; batch failed");
        }
        last_took = started.elapsed();
    }
}

/// Why a whole transaction failed.
enum TxnFail {
    MapFull,
    TxnFull,
    MapResized,
    Other(heed::Error),
}

impl From<heed::Error> for TxnFail {
    fn from(e: heed::Error) -> Self {
        match e {
            heed::Error::Mdb(MdbError::MapFull) => TxnFail::MapFull,
            heed::Error::Mdb(MdbError::TxnFull) => TxnFail::TxnFull,
            heed::Error::Mdb(MdbError::MapResized) => TxnFail::MapResized,
            other => TxnFail::Other(other),
        }
    }
}

fn process(core: &EnvCore, batch: Vec<Op>) {
    let mut resized = 0;
    loop {
        match try_batch(core, &batch) {
            Ok(outs) => {
                for (op, out) in batch.into_iter().zip(outs) {
                    op.respond(out);
                }
                return;
            }
            // The transaction was aborted, so nothing of it is visible: grow and run it again.
            Err(TxnFail::MapFull) => match core.grow() {
                Ok(_) => continue,
                Err(e) => return split_or_fail(core, batch, e),
            },
            Err(TxnFail::TxnFull) => {
                let e = from_heed(heed::Error::Mdb(MdbError::TxnFull), &core.path, None);
                return split_or_fail(core, batch, e);
            }
            Err(TxnFail::MapResized) if resized < 8 => {
                resized += 1;
                if let Err(e) = core.adopt_resized(None) {
                    batch.into_iter().for_each(|op| op.fail(e.clone()));
                    return;
                }
            }
            Err(TxnFail::MapResized) => {
                let e = from_heed(heed::Error::Mdb(MdbError::MapResized), &core.path, None);
                batch.into_iter().for_each(|op| op.fail(e.clone()));
                return;
            }
            // One write's put (a damaged page under its keys) aborts the shared transaction:
            // nothing of it is visible, so its writes are retried one by one and the others
            // do not fail with it. (After a failed commit LMDB restores the old meta page, so
            // a retry can never write a second time what the failed transaction wrote.)
            Err(TxnFail::Other(e)) => {
                let e = from_heed(e, &core.path, None);
                return split_or_fail(core, batch, e);
            }
        }
    }
}

/// A batch whose transaction failed as a whole (too large for the map or for one transaction,
/// or aborted by one write's error): run its writes one by one, each in its own transaction, so
/// only the write at fault fails.
fn split_or_fail(core: &EnvCore, batch: Vec<Op>, err: Error) {
    if batch.len() > 1 {
        for op in batch {
            process(core, vec![op]);
        }
    } else {
        batch.into_iter().for_each(|op| op.fail(err.clone()));
    }
}

fn try_batch(core: &EnvCore, batch: &[Op]) -> Result<Vec<Result<Done>>, TxnFail> {
    let _held = core.hold();
    let mut txn = core.env.write_txn()?;
    let now = now_ms();
    let mut outs = Vec::with_capacity(batch.len());
    for op in batch {
        outs.push(apply(&mut txn, &core.dbs, core, op, now)?);
    }
    // A transaction that wrote nothing commits without touching the disk.
    txn.commit()?;
    core.txns.fetch_add(1, Ordering::Relaxed);
    core.writes.fetch_add(batch.len() as u64, Ordering::Relaxed);
    Ok(outs)
}

/// Applies one write. The outer error (heed) fails the whole transaction; the inner one is this
/// write's own outcome, returned before it wrote anything.
fn apply(
    txn: &mut RwTxn<'_>,
    dbs: &Dbs,
    core: &EnvCore,
    op: &Op,
    now: u64,
) -> heed::Result<Result<Done>> {
    match op {
        Op::Create {
            new,
            template_blob,
            state_blob,
            ..
        } => create(
            txn,
            dbs,
            core,
            new,
            template_blob.as_deref(),
            state_blob,
            now,
        ),
        Op::Activate { id, node, .. } => activate(txn, dbs, core, id, node, now),
        Op::Commit {
            id,
            epoch,
            expected_seq,
            entries,
            state,
            state_blob,
            ..
        } => commit(
            txn,
            dbs,
            core,
            id,
            *epoch,
            *expected_seq,
            entries,
            state,
            state_blob,
            now,
        ),
        Op::MarkTerminal { id, epoch, .. } => mark_terminal(txn, dbs, core, id, *epoch, now),
        Op::Delete { id, .. } => delete(txn, dbs, core, id),
        Op::Overwrite { db, key, value, .. } => {
            let db = match db {
                RawDb::States => dbs.states,
                RawDb::Entries => dbs.entries,
            };
            if db.get(txn, key)?.is_none() {
                return Ok(Ok(Done::Bool(false)));
            }
            db.put(txn, key, value)?;
            Ok(Ok(Done::Bool(true)))
        }
    }
}

#[cfg(test)]
mod tests {
    //! One commit's write failing the whole shared transaction. No data a caller can send makes
    //! a put fail (keys stay under LMDB's 511-byte limit, values have no useful limit, and a
    //! full map is grown or split already), but a damaged page under one session's keys does:
    //! LMDB then answers `MDB_CORRUPTED` to the put, and the transaction can only be aborted.
    //! The knob below stands in for that page, for the sessions a test names.

    use std::cell::RefCell;

    use normandy_core::codec::{self, BlobKind};
    use normandy_core::{
        CommitBatch, Entry, EntryPayload, ErrorKind, Message, QueuedInput, ResumePolicy,
    };

    use super::*;
    use crate::LmdbConfig;
    use crate::conn::page_size;
    use crate::schema::keys;

    thread_local! {
        /// Sessions whose commit writes fail as on a corrupt page (on the thread that runs
        /// `process`: the test's own, so parallel tests cannot see each other's).
        static BROKEN: RefCell<Vec<SessionId>> = const { RefCell::new(Vec::new()) };
    }

    /// The knob: a commit write to a broken session fails the transaction.
    pub(super) fn fail_if_broken(id: &SessionId) -> heed::Result<()> {
        if BROKEN.with(|b| b.borrow().contains(id)) {
            return Err(heed::Error::Mdb(MdbError::Corrupted));
        }
        Ok(())
    }

    fn sid(s: &str) -> SessionId {
        SessionId::new(s).unwrap()
    }

    /// Runs `op` as a batch of its own and returns its outcome.
    fn run_one<T>(core: &EnvCore, op: impl FnOnce(Reply<T>) -> Op) -> Result<T> {
        let (tx, mut rx) = oneshot::channel();
        process(core, vec![op(tx)]);
        rx.try_recv().expect("answered")
    }

    fn input_commit(id: &SessionId, epoch: Epoch, reply: Reply<CommitAck>) -> Op {
        let input = InputId::new(format!("in-{id}")).unwrap();
        let entry = Entry {
            seq: 1,
            parent: None,
            at_ms: 1,
            payload: EntryPayload::Input {
                input_id: input.clone(),
                content: Message::user("hello").content,
            },
        };
        let mut state = TurnState::default();
        state.queued.push_back(QueuedInput {
            input_id: input.clone(),
            seq: 1,
        });
        let batch = CommitBatch {
            entries: vec![entry.clone()],
            state,
        };
        Op::Commit {
            id: id.clone(),
            epoch,
            expected_seq: 0,
            entries: vec![EncodedEntry {
                seq: 1,
                input: Some(input),
                blob: codec::encode(BlobKind::Entry, &entry).unwrap(),
            }],
            state_blob: codec::encode(BlobKind::TurnState, &batch.state).unwrap(),
            state: batch.state,
            reply,
        }
    }

    /// A transaction aborted by one commit's write is retried commit by commit: the others
    /// apply, and only that one fails.
    #[test]
    fn a_commit_that_aborts_the_transaction_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let config = LmdbConfig::new(dir.path()).validated(page_size()).unwrap();
        let core = EnvCore::open(&config).unwrap();
        let ids: Vec<SessionId> = (0..5).map(|i| sid(&format!("s{i}"))).collect();
        let mut epochs = Vec::new();
        for id in &ids {
            let state_blob = codec::encode(BlobKind::TurnState, &TurnState::default()).unwrap();
            run_one(&core, |reply| Op::Create {
                new: NewSession::bare(id.clone(), ResumePolicy::Lazy),
                template_blob: None,
                state_blob,
                reply,
            })
            .unwrap();
            let node = NodeId::new("a", 1).unwrap();
            let record = run_one(&core, |reply| Op::Activate {
                id: id.clone(),
                node,
                reply,
            })
            .unwrap();
            epochs.push(record.epoch);
        }
        let bad = ids[2].clone();
        BROKEN.with(|b| b.borrow_mut().push(bad.clone()));
        let txns = core.txns.load(Ordering::Relaxed);
        // One batch: the five commits share one write transaction.
        let (ops, mut replies): (Vec<Op>, Vec<_>) = ids
            .iter()
            .zip(&epochs)
            .map(|(id, &epoch)| {
                let (tx, rx) = oneshot::channel();
                (input_commit(id, epoch, tx), rx)
            })
            .unzip();
        process(&core, ops);
        for (id, rx) in ids.iter().zip(&mut replies) {
            let out = rx.try_recv().expect("answered");
            if *id == bad {
                let err = out.unwrap_err();
                assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
            } else {
                assert_eq!(
                    out.expect("a neighbour of the failing commit"),
                    CommitAck::Applied { seq: 1 },
                    "{id}"
                );
            }
        }
        // Four transactions of one commit each; the failing one committed nothing.
        assert_eq!(core.txns.load(Ordering::Relaxed) - txns, 4);
        let rtxn = core.env.read_txn().unwrap();
        for id in &ids {
            let stored = core.dbs.entries.get(&rtxn, &keys::entry(id, 1)).unwrap();
            assert_eq!(stored.is_some(), *id != bad, "entry of {id}");
        }
    }
}
