//! A session's state hash to a [`SessionRecord`], and the field text of its resume policy.

use std::collections::HashMap;
use std::str::FromStr;

use normandy_core::codec::{self, BlobKind};
use normandy_core::{
    ConfigTemplate, Error, NodeId, Result, ResumePolicy, SessionId, SessionRecord, SessionStatus,
    TurnState,
};

/// Decodes the fields of `id`'s state hash (`HGETALL`); a missing or malformed field is
/// `Corrupt`.
pub(crate) fn decode_record(
    id: &SessionId,
    fields: HashMap<String, Vec<u8>>,
) -> Result<SessionRecord> {
    let field = |name: &str| -> Result<&Vec<u8>> {
        fields.get(name).ok_or_else(|| {
            Error::corrupt(
                Some(id),
                "session record",
                format!("field {name:?} is missing"),
            )
        })
    };
    let text = |name: &str| -> Result<&str> {
        std::str::from_utf8(field(name)?).map_err(|_| {
            Error::corrupt(
                Some(id),
                "session record",
                format!("field {name:?} is not UTF-8"),
            )
        })
    };
    let number = |name: &str| -> Result<u64> {
        text(name)?.parse().map_err(|_| {
            Error::corrupt(
                Some(id),
                "session record",
                format!("field {name:?} is not a number"),
            )
        })
    };
    let status = SessionStatus::parse(text("st")?)
        .ok_or_else(|| Error::corrupt(Some(id), "session record", "unknown status"))?;
    let resume_policy = match text("pol")? {
        "lazy" => ResumePolicy::Lazy,
        "eager" => ResumePolicy::Eager,
        other => {
            return Err(Error::corrupt(
                Some(id),
                "session record",
                format!("unknown resume policy {other:?}"),
            ));
        }
    };
    let owner = match fields.get("own") {
        Some(_) => Some(
            NodeId::from_str(text("own")?)
                .map_err(|e| Error::corrupt(Some(id), "session record owner", e))?,
        ),
        None => None,
    };
    let template: Option<ConfigTemplate> = fields
        .get("tpl")
        .map(|b| codec::decode(BlobKind::Template, b, Some(id)))
        .transpose()?;
    let state: TurnState = codec::decode(BlobKind::TurnState, field("ts")?, Some(id))?;
    let record = SessionRecord {
        id: id.clone(),
        epoch: number("ep")?,
        seq: number("seq")?,
        owner,
        status,
        resume_policy,
        template,
        state,
        created_at_ms: number("ca")?,
        updated_at_ms: number("ua")?,
    };
    Ok(record)
}

pub(crate) fn policy_str(p: ResumePolicy) -> &'static str {
    match p {
        ResumePolicy::Lazy => "lazy",
        ResumePolicy::Eager => "eager",
    }
}
