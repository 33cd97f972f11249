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
//!
//! # On disk
//! Named databases `meta` (layout version), `sessions` (header blob), `states` (turn-state
//! blob), `templates`, `entries` (`id 0x00 seq` → entry blob), `inputs` (`id 0x00 input` → seq),
//! and the resumable indexes `resumable_by_owner` (`owner 0x00 id`) and `resumable_any` (`id`),
//! so `list_resumable` is a range read. Every blob is a versioned `normandy_core::codec` blob.

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
