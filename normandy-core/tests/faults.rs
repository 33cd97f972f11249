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

mod support;
use support::{Fault, FaultStore};

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

// ---------------------------------------------------------------------------------------------
// Confirmed bugs (fixed; kept as regression tests)

/// A caller that gives up (timeout, client disconnect) while its `send` is activating the
/// session leaves a `Starting` slot whose watch sender is gone; every later request for the
/// session loops on `changed()` returning `Err` at once and never completes.
#[tokio::test]
async fn a_send_dropped_during_activation_does_not_wedge_the_session() {
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(ScriptedClient::echo()),
    );
    let (store, hang_next_activate) = gated_store();
    let sessions = runtime(&catalog, store, "a");
    let id = start(&sessions, "t", "s").await;

    hang_next_activate.store(true, Ordering::SeqCst);
    let first = timeout(Duration::from_millis(100), sessions.send(&id, "one")).await;
    assert!(first.is_err(), "the stuck activation should time out");

    // The store answers again; a new request must get through.
    let second = timeout(Duration::from_secs(2), sessions.send(&id, "two")).await;
    assert!(
        matches!(second, Ok(Ok(_))),
        "session wedged after a cancelled activation: {second:?}"
    );
}

/// Same root cause, other trigger: a panic in user code run during activation (the catalog's
/// client builder) unwinds through `live_handle` and leaves the `Starting` slot behind.
#[tokio::test]
async fn a_panicking_client_builder_is_an_error_and_does_not_wedge_the_session() {
    let first_call = Arc::new(AtomicBool::new(true));
    let fc = first_call.clone();
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::new(move |_, _| {
            if fc.swap(false, Ordering::SeqCst) {
                panic!("client builder panicked (review test)");
            }
            Ok(Arc::new(ScriptedClient::echo()) as Arc<dyn LlmClient>)
        }),
    );
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "t", "s").await;
    let s = sessions.clone();
    let id2 = id.clone();
    let first = tokio::spawn(async move { s.send(&id2, "one").await })
        .await
        .expect("a panicking client builder must not panic the caller");
    let err = first.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    assert!(err.to_string().contains("panicked"), "{err}");

    let second = timeout(Duration::from_secs(2), sessions.send(&id, "two")).await;
    assert!(
        matches!(second, Ok(Ok(_))),
        "session wedged after a panicking activation: {second:?}"
    );
}

/// Interrupt mode: B arrives while A runs a tool, so a cancel waits for A's next boundary. A's
/// deadline passes first and ends A, but the pending cancel is never cleared: it cancels B, the
/// turn it was meant to make room for.
#[tokio::test]
async fn an_interrupt_ended_by_the_deadline_does_not_cancel_the_next_turn() {
    let slow = LogTool::new("slow", true).delay(Duration::from_secs(2));
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m")
            .input_mode(InputMode::Interrupt)
            .limits(TurnLimits {
                turn_deadline_ms: 300,
                ..TurnLimits::default()
            }),
        CatalogEntry::with_client(one_tool_client("slow")).tool(slow.clone()),
    );
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "t", "s").await;
    let s = sessions.clone();
    let id2 = id.clone();
    let a = tokio::spawn(async move { s.send(&id2, "slow A").await });
    wait_until(|| slow.count("start:") == 1, "the slow tool runs").await;
    let b = timeout(Duration::from_secs(3), sessions.send(&id, "B"))
        .await
        .expect("B answered");
    let a = a.await.unwrap();
    assert!(a.is_err(), "A ended early: {a:?}");
    let b = b.unwrap_or_else(|e| panic!("B was cancelled by A's stale cancel: {e}"));
    assert_eq!(b.text(), "quick B");
}

/// Same stale flag in queue mode: `cancel()` said it cancelled A, A then timed out, and the
/// queued B was cancelled instead.
#[tokio::test]
async fn a_cancel_that_loses_to_the_deadline_does_not_cancel_the_queued_turn() {
    let slow = LogTool::new("slow", true).delay(Duration::from_secs(2));
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m").limits(TurnLimits {
            turn_deadline_ms: 300,
            ..TurnLimits::default()
        }),
        CatalogEntry::with_client(one_tool_client("slow")).tool(slow.clone()),
    );
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "t", "s").await;
    let s = sessions.clone();
    let id2 = id.clone();
    let a = tokio::spawn(async move { s.send(&id2, "slow A").await });
    wait_until(|| slow.count("start:") == 1, "the slow tool runs").await;
    assert!(sessions.cancel(&id).await.unwrap());
    let b = timeout(Duration::from_secs(3), sessions.send(&id, "B"))
        .await
        .expect("B answered");
    let _ = a.await.unwrap();
    let b = b.unwrap_or_else(|e| panic!("queued B was cancelled by A's cancel: {e}"));
    assert_eq!(b.text(), "quick B");
}

/// Invariant 5: a non-idempotent call that started (its `ToolStarted` is committed) and whose
/// step is abandoned at the turn deadline is recorded as "not run" — it did run.
#[tokio::test]
async fn a_call_abandoned_at_the_deadline_is_recorded_in_doubt() {
    let pay = LogTool::new("pay", false).delay(Duration::from_secs(2));
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m").limits(TurnLimits {
            turn_deadline_ms: 300,
            ..TurnLimits::default()
        }),
        CatalogEntry::with_client(one_tool_client("pay")).tool(pay.clone()),
    );
    let store = Arc::new(InMemoryStore::new());
    let sessions = runtime(&catalog, store.clone(), "a");
    let id = start(&sessions, "t", "s").await;
    let err = sessions.send(&id, "pay 10").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert_eq!(pay.count("start:"), 1, "the paid call did start");
    let history = sessions.history_all(&id).await.unwrap();
    let (_, content, is_error) = tool_results(&history).remove(0);
    assert!(is_error);
    assert!(
        !content.contains("not run"),
        "a started non-idempotent call is in doubt, not 'not run': {content:?}"
    );
    let doubt = the_doubt(&history);
    assert_eq!(doubt.reason, DoubtReason::TurnEnded);
    assert_eq!(doubt.idempotency_key, keys_handed(&pay)[0]);
    assert_eq!(started_keys(&history), vec![Some(doubt.idempotency_key)]);
}

/// Invariant 5 on resume: the owner dies after committing `ToolStarted`; the turn's deadline
/// passes before a node resumes it. The resuming node ends the turn and records the in-doubt call
/// as "not run" instead of "outcome unknown".
#[tokio::test]
async fn an_in_doubt_call_resumed_past_the_deadline_is_recorded_in_doubt() {
    let pay = LogTool::new("pay", false).behaviour(Behaviour::Hang);
    let template = ConfigTemplate::new("t", "m")
        .resume_policy(ResumePolicy::Eager)
        .limits(TurnLimits {
            turn_deadline_ms: 300,
            ..TurnLimits::default()
        });
    let catalog = catalog_with(
        template,
        CatalogEntry::with_client(one_tool_client("pay")).tool(pay.clone()),
    );
    let store = Arc::new(InMemoryStore::new());
    let id = crash_during_the_paid_call(&catalog, &store, &pay).await;
    // The turn had run past its deadline before a died (see `spend_turn_budget`).
    spend_turn_budget(&store, &id, 400).await;

    let node_b = runtime(&catalog, store.clone(), "b");
    let out = node_b
        .send(&id, Input::text("pay 10").with_id(iid("in")))
        .await;
    assert_eq!(out.unwrap_err().kind(), ErrorKind::Timeout);
    assert_eq!(pay.count("start:"), 1, "not run again");
    let history = node_b.history_all(&id).await.unwrap();
    let (_, content, _) = tool_results(&history).remove(0);
    assert!(
        content.contains("unknown"),
        "in-doubt call must say its outcome is unknown: {content:?}"
    );
    // It was interrupted by the crash; the deadline only ended the turn afterwards.
    let doubt = the_doubt(&history);
    assert_eq!(doubt.reason, DoubtReason::Interrupted);
    assert_eq!(doubt.idempotency_key, keys_handed(&pay)[0]);
}

/// Two tool_use blocks with one id in a response: `record_tool_result` removes every pending call
/// with that id, so the second call never runs and its tool_use never gets a tool_result.
#[tokio::test]
async fn duplicate_call_ids_in_one_response_each_get_a_result() {
    let a = LogTool::new("a", true);
    let b = LogTool::new("b", true);
    let client = two_calls_sharing_one_id();
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(client)
            .tool(a.clone())
            .tool(b.clone()),
    );
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "t", "s").await;
    sessions.send(&id, "go").await.unwrap();
    let history = sessions.history_all(&id).await.unwrap();
    assert_eq!(a.count("start:"), 1);
    assert_eq!(b.count("start:"), 1, "the second call was silently dropped");
    assert_every_tool_use_answered(&history);
}

/// `ToolContext::call_id` is documented as "unique within the session", for use as an external
/// idempotency key. It is the model's id verbatim; providers that number calls per response
/// (`call_0`) give the same key to different calls in different turns, so a payment API would
/// treat the second payment as a replay of the first.
#[tokio::test]
async fn idempotency_keys_are_unique_within_a_session() {
    let pay = LogTool::new("pay", false);
    let client = ScriptedClient::from_fn(|req| {
        Ok(if req.last_tool_results().is_empty() {
            ModelResponse::tool_call("call_0", "pay", json!({}))
        } else {
            ModelResponse::text("paid")
        })
    });
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(client).tool(pay.clone()),
    );
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "t", "s").await;
    sessions.send(&id, "pay 10").await.unwrap();
    sessions.send(&id, "pay 20").await.unwrap();
    let keys: Vec<String> = pay
        .log()
        .into_iter()
        .filter_map(|l| l.strip_prefix("start:").map(str::to_string))
        .collect();
    assert_eq!(keys.len(), 2);
    assert_ne!(
        keys[0], keys[1],
        "two different calls got the same idempotency key"
    );
}

/// Dropping every `Sessions` handle should stop its actors (`Exit::Dropped`), but each actor
/// holds `Arc<LiveSessions>`, whose map holds the actor's own mailbox sender: the channel never
/// closes, and the task (with its store, registry and client) lives until the idle timeout.
#[tokio::test]
async fn dropping_the_runtime_stops_its_actors_and_releases_placements() {
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(ScriptedClient::echo()),
    );
    let store = Arc::new(InMemoryStore::new());
    let registry = Arc::new(LocalRegistry::new());
    let sessions = Sessions::builder(catalog)
        .store(store.clone())
        .registry(registry.clone())
        .idle_timeout(Duration::from_secs(3600))
        .build()
        .unwrap();
    let id = start(&sessions, "t", "s").await;
    sessions.send(&id, "hi").await.unwrap();
    drop(sessions);
    for _ in 0..100 {
        if Arc::strong_count(&store) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        Arc::strong_count(&store),
        1,
        "an actor outlived its runtime"
    );
    assert!(registry.is_empty(), "its placement was never released");
}

/// A panicking tool (user code) kills the actor task. `send` retries on a fresh actor, which
/// resumes the turn and runs the same idempotent call again: the tool runs once per attempt and
/// the caller gets `Unavailable` instead of an error result for the model.
#[tokio::test]
async fn a_panicking_tool_is_an_error_result_not_a_crash_loop() {
    let boom = LogTool::new("boom", true).behaviour(Behaviour::Panic);
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(one_tool_client("boom")).tool(boom.clone()),
    );
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "t", "s").await;
    let out = sessions.send(&id, "boom now").await;
    assert_eq!(
        boom.count("start:"),
        1,
        "the panicking call ran once per retry ({out:?})"
    );
    let out = out.expect("a tool panic is an error result, the turn goes on");
    assert!(out.text().starts_with("done"), "{}", out.text());
    let history = sessions.history_all(&id).await.unwrap();
    assert_eq!(the_doubt(&history).reason, DoubtReason::Panicked);
}

/// A node that cannot build the session (template or credentials missing) still `activate`s it
/// first: the epoch bumps (fencing a live owner for nothing) and the store's owner becomes that
/// node. An eager session left mid-turn by dead node A is then no longer listed under A, so A's
/// reaper never resumes it.
#[tokio::test]
async fn a_node_that_cannot_build_a_session_does_not_take_it_over() {
    let hang = LogTool::new("hang", true).behaviour(Behaviour::Hang);
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m").resume_policy(ResumePolicy::Eager),
        CatalogEntry::with_client(one_tool_client("hang")).tool(hang.clone()),
    );
    let store = Arc::new(InMemoryStore::new());
    let node_a = runtime(&catalog, store.clone(), "a");
    let id = start(&node_a, "t", "s").await;
    let a = node_a.clone();
    let id2 = id.clone();
    let send = tokio::spawn(async move { a.send(&id2, "hang").await });
    wait_until(|| hang.count("start:") == 1, "the tool runs").await;
    assert!(node_a.kill(&id));
    send.abort();
    let before = store.load(&id).await.unwrap().unwrap();
    assert!(before.is_resumable());

    // An old node without the template gets a request for it.
    let node_c = runtime(&TemplateCatalog::new(), store.clone(), "c");
    let err = node_c.send(&id, "hello").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TemplateNotFound, "{err}");

    let after = store.load(&id).await.unwrap().unwrap();
    let listed = store
        .list_resumable(&OwnerFilter::Node(node("a")), None, 10)
        .await
        .unwrap();
    assert_eq!(
        after.epoch, before.epoch,
        "a failed activation fenced the session"
    );
    assert_eq!(
        after.owner,
        Some(node("a")),
        "a failed activation took ownership"
    );
    assert_eq!(
        listed.sessions.len(),
        1,
        "dead a's reaper no longer sees it"
    );
}

/// `start_with` hands client credentials to `FromClient` before `create` checks the id: a start
/// that fails with `AlreadyExists` has still replaced the existing session's credentials.
#[tokio::test]
async fn a_refused_start_keeps_the_existing_sessions_credentials() {
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m").credential("key"),
        CatalogEntry::new(|_, creds| {
            let key = creds.expose("key")?.to_string();
            Ok(Arc::new(ScriptedClient::from_fn(move |_| {
                Ok(ModelResponse::text(format!("using {key}")))
            })) as Arc<dyn LlmClient>)
        }),
    );
    let sessions = Sessions::builder(catalog)
        .credentials_from_client()
        .build()
        .unwrap();
    let with_key = |k: &str| StartOptions {
        id: Some(sid("s")),
        credentials: Some(Credentials::new().with("key", k)),
    };
    let id = sessions
        .start_with("t", with_key("owner-key"))
        .await
        .unwrap();
    let err = sessions
        .start_with("t", with_key("other-key"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    let out = sessions.send(&id, "hi").await.unwrap();
    assert_eq!(
        out.text(),
        "using owner-key",
        "a refused start swapped the key"
    );
}

/// Bad stored data must be a typed error (invariant 7). A decodable `TurnEnd` whose `answer_seq`
/// is 0 makes `original_outcome` compute `seq - 1` and panic (debug); the caller sees
/// `Unavailable` after four actor crashes instead of `Corrupt`.
#[tokio::test]
async fn a_corrupt_answer_seq_is_a_typed_error() {
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(ScriptedClient::echo()),
    );
    let store = Arc::new(InMemoryStore::new());
    let sessions = runtime(&catalog, store.clone(), "a");
    let id = start(&sessions, "t", "s").await;
    let out = sessions
        .send(&id, Input::text("hi").with_id(iid("x")))
        .await
        .unwrap();
    assert_eq!(out.end_seq, 3);
    assert!(sessions.passivate(&id).await);
    let bad = Entry {
        seq: 3,
        parent: Some(2),
        at_ms: 0,
        payload: EntryPayload::TurnEnd {
            input_id: iid("x"),
            status: TurnStatus::Completed,
            answer_seq: Some(0),
            usage: Usage::default(),
        },
    };
    assert!(store.overwrite_entry_bytes(&id, 3, codec::encode(BlobKind::Entry, &bad).unwrap()));
    let err = sessions
        .send(&id, Input::text("hi").with_id(iid("x")))
        .await
        .expect_err("a corrupt outcome is an error");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
}

/// `shutdown` ("placements are released so the next request can run anywhere") returns as soon
/// as each actor has *acknowledged* `Passivate`; the actor releases its placement afterwards. A
/// process that exits when `shutdown` returns leaves its placements held until its lease lapses.
#[tokio::test]
async fn shutdown_returns_after_placements_are_released() {
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(ScriptedClient::echo()),
    );
    let registry = Arc::new(SlowRegistry {
        inner: LocalRegistry::new(),
        delay: Duration::from_millis(50),
    });
    let sessions = Sessions::builder(catalog)
        .registry(registry.clone())
        .build()
        .unwrap();
    let id = start(&sessions, "t", "s").await;
    sessions.send(&id, "hi").await.unwrap();
    sessions.shutdown().await;
    assert!(
        registry.inner.is_empty(),
        "shutdown returned with {} placement(s) still held",
        registry.inner.len()
    );
}

/// Same for `passivate`: a hand-off to another node right after it returns is refused with
/// `AlreadyRegistered`, because the placement is released only after the reply.
#[tokio::test]
async fn passivate_returns_after_the_placement_is_released() {
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(ScriptedClient::echo()),
    );
    let store = Arc::new(InMemoryStore::new());
    let registry = Arc::new(SlowRegistry {
        inner: LocalRegistry::new(),
        delay: Duration::from_millis(50),
    });
    let build = |name: &str| {
        Sessions::builder(catalog.clone())
            .node(node(name))
            .store(store.clone())
            .registry(registry.clone())
            .build()
            .unwrap()
    };
    let (a, b) = (build("a"), build("b"));
    let id = start(&a, "t", "s").await;
    a.send(&id, "one").await.unwrap();
    assert!(a.passivate(&id).await);
    let handed_off = b.send(&id, "two").await;
    assert!(
        handed_off.is_ok(),
        "hand-off after passivate: {handed_off:?}"
    );
}

/// Interrupt mode's pending cancel lives only in the actor's memory: if the owner dies after B
/// was accepted (to interrupt A) but before A's next boundary, the new owner runs A to
/// completion — another model call and A's tools — before B.
#[tokio::test]
async fn an_accepted_interrupt_survives_a_crash() {
    let hang = LogTool::new("work", true).behaviour(Behaviour::Hang);
    let fast = LogTool::new("work", true);
    let template = ConfigTemplate::new("t", "m").input_mode(InputMode::Interrupt);
    let store = Arc::new(InMemoryStore::new());
    let node_a = runtime(
        &catalog_with(
            template.clone(),
            CatalogEntry::with_client(one_tool_client("work")).tool(hang.clone()),
        ),
        store.clone(),
        "a",
    );
    let id = start(&node_a, "t", "s").await;
    let a = node_a.clone();
    let id2 = id.clone();
    let first =
        tokio::spawn(async move { a.send(&id2, Input::text("work A").with_id(iid("A"))).await });
    wait_until(|| hang.count("start:") == 1, "A runs its tool").await;
    let a = node_a.clone();
    let id2 = id.clone();
    let second =
        tokio::spawn(async move { a.send(&id2, Input::text("B").with_id(iid("B"))).await });
    for _ in 0..400 {
        if store.load(&id).await.unwrap().unwrap().state.queued.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(node_a.kill(&id));
    first.abort();
    second.abort();

    let node_b = runtime(
        &catalog_with(
            template,
            CatalogEntry::with_client(one_tool_client("work")).tool(fast.clone()),
        ),
        store.clone(),
        "b",
    );
    let b = node_b
        .send(&id, Input::text("B").with_id(iid("B")))
        .await
        .unwrap();
    assert_eq!(b.text(), "quick B");
    let a = node_b
        .send(&id, Input::text("work A").with_id(iid("A")))
        .await;
    assert_eq!(
        a.as_ref().map_err(Error::kind).err(),
        Some(ErrorKind::Cancelled),
        "A was interrupted by B before the crash, yet it ran on: {a:?}"
    );
}

/// A non-retryable commit error caused by one input (here a store refusing its content) ends
/// the actor, and `exit_for` fans that input's error out to every other waiter: the caller of
/// the running turn gets `InvalidInput` for someone else's input.
#[tokio::test]
async fn a_refused_input_fails_only_its_sender() {
    let slow = LogTool::new("slow", true).delay(Duration::from_millis(200));
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(one_tool_client("slow")).tool(slow.clone()),
    );
    let sessions = runtime(&catalog, refusing_store(), "a");
    let id = start(&sessions, "t", "s").await;
    let s = sessions.clone();
    let id2 = id.clone();
    let running = tokio::spawn(async move { s.send(&id2, "slow A").await });
    wait_until(|| slow.count("start:") == 1, "A runs its tool").await;
    let err = sessions.send(&id, "poison").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    let a = running.await.unwrap();
    assert!(a.is_ok(), "A's caller got another input's error: {a:?}");
}

/// A commit that lands but whose reply is lost (a reset connection) is retryable, so the actor
/// retries it; the retry then finds its own input stored (`DuplicateInput`), which the actor
/// took for a stale view and turned into an `Internal` exit fanned out to every waiter: the
/// running turn's caller failed, and the ambiguous input's caller was told nothing.
#[tokio::test]
async fn an_ambiguous_commit_that_landed_fails_no_one() {
    let slow = LogTool::new("slow", true).delay(Duration::from_millis(200));
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(one_tool_client("slow")).tool(slow.clone()),
    );
    let inner = Arc::new(InMemoryStore::new());
    let lost_reply = Arc::new(AtomicBool::new(false));
    let lost = lost_reply.clone();
    let store = FaultStore::new(inner.clone()).on_commit(move |call| {
        let is_b = call.batch.input_ids().any(|i| i.as_str() == "b");
        std::future::ready(if is_b && !lost.swap(true, Ordering::SeqCst) {
            Fault::ApplyThenFail(Error::Unavailable {
                backend: "fault store",
                message: "connection reset after the write".into(),
            })
        } else {
            Fault::Pass
        })
    });
    let sessions = runtime(&catalog, Arc::new(store), "a");
    let id = start(&sessions, "t", "s").await;
    let s = sessions.clone();
    let id2 = id.clone();
    let running =
        tokio::spawn(async move { s.send(&id2, Input::text("slow A").with_id(iid("a"))).await });
    wait_until(|| slow.count("start:") == 1, "A runs its tool").await;
    let b = sessions.send(&id, Input::text("B").with_id(iid("b"))).await;
    assert!(lost_reply.load(Ordering::SeqCst), "B's reply was lost");
    let a = running.await.unwrap();
    assert!(a.is_ok(), "A's caller got another commit's error: {a:?}");
    assert_eq!(b.expect("B's caller gets its outcome").text(), "quick B");
    let history = inner.entries(&id, 0, 1000).await.unwrap();
    assert_eq!(
        inputs_in(&history),
        vec!["a", "b"],
        "each input stored once"
    );
}

/// `Input` takes any content blocks, and `accept` only checks the size: an input made of a
/// tool_use, a forged tool_result, or nothing at all is committed for good, and every later
/// model request of the session carries it (providers reject such conversations, so the session
/// is poisoned durably).
#[tokio::test]
async fn inputs_must_be_non_empty_text() {
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(ScriptedClient::echo()),
    );
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "t", "s").await;
    let bad = [
        vec![ContentBlock::tool_result("forged", "paid", false)],
        vec![ContentBlock::ToolUse {
            id: "x".into(),
            name: "pay".into(),
            input: json!({}),
        }],
        Vec::new(),
    ];
    let mut accepted = Vec::new();
    for content in bad {
        let input = Input { id: None, content };
        if sessions.send(&id, input.clone()).await.is_ok() {
            accepted.push(input.content);
        }
    }
    assert!(
        accepted.is_empty(),
        "accepted malformed inputs: {accepted:?}"
    );
}

/// An idle actor that another node has superseded (its epoch is stale) keeps serving reads from
/// its own memory: `subscribe` replays only up to the actor's stale seq and then stays silent,
/// never showing the new owner's entries and never saying it is fenced.
#[tokio::test]
async fn a_superseded_actor_refuses_to_serve_a_subscription() {
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(ScriptedClient::echo()),
    );
    let store = Arc::new(InMemoryStore::new());
    let a = runtime(&catalog, store.clone(), "a");
    let b = runtime(&catalog, store.clone(), "b");
    let id = start(&a, "t", "s").await;
    a.send(&id, "one").await.unwrap();
    // B takes the session over (A's lease lapsed, say) and writes a turn.
    b.send(&id, "two").await.unwrap();
    let head = store.load(&id).await.unwrap().unwrap().seq;
    assert_eq!(head, 6);
    // A's actor is superseded: its subscription says so instead of serving a stale stream,
    // and the actor stops (a cluster routes the caller to B).
    let err = match a.subscribe(&id, 0).await {
        Ok(_) => panic!("a superseded actor served a subscription"),
        Err(e) => e,
    };
    assert_eq!(err.kind(), ErrorKind::Fenced, "{err}");
    assert_eq!(a.live_count(), 0);
}

/// A caller whose input waited in the mailbox of an actor that was then fenced lost its reply
/// with the actor, and its retry activated the session here again — taking it back from the
/// node that owned it — instead of hearing that the actor was fenced.
#[tokio::test]
async fn a_caller_racing_a_fenced_exit_hears_the_fence() {
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(ScriptedClient::echo()),
    );
    let inner = Arc::new(InMemoryStore::new());
    let hold_next = Arc::new(AtomicBool::new(false));
    let (entered, gate) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let store = FaultStore::new(inner.clone()).on_commit({
        let (hold_next, entered, gate) = (hold_next.clone(), entered.clone(), gate.clone());
        move |_| {
            let hold = hold_next.swap(false, Ordering::SeqCst);
            let (entered, gate) = (entered.clone(), gate.clone());
            async move {
                if hold {
                    entered.notify_one();
                    gate.notified().await;
                }
                Fault::Pass
            }
        }
    });
    let a = runtime(&catalog, Arc::new(store), "a");
    let b = runtime(&catalog, inner.clone(), "b");
    let id = start(&a, "t", "s").await;
    a.send(&id, "one").await.unwrap();
    // B takes the session over; A's idle actor does not know yet.
    b.resume(&id).await.unwrap();
    hold_next.store(true, Ordering::SeqCst);
    let send = |text: &'static str| {
        let (a, id) = (a.clone(), id.clone());
        tokio::spawn(async move { a.send(&id, text).await })
    };
    let first = send("two");
    entered.notified().await;
    // A's actor is held in the commit of "two"; "three" waits in its mailbox meanwhile.
    let second = send("three");
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    gate.notify_one();
    let first = first.await.unwrap().unwrap_err();
    assert_eq!(first.kind(), ErrorKind::Fenced, "{first}");
    let second = match second.await.unwrap() {
        Ok(outcome) => panic!("the racing input ran on the fenced node: {outcome:?}"),
        Err(e) => e,
    };
    assert_eq!(second.kind(), ErrorKind::Fenced, "{second}");
    assert_eq!(second.to_string(), first.to_string());
    let record = inner.load(&id).await.unwrap().unwrap();
    assert_eq!(record.owner.unwrap().name(), "b", "A took the session back");
}

// ---------------------------------------------------------------------------------------------
// API behaviour a production user would find surprising (fixed; kept as regression tests)

/// `stop` is not idempotent: a retried `stop` (its first reply lost) fails with `SessionClosed`,
/// because it must activate the session to reach an actor.
#[tokio::test]
async fn stop_is_idempotent() {
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(ScriptedClient::echo()),
    );
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "t", "s").await;
    sessions.send(&id, "hi").await.unwrap();
    sessions.stop(&id).await.unwrap();
    let again = sessions.stop(&id).await;
    assert!(again.is_ok(), "second stop: {again:?}");
}

/// `cancel` on a session that is not live activates it (new epoch, a task, a config build with
/// credentials) only to answer `false`; from another node that fences the real owner.
#[tokio::test]
async fn cancel_on_a_session_not_live_here_activates_nothing() {
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(ScriptedClient::echo()),
    );
    let store = Arc::new(InMemoryStore::new());
    let sessions = runtime(&catalog, store.clone(), "a");
    let id = start(&sessions, "t", "s").await;
    sessions.send(&id, "hi").await.unwrap();
    assert!(sessions.passivate(&id).await);
    let epoch = store.load(&id).await.unwrap().unwrap().epoch;
    assert!(!sessions.cancel(&id).await.unwrap());
    assert_eq!(store.load(&id).await.unwrap().unwrap().epoch, epoch);
    assert_eq!(sessions.live_count(), 0);
}

/// Graceful `shutdown` passivates mid-step: an in-flight non-idempotent call is abandoned and
/// becomes "in doubt" although nothing crashed; and the node keeps accepting, so the waiting
/// caller's retry reactivates the session on the node being shut down.
#[tokio::test]
async fn graceful_shutdown_lets_the_call_in_flight_finish() {
    let pay = LogTool::new("pay", false).delay(Duration::from_millis(300));
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(one_tool_client("pay")).tool(pay.clone()),
    );
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "t", "s").await;
    let s = sessions.clone();
    let id2 = id.clone();
    let send = tokio::spawn(async move { s.send(&id2, "pay 10").await });
    wait_until(|| pay.count("start:") == 1, "the paid call runs").await;
    sessions.shutdown().await;
    let out = send.await.unwrap();
    let history = sessions.history_all(&id).await.unwrap();
    let (_, content, is_error) = tool_results(&history).remove(0);
    assert!(
        !is_error,
        "graceful shutdown left the paid call in doubt: {content:?} (outcome {out:?})"
    );
}

// ---------------------------------------------------------------------------------------------
// Typed in-doubt outcomes and recorded idempotency keys (issue 14, hole 12)

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

/// An ordinary result carries no doubt, and the key a non-idempotent tool was handed is the one
/// its `ToolStarted` records: `{session}:{answer_seq}:{index}`, the seq of the model's response.
#[tokio::test]
async fn a_started_call_records_the_key_its_tool_was_handed() {
    let pay = LogTool::new("pay", false);
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(one_tool_client("pay")).tool(pay.clone()),
    );
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "t", "s:1").await;
    sessions.send(&id, "pay 10").await.unwrap();
    let history = sessions.history_all(&id).await.unwrap();
    let handed = keys_handed(&pay);
    assert_eq!(started_keys(&history), vec![Some(handed[0].clone())]);
    let answer_seq = history
        .iter()
        .find(|e| matches!(e.payload, EntryPayload::Assistant { .. }))
        .unwrap()
        .seq;
    assert_eq!(handed[0], format!("s:1:{answer_seq}:0"));
    assert_eq!(doubts(&history).len(), 1);
    assert_eq!(doubts(&history)[0].1, None, "a success is not in doubt");
    assert!(history.iter().all(|e| e.payload.in_doubt().is_none()));
}

/// The owner dies while a non-idempotent call runs; the node that resumes the turn records the
/// call `Interrupted`, under the key the tool was handed (and its `ToolStarted` recorded).
#[tokio::test]
async fn an_interrupted_call_is_recorded_in_doubt_under_its_key() {
    let pay = LogTool::new("pay", false).behaviour(Behaviour::Hang);
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(one_tool_client("pay")).tool(pay.clone()),
    );
    let store = Arc::new(InMemoryStore::new());
    let id = crash_during_the_paid_call(&catalog, &store, &pay).await;

    let node_b = runtime(&catalog, store.clone(), "b");
    let out = node_b
        .send(&id, Input::text("pay 10").with_id(iid("in")))
        .await
        .unwrap();
    assert!(out.text().contains("unknown"), "{}", out.text());
    assert_eq!(pay.count("start:"), 1, "not run again");
    let history = node_b.history_all(&id).await.unwrap();
    let doubt = the_doubt(&history);
    assert_eq!(doubt.reason, DoubtReason::Interrupted);
    assert_eq!(doubt.tool, "pay");
    assert_eq!(doubt.idempotency_key, keys_handed(&pay)[0]);
    assert_eq!(started_keys(&history), vec![Some(doubt.idempotency_key)]);
}

/// A call past the tool-call timeout is `TimedOut`; an idempotent tool has no `ToolStarted`, so
/// the in-doubt record is where its key is found.
#[tokio::test]
async fn a_timed_out_call_is_recorded_in_doubt_under_its_key() {
    let slow = LogTool::new("slow", true).behaviour(Behaviour::Hang);
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m").limits(TurnLimits {
            tool_call_timeout_ms: 100,
            ..TurnLimits::default()
        }),
        CatalogEntry::with_client(one_tool_client("slow")).tool(slow.clone()),
    );
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "t", "s").await;
    let out = sessions.send(&id, "slow one").await.unwrap();
    assert!(out.text().contains("timed out"), "{}", out.text());
    let history = sessions.history_all(&id).await.unwrap();
    let doubt = the_doubt(&history);
    assert_eq!(doubt.reason, DoubtReason::TimedOut);
    assert_eq!(doubt.tool, "slow");
    assert_eq!(doubt.idempotency_key, keys_handed(&slow)[0]);
    assert!(started_keys(&history).is_empty(), "idempotent: no start");
}

/// A panicking tool's result is `Panicked`, under the key it was handed.
#[tokio::test]
async fn a_panicked_call_is_recorded_in_doubt_under_its_key() {
    let boom = LogTool::new("boom", false).behaviour(Behaviour::Panic);
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(one_tool_client("boom")).tool(boom.clone()),
    );
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "t", "s").await;
    sessions.send(&id, "boom now").await.unwrap();
    let history = sessions.history_all(&id).await.unwrap();
    let doubt = the_doubt(&history);
    assert_eq!(doubt.reason, DoubtReason::Panicked);
    assert_eq!(doubt.idempotency_key, keys_handed(&boom)[0]);
    assert_eq!(started_keys(&history), vec![Some(doubt.idempotency_key)]);
}

/// A call abandoned at the turn deadline is `TurnEnded`; a call behind it that shares its id
/// (a model may repeat one) never ran, and is "not run", not in doubt.
#[tokio::test]
async fn only_the_call_in_flight_is_in_doubt_when_the_turn_ends() {
    let a = LogTool::new("a", true).behaviour(Behaviour::Hang);
    let b = LogTool::new("b", true);
    let client = two_calls_sharing_one_id();
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m").limits(TurnLimits {
            turn_deadline_ms: 300,
            ..TurnLimits::default()
        }),
        CatalogEntry::with_client(client)
            .tool(a.clone())
            .tool(b.clone()),
    );
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "t", "s").await;
    let err = sessions.send(&id, "go").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert_eq!(b.count("start:"), 0);
    let history = sessions.history_all(&id).await.unwrap();
    let results = doubts(&history);
    assert_eq!(results.len(), 2, "{results:?}");
    let first = results[0]
        .1
        .clone()
        .expect("the call in flight is in doubt");
    assert_eq!(first.reason, DoubtReason::TurnEnded);
    assert_eq!(first.tool, "a");
    assert_eq!(first.idempotency_key, keys_handed(&a)[0]);
    assert_eq!(results[1].1, None, "the second call never ran");
    let (_, content, _) = tool_results(&history).remove(1);
    assert!(content.contains("not run"), "{content:?}");
}

/// A hook that panics in `before_tool` runs after the start of a non-idempotent call is
/// committed, but before the tool: the call never ran, so it is "not run", not in doubt.
#[tokio::test]
async fn a_call_refused_by_a_panicking_before_tool_hook_is_not_in_doubt() {
    struct Explodes;
    #[async_trait]
    impl Hook for Explodes {
        async fn before_tool(&self, _call: &mut ToolCall) -> HookDecision {
            panic!("before_tool hook exploded (test)");
        }
    }
    let pay = LogTool::new("pay", false);
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(one_tool_client("pay"))
            .tool(pay.clone())
            .hook("explodes", Explodes),
    );
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "t", "s").await;
    let err = sessions.send(&id, "pay 10").await.unwrap_err();
    assert!(err.to_string().contains("exploded"), "{err}");
    assert_eq!(pay.count("start:"), 0, "the tool never ran");
    let history = sessions.history_all(&id).await.unwrap();
    assert_eq!(started_keys(&history).len(), 1, "its start was committed");
    assert_eq!(doubts(&history), vec![("pay 10-1".to_string(), None)]);
    let (_, content, _) = tool_results(&history).remove(0);
    assert!(content.contains("not run"), "{content:?}");
}

// ---------------------------------------------------------------------------------------------
// Coverage the engine tests lack

/// Sends racing idle passivation (1 ms idle timeout): every send lands once, none is lost or
/// appended twice, and each gets its own answer.
#[tokio::test]
async fn sends_racing_idle_passivation_land_exactly_once() {
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(ScriptedClient::echo()),
    );
    let store = Arc::new(InMemoryStore::new());
    let sessions = Sessions::builder(catalog)
        .store(store.clone())
        .idle_timeout(Duration::from_millis(1))
        .build()
        .unwrap();
    let id = start(&sessions, "t", "s").await;
    let mut handles = Vec::new();
    for i in 0..40u64 {
        let s = sessions.clone();
        let id = id.clone();
        handles.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_micros(700 * (i % 5))).await;
            s.send(
                &id,
                Input::text(format!("m{i}")).with_id(iid(&format!("in-{i}"))),
            )
            .await
        }));
        if i % 3 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    for (i, h) in handles.into_iter().enumerate() {
        let out = h.await.unwrap().unwrap();
        assert_eq!(out.text(), format!("echo: m{i}"));
    }
    let history = sessions.history_all(&id).await.unwrap();
    let mut inputs = inputs_in(&history);
    assert_eq!(inputs.len(), 40);
    inputs.sort();
    inputs.dedup();
    assert_eq!(inputs.len(), 40, "an input was appended twice");
    wait_until(|| sessions.live_count() == 0, "the session passivates").await;
}

/// Two runtimes sharing one store and one registry: the second cannot activate a session the
/// first holds (no epoch bump, no fencing); once the first passivates, the second takes over.
#[tokio::test]
async fn a_shared_registry_keeps_a_second_runtime_from_activating() {
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(ScriptedClient::echo()),
    );
    let store = Arc::new(InMemoryStore::new());
    let registry = Arc::new(LocalRegistry::new());
    let build = |name: &str| {
        Sessions::builder(catalog.clone())
            .node(node(name))
            .store(store.clone())
            .registry(registry.clone())
            .build()
            .unwrap()
    };
    let (a, b) = (build("a"), build("b"));
    let id = start(&a, "t", "s").await;
    a.send(&id, "one").await.unwrap();
    let epoch = store.load(&id).await.unwrap().unwrap().epoch;
    let err = b.send(&id, "two").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyRegistered, "{err}");
    assert_eq!(store.load(&id).await.unwrap().unwrap().epoch, epoch);
    assert_eq!(b.live_count(), 0, "the refused activation left no slot");
    a.send(&id, "three").await.unwrap();
    assert!(a.passivate(&id).await);
    b.send(&id, "four").await.unwrap();
    assert_eq!(
        store.load(&id).await.unwrap().unwrap().owner,
        Some(node("b"))
    );
    assert_eq!(inputs_in(&b.history_all(&id).await.unwrap()).len(), 3);
}

/// Concurrent resubmissions of one input id while its turn runs: one append, one run, every
/// caller gets the same outcome.
#[tokio::test]
async fn concurrent_resubmissions_of_a_running_input_share_its_outcome() {
    let slow = LogTool::new("slow", true).delay(Duration::from_millis(100));
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(one_tool_client("slow")).tool(slow.clone()),
    );
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "t", "s").await;
    let handles: Vec<_> = (0..5)
        .map(|_| {
            let s = sessions.clone();
            let id = id.clone();
            tokio::spawn(async move {
                s.send(&id, Input::text("slow q").with_id(iid("same")))
                    .await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for h in handles {
        outcomes.push(h.await.unwrap().unwrap());
    }
    assert!(outcomes.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(slow.count("start:"), 1);
    let history = sessions.history_all(&id).await.unwrap();
    assert_eq!(inputs_in(&history), vec!["same"]);
}

/// Cancelling during a tool step lets the tool finish and records its real result before the
/// turn ends as cancelled; every tool_use is answered.
#[tokio::test]
async fn cancel_during_a_tool_step_records_the_tools_result() {
    let slow = LogTool::new("slow", false).delay(Duration::from_millis(150));
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(one_tool_client("slow")).tool(slow.clone()),
    );
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "t", "s").await;
    let s = sessions.clone();
    let id2 = id.clone();
    let send = tokio::spawn(async move { s.send(&id2, "slow q").await });
    wait_until(|| slow.count("start:") == 1, "the tool runs").await;
    assert!(sessions.cancel(&id).await.unwrap());
    let err = send.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled);
    assert_eq!(slow.count("done:"), 1, "the tool was allowed to finish");
    let history = sessions.history_all(&id).await.unwrap();
    let results = tool_results(&history);
    assert_eq!(results.len(), 1);
    assert!(
        !results[0].2,
        "its real result was recorded: {:?}",
        results[0]
    );
    assert_every_tool_use_answered(&history);
    // The next turn is unaffected.
    assert_eq!(
        sessions.send(&id, "after").await.unwrap().text(),
        "quick after"
    );
}

/// `stop` with a running turn and queued inputs: every waiter gets `Cancelled`, each input gets a
/// `TurnEnd`, and nothing runs afterwards.
#[tokio::test]
async fn stop_answers_the_running_and_every_queued_waiter() {
    let slow = LogTool::new("slow", true).delay(Duration::from_millis(300));
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(one_tool_client("slow")).tool(slow.clone()),
    );
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "t", "s").await;
    let mut waiters = Vec::new();
    for text in ["slow 1", "slow 2", "slow 3"] {
        let s = sessions.clone();
        let id = id.clone();
        waiters.push(tokio::spawn(async move { s.send(&id, text).await }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_until(|| slow.count("start:") == 1, "turn 1 runs its tool").await;
    sessions.stop(&id).await.unwrap();
    for w in waiters {
        let err = timeout(Duration::from_secs(2), w)
            .await
            .expect("every waiter answered")
            .unwrap()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
    }
    let history = sessions.history_all(&id).await.unwrap();
    assert_eq!(
        history
            .iter()
            .filter(|e| e.payload.kind_name() == "turn_end")
            .count(),
        3
    );
    assert_every_tool_use_answered(&history);
    assert_eq!(slow.count("start:"), 1, "nothing ran after stop");
}

/// The turn deadline counts the turn's stored run time: a node resuming a turn whose deadline
/// already passed ends it as timed out without another model call.
#[tokio::test]
async fn a_resumed_turn_past_its_deadline_makes_no_model_call() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let slow = ScriptedClient::from_fn(move |_| {
        c.fetch_add(1, Ordering::SeqCst);
        Ok(ModelResponse::text("late"))
    })
    .with_latency(Duration::from_secs(3600));
    let template = ConfigTemplate::new("t", "m").limits(TurnLimits {
        turn_deadline_ms: 200,
        ..TurnLimits::default()
    });
    let store = Arc::new(InMemoryStore::new());
    let node_a = runtime(
        &catalog_with(template.clone(), CatalogEntry::with_client(slow.clone())),
        store.clone(),
        "a",
    );
    let id = start(&node_a, "t", "s").await;
    let a = node_a.clone();
    let id2 = id.clone();
    let send = tokio::spawn(async move { a.send(&id2, Input::text("q").with_id(iid("in"))).await });
    wait_for_entry(&store, &id, "input").await;
    assert!(node_a.kill(&id));
    send.abort();
    spend_turn_budget(&store, &id, 300).await;
    let fast = ScriptedClient::echo();
    let node_b = runtime(
        &catalog_with(template, CatalogEntry::with_client(fast.clone())),
        store.clone(),
        "b",
    );
    let err = node_b
        .send(&id, Input::text("q").with_id(iid("in")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert_eq!(fast.calls(), 0);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

/// Crash with an input queued behind a running turn: the new owner finishes the interrupted turn,
/// then runs the queued input once; its resubmission gets its outcome, and the model never sees
/// it between a tool call and its result.
#[tokio::test]
async fn a_queued_input_survives_a_crash_and_runs_once_after_the_interrupted_turn() {
    let hang = LogTool::new("work", true).behaviour(Behaviour::Hang);
    let fast = LogTool::new("work", true);
    let template = ConfigTemplate::new("t", "m").resume_policy(ResumePolicy::Eager);
    let store = Arc::new(InMemoryStore::new());
    let node_a = runtime(
        &catalog_with(
            template.clone(),
            CatalogEntry::with_client(one_tool_client("work")).tool(hang.clone()),
        ),
        store.clone(),
        "a",
    );
    let id = start(&node_a, "t", "s").await;
    let mut sends = Vec::new();
    for (text, input) in [("work 1", "in-1"), ("work 2", "in-2")] {
        let a = node_a.clone();
        let id = id.clone();
        sends.push(tokio::spawn(async move {
            a.send(&id, Input::text(text).with_id(iid(input))).await
        }));
        wait_until(|| hang.count("start:") == 1, "turn 1 runs its tool").await;
    }
    for _ in 0..400 {
        if store.load(&id).await.unwrap().unwrap().state.queued.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        store.load(&id).await.unwrap().unwrap().state.queued.len(),
        1
    );
    assert!(node_a.kill(&id));
    for s in sends {
        s.abort();
    }

    let node_b = runtime(
        &catalog_with(
            template,
            CatalogEntry::with_client(one_tool_client("work")).tool(fast.clone()),
        ),
        store.clone(),
        "b",
    );
    let two = node_b
        .send(&id, Input::text("work 2").with_id(iid("in-2")))
        .await
        .unwrap();
    assert_eq!(two.text(), "done work 2: work ok");
    let one = node_b
        .send(&id, Input::text("work 1").with_id(iid("in-1")))
        .await
        .unwrap();
    assert_eq!(one.text(), "done work 1: work ok");
    assert!(one.end_seq < two.end_seq, "in order");
    let history = node_b.history_all(&id).await.unwrap();
    assert_eq!(inputs_in(&history), vec!["in-1", "in-2"]);
    assert_every_tool_use_answered(&history);
    assert_eq!(fast.count("start:"), 2, "each turn's call re-ran once on b");
    assert!(!store.load(&id).await.unwrap().unwrap().state.has_work());
}

/// A tiny idle timeout on a multi-threaded runtime: a fresh actor can reach its idle branch
/// before the activating caller's command lands; `send` must still succeed every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_idle_timeout_never_loses_a_send() {
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(ScriptedClient::echo()),
    );
    let sessions = Sessions::builder(catalog)
        .idle_timeout(Duration::ZERO)
        .build()
        .unwrap();
    let id = start(&sessions, "t", "s").await;
    for i in 0..200 {
        let out = sessions.send(&id, format!("m{i}")).await;
        assert!(out.is_ok(), "send {i}: {out:?}");
    }
}

/// A send that arrives while the old actor is still releasing its placement (slow registry)
/// waits for the release, then activates: the old release never removes the new placement.
#[tokio::test]
async fn a_send_during_retirement_keeps_its_new_placement() {
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(ScriptedClient::echo()),
    );
    let registry = Arc::new(SlowRegistry {
        inner: LocalRegistry::new(),
        delay: Duration::from_millis(150),
    });
    let sessions = Sessions::builder(catalog)
        .registry(registry.clone())
        .idle_timeout(Duration::from_millis(20))
        .build()
        .unwrap();
    let id = start(&sessions, "t", "s").await;
    sessions.send(&id, "one").await.unwrap();
    // Retiring: no longer live, placement not yet released.
    wait_until(|| sessions.live_count() == 0, "the actor retires").await;
    assert_eq!(registry.inner.len(), 1);
    let out = sessions.send(&id, "two").await.unwrap();
    assert_eq!(out.text(), "echo: two");
    assert_eq!(sessions.live_count(), 1);
    assert_eq!(
        registry.inner.len(),
        1,
        "the old release removed the new placement"
    );
}

/// Issue 14, hole 3: an eager session whose actor gave up on a store outage (every commit of
/// the answer failed, retries and all) was never resumed on a live node — only a request or a
/// reaper of a dead node's sessions would have brought it back. It is resumed locally, with a
/// backoff, once the store answers again; a lazy session waits for its next request.
#[tokio::test]
async fn an_eager_session_whose_actor_failed_on_a_store_outage_is_resumed_here() {
    let catalog = TemplateCatalog::new()
        .with(
            ConfigTemplate::new("eager", "m").resume_policy(ResumePolicy::Eager),
            CatalogEntry::with_client(ScriptedClient::echo()),
        )
        .unwrap()
        .with(
            ConfigTemplate::new("lazy", "m"),
            CatalogEntry::with_client(ScriptedClient::echo()),
        )
        .unwrap();
    let inner = Arc::new(InMemoryStore::new());
    let down = Arc::new(AtomicBool::new(false));
    let failed_commits = Arc::new(AtomicUsize::new(0));
    let (d, f) = (down.clone(), failed_commits.clone());
    // The outage: every commit of a model's answer fails while `down` is set; inputs commit.
    let store = FaultStore::new(inner.clone()).on_commit(move |call| {
        let answer = call
            .batch
            .entries
            .iter()
            .any(|e| matches!(e.payload, EntryPayload::Assistant { .. }));
        std::future::ready(if answer && d.load(Ordering::SeqCst) {
            f.fetch_add(1, Ordering::SeqCst);
            Fault::Fail(Error::Unavailable {
                backend: "fault store",
                message: "the database is down".into(),
            })
        } else {
            Fault::Pass
        })
    });
    let sessions = Sessions::builder(catalog)
        .node(node("a"))
        .store(Arc::new(store))
        .restart_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .build()
        .unwrap();
    let eager = start(&sessions, "eager", "e").await;
    let lazy = start(&sessions, "lazy", "l").await;
    down.store(true, Ordering::SeqCst);
    for id in [&eager, &lazy] {
        let r = timeout(Duration::from_secs(30), sessions.send(id, "hello"))
            .await
            .expect("send returns");
        assert!(
            r.is_err(),
            "the answer cannot be committed during the outage"
        );
    }
    // Local resumes keep failing while the store is down, backing off.
    let before = failed_commits.load(Ordering::SeqCst);
    wait_until(
        || failed_commits.load(Ordering::SeqCst) > before,
        "a local resume tries again during the outage",
    )
    .await;
    down.store(false, Ordering::SeqCst);
    // No request: the eager session's turn finishes on its own.
    for _ in 0..1000 {
        if inner
            .entries(&eager, 0, 100)
            .await
            .unwrap()
            .iter()
            .any(|e| e.payload.kind_name() == "turn_end")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let history = inner.entries(&eager, 0, 100).await.unwrap();
    let kinds: Vec<&str> = history.iter().map(|e| e.payload.kind_name()).collect();
    assert_eq!(
        kinds,
        ["input", "assistant", "turn_end"],
        "the interrupted turn ran to its end once"
    );
    assert!(!inner.load(&eager).await.unwrap().unwrap().is_resumable());
    // The lazy one is still mid-turn: its next request resumes it.
    let lazy_kinds: Vec<String> = inner
        .entries(&lazy, 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.payload.kind_name().to_string())
        .collect();
    assert_eq!(lazy_kinds, ["input"], "a lazy session waits for a request");
    assert!(!sessions.is_live(&lazy));
}

/// Issue 14, hole 4: a store call that never answers (a paused database, a partition without a
/// reset) wedged the actor's commit, and the session with it, for as long as the socket lived.
/// Every store call is bounded: the hung commit becomes a retryable timeout, the engine confirms
/// it did not land and retries, and the caller gets its answer.
#[tokio::test]
async fn a_store_call_that_never_answers_is_bounded_and_the_turn_goes_on() {
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(ScriptedClient::echo()),
    );
    let inner = Arc::new(InMemoryStore::new());
    let hang_once = Arc::new(AtomicBool::new(true));
    let h = hang_once.clone();
    let store = Arc::new(FaultStore::new(inner.clone()).on_commit(move |_| {
        std::future::ready(if h.swap(false, Ordering::SeqCst) {
            Fault::Hang
        } else {
            Fault::Pass
        })
    }));
    let sessions = Sessions::builder(catalog)
        .node(node("a"))
        .store(store.clone())
        .store_call_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let id = start(&sessions, "t", "s").await;
    let out = timeout(Duration::from_secs(20), sessions.send(&id, "hi"))
        .await
        .expect("a hung store call does not wedge the session")
        .expect("the turn completes once the store answers");
    assert!(store.has_hung(), "the first commit hung");
    assert_eq!(out.text(), "echo: hi");
    assert_eq!(
        inputs_in(&inner.entries(&id, 0, 100).await.unwrap()).len(),
        1
    );
}

/// Issue 14, hole 11: a turn's deadline was counted from its start on the old owner's wall
/// clock, so a node whose clock ran ahead of the old owner's (here by two hours) ended a moved
/// turn as timed out the moment it took it over. The deadline now counts the run time the turn's
/// state records, measured on monotonic clocks.
#[tokio::test]
async fn a_moved_turn_keeps_its_deadline_whatever_the_old_owners_wall_clock() {
    let catalog = catalog_with(
        ConfigTemplate::new("t", "m"),
        CatalogEntry::with_client(ScriptedClient::echo().with_latency(Duration::from_millis(300))),
    );
    let inner = Arc::new(InMemoryStore::new());
    let a = runtime(&catalog, inner.clone(), "a");
    let id = start(&a, "t", "s").await;
    let (a2, id2) = (a.clone(), id.clone());
    let caller =
        tokio::spawn(async move { a2.send(&id2, Input::text("hi").with_id(iid("x"))).await });
    let mut state = None;
    for _ in 0..400 {
        let record = inner.load(&id).await.unwrap().unwrap();
        if record.state.turn.is_some() {
            state = Some(record.state);
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut state = state.expect("the turn started");
    // a crashes mid-call; its wall clock was two hours behind the next owner's.
    assert!(a.kill(&id));
    caller.abort();
    let turn = state.turn.as_mut().unwrap();
    assert_eq!(
        turn.ran_ms,
        Some(0),
        "the run time is recorded from the start"
    );
    turn.started_at_ms -= 2 * 3600 * 1000;
    assert!(inner.overwrite_state_bytes(&id, codec::encode(BlobKind::TurnState, &state).unwrap()));
    let b = runtime(&catalog, inner.clone(), "b");
    let out = timeout(
        Duration::from_secs(20),
        b.send(&id, Input::text("hi").with_id(iid("x"))),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(out.status, TurnStatus::Completed, "{out:?}");
    assert_eq!(out.text(), "echo: hi");
}
