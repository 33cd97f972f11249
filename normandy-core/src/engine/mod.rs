//! The turn engine: [`TurnState`] (what is stored about a turn in flight), the events and outcomes
//! callers see, and the per-session actor that runs turns.
//!
//! # States
//! `Idle → CallingModel → (RunningTools → CallingModel)* → Idle`; a closed session is terminal
//! (kept in the store's status). Every transition is committed with the entries it produced:
//! input accepted; model response received; each tool result recorded; turn finished.

mod actor;

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{
    ContentBlock, Entry, EntryPayload, InputId, Message, Role, Seq, SessionId, TurnStatus, Usage,
};

pub(crate) use actor::{
    ActorHandle, ActorParams, Command, InputRequest, read_entries, spawn_actor,
};

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
    /// The call id (idempotency key).
    pub id: String,
    /// The tool's name.
    pub name: String,
    /// The tool's input.
    pub input: serde_json::Value,
    /// Whether a start was committed for this non-idempotent call (so, on resume, it is in doubt).
    #[serde(default)]
    pub started: bool,
    /// The idempotency key handed to the tool: unique within the session, stable across resumes.
    #[serde(default)]
    pub key: String,
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
    /// Wall-clock start, ms since the Unix epoch (the turn deadline counts from it).
    pub started_at_ms: u64,
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

impl TurnEvent {
    /// The seq of a committed-entry event.
    pub fn seq(&self) -> Option<Seq> {
        match self {
            TurnEvent::Entry(e) => Some(e.seq),
            _ => None,
        }
    }
}

/// Builds the model's view of the conversation incrementally, one committed entry at a time.
///
/// An input accepted while another turn ran is placed after that turn's end, so the model never
/// sees a user message between a tool call and its result. Messages sit behind an `Arc` so a model
/// request takes them in O(1); appending after the call copies nothing once the request is gone.
#[derive(Debug, Clone, Default)]
pub struct Conversation {
    messages: Arc<Vec<Message>>,
    turn_open: bool,
    queued: VecDeque<Vec<ContentBlock>>,
}

impl Conversation {
    /// Builds the conversation of `entries` (in seq order).
    pub fn from_entries<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> Self {
        let mut c = Self::default();
        for e in entries {
            c.push(e);
        }
        c
    }

    /// The messages so far.
    pub fn messages(&self) -> &Arc<Vec<Message>> {
        &self.messages
    }

    /// Applies one committed entry.
    pub fn push(&mut self, entry: &Entry) {
        match &entry.payload {
            EntryPayload::Input { content, .. } => {
                if self.turn_open {
                    self.queued.push_back(content.clone());
                } else {
                    self.turn_open = true;
                    self.append(Role::User, content.clone());
                }
            }
            EntryPayload::Assistant { message, .. } => {
                self.append(Role::Assistant, message.content.clone())
            }
            EntryPayload::ToolResult {
                call_id,
                content,
                is_error,
            } => self.append(
                Role::User,
                vec![ContentBlock::ToolResult {
                    tool_use_id: call_id.clone(),
                    content: content.clone(),
                    is_error: *is_error,
                }],
            ),
            EntryPayload::ToolStarted { .. } => {}
            EntryPayload::TurnEnd { .. } => {
                self.turn_open = false;
                if let Some(next) = self.queued.pop_front() {
                    self.turn_open = true;
                    self.append(Role::User, next);
                }
            }
        }
    }

    fn append(&mut self, role: Role, blocks: Vec<ContentBlock>) {
        let messages = Arc::make_mut(&mut self.messages);
        let is_results = |b: &[ContentBlock]| {
            b.iter()
                .all(|b| matches!(b, ContentBlock::ToolResult { .. }))
        };
        // The tool results of one step travel in one user message.
        if role == Role::User
            && is_results(&blocks)
            && let Some(last) = messages.last_mut()
            && last.role == Role::User
            && is_results(&last.content)
        {
            last.content.extend(blocks);
            return;
        }
        messages.push(Message {
            role,
            content: blocks,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::StopReason;

    fn entry(seq: Seq, payload: EntryPayload) -> Entry {
        Entry {
            seq,
            parent: seq.checked_sub(1).filter(|p| *p > 0),
            at_ms: 0,
            payload,
        }
    }

    #[test]
    fn queued_input_waits_for_turn_end() {
        let input = |seq, id: &str, text: &str| {
            entry(
                seq,
                EntryPayload::Input {
                    input_id: InputId::new(id).unwrap(),
                    content: vec![ContentBlock::text(text)],
                },
            )
        };
        let entries = vec![
            input(1, "a", "first"),
            entry(
                2,
                EntryPayload::Assistant {
                    message: Message {
                        role: Role::Assistant,
                        content: vec![ContentBlock::ToolUse {
                            id: "c1".into(),
                            name: "t".into(),
                            input: serde_json::json!({}),
                        }],
                    },
                    stop_reason: StopReason::ToolUse,
                    usage: Usage::default(),
                },
            ),
            input(3, "b", "second"),
            entry(
                4,
                EntryPayload::ToolResult {
                    call_id: "c1".into(),
                    content: "ok".into(),
                    is_error: false,
                },
            ),
            entry(
                5,
                EntryPayload::Assistant {
                    message: Message::assistant("done"),
                    stop_reason: StopReason::EndTurn,
                    usage: Usage::default(),
                },
            ),
            entry(
                6,
                EntryPayload::TurnEnd {
                    input_id: InputId::new("a").unwrap(),
                    status: TurnStatus::Completed,
                    answer_seq: Some(5),
                    usage: Usage::default(),
                },
            ),
        ];
        let c = Conversation::from_entries(&entries);
        let roles: Vec<_> = c.messages().iter().map(|m| (m.role, m.text())).collect();
        assert_eq!(
            roles,
            vec![
                (Role::User, "first".to_string()),
                (Role::Assistant, String::new()),
                (Role::User, String::new()),
                (Role::Assistant, "done".to_string()),
                (Role::User, "second".to_string()),
            ]
        );
    }
}
