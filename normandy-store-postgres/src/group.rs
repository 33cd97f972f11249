//! Group commit: the path of a commit from the store's queue to the database, and how its
//! result is found out.
//!
//! # How a commit is written
//! Every commit is one SQL statement, hence one transaction: a data-modifying CTE whose `UPDATE`
//! of the session row is conditioned on `(epoch, expected_seq, status = 'active')` and on no
//! batch input id being stored already, and whose `INSERT` of the entries runs only for a row the
//! `UPDATE` returned. Entries and turn state therefore land together or not at all, and a stale
//! writer cannot slip in between a check and a write: the `UPDATE` takes the row lock and, under
//! `READ COMMITTED`, re-checks its condition against the newest row version. When the `UPDATE`
//! matched nothing, a second read finds out why, in `InMemoryStore::commit`'s order: `NotFound`,
//! `SessionClosed`, `Fenced`, `DuplicateInput`, `Conflict`. Epochs and seqs only grow and a
//! terminal session never reopens, so the reason read after the fact is the reason the write
//! failed.
//!
//! # Group commit
//! `commit` hands its encoded batch over a bounded channel to a gatherer task, which takes
//! everything queued whenever one of its write slots is free (up to `max_batch`, one commit per
//! session per statement) and writes it with one statement over `UNNEST`ed arrays: each
//! session's fenced `UPDATE` is evaluated per row, the entries of the rows it returned are
//! inserted, and each commit gets its own result. One fsync then covers many commits. A batch
//! of one takes the simple single-session statement instead.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use normandy_core::codec::{self, BlobKind};
use normandy_core::{
    CommitAck, CommitBatch, Epoch, Error, InputId, Result, Seq, SessionId, SessionStatus,
};
use sqlx::Row;
use sqlx::postgres::PgConnection;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::config::PgStoreConfig;
use crate::conn::Db;
use crate::error::map_sqlx;
use crate::record::{parse_status, to_i64, to_u64};
use crate::schema::SchemaLevel;
use crate::sql::{
    COMMIT_GROUP, COMMIT_GROUP_NO_POLICY, COMMIT_ONE, COMMIT_ONE_NO_POLICY, DUPS_SQL, WHY_SQL,
};

/// What the gatherer and its writes share with the store.
pub(crate) struct Shared {
    pub(crate) db: Db,
    pub(crate) level: SchemaLevel,
    pub(crate) max_batch: usize,
    pub(crate) max_batch_bytes: usize,
    /// Commit statements executed (single or group), for [`PgStore::write_stats`].
    pub(crate) statements: AtomicU64,
    /// Commits those statements carried.
    pub(crate) commits: AtomicU64,
}

/// How well commits were grouped, since the store opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Commit statements executed (each one transaction).
    pub statements: u64,
    /// Commits they carried; `commits / statements` is the mean group size.
    pub commits: u64,
}

/// One encoded commit on its way to the gatherer.
pub(crate) struct Job {
    id: SessionId,
    epoch: i64,
    expected_seq: i64,
    new_seq: i64,
    state: Vec<u8>,
    has_work: bool,
    seqs: Vec<i64>,
    parents: Vec<Option<i64>>,
    kinds: Vec<&'static str>,
    input_ids: Vec<Option<String>>,
    payloads: Vec<Vec<u8>>,
    /// The batch's input ids, in batch order (the duplicate reported is the first stored one).
    inputs: Vec<String>,
    reply: oneshot::Sender<Result<CommitAck>>,
}

impl Job {
    /// About how many bytes this commit adds to a group statement's parameters (array element
    /// headers included).
    fn wire_size(&self) -> usize {
        let per_entry: usize = self
            .payloads
            .iter()
            .zip(&self.input_ids)
            .zip(&self.kinds)
            .map(|((p, i), k)| {
                p.len() + i.as_ref().map_or(0, String::len) + k.len() + self.id.as_str().len() + 64
            })
            .sum();
        self.id.as_str().len() + self.state.len() + 48 + per_entry
    }

    /// Encodes one commit of `id` for the gatherer; its result goes to `reply`.
    pub(crate) fn encode(
        id: &SessionId,
        epoch: Epoch,
        expected_seq: Seq,
        batch: &CommitBatch,
        reply: oneshot::Sender<Result<CommitAck>>,
    ) -> Result<Self> {
        let state = codec::encode(BlobKind::TurnState, &batch.state)?;
        let n = batch.entries.len();
        let (mut seqs, mut parents, mut kinds, mut input_ids, mut payloads) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for e in &batch.entries {
            seqs.push(to_i64(e.seq, "entry seq", id)?);
            parents.push(
                e.parent
                    .map(|p| to_i64(p, "entry parent", id))
                    .transpose()?,
            );
            kinds.push(e.payload.kind_name());
            input_ids.push(e.payload.input_id().map(|i| i.as_str().to_string()));
            payloads.push(codec::encode(BlobKind::Entry, e)?);
        }
        Ok(Job {
            id: id.clone(),
            epoch: to_i64(epoch, "epoch", id)?,
            expected_seq: to_i64(expected_seq, "expected seq", id)?,
            new_seq: to_i64(batch.new_seq(expected_seq), "seq", id)?,
            // `is_resumable` also needs an open, eager session: the statement checks the stored
            // status and policy, which this handle may not know.
            has_work: batch.state.has_work(),
            state,
            seqs,
            parents,
            kinds,
            inputs: batch.input_ids().map(|i| i.as_str().to_string()).collect(),
            input_ids,
            payloads,
            reply,
        })
    }
}

/// Starts the gatherer (on the current tokio runtime) and returns the queue that feeds it.
pub(crate) fn start(shared: Arc<Shared>, config: &PgStoreConfig) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel(config.queue_depth);
    tokio::spawn(gatherer(shared, rx, config.writers, config.stall_after));
    tx
}

/// Gathers queued commits into batches and writes them; ends when every store handle is gone
/// and the queue is drained.
///
/// Normally one batch is written at a time, and it takes everything queued meanwhile: the busier
/// the store, the bigger the batches, and one fsync covers them all (a second concurrent writer
/// would grab the first few commits to arrive and halve the batches). Only when the write in
/// flight has taken longer than `stall_after` (a row lock held elsewhere, a slow disk) does the
/// gatherer open one of the `writers - 1` overflow slots, so one stalled batch cannot hold up
/// every session.
///
/// A batch also stops at `max_batch_bytes` of parameters: sqlx 0.9.0 leaves Nagle's algorithm on
/// (transact-rs/sqlx#4335), and a message larger than the socket's initial send buffer (16 KiB
/// on Linux) is written in parts, the last of which waits ~40 ms for a delayed ACK. Several
/// statements under the limit are far faster than one over it — written side by side: a batch
/// cut at its limits with commits still queued lets the next batch take a free slot at once,
/// as a raw client holding that many commits would (one statement at a time wrote 0.66× the
/// raw batched client's commits/s in `cargo xtask bench postgres`; side by side, 0.97–1.13×).
async fn gatherer(
    shared: Arc<Shared>,
    mut queue: mpsc::Receiver<Job>,
    writers: usize,
    stall_after: Duration,
) {
    let primary = Arc::new(Semaphore::new(1));
    let overflow = Arc::new(Semaphore::new(writers.saturating_sub(1)));
    // A job that did not fit the previous batch opens the next one.
    let mut carry: Option<Job> = None;
    // Whether the previous batch was cut at its limits with commits still queued.
    let mut full = false;
    // Commits the previous batch carried.
    let mut last_len = 0;
    loop {
        let permit = if full {
            // More is queued than one statement may carry: write the rest beside it at once
            // rather than after it (a raw client with that many commits in hand would).
            tokio::select! {
                biased;
                p = primary.clone().acquire_owned() => p,
                p = overflow.clone().acquire_owned() => p,
            }
        } else {
            tokio::select! {
                biased;
                p = primary.clone().acquire_owned() => p,
                p = async {
                    tokio::time::sleep(stall_after).await;
                    overflow.clone().acquire_owned().await
                } => p,
            }
        };
        let Ok(permit) = permit else {
            return;
        };
        let first = match carry.take() {
            Some(job) => job,
            None => match queue.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let mut bytes = first.wire_size();
        let mut jobs = vec![first];
        // When the queue looks empty, let the tasks that are ready run once before the batch
        // closes: the writers a finished statement just answered are about to queue their next
        // commits, and without the pause the next batch takes the first few of them and the
        // one after takes the rest. Only when the previous batch grouped anything: a lone
        // writer's commit goes at once.
        let mut yielded = last_len <= 1;
        while jobs.len() < shared.max_batch {
            match queue.try_recv() {
                Ok(job) => {
                    let size = job.wire_size();
                    if bytes + size > shared.max_batch_bytes {
                        carry = Some(job);
                        break;
                    }
                    bytes += size;
                    jobs.push(job);
                    yielded = false;
                }
                Err(mpsc::error::TryRecvError::Empty) if !yielded => {
                    tokio::task::yield_now().await;
                    yielded = true;
                }
                Err(_) => break,
            }
        }
        full = carry.is_some() || jobs.len() == shared.max_batch;
        last_len = jobs.len();
        let shared = shared.clone();
        tokio::spawn(async move {
            // A statement carries one commit per session (its `UPDATE ... FROM c` must match
            // each row once); a second commit of the same session waits for the next round.
            let mut pending = jobs;
            while !pending.is_empty() {
                let mut seen = HashSet::with_capacity(pending.len());
                let (round, rest): (Vec<Job>, Vec<Job>) =
                    pending.into_iter().partition(|j| seen.insert(j.id.clone()));
                pending = rest;
                write_round(&shared, round).await;
            }
            drop(permit);
        });
    }
}

async fn write_round(shared: &Shared, mut round: Vec<Job>) {
    if round.len() == 1 {
        if let Some(job) = round.pop() {
            let result = commit_one(shared, &job).await;
            let _ = job.reply.send(result);
        }
        return;
    }
    match commit_group(shared, &round).await {
        Ok(applied) => {
            for job in round {
                let result = if applied.contains(job.id.as_str()) {
                    to_u64(job.new_seq, "seq", &job.id).map(|seq| CommitAck::Applied { seq })
                } else {
                    explain_failure(&shared.db, &job).await
                };
                let _ = job.reply.send(result);
            }
        }
        Err(GroupError::Rejected) => {
            // One commit's data can fail the whole statement (a duplicate input that raced in,
            // a value a constraint refuses): write them one by one, each in its own statement,
            // so only that commit fails and its neighbours get their own results.
            for job in round {
                let result = commit_one(shared, &job).await;
                let _ = job.reply.send(result);
            }
        }
        Err(GroupError::Other(e)) => {
            // The statement's fate is unknown (the connection went) or it never ran: no commit
            // can be told apart, and a resend could not tell "landed" from "conflict". Each gets
            // the (retryable) error, which its writer confirms before retrying.
            for job in round {
                let _ = job.reply.send(Err(e.clone()));
            }
        }
    }
}

/// Attempts at a statement that failed with a deadlock or serialization failure (nothing was
/// written, so trying again is safe).
const ATTEMPTS: usize = 3;

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

async fn commit_one(shared: &Shared, job: &Job) -> Result<CommitAck> {
    let sql = if shared.level >= SchemaLevel::ResumePolicy {
        COMMIT_ONE
    } else {
        COMMIT_ONE_NO_POLICY
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        shared.statements.fetch_add(1, Ordering::Relaxed);
        shared.commits.fetch_add(1, Ordering::Relaxed);
        let mut op = match shared.db.op().await {
            Ok(op) => op,
            Err(e) => return Err(map_sqlx(e)),
        };
        let result = sqlx::query_scalar::<_, i64>(sql)
            .persistent(shared.db.persistent())
            .bind(job.id.as_str())
            .bind(job.epoch)
            .bind(job.expected_seq)
            .bind(&job.inputs)
            .bind(job.new_seq)
            .bind(&job.state)
            .bind(job.has_work)
            .bind(&job.seqs)
            .bind(&job.parents)
            .bind(&job.kinds)
            .bind(&job.input_ids)
            .bind(&job.payloads)
            .fetch_one(op.conn())
            .await;
        let result = match result {
            Ok(n) => op.finish().await.map(|()| n),
            Err(e) => Err(e),
        };
        match result {
            Ok(1) => {
                return to_u64(job.new_seq, "seq", &job.id).map(|seq| CommitAck::Applied { seq });
            }
            Ok(_) => return explain_failure(&shared.db, job).await,
            Err(e) if is_unique_violation(&e) => return explain_failure(&shared.db, job).await,
            Err(e) => {
                let e = map_sqlx(e);
                if attempt < ATTEMPTS
                    && matches!(
                        e,
                        Error::Backend {
                            retryable: true,
                            ..
                        }
                    )
                {
                    continue;
                }
                return Err(e);
            }
        }
    }
}

enum GroupError {
    /// The server refused the statement (a unique violation, a constraint, a value it cannot
    /// take, a deadlock past its retries): being one statement, nothing of it was written.
    Rejected,
    /// Anything else: the connection failed (the statement may have committed), or no
    /// statement was sent.
    Other(Error),
}

async fn commit_group(
    shared: &Shared,
    round: &[Job],
) -> std::result::Result<HashSet<String>, GroupError> {
    let sql = if shared.level >= SchemaLevel::ResumePolicy {
        COMMIT_GROUP
    } else {
        COMMIT_GROUP_NO_POLICY
    };
    let n = round.len();
    let m: usize = round.iter().map(|j| j.seqs.len()).sum();
    let mut c_id = Vec::with_capacity(n);
    let mut c_epoch = Vec::with_capacity(n);
    let mut c_expected = Vec::with_capacity(n);
    let mut c_new = Vec::with_capacity(n);
    let mut c_state: Vec<&[u8]> = Vec::with_capacity(n);
    let mut c_work = Vec::with_capacity(n);
    let mut e_session = Vec::with_capacity(m);
    let mut e_seq = Vec::with_capacity(m);
    let mut e_parent = Vec::with_capacity(m);
    let mut e_kind = Vec::with_capacity(m);
    let mut e_input: Vec<Option<&str>> = Vec::with_capacity(m);
    let mut e_payload: Vec<&[u8]> = Vec::with_capacity(m);
    for job in round {
        c_id.push(job.id.as_str());
        c_epoch.push(job.epoch);
        c_expected.push(job.expected_seq);
        c_new.push(job.new_seq);
        c_state.push(&job.state);
        c_work.push(job.has_work);
        for i in 0..job.seqs.len() {
            e_session.push(job.id.as_str());
            e_seq.push(job.seqs[i]);
            e_parent.push(job.parents[i]);
            e_kind.push(job.kinds[i]);
            e_input.push(job.input_ids[i].as_deref());
            e_payload.push(&job.payloads[i]);
        }
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        shared.statements.fetch_add(1, Ordering::Relaxed);
        shared.commits.fetch_add(n as u64, Ordering::Relaxed);
        let mut op = match shared.db.op().await {
            Ok(op) => op,
            Err(e) => return Err(GroupError::Other(map_sqlx(e))),
        };
        let result = sqlx::query_scalar::<_, String>(sql)
            .persistent(shared.db.persistent())
            .bind(&c_id)
            .bind(&c_epoch)
            .bind(&c_expected)
            .bind(&c_new)
            .bind(&c_state)
            .bind(&c_work)
            .bind(&e_session)
            .bind(&e_seq)
            .bind(&e_parent)
            .bind(&e_kind)
            .bind(&e_input)
            .bind(&e_payload)
            .fetch_all(op.conn())
            .await;
        let result = match result {
            Ok(ids) => op.finish().await.map(|()| ids),
            Err(e) => Err(e),
        };
        match result {
            Ok(ids) => {
                tracing::trace!(commits = n, applied = ids.len(), "group commit");
                return Ok(ids.into_iter().collect());
            }
            Err(e) if is_unique_violation(&e) => return Err(GroupError::Rejected),
            Err(e) => {
                let refused = matches!(e, sqlx::Error::Database(_));
                let e = map_sqlx(e);
                if attempt < ATTEMPTS
                    && matches!(
                        e,
                        Error::Backend {
                            retryable: true,
                            ..
                        }
                    )
                {
                    continue;
                }
                if refused {
                    tracing::debug!(error = %e, commits = n, "group statement refused; writing its commits one by one");
                    return Err(GroupError::Rejected);
                }
                return Err(GroupError::Other(e));
            }
        }
    }
}

/// Why a commit's fenced `UPDATE` matched nothing, checked in `InMemoryStore::commit`'s order.
async fn explain_failure(db: &Db, job: &Job) -> Result<CommitAck> {
    let mut op = db.op().await.map_err(map_sqlx)?;
    let why = explain_on(op.conn(), db.persistent(), job).await;
    // Read-only: ending the transaction cannot change the answer, but a failure to is reported.
    op.finish().await.map_err(map_sqlx)?;
    why
}

async fn explain_on(conn: &mut PgConnection, persistent: bool, job: &Job) -> Result<CommitAck> {
    let id = &job.id;
    let row = sqlx::query(WHY_SQL)
        .persistent(persistent)
        .bind(id.as_str())
        .fetch_optional(&mut *conn)
        .await
        .map_err(map_sqlx)?;
    let Some(row) = row else {
        return Err(Error::NotFound {
            session: id.clone(),
        });
    };
    let current: i64 = row.try_get(0).map_err(map_sqlx)?;
    let seq: i64 = row.try_get(1).map_err(map_sqlx)?;
    let status: String = row.try_get(2).map_err(map_sqlx)?;
    if parse_status(&status, id)? == SessionStatus::Terminal {
        return Err(Error::SessionClosed {
            session: id.clone(),
        });
    }
    if current != job.epoch {
        return Err(Error::Fenced {
            session: id.clone(),
            epoch: to_u64(job.epoch, "epoch", id)?,
            current: to_u64(current, "session epoch", id)?,
        });
    }
    if !job.inputs.is_empty() {
        let rows = sqlx::query(DUPS_SQL)
            .persistent(persistent)
            .bind(id.as_str())
            .bind(&job.inputs)
            .fetch_all(&mut *conn)
            .await
            .map_err(map_sqlx)?;
        let mut stored = HashMap::with_capacity(rows.len());
        for row in rows {
            let input: String = row.try_get(0).map_err(map_sqlx)?;
            let seq: i64 = row.try_get(1).map_err(map_sqlx)?;
            stored.insert(input, seq);
        }
        for input in &job.inputs {
            if let Some(seq) = stored.get(input) {
                return Ok(CommitAck::DuplicateInput {
                    input_id: InputId::new(input)?,
                    seq: to_u64(*seq, "entry seq", id)?,
                });
            }
        }
    }
    // Either the seq moved, or (rarely) the row changed back under us between the write and this
    // read, which only a delete and re-create can do: both are a conflict to re-read and retry.
    Err(Error::Conflict {
        session: id.clone(),
        expected: to_u64(job.expected_seq, "expected seq", id)?,
        actual: to_u64(seq, "session seq", id)?,
    })
}
