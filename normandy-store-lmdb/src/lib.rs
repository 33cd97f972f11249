//! Normandy's embedded durable session store: [`LmdbStore`], sessions in an LMDB environment on
//! local disk through [heed](https://docs.rs/heed). Tier 0d: one host, durable, no server.
//!
//! ```no_run
//! use normandy_store_lmdb::{LmdbConfig, LmdbStore};
//!
//! # fn main() -> normandy_core::Result<()> {
//! let store = LmdbStore::open(LmdbConfig::new("/var/lib/my-agents/sessions"))?;
//! # let _ = store;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! - [`config`]: [`LmdbConfig`] (path, map size and its ceiling, durability, batch size).
//! - `error`: the one function that maps heed/LMDB errors to [`normandy_core::Error`].
//! - `conn`: the environment (LMDB's counterpart of a connection pool): opening it, read
//!   transactions, growing the map when it is full.
//! - `schema`: the on-disk layout — named databases, key layout, format marker and its check.
//! - `record`: a session's stored form (the header blob) and reading it back as a
//!   [`SessionRecord`](normandy_core::SessionRecord).
//! - `store`: [`LmdbStore`], the [`SessionStore`](normandy_core::SessionStore) implementation:
//!   reads on tokio's blocking pool, writes through the group-commit thread.
//! - `group`: group commit — the one writer thread: writes queued together share one LMDB write
//!   transaction, each with its own checks and outcome.
//! - `raw`: test support below the store contract — raw bytes, overwriting blobs.
//! - `pages`: LMDB's on-disk format read with `pread` and bounds checks — the open-time check
//!   of the data file and the structural page walk of [`verify()`].
//! - [`mod@verify`]: walking every page of an environment in a child process
//!   (`normandy-lmdb-verify`, this crate's one binary).
//!
//! # On disk
//! Named databases `meta` (layout version), `sessions` (header blob), `states` (turn-state
//! blob), `templates`, `entries` (`id 0x00 seq` → entry blob), `inputs` (`id 0x00 input` → seq),
//! and the resumable indexes `resumable_by_owner` (`owner 0x00 id`) and `resumable_any` (`id`),
//! so `list_resumable` is a range read. Every blob is a versioned `normandy_core::codec` blob.
//!
//! # A damaged data file
//! LMDB reads its pages straight from the memory map and keeps no page checksums, so a damaged
//! `data.mdb` (a disk error, a bad copy, a file cut short) can kill the process that reads it —
//! `SIGBUS` past the end of a truncated file, `SIGSEGV` or an assertion abort on a page whose
//! header is wrong — rather than return an error. What this crate does about it:
//! - **At open** ([`LmdbStore::open`]), before LMDB maps the file, and in microseconds: both
//!   meta pages (header, magic, format version, page size, roots), the file's length against
//!   the newest meta's last page number (pages missing at the end must all be free pages:
//!   LMDB never writes a trailing page that was freed within its transaction), and the root
//!   page of every tree. A failure is a `Corrupt` error naming the file and the fix.
//! - **On demand** ([`verify()`]): every page of every tree, in a child process, so a page
//!   that would crash a reader fails the walk, not the caller. Run it after a crash, before
//!   trusting a restored copy, or from a health check.
//! - **Not caught**: a page whose header is whole but whose contents are wrong — a flipped
//!   bit inside a stored value (or in the middle of a value's overflow pages), a key changed
//!   in place. LMDB cannot tell; such a page reads as wrong data, or, if it is a node that
//!   LMDB follows, may crash a process between two verify runs. Flips inside stored values
//!   are caught by the codec's own blob checks (`normandy_core::codec`), which turn them into
//!   a `Corrupt` error naming the session.
//!
//! The fix for a damaged environment: restore it from a backup, or copy out what still reads
//! with LMDB's `mdb_copy -c <dir> <new dir>` (`-v` to copy the previous transaction's snapshot
//! instead, when the newest one is what is damaged), check the copy with
//! `normandy-lmdb-verify <new dir>`, and point the store at it.

pub mod config;
mod conn;
mod error;
mod group;
mod pages;
mod raw;
mod record;
mod schema;
mod store;
pub mod verify;

pub use config::{Durability, LmdbConfig};
pub use store::{LmdbStore, WriteStats};
pub use verify::{VerifyReport, verify};

/// The heed version this crate is built on, for callers (and benchmarks) that need raw LMDB
/// access with the same library.
pub use heed;
