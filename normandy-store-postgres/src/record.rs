//! A session row's columns to a [`SessionRecord`] and back: Postgres `bigint`s to Normandy's
//! unsigned numbers, statuses and policies to their column text.

use normandy_core::codec::{self, BlobKind};
use normandy_core::{Error, NodeId, Result, ResumePolicy, SessionId, SessionRecord, SessionStatus};
use sqlx::Row;
use sqlx::postgres::PgRow;

use crate::error::map_sqlx;

pub(crate) fn to_i64(v: u64, what: &str, id: &SessionId) -> Result<i64> {
    i64::try_from(v)
        .map_err(|_| Error::invalid_input(Some(id), format!("{what} {v} exceeds Postgres bigint")))
}

pub(crate) fn to_u64(v: i64, what: &str, id: &SessionId) -> Result<u64> {
    u64::try_from(v).map_err(|_| Error::corrupt(Some(id), what, format!("negative value {v}")))
}

pub(crate) fn policy_str(p: ResumePolicy) -> &'static str {
    match p {
        ResumePolicy::Lazy => "lazy",
        ResumePolicy::Eager => "eager",
    }
}

pub(crate) fn parse_status(s: &str, id: &SessionId) -> Result<SessionStatus> {
    SessionStatus::parse(s)
        .ok_or_else(|| Error::corrupt(Some(id), "session status", format!("unknown status {s:?}")))
}

pub(crate) fn record_from_row(row: &PgRow, id: &SessionId) -> Result<SessionRecord> {
    let get_err = map_sqlx;
    let epoch: i64 = row.try_get(1).map_err(get_err)?;
    let seq: i64 = row.try_get(2).map_err(get_err)?;
    let owner: Option<String> = row.try_get(3).map_err(get_err)?;
    let status: String = row.try_get(4).map_err(get_err)?;
    let state: Vec<u8> = row.try_get(5).map_err(get_err)?;
    let template: Option<Vec<u8>> = row.try_get(6).map_err(get_err)?;
    let policy: Option<String> = row.try_get(7).map_err(get_err)?;
    let created: i64 = row.try_get(8).map_err(get_err)?;
    let updated: i64 = row.try_get(9).map_err(get_err)?;
    let owner = owner
        .map(|o| {
            o.parse::<NodeId>()
                .map_err(|e| Error::corrupt(Some(id), "session owner", e))
        })
        .transpose()?;
    let resume_policy = match policy.as_deref() {
        None | Some("lazy") => ResumePolicy::Lazy,
        Some("eager") => ResumePolicy::Eager,
        Some(other) => {
            return Err(Error::corrupt(
                Some(id),
                "resume policy",
                format!("unknown policy {other:?}"),
            ));
        }
    };
    Ok(SessionRecord {
        id: id.clone(),
        epoch: to_u64(epoch, "session epoch", id)?,
        seq: to_u64(seq, "session seq", id)?,
        owner,
        status: parse_status(&status, id)?,
        resume_policy,
        template: template
            .as_deref()
            .map(|b| codec::decode(BlobKind::Template, b, Some(id)))
            .transpose()?,
        state: codec::decode(BlobKind::TurnState, &state, Some(id))?,
        created_at_ms: created.max(0) as u64,
        updated_at_ms: updated.max(0) as u64,
    })
}
