//! The model client seam: [`LlmClient`], its request and response, and [`ScriptedClient`] for tests
//! and demos. Real providers are adapters implementing [`LlmClient`]; the engine knows none.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{CallInfo, ContentBlock, Message, Role, SessionId, StopReason, Usage};

/// A tool as the model sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    /// The tool's name.
    pub name: String,
    /// What it does, for the model.
    pub description: String,
    /// JSON schema of its input.
    pub input_schema: serde_json::Value,
}

/// One model call.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRequest {
    /// The session making the call.
    pub session: SessionId,
    /// Model name from the template.
    pub model: String,
    /// System prompt.
    pub system: Option<String>,
    /// The conversation so far (shared with the session: `Arc::make_mut` to edit).
    pub messages: Arc<Vec<Message>>,
    /// Tools the model may call.
    pub tools: Arc<[ToolSpec]>,
    /// Model parameters from the template.
    pub params: Arc<BTreeMap<String, serde_json::Value>>,
}

impl ModelRequest {
    /// The last message, if any.
    pub fn last_message(&self) -> Option<&Message> {
        self.messages.last()
    }

    /// Tool results in the last message (the step's results when the model is called after tools).
    pub fn last_tool_results(&self) -> Vec<(&str, &str, bool)> {
        match self.messages.last() {
            Some(m) if m.role == Role::User => m
                .content
                .iter()
                .filter_map(|b| match b {
                    ContentBlock::ToolResult {
                        tool_use_id,
                        content,
                        is_error,
                        ..
                    } => Some((tool_use_id.as_str(), content.as_str(), *is_error)),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Text of the latest user input (the last user message that is not tool results).
    pub fn last_user_text(&self) -> Option<String> {
        self.messages
            .iter()
            .rev()
            .find(|m| {
                m.role == Role::User
                    && m.content
                        .iter()
                        .any(|b| matches!(b, ContentBlock::Text { .. }))
            })
            .map(Message::text)
    }
}

/// The model's answer to one call.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelResponse {
    /// Content blocks (text, thinking, tool calls), in the provider's order.
    pub content: Vec<ContentBlock>,
    /// Why it stopped.
    pub stop_reason: StopReason,
    /// Tokens used.
    pub usage: Usage,
    /// The provider's model, request id and own stop reason (stored with the response entry).
    pub call: CallInfo,
}

impl ModelResponse {
    /// A final text answer.
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            content: vec![ContentBlock::text(text)],
            stop_reason: StopReason::EndTurn,
            usage: Usage::default(),
            call: CallInfo::default(),
        }
    }

    /// A response asking for one tool call.
    pub fn tool_call(
        id: impl Into<String>,
        name: impl Into<String>,
        input: serde_json::Value,
    ) -> Self {
        Self::tool_calls(vec![(id.into(), name.into(), input)])
    }

    /// A response asking for several tool calls in one step.
    pub fn tool_calls(calls: Vec<(String, String, serde_json::Value)>) -> Self {
        Self {
            content: calls
                .into_iter()
                .map(|(id, name, input)| ContentBlock::ToolUse { id, name, input })
                .collect(),
            stop_reason: StopReason::ToolUse,
            usage: Usage::default(),
            call: CallInfo::default(),
        }
    }

    /// Sets usage.
    pub fn with_usage(mut self, input_tokens: u64, output_tokens: u64) -> Self {
        self.usage = Usage::new(input_tokens, output_tokens);
        self
    }

    /// Whether the model asks for tools.
    pub fn wants_tools(&self) -> bool {
        self.content
            .iter()
            .any(|b| matches!(b, ContentBlock::ToolUse { .. }))
    }
}

/// A model provider.
///
/// Implement it with [`#[normandy_core::async_trait]`](crate::async_trait) on the `impl`:
///
/// ```
/// use normandy_core::{LlmClient, ModelRequest, ModelResponse, Result, async_trait};
///
/// /// Answers every request with the last user text, shouted.
/// struct Shout;
///
/// #[async_trait]
/// impl LlmClient for Shout {
///     async fn complete(&self, request: ModelRequest) -> Result<ModelResponse> {
///         let text = request.last_user_text().unwrap_or_default();
///         Ok(ModelResponse::text(text.to_uppercase()))
///     }
/// }
/// ```
///
/// A client that can stream also implements [`LlmClient::stream`]; the engine always calls
/// `stream`, whose default runs `complete` and yields its response whole, so a non-streaming
/// client works unchanged.
#[async_trait]
pub trait LlmClient: Send + Sync + 'static {
    /// Calls the model and returns its whole answer.
    ///
    /// # Behavior
    /// - A failure that may pass (rate limit, overload, 5xx) is retryable
    ///   (`Error::Model { retryable: true }`, or an [`Error::Provider`] saying so); the engine
    ///   retries it a few times, then fails the turn.
    /// - A malformed answer (bad JSON in a tool call's arguments, a block it cannot read) is an
    ///   error, never a half-read response.
    async fn complete(&self, request: ModelRequest) -> Result<ModelResponse>;

    /// Calls the model and streams its answer: [`ModelEvent::Delta`]s as they come, then one
    /// [`ModelEvent::Done`] with the whole response, which is what the engine commits.
    ///
    /// # Behavior
    /// - The stream ends after `Done`; a stream that ends without one is a retryable error (the
    ///   engine treats it as a call that failed midway).
    /// - An error before the first event is returned from `stream` itself or as the stream's
    ///   first item; an error after deltas ends the stream.
    /// - A client that starts the call over after deltas were sent (its own retry of a cut
    ///   stream) yields [`ModelEvent::Restart`] first, so consumers drop the deltas so far.
    /// - Dropping the stream cancels the call.
    /// - The default runs [`complete`](Self::complete) and yields `Done` alone.
    async fn stream(&self, request: ModelRequest) -> Result<ModelStream> {
        let response = self.complete(request).await?;
        Ok(futures::stream::iter([Ok(ModelEvent::Done(Box::new(response)))]).boxed())
    }
}

/// A model's answer as it streams: see [`LlmClient::stream`].
pub type ModelStream = Pin<Box<dyn Stream<Item = Result<ModelEvent>> + Send>>;

/// One event of a streamed model call.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ModelEvent {
    /// A piece of the answer (never stored).
    Delta(ModelDelta),
    /// The client starts the call over (it retries a stream cut before its end): drop every
    /// delta received since the call began.
    Restart {
        /// Why, for logs.
        reason: String,
    },
    /// The whole response: the last event. Boxed, so that the deltas before it travel in a
    /// small event (a `Result<ModelEvent>` is 72 bytes, not 144, at every hop of the stream).
    Done(Box<ModelResponse>),
}

/// A piece of a model's answer as it streams. Subscribers get them as
/// [`TurnEvent::ModelDelta`](crate::engine::TurnEvent::ModelDelta); they are never stored: the
/// committed response is the accumulated answer.
///
/// `index` is the content block's position in the response, as the provider numbers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ModelDelta {
    /// Answer text.
    Text {
        /// The block's position in the response.
        index: u32,
        /// The text added.
        text: String,
    },
    /// Reasoning text.
    Thinking {
        /// The block's position in the response.
        index: u32,
        /// The text added.
        text: String,
    },
    /// A tool call begins.
    ToolUseStart {
        /// The block's position in the response.
        index: u32,
        /// The model's call id.
        id: String,
        /// The tool's name.
        name: String,
    },
    /// A piece of a tool call's input, as JSON text (the pieces joined are the input).
    ToolInput {
        /// The block's position in the response.
        index: u32,
        /// The JSON text added.
        partial_json: String,
    },
}

/// Runs a stream to its [`ModelEvent::Done`] and returns the response: how a streaming client
/// can implement [`LlmClient::complete`]. A stream that ends without `Done` is a retryable
/// error naming `provider`.
pub async fn collect_response(mut stream: ModelStream, provider: &str) -> Result<ModelResponse> {
    while let Some(event) = stream.next().await {
        if let ModelEvent::Done(response) = event? {
            return Ok(*response);
        }
    }
    Err(Error::Model {
        message: format!("{provider}: the stream ended before the response was complete"),
        retryable: true,
    })
}

type ScriptFn = dyn Fn(&ModelRequest) -> Result<ModelResponse> + Send + Sync;

/// A deterministic client for tests, demos and benchmarks.
///
/// Either a function of the request ([`ScriptedClient::from_fn`] — the natural choice for resumable
/// sessions, since a rebuilt session gets a fresh client) or a fixed sequence shared by all clones.
#[derive(Clone)]
pub struct ScriptedClient {
    script: Arc<ScriptFn>,
    latency: Duration,
    calls: Arc<AtomicU64>,
    /// Stream text in pieces of this many characters, this far apart (`None`: one `Done`).
    chunks: Option<(usize, Duration)>,
}

impl fmt::Debug for ScriptedClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScriptedClient")
            .field("latency", &self.latency)
            .field("calls", &self.calls())
            .finish_non_exhaustive()
    }
}

impl ScriptedClient {
    /// A client answering each request with `f(request)`.
    pub fn from_fn(
        f: impl Fn(&ModelRequest) -> Result<ModelResponse> + Send + Sync + 'static,
    ) -> Self {
        Self {
            script: Arc::new(f),
            latency: Duration::ZERO,
            calls: Arc::new(AtomicU64::new(0)),
            chunks: None,
        }
    }

    /// A client answering with `responses` in order; past the end it fails with a model error.
    pub fn sequence(responses: Vec<ModelResponse>) -> Self {
        let queue = Mutex::new(VecDeque::from(responses));
        Self::from_fn(move |_| {
            queue
                .lock()
                .expect("script poisoned")
                .pop_front()
                .ok_or_else(|| Error::Model {
                    message: "scripted client has no more responses".into(),
                    retryable: false,
                })
        })
    }

    /// A client that always answers `text` at once.
    pub fn echo() -> Self {
        Self::from_fn(|req| {
            Ok(ModelResponse::text(format!(
                "echo: {}",
                req.last_user_text().unwrap_or_default()
            )))
        })
    }

    /// Sleeps this long before answering (simulated model latency).
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Streams each response's text in pieces of `chars` characters, `every` apart (after the
    /// latency), then the whole response — as a streaming provider would. Tool calls and
    /// thinking arrive as one delta each.
    pub fn streaming(mut self, chars: usize, every: Duration) -> Self {
        self.chunks = Some((chars.max(1), every));
        self
    }

    /// How many calls this client (and its clones) answered.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl LlmClient for ScriptedClient {
    async fn complete(&self, request: ModelRequest) -> Result<ModelResponse> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        (self.script)(&request)
    }

    async fn stream(&self, request: ModelRequest) -> Result<ModelStream> {
        let Some((chars, every)) = self.chunks else {
            let response = self.complete(request).await?;
            return Ok(futures::stream::iter([Ok(ModelEvent::Done(Box::new(response)))]).boxed());
        };
        let response = self.complete(request).await?;
        let mut deltas = Vec::new();
        for (index, block) in (0u32..).zip(&response.content) {
            match block {
                ContentBlock::Text { text } => {
                    let all: Vec<char> = text.chars().collect();
                    for piece in all.chunks(chars) {
                        deltas.push(ModelDelta::Text {
                            index,
                            text: piece.iter().collect(),
                        });
                    }
                }
                ContentBlock::Thinking { thinking, .. } => deltas.push(ModelDelta::Thinking {
                    index,
                    text: thinking.clone(),
                }),
                ContentBlock::ToolUse { id, name, input } => {
                    deltas.push(ModelDelta::ToolUseStart {
                        index,
                        id: id.clone(),
                        name: name.clone(),
                    });
                    deltas.push(ModelDelta::ToolInput {
                        index,
                        partial_json: input.to_string(),
                    });
                }
                _ => {}
            }
        }
        let events = futures::stream::iter(deltas)
            .then(move |delta| async move {
                tokio::time::sleep(every).await;
                Ok(ModelEvent::Delta(delta))
            })
            .chain(futures::stream::iter([Ok(ModelEvent::Done(Box::new(
                response,
            )))]));
        Ok(events.boxed())
    }
}
