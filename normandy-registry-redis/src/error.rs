//! The one place Redis errors become [`normandy_core::Error`]s.

use normandy_core::Error;
use redis::{ErrorKind, RedisError, ServerErrorKind};

/// The backend name in `Unavailable` / `Backend` errors.
pub(crate) const BACKEND: &str = "redis registry";

/// Maps a Redis error.
///
/// - I/O, refused or dropped connections, response timeouts, and a server that is loading,
///   failing over or read-only are `Unavailable`: retryable.
/// - Anything else (a script error, a wrong type under our prefix) is a terminal `Backend` error
///   with the server's message. The registry's scripts report outcomes (won, taken, released) as
///   replies, not errors; `registry::parse_*` turns those into `AlreadyRegistered` and friends.
pub(crate) fn map(err: RedisError) -> Error {
    let retryable = err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || matches!(
            err.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::ReadOnly
            ) | ErrorKind::ClusterConnectionNotFound
        );
    if retryable {
        Error::Unavailable {
            backend: BACKEND,
            message: err.to_string(),
        }
    } else {
        Error::Backend {
            backend: BACKEND,
            message: err.to_string(),
            retryable: false,
        }
    }
}

/// A reply whose shape our scripts never produce.
pub(crate) fn unexpected(what: &str, value: &redis::Value) -> Error {
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
        message: format!("unexpected reply to {what}: {shown}"),
        retryable: false,
    }
}
