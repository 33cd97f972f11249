//! [`PgRegistryConfig`]: where the registry and the membership connect, in which schema, and
//! whether a transaction-pooling pooler sits in between.

use std::fmt;
use std::time::Duration;

use normandy_core::{Error, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::error::map_sqlx;
use crate::lease::Db;

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
    ///
    /// The URL may carry `pooler=transaction` (or `none` / `session`), the store's option for a
    /// transaction-pooling pooler, so one URL configures both: it is taken out before the URL
    /// reaches the driver and sets [`transaction_pooler`](Self::transaction_pooler).
    pub fn new(url: &str) -> Result<Self> {
        let (url, pooled) = split_pooler(url)?;
        let connect: PgConnectOptions = url.parse().map_err(|e: sqlx::Error| {
            // sqlx's parse errors describe the URL's shape, not its contents: no password leaks.
            Error::Config(format!("invalid Postgres URL for the registry: {e}"))
        })?;
        Ok(Self::from_options(connect).transaction_pooler(pooled.unwrap_or(false)))
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

    /// Opens the pool this config describes and checks (or applies) the schema.
    ///
    /// Straight to Postgres, the schema and the server timeouts go in the startup packet, so
    /// no `SET` is ever sent. Behind a transaction pooler (which may drop startup parameters
    /// and switches server connections between transactions), every operation opens its own
    /// transaction with `BEGIN; SET LOCAL …` instead, in one round trip.
    pub(crate) async fn open(&self) -> Result<Db> {
        let db = self.open_unchecked().await?;
        crate::schema::check(&db, self.migrate_on_open).await?;
        Ok(db)
    }

    /// Opens the pool without looking at the schema.
    pub(crate) async fn open_unchecked(&self) -> Result<Db> {
        let ms = |d: Duration| d.as_millis().max(1).to_string();
        let timeouts = [
            ("statement_timeout", ms(self.statement_timeout)),
            ("lock_timeout", ms(self.statement_timeout)),
            (
                "idle_in_transaction_session_timeout",
                ms(self.statement_timeout * 5),
            ),
        ];
        let mut options = self
            .connect
            .clone()
            .application_name(&self.application_name);
        let begin = if self.transaction_pooler {
            // Schema names are checked to be [a-z0-9_] (`schema`): safe to splice.
            let mut sql = String::from("BEGIN");
            if let Some(schema) = &self.schema {
                sql.push_str(&format!("; SET LOCAL search_path TO {schema}"));
            }
            for (name, value) in &timeouts {
                sql.push_str(&format!("; SET LOCAL {name} = {value}"));
            }
            options = options.extra_float_digits(None);
            Some(sql)
        } else {
            let mut params: Vec<(&str, String)> = timeouts.to_vec();
            if let Some(schema) = &self.schema {
                params.push(("search_path", schema.clone()));
            }
            options = options.options(params);
            None
        };
        let pool = PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
            .connect_with(options)
            .await
            .map_err(map_sqlx)?;
        Ok(Db::new(pool, begin))
    }
}

/// Takes the `pooler=` option out of a URL's query string. Returns the URL without it and
/// whether it named a transaction pooler, if it was there.
fn split_pooler(url: &str) -> Result<(String, Option<bool>)> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), None));
    };
    let mut pooled = None;
    let mut kept = Vec::new();
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("pooler", "transaction")) => pooled = Some(true),
            Some(("pooler", "none" | "session")) => pooled = Some(false),
            Some(("pooler", other)) => {
                return Err(Error::Config(format!(
                    "invalid pooler mode {other:?} in the registry URL: use `transaction` \
                     (PgBouncer pool_mode = transaction), or `none` / `session`"
                )));
            }
            _ => kept.push(pair),
        }
    }
    let mut out = base.to_string();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    Ok((out, pooled))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pooler_option_is_taken_out_of_the_url() {
        let c = PgRegistryConfig::new("postgres://u@h:6432/db?pooler=transaction&sslmode=disable")
            .unwrap();
        assert!(c.is_transaction_pooled());
        let c = PgRegistryConfig::new("postgres://u@h/db?pooler=session").unwrap();
        assert!(!c.is_transaction_pooled());
        assert!(
            !PgRegistryConfig::new("postgres://u@h/db")
                .unwrap()
                .is_transaction_pooled()
        );
        let e = PgRegistryConfig::new("postgres://u@h/db?pooler=statement").unwrap_err();
        assert!(e.to_string().contains("statement"), "{e}");
        let (url, _) = split_pooler("postgres://u@h/db?a=1&pooler=transaction&b=2").unwrap();
        assert_eq!(url, "postgres://u@h/db?a=1&b=2");
    }
}
