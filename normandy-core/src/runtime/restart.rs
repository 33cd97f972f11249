//! Bringing back, on this node, an eager session whose actor failed (its commits kept failing
//! through a store outage, say): after a backoff that grows with each failure in a row, and
//! only while the session still has work and nobody else took it. A lazy session needs none of
//! this: its next request rebuilds it.

use std::collections::HashMap;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Inner, Sessions};
use crate::error::Error;
use crate::model::SessionId;

/// How long after a failure an eager session is resumed on this node (see
/// [`SessionsBuilder::restart_backoff`](crate::SessionsBuilder::restart_backoff)).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RestartPolicy {
    first: Duration,
    max: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self::new(Duration::from_millis(500), Duration::from_secs(30))
    }
}

impl RestartPolicy {
    pub(crate) fn new(first: Duration, max: Duration) -> Self {
        let first = first.max(Duration::from_millis(1));
        Self {
            first,
            max: max.max(first),
        }
    }

    /// The wait before attempt `n` (0-based) of a run of failures.
    fn delay(&self, n: u32) -> Duration {
        self.first.saturating_mul(1u32 << n.min(20)).min(self.max)
    }
}

/// A failure this long after the last one of a session starts its backoff again.
const FAILURE_MEMORY: Duration = Duration::from_secs(600);

/// The recent failures of this node's eager sessions, which set their resume backoff: a session
/// whose every new actor fails at once (a store that stays down, a corrupt turn) is retried ever
/// more slowly instead of in a tight loop.
pub(crate) struct Restarts {
    policy: RestartPolicy,
    // std Mutex: map operations only, never held across an await.
    recent: Mutex<HashMap<SessionId, (u32, Instant)>>,
}

impl Restarts {
    pub(crate) fn new(policy: RestartPolicy) -> Self {
        Self {
            policy,
            recent: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a failure of `id`'s actor; returns how many came in a row (0 for the first).
    fn failed(&self, id: &SessionId) -> u32 {
        let now = Instant::now();
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.retain(|_, (_, at)| now.duration_since(*at) < FAILURE_MEMORY);
        let n = match recent.get(id) {
            Some((n, _)) => n.saturating_add(1),
            None => 0,
        };
        recent.insert(id.clone(), (n, now));
        n
    }
}

/// Resumes eager session `id` on this node after its actor failed: after a backoff, and again
/// (backing off further) while the resume fails for a reason that may pass. Stops when the
/// session no longer has work, another node or actor took it, the runtime stopped taking
/// sessions or was dropped, or the failure is one no retry mends.
pub(super) async fn resume_after_failure(runtime: Weak<Inner>, id: SessionId) {
    let mut attempt = match runtime.upgrade() {
        Some(inner) => inner.restarts.failed(&id),
        None => return,
    };
    loop {
        let delay = match runtime.upgrade() {
            Some(inner) => inner.restarts.policy.delay(attempt),
            None => return,
        };
        tokio::time::sleep(delay).await;
        // Held only while attempting, so a dropped runtime ends this task at its next wake.
        let Some(inner) = runtime.upgrade() else {
            return;
        };
        let sessions = Sessions { inner };
        if !sessions.is_accepting() || sessions.is_live(&id) {
            return;
        }
        let outcome = match sessions.inner.store.load(&id).await {
            Ok(Some(record)) if record.is_resumable() => sessions.resume(&id).await,
            Ok(_) => return,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {
                info!(session = %id, attempt, "resumed an eager session after its actor failed");
                return;
            }
            Err(Error::AlreadyRegistered { .. }) => return,
            Err(e) if e.is_retryable() => {
                debug!(session = %id, attempt, error = %e, "resume after failure; will retry");
                attempt = attempt.saturating_add(1);
            }
            Err(e) => {
                warn!(session = %id, error = %e, "cannot resume the session after its actor failed");
                return;
            }
        }
    }
}
