//! Where a request goes: the local actor, the session's owner over RPC, or — while this node is
//! not serving — a stand-in chosen by rendezvous hashing; and the loop that re-routes a request
//! after a stale route with the same input id. Also the peers' clients and the route cache.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use normandy_core::{
    ContentBlock, Error, EventStream, Input, InputId, NodeId, Result, Seq, SessionId, Sessions,
    TurnOutcome,
};
use tokio::time::Instant;
use tracing::debug;

use super::{InFlight, Node, lock};
use crate::config::ClusterConfig;
use crate::hash;
use crate::rpc::{NodeClient, Secret};
use crate::tls::ClusterTls;

/// Entries of the route cache before it is cleared.
const ROUTE_CACHE_MAX: usize = 100_000;

/// How this node reaches its peers.
pub(super) struct Peers {
    pub(super) secret: Secret,
    /// TLS of the RPC server and of the clients to peers; `None`: plaintext.
    pub(super) tls: Option<ClusterTls>,
    /// Clients of peers by address; one HTTP/2 connection each. std Mutex: map access only.
    clients: Mutex<HashMap<String, NodeClient>>,
    /// Last known remote owner of sessions this node forwarded to, so the hot path skips the
    /// registry lookup. Dropped on any stale-route error; a forwarded request that reaches a
    /// node that no longer owns the session is answered `NotOwner`, so a stale entry costs one
    /// round trip, never a wrong answer. std Mutex: map access only.
    routes: Mutex<HashMap<SessionId, NodeId>>,
}

impl Peers {
    pub(super) fn new(secret: Secret, tls: Option<ClusterTls>) -> Self {
        Self {
            secret,
            tls,
            clients: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
        }
    }

    /// The client of the peer at `address`, made on first use.
    pub(super) fn client(&self, address: &str, config: &ClusterConfig) -> Result<NodeClient> {
        let mut clients = lock(&self.clients);
        if let Some(c) = clients.get(address) {
            return Ok(c.clone());
        }
        let c = NodeClient::connect_with(
            address,
            Some(self.secret.expose()),
            config.rpc_timeout,
            config.peer_keepalive,
            self.tls.as_ref(),
        )?;
        clients.insert(address.to_string(), c.clone());
        Ok(c)
    }

    /// Forgets the client of a peer that went down (a restarted node may reuse the address).
    pub(super) fn drop_client(&self, address: &str) {
        lock(&self.clients).remove(address);
    }

    fn cached(&self, id: &SessionId) -> Option<NodeId> {
        lock(&self.routes).get(id).cloned()
    }

    fn remember(&self, id: &SessionId, owner: &NodeId) {
        let mut routes = lock(&self.routes);
        if routes.len() >= ROUTE_CACHE_MAX {
            routes.clear(); // crude bound; the next requests repopulate it
        }
        routes.insert(id.clone(), owner.clone());
    }

    fn forget(&self, id: &SessionId) {
        lock(&self.routes).remove(id);
    }
}

/// Whether a failed request should be retried after a fresh lookup.
pub(super) fn reroutable(e: &Error) -> bool {
    matches!(
        e.inner(),
        Error::Fenced { .. }
            | Error::AlreadyRegistered { .. }
            | Error::NotOwner { .. }
            | Error::Unavailable { .. }
    )
}

/// A request that goes to a session's owner.
pub(super) enum Op {
    Send {
        input_id: InputId,
        content: Vec<ContentBlock>,
    },
    Subscribe {
        after: Seq,
    },
    /// Cancels the turn of this input only (or whatever runs, for `None`).
    Cancel {
        turn: Option<InputId>,
    },
    Stop,
}

/// What an [`Op`] returns.
pub(super) enum OpResult {
    Outcome(TurnOutcome),
    Stream(EventStream),
    Bool(bool),
    Unit,
}

/// Where one attempt of a request goes, as a pure choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Choice {
    /// Run it on this node (it owns the session, or nobody does and this node serves).
    Local,
    /// Send it to the owner.
    Owner(NodeId),
    /// Nobody else owns it and this node is not serving: hand it to a stand-in.
    StandIn,
}

/// The route for a session whose owner (as the registry or the cache says) is `owner`.
pub(super) fn choose(me: &NodeId, owner: Option<&NodeId>, serving: bool) -> Choice {
    match owner {
        Some(o) if o != me => Choice::Owner(o.clone()),
        _ if serving => Choice::Local,
        _ => Choice::StandIn,
    }
}

/// Where one attempt of a request goes: the local runtime (read once per attempt: it is
/// replaced when the node rejoins) or a peer's client.
enum Route {
    Local(Sessions),
    Remote(NodeClient),
}

/// One attempt of `op` at a peer, which serves it on its own actor or answers `NotOwner`.
async fn run_remote(peer: &NodeClient, id: &SessionId, op: &Op) -> Result<OpResult> {
    Ok(match op {
        Op::Send { input_id, content } => OpResult::Outcome(
            peer.send_inner(id, input_id.clone(), content.clone(), true)
                .await?,
        ),
        Op::Subscribe { after } => OpResult::Stream(peer.subscribe_inner(id, *after, true).await?),
        Op::Cancel { turn } => OpResult::Bool(peer.cancel_inner(id, turn.clone(), true).await?),
        Op::Stop => {
            peer.stop_inner(id, true).await?;
            OpResult::Unit
        }
    })
}

impl Node {
    /// Where the next attempt for `id` goes; `hint` is the winner of a placement race.
    async fn pick_route(&self, id: &SessionId, hint: Option<NodeId>) -> Result<Route> {
        let me = self.me();
        let serving = self.serving();
        let sessions = self.sessions();
        if hint.is_none() && serving && sessions.is_live(id) {
            // Live here: no lookup on the hot path. Should another node have taken the session
            // meanwhile, the actor's next commit is fenced and the request re-routed.
            return Ok(Route::Local(sessions));
        }
        let owner = match hint.or_else(|| self.peers.cached(id)) {
            Some(o) => Some(o),
            None => {
                let owner = self.registry.lookup(id).await?.map(|p| p.owner);
                if let Some(o) = owner.as_ref().filter(|o| **o != me.node) {
                    self.peers.remember(id, o);
                }
                owner
            }
        };
        match choose(&me.node, owner.as_ref(), serving) {
            Choice::Local => Ok(Route::Local(sessions)),
            Choice::Owner(o) => {
                let Some(addr) = self.view.address_of(&o, &*self.membership).await else {
                    return Err(Error::Unavailable {
                        backend: "cluster routing",
                        message: format!("owner {o} of session {id} has no known address"),
                    });
                };
                Ok(Route::Remote(self.peers.client(&addr, &self.config)?))
            }
            Choice::StandIn => {
                // Not taking sessions here (draining, lease in doubt): hand the request to the
                // node rendezvous hashing picks among the others.
                let others: Vec<NodeId> = self
                    .view
                    .nodes()
                    .into_iter()
                    .filter(|n| *n != me.node)
                    .collect();
                let Some(target) = hash::owner(id, &others).cloned() else {
                    return Err(self.not_serving());
                };
                let addr = self
                    .view
                    .address_of(&target, &*self.membership)
                    .await
                    .ok_or_else(|| self.not_serving())?;
                Ok(Route::Remote(self.peers.client(&addr, &self.config)?))
            }
        }
    }

    /// Runs one request with re-routing: each attempt goes where `pick_route` says; a stale
    /// route is retried after a fresh lookup until `route_timeout`.
    async fn route(&self, id: &SessionId, op: &Op) -> Result<OpResult> {
        let _guard = InFlight::new(&self.life.in_flight);
        let deadline = Instant::now() + self.config.route_timeout;
        let mut backoff = Duration::from_millis(10);
        let mut hint = None;
        loop {
            let result = match self.pick_route(id, hint.take()).await {
                Ok(Route::Local(sessions)) => run_local(&sessions, id, op).await,
                Ok(Route::Remote(peer)) => {
                    self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                    run_remote(&peer, id, op).await
                }
                Err(e) => Err(e),
            };
            match result {
                Err(e) if reroutable(&e) && Instant::now() < deadline => {
                    debug!(session = %id, error = %e, "stale route; looking up again");
                    self.peers.forget(id);
                    if let Error::AlreadyRegistered { owner, .. } = e.inner() {
                        // The winner of a placement race is the route: go there at once.
                        hint = Some(owner.clone());
                        continue;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(250));
                }
                other => return other,
            }
        }
    }
}

/// Runs `op` on this node's own actor, in `sessions`.
pub(super) async fn run_local(sessions: &Sessions, id: &SessionId, op: &Op) -> Result<OpResult> {
    Ok(match op {
        Op::Send { input_id, content } => {
            let input = Input {
                id: Some(input_id.clone()),
                content: content.clone(),
            };
            OpResult::Outcome(sessions.send(id, input).await?)
        }
        Op::Subscribe { after } => OpResult::Stream(sessions.subscribe(id, *after).await?),
        Op::Cancel { turn: None } => OpResult::Bool(sessions.cancel(id).await?),
        Op::Cancel { turn: Some(t) } => OpResult::Bool(sessions.cancel_turn(id, t).await?),
        Op::Stop => {
            sessions.stop(id).await?;
            OpResult::Unit
        }
    })
}

impl Node {
    pub(super) async fn route_send(
        &self,
        id: &SessionId,
        input_id: InputId,
        content: Vec<ContentBlock>,
    ) -> Result<TurnOutcome> {
        self.route(id, &Op::Send { input_id, content })
            .await?
            .outcome()
    }

    pub(super) async fn route_subscribe(&self, id: &SessionId, after: Seq) -> Result<EventStream> {
        self.route(id, &Op::Subscribe { after }).await?.stream()
    }

    pub(super) async fn route_cancel(&self, id: &SessionId, turn: Option<InputId>) -> Result<bool> {
        self.route(id, &Op::Cancel { turn }).await?.bool()
    }

    pub(super) async fn route_stop(&self, id: &SessionId) -> Result<()> {
        self.route(id, &Op::Stop).await.map(|_| ())
    }
}

impl OpResult {
    pub(super) fn outcome(self) -> Result<TurnOutcome> {
        match self {
            OpResult::Outcome(o) => Ok(o),
            _ => Err(Error::Internal(
                "send answered with a non-send result".into(),
            )),
        }
    }

    pub(super) fn stream(self) -> Result<EventStream> {
        match self {
            OpResult::Stream(s) => Ok(s),
            _ => Err(Error::Internal(
                "subscribe answered with a non-stream result".into(),
            )),
        }
    }

    pub(super) fn bool(self) -> Result<bool> {
        match self {
            OpResult::Bool(b) => Ok(b),
            _ => Err(Error::Internal(
                "cancel answered with a non-bool result".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(name: &str) -> NodeId {
        NodeId::new(name, 1).unwrap()
    }

    #[test]
    fn a_session_owned_elsewhere_goes_to_its_owner_whatever_this_node_does() {
        let (me, b) = (n("a"), n("b"));
        assert_eq!(choose(&me, Some(&b), true), Choice::Owner(b.clone()));
        assert_eq!(choose(&me, Some(&b), false), Choice::Owner(b));
    }

    #[test]
    fn an_unowned_or_own_session_runs_here_while_serving_else_at_a_stand_in() {
        let me = n("a");
        assert_eq!(choose(&me, None, true), Choice::Local);
        assert_eq!(choose(&me, Some(&me), true), Choice::Local);
        assert_eq!(choose(&me, None, false), Choice::StandIn);
        assert_eq!(choose(&me, Some(&me), false), Choice::StandIn);
    }

    #[test]
    fn only_stale_route_errors_are_rerouted() {
        let s = SessionId::new("s").unwrap();
        assert!(reroutable(&Error::NotOwner {
            session: s.clone(),
            node: n("b")
        }));
        assert!(reroutable(&Error::Fenced {
            session: s.clone(),
            epoch: 1,
            current: 2
        }));
        assert!(!reroutable(&Error::Busy { session: s.clone() }));
        assert!(!reroutable(&Error::NotFound { session: s }));
    }
}
