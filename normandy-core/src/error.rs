//! The one error type of Normandy.
//!
//! Every backend maps its driver's errors into [`Error`] in one function, so a caller can match on
//! [`Error::kind`] and ask [`Error::is_retryable`] without knowing which store or registry is in use.

use crate::model::{Epoch, NodeId, Seq, SessionId};

/// Result alias used throughout Normandy.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, without the details. Stable for matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An id failed validation.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidId {
        /// Which kind of id ("session id", "node id", ...).
        what: &'static str,
        /// The offending value, truncated to 64 characters.
        value: String,
        /// Why it was rejected.
        reason: &'static str,
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
    #[error("database is missing migration {migration}: {hint}")]
    MissingMigration {
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
        backend: &'static str,
        /// The driver's message.
        message: String,
    },
    /// Any other backend error.
    #[error("{backend} error: {message}")]
    Backend {
        /// Which backend.
        backend: &'static str,
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
}

fn for_session(session: &Option<SessionId>) -> String {
    match session {
        Some(s) => format!(" (session {s})"),
        None => String::new(),
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
            Error::Model { .. } => ErrorKind::Model,
            Error::DurabilityNotMet { .. } => ErrorKind::DurabilityNotMet,
            Error::Unavailable { .. } => ErrorKind::Unavailable,
            Error::Backend { .. } => ErrorKind::Backend,
            Error::Config(_) => ErrorKind::Config,
            Error::Internal(_) => ErrorKind::Internal,
        }
    }

    /// Whether trying the same operation again can succeed.
    ///
    /// `Conflict` is retryable after re-reading state; `Fenced` is not (another owner has the
    /// session: route to it instead).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Model { retryable, .. } | Error::Backend { retryable, .. } => *retryable,
            Error::Busy { .. }
            | Error::Overloaded { .. }
            | Error::Timeout { .. }
            | Error::Conflict { .. }
            | Error::DurabilityNotMet { .. }
            | Error::Unavailable { .. } => true,
            _ => false,
        }
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
