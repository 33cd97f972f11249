//! Group commit: commits of many sessions sent at once share script calls, and each still gets
//! exactly its own outcome (applied, fenced, conflict, duplicate, or its own error).

use std::sync::Arc;

use normandy_core::{
    CommitAck, CommitBatch, ContentBlock, Entry, EntryPayload, ErrorKind, InputId, NewSession,
    NodeId, ResumePolicy, SessionId, SessionStore, TurnState,
};
use normandy_store_redis::{RedisStore, RedisStoreConfig};
use normandy_tests::backends::{redis_url, skip, skip_reason, unique_name};

fn one_input(seq: u64, input: &str) -> CommitBatch {
    CommitBatch {
        entries: vec![Entry {
            seq,
            parent: (seq > 1).then(|| seq - 1),
            at_ms: 1,
            payload: EntryPayload::Input {
                input_id: InputId::new(input).unwrap(),
                content: vec![ContentBlock::text("x")],
            },
        }],
        state: TurnState::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commits_of_many_sessions_each_get_their_own_outcome() {
    let Some(url) = redis_url().await else {
        skip("concurrent_commits_of_many_sessions", &skip_reason());
        return;
    };
    let store = Arc::new(
        RedisStore::connect(
            RedisStoreConfig::new(&url)
                .unwrap()
                .prefix(unique_name("group")),
        )
        .await
        .unwrap(),
    );
    // A key of the wrong type where session "broken"'s input ids should be: its commit fails
    // on its own (a terminal Corrupt naming the key, nothing written), the rest of its batch
    // does not notice.
    let mut con = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let node = NodeId::new("n", 1).unwrap();
    const N: usize = 200;
    let mut epochs = Vec::new();
    for i in 0..N {
        let id = SessionId::new(format!("g{i}")).unwrap();
        store
            .create(NewSession::bare(id.clone(), ResumePolicy::Eager))
            .await
            .unwrap();
        let epoch = store.activate(&id, &node).await.unwrap().epoch;
        if i % 5 == 3 {
            store
                .commit(&id, epoch, 0, &one_input(1, &format!("pre-{i}")))
                .await
                .unwrap();
        }
        epochs.push((id, epoch));
    }
    let broken = SessionId::new("g4").unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("{{{}:{broken}}}:i", store.prefix()))
        .arg("not a hash")
        .query_async(&mut con)
        .await
        .unwrap();

    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let mut tasks = Vec::new();
    for (i, (id, epoch)) in epochs.iter().cloned().enumerate() {
        let (store, barrier) = (store.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let (epoch, expected, batch) = match i % 5 {
                0 | 4 => (epoch, 0, one_input(1, &format!("in-{i}"))),
                1 => (epoch + 7, 0, one_input(1, &format!("in-{i}"))),
                2 => (epoch, 5, one_input(6, &format!("in-{i}"))),
                _ => (epoch, 1, one_input(2, &format!("pre-{i}"))),
            };
            barrier.wait().await;
            (
                i,
                id.clone(),
                store.commit(&id, epoch, expected, &batch).await,
            )
        }));
    }
    for t in tasks {
        let (i, id, result) = t.await.unwrap();
        match (i % 5, result) {
            (4, Err(e)) if i == 4 => {
                assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
                let key = format!("{{{}:{broken}}}:i", store.prefix());
                assert!(e.to_string().contains(&format!("redis key {key}")), "{e}");
            }
            (0 | 4, Ok(ack)) => assert_eq!(ack, CommitAck::Applied { seq: 1 }, "{id}"),
            (1, Err(e)) => assert_eq!(e.kind(), ErrorKind::Fenced, "{id}: {e}"),
            (2, Err(e)) => assert_eq!(e.kind(), ErrorKind::Conflict, "{id}: {e}"),
            (3, Ok(ack)) => assert_eq!(
                ack,
                CommitAck::DuplicateInput {
                    input_id: InputId::new(format!("pre-{i}")).unwrap(),
                    seq: 1
                },
                "{id}"
            ),
            (k, other) => panic!("{id} (kind {k}): unexpected {other:?}"),
        }
    }
    // What is stored matches the outcomes.
    for (i, (id, _)) in epochs.iter().enumerate() {
        let rec = store.load(id).await.unwrap().unwrap();
        let want = match i % 5 {
            _ if i == 4 => 0,
            0 | 3 | 4 => 1,
            _ => 0,
        };
        assert_eq!(rec.seq, want, "{id}");
        assert_eq!(
            store.entries(id, 0, 10).await.unwrap().len() as u64,
            want,
            "{id}"
        );
    }
    // The Conflict commits recorded nothing: their input ids are still free.
    for (i, (id, epoch)) in epochs.iter().enumerate().filter(|(i, _)| i % 5 == 2) {
        let ack = store
            .commit(id, *epoch, 0, &one_input(1, &format!("in-{i}")))
            .await
            .unwrap();
        assert_eq!(ack, CommitAck::Applied { seq: 1 }, "{id}");
    }
    store.purge().await.unwrap();
}
