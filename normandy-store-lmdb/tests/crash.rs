//! Crash safety and cross-process fencing with real processes.
//!
//! The parent re-executes this test binary with `NORMANDY_LMDB_CHILD` set, which turns the
//! `child_process` test into the child's main: it opens the environment and writes, printing
//! what was acknowledged; the parent kills it with SIGKILL (`Child::kill`) at random moments and
//! checks what a fresh open sees.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{batch, node, sid};
use normandy_core::{CommitAck, ErrorKind, NewSession, ResumePolicy, SessionStore};
use normandy_store_lmdb::{LmdbConfig, LmdbStore};

const CHILD_ENV: &str = "NORMANDY_LMDB_CHILD";
const DIR_ENV: &str = "NORMANDY_LMDB_CHILD_DIR";
const SESSIONS: usize = 4;

fn spawn_child(mode: &str, dir: &std::path::Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "child_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, mode)
        .env(DIR_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child")
}

/// Not a test of its own: the child's entry point (returns at once unless `CHILD_ENV` is set).
#[test]
fn child_process() {
    let Ok(mode) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = std::env::var(DIR_ENV).expect("child needs its directory");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        if mode == "try-open" {
            match LmdbStore::open(LmdbConfig::new(&dir)) {
                Ok(_) => println!("child-opened"),
                Err(e) => println!("child-refused {:?}: {e}", e.kind()),
            }
            return;
        }
        let store = std::sync::Arc::new(LmdbStore::open(LmdbConfig::new(&dir)).unwrap());
        match mode.as_str() {
            "commit-loop" => commit_loop(store).await,
            "activate-and-commit" => {
                let id = sid("fenced");
                let rec = store.activate(&id, &node("child")).await.unwrap();
                let ack = store
                    .commit(&id, rec.epoch, rec.seq, &batch(rec.seq, 1, "from child"))
                    .await
                    .unwrap();
                println!("child-done {} {ack:?}", rec.epoch);
            }
            "grow" => {
                // Writes far more than the parent's tiny map holds, growing the environment.
                let id = sid("grown");
                store
                    .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
                    .await
                    .unwrap();
                let epoch = store.activate(&id, &node("child")).await.unwrap().epoch;
                let text = "g".repeat(20_000);
                for i in 0..40 {
                    store
                        .commit(&id, epoch, i, &batch(i, 1, &text))
                        .await
                        .unwrap();
                }
                println!("child-done grown");
            }
            other => panic!("unknown child mode {other}"),
        }
    });
}

/// Commits forever on `SESSIONS` sessions at once (so group commit batches them), printing
/// `ack <session> <seq>` after each acknowledged commit.
async fn commit_loop(store: std::sync::Arc<LmdbStore>) {
    for s in 0..SESSIONS {
        let store = store.clone();
        tokio::spawn(async move {
            let id = sid(&format!("crash-{s}"));
            match store
                .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
                .await
            {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => panic!("create: {e}"),
            }
            let rec = store.activate(&id, &node("child")).await.unwrap();
            let mut seq = rec.seq;
            loop {
                // 1 to 3 entries per commit, so a torn multi-entry commit would show.
                let n = 1 + seq % 3;
                let text = "z".repeat(100 + (seq as usize % 7) * 300);
                let ack = store
                    .commit(&id, rec.epoch, seq, &batch(seq, n, &text))
                    .await
                    .unwrap_or_else(|e| {
                        // A failed commit must fail the test: exit, which the parent notices.
                        eprintln!("child: commit failed: {e}");
                        std::process::exit(2)
                    });
                let CommitAck::Applied { seq: new } = ack else {
                    eprintln!("child: unexpected {ack:?}");
                    std::process::exit(2)
                };
                seq = new;
                println!("ack {s} {seq}");
            }
        });
    }
    // The parent kills this process; until then the tasks write.
    std::future::pending::<()>().await;
}

/// A small xorshift, so the test needs no rand crate; seeded from the clock and printed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Checks that every acknowledged commit is there and that nothing partial is visible.
async fn verify(dir: &std::path::Path, acked: &[u64; SESSIONS], round: usize) {
    let store = LmdbStore::open(LmdbConfig::new(dir)).unwrap();
    for (s, &acked) in acked.iter().enumerate() {
        let id = sid(&format!("crash-{s}"));
        let Some(rec) = store.load(&id).await.unwrap() else {
            assert_eq!(
                acked, 0,
                "round {round}: session {s} missing but seq {acked} was acked"
            );
            continue;
        };
        assert!(
            rec.seq >= acked,
            "round {round}: session {s} has seq {} but {acked} was acknowledged",
            rec.seq
        );
        let entries = store.entries(&id, 0, usize::MAX).await.unwrap();
        let seqs: Vec<u64> = entries.iter().map(|e| e.seq).collect();
        let want: Vec<u64> = (1..=rec.seq).collect();
        assert_eq!(
            seqs, want,
            "round {round}: session {s} entries are not 1..={}",
            rec.seq
        );
        // The state was written by the same commit as the last entry.
        let queued = rec.state.queued.back();
        if rec.seq > 0 {
            let q = queued.expect("state of a committed session names its last input");
            assert_eq!(
                q.seq, rec.seq,
                "round {round}: session {s} state/entries apart"
            );
            assert_eq!(
                Some(&q.input_id),
                entries.last().and_then(|e| e.payload.input_id()),
                "round {round}: session {s} state names another input"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_never_loses_an_acknowledged_commit() {
    let dir = tempfile::tempdir().unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("crash test seed {seed}");
    let mut rng = Rng(seed);
    let mut acked = [0u64; SESSIONS];
    let mut total_acks = 0;
    for round in 0..20 {
        let mut child = spawn_child("commit-loop", dir.path());
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<(usize, u64)>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut parts = line.split_whitespace();
                if parts.next() != Some("ack") {
                    continue;
                }
                let s: usize = parts.next().unwrap().parse().unwrap();
                let seq: u64 = parts.next().unwrap().parse().unwrap();
                if tx.send((s, seq)).is_err() {
                    break;
                }
            }
        });
        // Wait for the first ack (the child is up and writing), then kill it at a random moment.
        let first = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("round {round}: child never acknowledged a commit"));
        acked[first.0] = acked[first.0].max(first.1);
        let until = Instant::now() + Duration::from_millis(rng.next() % 300);
        while Instant::now() < until {
            if let Ok((s, seq)) = rx.recv_timeout(Duration::from_millis(5)) {
                acked[s] = acked[s].max(seq);
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("round {round}: the child exited on its own ({status}) before the kill");
        }
        child.kill().expect("SIGKILL the child");
        child.wait().unwrap();
        reader.join().unwrap();
        // Acks printed before the kill and still in the pipe count too.
        while let Ok((s, seq)) = rx.try_recv() {
            acked[s] = acked[s].max(seq);
        }
        total_acks += 1;
        verify(dir.path(), &acked, round).await;
    }
    eprintln!("acknowledged seqs after 20 kills: {acked:?}");
    assert!(
        total_acks == 20 && acked.iter().all(|&a| a > 0),
        "acks {acked:?}"
    );
}

/// Runs a child in `mode` to completion; its stdout.
fn run_child(mode: &str, dir: &std::path::Path) -> String {
    let out = spawn_child(mode, dir).wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "child {mode} failed: {stdout}");
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_per_environment_and_fencing_holds_across_process_lives() {
    let dir = tempfile::tempdir().unwrap();
    let store = LmdbStore::open(LmdbConfig::new(dir.path())).unwrap();
    let id = sid("fenced");
    store
        .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
        .await
        .unwrap();
    let mine = store.activate(&id, &node("parent")).await.unwrap().epoch;
    store
        .commit(&id, mine, 0, &batch(0, 1, "from parent"))
        .await
        .unwrap();

    // While this process holds the environment, another is refused, naming this one.
    let stdout = run_child("try-open", dir.path());
    assert!(stdout.contains("child-refused Config"), "{stdout}");
    assert!(
        stdout.contains(&format!("in use by process {}", std::process::id())),
        "the refusal names the holder's pid: {stdout}"
    );

    // Once it closes, the next process activates (epoch + 1) and commits.
    drop(store);
    let stdout = run_child("activate-and-commit", dir.path());
    assert!(stdout.contains("child-done 2"), "{stdout}");

    // This process's old epoch is fenced when it comes back.
    let store = LmdbStore::open(LmdbConfig::new(dir.path())).unwrap();
    let err = store
        .commit(&id, mine, 2, &batch(2, 1, "stale"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Fenced, "{err}");
    let err = store.mark_terminal(&id, mine).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Fenced, "{err}");
    let rec = store.load(&id).await.unwrap().unwrap();
    assert_eq!((rec.epoch, rec.seq), (2, 2));
    assert_eq!(rec.owner, Some(node("child")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_grown_by_another_process_is_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let small = || LmdbConfig::new(dir.path()).map_size(64 * 1024);
    let store = LmdbStore::open(small()).unwrap();
    let id = sid("mine");
    store
        .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
        .await
        .unwrap();
    let before = store.map_size();
    drop(store); // one process per environment: the next one grows it

    let stdout = run_child("grow", dir.path());
    assert!(stdout.contains("child-done grown"), "{stdout}");

    // Opened again with a map smaller than the data: reads and writes must adopt the size.
    let store = LmdbStore::open(small()).unwrap();
    let grown = store
        .load(&sid("grown"))
        .await
        .unwrap()
        .expect("child's session");
    assert_eq!(grown.seq, 40);
    assert_eq!(
        store.entries(&sid("grown"), 0, 100).await.unwrap().len(),
        40
    );
    let epoch = store.activate(&id, &node("parent")).await.unwrap().epoch;
    store
        .commit(&id, epoch, 0, &batch(0, 1, "after"))
        .await
        .unwrap();
    assert!(store.map_size() > before, "map size stayed {before}");
}
