//! Turn-engine tests: multi-step turns, crashes at every boundary, in-doubt tool calls, fencing,
//! idempotent input, input modes, limits, passivation, subscriptions.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use normandy_core::*;
use serde_json::json;

#[path = "../support/mod.rs"]
mod support;
use support::{Fault, FaultStore};

mod sessions;
mod starvation;
mod turns;

// ---------------------------------------------------------------------------------------------
// Fixtures

/// A tool that counts its executions per call id.
#[derive(Clone, Default)]
struct CountingTool {
    name: &'static str,
    idempotent: bool,
    delay: Duration,
    runs: Arc<std::sync::Mutex<Vec<String>>>,
}

impl CountingTool {
    fn new(name: &'static str, idempotent: bool) -> Self {
        Self {
            name,
            idempotent,
            ..Default::default()
        }
    }

    fn runs(&self) -> Vec<String> {
        self.runs.lock().unwrap().clone()
    }
}

#[async_trait]
impl Tool for CountingTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: self.name.into(),
            description: "counts".into(),
            input_schema: json!({"type": "object"}),
        }
    }

    fn idempotent(&self) -> bool {
        self.idempotent
    }

    async fn call(&self, input: serde_json::Value, ctx: ToolContext) -> ToolOutput {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.runs.lock().unwrap().push(ctx.call_id.clone());
        ToolOutput::ok(format!("{}({input})", self.name))
    }
}

/// A model that, per turn, asks for `a` and `b` in step 1, `c` in step 2, then answers.
/// A function of the request, so a rebuilt session continues the same script.
fn script() -> ScriptedClient {
    ScriptedClient::from_fn(script_fn)
}

fn script_fn(req: &ModelRequest) -> Result<ModelResponse> {
    {
        let text = req.last_user_text().unwrap_or_default();
        // Count assistant messages since the latest user text message: the step within the turn.
        let start = req
            .messages
            .iter()
            .rposition(|m| {
                m.role == Role::User
                    && m.content
                        .iter()
                        .any(|b| matches!(b, ContentBlock::Text { .. }))
            })
            .unwrap_or(0);
        let step = req.messages[start..]
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .count();
        let tag = text.replace(' ', "_");
        Ok(match step {
            0 => ModelResponse::tool_calls(vec![
                (format!("{tag}-a"), "a".into(), json!({"x": 1})),
                (format!("{tag}-b"), "b".into(), json!({"x": 2})),
            ]),
            1 => ModelResponse::tool_call(format!("{tag}-c"), "c", json!({"x": 3})),
            _ => {
                let results = req.last_tool_results();
                ModelResponse::text(format!("answer to {text} after {}", results[0].1))
                    .with_usage(10, 5)
            }
        })
    }
}

struct Fixture {
    catalog: TemplateCatalog,
    a: CountingTool,
    b: CountingTool,
    c: CountingTool,
    client: ScriptedClient,
}

fn fixture(template: ConfigTemplate, c_idempotent: bool) -> Fixture {
    let a = CountingTool::new("a", true);
    let b = CountingTool::new("b", true);
    let c = CountingTool::new("c", c_idempotent);
    let client = script();
    let catalog = TemplateCatalog::new()
        .with(
            template,
            CatalogEntry::with_client(client.clone())
                .tool(a.clone())
                .tool(b.clone())
                .tool(c.clone()),
        )
        .unwrap();
    Fixture {
        catalog,
        a,
        b,
        c,
        client,
    }
}

fn template() -> ConfigTemplate {
    ConfigTemplate::new("t", "scripted").resume_policy(ResumePolicy::Eager)
}

fn runtime(catalog: &TemplateCatalog, store: Arc<dyn SessionStore>, node: &str) -> Sessions {
    Sessions::builder(catalog.clone())
        .node(NodeId::new(node, 1).unwrap())
        .store(store)
        .build()
        .unwrap()
}

fn sid(s: &str) -> SessionId {
    SessionId::new(s).unwrap()
}

fn iid(s: &str) -> InputId {
    InputId::new(s).unwrap()
}

async fn start(sessions: &Sessions, id: &str) -> SessionId {
    sessions
        .start_with(
            "t",
            StartOptions {
                id: Some(sid(id)),
                ..Default::default()
            },
        )
        .await
        .unwrap()
}

fn inputs_in(history: &[Entry]) -> Vec<String> {
    history
        .iter()
        .filter_map(|e| e.payload.input_id().map(|i| i.to_string()))
        .collect()
}

fn count_kind(history: &[Entry], kind: &str) -> usize {
    history
        .iter()
        .filter(|e| e.payload.kind_name() == kind)
        .count()
}

// ---------------------------------------------------------------------------------------------
// A store that "crashes" at its n-th commit: the actor never hears back, as if the process died.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum CrashPoint {
    /// The n-th commit is applied, then the process dies before the ack.
    AfterApply,
    /// The process dies before the n-th commit reaches the store.
    BeforeApply,
}

impl CrashPoint {
    /// The fault that crashes a commit at this point.
    fn fault(self) -> Fault {
        match self {
            CrashPoint::AfterApply => Fault::ApplyThenHang,
            CrashPoint::BeforeApply => Fault::Hang,
        }
    }
}

/// A store over `inner` whose `crash_at`-th commit crashes at `point`; `hung()` says when.
fn crashing_store(
    inner: &Arc<InMemoryStore>,
    crash_at: usize,
    point: CrashPoint,
) -> Arc<FaultStore> {
    Arc::new(FaultStore::new(inner.clone()).on_commit(move |call| {
        std::future::ready(if call.n == crash_at {
            point.fault()
        } else {
            Fault::Pass
        })
    }))
}

fn slow_fixture(mode: InputMode) -> (TemplateCatalog, CountingTool) {
    let mut slow = CountingTool::new("a", true);
    slow.delay = Duration::from_millis(150);
    let client = ScriptedClient::from_fn(|req| {
        Ok(if req.last_tool_results().is_empty() {
            let text = req.last_user_text().unwrap_or_default();
            ModelResponse::tool_call(format!("{text}-a"), "a", json!({}))
        } else {
            ModelResponse::text(format!("done {}", req.last_user_text().unwrap_or_default()))
        })
    });
    let catalog = TemplateCatalog::new()
        .with(
            ConfigTemplate::new("t", "m").input_mode(mode),
            CatalogEntry::with_client(client).tool(slow.clone()),
        )
        .unwrap();
    (catalog, slow)
}
