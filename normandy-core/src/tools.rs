//! Tools the model may call: [`Tool`], its context, and [`ToolRegistry`].
//!
//! # Call ids and idempotency keys
//!
//! Every tool call has two names; this is the one place that defines them.
//!
//! - The **call id** ([`ToolContext::call_id`], the model's
//!   [`ContentBlock::ToolUse`] `id`, and the `call_id` of
//!   the history's tool entries) is the model's own id, kept verbatim because the call's result
//!   must answer it. It is not unique: providers restart their numbering every response
//!   (`call_0` in every turn), and a model may even repeat an id within one response — the
//!   engine then runs each of those calls and records their results in the calls' order, so the
//!   model gets one result per call. Never send the call id to the outside world.
//! - The **idempotency key** ([`ToolContext::idempotency_key`]) is what a tool sends to an
//!   outside service (a payment API's `Idempotency-Key`, a dedup column) so that a call run twice
//!   is recognised as one. Its format is `{session}:{answer_seq}:{index}`: the session id, the
//!   seq of the [`Assistant`](crate::model::EntryPayload::Assistant) entry that asked for the
//!   call, and the call's 0-based position among that response's tool calls — e.g.
//!   `chat-42:7:0`. It is
//!   - unique within the session: no two calls share an entry and position, whatever ids the
//!     model chose. The last two fields are decimal numbers, so a key parses from the right even
//!     when the session id holds a `:`, and keys of different sessions never collide — unless a
//!     deleted session's id is reused, or two deployments share a service and session ids: add
//!     your own prefix then;
//!   - stable across resumes and nodes: it is fixed (in the turn state) when the model's response
//!     is committed, so an idempotent call re-run after a crash, on any node, gets the same key;
//!   - recorded in history: in the call's
//!     [`ToolStarted`](crate::model::EntryPayload::ToolStarted) entry (written before a
//!     non-idempotent tool runs) and in the [`InDoubt`](crate::model::InDoubt) of a result whose
//!     outcome is unknown, so a doubtful call can be reconciled from history alone.
//!
//!   A turn recorded by a version that predates these keys (its pending calls carry none) is
//!   resumed with the legacy key `{session}:{call_id}`, which is only as unique as the model's
//!   ids.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::llm::ToolSpec;
use crate::model::{ContentBlock, Seq, SessionId};

/// What a tool call knows about where it runs.
#[derive(Debug, Clone)]
pub struct ToolContext {
    /// The session.
    pub session: SessionId,
    /// The tool-call id the model gave (what its result answers). Not unique — models reuse
    /// ids — so use `idempotency_key` with the outside world; see
    /// [the rules](self#call-ids-and-idempotency-keys).
    pub call_id: String,
    /// `{session}:{answer_seq}:{index}`: unique within the session, stable across resumes and
    /// nodes, and recorded in history. Pass it to payment APIs and the like so a call re-run
    /// after a crash is recognised as the same call; see
    /// [the rules](self#call-ids-and-idempotency-keys).
    pub idempotency_key: String,
}

/// The idempotency key of the `index`th tool call of the response committed at `answer_seq`
/// (the format the module doc defines).
pub(crate) fn idempotency_key(session: &SessionId, answer_seq: Seq, index: usize) -> String {
    format!("{session}:{answer_seq}:{index}")
}

/// The key of a call recorded before keys existed (its pending call carries none).
pub(crate) fn legacy_idempotency_key(session: &SessionId, call_id: &str) -> String {
    format!("{session}:{call_id}")
}

/// A tool's result as the model will see it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolOutput {
    /// Result text.
    pub content: String,
    /// Whether it is an error result.
    pub is_error: bool,
    /// A machine-readable result beside the text (MCP's `structuredContent`), stored with it.
    pub structured: Option<serde_json::Value>,
    /// Images, documents or further text the tool returns (a screenshot, a fetched PDF).
    /// Inline media is checked like an input's: a block the engine cannot send on turns the
    /// result into an error result saying why.
    pub blocks: Vec<ContentBlock>,
}

impl ToolOutput {
    /// A successful result.
    pub fn ok(content: impl Into<String>) -> Self {
        Self {
            content: content.into(),
            is_error: false,
            structured: None,
            blocks: Vec::new(),
        }
    }

    /// An error result (the model is told the call failed; the turn goes on).
    pub fn error(content: impl Into<String>) -> Self {
        Self {
            content: content.into(),
            is_error: true,
            structured: None,
            blocks: Vec::new(),
        }
    }

    /// A successful result carrying JSON: its text is the JSON, and the value is kept as the
    /// structured result.
    pub fn json(value: serde_json::Value) -> Self {
        let mut out = Self::ok(value.to_string());
        out.structured = Some(value);
        out
    }

    /// Adds a block (an image, a document) to the result.
    pub fn with_block(mut self, block: ContentBlock) -> Self {
        self.blocks.push(block);
        self
    }
}

/// A tool.
///
/// Implement it with [`#[normandy_core::async_trait]`](crate::async_trait) on the `impl`
/// (rustdoc shows the methods as returning `Pin<Box<dyn Future>>`, which is what the attribute
/// writes for you):
///
/// ```
/// use normandy_core::{Tool, ToolContext, ToolOutput, ToolSpec, async_trait};
///
/// struct Charge;
///
/// #[async_trait]
/// impl Tool for Charge {
///     fn spec(&self) -> ToolSpec {
///         ToolSpec {
///             name: "charge".into(),
///             description: "Charges the customer's card".into(),
///             input_schema: serde_json::json!({"type": "object"}),
///         }
///     }
///
///     /// Charging twice is not harmless: record the call as started before it runs.
///     fn idempotent(&self) -> bool {
///         false
///     }
///
///     async fn call(&self, input: serde_json::Value, ctx: ToolContext) -> ToolOutput {
///         // Hand `ctx.idempotency_key` to the payment provider, so a retry never charges twice.
///         ToolOutput::ok(format!("charged {input} under key {}", ctx.idempotency_key))
///     }
/// }
/// ```
#[async_trait]
pub trait Tool: Send + Sync + 'static {
    /// Name, description and input schema.
    fn spec(&self) -> ToolSpec;

    /// Whether running the same call twice is harmless. Default `true`.
    ///
    /// A non-idempotent tool is recorded as started before it runs (a
    /// [`ToolStarted`](crate::model::EntryPayload::ToolStarted) entry carrying its idempotency
    /// key); if the node dies before its result is recorded, the call is *in doubt* on resume:
    /// it is not run again, the model is told its outcome is unknown, and its result entry
    /// carries an [`InDoubt`](crate::model::InDoubt) with
    /// [`DoubtReason::Interrupted`](crate::model::DoubtReason::Interrupted). A call that times
    /// out, panics or is abandoned when its turn ends is recorded in doubt too, whatever this
    /// says.
    fn idempotent(&self) -> bool {
        true
    }

    /// Runs the call. Failures are error results for the model, not errors of the turn.
    async fn call(&self, input: serde_json::Value, ctx: ToolContext) -> ToolOutput;
}

/// The tools of a catalog entry, by name.
#[derive(Clone, Default)]
pub struct ToolRegistry {
    // Behind an Arc so every live session of a template shares one map.
    tools: Arc<BTreeMap<String, Arc<dyn Tool>>>,
}

impl fmt::Debug for ToolRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.tools.keys()).finish()
    }
}

impl ToolRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tool under its spec's name (replacing one of the same name).
    pub fn register(&mut self, tool: impl Tool) -> &mut Self {
        let tool: Arc<dyn Tool> = Arc::new(tool);
        Arc::make_mut(&mut self.tools).insert(tool.spec().name, tool);
        self
    }

    /// Adds a shared tool.
    pub fn register_arc(&mut self, tool: Arc<dyn Tool>) -> &mut Self {
        Arc::make_mut(&mut self.tools).insert(tool.spec().name, tool);
        self
    }

    /// The tool named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Tool>> {
        self.tools.get(name)
    }

    /// Specs of all tools, sorted by name.
    pub fn specs(&self) -> Vec<ToolSpec> {
        self.tools.values().map(|t| t.spec()).collect()
    }

    /// A registry holding only the named tools (all of them when `names` is empty).
    pub fn subset(&self, names: &[String]) -> Self {
        if names.is_empty() {
            return self.clone();
        }
        Self {
            tools: Arc::new(
                self.tools
                    .iter()
                    .filter(|(n, _)| names.contains(n))
                    .map(|(n, t)| (n.clone(), t.clone()))
                    .collect(),
            ),
        }
    }

    /// Number of tools.
    pub fn len(&self) -> usize {
        self.tools.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }
}
