//! The turn engine: [`TurnState`] (what is stored about a turn in flight), the events and outcomes
//! callers see, and the per-session actor that runs turns.
//!
//! # Layout
//! - this file: the stored turn state, outcomes and events — the engine's words.
//! - `actor`: the actor loop — mailbox, commands, idle passivation, exit.
//! - `input`: accepting an input — validation, limits, idempotent resubmission, input modes.
//! - `turn`: the steps of a turn — model and tool calls, hooks, boundary commits, cancellation,
//!   deadline, max steps.
//! - `stream`: one try of a model call as a stream — deltas to subscribers, the streamed text
//!   kept, the wait before the next try.
//! - `view`: reading committed entries and folding them into the in-memory [`Conversation`] and
//!   input indexes.
//!
//! # States
//! `Idle → CallingModel → (RunningTools → CallingModel)* → Idle`; a closed session is terminal
//! (kept in the store's status). Every transition is committed with the entries it produced:
//! input accepted; model response received; each tool result recorded; turn finished.

mod actor;
mod commit;
mod input;
mod stream;
mod turn;
mod view;

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::llm::ModelDelta;
use crate::model::{Entry, Epoch, InputId, Message, Seq, SessionId, TurnStatus, Usage};

pub(crate) use actor::{Actor, ActorHandle, ActorParams, Command, Exit, Exited, InputRequest};
pub(crate) use input::{check_input, input_size};
pub use view::Conversation;
pub(crate) use view::{read_entries, stored_outcome};

/// Where a session's turn stood at its last committed boundary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TurnState {
    /// The phase of the current turn.
    pub phase: Phase,
    /// The turn in flight, if any.
    pub turn: Option<ActiveTurn>,
    /// Inputs accepted during a turn, waiting their turn (oldest first).
    #[serde(default)]
    pub queued: VecDeque<QueuedInput>,
    /// An input in `Interrupt` mode asked the running turn to stop at its next boundary.
    #[serde(default)]
    pub cancel_requested: bool,
}

impl TurnState {
    /// Whether there is a turn in flight or input waiting: what a resume must continue.
    pub fn has_work(&self) -> bool {
        self.turn.is_some() || !self.queued.is_empty()
    }
}

/// The phase of a turn.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// No turn running.
    #[default]
    Idle,
    /// A model call is due (or was in flight: on resume it is re-issued).
    CallingModel,
    /// The model asked for these tool calls; those listed have no recorded result yet.
    RunningTools {
        /// Calls still without a result, in order.
        calls: Vec<PendingCall>,
    },
}

/// A tool call the model asked for whose result is not recorded yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingCall {
    /// The model's call id: what the result answers, not unique and not the idempotency key
    /// (see [the rules](crate::tools#call-ids-and-idempotency-keys)).
    pub id: String,
    /// The tool's name.
    pub name: String,
    /// The tool's input.
    pub input: serde_json::Value,
    /// Whether a start was committed for this non-idempotent call (so, on resume, it is in doubt).
    #[serde(default)]
    pub started: bool,
    /// The idempotency key handed to the tool, `{session}:{answer_seq}:{index}`, fixed when the
    /// model's response is committed (see [the rules](crate::tools#call-ids-and-idempotency-keys)).
    /// Empty in turn states written before keys existed: such a call gets the legacy key.
    #[serde(default)]
    pub key: String,
}

impl PendingCall {
    /// The key handed to the tool: `key`, or the legacy key when the turn predates keys.
    pub(crate) fn idempotency_key(&self, session: &SessionId) -> String {
        if self.key.is_empty() {
            crate::tools::legacy_idempotency_key(session, &self.id)
        } else {
            self.key.clone()
        }
    }
}

/// The turn in flight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActiveTurn {
    /// The input that started it.
    pub input_id: InputId,
    /// Seq of that input's entry.
    pub input_seq: Seq,
    /// Model calls made so far.
    pub steps: u32,
    /// Usage so far.
    pub usage: Usage,
    /// Wall-clock start, ms since the Unix epoch (for people; the deadline counts `ran_ms`).
    pub started_at_ms: u64,
    /// How long the turn had run at its last commit, in ms, as the monotonic clocks of the
    /// nodes that ran it measured it. The turn deadline counts this, not wall clocks: after a
    /// move, the new owner's clock may be minutes off the old one's, which would cut the turn
    /// short or stretch it. Time while no node ran the turn (between a crash and the resume)
    /// is not counted. Absent in states written before it existed; the deadline then falls
    /// back to the wall clock's elapsed time, at most the whole deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ran_ms: Option<u64>,
    /// Seq of the latest assistant entry of this turn.
    #[serde(default)]
    pub answer_seq: Option<Seq>,
}

/// An input accepted during another turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueuedInput {
    /// Its id.
    pub input_id: InputId,
    /// Seq of its `Input` entry.
    pub seq: Seq,
}

/// How a turn ended, as returned to callers.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnOutcome {
    /// The session.
    pub session: SessionId,
    /// The input that started the turn.
    pub input_id: InputId,
    /// How it ended.
    pub status: TurnStatus,
    /// The final assistant message, when the model gave one.
    pub message: Option<Message>,
    /// Total usage of the turn.
    pub usage: Usage,
    /// Seq of the turn's `TurnEnd` entry.
    pub end_seq: Seq,
}

impl TurnOutcome {
    /// The final answer's text (empty if none).
    pub fn text(&self) -> String {
        self.message.as_ref().map(Message::text).unwrap_or_default()
    }

    /// `Ok(self)` for a completed turn, else the error its status stands for.
    pub fn into_result(self) -> Result<Self> {
        let session = self.session.clone();
        match &self.status {
            TurnStatus::Completed => Ok(self),
            TurnStatus::Cancelled => Err(Error::Cancelled { session }),
            TurnStatus::TimedOut => Err(Error::Timeout {
                session: Some(session),
                what: "turn deadline".into(),
            }),
            TurnStatus::MaxSteps { limit } => Err(Error::MaxSteps {
                session,
                limit: *limit,
            }),
            TurnStatus::Failed { message } => Err(Error::Model {
                message: format!("session {session}: {message}"),
                retryable: false,
            }),
        }
    }
}

/// Progress of a session, for callers who subscribe.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum TurnEvent {
    /// An entry was committed (replayed ones first, then live ones, in seq order).
    Entry(Arc<Entry>),
    /// A model call started (not stored).
    ModelCallStarted {
        /// Model calls in this turn so far, this one included.
        step: u32,
    },
    /// A piece of the model's answer as it streams (not stored: the committed
    /// [`Assistant`](crate::model::EntryPayload::Assistant) entry is the whole answer).
    ///
    /// A call may be made more than once — retried after an error, or re-issued by the node that
    /// resumed the session after a crash — and each try streams from the start. Keep the deltas
    /// of one `(turn, step)` under their `attempt`, and drop them when a delta of that turn and
    /// step arrives with another attempt.
    ModelDelta {
        /// The input whose turn is running.
        turn: InputId,
        /// The model call of the turn, as in `ModelCallStarted`.
        step: u32,
        /// Which try of the call.
        attempt: Attempt,
        /// The piece.
        delta: ModelDelta,
    },
    /// A tool call started (not stored).
    ToolCallStarted {
        /// The call id.
        call_id: String,
        /// The tool's name.
        tool: String,
    },
    /// A turn ended.
    TurnFinished(TurnOutcome),
}

/// Which try of a model call a [`TurnEvent::ModelDelta`] belongs to: unique per call, across
/// retries and across the nodes that resumed the session (each activation has its own epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attempt {
    /// The epoch of the activation that made the try.
    pub epoch: Epoch,
    /// The try's number within that activation (1 first).
    pub number: u32,
}

impl TurnEvent {
    /// The seq of a committed-entry event.
    pub fn seq(&self) -> Option<Seq> {
        match self {
            TurnEvent::Entry(e) => Some(e.seq),
            _ => None,
        }
    }
}
