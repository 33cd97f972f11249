//! Before/after hooks around model and tool calls. A hook may edit what passes, or veto it.

use async_trait::async_trait;

use crate::llm::{ModelRequest, ModelResponse};
use crate::tools::ToolOutput;

/// A hook's verdict on what is about to happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookDecision {
    /// Go ahead (possibly with the edits the hook made).
    Continue,
    /// Do not do it. Before a tool call, the model gets an error result with this reason; before a
    /// model call, the turn fails with it.
    Veto(String),
}

/// A tool call as hooks see it (editable before it runs).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The call id.
    pub id: String,
    /// The tool's name.
    pub name: String,
    /// The input; a hook may rewrite it.
    pub input: serde_json::Value,
}

/// Hooks around model and tool calls. Every method defaults to doing nothing.
///
/// Implement it with [`#[normandy_core::async_trait]`](crate::async_trait) on the `impl`,
/// overriding only the methods you need:
///
/// ```
/// use normandy_core::{Hook, HookDecision, ToolCall, async_trait};
///
/// /// Vetoes every call of the `delete` tool.
/// struct NoDeletes;
///
/// #[async_trait]
/// impl Hook for NoDeletes {
///     async fn before_tool(&self, call: &mut ToolCall) -> HookDecision {
///         if call.name == "delete" {
///             HookDecision::Veto("deleting is not allowed here".into())
///         } else {
///             HookDecision::Continue
///         }
///     }
/// }
/// ```
#[async_trait]
pub trait Hook: Send + Sync + 'static {
    /// Before each model call; may edit the request.
    async fn before_model(&self, _request: &mut ModelRequest) -> HookDecision {
        HookDecision::Continue
    }

    /// After each model call; may edit the response before it is committed.
    async fn after_model(&self, _response: &mut ModelResponse) {}

    /// Before each tool call; may edit the input or veto the call.
    async fn before_tool(&self, _call: &mut ToolCall) -> HookDecision {
        HookDecision::Continue
    }

    /// After each tool call; may edit the output before it is committed.
    async fn after_tool(&self, _call: &ToolCall, _output: &mut ToolOutput) {}
}
