//! Tools the model may call: [`Tool`], its context, and [`ToolRegistry`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::llm::ToolSpec;
use crate::model::SessionId;

/// What a tool call knows about where it runs.
#[derive(Debug, Clone)]
pub struct ToolContext {
    /// The session.
    pub session: SessionId,
    /// The tool-call id the model gave (what its result answers). Models may reuse ids across
    /// responses: use `idempotency_key` with the outside world.
    pub call_id: String,
    /// Unique within the session and stable across resumes: pass it to payment APIs and the like
    /// so a call re-run after a crash is recognised as the same call.
    pub idempotency_key: String,
}

/// A tool's result as the model will see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolOutput {
    /// Result text.
    pub content: String,
    /// Whether it is an error result.
    pub is_error: bool,
}

impl ToolOutput {
    /// A successful result.
    pub fn ok(content: impl Into<String>) -> Self {
        Self {
            content: content.into(),
            is_error: false,
        }
    }

    /// An error result (the model is told the call failed; the turn goes on).
    pub fn error(content: impl Into<String>) -> Self {
        Self {
            content: content.into(),
            is_error: true,
        }
    }
}

/// A tool.
#[async_trait]
pub trait Tool: Send + Sync + 'static {
    /// Name, description and input schema.
    fn spec(&self) -> ToolSpec;

    /// Whether running the same call twice is harmless. Default `true`.
    ///
    /// A non-idempotent tool is recorded as started before it runs; if the node dies before its
    /// result is recorded, the call is *in doubt* on resume: it is not run again and the model is
    /// told its outcome is unknown.
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
