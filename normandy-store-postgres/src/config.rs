//! [`PgStoreConfig`]: where the store connects and how it batches commits.

use std::fmt;
use std::time::Duration;

use normandy_core::{Error, Result};
use sqlx::postgres::PgConnectOptions;

use crate::schema::SchemaLevel;

/// How to open a [`PgStore`](crate::PgStore).
///
/// Built from a URL (`postgres://user@host/db`) or from sqlx connect options. The password, if
/// any, stays inside the connect options: `Debug` never prints it, and no error repeats it.
#[derive(Clone)]
pub struct PgStoreConfig {
    pub(crate) connect: PgConnectOptions,
    pub(crate) max_connections: u32,
    pub(crate) acquire_timeout: Duration,
    pub(crate) schema: Option<String>,
    pub(crate) application_name: Option<String>,
    pub(crate) max_batch: usize,
    pub(crate) max_batch_bytes: usize,
    pub(crate) writers: usize,
    pub(crate) stall_after: Duration,
    pub(crate) queue_depth: usize,
    pub(crate) require_schema: SchemaLevel,
    pub(crate) migrate_on_open: bool,
    pub(crate) timeouts: ServerTimeouts,
}

/// Timeouts the server enforces on every connection of the store (`statement_timeout`,
/// `lock_timeout`, `idle_in_transaction_session_timeout`), so that no call waits without end on
/// a stuck statement, a row lock held by a paused or partitioned node, or a transaction its
/// client walked away from. A call cut short is a retryable error and wrote nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerTimeouts {
    /// Longest one statement may run (default 30 s).
    pub statement: Duration,
    /// Longest one statement may wait for a lock (default 5 s).
    pub lock: Duration,
    /// Longest a connection may sit idle inside a transaction before the server ends it and
    /// releases its locks (default 10 s).
    pub idle_in_transaction: Duration,
}

impl Default for ServerTimeouts {
    fn default() -> Self {
        Self {
            statement: Duration::from_secs(30),
            lock: Duration::from_secs(5),
            idle_in_transaction: Duration::from_secs(10),
        }
    }
}

impl fmt::Debug for PgStoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hand-written so the connect options (and their password) are never printed.
        f.debug_struct("PgStoreConfig")
            .field("host", &self.connect.get_host())
            .field("port", &self.connect.get_port())
            .field("database", &self.connect.get_database())
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .field("max_batch", &self.max_batch)
            .field("writers", &self.writers)
            .field("stall_after", &self.stall_after)
            .field("require_schema", &self.require_schema)
            .field("migrate_on_open", &self.migrate_on_open)
            .field("timeouts", &self.timeouts)
            .finish_non_exhaustive()
    }
}

impl PgStoreConfig {
    /// A config for the database at `url`, with defaults: 16 connections, 5 s acquire timeout,
    /// group commit of up to 256 commits (12 KiB) per statement, one statement in flight unless
    /// it stalls, and the base migration required.
    pub fn new(url: &str) -> Result<Self> {
        let connect: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| {
            // sqlx's parse errors describe the URL's shape, not its contents, so no password leaks.
            Error::Config(format!("invalid Postgres URL: {e}"))
        })?;
        Ok(Self::from_options(connect))
    }

    /// A config from sqlx connect options (TLS, sockets, passwords from files, ...).
    pub fn from_options(connect: PgConnectOptions) -> Self {
        Self {
            connect,
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
            schema: None,
            application_name: None,
            max_batch: 256,
            max_batch_bytes: 12 * 1024,
            writers: 4,
            stall_after: Duration::from_millis(20),
            queue_depth: 4096,
            require_schema: SchemaLevel::Base,
            migrate_on_open: false,
            timeouts: ServerTimeouts::default(),
        }
    }

    /// The server-side timeouts of the store's connections (see [`ServerTimeouts`]). A zero
    /// duration is sent as 1 ms: Postgres reads 0 as "no limit", which this setting is against.
    pub fn server_timeouts(mut self, timeouts: ServerTimeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Size of the connection pool (at least 1). Commit writes draw from it too.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long an operation waits for a pooled connection before failing with a retryable
    /// `Unavailable`.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// Puts the store's tables in `schema` (set as the connections' `search_path`) instead of
    /// the server's default. The schema must exist; a name is lowercase letters, digits and `_`.
    pub fn schema(mut self, schema: impl Into<String>) -> Result<Self> {
        let schema = schema.into();
        let valid = !schema.is_empty()
            && schema.len() <= 63
            && !schema.starts_with(|c: char| c.is_ascii_digit())
            && schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(Error::Config(format!(
                "invalid Postgres schema name {schema:?}: use 1-63 lowercase letters, digits and '_', not starting with a digit"
            )));
        }
        self.schema = Some(schema);
        Ok(self)
    }

    /// The `application_name` the store's connections report in `pg_stat_activity`
    /// (default `normandy`).
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = Some(name.into());
        self
    }

    /// Most commits of different sessions written by one statement (at least 1; 1 turns group
    /// commit off).
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.max(1);
        self
    }

    /// About the most parameter bytes one group statement carries (default 12 KiB; a single
    /// larger commit still goes, alone). Kept under the socket's initial 16 KiB send buffer: sqlx
    /// 0.9.0 does not set `TCP_NODELAY`, and a message written in parts waits ~40 ms for a
    /// delayed ACK (transact-rs/sqlx#4335). Raise it on Unix sockets or once sqlx sets the flag.
    pub fn max_batch_bytes(mut self, n: usize) -> Self {
        self.max_batch_bytes = n.max(1);
        self
    }

    /// Most commit batches written at once (at least 1, default 4). One is written at a time
    /// while writes are quick, so each batch takes everything queued meanwhile; the others open
    /// only when the write in flight has taken longer than [`stall_after`](Self::stall_after),
    /// so one stalled batch (a row lock held elsewhere) cannot hold up every session.
    pub fn writers(mut self, n: usize) -> Self {
        self.writers = n.max(1);
        self
    }

    /// How long a commit write may run before the next batch is written beside it
    /// (default 20 ms; see [`writers`](Self::writers)).
    pub fn stall_after(mut self, d: Duration) -> Self {
        self.stall_after = d;
        self
    }

    /// Commits that may wait to be gathered before `commit` itself waits (at least 1).
    pub fn queue_depth(mut self, n: usize) -> Self {
        self.queue_depth = n.max(1);
        self
    }

    /// The oldest schema the store agrees to open (default [`SchemaLevel::Base`], so a tier-1
    /// deployment may apply only the base migration). Opening an older database fails with
    /// `MissingMigration` naming the first missing migration.
    pub fn require_schema(mut self, level: SchemaLevel) -> Self {
        self.require_schema = level;
        self
    }

    /// Applies pending migrations (through [`migrator`](crate::migrator)) when the store opens.
    /// Off by default: schema changes are usually an operator's deliberate step.
    pub fn migrate_on_open(mut self, yes: bool) -> Self {
        self.migrate_on_open = yes;
        self
    }
}
