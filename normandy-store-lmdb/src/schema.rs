//! The on-disk layout: the named databases, the key layout, the format marker, and the check
//! that an environment holds this layout (or is empty) before the store uses it.

use std::path::Path;

use heed::types::Bytes;
use heed::{CommitOrAbort, Database, Env, WithoutTls};
use normandy_core::{Error, NodeId, Result, SessionId};

use crate::error::from_heed;

/// Version of this crate's database layout (names, keys, index values). Stored in the `meta`
/// database; an environment written by a newer layout is refused rather than misread.
pub(crate) const LAYOUT_VERSION: u32 = 1;
const FORMAT_KEY: &[u8] = b"format_version";
/// Named databases: meta plus seven data databases.
pub(crate) const MAX_DBS: u32 = 8;

pub(crate) type Db = Database<'static, Bytes, Bytes>;

/// The databases of one environment. Keys never contain a NUL byte except as the separator
/// below (ids are printable), so `prefix + 0x00` ranges select exactly one session.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dbs {
    /// `"format_version"` → layout version, u32 big-endian.
    pub(crate) meta: Db,
    /// session id → session header blob (epoch, seq, owner, status, ...).
    pub(crate) sessions: Db,
    /// session id → turn-state blob.
    pub(crate) states: Db,
    /// session id → template blob (only sessions created with one).
    pub(crate) templates: Db,
    /// session id, 0x00, seq (u64 BE) → entry blob.
    pub(crate) entries: Db,
    /// session id, 0x00, input id → seq of its `Input` entry (u64 BE).
    pub(crate) inputs: Db,
    /// owner (`name#incarnation`), 0x00, session id → epoch (u64 BE): resumable sessions by owner.
    pub(crate) by_owner: Db,
    /// session id → epoch (u64 BE) + owner string (empty if none): every resumable session.
    pub(crate) any: Db,
}

impl Dbs {
    /// Every database, for test-support scans.
    pub(crate) fn all(&self) -> [Db; 8] {
        [
            self.meta,
            self.sessions,
            self.states,
            self.templates,
            self.entries,
            self.inputs,
            self.by_owner,
            self.any,
        ]
    }
}

/// Key builders (see [`Dbs`] for the layout).
pub(crate) mod keys {
    use super::*;

    pub(crate) fn session(id: &SessionId) -> &[u8] {
        id.as_str().as_bytes()
    }

    fn prefixed(prefix: &str, tail: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(prefix.len() + 1 + tail.len());
        k.extend_from_slice(prefix.as_bytes());
        k.push(0);
        k.extend_from_slice(tail);
        k
    }

    pub(crate) fn entry(id: &SessionId, seq: u64) -> Vec<u8> {
        prefixed(id.as_str(), &seq.to_be_bytes())
    }

    pub(crate) fn input(id: &SessionId, input: &str) -> Vec<u8> {
        prefixed(id.as_str(), input.as_bytes())
    }

    pub(crate) fn by_owner(owner: &NodeId, id: &SessionId) -> Vec<u8> {
        prefixed(&owner.to_string(), id.as_str().as_bytes())
    }

    /// `[prefix 0x00, prefix 0x01)`: every key of the form `prefix, 0x00, ...`.
    pub(crate) fn prefix_range(prefix: &str) -> (Vec<u8>, Vec<u8>) {
        let mut lo = prefix.as_bytes().to_vec();
        lo.push(0);
        let mut hi = prefix.as_bytes().to_vec();
        hi.push(1);
        (lo, hi)
    }
}

/// Parses a u64 big-endian index value.
pub(crate) fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

/// Refuses an environment written by a newer layout, or one holding databases that are not ours.
pub(crate) fn check_format(env: &Env<WithoutTls>, path: &Path) -> Result<()> {
    let map = |e| from_heed(e, path, None);
    let rtxn = env.read_txn().map_err(map)?;
    let mut found: Option<Vec<u8>> = None;
    let mut foreign = false;
    env.open_databases_and_commit(rtxn, |dbo, rtxn| -> heed::Result<_> {
        let meta: Option<Database<Bytes, Bytes>> = dbo.open_database(rtxn, Some("meta"))?;
        match meta {
            Some(meta) => found = meta.get(rtxn, FORMAT_KEY)?.map(<[u8]>::to_vec),
            None => {
                // No marker: the environment must be empty (we write the marker with the
                // databases in one transaction, so a half-initialised one cannot exist).
                let unnamed: Option<Database<Bytes, Bytes>> = dbo.open_database(rtxn, None)?;
                if let Some(u) = unnamed {
                    foreign = !u.is_empty(rtxn)?;
                }
            }
        }
        Ok(CommitOrAbort::<(), ()>::Commit(()))
    })
    .map_err(map)?;
    if foreign {
        return Err(Error::Corrupt {
            session: None,
            what: format!("LMDB environment at {}", path.display()),
            reason: "it holds databases Normandy did not write (no format marker); \
                     use an empty directory"
                .into(),
        });
    }
    if let Some(bytes) = found {
        let version = <[u8; 4]>::try_from(bytes.as_slice())
            .map(u32::from_be_bytes)
            .map_err(|_| Error::Corrupt {
                session: None,
                what: format!("LMDB environment at {}", path.display()),
                reason: format!("format marker has {} bytes, expected 4", bytes.len()),
            })?;
        if version > LAYOUT_VERSION || version == 0 {
            return Err(Error::UnsupportedVersion {
                session: None,
                what: format!("LMDB environment at {}", path.display()),
                found: version,
                supported: LAYOUT_VERSION,
            });
        }
    }
    Ok(())
}

/// Creates (or opens) every database and writes the format marker, in one write transaction.
pub(crate) fn create_dbs(env: &Env<WithoutTls>) -> heed::Result<Dbs> {
    let wtxn = env.write_txn()?;
    let (meta, sessions, states, templates, entries, inputs, by_owner, any) = env
        .create_databases_and_commit(wtxn, |dbo, wtxn| -> heed::Result<_> {
            let meta: Database<Bytes, Bytes> = dbo.create_database(wtxn, Some("meta"))?;
            if meta.get(wtxn, FORMAT_KEY)?.is_none() {
                meta.put(wtxn, FORMAT_KEY, &LAYOUT_VERSION.to_be_bytes())?;
            }
            let dbs = (
                meta,
                dbo.create_database::<Bytes, Bytes>(wtxn, Some("sessions"))?,
                dbo.create_database::<Bytes, Bytes>(wtxn, Some("states"))?,
                dbo.create_database::<Bytes, Bytes>(wtxn, Some("templates"))?,
                dbo.create_database::<Bytes, Bytes>(wtxn, Some("entries"))?,
                dbo.create_database::<Bytes, Bytes>(wtxn, Some("inputs"))?,
                dbo.create_database::<Bytes, Bytes>(wtxn, Some("resumable_by_owner"))?,
                dbo.create_database::<Bytes, Bytes>(wtxn, Some("resumable_any"))?,
            );
            Ok(CommitOrAbort::<_, ()>::Commit(dbs))
        })?
        .unwrap_commit();
    Ok(Dbs {
        meta,
        sessions,
        states,
        templates,
        entries,
        inputs,
        by_owner,
        any,
    })
}
