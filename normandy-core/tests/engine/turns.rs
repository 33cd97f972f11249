//! Turns end to end: tool steps, a crash at each boundary and the resume, fencing, queued
//! inputs, the limits that end a turn.

use super::*;

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
