//! The environment, LMDB's counterpart of a connection pool: opening it, running read
//! transactions, and growing the memory map (or adopting the size another process grew it to).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use heed::{Env, EnvFlags, EnvOpenOptions, MdbError, RoTxn, WithoutTls};
use normandy_core::{Error, Result, SessionId};

use crate::config::{Durability, LmdbConfig, round_down};
use crate::error::from_heed;
use crate::pages::check_data_file;
use crate::schema::{Dbs, MAX_DBS, check_format, create_dbs};

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
    /// The exclusive lock on [`LOCK_FILE`], held while the environment is open: one process per
    /// environment. Released when this drops (or the process dies: the kernel drops the lock).
    _lock: File,
}

/// The file in the environment's directory that one process holds an exclusive lock on.
pub(crate) const LOCK_FILE: &str = "normandy.lock";

/// Takes the exclusive lock on `dir`'s [`LOCK_FILE`] and writes this process's id into it, or
/// fails naming the process that holds it.
///
/// Why one process: LMDB itself would let several processes share the environment, and
/// fencing would hold, but a second process then takes over the first one's sessions through
/// `subscribe` or `resume_interrupted(OwnerFilter::Any)` while they are live there. A lock the
/// kernel releases at process death keeps a crash from blocking the restart.
fn lock_environment(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    // The same mapping as LMDB's own I/O errors: a read-only directory says what access the
    // store needs.
    let io = |e: std::io::Error| from_heed(heed::Error::Io(e), dir, None);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0).map_err(io)?;
            file.rewind().map_err(io)?;
            write!(file, "{}", std::process::id()).map_err(io)?;
            file.flush().map_err(io)?;
            Ok(file)
        }
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() { "unknown" } else { holder };
            Err(Error::Config(format!(
                "LMDB environment {} is in use by process {holder} (it holds {}): one process \
                 per environment; stop that process, or give this one its own directory",
                dir.display(),
                path.display()
            )))
        }
        Err(TryLockError::Error(e)) => Err(io(e)),
    }
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
        let lock = lock_environment(&path)?;
        // Before LMDB maps the file: a truncated file would be read past its end (SIGBUS), a
        // damaged meta or root page followed blindly (SIGSEGV). See `pages`.
        check_data_file(&path)?;
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
            _lock: lock,
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
