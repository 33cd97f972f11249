//! Versioned, checksummed MessagePack encoding of every stored blob.
//!
//! A blob is a header — the magic `NM`, the format version, the blob kind, and (from version 2)
//! a CRC-32C of everything after the magic but the checksum itself, little-endian — followed by
//! the value as MessagePack with field names (`rmp_serde::to_vec_named`), so fields can be added
//! later without breaking old readers.
//!
//! ```text
//! version 2:  'N' 'M' 0x02 <kind> <crc32c: 4 bytes LE> <MessagePack…>
//! version 1:  'N' 'M' 0x01 <kind> <MessagePack…>          (read, never written)
//! ```
//!
//! Decoding checks the header first: a blob from a newer format is an
//! [`Error::UnsupportedVersion`]; a checksum that does not match, or anything unreadable, is an
//! [`Error::Corrupt`]; neither panics. The checksum is what stops a flipped bit from decoding as
//! different but valid data (an input id "t1" read back as "u1", a `false` as `true`):
//! MessagePack has no redundancy of its own. CRC-32C (Castagnoli, as iSCSI, ext4 and RocksDB use
//! it) catches every single-bit error and every burst of up to 32 bits.
//! Version 1 blobs, written before checksums, still load, unchecked.
//!
//! Decoding also bounds nesting at [`MAX_DEPTH`], so a damaged or hostile blob nested thousands
//! deep is `Corrupt` rather than a stack overflow that aborts the process.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::model::{Entry, Seq, SessionId};

/// The format version this build writes (and the newest it reads).
pub const FORMAT_VERSION: u8 = 2;
const MAGIC: [u8; 2] = *b"NM";
/// Header length of a version-2 blob: magic, version, kind, checksum.
const HEADER_V2: usize = 8;
/// The checksum: CRC-32C, table-driven slice-by-16 (a 16 KiB table).
const CRC32C: crc::Crc<u32, crc::Table<16>> =
    crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISCSI);

/// The deepest nesting a blob may have (arrays, maps, enum variants). A tokio worker has a 2 MiB
/// stack, and a debug build's deserializer spends some KiB of it per level; 1,024 (the
/// MessagePack decoder's own default) overflowed it at about 600. JSON from providers is parsed
/// with `serde_json`'s limit of 128, and a stored entry wraps it in fewer than 16 levels.
pub const MAX_DEPTH: usize = 160;

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

/// Encodes a value as a versioned, checksummed blob.
pub fn encode<T: Serialize + ?Sized>(kind: BlobKind, value: &T) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT_VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&[0; 4]);
    rmp_serde::encode::write_named(&mut out, value)
        .map_err(|e| Error::Internal(format!("encoding {}: {e}", kind.name())))?;
    let sum = checksum(&out);
    out[4..HEADER_V2].copy_from_slice(&sum.to_le_bytes());
    Ok(out)
}

/// The CRC-32C of a version-2 blob: its version and kind bytes, then its payload.
fn checksum(blob: &[u8]) -> u32 {
    let mut digest = CRC32C.digest();
    digest.update(&blob[2..4]);
    digest.update(&blob[HEADER_V2..]);
    digest.finalize()
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
    let payload = if bytes[2] >= 2 {
        if bytes.len() < HEADER_V2 {
            return Err(Error::corrupt(
                session,
                what,
                "blob shorter than its header (truncated)",
            ));
        }
        let stored = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        let computed = checksum(bytes);
        if stored != computed {
            return Err(Error::corrupt(
                session,
                what,
                format!(
                    "checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the \
                     bytes changed after they were written (disk, copy or manual edit)"
                ),
            ));
        }
        &bytes[HEADER_V2..]
    } else {
        &bytes[4..]
    };
    if bytes[3] != kind as u8 {
        return Err(Error::corrupt(
            session,
            what,
            format!("blob kind tag is {}, expected {}", bytes[3], kind as u8),
        ));
    }
    let mut de = rmp_serde::Deserializer::from_read_ref(payload);
    de.set_max_depth(MAX_DEPTH);
    T::deserialize(&mut de).map_err(|e| match e {
        rmp_serde::decode::Error::DepthLimitExceeded => Error::corrupt(
            session,
            what,
            format!("nested deeper than {MAX_DEPTH} levels (damaged, or not written by Normandy)"),
        ),
        e => Error::corrupt(session, what, e),
    })
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

    /// The checksum is pinned: CRC-32C's check value, and one blob byte for byte. A change here
    /// would make every stored blob unreadable.
    #[test]
    fn the_checksum_and_the_format_are_pinned() {
        assert_eq!(CRC32C.checksum(b"123456789"), 0xe306_9283);
        let bytes = encode(BlobKind::Other, &("t1", false)).unwrap();
        assert_eq!(
            bytes,
            [
                b'N', b'M', 2, 255, // magic, version, kind
                0xb9, 0xf6, 0xc4,
                0xc8, // CRC-32C of [2, 255] + payload, little-endian (checked
                // against an independent bitwise implementation)
                0x92, 0xa2, b't', b'1', 0xc2, // ["t1", false]
            ],
            "{bytes:02x?}"
        );
        assert_eq!(
            checksum(&bytes),
            CRC32C.checksum(&[2, 255, 0x92, 0xa2, b't', b'1', 0xc2])
        );
    }

    /// Issue 15, item 2: of 1,470 single-bit flips in stored blobs, 352 decoded silently to
    /// other data (an input id "t1" read back as "u1", `false` as `true`). Every flip of every
    /// bit of an entry and a turn state is now an error.
    #[test]
    fn every_single_bit_flip_is_an_error_never_other_data() {
        let mut state = crate::engine::TurnState::default();
        state.queued.push_back(crate::engine::QueuedInput {
            input_id: InputId::new("t1").unwrap(),
            seq: 3,
        });
        let blobs = [
            (BlobKind::Entry, encode(BlobKind::Entry, &entry()).unwrap()),
            (
                BlobKind::TurnState,
                encode(BlobKind::TurnState, &state).unwrap(),
            ),
        ];
        let sid = SessionId::new("s1").unwrap();
        let mut flips = 0;
        for (kind, blob) in &blobs {
            for byte in 0..blob.len() {
                for bit in 0..8 {
                    let mut damaged = blob.clone();
                    damaged[byte] ^= 1 << bit;
                    let result = match kind {
                        BlobKind::Entry => decode::<Entry>(*kind, &damaged, Some(&sid)).map(|_| ()),
                        _ => decode::<crate::engine::TurnState>(*kind, &damaged, Some(&sid))
                            .map(|_| ()),
                    };
                    let err =
                        result.expect_err(&format!("flip of bit {bit} of byte {byte} passed"));
                    assert!(
                        matches!(
                            err.kind(),
                            ErrorKind::Corrupt | ErrorKind::UnsupportedVersion
                        ),
                        "{err}"
                    );
                    assert!(err.to_string().contains("s1"), "{err}");
                    flips += 1;
                }
            }
        }
        assert!(flips > 500, "{flips}");
        let mut damaged = blobs[0].1.clone();
        *damaged.last_mut().unwrap() ^= 1;
        let err = decode::<Entry>(BlobKind::Entry, &damaged, None).unwrap_err();
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
    }

    /// Blobs written before checksums (version 1) still load.
    #[test]
    fn version_1_blobs_without_a_checksum_still_load() {
        let mut v1 = vec![b'N', b'M', 1, BlobKind::Entry as u8];
        v1.extend(rmp_serde::to_vec_named(&entry()).unwrap());
        let back: Entry = decode(BlobKind::Entry, &v1, None).unwrap();
        assert_eq!(back, entry());
    }

    /// A v2 blob of `payload` (raw MessagePack) with a valid checksum.
    fn blob_of(kind: BlobKind, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![b'N', b'M', FORMAT_VERSION, kind as u8, 0, 0, 0, 0];
        out.extend_from_slice(payload);
        let sum = checksum(&out);
        out[4..HEADER_V2].copy_from_slice(&sum.to_le_bytes());
        out
    }

    /// Decodes `blob` as JSON values on a thread with a tokio worker's 2 MiB stack.
    fn decode_on_a_worker_sized_stack(blob: Vec<u8>) -> Result<serde_json::Value> {
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || decode::<serde_json::Value>(BlobKind::Other, &blob, None))
            .unwrap()
            .join()
            .expect("decoding must not overflow the stack")
    }

    /// Issue 15, item 3: a blob nested ~600 deep overflowed a tokio worker's stack in a debug
    /// build and aborted the process. Nesting is bounded at `MAX_DEPTH`, well inside 2 MiB.
    #[test]
    fn deep_nesting_is_corrupt_not_a_stack_overflow() {
        let nested = |depth: usize| {
            let mut payload = vec![0x91; depth]; // `depth` one-element arrays
            payload.push(0xc0); // nil
            blob_of(BlobKind::Other, &payload)
        };
        for depth in [MAX_DEPTH + 1, 600, 100_000] {
            let err = decode_on_a_worker_sized_stack(nested(depth)).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
            assert!(err.to_string().contains("nested deeper than"), "{err}");
        }
        // As deep as JSON from a provider can be (serde_json's 128) decodes, on that stack.
        let value = decode_on_a_worker_sized_stack(nested(MAX_DEPTH - 1)).unwrap();
        assert!(value.is_array());
    }
}
