//! Typed in-doubt outcomes and recorded idempotency keys (issue 14, hole 12).

use super::*;

// ---------------------------------------------------------------------------------------------
// Typed in-doubt outcomes and recorded idempotency keys (issue 14, hole 12)

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
