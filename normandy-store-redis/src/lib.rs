//! A Normandy [`SessionStore`](normandy_core::SessionStore) on Redis: each session is a Stream of
//! entries plus a state hash, and every write is one Lua script, so a commit is atomic, fenced
//! by the session's epoch, and idempotent on input ids.
//!
//! # Layout
//! - [`config`]: [`RedisStoreConfig`] — URL or client, key prefix, `WAIT` policy, timeouts.
//! - `error`: the one function that maps Redis errors (and our scripts' codes) to
//!   [`normandy_core::Error`].
//! - `conn`: the shared multiplexed connection, the pool of dedicated `WAIT` connections, and
//!   sending a script on either.
//! - `schema`: the key layout — a session's keys under one hash tag, the resumable index sets.
//! - `scripts`: the Lua scripts (create, activate, commit_many, confirm, mark_terminal, delete)
//!   and the reading of a commit script's reply.
//! - `record`: a session's state hash to a [`SessionRecord`](normandy_core::SessionRecord).
//! - [`store`]: [`RedisStore`] — creation, activation, the commit path, reads, the resumable
//!   index.
//! - `group`: group commit — concurrent commits of different sessions share one script call
//!   (and one `WAIT`), each keeping its own outcome; a lone commit goes out at once.
//! - `index`: reading the resumable index (one server's sets, or every slot's bucket).
//! - `unacked`: commits whose fate this process does not know, confirmed when retried.
//! - `raw`: test support below the store contract — raw bytes, overwriting blobs, purging a
//!   prefix.
//!
//! # A commit
//! [`CommitBatch::validate`](normandy_core::CommitBatch::validate) runs first; then one
//! `EVALSHA` checks, in the reference store's order, `NotFound` → `SessionClosed` → `Fenced` →
//! `DuplicateInput` → `Conflict`, and only then appends the entries (`XADD` with stream id
//! `0-<seq>`) and writes the turn state and the resumable index. (Input ids are checked and
//! recorded in one `HSETNX` each, and taken back if a later check fails.) Redis runs a script
//! without interleaving any other command, so nobody sees a half-done commit, and a reader never
//! sees entries without their state.
//!
//! Redis does not roll a script back when a command fails midway, so before its first write
//! every script checks the type of each key it will write (`TYPE`: the state hash, the stream,
//! the inputs hash, the index sets). A key that something else wrote under the store's prefix
//! fails the call with a terminal [`Error::Corrupt`](normandy_core::Error::Corrupt) naming the
//! key, what it holds and what it should be — and nothing is written, so once the key is moved
//! away the same commit (same input id) applies. Reads that meet such a key say the same.
//!
//! Commits of different sessions that arrive while earlier ones are in flight are grouped into
//! one script call (group commit, with one `WAIT` for the group); each commit is still checked
//! and applied on its own and gets its own outcome. A lone commit is sent at once, unbatched.
//!
//! # Durability: what each setting actually gives
//! Be honest with yourself about which rung you are on:
//!
//! 1. **No `WAIT`, no AOF** (Redis defaults: RDB snapshots): a crash of the Redis server loses
//!    every write since the last snapshot — minutes of sessions. A failover to a replica loses
//!    whatever the replica had not received yet. Fine for development and for sessions you can
//!    afford to lose.
//! 2. **AOF with `appendfsync everysec`, no `WAIT`**: a server crash loses up to about one second
//!    of acknowledged commits; a failover still loses what was not replicated.
//! 3. **`WAIT n` ([`RedisStoreConfig::wait`]) plus AOF on primary and replicas**: a commit is
//!    reported only after `n` replicas have it in memory, so losing the primary alone does not
//!    lose an acknowledged commit, provided failover promotes one of those replicas (Sentinel
//!    prefers the most up to date one, which usually — not provably — holds it). This is
//!    *durable, not bulletproof*: `WAIT` is not consensus; replicas acknowledge receipt, not an
//!    fsync; a simultaneous crash of the primary and the acknowledging replicas before their AOF
//!    reached disk still loses the commit. If you need a quorum log, use the Postgres store.
//!
//! With `WAIT` the store **fails closed**: a commit that fewer than `n` replicas acknowledge
//! within the timeout returns the retryable `DurabilityNotMet`, and the engine treats that
//! boundary as *not committed* — a `send` whose input could not be made durable is not reported
//! done. The script did run on the primary, though, so the write may still surface (the primary
//! keeps it, and a replica that reconnects receives it). The engine retries the same batch; the
//! store remembers, per session, the last commit it could not confirm and answers that retry
//! with a *confirm* script (same epoch, same resulting seq and state → `Applied`, with a fresh
//! `WAIT`) rather than `DuplicateInput` or `Conflict`. The same happens after a connection error
//! that left a commit's fate unknown. If the retry comes from another process (a new owner), the
//! plain checks answer: an `Input` batch reports `DuplicateInput` and the stored input keeps its
//! original seq; any other batch is `Fenced` or `Conflict`, and the new owner reloads the session.
//!
//! With `WAIT`, `create`, `activate`, `mark_terminal` and `delete` wait too and fail closed
//! the same way: an activation that a failover could lose would hand the next owner an epoch
//! that the previous owner already holds. A duplicate input is reported only after the same
//! `WAIT` (the script writes, so the `WAIT` covers the stored original).
//!
//! `WAIT` commits use a small pool of dedicated connections (one commit per connection at a
//! time) instead of the shared multiplexed one: a `WAIT` blocks its connection, and after a
//! reconnect a multiplexed `WAIT` could count acknowledgements of an offset it never wrote.
//!
//! # Redis Cluster
//! The same code runs on a Redis Cluster (`redis+cluster://h1:p1,h2:p2`, see
//! [`normandy_redis::RedisTarget`]). Every key of one session carries the hash tag
//! `{<prefix>:<id>}`, so a session's keys live in one slot. On one server the resumable index is
//! `<prefix>:resumable:any` and `<prefix>:resumable:node:<owner>` (the layout of release 0.1,
//! unchanged); on a cluster it is one bucket per slot, in the slot of the sessions it lists,
//! passed to the scripts in `KEYS` (`schema.rs`), so each script stays in one slot and still
//! updates state and index atomically. Commits are batched into one script only on one server;
//! on a cluster each commit is its own script, pipelined per primary by the cluster
//! connection, and a `WAIT` rides in the same pipeline as its script, so it counts the replicas
//! of the primary that ran it. `MOVED`, `ASK` and `TRYAGAIN` (a slot migrating) are followed by
//! the cluster client; if one is still answered after its resends, the commit fails
//! `Unavailable` and the engine's retry confirms or re-sends it.
//!
//! # Example
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use normandy_store_redis::{RedisStore, RedisStoreConfig};
//!
//! # async fn run() -> normandy_core::Result<()> {
//! let config = RedisStoreConfig::new("redis://127.0.0.1:6379")?
//!     .prefix("myapp")
//!     .wait(1, Duration::from_millis(500));
//! let store: Arc<dyn normandy_core::SessionStore> = Arc::new(RedisStore::connect(config).await?);
//! # let _ = store;
//! # Ok(())
//! # }
//! ```

pub mod config;
mod conn;
mod error;
mod group;
mod index;
mod raw;
mod record;
mod schema;
mod scripts;
pub mod store;
mod unacked;

pub use config::{RedisStoreConfig, Wait};
pub use store::RedisStore;
