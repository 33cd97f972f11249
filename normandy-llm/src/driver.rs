//! The streaming loop both adapters share: POST, feed each SSE event to the adapter's
//! [`StreamParser`], yield its deltas, and re-POST a stream cut before its end marker.

use backon::BackoffBuilder;
use futures::StreamExt;
use normandy_core::{Error, ModelDelta, ModelEvent, ModelResponse, ModelStream, Result};

use crate::error::{malformed, request_id};
use crate::http::HttpConfig;
use crate::retry;
use crate::sse::{self, SseEvent};

/// What an adapter's protocol does with the events of one streamed response.
pub(crate) trait StreamParser: Send + 'static {
    /// One SSE event. Returns what to emit: deltas, and the whole response once the
    /// provider's end marker arrived (Anthropic `message_stop`, OpenAI `[DONE]`).
    fn feed(&mut self, event: &SseEvent) -> Result<Fed>;
}

/// What one event produced.
#[derive(Debug, Default)]
pub(crate) struct Fed {
    /// Deltas to yield, in order.
    pub(crate) deltas: Vec<ModelDelta>,
    /// The whole response, once the end marker arrived.
    pub(crate) done: Option<ModelResponse>,
}

/// Streams a call: POSTs through `retry::send`, feeds every SSE event to a fresh parser
/// (`new_parser(request_id_from_headers)`), yields `ModelEvent::Delta`s and finally
/// `ModelEvent::Done`. A stream that is cut (read error) or ends (EOF) before `done`, or an
/// error the parser returns that is retryable, is retried up to `cfg.max_retries` times in
/// total for the call: `ModelEvent::Restart { reason }` is yielded first if any delta was
/// already yielded, then the request is POSTed again (a new parser). Out of retries, or a
/// terminal error: the stream yields that `Err` and ends. Dropping the stream drops the body
/// (cancels the generation). Never re-POSTs for any other reason.
///
/// The retries of the POST itself (a 529, a refused connection) come out of the same budget,
/// so one call never sends more than `max_retries + 1` requests.
pub(crate) fn stream<P: StreamParser>(
    provider: &'static str,
    cfg: HttpConfig,
    make: impl Fn() -> reqwest::RequestBuilder + Send + Sync + 'static,
    new_parser: impl Fn(Option<String>) -> P + Send + Sync + 'static,
) -> ModelStream {
    Box::pin(async_stream::stream! {
        let mut budget = cfg.max_retries;
        // Backoff between re-POSTs of a cut stream; a 429/5xx on the POST waits inside `send`.
        let mut backoff = retry::backoff(&cfg, cfg.max_retries).build();
        let mut sent_deltas = false;
        loop {
            let response = match retry::send_within(provider, &cfg, &mut budget, &make).await {
                Ok(response) => response,
                Err(e) => {
                    yield Err(e);
                    return;
                }
            };
            let id = request_id(response.headers());
            let mut parser = new_parser(id.clone());
            let mut events = std::pin::pin!(sse::events(response));
            let failure = loop {
                let event = match events.next().await {
                    Some(Ok(event)) => event,
                    Some(Err(e)) => break label(e, provider, id.as_deref()),
                    None => {
                        break malformed(
                            provider,
                            id.as_deref(),
                            "the stream ended before its end marker (the connection closed early)"
                                .to_owned(),
                        );
                    }
                };
                match parser.feed(&event) {
                    Ok(fed) => {
                        for delta in fed.deltas {
                            sent_deltas = true;
                            yield Ok(ModelEvent::Delta(delta));
                        }
                        if let Some(response) = fed.done {
                            yield Ok(ModelEvent::Done(response));
                            return;
                        }
                    }
                    Err(e) => break label(e, provider, id.as_deref()),
                }
            };
            let wait = if failure.is_retryable() && budget > 0 {
                retry::wait(&cfg, &failure, backoff.next())
            } else {
                None
            };
            let Some(wait) = wait else {
                yield Err(failure);
                return;
            };
            budget -= 1;
            tracing::warn!(provider, error = %crate::error::summary(&failure), wait_ms = wait.as_millis() as u64, "model stream failed midway; calling again");
            if sent_deltas {
                sent_deltas = false;
                yield Ok(ModelEvent::Restart { reason: crate::error::summary(&failure) });
            }
            tokio::time::sleep(wait).await;
        }
    })
}

/// Names the adapter and the request in an error that came without them (a read error from
/// `sse`, a parser error made before the request id was known).
fn label(e: Error, provider: &str, request_id: Option<&str>) -> Error {
    match e {
        Error::Provider(mut p) => {
            if p.provider.is_empty() {
                p.provider = provider.to_owned();
            }
            if p.request_id.is_none() {
                p.request_id = request_id.map(str::to_owned);
            }
            Error::Provider(p)
        }
        other => other,
    }
}
