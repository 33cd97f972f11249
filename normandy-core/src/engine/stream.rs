//! One try of a model call as a stream: deltas forwarded to subscribers under their attempt,
//! streamed text kept for a turn cut short, and the wait before the next try.

use std::time::Duration;

use futures::StreamExt;
use tracing::debug;

use super::actor::Live;
use super::{Attempt, TurnEvent};
use crate::error::{Error, Result};
use crate::llm::{LlmClient, ModelDelta, ModelEvent, ModelRequest, ModelResponse};
use crate::model::InputId;

/// One try of a model call: streams the answer, forwarding each delta to subscribers tagged with
/// its turn, step and try (a restart by the client is a new try) and keeping the streamed text,
/// and returns the whole response.
pub(super) async fn stream_call(
    client: &dyn LlmClient,
    request: ModelRequest,
    live: &Live,
    turn: &InputId,
    step: u32,
    attempt: &mut Attempt,
) -> Result<ModelResponse> {
    let mut stream = client.stream(request).await?;
    while let Some(event) = stream.next().await {
        match event? {
            ModelEvent::Delta(delta) => {
                if let ModelDelta::Text { index, text } = &delta {
                    live.push_text(*index, text);
                }
                if live.listened() {
                    live.emit(TurnEvent::ModelDelta {
                        turn: turn.clone(),
                        step,
                        attempt: *attempt,
                        delta,
                    });
                }
            }
            ModelEvent::Restart { reason } => {
                debug!(%reason, "the model client restarted its call");
                attempt.number = live.next_attempt();
            }
            ModelEvent::Done(response) => return Ok(*response),
        }
    }
    Err(Error::Model {
        message: "the model's stream ended before its response was complete".into(),
        retryable: true,
    })
}

/// How long to wait before retrying a failed model call: what the provider asked for, within
/// reason, else exponential from 200 ms.
pub(super) fn retry_delay(err: &Error, attempt: u32) -> Duration {
    let asked = match err.inner() {
        Error::Provider(p) => p.retry_after_ms,
        _ => None,
    };
    match asked {
        Some(ms) => Duration::from_millis(ms.min(MAX_RETRY_AFTER_MS)),
        None => Duration::from_millis(100 << attempt),
    }
}

/// The longest provider-asked wait the engine honours between tries of one call; a provider
/// asking for longer fails the turn sooner rather than holding it.
const MAX_RETRY_AFTER_MS: u64 = 30_000;
