//! This node's own lease: who it is, the refresh loop, the watchdog that stops serving before
//! the lease can lapse, and the one lapse policy of [`Membership`](normandy_core::Membership):
//!
//! - A refresh that fails (error, timeout) leaves the lease in doubt: the watchdog stops
//!   serving before it can lapse, timed on the monotonic clock from the send of the last good
//!   refresh, and the node never reaps meanwhile. A later refresh that finds the lease still
//!   there ([`LeaseStatus::Held`]) proves it never lapsed: the node serves again as the same
//!   incarnation.
//! - A refresh that finds the lease gone ([`LeaseStatus::Lost`]) means other nodes may have
//!   taken its sessions: the node stops serving, stops its live actors, and rejoins under a
//!   **new incarnation** — a fresh lease claimed only if absent, a fresh local runtime — then
//!   resumes whatever eager sessions of its previous incarnation nobody else took.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use normandy_core::{
    CommitGate, Error, JoinOutcome, LeaseStatus, Member, Membership, NodeId, Result, Sessions,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::{Node, lock, read};

/// A point on the clock this node times its own lease with: `CLOCK_BOOTTIME` on Linux, which
/// keeps counting while the machine is suspended — the server's TTL runs on meanwhile, while
/// `CLOCK_MONOTONIC` (tokio's `Instant`) would stand still, and a node waking from a suspend
/// would think a lapsed lease still good. Elsewhere, the monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct LeaseInstant(Duration);

impl LeaseInstant {
    pub(super) fn now() -> Self {
        #[cfg(target_os = "linux")]
        if let Ok(t) = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
            return Self(Duration::from(t));
        }
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        Self(START.get_or_init(std::time::Instant::now).elapsed())
    }
}

impl std::ops::Add<Duration> for LeaseInstant {
    type Output = Self;
    fn add(self, d: Duration) -> Self {
        Self(self.0 + d)
    }
}

/// What every commit of this node checks (the runtime's [`CommitGate`]): which incarnation
/// may commit, and until when its lease is surely alive.
pub(super) struct Clock {
    /// Send time of the last good refresh + TTL, on this process's monotonic clock.
    valid_until: Mutex<LeaseInstant>,
    /// The incarnation whose actors may commit; 0 once its lease was found lost.
    incarnation: AtomicU64,
}

impl Clock {
    pub(super) fn new(node: &NodeId, valid_until: LeaseInstant) -> Arc<Self> {
        Arc::new(Self {
            valid_until: Mutex::new(valid_until),
            incarnation: AtomicU64::new(node.incarnation()),
        })
    }

    /// The gate of the runtime of `node`: its actors commit only while `node` is the current
    /// incarnation and its lease is surely alive. Until-instant without a margin: the server
    /// started the TTL no earlier than the refresh was sent.
    pub(super) fn gate(self: &Arc<Self>, node: &NodeId) -> CommitGate {
        let clock = self.clone();
        let node = node.clone();
        Arc::new(move || {
            let why = if clock.incarnation.load(Ordering::SeqCst) != node.incarnation() {
                "its lease was lost, so this incarnation is fenced"
            } else if LeaseInstant::now() >= *lock(&clock.valid_until) {
                "its lease is not surely alive (no good refresh for a TTL)"
            } else {
                return Ok(());
            };
            Err(Error::Unavailable {
                backend: "cluster node",
                message: format!("node {node} commits nothing: {why}"),
            })
        })
    }

    pub(super) fn renew(&self, until: LeaseInstant) {
        *lock(&self.valid_until) = until;
    }

    fn until(&self) -> LeaseInstant {
        *lock(&self.valid_until)
    }
}

/// This node's identity and the state of its lease.
pub(super) struct Lease {
    /// Who this node is now; replaced when it rejoins under a new incarnation.
    me: RwLock<Arc<Member>>,
    /// Until when the lease is surely alive, and which incarnation may commit.
    pub(super) clock: Arc<Clock>,
    /// Whether the last refresh succeeded. A node never reaps while its refresh fails.
    refresh_ok: AtomicBool,
    /// Whether the lease is trusted (cleared by the watchdog before it can lapse, and when a
    /// refresh finds it lost).
    trusted: AtomicBool,
    /// The passivation a loss of trust started; serving resumes only once it is done, so it
    /// cannot passivate sessions placed after the lease came back.
    stopping: Mutex<Option<JoinHandle<()>>>,
}

impl Lease {
    /// The lease of `me`, whose commits `clock` gates.
    pub(super) fn new(me: Member, clock: Arc<Clock>) -> Self {
        Self {
            me: RwLock::new(Arc::new(me)),
            clock,
            refresh_ok: AtomicBool::new(true),
            trusted: AtomicBool::new(true),
            stopping: Mutex::new(None),
        }
    }

    pub(super) fn me(&self) -> Arc<Member> {
        read(&self.me).clone()
    }

    pub(super) fn trusted(&self) -> bool {
        self.trusted.load(Ordering::SeqCst)
    }

    pub(super) fn refresh_ok(&self) -> bool {
        self.refresh_ok.load(Ordering::SeqCst)
    }

    fn stopping(&self) -> bool {
        lock(&self.stopping)
            .as_ref()
            .is_some_and(|t| !t.is_finished())
    }
}

/// Joins as `me` and returns the send time of the successful claim. While another incarnation
/// of the same name holds a live lease it waits, up to one TTL and a refresh period — long
/// enough for the lease of this node's previous life (a crash, a quick restart) to lapse — and
/// then refuses, naming both: two processes must never run under one node name.
pub(super) async fn join_unique(
    membership: &dyn Membership,
    me: &Member,
    ttl: Duration,
) -> Result<LeaseInstant> {
    let deadline = Instant::now() + ttl + ttl / 3;
    loop {
        let sent = LeaseInstant::now();
        match membership.join(me, ttl).await? {
            JoinOutcome::Joined => return Ok(sent),
            JoinOutcome::NameInUse(other) if Instant::now() < deadline => {
                info!(node = %me.node, holder = %other.node, "node name in use; waiting for its lease to lapse");
                tokio::time::sleep(ttl / 10).await;
            }
            JoinOutcome::NameInUse(other) => {
                return Err(Error::Config(format!(
                    "node {} cannot join: {} (at {}) holds a live lease under the same name {:?}; \
                     give each process its own name (ClusterBuilder::node_name, normandy-node --name)",
                    me.node,
                    other.node,
                    other.address,
                    me.node.name()
                )));
            }
        }
    }
}

/// The next incarnation of a node: the clock's, or one more than the last when the clock has
/// not moved past it (a clock stepped back, two rejoins in one millisecond).
fn next_incarnation(previous: &NodeId) -> Result<NodeId> {
    let fresh = NodeId::with_fresh_incarnation(previous.name())?;
    if fresh.incarnation() > previous.incarnation() {
        Ok(fresh)
    } else {
        NodeId::new(previous.name(), previous.incarnation() + 1)
    }
}

impl Node {
    /// Refreshes the lease every TTL/3. Timed from each refresh's send: the server's TTL
    /// started no earlier than that.
    pub(super) async fn lease_loop(self: Arc<Self>) {
        let period = self.config.lease_ttl / 3;
        let mut stop = self.life.stop.subscribe();
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // immediate; the lease was just taken
        let mut lost = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if self.life.left.load(Ordering::SeqCst) {
                return;
            }
            if lost {
                lost = !self.clone().rejoin().await;
                continue;
            }
            let me = self.me();
            let sent = LeaseInstant::now();
            let refreshed =
                tokio::time::timeout(period, self.membership.refresh(&me, self.config.lease_ttl))
                    .await;
            match refreshed {
                Ok(Ok(LeaseStatus::Held)) => {
                    self.lease.clock.renew(sent + self.config.lease_ttl);
                    self.lease.refresh_ok.store(true, Ordering::SeqCst);
                    if !self.lease.trusted() {
                        self.clone().regain();
                    }
                }
                Ok(Ok(LeaseStatus::Lost)) => {
                    self.lease.refresh_ok.store(false, Ordering::SeqCst);
                    error!(node = %me.node, "lease lost (it lapsed or was dropped); \
                        stopping this incarnation and rejoining under a new one");
                    self.fence();
                    lost = !self.clone().rejoin().await;
                }
                Ok(Err(e)) => {
                    self.lease.refresh_ok.store(false, Ordering::SeqCst);
                    warn!(node = %me.node, error = %e, "lease refresh failed");
                }
                Err(_) => {
                    self.lease.refresh_ok.store(false, Ordering::SeqCst);
                    warn!(node = %me.node, "lease refresh timed out");
                }
            }
        }
    }

    /// Stops serving before the lease can lapse when refreshes fail (or the process was paused).
    pub(super) async fn watchdog(self: Arc<Self>) {
        let step = (self.config.lease_ttl / 30).max(Duration::from_millis(5));
        let margin = self.config.stop_margin();
        while !self.stopped() {
            tokio::time::sleep(step).await;
            let until = self.lease.clock.until();
            if self.life.draining.load(Ordering::SeqCst) {
                continue;
            }
            if self.lease.trusted() && LeaseInstant::now() + margin >= until {
                error!(node = %self.me().node, "lease in doubt: stopped serving, passivating live sessions");
                self.distrust();
            }
        }
    }

    /// Stops serving and passivates every live session (once per loss of trust).
    fn distrust(&self) {
        if !self.lease.trusted.swap(false, Ordering::SeqCst) {
            return;
        }
        self.stats.lease_losses.fetch_add(1, Ordering::Relaxed);
        let sessions = self.sessions();
        sessions.set_accepting(false);
        *lock(&self.lease.stopping) = Some(tokio::spawn(async move { sessions.shutdown().await }));
    }

    /// Stops serving and aborts every live actor: the lease is gone, so other nodes may run
    /// this node's sessions already, and nothing of this incarnation may commit again.
    fn fence(&self) {
        // First, so that no actor of this incarnation commits from here on.
        self.lease.clock.incarnation.store(0, Ordering::SeqCst);
        if self.lease.trusted.swap(false, Ordering::SeqCst) {
            self.stats.lease_losses.fetch_add(1, Ordering::Relaxed);
        }
        // A passivation the watchdog started would only let actors reach their next commit.
        if let Some(t) = lock(&self.lease.stopping).take() {
            t.abort();
        }
        let killed = self.sessions().kill_all();
        warn!(node = %self.me().node, killed, "fenced this incarnation's live actors");
    }

    /// After a refresh that found the lease still held, following a loss of trust: serve again
    /// as the same incarnation, and take back our own interrupted eager sessions that nobody
    /// else resumed meanwhile.
    fn regain(self: Arc<Self>) {
        if self.life.draining.load(Ordering::SeqCst) || self.lease.stopping() {
            // Still passivating what it had; the next good refresh tries again.
            return;
        }
        info!(node = %self.me().node, "lease refreshed again: serving");
        self.sessions().set_accepting(true);
        self.lease.trusted.store(true, Ordering::SeqCst);
        if self.reaper.enabled {
            let me = self.me().node.clone();
            tokio::spawn(async move { self.reap_node(&me, true).await });
        }
    }

    /// Rejoins under a new incarnation after the lease was lost (and the old runtime fenced):
    /// builds a new runtime for the new node id, claims its lease, and serves. Returns false
    /// when it must be tried again at the next tick.
    async fn rejoin(self: Arc<Self>) -> bool {
        if self.life.draining.load(Ordering::SeqCst) {
            return false;
        }
        let old = self.me();
        let node = match next_incarnation(&old.node) {
            Ok(n) => n,
            Err(e) => {
                error!(error = %e, "cannot name a new incarnation");
                return false;
            }
        };
        let built = self.recipe.build(node.clone(), &self.lease.clock);
        let sessions: Sessions = match built {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "cannot rebuild the local runtime to rejoin");
                return false;
            }
        };
        let me = Member {
            node: node.clone(),
            address: old.address.clone(),
        };
        let sent = LeaseInstant::now();
        match self.membership.join(&me, self.config.lease_ttl).await {
            Ok(JoinOutcome::Joined) => {}
            Ok(JoinOutcome::NameInUse(other)) => {
                error!(node = %node, holder = %other.node, address = %other.address,
                    "another process runs under this node's name; not rejoining yet");
                return false;
            }
            Err(e) => {
                warn!(node = %node, error = %e, "could not claim a new lease; retrying");
                return false;
            }
        }
        self.lease.clock.renew(sent + self.config.lease_ttl);
        self.lease
            .clock
            .incarnation
            .store(node.incarnation(), Ordering::SeqCst);
        *self.sessions.write().unwrap_or_else(|p| p.into_inner()) = sessions;
        *self.lease.me.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(me.clone());
        self.view.insert(&me);
        self.lease.refresh_ok.store(true, Ordering::SeqCst);
        self.lease.trusted.store(true, Ordering::SeqCst);
        self.stats.rejoins.fetch_add(1, Ordering::Relaxed);
        info!(old = %old.node, new = %node, "rejoined under a new incarnation");
        if self.reaper.enabled {
            // The previous incarnation's interrupted eager sessions, unless taken meanwhile.
            let previous = old.node.clone();
            tokio::spawn(async move { self.reap_node(&previous, true).await });
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_clock_moves_with_time_and_never_back() {
        let a = LeaseInstant::now();
        std::thread::sleep(Duration::from_millis(20));
        let b = LeaseInstant::now();
        assert!(b >= a + Duration::from_millis(20), "{a:?} then {b:?}");
        assert!(a + Duration::from_secs(1) > b);
    }

    #[test]
    fn a_new_incarnation_is_always_greater_than_the_last() {
        let now = NodeId::with_fresh_incarnation("a").unwrap();
        let next = next_incarnation(&now).unwrap();
        assert_eq!(next.name(), "a");
        assert!(next.incarnation() > now.incarnation());
        // A previous incarnation from a clock that ran ahead.
        let ahead = NodeId::new("a", u64::MAX - 1).unwrap();
        assert_eq!(next_incarnation(&ahead).unwrap().incarnation(), u64::MAX);
    }
}
