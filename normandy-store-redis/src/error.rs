//! The one place Redis errors become [`normandy_core::Error`]s.

use normandy_core::{Epoch, Error, Seq, SessionId};
use redis::{ErrorKind, RedisError, ServerErrorKind};

/// The backend name in `Unavailable` / `Backend` errors.
pub(crate) const BACKEND: &str = "redis store";

/// What the failed call was about, so a script's error code becomes a full typed error.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Ctx<'a> {
    pub(crate) session: Option<&'a SessionId>,
    pub(crate) epoch: Epoch,
    pub(crate) expected_seq: Seq,
}

impl<'a> Ctx<'a> {
    pub(crate) fn session(id: &'a SessionId) -> Self {
        Self {
            session: Some(id),
            ..Self::default()
        }
    }

    pub(crate) fn commit(id: &'a SessionId, epoch: Epoch, expected_seq: Seq) -> Self {
        Self {
            session: Some(id),
            epoch,
            expected_seq,
        }
    }
}

/// Maps a Redis error (connection, timeout, server reply, or one of our scripts' `NM*` codes).
///
/// - I/O, refused or dropped connections, response timeouts, and a server that is loading,
///   failing over or read-only (a demoted primary), and a cluster redirect (`MOVED`, `ASK`) or
///   `CLUSTERDOWN` left after the cluster client's resends, are `Unavailable`: retryable.
/// - Our scripts' codes: `NMNOTFOUND` → `NotFound`, `NMCLOSED` → `SessionClosed`,
///   `NMFENCED <current>` → `Fenced`, `NMCONFLICT <actual>` → `Conflict`,
///   `NMEXISTS` → `AlreadyExists`, `NMWRONGTYPE <held> <wanted> <key>` → `Corrupt` naming
///   the key (terminal: something else wrote under our prefix, and the script wrote nothing).
/// - Anything else is a terminal `Backend` error carrying the server's message.
pub(crate) fn map(err: RedisError, ctx: Ctx<'_>) -> Error {
    let unavailable = |err: &RedisError| Error::Unavailable {
        backend: BACKEND,
        message: err.to_string(),
    };
    if err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
    {
        return unavailable(&err);
    }
    match err.kind() {
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::ReadOnly
            // A redirect still answered after the cluster client's resends (a slot moving
            // while the slot map is refreshed): the command did not run; try again.
            | ServerErrorKind::Moved
            | ServerErrorKind::Ask,
        )
        | ErrorKind::ClusterConnectionNotFound => return unavailable(&err),
        _ => {}
    }
    if let Some(typed) = err
        .code()
        .and_then(|code| script_error(code, err.detail(), ctx))
    {
        return typed;
    }
    Error::Backend {
        backend: BACKEND,
        message: match ctx.session {
            Some(id) => format!("session {id}: {err}"),
            None => err.to_string(),
        },
        retryable: false,
    }
}

/// One of our scripts' error codes (`code`, then `detail`) as a typed error; `None` for any
/// other code, or without a session to name.
pub(crate) fn script_error(code: &str, detail: Option<&str>, ctx: Ctx<'_>) -> Option<Error> {
    let id = ctx.session?.clone();
    let number = || -> Option<u64> { detail?.trim().parse().ok() };
    match code {
        "NMNOTFOUND" => Some(Error::NotFound { session: id }),
        "NMCLOSED" => Some(Error::SessionClosed { session: id }),
        "NMEXISTS" => Some(Error::AlreadyExists { session: id }),
        "NMFENCED" => number().map(|current| Error::Fenced {
            session: id,
            epoch: ctx.epoch,
            current,
        }),
        "NMCONFLICT" => number().map(|actual| Error::Conflict {
            session: id,
            expected: ctx.expected_seq,
            actual,
        }),
        "NMWRONGTYPE" => {
            let mut parts = detail?.trim().splitn(3, ' ');
            let (held, wanted, key) = (parts.next()?, parts.next()?, parts.next()?);
            Some(wrong_type(Some(&id), key, Some(held), wanted))
        }
        _ => None,
    }
}

/// A key of ours that holds another type than the store writes there (`held`, when known):
/// something other than this store wrote under its prefix. Terminal, and never repaired by
/// the store: the key may be someone's data. Once it is moved away, the same call succeeds
/// (the write scripts check every key before their first write, so nothing was written).
pub(crate) fn wrong_type(
    session: Option<&SessionId>,
    key: &str,
    held: Option<&str>,
    wanted: &str,
) -> Error {
    let held = match held {
        Some(held) => format!("holds a {held}"),
        None => format!("is not a {wanted}"),
    };
    Error::corrupt(
        session,
        format!("redis key {key}"),
        format!(
            "{held}, expected a {wanted}; something other than this store wrote under its \
             prefix (nothing was written: move that key away, then retry)"
        ),
    )
}

/// Whether `err` is the server's `WRONGTYPE` (a read of a key that holds another type).
pub(crate) fn is_wrong_type(err: &RedisError) -> bool {
    err.code() == Some("WRONGTYPE")
}

/// A reply whose shape our scripts never produce: a bug or a foreign writer under our prefix.
pub(crate) fn unexpected(ctx: Ctx<'_>, what: &str, value: &redis::Value) -> Error {
    let mut shown = format!("{value:?}");
    if shown.len() > 200 {
        let cut = (0..=200)
            .rev()
            .find(|&i| shown.is_char_boundary(i))
            .unwrap_or(0);
        shown.truncate(cut);
        shown.push_str("...");
    }
    Error::Backend {
        backend: BACKEND,
        message: format!(
            "{}unexpected reply to {what}: {shown}",
            ctx.session
                .map(|s| format!("session {s}: "))
                .unwrap_or_default()
        ),
        retryable: false,
    }
}
