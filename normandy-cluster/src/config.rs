//! [`ClusterConfig`]: the timing knobs of a node, with production defaults.

use std::time::Duration;

use normandy_core::{Error, Result};

/// Timing and limits of one node. The defaults suit a LAN cluster; every node of a cluster should
/// use the same lease TTL.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// How long a node's lease lives without a refresh (default 1.5 s). Refreshed every third of
    /// it; a dead node is noticed within about TTL + `poll_interval`.
    pub lease_ttl: Duration,
    /// How often survivors read the member list (default TTL / 6).
    pub poll_interval: Duration,
    /// Deadline of one RPC, a whole turn included, set on both sides (default 11 min: longer
    /// than the default 10-minute turn deadline, so a remote caller waits as long as a local
    /// one). A dead link is noticed sooner, by `peer_keepalive`.
    pub rpc_timeout: Duration,
    /// How long a request keeps re-routing after stale routes (owner moved or died) before it
    /// gives up with the last error (default 3 × TTL + 5 s: long enough for a dead owner's lease
    /// to lapse and a survivor to take over). Checked between attempts: an attempt under way
    /// runs to its own end, which over a link gone dark is set by `peer_keepalive`, so a send
    /// over a dead link fails after at most about `route_timeout` + 2 × `peer_keepalive`.
    pub route_timeout: Duration,
    /// HTTP/2 keep-alive of the connections to peers (default 5 s): a ping goes out after this
    /// long without bytes from the peer, and the connection is dropped — failing its calls with
    /// a retryable `Unavailable` — if no answer comes within it. Bounds how long a call hangs on
    /// a link that went dark without a reset.
    pub peer_keepalive: Duration,
    /// How long a node must stay down before its sessions are reaped (default TTL / 3 + poll
    /// interval): a live node whose lease the backend dropped (a failover, say) recreates it
    /// within one refresh period, so it is not mistaken for a dead one.
    pub confirm_down: Duration,
    /// Sessions one node's reaper resumes per second at most (default 1000).
    pub reap_rate: u32,
    /// Resumes one node's reaper runs at once (default 64).
    pub reap_concurrency: usize,
    /// How often the reaper sweeps every resumable session for owners that died unwatched
    /// (default 30 s; also once at start).
    pub sweep_interval: Duration,
    /// How long a graceful shutdown waits for in-flight requests (default 10 s).
    pub drain_timeout: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        let ttl = Duration::from_millis(1500);
        Self {
            lease_ttl: ttl,
            poll_interval: ttl / 6,
            confirm_down: ttl / 3 + ttl / 6,
            rpc_timeout: Duration::from_secs(660),
            route_timeout: ttl * 3 + Duration::from_secs(5),
            peer_keepalive: Duration::from_secs(5),
            reap_rate: 1000,
            reap_concurrency: 64,
            sweep_interval: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

impl ClusterConfig {
    /// Sets the lease TTL and the poll interval and route timeout that follow from it.
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self.poll_interval = ttl / 6;
        self.confirm_down = ttl / 3 + ttl / 6;
        self.route_timeout = ttl * 3 + Duration::from_secs(5);
        self
    }

    /// The margin before the lease's end at which a node whose refreshes fail stops serving.
    pub(crate) fn stop_margin(&self) -> Duration {
        self.lease_ttl / 5
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.lease_ttl < Duration::from_millis(100) {
            return Err(Error::Config(format!(
                "lease TTL {:?} is too short (minimum 100 ms)",
                self.lease_ttl
            )));
        }
        if self.poll_interval.is_zero() || self.poll_interval > self.lease_ttl {
            return Err(Error::Config(format!(
                "member poll interval {:?} must be positive and at most the lease TTL {:?}",
                self.poll_interval, self.lease_ttl
            )));
        }
        if self.rpc_timeout < Duration::from_millis(100) {
            return Err(Error::Config(format!(
                "RPC timeout {:?} is too short (minimum 100 ms; it bounds a whole remote turn)",
                self.rpc_timeout
            )));
        }
        if self.peer_keepalive < Duration::from_millis(100) {
            return Err(Error::Config(format!(
                "peer keep-alive {:?} is too short (minimum 100 ms)",
                self.peer_keepalive
            )));
        }
        if self.reap_rate == 0 || self.reap_concurrency == 0 {
            return Err(Error::Config(
                "reap rate and reap concurrency must be at least 1".into(),
            ));
        }
        Ok(())
    }
}
