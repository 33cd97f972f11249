//! [`LmdbStore`]: the [`SessionStore`] over one LMDB environment.

use std::collections::HashMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use heed::{RoTxn, WithoutTls};
use normandy_core::codec::{self, BlobKind};
use normandy_core::{
    Capabilities, CommitAck, CommitBatch, Entry, Epoch, Error, NewSession, NodeId, OwnerFilter,
    Result, ResumablePage, ResumableSession, Seq, SessionId, SessionRecord, SessionStore,
};
use tokio::sync::oneshot;

use crate::config::LmdbConfig;
use crate::conn::{EnvCore, page_size};
use crate::error::from_heed;
use crate::group::{EncodedEntry, Op, Reply, Writer};
use crate::record::read_record;
use crate::schema::{Dbs, be_u64, keys};

/// Environments open in this process, by canonical path. LMDB must not be opened twice by one
/// process (heed refuses it), so a second [`LmdbStore::open`] of a path shares the first's
/// environment and writer thread.
static OPEN: LazyLock<Mutex<HashMap<PathBuf, Weak<Shared>>>> = LazyLock::new(Default::default);

fn open_registry() -> std::sync::MutexGuard<'static, HashMap<PathBuf, Weak<Shared>>> {
    // The map is only inserted into or removed from under the lock; a poisoned lock still holds
    // a consistent map.
    OPEN.lock().unwrap_or_else(|p| p.into_inner())
}

/// One open environment. Fields drop in order: the writer thread is drained and joined, then
/// the environment closes, then the registry forgets the path (so a new open of it can start).
struct Shared {
    writer: Writer,
    core: Arc<EnvCore>,
    config: LmdbConfig,
    _registration: Registration,
}

struct Registration(PathBuf);

impl Drop for Registration {
    fn drop(&mut self) {
        let mut open = open_registry();
        if open.get(&self.0).is_some_and(|w| w.strong_count() == 0) {
            open.remove(&self.0);
        }
    }
}

/// Counters of the group-commit writer of one process (see [`LmdbStore::write_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriteStats {
    /// LMDB write transactions committed.
    pub transactions: u64,
    /// Writes (creates, activations, commits, ...) they carried, including rejected ones.
    pub writes: u64,
}

/// The embedded durable store: sessions in an LMDB environment on local disk (heed).
///
/// - Every commit is one LMDB write transaction, and commits of different sessions queued at
///   the same time share one (group commit): one `fsync` for many sessions, each with its own
///   outcome.
/// - One process per environment: opening holds an exclusive lock on the directory's
///   `normandy.lock` (released when the last handle closes, or by the kernel when the process
///   dies), and a second process's open fails with a `Config` error naming the holder's pid.
///   Within a process, every open of the path shares one environment.
/// - LMDB calls block, so reads run on tokio's blocking pool and writes on a dedicated writer
///   thread; no async task ever waits on disk.
/// - When the memory map fills, it is doubled up to [`LmdbConfig::max_map_size`] and the
///   transaction retried; past that ceiling the write fails with an error naming the setting.
///
/// Cloning is cheap: clones share the environment.
#[derive(Clone)]
pub struct LmdbStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LmdbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LmdbStore")
            .field("path", &self.shared.core.path)
            .finish_non_exhaustive()
    }
}

impl LmdbStore {
    /// Opens (creating if needed) the environment described by `config`.
    ///
    /// Blocking but quick (it maps the file and runs one small write transaction); fine to
    /// call at start-up or from async code. A second open of the same directory in this
    /// process shares the first one's environment (and keeps its settings).
    ///
    /// # Errors
    /// - `Config` for bad settings, a path that is not a directory, or an environment another
    ///   process has open (the error names its pid);
    /// - `Corrupt` for a directory holding something that is not a Normandy LMDB environment,
    ///   or a damaged `data.mdb`: a file shorter than its meta page says, a damaged meta or
    ///   root page (checked before LMDB maps the file, so it is an error, not a `SIGBUS`; see
    ///   [the crate docs](crate#a-damaged-data-file) and [`verify`](crate::verify()));
    /// - `UnsupportedVersion` for an environment written by a newer layout;
    /// - `Backend` for a directory this process may not write (LMDB needs read-write access).
    pub fn open(config: LmdbConfig) -> Result<Self> {
        let mut config = config.validated(page_size())?;
        let io = |e, path: &Path| from_heed(heed::Error::Io(e), path, None);
        if config.path.exists() && !config.path.is_dir() {
            return Err(Error::Config(format!(
                "LMDB path {} exists and is not a directory; the store needs a directory",
                config.path.display()
            )));
        }
        std::fs::create_dir_all(&config.path).map_err(|e| io(e, &config.path))?;
        let canonical = std::fs::canonicalize(&config.path).map_err(|e| io(e, &config.path))?;
        config.path = canonical.clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut open = open_registry();
            if let Some(weak) = open.get(&canonical) {
                if let Some(shared) = weak.upgrade() {
                    return Ok(Self { shared });
                }
                // The last handle is closing it right now; wait until the environment is shut.
                drop(open);
                if Instant::now() > deadline {
                    return Err(Error::Internal(format!(
                        "LMDB environment at {} is still closing after 10 s",
                        canonical.display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let core = Arc::new(EnvCore::open(&config)?);
            let writer = Writer::spawn(core.clone(), config.max_batch, config.linger)?;
            let shared = Arc::new(Shared {
                writer,
                core,
                config,
                _registration: Registration(canonical.clone()),
            });
            open.insert(canonical, Arc::downgrade(&shared));
            return Ok(Self { shared });
        }
    }

    /// The environment's directory (canonical).
    pub fn path(&self) -> &Path {
        &self.shared.core.path
    }

    /// The settings the environment was opened with.
    pub fn config(&self) -> &LmdbConfig {
        &self.shared.config
    }

    /// The memory map's current size in bytes (it grows when full).
    pub fn map_size(&self) -> usize {
        self.shared.core.map_size()
    }

    /// Counters of this process's writer thread: how well group commit is batching.
    pub fn write_stats(&self) -> WriteStats {
        WriteStats {
            transactions: self.shared.core.txns.load(Ordering::Relaxed),
            writes: self.shared.core.writes.load(Ordering::Relaxed),
        }
    }

    pub(crate) async fn write<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.shared.writer.submit(op(tx))?;
        rx.await.map_err(|_| {
            Error::Internal("the LMDB writer failed before answering (see the logs)".into())
        })?
    }

    pub(crate) async fn read<T, F>(&self, session: Option<&SessionId>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&RoTxn<'_, WithoutTls>, &Dbs, &Path) -> Result<T> + Send + 'static,
    {
        let shared = self.shared.clone();
        let session = session.cloned();
        tokio::task::spawn_blocking(move || {
            let core = &shared.core;
            core.read(session.as_ref(), |txn, dbs| f(txn, dbs, &core.path))
        })
        .await
        .map_err(|e| Error::Internal(format!("LMDB read task failed: {e}")))?
    }
}

#[async_trait]
impl SessionStore for LmdbStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::volatile()
            .durable(true)
            .shared_across_processes(false)
            .shared_across_hosts(false)
            .group_commit(true)
    }

    async fn create(&self, new: NewSession) -> Result<SessionRecord> {
        // Encoding runs here, on the caller's task, so the writer thread only does LMDB work.
        let state_blob = codec::encode(BlobKind::TurnState, &normandy_core::TurnState::default())?;
        let template_blob = new
            .template
            .as_ref()
            .map(|t| codec::encode(BlobKind::Template, t))
            .transpose()?;
        self.write(|reply| Op::Create {
            new,
            template_blob,
            state_blob,
            reply,
        })
        .await
    }

    async fn activate(&self, id: &SessionId, node: &NodeId) -> Result<SessionRecord> {
        self.write(|reply| Op::Activate {
            id: id.clone(),
            node: node.clone(),
            reply,
        })
        .await
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
        let entries = batch
            .entries
            .iter()
            .map(|e| {
                Ok(EncodedEntry {
                    seq: e.seq,
                    input: e.payload.input_id().cloned(),
                    blob: codec::encode(BlobKind::Entry, e)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.write(|reply| Op::Commit {
            id: id.clone(),
            epoch,
            expected_seq,
            entries,
            state: batch.state.clone(),
            state_blob,
            reply,
        })
        .await
    }

    async fn load(&self, id: &SessionId) -> Result<Option<SessionRecord>> {
        let owned = id.clone();
        self.read(Some(id), move |txn, dbs, path| {
            Ok(read_record(txn, dbs, &owned, path)?.map(|(_, r)| r))
        })
        .await
    }

    async fn entries(&self, id: &SessionId, after: Seq, limit: usize) -> Result<Vec<Entry>> {
        let owned = id.clone();
        self.read(Some(id), move |txn, dbs, path| {
            let id = &owned;
            let map = |e| from_heed(e, path, Some(id));
            if dbs
                .sessions
                .get(txn, keys::session(id))
                .map_err(map)?
                .is_none()
            {
                return Err(Error::NotFound {
                    session: id.clone(),
                });
            }
            let Some(first) = after.checked_add(1) else {
                return Ok(Vec::new());
            };
            let start = keys::entry(id, first);
            let (_, end) = keys::prefix_range(id.as_str());
            let range = (Bound::Included(&start[..]), Bound::Excluded(&end[..]));
            let mut out = Vec::with_capacity(limit.min(1024));
            // Entries are dense from `first`: each must be stored at its own seq.
            for (seq, item) in
                (first..).zip(dbs.entries.range(txn, &range).map_err(map)?.take(limit))
            {
                let (_, v) = item.map_err(map)?;
                out.push(codec::decode_entry(v, id, seq)?);
            }
            Ok(out)
        })
        .await
    }

    async fn list_resumable(
        &self,
        owner: &OwnerFilter,
        cursor: Option<&SessionId>,
        limit: usize,
    ) -> Result<ResumablePage> {
        let owner = owner.clone();
        let cursor = cursor.cloned();
        self.read(None, move |txn, dbs, path| {
            let map = |e| from_heed(e, path, None);
            let corrupt = |what: &str| {
                Error::corrupt(None, "resumable index", format!("entry with a bad {what}"))
            };
            let mut found: Vec<ResumableSession> = Vec::new();
            match &owner {
                OwnerFilter::Node(node) => {
                    // Range read over `owner 0x00 *`: only this node's resumable sessions.
                    let (lo, hi) = keys::prefix_range(&node.to_string());
                    let from = cursor.as_ref().map(|c| keys::by_owner(node, c));
                    let start = match &from {
                        Some(k) => Bound::Excluded(&k[..]),
                        None => Bound::Included(&lo[..]),
                    };
                    let range = (start, Bound::Excluded(&hi[..]));
                    for item in dbs
                        .by_owner
                        .range(txn, &range)
                        .map_err(map)?
                        .take(limit.saturating_add(1))
                    {
                        let (k, v) = item.map_err(map)?;
                        let id = std::str::from_utf8(&k[lo.len()..])
                            .ok()
                            .and_then(|s| SessionId::new(s).ok())
                            .ok_or_else(|| corrupt("session id"))?;
                        let epoch = be_u64(v).ok_or_else(|| corrupt("epoch"))?;
                        found.push(ResumableSession {
                            id,
                            owner: Some(node.clone()),
                            epoch,
                        });
                    }
                }
                OwnerFilter::Any => {
                    let start = match &cursor {
                        Some(c) => Bound::Excluded(keys::session(c)),
                        None => Bound::Unbounded,
                    };
                    let range = (start, Bound::<&[u8]>::Unbounded);
                    for item in dbs
                        .any
                        .range(txn, &range)
                        .map_err(map)?
                        .take(limit.saturating_add(1))
                    {
                        let (k, v) = item.map_err(map)?;
                        let id = std::str::from_utf8(k)
                            .ok()
                            .and_then(|s| SessionId::new(s).ok())
                            .ok_or_else(|| corrupt("session id"))?;
                        let epoch = be_u64(v).ok_or_else(|| corrupt("epoch"))?;
                        let owner = match std::str::from_utf8(&v[8..]) {
                            Ok("") => None,
                            Ok(s) => Some(s.parse::<NodeId>().map_err(|_| corrupt("owner"))?),
                            Err(_) => return Err(corrupt("owner")),
                        };
                        found.push(ResumableSession { id, owner, epoch });
                    }
                }
            }
            let more = found.len() > limit;
            found.truncate(limit);
            let next = if more {
                found.last().map(|s| s.id.clone())
            } else {
                None
            };
            Ok(ResumablePage {
                sessions: found,
                next,
            })
        })
        .await
    }

    async fn mark_terminal(&self, id: &SessionId, epoch: Epoch) -> Result<()> {
        self.write(|reply| Op::MarkTerminal {
            id: id.clone(),
            epoch,
            reply,
        })
        .await
    }

    async fn delete(&self, id: &SessionId) -> Result<bool> {
        self.write(|reply| Op::Delete {
            id: id.clone(),
            reply,
        })
        .await
    }
}
