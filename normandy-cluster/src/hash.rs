//! Rendezvous (highest-random-weight) hashing over a pinned hash, so every node — whatever its
//! build or platform — ranks the same candidates the same way for a session.
//!
//! The hash is XXH3-64 (from `xxhash-rust`) of `session id ‖ 0xFF ‖ node id`: stable across Rust
//! releases, unlike std's `DefaultHasher`, whose algorithm is unspecified. The golden vectors in
//! the tests pin it.

use normandy_core::{NodeId, SessionId};
use xxhash_rust::xxh3::xxh3_64;

/// The weight of `node` for `session`. Higher wins.
pub fn weight(session: &SessionId, node: &NodeId) -> u64 {
    let s = session.as_str().as_bytes();
    let n = node.to_string();
    let mut buf = Vec::with_capacity(s.len() + 1 + n.len());
    buf.extend_from_slice(s);
    // 0xFF never occurs in UTF-8, so no (session, node) pair aliases another.
    buf.push(0xFF);
    buf.extend_from_slice(n.as_bytes());
    xxh3_64(&buf)
}

/// The node among `nodes` that should handle `session`, or `None` if `nodes` is empty. Ties (a
/// 64-bit collision) go to the smaller node id, so the choice is total.
pub fn owner<'a>(
    session: &SessionId,
    nodes: impl IntoIterator<Item = &'a NodeId>,
) -> Option<&'a NodeId> {
    nodes.into_iter().max_by(|a, b| {
        weight(session, a)
            .cmp(&weight(session, b))
            .then_with(|| b.cmp(a))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(s: &str) -> SessionId {
        SessionId::new(s).unwrap()
    }

    #[test]
    fn golden_vectors() {
        // Pinned: changing the hash or the key layout changes these, and would make nodes of
        // different builds disagree on who reaps what.
        let a = NodeId::new("node-a", 1).unwrap();
        let b = NodeId::new("node-b", 2).unwrap();
        assert_eq!(xxh3_64(b""), 0x2d06_8005_38d3_94c2);
        assert_eq!(xxh3_64(b"normandy"), GOLDEN_NORMANDY);
        assert_eq!(weight(&sid("s-1"), &a), GOLDEN_S1_A);
        assert_eq!(weight(&sid("s-1"), &b), GOLDEN_S1_B);
    }

    const GOLDEN_NORMANDY: u64 = 3_408_096_641_464_445_085;
    const GOLDEN_S1_A: u64 = 13_854_911_770_180_346_637;
    const GOLDEN_S1_B: u64 = 8_981_688_535_481_581_397;

    #[test]
    fn spreads_and_is_stable() {
        let nodes: Vec<NodeId> = (0..3)
            .map(|i| NodeId::new(format!("n{i}"), 7).unwrap())
            .collect();
        let mut counts = [0usize; 3];
        for i in 0..3000 {
            let s = sid(&format!("session-{i}"));
            let o = owner(&s, &nodes).unwrap();
            assert_eq!(
                owner(&s, nodes.iter().rev()),
                Some(o),
                "order must not matter"
            );
            counts[nodes.iter().position(|n| n == o).unwrap()] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "uneven spread {counts:?}");
        }
        // Removing a node moves only the sessions it had.
        for i in 0..1000 {
            let s = sid(&format!("session-{i}"));
            let before = owner(&s, &nodes).unwrap().clone();
            let after = owner(&s, &nodes[..2]).unwrap();
            if before != nodes[2] {
                assert_eq!(&before, after);
            }
        }
        assert_eq!(owner(&sid("x"), std::iter::empty()), None);
    }
}
