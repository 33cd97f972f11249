//! Sessions around their turns: passivation, subscriptions, corrupt state, eager resume,
//! closing, hooks, mailbox and queue bounds, credentials, resubmission.

use super::*;

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
