//! [`HttpConfig`]: timeouts and the retry budget of an adapter's HTTP calls, and the one place
//! the HTTP client is built.

use std::sync::Mutex;
use std::time::Duration;

use normandy_core::{Error, Result};

/// Timeouts and retries of one adapter's HTTP calls. Builder-style:
///
/// ```
/// use std::time::Duration;
/// use normandy_llm::HttpConfig;
///
/// let http = HttpConfig::default()
///     .read_timeout(Duration::from_secs(300)) // a slow local model
///     .max_retries(4);
/// ```
///
/// There is no overall request timeout on purpose: a long generation streams for minutes, so a
/// deadline on the whole call would cut good answers. The turn engine bounds a model call
/// (`TurnLimits::model_call_timeout_ms`); these bound each wait inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// Longest wait for the TCP (and TLS) connection. Default 10 s.
    pub(crate) connect_timeout: Duration,
    /// Longest wait from sending the request until the response headers. Default 60 s: a
    /// provider under load may queue a request before it answers.
    pub(crate) first_byte_timeout: Duration,
    /// Longest gap between two chunks of a response body. Default 120 s: reasoning models may
    /// think for a long time between streamed events, but a connection silent for longer is dead.
    pub(crate) read_timeout: Duration,
    /// Retries of one call inside the adapter (overload, 5xx, a cut connection, a stream cut
    /// before its end). Default 2. Kept small: waiting out a long outage is the durable
    /// engine's job (it retries the step and survives a restart), not a blocked HTTP call's.
    pub(crate) max_retries: u32,
    /// First backoff between retries, doubled each time, with jitter. Default 500 ms.
    pub(crate) retry_base: Duration,
    /// Longest wait between retries, including what a provider asks for with `retry-after`.
    /// Default 30 s.
    pub(crate) max_retry_wait: Duration,
    /// The `User-Agent` header. Default `normandy-llm/<version>`.
    pub(crate) user_agent: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(60),
            read_timeout: Duration::from_secs(120),
            max_retries: 2,
            retry_base: Duration::from_millis(500),
            max_retry_wait: Duration::from_secs(30),
            user_agent: concat!("normandy-llm/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}

impl HttpConfig {
    /// Longest wait for the TCP (and TLS) connection (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Longest wait from sending the request until the response headers (default 60 s).
    pub fn first_byte_timeout(mut self, timeout: Duration) -> Self {
        self.first_byte_timeout = timeout;
        self
    }

    /// Longest gap between two chunks of the response body (default 120 s).
    pub fn read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = timeout;
        self
    }

    /// Retries of one call inside the adapter (default 2; 0 turns them off).
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// First backoff between retries, doubled each time, with jitter (default 500 ms).
    pub fn retry_base(mut self, base: Duration) -> Self {
        self.retry_base = base;
        self
    }

    /// Longest wait between retries, capping a provider's `retry-after` too (default 30 s).
    pub fn max_retry_wait(mut self, wait: Duration) -> Self {
        self.max_retry_wait = wait;
        self
    }

    /// The `User-Agent` header (default `normandy-llm/<version>`).
    pub fn user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.user_agent = user_agent.into();
        self
    }
}

/// Builds the HTTP client of an adapter.
///
/// TLS is rustls with the ring provider, which the workspace already uses (sqlx, redis):
/// installed as the process default if none is, since reqwest is built without a provider of its
/// own. reqwest's own retry layer is turned off so that `retry::send` (backon) is the only one.
pub(crate) fn build_client(cfg: &HttpConfig) -> Result<reqwest::Client> {
    // Err means a provider is installed already (ours or the application's): use that one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(cfg.connect_timeout)
        .read_timeout(cfg.read_timeout)
        .user_agent(cfg.user_agent.clone())
        .retry(reqwest::retry::never())
        .build()
        .map_err(|e| {
            Error::Config(format!(
                "could not build the HTTP client for a model provider: {e} (check the user agent \
                 and the system's TLS root certificates)"
            ))
        })
}

/// One HTTP client (one connection pool) shared by the sessions of a catalog entry, built by the
/// first session that asks for it rather than when the entry is made: building can fail (a
/// broken TLS setup), and a node should then fail that session with the error instead of
/// failing to start.
#[derive(Debug, Default)]
pub(crate) struct SharedClient(Mutex<Option<reqwest::Client>>);

impl SharedClient {
    /// The shared client, built with `cfg` on the first call.
    pub(crate) fn get(&self, cfg: &HttpConfig) -> Result<reqwest::Client> {
        let mut pool = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match &*pool {
            Some(client) => Ok(client.clone()),
            None => Ok(pool.insert(build_client(cfg)?).clone()),
        }
    }
}
