//! What travels between nodes: the RPC messages, their MessagePack codec for tonic, and the one
//! function pair that maps [`Error`] to a gRPC [`Status`] and back.
//!
//! No `protoc` at build time: messages are serde structs encoded with `rmp-serde` (named fields,
//! so a field added later is ignored by an older node rather than misread) through a hand-written
//! [`tonic::codec::Codec`].

use std::marker::PhantomData;

use bytes::{Buf, BufMut};
use normandy_core::{
    ContentBlock, Entry, Error, ErrorKind, InputId, Message, NodeId, Seq, SessionId, TurnEvent,
    TurnOutcome, TurnStatus, Usage,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

/// The gRPC service name.
pub(crate) const SERVICE: &str = "normandy.cluster.v1.Node";

/// Method paths.
pub(crate) mod path {
    pub(crate) const HEALTH: &str = "/normandy.cluster.v1.Node/Health";
    pub(crate) const START: &str = "/normandy.cluster.v1.Node/Start";
    pub(crate) const SEND: &str = "/normandy.cluster.v1.Node/Send";
    pub(crate) const HISTORY: &str = "/normandy.cluster.v1.Node/History";
    pub(crate) const SUBSCRIBE: &str = "/normandy.cluster.v1.Node/Subscribe";
    pub(crate) const STOP: &str = "/normandy.cluster.v1.Node/Stop";
    pub(crate) const CANCEL: &str = "/normandy.cluster.v1.Node/Cancel";
    pub(crate) const ECHO: &str = "/normandy.cluster.v1.Node/Echo";
}

/// `Health` request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HealthRequest {}

/// `Health` reply: who answered and whether it serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthReply {
    /// The node that answered.
    pub node: NodeId,
    /// Whether it serves requests (lease valid, not draining).
    pub serving: bool,
    /// Sessions live on it.
    pub live: u64,
    /// Nodes it currently sees as members (itself included).
    pub members: Vec<NodeId>,
    /// Sessions its reaper resumed.
    pub reaped: u64,
    /// Times it stopped serving because its lease was in doubt.
    pub lease_losses: u64,
}

/// `Start` request: create a session from a template.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartRequest {
    /// The template id.
    pub template: String,
    /// The session id (generated when absent).
    pub id: Option<SessionId>,
}

/// `Start` reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartReply {
    /// The new session.
    pub id: SessionId,
}

/// `Send` request: one input for one session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendRequest {
    /// The session.
    pub session: SessionId,
    /// The input's id (always set: retries across nodes must stay idempotent).
    pub input_id: InputId,
    /// The input.
    pub content: Vec<ContentBlock>,
    /// Set by a node forwarding to the owner it looked up: the receiver serves locally or
    /// answers with where the session is, and never forwards again (no routing loops).
    pub forwarded: bool,
}

/// A session-addressed request (`Stop`, `Cancel`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRequest {
    /// The session.
    pub session: SessionId,
    /// See [`SendRequest::forwarded`].
    pub forwarded: bool,
    /// `Cancel`: only this input's turn (absent from older callers: whatever turn runs).
    #[serde(default)]
    pub turn: Option<InputId>,
}

/// `Cancel` reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CancelReply {
    /// Whether a turn was running.
    pub running: bool,
}

/// An empty reply.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Empty {}

/// `History` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryRequest {
    /// The session.
    pub session: SessionId,
    /// Entries with seq greater than this.
    pub after: Seq,
    /// At most this many.
    pub limit: u64,
}

/// `History` reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryReply {
    /// The entries, in seq order.
    pub entries: Vec<Entry>,
}

/// `Subscribe` request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubscribeRequest {
    /// The session.
    pub session: SessionId,
    /// Committed entries after this seq are replayed first.
    pub after: Seq,
    /// See [`SendRequest::forwarded`].
    pub forwarded: bool,
}

/// `Echo` (the benchmark's baseline: same channel, same codec, no session work).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EchoMessage {
    /// Opaque payload, returned as is.
    #[serde(with = "serde_bytes_compat")]
    pub payload: Vec<u8>,
    /// The node answers only after this many milliseconds (at most [`MAX_ECHO_DELAY_MS`]): a
    /// baseline that waits as long as a turn does, but does no work meanwhile.
    #[serde(default)]
    pub delay_ms: u32,
}

/// The longest [`EchoMessage::delay_ms`] a node honours.
pub const MAX_ECHO_DELAY_MS: u32 = 1000;

/// A turn's outcome on the wire (mirrors [`TurnOutcome`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireOutcome {
    session: SessionId,
    input_id: InputId,
    status: TurnStatus,
    message: Option<Message>,
    usage: Usage,
    end_seq: Seq,
}

impl From<TurnOutcome> for WireOutcome {
    fn from(o: TurnOutcome) -> Self {
        Self {
            session: o.session,
            input_id: o.input_id,
            status: o.status,
            message: o.message,
            usage: o.usage,
            end_seq: o.end_seq,
        }
    }
}

impl From<WireOutcome> for TurnOutcome {
    fn from(o: WireOutcome) -> Self {
        TurnOutcome {
            session: o.session,
            input_id: o.input_id,
            status: o.status,
            message: o.message,
            usage: o.usage,
            end_seq: o.end_seq,
        }
    }
}

/// A turn event on the wire (mirrors [`TurnEvent`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum WireEvent {
    /// A committed entry.
    Entry(Entry),
    /// A model call started.
    ModelCallStarted {
        /// Model calls in this turn so far.
        step: u32,
    },
    /// A tool call started.
    ToolCallStarted {
        /// The call id.
        call_id: String,
        /// The tool.
        tool: String,
    },
    /// A turn ended.
    TurnFinished(WireOutcome),
    /// A piece of a streaming model answer (last, so older readers fail only on it).
    ModelDelta {
        /// The turn's input.
        turn: InputId,
        /// The model call of the turn.
        step: u32,
        /// Which try of the call.
        attempt: normandy_core::Attempt,
        /// The piece.
        delta: normandy_core::ModelDelta,
    },
}

impl WireEvent {
    /// The wire form of `ev`; `None` for an event kind this build does not know how to send.
    pub(crate) fn from_event(ev: TurnEvent) -> Option<Self> {
        Some(match ev {
            TurnEvent::Entry(e) => WireEvent::Entry((*e).clone()),
            TurnEvent::ModelCallStarted { step } => WireEvent::ModelCallStarted { step },
            TurnEvent::ToolCallStarted { call_id, tool } => {
                WireEvent::ToolCallStarted { call_id, tool }
            }
            TurnEvent::TurnFinished(o) => WireEvent::TurnFinished(o.into()),
            TurnEvent::ModelDelta {
                turn,
                step,
                attempt,
                delta,
            } => WireEvent::ModelDelta {
                turn,
                step,
                attempt,
                delta,
            },
            _ => return None,
        })
    }

    /// Back to the core's event.
    pub(crate) fn into_event(self) -> TurnEvent {
        match self {
            WireEvent::Entry(e) => TurnEvent::Entry(std::sync::Arc::new(e)),
            WireEvent::ModelCallStarted { step } => TurnEvent::ModelCallStarted { step },
            WireEvent::ToolCallStarted { call_id, tool } => {
                TurnEvent::ToolCallStarted { call_id, tool }
            }
            WireEvent::TurnFinished(o) => TurnEvent::TurnFinished(o.into()),
            WireEvent::ModelDelta {
                turn,
                step,
                attempt,
                delta,
            } => TurnEvent::ModelDelta {
                turn,
                step,
                attempt,
                delta,
            },
        }
    }
}

/// `Vec<u8>` as a MessagePack bin (not an array of ints), without the `serde_bytes` crate.
mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// A tonic codec that encodes `E` and decodes `D` as MessagePack.
#[derive(Debug)]
pub struct MsgPackCodec<E, D>(PhantomData<fn(E) -> D>);

impl<E, D> Default for MsgPackCodec<E, D> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<E, D> Codec for MsgPackCodec<E, D>
where
    E: Serialize + Send + 'static,
    D: DeserializeOwned + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = MsgPackEncoder<E>;
    type Decoder = MsgPackDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        MsgPackEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        MsgPackDecoder(PhantomData)
    }
}

/// Encoder half of [`MsgPackCodec`].
#[derive(Debug)]
pub struct MsgPackEncoder<E>(PhantomData<fn(E)>);

impl<E: Serialize> Encoder for MsgPackEncoder<E> {
    type Item = E;
    type Error = Status;

    fn encode(&mut self, item: E, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        let mut w = dst.writer();
        rmp_serde::encode::write_named(&mut w, &item)
            .map_err(|e| Status::internal(format!("could not encode message: {e}")))
    }
}

/// Decoder half of [`MsgPackCodec`].
#[derive(Debug)]
pub struct MsgPackDecoder<D>(PhantomData<fn() -> D>);

impl<D: DeserializeOwned> Decoder for MsgPackDecoder<D> {
    type Item = D;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        rmp_serde::from_slice(&bytes).map(Some).map_err(|e| {
            Status::invalid_argument(format!(
                "malformed {} payload ({} bytes): {e}",
                std::any::type_name::<D>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("message"),
                bytes.len()
            ))
        })
    }
}

/// A codec that sends raw bytes: for tests that put a malformed payload on the wire.
#[derive(Debug)]
pub struct RawCodec<D>(PhantomData<fn() -> D>);

impl<D> Default for RawCodec<D> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<D: DeserializeOwned + Send + 'static> Codec for RawCodec<D> {
    type Encode = bytes::Bytes;
    type Decode = D;
    type Encoder = RawEncoder;
    type Decoder = MsgPackDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        MsgPackDecoder(PhantomData)
    }
}

/// Encoder half of [`RawCodec`].
#[derive(Debug)]
pub struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = bytes::Bytes;
    type Error = Status;

    fn encode(&mut self, item: bytes::Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

/// Maps an [`Error`] to a [`Status`]: the code says what a plain gRPC client can do, and the
/// details carry the error itself (serde, MessagePack) so that [`from_status`] rebuilds the same
/// variant on the caller's side.
pub(crate) fn to_status(e: &Error) -> Status {
    let code = match e.kind() {
        ErrorKind::InvalidId | ErrorKind::InvalidInput | ErrorKind::InputTooLarge => {
            Code::InvalidArgument
        }
        ErrorKind::NotFound | ErrorKind::TemplateNotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::Fenced | ErrorKind::AlreadyRegistered | ErrorKind::NotOwner => Code::Aborted,
        ErrorKind::Conflict | ErrorKind::Busy => Code::Aborted,
        ErrorKind::SessionClosed => Code::FailedPrecondition,
        ErrorKind::Overloaded => Code::ResourceExhausted,
        ErrorKind::Timeout => Code::DeadlineExceeded,
        ErrorKind::Cancelled => Code::Cancelled,
        ErrorKind::Unavailable | ErrorKind::DurabilityNotMet => Code::Unavailable,
        ErrorKind::Config | ErrorKind::Credentials | ErrorKind::MissingMigration => {
            Code::FailedPrecondition
        }
        _ => Code::Internal,
    };
    // Encoding an owned enum of strings and integers cannot fail; should it ever, the caller
    // still gets the code and the message, read as a peer error below.
    let details = rmp_serde::to_vec_named(e).unwrap_or_default();
    Status::with_details(code, e.to_string(), details.into())
}

/// What [`from_status`] can still read of details it cannot decode: the `kind` tag, which both
/// today's encoding and the hand-mapped one of earlier releases put first.
#[derive(Deserialize)]
struct KindOnly {
    kind: String,
}

/// Rebuilds the [`Error`] behind a [`Status`] from a peer (`peer` names it in messages).
///
/// - Details this build decodes are the peer's error, unchanged.
/// - Details it cannot decode come from a peer of another version (a newer error kind, or the
///   hand mapping of earlier releases): a `Backend` error naming the peer, the kind and the
///   peer's message, retryable only when the status code says the call can be made again.
/// - A status without details comes from the transport or an interceptor: `Unavailable`
///   (retryable: the route is stale or the peer is gone), or, for refusals, a typed error.
pub(crate) fn from_status(peer: &str, status: &Status) -> Error {
    if status.details().is_empty() {
        return match status.code() {
            Code::Unauthenticated | Code::PermissionDenied => Error::Config(format!(
                "node {peer} refused the call ({}): is the cluster secret the same on every node?",
                status.message()
            )),
            Code::InvalidArgument => Error::invalid_input(None, status.message().to_string()),
            Code::DeadlineExceeded => Error::Timeout {
                session: None,
                what: format!("call to node {peer}: {}", status.message()),
            },
            Code::Unimplemented => Error::Config(format!(
                "node {peer} does not serve this call ({}): mixed versions?",
                status.message()
            )),
            _ => Error::Unavailable {
                backend: "cluster peer",
                message: format!("node {peer}: {:?}: {}", status.code(), status.message()),
            },
        };
    }
    if let Ok(e) = rmp_serde::from_slice::<Error>(status.details()) {
        return e;
    }
    let kind = rmp_serde::from_slice::<KindOnly>(status.details())
        .map(|k| k.kind)
        .unwrap_or_else(|_| "unreadable".into());
    Error::Backend {
        backend: "cluster peer",
        message: format!(
            "node {peer} answered with an error of kind {kind:?} that this node cannot read \
             (is it running another version?): {}",
            status.message()
        ),
        retryable: matches!(
            status.code(),
            Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded | Code::Aborted
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_survive_the_wire() {
        let s = SessionId::new("s-1").unwrap();
        let owner = NodeId::new("b", 7).unwrap();
        let cases = vec![
            Error::Fenced {
                session: s.clone(),
                epoch: 3,
                current: 4,
            },
            Error::AlreadyRegistered {
                session: s.clone(),
                owner: owner.clone(),
                epoch: 9,
            },
            Error::NotFound { session: s.clone() },
            Error::Overloaded {
                session: s.clone(),
                what: "mailbox".into(),
            },
        ];
        for e in cases {
            let back = from_status("peer", &to_status(&e));
            assert_eq!(back.kind(), e.kind(), "{e} came back as {back}");
            assert_eq!(back.to_string(), e.to_string());
        }
    }

    #[test]
    fn an_error_kind_this_build_does_not_know_reads_as_a_peer_error_naming_it() {
        // What a newer peer sends for a variant added after this build.
        #[derive(Serialize)]
        struct Newer {
            kind: &'static str,
            detail: (u32,),
        }
        let details = rmp_serde::to_vec_named(&Newer {
            kind: "QuotaExceeded",
            detail: (3,),
        })
        .unwrap();
        let status = Status::with_details(Code::Unavailable, "quota exceeded", details.into());
        let e = from_status("b:7100", &status);
        assert_eq!(e.kind(), ErrorKind::Backend);
        let text = e.to_string();
        assert!(
            text.contains("b:7100") && text.contains("QuotaExceeded"),
            "{text}"
        );
        assert!(text.contains("quota exceeded"), "{text}");
        assert!(e.is_retryable(), "an Unavailable status may be retried");
    }

    #[test]
    fn an_error_from_a_peer_of_the_previous_release_names_its_kind() {
        // The hand-mapped shape earlier releases sent: the kind as its `Debug` string.
        #[derive(Serialize)]
        struct Previous {
            kind: &'static str,
            message: &'static str,
            a: u64,
        }
        let details = rmp_serde::to_vec_named(&Previous {
            kind: "Fenced",
            message: "fenced",
            a: 3,
        })
        .unwrap();
        let status = Status::with_details(Code::Aborted, "session s fenced", details.into());
        let e = from_status("old-peer", &status);
        let text = e.to_string();
        assert!(
            text.contains("\"Fenced\"") && text.contains("old-peer"),
            "{text}"
        );
    }

    #[test]
    fn transport_failures_are_retryable_unavailable() {
        let e = from_status("peer", &Status::unavailable("connection refused"));
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.is_retryable());
        let e = from_status("peer", &Status::unauthenticated("no"));
        assert_eq!(e.kind(), ErrorKind::Config);
    }
}
