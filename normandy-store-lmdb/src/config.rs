//! [`LmdbConfig`]: where the environment lives, how large its map may grow, and how hard each
//! commit is pushed to disk.

use std::path::{Path, PathBuf};
use std::time::Duration;

use normandy_core::{Error, Result};

/// Default initial map size: 64 MiB (LMDB reserves address space, not disk, for it).
pub const DEFAULT_MAP_SIZE: usize = 64 << 20;
/// Default ceiling the map may grow to: 64 GiB on 64-bit targets, 1 GiB elsewhere.
pub const DEFAULT_MAX_MAP_SIZE: usize = if usize::BITS >= 64 { 64 << 30 } else { 1 << 30 };
/// Default number of commits (and other writes) the writer thread folds into one transaction.
pub const DEFAULT_MAX_BATCH: usize = 256;
/// Default group-commit linger: see [`LmdbConfig::linger`].
pub const DEFAULT_LINGER: Duration = Duration::from_micros(100);
/// Default size of LMDB's reader table: concurrent read transactions across all processes.
pub const DEFAULT_MAX_READERS: u32 = 512;

/// How hard a commit is pushed to disk before it is acknowledged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// `fsync` at every write transaction (LMDB's default): an acknowledged commit survives a
    /// power loss.
    #[default]
    Full,
    /// Skip the metadata `fsync` (`MDB_NOMETASYNC`): a power loss may undo the last transactions,
    /// never corrupt the environment; a process crash loses nothing.
    NoMetaSync,
    /// No `fsync` at all (`MDB_NOSYNC`): a process crash loses nothing (the OS holds the pages),
    /// a power loss may lose recent commits. For tests and scratch environments.
    NoSync,
}

/// How to open an [`LmdbStore`](crate::LmdbStore).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LmdbConfig {
    /// The environment's directory (created if missing). LMDB keeps `data.mdb` and `lock.mdb`
    /// in it; the directory must be on a local filesystem and writable.
    pub path: PathBuf,
    /// Initial map size in bytes, rounded up to the OS page size. An existing environment that
    /// is already larger keeps its size.
    pub map_size: usize,
    /// The largest the map may grow to when it fills up. A commit that would need more fails
    /// with an error naming this setting; nothing acknowledged is ever lost.
    pub max_map_size: usize,
    /// How hard each write transaction is pushed to disk.
    pub durability: Durability,
    /// Most writes folded into one write transaction by the group-commit thread.
    pub max_batch: usize,
    /// Group-commit linger. When the previous transaction carried writes of several callers,
    /// the writer keeps collecting writes before it starts the next one, for as long as each
    /// further write arrives within `linger` of the one before (and at most half the previous
    /// transaction's duration). Callers whose commits were just acknowledged can then join the
    /// next transaction instead of waiting a whole `fsync` for the one after. A lone writer
    /// never waits. `Duration::ZERO` disables it.
    pub linger: Duration,
    /// Size of LMDB's reader table (`MDB_maxreaders`), shared by every process that opens the
    /// environment; the first process to open it decides.
    pub max_readers: u32,
}

impl LmdbConfig {
    /// Defaults for an environment at `path`: 64 MiB map growing to 64 GiB, full `fsync`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            map_size: DEFAULT_MAP_SIZE,
            max_map_size: DEFAULT_MAX_MAP_SIZE,
            durability: Durability::Full,
            max_batch: DEFAULT_MAX_BATCH,
            linger: DEFAULT_LINGER,
            max_readers: DEFAULT_MAX_READERS,
        }
    }

    /// Sets [`map_size`](Self::map_size).
    pub fn map_size(mut self, bytes: usize) -> Self {
        self.map_size = bytes;
        self
    }

    /// Sets [`max_map_size`](Self::max_map_size).
    pub fn max_map_size(mut self, bytes: usize) -> Self {
        self.max_map_size = bytes;
        self
    }

    /// Sets [`durability`](Self::durability).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Sets [`max_batch`](Self::max_batch).
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n;
        self
    }

    /// Sets [`linger`](Self::linger).
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Sets [`max_readers`](Self::max_readers).
    pub fn max_readers(mut self, n: u32) -> Self {
        self.max_readers = n;
        self
    }

    /// The environment's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks the settings and rounds the sizes to whole pages.
    pub(crate) fn validated(&self, page: usize) -> Result<Self> {
        let mut c = self.clone();
        if c.path.as_os_str().is_empty() {
            return Err(Error::Config("LMDB path must not be empty".into()));
        }
        if c.path.as_os_str().as_encoded_bytes().contains(&0) {
            return Err(Error::Config(format!(
                "LMDB path {} contains a NUL byte",
                c.path.display()
            )));
        }
        if c.map_size == 0 {
            return Err(Error::Config("LMDB map_size must be greater than 0".into()));
        }
        if c.max_batch == 0 {
            return Err(Error::Config("LMDB max_batch must be at least 1".into()));
        }
        if c.max_readers == 0 {
            return Err(Error::Config("LMDB max_readers must be at least 1".into()));
        }
        c.map_size = round_up(c.map_size, page);
        c.max_map_size = round_down(c.max_map_size, page);
        if c.max_map_size < c.map_size {
            return Err(Error::Config(format!(
                "LMDB max_map_size ({} bytes) is smaller than map_size ({} bytes)",
                self.max_map_size, c.map_size
            )));
        }
        Ok(c)
    }
}

pub(crate) fn round_up(n: usize, page: usize) -> usize {
    n.div_ceil(page).saturating_mul(page)
}

pub(crate) fn round_down(n: usize, page: usize) -> usize {
    n / page * page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_rounds_and_rejects() {
        let c = LmdbConfig::new("/tmp/x").map_size(5000).max_map_size(9000);
        let v = c.validated(4096).unwrap();
        assert_eq!((v.map_size, v.max_map_size), (8192, 8192));
        let err = LmdbConfig::new("/tmp/x")
            .map_size(1 << 20)
            .max_map_size(4096)
            .validated(4096)
            .unwrap_err();
        assert!(err.to_string().contains("max_map_size"), "{err}");
        assert!(LmdbConfig::new("").validated(4096).is_err());
        assert!(LmdbConfig::new("/x").max_batch(0).validated(4096).is_err());
    }
}
