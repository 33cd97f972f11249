//! [`PgRegistryConfig`]: where the registry and the membership connect, in which schema, and
//! whether a transaction-pooling pooler sits in between.

use std::fmt;
use std::time::Duration;

use normandy_core::{Error, Result};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::error::map_sqlx;

/// How to open a [`PgRegistry`](crate::PgRegistry) or a [`PgMembership`](crate::PgMembership).
///
/// ```
/// use std::time::Duration;
/// use normandy_registry_postgres::PgRegistryConfig;
///
/// let config = PgRegistryConfig::new("postgres://app@db.internal/app")
///     .unwrap()
///     .schema("agents")
///     .unwrap()
///     .transaction_pooler(true) // behind PgBouncer in transaction mode
///     .statement_timeout(Duration::from_secs(1));
/// assert!(config.is_transaction_pooled());
/// ```
///
/// The password, if any, stays inside the connect options: `Debug` never prints it.
#[derive(Clone)]
pub struct PgRegistryConfig {
    pub(crate) connect: PgConnectOptions,
    pub(crate) schema: Option<String>,
    pub(crate) max_connections: u32,
    pub(crate) acquire_timeout: Duration,
    pub(crate) statement_timeout: Duration,
    pub(crate) transaction_pooler: bool,
    pub(crate) migrate_on_open: bool,
    pub(crate) application_name: String,
}

impl fmt::Debug for PgRegistryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hand-written so the connect options (and their password) are never printed.
        f.debug_struct("PgRegistryConfig")
            .field("host", &self.connect.get_host())
            .field("port", &self.connect.get_port())
            .field("database", &self.connect.get_database())
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .field("statement_timeout", &self.statement_timeout)
            .field("transaction_pooler", &self.transaction_pooler)
            .finish_non_exhaustive()
    }
}

impl PgRegistryConfig {
    /// A config for the database at `url`: 4 connections, 2 s to get one, statements cut at
    /// 2 s by the server, named prepared statements on (no pooler), no migration on open.
    pub fn new(url: &str) -> Result<Self> {
        let connect: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| {
            // sqlx's parse errors describe the URL's shape, not its contents: no password leaks.
            Error::Config(format!("invalid Postgres URL for the registry: {e}"))
        })?;
        Ok(Self::from_options(connect))
    }

    /// A config from sqlx connect options (TLS, sockets, passwords from files, ...).
    pub fn from_options(connect: PgConnectOptions) -> Self {
        Self {
            connect,
            schema: None,
            max_connections: 4,
            acquire_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(2),
            transaction_pooler: false,
            migrate_on_open: false,
            application_name: "normandy-registry".into(),
        }
    }

    /// Puts the tables in `schema` (the connections' `search_path`), as
    /// `PgStoreConfig::schema` does for the store. A name is 1-63 lowercase letters, digits
    /// and `_`, not starting with a digit.
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
                "invalid Postgres schema name {schema:?}: use 1-63 lowercase letters, digits \
                 and '_', not starting with a digit"
            )));
        }
        self.schema = Some(schema);
        Ok(self)
    }

    /// Size of the connection pool (at least 1; default 4).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long a call waits for a pooled connection before a retryable `Unavailable`.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// The server's `statement_timeout` and `lock_timeout` on these connections (default 2 s):
    /// a lease refresh or a placement that waits longer fails instead of hanging, so a node
    /// can stop serving before its lease lapses.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// Whether a transaction-pooling pooler (PgBouncer `pool_mode = transaction`) sits between
    /// the nodes and Postgres (default false). When true, every statement is sent unnamed
    /// (sqlx `persistent(false)`), so no named prepared statement outlives its transaction on a
    /// server connection another client gets next. The registry never relies on session state
    /// either way: no session advisory lock, no session `SET`, no `LISTEN`.
    pub fn transaction_pooler(mut self, yes: bool) -> Self {
        self.transaction_pooler = yes;
        self
    }

    /// Whether statements are sent unnamed (see [`transaction_pooler`](Self::transaction_pooler)).
    pub fn is_transaction_pooled(&self) -> bool {
        self.transaction_pooler
    }

    /// Applies the registry's migrations ([`migrator`](crate::migrator)) when it connects.
    /// Off by default: schema changes are usually an operator's deliberate step.
    pub fn migrate_on_open(mut self, yes: bool) -> Self {
        self.migrate_on_open = yes;
        self
    }

    /// The `application_name` the connections report (default `normandy-registry`).
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = name.into();
        self
    }

    /// Opens the pool this config describes. The schema, the application name and the server
    /// timeouts go in the startup packet, so no `SET` is ever sent.
    pub(crate) async fn pool(&self) -> Result<PgPool> {
        let ms = |d: Duration| d.as_millis().max(1).to_string();
        let mut params = vec![
            ("statement_timeout", ms(self.statement_timeout)),
            ("lock_timeout", ms(self.statement_timeout)),
            (
                "idle_in_transaction_session_timeout",
                ms(self.statement_timeout * 5),
            ),
        ];
        if let Some(schema) = &self.schema {
            params.push(("search_path", schema.clone()));
        }
        let options = self
            .connect
            .clone()
            .application_name(&self.application_name)
            .options(params);
        let pool = PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
            .connect_with(options)
            .await
            .map_err(map_sqlx)?;
        crate::schema::check(&pool, self.migrate_on_open, self.transaction_pooler).await?;
        Ok(pool)
    }
}
