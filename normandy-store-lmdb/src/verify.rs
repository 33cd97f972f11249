//! Verify: walk every page of an environment **in a child process**, so a damaged page fails
//! the walk, not the caller.
//!
//! LMDB keeps no page checksums and reads its pages straight from the memory map: a damaged
//! page can kill the process that reads it (`SIGBUS`, `SIGSEGV`, an assertion abort), and no
//! check short of reading every page finds such a page before a request does. [`verify`] runs
//! that read in another process and turns its death into an error:
//!
//! ```no_run
//! # fn main() -> normandy_core::Result<()> {
//! let report = normandy_store_lmdb::verify::verify("/var/lib/my-agents/sessions")?;
//! println!("{} entries in {} pages: whole", report.entries, report.pages);
//! # Ok(())
//! # }
//! ```
//!
//! The child first runs the open-time check (meta pages, file length), then walks every tree
//! of the environment page by page through `pread` and bounds checks, never the map — every
//! branch, leaf and overflow page of the free-page tree, the main tree and each database,
//! checking each page's header, node offsets, a page reached twice and each tree's counters —
//! and finally reads every key and value through LMDB itself under one read transaction, so
//! whatever the structural walk missed is met by LMDB's own code in a process that may die.
//!
//! # Why a separate program
//! The child is the small `normandy-lmdb-verify` binary of this crate (it has no dependency
//! the library lacks), run as `normandy-lmdb-verify <dir>`. The alternatives were worse:
//! `fork()` without `exec` in a multithreaded (tokio) process may only do async-signal-safe
//! work before it execs, and a walk through LMDB and the allocator is not that; re-running
//! `current_exe()` with a marker variable needs every binary that embeds the store to check
//! the marker first thing in `main`. A service that would rather not ship a second binary can
//! still use its own: give it a subcommand that calls [`child_main`] and pass that command to
//! [`verify_with`].
//!
//! Build and install the binary with
//! `cargo install --path normandy-store-lmdb --bin normandy-lmdb-verify` (or
//! `cargo build --release -p normandy-store-lmdb --bin normandy-lmdb-verify`); [`verify`]
//! finds it through `NORMANDY_LMDB_VERIFY`, next to the running executable, or on `PATH`.
//!
//! # Running it on a live store
//! The walk opens the environment read-only and holds one LMDB read transaction, which pins
//! its snapshot: it may run while a store has the environment open (it takes no
//! `normandy.lock`), and pages the writer reuses afterwards do not disturb it. It reads the
//! whole file, so on a large environment it takes as long as reading that many bytes; call it
//! from a blocking thread (`tokio::task::spawn_blocking`), not from an async task.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use heed::types::Bytes;
use heed::{CommitOrAbort, Database, EnvFlags, EnvOpenOptions};
use normandy_core::{Error, Result};

use crate::error::{BACKEND, from_heed};
use crate::pages::{DATA_FILE, Pages, check_data_file, damaged, read_metas};

/// The verify program's name (see the [module docs](self)).
pub const VERIFY_PROGRAM: &str = "normandy-lmdb-verify";
/// Environment variable naming the verify program's path, for [`verify`].
pub const VERIFY_PROGRAM_ENV: &str = "NORMANDY_LMDB_VERIFY";
/// The prefix of the one line the child prints for its parent.
const LINE: &str = "normandy-lmdb-verify:";

/// What a verify walk found in a whole environment.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// The environment's directory.
    pub path: PathBuf,
    /// The transaction whose snapshot was walked.
    pub txnid: u64,
    /// Named databases walked.
    pub databases: u64,
    /// Key/value pairs read, over every named database.
    pub entries: u64,
    /// Pages walked: every branch, leaf and overflow page of every tree (the free-page tree
    /// and the main tree included), plus the two meta pages.
    pub pages: u64,
    /// Pages the free-page tree lists (free, or freed by the last transactions).
    pub free_pages: u64,
    /// Whole pages in `data.mdb`.
    pub file_pages: u64,
    /// Bytes of keys and values read through LMDB.
    pub bytes: u64,
}

impl VerifyReport {
    fn line(&self) -> String {
        format!(
            "{LINE} ok txnid={} databases={} entries={} pages={} free_pages={} file_pages={} \
             bytes={}",
            self.txnid,
            self.databases,
            self.entries,
            self.pages,
            self.free_pages,
            self.file_pages,
            self.bytes
        )
    }

    fn parse(path: &Path, line: &str) -> Option<Self> {
        let mut r = Self {
            path: path.to_path_buf(),
            txnid: 0,
            databases: 0,
            entries: 0,
            pages: 0,
            free_pages: 0,
            file_pages: 0,
            bytes: 0,
        };
        for field in line.strip_prefix("ok ")?.split(' ') {
            let (k, v) = field.split_once('=')?;
            let v: u64 = v.parse().ok()?;
            match k {
                "txnid" => r.txnid = v,
                "databases" => r.databases = v,
                "entries" => r.entries = v,
                "pages" => r.pages = v,
                "free_pages" => r.free_pages = v,
                "file_pages" => r.file_pages = v,
                "bytes" => r.bytes = v,
                _ => {}
            }
        }
        Some(r)
    }
}

/// Walks every page of the environment at `dir` in a child process running the
/// `normandy-lmdb-verify` program, found through the `NORMANDY_LMDB_VERIFY` variable, next to
/// the running executable (or one directory up, for test binaries in `target/*/deps`), or on
/// `PATH`. Blocks until the walk ends.
///
/// # Errors
/// - `Corrupt` naming the environment, what is damaged and the fix, when the walk finds damage
///   or the child is killed by a signal (`SIGBUS`, `SIGSEGV`, `SIGABRT` — LMDB meeting a bad
///   page);
/// - `Config` when there is no environment at `dir`, or the program cannot be started (the
///   message says how to build it);
/// - `Backend` for anything else the child reports (no permission, ...).
pub fn verify(dir: impl AsRef<Path>) -> Result<VerifyReport> {
    verify_with(dir, Command::new(locate_program()))
}

/// [`verify`] with the child's command given: `command` is run with `dir` appended as its last
/// argument, and must end in [`child_main`] (as `normandy-lmdb-verify` does). For a service
/// that embeds the child in its own binary as a subcommand:
///
/// ```no_run
/// # fn main() -> normandy_core::Result<()> {
/// let mut me = std::process::Command::new(std::env::current_exe().unwrap());
/// me.arg("verify-lmdb"); // whose handler calls normandy_store_lmdb::verify::child_main(dir)
/// let report = normandy_store_lmdb::verify::verify_with("/var/lib/my-agents/sessions", me)?;
/// # let _ = report;
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// As [`verify`].
pub fn verify_with(dir: impl AsRef<Path>, mut command: Command) -> Result<VerifyReport> {
    let dir = dir.as_ref();
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let program = command.get_program().to_owned();
    let out = command
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| {
            Error::Config(format!(
                "cannot run the LMDB verify program {}: {e}; build it with `cargo install \
                 --path normandy-store-lmdb --bin {VERIFY_PROGRAM}` and put it on PATH, set \
                 {VERIFY_PROGRAM_ENV} to its path, or pass a command to verify_with",
                Path::new(&program).display()
            ))
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let said = stdout.lines().rev().find_map(|l| {
        l.find(LINE)
            .map(|at| l[at + LINE.len()..].trim().to_string())
    });
    let tail = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| format!(" (its last words: {:?})", l.trim()))
        .unwrap_or_default();
    let what = format!("LMDB environment at {}", dir.display());
    if let Some(said) = &said {
        if out.status.success()
            && let Some(report) = VerifyReport::parse(&dir, said)
        {
            return Ok(report);
        }
        if let Some(reason) = said.strip_prefix("corrupt ") {
            return Err(Error::Corrupt {
                session: None,
                what,
                reason: reason.to_string(),
            });
        }
        if let Some(message) = said.strip_prefix("config ") {
            return Err(Error::Config(message.to_string()));
        }
        if let Some(message) = said.strip_prefix("error ") {
            return Err(Error::Backend {
                backend: BACKEND,
                message: message.to_string(),
                retryable: false,
            });
        }
    }
    if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&out.status) {
        return Err(damaged(
            &dir,
            format!(
                "the verify walk of {} was killed by {} (signal {signal}){tail}: a page is \
                 damaged in a way only LMDB's own reads meet (LMDB keeps no page checksums), \
                 and a server reading it would die the same way",
                dir.join(DATA_FILE).display(),
                signal_name(signal)
            ),
        ));
    }
    Err(Error::Backend {
        backend: BACKEND,
        message: format!(
            "the LMDB verify program {} for {what} {}{tail} without a report",
            Path::new(&program).display(),
            out.status
        ),
        retryable: false,
    })
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGBUS => "SIGBUS",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// Where [`verify`] looks for the program: `NORMANDY_LMDB_VERIFY`, the running executable's
/// directory and its parent, else the bare name (resolved on `PATH`).
fn locate_program() -> PathBuf {
    if let Some(p) = std::env::var_os(VERIFY_PROGRAM_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let name = format!("{VERIFY_PROGRAM}{}", std::env::consts::EXE_SUFFIX);
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join(&name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from(name)
}

/// The child's side: walks `dir` in **this** process (see [`walk`]), prints the one-line
/// report its parent reads, and returns the exit code (`0` whole, `1` damage or an error).
/// Call it from a binary that does nothing else in that run.
pub fn child_main(dir: &Path) -> ExitCode {
    match walk(dir) {
        Ok(report) => {
            println!("{}", report.line());
            ExitCode::SUCCESS
        }
        Err(e) => {
            let line = match &e {
                Error::Corrupt { reason, .. } => format!("corrupt {reason}"),
                Error::Config(m) => format!("config {m}"),
                other => format!("error {other}"),
            };
            // One line: the parent reads the last line that starts with the prefix.
            println!("{LINE} {}", line.replace('\n', " "));
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

/// Walks every page of the environment at `dir` **in this process**: what the child runs.
///
/// A damaged page that the structural walk misses can kill this process when LMDB reads it;
/// call [`verify`] instead unless this process is that child.
///
/// # Errors
/// As [`verify`], except that a crash is a crash.
pub fn walk(dir: impl AsRef<Path>) -> Result<VerifyReport> {
    let dir = std::fs::canonicalize(dir.as_ref()).unwrap_or_else(|_| dir.as_ref().to_path_buf());
    let dir = dir.as_path();
    if !dir.join(DATA_FILE).is_file() {
        return Err(Error::Config(format!(
            "no LMDB environment at {} (it has no {DATA_FILE})",
            dir.display()
        )));
    }
    // 1. The open-time check, before LMDB maps the file.
    check_data_file(dir)?;
    let map = |e| from_heed(e, dir, None);
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.max_dbs(4096);
    // SAFETY: READ_ONLY trades nothing for safety: the environment is only read.
    #[allow(unsafe_code)]
    unsafe {
        options.flags(EnvFlags::READ_ONLY);
    }
    // SAFETY: opened once in this process (the child does nothing else), never with NO_LOCK;
    // the file is only read.
    #[allow(unsafe_code)]
    let env = unsafe { options.open(dir) }.map_err(map)?;

    // 2. The databases, by the names the main tree holds.
    let rtxn = env.read_txn().map_err(map)?;
    let main = env
        .open_databases_and_commit(rtxn, |dbo, rtxn| -> heed::Result<_> {
            let main: Option<Database<Bytes, Bytes>> = dbo.open_database(rtxn, None)?;
            Ok(CommitOrAbort::<_, ()>::Commit(main))
        })
        .map_err(map)?
        .unwrap_commit()
        .ok_or_else(|| damaged(dir, "the main database cannot be opened"))?;
    let names: Vec<String> = {
        let rtxn = env.read_txn().map_err(map)?;
        let mut names = Vec::new();
        for item in main.iter(&rtxn).map_err(map)? {
            let (k, _) = item.map_err(map)?;
            names.push(String::from_utf8_lossy(k).into_owned());
        }
        names
    };
    let mut dbs = Vec::with_capacity(names.len());
    for name in &names {
        let rtxn = env.read_txn().map_err(map)?;
        let db = env
            .open_databases_and_commit(rtxn, |dbo, rtxn| -> heed::Result<_> {
                let db: Option<Database<Bytes, Bytes>> = dbo.open_database(rtxn, Some(name))?;
                Ok(CommitOrAbort::<_, ()>::Commit(db))
            })
            .map_err(map)?
            .unwrap_commit();
        if let Some(db) = db {
            dbs.push((name.clone(), db));
        }
    }

    // 3. One read transaction pins the snapshot both walks read.
    let rtxn = env.read_txn().map_err(map)?;
    let txnid = rtxn.id() as u64;
    let metas = read_metas(dir)?.ok_or_else(|| damaged(dir, "data.mdb emptied during the walk"))?;
    let meta = *metas
        .metas
        .iter()
        .find(|m| m.txnid == txnid)
        .ok_or_else(|| Error::Backend {
            backend: BACKEND,
            message: format!(
                "LMDB environment at {}: the snapshot of txn {txnid} was overwritten \
                     before the walk could read its meta page (a busy writer); run verify again",
                dir.display()
            ),
            retryable: true,
        })?;
    let pages = Pages::new(&metas, &meta);
    let totals = pages
        .walk_everything()
        .map_err(|e| damaged(dir, format!("{}: {e}", metas.path.display())))?;

    // 4. Every key and value through LMDB itself.
    let mut entries = 0u64;
    let mut bytes = 0u64;
    let mut fold = 0u8;
    for (name, db) in &dbs {
        let mut n = 0u64;
        for item in db.iter(&rtxn).map_err(map)? {
            let (k, v) = item.map_err(map)?;
            // Touch every byte, so every overflow page is faulted in.
            fold = k.iter().chain(v).fold(fold, |a, b| a.wrapping_add(*b));
            bytes += (k.len() + v.len()) as u64;
            n += 1;
        }
        let said = db.len(&rtxn).map_err(map)?;
        if n != said {
            return Err(damaged(
                dir,
                format!("database {name}: LMDB read {n} entries but its record says {said}"),
            ));
        }
        entries += n;
    }
    std::hint::black_box(fold);
    drop(rtxn);
    debug_assert_eq!(entries, totals.entries);
    Ok(VerifyReport {
        path: dir.to_path_buf(),
        txnid,
        databases: totals.databases,
        entries,
        pages: totals.tree_pages + 2,
        free_pages: totals.free_pages,
        file_pages: pages.file_pages,
        bytes,
    })
}
