//! The steps of a turn: deciding the next one, the model call and tool calls with the hooks
//! around them, and what is committed at each boundary (model response received, tool started,
//! tool result recorded, turn finished; the commit itself is `commit.rs`). Cancellation, the turn deadline and the max-steps guard end a
//! turn here; every commit is fenced by the epoch the actor got from `activate`.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::time::Duration;

use futures::FutureExt;
use tokio::time::Instant;
use tracing::{Instrument, debug, info_span, warn};

use super::actor::Actor;
use super::stream::{retry_delay, stream_call};
use super::{
    ActiveTurn, Attempt, PendingCall, Phase, QueuedInput, TurnEvent, TurnOutcome, TurnState,
};
use crate::error::{Error, Result};
use crate::hooks::{HookDecision, ToolCall};
use crate::llm::{ModelRequest, ModelResponse};
use crate::model::{
    CallInfo, ContentBlock, DoubtReason, EntryPayload, InDoubt, InputId, Message, Role,
    SessionId, StopReason, TurnStatus, Usage,
};
use crate::store::now_ms;
use crate::tools::{self, ToolContext, ToolOutput};

/// Retries of a retryable model error within one step.
const MODEL_RETRIES: u32 = 3;

/// The step in flight: it owns what it needs, so the actor keeps serving commands while it runs.
pub(super) type StepFuture = Pin<Box<dyn Future<Output = StepResult> + Send>>;

/// What a step produced, committed by [`Actor::finish_step`].
pub(super) enum StepResult {
    Model(Result<ModelResponse>),
    Tool {
        call_id: String,
        output: ToolOutput,
        /// Set when the tool panicked or timed out.
        in_doubt: Option<InDoubt>,
    },
    /// A hook around a tool call panicked: the turn fails. `tool_ran` says whether the tool had
    /// run (an `after_tool` hook), so the call's result says its outcome is unknown — the
    /// output the hook never finished editing is not committed — or that it was not run.
    ToolHookPanicked {
        error: Error,
        tool_ran: bool,
    },
}

/// Which kind of step is in flight (a model call may be dropped at once; a tool call may not).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum StepKind {
    Model,
    Tool,
}

impl Actor {
    /// Decides the next step of the turn, committing whatever the decision needs first. Returns
    /// `None` when there is nothing to do.
    pub(super) async fn next_step(&mut self) -> Result<Option<(StepKind, StepFuture)>> {
        loop {
            let Some(turn) = self.state.turn.clone() else {
                let Some(next) = self.state.queued.front().cloned() else {
                    return Ok(None);
                };
                // Start the oldest queued input's turn.
                let mut state = self.state.clone();
                state.queued.pop_front();
                state.turn = Some(new_turn(&next));
                state.phase = Phase::CallingModel;
                self.commit(Vec::new(), state).await?;
                continue;
            };
            let requested = self.state.cancel_requested.then_some(TurnStatus::Cancelled);
            if let Some(status) = self.cancel.take().or(requested) {
                self.end_turn(status, Vec::new(), None).await?;
                continue;
            }
            if self.deadline.is_some_and(|d| d <= Instant::now()) {
                self.end_turn(TurnStatus::TimedOut, Vec::new(), None)
                    .await?;
                continue;
            }
            match &self.state.phase {
                Phase::Idle => {
                    // A turn without a phase cannot be produced by this engine; repair it.
                    let mut state = self.state.clone();
                    state.phase = Phase::CallingModel;
                    self.commit(Vec::new(), state).await?;
                }
                Phase::CallingModel => {
                    let limit = self.config.template.limits.max_steps;
                    if turn.steps >= limit {
                        self.end_turn(TurnStatus::MaxSteps { limit }, Vec::new(), None)
                            .await?;
                        continue;
                    }
                    self.emit(TurnEvent::ModelCallStarted {
                        step: turn.steps + 1,
                    });
                    let span = info_span!("model_call", input = %turn.input_id, step = turn.steps + 1, seq = self.seq);
                    return Ok(Some((
                        StepKind::Model,
                        Box::pin(self.model_step().instrument(span)),
                    )));
                }
                Phase::RunningTools { calls } => {
                    let Some(call) = calls.first().cloned() else {
                        let mut state = self.state.clone();
                        state.phase = Phase::CallingModel;
                        self.commit(Vec::new(), state).await?;
                        continue;
                    };
                    let idempotent = self
                        .config
                        .tools
                        .get(&call.name)
                        .is_none_or(|t| t.idempotent());
                    if !idempotent && call.started {
                        // In doubt: it may have run. Never run it again; tell the model.
                        warn!(call_id = %call.id, tool = %call.name, "tool call in doubt after resume; not re-run");
                        let output = ToolOutput::error(format!(
                            "The outcome of tool call {} ({}) is unknown: the session was \
                             interrupted while it ran. It will not be repeated.",
                            call.id, call.name
                        ));
                        let doubt = in_doubt(&self.id, &call, DoubtReason::Interrupted);
                        self.record_tool_result(call.id.clone(), output, Some(doubt))
                            .await?;
                        continue;
                    }
                    if !idempotent {
                        let mut state = self.state.clone();
                        if let Phase::RunningTools { calls } = &mut state.phase {
                            calls[0].started = true;
                        }
                        let payload = EntryPayload::ToolStarted {
                            call_id: call.id.clone(),
                            tool: call.name.clone(),
                            idempotency_key: Some(call.idempotency_key(&self.id)),
                        };
                        self.commit(vec![payload], state).await?;
                    }
                    self.in_flight = Some(call.id.clone());
                    self.emit(TurnEvent::ToolCallStarted {
                        call_id: call.id.clone(),
                        tool: call.name.clone(),
                    });
                    let span = info_span!("tool_call", input = %turn.input_id, call_id = %call.id, tool = %call.name, seq = self.seq);
                    return Ok(Some((
                        StepKind::Tool,
                        Box::pin(self.tool_step(call).instrument(span)),
                    )));
                }
            }
        }
    }

    fn model_step(&self) -> StepFuture {
        let template = &self.config.template;
        let mut request = ModelRequest {
            session: self.id.clone(),
            model: template.model.clone(),
            system: template.system_prompt.clone(),
            messages: self.view.conv.messages().clone(),
            tools: self.config.tool_specs.clone(),
            params: self.config.params.clone(),
        };
        let hooks = self.config.hooks.clone();
        let client = self.config.client.clone();
        let timeout = Duration::from_millis(template.limits.model_call_timeout_ms);
        let session = self.id.clone();
        let live = self.live.clone();
        let redactor = self.config.redactor.clone();
        let epoch = self.epoch;
        let (turn, step) = match &self.state.turn {
            Some(t) => (t.input_id.clone(), t.steps + 1),
            None => (InputId::generate(), 0),
        };
        Box::pin(async move {
            for (name, hook) in hooks.iter() {
                let decision = guarded(
                    &session,
                    name,
                    "before_model",
                    hook.before_model(&mut request),
                );
                match decision.await {
                    Ok(HookDecision::Continue) => {}
                    Ok(HookDecision::Veto(reason)) => {
                        return StepResult::Model(Err(Error::Model {
                            message: format!("model call vetoed by a hook: {reason}"),
                            retryable: false,
                        }));
                    }
                    Err(e) => return StepResult::Model(Err(e)),
                }
            }
            let mut attempt = 0;
            let result = loop {
                let mut tag = Attempt {
                    epoch,
                    number: live.next_attempt(),
                };
                // A panicking client fails the turn instead of killing the session's task.
                let call = AssertUnwindSafe(stream_call(
                    &*client,
                    request.clone(),
                    &live,
                    &turn,
                    step,
                    &mut tag,
                ))
                .catch_unwind();
                let err = match tokio::time::timeout(timeout, call).await {
                    Ok(Ok(Ok(response))) => break Ok(response),
                    Ok(Ok(Err(e))) => e,
                    Ok(Err(_panic)) => Error::Model {
                        message: "the model client panicked".into(),
                        retryable: false,
                    },
                    Err(_) => Error::Timeout {
                        session: Some(session.clone()),
                        what: format!("model call after {timeout:?}"),
                    },
                };
                if !err.is_retryable() || attempt >= MODEL_RETRIES {
                    break Err(err);
                }
                attempt += 1;
                debug!(error = %redactor.redact(&err.to_string()), attempt, "model call failed; retrying");
                tokio::time::sleep(retry_delay(&err, attempt)).await;
            };
            let result = match result {
                Ok(mut response) => {
                    for (name, hook) in hooks.iter() {
                        let edit = guarded(
                            &session,
                            name,
                            "after_model",
                            hook.after_model(&mut response),
                        );
                        if let Err(e) = edit.await {
                            return StepResult::Model(Err(e));
                        }
                    }
                    Ok(response)
                }
                Err(e) => Err(e),
            };
            StepResult::Model(result)
        })
    }

    fn tool_step(&self, call: PendingCall) -> StepFuture {
        let hooks = self.config.hooks.clone();
        let tool = self.config.tools.get(&call.name).cloned();
        let timeout = Duration::from_millis(self.config.template.limits.tool_call_timeout_ms);
        let session = self.id.clone();
        let key = call.idempotency_key(&self.id);
        let ctx = ToolContext {
            session: self.id.clone(),
            call_id: call.id.clone(),
            idempotency_key: key.clone(),
        };
        // The record of a panic or a timeout, made only then (the name as the model gave it:
        // hooks may edit the call).
        let tool_name = call.name.clone();
        let doubt = move |reason| InDoubt {
            reason,
            tool: tool_name,
            idempotency_key: key,
        };
        Box::pin(async move {
            let mut tc = ToolCall {
                id: call.id,
                name: call.name,
                input: call.input,
            };
            for (name, hook) in hooks.iter() {
                match guarded(&session, name, "before_tool", hook.before_tool(&mut tc)).await {
                    Ok(HookDecision::Continue) => {}
                    Ok(HookDecision::Veto(reason)) => {
                        return StepResult::Tool {
                            call_id: tc.id,
                            output: ToolOutput::error(format!("tool call refused: {reason}")),
                            in_doubt: None,
                        };
                    }
                    Err(error) => {
                        return StepResult::ToolHookPanicked {
                            error,
                            tool_ran: false,
                        };
                    }
                }
            }
            let (mut output, in_doubt) = match tool {
                None => (
                    ToolOutput::error(format!("no tool named {:?}", tc.name)),
                    None,
                ),
                Some(tool) => {
                    let call = AssertUnwindSafe(tool.call(tc.input.clone(), ctx)).catch_unwind();
                    match tokio::time::timeout(timeout, call).await {
                        Ok(Ok(output)) => (output, None),
                        // A panicking tool is an error result, not a dead session.
                        Ok(Err(_panic)) => (
                            ToolOutput::error(format!(
                                "tool {} panicked; its outcome is unknown",
                                tc.name
                            )),
                            Some(doubt(DoubtReason::Panicked)),
                        ),
                        Err(_) => (
                            ToolOutput::error(format!(
                                "tool {} timed out after {timeout:?}; its outcome is unknown",
                                tc.name
                            )),
                            Some(doubt(DoubtReason::TimedOut)),
                        ),
                    }
                }
            };
            for (name, hook) in hooks.iter() {
                let edit = guarded(
                    &session,
                    name,
                    "after_tool",
                    hook.after_tool(&tc, &mut output),
                );
                if let Err(error) = edit.await {
                    return StepResult::ToolHookPanicked {
                        error,
                        tool_ran: true,
                    };
                }
            }
            StepResult::Tool {
                call_id: tc.id,
                output,
                in_doubt,
            }
        })
    }

    pub(super) async fn finish_step(&mut self, result: StepResult) -> Result<()> {
        match result {
            StepResult::Model(Ok(response)) => {
                self.live.take_partial();
                let message = Message {
                    role: Role::Assistant,
                    content: response.content,
                };
                let answer_seq = self.seq + 1;
                let mut state = self.state.clone();
                let turn = state
                    .turn
                    .as_mut()
                    .ok_or_else(|| Error::Internal("model step finished outside a turn".into()))?;
                turn.steps += 1;
                turn.usage.add(response.usage);
                turn.answer_seq = Some(answer_seq);
                let calls: Vec<PendingCall> = message
                    .tool_uses()
                    .enumerate()
                    .map(|(i, (id, name, input))| PendingCall {
                        id: id.to_string(),
                        name: name.to_string(),
                        input: input.clone(),
                        started: false,
                        // Unique in the session and stable across resumes, whatever ids the
                        // model chose (providers often restart their numbering every response).
                        key: tools::idempotency_key(&self.id, answer_seq, i),
                    })
                    .collect();
                let assistant = EntryPayload::Assistant {
                    message: message.clone(),
                    stop_reason: response.stop_reason,
                    usage: response.usage,
                    call: response.call,
                    incomplete: false,
                };
                if calls.is_empty() {
                    self.state.turn = state.turn;
                    self.end_turn(TurnStatus::Completed, vec![assistant], Some(message))
                        .await
                } else {
                    state.phase = Phase::RunningTools { calls };
                    self.commit(vec![assistant], state).await?;
                    Ok(())
                }
            }
            StepResult::Model(Err(e)) => {
                self.live.take_partial();
                self.fail_turn(&e, "model call failed").await
            }
            StepResult::Tool {
                call_id,
                output,
                in_doubt,
            } => {
                self.in_flight = None;
                self.record_tool_result(call_id, output, in_doubt).await
            }
            StepResult::ToolHookPanicked { error, tool_ran } => {
                if !tool_ran {
                    // The tool never ran, even if its start was committed (a `before_tool` hook
                    // runs after the start): its result says "not run", not "in doubt". Only
                    // `end_turn`, committing next, reads the cleared flag.
                    self.in_flight = None;
                    if let Phase::RunningTools { calls } = &mut self.state.phase
                        && let Some(call) = calls.first_mut()
                    {
                        call.started = false;
                    }
                }
                self.fail_turn(&error, "a tool hook panicked").await
            }
        }
    }

    /// Ends the turn as failed with `e`. Its text is logged and stored only with the session's
    /// credential values redacted: a provider's error may echo the key it was sent, and a
    /// hook's panic message may carry anything.
    async fn fail_turn(&mut self, e: &Error, why: &str) -> Result<()> {
        let message = self.config.redactor.redact(&e.to_string()).into_owned();
        warn!(error = %message, "{why}; ending turn");
        self.end_turn(TurnStatus::Failed { message }, Vec::new(), None)
            .await
    }

    async fn record_tool_result(
        &mut self,
        call_id: String,
        output: ToolOutput,
        in_doubt: Option<InDoubt>,
    ) -> Result<()> {
        let mut state = self.state.clone();
        if let Phase::RunningTools { calls } = &mut state.phase {
            // Only the first call with this id: a model may repeat an id within one response,
            // and each of its calls needs its own result.
            if let Some(i) = calls.iter().position(|c| c.id == call_id) {
                calls.remove(i);
            }
            if calls.is_empty() {
                state.phase = Phase::CallingModel;
            }
        }
        let payload = EntryPayload::ToolResult {
            call_id,
            content: output.content,
            is_error: output.is_error,
            structured: output.structured,
            blocks: output.blocks,
            in_doubt,
        };
        self.commit(vec![payload], state).await?;
        Ok(())
    }

    /// Ends the current turn with `status`, after `entries`: pending tool calls get error
    /// results (so every tool call has one), then the `TurnEnd`. The oldest queued input's turn
    /// starts in the same commit.
    pub(super) async fn end_turn(
        &mut self,
        status: TurnStatus,
        mut entries: Vec<EntryPayload>,
        message: Option<Message>,
    ) -> Result<()> {
        let Some(turn) = self.state.turn.clone() else {
            return Ok(());
        };
        let pending: Vec<PendingCall> = match &self.state.phase {
            Phase::RunningTools { calls } => calls.clone(),
            _ => Vec::new(),
        };
        // A model call cut short mid-stream: what it streamed is kept, marked incomplete.
        let partial = self.live.take_partial();
        if matches!(self.state.phase, Phase::CallingModel) && !partial.is_empty() {
            let content: Vec<ContentBlock> = partial
                .into_iter()
                .map(|(_, text)| ContentBlock::Text { text })
                .collect();
            entries.insert(
                0,
                EntryPayload::Assistant {
                    message: Message {
                        role: Role::Assistant,
                        content,
                    },
                    stop_reason: StopReason::Other,
                    usage: Usage::default(),
                    call: CallInfo::default(),
                    incomplete: true,
                },
            );
        }
        let in_flight = self.in_flight.take();
        for (i, call) in pending.into_iter().enumerate() {
            // Only the first pending call can be in flight (they run in order), whatever ids
            // the others repeat.
            let running = i == 0 && in_flight.as_deref() == Some(call.id.as_str());
            // Started but not running here: an earlier task of the session started it and died.
            let doubt = if running {
                Some(in_doubt(&self.id, &call, DoubtReason::TurnEnded))
            } else if call.started {
                Some(in_doubt(&self.id, &call, DoubtReason::Interrupted))
            } else {
                None
            };
            let content = if doubt.is_some() {
                format!(
                    "The outcome of tool call {} ({}) is unknown: the turn ended ({}) while it \
                     ran. It will not be repeated.",
                    call.id,
                    call.name,
                    status_name(&status)
                )
            } else {
                format!("not run: the turn ended ({})", status_name(&status))
            };
            entries.push(EntryPayload::ToolResult {
                call_id: call.id,
                content,
                is_error: true,
                structured: None,
                blocks: Vec::new(),
                in_doubt: doubt,
            });
        }
        entries.push(EntryPayload::TurnEnd {
            input_id: turn.input_id.clone(),
            status: status.clone(),
            answer_seq: turn.answer_seq,
            usage: turn.usage,
        });
        let end_seq = self.seq + entries.len() as u64;
        let outcome_completed = status == TurnStatus::Completed;
        // A cancellation belongs to the turn it was made for, never the next one.
        self.cancel = None;
        let mut state = self.state.clone();
        state.turn = None;
        state.phase = Phase::Idle;
        state.cancel_requested = false;
        if let Some(next) = state.queued.pop_front() {
            state.turn = Some(new_turn(&next));
            state.phase = Phase::CallingModel;
        }
        self.commit(entries, state).await?;
        let outcome = TurnOutcome {
            session: self.id.clone(),
            input_id: turn.input_id.clone(),
            status,
            message: message.filter(|_| outcome_completed),
            usage: turn.usage,
            end_seq,
        };
        debug!(input = %turn.input_id, status = status_name(&outcome.status), end_seq, "turn ended");
        self.emit(TurnEvent::TurnFinished(outcome.clone()));
        self.reply(&turn.input_id, outcome);
        Ok(())
    }

    fn reply(&mut self, input_id: &InputId, outcome: TurnOutcome) {
        if let Some(waiters) = self.waiters.remove(input_id) {
            for w in waiters {
                let _ = w.send(outcome.clone().into_result());
            }
        }
    }

    /// Starts timing the current turn on this node (at activation, and when a turn starts):
    /// from the run time its state records, so its deadline is the rest of its budget whatever
    /// the clock of the node that ran it before.
    pub(super) fn time_turn(&mut self) {
        let limit = self.config.template.limits.turn_deadline_ms;
        self.turn_clock = self.state.turn.as_ref().map(|t| {
            let ran = t
                .ran_ms
                .unwrap_or_else(|| now_ms().saturating_sub(t.started_at_ms))
                .min(limit);
            (t.input_id.clone(), Instant::now(), ran)
        });
        self.deadline = self
            .turn_clock
            .as_ref()
            .map(|(_, since, ran)| *since + Duration::from_millis(limit - ran));
    }

    /// Stamps on `state`'s turn how long it has run, if it is the turn timed here.
    pub(super) fn stamp_run_time(&self, state: &mut TurnState) {
        if let (Some(turn), Some((id, since, ran))) = (state.turn.as_mut(), &self.turn_clock)
            && turn.input_id == *id
        {
            let here = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
            turn.ran_ms = Some(ran.saturating_add(here));
        }
    }

    /// Closes the session: the running turn and queued inputs end as cancelled, then the store
    /// marks it terminal.
    pub(super) async fn close(&mut self) -> Result<()> {
        while self.state.turn.is_some() {
            self.end_turn(TurnStatus::Cancelled, Vec::new(), None)
                .await?;
        }
        self.store.mark_terminal(&self.id, self.epoch).await
    }
}

/// Runs one hook call the way tool calls run: a panic becomes an error naming the hook, where it
/// ran and the session, which fails the turn. Unguarded, a panic would kill the actor, and each
/// rebuild would re-run the turn's idempotent tools and panic again — a crash loop.
async fn guarded<T>(
    session: &SessionId,
    hook: &str,
    point: &str,
    call: impl Future<Output = T>,
) -> Result<T> {
    AssertUnwindSafe(call)
        .catch_unwind()
        .await
        .map_err(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("a non-string payload");
            Error::Internal(format!(
                "session {session}: hook {hook:?} panicked in {point}: {what}"
            ))
        })
}

/// The in-doubt record of `call`, under the key its tool was (or would have been) handed.
fn in_doubt(session: &SessionId, call: &PendingCall, reason: DoubtReason) -> InDoubt {
    InDoubt {
        reason,
        tool: call.name.clone(),
        idempotency_key: call.idempotency_key(session),
    }
}

pub(super) fn new_turn(q: &QueuedInput) -> ActiveTurn {
    ActiveTurn {
        input_id: q.input_id.clone(),
        input_seq: q.seq,
        steps: 0,
        usage: Usage::default(),
        started_at_ms: now_ms(),
        answer_seq: None,
        ran_ms: Some(0),
    }
}

fn status_name(status: &TurnStatus) -> &'static str {
    match status {
        TurnStatus::Completed => "completed",
        TurnStatus::Cancelled => "cancelled",
        TurnStatus::TimedOut => "timed out",
        TurnStatus::MaxSteps { .. } => "max steps",
        TurnStatus::Failed { .. } => "failed",
    }
}
