//! The per-session actor: one tokio task owning a live session, like tower's `buffer` worker.
//!
//! Commands arrive on a bounded mpsc with a oneshot reply each. The current step of a turn (a
//! model call or a tool call) is a boxed future that owns what it needs, so the actor keeps
//! serving commands — queued input, cancellation, subscriptions — while it runs, and commits the
//! step's result when it completes. All commits go through [`Actor::commit`], fenced by the epoch
//! this actor got from `activate`.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tracing::{Instrument, debug, info_span, warn};

use super::{
    ActiveTurn, Conversation, PendingCall, Phase, QueuedInput, TurnEvent, TurnOutcome, TurnState,
};
use crate::catalog::SessionConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::hooks::{HookDecision, ToolCall};
use crate::llm::{ModelRequest, ModelResponse};
use crate::model::{
    ContentBlock, Entry, EntryPayload, Epoch, InputId, Message, NodeId, Role, Seq, SessionId,
    TurnStatus, Usage,
};
use crate::registry::SessionRegistry;
use crate::runtime::LiveSessions;
use crate::store::{CommitAck, CommitBatch, SessionRecord, SessionStore, now_ms};
use crate::template::InputMode;
use crate::tools::{ToolContext, ToolOutput};

/// A user input on its way to a session.
#[derive(Debug)]
pub(crate) struct InputRequest {
    pub(crate) input_id: InputId,
    pub(crate) content: Vec<ContentBlock>,
}

/// What a subscriber gets: committed entries after its seq, then the live channel.
pub(crate) type Subscription = (Vec<Entry>, broadcast::Receiver<TurnEvent>);

/// Commands to a session actor. Large payloads are boxed to keep the mailbox slots small.
pub(crate) enum Command {
    Send {
        input: Box<InputRequest>,
        reply: oneshot::Sender<Result<TurnOutcome>>,
    },
    Subscribe {
        after: Seq,
        reply: oneshot::Sender<Result<Subscription>>,
    },
    Cancel {
        reply: oneshot::Sender<bool>,
    },
    Stop {
        reply: oneshot::Sender<Result<()>>,
    },
    Passivate {
        reply: oneshot::Sender<()>,
    },
}

/// A cheap handle to a live actor.
#[derive(Clone, Debug)]
pub(crate) struct ActorHandle {
    pub(crate) tx: mpsc::Sender<Command>,
    pub(crate) generation: u64,
    pub(crate) abort: tokio::task::AbortHandle,
}

/// Everything needed to start an actor for an activated session.
pub(crate) struct ActorParams {
    pub(crate) node: NodeId,
    pub(crate) record: SessionRecord,
    pub(crate) entries: Vec<Entry>,
    pub(crate) config: SessionConfig,
    pub(crate) store: Arc<dyn SessionStore>,
    pub(crate) registry: Arc<dyn SessionRegistry>,
    pub(crate) live: Arc<LiveSessions>,
    pub(crate) generation: u64,
    pub(crate) idle_timeout: Duration,
    pub(crate) mailbox: usize,
}

/// How long a retryable commit failure is retried before the actor gives the session up.
const COMMIT_RETRIES: u32 = 5;
/// Retries of a retryable model error within one step.
const MODEL_RETRIES: u32 = 3;
/// Capacity of the event channel (created on first subscription).
const EVENT_CAPACITY: usize = 1024;

type StepFuture = Pin<Box<dyn Future<Output = StepResult> + Send>>;

enum StepResult {
    Model(Result<ModelResponse>),
    Tool { call_id: String, output: ToolOutput },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StepKind {
    Model,
    Tool,
}

/// Why the actor stopped.
enum Exit {
    /// Idle timeout, `Passivate`, or `Stop`: release the registry placement.
    Release,
    /// Every handle was dropped (runtime gone).
    Dropped,
    /// Another writer holds the session now: leave its placement alone.
    Fenced,
    /// A store or engine failure: give the session up; the next request rebuilds it.
    Failed,
}

struct Ended {
    status: TurnStatus,
    answer_seq: Option<Seq>,
    usage: Usage,
    end_seq: Seq,
}

struct Actor {
    id: SessionId,
    node: NodeId,
    epoch: Epoch,
    seq: Seq,
    state: TurnState,
    conv: Conversation,
    /// Input id → seq of its `Input` entry, for idempotent resubmission.
    inputs: HashMap<InputId, Seq>,
    /// Outcomes of finished turns by input id.
    ended: HashMap<InputId, Ended>,
    config: SessionConfig,
    store: Arc<dyn SessionStore>,
    registry: Arc<dyn SessionRegistry>,
    // Weak: the runtime's map holds this actor's mailbox sender, so a strong reference here
    // would keep every actor alive after the last `Sessions` handle is dropped.
    live: Weak<LiveSessions>,
    generation: u64,
    idle_timeout: Duration,
    /// The tool call whose step is in flight (so an abandoned one is reported in doubt).
    in_flight: Option<String>,
    /// Passivation requests waiting for the step in flight to reach its boundary.
    draining: Vec<oneshot::Sender<()>>,
    waiters: HashMap<InputId, Vec<oneshot::Sender<Result<TurnOutcome>>>>,
    /// Created on the first subscription, so an idle session without subscribers costs nothing.
    events: Option<broadcast::Sender<TurnEvent>>,
    /// A cancellation waiting for the next boundary.
    cancel: Option<TurnStatus>,
    /// When the current turn must end.
    deadline: Option<Instant>,
}

/// Starts the actor task for an activated session and returns its handle.
pub(crate) fn spawn_actor(params: ActorParams) -> ActorHandle {
    let (tx, rx) = mpsc::channel(params.mailbox.max(1));
    let id = params.record.id.clone();
    let span =
        info_span!("session", session = %id, epoch = params.record.epoch, node = %params.node);
    let mut conv = Conversation::default();
    let mut inputs = HashMap::new();
    let mut ended = HashMap::new();
    for e in &params.entries {
        conv.push(e);
        match &e.payload {
            EntryPayload::Input { input_id, .. } => {
                inputs.insert(input_id.clone(), e.seq);
            }
            EntryPayload::TurnEnd {
                input_id,
                status,
                answer_seq,
                usage,
            } => {
                ended.insert(
                    input_id.clone(),
                    Ended {
                        status: status.clone(),
                        answer_seq: *answer_seq,
                        usage: *usage,
                        end_seq: e.seq,
                    },
                );
            }
            _ => {}
        }
    }
    let mut actor = Actor {
        id,
        node: params.node,
        epoch: params.record.epoch,
        seq: params.record.seq,
        state: params.record.state,
        conv,
        inputs,
        ended,
        config: params.config,
        store: params.store,
        registry: params.registry,
        live: Arc::downgrade(&params.live),
        generation: params.generation,
        idle_timeout: params.idle_timeout,
        in_flight: None,
        draining: Vec::new(),
        waiters: HashMap::new(),
        events: None,
        cancel: None,
        deadline: None,
    };
    actor.deadline = actor.state.turn.as_ref().map(|t| actor.deadline_for(t));
    let handle = tokio::spawn(actor.run(rx).instrument(span));
    ActorHandle {
        tx,
        generation: params.generation,
        abort: handle.abort_handle(),
    }
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        if self.state.has_work() {
            debug!(seq = self.seq, "resuming interrupted turn");
        }
        let mut step: Option<(StepKind, StepFuture)> = None;
        // Held while releasing the placement; dropping it wakes activations waiting on us.
        let mut retiring = None;
        // Frees this actor's slot however the task ends: return, panic or abort.
        let mut slot = SlotGuard {
            live: self.live.clone(),
            id: self.id.clone(),
            generation: self.generation,
            registry: self.registry.clone(),
            node: self.node.clone(),
            released: false,
        };
        let exit = 'main: loop {
            // Nested futures are boxed so the idle actor's own future stays small: memory per
            // live idle session is what a node with many sessions pays.
            if step.is_none() && !self.draining.is_empty() {
                // A graceful passivation waited for the step in flight; it is committed now.
                break 'main Exit::Release;
            }
            if step.is_none() {
                match Box::pin(self.next_step()).await {
                    Ok(next) => step = next,
                    Err(e) => break 'main self.exit_for(e),
                }
            }
            let idle = step.is_none() && !self.state.has_work();
            let deadline = self.deadline;
            tokio::select! {
                biased;
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { break 'main Exit::Dropped };
                    let model_in_flight = matches!(step, Some((StepKind::Model, _)));
                    match Box::pin(self.handle(cmd)).await {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::DropModelStep) => if model_in_flight { step = None },
                        Ok(Flow::Drain) => if step.is_none() { break 'main Exit::Release },
                        Ok(Flow::Exit(exit)) => break 'main exit,
                        Err(e) => break 'main self.exit_for(e),
                    }
                }
                res = async { step.as_mut().expect("guarded").1.as_mut().await }, if step.is_some() => {
                    step = None;
                    if let Err(e) = Box::pin(self.finish_step(res)).await {
                        break 'main self.exit_for(e);
                    }
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    // A hard deadline: the step in flight is abandoned (a tool call in flight is
                    // then in doubt, and recorded so).
                    step = None;
                    if let Err(e) = Box::pin(self.end_turn(TurnStatus::TimedOut, Vec::new(), None)).await {
                        break 'main self.exit_for(e);
                    }
                }
                _ = tokio::time::sleep(self.idle_timeout), if idle => {
                    let retired = match self.live.upgrade() {
                        Some(live) => live.retire(&self.id, self.generation, &mut rx, false, &mut retiring),
                        None => true,
                    };
                    if retired {
                        break 'main Exit::Release;
                    }
                }
            }
        };
        Box::pin(self.shutdown(exit, &mut rx, &mut retiring)).await;
        slot.released = true;
        drop(retiring);
    }

    /// Maps an error that ends the actor to how it ends, failing every waiting caller with it.
    fn exit_for(&mut self, e: Error) -> Exit {
        for (_, waiters) in self.waiters.drain() {
            for w in waiters {
                let _ = w.send(Err(e.clone()));
            }
        }
        if matches!(e, Error::Fenced { .. }) {
            debug!(error = %e, "fenced: another writer owns the session");
            Exit::Fenced
        } else {
            warn!(error = %e, "session actor giving the session up");
            Exit::Failed
        }
    }

    async fn shutdown(
        mut self,
        exit: Exit,
        rx: &mut mpsc::Receiver<Command>,
        retiring: &mut Option<tokio::sync::watch::Sender<()>>,
    ) {
        // Stop taking commands first; a new activation of this session waits until the release
        // below is done, so it can never be undone by it.
        match self.live.upgrade() {
            Some(live) => {
                live.retire(&self.id, self.generation, rx, true, retiring);
            }
            None => rx.close(),
        }
        // Commands that raced in are dropped unanswered: their callers see the actor gone and
        // retry on a fresh one (inputs are idempotent by id).
        while rx.try_recv().is_ok() {}
        self.waiters.clear();
        if matches!(exit, Exit::Release | Exit::Failed | Exit::Dropped)
            && let Err(e) = self.registry.unregister(&self.id, &self.node).await
        {
            warn!(error = %e, "could not release registry placement");
        }
        if let Some(live) = self.live.upgrade() {
            live.finish(&self.id, self.generation);
        }
        // "Passivated" means released: answer only now.
        for reply in self.draining.drain(..) {
            let _ = reply.send(());
        }
        debug!("session actor stopped");
    }

    /// Decides the next step of the turn, committing whatever the decision needs first. Returns
    /// `None` when there is nothing to do.
    async fn next_step(&mut self) -> Result<Option<(StepKind, StepFuture)>> {
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
                        self.record_tool_result(call.id.clone(), output).await?;
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
            messages: self.conv.messages().clone(),
            tools: self.config.tool_specs.clone(),
            params: self.config.params.clone(),
        };
        let hooks = self.config.hooks.clone();
        let client = self.config.client.clone();
        let timeout = Duration::from_millis(template.limits.model_call_timeout_ms);
        let session = self.id.clone();
        Box::pin(async move {
            for hook in hooks.iter() {
                if let HookDecision::Veto(reason) = hook.before_model(&mut request).await {
                    return StepResult::Model(Err(Error::Model {
                        message: format!("model call vetoed by a hook: {reason}"),
                        retryable: false,
                    }));
                }
            }
            let mut attempt = 0;
            let result = loop {
                // A panicking client fails the turn instead of killing the session's task.
                let call = AssertUnwindSafe(client.complete(request.clone())).catch_unwind();
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
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            };
            let result = match result {
                Ok(mut response) => {
                    for hook in hooks.iter() {
                        hook.after_model(&mut response).await;
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
        let ctx = ToolContext {
            session: self.id.clone(),
            call_id: call.id.clone(),
            idempotency_key: if call.key.is_empty() {
                format!("{}:{}", self.id, call.id)
            } else {
                call.key.clone()
            },
        };
        Box::pin(async move {
            let mut tc = ToolCall {
                id: call.id,
                name: call.name,
                input: call.input,
            };
            for hook in hooks.iter() {
                if let HookDecision::Veto(reason) = hook.before_tool(&mut tc).await {
                    return StepResult::Tool {
                        call_id: tc.id,
                        output: ToolOutput::error(format!("tool call refused: {reason}")),
                    };
                }
            }
            let mut output = match tool {
                None => ToolOutput::error(format!("no tool named {:?}", tc.name)),
                Some(tool) => {
                    let call = AssertUnwindSafe(tool.call(tc.input.clone(), ctx)).catch_unwind();
                    match tokio::time::timeout(timeout, call).await {
                        Ok(Ok(output)) => output,
                        // A panicking tool is an error result, not a dead session.
                        Ok(Err(_panic)) => ToolOutput::error(format!(
                            "tool {} panicked; its outcome is unknown",
                            tc.name
                        )),
                        Err(_) => ToolOutput::error(format!(
                            "tool {} timed out after {timeout:?}; its outcome is unknown",
                            tc.name
                        )),
                    }
                }
            };
            for hook in hooks.iter() {
                hook.after_tool(&tc, &mut output).await;
            }
            StepResult::Tool {
                call_id: tc.id,
                output,
            }
        })
    }

    async fn finish_step(&mut self, result: StepResult) -> Result<()> {
        match result {
            StepResult::Model(Ok(response)) => {
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
                        key: format!("{}:{answer_seq}:{i}", self.id),
                    })
                    .collect();
                let assistant = EntryPayload::Assistant {
                    message: message.clone(),
                    stop_reason: response.stop_reason,
                    usage: response.usage,
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
                warn!(error = %e, "model call failed; ending turn");
                self.end_turn(
                    TurnStatus::Failed {
                        message: e.to_string(),
                    },
                    Vec::new(),
                    None,
                )
                .await
            }
            StepResult::Tool { call_id, output } => {
                self.in_flight = None;
                self.record_tool_result(call_id, output).await
            }
        }
    }

    async fn record_tool_result(&mut self, call_id: String, output: ToolOutput) -> Result<()> {
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
        };
        self.commit(vec![payload], state).await?;
        Ok(())
    }

    /// Ends the current turn with `status`, after `entries`: pending tool calls get error
    /// results (so every tool call has one), then the `TurnEnd`. The oldest queued input's turn
    /// starts in the same commit.
    async fn end_turn(
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
        let in_flight = self.in_flight.take();
        for call in pending {
            let maybe_ran = call.started || in_flight.as_deref() == Some(call.id.as_str());
            let content = if maybe_ran {
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

    /// Commits `payloads` (as the next entries) with `state`, fenced by this actor's epoch.
    /// Retryable failures are retried with backoff; anything else ends the actor.
    async fn commit(&mut self, payloads: Vec<EntryPayload>, state: TurnState) -> Result<CommitAck> {
        let at_ms = if payloads.is_empty() { 0 } else { now_ms() };
        let entries: Vec<Entry> = payloads
            .into_iter()
            .enumerate()
            .map(|(i, payload)| {
                let seq = self.seq + 1 + i as u64;
                Entry {
                    seq,
                    parent: (seq > 1).then(|| seq - 1),
                    at_ms,
                    payload,
                }
            })
            .collect();
        let batch = CommitBatch { entries, state };
        let mut attempt = 0;
        let ack = loop {
            match self
                .store
                .commit(&self.id, self.epoch, self.seq, &batch)
                .await
            {
                Ok(ack) => break ack,
                Err(e)
                    if e.is_retryable()
                        && !matches!(e, Error::Conflict { .. })
                        && attempt < COMMIT_RETRIES =>
                {
                    attempt += 1;
                    warn!(error = %e, attempt, "commit failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
                Err(e) => return Err(e),
            }
        };
        if let CommitAck::Applied { seq } = ack {
            debug!(seq, entries = batch.entries.len(), "committed");
            let CommitBatch { entries, state } = batch;
            let new_turn = state.turn.as_ref().map(|t| &t.input_id)
                != self.state.turn.as_ref().map(|t| &t.input_id);
            self.seq = seq;
            self.state = state;
            if new_turn {
                self.deadline = self.state.turn.as_ref().map(|t| self.deadline_for(t));
            }
            for entry in entries {
                self.conv.push(&entry);
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
                    _ => {}
                }
                self.emit_entry(entry);
            }
        }
        Ok(ack)
    }

    fn deadline_for(&self, turn: &ActiveTurn) -> Instant {
        let limit = self.config.template.limits.turn_deadline_ms;
        let elapsed = now_ms().saturating_sub(turn.started_at_ms);
        Instant::now() + Duration::from_millis(limit.saturating_sub(elapsed))
    }

    fn emit(&self, event: TurnEvent) {
        if let Some(tx) = &self.events
            && tx.receiver_count() > 0
        {
            let _ = tx.send(event);
        }
    }

    fn emit_entry(&self, entry: Entry) {
        if let Some(tx) = &self.events
            && tx.receiver_count() > 0
        {
            let _ = tx.send(TurnEvent::Entry(Arc::new(entry)));
        }
    }

    async fn handle(&mut self, cmd: Command) -> Result<Flow> {
        match cmd {
            Command::Send { input, reply } => self.accept(*input, reply).await,
            Command::Subscribe { after, reply } => {
                // A read must not come from an actor another node has superseded: check the
                // epoch (subscriptions are rare; a load is cheap next to a stale stream).
                match self.store.load(&self.id).await {
                    Ok(Some(record)) if record.epoch != self.epoch => {
                        let e = Error::Fenced {
                            session: self.id.clone(),
                            epoch: self.epoch,
                            current: record.epoch,
                        };
                        let _ = reply.send(Err(e.clone()));
                        return Err(e);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return Ok(Flow::Continue);
                    }
                }
                let tx = self
                    .events
                    .get_or_insert_with(|| broadcast::channel(EVENT_CAPACITY).0);
                let rx = tx.subscribe();
                // Replay is read while no commit can interleave (we are the writer), so the
                // subscriber sees each seq once: replayed up to `self.seq`, live after it.
                let replay = read_entries(&*self.store, &self.id, after, self.seq).await;
                let _ = reply.send(replay.map(|r| (r, rx)));
                Ok(Flow::Continue)
            }
            Command::Cancel { reply } => {
                let running = self.state.turn.is_some();
                if running {
                    self.cancel = Some(TurnStatus::Cancelled);
                }
                let _ = reply.send(running);
                Ok(Flow::DropModelStep)
            }
            Command::Stop { reply } => {
                let result = self.close().await;
                let failed = result.is_err();
                let _ = reply.send(result);
                Ok(Flow::Exit(if failed {
                    Exit::Failed
                } else {
                    Exit::Release
                }))
            }
            Command::Passivate { reply } => {
                // Graceful: a step in flight reaches its boundary and is committed first, so a
                // hand-off never turns a running tool call into one in doubt. The reply comes
                // once the placement is released.
                self.draining.push(reply);
                Ok(Flow::Drain)
            }
        }
    }

    async fn accept(
        &mut self,
        input: InputRequest,
        reply: oneshot::Sender<Result<TurnOutcome>>,
    ) -> Result<Flow> {
        let limits = self.config.template.limits;
        // An input is user text: tool blocks are the engine's to write, and an empty input would
        // sit in every later model request.
        let valid = !input.content.is_empty()
            && input
                .content
                .iter()
                .all(|b| matches!(b, ContentBlock::Text { text } if !text.is_empty()));
        if !valid {
            let _ = reply.send(Err(Error::invalid_input(
                Some(&self.id),
                "an input must be one or more non-empty text blocks",
            )));
            return Ok(Flow::Continue);
        }
        let size: usize = input.content.iter().map(content_size).sum();
        if size > limits.max_input_bytes {
            let _ = reply.send(Err(Error::InputTooLarge {
                session: self.id.clone(),
                size,
                limit: limits.max_input_bytes,
            }));
            return Ok(Flow::Continue);
        }
        if self.inputs.contains_key(&input.input_id) {
            // Resubmission: the original outcome, never a second append.
            match self.original_outcome(&input.input_id).await {
                Ok(Some(outcome)) => {
                    let _ = reply.send(outcome.into_result());
                }
                Ok(None) => self.waiters.entry(input.input_id).or_default().push(reply),
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
                // Drop the reply (the caller retries) and let a fresh actor reload.
                return Err(Error::Internal(format!(
                    "session {}: store holds input {input_id} this actor did not load",
                    self.id
                )));
            }
            Err(e) => {
                let _ = reply.send(Err(e.clone()));
                // Only a lost session (fenced, diverged, store unreachable) ends the actor;
                // an input the store refuses concerns its sender alone.
                let fatal = matches!(e, Error::Fenced { .. } | Error::Conflict { .. })
                    || e.is_retryable()
                    || matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::Internal);
                return if fatal { Err(e) } else { Ok(Flow::Continue) };
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
        let Some(ended) = self.ended.get(input_id) else {
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
        Ok(Some(TurnOutcome {
            session: self.id.clone(),
            input_id: input_id.clone(),
            status: ended.status.clone(),
            message,
            usage: ended.usage,
            end_seq: ended.end_seq,
        }))
    }

    /// Closes the session: the running turn and queued inputs end as cancelled, then the store
    /// marks it terminal.
    async fn close(&mut self) -> Result<()> {
        while self.state.turn.is_some() {
            self.end_turn(TurnStatus::Cancelled, Vec::new(), None)
                .await?;
        }
        self.store.mark_terminal(&self.id, self.epoch).await
    }
}

struct SlotGuard {
    live: Weak<LiveSessions>,
    id: SessionId,
    generation: u64,
    registry: Arc<dyn SessionRegistry>,
    node: NodeId,
    /// Set once `shutdown` ran; an actor dropped before that was aborted or panicked.
    released: bool,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Some(live) = self.live.upgrade() {
            live.finish(&self.id, self.generation);
        }
        // A panic (not an abort, which stands for a crash) still releases the placement, so
        // the next request can place the session at once instead of after a lease lapse.
        if !self.released
            && std::thread::panicking()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            let (registry, id, node) = (self.registry.clone(), self.id.clone(), self.node.clone());
            handle.spawn(async move {
                let _ = registry.unregister(&id, &node).await;
            });
        }
    }
}

enum Flow {
    Continue,
    DropModelStep,
    /// Passivate once the step in flight (if any) is committed.
    Drain,
    Exit(Exit),
}

fn new_turn(q: &QueuedInput) -> ActiveTurn {
    ActiveTurn {
        input_id: q.input_id.clone(),
        input_seq: q.seq,
        steps: 0,
        usage: Usage::default(),
        started_at_ms: now_ms(),
        answer_seq: None,
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

fn content_size(block: &ContentBlock) -> usize {
    // Inputs are text only (checked before the size), so only text counts.
    match block {
        ContentBlock::Text { text } => text.len(),
        _ => 0,
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
