//! Single writer across handles (invariant 1): a reopened handle's activation fences the older
//! one, and racing commits on one epoch have exactly one winner.

use std::sync::Arc;

use normandy_core::{CommitAck, Entry, ErrorKind, ResumePolicy};

use super::{applied, batch, busy, err, idle, input, node, ok, reply, sid, snapshot, start};
use crate::harness::StoreHarness;

/// Precondition: none. Two handles (`store()` and `reopen()`) each activate one session: the
/// older epoch's commits are `Fenced` and write nothing, the newer one's apply, and both
/// handles see the same data.
pub async fn older_handle_is_fenced_after_reopen_activates(h: Arc<dyn StoreHarness>) {
    let first = h.store();
    let second = h.reopen().await;
    let id = sid("two-handles");
    let e1 = start(&*first, &id, ResumePolicy::Eager, &node("a")).await;
    let e2 = ok(
        second.activate(&id, &node("b")).await,
        "activate on the second handle",
    )
    .epoch;
    assert!(e2 > e1);
    err(
        first
            .commit(&id, e1, 0, &batch(vec![input(1, "in-a")], busy("in-a", 1)))
            .await,
        ErrorKind::Fenced,
        "commit through the older handle's epoch",
    );
    applied(
        second
            .commit(&id, e2, 0, &batch(vec![input(1, "in-b"), reply(2)], idle()))
            .await,
        2,
        "commit with the newer epoch",
    );
    let seen = snapshot(&*first, &id).await;
    assert_eq!(seen, snapshot(&*second, &id).await, "the handles disagree");
    assert_eq!(seen.0.seq, 2);
    assert_eq!(seen.1, vec![input(1, "in-b"), reply(2)]);
    err(
        first
            .commit(&id, e1, 2, &batch(vec![input(3, "in-a")], idle()))
            .await,
        ErrorKind::Fenced,
        "the older epoch at the current seq",
    );
    assert_eq!(snapshot(&*second, &id).await, seen, "a fenced commit wrote");
}

/// Precondition: none. Many tasks, across both handles, commit different batches at the same
/// (epoch, seq), three rounds: each round exactly one is `Applied`, every other is `Conflict`,
/// and the stored entries are the winners' batches.
pub async fn racing_commits_exactly_one_applies(h: Arc<dyn StoreHarness>) {
    const RACERS: usize = 16;
    let stores = [h.store(), h.reopen().await];
    let id = sid("race");
    let epoch = start(&*stores[0], &id, ResumePolicy::Lazy, &node("a")).await;
    let mut expected: Vec<Entry> = Vec::new();
    let mut seq = 0;
    for round in 0..3 {
        let barrier = Arc::new(tokio::sync::Barrier::new(RACERS));
        let mut tasks = Vec::new();
        for i in 0..RACERS {
            let store = stores[i % 2].clone();
            let (id, barrier) = (id.clone(), barrier.clone());
            let b = batch(
                vec![input(seq + 1, &format!("r{round}-{i}")), reply(seq + 2)],
                busy(&format!("r{round}-{i}"), seq + 1),
            );
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let res = store.commit(&id, epoch, seq, &b).await;
                (b, res)
            }));
        }
        let mut winners = Vec::new();
        for t in tasks {
            let (b, res) = t.await.expect("racer panicked");
            match res {
                Ok(CommitAck::Applied { seq: got }) => {
                    assert_eq!(got, seq + 2, "round {round}: Applied with the wrong seq");
                    winners.push(b);
                }
                Ok(other) => panic!("round {round}: a racer got {other:?}"),
                Err(e) => assert_eq!(
                    e.kind(),
                    ErrorKind::Conflict,
                    "round {round}: a losing racer must get Conflict, got {e}"
                ),
            }
        }
        assert_eq!(
            winners.len(),
            1,
            "round {round}: {} commits at one (epoch, seq) applied",
            winners.len()
        );
        let winner = winners.pop().expect("one winner");
        expected.extend(winner.entries.clone());
        seq += 2;
        let (rec, entries) = snapshot(&*stores[0], &id).await;
        assert_eq!(rec.seq, seq);
        assert_eq!(
            rec.state, winner.state,
            "round {round}: state is not the winner's"
        );
        assert_eq!(
            entries, expected,
            "round {round}: entries are not the winners'"
        );
    }
}
