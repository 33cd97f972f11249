//! `list_resumable`: which sessions are listed, the owner filter, cursor paging, and how the
//! listing follows reactivation, commits, `mark_terminal` and `delete`.

use std::collections::BTreeSet;
use std::sync::Arc;

use normandy_core::{
    ConfigTemplate, NewSession, NodeId, OwnerFilter, ResumableSession, ResumePolicy, SessionId,
    SessionStore,
};

use super::{applied, batch, busy, idle, input, node, ok, queued, reply, sid, start, token};
use crate::harness::StoreHarness;

/// Ids of a `list_resumable` page that belong to `mine` (other sessions may share a namespace).
fn listed_among(sessions: &[ResumableSession], mine: &[&SessionId]) -> BTreeSet<SessionId> {
    sessions
        .iter()
        .filter(|s| mine.contains(&&s.id))
        .map(|s| s.id.clone())
        .collect()
}

/// Every session `list_resumable` returns for `owner`, following cursors with page size
/// `limit`, checking each page's size and that the listing ends.
async fn list_all(
    store: &dyn SessionStore,
    owner: &OwnerFilter,
    limit: usize,
) -> Vec<ResumableSession> {
    let mut out: Vec<ResumableSession> = Vec::new();
    let mut cursor: Option<SessionId> = None;
    for _ in 0..10_000 {
        let page = ok(
            store.list_resumable(owner, cursor.as_ref(), limit).await,
            "list_resumable",
        );
        assert!(
            page.sessions.len() <= limit,
            "list_resumable returned {} sessions for limit {limit}",
            page.sessions.len()
        );
        if let Some(next) = &page.next {
            assert!(
                cursor.as_ref() != Some(next),
                "list_resumable returned its own cursor {next} as next: it would loop forever"
            );
        }
        let empty = page.sessions.is_empty();
        out.extend(page.sessions);
        match page.next {
            Some(next) => {
                assert!(
                    !empty,
                    "list_resumable returned an empty page with a next cursor"
                );
                cursor = Some(next);
            }
            None => return out,
        }
    }
    panic!("list_resumable kept returning pages")
}

fn ids(sessions: &[ResumableSession]) -> BTreeSet<SessionId> {
    sessions.iter().map(|s| s.id.clone()).collect()
}

/// Precondition: none. Only eager, open sessions with work (a turn in flight or queued input)
/// are listed — by their owner and by `Any`, with owner and current epoch; idle, never-committed,
/// never-activated, lazy and terminal sessions are not.
pub async fn list_resumable_lists_only_eager_open_sessions_with_work(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let a = node("a");
    let busy_id = sid("r-busy");
    let queued_id = sid("r-queued");
    let idle_id = sid("r-idle");
    let fresh_id = sid("r-fresh");
    let lazy_id = sid("r-lazy");
    let closed_id = sid("r-closed");
    let unowned_id = sid("r-unowned");
    let templated_id = sid("r-template");

    let mut epochs = std::collections::HashMap::new();
    for (id, policy, state) in [
        (&busy_id, ResumePolicy::Eager, Some(busy("in-1", 1))),
        (&queued_id, ResumePolicy::Eager, Some(queued("in-1", 1))),
        (&idle_id, ResumePolicy::Eager, Some(idle())),
        (&fresh_id, ResumePolicy::Eager, None),
        (&lazy_id, ResumePolicy::Lazy, Some(busy("in-1", 1))),
        (&closed_id, ResumePolicy::Eager, Some(busy("in-1", 1))),
    ] {
        let epoch = start(&*store, id, policy, &a).await;
        if let Some(state) = state {
            applied(
                store
                    .commit(id, epoch, 0, &batch(vec![input(1, "in-1")], state))
                    .await,
                1,
                "commit",
            );
        }
        epochs.insert(id.clone(), epoch);
    }
    ok(
        store.mark_terminal(&closed_id, epochs[&closed_id]).await,
        "mark_terminal",
    );
    ok(
        store
            .create(NewSession::bare(unowned_id.clone(), ResumePolicy::Eager))
            .await,
        "create",
    );
    // The policy comes from the template when created from one.
    let template =
        ConfigTemplate::new("eager-template", "model").resume_policy(ResumePolicy::Eager);
    ok(
        store
            .create(NewSession::from_template(templated_id.clone(), template))
            .await,
        "create from template",
    );
    let epoch = ok(store.activate(&templated_id, &a).await, "activate").epoch;
    applied(
        store
            .commit(
                &templated_id,
                epoch,
                0,
                &batch(vec![input(1, "in-1")], busy("in-1", 1)),
            )
            .await,
        1,
        "commit",
    );
    epochs.insert(templated_id.clone(), epoch);

    let want: BTreeSet<SessionId> = [&busy_id, &queued_id, &templated_id]
        .into_iter()
        .cloned()
        .collect();
    let by_owner = list_all(&*store, &OwnerFilter::Node(a.clone()), 100).await;
    assert_eq!(
        ids(&by_owner),
        want,
        "list_resumable(Node) must list exactly the eager, open sessions with work"
    );
    for s in &by_owner {
        assert_eq!(s.owner.as_ref(), Some(&a), "listed with the wrong owner");
        assert_eq!(s.epoch, epochs[&s.id], "listed with the wrong epoch");
    }
    let mine = [
        &busy_id,
        &queued_id,
        &idle_id,
        &fresh_id,
        &lazy_id,
        &closed_id,
        &unowned_id,
        &templated_id,
    ];
    let any = list_all(&*store, &OwnerFilter::Any, 100).await;
    assert_eq!(
        listed_among(&any, &mine),
        want,
        "list_resumable(Any) must list exactly the eager, open sessions with work"
    );
}

/// Precondition: none. `Node(n)` lists only sessions whose last activation was by `n` — the
/// same name with another incarnation is another node — and `Any` lists every owner's.
pub async fn list_resumable_filters_by_owner(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let (a, b, c) = (node("a"), node("b"), node("c"));
    let (a1, a2, b1) = (sid("own-a1"), sid("own-a2"), sid("own-b1"));
    for (id, owner) in [(&a1, &a), (&a2, &a), (&b1, &b)] {
        let epoch = start(&*store, id, ResumePolicy::Eager, owner).await;
        applied(
            store
                .commit(
                    id,
                    epoch,
                    0,
                    &batch(vec![input(1, "in-1")], busy("in-1", 1)),
                )
                .await,
            1,
            "commit",
        );
    }
    let set = |v: &[&SessionId]| v.iter().map(|s| (*s).clone()).collect::<BTreeSet<_>>();
    assert_eq!(
        ids(&list_all(&*store, &OwnerFilter::Node(a.clone()), 100).await),
        set(&[&a1, &a2])
    );
    assert_eq!(
        ids(&list_all(&*store, &OwnerFilter::Node(b.clone()), 100).await),
        set(&[&b1])
    );
    let page = ok(
        store
            .list_resumable(&OwnerFilter::Node(c.clone()), None, 100)
            .await,
        "list_resumable for a node without sessions",
    );
    assert!(page.sessions.is_empty() && page.next.is_none(), "{page:?}");
    let reborn = NodeId::new(a.name(), a.incarnation() + 1).expect("node id");
    assert!(
        list_all(&*store, &OwnerFilter::Node(reborn), 100)
            .await
            .is_empty(),
        "a node's next incarnation must not list its previous life's sessions"
    );
    let any = list_all(&*store, &OwnerFilter::Any, 100).await;
    assert_eq!(listed_among(&any, &[&a1, &a2, &b1]), set(&[&a1, &a2, &b1]));
    for s in any.iter().filter(|s| s.id == b1) {
        assert_eq!(
            s.owner.as_ref(),
            Some(&b),
            "Any listed b1 with the wrong owner"
        );
    }
}

/// Precondition: none. Pages hold at most `limit` sessions in ascending id order; following
/// `next` lists every session exactly once and ends with `next: None`; a cursor resumes after
/// itself. Checked for `Node` and `Any`, page sizes 1, 3 and 100.
pub async fn list_resumable_pages_with_cursor(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let a = node("a");
    // One shared prefix and zero-padded suffixes: the ascending order is the same under any
    // collation a backend may use.
    let prefix = format!("page-{}", token());
    let all: Vec<SessionId> = (0..7)
        .map(|i| SessionId::new(format!("{prefix}-{i:02}")).expect("id"))
        .collect();
    // Created out of order, so insertion order cannot pass for id order.
    for i in [3usize, 0, 6, 1, 5, 2, 4] {
        let epoch = start(&*store, &all[i], ResumePolicy::Eager, &a).await;
        applied(
            store
                .commit(
                    &all[i],
                    epoch,
                    0,
                    &batch(vec![input(1, "in-1")], busy("in-1", 1)),
                )
                .await,
            1,
            "commit",
        );
    }
    let mine: Vec<&SessionId> = all.iter().collect();
    for limit in [1, 3, 100] {
        for filter in [OwnerFilter::Node(a.clone()), OwnerFilter::Any] {
            let listed = list_all(&*store, &filter, limit).await;
            let got: Vec<SessionId> = listed
                .iter()
                .filter(|s| mine.contains(&&s.id))
                .map(|s| s.id.clone())
                .collect();
            assert_eq!(
                got, all,
                "list_resumable({filter:?}) with limit {limit} must list each session once, \
                 in ascending id order"
            );
        }
    }
    let page = ok(
        store
            .list_resumable(&OwnerFilter::Node(a.clone()), Some(&all[2]), 2)
            .await,
        "list_resumable from a cursor",
    );
    let got: Vec<SessionId> = page.sessions.iter().map(|s| s.id.clone()).collect();
    assert_eq!(
        got,
        vec![all[3].clone(), all[4].clone()],
        "a cursor resumes after itself"
    );
    assert!(
        page.next.is_some(),
        "sessions remain after this page: next must be set"
    );
}

/// Precondition: none. When another node activates a session (through another handle), it
/// moves from the old owner's listing to the new owner's, with the new epoch.
pub async fn list_resumable_follows_reactivation_by_another_node(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let other = h.reopen().await;
    let (a, b) = (node("a"), node("b"));
    let id = sid("moved");
    let e1 = start(&*store, &id, ResumePolicy::Eager, &a).await;
    applied(
        store
            .commit(&id, e1, 0, &batch(vec![input(1, "in-1")], busy("in-1", 1)))
            .await,
        1,
        "commit",
    );
    assert!(ids(&list_all(&*store, &OwnerFilter::Node(a.clone()), 100).await).contains(&id));
    let e2 = ok(
        other.activate(&id, &b).await,
        "takeover on the other handle",
    )
    .epoch;
    for handle in [&store, &other] {
        assert!(
            !ids(&list_all(&**handle, &OwnerFilter::Node(a.clone()), 100).await).contains(&id),
            "the old owner still lists a session another node activated"
        );
        let by_b = list_all(&**handle, &OwnerFilter::Node(b.clone()), 100).await;
        let entry = by_b
            .iter()
            .find(|s| s.id == id)
            .expect("the new owner must list the session it activated");
        assert_eq!(entry.owner.as_ref(), Some(&b));
        assert_eq!(entry.epoch, e2, "listed with a stale epoch");
        let any = list_all(&**handle, &OwnerFilter::Any, 100).await;
        let entry = any.iter().find(|s| s.id == id).expect("Any must list it");
        assert_eq!(entry.owner.as_ref(), Some(&b), "Any lists the old owner");
    }
}

/// Precondition: none. Listing follows each commit: work → listed, idle → gone, queued input →
/// listed again, terminal → gone; a deleted session is gone.
pub async fn list_resumable_tracks_work_terminal_and_delete(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let a = node("a");
    let owner = OwnerFilter::Node(a.clone());
    let id = sid("track");
    let listed = |store: Arc<dyn SessionStore>, id: SessionId, owner: OwnerFilter| async move {
        let by_owner = ids(&list_all(&*store, &owner, 100).await).contains(&id);
        let any = ids(&list_all(&*store, &OwnerFilter::Any, 100).await).contains(&id);
        assert_eq!(by_owner, any, "Node and Any listings disagree about {id}");
        by_owner
    };
    let epoch = start(&*store, &id, ResumePolicy::Eager, &a).await;
    assert!(
        !listed(store.clone(), id.clone(), owner.clone()).await,
        "listed before any work"
    );
    applied(
        store
            .commit(
                &id,
                epoch,
                0,
                &batch(vec![input(1, "in-1")], busy("in-1", 1)),
            )
            .await,
        1,
        "start a turn",
    );
    assert!(
        listed(store.clone(), id.clone(), owner.clone()).await,
        "a turn in flight must be listed"
    );
    applied(
        store
            .commit(&id, epoch, 1, &batch(vec![reply(2)], idle()))
            .await,
        2,
        "finish the turn",
    );
    assert!(
        !listed(store.clone(), id.clone(), owner.clone()).await,
        "an idle session was listed"
    );
    applied(
        store
            .commit(
                &id,
                epoch,
                2,
                &batch(vec![input(3, "in-2")], queued("in-2", 3)),
            )
            .await,
        3,
        "queue input",
    );
    assert!(
        listed(store.clone(), id.clone(), owner.clone()).await,
        "queued input must be listed"
    );
    ok(store.mark_terminal(&id, epoch).await, "mark_terminal");
    assert!(
        !listed(store.clone(), id.clone(), owner.clone()).await,
        "a terminal session was listed"
    );

    let doomed = sid("track-deleted");
    let epoch = start(&*store, &doomed, ResumePolicy::Eager, &a).await;
    applied(
        store
            .commit(
                &doomed,
                epoch,
                0,
                &batch(vec![input(1, "in-1")], busy("in-1", 1)),
            )
            .await,
        1,
        "commit",
    );
    assert!(listed(store.clone(), doomed.clone(), owner.clone()).await);
    assert!(ok(store.delete(&doomed).await, "delete"));
    assert!(
        !listed(store.clone(), doomed.clone(), owner.clone()).await,
        "a deleted session was listed"
    );
}
