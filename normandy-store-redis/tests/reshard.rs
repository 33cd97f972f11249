//! Resharding under load: a session's slot moves to another primary of a Redis Cluster
//! (`CLUSTER SETSLOT … IMPORTING/MIGRATING`, `MIGRATE` of its keys, `SETSLOT … NODE`) while
//! commits to it keep coming, and the store keeps working: every commit applies exactly once,
//! in order, whichever node held the slot at the time (`ASK`/`TRYAGAIN` during the move, `MOVED`
//! after it, followed by the cluster client).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use normandy_core::{
    ActiveTurn, CommitAck, CommitBatch, ContentBlock, Entry, EntryPayload, ErrorKind, InputId,
    NewSession, NodeId, OwnerFilter, Phase, ResumePolicy, SessionId, SessionStore, TurnState,
    Usage,
};
use normandy_store_redis::{RedisStore, RedisStoreConfig};
use normandy_tests::backends::{
    redis_cluster_url, redis_cluster_urls, skip, skip_reason, unique_name,
};
use redis::aio::MultiplexedConnection;

fn one_input(seq: u64) -> CommitBatch {
    CommitBatch {
        entries: vec![Entry {
            seq,
            parent: (seq > 1).then(|| seq - 1),
            at_ms: 1,
            payload: EntryPayload::Input {
                input_id: InputId::new(format!("in-{seq}")).unwrap(),
                content: vec![ContentBlock::text("x")],
            },
        }],
        // Work pending, so the (eager) session stays in the resumable index across the move.
        state: TurnState {
            phase: Phase::CallingModel,
            turn: Some(ActiveTurn {
                input_id: InputId::new(format!("in-{seq}")).unwrap(),
                input_seq: seq,
                steps: 1,
                usage: Usage::default(),
                started_at_ms: 1,
                answer_seq: None,
                ran_ms: None,
            }),
            ..TurnState::default()
        },
    }
}

async fn node(port: u16) -> MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// `(port, node id)` of the primary serving `slot`, and of another primary.
async fn owner_and_other(
    any: &mut MultiplexedConnection,
    slot: u16,
) -> ((u16, String), (u16, String)) {
    let text: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(any)
        .await
        .unwrap();
    let mut owner = None;
    let mut others = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if !f[2].contains("master") || f[2].contains("fail") {
            continue;
        }
        let port: u16 = f[1]
            .split('@')
            .next()
            .unwrap()
            .rsplit_once(':')
            .unwrap()
            .1
            .parse()
            .unwrap();
        let serves = f[8..].iter().any(|r| {
            let r = r.trim_start_matches('[');
            match r.split_once('-') {
                Some((a, b)) => {
                    a.parse::<u16>().is_ok_and(|a| a <= slot)
                        && b.parse::<u16>().is_ok_and(|b| slot <= b)
                }
                None => r.parse::<u16>() == Ok(slot),
            }
        });
        if serves {
            owner = Some((port, f[0].to_string()));
        } else {
            others.push((port, f[0].to_string()));
        }
    }
    (owner.expect("a primary serves the slot"), others.remove(0))
}

/// Commits `seq` with retries on retryable errors (as the engine's commit retry does: same
/// batch, so a commit whose fate was unknown is confirmed rather than applied twice).
async fn commit(store: &RedisStore, id: &SessionId, epoch: u64, seq: u64) {
    let batch = one_input(seq);
    for attempt in 0.. {
        match store.commit(id, epoch, seq - 1, &batch).await {
            Ok(CommitAck::Applied { seq: got }) => {
                assert_eq!(got, seq);
                return;
            }
            Ok(other) => panic!("commit {seq}: {other:?}"),
            Err(e) if e.is_retryable() && attempt < 50 => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("commit {seq} (attempt {attempt}): {e} ({:?})", e.kind()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_keeps_committing_while_its_slot_moves_to_another_primary() {
    let (Some(url), Some(_)) = (redis_cluster_url().await, redis_cluster_urls().await) else {
        skip(
            "a_session_keeps_committing_while_its_slot_moves",
            &skip_reason(),
        );
        return;
    };
    let prefix = unique_name("reshard");
    let store = Arc::new(
        RedisStore::connect(RedisStoreConfig::new(&url).unwrap().prefix(&prefix))
            .await
            .unwrap(),
    );
    let id = SessionId::new("moving").unwrap();
    let me = NodeId::new("n", 1).unwrap();
    store
        .create(NewSession::bare(id.clone(), ResumePolicy::Eager))
        .await
        .unwrap();
    let epoch = store.activate(&id, &me).await.unwrap().epoch;
    let slot = normandy_redis::slot(format!("{{{prefix}:{id}}}:s").as_bytes());
    let mut any = node(7000).await;
    let ((src_port, src_id), (dst_port, dst_id)) = owner_and_other(&mut any, slot).await;

    // Commits run on their own task through the whole move.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, id, stop) = (store.clone(), id.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) || seq < 20 {
                seq += 1;
                commit(&store, &id, epoch, seq).await;
            }
            seq
        })
    };
    // Wait for some commits on the old primary before moving.
    for _ in 0..500 {
        if store.load(&id).await.unwrap().unwrap().seq >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut src = node(src_port).await;
    let mut dst = node(dst_port).await;
    let _: () = redis::cmd("CLUSTER")
        .arg("SETSLOT")
        .arg(slot)
        .arg("IMPORTING")
        .arg(&src_id)
        .query_async(&mut dst)
        .await
        .unwrap();
    let _: () = redis::cmd("CLUSTER")
        .arg("SETSLOT")
        .arg(slot)
        .arg("MIGRATING")
        .arg(&dst_id)
        .query_async(&mut src)
        .await
        .unwrap();
    // Move the keys one at a time with pauses, so commits meet the slot half moved.
    loop {
        let keys: Vec<Vec<u8>> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(1)
            .query_async(&mut src)
            .await
            .unwrap();
        if keys.is_empty() {
            break;
        }
        let _: () = redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(dst_port)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query_async(&mut src)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    for port in [dst_port, src_port] {
        let mut con = node(port).await;
        let _: () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("NODE")
            .arg(&dst_id)
            .query_async(&mut con)
            .await
            .unwrap();
    }
    let moved_at = store.load(&id).await.unwrap().unwrap().seq;
    stop.store(true, Ordering::Relaxed);
    let last = tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .expect("the writer finishes")
        .expect("no commit failed");
    assert!(
        last > moved_at,
        "commits continued after the move ({moved_at} then {last})"
    );

    // The slot is served by the new primary, and everything committed is there, in order.
    let served: i64 = redis::cmd("CLUSTER")
        .arg("COUNTKEYSINSLOT")
        .arg(slot)
        .query_async(&mut dst)
        .await
        .unwrap();
    assert!(
        served >= 3,
        "the session's keys live on the new primary ({served})"
    );
    let record = store.load(&id).await.unwrap().unwrap();
    assert_eq!(record.seq, last);
    let entries = store.entries(&id, 0, usize::MAX).await.unwrap();
    assert_eq!(entries.len() as u64, last);
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
    }
    // Its index bucket moved with it: the session is still listed as resumable.
    let page = store
        .list_resumable(&OwnerFilter::Node(me.clone()), None, 10)
        .await
        .unwrap();
    assert_eq!(
        page.sessions
            .iter()
            .map(|s| s.id.clone())
            .collect::<Vec<_>>(),
        vec![id.clone()]
    );
    // A commit from a stale epoch is still fenced on the new primary.
    let err = store
        .commit(&id, epoch - 1, last, &one_input(last + 1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Fenced);
    store.purge().await.unwrap();
}
