//! Accepting a user input: it must be non-empty text within the size limit; a resubmitted input
//! id gets its original outcome and is never appended twice; while a turn runs, the template's
//! input mode queues, refuses or interrupts. An accepted input is committed before it is answered.

use tokio::sync::oneshot;

use super::actor::{Actor, Flow, InputRequest};
use super::turn::new_turn;
use super::{Phase, QueuedInput, TurnOutcome};
use crate::error::{Error, ErrorKind, Result};
use crate::model::{ContentBlock, EntryPayload, InputId, TurnStatus};
use crate::store::CommitAck;
use crate::template::InputMode;

/// Most callers waiting for one input's turn, the original sender included. Resubmissions of a
/// running input wait beside it; a client retrying in a tight loop must not grow the actor's
/// memory without bound, so beyond this it is refused with the retryable `Overloaded` (the
/// outcome is still there once the turn ends). With the input queue bounded too, the waiters of
/// a session are bounded by this times (queued inputs + 1).
const MAX_WAITERS_PER_INPUT: usize = 64;

impl Actor {
    pub(super) async fn accept(
        &mut self,
        input: InputRequest,
        reply: oneshot::Sender<Result<TurnOutcome>>,
    ) -> Result<Flow> {
        let limits = self.config.template.limits;
        // An input is user text: tool blocks are the engine's to write, and an empty input would
        // sit in every later model request.
        if let Err(reason) = check_input(&input.content) {
            let _ = reply.send(Err(Error::invalid_input(Some(&self.id), reason)));
            return Ok(Flow::Continue);
        }
        let size = input_size(&input.content);
        if size > limits.max_input_bytes {
            let _ = reply.send(Err(Error::InputTooLarge {
                session: self.id.clone(),
                size,
                limit: limits.max_input_bytes,
            }));
            return Ok(Flow::Continue);
        }
        if self.view.inputs.contains_key(&input.input_id) {
            // Resubmission: the original outcome, never a second append.
            match self.original_outcome(&input.input_id).await {
                Ok(Some(outcome)) => {
                    let _ = reply.send(outcome.into_result());
                }
                Ok(None) => {
                    let waiting = self.waiters.entry(input.input_id).or_default();
                    if waiting.len() >= MAX_WAITERS_PER_INPUT {
                        let _ = reply.send(Err(Error::Overloaded {
                            session: self.id.clone(),
                            what: format!(
                                "{} callers already wait for this input's turn",
                                waiting.len()
                            ),
                        }));
                    } else {
                        waiting.push(reply);
                    }
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
            return Ok(Flow::Continue);
        }
        let busy = self.state.has_work();
        let mode = self.config.template.input_mode;
        if busy && mode == InputMode::Reject {
            let _ = reply.send(Err(Error::Busy {
                session: self.id.clone(),
            }));
            return Ok(Flow::Continue);
        }
        if busy && self.state.queued.len() >= limits.max_queued_inputs as usize {
            let _ = reply.send(Err(Error::Overloaded {
                session: self.id.clone(),
                what: format!(
                    "{} inputs already wait behind the running turn",
                    self.state.queued.len()
                ),
            }));
            return Ok(Flow::Continue);
        }
        let seq = self.seq + 1;
        let mut state = self.state.clone();
        let queued = QueuedInput {
            input_id: input.input_id.clone(),
            seq,
        };
        if busy {
            state.queued.push_back(queued);
            // An interrupt is committed with the input, so it survives a crash.
            state.cancel_requested |= mode == InputMode::Interrupt;
        } else {
            state.turn = Some(new_turn(&queued));
            state.phase = Phase::CallingModel;
        }
        let payload = EntryPayload::Input {
            input_id: input.input_id.clone(),
            content: input.content,
        };
        let input_id = input.input_id;
        match self.commit(vec![payload], state).await {
            Ok(CommitAck::Applied { .. }) => {
                self.waiters.entry(input_id).or_default().push(reply);
            }
            Ok(CommitAck::DuplicateInput { .. }) => {
                // The store knows this input but our memory does not: our view is stale.
                // Drop the reply (the caller retries) and let a fresh actor reload; the other
                // waiters' turns are not at fault, so they retry there too rather than fail.
                return Ok(Flow::Exit(Actor::exit_alone(Error::Internal(format!(
                    "session {}: store holds input {input_id} this actor did not load",
                    self.id
                )))));
            }
            Err(e) => {
                let _ = reply.send(Err(e.clone()));
                // Only a lost session (fenced, diverged, store unreachable) ends the actor;
                // an input the store refuses concerns its sender alone. Either way the error
                // is this input's: the other waiters retry on a fresh actor (a fenced exit
                // still tells them of the fence, through the handle's exit reason).
                let fatal = matches!(e, Error::Fenced { .. } | Error::Conflict { .. })
                    || e.is_retryable()
                    || matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::Internal);
                return Ok(if fatal {
                    Flow::Exit(Actor::exit_alone(e))
                } else {
                    Flow::Continue
                });
            }
        }
        if busy && mode == InputMode::Interrupt {
            self.cancel = Some(TurnStatus::Cancelled);
            return Ok(Flow::DropModelStep);
        }
        Ok(Flow::Continue)
    }

    /// The stored outcome of `input_id`'s turn, or `None` while it is queued or running.
    async fn original_outcome(&self, input_id: &InputId) -> Result<Option<TurnOutcome>> {
        let Some(ended) = self.view.ended.get(input_id) else {
            return Ok(None);
        };
        let message = match (ended.status == TurnStatus::Completed, ended.answer_seq) {
            (true, Some(seq)) => self
                .store
                .entries(
                    &self.id,
                    seq.checked_sub(1).ok_or_else(|| {
                        Error::corrupt(
                            Some(&self.id),
                            format!("turn end of input {input_id}"),
                            "answer seq 0",
                        )
                    })?,
                    1,
                )
                .await?
                .into_iter()
                .find_map(|e| match e.payload {
                    EntryPayload::Assistant { message, .. } if e.seq == seq => Some(message),
                    _ => None,
                }),
            _ => None,
        };
        Ok(Some(ended.outcome(&self.id, input_id, message)))
    }
}

/// The size an input counts against `max_input_bytes`: its text (inputs are text only, which
/// is checked before the size).
/// What an input may hold: one or more blocks, each non-empty text, an image or a document
/// whose inline bytes are valid base64 within [`MAX_INLINE_MEDIA_BYTES`](crate::model::MAX_INLINE_MEDIA_BYTES).
/// Checked before the session is activated, and again by the actor.
pub(crate) fn check_input(content: &[ContentBlock]) -> std::result::Result<(), String> {
    if content.is_empty() {
        return Err("an input must hold at least one block".into());
    }
    for (i, block) in content.iter().enumerate() {
        match block {
            ContentBlock::Text { text } if text.is_empty() => {
                return Err(format!("block {i} of the input is empty text"));
            }
            ContentBlock::Text { .. }
            | ContentBlock::Image { .. }
            | ContentBlock::Document { .. } => {
                block
                    .validate()
                    .map_err(|e| format!("block {i} of the input: {e}"))?;
            }
            other => {
                return Err(format!(
                    "block {i} of the input is a {} block; an input holds text, images and \
                     documents",
                    block_name(other)
                ));
            }
        }
    }
    Ok(())
}

fn block_name(block: &ContentBlock) -> &'static str {
    match block {
        ContentBlock::Text { .. } => "text",
        ContentBlock::ToolUse { .. } => "tool_use",
        ContentBlock::ToolResult { .. } => "tool_result",
        ContentBlock::Thinking { .. } => "thinking",
        ContentBlock::RedactedThinking { .. } => "redacted_thinking",
        ContentBlock::Image { .. } => "image",
        ContentBlock::Document { .. } => "document",
    }
}

pub(crate) fn input_size(content: &[ContentBlock]) -> usize {
    content.iter().map(ContentBlock::stored_size).sum()
}
