//! Defects found in review (fixed), and API behaviour a production user would have
//! found surprising: each stays as a regression test.

use super::*;

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
