//! [`RedisStore`]: the [`SessionStore`] on Redis Streams: creation, activation, the commit
//! path (confirming a commit of unknown fate, then group commit), reads and the resumable index.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use normandy_core::codec::{self, BlobKind};
use normandy_core::{
    Capabilities, CommitAck, CommitBatch, Entry, Epoch, Error, NewSession, NodeId, OwnerFilter,
    Result, ResumablePage, ResumableSession, Seq, SessionId, SessionRecord, SessionStatus,
    SessionStore, TurnState, async_trait, now_ms,
};
use normandy_redis::RedisConn;
use redis::{Cmd, Script, Value};
use tracing::{debug, warn};

use crate::config::RedisStoreConfig;
use crate::conn::{WaitPool, eval_on, run_with_wait};
use crate::error::{self, Ctx};
use crate::group::{CommitCall, Committer};
use crate::record::{decode_record, policy_str};
use crate::schema::Keys;
use crate::scripts::{self, Reply, Scripts, as_items, parse_commit_reply, parse_u64};
use crate::unacked::{Unacked, UnackedCommits};

/// How often `activate` re-reads a record that changed between its read and its bump.
const ACTIVATE_ATTEMPTS: usize = 8;

/// The tier-2r store: sessions in Redis, one Lua script per write.
///
/// # Data layout
/// Per session, under the hash tag `{<prefix>:<id>}` (one Cluster slot):
/// - `…:s`, a hash: `ep` (epoch), `seq`, `own` (owner `name#incarnation`), `st` (status), `pol`
///   (resume policy), `ts` (turn state blob), `tpl` (template blob), `ca`/`ua` (created/updated
///   ms), `rs` (resumable flag), `wa` (a counter that
///   scripts which otherwise write nothing bump, so that a `WAIT` after them covers the data
///   they report on; no reader decodes it).
/// - `…:e`, a Stream of entry blobs, stream id `0-<seq>` so the seq is the stream id.
/// - `…:i`, a hash input id → seq (idempotent input).
///
/// Blobs are `normandy_core::codec` bytes, stored binary-safe. The resumable index is the sorted
/// sets `<prefix>:resumable:any` and `<prefix>:resumable:node:<owner>` (members ordered by id,
/// read with `ZRANGEBYLEX`), kept by the same scripts that change the flag or the owner.
pub struct RedisStore {
    /// Reads and non-`WAIT` writes: one reconnecting multiplexed connection, or a cluster
    /// connection.
    pub(crate) shared: RedisConn,
    /// Present when the config asks for replica acknowledgements.
    wait: Option<Arc<WaitPool>>,
    /// Sends commits, grouping those of different sessions that arrive together.
    committer: Arc<Committer>,
    pub(crate) keys: Keys,
    pub(crate) scripts: Scripts,
    pub(crate) unacked: UnackedCommits,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.keys.prefix)
            .field("wait", &self.wait.as_ref().map(|w| w.wait))
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects and loads the scripts, within the configured connect timeout plus response
    /// timeout in all: a server that refuses, or does not answer in time, is `Unavailable`
    /// naming its address and those bounds (one attempt; retrying is the caller's).
    pub async fn connect(config: RedisStoreConfig) -> Result<Self> {
        config.validate()?;
        // Each step has its own bound (one connect attempt, then one reply per command); this
        // is the promise as a whole, whatever a step does.
        tokio::time::timeout(
            crate::conn::connect_bound(&config),
            Self::connect_unbounded(&config),
        )
        .await
        .unwrap_or_else(|_| Err(crate::conn::connect_timed_out(&config)))
    }

    async fn connect_unbounded(config: &RedisStoreConfig) -> Result<Self> {
        let shared = crate::conn::connect_shared(config).await?;
        let wait = WaitPool::new(config).map(Arc::new);
        let keys = Keys::new(&config.prefix, shared.is_cluster());
        let committer = Arc::new(Committer::new(
            shared.clone(),
            wait.clone(),
            Script::new(&scripts::commit_many()),
            keys.index_arg().to_string(),
        ));
        let store = Self {
            shared,
            wait,
            committer,
            keys,
            scripts: Scripts::new(),
            unacked: UnackedCommits::default(),
        };
        let mut con = store.shared.clone();
        for s in [
            &store.scripts.create,
            &store.scripts.activate,
            &store.committer.script,
            &store.scripts.confirm,
            &store.scripts.mark_terminal,
            &store.scripts.delete,
        ] {
            s.load_async(&mut con)
                .await
                .map_err(|e| error::map(e, Ctx::default()))?;
        }
        Ok(store)
    }

    /// The key prefix of this store.
    pub fn prefix(&self) -> &str {
        &self.keys.prefix
    }

    /// Runs one script on the shared connection, loading it once if the server lost it.
    pub(crate) async fn eval(&self, script: &Script, cmd: &Cmd, ctx: Ctx<'_>) -> Result<Value> {
        let mut con = self.shared.clone();
        eval_on(&mut con, script, cmd, ctx).await
    }

    /// Runs a write script that must be as durable as a commit: with `WAIT` configured it goes
    /// through a dedicated connection with `WAIT`, and too few acknowledgements are
    /// `DurabilityNotMet`. An activation that a failover could lose would hand the next owner
    /// an epoch the old one already holds, so activations fail closed like commits.
    async fn eval_durable(
        &self,
        script: &Script,
        cmd: &Cmd,
        ctx: Ctx<'_>,
        session: &SessionId,
    ) -> Result<Value> {
        let Some(pool) = &self.wait else {
            return self.eval(script, cmd, ctx).await;
        };
        let (value, acked) = run_with_wait(pool, script, cmd, ctx).await?;
        if acked < pool.wait.replicas {
            return Err(Error::DurabilityNotMet {
                session: session.clone(),
                wanted: pool.wait.replicas,
                acked,
            });
        }
        Ok(value)
    }

    /// Runs a commit-shaped script (plus `WAIT` when configured) and reports the acks.
    async fn run_commit(
        &self,
        script: &Script,
        cmd: &Cmd,
        ctx: Ctx<'_>,
    ) -> Result<(Reply, Option<u32>)> {
        match &self.wait {
            None => {
                let value = self.eval(script, cmd, ctx).await?;
                Ok((parse_commit_reply(&value, ctx)?, None))
            }
            Some(pool) => {
                let (value, acked) = run_with_wait(pool, script, cmd, ctx).await?;
                Ok((parse_commit_reply(&value, ctx)?, Some(acked)))
            }
        }
    }

    pub(crate) async fn read_fields(&self, id: &SessionId) -> Result<HashMap<String, Vec<u8>>> {
        let mut con = self.shared.clone();
        let key = self.keys.state(id);
        match redis::cmd("HGETALL").arg(&key).query_async(&mut con).await {
            Ok(fields) => Ok(fields),
            Err(e) if error::is_wrong_type(&e) => {
                Err(self.wrong_type_read(Some(id), &key, "hash").await)
            }
            Err(e) => Err(error::map(e, Ctx::session(id))),
        }
    }

    /// The error for a read that met `WRONGTYPE` on `key`, naming what the key holds.
    pub(crate) async fn wrong_type_read(
        &self,
        session: Option<&SessionId>,
        key: &str,
        wanted: &str,
    ) -> Error {
        let mut con = self.shared.clone();
        let held: Option<String> = redis::cmd("TYPE").arg(key).query_async(&mut con).await.ok();
        error::wrong_type(session, key, held.as_deref(), wanted)
    }
}

#[async_trait]
impl SessionStore for RedisStore {
    fn capabilities(&self) -> Capabilities {
        // Durable in the sense the suite means (outlives the client process); how durable the
        // server itself is depends on its AOF and WAIT settings: see the crate docs.
        Capabilities::volatile()
            .durable(true)
            .shared_across_processes(true)
            .shared_across_hosts(true)
            .group_commit(true)
    }

    async fn create(&self, new: NewSession) -> Result<SessionRecord> {
        let state = TurnState::default();
        let state_blob = codec::encode(BlobKind::TurnState, &state)?;
        let template_blob = new
            .template
            .as_ref()
            .map(|t| codec::encode(BlobKind::Template, t))
            .transpose()?
            .unwrap_or_default();
        let now = now_ms();
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.scripts.create.get_hash())
            .arg(3)
            .arg(self.keys.state(&new.id))
            .arg(self.keys.stream(&new.id))
            .arg(self.keys.inputs(&new.id))
            .arg(policy_str(new.resume_policy))
            .arg(template_blob)
            .arg(state_blob)
            .arg(now);
        self.eval_durable(&self.scripts.create, &cmd, Ctx::session(&new.id), &new.id)
            .await?;
        Ok(SessionRecord {
            id: new.id,
            epoch: 0,
            seq: 0,
            owner: None,
            status: SessionStatus::Active,
            resume_policy: new.resume_policy,
            template: new.template,
            state,
            created_at_ms: now,
            updated_at_ms: now,
        })
    }

    async fn activate(&self, id: &SessionId, node: &NodeId) -> Result<SessionRecord> {
        let ctx = Ctx::session(id);
        for _ in 0..ACTIVATE_ATTEMPTS {
            // Decode before changing anything, so corrupt bytes leave the record untouched; the
            // script then bumps only if no commit changed seq or state since.
            let fields = self.read_fields(id).await?;
            if fields.is_empty() {
                return Err(Error::NotFound {
                    session: id.clone(),
                });
            }
            if fields.get("st").map(Vec::as_slice) == Some(b"terminal".as_slice()) {
                return Err(Error::SessionClosed {
                    session: id.clone(),
                });
            }
            let state_bytes = fields.get("ts").cloned().unwrap_or_default();
            let mut record = decode_record(id, fields)?;
            let now = now_ms();
            let mut cmd = redis::cmd("EVALSHA");
            let index_keys = self.keys.index_keys(id);
            cmd.arg(self.scripts.activate.get_hash())
                .arg(1 + index_keys.len())
                .arg(self.keys.state(id))
                .arg(&index_keys)
                .arg(id.as_str())
                .arg(self.keys.index_arg())
                .arg(node.to_string())
                .arg(record.seq)
                .arg(state_bytes)
                .arg(now);
            let reply = self
                .eval_durable(&self.scripts.activate, &cmd, ctx, id)
                .await?;
            let items = as_items(&reply);
            match items.as_slice() {
                [Some(b"ok"), Some(epoch)] => {
                    record.epoch = parse_u64(epoch)
                        .ok_or_else(|| error::unexpected(ctx, "activate", &reply))?;
                    record.owner = Some(node.clone());
                    record.updated_at_ms = now;
                    return Ok(record);
                }
                [Some(b"stale")] => {
                    debug!(session = %id, "record changed during activate; re-reading");
                    continue;
                }
                _ => return Err(error::unexpected(ctx, "activate", &reply)),
            }
        }
        Err(Error::Unavailable {
            backend: error::BACKEND,
            message: format!(
                "session {id}: record kept changing during activate ({ACTIVATE_ATTEMPTS} attempts)"
            ),
        })
    }

    async fn commit(
        &self,
        id: &SessionId,
        epoch: Epoch,
        expected_seq: Seq,
        batch: &CommitBatch,
    ) -> Result<CommitAck> {
        batch.validate(id, expected_seq)?;
        let ctx = Ctx::commit(id, epoch, expected_seq);
        let state_blob = codec::encode(BlobKind::TurnState, &batch.state)?;
        let mut blobs = Vec::with_capacity(batch.entries.len());
        for e in &batch.entries {
            blobs.push(codec::encode(BlobKind::Entry, e)?);
        }
        let new_seq = batch.new_seq(expected_seq);
        let this = Unacked::of(epoch, expected_seq, &state_blob, &blobs);

        let mut outcome = None;
        if self.unacked.take(id) == Some(this) {
            // A retry of a commit whose fate we did not learn: confirm it rather than re-apply.
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(self.scripts.confirm.get_hash())
                .arg(1)
                .arg(self.keys.state(id))
                .arg(epoch)
                .arg(new_seq)
                .arg(&state_blob);
            match self.run_commit(&self.scripts.confirm, &cmd, ctx).await {
                Ok((Reply::Miss, _)) => {}
                Ok(done) => {
                    debug!(session = %id, seq = new_seq, "confirmed an unacknowledged commit");
                    outcome = Some(done);
                }
                Err(e) => {
                    if e.kind() == normandy_core::ErrorKind::Unavailable {
                        self.unacked.remember(id, this);
                    }
                    return Err(e);
                }
            }
        }
        let (reply, acked) = match outcome {
            Some(done) => done,
            None => {
                let mut args: Vec<Vec<u8>> = Vec::with_capacity(7 + 3 * blobs.len());
                args.push(id.as_str().as_bytes().to_vec());
                args.push(epoch.to_string().into_bytes());
                args.push(expected_seq.to_string().into_bytes());
                args.push(new_seq.to_string().into_bytes());
                args.push(state_blob);
                args.push(if batch.state.has_work() {
                    b"1".to_vec()
                } else {
                    b"0".to_vec()
                });
                args.push(batch.entries.len().to_string().into_bytes());
                for (e, blob) in batch.entries.iter().zip(blobs) {
                    args.push(e.seq.to_string().into_bytes());
                    args.push(blob);
                    args.push(
                        e.payload
                            .input_id()
                            .map(|i| i.as_str().as_bytes().to_vec())
                            .unwrap_or_default(),
                    );
                }
                let mut keys = vec![
                    self.keys.state(id),
                    self.keys.stream(id),
                    self.keys.inputs(id),
                ];
                keys.extend(self.keys.index_keys(id));
                let call = CommitCall {
                    id: id.clone(),
                    epoch,
                    expected_seq,
                    keys,
                    args,
                };
                match self.committer.submit(call).await {
                    Ok(done) => done,
                    Err(e) => {
                        // The script may have run before the connection failed: remember the
                        // commit so the engine's retry can confirm it.
                        if e.kind() == normandy_core::ErrorKind::Unavailable {
                            self.unacked.remember(id, this);
                        }
                        return Err(e);
                    }
                }
            }
        };
        // Too few acknowledgements: the write (or, for a duplicate, the original input, which
        // the script's counter write makes the WAIT cover) may be lost in a failover, so it is
        // not reported done.
        let short = match (&self.wait, acked) {
            (Some(pool), Some(acked)) if acked < pool.wait.replicas => {
                Some(Error::DurabilityNotMet {
                    session: id.clone(),
                    wanted: pool.wait.replicas,
                    acked,
                })
            }
            _ => None,
        };
        match reply {
            Reply::Applied(seq) => match short {
                Some(e) => {
                    warn!(session = %id, seq, error = %e,
                        "commit applied on the primary but not acknowledged by enough replicas");
                    self.unacked.remember(id, this);
                    Err(e)
                }
                None => Ok(CommitAck::Applied { seq }),
            },
            // This call wrote nothing, so there is nothing to confirm on a retry.
            Reply::Duplicate(input_id, seq) => match short {
                Some(e) => {
                    warn!(session = %id, error = %e,
                        "duplicate input found, but its original is not acknowledged by enough replicas");
                    Err(e)
                }
                None => Ok(CommitAck::DuplicateInput { input_id, seq }),
            },
            Reply::Miss => Err(Error::Internal(format!(
                "session {id}: commit script answered like the confirm script"
            ))),
        }
    }

    async fn load(&self, id: &SessionId) -> Result<Option<SessionRecord>> {
        let fields = self.read_fields(id).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        decode_record(id, fields).map(Some)
    }

    async fn entries(&self, id: &SessionId, after: Seq, limit: usize) -> Result<Vec<Entry>> {
        let ctx = Ctx::session(id);
        let mut con = self.shared.clone();
        let Some(from) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let stream = self.keys.stream(id);
        // ignore_errors: each reply separately, so a WRONGTYPE on the stream (EXISTS takes any
        // type) comes back as the server's own error, not as a pipeline failure.
        let mut replies: Vec<redis::RedisResult<Value>> = redis::pipe()
            .cmd("EXISTS")
            .arg(self.keys.state(id))
            .cmd("XRANGE")
            .arg(&stream)
            .arg(format!("0-{from}"))
            .arg("+")
            .arg("COUNT")
            // Redis takes a signed 64-bit count; "everything" is usize::MAX from callers.
            .arg(limit.clamp(1, i64::MAX as usize))
            .ignore_errors()
            .query_async(&mut con)
            .await
            .map_err(|e| error::map(e, ctx))?;
        let (Some(range), Some(exists), None) = (replies.pop(), replies.pop(), replies.pop())
        else {
            return Err(error::unexpected(ctx, "EXISTS + XRANGE", &Value::Nil));
        };
        let exists = exists.map_err(|e| error::map(e, ctx))?;
        let range = match range {
            Ok(range) => range,
            Err(e) if error::is_wrong_type(&e) => {
                return Err(self.wrong_type_read(Some(id), &stream, "stream").await);
            }
            Err(e) => return Err(error::map(e, ctx)),
        };
        let exists = matches!(exists, Value::Int(1));
        if !exists {
            return Err(Error::NotFound {
                session: id.clone(),
            });
        }
        if limit == 0 {
            return Ok(Vec::new());
        }
        let Value::Array(items) = &range else {
            return Err(error::unexpected(ctx, "XRANGE", &range));
        };
        let mut out = Vec::with_capacity(items.len());
        // Entries are dense from `from`: each must be stored at its own seq.
        for (seq, item) in (from..).zip(items) {
            // [id, [field, value]]
            let blob = match item {
                Value::Array(pair) => match pair.as_slice() {
                    [_, Value::Array(fv)] => match fv.as_slice() {
                        [_, Value::BulkString(b)] => Some(b),
                        _ => None,
                    },
                    _ => None,
                },
                _ => None,
            };
            let blob = blob.ok_or_else(|| {
                Error::corrupt(
                    Some(id),
                    "entry stream",
                    "stream item is not [id, [e, blob]]",
                )
            })?;
            out.push(codec::decode_entry(blob, id, seq)?);
        }
        Ok(out)
    }

    async fn list_resumable(
        &self,
        owner: &OwnerFilter,
        cursor: Option<&SessionId>,
        limit: usize,
    ) -> Result<ResumablePage> {
        let ctx = Ctx::default();
        let ids = self
            .resumable_ids(owner, cursor, limit.saturating_add(1))
            .await?;
        let more = ids.len() > limit;
        let ids: Vec<SessionId> = ids
            .into_iter()
            .take(limit)
            .map(|s| {
                SessionId::new(&s).map_err(|e| Error::corrupt(None, "resumable index member", e))
            })
            .collect::<Result<_>>()?;
        let mut sessions = Vec::with_capacity(ids.len());
        if !ids.is_empty() {
            // One read per session: on a cluster they live in different slots.
            let cmds = ids
                .iter()
                .map(|id| {
                    let mut cmd = redis::cmd("HMGET");
                    cmd.arg(self.keys.state(id)).arg("ep").arg("own");
                    cmd
                })
                .collect();
            let mut con = self.shared.clone();
            let replies = con.query_each(cmds).await.map_err(|e| error::map(e, ctx))?;
            for (id, reply) in ids.into_iter().zip(replies) {
                let (epoch, own): (Option<String>, Option<String>) = reply
                    .and_then(|v| redis::from_redis_value(v).map_err(redis::RedisError::from))
                    .map_err(|e| error::map(e, Ctx::session(&id)))?;
                // Deleted between the index read and this one: skip it.
                let Some(epoch) = epoch else { continue };
                let epoch = epoch.parse().map_err(|_| {
                    Error::corrupt(Some(&id), "session record", "epoch is not a number")
                })?;
                let owner = own
                    .map(|o| NodeId::from_str(&o))
                    .transpose()
                    .map_err(|e| Error::corrupt(Some(&id), "session record owner", e))?;
                sessions.push(ResumableSession { id, owner, epoch });
            }
        }
        let next = if more {
            sessions.last().map(|s| s.id.clone())
        } else {
            None
        };
        Ok(ResumablePage { sessions, next })
    }

    async fn mark_terminal(&self, id: &SessionId, epoch: Epoch) -> Result<()> {
        let mut cmd = redis::cmd("EVALSHA");
        let index_keys = self.keys.index_keys(id);
        cmd.arg(self.scripts.mark_terminal.get_hash())
            .arg(1 + index_keys.len())
            .arg(self.keys.state(id))
            .arg(&index_keys)
            .arg(id.as_str())
            .arg(self.keys.index_arg())
            .arg(epoch)
            .arg(now_ms());
        self.eval_durable(
            &self.scripts.mark_terminal,
            &cmd,
            Ctx::commit(id, epoch, 0),
            id,
        )
        .await?;
        Ok(())
    }

    async fn delete(&self, id: &SessionId) -> Result<bool> {
        let mut cmd = redis::cmd("EVALSHA");
        let index_keys = self.keys.index_keys(id);
        cmd.arg(self.scripts.delete.get_hash())
            .arg(3 + index_keys.len())
            .arg(self.keys.state(id))
            .arg(self.keys.stream(id))
            .arg(self.keys.inputs(id))
            .arg(&index_keys)
            .arg(id.as_str())
            .arg(self.keys.index_arg());
        let deleted = self
            .eval_durable(&self.scripts.delete, &cmd, Ctx::session(id), id)
            .await?;
        self.unacked.take(id);
        Ok(matches!(deleted, Value::Int(1)))
    }
}
