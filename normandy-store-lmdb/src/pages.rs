//! LMDB's on-disk format read with `pread` and bounds checks, never through the memory map: the
//! meta pages, the file-length check [`check_data_file`] that [`LmdbStore::open`] runs before
//! LMDB maps the file, and the structural page walk that [`verify`](crate::verify) runs.
//!
//! Why: LMDB reads its pages straight from the map and trusts them (it keeps no checksums). A
//! page past the end of a truncated file is a `SIGBUS`, a page whose header was flipped a
//! `SIGSEGV` or an assertion abort — the process dies; no error comes back. Everything here
//! reads into owned buffers and checks every offset, so damage becomes an error message.
//!
//! The layout is LMDB 0.9's (the `lmdb-master-sys` heed bundles is 0.9.70, data format
//! version 1, checked against files it wrote): 64-bit page numbers; a 16-byte page header
//! `{pgno: u64, pad: u16, flags: u16, lower: u16, upper: u16}` (for overflow pages `lower` and
//! `upper` are one `u32`, the page count); the meta (`MDB_meta`) at offset 16 of pages 0 and 1:
//! `magic: u32` (0xBEEFC0DE), `version: u32`, `address: u64`, `mapsize: u64`, two `MDB_db`
//! records (free pages, main) of 48 bytes each — `{pad: u32 (the page size in the first),
//! flags: u16, depth: u16, branch_pages, leaf_pages, overflow_pages, entries, root: u64}` —
//! then `last_pg: u64` and `txnid: u64`. Little-endian on every target this crate supports.
//!
//! [`LmdbStore::open`]: crate::LmdbStore::open

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use normandy_core::{Error, Result};

/// LMDB's data file in an environment directory.
pub(crate) const DATA_FILE: &str = "data.mdb";

const MAGIC: u32 = 0xBEEF_C0DE;
/// `MDB_DATA_VERSION` of LMDB 0.9 (999 only in `MDB_DEVEL` builds, which heed does not make).
const DATA_VERSION: u32 = 1;
const PAGE_HEADER: usize = 16;
const META_LEN: usize = 152;
const P_BRANCH: u16 = 0x01;
const P_LEAF: u16 = 0x02;
const P_OVERFLOW: u16 = 0x04;
const P_META: u16 = 0x08;
const P_LEAF2: u16 = 0x20;
const F_BIGDATA: u16 = 0x01;
const F_SUBDATA: u16 = 0x02;
const F_DUPDATA: u16 = 0x04;
const MDB_DUPSORT: u16 = 0x04;
const P_INVALID: u64 = u64::MAX;
const NODE_HEADER: usize = 8;
const MIN_PAGE: u32 = 512;
const MAX_PAGE: u32 = 65536;

/// What to do about a damaged data file; every refusal ends with it.
pub(crate) fn fix(dir: &Path) -> String {
    format!(
        "restore the environment from a backup, or copy out what still reads with a compacting \
         copy (`mdb_copy -c {dir} <new dir>`, LMDB's tool; `-v` copies the previous \
         transaction's snapshot instead) and open the copy; `normandy-lmdb-verify {dir}` \
         (normandy_store_lmdb::verify) walks every page in a child process and tells whether \
         a copy is whole",
        dir = dir.display()
    )
}

/// The error for a damaged data file of the environment at `dir`.
pub(crate) fn damaged(dir: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Corrupt {
        session: None,
        what: format!("LMDB environment at {}", dir.display()),
        reason: format!("{reason}; {}", fix(dir)),
    }
}

/// The error for a damaged meta page: `mdb_copy` cannot help (LMDB refuses such a file too).
fn damaged_meta(dir: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Corrupt {
        session: None,
        what: format!("LMDB environment at {}", dir.display()),
        reason: format!(
            "{reason}; restore the environment from a backup (LMDB refuses a file with either \
             meta page damaged, so `mdb_copy` cannot read it either)"
        ),
    }
}

/// One `MDB_db` record: a B-tree's shape and root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DbRecord {
    pub(crate) pad: u32,
    pub(crate) flags: u16,
    pub(crate) depth: u16,
    pub(crate) branch_pages: u64,
    pub(crate) leaf_pages: u64,
    pub(crate) overflow_pages: u64,
    pub(crate) entries: u64,
    pub(crate) root: u64,
}

impl DbRecord {
    const LEN: usize = 48;

    fn parse(b: &[u8]) -> Option<Self> {
        let b = b.get(..Self::LEN)?;
        Some(Self {
            pad: u32_at(b, 0)?,
            flags: u16_at(b, 4)?,
            depth: u16_at(b, 6)?,
            branch_pages: u64_at(b, 8)?,
            leaf_pages: u64_at(b, 16)?,
            overflow_pages: u64_at(b, 24)?,
            entries: u64_at(b, 32)?,
            root: u64_at(b, 40)?,
        })
    }
}

/// One meta page (`MDB_meta`), parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) page_size: u32,
    pub(crate) free: DbRecord,
    pub(crate) main: DbRecord,
    pub(crate) last_pg: u64,
    pub(crate) txnid: u64,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parses meta page `n` from `buf` (the page's first bytes), or says what is wrong with it.
fn parse_meta(buf: &[u8], n: u64) -> std::result::Result<Meta, String> {
    let short = || format!("meta page {n} is cut short");
    let pgno = u64_at(buf, 0).ok_or_else(short)?;
    let flags = u16_at(buf, 10).ok_or_else(short)?;
    let m = buf
        .get(PAGE_HEADER..PAGE_HEADER + META_LEN)
        .ok_or_else(short)?;
    let magic = u32_at(m, 0).ok_or_else(short)?;
    if magic != MAGIC {
        return Err(format!("meta page {n} has no LMDB magic number"));
    }
    let version = u32_at(m, 4).ok_or_else(short)?;
    if version != DATA_VERSION {
        return Err(format!(
            "meta page {n} says data format version {version}; this LMDB reads version \
             {DATA_VERSION}"
        ));
    }
    if flags & P_META == 0 || pgno != n {
        return Err(format!(
            "meta page {n} has a damaged page header (page number {pgno}, flags {flags:#x})"
        ));
    }
    let free = DbRecord::parse(&m[24..]).ok_or_else(short)?;
    let main = DbRecord::parse(&m[72..]).ok_or_else(short)?;
    let page_size = free.pad;
    if !(MIN_PAGE..=MAX_PAGE).contains(&page_size) || !page_size.is_power_of_two() {
        return Err(format!(
            "meta page {n} says the page size is {page_size} bytes (not a power of two \
             between {MIN_PAGE} and {MAX_PAGE})"
        ));
    }
    let meta = Meta {
        page_size,
        free,
        main,
        last_pg: u64_at(m, 120).ok_or_else(short)?,
        txnid: u64_at(m, 128).ok_or_else(short)?,
    };
    for (name, db) in [("free-page", &meta.free), ("main", &meta.main)] {
        if db.root != P_INVALID && (db.root < 2 || db.root > meta.last_pg) {
            return Err(format!(
                "meta page {n} (txn {}) puts the {name} database's root at page {}, outside \
                 pages 2..={}",
                meta.txnid, db.root, meta.last_pg
            ));
        }
    }
    Ok(meta)
}

/// Both meta pages of a data file, parsed, and the file's length.
#[derive(Debug)]
pub(crate) struct Metas {
    pub(crate) file: File,
    pub(crate) path: PathBuf,
    pub(crate) len: u64,
    pub(crate) metas: [Meta; 2],
}

impl Metas {
    /// The meta LMDB uses: the one with the greater transaction id.
    pub(crate) fn newest(&self) -> &Meta {
        let [a, b] = &self.metas;
        if b.txnid > a.txnid { b } else { a }
    }

    /// The other one: the previous transaction's snapshot.
    pub(crate) fn older(&self) -> &Meta {
        let [a, b] = &self.metas;
        if b.txnid > a.txnid { a } else { b }
    }
}

fn read_at(file: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], at + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Reads both meta pages of `dir`'s data file. `Ok(None)`: no data file, or an empty one (LMDB
/// initialises it).
pub(crate) fn read_metas(dir: &Path) -> Result<Option<Metas>> {
    let path = dir.join(DATA_FILE);
    let io_err = |e| crate::error::from_heed(heed::Error::Io(e), dir, None);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    let len = file.metadata().map_err(io_err)?.len();
    if len == 0 {
        return Ok(None);
    }
    let not_lmdb = || Error::Corrupt {
        session: None,
        what: format!("LMDB environment at {}", dir.display()),
        reason: format!(
            "{} is not an LMDB environment (bad or missing header: neither meta page is \
             valid); point the store at an empty directory or at one it created — if a store \
             wrote this file, {}",
            path.display(),
            fix(dir)
        ),
    };
    let mut head = vec![0u8; PAGE_HEADER + META_LEN];
    let got = read_at(&file, &mut head, 0).map_err(io_err)?;
    let first = parse_meta(&head[..got], 0);
    // Meta page 1 sits one page in; with page 0 damaged, look for it at every page size LMDB
    // could have used.
    let sizes: Vec<u32> = match &first {
        Ok(m) => vec![m.page_size],
        Err(_) => (9..=16).map(|s| 1u32 << s).collect(),
    };
    let mut second = Err(format!("meta page 1 is missing (the file is {len} bytes)"));
    for size in sizes {
        let mut buf = vec![0u8; PAGE_HEADER + META_LEN];
        let got = read_at(&file, &mut buf, u64::from(size)).map_err(io_err)?;
        if got == 0 {
            continue;
        }
        second = parse_meta(&buf[..got], 1);
        if matches!(&second, Ok(m) if m.page_size == size) || first.is_ok() {
            break;
        }
    }
    let metas = match (first, second) {
        (Ok(a), Ok(b)) if a.page_size != b.page_size => {
            return Err(damaged_meta(
                dir,
                format!(
                    "{}: the meta pages disagree on the page size ({} and {} bytes)",
                    path.display(),
                    a.page_size,
                    b.page_size
                ),
            ));
        }
        (Ok(a), Ok(b)) => [a, b],
        (Err(a), Err(b)) => {
            if a.contains("no LMDB magic") && b.contains("no LMDB magic") || b.contains("missing") {
                return Err(not_lmdb());
            }
            return Err(damaged_meta(
                dir,
                format!("{}: both meta pages are damaged ({a}; {b})", path.display()),
            ));
        }
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => {
            return Err(damaged_meta(dir, format!("{}: {e}", path.display())));
        }
    };
    Ok(Some(Metas {
        file,
        path,
        len,
        metas,
    }))
}

/// The open-time check: run before LMDB maps `dir`'s data file, so that a file LMDB would read
/// past the end of (or whose meta or root pages are damaged) is refused with an error naming
/// the file and the fix instead of killing the process with `SIGBUS` or `SIGSEGV`.
///
/// Cost: two meta pages, the root page of each core tree, the main tree (a page or two: it
/// holds the names of the eight databases) and each database's root page; the free-page
/// tree only when the file is shorter than the meta says (see below). Microseconds.
///
/// What it checks:
/// - both meta pages: page header, magic, format version, page size, roots within the file's
///   last page number (LMDB itself refuses a bad magic or version, but reads the rest blindly);
/// - the file holds every page up to the newest meta's `last_pg`. LMDB never writes a page
///   that a transaction allocated at the end of the file and freed again before committing
///   ("loose" pages), so a healthy file may end early — but only with pages the free-page
///   tree lists; a missing page that is not listed there means the file was cut short;
/// - the root pages of the free-page, main and every named tree have the page number and
///   kind (branch or leaf) their records say.
pub(crate) fn check_data_file(dir: &Path) -> Result<()> {
    let Some(metas) = read_metas(dir)? else {
        return Ok(());
    };
    let meta = *metas.newest();
    let pages = Pages::new(&metas, &meta);
    let at = |e: String| damaged(dir, format!("{}: {e}", metas.path.display()));
    if pages.file_pages <= meta.last_pg {
        // Pages past the end are harmless only if the free-page tree lists them all.
        let in_use = match pages.free_pages(&mut HashSet::new()) {
            Ok(free) => (pages.file_pages..=meta.last_pg)
                .find(|p| !free.contains(p))
                .map(|p| format!("page {p}, past the end, is in use")),
            Err(e) => Some(format!("the free-page tree cannot be read: {e}")),
        };
        if let Some(in_use) = in_use {
            let older = metas.older();
            let hint = if older.last_pg < pages.file_pages {
                format!(
                    "; the previous snapshot (txn {}) needs only {} pages, so `mdb_copy -v -c` \
                     may recover it",
                    older.txnid,
                    older.last_pg + 1
                )
            } else {
                String::new()
            };
            return Err(at(format!(
                "the file is {} bytes but its meta page (txn {}) says it holds {} pages of {} \
                 bytes ({} bytes): it was truncated or never fully written ({in_use}{hint})",
                metas.len,
                meta.txnid,
                meta.last_pg + 1,
                meta.page_size,
                (meta.last_pg + 1).saturating_mul(u64::from(meta.page_size)),
            )));
        }
    }
    pages.check_roots().map_err(at)
}

/// How deep a walk checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// Only what is needed (the open-time check).
    Roots,
    /// Every page of every tree, its overflow pages, and the record's counters (verify).
    Everything,
}

/// Counts of one walk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) branch: u64,
    pub(crate) leaf: u64,
    pub(crate) overflow: u64,
    pub(crate) entries: u64,
}

/// A bounds-checked reader of one snapshot's pages.
pub(crate) struct Pages<'a> {
    file: &'a File,
    meta: Meta,
    psize: usize,
    /// Whole pages in the file.
    pub(crate) file_pages: u64,
}

/// One node of a branch or leaf page: its header words, key, and the bytes after the key
/// (to the end of the page).
struct Node<'p> {
    lo: u16,
    hi: u16,
    flags: u16,
    key: &'p [u8],
    data: &'p [u8],
}

/// One leaf node: key and (for inline data) value, or the overflow page holding the value.
struct Leaf<'p> {
    key: &'p [u8],
    flags: u16,
    size: usize,
    inline: Option<&'p [u8]>,
    overflow: Option<u64>,
}

type Visit<'v> = dyn FnMut(&Pages<'_>, &Leaf<'_>) -> std::result::Result<(), String> + 'v;

impl<'a> Pages<'a> {
    pub(crate) fn new(metas: &'a Metas, meta: &Meta) -> Self {
        let psize = meta.page_size as usize;
        Self {
            file: &metas.file,
            meta: *meta,
            psize,
            file_pages: metas.len / psize as u64,
        }
    }

    /// Reads `count` pages from `pgno`, checking they exist in the snapshot and the file.
    fn read(&self, pgno: u64, count: u64) -> std::result::Result<Vec<u8>, String> {
        let end = pgno.checked_add(count).ok_or("page number overflows")?;
        if pgno < 2 || end > self.meta.last_pg + 1 {
            return Err(format!(
                "a tree points at page {pgno}{}, outside the snapshot's pages 2..={}",
                if count > 1 {
                    format!(" (+{} overflow pages)", count - 1)
                } else {
                    String::new()
                },
                self.meta.last_pg
            ));
        }
        if end > self.file_pages {
            return Err(format!(
                "page {} is past the end of the file ({} whole pages)",
                pgno.max(self.file_pages),
                self.file_pages
            ));
        }
        let len = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(self.psize))
            .ok_or("overflow run too long")?;
        let mut buf = vec![0u8; len];
        let got = read_at(self.file, &mut buf, pgno * self.psize as u64)
            .map_err(|e| format!("reading page {pgno}: {e}"))?;
        if got < len {
            return Err(format!("page {pgno} is cut short by the end of the file"));
        }
        Ok(buf)
    }

    /// Reads page `pgno` and checks its header: its own number and the expected kind.
    fn page(&self, pgno: u64, kind: u16) -> std::result::Result<Vec<u8>, String> {
        let p = self.read(pgno, 1)?;
        let (own, flags) = (u64_at(&p, 0).unwrap_or(0), u16_at(&p, 10).unwrap_or(0));
        if own != pgno {
            return Err(format!(
                "page {pgno} has a damaged header: it says it is page {own}"
            ));
        }
        let want = if kind == P_LEAF { "leaf" } else { "branch" };
        if flags & (P_BRANCH | P_LEAF | P_OVERFLOW | P_META) != kind {
            return Err(format!(
                "page {pgno} has a damaged header: flags {flags:#x}, expected a {want} page"
            ));
        }
        if flags & P_LEAF2 != 0 {
            return Err(format!(
                "page {pgno} is a LEAF2 page, which no Normandy database uses"
            ));
        }
        let (lower, upper) = (
            usize::from(u16_at(&p, 12).unwrap_or(0)),
            usize::from(u16_at(&p, 14).unwrap_or(0)),
        );
        if lower < PAGE_HEADER || lower % 2 != 0 || lower > upper || upper > self.psize {
            return Err(format!(
                "page {pgno} has a damaged header: free space {lower}..{upper} in a \
                 {}-byte page",
                self.psize
            ));
        }
        Ok(p)
    }

    /// The nodes of page `p` (`pgno`): byte ranges, each checked to lie within the page.
    fn nodes<'p>(&self, p: &'p [u8], pgno: u64) -> std::result::Result<Vec<Node<'p>>, String> {
        let lower = usize::from(u16_at(p, 12).unwrap_or(0));
        let upper = usize::from(u16_at(p, 14).unwrap_or(0));
        let n = (lower - PAGE_HEADER) / 2;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let off = usize::from(u16_at(p, PAGE_HEADER + 2 * i).unwrap_or(0));
            let bad = || format!("page {pgno}: node {i} at offset {off} is outside the page");
            if off < upper || off % 2 != 0 || off + NODE_HEADER > self.psize {
                return Err(bad());
            }
            let lo = u16_at(p, off).ok_or_else(bad)?;
            let hi = u16_at(p, off + 2).ok_or_else(bad)?;
            let flags = u16_at(p, off + 4).ok_or_else(bad)?;
            let ksize = usize::from(u16_at(p, off + 6).ok_or_else(bad)?);
            let rest = p.get(off + NODE_HEADER..).ok_or_else(bad)?;
            if ksize > rest.len() {
                return Err(format!(
                    "page {pgno}: node {i}'s key ({ksize} bytes) runs past the page"
                ));
            }
            out.push(Node {
                lo,
                hi,
                flags,
                key: &rest[..ksize],
                data: &rest[ksize..],
            });
        }
        Ok(out)
    }

    /// Walks the tree `db` (named `name` in messages), calling `visit` on every leaf node.
    /// Every page is entered in `seen`, so a page reached twice (a cycle, or two trees sharing
    /// a page) is an error. With [`Check::Roots`] only the root page is read.
    fn walk(
        &self,
        name: &str,
        db: &DbRecord,
        seen: &mut HashSet<u64>,
        check: Check,
        visit: &mut Visit<'_>,
    ) -> std::result::Result<Counts, String> {
        let mut counts = Counts::default();
        if db.root == P_INVALID {
            if db.depth != 0 || db.entries != 0 {
                return Err(format!(
                    "database {name} has no root page but says it holds {} entries",
                    db.entries
                ));
            }
            return Ok(counts);
        }
        if db.depth == 0 || db.depth > 64 {
            return Err(format!(
                "database {name} says its tree is {} deep",
                db.depth
            ));
        }
        let dupsort = db.flags & MDB_DUPSORT != 0;
        // (page, level): level 1 is the root; leaves are at `depth`.
        let mut stack = vec![(db.root, 1u16)];
        while let Some((pgno, level)) = stack.pop() {
            let kind = if level == db.depth { P_LEAF } else { P_BRANCH };
            let in_db = |e: String| format!("database {name}: {e}");
            if !seen.insert(pgno) {
                return Err(in_db(format!("page {pgno} is reached twice")));
            }
            let p = self.page(pgno, kind).map_err(in_db)?;
            let nodes = self.nodes(&p, pgno).map_err(in_db)?;
            if kind == P_BRANCH {
                counts.branch += 1;
                if nodes.is_empty() {
                    return Err(in_db(format!("branch page {pgno} is empty")));
                }
                if check == Check::Everything {
                    for n in nodes.iter().rev() {
                        let child =
                            u64::from(n.lo) | (u64::from(n.hi) << 16) | (u64::from(n.flags) << 32);
                        stack.push((child, level + 1));
                    }
                }
                continue;
            }
            counts.leaf += 1;
            for Node {
                lo,
                hi,
                flags,
                key,
                data,
            } in nodes
            {
                let size = usize::from(lo) | (usize::from(hi) << 16);
                let leaf = if flags & F_BIGDATA != 0 {
                    let ov = u64_at(data, 0).ok_or_else(|| {
                        in_db(format!("page {pgno}: an overflow node is cut short"))
                    })?;
                    Leaf {
                        key,
                        flags,
                        size,
                        inline: None,
                        overflow: Some(ov),
                    }
                } else {
                    if size > data.len() {
                        return Err(in_db(format!(
                            "page {pgno}: a value of {size} bytes runs past the page"
                        )));
                    }
                    Leaf {
                        key,
                        flags,
                        size,
                        inline: Some(&data[..size]),
                        overflow: None,
                    }
                };
                if flags & F_DUPDATA != 0 && !dupsort {
                    return Err(in_db(format!(
                        "page {pgno}: a node is marked as duplicates in a database without \
                         duplicates"
                    )));
                }
                counts.entries += 1;
                if let (Some(ov), Check::Everything) = (leaf.overflow, check) {
                    let n = self.overflow_pages(size);
                    counts.overflow += n;
                    for q in ov..ov.saturating_add(n) {
                        if !seen.insert(q) {
                            return Err(in_db(format!("overflow page {q} is reached twice")));
                        }
                    }
                    let head = self.read(ov, 1).map_err(in_db)?;
                    let (own, pflags, count) = (
                        u64_at(&head, 0).unwrap_or(0),
                        u16_at(&head, 10).unwrap_or(0),
                        u32_at(&head, 12).unwrap_or(0),
                    );
                    if own != ov || pflags & P_OVERFLOW == 0 || u64::from(count) != n {
                        return Err(in_db(format!(
                            "overflow page {ov} has a damaged header (says page {own}, flags \
                             {pflags:#x}, {count} pages; the value needs {n})"
                        )));
                    }
                    if n > 1 {
                        self.read(ov, n).map_err(in_db)?;
                    }
                }
                visit(self, &leaf).map_err(in_db)?;
            }
        }
        if check == Check::Everything && !dupsort {
            let said = (
                db.branch_pages,
                db.leaf_pages,
                db.overflow_pages,
                db.entries,
            );
            let found = (counts.branch, counts.leaf, counts.overflow, counts.entries);
            if said != found {
                return Err(format!(
                    "database {name}: its record says {} branch, {} leaf, {} overflow pages \
                     and {} entries; the walk found {} / {} / {} / {}",
                    said.0, said.1, said.2, said.3, found.0, found.1, found.2, found.3
                ));
            }
        }
        Ok(counts)
    }

    /// `OVPAGES`: pages an overflow value of `size` bytes takes.
    fn overflow_pages(&self, size: usize) -> u64 {
        ((PAGE_HEADER - 1 + size) / self.psize + 1) as u64
    }

    /// The value of `leaf`, read from its overflow pages if it has them.
    fn value(&self, leaf: &Leaf<'_>) -> std::result::Result<Vec<u8>, String> {
        match (leaf.inline, leaf.overflow) {
            (Some(v), _) => Ok(v.to_vec()),
            (None, Some(ov)) => {
                let run = self.read(ov, self.overflow_pages(leaf.size))?;
                Ok(run[PAGE_HEADER..PAGE_HEADER + leaf.size].to_vec())
            }
            (None, None) => Ok(Vec::new()),
        }
    }

    /// Every page the free-page tree lists (the tree is walked in full: its records are the
    /// answer).
    fn free_pages(&self, seen: &mut HashSet<u64>) -> std::result::Result<HashSet<u64>, String> {
        let mut free = HashSet::new();
        self.walk(
            "free-page",
            &self.meta.free,
            seen,
            Check::Everything,
            &mut |pages, leaf| {
                // key: txn id; value: an ID list, `[count, pgno...]` (u64 each).
                let v = pages.value(leaf)?;
                let n = u64_at(&v, 0).ok_or("a free-page record is cut short")?;
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                if n.checked_mul(8).and_then(|b| b.checked_add(8)) != Some(v.len()) {
                    return Err(format!(
                        "a free-page record of {} bytes says it lists {n} pages",
                        v.len()
                    ));
                }
                for i in 0..n {
                    free.insert(u64_at(&v, 8 + 8 * i).unwrap_or(P_INVALID));
                }
                Ok(())
            },
        )?;
        Ok(free)
    }

    /// The main tree's named databases, name → record (the main tree is walked in full: it
    /// holds a handful of records).
    fn named(
        &self,
        seen: &mut HashSet<u64>,
    ) -> std::result::Result<Vec<(String, DbRecord)>, String> {
        let mut out = Vec::new();
        self.walk(
            "main",
            &self.meta.main,
            seen,
            Check::Everything,
            &mut |_, leaf| {
                if leaf.flags & F_SUBDATA == 0 {
                    // A plain key in the main database: not a named database.
                    return Ok(());
                }
                let name = String::from_utf8_lossy(leaf.key).into_owned();
                let db = leaf
                    .inline
                    .and_then(DbRecord::parse)
                    .ok_or_else(|| format!("the record of database {name:?} is cut short"))?;
                out.push((name, db));
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// The open-time root checks: the main tree in full (it is tiny) and the root page of the
    /// free-page tree and of every named database.
    fn check_roots(&self) -> std::result::Result<(), String> {
        let mut seen = HashSet::new();
        let named = self.named(&mut seen)?;
        let mut trees = vec![("free-page".to_string(), self.meta.free)];
        trees.extend(named);
        for (name, db) in &trees {
            self.walk(name, db, &mut seen, Check::Roots, &mut |_, _| Ok(()))?;
        }
        Ok(())
    }

    /// The full structural walk: every page of every tree (free-page, main, each named one).
    pub(crate) fn walk_everything(&self) -> std::result::Result<WalkTotals, String> {
        let mut seen = HashSet::new();
        let mut totals = WalkTotals::default();
        let free = self.free_pages(&mut seen)?;
        totals.free_pages = free.len() as u64;
        let named = self.named(&mut seen)?;
        for (name, db) in &named {
            let c = self.walk(name, db, &mut seen, Check::Everything, &mut |_, _| Ok(()))?;
            totals.entries += c.entries;
            totals.databases += 1;
        }
        if let Some(p) = free.iter().find(|p| seen.contains(p)) {
            return Err(format!(
                "page {p} is listed as free but a tree still uses it"
            ));
        }
        totals.tree_pages = seen.len() as u64;
        Ok(totals)
    }
}

/// Totals of a full structural walk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct WalkTotals {
    pub(crate) databases: u64,
    pub(crate) entries: u64,
    pub(crate) tree_pages: u64,
    pub(crate) free_pages: u64,
}
