//! Sending one request with retries: connect errors, timeouts before the first byte and
//! retryable statuses are tried again, waiting what the provider asks (`retry-after-ms`, else
//! `retry-after`, capped) or an exponential backoff with jitter (backon).

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use normandy_core::{Error, ProviderError, Result};

use crate::error::{local_error, status_error, transport_error};
use crate::http::HttpConfig;

/// Most bytes of an error body read: enough for any provider's error JSON, and a cap on what a
/// misbehaving server (an HTML error page, an endless body) can make us buffer.
const MAX_ERROR_BODY: usize = 64 << 10;

/// Sends the request `make` builds (once per try), retrying up to `cfg.max_retries` times.
///
/// Returns a 2xx response, or the last failure as [`Error::Provider`]; a terminal failure (a bad
/// request, a bad key, a quota refusal) is returned at once.
pub(crate) async fn send(
    provider: &str,
    cfg: &HttpConfig,
    make: impl FnMut() -> reqwest::RequestBuilder,
) -> Result<reqwest::Response> {
    let mut budget = cfg.max_retries;
    send_within(provider, cfg, &mut budget, make).await
}

/// [`send`] with a retry budget shared with the caller: each retry taken here is subtracted
/// from `budget`, so the stream driver's re-POSTs and these retries together stay within
/// `max_retries` for one call.
pub(crate) async fn send_within(
    provider: &str,
    cfg: &HttpConfig,
    budget: &mut u32,
    mut make: impl FnMut() -> reqwest::RequestBuilder,
) -> Result<reqwest::Response> {
    let mut used = 0u32;
    let result = (|| once(provider, cfg, make()))
        .retry(backoff(cfg, *budget))
        .when(Error::is_retryable)
        .adjust(|e, dur| wait(cfg, e, dur))
        .notify(|e, dur| {
            used += 1;
            tracing::debug!(provider, error = %crate::error::summary(e), wait_ms = dur.as_millis() as u64, "retrying a model call");
        })
        .await;
    *budget = budget.saturating_sub(used);
    result
}

/// The backoff of one call: `retry_base` doubled each time, with jitter, at most `times` waits.
pub(crate) fn backoff(cfg: &HttpConfig, times: u32) -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_min_delay(cfg.retry_base)
        .with_max_delay(cfg.max_retry_wait)
        .with_max_times(times as usize)
        .with_jitter()
}

/// The wait before the retry after `e`: the provider's `retry-after` if it sent one, else the
/// backoff's `next`, capped at `max_retry_wait`. `None` stays `None`: that is backon's "out of
/// retries", which a provider's header must not turn into one more try.
pub(crate) fn wait(cfg: &HttpConfig, e: &Error, next: Option<Duration>) -> Option<Duration> {
    let next = next?;
    let asked = match e {
        Error::Provider(p) => p.retry_after_ms.map(Duration::from_millis),
        _ => None,
    };
    Some(asked.unwrap_or(next).min(cfg.max_retry_wait))
}

/// One try: the response if 2xx, else the mapped error.
async fn once(
    provider: &str,
    cfg: &HttpConfig,
    request: reqwest::RequestBuilder,
) -> Result<reqwest::Response> {
    let response = match tokio::time::timeout(cfg.first_byte_timeout, request.send()).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => return Err(provider_error(transport_error(provider, &e, true))),
        Err(_) => {
            let message = format!(
                "no response headers within {:?} (raise HttpConfig::first_byte_timeout if the \
                 provider queues requests for longer)",
                cfg.first_byte_timeout
            );
            return Err(provider_error(local_error(provider, message, true)));
        }
    };
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let headers = response.headers().clone();
    let body = read_capped(response, MAX_ERROR_BODY).await;
    Err(provider_error(status_error(
        provider,
        status.as_u16(),
        &headers,
        &body,
    )))
}

/// Up to `cap` bytes of the body; a read error ends it (the status already says what failed).
async fn read_capped(mut response: reqwest::Response, cap: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < cap {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk[..chunk.len().min(cap - body.len())]),
            _ => break,
        }
    }
    body
}

pub(crate) fn provider_error(e: ProviderError) -> Error {
    Error::Provider(Box::new(e))
}
