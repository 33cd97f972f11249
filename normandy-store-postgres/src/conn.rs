//! The connection pool, and how one store operation gets a connection: how the store's
//! connections are made (pool size, acquire timeout, `search_path`, `application_name`,
//! server-side timeouts), directly or through a transaction-pooling pooler.

use normandy_core::Result;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Postgres, SqlSafeStr, SqlStr, Transaction};

use crate::config::{PgStoreConfig, PoolerMode};
use crate::error::map_sqlx;

/// Opens the pool `config` describes; a server that cannot be reached is a retryable
/// `Unavailable`.
pub(crate) async fn connect(config: &PgStoreConfig) -> Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.acquire_timeout)
        .connect_with(connect_options(config))
        .await
        .map_err(map_sqlx)
}

/// The connect options with the schema, application name and server-side timeouts applied.
///
/// Directly, these are startup parameters: every connection of the pool has them from its first
/// statement. Through a transaction pooler a startup parameter is refused or silently dropped
/// (PgBouncer's `ignore_startup_parameters`), so none is sent: [`Db::begin_sql`] sets them in
/// every transaction instead. `extra_float_digits` is left out too (no float is read as text),
/// so a pooler need not be told to ignore it.
fn connect_options(config: &PgStoreConfig) -> PgConnectOptions {
    let options = config
        .connect
        .clone()
        .application_name(config.application_name.as_deref().unwrap_or("normandy"));
    match config.pooler {
        PoolerMode::None => options.options(settings(config)),
        PoolerMode::Transaction => options.extra_float_digits(None),
    }
}

/// The session settings every statement of the store runs under, as (name, value).
fn settings(config: &PgStoreConfig) -> Vec<(&'static str, String)> {
    let ms = |d: std::time::Duration| d.as_millis().max(1).to_string();
    let t = config.timeouts;
    let mut params = vec![
        ("statement_timeout", ms(t.statement)),
        ("lock_timeout", ms(t.lock)),
        (
            "idle_in_transaction_session_timeout",
            ms(t.idle_in_transaction),
        ),
    ];
    if let Some(schema) = &config.schema {
        params.push(("search_path", schema.clone()));
    }
    params
}

/// The pool and how an operation runs on it.
pub(crate) struct Db {
    pub(crate) pool: PgPool,
    /// Through a transaction pooler: the statement that opens every operation's transaction
    /// (`BEGIN` and a `SET LOCAL` per setting, one simple-query round trip). `None` directly.
    begin: Option<SqlStr>,
}

impl Db {
    pub(crate) fn new(pool: PgPool, config: &PgStoreConfig) -> Self {
        let begin = match config.pooler {
            PoolerMode::None => None,
            PoolerMode::Transaction => Some(Self::begin_sql(config)),
        };
        Self { pool, begin }
    }

    /// `BEGIN; SET LOCAL name = 'value'; ...` for `config`'s settings. Safe to splice: the
    /// values are digits and a schema name [`PgStoreConfig::schema`] validated as lowercase
    /// letters, digits and `_`.
    fn begin_sql(config: &PgStoreConfig) -> SqlStr {
        let mut sql = String::from("BEGIN");
        for (name, value) in settings(config) {
            sql.push_str(&format!("; SET LOCAL {name} = '{value}'"));
        }
        AssertSqlSafe(sql).into_sql_str()
    }

    /// Whether statements may be prepared once per connection and cached (sqlx's named
    /// statements): never through a transaction pooler, where the next transaction may run on
    /// a server connection that lacks them (or has another client's under the same name).
    pub(crate) fn persistent(&self) -> bool {
        self.begin.is_none()
    }

    /// A connection for one operation: a pooled connection directly, a transaction with the
    /// settings applied through a pooler. End it with [`Op::finish`].
    pub(crate) async fn op(&self) -> std::result::Result<Op, sqlx::Error> {
        Ok(match &self.begin {
            None => Op::Direct(self.pool.acquire().await?),
            Some(begin) => Op::Tx(self.pool.begin_with(begin.clone()).await?),
        })
    }

    /// A transaction, with the settings applied through a pooler.
    pub(crate) async fn begin(
        &self,
    ) -> std::result::Result<Transaction<'static, Postgres>, sqlx::Error> {
        match &self.begin {
            None => self.pool.begin().await,
            Some(begin) => self.pool.begin_with(begin.clone()).await,
        }
    }
}

/// The connection one operation runs its statements on.
pub(crate) enum Op {
    Direct(PoolConnection<Postgres>),
    Tx(Transaction<'static, Postgres>),
}

impl Op {
    pub(crate) fn conn(&mut self) -> &mut PgConnection {
        match self {
            Op::Direct(c) => c,
            Op::Tx(t) => t,
        }
    }

    /// Ends the operation: commits its transaction through a pooler (an error here leaves the
    /// outcome unknown, like a connection lost mid-statement), returns the connection directly.
    pub(crate) async fn finish(self) -> std::result::Result<(), sqlx::Error> {
        match self {
            Op::Direct(_) => Ok(()),
            Op::Tx(t) => t.commit().await,
        }
    }
}
