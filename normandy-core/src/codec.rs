//! Versioned MessagePack encoding of every stored blob.
//!
//! A blob is a 4-byte header — the magic `NM`, the format version, the blob kind — followed by
//! the value as MessagePack with field names (`rmp_serde::to_vec_named`), so fields can be added
//! later without breaking old readers. Decoding checks the header first: a blob from a newer
//! format is an [`Error::UnsupportedVersion`], anything unreadable an [`Error::Corrupt`]; neither
//! panics.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::model::{Entry, Seq, SessionId};

/// The format version this build writes (and the newest it reads).
pub const FORMAT_VERSION: u8 = 1;
const MAGIC: [u8; 2] = *b"NM";

/// What a blob holds; stored in its header so a blob of one kind is never decoded as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BlobKind {
    /// An [`Entry`].
    Entry = 1,
    /// A [`TurnState`](crate::engine::TurnState).
    TurnState = 2,
    /// A [`ConfigTemplate`](crate::template::ConfigTemplate).
    Template = 3,
    /// A [`SessionRecord`](crate::store::SessionRecord) (for backends that store it whole).
    Record = 4,
    /// Anything a backend defines for itself.
    Other = 255,
}

impl BlobKind {
    fn name(self) -> &'static str {
        match self {
            BlobKind::Entry => "entry",
            BlobKind::TurnState => "turn state",
            BlobKind::Template => "template",
            BlobKind::Record => "session record",
            BlobKind::Other => "blob",
        }
    }
}

/// Encodes a value as a versioned blob.
pub fn encode<T: Serialize + ?Sized>(kind: BlobKind, value: &T) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT_VERSION);
    out.push(kind as u8);
    rmp_serde::encode::write_named(&mut out, value)
        .map_err(|e| Error::Internal(format!("encoding {}: {e}", kind.name())))?;
    Ok(out)
}

/// Decodes a versioned blob, naming the session and blob in any error.
pub fn decode<T: DeserializeOwned>(
    kind: BlobKind,
    bytes: &[u8],
    session: Option<&SessionId>,
) -> Result<T> {
    let what = kind.name();
    if bytes.len() < 4 || bytes[..2] != MAGIC {
        return Err(Error::corrupt(
            session,
            what,
            "missing Normandy blob header (not written by Normandy, or truncated)",
        ));
    }
    if bytes[2] > FORMAT_VERSION || bytes[2] == 0 {
        return Err(Error::UnsupportedVersion {
            session: session.cloned(),
            what: what.to_string(),
            found: u32::from(bytes[2]),
            supported: u32::from(FORMAT_VERSION),
        });
    }
    if bytes[3] != kind as u8 {
        return Err(Error::corrupt(
            session,
            what,
            format!("blob kind tag is {}, expected {}", bytes[3], kind as u8),
        ));
    }
    rmp_serde::from_slice(&bytes[4..]).map_err(|e| Error::corrupt(session, what, e))
}

/// Decodes the entry a backend stores at `seq` of `session`, for every backend alike.
///
/// # Behavior
/// - Damaged bytes are `Corrupt` (an unknown version `UnsupportedVersion`) naming the session
///   and `entry {seq}`, so an operator knows which entry to look at.
/// - An entry that encodes another seq than the one it is stored at is `Corrupt` too: history
///   would come back out of order (seqs 1, 2, 4, 4, …) and a turn would run on top of it.
pub fn decode_entry(bytes: &[u8], session: &SessionId, seq: Seq) -> Result<Entry> {
    let what = || format!("entry {seq}");
    let entry: Entry = decode(BlobKind::Entry, bytes, Some(session)).map_err(|e| match e {
        Error::Corrupt {
            session, reason, ..
        } => Error::Corrupt {
            session,
            what: what(),
            reason,
        },
        Error::UnsupportedVersion {
            session,
            found,
            supported,
            ..
        } => Error::UnsupportedVersion {
            session,
            what: what(),
            found,
            supported,
        },
        other => other,
    })?;
    if entry.seq != seq {
        return Err(Error::corrupt(
            Some(session),
            what(),
            format!("stored as seq {seq} but holds seq {}", entry.seq),
        ));
    }
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use crate::model::{EntryPayload, InputId, Message};

    fn entry() -> Entry {
        Entry {
            seq: 1,
            parent: None,
            at_ms: 5,
            payload: EntryPayload::Input {
                input_id: InputId::new("in-1").unwrap(),
                content: Message::user("hi").content,
            },
        }
    }

    #[test]
    fn round_trips() {
        let bytes = encode(BlobKind::Entry, &entry()).unwrap();
        let back: Entry = decode(BlobKind::Entry, &bytes, None).unwrap();
        assert_eq!(back, entry());
    }

    #[test]
    fn rejects_newer_versions_and_garbage() {
        let mut bytes = encode(BlobKind::Entry, &entry()).unwrap();
        bytes[2] = 9;
        let err = decode::<Entry>(BlobKind::Entry, &bytes, None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnsupportedVersion);
        assert!(err.to_string().contains("version 9"), "{err}");

        let err = decode::<Entry>(BlobKind::Entry, b"\xff\x00garbage", None).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);

        let mut bytes = encode(BlobKind::Entry, &entry()).unwrap();
        bytes.truncate(bytes.len() - 3);
        let sid = SessionId::new("s1").unwrap();
        let err = decode::<Entry>(BlobKind::Entry, &bytes, Some(&sid)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert!(err.to_string().contains("s1"), "{err}");

        let bytes = encode(BlobKind::TurnState, &entry()).unwrap();
        assert!(decode::<Entry>(BlobKind::Entry, &bytes, None).is_err());
    }
}
