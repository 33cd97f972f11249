//! The reaper: when a node goes down, survivors resume its interrupted eager sessions — each
//! first by the survivor rendezvous hashing picks, then by anyone after a grace period —
//! rate-limited, confirmed before acting, and never while this node's own lease is in doubt.
//! A rare sweep over every resumable session catches the rest: owners that died while no reaper
//! watched, and sessions whose actor ended on a live node (a store outage outlasting its commit
//! retries) — any resumable session without a resolving placement, whoever owned it last.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use normandy_core::{Error, NodeId, OwnerFilter, SessionId};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Node, lock};
use crate::hash;

/// The reaper's switch and its rate limit.
pub(super) struct Reaper {
    pub(super) enabled: bool,
    /// Spaces the reaper's claims `1 / reap_rate` apart, across every pass of this node.
    next_claim: Mutex<Instant>,
    /// Bounds the resumes in flight.
    claims: Arc<Semaphore>,
}

impl Reaper {
    pub(super) fn new(enabled: bool, concurrency: usize) -> Self {
        Self {
            enabled,
            next_claim: Mutex::new(Instant::now()),
            claims: Arc::new(Semaphore::new(concurrency)),
        }
    }

    /// The instant the next claim may start, reserving it.
    fn next_slot(&self, rate: u32) -> Instant {
        let mut next = lock(&self.next_claim);
        let slot = (*next).max(Instant::now());
        *next = slot + Duration::from_secs(1) / rate;
        slot
    }
}

/// Which of the listed sessions a pass takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pass {
    /// The sessions rendezvous hashing gives this node.
    Mine,
    /// Every listed session that no node holds.
    Unclaimed,
    /// Every listed session.
    All,
    /// The sessions rendezvous hashing gives this node that no node holds, whoever owned them
    /// last: a dead node, or a live one whose actor for it ended.
    MineIfUnplaced,
}

impl Pass {
    /// Whether this pass claims only after checking that no node holds the session.
    fn checks_unclaimed(self) -> bool {
        matches!(self, Pass::Unclaimed | Pass::MineIfUnplaced)
    }
}

/// Whether `pass` on node `me`, with `live` members, takes session `id` (before the check
/// that no node holds it, for the passes that make it).
pub(super) fn takes(pass: Pass, id: &SessionId, live: &[NodeId], me: &NodeId) -> bool {
    match pass {
        Pass::All | Pass::Unclaimed => true,
        Pass::Mine | Pass::MineIfUnplaced => hash::owner(id, live) == Some(me),
    }
}

impl Node {
    /// Whether this node may reap now: it serves and its own refreshes succeed.
    fn may_reap(&self) -> bool {
        self.serving() && self.lease.refresh_ok()
    }

    pub(super) async fn reap_downs(self: Arc<Self>, mut downs: Vec<NodeId>, others_before: usize) {
        // A node must stay down for a refresh period: one whose lease the backend dropped
        // (failover, eviction) recreates it within that time.
        tokio::time::sleep(self.config.confirm_down).await;
        if !self.still_down(&mut downs).await {
            return;
        }
        if others_before >= 2 && downs.len() * 2 > others_before {
            // Most of the cluster vanished at once: more likely the backend lost every lease
            // than most nodes died. Wait a whole TTL more, then reap only the ones still gone.
            warn!(
                down = downs.len(),
                of = others_before,
                "mass lease loss; confirming before reaping"
            );
            tokio::time::sleep(self.config.lease_ttl).await;
            if !self.still_down(&mut downs).await {
                return;
            }
        }
        for dead in downs {
            self.reap_node(&dead, false).await;
        }
    }

    /// Keeps in `downs` the nodes still absent; false if none is, or if this node may not reap.
    async fn still_down(&self, downs: &mut Vec<NodeId>) -> bool {
        if !self.may_reap() {
            warn!("not reaping: this node's own lease is in doubt");
            return false;
        }
        match self.membership.members().await {
            Ok(list) => downs.retain(|d| !list.iter().any(|m| &m.node == d)),
            Err(e) => {
                warn!(error = %e, "cannot confirm members; not reaping");
                return false;
            }
        }
        !downs.is_empty()
    }

    /// Resumes the interrupted eager sessions last owned by `dead`: first the ones rendezvous
    /// hashing gives this node, then, after a grace period, any still unclaimed (their chosen
    /// survivor may have died too). `all` claims every one at once (this node's own previous
    /// incarnation, after it rejoined).
    pub(super) async fn reap_node(&self, dead: &NodeId, all: bool) {
        let started = Instant::now();
        let filter = OwnerFilter::Node(dead.clone());
        let claimed = self
            .reap_pass(&filter, if all { Pass::All } else { Pass::Mine })
            .await;
        if !all {
            tokio::time::sleep(self.config.poll_interval * 2 + self.config.lease_ttl / 3).await;
            let late = self.reap_pass(&filter, Pass::Unclaimed).await;
            info!(dead = %dead, claimed, late, elapsed = ?started.elapsed(), "reaped");
        }
    }

    /// A rare sweep over every resumable session: resumes those without a resolving placement.
    pub(super) async fn sweep(self: Arc<Self>) {
        let n = self
            .reap_pass(&OwnerFilter::Any, Pass::MineIfUnplaced)
            .await;
        if n > 0 {
            info!(resumed = n, "sweep resumed unplaced sessions");
        }
    }

    async fn reap_pass(&self, filter: &OwnerFilter, pass: Pass) -> usize {
        let mut cursor: Option<SessionId> = None;
        let mut claims = tokio::task::JoinSet::new();
        let mut queued = 0;
        loop {
            if !self.may_reap() {
                break;
            }
            let page = match self
                .store
                .list_resumable(filter, cursor.as_ref(), 256)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    warn!(error = %e, "could not list resumable sessions");
                    break;
                }
            };
            let live = self.view.nodes();
            let me = self.me().node.clone();
            for s in page.sessions {
                if !takes(pass, &s.id, &live, &me) {
                    continue;
                }
                // Sessions some node holds are skipped before taking a rate slot: a sweep lists
                // every session in a turn, and most of them are live somewhere.
                if pass.checks_unclaimed() && !matches!(self.registry.lookup(&s.id).await, Ok(None))
                {
                    continue;
                }
                let Ok(permit) = self.reaper.claims.clone().acquire_owned().await else {
                    break;
                };
                tokio::time::sleep_until(self.reaper.next_slot(self.config.reap_rate)).await;
                let sessions = self.sessions();
                queued += 1;
                claims.spawn(async move {
                    let _permit = permit;
                    match sessions.resume(&s.id).await {
                        Ok(()) => true,
                        Err(Error::AlreadyRegistered { .. }) => false,
                        Err(e) => {
                            warn!(session = %s.id, error = %e, "could not resume");
                            false
                        }
                    }
                });
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        let mut resumed = 0;
        while let Some(r) = claims.join_next().await {
            if matches!(r, Ok(true)) {
                resumed += 1;
            }
        }
        debug!(queued, resumed, "reap pass done");
        self.stats
            .reaped
            .fetch_add(resumed as u64, Ordering::Relaxed);
        resumed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(name: &str) -> NodeId {
        NodeId::new(name, 1).unwrap()
    }

    fn ids(k: usize) -> Vec<SessionId> {
        (0..k)
            .map(|i| SessionId::new(format!("s{i}")).unwrap())
            .collect()
    }

    #[test]
    fn survivors_split_a_dead_nodes_sessions_without_overlap_or_gap() {
        let live = [n("a"), n("b"), n("c")];
        let sessions = ids(300);
        let mut counts = [0usize; 3];
        for id in &sessions {
            let takers: Vec<usize> = (0..3)
                .filter(|&i| takes(Pass::Mine, id, &live, &live[i]))
                .collect();
            assert_eq!(takers.len(), 1, "{id} taken by {takers:?}");
            counts[takers[0]] += 1;
        }
        // Rendezvous hashing spreads them: no survivor gets none or nearly all.
        assert!(counts.iter().all(|&c| c > 50), "{counts:?}");
    }

    #[test]
    fn the_sweep_takes_its_share_whoever_owned_it_last() {
        // Ownership is not asked: a session whose actor ended on a live node is as unplaced as a
        // dead node's. Which sessions no node holds is checked against the registry.
        let live = [n("a"), n("b")];
        for id in ids(50) {
            let mine = takes(Pass::Mine, &id, &live, &live[0]);
            assert_eq!(takes(Pass::MineIfUnplaced, &id, &live, &live[0]), mine);
            assert_ne!(
                takes(Pass::MineIfUnplaced, &id, &live, &live[0]),
                takes(Pass::MineIfUnplaced, &id, &live, &live[1]),
                "exactly one live node sweeps {id}"
            );
        }
    }

    #[test]
    fn the_late_and_the_whole_pass_take_everything() {
        let live = [n("a"), n("b")];
        for id in ids(20) {
            assert!(takes(Pass::Unclaimed, &id, &live, &live[0]));
            assert!(takes(Pass::All, &id, &live, &live[0]));
        }
        assert!(Pass::Unclaimed.checks_unclaimed() && Pass::MineIfUnplaced.checks_unclaimed());
        assert!(!Pass::Mine.checks_unclaimed() && !Pass::All.checks_unclaimed());
    }
}
