//! [`RedisStore`]: the [`SessionStore`] on Redis Streams.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use normandy_core::codec::{self, BlobKind};
use normandy_core::{
    Capabilities, CommitAck, CommitBatch, ConfigTemplate, Entry, Epoch, Error, InputId, NewSession,
    NodeId, OwnerFilter, Result, ResumablePage, ResumableSession, ResumePolicy, Seq, SessionId,
    SessionRecord, SessionStatus, SessionStore, TurnState, async_trait, now_ms,
};
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::{AsyncConnectionConfig, Cmd, RedisError, Script, ServerErrorKind, Value};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::config::{RedisStoreConfig, Wait};
use crate::error::{self, Ctx};
use crate::group::{CommitCall, Committer};
use crate::scripts;

/// How often `activate` re-reads a record that changed between its read and its bump.
const ACTIVATE_ATTEMPTS: usize = 8;
/// Most commits remembered as applied-but-unacknowledged (see [`Unacked`]).
const MAX_UNACKED: usize = 10_000;

/// Key names of one store (one prefix).
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
    index: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            index: format!("{prefix}:resumable:"),
        }
    }

    /// `{<prefix>:<id>}:<suffix>`: the braces make every key of a session hash to one slot.
    fn session(&self, id: &SessionId, suffix: &str) -> String {
        format!("{{{}:{}}}:{suffix}", self.prefix, id)
    }

    fn state(&self, id: &SessionId) -> String {
        self.session(id, "s")
    }

    fn stream(&self, id: &SessionId) -> String {
        self.session(id, "e")
    }

    fn inputs(&self, id: &SessionId) -> String {
        self.session(id, "i")
    }

    fn any_index(&self) -> String {
        format!("{}any", self.index)
    }

    fn node_index(&self, node: &NodeId) -> String {
        format!("{}node:{node}", self.index)
    }
}

/// The scripts, hashed once (`EVALSHA` sends the hash; the body is loaded on `NOSCRIPT`).
#[derive(Debug)]
struct Scripts {
    create: Script,
    activate: Script,
    confirm: Script,
    mark_terminal: Script,
    delete: Script,
    overwrite_entry: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            create: Script::new(scripts::CREATE),
            activate: Script::new(&scripts::activate()),
            confirm: Script::new(scripts::CONFIRM),
            mark_terminal: Script::new(&scripts::mark_terminal()),
            delete: Script::new(&scripts::delete()),
            overwrite_entry: Script::new(OVERWRITE_ENTRY),
        }
    }
}

/// A commit whose outcome this process does not know for sure: its script ran but too few
/// replicas acknowledged it (`DurabilityNotMet`), or the connection failed after it was sent
/// (`Unavailable`). The engine retries such a commit with the same batch; the retry then runs
/// [`scripts::CONFIRM`], which re-acknowledges the commit if the store holds exactly its result,
/// instead of answering `DuplicateInput` or `Conflict` to a writer whose own commit landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Unacked {
    epoch: Epoch,
    expected_seq: Seq,
    /// Hash of the batch's bytes. Only compared within this process, never stored, so std's
    /// unpinned hasher is fine here.
    fingerprint: u64,
}

/// Dedicated connections for commits that `WAIT`: each carries one commit at a time, so a
/// `WAIT` blocks nobody else, and its `WAIT` always follows its own script on the same socket
/// (a reconnected multiplexed connection could otherwise acknowledge an offset it never wrote).
pub(crate) struct WaitPool {
    client: redis::Client,
    config: AsyncConnectionConfig,
    pub(crate) wait: Wait,
    // std Mutex: push/pop only, never held across an await.
    idle: Mutex<Vec<MultiplexedConnection>>,
    permits: Semaphore,
}

impl WaitPool {
    async fn acquire(&self) -> Result<(tokio::sync::SemaphorePermit<'_>, MultiplexedConnection)> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Error::Internal("redis store wait pool closed".into()))?;
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let con = match idle {
            Some(con) => con,
            None => self
                .client
                .get_multiplexed_async_connection_with_config(&self.config)
                .await
                .map_err(|e| error::map(e, Ctx::default()))?,
        };
        Ok((permit, con))
    }

    fn release(&self, con: MultiplexedConnection) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(con);
    }
}

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
    /// Reads and non-`WAIT` writes: one reconnecting multiplexed connection.
    shared: ConnectionManager,
    /// Present when the config asks for replica acknowledgements.
    wait: Option<Arc<WaitPool>>,
    /// Sends commits, grouping those of different sessions that arrive together.
    committer: Arc<Committer>,
    keys: Keys,
    scripts: Scripts,
    // std Mutex: map operations only, never held across an await.
    unacked: Mutex<HashMap<SessionId, Unacked>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.keys.prefix)
            .field("wait", &self.wait.as_ref().map(|w| w.wait))
            .finish_non_exhaustive()
    }
}

/// What a commit script answered.
pub(crate) enum Reply {
    Applied(Seq),
    Duplicate(InputId, Seq),
    /// `CONFIRM` only: the record moved on; run the ordinary commit.
    Miss,
}

impl RedisStore {
    /// Connects (failing with `Unavailable` if the server does not answer) and loads the scripts.
    pub async fn connect(config: RedisStoreConfig) -> Result<Self> {
        config.validate()?;
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.response_timeout))
            .set_connection_timeout(Some(config.connect_timeout));
        let shared = config
            .client
            .get_connection_manager_with_config(manager_config)
            .await
            .map_err(|e| error::map(e, Ctx::default()))?;
        let wait = config.wait.map(|wait| {
            Arc::new(WaitPool {
                client: config.client.clone(),
                // The response timeout must outlast the WAIT itself, or a healthy but slow WAIT
                // would surface as a broken connection instead of a count of acknowledgements.
                config: AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(config.connect_timeout))
                    .set_response_timeout(Some(config.response_timeout + wait.timeout)),
                wait,
                idle: Mutex::new(Vec::new()),
                permits: Semaphore::new(config.wait_connections),
            })
        });
        let keys = Keys::new(&config.prefix);
        let committer = Arc::new(Committer::new(
            shared.clone(),
            wait.clone(),
            Script::new(&scripts::commit_many()),
            keys.index.clone(),
        ));
        let store = Self {
            shared,
            wait,
            committer,
            keys,
            scripts: Scripts::new(),
            unacked: Mutex::new(HashMap::new()),
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
    async fn eval(&self, script: &Script, cmd: &Cmd, ctx: Ctx<'_>) -> Result<Value> {
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

    fn take_unacked(&self, id: &SessionId) -> Option<Unacked> {
        self.unacked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }

    fn remember_unacked(&self, id: &SessionId, u: Unacked) {
        let mut map = self.unacked.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: past the cap a retry simply gets the plain answer (DuplicateInput/Conflict).
        if map.len() < MAX_UNACKED || map.contains_key(id) {
            map.insert(id.clone(), u);
        }
    }

    /// Every key under this store's prefix (`SCAN`, so the server is never blocked).
    async fn scan_keys(&self) -> Result<Vec<Vec<u8>>> {
        let mut con = self.shared.clone();
        let ctx = Ctx::default();
        let escaped = escape_glob(&self.keys.prefix);
        let mut keys: Vec<Vec<u8>> = Vec::new();
        for pattern in [format!("{{{escaped}:*"), format!("{escaped}:*")] {
            let mut cursor: u64 = 0;
            loop {
                let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut con)
                    .await
                    .map_err(|e| error::map(e, ctx))?;
                keys.extend(batch);
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    /// Test support: every byte this store holds under its prefix, keys included (for canary
    /// scans).
    pub async fn raw_bytes(&self) -> Result<Vec<u8>> {
        let mut con = self.shared.clone();
        let ctx = Ctx::default();
        let mut out = Vec::new();
        for key in self.scan_keys().await? {
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut con)
                .await
                .map_err(|e| error::map(e, ctx))?;
            let value: Value = match kind.as_str() {
                "hash" => redis::cmd("HGETALL").arg(&key).query_async(&mut con).await,
                "stream" => {
                    redis::cmd("XRANGE")
                        .arg(&key)
                        .arg("-")
                        .arg("+")
                        .query_async(&mut con)
                        .await
                }
                "zset" => {
                    redis::cmd("ZRANGE")
                        .arg(&key)
                        .arg(0)
                        .arg(-1)
                        .query_async(&mut con)
                        .await
                }
                "string" => redis::cmd("GET").arg(&key).query_async(&mut con).await,
                _ => Ok(Value::Nil),
            }
            .map_err(|e| error::map(e, ctx))?;
            out.extend_from_slice(&key);
            flatten(&value, &mut out);
        }
        Ok(out)
    }

    /// Deletes every key under this store's prefix (teardown of a test namespace, or of a
    /// deployment). Returns how many keys were deleted.
    pub async fn purge(&self) -> Result<usize> {
        let mut con = self.shared.clone();
        let keys = self.scan_keys().await?;
        let mut deleted = 0;
        for chunk in keys.chunks(500) {
            // UNLINK per key: keys of different sessions live in different slots.
            let mut pipe = redis::pipe();
            for key in chunk {
                pipe.cmd("UNLINK").arg(key);
            }
            let counts: Vec<usize> = pipe
                .query_async(&mut con)
                .await
                .map_err(|e| error::map(e, Ctx::default()))?;
            deleted += counts.into_iter().sum::<usize>();
        }
        self.unacked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        Ok(deleted)
    }

    /// Test support: overwrites a session's stored turn-state bytes; `false` if it does not exist.
    pub async fn overwrite_state_bytes(&self, id: &SessionId, bytes: &[u8]) -> Result<bool> {
        let mut con = self.shared.clone();
        // HSETEX-like "only if the hash exists": HSET would create a half record.
        let written: i64 = redis::cmd("EVAL")
            .arg(
                "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end \
                  redis.call('HSET', KEYS[1], 'ts', ARGV[1]) return 1",
            )
            .arg(1)
            .arg(self.keys.state(id))
            .arg(bytes)
            .query_async(&mut con)
            .await
            .map_err(|e| error::map(e, Ctx::session(id)))?;
        Ok(written == 1)
    }

    /// Test support: overwrites the stored bytes of entry `seq` (the stream is rewritten, since
    /// stream entries cannot be edited in place); `false` if there is no such entry.
    pub async fn overwrite_entry_bytes(
        &self,
        id: &SessionId,
        seq: Seq,
        bytes: &[u8],
    ) -> Result<bool> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.scripts.overwrite_entry.get_hash())
            .arg(1)
            .arg(self.keys.stream(id))
            .arg(format!("0-{seq}"))
            .arg(bytes);
        let found = self
            .eval(&self.scripts.overwrite_entry, &cmd, Ctx::session(id))
            .await?;
        Ok(matches!(found, Value::Int(1)))
    }

    fn decode_record(
        &self,
        id: &SessionId,
        fields: HashMap<String, Vec<u8>>,
    ) -> Result<SessionRecord> {
        let field = |name: &str| -> Result<&Vec<u8>> {
            fields.get(name).ok_or_else(|| {
                Error::corrupt(
                    Some(id),
                    "session record",
                    format!("field {name:?} is missing"),
                )
            })
        };
        let text = |name: &str| -> Result<&str> {
            std::str::from_utf8(field(name)?).map_err(|_| {
                Error::corrupt(
                    Some(id),
                    "session record",
                    format!("field {name:?} is not UTF-8"),
                )
            })
        };
        let number = |name: &str| -> Result<u64> {
            text(name)?.parse().map_err(|_| {
                Error::corrupt(
                    Some(id),
                    "session record",
                    format!("field {name:?} is not a number"),
                )
            })
        };
        let status = SessionStatus::parse(text("st")?)
            .ok_or_else(|| Error::corrupt(Some(id), "session record", "unknown status"))?;
        let resume_policy = match text("pol")? {
            "lazy" => ResumePolicy::Lazy,
            "eager" => ResumePolicy::Eager,
            other => {
                return Err(Error::corrupt(
                    Some(id),
                    "session record",
                    format!("unknown resume policy {other:?}"),
                ));
            }
        };
        let owner = match fields.get("own") {
            Some(_) => Some(
                NodeId::from_str(text("own")?)
                    .map_err(|e| Error::corrupt(Some(id), "session record owner", e))?,
            ),
            None => None,
        };
        let template: Option<ConfigTemplate> = fields
            .get("tpl")
            .map(|b| codec::decode(BlobKind::Template, b, Some(id)))
            .transpose()?;
        let state: TurnState = codec::decode(BlobKind::TurnState, field("ts")?, Some(id))?;
        let record = SessionRecord {
            id: id.clone(),
            epoch: number("ep")?,
            seq: number("seq")?,
            owner,
            status,
            resume_policy,
            template,
            state,
            created_at_ms: number("ca")?,
            updated_at_ms: number("ua")?,
        };
        Ok(record)
    }

    async fn read_fields(&self, id: &SessionId) -> Result<HashMap<String, Vec<u8>>> {
        let mut con = self.shared.clone();
        redis::cmd("HGETALL")
            .arg(self.keys.state(id))
            .query_async(&mut con)
            .await
            .map_err(|e| error::map(e, Ctx::session(id)))
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
            let mut record = self.decode_record(id, fields)?;
            let now = now_ms();
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(self.scripts.activate.get_hash())
                .arg(1)
                .arg(self.keys.state(id))
                .arg(id.as_str())
                .arg(&self.keys.index)
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
        let this = Unacked {
            epoch,
            expected_seq,
            fingerprint: fingerprint(&state_blob, &blobs),
        };

        let mut outcome = None;
        if self.take_unacked(id) == Some(this) {
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
                        self.remember_unacked(id, this);
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
                let call = CommitCall {
                    id: id.clone(),
                    epoch,
                    expected_seq,
                    keys: [
                        self.keys.state(id),
                        self.keys.stream(id),
                        self.keys.inputs(id),
                    ],
                    args,
                };
                match self.committer.submit(call).await {
                    Ok(done) => done,
                    Err(e) => {
                        // The script may have run before the connection failed: remember the
                        // commit so the engine's retry can confirm it.
                        if e.kind() == normandy_core::ErrorKind::Unavailable {
                            self.remember_unacked(id, this);
                        }
                        return Err(e);
                    }
                }
            }
        };
        match reply {
            Reply::Applied(seq) => {
                if let (Some(pool), Some(acked)) = (&self.wait, acked)
                    && acked < pool.wait.replicas
                {
                    warn!(session = %id, seq, acked, wanted = pool.wait.replicas,
                        "commit applied on the primary but not acknowledged by enough replicas");
                    self.remember_unacked(id, this);
                    return Err(Error::DurabilityNotMet {
                        session: id.clone(),
                        wanted: pool.wait.replicas,
                        acked,
                    });
                }
                Ok(CommitAck::Applied { seq })
            }
            Reply::Duplicate(input_id, seq) => Ok(CommitAck::DuplicateInput { input_id, seq }),
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
        self.decode_record(id, fields).map(Some)
    }

    async fn entries(&self, id: &SessionId, after: Seq, limit: usize) -> Result<Vec<Entry>> {
        let ctx = Ctx::session(id);
        let mut con = self.shared.clone();
        let Some(from) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let (exists, range): (bool, Value) = redis::pipe()
            .cmd("EXISTS")
            .arg(self.keys.state(id))
            .cmd("XRANGE")
            .arg(self.keys.stream(id))
            .arg(format!("0-{from}"))
            .arg("+")
            .arg("COUNT")
            // Redis takes a signed 64-bit count; "everything" is usize::MAX from callers.
            .arg(limit.clamp(1, i64::MAX as usize))
            .query_async(&mut con)
            .await
            .map_err(|e| error::map(e, ctx))?;
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
        for item in items {
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
            out.push(codec::decode(BlobKind::Entry, blob, Some(id))?);
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
        let mut con = self.shared.clone();
        let key = match owner {
            OwnerFilter::Node(node) => self.keys.node_index(node),
            OwnerFilter::Any => self.keys.any_index(),
        };
        let min = match cursor {
            Some(c) => format!("({c}"),
            None => "-".to_string(),
        };
        let ids: Vec<String> = redis::cmd("ZRANGEBYLEX")
            .arg(&key)
            .arg(min)
            .arg("+")
            .arg("LIMIT")
            .arg(0)
            .arg(limit.saturating_add(1).min(i64::MAX as usize))
            .query_async(&mut con)
            .await
            .map_err(|e| error::map(e, ctx))?;
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
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.cmd("HMGET")
                    .arg(self.keys.state(id))
                    .arg("ep")
                    .arg("own");
            }
            let rows: Vec<(Option<String>, Option<String>)> = pipe
                .query_async(&mut con)
                .await
                .map_err(|e| error::map(e, ctx))?;
            for (id, (epoch, own)) in ids.into_iter().zip(rows) {
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
        cmd.arg(self.scripts.mark_terminal.get_hash())
            .arg(1)
            .arg(self.keys.state(id))
            .arg(id.as_str())
            .arg(&self.keys.index)
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
        cmd.arg(self.scripts.delete.get_hash())
            .arg(3)
            .arg(self.keys.state(id))
            .arg(self.keys.stream(id))
            .arg(self.keys.inputs(id))
            .arg(id.as_str())
            .arg(&self.keys.index);
        let deleted = self
            .eval_durable(&self.scripts.delete, &cmd, Ctx::session(id), id)
            .await?;
        self.take_unacked(id);
        Ok(matches!(deleted, Value::Int(1)))
    }
}

/// Test support script. KEYS: stream. ARGV: stream id, new bytes.
const OVERWRITE_ENTRY: &str = r"
local all = redis.call('XRANGE', KEYS[1], '-', '+')
local found = 0
for _, e in ipairs(all) do if e[1] == ARGV[1] then found = 1 end end
if found == 0 then return 0 end
redis.call('DEL', KEYS[1])
for _, e in ipairs(all) do
  local v = e[2][2]
  if e[1] == ARGV[1] then v = ARGV[2] end
  redis.call('XADD', KEYS[1], e[1], 'e', v)
end
return 1
";

/// Sends `cmd` (an `EVALSHA`) and `WAIT` in one pipeline on a dedicated connection; returns the
/// script's reply and how many replicas acknowledged. Loads the script once on `NOSCRIPT`.
pub(crate) async fn run_with_wait(
    pool: &WaitPool,
    script: &Script,
    cmd: &Cmd,
    ctx: Ctx<'_>,
) -> Result<(Value, u32)> {
    let (_permit, mut con) = pool.acquire().await?;
    let mut loaded = false;
    loop {
        let mut pipe = redis::pipe();
        pipe.add_command(cmd.clone())
            .cmd("WAIT")
            .arg(pool.wait.replicas)
            .arg(pool.wait.timeout.as_millis() as u64)
            .ignore_errors();
        // On an I/O error the connection is dropped (not released), so a fresh one replaces
        // it: nothing after a broken socket is trusted.
        let mut replies: Vec<redis::RedisResult<Value>> = pipe
            .query_async(&mut con)
            .await
            .map_err(|e| error::map(e, ctx))?;
        if replies.len() != 2 {
            return Err(error::unexpected(ctx, "EVALSHA + WAIT", &Value::Nil));
        }
        let acks = replies.pop().and_then(|r| r.ok());
        let script_reply = replies.pop().unwrap_or(Ok(Value::Nil));
        match script_reply {
            Err(e) if is_noscript(&e) && !loaded => {
                loaded = true;
                script
                    .load_async(&mut con)
                    .await
                    .map_err(|e| error::map(e, ctx))?;
            }
            Err(e) => {
                pool.release(con);
                return Err(error::map(e, ctx));
            }
            Ok(value) => {
                pool.release(con);
                let acked = match acks {
                    Some(Value::Int(n)) => u32::try_from(n.max(0)).unwrap_or(u32::MAX),
                    Some(other) => return Err(error::unexpected(ctx, "WAIT", &other)),
                    None => 0,
                };
                return Ok((value, acked));
            }
        }
    }
}

/// Sends an `EVALSHA` command, loading the script and resending once on `NOSCRIPT` (after a
/// server restart or `SCRIPT FLUSH`).
pub(crate) async fn eval_on(
    con: &mut impl ConnectionLike,
    script: &Script,
    cmd: &Cmd,
    ctx: Ctx<'_>,
) -> Result<Value> {
    match cmd.query_async::<Value>(con).await {
        Err(e) if is_noscript(&e) => {
            script
                .load_async(con)
                .await
                .map_err(|e| error::map(e, ctx))?;
            cmd.query_async(con).await.map_err(|e| error::map(e, ctx))
        }
        other => other.map_err(|e| error::map(e, ctx)),
    }
}

fn is_noscript(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(ServerErrorKind::NoScript)
}

fn parse_commit_reply(value: &Value, ctx: Ctx<'_>) -> Result<Reply> {
    let items = as_items(value);
    let bad = || error::unexpected(ctx, "commit", value);
    match items.as_slice() {
        [Some(b"applied"), Some(seq)] => Ok(Reply::Applied(parse_u64(seq).ok_or_else(bad)?)),
        [Some(b"dup"), Some(input), Some(seq)] => {
            let input = std::str::from_utf8(input)
                .ok()
                .and_then(|s| InputId::new(s).ok())
                .ok_or_else(bad)?;
            Ok(Reply::Duplicate(input, parse_u64(seq).ok_or_else(bad)?))
        }
        [Some(b"miss")] => Ok(Reply::Miss),
        _ => Err(bad()),
    }
}

/// The items of a script's array reply as byte strings (`None` for other shapes).
fn as_items(value: &Value) -> Vec<Option<&[u8]>> {
    match value {
        Value::Array(items) => items
            .iter()
            .map(|v| match v {
                Value::BulkString(b) => Some(b.as_slice()),
                Value::SimpleString(s) => Some(s.as_bytes()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

pub(crate) fn parse_u64(b: &[u8]) -> Option<u64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

fn policy_str(p: ResumePolicy) -> &'static str {
    match p {
        ResumePolicy::Lazy => "lazy",
        ResumePolicy::Eager => "eager",
    }
}

fn fingerprint(state: &[u8], entries: &[Vec<u8>]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    state.hash(&mut h);
    entries.hash(&mut h);
    h.finish()
}

/// Escapes `SCAN MATCH` glob metacharacters.
fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn flatten(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::BulkString(b) => out.extend_from_slice(b),
        Value::SimpleString(s) => out.extend_from_slice(s.as_bytes()),
        Value::Array(items) | Value::Set(items) => items.iter().for_each(|v| flatten(v, out)),
        Value::Map(pairs) => pairs.iter().for_each(|(k, v)| {
            flatten(k, out);
            flatten(v, out);
        }),
        Value::Int(n) => out.extend_from_slice(n.to_string().as_bytes()),
        _ => {}
    }
}
