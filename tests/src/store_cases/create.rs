//! `create` and `load`: a fresh record, an id that already exists, an unknown id.

use std::sync::Arc;

use normandy_core::{
    ConfigTemplate, ErrorKind, NewSession, ResumePolicy, SessionStatus, TurnState,
};

use super::{
    all_entries, applied, batch, busy, err, input, load, names, node, ok, sid, snapshot, start,
};
use crate::harness::StoreHarness;

/// Precondition: none. `create` stores a session at epoch 0, seq 0, idle, no owner, with its
/// template and policy, and `load` returns exactly that record.
pub async fn create_returns_a_fresh_record(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let id = sid("create");
    let mut template = ConfigTemplate::new("conformance-template", "model-x")
        .system_prompt("Be brief.")
        .resume_policy(ResumePolicy::Eager)
        .credential("api-key");
    template
        .params
        .insert("temperature".into(), serde_json::json!(0.25));
    let created = ok(
        store
            .create(NewSession::from_template(id.clone(), template.clone()))
            .await,
        "create",
    );
    assert_eq!(created.id, id);
    assert_eq!(created.epoch, 0, "a new session has epoch 0");
    assert_eq!(created.seq, 0, "a new session has seq 0");
    assert_eq!(created.owner, None, "a new session has no owner");
    assert_eq!(created.status, SessionStatus::Active);
    assert_eq!(created.resume_policy, ResumePolicy::Eager);
    assert_eq!(created.template.as_ref(), Some(&template));
    assert_eq!(created.state, TurnState::default(), "a new session is idle");
    assert!(!created.is_resumable(), "an idle session is not resumable");
    assert_eq!(
        load(&*store, &id).await,
        created,
        "load must return what create returned"
    );
    assert!(all_entries(&*store, &id).await.is_empty());

    let bare = sid("create-bare");
    let created = ok(
        store
            .create(NewSession::bare(bare.clone(), ResumePolicy::Lazy))
            .await,
        "create bare",
    );
    assert_eq!(created.template, None);
    assert_eq!(created.resume_policy, ResumePolicy::Lazy);
    assert_eq!(load(&*store, &bare).await, created);
}

/// Precondition: none. Creating an id that exists is `AlreadyExists` naming it, and the stored
/// session (record, epoch, owner, entries) is unchanged.
pub async fn create_existing_is_already_exists_and_changes_nothing(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let id = sid("exists");
    let a = node("a");
    let epoch = start(&*store, &id, ResumePolicy::Eager, &a).await;
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
        "first commit",
    );
    let before = snapshot(&*store, &id).await;

    let other = ConfigTemplate::new("other-template", "model-y");
    let e = err(
        store
            .create(NewSession::from_template(id.clone(), other))
            .await,
        ErrorKind::AlreadyExists,
        "create an existing id",
    );
    names(&e, &id, "AlreadyExists");
    err(
        store
            .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
            .await,
        ErrorKind::AlreadyExists,
        "create an existing id (bare)",
    );
    assert_eq!(
        snapshot(&*store, &id).await,
        before,
        "a refused create changed the stored session"
    );
}

/// Precondition: none. `load` of an unknown id is `Ok(None)`, not an error.
pub async fn load_unknown_is_none(h: Arc<dyn StoreHarness>) {
    let store = h.store();
    let got = ok(store.load(&sid("unknown")).await, "load unknown");
    assert!(got.is_none(), "load of an unknown id returned {got:?}");
}
