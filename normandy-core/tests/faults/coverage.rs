//! Behaviour the engine tests do not cover.

use super::*;

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
