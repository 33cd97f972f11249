//! The node-to-node RPC service over tonic: a hand-written gRPC service (no `protoc`), the
//! cluster-secret check every call passes, and [`NodeClient`], the client for one peer.
//!
//! One [`Channel`] per peer (HTTP/2 multiplexes every call on it). Deadlines on both sides: the
//! client sets `grpc-timeout` on each call and the endpoint's own timeout; the server enforces its
//! own maximum and the caller's header.

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use normandy_core::{
    ContentBlock, Entry, EventStream, InputId, Result, Seq, SessionId, TurnOutcome,
};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::{Body as HttpBody, BoxFuture, Service, StdError};
use tonic::metadata::MetadataValue;
use tonic::server::NamedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::tls::ClusterTls;
use crate::wire::{
    self, CancelReply, EchoMessage, Empty, HealthReply, HealthRequest, HistoryReply,
    HistoryRequest, MsgPackCodec, RawCodec, SendRequest, SessionRequest, StartReply, StartRequest,
    SubscribeRequest, WireEvent, WireOutcome, from_status, path,
};

/// Largest reply (history page, event, outcome) a client decodes: far above any input (1 MiB by
/// default) so that large tool results stream through, and finite so a broken peer cannot make
/// it buffer without bound. tonic's own default is 4 MiB.
const MAX_REPLY_BYTES: usize = 64 * 1024 * 1024;

/// The metadata key carrying the cluster secret.
const AUTH_HEADER: &str = "authorization";

/// The cluster secret, compared in constant time.
#[derive(Clone)]
pub(crate) struct Secret(Arc<str>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    pub(crate) fn new(s: &str) -> Self {
        Self(Arc::from(s))
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }

    fn matches(&self, presented: &[u8]) -> bool {
        let want = self.bearer();
        let want = want.as_bytes();
        // Constant time in the presented value's content: no early exit on the first mismatch.
        let mut diff = want.len() ^ presented.len();
        for (i, w) in want.iter().enumerate() {
            diff |= usize::from(w ^ presented.get(i).copied().unwrap_or(0));
        }
        diff == 0
    }
}

/// The server-side check: a call without the cluster secret is refused before any handler runs.
pub(crate) fn auth_interceptor(
    secret: Secret,
) -> impl FnMut(Request<()>) -> std::result::Result<Request<()>, Status> + Clone {
    move |req: Request<()>| match req.metadata().get(AUTH_HEADER) {
        Some(v) if secret.matches(v.as_bytes()) => Ok(req),
        Some(_) => Err(Status::unauthenticated("wrong cluster secret")),
        None => Err(Status::unauthenticated("missing cluster secret")),
    }
}

/// A unary or server-streaming handler as a tower service, for `tonic::server::Grpc`.
struct Handler<Req, F>(F, PhantomData<fn(Req)>);

impl<Req, Resp, F, Fut> Service<Request<Req>> for Handler<Req, F>
where
    F: FnMut(Request<Req>) -> Fut,
    Fut: Future<Output = std::result::Result<Response<Resp>, Status>>,
{
    type Response = Response<Resp>;
    type Error = Status;
    type Future = Fut;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::result::Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Req>) -> Fut {
        (self.0)(req)
    }
}

type WireStream =
    Pin<Box<dyn futures::Stream<Item = std::result::Result<WireEvent, Status>> + Send>>;

/// What a node serves over RPC: the server side of every call, implemented by the cluster
/// (`cluster/serve.rs`) and adapted to gRPC by [`NodeService`]. The RPC layer holds no cluster
/// logic and the cluster no gRPC, so each side can be read and tested without the other (the
/// quickwit-cluster arrangement).
#[async_trait::async_trait]
pub(crate) trait NodeApi: Send + Sync + 'static {
    /// Who this node is, whether it serves, what it sees.
    fn health(&self) -> HealthReply;
    /// Creates a session here.
    async fn start(&self, r: StartRequest) -> Result<StartReply>;
    /// Runs an input's turn.
    async fn send(&self, r: SendRequest) -> Result<TurnOutcome>;
    /// A page of committed history.
    async fn history(&self, r: HistoryRequest) -> Result<Vec<Entry>>;
    /// The session's events after a seq.
    async fn subscribe(&self, r: SubscribeRequest) -> Result<EventStream>;
    /// Closes the session.
    async fn stop(&self, r: SessionRequest) -> Result<()>;
    /// Cancels the running turn; whether one was running.
    async fn cancel(&self, r: SessionRequest) -> Result<bool>;
}

/// The gRPC service of one node: decodes each call and hands it to the [`NodeApi`].
#[derive(Clone)]
pub(crate) struct NodeService {
    pub(crate) api: Arc<dyn NodeApi>,
}

impl NamedService for NodeService {
    const NAME: &'static str = wire::SERVICE;
}

macro_rules! unary {
    ($req:expr, $cluster:expr, $Req:ty, $Resp:ty, |$c:ident, $r:ident| $body:expr) => {{
        let cluster = $cluster;
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(MsgPackCodec::<$Resp, $Req>::default());
            let handler = Handler(
                move |req: Request<$Req>| {
                    let $c = cluster.clone();
                    async move {
                        let $r = req.into_inner();
                        let out: std::result::Result<$Resp, Status> = $body;
                        out.map(Response::new)
                    }
                },
                PhantomData,
            );
            Ok(grpc.unary(handler, $req).await)
        })
    }};
}

impl<B> Service<http::Request<B>> for NodeService
where
    B: HttpBody + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::result::Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let cluster = self.api.clone();
        match req.uri().path() {
            path::HEALTH => unary!(req, cluster, HealthRequest, HealthReply, |c, _r| Ok(
                c.health()
            )),
            path::ECHO => unary!(req, cluster, EchoMessage, EchoMessage, |_c, r| {
                if r.delay_ms > 0 {
                    let ms = r.delay_ms.min(wire::MAX_ECHO_DELAY_MS);
                    tokio::time::sleep(Duration::from_millis(u64::from(ms))).await;
                }
                Ok(r)
            }),
            path::START => unary!(req, cluster, StartRequest, StartReply, |c, r| c
                .start(r)
                .await
                .map_err(|e| wire::to_status(&e))),
            path::SEND => unary!(req, cluster, SendRequest, WireOutcome, |c, r| c
                .send(r)
                .await
                .map(WireOutcome::from)
                .map_err(|e| wire::to_status(&e))),
            path::HISTORY => unary!(req, cluster, HistoryRequest, HistoryReply, |c, r| c
                .history(r)
                .await
                .map(|entries| HistoryReply { entries })
                .map_err(|e| wire::to_status(&e))),
            path::STOP => unary!(req, cluster, SessionRequest, Empty, |c, r| c
                .stop(r)
                .await
                .map(|()| Empty {})
                .map_err(|e| wire::to_status(&e))),
            path::CANCEL => unary!(req, cluster, SessionRequest, CancelReply, |c, r| c
                .cancel(r)
                .await
                .map(|running| CancelReply { running })
                .map_err(|e| wire::to_status(&e))),
            path::SUBSCRIBE => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(
                    MsgPackCodec::<WireEvent, SubscribeRequest>::default(),
                );
                let handler = Handler(
                    move |req: Request<SubscribeRequest>| {
                        let c = cluster.clone();
                        async move {
                            let r = req.into_inner();
                            let stream = c.subscribe(r).await.map_err(|e| wire::to_status(&e))?;
                            let out: WireStream = Box::pin(stream.filter_map(|item| {
                                futures::future::ready(match item {
                                    Ok(ev) => WireEvent::from_event(ev).map(Ok),
                                    Err(e) => Some(Err(wire::to_status(&e))),
                                })
                            }));
                            Ok(Response::new(out))
                        }
                    },
                    PhantomData,
                );
                Ok(grpc.server_streaming(handler, req).await)
            }),
            _ => Box::pin(async move {
                let mut response = http::Response::new(Body::default());
                let headers = response.headers_mut();
                headers.insert(
                    Status::GRPC_STATUS,
                    (tonic::Code::Unimplemented as i32).into(),
                );
                headers.insert(
                    http::header::CONTENT_TYPE,
                    tonic::metadata::GRPC_CONTENT_TYPE,
                );
                Ok(response)
            }),
        }
    }
}

/// The error for a failed call to `peer`. A status with details came from a node and is rebuilt
/// as the error it was; one without came from the transport, and keeps its cause chain.
fn map_status(peer: &str, tls: bool, timeout: Duration, s: Status) -> normandy_core::Error {
    if !s.details().is_empty() {
        return from_status(peer, &s);
    }
    // The cause ("keep-alive timed out", "connection reset by peer") is in the source chain,
    // not in the message ("transport error").
    let mut message = s.message().to_string();
    let mut timed_out = false;
    let mut cause = std::error::Error::source(&s);
    while let Some(e) = cause {
        timed_out |= e.is::<tonic::TimeoutExpired>();
        let text = e.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = e.source();
    }
    if timed_out || (s.code() == tonic::Code::Cancelled && s.message() == "Timeout expired") {
        return normandy_core::Error::Timeout {
            session: None,
            what: format!(
                "call to node {peer} (RPC deadline {timeout:?}, ClusterConfig::rpc_timeout)"
            ),
        };
    }
    match s.code() {
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => {
            // A message over a size limit: the same request would fail the same way again.
            normandy_core::Error::Backend {
                backend: "cluster peer",
                message: format!("node {peer}: {message}"),
                retryable: false,
            }
        }
        tonic::Code::Cancelled | tonic::Code::Unknown | tonic::Code::Internal => {
            // The connection closed with no reply: the node or the link went away — or, when it
            // persists with the node up, the two sides disagree on TLS, which the bare
            // "operation was canceled" or "h2 protocol error" does not say.
            let hint = if tls {
                "this client speaks TLS: is the node plaintext, or does it not trust this \
                 client's certificate?"
            } else {
                "this client speaks plaintext: does the node require TLS?"
            };
            normandy_core::Error::Unavailable {
                backend: "cluster peer",
                message: format!(
                    "node {peer}: connection closed with no reply ({message}); if this persists \
                     while the node is up, {hint}"
                ),
            }
        }
        code => from_status(peer, &Status::new(code, message)),
    }
}

/// A client for one node's RPC service. Cheap to clone: clones share one HTTP/2 connection.
#[derive(Clone)]
pub struct NodeClient {
    channel: Channel,
    auth: Option<MetadataValue<tonic::metadata::Ascii>>,
    timeout: Duration,
    peer: Arc<str>,
    tls: bool,
}

impl std::fmt::Debug for NodeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeClient")
            .field("peer", &self.peer)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl NodeClient {
    /// A plaintext client for the node at `address` (`host:port`), presenting `secret` (or
    /// nothing, to see a refusal), with `timeout` as every call's deadline. Connects lazily.
    pub fn new(address: &str, secret: Option<&str>, timeout: Duration) -> Result<Self> {
        Self::connect(address, secret, timeout, None)
    }

    /// Like [`new`](Self::new), over TLS when `tls` is given (the node must serve TLS too).
    pub fn connect(
        address: &str,
        secret: Option<&str>,
        timeout: Duration,
        tls: Option<&ClusterTls>,
    ) -> Result<Self> {
        Self::connect_with(address, secret, timeout, Duration::from_secs(5), tls)
    }

    /// Like [`connect`](Self::connect), with the HTTP/2 keep-alive of the connection (see
    /// [`ClusterConfig::peer_keepalive`](crate::ClusterConfig::peer_keepalive)).
    pub fn connect_with(
        address: &str,
        secret: Option<&str>,
        timeout: Duration,
        keepalive: Duration,
        tls: Option<&ClusterTls>,
    ) -> Result<Self> {
        if timeout < Duration::from_millis(1) || keepalive < Duration::from_millis(100) {
            return Err(normandy_core::Error::Config(format!(
                "node client timeout {timeout:?} (minimum 1 ms) or keep-alive {keepalive:?} \
                 (minimum 100 ms) too short"
            )));
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
            .map_err(|e| {
                normandy_core::Error::Config(format!("bad node address {address:?}: {e}"))
            })?
            .connect_timeout(Duration::from_secs(1).min(timeout))
            .timeout(timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(keepalive)
            .keep_alive_timeout(keepalive);
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls.client_config()).map_err(|e| {
                normandy_core::Error::Config(format!("cluster TLS client settings: {e}"))
            })?;
        }
        let auth = match secret {
            Some(s) => Some(Secret::new(s).bearer().parse().map_err(|_| {
                normandy_core::Error::Config("the cluster secret must be printable ASCII".into())
            })?),
            None => None,
        };
        Ok(Self {
            channel: endpoint.connect_lazy(),
            auth,
            timeout,
            peer: Arc::from(address),
            tls: tls.is_some(),
        })
    }

    /// The peer's address.
    pub fn address(&self) -> &str {
        &self.peer
    }

    fn request<T>(&self, msg: T, timeout: Duration) -> Request<T> {
        let mut req = Request::new(msg);
        req.set_timeout(timeout);
        if let Some(a) = &self.auth {
            req.metadata_mut().insert(AUTH_HEADER, a.clone());
        }
        req
    }

    async fn unary<M1, M2>(&self, p: &'static str, msg: M1) -> std::result::Result<M2, Status>
    where
        M1: serde::Serialize + Send + Sync + 'static,
        M2: serde::de::DeserializeOwned + Send + Sync + 'static,
    {
        let mut grpc = self.grpc();
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("connection not ready: {e}")))?;
        let resp = grpc
            .unary(
                self.request(msg, self.timeout),
                http::uri::PathAndQuery::from_static(p),
                MsgPackCodec::<M1, M2>::default(),
            )
            .await?;
        Ok(resp.into_inner())
    }

    fn map(&self, s: Status) -> normandy_core::Error {
        map_status(&self.peer, self.tls, self.timeout, s)
    }

    /// A gRPC client on the shared channel, with this crate's reply size limit.
    fn grpc(&self) -> tonic::client::Grpc<Channel> {
        tonic::client::Grpc::new(self.channel.clone()).max_decoding_message_size(MAX_REPLY_BYTES)
    }

    /// The node's health: who it is, whether it serves.
    pub async fn health(&self) -> Result<HealthReply> {
        self.unary(path::HEALTH, HealthRequest {})
            .await
            .map_err(|s| self.map(s))
    }

    /// Raw health call, returning the gRPC status (for tests of the auth check).
    pub async fn health_status(&self) -> std::result::Result<HealthReply, Status> {
        self.unary(path::HEALTH, HealthRequest {}).await
    }

    /// Creates a session from `template` on the cluster (any node can: the store is shared).
    pub async fn start(&self, template: &str, id: Option<SessionId>) -> Result<SessionId> {
        let r: StartReply = self
            .unary(
                path::START,
                StartRequest {
                    template: template.into(),
                    id,
                },
            )
            .await
            .map_err(|s| self.map(s))?;
        Ok(r.id)
    }

    /// Sends an input; the node routes it to the session's owner.
    pub async fn send(
        &self,
        session: &SessionId,
        input_id: InputId,
        content: Vec<ContentBlock>,
    ) -> Result<TurnOutcome> {
        self.send_inner(session, input_id, content, false).await
    }

    pub(crate) async fn send_inner(
        &self,
        session: &SessionId,
        input_id: InputId,
        content: Vec<ContentBlock>,
        forwarded: bool,
    ) -> Result<TurnOutcome> {
        let r: WireOutcome = self
            .unary(
                path::SEND,
                SendRequest {
                    session: session.clone(),
                    input_id,
                    content,
                    forwarded,
                },
            )
            .await
            .map_err(|s| self.map(s))?;
        Ok(r.into())
    }

    /// Committed entries after `after`, at most `limit`.
    pub async fn history(&self, session: &SessionId, after: Seq, limit: u64) -> Result<Vec<Entry>> {
        let r: HistoryReply = self
            .unary(
                path::HISTORY,
                HistoryRequest {
                    session: session.clone(),
                    after,
                    limit,
                },
            )
            .await
            .map_err(|s| self.map(s))?;
        Ok(r.entries)
    }

    /// Closes a session for good.
    pub async fn stop(&self, session: &SessionId) -> Result<()> {
        self.stop_inner(session, false).await
    }

    pub(crate) async fn stop_inner(&self, session: &SessionId, forwarded: bool) -> Result<()> {
        let _: Empty = self
            .unary(
                path::STOP,
                SessionRequest {
                    session: session.clone(),
                    forwarded,
                    turn: None,
                },
            )
            .await
            .map_err(|s| self.map(s))?;
        Ok(())
    }

    /// Cancels a running turn; returns whether one was running.
    pub async fn cancel(&self, session: &SessionId) -> Result<bool> {
        self.cancel_inner(session, None, false).await
    }

    pub(crate) async fn cancel_inner(
        &self,
        session: &SessionId,
        turn: Option<InputId>,
        forwarded: bool,
    ) -> Result<bool> {
        let r: CancelReply = self
            .unary(
                path::CANCEL,
                SessionRequest {
                    session: session.clone(),
                    forwarded,
                    turn,
                },
            )
            .await
            .map_err(|s| self.map(s))?;
        Ok(r.running)
    }

    /// Subscribes to a session's events after `after` (see `Sessions::subscribe`).
    pub async fn subscribe(&self, session: &SessionId, after: Seq) -> Result<EventStream> {
        self.subscribe_inner(session, after, false).await
    }

    pub(crate) async fn subscribe_inner(
        &self,
        session: &SessionId,
        after: Seq,
        forwarded: bool,
    ) -> Result<EventStream> {
        let mut grpc = self.grpc();
        grpc.ready()
            .await
            .map_err(|e| self.map(Status::unavailable(format!("connection not ready: {e}"))))?;
        // No grpc-timeout: a subscription lives as long as the session's actor.
        let mut req = Request::new(SubscribeRequest {
            session: session.clone(),
            after,
            forwarded,
        });
        if let Some(a) = &self.auth {
            req.metadata_mut().insert(AUTH_HEADER, a.clone());
        }
        let resp = grpc
            .server_streaming(
                req,
                http::uri::PathAndQuery::from_static(path::SUBSCRIBE),
                MsgPackCodec::<SubscribeRequest, WireEvent>::default(),
            )
            .await
            .map_err(|s| self.map(s))?;
        let (peer, tls, timeout) = (self.peer.clone(), self.tls, self.timeout);
        Ok(Box::pin(resp.into_inner().map(move |item| match item {
            Ok(ev) => Ok(ev.into_event()),
            Err(s) => Err(map_status(&peer, tls, timeout, s)),
        })))
    }

    /// The baseline call: `payload` there and back, through the same channel, auth and codec.
    pub async fn echo(&self, payload: Vec<u8>) -> Result<Vec<u8>> {
        self.echo_after(payload, Duration::ZERO).await
    }

    /// Like [`echo`](Self::echo), the node answering only after `delay` (whole milliseconds, at
    /// most [`MAX_ECHO_DELAY_MS`](crate::wire::MAX_ECHO_DELAY_MS)).
    pub async fn echo_after(&self, payload: Vec<u8>, delay: Duration) -> Result<Vec<u8>> {
        let delay_ms = u32::try_from(delay.as_millis()).unwrap_or(u32::MAX);
        let r: EchoMessage = self
            .unary(path::ECHO, EchoMessage { payload, delay_ms })
            .await
            .map_err(|s| self.map(s))?;
        Ok(r.payload)
    }

    /// Sends `bytes` as the body of a `Send` call, unchecked: for tests of malformed payloads.
    pub async fn send_raw(&self, bytes: Vec<u8>) -> std::result::Result<(), Status> {
        let mut grpc = self.grpc();
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("connection not ready: {e}")))?;
        let _: Response<WireOutcome> = grpc
            .unary(
                self.request(bytes::Bytes::from(bytes), self.timeout),
                http::uri::PathAndQuery::from_static(path::SEND),
                RawCodec::<WireOutcome>::default(),
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use normandy_core::ErrorKind;

    #[test]
    fn transport_statuses_map_to_what_the_caller_can_do() {
        let t = Duration::from_secs(3);
        let e = map_status("n:1", false, t, Status::cancelled("Timeout expired"));
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        assert!(e.to_string().contains("rpc_timeout"), "{e}");
        let e = map_status("n:1", false, t, Status::out_of_range("message too large"));
        assert!(!e.is_retryable(), "the same call would fail again: {e}");
        let e = map_status("n:1", true, t, Status::cancelled("operation was canceled"));
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(e.to_string().contains("speaks TLS"), "{e}");
        let e = map_status("n:1", false, t, Status::unavailable("tcp connect error"));
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(
            !e.to_string().contains("TLS"),
            "no TLS hint for a refused connection: {e}"
        );
    }

    #[test]
    fn client_timeouts_too_short_are_config_errors() {
        let e = NodeClient::connect_with(
            "127.0.0.1:1",
            None,
            Duration::ZERO,
            Duration::from_secs(5),
            None,
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        let e = NodeClient::connect_with(
            "127.0.0.1:1",
            None,
            Duration::from_secs(1),
            Duration::ZERO,
            None,
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
    }
}
