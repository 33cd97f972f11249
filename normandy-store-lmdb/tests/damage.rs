//! Damaged `data.mdb` files (issue 15): truncated copies are refused at open with an error
//! naming the file and the fix, and `verify` turns every other kind of damage into an error
//! instead of a dead caller.
//!
//! Each test builds a small environment through the store API (sessions, entries, values big
//! enough for overflow pages), closes it, and damages copies of its `data.mdb` in temp dirs the
//! way the issue did: truncated to the meta pages, to half, by one page, and page-header flips.
//! The store is then driven **in a child process** — this test binary re-executed with
//! `damage_child` (ignored in normal runs) — so a `SIGBUS`/`SIGSEGV`/abort is an outcome the
//! parent can assert on, not the end of the test run.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{batch, node, sid};
use normandy_core::{ErrorKind, NewSession, ResumePolicy, SessionStore};
use normandy_store_lmdb::verify::{VerifyReport, verify_with};
use normandy_store_lmdb::{Durability, LmdbConfig, LmdbStore};

const DIR_VAR: &str = "NORMANDY_DAMAGE_DIR";
const SESSIONS: usize = 4;
const PREFIX: &str = "DAMAGE-CHILD";

fn verify_program() -> Command {
    Command::new(env!("CARGO_BIN_EXE_normandy-lmdb-verify"))
}

/// Builds the healthy environment: `SESSIONS` sessions with small and large entries (the large
/// ones live on overflow pages), the last commit a 64 KiB value, so the file's last pages
/// hold data a reader needs. Returns the directory and the file's page size.
async fn healthy() -> (tempfile::TempDir, u64) {
    let dir = tempfile::tempdir().unwrap();
    {
        let store =
            LmdbStore::open(LmdbConfig::new(dir.path()).durability(Durability::NoSync)).unwrap();
        for s in 0..SESSIONS {
            let id = sid(&format!("dmg-{s}"));
            store
                .create(NewSession::bare(id.clone(), ResumePolicy::Eager))
                .await
                .unwrap();
            let epoch = store.activate(&id, &node("a")).await.unwrap().epoch;
            for i in 0..6u64 {
                let text = "d".repeat(if i % 3 == 2 { 9_000 } else { 300 });
                store
                    .commit(&id, epoch, i * 2, &batch(i * 2, 2, &text))
                    .await
                    .unwrap();
            }
        }
        // Last: a value LMDB cannot fit in a freed run, so it goes at the end of the file.
        let id = sid("dmg-0");
        let rec = store.load(&id).await.unwrap().unwrap();
        store
            .commit(
                &id,
                rec.epoch,
                rec.seq,
                &batch(rec.seq, 1, &"L".repeat(64 << 10)),
            )
            .await
            .unwrap();
    }
    let page = page_size(&dir.path().join("data.mdb"));
    (dir, page)
}

/// The page size from meta page 0 (`MDB_meta.mm_dbs[0].md_pad`, at offset 16 + 24).
fn page_size(file: &Path) -> u64 {
    let bytes = std::fs::read(file).unwrap();
    u64::from(u32::from_le_bytes(bytes[40..44].try_into().unwrap()))
}

/// A fresh directory holding a copy of `from`'s data file, damaged by `damage`.
fn damaged_copy(from: &Path, damage: impl FnOnce(&mut Vec<u8>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(from.join("data.mdb")).unwrap();
    damage(&mut bytes);
    std::fs::write(dir.path().join("data.mdb"), &bytes).unwrap();
    dir
}

/// What the child did with a damaged copy.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Opened, loaded every session and its entries, and committed a turn.
    Served,
    /// A step returned a typed error: (step, kind, message).
    Refused(String, String, String),
    /// Killed by this signal.
    Crashed(i32),
    /// Anything else (a panic, a hang): a failure of the store, with the child's output.
    Broken(String),
}

/// Runs `damage_child` on `dir` and reports what happened.
fn run_child(dir: &Path) -> Outcome {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "damage_child",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(DIR_VAR, dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Outcome::Broken("child hung for 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&status) {
        return Outcome::Crashed(signal);
    }
    let said: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.find(PREFIX).map(|at| &l[at + PREFIX.len() + 1..]))
        .collect();
    match said.last() {
        Some(&"served") if status.success() => Outcome::Served,
        Some(line) if status.success() && line.starts_with("refused ") => {
            let mut f = line["refused ".len()..].splitn(3, ' ');
            Outcome::Refused(
                f.next().unwrap_or_default().to_string(),
                f.next().unwrap_or_default().to_string(),
                f.next().unwrap_or_default().to_string(),
            )
        }
        _ => Outcome::Broken(format!(
            "{status}\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

/// Not a test of its own: the child's entry point (run by `run_child`). Opens the store at
/// `DIR_VAR`, loads every session and its entries, then runs a turn's commit on one of them,
/// printing `served`, or `refused <step> <kind> <message>` at the first typed error.
#[test]
#[ignore = "the damage tests' child process; run by them"]
fn damage_child() {
    let dir = PathBuf::from(std::env::var(DIR_VAR).expect("child needs its directory"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let said = rt.block_on(async move {
        let refused =
            |step: &str, e: normandy_core::Error| format!("refused {step} {:?} {e}", e.kind());
        let store = match LmdbStore::open(LmdbConfig::new(&dir)) {
            Ok(s) => s,
            Err(e) => return refused("open", e),
        };
        for s in 0..SESSIONS {
            let id = sid(&format!("dmg-{s}"));
            match store.load(&id).await {
                Ok(Some(_)) => {}
                Ok(None) => return format!("refused load NotFound dmg-{s} is missing"),
                Err(e) => return refused("load", e),
            }
            if let Err(e) = store.entries(&id, 0, 10_000).await {
                return refused("entries", e);
            }
        }
        let id = sid("dmg-1");
        let rec = match store.activate(&id, &node("b")).await {
            Ok(r) => r,
            Err(e) => return refused("activate", e),
        };
        if let Err(e) = store
            .commit(
                &id,
                rec.epoch,
                rec.seq,
                &batch(rec.seq, 2, &"t".repeat(5_000)),
            )
            .await
        {
            return refused("commit", e);
        }
        "served".to_string()
    });
    println!("{PREFIX} {said}");
}

/// A truncated copy: refused at open in this process (the file is never mapped), refused in
/// the child, and reported by verify — with the file and the fix named each time.
async fn assert_truncation_refused(keep_pages: impl FnOnce(u64) -> u64) {
    let (healthy, page) = healthy().await;
    let pages = std::fs::metadata(healthy.path().join("data.mdb"))
        .unwrap()
        .len()
        / page;
    let keep = keep_pages(pages);
    assert!(keep < pages && keep >= 2, "{keep} of {pages}");
    let copy = damaged_copy(healthy.path(), |b| b.truncate((keep * page) as usize));
    let file = copy
        .path()
        .canonicalize()
        .unwrap()
        .join("data.mdb")
        .display()
        .to_string();

    let err = LmdbStore::open(LmdbConfig::new(copy.path())).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    let msg = err.to_string();
    for needle in [
        file.as_str(),
        "truncated",
        "restore the environment from a backup",
        "mdb_copy -c",
        "normandy-lmdb-verify",
    ] {
        assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
    }
    // Nothing was written: the damaged file is as it was.
    assert_eq!(
        std::fs::metadata(copy.path().join("data.mdb"))
            .unwrap()
            .len(),
        keep * page
    );

    match run_child(copy.path()) {
        Outcome::Refused(step, kind, msg) => {
            assert_eq!((step.as_str(), kind.as_str()), ("open", "Corrupt"), "{msg}");
            assert!(msg.contains("truncated"), "{msg}");
        }
        other => panic!("the child was not refused at open: {other:?}"),
    }

    let err = verify_with(copy.path(), verify_program()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_to_the_meta_pages_is_refused_at_open() {
    assert_truncation_refused(|_| 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_to_half_is_refused_at_open() {
    assert_truncation_refused(|pages| pages / 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_by_one_page_is_refused_at_open() {
    assert_truncation_refused(|pages| pages - 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_meta_page_is_refused_at_open() {
    let (healthy, page) = healthy().await;
    // Meta page 1's magic number (offset 16 of page 1).
    let at = page as usize + 16;
    let copy = damaged_copy(healthy.path(), |b| b[at] ^= 0x40);
    let err = LmdbStore::open(LmdbConfig::new(copy.path())).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("meta page 1 has no LMDB magic number"),
        "{msg}"
    );
    assert!(
        msg.contains("restore the environment from a backup"),
        "{msg}"
    );
    let err = verify_with(copy.path(), verify_program()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
}

/// Flips a page-header field of many pages, one copy each. For every copy, verify returns
/// (never crashes the caller) with a report or a `Corrupt` error; when it says the copy is
/// whole, the child serves every session or meets a typed `Corrupt` error, never a crash; when
/// it does not, the child may refuse or die, but only the child. Enough pages are in use that
/// verify must flag many copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_header_flips_fail_verify_not_the_caller() {
    let (healthy, page) = healthy().await;
    let pages = std::fs::metadata(healthy.path().join("data.mdb"))
        .unwrap()
        .len()
        / page;
    let whole = verify_with(healthy.path(), verify_program()).unwrap();
    // Pages that start with a page header (their own number first): tree pages, the first
    // page of each overflow run, free pages. The rest continue an overflow run: value bytes.
    let bytes = std::fs::read(healthy.path().join("data.mdb")).unwrap();
    let headed: Vec<u64> = (2..pages)
        .filter(|&p| {
            let at = (p * page) as usize;
            u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) == p
        })
        .collect();
    assert!(headed.len() >= 6, "{headed:?}");
    let mut flagged = 0;
    let mut refused_at_open = 0;
    let mut crashed = Vec::new();
    let mut tried = 0;
    for (n, &pgno) in headed.iter().enumerate() {
        tried += 1;
        let base = (pgno * page) as usize;
        let copy = damaged_copy(healthy.path(), |b| {
            if n % 2 == 0 {
                // mp_flags: branch <-> leaf <-> overflow.
                b[base + 10] ^= 0x07;
            } else {
                // mp_pgno: the page claims another number.
                b[base + 2] ^= 0x80;
            }
        });
        let verdict = verify_with(copy.path(), verify_program());
        let outcome = run_child(copy.path());
        match &verdict {
            Ok(report) => {
                // Verify found every page whole: the flip hit a free page, or the middle of an
                // overflow run (value bytes, no header: LMDB has no checksum to notice). The
                // store must then serve, or meet the damage as a typed error from the codec —
                // never crash.
                assert_eq!(report.entries, whole.entries, "page {pgno}");
                match &outcome {
                    Outcome::Served => {}
                    Outcome::Refused(_, kind, _) if kind == "Corrupt" => {}
                    other => panic!("page {pgno}: verify passed, but the store: {other:?}"),
                }
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Corrupt, "page {pgno}: {e}");
                let msg = e.to_string();
                assert!(msg.contains("restore the environment"), "{msg}");
                flagged += 1;
                match &outcome {
                    Outcome::Refused(step, ..) if step == "open" => refused_at_open += 1,
                    Outcome::Crashed(signal) => crashed.push((pgno, *signal)),
                    Outcome::Broken(out) => panic!("page {pgno}: the child broke: {out}"),
                    _ => {}
                }
            }
        }
    }
    eprintln!(
        "{tried} flips: verify flagged {flagged}, open refused {refused_at_open}, \
         the child died on {crashed:?}"
    );
    assert!(
        flagged * 2 >= tried,
        "verify flagged only {flagged} of {tried} flipped pages"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_environment_passes_verify() {
    let (healthy, page) = healthy().await;
    // `verify` finds the program next to the test binary (target/*/deps/..).
    let report: VerifyReport = normandy_store_lmdb::verify(healthy.path()).unwrap();
    assert_eq!(report.databases, 8, "{report:?}");
    assert!(report.entries > 4 * 12, "{report:?}");
    assert!(report.bytes > 64 << 10, "{report:?}");
    let file_pages = std::fs::metadata(healthy.path().join("data.mdb"))
        .unwrap()
        .len()
        / page;
    assert_eq!(report.file_pages, file_pages);
    assert!(report.pages + report.free_pages <= file_pages, "{report:?}");
    assert!(report.pages > 10, "{report:?}");
    // And the store opens it and serves every session, in a child as in this process.
    assert_eq!(run_child(healthy.path()), Outcome::Served);
    let store = LmdbStore::open(LmdbConfig::new(healthy.path())).unwrap();
    assert!(store.load(&sid("dmg-3")).await.unwrap().is_some());
}

#[test]
fn verify_without_its_program_says_how_to_get_it() {
    let dir = tempfile::tempdir().unwrap();
    let err = verify_with(
        dir.path(),
        Command::new("/nonexistent/normandy-lmdb-verify"),
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("cargo install"), "{err}");
    // And a directory with no environment is a Config error from the child.
    let err = verify_with(dir.path(), verify_program()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
}
