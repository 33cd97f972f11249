//! The streaming loop both adapters share: POST, feed each SSE event to the adapter's
//! [`StreamParser`], yield its deltas, and re-POST a stream cut before its end marker.
//!
//! The loop is a hand-written [`Stream`] (a state machine polled directly) rather than an
//! `async_stream` block wrapped in a `map_err` for redaction: on a 200-delta answer those layers
//! (a yield slot per item, a second boxed stream, a `Vec` of deltas per event) were a measurable
//! share of the adapters' CPU beside a raw SSE read (`cargo xtask bench llm`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use backon::{BackoffBuilder, ExponentialBackoff};
use futures::Stream;
use futures::future::BoxFuture;
use normandy_core::{Error, ModelDelta, ModelEvent, ModelResponse, ModelStream, Result};

use crate::error::{malformed, request_id};
use crate::http::HttpConfig;
use crate::retry;
use crate::sse::{self, SseEvent};

/// What an adapter's protocol does with the events of one streamed response.
pub(crate) trait StreamParser: Send + Unpin + 'static {
    /// One SSE event. Pushes the deltas it makes onto `deltas`, in order, and returns the whole
    /// response once the provider's end marker arrived (Anthropic `message_stop`, OpenAI
    /// `[DONE]`). On an error, whatever it pushed for this event is discarded.
    fn feed(
        &mut self,
        event: &SseEvent,
        deltas: &mut Vec<ModelDelta>,
    ) -> Result<Option<ModelResponse>>;

    /// [`feed`](Self::feed) with its deltas collected, for the parsers' unit tests.
    #[cfg(test)]
    fn feed_collect(&mut self, event: &SseEvent) -> Result<Fed> {
        let mut deltas = Vec::new();
        let done = self.feed(event, &mut deltas)?;
        Ok(Fed { deltas, done })
    }
}

/// What one event produced (the parsers' unit tests read it).
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct Fed {
    /// Deltas, in order.
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
/// terminal error: the stream yields that `Err`, passed through `redact` (which hides the
/// adapter's key should a provider echo it), and ends. Dropping the stream drops the body
/// (cancels the generation). Never re-POSTs for any other reason.
///
/// The retries of the POST itself (a 529, a refused connection) come out of the same budget,
/// so one call never sends more than `max_retries + 1` requests.
pub(crate) fn stream<P: StreamParser>(
    provider: &'static str,
    cfg: HttpConfig,
    make: impl Fn() -> reqwest::RequestBuilder + Send + Sync + 'static,
    new_parser: impl Fn(Option<String>) -> P + Send + Unpin + 'static,
    redact: impl Fn(Error) -> Error + Send + Unpin + 'static,
) -> ModelStream {
    // Backoff between re-POSTs of a cut stream; a 429/5xx on the POST waits inside `send`.
    let backoff = retry::backoff(&cfg, cfg.max_retries).build();
    let budget = cfg.max_retries;
    Box::pin(Driver {
        open: sse::events,
        post: Arc::new(Post {
            provider,
            cfg,
            make,
        }),
        new_parser,
        redact,
        budget,
        backoff,
        sent_deltas: false,
        pending: Vec::new(),
        done: None,
        state: State::Start,
    })
}

/// What every POST of one call needs, shared with the future that sends it.
struct Post<M> {
    provider: &'static str,
    cfg: HttpConfig,
    make: M,
}

/// Where one streamed call stands; `E` is the response body's events ([`sse::events`]).
enum State<P, E> {
    /// About to POST: the first time, or after the wait that follows a cut stream.
    Start,
    /// The POST (with its own retries) is under way; it hands back the budget it left.
    Sending(BoxFuture<'static, (Result<reqwest::Response>, u32)>),
    /// Reading the events of a 2xx response.
    Reading {
        events: E,
        request_id: Option<String>,
        parser: P,
    },
    /// Waiting before the re-POST of a cut stream.
    Waiting(Pin<Box<tokio::time::Sleep>>),
    /// The end was yielded (`Done` or an error): nothing more.
    Finished,
}

struct Driver<P, M, N, R, E> {
    /// [`sse::events`], which names `E` (an unnameable type, so not boxed per response).
    open: fn(reqwest::Response) -> E,
    post: Arc<Post<M>>,
    new_parser: N,
    redact: R,
    /// Retries left for the whole call.
    budget: u32,
    backoff: ExponentialBackoff,
    /// Whether a delta was yielded since the last (re-)POST, which a retry must announce with
    /// `Restart`.
    sent_deltas: bool,
    /// The deltas of the last event not yet yielded, in reverse order (popped from the end).
    /// One buffer for the whole call: most events make exactly one delta.
    pending: Vec<ModelDelta>,
    /// The whole response, yielded once `pending` is empty.
    done: Option<ModelResponse>,
    state: State<P, E>,
}

impl<P, M, N, R, E> Stream for Driver<P, M, N, R, E>
where
    E: Stream<Item = Result<SseEvent>> + Unpin,
    P: StreamParser,
    M: Fn() -> reqwest::RequestBuilder + Send + Sync + 'static,
    N: Fn(Option<String>) -> P + Unpin,
    R: Fn(Error) -> Error + Unpin,
{
    type Item = Result<ModelEvent>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(delta) = this.pending.pop() {
            this.sent_deltas = true;
            return Poll::Ready(Some(Ok(ModelEvent::Delta(delta))));
        }
        if let Some(response) = this.done.take() {
            this.state = State::Finished;
            return Poll::Ready(Some(Ok(ModelEvent::Done(Box::new(response)))));
        }
        loop {
            let failure = match &mut this.state {
                State::Start => {
                    let post = this.post.clone();
                    let mut budget = this.budget;
                    this.state = State::Sending(Box::pin(async move {
                        let sent =
                            retry::send_within(post.provider, &post.cfg, &mut budget, &post.make)
                                .await;
                        (sent, budget)
                    }));
                    continue;
                }
                State::Sending(sending) => {
                    let (sent, budget) = ready!(sending.as_mut().poll(cx));
                    this.budget = budget;
                    match sent {
                        Ok(response) => {
                            let id = request_id(response.headers());
                            this.state = State::Reading {
                                parser: (this.new_parser)(id.clone()),
                                events: (this.open)(response),
                                request_id: id,
                            };
                            continue;
                        }
                        Err(e) => {
                            this.state = State::Finished;
                            return Poll::Ready(Some(Err((this.redact)(e))));
                        }
                    }
                }
                State::Reading {
                    events,
                    request_id,
                    parser,
                } => {
                    let provider = this.post.provider;
                    match ready!(Pin::new(events).poll_next(cx)) {
                        Some(Ok(event)) => match parser.feed(&event, &mut this.pending) {
                            Ok(done) => {
                                if done.is_some() {
                                    this.done = done;
                                }
                                // Yielded by popping: the first delta last.
                                this.pending.reverse();
                                if let Some(delta) = this.pending.pop() {
                                    this.sent_deltas = true;
                                    return Poll::Ready(Some(Ok(ModelEvent::Delta(delta))));
                                }
                                if let Some(response) = this.done.take() {
                                    this.state = State::Finished;
                                    return Poll::Ready(Some(Ok(ModelEvent::Done(Box::new(
                                        response,
                                    )))));
                                }
                                continue;
                            }
                            Err(e) => {
                                this.pending.clear();
                                label(e, provider, request_id.as_deref())
                            }
                        },
                        Some(Err(e)) => label(e, provider, request_id.as_deref()),
                        None => malformed(
                            provider,
                            request_id.as_deref(),
                            "the stream ended before its end marker (the connection closed early)"
                                .to_owned(),
                        ),
                    }
                }
                State::Waiting(sleep) => {
                    ready!(sleep.as_mut().poll(cx));
                    this.state = State::Start;
                    continue;
                }
                State::Finished => return Poll::Ready(None),
            };
            match this.retry_after(failure) {
                Ok(Some(restart)) => return Poll::Ready(Some(Ok(restart))),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
        }
    }
}

impl<P, M, N, R, E> Driver<P, M, N, R, E>
where
    M: Fn() -> reqwest::RequestBuilder,
    R: Fn(Error) -> Error,
{
    /// After a failure while reading: either the (redacted) error to yield last, or a wait
    /// before the next POST, announced by a `Restart` if deltas were yielded since the last.
    fn retry_after(&mut self, failure: Error) -> Result<Option<ModelEvent>> {
        let cfg = &self.post.cfg;
        let wait = if failure.is_retryable() && self.budget > 0 {
            retry::wait(cfg, &failure, self.backoff.next())
        } else {
            None
        };
        let Some(wait) = wait else {
            self.state = State::Finished;
            return Err((self.redact)(failure));
        };
        self.budget -= 1;
        let provider = self.post.provider;
        tracing::warn!(provider, error = %crate::error::summary(&failure), wait_ms = wait.as_millis() as u64, "model stream failed midway; calling again");
        self.state = State::Waiting(Box::pin(tokio::time::sleep(wait)));
        Ok(self.sent_deltas.then(|| {
            self.sent_deltas = false;
            ModelEvent::Restart {
                reason: crate::error::summary(&failure),
            }
        }))
    }
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
