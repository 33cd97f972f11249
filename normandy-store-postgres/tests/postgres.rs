//! Postgres-specific behaviour the shared conformance suite cannot reach: a connection killed
//! mid-commit, racing activations on two pools, staged migrations, corrupt bytes in the tables,
//! group commit results, and the plan of `list_resumable`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Migrate, PgHarness, input_batch, sid, url};
use normandy_core::{
    CommitAck, ConfigTemplate, EntryPayload, Epoch, Error, ErrorKind, InputId, Message, NewSession,
    NodeId, OwnerFilter, ResumePolicy, SessionId, SessionStore,
};
use normandy_store_postgres::{MIGRATIONS_TABLE, PgStore, SchemaLevel, migrator};
use normandy_tests::StoreHarness;
use sqlx::Row;

fn node(name: &str) -> NodeId {
    NodeId::new(name, 1).unwrap()
}

/// Waits until one of the harness store's connections waits on a lock, and returns its pid.
async fn blocked_backend(h: &PgHarness) -> i32 {
    for _ in 0..500 {
        let pid: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity \
             WHERE application_name = $1 AND wait_event_type = 'Lock' LIMIT 1",
        )
        .bind(&h.app_name)
        .fetch_optional(&h.admin)
        .await
        .unwrap();
        if let Some(pid) = pid {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no commit of the store ever waited on the row lock");
}

async fn count_input(h: &PgHarness, id: &str, input: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM normandy_entries WHERE session_id = $1 AND input_id = $2",
    )
    .bind(id)
    .bind(input)
    .fetch_one(&h.admin)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_killed_mid_flight_then_retried_appends_exactly_once() {
    let Some(url) = url().await else { return };
    let h = PgHarness::new(&url).await;
    let store = h.pg();
    let id = sid("killed");
    store
        .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
        .await
        .unwrap();
    let epoch = store.activate(&id, &node("a")).await.unwrap().epoch;

    // Stall the commit on the session's row lock, held by another connection.
    let mut locker = h.admin.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM normandy_sessions WHERE id = $1 FOR UPDATE")
        .bind(id.as_str())
        .execute(&mut *locker)
        .await
        .unwrap();
    let batch = input_batch(0, "in-1");
    let in_flight = {
        let (store, id, batch) = (store.clone(), id.clone(), batch.clone());
        tokio::spawn(async move { store.commit(&id, epoch, 0, &batch).await })
    };
    let pid = blocked_backend(&h).await;
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&h.admin)
        .await
        .unwrap();
    assert!(killed);
    let err = in_flight
        .await
        .unwrap()
        .expect_err("the killed commit cannot succeed");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.is_retryable(), "{err}");
    locker.rollback().await.unwrap();

    // The caller cannot know whether it landed: it retries as is.
    let ack = store.commit(&id, epoch, 0, &batch).await.unwrap();
    assert_eq!(ack, CommitAck::Applied { seq: 1 });
    // And a second ambiguous retry is recognised as the duplicate it is.
    let ack = store.commit(&id, epoch, 0, &batch).await.unwrap();
    assert_eq!(
        ack,
        CommitAck::DuplicateInput {
            input_id: InputId::new("in-1").unwrap(),
            seq: 1
        }
    );
    assert_eq!(count_input(&h, "killed", "in-1").await, 1);
    assert_eq!(store.load(&id).await.unwrap().unwrap().seq, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_retried_while_the_original_is_stalled_appends_once() {
    let Some(url) = url().await else { return };
    let h = PgHarness::new(&url).await;
    let store = h.pg();
    let other = h.open().await.unwrap();
    let id = sid("stalled");
    store
        .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
        .await
        .unwrap();
    let epoch = store.activate(&id, &node("a")).await.unwrap().epoch;

    let mut locker = h.admin.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM normandy_sessions WHERE id = $1 FOR UPDATE")
        .bind(id.as_str())
        .execute(&mut *locker)
        .await
        .unwrap();
    let batch = input_batch(0, "in-1");
    let first = {
        let (store, id, batch) = (store.clone(), id.clone(), batch.clone());
        tokio::spawn(async move { store.commit(&id, epoch, 0, &batch).await })
    };
    blocked_backend(&h).await;
    // The same commit through another pool, while the first still waits on the lock.
    let second = {
        let (id, batch) = (id.clone(), batch.clone());
        tokio::spawn(async move { other.commit(&id, epoch, 0, &batch).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    locker.rollback().await.unwrap();
    let acks = [
        first.await.unwrap().unwrap(),
        second.await.unwrap().unwrap(),
    ];
    assert!(acks.contains(&CommitAck::Applied { seq: 1 }), "{acks:?}");
    assert!(
        acks.contains(&CommitAck::DuplicateInput {
            input_id: InputId::new("in-1").unwrap(),
            seq: 1
        }),
        "{acks:?}"
    );
    assert_eq!(count_input(&h, "stalled", "in-1").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_activations_on_two_pools_fence_the_older_epoch() {
    let Some(url) = url().await else { return };
    let h = PgHarness::new(&url).await;
    let a = h.pg();
    let b = h.open().await.unwrap();
    let id = sid("contended");
    a.create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
        .await
        .unwrap();
    let (na, nb) = (node("a"), node("b"));
    for round in 0..10u64 {
        let (ra, rb) = tokio::join!(a.activate(&id, &na), b.activate(&id, &nb));
        let (ea, eb) = (ra.unwrap().epoch, rb.unwrap().epoch);
        assert_ne!(ea, eb, "two activations returned the same epoch");
        let (old, new) = (ea.min(eb), ea.max(eb));
        let (old_store, new_store): (&dyn SessionStore, &dyn SessionStore) =
            if ea < eb { (&*a, &b) } else { (&b, &*a) };
        let seq = round;
        let err = old_store
            .commit(&id, old, seq, &input_batch(seq, &format!("old-{round}")))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Fenced, "{err}");
        assert!(!err.is_retryable());
        let ack = new_store
            .commit(&id, new, seq, &input_batch(seq, &format!("new-{round}")))
            .await
            .unwrap();
        assert_eq!(ack, CommitAck::Applied { seq: seq + 1 });
    }
    assert_eq!(a.load(&id).await.unwrap().unwrap().epoch, 20);
}

#[tokio::test]
async fn opening_an_unmigrated_database_names_the_base_migration() {
    let Some(url) = url().await else { return };
    let h = PgHarness::bare(&url, Migrate::None).await;
    let err = h.open().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MissingMigration);
    let msg = err.to_string();
    assert!(msg.contains("0001_base"), "{msg}");
    assert!(
        msg.contains("cargo xtask migrate up --database-url"),
        "{msg}"
    );
}

#[tokio::test]
async fn base_only_database_works_and_refuses_what_it_cannot_store() {
    let Some(url) = url().await else { return };
    let h = PgHarness::bare(&url, Migrate::UpTo(1)).await;
    let store = h.open().await.unwrap();
    assert_eq!(store.schema_level(), SchemaLevel::Base);
    assert_eq!(
        store.missing_migrations(),
        vec!["0002_template", "0003_resume_policy"]
    );

    // A bare, lazy session lives its whole life on the base schema.
    let id = sid("tier1");
    store
        .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
        .await
        .unwrap();
    let epoch = store.activate(&id, &node("a")).await.unwrap().epoch;
    let ack = store
        .commit(&id, epoch, 0, &input_batch(0, "in-1"))
        .await
        .unwrap();
    assert_eq!(ack, CommitAck::Applied { seq: 1 });
    let rec = store.load(&id).await.unwrap().unwrap();
    assert_eq!(rec.template, None);
    assert_eq!(rec.resume_policy, ResumePolicy::Lazy);
    assert_eq!(store.entries(&id, 0, 10).await.unwrap().len(), 1);
    let page = store
        .list_resumable(&OwnerFilter::Any, None, 10)
        .await
        .unwrap();
    assert!(page.sessions.is_empty());

    // A session that needs a template to be rebuilt is refused, naming the migration.
    let template = ConfigTemplate::new("echo", "scripted");
    let err = store
        .create(NewSession::from_template(sid("templated"), template))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MissingMigration);
    assert!(err.to_string().contains("0002_template"), "{err}");
    // Issue 15, item 7: the error names the session it refused.
    assert!(
        err.to_string().contains("so session templated was refused"),
        "{err}"
    );
    assert!(
        matches!(&err, Error::MissingMigration { session: Some(s), .. } if s.as_str() == "templated")
    );
    assert!(store.load(&sid("templated")).await.unwrap().is_none());
    let err = store
        .create(NewSession::bare(sid("eager"), ResumePolicy::Eager))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("0003_resume_policy"), "{err}");

    // A deployment that requires the full schema is told exactly what is missing.
    let err = PgStore::connect(h.config().require_schema(SchemaLevel::LATEST))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MissingMigration);
    assert!(err.to_string().contains("0002_template"), "{err}");

    // Migrating the rest keeps the data, and a reopened store uses it all.
    migrator().run(&h.admin).await.unwrap();
    let store = h.open().await.unwrap();
    assert_eq!(store.schema_level(), SchemaLevel::ResumePolicy);
    assert!(store.missing_migrations().is_empty());
    let rec = store.load(&id).await.unwrap().unwrap();
    assert_eq!((rec.seq, rec.resume_policy), (1, ResumePolicy::Lazy));
    let template = ConfigTemplate::new("echo", "scripted");
    store
        .create(NewSession::from_template(
            sid("templated"),
            template.clone(),
        ))
        .await
        .unwrap();
    let rec = store.load(&sid("templated")).await.unwrap().unwrap();
    assert_eq!(rec.template, Some(template));
}

#[tokio::test]
async fn template_stage_without_resume_policy_refuses_eager_sessions() {
    let Some(url) = url().await else { return };
    let h = PgHarness::bare(&url, Migrate::UpTo(2)).await;
    let store = h.open().await.unwrap();
    assert_eq!(store.schema_level(), SchemaLevel::Template);
    let template = ConfigTemplate::new("echo", "scripted");
    store
        .create(NewSession::from_template(sid("lazy"), template.clone()))
        .await
        .unwrap();
    let err = store
        .create(NewSession::from_template(
            sid("eager"),
            template.resume_policy(ResumePolicy::Eager),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MissingMigration);
    assert!(err.to_string().contains("0003_resume_policy"), "{err}");
}

#[tokio::test]
async fn a_table_dropped_under_a_running_store_is_a_missing_migration() {
    let Some(url) = url().await else { return };
    let h = PgHarness::new(&url).await;
    let store = h.pg();
    let id = sid("s");
    store
        .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
        .await
        .unwrap();
    let epoch = store.activate(&id, &node("a")).await.unwrap().epoch;
    sqlx::query("DROP TABLE normandy_entries")
        .execute(&h.admin)
        .await
        .unwrap();
    let err = store
        .commit(&id, epoch, 0, &input_batch(0, "in-1"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MissingMigration, "{err}");
    assert!(err.to_string().contains("0001_base"), "{err}");
    assert!(err.to_string().contains("session s was refused"), "{err}");
    let err = store.entries(&id, 0, 10).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::MissingMigration, "{err}");
    assert!(err.to_string().contains("session s was refused"), "{err}");
}

#[tokio::test]
async fn migrator_records_in_its_own_table_and_reverts_in_stages() {
    let Some(url) = url().await else { return };
    let h = PgHarness::bare(&url, Migrate::All).await;
    let versions: Vec<i64> = sqlx::query_scalar(
        "SELECT version FROM normandy_migrations WHERE success ORDER BY version",
    )
    .fetch_all(&h.admin)
    .await
    .unwrap();
    assert_eq!(versions, vec![1, 2, 3]);
    assert_eq!(MIGRATIONS_TABLE, "normandy_migrations");
    let app_table: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&h.admin)
        .await
        .unwrap();
    assert!(
        !app_table,
        "the migrator must not touch the application's _sqlx_migrations"
    );

    migrator().undo(&h.admin, 2).await.unwrap();
    assert_eq!(
        h.open().await.unwrap().schema_level(),
        SchemaLevel::Template
    );
    migrator().undo(&h.admin, 1).await.unwrap();
    assert_eq!(h.open().await.unwrap().schema_level(), SchemaLevel::Base);
    migrator().undo(&h.admin, 0).await.unwrap();
    let err = h.open().await.unwrap_err();
    assert!(err.to_string().contains("0001_base"), "{err}");
    // And the store can apply its own migrations when asked to.
    let store = PgStore::connect(h.config().migrate_on_open(true))
        .await
        .unwrap();
    assert_eq!(store.schema_level(), SchemaLevel::LATEST);
}

#[tokio::test]
async fn corrupt_bytes_are_corrupt_errors_and_activation_changes_nothing() {
    let Some(url) = url().await else { return };
    let h = PgHarness::new(&url).await;
    let store = h.pg();
    let id = sid("corrupt");
    store
        .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
        .await
        .unwrap();
    let epoch = store.activate(&id, &node("a")).await.unwrap().epoch;
    store
        .commit(&id, epoch, 0, &input_batch(0, "in-1"))
        .await
        .unwrap();

    h.overwrite_entry(&id, 1, b"\x00garbage").await;
    let err = store.entries(&id, 0, 10).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("corrupt"), "{err}");

    h.overwrite_state(&id, b"NM\x01\x02\xc1").await;
    let err = store.load(&id).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    let err = store.activate(&id, &node("b")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    let stored: i64 = sqlx::query_scalar("SELECT epoch FROM normandy_sessions WHERE id = $1")
        .bind(id.as_str())
        .fetch_one(&h.admin)
        .await
        .unwrap();
    assert_eq!(
        stored as u64, epoch,
        "a failed activation must not bump the epoch"
    );

    h.overwrite_state(&id, b"NM\x09\x02").await;
    let err = store.load(&id).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnsupportedVersion, "{err}");

    sqlx::query("UPDATE normandy_sessions SET owner = 'not a node id' WHERE id = $1")
        .bind(id.as_str())
        .execute(&h.admin)
        .await
        .unwrap();
    h.overwrite_state(
        &id,
        &normandy_core::codec::encode(
            normandy_core::codec::BlobKind::TurnState,
            &normandy_core::TurnState::default(),
        )
        .unwrap(),
    )
    .await;
    let err = store.load(&id).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("corrupt"), "{err}");
}

/// Stalls the store's write slot: a commit of input "a" to `id` waits on the session's row
/// lock, held by the returned transaction, so commits queued meanwhile form the next batch.
/// Returns the lock (roll it back to release the writer) and the stalled commit.
async fn stall_writer(
    h: &PgHarness,
    store: &Arc<PgStore>,
    id: SessionId,
    epoch: Epoch,
) -> (
    sqlx::Transaction<'static, sqlx::Postgres>,
    tokio::task::JoinHandle<normandy_core::Result<CommitAck>>,
) {
    let mut locker = h.admin.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM normandy_sessions WHERE id = $1 FOR UPDATE")
        .bind(id.as_str())
        .execute(&mut *locker)
        .await
        .unwrap();
    let first = {
        let store = store.clone();
        tokio::spawn(async move { store.commit(&id, epoch, 0, &input_batch(0, "a")).await })
    };
    blocked_backend(h).await;
    (locker, first)
}

/// Waits until `n` commits wait in the store's queue (all of them reached it).
async fn wait_queued(store: &PgStore, n: usize) {
    for _ in 0..1000 {
        if store.queued_commits() == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(store.queued_commits(), n);
}

/// A group statement the server refuses because of one commit's data (here an entry too big
/// for a size cap an operator put on the table) writes nothing; its commits are then written
/// one by one, so only that commit fails and its neighbours in the batch apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_commit_does_not_fail_its_group() {
    let Some(url) = url().await else { return };
    let h = PgHarness::bare(&url, Migrate::All).await;
    sqlx::query(
        "ALTER TABLE normandy_entries ADD CONSTRAINT entry_size_cap \
         CHECK (octet_length(payload) < 1024)",
    )
    .execute(&h.admin)
    .await
    .unwrap();
    // One write slot, so everything queued behind the stalled commit forms the next batch.
    let store = Arc::new(PgStore::connect(h.config().writers(1)).await.unwrap());
    let n = 6usize;
    let bad = 3usize;
    let g = |i: usize| sid(&format!("p{i:02}"));
    let mut epochs = Vec::new();
    for i in 0..n {
        store
            .create(NewSession::bare(g(i), ResumePolicy::Lazy))
            .await
            .unwrap();
        epochs.push(store.activate(&g(i), &node("a")).await.unwrap().epoch);
    }
    let (locker, first) = stall_writer(&h, &store, g(0), epochs[0]).await;
    let mut tasks = Vec::new();
    for (i, &e) in epochs.iter().enumerate().skip(1) {
        let store = store.clone();
        let mut batch = input_batch(0, &format!("in-{i}"));
        if i == bad {
            batch.entries[0].payload = EntryPayload::Input {
                input_id: InputId::new("too-big").unwrap(),
                content: Message::user("x".repeat(1500)).content,
            };
        }
        tasks.push(tokio::spawn(async move {
            store.commit(&g(i), e, 0, &batch).await
        }));
    }
    wait_queued(&store, n - 1).await;
    let before = store.write_stats();
    locker.rollback().await.unwrap();
    assert_eq!(first.await.unwrap().unwrap(), CommitAck::Applied { seq: 1 });
    for (k, t) in tasks.into_iter().enumerate() {
        let i = k + 1;
        let r = t.await.unwrap();
        if i == bad {
            let err = r.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Backend, "{err}");
            assert!(err.to_string().contains("entry_size_cap"), "{err}");
        } else {
            assert_eq!(
                r.expect("a neighbour of the refused commit"),
                CommitAck::Applied { seq: 1 },
                "session p{i:02}"
            );
        }
    }
    // The five queued commits went out as one statement, refused, then as one statement each.
    let after = store.write_stats();
    assert_eq!(
        (
            after.statements - before.statements,
            after.commits - before.commits
        ),
        (1 + 5, 5 + 5),
        "{before:?} -> {after:?}"
    );
    for i in 0..n {
        let want = usize::from(i != bad);
        let stored = store.entries(&g(i), 0, 10).await.unwrap().len();
        assert_eq!(stored, want, "entries of p{i:02}");
    }
}

/// One batch mixing every outcome: each commit gets its own result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_gives_each_commit_its_own_result() {
    let Some(url) = url().await else { return };
    let h = PgHarness::bare(&url, Migrate::All).await;
    // One write slot, so everything queued behind the stalled commit forms the next batch.
    let store = Arc::new(PgStore::connect(h.config().writers(1)).await.unwrap());
    assert!(store.capabilities().group_commit);
    let n = 12usize;
    let mut epochs = Vec::new();
    for i in 0..n {
        let id = sid(&format!("g{i:02}"));
        store
            .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
            .await
            .unwrap();
        epochs.push(store.activate(&id, &node("a")).await.unwrap().epoch);
    }
    // g03 has input "dup" stored; g04 moved to seq 1; g05 is fenced by a newer activation;
    // g06 is closed.
    let g = |i: usize| sid(&format!("g{i:02}"));
    store
        .commit(&g(3), epochs[3], 0, &input_batch(0, "dup"))
        .await
        .unwrap();
    store
        .commit(&g(4), epochs[4], 0, &input_batch(0, "x"))
        .await
        .unwrap();
    let newer = store.activate(&g(5), &node("b")).await.unwrap().epoch;
    store.mark_terminal(&g(6), epochs[6]).await.unwrap();

    let (locker, first) = stall_writer(&h, &store, g(0), epochs[0]).await;
    let mut tasks = Vec::new();
    for (i, &e) in epochs.iter().enumerate().skip(1) {
        let store = store.clone();
        let (expected, input) = match i {
            3 => (1, "dup".to_string()),
            4 => (0, "y".to_string()),
            _ => (0, format!("in-{i}")),
        };
        let batch = if i == 3 {
            // A new entry at seq 2 carrying the already stored input id.
            input_batch(1, "dup")
        } else {
            input_batch(expected, &input)
        };
        tasks.push(tokio::spawn(async move {
            store.commit(&g(i), e, expected, &batch).await
        }));
    }
    // Let every commit reach the queue, then release the stalled one.
    wait_queued(&store, n - 1).await;
    let before = store.write_stats();
    locker.rollback().await.unwrap();
    assert_eq!(first.await.unwrap().unwrap(), CommitAck::Applied { seq: 1 });
    for (k, t) in tasks.into_iter().enumerate() {
        let i = k + 1;
        let r = t.await.unwrap();
        match i {
            3 => assert_eq!(
                r.unwrap(),
                CommitAck::DuplicateInput {
                    input_id: InputId::new("dup").unwrap(),
                    seq: 1
                }
            ),
            4 => assert_eq!(r.unwrap_err().kind(), ErrorKind::Conflict),
            5 => {
                let err = r.unwrap_err();
                assert_eq!(err.kind(), ErrorKind::Fenced);
                assert!(
                    err.to_string()
                        .contains(&format!("current epoch is {newer}")),
                    "{err}"
                );
            }
            6 => assert_eq!(r.unwrap_err().kind(), ErrorKind::SessionClosed),
            _ => assert_eq!(r.unwrap(), CommitAck::Applied { seq: 1 }, "session g{i:02}"),
        }
    }
    // The eleven queued commits went out as one statement.
    let after = store.write_stats();
    assert_eq!(
        (
            after.statements - before.statements,
            after.commits - before.commits
        ),
        (1, 11),
        "{before:?} -> {after:?}"
    );
    // Nothing of the refused commits was written.
    let rows = sqlx::query(
        "SELECT session_id, count(*) FROM normandy_entries GROUP BY session_id ORDER BY session_id",
    )
    .fetch_all(&h.admin)
    .await
    .unwrap();
    for row in rows {
        let (s, c): (String, i64) = (row.get(0), row.get(1));
        let want = if s == "g05" || s == "g06" { 0 } else { 1 };
        assert_eq!(c, want, "entries of {s}");
    }
}

#[tokio::test]
async fn many_concurrent_commits_all_land() {
    let Some(url) = url().await else { return };
    let h = PgHarness::new(&url).await;
    let store = h.pg();
    let n = 64;
    let mut tasks: Vec<tokio::task::JoinHandle<normandy_core::Result<()>>> = Vec::new();
    for i in 0..n {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let id = sid(&format!("c{i}"));
            store
                .create(NewSession::bare(id.clone(), ResumePolicy::Eager))
                .await?;
            let epoch = store.activate(&id, &node("a")).await?.epoch;
            for seq in 0..5 {
                let ack = store
                    .commit(&id, epoch, seq, &input_batch(seq, &format!("i{seq}")))
                    .await?;
                assert_eq!(ack, CommitAck::Applied { seq: seq + 1 });
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM normandy_entries")
        .fetch_one(&h.admin)
        .await
        .unwrap();
    assert_eq!(total, 64 * 5);
    // Every session is eager with queued input: all resumable, owned by "a".
    let page = store
        .list_resumable(&OwnerFilter::Node(node("a")), None, 100)
        .await
        .unwrap();
    assert_eq!(page.sessions.len(), 64);
}

#[tokio::test]
async fn list_resumable_reads_the_partial_index_not_the_table() {
    let Some(url) = url().await else { return };
    let h = PgHarness::new(&url).await;
    let store = h.pg();
    // 20,000 sessions of a hundred nodes, 2,000 resumable, 20 of them owned by node-0: when one
    // node of a hundred dies, its survivors must read its 20 sessions, not the 2,000.
    sqlx::query(
        "INSERT INTO normandy_sessions (id, owner, turn_state, resumable, resume_policy) \
         SELECT 's' || lpad(i::text, 6, '0'), 'node-' || ((i / 10) % 100) || '#1', '\\x4e4d0102'::bytea, \
                i % 10 = 0, 'eager' \
           FROM generate_series(1, 20000) AS i",
    )
    .execute(&h.admin)
    .await
    .unwrap();
    sqlx::query("ANALYZE normandy_sessions")
        .execute(&h.admin)
        .await
        .unwrap();
    for owner in [OwnerFilter::Node(node("node-0")), OwnerFilter::Any] {
        let plan = store.explain_list_resumable(&owner).await.unwrap();
        assert!(
            !plan.contains("Seq Scan"),
            "{owner:?} scans the table:\n{plan}"
        );
        let index = match owner {
            OwnerFilter::Node(_) => "normandy_sessions_resumable_owner_idx",
            OwnerFilter::Any => "normandy_sessions_resumable_idx",
        };
        assert!(
            plan.contains(index),
            "{owner:?} does not use {index}:\n{plan}"
        );
    }
    // And the listing itself pages through exactly the resumable rows, in id order.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .list_resumable(&OwnerFilter::Node(node("node-0")), cursor.as_ref(), 3)
            .await
            .unwrap();
        seen.extend(page.sessions.iter().map(|s| s.id.as_str().to_string()));
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted);
    assert_eq!(
        seen.len(),
        20,
        "every tenth session is resumable, spread over 100 owners"
    );
}

/// Issue 14, hole 4: a row lock held by a stuck client (a paused node inside a transaction)
/// makes the store's call fail retryably within `lock_timeout`, instead of waiting for hours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_lock_held_by_a_stuck_client_fails_retryably_within_the_lock_timeout() {
    let Some(url) = url().await else { return };
    let h = PgHarness::new(&url).await;
    let timeouts = normandy_store_postgres::ServerTimeouts {
        lock: Duration::from_millis(300),
        ..Default::default()
    };
    let store = PgStore::connect(h.config().server_timeouts(timeouts))
        .await
        .unwrap();
    let id = sid("locked");
    store
        .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
        .await
        .unwrap();
    // Another client takes the session's row lock and sits on it.
    let mut stuck = h.admin.begin().await.unwrap();
    sqlx::query("SELECT id FROM normandy_sessions WHERE id = $1 FOR UPDATE")
        .bind(id.as_str())
        .execute(&mut *stuck)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        store.activate(&id, &NodeId::new("n", 1).unwrap()),
    )
    .await
    .expect("activation must not wait on the lock without end")
    .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(err.to_string().contains("55P03"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // Nothing was written: once the lock is gone, the activation goes through at epoch 1.
    stuck.rollback().await.unwrap();
    let rec = store
        .activate(&id, &NodeId::new("n", 1).unwrap())
        .await
        .unwrap();
    assert_eq!(rec.epoch, 1);
}
