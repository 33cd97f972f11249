//! `WAIT` durability against a real primary + replica pair that each test starts itself
//! (`redis-server` on free loopback ports, data in a temp dir, killed on drop).
//!
//! Skipped by name when `redis-server` is not on PATH, unless `NORMANDY_REQUIRE_BACKENDS=1`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use normandy_core::{
    CatalogEntry, CommitAck, CommitBatch, ConfigTemplate, ContentBlock, Entry, EntryPayload,
    ErrorKind, Input, InputId, NewSession, NodeId, ResumePolicy, ScriptedClient, SessionId,
    SessionStore, Sessions, TemplateCatalog, TurnState,
};
use normandy_store_redis::{RedisStore, RedisStoreConfig};
use normandy_tests::redis_server::{Server, have_redis_server, pair};

async fn store(primary: &Server, timeout: Duration) -> RedisStore {
    let config = RedisStoreConfig::new(&primary.url())
        .unwrap()
        .prefix("wait-test")
        .wait(1, timeout)
        .wait_connections(4);
    RedisStore::connect(config).await.expect("connect")
}

/// Runs `call` again while it fails with `DurabilityNotMet`, for up to 30 s: once a replica is
/// back, the first `WAIT`s can still miss their short timeout on a loaded machine, and retrying
/// such a failure (with the same batch or input id) is what a caller is told to do.
async fn while_not_durable<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = normandy_core::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match call().await {
            Ok(v) => return v,
            Err(e)
                if e.kind() == ErrorKind::DurabilityNotMet
                    || e.inner().kind() == ErrorKind::DurabilityNotMet =>
            {
                assert!(Instant::now() < deadline, "{what}: still not durable: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what}: {e:?}"),
        }
    }
}

fn input_entry(seq: u64, input: &str) -> Entry {
    Entry {
        seq,
        parent: (seq > 1).then(|| seq - 1),
        at_ms: 1,
        payload: EntryPayload::Input {
            input_id: InputId::new(input).unwrap(),
            content: vec![ContentBlock::text(format!("input {input}"))],
        },
    }
}

fn batch(entries: Vec<Entry>) -> CommitBatch {
    CommitBatch {
        entries,
        state: TurnState::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_wait_for_a_replica_and_fail_closed_without_one() {
    if !have_redis_server("commits_wait_for_a_replica_and_fail_closed_without_one") {
        return;
    }
    let (primary, replica) = pair().await;
    let wait = Duration::from_millis(300);
    let store = store(&primary, wait).await;
    let id = SessionId::new("s-wait").unwrap();
    let node = NodeId::new("n", 1).unwrap();
    store
        .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
        .await
        .unwrap();
    let epoch = store.activate(&id, &node).await.unwrap().epoch;

    // Replica up: commits are acknowledged.
    for seq in 1..=3u64 {
        let ack = store
            .commit(
                &id,
                epoch,
                seq - 1,
                &batch(vec![input_entry(seq, &format!("in-{seq}"))]),
            )
            .await
            .expect("commit with a live replica");
        assert_eq!(ack, CommitAck::Applied { seq });
    }

    // Replica gone: the commit fails closed, within the WAIT timeout (plus slack for the call).
    replica.kill().await;
    let b4 = batch(vec![input_entry(4, "in-4")]);
    let started = Instant::now();
    let err = store.commit(&id, epoch, 3, &b4).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::DurabilityNotMet, "{err}");
    assert!(err.is_retryable());
    assert!(err.to_string().contains("0 of 1"), "{err}");
    assert!(took >= wait, "WAIT returned before its timeout: {took:?}");
    assert!(took < wait + Duration::from_secs(2), "commit took {took:?}");

    // Fail closed is not roll back: the primary holds the write (documented in the crate docs).
    assert_eq!(store.load(&id).await.unwrap().unwrap().seq, 4);

    // Another handle (another process) retrying the same input is not told "duplicate" while
    // the original lacks its replica: a caller would take that as done (issue 14, hole 7).
    let other = store_again(&primary, wait).await;
    let err = other.commit(&id, epoch, 3, &b4).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DurabilityNotMet, "{err}");

    // Still no replica: the engine's retry of the same batch fails closed again...
    let err = store.commit(&id, epoch, 3, &b4).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DurabilityNotMet, "{err}");

    // ...and once a replica is back, the same retry is confirmed (not a DuplicateInput), with
    // the entry stored once.
    let replica = Server::start(Some(primary.port)).await;
    replica.wait_linked(&primary, 1).await;
    let ack = while_not_durable("retry confirmed", || store.commit(&id, epoch, 3, &b4)).await;
    assert_eq!(ack, CommitAck::Applied { seq: 4 });
    let entries = store.entries(&id, 0, 100).await.unwrap();
    assert_eq!(
        entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );

    // The replica has it too.
    let replica_store = RedisStore::connect(
        RedisStoreConfig::new(&replica.url())
            .unwrap()
            .prefix("wait-test"),
    )
    .await
    .unwrap();
    assert_eq!(replica_store.load(&id).await.unwrap().unwrap().seq, 4);

    // With the replica back, a retry from another handle gets the plain answer: the input is
    // a duplicate at its original seq.
    assert_eq!(
        other.commit(&id, epoch, 3, &b4).await.unwrap(),
        CommitAck::DuplicateInput {
            input_id: InputId::new("in-4").unwrap(),
            seq: 4
        }
    );
    drop(replica);
    drop(primary);
}

async fn store_again(primary: &Server, timeout: Duration) -> RedisStore {
    store(primary, timeout).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_only_retry_after_durability_not_met_is_confirmed() {
    if !have_redis_server("a_state_only_retry_after_durability_not_met_is_confirmed") {
        return;
    }
    let (primary, replica) = pair().await;
    let store = store(&primary, Duration::from_millis(200)).await;
    let id = SessionId::new("s-state").unwrap();
    store
        .create(NewSession::bare(id.clone(), ResumePolicy::Eager))
        .await
        .unwrap();
    let epoch = store
        .activate(&id, &NodeId::new("n", 1).unwrap())
        .await
        .unwrap()
        .epoch;
    store
        .commit(&id, epoch, 0, &batch(vec![input_entry(1, "a")]))
        .await
        .unwrap();

    // An entry without an input id: a plain retry would be a Conflict (seq moved), which the
    // engine does not retry; the confirm path answers Applied instead.
    replica.kill().await;
    let answer = Entry {
        seq: 2,
        parent: Some(1),
        at_ms: 2,
        payload: EntryPayload::Assistant {
            message: normandy_core::Message::assistant("hi"),
            stop_reason: normandy_core::StopReason::EndTurn,
            usage: Default::default(),
            call: Default::default(),
            incomplete: false,
        },
    };
    let b = batch(vec![answer]);
    assert_eq!(
        store.commit(&id, epoch, 1, &b).await.unwrap_err().kind(),
        ErrorKind::DurabilityNotMet
    );
    let replica = Server::start(Some(primary.port)).await;
    replica.wait_linked(&primary, 1).await;
    assert_eq!(
        while_not_durable("state-only retry", || store.commit(&id, epoch, 1, &b)).await,
        CommitAck::Applied { seq: 2 }
    );
    // A different batch at the same position is still a Conflict: confirmation is exact.
    let mut other = b.clone();
    other.entries[0].at_ms = 3;
    let err = store.commit(&id, epoch, 1, &other).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_during_a_replica_outage_is_not_reported_done() {
    if !have_redis_server("a_send_during_a_replica_outage_is_not_reported_done") {
        return;
    }
    let (primary, replica) = pair().await;
    let store: Arc<dyn SessionStore> = Arc::new(store(&primary, Duration::from_millis(200)).await);
    let catalog = TemplateCatalog::new()
        .with(
            ConfigTemplate::new("echo", "scripted"),
            CatalogEntry::with_client(ScriptedClient::echo()),
        )
        .unwrap();
    let sessions = Sessions::builder(catalog)
        .store(store.clone())
        .build()
        .unwrap();
    let id = sessions.start("echo").await.unwrap();
    let outcome = sessions
        .send(&id, "hello")
        .await
        .expect("send with a replica");
    assert_eq!(outcome.text(), "echo: hello");

    replica.kill().await;
    let input_id = InputId::new("during-outage").unwrap();
    let sent = tokio::time::timeout(
        Duration::from_secs(60),
        sessions.send(&id, Input::text("are you there").with_id(input_id.clone())),
    )
    .await
    .expect("send must fail, not hang");
    let err = sent.expect_err("a send whose input is not durable must not be reported done");
    assert!(
        matches!(
            err.kind(),
            ErrorKind::DurabilityNotMet | ErrorKind::Unavailable
        ),
        "unexpected error kind: {err}"
    );

    // With a replica back, resubmitting the same input id completes it, exactly once.
    let replica = Server::start(Some(primary.port)).await;
    replica.wait_linked(&primary, 1).await;
    let outcome = tokio::time::timeout(
        Duration::from_secs(60),
        while_not_durable("resend after the outage", || {
            sessions.send(&id, Input::text("are you there").with_id(input_id.clone()))
        }),
    )
    .await
    .expect("resend must not hang");
    assert_eq!(outcome.text(), "echo: are you there");
    let inputs = sessions
        .history_all(&id)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.payload.input_id() == Some(&input_id))
        .count();
    assert_eq!(inputs, 1, "the input was appended more than once");
    sessions.shutdown().await;
}
