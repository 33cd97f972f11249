//! Group commit: commits of different sessions that arrive while others are in flight share one
//! script call (and, with `WAIT`, one `WAIT`), each keeping its own outcome.
//!
//! Leader/follower, so a lone commit pays no extra hop: a commit that finds a free slot (fewer
//! than [`max_in_flight`] batches in flight) leads — it sends everything queued, itself
//! included, as one batch on its own task. A commit that finds every slot busy queues and
//! waits; whichever batch finishes next hands its slot to a task that sends the queue. Under
//! load the batches grow by themselves; idle, each commit goes out alone at once.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use normandy_core::{Epoch, Error, InputId, Result, Seq, SessionId, now_ms};
use normandy_redis::RedisConn;
use redis::Value;
use tokio::sync::oneshot;

use crate::conn::{WaitPool, eval_on, run_with_wait};
use crate::error::{self, Ctx};
use crate::scripts::{Reply, parse_u64};

/// Batches in flight at once. Without `WAIT`, two keep the connection busy (one running on the
/// server, one on the wire), and more only shrink the batches: the server runs scripts one at a
/// time, and each script call has a fixed cost. `cargo xtask bench redis --quick`, 64 sessions:
/// 2 in flight beat 4 in each of five runs paired on one machine (36–41k commits/s against
/// 34–38k). With `WAIT` a batch spends most of its time waiting for the replica's
/// acknowledgement, so more batches in flight keep the replica busy: in one paired run 4 gave
/// 21k/s where 2 gave 18k/s.
fn max_in_flight(wait: bool) -> usize {
    if wait { 4 } else { 2 }
}

/// Most commits in one script call.
const MAX_BATCH: usize = 64;
/// Most argument bytes in one script call: Redis runs a script without interleaving anything,
/// so a huge batch would stall every other client.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// One commit, ready to join a batch.
pub(crate) struct CommitCall {
    pub(crate) id: SessionId,
    pub(crate) epoch: Epoch,
    pub(crate) expected_seq: Seq,
    /// State, stream, inputs (and on a cluster the slot's two index buckets).
    pub(crate) keys: Vec<String>,
    /// In `scripts::commit_many` order: id, epoch, expected seq, new seq, state blob, has_work,
    /// entry count, then seq, blob, input id per entry.
    pub(crate) args: Vec<Vec<u8>>,
}

impl CommitCall {
    fn size(&self) -> usize {
        self.args.iter().map(Vec::len).sum::<usize>()
            + self.keys.iter().map(String::len).sum::<usize>()
    }

    fn ctx(&self) -> Ctx<'_> {
        Ctx::commit(&self.id, self.epoch, self.expected_seq)
    }
}

/// A commit's outcome: the script's reply and, with `WAIT`, the replicas that acknowledged it.
pub(crate) type Outcome = Result<(Reply, Option<u32>)>;

struct Job {
    call: CommitCall,
    tx: oneshot::Sender<Outcome>,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    in_flight: usize,
}

/// Sends commits, batching those that arrive together.
pub(crate) struct Committer {
    pub(crate) shared: RedisConn,
    pub(crate) wait: Option<Arc<WaitPool>>,
    pub(crate) script: redis::Script,
    /// The index prefix argument (`""` on a cluster).
    pub(crate) index: String,
    /// Whether commits of different sessions may share a script call: on one server. On a
    /// cluster the sessions of a batch would live in different slots, which one script may not
    /// touch, so each commit is its own script call; the cluster connection pipelines the
    /// calls bound for one primary on its socket, so concurrency still overlaps their round
    /// trips (and with `WAIT`, each call has its own `WAIT` on its own primary).
    batching: bool,
    // std Mutex: queue operations only, never held across an await.
    queue: Mutex<Queue>,
}

impl Committer {
    pub(crate) fn new(
        shared: RedisConn,
        wait: Option<Arc<WaitPool>>,
        script: redis::Script,
        index: String,
    ) -> Self {
        Self {
            batching: !shared.is_cluster(),
            shared,
            wait,
            script,
            index,
            queue: Mutex::new(Queue::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits `call`, alone or in a batch, and returns its own outcome.
    pub(crate) async fn submit(self: &Arc<Self>, call: CommitCall) -> Outcome {
        let (tx, rx) = oneshot::channel();
        if !self.batching {
            self.execute(vec![Job { call, tx }]).await;
            return rx.await.unwrap_or_else(|_| {
                Err(Error::Internal(
                    "commit outcome dropped before it was sent".into(),
                ))
            });
        }
        let lead = {
            let mut q = self.lock();
            q.jobs.push_back(Job { call, tx });
            if q.in_flight < max_in_flight(self.wait.is_some()) {
                q.in_flight += 1;
                true
            } else {
                false
            }
        };
        if lead {
            let mut slot = Slot {
                committer: self.clone(),
                held: true,
            };
            if let Some(batch) = self.take_batch() {
                self.execute(batch).await;
            }
            slot.pass_on();
        }
        rx.await.unwrap_or_else(|_| {
            // The task sending our batch was cancelled: the script may or may not have run.
            Err(Error::Unavailable {
                backend: error::BACKEND,
                message: "commit batch abandoned before its outcome was known".into(),
            })
        })
    }

    /// The next batch from the front of the queue (the slot stays held), or `None`.
    fn take_batch(&self) -> Option<Vec<Job>> {
        let mut q = self.lock();
        Self::drain(&mut q)
    }

    fn drain(q: &mut Queue) -> Option<Vec<Job>> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(job) = q.jobs.front() {
            let size = job.call.size();
            if !batch.is_empty() && (batch.len() >= MAX_BATCH || bytes + size > MAX_BATCH_BYTES) {
                break;
            }
            bytes += size;
            batch.extend(q.jobs.pop_front());
        }
        (!batch.is_empty()).then_some(batch)
    }

    /// Sends batches until the queue is empty, then frees the slot (run on its own task).
    async fn lead(self: Arc<Self>) {
        let mut slot = Slot {
            committer: self.clone(),
            held: true,
        };
        loop {
            let batch = {
                let mut q = self.lock();
                match Self::drain(&mut q) {
                    Some(b) => b,
                    None => {
                        q.in_flight -= 1;
                        slot.held = false;
                        return;
                    }
                }
            };
            self.execute(batch).await;
        }
    }

    /// Sends one batch and hands every job its own outcome.
    async fn execute(&self, batch: Vec<Job>) {
        let mut cmd = redis::cmd("EVALSHA");
        let keys: usize = batch.iter().map(|job| job.call.keys.len()).sum();
        cmd.arg(self.script.get_hash()).arg(keys);
        for job in &batch {
            for key in &job.call.keys {
                cmd.arg(key);
            }
        }
        cmd.arg(&self.index).arg(now_ms());
        for job in &batch {
            for arg in &job.call.args {
                cmd.arg(arg.as_slice());
            }
        }
        let sent = match &self.wait {
            None => {
                let mut con = self.shared.clone();
                eval_on(&mut con, &self.script, &cmd, Ctx::default())
                    .await
                    .map(|v| (v, None))
            }
            Some(pool) => run_with_wait(pool, &self.script, &cmd, Ctx::default())
                .await
                .map(|(v, acked)| (v, Some(acked))),
        };
        let (value, acked) = match sent {
            Ok(ok) => ok,
            Err(e) => {
                for job in batch {
                    let _ = job.tx.send(Err(with_session(&e, &job.call.id)));
                }
                return;
            }
        };
        let items = match value {
            Value::Array(items) if items.len() == batch.len() => items,
            other => {
                for job in batch {
                    let _ = job
                        .tx
                        .send(Err(error::unexpected(job.call.ctx(), "commit", &other)));
                }
                return;
            }
        };
        for (job, item) in batch.into_iter().zip(items) {
            let outcome = parse_item(&item, job.call.ctx()).map(|reply| (reply, acked));
            let _ = job.tx.send(outcome);
        }
    }
}

/// A batch slot. Dropped while held (its task was cancelled), it still hands the queue on, so
/// queued commits never wait for a leader that is gone.
struct Slot {
    committer: Arc<Committer>,
    held: bool,
}

impl Slot {
    /// Frees the slot, or, if commits are queued, passes it to a task that sends them.
    fn pass_on(&mut self) {
        if !self.held {
            return;
        }
        self.held = false;
        let queued = {
            let mut q = self.committer.lock();
            if q.jobs.is_empty() {
                q.in_flight -= 1;
                false
            } else {
                true
            }
        };
        if queued {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(self.committer.clone().lead());
                }
                Err(_) => {
                    // No runtime (shutting down): fail the queued commits rather than strand them.
                    let mut q = self.committer.lock();
                    q.in_flight -= 1;
                    for job in q.jobs.drain(..) {
                        let _ = job.tx.send(Err(Error::Unavailable {
                            backend: error::BACKEND,
                            message: "runtime shut down before the commit was sent".into(),
                        }));
                    }
                }
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pass_on();
    }
}

/// A batch-wide failure, told to one of its commits.
fn with_session(e: &Error, id: &SessionId) -> Error {
    match e {
        Error::Unavailable { backend, message } => Error::Unavailable {
            backend,
            message: format!("session {id}: {message}"),
        },
        other => other.clone(),
    }
}

/// One commit's item of the `commit_many` reply.
fn parse_item(item: &Value, ctx: Ctx<'_>) -> Result<Reply> {
    let bytes = |v: &Value| -> Option<Vec<u8>> {
        match v {
            Value::BulkString(b) => Some(b.clone()),
            Value::SimpleString(s) => Some(s.clone().into_bytes()),
            _ => None,
        }
    };
    let bad = || error::unexpected(ctx, "commit", item);
    // An applied commit is its new seq alone (the common case, kept small: the reply of a
    // batch is built by Lua and converted to RESP item by item).
    let parts = match item {
        Value::BulkString(seq) => return Ok(Reply::Applied(parse_u64(seq).ok_or_else(bad)?)),
        Value::Array(parts) => parts,
        _ => return Err(bad()),
    };
    let parts: Vec<Vec<u8>> = parts
        .iter()
        .map(bytes)
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    match parts.as_slice() {
        [tag, seq] if tag == b"applied" => Ok(Reply::Applied(parse_u64(seq).ok_or_else(bad)?)),
        [tag, input, seq] if tag == b"dup" => {
            let input = std::str::from_utf8(input)
                .ok()
                .and_then(|s| InputId::new(s).ok())
                .ok_or_else(bad)?;
            Ok(Reply::Duplicate(input, parse_u64(seq).ok_or_else(bad)?))
        }
        [tag, msg] if tag == b"err" => {
            let msg = String::from_utf8_lossy(msg);
            let (code, detail) = match msg.split_once(' ') {
                Some((c, d)) => (c, Some(d)),
                None => (msg.as_ref(), None),
            };
            Err(error::script_error(code, detail, ctx).ok_or_else(bad)?)
        }
        _ => Err(bad()),
    }
}
