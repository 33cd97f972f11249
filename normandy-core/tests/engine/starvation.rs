//! Issue 14, hole 9: panics and starvation.

use super::*;

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
