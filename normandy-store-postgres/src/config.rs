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
    pub(crate) pooler: PoolerMode,
}

/// What sits between the store and Postgres, when something does: how the store must talk so
/// that every operation is right on whichever server connection the pooler hands it.
///
/// Set with [`PgStoreConfig::pooler`] or the URL option `pooler=transaction` (which the store
/// reads and removes before the URL reaches the driver).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PoolerMode {
    /// Postgres directly, or a pooler in *session* mode (a server connection belongs to one
    /// client connection for its whole life). The fastest path: statements are prepared once
    /// per connection and cached, and settings travel as startup parameters. URL: `pooler=none`
    /// or `pooler=session`.
    #[default]
    None,
    /// A *transaction*-pooling pooler (PgBouncer `pool_mode = transaction`, RDS Proxy,
    /// Supavisor's transaction port): consecutive transactions of one client connection may run
    /// on different server connections, and startup parameters may be dropped. The store then
    /// keeps no session state on the server: statements are unnamed (never `sqlx_s_N`), every
    /// operation is one explicit transaction that sets its own `search_path` and timeouts with
    /// `SET LOCAL` (sqlx parses and binds an unnamed statement in two round trips, which only a
    /// transaction keeps on one server connection), no session advisory lock is taken (the
    /// migrations lock with `pg_advisory_xact_lock`), and nothing listens for notifications.
    /// Each operation costs two more round trips than [`None`](Self::None). URL:
    /// `pooler=transaction`.
    Transaction,
}

impl std::str::FromStr for PoolerMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" | "session" => Ok(Self::None),
            "transaction" => Ok(Self::Transaction),
            other => Err(Error::Config(format!(
                "invalid pooler mode {other:?}: use `transaction` (PgBouncer pool_mode = transaction, \
                 RDS Proxy, Supavisor), or `none` / `session`"
            ))),
        }
    }
}

/// Takes the `pooler=` option out of a URL's query string: sqlx would only warn about it and
/// drop it. Returns the URL without it and the mode it named, if any.
fn split_pooler(url: &str) -> Result<(String, Option<PoolerMode>)> {
    let Some((base, rest)) = url.split_once('?') else {
        return Ok((url.to_string(), None));
    };
    let (query, fragment) = match rest.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (rest, None),
    };
    let mut mode = None;
    let mut kept = Vec::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("pooler", value)) => mode = Some(value.parse()?),
            _ if pair == "pooler" => {
                return Err(Error::Config(
                    "the Postgres URL option `pooler` needs a value: pooler=transaction".into(),
                ));
            }
            _ => kept.push(pair),
        }
    }
    let mut out = base.to_string();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    Ok((out, mode))
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
            .field("pooler", &self.pooler)
            .finish_non_exhaustive()
    }
}

impl PgStoreConfig {
    /// A config for the database at `url`, with defaults: 16 connections, 5 s acquire timeout,
    /// group commit of up to 256 commits (12 KiB) per statement, one statement in flight unless
    /// it stalls, and the base migration required.
    ///
    /// Besides sqlx's options, the URL may carry `pooler=transaction` for a transaction-pooling
    /// pooler (see [`PoolerMode`]): `postgres://app@pgbouncer:6432/app?pooler=transaction`.
    pub fn new(url: &str) -> Result<Self> {
        let (url, pooler) = split_pooler(url)?;
        let connect: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| {
            // sqlx's parse errors describe the URL's shape, not its contents, so no password leaks.
            Error::Config(format!("invalid Postgres URL: {e}"))
        })?;
        Ok(Self::from_options(connect).pooler(pooler.unwrap_or_default()))
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
            pooler: PoolerMode::None,
        }
    }

    /// How the store talks through a connection pooler (default [`PoolerMode::None`]); use
    /// [`PoolerMode::Transaction`] behind PgBouncer in transaction mode, RDS Proxy or
    /// Supavisor. Also read from the URL option `pooler=transaction` by [`new`](Self::new).
    pub fn pooler(mut self, mode: PoolerMode) -> Self {
        self.pooler = mode;
        self
    }

    /// The pooler mode this config talks in.
    pub fn pooler_mode(&self) -> PoolerMode {
        self.pooler
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooler_option_is_read_and_removed_from_the_url() {
        let (url, mode) = split_pooler("postgres://u:pw@h:6432/db?pooler=transaction").unwrap();
        assert_eq!(url, "postgres://u:pw@h:6432/db");
        assert_eq!(mode, Some(PoolerMode::Transaction));
        let (url, mode) =
            split_pooler("postgres://h/db?sslmode=disable&pooler=session&application_name=x")
                .unwrap();
        assert_eq!(url, "postgres://h/db?sslmode=disable&application_name=x");
        assert_eq!(mode, Some(PoolerMode::None));
        let (url, mode) = split_pooler("postgres://h/db?sslmode=disable").unwrap();
        assert_eq!(url, "postgres://h/db?sslmode=disable");
        assert_eq!(mode, None);
        assert_eq!(split_pooler("postgres://h/db").unwrap().1, None);
    }

    #[test]
    fn bad_pooler_option_is_a_config_error_without_the_password() {
        for url in [
            "postgres://u:secret@h/db?pooler=statement",
            "postgres://u:secret@h/db?pooler",
        ] {
            let err = PgStoreConfig::new(url).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{err}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
        let config = PgStoreConfig::new("postgres://h/db?pooler=transaction").unwrap();
        assert_eq!(config.pooler_mode(), PoolerMode::Transaction);
        assert!(format!("{config:?}").contains("Transaction"));
    }
}
