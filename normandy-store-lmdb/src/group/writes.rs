//! What each write does inside the shared write transaction: its checks (existence, terminal,
//! epoch, duplicate input, seq), run before it touches anything, then its puts and the
//! resumable index. The batching around them, and the writer thread, are `group`'s.

use std::ops::Bound;

use heed::RwTxn;
use normandy_core::store::is_resumable;
use normandy_core::{
    CommitAck, Epoch, Error, NewSession, NodeId, Result, Seq, SessionId, SessionStatus, TurnState,
};

use super::{Done, EncodedEntry};
use crate::conn::EnvCore;
use crate::error::from_heed;
use crate::record::{Header, read_record};
use crate::schema::{Dbs, be_u64, keys};

/// Reads and decodes the header of `id` inside the write transaction.
fn header(txn: &RwTxn<'_>, dbs: &Dbs, core: &EnvCore, id: &SessionId) -> Result<Option<Header>> {
    dbs.sessions
        .get(txn, keys::session(id))
        .map_err(|e| from_heed(e, &core.path, Some(id)))?
        .map(|b| Header::decode(b, id))
        .transpose()
}

fn not_found(id: &SessionId) -> Error {
    Error::NotFound {
        session: id.clone(),
    }
}

pub(super) fn create(
    txn: &mut RwTxn<'_>,
    dbs: &Dbs,
    core: &EnvCore,
    new: &NewSession,
    template_blob: Option<&[u8]>,
    state_blob: &[u8],
    now: u64,
) -> heed::Result<Result<Done>> {
    let key = keys::session(&new.id);
    match dbs.sessions.get(txn, key) {
        Ok(Some(_)) => {
            return Ok(Err(Error::AlreadyExists {
                session: new.id.clone(),
            }));
        }
        Ok(None) => {}
        Err(e) => return Ok(Err(from_heed(e, &core.path, Some(&new.id)))),
    }
    let header = Header {
        epoch: 0,
        seq: 0,
        owner: None,
        status: SessionStatus::Active,
        resume_policy: new.resume_policy,
        has_template: template_blob.is_some(),
        resumable: false,
        created_at_ms: now,
        updated_at_ms: now,
    };
    let header_blob = match header.encode() {
        Ok(b) => b,
        Err(e) => return Ok(Err(e)),
    };
    dbs.sessions.put(txn, key, &header_blob)?;
    dbs.states.put(txn, key, state_blob)?;
    if let Some(t) = template_blob {
        dbs.templates.put(txn, key, t)?;
    }
    Ok(Ok(Done::Created { now }))
}

pub(super) fn activate(
    txn: &mut RwTxn<'_>,
    dbs: &Dbs,
    core: &EnvCore,
    id: &SessionId,
    node: &NodeId,
    now: u64,
) -> heed::Result<Result<Done>> {
    // Decode everything before changing anything, so corrupt bytes leave the session untouched.
    let (old, mut record) = match read_record(txn, dbs, id, &core.path) {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(Err(not_found(id))),
        Err(e) => return Ok(Err(e)),
    };
    if old.status == SessionStatus::Terminal {
        return Ok(Err(Error::SessionClosed {
            session: id.clone(),
        }));
    }
    let mut new = old.clone();
    new.epoch += 1;
    new.owner = Some(node.clone());
    new.updated_at_ms = now;
    let blob = match new.encode() {
        Ok(b) => b,
        Err(e) => return Ok(Err(e)),
    };
    dbs.sessions.put(txn, keys::session(id), &blob)?;
    reindex(txn, dbs, id, &old, &new)?;
    record.epoch = new.epoch;
    record.owner = new.owner;
    record.updated_at_ms = now;
    Ok(Ok(Done::Record(Box::new(record))))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn commit(
    txn: &mut RwTxn<'_>,
    dbs: &Dbs,
    core: &EnvCore,
    id: &SessionId,
    epoch: Epoch,
    expected_seq: Seq,
    entries: &[EncodedEntry],
    state: &TurnState,
    state_blob: &[u8],
    now: u64,
) -> heed::Result<Result<Done>> {
    let checked = (|| -> Result<std::result::Result<Header, CommitAck>> {
        let h = header(txn, dbs, core, id)?.ok_or_else(|| not_found(id))?;
        if h.status == SessionStatus::Terminal {
            return Err(Error::SessionClosed {
                session: id.clone(),
            });
        }
        if h.epoch != epoch {
            return Err(Error::Fenced {
                session: id.clone(),
                epoch,
                current: h.epoch,
            });
        }
        // Duplicates before the seq: a commit retried as is after an ambiguous failure reports
        // the duplicate rather than a conflict.
        for input in entries.iter().filter_map(|e| e.input.as_ref()) {
            let stored = dbs
                .inputs
                .get(txn, &keys::input(id, input.as_str()))
                .map_err(|e| from_heed(e, &core.path, Some(id)))?;
            if let Some(v) = stored {
                let seq = be_u64(v).ok_or_else(|| {
                    Error::corrupt(Some(id), format!("input index of {input}"), "not a u64")
                })?;
                return Ok(Err(CommitAck::DuplicateInput {
                    input_id: input.clone(),
                    seq,
                }));
            }
        }
        if h.seq != expected_seq {
            return Err(Error::Conflict {
                session: id.clone(),
                expected: expected_seq,
                actual: h.seq,
            });
        }
        Ok(Ok(h))
    })();
    let old = match checked {
        Ok(Ok(h)) => h,
        Ok(Err(dup)) => return Ok(Ok(Done::Ack(dup))),
        Err(e) => return Ok(Err(e)),
    };
    #[cfg(test)]
    super::tests::fail_if_broken(id)?;
    let mut new = old.clone();
    new.seq = expected_seq + entries.len() as u64;
    new.updated_at_ms = now;
    new.resumable = is_resumable(new.status, new.resume_policy, state);
    let blob = match new.encode() {
        Ok(b) => b,
        Err(e) => return Ok(Err(e)),
    };
    for e in entries {
        dbs.entries.put(txn, &keys::entry(id, e.seq), &e.blob)?;
        if let Some(input) = &e.input {
            dbs.inputs
                .put(txn, &keys::input(id, input.as_str()), &e.seq.to_be_bytes())?;
        }
    }
    dbs.states.put(txn, keys::session(id), state_blob)?;
    dbs.sessions.put(txn, keys::session(id), &blob)?;
    reindex(txn, dbs, id, &old, &new)?;
    Ok(Ok(Done::Ack(CommitAck::Applied { seq: new.seq })))
}

pub(super) fn mark_terminal(
    txn: &mut RwTxn<'_>,
    dbs: &Dbs,
    core: &EnvCore,
    id: &SessionId,
    epoch: Epoch,
    now: u64,
) -> heed::Result<Result<Done>> {
    let old = match header(txn, dbs, core, id) {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(Err(not_found(id))),
        Err(e) => return Ok(Err(e)),
    };
    if old.status == SessionStatus::Terminal {
        return Ok(Ok(Done::Unit));
    }
    if old.epoch != epoch {
        return Ok(Err(Error::Fenced {
            session: id.clone(),
            epoch,
            current: old.epoch,
        }));
    }
    let mut new = old.clone();
    new.status = SessionStatus::Terminal;
    new.resumable = false;
    new.updated_at_ms = now;
    let blob = match new.encode() {
        Ok(b) => b,
        Err(e) => return Ok(Err(e)),
    };
    dbs.sessions.put(txn, keys::session(id), &blob)?;
    reindex(txn, dbs, id, &old, &new)?;
    Ok(Ok(Done::Unit))
}

pub(super) fn delete(
    txn: &mut RwTxn<'_>,
    dbs: &Dbs,
    core: &EnvCore,
    id: &SessionId,
) -> heed::Result<Result<Done>> {
    let key = keys::session(id);
    match dbs.sessions.get(txn, key) {
        Ok(Some(_)) => {}
        Ok(None) => return Ok(Ok(Done::Bool(false))),
        Err(e) => return Ok(Err(from_heed(e, &core.path, Some(id)))),
    }
    // The "any" index names the owner, so the owner index entry goes even when the header is
    // corrupt (delete must be able to clear out a damaged session).
    let owner = dbs
        .any
        .get(txn, key)?
        .and_then(|v| std::str::from_utf8(v.get(8..)?).ok())
        .filter(|s| !s.is_empty())
        .and_then(|s| s.parse::<NodeId>().ok());
    if let Some(o) = owner {
        dbs.by_owner.delete(txn, &keys::by_owner(&o, id))?;
    }
    dbs.any.delete(txn, key)?;
    dbs.sessions.delete(txn, key)?;
    dbs.states.delete(txn, key)?;
    dbs.templates.delete(txn, key)?;
    let (lo, hi) = keys::prefix_range(id.as_str());
    let range = (Bound::Included(&lo[..]), Bound::Excluded(&hi[..]));
    dbs.entries.delete_range(txn, &range)?;
    dbs.inputs.delete_range(txn, &range)?;
    Ok(Ok(Done::Bool(true)))
}

/// Moves `id` in the resumable indexes from what `old` says to what `new` says. Index values
/// carry the epoch, so a resumable session is rewritten at every activation.
fn reindex(
    txn: &mut RwTxn<'_>,
    dbs: &Dbs,
    id: &SessionId,
    old: &Header,
    new: &Header,
) -> heed::Result<()> {
    let same_index = old.resumable == new.resumable
        && old.owner == new.owner
        && (!new.resumable || old.epoch == new.epoch);
    if same_index {
        return Ok(());
    }
    if old.resumable {
        if let Some(o) = &old.owner {
            dbs.by_owner.delete(txn, &keys::by_owner(o, id))?;
        }
        dbs.any.delete(txn, keys::session(id))?;
    }
    if new.resumable {
        let epoch = new.epoch.to_be_bytes();
        if let Some(o) = &new.owner {
            dbs.by_owner.put(txn, &keys::by_owner(o, id), &epoch)?;
        }
        let mut v = epoch.to_vec();
        if let Some(o) = &new.owner {
            v.extend_from_slice(o.to_string().as_bytes());
        }
        dbs.any.put(txn, keys::session(id), &v)?;
    }
    Ok(())
}
