//! The actor loop: one tokio task owning a live session, like tower's `buffer` worker.
//!
//! Commands arrive on a bounded mpsc with a oneshot reply each. The current step of a turn (a
//! model call or a tool call) is a boxed future that owns what it needs, so the loop keeps
//! serving commands — queued input, cancellation, subscriptions — while it runs, and commits the
//! step's result when it completes. An idle actor passivates after its timeout. When the loop
//! ends it reports why ([`Exited`]); the runtime, which owns the session's slot, does the release.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::turn::{StepFuture, StepKind};
use super::view::{SessionView, read_entries};
use super::{TurnEvent, TurnOutcome, TurnState};
use crate::catalog::SessionConfig;
use crate::error::{Error, Result};
use crate::model::{ContentBlock, Entry, Epoch, InputId, Seq, SessionId, TurnStatus};
use crate::store::{SessionRecord, SessionStore};

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
        /// Only this input's turn; `None`: whatever turn runs.
        turn: Option<InputId>,
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
    /// Why the actor ended, when an error ended it; set before its mailbox closes, so a caller
    /// that finds the mailbox closed or its reply dropped hears the reason (as tower's `buffer`
    /// keeps its worker's error) instead of "the actor stopped".
    pub(crate) exit: Arc<OnceLock<Error>>,
}

impl ActorHandle {
    /// The error that ended the actor, if one did (none while it runs or after a passivation).
    pub(crate) fn exit_reason(&self) -> Option<&Error> {
        self.exit.get()
    }
}

/// Everything an actor needs to serve an activated session.
pub(crate) struct ActorParams {
    pub(crate) record: SessionRecord,
    pub(crate) entries: Vec<Entry>,
    pub(crate) config: SessionConfig,
    pub(crate) store: Arc<dyn SessionStore>,
    pub(crate) idle_timeout: Duration,
    pub(crate) gate: Option<crate::runtime::CommitGate>,
}

/// Capacity of the event channel (created on first subscription).
const EVENT_CAPACITY: usize = 1024;

/// Commands served back to back (the mailbox never empty in between) before the step in flight
/// and the turn deadline are looked at first once. Commands go first otherwise — a cancellation
/// or an interrupting input must not wait behind a step that is ready — but a steady stream of
/// them (a reconnect storm of subscribers) would then starve the turn and its deadline forever.
const COMMANDS_BEFORE_PROGRESS: u32 = 16;

/// Why the actor loop ended.
pub(crate) enum Exit {
    /// Idle timeout, `Passivate`, or `Stop`: release the registry placement.
    Release,
    /// Every handle was dropped (runtime gone).
    Dropped,
    /// Another writer holds the session now: leave its placement alone.
    Fenced(Error),
    /// A store or engine failure: give the session up; the next request rebuilds it.
    Failed(Error),
}

/// What the loop hands the runtime when it ends.
pub(crate) struct Exited {
    pub(crate) why: Exit,
    /// Passivation requests, answered once the placement is released ("passivated" means
    /// released).
    pub(crate) passivated: Vec<oneshot::Sender<()>>,
}

/// A live session's state. The turn steps (`turn`) and input acceptance (`input`) are further
/// `impl` blocks over it, hence the `pub(super)` fields.
pub(crate) struct Actor {
    pub(super) id: SessionId,
    pub(super) epoch: Epoch,
    pub(super) seq: Seq,
    pub(super) state: TurnState,
    pub(super) view: SessionView,
    pub(super) config: SessionConfig,
    pub(super) store: Arc<dyn SessionStore>,
    idle_timeout: Duration,
    /// Asked before every commit (a cluster node's lease check).
    pub(super) gate: Option<crate::runtime::CommitGate>,
    /// The tool call whose step is in flight (so an abandoned one is reported in doubt).
    pub(super) in_flight: Option<String>,
    /// Passivation requests waiting for the step in flight to reach its boundary.
    draining: Vec<oneshot::Sender<()>>,
    /// Callers waiting for the turn of their input (a resubmission waits beside the original).
    pub(super) waiters: HashMap<InputId, Vec<oneshot::Sender<Result<TurnOutcome>>>>,
    /// The event channel (created on the first subscription, so a session without subscribers
    /// pays for none) and what the model step in flight has streamed, shared with that step.
    pub(super) live: Arc<Live>,
    /// A cancellation waiting for the next boundary.
    pub(super) cancel: Option<TurnStatus>,
    /// When the current turn must end.
    pub(super) deadline: Option<Instant>,
    /// The turn timed on this node: its input, when this node started timing it, and how long
    /// it had run by then (see `ActiveTurn::ran_ms`).
    pub(super) turn_clock: Option<(InputId, Instant, u64)>,
}

/// What the actor shares with its model step: the event channel, so deltas reach subscribers
/// as they stream (a subscriber that arrives mid-call gets the rest), and the text streamed so
/// far, so a turn cut short mid-stream keeps it (an incomplete response) instead of losing it.
#[derive(Default)]
pub(crate) struct Live {
    pub(super) events: OnceLock<broadcast::Sender<TurnEvent>>,
    /// Tries of model calls made by this actor (numbers [`Attempt`](super::Attempt)s).
    attempts: AtomicU32,
    /// Text blocks streamed by the try in flight, by block index. std `Mutex`: held for an
    /// append, never across an await.
    partial: Mutex<Vec<(u32, String)>>,
}

impl Live {
    /// Whether anyone listens.
    pub(super) fn listened(&self) -> bool {
        self.events.get().is_some_and(|tx| tx.receiver_count() > 0)
    }

    pub(super) fn emit(&self, event: TurnEvent) {
        if let Some(tx) = self.events.get()
            && tx.receiver_count() > 0
        {
            let _ = tx.send(event);
        }
    }

    /// A new try of a model call: its number, and nothing streamed yet.
    pub(super) fn next_attempt(&self) -> u32 {
        self.partial_text().clear();
        self.attempts.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Appends streamed text to block `index`.
    pub(super) fn push_text(&self, index: u32, text: &str) {
        let mut partial = self.partial_text();
        match partial.last_mut() {
            Some((i, buf)) if *i == index => buf.push_str(text),
            _ => partial.push((index, text.to_owned())),
        }
    }

    /// Takes the text streamed so far (empty once taken).
    pub(super) fn take_partial(&self) -> Vec<(u32, String)> {
        std::mem::take(&mut *self.partial_text())
    }

    fn partial_text(&self) -> std::sync::MutexGuard<'_, Vec<(u32, String)>> {
        // A panic while appending leaves a valid Vec: the poison carries no broken invariant.
        self.partial.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a handled command asks of the loop.
pub(super) enum Flow {
    Continue,
    DropModelStep,
    /// Passivate once the step in flight (if any) is committed.
    Drain,
    Exit(Exit),
}

impl Actor {
    /// Rehydrates the actor of an activated session from its record and committed entries.
    pub(crate) fn new(params: ActorParams) -> Self {
        let mut actor = Actor {
            id: params.record.id,
            epoch: params.record.epoch,
            seq: params.record.seq,
            state: params.record.state,
            view: SessionView::from_entries(&params.entries),
            config: params.config,
            store: params.store,
            idle_timeout: params.idle_timeout,
            gate: params.gate,
            in_flight: None,
            draining: Vec::new(),
            waiters: HashMap::new(),
            live: Arc::default(),
            cancel: None,
            deadline: None,
            turn_clock: None,
        };
        actor.time_turn();
        actor
    }

    /// Serves commands and runs turns until the actor must stop, and says why. `retire_idle` is
    /// the runtime's: asked when the idle timeout fires, it closes the mailbox and returns true
    /// unless commands wait in it.
    ///
    /// The actor itself outlives the loop so that callers waiting on a turn are only dropped
    /// (and retry) once the runtime has closed the mailbox.
    pub(crate) async fn run(
        &mut self,
        rx: &mut mpsc::Receiver<Command>,
        mut retire_idle: impl FnMut(&mut mpsc::Receiver<Command>) -> bool,
    ) -> Exited {
        if self.state.has_work() {
            debug!(seq = self.seq, "resuming interrupted turn");
        }
        let mut step: Option<(StepKind, StepFuture)> = None;
        // Commands served since the mailbox was last found empty or a step or deadline fired.
        let mut served: u32 = 0;
        let why = 'main: loop {
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
            let progress_first = served >= COMMANDS_BEFORE_PROGRESS;
            tokio::select! {
                biased;
                cmd = rx.recv(), if !progress_first => {
                    let Some(cmd) = cmd else { break 'main Exit::Dropped };
                    let model_in_flight = matches!(step, Some((StepKind::Model, _)));
                    match Box::pin(self.handle(cmd)).await {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::DropModelStep) => if model_in_flight { step = None },
                        Ok(Flow::Drain) => if step.is_none() { break 'main Exit::Release },
                        Ok(Flow::Exit(exit)) => break 'main exit,
                        Err(e) => break 'main self.exit_for(e),
                    }
                    served = if rx.is_empty() { 0 } else { served + 1 };
                    if served >= COMMANDS_BEFORE_PROGRESS {
                        // Yielded so the step is next polled with a fresh cooperative budget:
                        // after a run of commands the budget may be spent, and a spent budget
                        // makes even a finished timer or socket read look pending.
                        tokio::task::yield_now().await;
                    }
                }
                res = async { step.as_mut().expect("guarded").1.as_mut().await }, if step.is_some() => {
                    served = 0;
                    step = None;
                    if let Err(e) = Box::pin(self.finish_step(res)).await {
                        break 'main self.exit_for(e);
                    }
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    // A hard deadline: the step in flight is abandoned (a tool call in flight is
                    // then in doubt, and recorded so).
                    served = 0;
                    step = None;
                    if let Err(e) = Box::pin(self.end_turn(TurnStatus::TimedOut, Vec::new(), None)).await {
                        break 'main self.exit_for(e);
                    }
                }
                _ = tokio::time::sleep(self.idle_timeout), if idle => {
                    if retire_idle(rx) {
                        break 'main Exit::Release;
                    }
                }
                () = std::future::ready(()), if progress_first => {
                    // The step and the deadline had their look and neither was ready: back to
                    // the commands.
                    served = 0;
                }
            }
        };
        Exited {
            why,
            passivated: std::mem::take(&mut self.draining),
        }
    }

    /// Maps an error that ends the actor to how it ends, failing every waiting caller with it.
    fn exit_for(&mut self, e: Error) -> Exit {
        for (_, waiters) in self.waiters.drain() {
            for w in waiters {
                let _ = w.send(Err(e.clone()));
            }
        }
        Self::exit_alone(e)
    }

    /// Maps an error that ends the actor to how it ends, answering no waiter: for an error that
    /// belongs to one request, which that request's caller has been given. The other waiters'
    /// replies are dropped with the actor, after the runtime closed its mailbox, so their
    /// `send` retries on a fresh actor, which knows their inputs' fates.
    pub(super) fn exit_alone(e: Error) -> Exit {
        if matches!(e, Error::Fenced { .. }) {
            debug!(error = %e, "fenced: another writer owns the session");
            Exit::Fenced(e)
        } else {
            warn!(error = %e, "session actor giving the session up");
            Exit::Failed(e)
        }
    }

    pub(super) fn emit(&self, event: TurnEvent) {
        self.live.emit(event);
    }

    pub(super) fn emit_entry(&self, entry: Entry) {
        if self.live.listened() {
            self.live.emit(TurnEvent::Entry(Arc::new(entry)));
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
                    .live
                    .events
                    .get_or_init(|| broadcast::channel(EVENT_CAPACITY).0);
                let rx = tx.subscribe();
                // Replay is read while no commit can interleave (we are the writer), so the
                // subscriber sees each seq once: replayed up to `self.seq`, live after it.
                let replay = read_entries(&*self.store, &self.id, after, self.seq).await;
                let _ = reply.send(replay.map(|r| (r, rx)));
                Ok(Flow::Continue)
            }
            Command::Cancel { turn, reply } => {
                // A cancel naming a turn is a no-op for any other: a cancel re-sent after a
                // retryable failure must not cancel the turn that started since.
                let running = self
                    .state
                    .turn
                    .as_ref()
                    .is_some_and(|t| turn.as_ref().is_none_or(|want| *want == t.input_id));
                if running {
                    self.cancel = Some(TurnStatus::Cancelled);
                }
                let _ = reply.send(running);
                Ok(Flow::DropModelStep)
            }
            Command::Stop { reply } => {
                let result = self.close().await;
                let exit = match &result {
                    Ok(()) => Exit::Release,
                    Err(e) => Exit::Failed(e.clone()),
                };
                let _ = reply.send(result);
                Ok(Flow::Exit(exit))
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
}
