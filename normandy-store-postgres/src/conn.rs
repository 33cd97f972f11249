//! The connection pool: how the store's connections are made (pool size, acquire timeout,
//! `search_path`, `application_name`, server-side timeouts).

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

/// The connect options with the schema, application name and server-side timeouts applied
/// (as startup parameters: every connection of the pool has them from its first statement).
fn connect_options(config: &PgStoreConfig) -> PgConnectOptions {
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
    config
        .connect
        .clone()
        .application_name(config.application_name.as_deref().unwrap_or("normandy"))
        .options(params)
}
