//! The connection pool: how the store's connections are made (pool size, acquire timeout,
//! `search_path`, `application_name`).

use normandy_core::Result;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::config::PgStoreConfig;
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

/// The connect options with the schema and application name applied.
fn connect_options(config: &PgStoreConfig) -> PgConnectOptions {
    let mut opts = config
        .connect
        .clone()
        .application_name(config.application_name.as_deref().unwrap_or("normandy"));
    if let Some(schema) = &config.schema {
        opts = opts.options([("search_path", schema.as_str())]);
    }
    opts
}
