//! A key of the wrong type under the store's prefix (something else wrote there) makes a write
//! fail with a terminal `Corrupt` naming the key, and write nothing; once the key is gone, the
//! same call (same input id) applies. Redis does not roll a script back when a command fails
//! midway, so before issue 15 a commit whose stream key was a string recorded its input id and
//! then failed, and that input could never be stored afterwards.
//!
//! Against a real Redis (`NORMANDY_TEST_REDIS_URL`, else a container, else skipped by name),
//! each test under its own prefix. The tests whose keys are the same on a Redis Cluster
//! (a session's own keys: the cluster's index is one bucket per slot, not the sets named here)
//! run a second time there (`NORMANDY_TEST_REDIS_CLUSTER_URLS`), through the cluster's own
//! scripts (one commit per call, index buckets declared in `KEYS`).

use std::collections::VecDeque;

use normandy_core::{
    CommitAck, CommitBatch, ContentBlock, Entry, EntryPayload, Error, ErrorKind, InputId,
    NewSession, NodeId, OwnerFilter, QueuedInput, ResumePolicy, SessionId, SessionStatus,
    SessionStore, TurnState,
};
use normandy_redis::{ConnectOptions, RedisConn, RedisTarget};
use normandy_store_redis::{RedisStore, RedisStoreConfig};
use normandy_tests::backends::{redis_cluster_url, redis_url, skip, skip_reason, unique_name};

struct Env {
    store: RedisStore,
    con: RedisConn,
}

impl Env {
    async fn new(name: &str) -> Option<Self> {
        Self::at(name, false).await
    }

    /// On the single server, or on the cluster.
    async fn at(name: &str, cluster: bool) -> Option<Self> {
        let url = if cluster {
            redis_cluster_url().await
        } else {
            redis_url().await
        };
        let Some(url) = url else {
            skip(name, &skip_reason());
            return None;
        };
        let store = RedisStore::connect(
            RedisStoreConfig::new(&url)
                .unwrap()
                .prefix(unique_name("damage")),
        )
        .await
        .unwrap();
        let con = RedisTarget::parse(&url)
            .unwrap()
            .connect(ConnectOptions {
                connect_timeout: std::time::Duration::from_secs(5),
                response_timeout: std::time::Duration::from_secs(5),
            })
            .await
            .unwrap();
        Some(Self { store, con })
    }

    /// `{<prefix>:<id>}:<suffix>`, the store's key layout.
    fn key(&self, id: &SessionId, suffix: &str) -> String {
        format!("{{{}:{id}}}:{suffix}", self.store.prefix())
    }

    fn index(&self, which: &str) -> String {
        format!("{}:resumable:{which}", self.store.prefix())
    }

    /// What a foreign writer does: a string where the store keeps something else.
    async fn plant(&mut self, key: &str) {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg("not ours")
            .query_async(&mut self.con)
            .await
            .unwrap();
    }

    async fn repair(&mut self, key: &str) {
        let _: () = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut self.con)
            .await
            .unwrap();
    }

    async fn exists(&mut self, key: &str) -> bool {
        redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut self.con)
            .await
            .unwrap()
    }

    async fn eager(&self, name: &str, node: &NodeId) -> (SessionId, u64) {
        let id = SessionId::new(name).unwrap();
        self.store
            .create(NewSession::bare(id.clone(), ResumePolicy::Eager))
            .await
            .unwrap();
        let epoch = self.store.activate(&id, node).await.unwrap().epoch;
        (id, epoch)
    }
}

fn node(name: &str) -> NodeId {
    NodeId::new(name, 1).unwrap()
}

/// One input at `seq`, leaving it queued (work to resume: the session joins the index).
fn input(seq: u64, id: &str) -> CommitBatch {
    let input_id = InputId::new(id).unwrap();
    CommitBatch {
        entries: vec![Entry {
            seq,
            parent: (seq > 1).then(|| seq - 1),
            at_ms: 1,
            payload: EntryPayload::Input {
                input_id: input_id.clone(),
                content: vec![ContentBlock::text("x")],
            },
        }],
        state: TurnState {
            queued: VecDeque::from([QueuedInput { input_id, seq }]),
            ..TurnState::default()
        },
    }
}

/// `err` is the terminal wrong-type error for `key` of `session`, which should hold `wanted`.
fn names_the_key(err: &Error, session: Option<&SessionId>, key: &str, wanted: &str) {
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(!err.is_retryable(), "{err}");
    let Error::Corrupt {
        session: s,
        what,
        reason,
    } = err
    else {
        panic!("not Corrupt: {err:?}");
    };
    assert_eq!(s.as_ref(), session, "{err}");
    assert_eq!(what, &format!("redis key {key}"), "{err}");
    assert!(
        reason.starts_with(&format!("holds a string, expected a {wanted};")),
        "{err}"
    );
    println!("{err}");
}

/// The commit of `id` (owned by `owner`) failed and wrote nothing: seq, state, entries, input
/// ids and the owner's index as before. `planted` is the foreign key, left alone.
async fn nothing_written(env: &mut Env, id: &SessionId, owner: &NodeId, planted: &str) {
    let rec = env.store.load(id).await.unwrap().unwrap();
    assert_eq!(rec.seq, 0, "seq moved");
    assert_eq!(rec.state, TurnState::default(), "state written");
    let inputs = env.key(id, "i");
    if inputs != planted {
        assert!(!env.exists(&inputs).await, "input id recorded");
    }
    let stream = env.key(id, "e");
    if stream != planted {
        assert!(!env.exists(&stream).await, "entries written");
    }
    let index = env.index(&format!("node:{owner}"));
    if index != planted && !env.con.is_cluster() {
        let page = env
            .store
            .list_resumable(&OwnerFilter::Node(owner.clone()), None, 10)
            .await
            .unwrap();
        assert!(
            page.sessions.iter().all(|s| &s.id != id),
            "indexed: {page:?}"
        );
    }
}

/// Stamps `$body(cluster)` as a test on the single server and one on the cluster.
macro_rules! on_both {
    ($name:ident, $cluster:ident, $body:ident) => {
        #[tokio::test]
        async fn $name() {
            $body(stringify!($name), false).await
        }

        #[tokio::test]
        async fn $cluster() {
            $body(stringify!($cluster), true).await
        }
    };
}

on_both!(
    a_commit_over_a_foreign_stream_key_writes_nothing_and_applies_once_it_is_gone,
    on_a_cluster_a_commit_over_a_foreign_stream_key_writes_nothing_and_applies_once_it_is_gone,
    foreign_stream_key
);

async fn foreign_stream_key(name: &str, cluster: bool) {
    let Some(mut env) = Env::at(name, cluster).await else {
        return;
    };
    let (id, epoch) = env.eager("s1", &node("n")).await;
    let stream = env.key(&id, "e");
    env.plant(&stream).await;

    let err = env
        .store
        .commit(&id, epoch, 0, &input(1, "in-1"))
        .await
        .unwrap_err();
    names_the_key(&err, Some(&id), &stream, "stream");
    nothing_written(&mut env, &id, &node("n"), &stream).await;
    // A read that meets the key says the same.
    let err = env.store.entries(&id, 0, 10).await.unwrap_err();
    names_the_key(&err, Some(&id), &stream, "stream");

    env.repair(&stream).await;
    let ack = env
        .store
        .commit(&id, epoch, 0, &input(1, "in-1"))
        .await
        .unwrap();
    assert_eq!(ack, CommitAck::Applied { seq: 1 });
    assert_eq!(env.store.entries(&id, 0, 10).await.unwrap().len(), 1);
    env.store.purge().await.unwrap();
}

on_both!(
    a_commit_over_foreign_inputs_or_index_keys_writes_nothing_and_applies_once_they_are_gone,
    on_a_cluster_a_commit_over_a_foreign_inputs_key_writes_nothing_and_applies_once_it_is_gone,
    foreign_inputs_or_index_keys
);

/// The inputs hash (a lone input on the expected seq is checked and recorded by one `HSETNX`,
/// so a foreign key there is that write failing), and on one server the index of every
/// resumable session and the owner's index (a cluster's index is its own per-slot layout).
async fn foreign_inputs_or_index_keys(name: &str, cluster: bool) {
    let Some(mut env) = Env::at(name, cluster).await else {
        return;
    };
    let n = node("n");
    let mut cases = vec![("s-inputs", None, "hash")];
    if !cluster {
        cases.push(("s-any", Some("any".to_string()), "zset"));
        cases.push(("s-node", Some(format!("node:{n}")), "zset"));
    }
    for (name, key, wanted) in cases {
        let (id, epoch) = env.eager(name, &n).await;
        let key = match key {
            None => env.key(&id, "i"),
            Some(which) => env.index(&which),
        };
        env.plant(&key).await;
        let err = env
            .store
            .commit(&id, epoch, 0, &input(1, "in-1"))
            .await
            .unwrap_err();
        names_the_key(&err, Some(&id), &key, wanted);
        nothing_written(&mut env, &id, &n, &key).await;

        env.repair(&key).await;
        let ack = env
            .store
            .commit(&id, epoch, 0, &input(1, "in-1"))
            .await
            .unwrap();
        assert_eq!(ack, CommitAck::Applied { seq: 1 }, "{name}");
        let page = env
            .store
            .list_resumable(&OwnerFilter::Node(n.clone()), None, 10)
            .await
            .unwrap();
        assert!(
            page.sessions.iter().any(|s| s.id == id),
            "{name}: not indexed"
        );
    }
    env.store.purge().await.unwrap();
}

on_both!(
    create_over_a_foreign_state_key_is_corrupt_not_already_exists,
    on_a_cluster_create_over_a_foreign_state_key_is_corrupt_not_already_exists,
    foreign_state_key
);

async fn foreign_state_key(name: &str, cluster: bool) {
    let Some(mut env) = Env::at(name, cluster).await else {
        return;
    };
    let id = SessionId::new("s-create").unwrap();
    let state = env.key(&id, "s");
    env.plant(&state).await;
    let err = env
        .store
        .create(NewSession::bare(id.clone(), ResumePolicy::Eager))
        .await
        .unwrap_err();
    names_the_key(&err, Some(&id), &state, "hash");
    // Reads (load, and activate's read) name it too.
    let err = env.store.load(&id).await.unwrap_err();
    names_the_key(&err, Some(&id), &state, "hash");
    let err = env.store.activate(&id, &node("n")).await.unwrap_err();
    names_the_key(&err, Some(&id), &state, "hash");

    env.repair(&state).await;
    env.store
        .create(NewSession::bare(id.clone(), ResumePolicy::Eager))
        .await
        .unwrap();
    env.store.purge().await.unwrap();
}

#[tokio::test]
async fn activate_over_a_foreign_index_key_keeps_the_epoch_and_owner() {
    let Some(mut env) = Env::new("activate_over_a_foreign_index_key").await else {
        return;
    };
    let (a, b) = (node("a"), node("b"));
    // Resumable under `a`: a move to `b` rewrites both owners' index sets.
    let (id, epoch) = env.eager("s-activate", &a).await;
    env.store
        .commit(&id, epoch, 0, &input(1, "in-1"))
        .await
        .unwrap();
    let key = env.index(&format!("node:{b}"));
    env.plant(&key).await;

    let err = env.store.activate(&id, &b).await.unwrap_err();
    names_the_key(&err, Some(&id), &key, "zset");
    let rec = env.store.load(&id).await.unwrap().unwrap();
    assert_eq!(rec.epoch, epoch, "epoch bumped");
    assert_eq!(rec.owner, Some(a.clone()), "owner changed");
    // Still indexed under its old owner.
    let page = env
        .store
        .list_resumable(&OwnerFilter::Node(a.clone()), None, 10)
        .await
        .unwrap();
    assert_eq!(page.sessions.len(), 1);
    // The broken index itself reads as what it is.
    let err = env
        .store
        .list_resumable(&OwnerFilter::Node(b.clone()), None, 10)
        .await
        .unwrap_err();
    names_the_key(&err, None, &key, "zset");

    env.repair(&key).await;
    let rec = env.store.activate(&id, &b).await.unwrap();
    assert_eq!(rec.epoch, epoch + 1);
    let page = env
        .store
        .list_resumable(&OwnerFilter::Node(b.clone()), None, 10)
        .await
        .unwrap();
    assert_eq!(page.sessions.len(), 1);
    env.store.purge().await.unwrap();
}

#[tokio::test]
async fn mark_terminal_and_delete_over_a_foreign_index_key_change_nothing() {
    let Some(mut env) = Env::new("mark_terminal_and_delete_over_a_foreign_index_key").await else {
        return;
    };
    let n = node("n");
    let (id, epoch) = env.eager("s-close", &n).await;
    env.store
        .commit(&id, epoch, 0, &input(1, "in-1"))
        .await
        .unwrap();
    let any = env.index("any");
    env.plant(&any).await;

    let err = env.store.mark_terminal(&id, epoch).await.unwrap_err();
    names_the_key(&err, Some(&id), &any, "zset");
    let rec = env.store.load(&id).await.unwrap().unwrap();
    assert_eq!(rec.status, SessionStatus::Active, "closed anyway");

    let err = env.store.delete(&id).await.unwrap_err();
    names_the_key(&err, Some(&id), &any, "zset");
    assert!(
        env.store.load(&id).await.unwrap().is_some(),
        "deleted anyway"
    );
    let page = env
        .store
        .list_resumable(&OwnerFilter::Node(n.clone()), None, 10)
        .await
        .unwrap();
    assert_eq!(page.sessions.len(), 1, "unindexed anyway");

    env.repair(&any).await;
    env.store.mark_terminal(&id, epoch).await.unwrap();
    assert_eq!(
        env.store.load(&id).await.unwrap().unwrap().status,
        SessionStatus::Terminal
    );
    assert!(env.store.delete(&id).await.unwrap());
    env.store.purge().await.unwrap();
}
