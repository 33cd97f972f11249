//! Adversarial review of the turn engine and runtime: races (activation, passivation, cancel vs.
//! deadline), invariant 5 at the deadline and on resume, call-id handling, resource leaks, and
//! API behaviour a production user would trip over.
//!
//! The first group each reproduced a defect found in review (now fixed) and stays as a regression
//! test; the second pins behaviour the engine tests do not cover.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use normandy_core::codec::{self, BlobKind};
use normandy_core::*;
use serde_json::json;
use tokio::sync::Notify;
use tokio::time::timeout;

#[path = "../support/mod.rs"]
mod support;
use support::{Fault, FaultStore};

mod coverage;
mod in_doubt;
mod regressions;

// ---------------------------------------------------------------------------------------------
// Fixtures

fn sid(s: &str) -> SessionId {
    SessionId::new(s).unwrap()
}

fn iid(s: &str) -> InputId {
    InputId::new(s).unwrap()
}

fn node(name: &str) -> NodeId {
    NodeId::new(name, 1).unwrap()
}

fn runtime(catalog: &TemplateCatalog, store: Arc<dyn SessionStore>, name: &str) -> Sessions {
    Sessions::builder(catalog.clone())
        .node(node(name))
        .store(store)
        .build()
        .unwrap()
}

async fn start(sessions: &Sessions, template: &str, id: &str) -> SessionId {
    sessions
        .start_with(
            template,
            StartOptions {
                id: Some(sid(id)),
                ..Default::default()
            },
        )
        .await
        .unwrap()
}

/// What a tool does when called.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// Sleeps `delay`, then answers.
    Sleep,
    /// Never answers.
    Hang,
    /// Panics.
    Panic,
}

/// A tool that logs `start:<call id>` when it begins and `done:<call id>` when it ends.
#[derive(Clone)]
struct LogTool {
    name: &'static str,
    idempotent: bool,
    delay: Duration,
    behaviour: Behaviour,
    log: Arc<Mutex<Vec<String>>>,
}

impl LogTool {
    fn new(name: &'static str, idempotent: bool) -> Self {
        Self {
            name,
            idempotent,
            delay: Duration::ZERO,
            behaviour: Behaviour::Sleep,
            log: Arc::default(),
        }
    }

    fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }

    fn behaviour(mut self, b: Behaviour) -> Self {
        self.behaviour = b;
        self
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn count(&self, prefix: &str) -> usize {
        self.log().iter().filter(|l| l.starts_with(prefix)).count()
    }
}

#[async_trait]
impl Tool for LogTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: self.name.into(),
            description: "logs".into(),
            input_schema: json!({"type": "object"}),
        }
    }

    fn idempotent(&self) -> bool {
        self.idempotent
    }

    async fn call(&self, _input: serde_json::Value, ctx: ToolContext) -> ToolOutput {
        self.log
            .lock()
            .unwrap()
            .push(format!("start:{}", ctx.idempotency_key));
        match self.behaviour {
            Behaviour::Hang => futures::future::pending::<()>().await,
            Behaviour::Panic => panic!("tool {} panicked (review test)", self.name),
            Behaviour::Sleep => {
                if !self.delay.is_zero() {
                    tokio::time::sleep(self.delay).await;
                }
            }
        }
        self.log
            .lock()
            .unwrap()
            .push(format!("done:{}", ctx.idempotency_key));
        ToolOutput::ok(format!("{} ok", self.name))
    }
}

/// A model that calls `tool` once per turn when the input text starts with `tool`'s name (call
/// id `<text>-<message count>`), and otherwise, or once it has results, answers with text.
fn one_tool_client(tool: &'static str) -> ScriptedClient {
    ScriptedClient::from_fn(move |req| {
        let text = req.last_user_text().unwrap_or_default();
        let results = req.last_tool_results();
        Ok(if !results.is_empty() {
            ModelResponse::text(format!("done {text}: {}", results[0].1))
        } else if text.starts_with(tool) {
            ModelResponse::tool_call(format!("{text}-{}", req.messages.len()), tool, json!({}))
        } else {
            ModelResponse::text(format!("quick {text}"))
        })
    })
}

/// A model that asks for tools `a` and `b` under one call id, "dup", then answers "done".
fn two_calls_sharing_one_id() -> ScriptedClient {
    ScriptedClient::from_fn(|req| {
        Ok(if req.last_tool_results().is_empty() {
            ModelResponse::tool_calls(vec![
                ("dup".into(), "a".into(), json!({})),
                ("dup".into(), "b".into(), json!({})),
            ])
        } else {
            ModelResponse::text("done")
        })
    })
}

fn catalog_with(template: ConfigTemplate, entry: CatalogEntry) -> TemplateCatalog {
    TemplateCatalog::new().with(template, entry).unwrap()
}

fn tool_results(history: &[Entry]) -> Vec<(String, String, bool)> {
    history
        .iter()
        .filter_map(|e| match &e.payload {
            EntryPayload::ToolResult {
                call_id,
                content,
                is_error,
                ..
            } => Some((call_id.clone(), content.clone(), *is_error)),
            _ => None,
        })
        .collect()
}

fn inputs_in(history: &[Entry]) -> Vec<String> {
    history
        .iter()
        .filter_map(|e| e.payload.input_id().map(|i| i.to_string()))
        .collect()
}

/// Every tool_use the model sent is answered by exactly one tool_result in the next message.
fn assert_every_tool_use_answered(history: &[Entry]) {
    let conv = Conversation::from_entries(history);
    let msgs = conv.messages();
    for (i, m) in msgs.iter().enumerate() {
        let uses: Vec<&str> = m.tool_uses().map(|(id, _, _)| id).collect();
        if uses.is_empty() {
            continue;
        }
        let next = msgs
            .get(i + 1)
            .unwrap_or_else(|| panic!("tool_use {uses:?} has no following message"));
        let results: Vec<&str> = next
            .content
            .iter()
            .filter_map(|b| match b {
                ContentBlock::ToolResult { tool_use_id, .. } => Some(tool_use_id.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(
            results.len(),
            uses.len(),
            "tool_uses {uses:?} answered by {results:?}"
        );
    }
}

async fn wait_until<F: FnMut() -> bool>(mut f: F, what: &str) {
    for _ in 0..400 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting until {what}");
}

async fn wait_for_entry(store: &InMemoryStore, id: &SessionId, kind: &str) {
    for _ in 0..400 {
        if let Ok(entries) = store.entries(id, 0, 1000).await
            && entries.iter().any(|e| e.payload.kind_name() == kind)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("no {kind} entry appeared");
}

/// Starts session "s" on node "a" over `store`, sends "pay 10" (input "in"), and kills a while
/// its non-idempotent `pay` call runs, after the call's `ToolStarted` is committed.
async fn crash_during_the_paid_call(
    catalog: &TemplateCatalog,
    store: &Arc<InMemoryStore>,
    pay: &LogTool,
) -> SessionId {
    let node_a = runtime(catalog, store.clone(), "a");
    let id = start(&node_a, "t", "s").await;
    let a = node_a.clone();
    let id2 = id.clone();
    let send =
        tokio::spawn(async move { a.send(&id2, Input::text("pay 10").with_id(iid("in"))).await });
    wait_for_entry(store, &id, "tool_started").await;
    wait_until(|| pay.count("start:") == 1, "the paid call runs").await;
    assert!(node_a.kill(&id), "node a dies mid-call");
    send.abort();
    id
}

/// Records in the stored state of `id`'s turn that it has run `ms` already, as its owner would
/// have committed had it run that long before it died. (The deadline counts run time measured on
/// monotonic clocks; time while no node ran the turn is not counted, since wall clocks of two
/// nodes cannot be compared. So a test cannot spend the budget by sleeping between a crash and
/// the resume.)
async fn spend_turn_budget(store: &InMemoryStore, id: &SessionId, ms: u64) {
    let mut state = store.load(id).await.unwrap().unwrap().state;
    state.turn.as_mut().expect("a turn in flight").ran_ms = Some(ms);
    assert!(store.overwrite_state_bytes(id, codec::encode(BlobKind::TurnState, &state).unwrap()));
}

/// A store whose next `activate` hangs once the returned flag is set (a slow or stuck
/// database).
fn gated_store() -> (Arc<FaultStore>, Arc<AtomicBool>) {
    let hang_next_activate = Arc::new(AtomicBool::new(false));
    let hang = hang_next_activate.clone();
    let store = FaultStore::default().on_activate(move |_| {
        std::future::ready(if hang.swap(false, Ordering::SeqCst) {
            Fault::Hang
        } else {
            Fault::Pass
        })
    });
    (Arc::new(store), hang_next_activate)
}

/// A registry whose `unregister` takes a while (a network round trip, as with Redis).
struct SlowRegistry {
    inner: LocalRegistry,
    delay: Duration,
}

#[async_trait]
impl SessionRegistry for SlowRegistry {
    async fn register(&self, id: &SessionId, owner: &NodeId) -> Result<Placement> {
        self.inner.register(id, owner).await
    }
    async fn lookup(&self, id: &SessionId) -> Result<Option<Placement>> {
        self.inner.lookup(id).await
    }
    async fn unregister(&self, id: &SessionId, owner: &NodeId) -> Result<bool> {
        tokio::time::sleep(self.delay).await;
        self.inner.unregister(id, owner).await
    }
}

/// A store that refuses (non-retryably) any batch carrying an input whose text is `poison`, as
/// a backend may refuse content it cannot store.
fn refusing_store() -> Arc<FaultStore> {
    Arc::new(FaultStore::default().on_commit(|call| {
        let poison = call.batch.entries.iter().any(|e| {
            matches!(&e.payload, EntryPayload::Input { content, .. }
                if content.iter().any(|b| matches!(b, ContentBlock::Text { text } if text == "poison")))
        });
        std::future::ready(if poison {
            Fault::Fail(Error::invalid_input(
                Some(call.id),
                "the backend cannot store this input",
            ))
        } else {
            Fault::Pass
        })
    }))
}

// Reading in-doubt outcomes and idempotency keys out of a history.

/// Each tool result's call id and in-doubt record, in order.
fn doubts(history: &[Entry]) -> Vec<(String, Option<InDoubt>)> {
    history
        .iter()
        .filter_map(|e| match &e.payload {
            EntryPayload::ToolResult {
                call_id, in_doubt, ..
            } => Some((call_id.clone(), in_doubt.clone())),
            _ => None,
        })
        .collect()
}

/// The idempotency key of every `ToolStarted` entry, in order.
fn started_keys(history: &[Entry]) -> Vec<Option<String>> {
    history
        .iter()
        .filter_map(|e| match &e.payload {
            EntryPayload::ToolStarted {
                idempotency_key, ..
            } => Some(idempotency_key.clone()),
            _ => None,
        })
        .collect()
}

/// The keys a `LogTool` was handed, in call order.
fn keys_handed(tool: &LogTool) -> Vec<String> {
    tool.log()
        .into_iter()
        .filter_map(|l| l.strip_prefix("start:").map(str::to_string))
        .collect()
}

/// The only in-doubt record of `history` (panics unless there is exactly one).
fn the_doubt(history: &[Entry]) -> InDoubt {
    let found: Vec<InDoubt> = history
        .iter()
        .filter_map(|e| e.payload.in_doubt().cloned())
        .collect();
    assert_eq!(found.len(), 1, "one in-doubt result expected: {found:?}");
    found.into_iter().next().unwrap()
}
