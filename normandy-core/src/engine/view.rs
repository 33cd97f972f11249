//! The view of a session's committed entries: [`read_entries`] pages them from the store, and one
//! [`SessionView::apply`] folds each entry — at rehydration and after every commit alike — into
//! the model's [`Conversation`] and the indexes that make input idempotent.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::TurnOutcome;
use crate::error::Result;
use crate::model::{
    ContentBlock, Entry, EntryPayload, InputId, Message, Role, Seq, SessionId, TurnStatus, Usage,
};
use crate::store::SessionStore;

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
            // A response cut short mid-stream stays in history, out of the model's view: its
            // text may stop mid-word, and the turn it belonged to has ended.
            EntryPayload::Assistant {
                incomplete: true, ..
            } => {}
            EntryPayload::Assistant { message, .. } => {
                self.append(Role::Assistant, message.content.clone())
            }
            EntryPayload::ToolResult {
                call_id,
                content,
                is_error,
                structured,
                blocks,
                ..
            } => self.append(
                Role::User,
                vec![ContentBlock::ToolResult {
                    tool_use_id: call_id.clone(),
                    content: content.clone(),
                    is_error: *is_error,
                    structured: structured.clone(),
                    blocks: blocks.clone(),
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

/// How a finished turn ended, as its `TurnEnd` entry recorded it.
pub(crate) struct Ended {
    pub(crate) status: TurnStatus,
    pub(crate) answer_seq: Option<Seq>,
    pub(crate) usage: Usage,
    pub(crate) end_seq: Seq,
}

impl Ended {
    /// The outcome it stands for, with the answer `message` (when the turn completed).
    pub(crate) fn outcome(
        &self,
        session: &SessionId,
        input_id: &InputId,
        message: Option<Message>,
    ) -> TurnOutcome {
        TurnOutcome {
            session: session.clone(),
            input_id: input_id.clone(),
            status: self.status.clone(),
            message,
            usage: self.usage,
            end_seq: self.end_seq,
        }
    }
}

/// The outcome `entries` (a session's whole history) recorded for `input_id`, if its turn ended.
pub(crate) fn stored_outcome(
    session: &SessionId,
    entries: &[Entry],
    input_id: &InputId,
) -> Option<TurnOutcome> {
    let view = SessionView::from_entries(entries);
    let ended = view.ended.get(input_id)?;
    let message = match (ended.status == TurnStatus::Completed, ended.answer_seq) {
        (true, Some(seq)) => entries.iter().find_map(|e| match &e.payload {
            EntryPayload::Assistant { message, .. } if e.seq == seq => Some(message.clone()),
            _ => None,
        }),
        _ => None,
    };
    Some(ended.outcome(session, input_id, message))
}

/// What a live actor knows from the entries committed so far.
#[derive(Default)]
pub(crate) struct SessionView {
    /// What the next model request sends.
    pub(crate) conv: Conversation,
    /// Input id → seq of its `Input` entry, for idempotent resubmission.
    pub(crate) inputs: HashMap<InputId, Seq>,
    /// Outcomes of finished turns by input id.
    pub(crate) ended: HashMap<InputId, Ended>,
}

impl SessionView {
    /// The view of `entries` (in seq order), as loaded at activation.
    pub(crate) fn from_entries<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> Self {
        let mut view = Self::default();
        for e in entries {
            view.apply(e);
        }
        view
    }

    /// Folds one committed entry into the view.
    pub(crate) fn apply(&mut self, entry: &Entry) {
        self.conv.push(entry);
        match &entry.payload {
            EntryPayload::Input { input_id, .. } => {
                self.inputs.insert(input_id.clone(), entry.seq);
            }
            EntryPayload::TurnEnd {
                input_id,
                status,
                answer_seq,
                usage,
            } => {
                self.ended.insert(
                    input_id.clone(),
                    Ended {
                        status: status.clone(),
                        answer_seq: *answer_seq,
                        usage: *usage,
                        end_seq: entry.seq,
                    },
                );
            }
            EntryPayload::Assistant { .. }
            | EntryPayload::ToolResult { .. }
            | EntryPayload::ToolStarted { .. } => {}
        }
    }
}

/// Reads committed entries in `(after, upto]`, page by page.
pub(crate) async fn read_entries(
    store: &dyn SessionStore,
    id: &SessionId,
    after: Seq,
    upto: Seq,
) -> Result<Vec<Entry>> {
    const PAGE: usize = 1000;
    let mut out = Vec::new();
    let mut cursor = after;
    while cursor < upto {
        let page = store.entries(id, cursor, PAGE).await?;
        let Some(last) = page.last() else { break };
        cursor = last.seq;
        out.extend(page.into_iter().filter(|e| e.seq <= upto));
        if cursor >= upto {
            break;
        }
    }
    Ok(out)
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
                    call: crate::model::CallInfo::default(),
                    incomplete: false,
                },
            ),
            input(3, "b", "second"),
            entry(
                4,
                EntryPayload::ToolResult {
                    call_id: "c1".into(),
                    content: "ok".into(),
                    is_error: false,
                    structured: None,
                    blocks: Vec::new(),
                    in_doubt: None,
                },
            ),
            entry(
                5,
                EntryPayload::Assistant {
                    message: Message::assistant("done"),
                    stop_reason: StopReason::EndTurn,
                    usage: Usage::default(),
                    call: crate::model::CallInfo::default(),
                    incomplete: false,
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
