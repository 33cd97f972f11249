//! Turn-engine tests: multi-step turns, crashes at every boundary, in-doubt tool calls, fencing,
//! idempotent input, input modes, limits, passivation, subscriptions.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use normandy_core::*;
use serde_json::json;

mod support;
use support::{Fault, FaultStore};

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

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn multi_step_turn_runs_tools_and_commits_every_boundary() {
    let f = fixture(template(), true);
    let store = Arc::new(InMemoryStore::new());
    let sessions = runtime(&f.catalog, store.clone(), "a");
    let id = start(&sessions, "s1").await;
    let outcome = sessions
        .send(&id, Input::text("q1").with_id(iid("in-1")))
        .await
        .unwrap();
    assert_eq!(outcome.status, TurnStatus::Completed);
    assert_eq!(outcome.text(), "answer to q1 after c({\"x\":3})");
    assert_eq!(outcome.usage.input_tokens, 10);
    assert_eq!(f.a.runs(), vec!["q1-a"]);
    assert_eq!(f.b.runs(), vec!["q1-b"]);
    assert_eq!(f.c.runs(), vec!["q1-c"]);
    let history = sessions.history_all(&id).await.unwrap();
    let kinds: Vec<_> = history.iter().map(|e| e.payload.kind_name()).collect();
    assert_eq!(
        kinds,
        vec![
            "input",
            "assistant",
            "tool_result",
            "tool_result",
            "assistant",
            "tool_result",
            "assistant",
            "turn_end"
        ]
    );
    // seqs are contiguous and parents chain
    for (i, e) in history.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
        assert_eq!(e.parent, (i > 0).then_some(i as u64));
    }
    let record = store.load(&id).await.unwrap().unwrap();
    assert_eq!(record.seq, 8);
    assert!(!record.state.has_work());
    assert_eq!(outcome.end_seq, 8);
}

/// Runs one turn to completion with a crash at commit `n`, then rebuilds the session on a new
/// node from the same store and checks the turn finished with no recorded tool result re-run.
async fn crash_and_resume(n: usize, point: CrashPoint, c_idempotent: bool) -> Option<()> {
    let f = fixture(template(), c_idempotent);
    let inner = Arc::new(InMemoryStore::new());
    let crashing = crashing_store(&inner, n, point);
    let node_a = runtime(&f.catalog, crashing.clone(), "a");
    let id = start(&node_a, "s").await;
    let send = {
        let node_a = node_a.clone();
        let id = id.clone();
        tokio::spawn(async move {
            node_a
                .send(&id, Input::text("q").with_id(iid("in-1")))
                .await
        })
    };
    tokio::select! {
        _ = crashing.hung() => {}
        r = tokio::time::sleep(Duration::from_secs(5)) => panic!("no crash at commit {n}: {r:?}"),
    }
    if !crashing.has_hung() {
        return None;
    }
    // The process dies: its task is aborted mid-commit, its caller never hears back.
    assert!(node_a.kill(&id));
    send.abort();

    let runs_before = (f.a.runs(), f.b.runs(), f.c.runs());
    let node_b = runtime(&f.catalog, inner.clone(), "b");
    // Eager sessions in a turn are listed for the reaper; idle ones are not.
    let page = inner
        .list_resumable(&OwnerFilter::Any, None, 10)
        .await
        .unwrap();
    let had_work = inner.load(&id).await.unwrap().unwrap().state.has_work();
    assert_eq!(
        page.sessions.len(),
        usize::from(had_work),
        "commit {n} {point:?}"
    );
    // Resubmitting the same input after the crash continues the turn (or returns its outcome).
    let outcome = node_b
        .send(&id, Input::text("q").with_id(iid("in-1")))
        .await
        .unwrap_or_else(|e| panic!("commit {n} {point:?}: {e}"));
    assert_eq!(
        outcome.text(),
        "answer to q after c({\"x\":3})",
        "commit {n} {point:?}"
    );

    let history = node_b.history_all(&id).await.unwrap();
    assert_eq!(inputs_in(&history), vec!["in-1"], "input once, commit {n}");
    assert_eq!(count_kind(&history, "turn_end"), 1, "commit {n} {point:?}");
    assert_eq!(
        count_kind(&history, "tool_result"),
        3,
        "commit {n} {point:?}"
    );

    // No call whose result was recorded ran again; each call ran at most once more than
    // recorded before the crash (an idempotent call without a result re-runs with its id).
    let recorded: Vec<String> = history
        .iter()
        .filter_map(|e| match &e.payload {
            EntryPayload::ToolResult { call_id, .. } => Some(call_id.clone()),
            _ => None,
        })
        .collect();
    for (tool, before) in [
        (&f.a, &runs_before.0),
        (&f.b, &runs_before.1),
        (&f.c, &runs_before.2),
    ] {
        let after = tool.runs();
        for call in &after {
            let times = after.iter().filter(|c| *c == call).count();
            assert!(
                times <= 2,
                "{call} ran {times} times (commit {n} {point:?})"
            );
            if times == 2 {
                assert!(tool.idempotent, "non-idempotent {call} re-ran");
                assert_eq!(before.iter().filter(|c| *c == call).count(), 1);
            }
        }
    }
    assert_eq!(recorded.len(), 3);
    Some(())
}

#[tokio::test]
async fn crash_at_every_boundary_then_resume_never_reruns_recorded_tools() {
    // One turn commits: input, assistant(a,b), result a, result b, assistant(c), result c,
    // assistant+turn_end: 7 commits. Crash at each, before and after it is applied.
    let mut crashed = 0;
    for point in [CrashPoint::AfterApply, CrashPoint::BeforeApply] {
        for n in 1..=7 {
            if crash_and_resume(n, point, true).await.is_some() {
                crashed += 1;
            }
        }
    }
    assert_eq!(crashed, 14);
}

#[tokio::test]
async fn interrupted_model_call_is_reissued() {
    // Crash after the input commit: the model call was in flight; the new node issues it.
    let f = fixture(template(), true);
    let inner = Arc::new(InMemoryStore::new());
    let node_a = runtime(&f.catalog, inner.clone(), "a");
    let id = start(&node_a, "s").await;
    // Hold the first model call forever by killing right after the input is accepted.
    let slow = ScriptedClient::from_fn(|_| Ok(ModelResponse::text("never")))
        .with_latency(Duration::from_secs(3600));
    let slow_catalog = TemplateCatalog::new()
        .with(template(), CatalogEntry::with_client(slow.clone()))
        .unwrap();
    let node_slow = runtime(&slow_catalog, inner.clone(), "slow");
    let send = {
        let node_slow = node_slow.clone();
        let id = id.clone();
        tokio::spawn(async move {
            node_slow
                .send(&id, Input::text("q").with_id(iid("in-1")))
                .await
        })
    };
    // Wait until the input is committed and the model call is in flight.
    for _ in 0..200 {
        if inner.load(&id).await.unwrap().unwrap().seq == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let record = inner.load(&id).await.unwrap().unwrap();
    assert_eq!(record.state.phase, Phase::CallingModel);
    assert!(node_slow.kill(&id));
    send.abort();
    let calls_before = f.client.calls();
    node_a.resume(&id).await.unwrap();
    let outcome = node_a
        .send(&id, Input::text("q").with_id(iid("in-1")))
        .await
        .unwrap();
    assert_eq!(outcome.status, TurnStatus::Completed);
    assert_eq!(
        f.client.calls() - calls_before,
        3,
        "model re-issued, then two more steps"
    );
    assert_eq!(slow.calls(), 0, "the interrupted call never answered");
}

#[tokio::test]
async fn non_idempotent_call_in_doubt_is_not_rerun() {
    // c is non-idempotent: its start is committed before it runs. Crash after that commit
    // (commit 5 is ToolStarted for c when c is non-idempotent: input, asst, ra, rb, asst(c) is 5;
    // started(c) is 6) and after c ran but before its result was committed (commit 7 dropped).
    for (n, point) in [(6, CrashPoint::AfterApply), (7, CrashPoint::BeforeApply)] {
        let f = fixture(template(), false);
        let inner = Arc::new(InMemoryStore::new());
        let crashing = crashing_store(&inner, n, point);
        let node_a = runtime(&f.catalog, crashing.clone(), "a");
        let id = start(&node_a, "s").await;
        let send = {
            let node_a = node_a.clone();
            let id = id.clone();
            tokio::spawn(async move {
                node_a
                    .send(&id, Input::text("q").with_id(iid("in-1")))
                    .await
            })
        };
        crashing.hung().await;
        node_a.kill(&id);
        send.abort();
        let ran_before = f.c.runs().len();
        let node_b = runtime(&f.catalog, inner.clone(), "b");
        let outcome = node_b
            .send(&id, Input::text("q").with_id(iid("in-1")))
            .await
            .unwrap();
        assert_eq!(
            f.c.runs().len(),
            ran_before,
            "in-doubt call must not run again (n={n})"
        );
        let history = node_b.history_all(&id).await.unwrap();
        let c_result = history
            .iter()
            .find_map(|e| match &e.payload {
                EntryPayload::ToolResult {
                    call_id,
                    content,
                    is_error,
                    ..
                } if call_id == "q-c" => Some((content.clone(), *is_error)),
                _ => None,
            })
            .unwrap();
        assert!(c_result.1, "in-doubt result is an error result");
        assert!(c_result.0.contains("unknown"), "{}", c_result.0);
        assert_eq!(count_kind(&history, "tool_started"), 1);
        // Typed, and under the key its start recorded: reconcilable from history alone.
        let doubt = history.iter().find_map(|e| e.payload.in_doubt()).unwrap();
        assert_eq!(doubt.reason, DoubtReason::Interrupted, "n={n}");
        assert_eq!(doubt.tool, "c");
        let started_key = history.iter().find_map(|e| match &e.payload {
            EntryPayload::ToolStarted {
                idempotency_key, ..
            } => idempotency_key.clone(),
            _ => None,
        });
        assert_eq!(started_key.as_deref(), Some(doubt.idempotency_key.as_str()));
        assert!(outcome.text().contains("is unknown"), "{}", outcome.text());
    }
}

#[tokio::test]
async fn stale_owner_is_fenced_and_writes_nothing() {
    let f = fixture(template(), true);
    let store = Arc::new(InMemoryStore::new());
    let node_a = runtime(&f.catalog, store.clone(), "a");
    let node_b = runtime(&f.catalog, store.clone(), "b");
    let id = start(&node_a, "s").await;
    node_a.send(&id, "first").await.unwrap();
    let seq_a = store.load(&id).await.unwrap().unwrap().seq;
    // Node B takes over (as after a partition): A's epoch is now stale.
    node_b.resume(&id).await.unwrap();
    let err = node_a.send(&id, "from a").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Fenced, "{err}");
    let record = store.load(&id).await.unwrap().unwrap();
    assert_eq!(record.seq, seq_a, "the fenced writer wrote nothing");
    assert_eq!(record.owner.unwrap().name(), "b");
    // A's actor stopped at once.
    assert_eq!(node_a.live_count(), 0);
    node_b.send(&id, "from b").await.unwrap();
}

#[tokio::test]
async fn resubmitted_input_returns_original_outcome() {
    let f = fixture(template(), true);
    let sessions = runtime(&f.catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "s").await;
    let first = sessions
        .send(&id, Input::text("q").with_id(iid("x")))
        .await
        .unwrap();
    let again = sessions
        .send(&id, Input::text("q").with_id(iid("x")))
        .await
        .unwrap();
    assert_eq!(first, again);
    // Also after passivation (the outcome comes from the store).
    assert!(sessions.passivate(&id).await);
    let third = sessions
        .send(&id, Input::text("q").with_id(iid("x")))
        .await
        .unwrap();
    assert_eq!(first, third);
    let history = sessions.history_all(&id).await.unwrap();
    assert_eq!(inputs_in(&history), vec!["x"]);
    assert_eq!(f.c.runs().len(), 1);
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

#[tokio::test]
async fn input_during_a_turn_is_queued_and_runs_in_order() {
    let (catalog, _) = slow_fixture(InputMode::Queue);
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "s").await;
    let s1 = sessions.clone();
    let id1 = id.clone();
    let first = tokio::spawn(async move { s1.send(&id1, "one").await });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let second = sessions.send(&id, "two").await.unwrap();
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.text(), "done one");
    assert_eq!(second.text(), "done two");
    assert!(first.end_seq < second.end_seq);
    // The queued input was accepted (committed) during the first turn, and the model never saw
    // it between a tool call and its result.
    let history = sessions.history_all(&id).await.unwrap();
    let kinds: Vec<_> = history.iter().map(|e| e.payload.kind_name()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "input").count(), 2);
    assert_eq!(kinds.iter().filter(|k| **k == "turn_end").count(), 2);
    let conv = Conversation::from_entries(&history);
    let texts: Vec<_> = conv
        .messages()
        .iter()
        .filter(|m| m.role == Role::User && !m.text().is_empty())
        .map(|m| m.text())
        .collect();
    assert_eq!(texts, vec!["one", "two"]);
}

#[tokio::test]
async fn reject_mode_says_busy_and_interrupt_mode_cancels() {
    let (catalog, _) = slow_fixture(InputMode::Reject);
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "s").await;
    let s1 = sessions.clone();
    let id1 = id.clone();
    let first = tokio::spawn(async move { s1.send(&id1, "one").await });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let err = sessions.send(&id, "two").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy);
    assert!(err.is_retryable());
    first.await.unwrap().unwrap();

    let (catalog, _) = slow_fixture(InputMode::Interrupt);
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "s").await;
    let s1 = sessions.clone();
    let id1 = id.clone();
    let first = tokio::spawn(async move { s1.send(&id1, "one").await });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let second = sessions.send(&id, "two").await.unwrap();
    assert_eq!(second.text(), "done two");
    let err = first.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled);
}

#[tokio::test]
async fn max_steps_deadline_and_cancel_end_the_turn() {
    // A model that always wants another tool call.
    let looping = ScriptedClient::from_fn(|req| {
        let n = req.messages.len();
        Ok(ModelResponse::tool_call(
            format!("call-{n}"),
            "a",
            json!({}),
        ))
    });
    let mut slow = CountingTool::new("a", true);
    slow.delay = Duration::from_millis(100);
    let limits = TurnLimits {
        max_steps: 3,
        ..TurnLimits::default()
    };
    let catalog = TemplateCatalog::new()
        .with(
            ConfigTemplate::new("t", "m").limits(limits),
            CatalogEntry::with_client(looping.clone()).tool(CountingTool::new("a", true)),
        )
        .unwrap()
        .with(
            ConfigTemplate::new("slow", "m").limits(TurnLimits {
                turn_deadline_ms: 250,
                ..TurnLimits::default()
            }),
            CatalogEntry::with_client(looping).tool(slow),
        )
        .unwrap();
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "s").await;
    let err = sessions.send(&id, "go").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MaxSteps, "{err}");
    let history = sessions.history_all(&id).await.unwrap();
    assert_eq!(count_kind(&history, "assistant"), 3);
    // Every tool call has a result, even the one the guard stopped.
    assert_eq!(count_kind(&history, "tool_result"), 3);

    let slow_id = sessions.start("slow").await.unwrap();
    let started = std::time::Instant::now();
    let err = sessions.send(&slow_id, "go").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));

    let s2 = sessions.clone();
    let id2 = slow_id.clone();
    let running = tokio::spawn(async move { s2.send(&id2, "again").await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(sessions.cancel(&slow_id).await.unwrap());
    let err = running.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled);
}

#[tokio::test]
async fn oversized_input_is_refused_and_nothing_is_stored() {
    let f = fixture(
        template().limits(TurnLimits {
            max_input_bytes: 1024,
            ..TurnLimits::default()
        }),
        true,
    );
    let store = Arc::new(InMemoryStore::new());
    let sessions = runtime(&f.catalog, store.clone(), "a");
    let id = start(&sessions, "s").await;
    let err = sessions.send(&id, "x".repeat(2000)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InputTooLarge);
    assert!(
        err.to_string().contains("2000") && err.to_string().contains("s"),
        "{err}"
    );
    assert_eq!(store.load(&id).await.unwrap().unwrap().seq, 0);
}

#[tokio::test]
async fn idle_sessions_passivate_and_come_back() {
    let f = fixture(template(), true);
    let store = Arc::new(InMemoryStore::new());
    let sessions = Sessions::builder(f.catalog.clone())
        .store(store.clone())
        .idle_timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let id = start(&sessions, "s").await;
    sessions.send(&id, "one").await.unwrap();
    assert_eq!(sessions.live_count(), 1);
    for _ in 0..100 {
        if sessions.live_count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sessions.live_count(), 0, "idle session passivated");
    let epoch = store.load(&id).await.unwrap().unwrap().epoch;
    let out = sessions.send(&id, "two").await.unwrap();
    assert_eq!(out.text(), "answer to two after c({\"x\":3})");
    assert_eq!(store.load(&id).await.unwrap().unwrap().epoch, epoch + 1);
    assert_eq!(
        inputs_in(&sessions.history_all(&id).await.unwrap()).len(),
        2
    );
}

#[tokio::test]
async fn subscribers_get_replay_then_live_events_once() {
    let f = fixture(template(), true);
    let sessions = runtime(&f.catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "s").await;
    sessions.send(&id, "one").await.unwrap();
    let mut events = sessions.subscribe(&id, 2).await.unwrap();
    sessions.send(&id, "two").await.unwrap();
    let mut seqs = Vec::new();
    let mut finished = 0;
    let mut tool_starts = 0;
    while finished == 0 {
        match tokio::time::timeout(Duration::from_secs(5), events.next()).await {
            Ok(Some(Ok(TurnEvent::Entry(e)))) => seqs.push(e.seq),
            Ok(Some(Ok(TurnEvent::TurnFinished(o)))) => {
                assert_eq!(o.text(), "answer to two after c({\"x\":3})");
                finished += 1;
            }
            Ok(Some(Ok(TurnEvent::ToolCallStarted { .. }))) => tool_starts += 1,
            Ok(Some(Ok(_))) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        seqs,
        (3..=16).collect::<Vec<_>>(),
        "each seq once, in order"
    );
    assert_eq!(tool_starts, 3);
}

#[tokio::test]
async fn corrupt_state_is_a_typed_error_and_history_needs_no_credentials() {
    let f = fixture(template().credential("api"), true);
    let store = Arc::new(InMemoryStore::new());
    let creds = StaticCredentials::new(Credentials::new().with("api", "secret"));
    let sessions = Sessions::builder(f.catalog.clone())
        .store(store.clone())
        .credentials(Arc::new(creds))
        .build()
        .unwrap();
    let id = start(&sessions, "s").await;
    sessions.send(&id, "one").await.unwrap();
    sessions.passivate(&id).await;

    // A node without the credential (or the template) can still read the history.
    let bare = Sessions::builder(TemplateCatalog::new())
        .store(store.clone())
        .build()
        .unwrap();
    assert_eq!(bare.history_all(&id).await.unwrap().len(), 8);
    let err = bare.send(&id, "two").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TemplateNotFound, "{err}");

    store.overwrite_state_bytes(&id, b"NM\x01\x02garbage".to_vec());
    let err = sessions.send(&id, "two").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("session s"), "{err}");
    // Nothing was overwritten: entries are intact.
    assert_eq!(bare.history_all(&id).await.unwrap().len(), 8);
}

#[tokio::test]
async fn resume_interrupted_continues_eager_turns_without_a_request() {
    let f = fixture(template(), true);
    let inner = Arc::new(InMemoryStore::new());
    let crashing = crashing_store(&inner, 4, CrashPoint::AfterApply);
    let node_a = runtime(&f.catalog, crashing.clone(), "a");
    let id = start(&node_a, "s").await;
    let n2 = node_a.clone();
    let id2 = id.clone();
    let send = tokio::spawn(async move { n2.send(&id2, "q").await });
    crashing.hung().await;
    node_a.kill(&id);
    send.abort();

    let node_b = runtime(&f.catalog, inner.clone(), "b");
    let owner_a = OwnerFilter::Node(NodeId::new("a", 1).unwrap());
    assert_eq!(node_b.resume_interrupted(&owner_a).await.unwrap(), 1);
    for _ in 0..200 {
        if !inner.load(&id).await.unwrap().unwrap().state.has_work() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let history = node_b.history_all(&id).await.unwrap();
    assert_eq!(count_kind(&history, "turn_end"), 1);
    assert!(
        inner
            .list_resumable(&OwnerFilter::Any, None, 10)
            .await
            .unwrap()
            .sessions
            .is_empty()
    );
}

#[tokio::test]
async fn closed_sessions_refuse_input_but_keep_history() {
    let f = fixture(template(), true);
    let sessions = runtime(&f.catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "s").await;
    sessions.send(&id, "one").await.unwrap();
    sessions.stop(&id).await.unwrap();
    let err = sessions.send(&id, "two").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SessionClosed, "{err}");
    assert_eq!(sessions.history_all(&id).await.unwrap().len(), 8);
    let err = sessions.send(&sid("nope"), "x").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

struct Guard;

#[async_trait]
impl Hook for Guard {
    async fn before_model(&self, request: &mut ModelRequest) -> HookDecision {
        request.system = Some("guarded".into());
        HookDecision::Continue
    }
    async fn before_tool(&self, call: &mut ToolCall) -> HookDecision {
        if call.name == "b" {
            return HookDecision::Veto("b is not allowed".into());
        }
        call.input = json!({"x": 100});
        HookDecision::Continue
    }
    async fn after_tool(&self, _call: &ToolCall, output: &mut ToolOutput) {
        output.content.push_str(" [checked]");
    }
}

#[tokio::test]
async fn hooks_edit_and_veto_calls() {
    let a = CountingTool::new("a", true);
    let b = CountingTool::new("b", true);
    let c = CountingTool::new("c", true);
    let saw_system = Arc::new(AtomicBool::new(false));
    let saw = saw_system.clone();
    let client = ScriptedClient::from_fn(move |req| {
        if req.system.as_deref() == Some("guarded") {
            saw.store(true, Ordering::SeqCst);
        }
        script_fn(req)
    });
    let catalog = TemplateCatalog::new()
        .with(
            template(),
            CatalogEntry::with_client(client)
                .tool(a.clone())
                .tool(b.clone())
                .tool(c.clone())
                .hook("guard", Guard),
        )
        .unwrap();
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "s").await;
    sessions.send(&id, "q").await.unwrap();
    assert!(saw_system.load(Ordering::SeqCst));
    assert!(b.runs().is_empty(), "vetoed tool never ran");
    let history = sessions.history_all(&id).await.unwrap();
    let results: Vec<(String, String, bool)> = history
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
        .collect();
    assert_eq!(results[0].1, "a({\"x\":100}) [checked]");
    assert!(results[1].2 && results[1].1.contains("b is not allowed"));
}

#[tokio::test]
async fn a_full_mailbox_fails_with_overloaded_after_the_timeout() {
    // Slow commits keep the actor busy, so its one-slot mailbox stays full.
    let f = fixture(template(), true);
    let slow = Arc::new(FaultStore::default().on_commit(|_| async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        Fault::Pass
    }));
    let sessions = Sessions::builder(f.catalog.clone())
        .store(slow)
        .mailbox(1)
        .send_timeout(Duration::from_millis(20))
        .build()
        .unwrap();
    let id = start(&sessions, "s").await;
    sessions.resume(&id).await.unwrap();
    let sends: Vec<_> = (0..20)
        .map(|i| {
            let s = sessions.clone();
            let id = id.clone();
            tokio::spawn(async move { s.send(&id, format!("m{i}")).await })
        })
        .collect();
    let mut overloaded = 0;
    let mut ok = 0;
    for s in sends {
        match s.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) if e.kind() == ErrorKind::Overloaded => {
                assert!(e.is_retryable());
                assert!(e.to_string().contains("mailbox"), "{e}");
                overloaded += 1;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(overloaded > 0, "some sends must be refused");
    assert!(ok > 0, "some sends must be accepted");
    // Every accepted input ran exactly once; refused ones left no trace.
    let history = sessions.history_all(&id).await.unwrap();
    assert_eq!(inputs_in(&history).len(), ok);
    assert_eq!(count_kind(&history, "turn_end"), ok);
}

#[tokio::test]
async fn the_input_queue_is_bounded() {
    let (catalog, _) = slow_fixture(InputMode::Queue);
    let mut catalog = catalog;
    catalog
        .register(
            ConfigTemplate::new("t", "m").limits(TurnLimits {
                max_queued_inputs: 2,
                ..TurnLimits::default()
            }),
            {
                let client = ScriptedClient::from_fn(|req| {
                    Ok(if req.last_tool_results().is_empty() {
                        ModelResponse::tool_call(
                            format!("{}-a", req.messages.len()),
                            "a",
                            json!({}),
                        )
                    } else {
                        ModelResponse::text("done")
                    })
                });
                let mut slow = CountingTool::new("a", true);
                slow.delay = Duration::from_millis(100);
                CatalogEntry::with_client(client).tool(slow)
            },
        )
        .unwrap();
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "s").await;
    let first = {
        let s = sessions.clone();
        let id = id.clone();
        tokio::spawn(async move { s.send(&id, "one").await })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    let queued: Vec<_> = (0..2)
        .map(|i| {
            let s = sessions.clone();
            let id = id.clone();
            tokio::spawn(async move { s.send(&id, format!("q{i}")).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let err = sessions.send(&id, "too many").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Overloaded, "{err}");
    first.await.unwrap().unwrap();
    for q in queued {
        q.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn client_given_credentials_stay_in_process() {
    let catalog = TemplateCatalog::new()
        .with(
            ConfigTemplate::new("t", "m").credential("key"),
            CatalogEntry::new(|_, creds| {
                let key = creds.expose("key")?.to_string();
                Ok(Arc::new(ScriptedClient::from_fn(move |_| {
                    Ok(ModelResponse::text(format!("key has {} chars", key.len())))
                })) as Arc<dyn LlmClient>)
            }),
        )
        .unwrap();
    let store = Arc::new(InMemoryStore::new());
    let sessions = Sessions::builder(catalog.clone())
        .store(store.clone())
        .credentials_from_client()
        .build()
        .unwrap();
    let id = sessions
        .start_with(
            "t",
            StartOptions {
                id: None,
                credentials: Some(Credentials::new().with("key", "sk-canary-777")),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        sessions.send(&id, "hi").await.unwrap().text(),
        "key has 13 chars"
    );
    let raw = store.raw_bytes();
    assert!(
        !raw.windows(9).any(|w| w == b"sk-canary"),
        "secret reached the store"
    );
    // Another runtime (another process) cannot rebuild it: the error says why.
    let other = Sessions::builder(catalog)
        .store(store.clone())
        .credentials_from_client()
        .build()
        .unwrap();
    let err = other.send(&id, "hi").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Credentials, "{err}");
    assert!(err.to_string().contains("FromClient"), "{err}");
    // Without credentials_from_client, passing credentials at start is a config error.
    let plain = Sessions::builder(
        TemplateCatalog::new()
            .with(
                ConfigTemplate::new("t", "m"),
                CatalogEntry::with_client(ScriptedClient::echo()),
            )
            .unwrap(),
    )
    .build()
    .unwrap();
    let err = plain
        .start_with(
            "t",
            StartOptions {
                id: None,
                credentials: Some(Credentials::new()),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
}

/// Issue 14, hole 2: a caller that gave no input id still learns it from a retryable error,
/// and resending with it applies the input once.
#[tokio::test]
async fn a_retryable_send_error_carries_the_generated_input_id_to_resend_with() {
    let f = fixture(template(), true);
    let down = Arc::new(AtomicBool::new(true));
    let gate = down.clone();
    let store = Arc::new(FaultStore::default().on_commit(move |call| {
        // Only the input's own commit fails: creating and activating the session work.
        let input = call
            .batch
            .entries
            .iter()
            .any(|e| matches!(e.payload, EntryPayload::Input { .. }));
        let fail = input && gate.load(Ordering::SeqCst);
        async move {
            if fail {
                Fault::Fail(Error::Unavailable {
                    backend: "test store",
                    message: "connection reset".into(),
                })
            } else {
                Fault::Pass
            }
        }
    }));
    let sessions = runtime(&f.catalog, store, "a");
    let id = start(&sessions, "s").await;
    let err = sessions.send(&id, "q").await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    let input_id = err
        .input_id()
        .cloned()
        .unwrap_or_else(|| panic!("no input id to resend with: {err}"));
    assert!(err.to_string().contains(input_id.as_str()), "{err}");
    down.store(false, Ordering::SeqCst);
    let out = sessions
        .send(&id, Input::text("q").with_id(input_id.clone()))
        .await
        .unwrap();
    assert_eq!(out.input_id, input_id);
    let again = sessions
        .send(&id, Input::text("q").with_id(input_id.clone()))
        .await
        .unwrap();
    assert_eq!(out, again);
    let history = sessions.history_all(&id).await.unwrap();
    assert_eq!(inputs_in(&history), vec![input_id.as_str().to_string()]);
}

/// Issue 14, hole 2: resubmitting an input to a session closed since returns its outcome.
#[tokio::test]
async fn a_resubmission_to_a_closed_session_gets_its_original_outcome() {
    let f = fixture(template(), true);
    let sessions = runtime(&f.catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "s").await;
    let first = sessions
        .send(&id, Input::text("q").with_id(iid("x")))
        .await
        .unwrap();
    sessions.stop(&id).await.unwrap();
    let again = sessions
        .send(&id, Input::text("q").with_id(iid("x")))
        .await
        .expect("the original outcome, not SessionClosed");
    assert_eq!(first, again);
    let err = sessions
        .send(&id, Input::text("new").with_id(iid("y")))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SessionClosed, "{err}");
    assert_eq!(f.c.runs().len(), 1);
}

/// Issue 14, hole 2: an input over the size limit is refused before the session is activated,
/// so it never bumps the epoch (which would fence a live owner elsewhere).
#[tokio::test]
async fn an_oversized_input_never_activates_the_session() {
    let f = fixture(template(), true);
    let store = Arc::new(InMemoryStore::new());
    let sessions = runtime(&f.catalog, store.clone(), "a");
    let id = start(&sessions, "s").await;
    let epoch = store.load(&id).await.unwrap().unwrap().epoch;
    let big = "x".repeat(template().limits.max_input_bytes + 1);
    let err = sessions.send(&id, big.as_str()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InputTooLarge, "{err}");
    assert!(
        !sessions.is_live(&id),
        "the refused input activated the session"
    );
    assert_eq!(
        store.load(&id).await.unwrap().unwrap().epoch,
        epoch,
        "the refused input bumped the epoch"
    );
    assert!(sessions.history_all(&id).await.unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Issue 14, hole 9: panics and starvation

/// Panics after every tool call of the input "q1" and before every model call of "q2": a hook
/// that always panics for one turn, so a crash loop would show as the tool running again.
struct PanickingHook;

#[async_trait]
impl Hook for PanickingHook {
    async fn before_model(&self, request: &mut ModelRequest) -> HookDecision {
        if request.last_user_text().as_deref() == Some("q2") {
            panic!("before_model hook blew up");
        }
        HookDecision::Continue
    }

    async fn after_tool(&self, call: &ToolCall, _output: &mut ToolOutput) {
        if call.id.starts_with("q1") {
            panic!("after_tool hook blew up");
        }
    }
}

#[tokio::test]
async fn a_panicking_hook_fails_its_turn_and_the_session_keeps_working() {
    let a = CountingTool::new("a", true);
    let client = ScriptedClient::from_fn(|req| {
        Ok(if req.last_tool_results().is_empty() {
            let text = req.last_user_text().unwrap_or_default();
            ModelResponse::tool_call(format!("{text}-a"), "a", json!({}))
        } else {
            ModelResponse::text("done")
        })
    });
    let catalog = TemplateCatalog::new()
        .with(
            template(),
            CatalogEntry::with_client(client)
                .tool(a.clone())
                .hook("boom", PanickingHook),
        )
        .unwrap();
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "hooked-session").await;
    for (input, hook_point) in [("q1", "after_tool"), ("q2", "before_model")] {
        let sent = tokio::time::timeout(Duration::from_secs(20), sessions.send(&id, input))
            .await
            .expect("a panicking hook must end its turn, not hang the caller");
        let err = sent.expect_err("a panicking hook must fail its turn");
        let text = err.to_string();
        assert!(
            text.contains("hook \"boom\"")
                && text.contains(hook_point)
                && text.contains("hooked-session"),
            "the error names the hook, where it panicked and the session: {text}"
        );
    }
    let out = sessions
        .send(&id, "q3")
        .await
        .expect("the session still works");
    assert_eq!(out.text(), "done");
    assert_eq!(
        a.runs(),
        vec!["q1-a".to_string(), "q3-a".to_string()],
        "no tool call ran twice (and q2's turn failed before any)"
    );
    let history = sessions.history_all(&id).await.unwrap();
    assert_eq!(count_kind(&history, "turn_end"), 3);
}

/// Opens once the test adds permits: a tool call that runs exactly as long as a test wants.
#[derive(Clone)]
struct GatedTool {
    gate: Arc<tokio::sync::Semaphore>,
    started: Arc<AtomicBool>,
}

#[async_trait]
impl Tool for GatedTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: "a".into(),
            description: "waits for the test".into(),
            input_schema: json!({"type": "object"}),
        }
    }

    async fn call(&self, _input: serde_json::Value, _ctx: ToolContext) -> ToolOutput {
        self.started.store(true, Ordering::SeqCst);
        let _permit = self.gate.acquire().await;
        ToolOutput::ok("opened")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_commands_does_not_starve_the_running_turn() {
    let mut slow = CountingTool::new("a", true);
    slow.delay = Duration::from_millis(150);
    // Inputs "fill…" are answered at once; any other calls the slow tool first.
    let client = ScriptedClient::from_fn(|req| {
        let text = req.last_user_text().unwrap_or_default();
        Ok(if text.starts_with("fill") {
            ModelResponse::text("filled")
        } else if req.last_tool_results().is_empty() {
            ModelResponse::tool_call(format!("{text}-a"), "a", json!({}))
        } else {
            ModelResponse::text(format!("done {text}"))
        })
    });
    let catalog = TemplateCatalog::new()
        .with(
            template(),
            CatalogEntry::with_client(client).tool(slow.clone()),
        )
        .unwrap();
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = start(&sessions, "s").await;
    // A long history makes each subscription (which replays it) cost the actor more than its
    // sender, as a real reconnect storm does: the flooders then keep the mailbox full.
    for i in 0..300 {
        sessions.send(&id, format!("fill {i}")).await.unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let subscribed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // More subscriptions in flight than the mailbox holds, so it never empties while the
    // flooders collect their replies. One refused for a full mailbox is part of the flood.
    let flooders: Vec<_> = (0..8)
        .map(|_| {
            let (sessions, id) = (sessions.clone(), id.clone());
            let (stop, subscribed) = (stop.clone(), subscribed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let batch = (0..16).map(|_| sessions.subscribe(&id, 0));
                    let ok = futures::future::join_all(batch)
                        .await
                        .iter()
                        .filter(|r| r.is_ok())
                        .count();
                    subscribed.fetch_add(ok, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Let the flood build up before the turn starts.
    while subscribed.load(Ordering::Relaxed) < 100 {
        tokio::task::yield_now().await;
    }
    let before_turn = subscribed.load(Ordering::Relaxed);
    let turn = tokio::time::timeout(Duration::from_secs(30), sessions.send(&id, "q")).await;
    let during_turn = subscribed.load(Ordering::Relaxed) - before_turn;
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.await.unwrap();
    }
    let out = turn
        .expect("a 150 ms tool turn starved by a flood of subscribe commands for 30 s")
        .unwrap();
    assert_eq!(out.text(), "done q");
    assert_eq!(slow.runs(), vec!["q-a".to_string()]);
    assert!(
        during_turn > 0,
        "no subscription was served while the turn ran: the flood never overlapped it"
    );
}

#[tokio::test]
async fn waiters_for_one_input_are_bounded() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let started = Arc::new(AtomicBool::new(false));
    let tool = GatedTool {
        gate: gate.clone(),
        started: started.clone(),
    };
    let client = ScriptedClient::from_fn(|req| {
        Ok(if req.last_tool_results().is_empty() {
            ModelResponse::tool_call("call-a", "a", json!({}))
        } else {
            ModelResponse::text("done")
        })
    });
    let catalog = TemplateCatalog::new()
        .with(template(), CatalogEntry::with_client(client).tool(tool))
        .unwrap();
    let sessions = Sessions::builder(catalog)
        .store(Arc::new(InMemoryStore::new()))
        .mailbox(256)
        .build()
        .unwrap();
    let id = start(&sessions, "s").await;
    let send = |sessions: &Sessions| {
        let (sessions, id) = (sessions.clone(), id.clone());
        tokio::spawn(async move { sessions.send(&id, Input::text("q").with_id(iid("x"))).await })
    };
    let original = send(&sessions);
    while !started.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    const RESUBMISSIONS: usize = 70;
    // The original's waiter counts: 64 waiters in all, so 63 resubmissions wait beside it.
    const REFUSED: usize = RESUBMISSIONS - 63;
    let resubmissions: Vec<_> = (0..RESUBMISSIONS).map(|_| send(&sessions)).collect();
    let polled = tokio::time::timeout(Duration::from_secs(10), async {
        while resubmissions.iter().filter(|h| h.is_finished()).count() < REFUSED {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let finished = resubmissions.iter().filter(|h| h.is_finished()).count();
    gate.add_permits(RESUBMISSIONS + 1);
    assert!(
        polled.is_ok(),
        "{finished} of {RESUBMISSIONS} resubmissions answered while the turn ran: waiters \
         for one input are unbounded"
    );
    let first = original.await.unwrap().expect("the original completes");
    let mut refused = 0;
    for r in resubmissions {
        match r.await.unwrap() {
            Ok(out) => assert_eq!(out, first),
            Err(e) if e.kind() == ErrorKind::Overloaded => {
                assert!(e.is_retryable(), "{e}");
                assert!(e.to_string().contains("wait"), "{e}");
                refused += 1;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(refused, REFUSED);
    let history = sessions.history_all(&id).await.unwrap();
    assert_eq!(inputs_in(&history), vec!["x"]);
}

/// Polls until `n` inputs of `id` are committed (a turn starts with its input's commit).
async fn inputs_committed(sessions: &Sessions, id: &SessionId, n: usize) {
    for _ in 0..2000 {
        if inputs_in(&sessions.history_all(id).await.unwrap()).len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{n} inputs were never committed");
}

/// Issue 14, hole 6: a cancel that names a turn is a no-op for any other, so a cancel re-sent
/// after a retryable failure never cancels the turn that started since.
#[tokio::test]
async fn a_cancel_naming_a_turn_leaves_every_other_turn_running() {
    let (catalog, _) = slow_fixture(InputMode::Queue);
    let sessions = runtime(&catalog, Arc::new(InMemoryStore::new()), "a");
    let id = sessions.start("t").await.unwrap();
    let done = sessions
        .send(&id, Input::text("first").with_id(iid("first")))
        .await
        .unwrap();
    assert_eq!(done.text(), "done first");
    let s2 = sessions.clone();
    let id2 = id.clone();
    let second = tokio::spawn(async move {
        s2.send(&id2, Input::text("second").with_id(iid("second")))
            .await
    });
    // Wait until the second turn runs (its input is committed and the tool is in flight).
    inputs_committed(&sessions, &id, 2).await;
    // A late retry of a cancel meant for the first turn: nothing happens to the second.
    assert!(!sessions.cancel_turn(&id, &iid("first")).await.unwrap());
    assert_eq!(second.await.unwrap().unwrap().text(), "done second");

    let s3 = sessions.clone();
    let id3 = id.clone();
    let third = tokio::spawn(async move {
        s3.send(&id3, Input::text("third").with_id(iid("third")))
            .await
    });
    inputs_committed(&sessions, &id, 3).await;
    assert!(sessions.cancel_turn(&id, &iid("third")).await.unwrap());
    let err = third.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Cancelled, "{err}");
}
