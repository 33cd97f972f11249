//! Hash slots: the slot of a key, computed as Redis Cluster computes it, and a hash tag per
//! slot, so a key can be placed in the slot of another key (a per-slot index bucket sits in the
//! slot of the sessions it lists, and a script touching both stays in one slot).

use std::sync::LazyLock;

/// Slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// The slot of `key`: CRC16 (XMODEM) of its hash tag — the text between the first `{` and the
/// next `}`, when that is non-empty — or of the whole key, modulo 16384.
pub fn slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key).unwrap_or(key)) % SLOTS
}

fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|&b| b == b'{')?;
    let close = key[open + 1..].iter().position(|&b| b == b'}')?;
    let tag = &key[open + 1..open + 1 + close];
    (!tag.is_empty()).then_some(tag)
}

/// CRC16/XMODEM (polynomial 0x1021, initial value 0), the checksum Redis Cluster uses.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// For each slot, the smallest decimal number whose text hashes to it (about 160k CRCs once,
/// a few milliseconds, on first use).
static TAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    let mut tags = vec![String::new(); usize::from(SLOTS)];
    let mut missing = usize::from(SLOTS);
    let mut n: u64 = 0;
    while missing > 0 {
        let text = n.to_string();
        let s = usize::from(slot(text.as_bytes()));
        if tags[s].is_empty() {
            tags[s] = text;
            missing -= 1;
        }
        n += 1;
    }
    tags
});

/// A short hash tag (without braces) whose slot is `slot` (taken modulo 16384): a key holding
/// `{<tag>}` lives in that slot.
pub fn slot_tag(slot: u16) -> &'static str {
    &TAGS[usize::from(slot % SLOTS)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_the_reference_check_value() {
        // The CRC16/XMODEM check value of "123456789".
        assert_eq!(crc16(b"123456789"), 0x31C3);
    }

    #[test]
    fn slots_match_the_server() {
        // `CLUSTER KEYSLOT` on Redis 7.0 for these keys.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        // An empty tag does not count: the whole key is hashed.
        assert_eq!(slot(b"{}foo"), crc16(b"{}foo") % SLOTS);
        assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
    }

    #[test]
    fn every_slot_has_a_tag_that_lands_in_it() {
        for s in 0..SLOTS {
            let tag = slot_tag(s);
            assert_eq!(slot(tag.as_bytes()), s, "tag {tag:?}");
            assert_eq!(slot(format!("ns:{{{tag}}}:any").as_bytes()), s);
        }
    }
}
