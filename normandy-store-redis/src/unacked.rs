//! Commits whose fate this process does not know: remembered per session so that the engine's
//! retry of the same batch is confirmed (see [`scripts::confirm`](crate::scripts::confirm))
//! rather than answered `DuplicateInput` or `Conflict`.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use normandy_core::{Epoch, Seq, SessionId};

/// Most commits remembered as applied-but-unacknowledged (see [`Unacked`]).
const MAX_UNACKED: usize = 10_000;

/// A commit whose outcome this process does not know for sure: its script ran but too few
/// replicas acknowledged it (`DurabilityNotMet`), or the connection failed after it was sent
/// (`Unavailable`). The engine retries such a commit with the same batch; the retry then runs
/// [`scripts::confirm`](crate::scripts::confirm), which re-acknowledges the commit if the
/// store holds exactly its result, instead of answering `DuplicateInput` or `Conflict` to a
/// writer whose own commit landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unacked {
    epoch: Epoch,
    expected_seq: Seq,
    /// Hash of the batch's bytes. Only compared within this process, never stored, so std's
    /// unpinned hasher is fine here.
    fingerprint: u64,
}

impl Unacked {
    /// The commit of `state` and `entries` (encoded) by `epoch` on top of `expected_seq`.
    pub(crate) fn of(epoch: Epoch, expected_seq: Seq, state: &[u8], entries: &[Vec<u8>]) -> Self {
        Self {
            epoch,
            expected_seq,
            fingerprint: fingerprint(state, entries),
        }
    }
}

/// The remembered commits, at most one per session.
#[derive(Debug, Default)]
pub(crate) struct UnackedCommits {
    // std Mutex: map operations only, never held across an await.
    map: Mutex<HashMap<SessionId, Unacked>>,
}

impl UnackedCommits {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Unacked>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets and returns the commit remembered for `id`.
    pub(crate) fn take(&self, id: &SessionId) -> Option<Unacked> {
        self.lock().remove(id)
    }

    /// Remembers `u` as `id`'s commit of unknown fate.
    pub(crate) fn remember(&self, id: &SessionId, u: Unacked) {
        let mut map = self.lock();
        // Bounded: past the cap a retry simply gets the plain answer (DuplicateInput/Conflict).
        if map.len() < MAX_UNACKED || map.contains_key(id) {
            map.insert(id.clone(), u);
        }
    }

    /// Forgets every remembered commit (their keys are gone).
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }
}

fn fingerprint(state: &[u8], entries: &[Vec<u8>]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    state.hash(&mut h);
    entries.hash(&mut h);
    h.finish()
}
