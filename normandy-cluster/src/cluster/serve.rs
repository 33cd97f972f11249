//! The RPC server task, and the cluster's side of [`NodeApi`]: a call from another node
//! (`forwarded`) is served by this node's own actor or answered `NotOwner` — it never goes on
//! to a third node — while a call from a client (a `normandy-node client`, a load balancer) is
//! handled like a [`Cluster`](super::Cluster) method on this node, routing included.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use normandy_core::{Entry, Error, EventStream, Result, SessionId, TurnOutcome, async_trait};
use tracing::error;

use super::route::{Op, OpResult, run_local};
use super::{InFlight, Node};
use crate::rpc::{NodeApi, NodeService, auth_interceptor};
use crate::wire::{
    HealthReply, HistoryRequest, SendRequest, SessionRequest, StartReply, StartRequest,
    SubscribeRequest,
};

/// Largest history page one call returns.
const MAX_HISTORY_PAGE: usize = 10_000;

/// Runs the RPC server until the node stops.
pub(super) async fn serve(node: Arc<Node>, listener: tokio::net::TcpListener) {
    let mut stop = node.life.stop.subscribe();
    let svc = tonic::service::interceptor::InterceptedService::new(
        NodeService { api: node.clone() },
        auth_interceptor(node.peers.secret.clone()),
    );
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut server = tonic::transport::Server::builder().timeout(node.config.rpc_timeout);
    if let Some(tls) = &node.peers.tls {
        server = match server.tls_config(tls.server_config()) {
            Ok(s) => s,
            Err(e) => {
                // Checked in `build`, so this does not happen; never serve plaintext instead.
                error!(error = %e, "RPC server TLS settings rejected; not serving");
                return;
            }
        };
    }
    let result = server
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        error!(error = %e, "RPC server failed");
    }
}

impl Node {
    /// Serves a request another node forwarded here: on this node's actor if this node owns the
    /// session (or nobody does), else `NotOwner` so the caller looks again.
    async fn serve_owned(&self, id: &SessionId, op: &Op) -> Result<OpResult> {
        let _guard = InFlight::new(&self.life.in_flight);
        if !self.serving() {
            return Err(self.not_serving());
        }
        let sessions = self.sessions();
        if !sessions.is_live(id) {
            let me = self.me().node.clone();
            if let Some(p) = self.registry.lookup(id).await?
                && p.owner != me
            {
                return Err(Error::NotOwner {
                    session: id.clone(),
                    node: me,
                });
            }
        }
        run_local(&sessions, id, op).await
    }

    /// A forwarded request is served here; a client's is routed like a local call.
    async fn serve_op(&self, id: &SessionId, op: Op, forwarded: bool) -> Result<OpResult> {
        if forwarded {
            self.serve_owned(id, &op).await
        } else {
            self.route_op(id, op).await
        }
    }

    async fn route_op(&self, id: &SessionId, op: Op) -> Result<OpResult> {
        Ok(match op {
            Op::Send { input_id, content } => {
                OpResult::Outcome(self.route_send(id, input_id, content).await?)
            }
            Op::Subscribe { after } => OpResult::Stream(self.route_subscribe(id, after).await?),
            Op::Cancel { turn } => OpResult::Bool(self.route_cancel(id, turn).await?),
            Op::Stop => {
                self.route_stop(id).await?;
                OpResult::Unit
            }
        })
    }
}

#[async_trait]
impl NodeApi for Node {
    fn health(&self) -> HealthReply {
        HealthReply {
            node: self.me().node.clone(),
            serving: self.serving(),
            live: self.sessions().live_count() as u64,
            members: self.view.nodes(),
            reaped: self.stats.reaped.load(Ordering::Relaxed),
            lease_losses: self.stats.lease_losses.load(Ordering::Relaxed),
        }
    }

    async fn start(&self, r: StartRequest) -> Result<StartReply> {
        Ok(StartReply {
            id: Node::start(self, &r.template, r.id).await?,
        })
    }

    async fn send(&self, r: SendRequest) -> Result<TurnOutcome> {
        let op = Op::Send {
            input_id: r.input_id,
            content: r.content,
        };
        self.serve_op(&r.session, op, r.forwarded).await?.outcome()
    }

    async fn history(&self, r: HistoryRequest) -> Result<Vec<Entry>> {
        let limit = usize::try_from(r.limit)
            .unwrap_or(usize::MAX)
            .min(MAX_HISTORY_PAGE);
        self.sessions().history(&r.session, r.after, limit).await
    }

    async fn subscribe(&self, r: SubscribeRequest) -> Result<EventStream> {
        let op = Op::Subscribe { after: r.after };
        self.serve_op(&r.session, op, r.forwarded).await?.stream()
    }

    async fn stop(&self, r: SessionRequest) -> Result<()> {
        self.serve_op(&r.session, Op::Stop, r.forwarded)
            .await
            .map(|_| ())
    }

    async fn cancel(&self, r: SessionRequest) -> Result<bool> {
        self.serve_op(&r.session, Op::Cancel { turn: r.turn }, r.forwarded)
            .await?
            .bool()
    }
}
