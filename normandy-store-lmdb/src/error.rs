//! The one place heed/LMDB errors become [`normandy_core::Error`]s.

use std::io;
use std::path::Path;

use heed::MdbError;
use normandy_core::{Error, SessionId};

/// The backend name carried by `Backend` / `Unavailable` errors.
pub(crate) const BACKEND: &str = "lmdb";

/// Maps a heed error met on the environment at `path` (while serving `session`, if any).
///
/// Errors about the environment as a whole (not an LMDB file, no permission) name the path, so
/// an operator can see which directory is wrong; errors met serving a session name it too.
pub(crate) fn from_heed(err: heed::Error, path: &Path, session: Option<&SessionId>) -> Error {
    let env = format!("LMDB environment at {}", path.display());
    let on = match session {
        Some(s) => format!("{env} (session {s})"),
        None => env.clone(),
    };
    match err {
        heed::Error::Mdb(MdbError::Invalid) => Error::Corrupt {
            session: session.cloned(),
            what: env,
            reason: "data.mdb is not an LMDB environment (bad or missing header); \
                     point the store at an empty directory or at one it created"
                .into(),
        },
        heed::Error::Mdb(MdbError::VersionMismatch) => Error::Backend {
            backend: BACKEND,
            message: format!("{on}: written by an incompatible LMDB version"),
            retryable: false,
        },
        heed::Error::Mdb(e @ (MdbError::Corrupted | MdbError::PageNotFound | MdbError::Panic)) => {
            Error::Corrupt {
                session: session.cloned(),
                what: env,
                reason: e.to_string(),
            }
        }
        heed::Error::Mdb(MdbError::Incompatible) => Error::Corrupt {
            session: session.cloned(),
            what: env,
            reason: "its databases were not created by Normandy (incompatible flags or names)"
                .into(),
        },
        heed::Error::Mdb(MdbError::MapFull) => Error::Backend {
            backend: BACKEND,
            message: format!(
                "{on}: the memory map is full; raise LmdbConfig::max_map_size \
                 (nothing acknowledged was lost)"
            ),
            retryable: false,
        },
        heed::Error::Mdb(MdbError::ReadersFull) => Error::Backend {
            backend: BACKEND,
            message: format!(
                "{on}: reader table full; raise LmdbConfig::max_readers \
                 (it takes effect when no process has the environment open)"
            ),
            retryable: true,
        },
        heed::Error::Mdb(e @ (MdbError::MapResized | MdbError::BadRslot)) => Error::Backend {
            backend: BACKEND,
            message: format!("{on}: {e}"),
            retryable: true,
        },
        heed::Error::Mdb(e) => Error::Backend {
            backend: BACKEND,
            message: format!("{on}: {e}"),
            retryable: false,
        },
        heed::Error::Io(e) => from_io(e, path, session),
        heed::Error::Encoding(e) | heed::Error::Decoding(e) => {
            Error::Internal(format!("{on}: key/value codec: {e}"))
        }
        heed::Error::EnvAlreadyOpened => Error::Internal(format!(
            "{env} is already open in this process with other options"
        )),
    }
}

/// The I/O part of [`from_heed`]'s mapping (directory and file errors).
fn from_io(err: io::Error, path: &Path, session: Option<&SessionId>) -> Error {
    let env = format!("LMDB environment at {}", path.display());
    let on = match session {
        Some(s) => format!("{env} (session {s})"),
        None => env,
    };
    match err.kind() {
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => Error::Backend {
            backend: BACKEND,
            message: format!(
                "{on}: {err}; LMDB needs read-write access to the directory and to its \
                 data.mdb and lock.mdb (a read-only directory cannot host a store)"
            ),
            retryable: false,
        },
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => Error::Config(format!(
            "{on}: {err}; the path must be a directory (it is created if missing)"
        )),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => Error::Backend {
            backend: BACKEND,
            message: format!("{on}: {err}"),
            retryable: true,
        },
        _ => Error::Backend {
            backend: BACKEND,
            message: format!("{on}: {err}"),
            retryable: false,
        },
    }
}
