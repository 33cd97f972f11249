//! [`SessionStore`]: what is durable about a session, and [`InMemoryStore`], the tier-0 backend
//! and the reference every other backend is tested against.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::codec::{self, BlobKind};
use crate::engine::TurnState;
use crate::error::{Error, Result};
use crate::model::{Entry, Epoch, InputId, NodeId, Seq, SessionId};
use crate::template::{ConfigTemplate, ResumePolicy};

/// Whether a session still takes input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    /// Open.
    Active,
    /// Closed for good; its history stays readable.
    Terminal,
}

impl SessionStatus {
    /// Stable name for an indexed column.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Active => "active",
            SessionStatus::Terminal => "terminal",
        }
    }

    /// Parses [`as_str`](Self::as_str)'s output.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(SessionStatus::Active),
            "terminal" => Some(SessionStatus::Terminal),
            _ => None,
        }
    }
}

/// A session as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The session.
    pub id: SessionId,
    /// Current fencing epoch (0 until first activated).
    pub epoch: Epoch,
    /// Seq of the last committed entry (0 when none).
    pub seq: Seq,
    /// The node that last activated it.
    pub owner: Option<NodeId>,
    /// Open or closed.
    pub status: SessionStatus,
    /// What happens when its owner dies.
    pub resume_policy: ResumePolicy,
    /// Its configuration template (absent for sessions created without one).
    pub template: Option<ConfigTemplate>,
    /// Where its turn stood at the last boundary.
    pub state: TurnState,
    /// Creation time, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// Last write, ms since the Unix epoch.
    pub updated_at_ms: u64,
}

impl SessionRecord {
    /// Whether a reaper should resume it: eager, open, and in a turn (or with queued input).
    pub fn is_resumable(&self) -> bool {
        is_resumable(self.status, self.resume_policy, &self.state)
    }
}

/// The resumable rule every backend indexes on.
pub fn is_resumable(status: SessionStatus, policy: ResumePolicy, state: &TurnState) -> bool {
    status == SessionStatus::Active && policy == ResumePolicy::Eager && state.has_work()
}

/// What `create` stores.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSession {
    /// The session id.
    pub id: SessionId,
    /// The template, if any.
    pub template: Option<ConfigTemplate>,
    /// Resume policy (the template's, normally).
    pub resume_policy: ResumePolicy,
}

impl NewSession {
    /// A session created from a template (taking its resume policy).
    pub fn from_template(id: SessionId, template: ConfigTemplate) -> Self {
        Self {
            id,
            resume_policy: template.resume_policy,
            template: Some(template),
        }
    }

    /// A session with no template.
    pub fn bare(id: SessionId, resume_policy: ResumePolicy) -> Self {
        Self {
            id,
            template: None,
            resume_policy,
        }
    }
}

/// New entries plus the turn state they lead to: written together or not at all.
#[derive(Debug, Clone, PartialEq)]
pub struct CommitBatch {
    /// Entries, with seqs `expected_seq + 1 ..` in order.
    pub entries: Vec<Entry>,
    /// The turn state after these entries.
    pub state: TurnState,
}

impl CommitBatch {
    /// Checks that the entries continue `expected_seq` without gaps and carry distinct input ids.
    /// Every backend calls this before writing.
    pub fn validate(&self, session: &SessionId, expected_seq: Seq) -> Result<()> {
        for (i, e) in self.entries.iter().enumerate() {
            let want = expected_seq + 1 + i as u64;
            if e.seq != want {
                return Err(Error::invalid_input(
                    Some(session),
                    format!("batch entry {i} has seq {}, expected {want}", e.seq),
                ));
            }
        }
        let ids: Vec<&InputId> = self.input_ids().collect();
        for (i, a) in ids.iter().enumerate() {
            if ids[i + 1..].contains(a) {
                return Err(Error::invalid_input(
                    Some(session),
                    format!("batch carries input {a} twice"),
                ));
            }
        }
        Ok(())
    }

    /// Input ids of the batch's `Input` entries.
    pub fn input_ids(&self) -> impl Iterator<Item = &InputId> {
        self.entries.iter().filter_map(|e| e.payload.input_id())
    }

    /// The seq after this batch is applied on top of `expected_seq`.
    pub fn new_seq(&self, expected_seq: Seq) -> Seq {
        expected_seq + self.entries.len() as u64
    }
}

/// What a successful `commit` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitAck {
    /// Written; the session's seq is now `seq`.
    Applied {
        /// The new last seq.
        seq: Seq,
    },
    /// Nothing written: an entry of the batch carries an input id already stored, at `seq`.
    DuplicateInput {
        /// The input id.
        input_id: InputId,
        /// The seq of the stored `Input` entry.
        seq: Seq,
    },
}

/// Whose sessions `list_resumable` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnerFilter {
    /// Sessions last activated by this node.
    Node(NodeId),
    /// Every resumable session (the rare sweep).
    Any,
}

/// One resumable session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumableSession {
    /// The session.
    pub id: SessionId,
    /// Its last owner.
    pub owner: Option<NodeId>,
    /// Its epoch at listing time.
    pub epoch: Epoch,
}

/// A page of [`SessionStore::list_resumable`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResumablePage {
    /// Sessions in ascending id order.
    pub sessions: Vec<ResumableSession>,
    /// Pass as `cursor` to get the next page; `None` at the end.
    pub next: Option<SessionId>,
}

/// What a backend can do, declared so callers and the conformance suite need not guess.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Survives a process restart.
    pub durable: bool,
    /// Several processes on one host may use it at once.
    pub shared_across_processes: bool,
    /// Nodes on different hosts may share it.
    pub shared_across_hosts: bool,
    /// Batches commits of different sessions into one write.
    pub group_commit: bool,
}

impl Capabilities {
    /// Capabilities of a process-local, volatile backend.
    pub const fn volatile() -> Self {
        Self {
            durable: false,
            shared_across_processes: false,
            shared_across_hosts: false,
            group_commit: false,
        }
    }

    /// Sets `durable`.
    pub const fn durable(mut self, v: bool) -> Self {
        self.durable = v;
        self
    }

    /// Sets `shared_across_processes`.
    pub const fn shared_across_processes(mut self, v: bool) -> Self {
        self.shared_across_processes = v;
        self
    }

    /// Sets `shared_across_hosts`.
    pub const fn shared_across_hosts(mut self, v: bool) -> Self {
        self.shared_across_hosts = v;
        self
    }

    /// Sets `group_commit`.
    pub const fn group_commit(mut self, v: bool) -> Self {
        self.group_commit = v;
        self
    }
}

/// What is durable about sessions.
///
/// Every method's `# Behavior` list is checked by `normandy-tests`' store conformance suite.
///
/// Implement it with [`#[normandy_core::async_trait]`](crate::async_trait) on the `impl`
/// (rustdoc shows the methods as returning `Pin<Box<dyn Future>>`, which is what the attribute
/// writes): `#[async_trait] impl SessionStore for MyStore { async fn create(&self, session:
/// NewSession) -> Result<SessionRecord> { … } … }`. [`InMemoryStore`] is a complete backend in
/// one file; run the conformance suite (`normandy_tests::store_conformance!`) against yours.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// What this backend supports.
    fn capabilities(&self) -> Capabilities;

    /// Creates a session at epoch 0, seq 0, idle, with no owner.
    ///
    /// # Behavior
    /// - Creating an id that exists returns `AlreadyExists` and changes nothing.
    async fn create(&self, session: NewSession) -> Result<SessionRecord>;

    /// Makes `node` the session's writer: bumps the epoch atomically and returns the record.
    ///
    /// # Behavior
    /// - Each call returns an epoch greater than any returned before for this session.
    /// - After it, commits with any older epoch are `Fenced`.
    /// - `NotFound` for an unknown id; `SessionClosed` for a terminal session (nothing changes).
    async fn activate(&self, id: &SessionId, node: &NodeId) -> Result<SessionRecord>;

    /// Writes `batch` atomically if `epoch` is current and the stored seq is `expected_seq`.
    ///
    /// # Behavior
    /// - Stale epoch: `Fenced`, nothing written.
    /// - An entry's input id already stored: `Ok(CommitAck::DuplicateInput)`, nothing written
    ///   (checked before the seq, so an ambiguous commit retried as is reports the duplicate).
    /// - Stored seq differs from `expected_seq`: `Conflict`, nothing written.
    /// - Entries whose seqs do not continue `expected_seq`: `InvalidInput`, nothing written.
    /// - A terminal session: `SessionClosed`, nothing written.
    /// - Entries and turn state become visible together, never one without the other.
    async fn commit(
        &self,
        id: &SessionId,
        epoch: Epoch,
        expected_seq: Seq,
        batch: &CommitBatch,
    ) -> Result<CommitAck>;

    /// Reads the record without activating it; `Ok(None)` for an unknown id.
    ///
    /// # Behavior
    /// - Corrupt or newer-format bytes are `Corrupt` / `UnsupportedVersion` naming the session.
    async fn load(&self, id: &SessionId) -> Result<Option<SessionRecord>>;

    /// Entries with seq greater than `after`, ascending, at most `limit`.
    ///
    /// # Behavior
    /// - `NotFound` for an unknown id.
    async fn entries(&self, id: &SessionId, after: Seq, limit: usize) -> Result<Vec<Entry>>;

    /// Eager, open sessions with work pending (a turn in flight or queued input), by owner,
    /// in ascending id order after `cursor`.
    ///
    /// # Behavior
    /// - Served by an index on (owner, resumable): never a scan of every session.
    /// - Idle, lazy and terminal sessions are never listed.
    async fn list_resumable(
        &self,
        owner: &OwnerFilter,
        cursor: Option<&SessionId>,
        limit: usize,
    ) -> Result<ResumablePage>;

    /// Closes the session for good, fenced like a commit.
    ///
    /// # Behavior
    /// - Stale epoch: `Fenced`. Idempotent for an already terminal session.
    async fn mark_terminal(&self, id: &SessionId, epoch: Epoch) -> Result<()>;

    /// Deletes the session and its entries; `Ok(false)` if it did not exist.
    async fn delete(&self, id: &SessionId) -> Result<bool>;
}

/// Current wall-clock time in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct MemSession {
    epoch: Epoch,
    seq: Seq,
    owner: Option<NodeId>,
    status: SessionStatus,
    resume_policy: ResumePolicy,
    template: Option<Vec<u8>>,
    state: Vec<u8>,
    resumable: bool,
    created_at_ms: u64,
    updated_at_ms: u64,
    /// Encoded entries; `entries[i]` has seq `i + 1`.
    entries: Vec<Vec<u8>>,
    inputs: HashMap<InputId, Seq>,
}

#[derive(Default)]
struct MemInner {
    sessions: HashMap<SessionId, MemSession>,
    /// (owner, id) of resumable sessions: the index `list_resumable(Node)` reads.
    by_owner: BTreeSet<(NodeId, SessionId)>,
    /// Every resumable id, for `list_resumable(Any)`.
    any: BTreeSet<SessionId>,
}

impl MemInner {
    fn reindex(&mut self, id: &SessionId, old: (bool, Option<NodeId>)) {
        let Some(s) = self.sessions.get(id) else {
            return;
        };
        let new = (s.resumable, s.owner.clone());
        if old == new {
            return;
        }
        if let (true, Some(o)) = &old {
            self.by_owner.remove(&(o.clone(), id.clone()));
        }
        if old.0 {
            self.any.remove(id);
        }
        if let (true, Some(o)) = &new {
            self.by_owner.insert((o.clone(), id.clone()));
        }
        if new.0 {
            self.any.insert(id.clone());
        }
    }
}

/// The tier-0 store: process memory, nothing survives a restart.
///
/// It stores the same versioned blobs as the durable backends, so it exercises the codec and can
/// serve the conformance suite's corrupt-bytes and canary cases.
#[derive(Default)]
pub struct InMemoryStore {
    // std Mutex: critical sections are map operations that never await; encoding happens outside.
    inner: Mutex<MemInner>,
}

impl std::fmt::Debug for InMemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryStore").finish_non_exhaustive()
    }
}

impl InMemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        // A panic while holding the lock cannot leave a half-applied commit (all checks precede
        // all writes), so a poisoned lock is safe to keep using.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Test support: every stored byte, concatenated (for canary scans).
    pub fn raw_bytes(&self) -> Vec<u8> {
        let inner = self.lock();
        let mut out = Vec::new();
        for (id, s) in &inner.sessions {
            out.extend_from_slice(id.as_str().as_bytes());
            out.extend_from_slice(&s.state);
            if let Some(t) = &s.template {
                out.extend_from_slice(t);
            }
            for e in &s.entries {
                out.extend_from_slice(e);
            }
        }
        out
    }

    /// Test support: overwrites a session's stored turn state with `bytes`.
    pub fn overwrite_state_bytes(&self, id: &SessionId, bytes: Vec<u8>) -> bool {
        match self.lock().sessions.get_mut(id) {
            Some(s) => {
                s.state = bytes;
                true
            }
            None => false,
        }
    }

    /// Test support: overwrites the stored bytes of entry `seq`.
    pub fn overwrite_entry_bytes(&self, id: &SessionId, seq: Seq, bytes: Vec<u8>) -> bool {
        match self.lock().sessions.get_mut(id) {
            Some(s) if seq >= 1 && (seq as usize) <= s.entries.len() => {
                s.entries[seq as usize - 1] = bytes;
                true
            }
            _ => false,
        }
    }

    /// Number of sessions stored.
    pub fn len(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn record(id: &SessionId, s: &MemSession) -> Result<SessionRecord> {
        Ok(SessionRecord {
            id: id.clone(),
            epoch: s.epoch,
            seq: s.seq,
            owner: s.owner.clone(),
            status: s.status,
            resume_policy: s.resume_policy,
            template: s
                .template
                .as_deref()
                .map(|b| codec::decode(BlobKind::Template, b, Some(id)))
                .transpose()?,
            state: codec::decode(BlobKind::TurnState, &s.state, Some(id))?,
            created_at_ms: s.created_at_ms,
            updated_at_ms: s.updated_at_ms,
        })
    }
}

#[async_trait]
impl SessionStore for InMemoryStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::volatile()
    }

    async fn create(&self, new: NewSession) -> Result<SessionRecord> {
        let state = TurnState::default();
        let state_blob = codec::encode(BlobKind::TurnState, &state)?;
        let template_blob = new
            .template
            .as_ref()
            .map(|t| codec::encode(BlobKind::Template, t))
            .transpose()?;
        let now = now_ms();
        let mut inner = self.lock();
        if inner.sessions.contains_key(&new.id) {
            return Err(Error::AlreadyExists { session: new.id });
        }
        inner.sessions.insert(
            new.id.clone(),
            MemSession {
                epoch: 0,
                seq: 0,
                owner: None,
                status: SessionStatus::Active,
                resume_policy: new.resume_policy,
                template: template_blob,
                state: state_blob,
                resumable: false,
                created_at_ms: now,
                updated_at_ms: now,
                entries: Vec::new(),
                inputs: HashMap::new(),
            },
        );
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
        let mut inner = self.lock();
        let s = inner.sessions.get_mut(id).ok_or_else(|| Error::NotFound {
            session: id.clone(),
        })?;
        if s.status == SessionStatus::Terminal {
            return Err(Error::SessionClosed {
                session: id.clone(),
            });
        }
        // Decode before changing anything, so corrupt bytes leave the record untouched.
        let mut record = Self::record(id, s)?;
        let old = (s.resumable, s.owner.clone());
        s.epoch += 1;
        s.owner = Some(node.clone());
        s.updated_at_ms = now_ms();
        record.epoch = s.epoch;
        record.owner = s.owner.clone();
        record.updated_at_ms = s.updated_at_ms;
        inner.reindex(id, old);
        Ok(record)
    }

    async fn commit(
        &self,
        id: &SessionId,
        epoch: Epoch,
        expected_seq: Seq,
        batch: &CommitBatch,
    ) -> Result<CommitAck> {
        batch.validate(id, expected_seq)?;
        let state_blob = codec::encode(BlobKind::TurnState, &batch.state)?;
        let mut blobs = Vec::with_capacity(batch.entries.len());
        for e in &batch.entries {
            blobs.push(codec::encode(BlobKind::Entry, e)?);
        }
        let mut inner = self.lock();
        let s = inner.sessions.get_mut(id).ok_or_else(|| Error::NotFound {
            session: id.clone(),
        })?;
        if s.status == SessionStatus::Terminal {
            return Err(Error::SessionClosed {
                session: id.clone(),
            });
        }
        if s.epoch != epoch {
            return Err(Error::Fenced {
                session: id.clone(),
                epoch,
                current: s.epoch,
            });
        }
        for input in batch.input_ids() {
            if let Some(seq) = s.inputs.get(input) {
                return Ok(CommitAck::DuplicateInput {
                    input_id: input.clone(),
                    seq: *seq,
                });
            }
        }
        if s.seq != expected_seq {
            return Err(Error::Conflict {
                session: id.clone(),
                expected: expected_seq,
                actual: s.seq,
            });
        }
        for e in &batch.entries {
            if let Some(input) = e.payload.input_id() {
                s.inputs.insert(input.clone(), e.seq);
            }
        }
        s.entries.extend(blobs);
        s.seq = batch.new_seq(expected_seq);
        s.state = state_blob;
        s.updated_at_ms = now_ms();
        let old = (s.resumable, s.owner.clone());
        s.resumable = is_resumable(s.status, s.resume_policy, &batch.state);
        let seq = s.seq;
        inner.reindex(id, old);
        Ok(CommitAck::Applied { seq })
    }

    async fn load(&self, id: &SessionId) -> Result<Option<SessionRecord>> {
        let inner = self.lock();
        inner
            .sessions
            .get(id)
            .map(|s| Self::record(id, s))
            .transpose()
    }

    async fn entries(&self, id: &SessionId, after: Seq, limit: usize) -> Result<Vec<Entry>> {
        let blobs: Vec<Vec<u8>> = {
            let inner = self.lock();
            let s = inner.sessions.get(id).ok_or_else(|| Error::NotFound {
                session: id.clone(),
            })?;
            let start = (after as usize).min(s.entries.len());
            s.entries[start..].iter().take(limit).cloned().collect()
        };
        let Some(first) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        // Entries are dense from `first`: each must be stored at its own seq.
        (first..)
            .zip(&blobs)
            .map(|(seq, b)| codec::decode_entry(b, id, seq))
            .collect()
    }

    async fn list_resumable(
        &self,
        owner: &OwnerFilter,
        cursor: Option<&SessionId>,
        limit: usize,
    ) -> Result<ResumablePage> {
        let inner = self.lock();
        let ids: Vec<SessionId> = match owner {
            OwnerFilter::Node(node) => {
                use std::ops::Bound;
                // A range over this owner's keys only: never a scan of other owners' sessions.
                let lo = match cursor {
                    Some(c) => Bound::Excluded((node.clone(), c.clone())),
                    None => Bound::Included((node.clone(), SessionId::min_bound())),
                };
                inner
                    .by_owner
                    .range((lo, Bound::Unbounded))
                    .take_while(|(o, _)| o == node)
                    .take(limit + 1)
                    .map(|(_, id)| id.clone())
                    .collect()
            }
            OwnerFilter::Any => {
                use std::ops::Bound;
                let lo = match cursor {
                    Some(c) => Bound::Excluded(c.clone()),
                    None => Bound::Unbounded,
                };
                inner
                    .any
                    .range((lo, Bound::Unbounded))
                    .take(limit + 1)
                    .cloned()
                    .collect()
            }
        };
        let more = ids.len() > limit;
        let sessions: Vec<ResumableSession> = ids
            .into_iter()
            .take(limit)
            .filter_map(|id| {
                inner.sessions.get(&id).map(|s| ResumableSession {
                    owner: s.owner.clone(),
                    epoch: s.epoch,
                    id,
                })
            })
            .collect();
        let next = if more {
            sessions.last().map(|s| s.id.clone())
        } else {
            None
        };
        Ok(ResumablePage { sessions, next })
    }

    async fn mark_terminal(&self, id: &SessionId, epoch: Epoch) -> Result<()> {
        let mut inner = self.lock();
        let s = inner.sessions.get_mut(id).ok_or_else(|| Error::NotFound {
            session: id.clone(),
        })?;
        if s.status == SessionStatus::Terminal {
            return Ok(());
        }
        if s.epoch != epoch {
            return Err(Error::Fenced {
                session: id.clone(),
                epoch,
                current: s.epoch,
            });
        }
        let old = (s.resumable, s.owner.clone());
        s.status = SessionStatus::Terminal;
        s.resumable = false;
        s.updated_at_ms = now_ms();
        inner.reindex(id, old);
        Ok(())
    }

    async fn delete(&self, id: &SessionId) -> Result<bool> {
        let mut inner = self.lock();
        let Some(s) = inner.sessions.get(id) else {
            return Ok(false);
        };
        let old = (s.resumable, s.owner.clone());
        if let Some(s) = inner.sessions.get_mut(id) {
            s.resumable = false;
        }
        inner.reindex(id, old);
        inner.sessions.remove(id);
        Ok(true)
    }
}
