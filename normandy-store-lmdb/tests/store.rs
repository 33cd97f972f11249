//! LMDB-specific behaviour: opening bad directories, the format marker, map growth, group commit,
//! durability across close and reopen.

mod common;

use std::sync::Arc;

use common::{batch, node, sid};
use normandy_core::{
    CommitAck, ErrorKind, NewSession, ResumePolicy, SessionStore, codec::FORMAT_VERSION,
};
use normandy_store_lmdb::heed::types::Bytes;
use normandy_store_lmdb::heed::{CommitOrAbort, Database, EnvOpenOptions};
use normandy_store_lmdb::{Durability, LmdbConfig, LmdbStore};

fn open(dir: &std::path::Path) -> LmdbStore {
    LmdbStore::open(LmdbConfig::new(dir)).expect("open store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_close_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let id = sid("durable-1");
    {
        let store = open(dir.path());
        store
            .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
            .await
            .unwrap();
        let epoch = store.activate(&id, &node("a")).await.unwrap().epoch;
        let ack = store
            .commit(&id, epoch, 0, &batch(0, 3, "hello"))
            .await
            .unwrap();
        assert_eq!(ack, CommitAck::Applied { seq: 3 });
    }
    // Every handle is gone: the environment was closed, and this is a fresh open.
    let store = open(dir.path());
    let rec = store
        .load(&id)
        .await
        .unwrap()
        .expect("session after reopen");
    assert_eq!((rec.seq, rec.epoch), (3, 1));
    assert_eq!(rec.state.queued.back().map(|q| q.seq), Some(3));
    let entries = store.entries(&id, 0, 100).await.unwrap();
    assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
}

#[tokio::test]
async fn two_opens_of_one_path_share_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path());
    let b = open(dir.path());
    let id = sid("shared");
    a.create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
        .await
        .unwrap();
    assert!(b.load(&id).await.unwrap().is_some());
    assert_eq!(a.path(), b.path());
}

#[tokio::test]
async fn garbage_data_file_is_a_typed_error() {
    for garbage in [vec![0xAB; 64 * 1024], b"not lmdb at all".to_vec()] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("data.mdb"), &garbage).unwrap();
        let err = LmdbStore::open(LmdbConfig::new(dir.path())).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        let msg = err.to_string();
        assert!(msg.contains("not an LMDB environment"), "{msg}");
        assert!(
            msg.contains(&dir.path().canonicalize().unwrap().display().to_string()),
            "{msg}"
        );
        // Nothing was overwritten.
        assert_eq!(std::fs::read(dir.path().join("data.mdb")).unwrap(), garbage);
    }
}

#[tokio::test]
async fn path_that_is_a_file_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let err = LmdbStore::open(LmdbConfig::new(&file)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("not-a-dir"), "{err}");
}

fn raw_env(dir: &std::path::Path) -> normandy_store_lmdb::heed::Env {
    // SAFETY: the store that used this directory is closed; nothing else maps it.
    #[allow(unsafe_code)]
    unsafe {
        EnvOpenOptions::new().max_dbs(16).open(dir).unwrap()
    }
}

#[tokio::test]
async fn environment_from_a_newer_layout_is_unsupported_version() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    {
        let env = raw_env(dir.path());
        let wtxn = env.write_txn().unwrap();
        let meta: Database<Bytes, Bytes> = env
            .create_databases_and_commit(wtxn, |dbo, wtxn| {
                dbo.create_database(wtxn, Some("meta"))
                    .map(CommitOrAbort::<_, ()>::Commit)
            })
            .unwrap()
            .unwrap_commit();
        let mut wtxn = env.write_txn().unwrap();
        meta.put(&mut wtxn, b"format_version", &99u32.to_be_bytes())
            .unwrap();
        wtxn.commit().unwrap();
    }
    let err = LmdbStore::open(LmdbConfig::new(dir.path())).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnsupportedVersion, "{err}");
    assert!(err.to_string().contains("99"), "{err}");
}

#[tokio::test]
async fn foreign_lmdb_environment_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let env = raw_env(dir.path());
        let wtxn = env.write_txn().unwrap();
        let db: Database<Bytes, Bytes> = env
            .create_databases_and_commit(wtxn, |dbo, wtxn| {
                dbo.create_database(wtxn, None)
                    .map(CommitOrAbort::<_, ()>::Commit)
            })
            .unwrap()
            .unwrap_commit();
        let mut wtxn = env.write_txn().unwrap();
        db.put(&mut wtxn, b"someone-else", b"data").unwrap();
        wtxn.commit().unwrap();
    }
    let err = LmdbStore::open(LmdbConfig::new(dir.path())).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("did not write"), "{err}");
}

/// Makes `dir` unwritable even for root (who ignores mode bits): chmod, then the immutable
/// attribute if still writable. Returns false if neither works here.
fn make_read_only(dir: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    let probe = dir.join("probe");
    if std::fs::write(&probe, b"x").is_err() {
        return true;
    }
    let _ = std::fs::remove_file(&probe);
    let ok = std::process::Command::new("chattr")
        .arg("+i")
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    ok && std::fs::write(&probe, b"x").is_err()
}

#[tokio::test]
async fn read_only_directory_is_a_clear_error() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("ro");
    std::fs::create_dir(&dir).unwrap();
    if !make_read_only(&dir) {
        eprintln!(
            "SKIPPED read_only_directory_is_a_clear_error: cannot make a directory read-only here"
        );
        return;
    }
    let result = LmdbStore::open(LmdbConfig::new(&dir));
    let _ = std::process::Command::new("chattr")
        .arg("-i")
        .arg(&dir)
        .status();
    let err = result.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backend, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("read-write access") && msg.contains("ro"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_map_grows_and_keeps_every_commit() {
    let dir = tempfile::tempdir().unwrap();
    let config = LmdbConfig::new(dir.path())
        .map_size(64 * 1024)
        .durability(Durability::NoSync);
    let store = LmdbStore::open(config).unwrap();
    let initial = store.map_size();
    let id = sid("grows");
    store
        .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
        .await
        .unwrap();
    let epoch = store.activate(&id, &node("a")).await.unwrap().epoch;
    let text = "x".repeat(20_000);
    for i in 0..40u64 {
        let ack = store.commit(&id, epoch, i, &batch(i, 1, &text)).await;
        assert_eq!(
            ack.unwrap(),
            CommitAck::Applied { seq: i + 1 },
            "commit {i}"
        );
    }
    assert!(
        store.map_size() > initial,
        "map did not grow: {}",
        store.map_size()
    );
    drop(store);
    let store = open(dir.path());
    let entries = store.entries(&id, 0, 1000).await.unwrap();
    assert_eq!(entries.len(), 40);
    assert_eq!(store.load(&id).await.unwrap().unwrap().seq, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_full_at_the_ceiling_names_the_setting_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = LmdbConfig::new(dir.path())
        .map_size(64 * 1024)
        .max_map_size(256 * 1024)
        .durability(Durability::NoSync);
    let store = LmdbStore::open(config).unwrap();
    let id = sid("ceiling");
    store
        .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
        .await
        .unwrap();
    let epoch = store.activate(&id, &node("a")).await.unwrap().epoch;
    store
        .commit(&id, epoch, 0, &batch(0, 1, "small"))
        .await
        .unwrap();
    let huge = "y".repeat(1 << 20);
    let err = store
        .commit(&id, epoch, 1, &batch(1, 1, &huge))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Backend, "{err}");
    assert!(err.to_string().contains("max_map_size"), "{err}");
    // The failed commit left nothing, the acknowledged one is intact, and writes still work.
    let rec = store.load(&id).await.unwrap().unwrap();
    assert_eq!(rec.seq, 1);
    let ack = store.commit(&id, epoch, 1, &batch(1, 1, "fits")).await;
    assert_eq!(ack.unwrap(), CommitAck::Applied { seq: 2 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_batches_and_keeps_each_outcome_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    let n = 64;
    let mut epochs = Vec::new();
    for i in 0..n {
        let id = sid(&format!("g-{i:02}"));
        store
            .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
            .await
            .unwrap();
        epochs.push(store.activate(&id, &node("a")).await.unwrap().epoch);
    }
    let before = store.write_stats();
    // Odd sessions commit with a stale epoch: they must be fenced, the even ones applied.
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let store = store.clone();
            let epoch = if i % 2 == 0 { epochs[i] } else { epochs[i] - 1 };
            tokio::spawn(async move {
                let id = sid(&format!("g-{i:02}"));
                store.commit(&id, epoch, 0, &batch(0, 2, "hi")).await
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let out = t.await.unwrap();
        if i % 2 == 0 {
            assert_eq!(out.unwrap(), CommitAck::Applied { seq: 2 }, "session {i}");
        } else {
            assert_eq!(out.unwrap_err().kind(), ErrorKind::Fenced, "session {i}");
        }
    }
    let after = store.write_stats();
    let (txns, writes) = (
        after.transactions - before.transactions,
        after.writes - before.writes,
    );
    assert_eq!(writes, n as u64);
    assert!(
        txns < writes,
        "no batching: {txns} transactions for {writes} commits"
    );
    for i in 0..n {
        let rec = store
            .load(&sid(&format!("g-{i:02}")))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rec.seq, if i % 2 == 0 { 2 } else { 0 }, "session {i}");
    }
}

#[tokio::test]
async fn blobs_are_versioned() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let id = sid("versioned");
    store
        .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
        .await
        .unwrap();
    let epoch = store.activate(&id, &node("a")).await.unwrap().epoch;
    store
        .commit(&id, epoch, 0, &batch(0, 1, "hi"))
        .await
        .unwrap();
    let raw = store.raw_bytes().await.unwrap();
    // Header, state and entry blobs all start with the codec's magic and version.
    let marker = [b'N', b'M', FORMAT_VERSION];
    let count = raw.windows(3).filter(|w| *w == marker).count();
    assert!(count >= 3, "expected versioned blobs, found {count}");
}
