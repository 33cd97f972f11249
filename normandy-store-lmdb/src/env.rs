//! The environment: opening it (format marker, databases), the key layout, and growing the map.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use heed::types::Bytes;
use heed::{CommitOrAbort, Database, Env, EnvFlags, EnvOpenOptions, MdbError, RoTxn, WithoutTls};
use normandy_core::codec::{self, BlobKind};
use normandy_core::{
    ConfigTemplate, Epoch, Error, NodeId, Result, ResumePolicy, Seq, SessionId, SessionRecord,
    SessionStatus, TurnState,
};
use serde::{Deserialize, Serialize};

use crate::config::{Durability, LmdbConfig, round_down};
use crate::error::from_heed;

/// Version of this crate's database layout (names, keys, index values). Stored in the `meta`
/// database; an environment written by a newer layout is refused rather than misread.
pub(crate) const LAYOUT_VERSION: u32 = 1;
const FORMAT_KEY: &[u8] = b"format_version";
/// Named databases: meta plus seven data databases.
const MAX_DBS: u32 = 8;

pub(crate) type Db = Database<'static, Bytes, Bytes>;

/// The databases of one environment. Keys never contain a NUL byte except as the separator
/// below (ids are printable), so `prefix + 0x00` ranges select exactly one session.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dbs {
    /// `"format_version"` → layout version, u32 big-endian.
    pub(crate) meta: Db,
    /// session id → session header blob (epoch, seq, owner, status, ...).
    pub(crate) sessions: Db,
    /// session id → turn-state blob.
    pub(crate) states: Db,
    /// session id → template blob (only sessions created with one).
    pub(crate) templates: Db,
    /// session id, 0x00, seq (u64 BE) → entry blob.
    pub(crate) entries: Db,
    /// session id, 0x00, input id → seq of its `Input` entry (u64 BE).
    pub(crate) inputs: Db,
    /// owner (`name#incarnation`), 0x00, session id → epoch (u64 BE): resumable sessions by owner.
    pub(crate) by_owner: Db,
    /// session id → epoch (u64 BE) + owner string (empty if none): every resumable session.
    pub(crate) any: Db,
}

impl Dbs {
    /// Every database, for test-support scans.
    pub(crate) fn all(&self) -> [Db; 8] {
        [
            self.meta,
            self.sessions,
            self.states,
            self.templates,
            self.entries,
            self.inputs,
            self.by_owner,
            self.any,
        ]
    }
}

/// Key builders (see [`Dbs`] for the layout).
pub(crate) mod keys {
    use super::*;

    pub(crate) fn session(id: &SessionId) -> &[u8] {
        id.as_str().as_bytes()
    }

    fn prefixed(prefix: &str, tail: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(prefix.len() + 1 + tail.len());
        k.extend_from_slice(prefix.as_bytes());
        k.push(0);
        k.extend_from_slice(tail);
        k
    }

    pub(crate) fn entry(id: &SessionId, seq: u64) -> Vec<u8> {
        prefixed(id.as_str(), &seq.to_be_bytes())
    }

    pub(crate) fn input(id: &SessionId, input: &str) -> Vec<u8> {
        prefixed(id.as_str(), input.as_bytes())
    }

    pub(crate) fn by_owner(owner: &NodeId, id: &SessionId) -> Vec<u8> {
        prefixed(&owner.to_string(), id.as_str().as_bytes())
    }

    /// `[prefix 0x00, prefix 0x01)`: every key of the form `prefix, 0x00, ...`.
    pub(crate) fn prefix_range(prefix: &str) -> (Vec<u8>, Vec<u8>) {
        let mut lo = prefix.as_bytes().to_vec();
        lo.push(0);
        let mut hi = prefix.as_bytes().to_vec();
        hi.push(1);
        (lo, hi)
    }
}

/// Parses a u64 big-endian index value.
pub(crate) fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

/// An open environment, shared by the writer thread and the readers of one process.
pub(crate) struct EnvCore {
    pub(crate) env: Env<WithoutTls>,
    pub(crate) dbs: Dbs,
    /// The canonical directory, for error messages.
    pub(crate) path: PathBuf,
    pub(crate) max_map_size: usize,
    /// Held shared by every transaction this process opens, and exclusively while the map is
    /// resized: LMDB allows `mdb_env_set_mapsize` only while the process has no transaction
    /// open, and it does not check.
    gate: RwLock<()>,
    /// Write transactions committed by this process's writer thread.
    pub(crate) txns: AtomicU64,
    /// Writes (create, activate, commit, ...) applied in them.
    pub(crate) writes: AtomicU64,
}

impl std::fmt::Debug for EnvCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnvCore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl EnvCore {
    /// Opens (creating if needed) the environment in `config.path`, which must be canonical.
    pub(crate) fn open(config: &LmdbConfig) -> Result<Self> {
        let path = config.path.clone();
        let mut options = EnvOpenOptions::new().read_txn_without_tls();
        options
            .map_size(config.map_size)
            .max_dbs(MAX_DBS)
            .max_readers(config.max_readers);
        let flags = match config.durability {
            Durability::Full => EnvFlags::empty(),
            Durability::NoMetaSync => EnvFlags::NO_META_SYNC,
            Durability::NoSync => EnvFlags::NO_SYNC,
        };
        // SAFETY: NO_SYNC / NO_META_SYNC trade durability on power loss, not memory safety;
        // the user chose them through `Durability`.
        #[allow(unsafe_code)]
        unsafe {
            options.flags(flags);
        }
        // SAFETY: the environment is opened once per process (the store keeps a registry of open
        // paths), never with NO_LOCK, and its files are only modified through LMDB.
        #[allow(unsafe_code)]
        let env = unsafe { options.open(&path) }.map_err(|e| from_heed(e, &path, None))?;
        // A process killed while reading leaves its reader slot behind, pinning old pages;
        // clear such slots now (LMDB checks the pids).
        let _ = env.clear_stale_readers();

        check_format(&env, &path)?;
        let dbs = create_dbs(&env).map_err(|e| from_heed(e, &path, None))?;
        Ok(Self {
            env,
            dbs,
            path,
            max_map_size: config.max_map_size,
            gate: RwLock::new(()),
            txns: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        })
    }

    /// Shared hold for the duration of one transaction.
    pub(crate) fn hold(&self) -> RwLockReadGuard<'_, ()> {
        // The guarded value is `()`: a poisoned lock protects nothing that could be half-updated.
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a read transaction, adopting a map another process grew (`MDB_MAP_RESIZED`).
    pub(crate) fn read<T>(
        &self,
        session: Option<&SessionId>,
        f: impl Fn(&RoTxn<'_, WithoutTls>, &Dbs) -> Result<T>,
    ) -> Result<T> {
        let mut attempts = 0;
        loop {
            let held = self.hold();
            match self.env.read_txn() {
                Ok(txn) => {
                    let out = f(&txn, &self.dbs);
                    drop(txn);
                    return out;
                }
                Err(heed::Error::Mdb(MdbError::MapResized)) if attempts < 8 => {
                    drop(held);
                    attempts += 1;
                    self.adopt_resized(session)?;
                }
                Err(e) => return Err(from_heed(e, &self.path, session)),
            }
        }
    }

    /// Another process grew the map: take the size it wrote (`mdb_env_set_mapsize(0)`).
    pub(crate) fn adopt_resized(&self, session: Option<&SessionId>) -> Result<()> {
        let _excl = self.exclusive();
        // SAFETY: `_excl` guarantees no transaction of this process is open.
        #[allow(unsafe_code)]
        unsafe { self.env.resize(0) }.map_err(|e| from_heed(e, &self.path, session))
    }

    /// Doubles the map (up to `max_map_size`) after `MDB_MAP_FULL`. Errors when already at the
    /// ceiling, naming the setting to raise.
    pub(crate) fn grow(&self) -> Result<usize> {
        let _excl = self.exclusive();
        let current = self.env.info().map_size;
        let page = page_size();
        let target = round_down(current.saturating_mul(2).min(self.max_map_size), page);
        if target <= current {
            return Err(Error::Backend {
                backend: crate::error::BACKEND,
                message: format!(
                    "LMDB environment at {}: the memory map is full at {current} bytes, which is \
                     max_map_size; raise LmdbConfig::max_map_size (nothing acknowledged was lost)",
                    self.path.display()
                ),
                retryable: false,
            });
        }
        // SAFETY: `_excl` guarantees no transaction of this process is open.
        #[allow(unsafe_code)]
        unsafe { self.env.resize(target) }.map_err(|e| from_heed(e, &self.path, None))?;
        tracing::info!(path = %self.path.display(), from = current, to = target, "grew LMDB map");
        Ok(target)
    }

    /// Current map size in bytes.
    pub(crate) fn map_size(&self) -> usize {
        self.env.info().map_size
    }
}

/// The OS page size (LMDB map sizes are whole pages).
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    #[allow(unsafe_code)]
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as usize } else { 4096 }
}

/// Refuses an environment written by a newer layout, or one holding databases that are not ours.
fn check_format(env: &Env<WithoutTls>, path: &Path) -> Result<()> {
    let map = |e| from_heed(e, path, None);
    let rtxn = env.read_txn().map_err(map)?;
    let mut found: Option<Vec<u8>> = None;
    let mut foreign = false;
    env.open_databases_and_commit(rtxn, |dbo, rtxn| -> heed::Result<_> {
        let meta: Option<Database<Bytes, Bytes>> = dbo.open_database(rtxn, Some("meta"))?;
        match meta {
            Some(meta) => found = meta.get(rtxn, FORMAT_KEY)?.map(<[u8]>::to_vec),
            None => {
                // No marker: the environment must be empty (we write the marker with the
                // databases in one transaction, so a half-initialised one cannot exist).
                let unnamed: Option<Database<Bytes, Bytes>> = dbo.open_database(rtxn, None)?;
                if let Some(u) = unnamed {
                    foreign = !u.is_empty(rtxn)?;
                }
            }
        }
        Ok(CommitOrAbort::<(), ()>::Commit(()))
    })
    .map_err(map)?;
    if foreign {
        return Err(Error::Corrupt {
            session: None,
            what: format!("LMDB environment at {}", path.display()),
            reason: "it holds databases Normandy did not write (no format marker); \
                     use an empty directory"
                .into(),
        });
    }
    if let Some(bytes) = found {
        let version = <[u8; 4]>::try_from(bytes.as_slice())
            .map(u32::from_be_bytes)
            .map_err(|_| Error::Corrupt {
                session: None,
                what: format!("LMDB environment at {}", path.display()),
                reason: format!("format marker has {} bytes, expected 4", bytes.len()),
            })?;
        if version > LAYOUT_VERSION || version == 0 {
            return Err(Error::UnsupportedVersion {
                session: None,
                what: format!("LMDB environment at {}", path.display()),
                found: version,
                supported: LAYOUT_VERSION,
            });
        }
    }
    Ok(())
}

/// Creates (or opens) every database and writes the format marker, in one write transaction.
fn create_dbs(env: &Env<WithoutTls>) -> heed::Result<Dbs> {
    let wtxn = env.write_txn()?;
    let (meta, sessions, states, templates, entries, inputs, by_owner, any) = env
        .create_databases_and_commit(wtxn, |dbo, wtxn| -> heed::Result<_> {
            let meta: Database<Bytes, Bytes> = dbo.create_database(wtxn, Some("meta"))?;
            if meta.get(wtxn, FORMAT_KEY)?.is_none() {
                meta.put(wtxn, FORMAT_KEY, &LAYOUT_VERSION.to_be_bytes())?;
            }
            let dbs = (
                meta,
                dbo.create_database::<Bytes, Bytes>(wtxn, Some("sessions"))?,
                dbo.create_database::<Bytes, Bytes>(wtxn, Some("states"))?,
                dbo.create_database::<Bytes, Bytes>(wtxn, Some("templates"))?,
                dbo.create_database::<Bytes, Bytes>(wtxn, Some("entries"))?,
                dbo.create_database::<Bytes, Bytes>(wtxn, Some("inputs"))?,
                dbo.create_database::<Bytes, Bytes>(wtxn, Some("resumable_by_owner"))?,
                dbo.create_database::<Bytes, Bytes>(wtxn, Some("resumable_any"))?,
            );
            Ok(CommitOrAbort::<_, ()>::Commit(dbs))
        })?
        .unwrap_commit();
    Ok(Dbs {
        meta,
        sessions,
        states,
        templates,
        entries,
        inputs,
        by_owner,
        any,
    })
}

/// What the `sessions` database stores per session: everything but the turn state, template
/// and entries, which live in their own databases so a commit rewrites only this small header,
/// the state and the new entries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Header {
    pub(crate) epoch: Epoch,
    pub(crate) seq: Seq,
    pub(crate) owner: Option<NodeId>,
    pub(crate) status: SessionStatus,
    pub(crate) resume_policy: ResumePolicy,
    pub(crate) has_template: bool,
    /// Whether the session is in the resumable indexes (kept here so activate and terminate can
    /// update the indexes without decoding the turn state).
    pub(crate) resumable: bool,
    pub(crate) created_at_ms: u64,
    pub(crate) updated_at_ms: u64,
}

impl Header {
    pub(crate) fn encode(&self) -> Result<Vec<u8>> {
        codec::encode(BlobKind::Other, self)
    }

    pub(crate) fn decode(bytes: &[u8], id: &SessionId) -> Result<Self> {
        codec::decode(BlobKind::Other, bytes, Some(id)).map_err(|e| match e {
            Error::Corrupt {
                session, reason, ..
            } => Error::Corrupt {
                session,
                what: "session header".into(),
                reason,
            },
            Error::UnsupportedVersion {
                session,
                found,
                supported,
                ..
            } => Error::UnsupportedVersion {
                session,
                what: "session header".into(),
                found,
                supported,
            },
            other => other,
        })
    }
}

/// Reads the full record of `id` within `txn`; `Ok(None)` if it does not exist.
pub(crate) fn read_record(
    txn: &RoTxn<'_, WithoutTls>,
    dbs: &Dbs,
    id: &SessionId,
    path: &Path,
) -> Result<Option<(Header, SessionRecord)>> {
    let map = |e| from_heed(e, path, Some(id));
    let key = keys::session(id);
    let Some(h) = dbs.sessions.get(txn, key).map_err(map)? else {
        return Ok(None);
    };
    let header = Header::decode(h, id)?;
    let state_bytes = dbs.states.get(txn, key).map_err(map)?.ok_or_else(|| {
        Error::corrupt(Some(id), "turn state", "missing from the states database")
    })?;
    let state: TurnState = codec::decode(BlobKind::TurnState, state_bytes, Some(id))?;
    let template = if header.has_template {
        let bytes = dbs.templates.get(txn, key).map_err(map)?.ok_or_else(|| {
            Error::corrupt(Some(id), "template", "missing from the templates database")
        })?;
        Some(codec::decode::<ConfigTemplate>(
            BlobKind::Template,
            bytes,
            Some(id),
        )?)
    } else {
        None
    };
    let record = SessionRecord {
        id: id.clone(),
        epoch: header.epoch,
        seq: header.seq,
        owner: header.owner.clone(),
        status: header.status,
        resume_policy: header.resume_policy,
        template,
        state,
        created_at_ms: header.created_at_ms,
        updated_at_ms: header.updated_at_ms,
    };
    Ok(Some((header, record)))
}
