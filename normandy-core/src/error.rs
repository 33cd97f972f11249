//! The one error type of Normandy.
//!
//! Every backend maps its driver's errors into [`Error`] in one function, so a caller can match on
//! [`Error::kind`] and ask [`Error::is_retryable`] without knowing which store or registry is in use.

use serde::{Deserialize, Serialize};

use crate::model::{Epoch, InputId, NodeId, Seq, SessionId};

/// A `&'static str` field. Spelled through an alias because serde's derive borrows every field
/// it sees written as `&str` from the input, which would make `Error` decodable only from
/// `'static` bytes; these fields are read through `static_str` instead.
pub type StaticStr = &'static str;

/// Result alias used throughout Normandy.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, without the details. Stable for matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An id (session, node, input, template) failed validation.
    InvalidId,
    /// A request was malformed (bad batch, bad argument).
    InvalidInput,
    /// An input exceeded the configured size limit.
    InputTooLarge,
    /// The session does not exist.
    NotFound,
    /// A session with this id already exists.
    AlreadyExists,
    /// A commit carried an epoch that is no longer current: another writer activated the session.
    Fenced,
    /// A commit's expected sequence number did not match the stored one.
    Conflict,
    /// The session id is already registered to another live owner.
    AlreadyRegistered,
    /// The caller is not the registered owner.
    NotOwner,
    /// The session is terminal (closed) and accepts no input.
    SessionClosed,
    /// The session is running a turn and its input mode is `Reject`.
    Busy,
    /// A bounded queue stayed full past its timeout.
    Overloaded,
    /// A deadline passed.
    Timeout,
    /// The turn was cancelled.
    Cancelled,
    /// The turn hit its max-steps guard.
    MaxSteps,
    /// Stored bytes could not be decoded.
    Corrupt,
    /// Stored data was written by a newer (or unknown) format version.
    UnsupportedVersion,
    /// The database lacks a migration this operation needs.
    MissingMigration,
    /// No template (or catalog entry) with this id on this node.
    TemplateNotFound,
    /// A credential could not be resolved, or the provider cannot serve this use.
    Credentials,
    /// The model call failed.
    Model,
    /// A replica acknowledgement requirement was not met; the write must be treated as not durable.
    DurabilityNotMet,
    /// A server could not be reached or the connection broke.
    Unavailable,
    /// Any other backend failure.
    Backend,
    /// Invalid configuration.
    Config,
    /// A bug or an impossible state.
    Internal,
}

/// The error type of every Normandy operation.
///
/// Each variant names the session (where there is one) and what is wrong. Use [`Error::kind`] to
/// match and [`Error::is_retryable`] to decide whether trying again can help.
///
/// Errors cross the wire between nodes with serde (adjacently tagged: `kind` names the variant,
/// `detail` holds its fields), so a caller on another node gets the same variant back. A reader
/// that meets a `kind` it does not know (a newer peer) fails to decode and should report the
/// kind and the peer's message; see the cluster crate's `wire` module.
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "kind", content = "detail")]
#[non_exhaustive]
pub enum Error {
    /// An id failed validation.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidId {
        /// Which kind of id ("session id", "node id", ...).
        #[serde(with = "static_str")]
        what: StaticStr,
        /// The offending value, truncated to 64 characters.
        value: String,
        /// Why it was rejected.
        #[serde(with = "static_str")]
        reason: StaticStr,
    },
    /// A malformed request.
    #[error("invalid input{}: {reason}", for_session(.session))]
    InvalidInput {
        /// The session concerned, if any.
        session: Option<SessionId>,
        /// What is wrong.
        reason: String,
    },
    /// An input larger than the limit.
    #[error("input of {size} bytes for session {session} exceeds the limit of {limit} bytes")]
    InputTooLarge {
        /// The session.
        session: SessionId,
        /// Size of the rejected input.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The session does not exist.
    #[error("session {session} not found")]
    NotFound {
        /// The session.
        session: SessionId,
    },
    /// The session already exists.
    #[error("session {session} already exists")]
    AlreadyExists {
        /// The session.
        session: SessionId,
    },
    /// Stale epoch: another writer owns the session now.
    #[error("session {session}: commit with epoch {epoch} fenced, current epoch is {current}")]
    Fenced {
        /// The session.
        session: SessionId,
        /// The epoch the writer used.
        epoch: Epoch,
        /// The epoch stored.
        current: Epoch,
    },
    /// Sequence mismatch.
    #[error("session {session}: commit expected seq {expected}, stored seq is {actual}")]
    Conflict {
        /// The session.
        session: SessionId,
        /// The seq the writer expected.
        expected: Seq,
        /// The seq stored.
        actual: Seq,
    },
    /// The id is registered to another owner.
    #[error("session {session} is already registered to {owner} (registry epoch {epoch})")]
    AlreadyRegistered {
        /// The session.
        session: SessionId,
        /// Who owns it.
        owner: NodeId,
        /// The registry epoch of that placement.
        epoch: u64,
    },
    /// The caller does not own the session.
    #[error("session {session}: {node} is not its registered owner")]
    NotOwner {
        /// The session.
        session: SessionId,
        /// The would-be owner.
        node: NodeId,
    },
    /// The session is closed.
    #[error("session {session} is closed")]
    SessionClosed {
        /// The session.
        session: SessionId,
    },
    /// A turn is running and the session rejects concurrent input.
    #[error("session {session} is busy running a turn")]
    Busy {
        /// The session.
        session: SessionId,
    },
    /// Backpressure: try again later.
    #[error("session {session} is overloaded: {what}")]
    Overloaded {
        /// The session.
        session: SessionId,
        /// What was full.
        what: String,
    },
    /// A deadline passed.
    #[error("timed out{}: {what}", for_session(.session))]
    Timeout {
        /// The session, if any.
        session: Option<SessionId>,
        /// What timed out.
        what: String,
    },
    /// The turn was cancelled.
    #[error("session {session}: turn cancelled")]
    Cancelled {
        /// The session.
        session: SessionId,
    },
    /// The max-steps guard stopped the turn.
    #[error("session {session}: turn stopped after {limit} model calls (max steps)")]
    MaxSteps {
        /// The session.
        session: SessionId,
        /// The configured limit.
        limit: u32,
    },
    /// Stored bytes are corrupt.
    #[error("corrupt {what}{}: {reason}", for_session(.session))]
    Corrupt {
        /// The session, if known.
        session: Option<SessionId>,
        /// Which blob ("turn state", "entry 12", ...).
        what: String,
        /// Decoder message.
        reason: String,
    },
    /// Unknown format version.
    #[error("{what}{} has format version {found}; this build reads versions up to {supported}", for_session(.session))]
    UnsupportedVersion {
        /// The session, if known.
        session: Option<SessionId>,
        /// Which blob or environment.
        what: String,
        /// The version found.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// The database lacks a migration.
    #[error("database is missing migration {migration}{}: {hint}", refused(.session))]
    MissingMigration {
        /// The session whose call was refused, if the call was for one.
        #[serde(default)]
        session: Option<SessionId>,
        /// The migration's name.
        migration: String,
        /// What to run to fix it.
        hint: String,
    },
    /// No such template on this node.
    #[error("template {template_id:?} is not in this node's catalog")]
    TemplateNotFound {
        /// The template id.
        template_id: String,
    },
    /// Credentials could not be resolved.
    #[error("credentials: {reason}")]
    Credentials {
        /// What is wrong (never the secret itself).
        reason: String,
    },
    /// The model call failed.
    #[error("model call failed: {message}")]
    Model {
        /// The provider's message.
        message: String,
        /// Whether a retry may succeed (rate limit, 5xx).
        retryable: bool,
    },
    /// A model provider refused or failed a call: what its HTTP answer and error body said.
    #[error("{0}")]
    Provider(Box<ProviderError>),
    /// Not enough replicas acknowledged the write.
    #[error("session {session}: durability not met, {acked} of {wanted} replicas acknowledged")]
    DurabilityNotMet {
        /// The session.
        session: SessionId,
        /// Replicas asked for.
        wanted: u32,
        /// Replicas that acknowledged.
        acked: u32,
    },
    /// A server could not be reached.
    #[error("{backend} unavailable: {message}")]
    Unavailable {
        /// Which backend.
        #[serde(with = "static_str")]
        backend: StaticStr,
        /// The driver's message.
        message: String,
    },
    /// Any other backend error.
    #[error("{backend} error: {message}")]
    Backend {
        /// Which backend.
        #[serde(with = "static_str")]
        backend: StaticStr,
        /// The driver's message.
        message: String,
        /// Whether a retry may succeed.
        retryable: bool,
    },
    /// Invalid configuration.
    #[error("configuration error: {0}")]
    Config(String),
    /// A bug.
    #[error("internal error: {0}")]
    Internal(String),
    /// A retryable failure of a `send`, with the id of its input: resend with this same id
    /// (`Input::with_id`) and the input is applied at most once, whatever the first attempt
    /// did. `kind` and `is_retryable` are the wrapped error's.
    #[error("{error} (resend with input id {input_id}: it is applied at most once)")]
    Resend {
        /// The input's id, generated by `send` when the caller gave none.
        input_id: InputId,
        /// What went wrong.
        error: Box<Error>,
    },
}

fn refused(session: &Option<SessionId>) -> String {
    match session {
        Some(s) => format!(", so session {s} was refused"),
        None => String::new(),
    }
}

fn for_session(session: &Option<SessionId>) -> String {
    match session {
        Some(s) => format!(" (session {s})"),
        None => String::new(),
    }
}

/// What a model provider said when it refused or failed a call (carried by
/// [`Error::Provider`]). Never holds a credential: adapters send keys in headers only, and the
/// engine redacts the session's credential values from any error text it logs or stores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderError {
    /// Which adapter: `anthropic`, `openai` (or the name given to an OpenAI-compatible server).
    pub provider: String,
    /// The HTTP status, when the provider answered with one (`None` for a connection error, a
    /// timeout, or an error event inside a stream that had begun with 200).
    pub status: Option<u16>,
    /// The provider's error type (`overloaded_error`, `rate_limit_error`, `invalid_request_error`).
    pub error_type: Option<String>,
    /// The provider's error code (`insufficient_quota`, `context_length_exceeded`).
    pub code: Option<String>,
    /// The provider's request id, for its support.
    pub request_id: Option<String>,
    /// How long the provider asked callers to wait (`retry-after-ms`, else `retry-after`).
    pub retry_after_ms: Option<u64>,
    /// The provider's message (or what went wrong reading its answer).
    pub message: String,
    /// Whether a later retry may succeed (rate limits, overload, 5xx, a cut stream); `false`
    /// for a bad request, a bad key, a quota or billing refusal.
    pub retryable: bool,
}

impl std::fmt::Display for ProviderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "model provider {}", self.provider)?;
        if let Some(status) = self.status {
            write!(f, " answered {status}")?;
        }
        match (&self.error_type, &self.code) {
            (Some(t), Some(c)) => write!(f, " ({t}, {c})")?,
            (Some(x), None) | (None, Some(x)) => write!(f, " ({x})")?,
            (None, None) => {}
        }
        write!(f, ": {}", self.message)?;
        if let Some(id) = &self.request_id {
            write!(f, " [request id {id}]")?;
        }
        if let Some(ms) = self.retry_after_ms {
            write!(f, " [retry after {ms} ms]")?;
        }
        Ok(())
    }
}

impl Error {
    /// The kind of this error, for matching.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidId { .. } => ErrorKind::InvalidId,
            Error::InvalidInput { .. } => ErrorKind::InvalidInput,
            Error::InputTooLarge { .. } => ErrorKind::InputTooLarge,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            Error::Fenced { .. } => ErrorKind::Fenced,
            Error::Conflict { .. } => ErrorKind::Conflict,
            Error::AlreadyRegistered { .. } => ErrorKind::AlreadyRegistered,
            Error::NotOwner { .. } => ErrorKind::NotOwner,
            Error::SessionClosed { .. } => ErrorKind::SessionClosed,
            Error::Busy { .. } => ErrorKind::Busy,
            Error::Overloaded { .. } => ErrorKind::Overloaded,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::Cancelled { .. } => ErrorKind::Cancelled,
            Error::MaxSteps { .. } => ErrorKind::MaxSteps,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::UnsupportedVersion { .. } => ErrorKind::UnsupportedVersion,
            Error::MissingMigration { .. } => ErrorKind::MissingMigration,
            Error::TemplateNotFound { .. } => ErrorKind::TemplateNotFound,
            Error::Credentials { .. } => ErrorKind::Credentials,
            Error::Model { .. } | Error::Provider(_) => ErrorKind::Model,
            Error::DurabilityNotMet { .. } => ErrorKind::DurabilityNotMet,
            Error::Unavailable { .. } => ErrorKind::Unavailable,
            Error::Backend { .. } => ErrorKind::Backend,
            Error::Config(_) => ErrorKind::Config,
            Error::Internal(_) => ErrorKind::Internal,
            Error::Resend { error, .. } => error.kind(),
        }
    }

    /// Whether trying the same operation again can succeed.
    ///
    /// `Conflict` is retryable after re-reading state; `Fenced` is not (another owner has the
    /// session: route to it instead).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Model { retryable, .. } | Error::Backend { retryable, .. } => *retryable,
            Error::Provider(e) => e.retryable,
            Error::Resend { error, .. } => error.is_retryable(),
            Error::Busy { .. }
            | Error::Overloaded { .. }
            | Error::Timeout { .. }
            | Error::Conflict { .. }
            | Error::DurabilityNotMet { .. }
            | Error::Unavailable { .. } => true,
            _ => false,
        }
    }

    /// The id to resend the failed input with, when this is a retryable failure of a `send`.
    pub fn input_id(&self) -> Option<&InputId> {
        match self {
            Error::Resend { input_id, .. } => Some(input_id),
            _ => None,
        }
    }

    /// The error itself, without the [`Error::Resend`] wrapper (for matching on variants).
    pub fn inner(&self) -> &Error {
        match self {
            Error::Resend { error, .. } => error.inner(),
            other => other,
        }
    }

    /// Wraps a retryable error of the send of `input_id` so that the caller learns the id to
    /// resend with; any other error is returned as it is.
    pub fn for_input(self, input_id: &InputId) -> Self {
        if self.is_retryable() && self.input_id().is_none() {
            Error::Resend {
                input_id: input_id.clone(),
                error: Box::new(self),
            }
        } else {
            self
        }
    }

    /// Names `session` in an error that concerns it but was made without it (a backend's
    /// schema error, say); errors that name a session already, or have no slot for one, are
    /// returned as they are.
    pub fn in_session(mut self, session: &SessionId) -> Self {
        if let Error::MissingMigration {
            session: s @ None, ..
        }
        | Error::InvalidInput {
            session: s @ None, ..
        }
        | Error::Timeout {
            session: s @ None, ..
        }
        | Error::Corrupt {
            session: s @ None, ..
        }
        | Error::UnsupportedVersion {
            session: s @ None, ..
        } = &mut self
        {
            *s = Some(session.clone());
        }
        self
    }

    /// Shorthand for an [`Error::InvalidInput`].
    pub fn invalid_input(session: Option<&SessionId>, reason: impl Into<String>) -> Self {
        Error::InvalidInput {
            session: session.cloned(),
            reason: reason.into(),
        }
    }

    /// Shorthand for an [`Error::Corrupt`].
    pub fn corrupt(
        session: Option<&SessionId>,
        what: impl Into<String>,
        reason: impl ToString,
    ) -> Self {
        Error::Corrupt {
            session: session.cloned(),
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}

/// Serde for the `&'static str` fields (`backend`, an id's `what` and `reason`): written as
/// strings; read back as the same static string.
///
/// Reading one back needs a `'static` string: names this build knows (every backend and id
/// kind in the workspace) map to themselves; a name from another build (a peer running other
/// backends) is interned once, leaked on purpose, up to [`MAX_INTERNED`](static_str::MAX_INTERNED)
/// distinct names per process, past which it reads as `"remote"`. The bound keeps a peer that
/// sends ever-new names from growing this process's memory without end.
mod static_str {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};

    use serde::{Deserialize, Deserializer, Serializer};

    /// Distinct unknown names interned per process.
    pub(super) const MAX_INTERNED: usize = 64;

    /// Names this workspace uses (id kinds, id rejection reasons in `model.rs`, each crate's
    /// backend name), so the common case leaks nothing.
    const KNOWN: &[&str] = &[
        "session id",
        "input id",
        "node id",
        "must not be empty",
        "longer than 200 bytes",
        "must be printable with no whitespace",
        "contains a reserved character",
        "contains an invisible or text-direction character",
        "incarnation after '#' must be a number",
        "redis store",
        "redis registry",
        "postgres",
        "lmdb",
        "session actor",
        "node",
        "cluster node",
        "cluster routing",
        "cluster peer",
        "remote",
    ];

    pub(super) fn serialize<S: Serializer>(v: &&'static str, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
        let s = String::deserialize(d)?;
        Ok(intern(&s))
    }

    pub(super) fn intern(s: &str) -> &'static str {
        if let Some(k) = KNOWN.iter().find(|k| **k == s) {
            return k;
        }
        static TABLE: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
        let mut table = TABLE
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(k) = table.get(s) {
            return k;
        }
        if table.len() >= MAX_INTERNED {
            return "remote";
        }
        let leaked: &'static str = Box::leak(s.to_owned().into_boxed_str());
        table.insert(leaked);
        leaked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One error of every variant; the match in `variant_index` makes adding a variant without
    /// adding it here a compile error.
    fn one_of_each() -> Vec<Error> {
        let s = SessionId::new("s-1").unwrap();
        let n = NodeId::new("node-b", 7).unwrap();
        vec![
            Error::InvalidId {
                what: "session id",
                value: "bad id".into(),
                reason: "contains whitespace",
            },
            Error::invalid_input(Some(&s), "empty batch"),
            Error::InputTooLarge {
                session: s.clone(),
                size: 2_000_000,
                limit: 1_048_576,
            },
            Error::NotFound { session: s.clone() },
            Error::AlreadyExists { session: s.clone() },
            Error::Fenced {
                session: s.clone(),
                epoch: 3,
                current: 4,
            },
            Error::Conflict {
                session: s.clone(),
                expected: 5,
                actual: 6,
            },
            Error::AlreadyRegistered {
                session: s.clone(),
                owner: n.clone(),
                epoch: 9,
            },
            Error::NotOwner {
                session: s.clone(),
                node: n.clone(),
            },
            Error::SessionClosed { session: s.clone() },
            Error::Busy { session: s.clone() },
            Error::Overloaded {
                session: s.clone(),
                what: "mailbox full for 5s".into(),
            },
            Error::Timeout {
                session: None,
                what: "turn deadline".into(),
            },
            Error::Cancelled { session: s.clone() },
            Error::MaxSteps {
                session: s.clone(),
                limit: 16,
            },
            Error::corrupt(Some(&s), "entry 12", "bad marker"),
            Error::UnsupportedVersion {
                session: Some(s.clone()),
                what: "turn state".into(),
                found: 9,
                supported: 1,
            },
            Error::MissingMigration {
                session: Some(s.clone()),
                migration: "0002_template".into(),
                hint: "run `cargo xtask migrate up`".into(),
            },
            Error::TemplateNotFound {
                template_id: "support".into(),
            },
            Error::Credentials {
                reason: "OPENAI_KEY is not set".into(),
            },
            Error::Model {
                message: "429 rate limited".into(),
                retryable: true,
            },
            Error::Provider(Box::new(ProviderError {
                provider: "anthropic".into(),
                status: Some(529),
                error_type: Some("overloaded_error".into()),
                code: None,
                request_id: Some("req_011".into()),
                retry_after_ms: Some(2_000),
                message: "Overloaded".into(),
                retryable: true,
            })),
            Error::DurabilityNotMet {
                session: s.clone(),
                wanted: 1,
                acked: 0,
            },
            Error::Unavailable {
                backend: "redis store",
                message: "connection refused".into(),
            },
            Error::Backend {
                backend: "a backend this build has never heard of",
                message: "boom".into(),
                retryable: false,
            },
            Error::Config("bad TTL".into()),
            Error::Internal("impossible".into()),
            Error::Unavailable {
                backend: "node",
                message: "not serving".into(),
            }
            .for_input(&InputId::new("in-7").unwrap()),
        ]
    }

    fn variant_index(e: &Error) -> usize {
        match e {
            Error::InvalidId { .. } => 0,
            Error::InvalidInput { .. } => 1,
            Error::InputTooLarge { .. } => 2,
            Error::NotFound { .. } => 3,
            Error::AlreadyExists { .. } => 4,
            Error::Fenced { .. } => 5,
            Error::Conflict { .. } => 6,
            Error::AlreadyRegistered { .. } => 7,
            Error::NotOwner { .. } => 8,
            Error::SessionClosed { .. } => 9,
            Error::Busy { .. } => 10,
            Error::Overloaded { .. } => 11,
            Error::Timeout { .. } => 12,
            Error::Cancelled { .. } => 13,
            Error::MaxSteps { .. } => 14,
            Error::Corrupt { .. } => 15,
            Error::UnsupportedVersion { .. } => 16,
            Error::MissingMigration { .. } => 17,
            Error::TemplateNotFound { .. } => 18,
            Error::Credentials { .. } => 19,
            Error::Model { .. } => 20,
            Error::DurabilityNotMet { .. } => 21,
            Error::Unavailable { .. } => 22,
            Error::Backend { .. } => 23,
            Error::Config(_) => 24,
            Error::Internal(_) => 25,
            Error::Resend { .. } => 26,
            Error::Provider(_) => 27,
        }
    }

    #[test]
    fn every_variant_round_trips_through_messagepack() {
        let all = one_of_each();
        let mut seen: Vec<usize> = all.iter().map(variant_index).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(
            seen,
            (0..28).collect::<Vec<_>>(),
            "one_of_each misses a variant"
        );
        for e in all {
            let bytes = rmp_serde::to_vec_named(&e).unwrap();
            let back: Error = rmp_serde::from_slice(&bytes)
                .unwrap_or_else(|err| panic!("{e} did not decode: {err}"));
            assert_eq!(back.kind(), e.kind());
            assert_eq!(back.to_string(), e.to_string());
            assert_eq!(back.is_retryable(), e.is_retryable(), "{e}");
            assert_eq!(format!("{back:?}"), format!("{e:?}"));
        }
    }

    #[test]
    fn unknown_static_names_are_interned_within_a_bound() {
        let first = static_str::intern("a peer's own backend");
        let again = static_str::intern("a peer's own backend");
        assert!(std::ptr::eq(first, again), "interned twice");
        assert_eq!(static_str::intern("redis store"), "redis store");
        for i in 0..static_str::MAX_INTERNED * 2 {
            let name = format!("backend {i}");
            let got = static_str::intern(&name);
            assert!(got == name || got == "remote", "{got}");
        }
        assert_eq!(static_str::intern("yet another backend"), "remote");
    }
}
