//! Server-sent events over a response body. Framing is `sse-stream`'s (CRLF, bare CR, multi-line
//! `data:`, events split anywhere across chunks); this module only maps its items and errors.
//!
//! `sse-stream` drops a partial event at EOF without a word, so a stream that ends early looks
//! like one that ended cleanly: the adapters' parsers detect that by the provider's end marker.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures::Stream;
use normandy_core::{Error, Result};
use sse_stream::SseByteStream;

use crate::error::local_error;
use crate::retry::provider_error;

/// One event: its `event:` name, if any, and its `data:` lines joined with `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// The `event:` field (Anthropic names every event; OpenAI names none).
    pub(crate) event: Option<String>,
    /// The `data:` payload.
    pub(crate) data: String,
}

/// The events of a streamed response. Blocks without data (comments, `retry:` alone) are skipped.
///
/// A read error (the connection cut, the read timeout) is a retryable [`Error::Provider`] whose
/// message begins "stream cut:"; its `provider` is empty, for the driver to fill in (it knows
/// the adapter's name and the request id).
///
/// A plain `Stream` rather than `StreamExt::filter_map` over `sse-stream`: that combinator makes
/// and polls a future per event, for a mapping that never waits. Generic over reqwest's byte
/// stream (an unnameable `impl Stream`, named by [`events`]' return type) rather than boxing it:
/// unboxed, `sse-stream`'s poll is inlined here and its event is not copied out through a
/// virtual call on every poll.
pub(crate) struct SseEvents<S: Stream<Item = reqwest::Result<bytes::Bytes>>> {
    inner: SseByteStream<S>,
}

/// The events of `response`'s body.
pub(crate) fn events(
    response: reqwest::Response,
) -> SseEvents<impl Stream<Item = reqwest::Result<bytes::Bytes>> + Send + Unpin + 'static> {
    SseEvents {
        inner: SseByteStream::new(response.bytes_stream()),
    }
}

impl<S> Stream for SseEvents<S>
where
    S: Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin,
{
    type Item = Result<SseEvent>;

    #[inline]
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                Some(Ok(sse)) => {
                    if let Some(data) = sse.data {
                        return Poll::Ready(Some(Ok(SseEvent {
                            event: sse.event,
                            data,
                        })));
                    }
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(read_error(&e)))),
                None => return Poll::Ready(None),
            }
        }
    }
}

fn read_error(e: &sse_stream::Error) -> Error {
    let message = match e {
        sse_stream::Error::Body(source) => {
            let timeout = source
                .downcast_ref::<reqwest::Error>()
                .is_some_and(reqwest::Error::is_timeout);
            let mut text = if timeout {
                "no data within the read timeout (HttpConfig::read_timeout)".to_owned()
            } else {
                "the connection broke".to_owned()
            };
            // reqwest's own text names the URL; its sources say what broke.
            let mut cur = std::error::Error::source(source.as_ref());
            while let Some(c) = cur {
                text.push_str(": ");
                text.push_str(&c.to_string());
                cur = c.source();
            }
            format!("stream cut: {text}")
        }
        other => format!("stream cut: unreadable event: {other}"),
    };
    provider_error(local_error("", message, true))
}
