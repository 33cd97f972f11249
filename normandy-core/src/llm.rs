//! The model client seam: [`LlmClient`], its request and response, and [`ScriptedClient`] for tests
//! and demos. Real providers are adapters implementing [`LlmClient`]; the engine knows none.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{ContentBlock, Message, Role, SessionId, StopReason, Usage};

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
    /// Content blocks (text and tool calls).
    pub content: Vec<ContentBlock>,
    /// Why it stopped.
    pub stop_reason: StopReason,
    /// Tokens used.
    pub usage: Usage,
}

impl ModelResponse {
    /// A final text answer.
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            content: vec![ContentBlock::text(text)],
            stop_reason: StopReason::EndTurn,
            usage: Usage::default(),
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
        }
    }

    /// Sets usage.
    pub fn with_usage(mut self, input_tokens: u64, output_tokens: u64) -> Self {
        self.usage = Usage {
            input_tokens,
            output_tokens,
        };
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
#[async_trait]
pub trait LlmClient: Send + Sync + 'static {
    /// Calls the model.
    ///
    /// # Behavior
    /// - A failure that may pass (rate limit, overload, 5xx) is `Error::Model { retryable: true }`.
    async fn complete(&self, request: ModelRequest) -> Result<ModelResponse>;
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
}
