//! A session's stored form: the header blob in `sessions` (with the turn state and template in
//! their own databases), and reading all of it back as a [`SessionRecord`].

use std::path::Path;

use heed::{RoTxn, WithoutTls};
use normandy_core::codec::{self, BlobKind};
use normandy_core::{
    ConfigTemplate, Epoch, Error, NodeId, Result, ResumePolicy, Seq, SessionId, SessionRecord,
    SessionStatus, TurnState,
};
use serde::{Deserialize, Serialize};

use crate::error::from_heed;
use crate::schema::{Dbs, keys};

/// What the `sessions` database stores per session: everything but the turn state, template
/// and entries, which live in their own databases so a commit rewrites only this small header,
/// the state and the new entries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Header {
    pub(crate) epoch: Epoch,
    pub(crate) seq: Seq,
    pub(crate) owner: Option<NodeId>,
    pub(crate) status: SessionStatus,
    pub(crate) resume_policy: ResumePolicy,
    pub(crate) has_template: bool,
    /// Whether the session is in the resumable indexes (kept here so activate and terminate can
    /// update the indexes without decoding the turn state).
    pub(crate) resumable: bool,
    pub(crate) created_at_ms: u64,
    pub(crate) updated_at_ms: u64,
}

impl Header {
    pub(crate) fn encode(&self) -> Result<Vec<u8>> {
        codec::encode(BlobKind::Other, self)
    }

    pub(crate) fn decode(bytes: &[u8], id: &SessionId) -> Result<Self> {
        codec::decode(BlobKind::Other, bytes, Some(id)).map_err(|e| match e {
            Error::Corrupt {
                session, reason, ..
            } => Error::Corrupt {
                session,
                what: "session header".into(),
                reason,
            },
            Error::UnsupportedVersion {
                session,
                found,
                supported,
                ..
            } => Error::UnsupportedVersion {
                session,
                what: "session header".into(),
                found,
                supported,
            },
            other => other,
        })
    }
}

/// Reads the full record of `id` within `txn`; `Ok(None)` if it does not exist.
pub(crate) fn read_record(
    txn: &RoTxn<'_, WithoutTls>,
    dbs: &Dbs,
    id: &SessionId,
    path: &Path,
) -> Result<Option<(Header, SessionRecord)>> {
    let map = |e| from_heed(e, path, Some(id));
    let key = keys::session(id);
    let Some(h) = dbs.sessions.get(txn, key).map_err(map)? else {
        return Ok(None);
    };
    let header = Header::decode(h, id)?;
    let state_bytes = dbs.states.get(txn, key).map_err(map)?.ok_or_else(|| {
        Error::corrupt(Some(id), "turn state", "missing from the states database")
    })?;
    let state: TurnState = codec::decode(BlobKind::TurnState, state_bytes, Some(id))?;
    let template = if header.has_template {
        let bytes = dbs.templates.get(txn, key).map_err(map)?.ok_or_else(|| {
            Error::corrupt(Some(id), "template", "missing from the templates database")
        })?;
        Some(codec::decode::<ConfigTemplate>(
            BlobKind::Template,
            bytes,
            Some(id),
        )?)
    } else {
        None
    };
    let record = SessionRecord {
        id: id.clone(),
        epoch: header.epoch,
        seq: header.seq,
        owner: header.owner.clone(),
        status: header.status,
        resume_policy: header.resume_policy,
        template,
        state,
        created_at_ms: header.created_at_ms,
        updated_at_ms: header.updated_at_ms,
    };
    Ok(Some((header, record)))
}
