//! One node's wiring — store, registry, catalog, credentials, live actors — and [`Sessions`], the
//! handle users call.
//!
//! Sessions are lazy: `start` only writes the session to the store; the first `send` (or
//! `resume`) registers it, activates it in the store (bumping its epoch), rebuilds its
//! configuration and spawns its actor, which continues any interrupted turn. An actor idle for
//! `idle_timeout` passivates: it releases its placement and its task ends.
//!
//! This file holds the handle and its calls; `slots` holds the whole lifecycle of a session's
//! slot on this node — activation, the live map, and the release when an actor ends; `restart`
//! brings back an eager session whose actor failed.

mod restart;
mod slots;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::oneshot;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::bounded::{BoundedRegistry, BoundedStore};
use crate::catalog::TemplateCatalog;
use crate::credentials::{CredentialProvider, Credentials, EnvCredentials, FromClient};
use crate::engine::{
    ActorHandle, Command, InputRequest, TurnEvent, TurnOutcome, check_input, input_size,
    read_entries, stored_outcome,
};
use crate::error::{Error, Result};
use crate::model::{ContentBlock, Entry, InputId, NodeId, Seq, SessionId};
use crate::registry::{LocalRegistry, SessionRegistry};
use crate::store::{InMemoryStore, NewSession, OwnerFilter, SessionStore};
use slots::LiveSessions;

/// A user input: content plus an optional client-chosen [`InputId`] that makes resubmission
/// idempotent. Without one, the runtime generates an id (so its own retries stay idempotent).
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    /// The client's id for this input.
    pub id: Option<InputId>,
    /// The content.
    pub content: Vec<ContentBlock>,
}

impl Input {
    /// A text input.
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            id: None,
            content: vec![ContentBlock::text(text)],
        }
    }

    /// Sets the input id.
    pub fn with_id(mut self, id: InputId) -> Self {
        self.id = Some(id);
        self
    }
}

impl From<&str> for Input {
    fn from(s: &str) -> Self {
        Input::text(s)
    }
}

impl From<String> for Input {
    fn from(s: String) -> Self {
        Input::text(s)
    }
}

/// Options of [`Sessions::start_with`].
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// The session id (generated when absent).
    pub id: Option<SessionId>,
    /// Credentials handed over by the client; needs a runtime built with
    /// [`SessionsBuilder::credentials_from_client`].
    pub credentials: Option<Credentials>,
}

/// A stream of a session's events: committed entries after the seq asked for, then live events.
/// It ends when the session's actor stops (passivation, close); subscribe again with the last seq
/// seen to continue.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<TurnEvent>> + Send>>;

struct Inner {
    node: NodeId,
    store: Arc<dyn SessionStore>,
    registry: Arc<dyn SessionRegistry>,
    catalog: TemplateCatalog,
    credentials: Arc<dyn CredentialProvider>,
    from_client: Option<FromClient>,
    live: Arc<LiveSessions>,
    idle_timeout: Duration,
    mailbox: usize,
    send_timeout: Duration,
    /// Whether new activations are allowed. A cluster node clears it while it drains or while
    /// its lease is in doubt, so that no retry inside `send` places a session here again.
    accepting: AtomicBool,
    /// Asked before every commit; see [`SessionsBuilder::commit_gate`].
    gate: Option<CommitGate>,
    /// When an eager session's actor fails, how long before it is resumed here.
    restarts: restart::Restarts,
}

/// A check every actor of a runtime makes before each commit: `Err` and the commit is not
/// sent (the actor retries a few times, then exits with that error). See
/// [`SessionsBuilder::commit_gate`].
pub type CommitGate = Arc<dyn Fn() -> Result<()> + Send + Sync>;

/// Builds a [`Sessions`] runtime.
pub struct SessionsBuilder {
    node: Option<NodeId>,
    store: Option<Arc<dyn SessionStore>>,
    registry: Option<Arc<dyn SessionRegistry>>,
    catalog: TemplateCatalog,
    credentials: Option<Arc<dyn CredentialProvider>>,
    from_client: Option<FromClient>,
    idle_timeout: Duration,
    mailbox: usize,
    send_timeout: Duration,
    gate: Option<CommitGate>,
    call_timeout: Duration,
    restart: restart::RestartPolicy,
}

impl std::fmt::Debug for SessionsBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionsBuilder")
            .field("node", &self.node)
            .field("idle_timeout", &self.idle_timeout)
            .field("mailbox", &self.mailbox)
            .finish_non_exhaustive()
    }
}

impl SessionsBuilder {
    /// This node's id (default: `local` with a fresh incarnation).
    pub fn node(mut self, node: NodeId) -> Self {
        self.node = Some(node);
        self
    }

    /// The store (default: a new [`InMemoryStore`]).
    pub fn store(mut self, store: Arc<dyn SessionStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// The registry (default: a new [`LocalRegistry`]).
    pub fn registry(mut self, registry: Arc<dyn SessionRegistry>) -> Self {
        self.registry = Some(registry);
        self
    }

    /// The credential provider (default: [`EnvCredentials`] without prefix).
    pub fn credentials(mut self, provider: Arc<dyn CredentialProvider>) -> Self {
        self.credentials = Some(provider);
        self
    }

    /// Takes credentials from the client at `start` ([`FromClient`], tier 0 only).
    pub fn credentials_from_client(mut self) -> Self {
        let provider = FromClient::new();
        self.credentials = Some(Arc::new(provider.clone()));
        self.from_client = Some(provider);
        self
    }

    /// How long a live session may sit idle before it passivates (default 5 minutes).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Mailbox depth of each live session (default 64).
    pub fn mailbox(mut self, depth: usize) -> Self {
        self.mailbox = depth.max(1);
        self
    }

    /// How long `send` waits for room in a full mailbox before `Overloaded` (default 5 s).
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.send_timeout = timeout;
        self
    }

    /// A check made before every commit of every actor of this runtime (default: none).
    ///
    /// A cluster node passes "my lease is surely alive and this is still my incarnation", so
    /// that an actor that wakes from a pause (a stopped process, a long GC-like stall) after
    /// its node lost its lease commits nothing, even before the store's epochs would fence it.
    pub fn commit_gate(mut self, gate: CommitGate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// The bound of every call this runtime makes to its store and registry (default 45 s,
    /// [`DEFAULT_CALL_TIMEOUT`](crate::bounded::DEFAULT_CALL_TIMEOUT)). A call past it ends as a
    /// retryable `Timeout`: an actor's commit confirms and retries it, then gives the session
    /// up (an eager one is resumed, see [`restart_backoff`](Self::restart_backoff)); an
    /// activation fails and its caller may retry. See [`BoundedStore`].
    pub fn store_call_timeout(mut self, bound: Duration) -> Self {
        self.call_timeout = bound;
        self
    }

    /// How an eager session whose actor failed on this node (its commits kept failing through
    /// a store outage, say) is brought back: resumed here after `first`, then after twice as
    /// long at each failure in a row, up to `max` (defaults 500 ms and 30 s). A failure more
    /// than ten minutes after the last starts again from `first`. Lazy sessions are not
    /// resumed: their next request rebuilds them.
    pub fn restart_backoff(mut self, first: Duration, max: Duration) -> Self {
        self.restart = restart::RestartPolicy::new(first, max);
        self
    }

    /// Builds the runtime.
    pub fn build(self) -> Result<Sessions> {
        let node = match self.node {
            Some(n) => n,
            None => NodeId::with_fresh_incarnation("local")?,
        };
        Ok(Sessions {
            inner: Arc::new(Inner {
                node,
                store: BoundedStore::wrap(
                    self.store.unwrap_or_else(|| Arc::new(InMemoryStore::new())),
                    self.call_timeout,
                ),
                registry: BoundedRegistry::wrap(
                    self.registry
                        .unwrap_or_else(|| Arc::new(LocalRegistry::new())),
                    self.call_timeout,
                ),
                catalog: self.catalog,
                credentials: self
                    .credentials
                    .unwrap_or_else(|| Arc::new(EnvCredentials::new())),
                from_client: self.from_client,
                live: Arc::new(LiveSessions::new()),
                idle_timeout: self.idle_timeout,
                mailbox: self.mailbox,
                send_timeout: self.send_timeout,
                accepting: AtomicBool::new(true),
                gate: self.gate,
                restarts: restart::Restarts::new(self.restart),
            }),
        })
    }
}

/// How many times `send` starts over when the session's actor went away under it.
const SEND_ATTEMPTS: usize = 4;

/// The handle users call: start sessions, send input, read history. Cheap to clone.
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("node", &self.inner.node)
            .field("live", &self.live_count())
            .finish_non_exhaustive()
    }
}

impl Sessions {
    /// A builder over `catalog`.
    pub fn builder(catalog: TemplateCatalog) -> SessionsBuilder {
        SessionsBuilder {
            node: None,
            store: None,
            registry: None,
            catalog,
            credentials: None,
            from_client: None,
            idle_timeout: Duration::from_secs(300),
            mailbox: 64,
            send_timeout: Duration::from_secs(5),
            gate: None,
            call_timeout: crate::bounded::DEFAULT_CALL_TIMEOUT,
            restart: restart::RestartPolicy::default(),
        }
    }

    /// This node's id.
    pub fn node(&self) -> &NodeId {
        &self.inner.node
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.inner.store
    }

    /// The catalog.
    pub fn catalog(&self) -> &TemplateCatalog {
        &self.inner.catalog
    }

    /// Allows (default) or refuses new activations on this node. While refused, a request that
    /// needs to activate a session fails with a retryable `Unavailable` naming this node; live
    /// actors keep running until passivated. A cluster node refuses while it drains for shutdown
    /// or while its membership lease is in doubt.
    pub fn set_accepting(&self, accepting: bool) {
        self.inner.accepting.store(accepting, Ordering::SeqCst);
    }

    /// Whether new activations are allowed (see [`set_accepting`](Self::set_accepting)).
    pub fn is_accepting(&self) -> bool {
        self.inner.accepting.load(Ordering::SeqCst)
    }

    /// Whether `id` has a live actor on this node (a cluster routes to it without a registry
    /// lookup; if another node took the session meanwhile, the actor's next commit is fenced).
    pub fn is_live(&self, id: &SessionId) -> bool {
        self.inner.live.is_live(id)
    }

    /// Number of live (activated, not passivated) sessions on this node.
    pub fn live_count(&self) -> usize {
        self.inner.live.live_count()
    }

    /// Creates a session from the catalog's template `template_id`, with a generated id.
    /// No task is started until the first input.
    pub async fn start(&self, template_id: &str) -> Result<SessionId> {
        self.start_with(template_id, StartOptions::default()).await
    }

    /// Creates a session with options.
    ///
    /// # Behavior
    /// - An id that exists is `AlreadyExists`; nothing stored is changed.
    pub async fn start_with(&self, template_id: &str, opts: StartOptions) -> Result<SessionId> {
        let template = self.inner.catalog.template(template_id)?;
        let id = opts.id.unwrap_or_else(SessionId::generate);
        let from_client = match (&opts.credentials, &self.inner.from_client) {
            (Some(_), None) => {
                return Err(Error::Config(
                    "credentials given at start, but this runtime was not built with \
                     credentials_from_client()"
                        .into(),
                ));
            }
            (Some(_), Some(fc)) => Some(fc),
            (None, _) => None,
        };
        self.inner
            .store
            .create(NewSession::from_template(id.clone(), (*template).clone()))
            .await?;
        // Only once the session is ours: a refused start must not replace another session's
        // credentials.
        if let (Some(fc), Some(creds)) = (from_client, opts.credentials) {
            fc.insert(id.clone(), creds);
        }
        Ok(id)
    }

    /// Sends an input and waits for its turn's outcome.
    ///
    /// # Behavior
    /// - Resubmitting an input id returns the original outcome; the input is never appended twice.
    /// - While a turn runs, the input is queued (default), refused with `Busy`, or interrupts the
    ///   turn, as the template's input mode says.
    /// - A full mailbox waits up to the send timeout, then fails with a retryable `Overloaded`.
    /// - A turn that ends other than completed is an error of its kind (`Cancelled`, `Timeout`,
    ///   `MaxSteps`, `Model`).
    /// - A retryable error is an [`Error::Resend`] carrying the input's id (generated when the
    ///   input had none): resend with that id ([`Input::with_id`]), never a fresh one, and the
    ///   input is applied at most once — its first attempt may have been committed.
    /// - A resubmission to a session closed since gets the original outcome, not `SessionClosed`.
    pub async fn send(&self, id: &SessionId, input: impl Into<Input>) -> Result<TurnOutcome> {
        let input = input.into();
        let input_id = input.id.unwrap_or_else(InputId::generate);
        match self.send_input(id, &input_id, input.content).await {
            Err(Error::SessionClosed { session }) => {
                match self.closed_outcome(&session, &input_id).await? {
                    Some(outcome) => outcome.into_result(),
                    None => Err(Error::SessionClosed { session }),
                }
            }
            other => other.map_err(|e| e.for_input(&input_id)),
        }
    }

    /// The outcome a closed session recorded for `input_id`, if that input ran there.
    async fn closed_outcome(
        &self,
        id: &SessionId,
        input_id: &InputId,
    ) -> Result<Option<TurnOutcome>> {
        let entries = self.history_all(id).await?;
        Ok(stored_outcome(id, &entries, input_id))
    }

    /// `send`, with its input's id settled.
    async fn send_input(
        &self,
        id: &SessionId,
        input_id: &InputId,
        content: Vec<ContentBlock>,
    ) -> Result<TurnOutcome> {
        let input_id = input_id.clone();
        // Refused before activation: a bad input must not bump the session's epoch.
        check_input(&content).map_err(|reason| Error::invalid_input(Some(id), reason))?;
        let size = input_size(&content);
        let mut content = Some(content);
        let mut reason = None;
        for _ in 0..SEND_ATTEMPTS {
            let handle = self.live_handle(id, Some(size)).await?;
            let (reply, rx) = oneshot::channel();
            let body = match content.take() {
                Some(c) => c,
                None => return Err(Error::Internal("input content lost".into())),
            };
            let cmd = Command::Send {
                input: Box::new(InputRequest {
                    input_id: input_id.clone(),
                    content: body.clone(),
                }),
                reply,
            };
            content = Some(body);
            if !self.deliver(id, &handle, cmd).await? {
                self.gone(id, &handle, &mut reason)?;
                continue;
            }
            match rx.await {
                Ok(Ok(outcome)) => return Ok(outcome),
                Ok(Err(Error::Conflict { .. })) => {
                    self.inner.live.remove_stale(id, handle.generation);
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    // The actor stopped before answering; a fresh one will know the input's fate.
                    self.gone(id, &handle, &mut reason)?;
                    tokio::task::yield_now().await;
                }
            }
        }
        Err(gave_up(id, reason))
    }

    /// Called when `handle`'s actor went away without answering. A fenced actor's reason is the
    /// answer: the session has a new owner, a retry here would take it back from it, and a
    /// cluster re-routes on `Fenced`. Any other reason is kept in `reason`, to report if every
    /// retry fails too; with none (a passivation raced the call) the caller just retries.
    fn gone(&self, id: &SessionId, handle: &ActorHandle, reason: &mut Option<Error>) -> Result<()> {
        self.inner.live.remove_stale(id, handle.generation);
        match handle.exit_reason() {
            Some(e @ Error::Fenced { .. }) => Err(e.clone()),
            Some(e) => {
                *reason = Some(e.clone());
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Puts `cmd` in the actor's mailbox. `Ok(false)`: the actor is gone (see
    /// [`gone`](Self::gone)).
    async fn deliver(&self, id: &SessionId, handle: &ActorHandle, cmd: Command) -> Result<bool> {
        use tokio::sync::mpsc::error::{SendTimeoutError, TrySendError};
        let cmd = match handle.tx.try_send(cmd) {
            Ok(()) => return Ok(true),
            Err(TrySendError::Closed(_)) => return Ok(false),
            Err(TrySendError::Full(cmd)) => cmd,
        };
        match handle.tx.send_timeout(cmd, self.inner.send_timeout).await {
            Ok(()) => Ok(true),
            Err(SendTimeoutError::Timeout(_)) => Err(Error::Overloaded {
                session: id.clone(),
                what: format!(
                    "mailbox of {} commands stayed full for {:?}",
                    self.inner.mailbox, self.inner.send_timeout
                ),
            }),
            Err(SendTimeoutError::Closed(_)) => Ok(false),
        }
    }

    /// Sends a command that needs a live actor and a reply, retrying if the actor goes away.
    async fn ask<T>(
        &self,
        id: &SessionId,
        make: impl Fn(oneshot::Sender<T>) -> Command,
    ) -> Result<T> {
        let mut reason = None;
        for _ in 0..SEND_ATTEMPTS {
            let handle = self.live_handle(id, None).await?;
            let (reply, rx) = oneshot::channel();
            if !self.deliver(id, &handle, make(reply)).await? {
                self.gone(id, &handle, &mut reason)?;
                continue;
            }
            match rx.await {
                Ok(v) => return Ok(v),
                Err(_) => self.gone(id, &handle, &mut reason)?,
            }
        }
        Err(gave_up(id, reason))
    }

    /// Committed entries with seq greater than `after`, at most `limit`. Reads the store alone:
    /// needs no credentials, template or live actor.
    pub async fn history(&self, id: &SessionId, after: Seq, limit: usize) -> Result<Vec<Entry>> {
        self.inner.store.entries(id, after, limit).await
    }

    /// Every committed entry of the session. Reads entries only, so a session whose record is
    /// damaged can still be exported.
    pub async fn history_all(&self, id: &SessionId) -> Result<Vec<Entry>> {
        read_entries(&*self.inner.store, id, 0, Seq::MAX).await
    }

    /// Subscribes to a session's events after `after`: committed entries first, then live ones
    /// and progress events, each entry once. Activates the session if needed.
    pub async fn subscribe(&self, id: &SessionId, after: Seq) -> Result<EventStream> {
        let (replay, rx) = self
            .ask(id, |reply| Command::Subscribe { after, reply })
            .await??;
        let last = replay.last().map(|e| e.seq).unwrap_or(after);
        let replay = futures::stream::iter(
            replay
                .into_iter()
                .map(|e| Ok(TurnEvent::Entry(Arc::new(e)))),
        );
        let session = id.clone();
        let live = BroadcastStream::new(rx).filter_map(move |item| {
            let out = match item {
                Ok(ev) if ev.seq().is_some_and(|s| s <= last) => None,
                Ok(ev) => Some(Ok(ev)),
                Err(BroadcastStreamRecvError::Lagged(n)) => Some(Err(Error::Overloaded {
                    session: session.clone(),
                    what: format!(
                        "subscriber fell {n} events behind; subscribe again from the last seq seen"
                    ),
                })),
            };
            futures::future::ready(out)
        });
        Ok(Box::pin(replay.chain(live)))
    }

    /// Cancels the running turn (a model call at once, a tool call at its end). Returns whether a
    /// turn was running.
    ///
    /// A session not live on this node has no running turn here: the answer is `false`, and
    /// nothing is activated (activating would fence a live owner elsewhere).
    pub async fn cancel(&self, id: &SessionId) -> Result<bool> {
        self.cancel_inner(id, None).await
    }

    /// Cancels the turn of input `input_id` if it is the one running; any other turn runs on
    /// (`Ok(false)`). Safe to resend: a retried cancel never hits the next turn.
    pub async fn cancel_turn(&self, id: &SessionId, input_id: &InputId) -> Result<bool> {
        self.cancel_inner(id, Some(input_id.clone())).await
    }

    async fn cancel_inner(&self, id: &SessionId, turn: Option<InputId>) -> Result<bool> {
        let Some(handle) = self.inner.live.live(id) else {
            return Ok(false);
        };
        let (reply, rx) = oneshot::channel();
        let running = match self
            .deliver(id, &handle, Command::Cancel { turn, reply })
            .await?
        {
            true => rx.await.ok(),
            false => None,
        };
        match running {
            Some(running) => Ok(running),
            // Its turn went with it; but a fenced actor's turn runs on the new owner.
            None => self.gone(id, &handle, &mut None).map(|()| false),
        }
    }

    /// Closes the session for good: the running turn and queued inputs end as cancelled, the store
    /// marks it terminal. Its history stays readable.
    ///
    /// # Behavior
    /// - Idempotent: stopping a closed session is `Ok`.
    pub async fn stop(&self, id: &SessionId) -> Result<()> {
        let result = match self.ask(id, |reply| Command::Stop { reply }).await {
            Ok(r) => r,
            Err(e) => Err(e),
        };
        match result {
            Err(Error::SessionClosed { .. }) | Ok(()) => {
                if let Some(fc) = &self.inner.from_client {
                    fc.remove(id);
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Makes the session live on this node, continuing an interrupted turn.
    pub async fn resume(&self, id: &SessionId) -> Result<()> {
        self.live_handle(id, None).await.map(|_| ())
    }

    /// Resumes every resumable (eager, mid-turn) session last owned by `owner`, or every one.
    /// Returns how many it resumed; one failing does not stop the others.
    pub async fn resume_interrupted(&self, owner: &OwnerFilter) -> Result<usize> {
        let mut cursor: Option<SessionId> = None;
        let mut resumed = 0;
        loop {
            let page = self
                .inner
                .store
                .list_resumable(owner, cursor.as_ref(), 256)
                .await?;
            for s in &page.sessions {
                match self.resume(&s.id).await {
                    Ok(()) => resumed += 1,
                    Err(e) => tracing::warn!(session = %s.id, error = %e, "could not resume"),
                }
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => return Ok(resumed),
            }
        }
    }

    /// Passivates a live session now (it keeps everything committed; the next request rebuilds
    /// it). Returns whether it was live.
    pub async fn passivate(&self, id: &SessionId) -> bool {
        let Some(handle) = self.inner.live.live(id) else {
            return false;
        };
        let (reply, rx) = oneshot::channel();
        if handle.tx.send(Command::Passivate { reply }).await.is_err() {
            return false;
        }
        rx.await.is_ok()
    }

    /// Passivates every live session (graceful shutdown): committed work stays, placements are
    /// released so the next request can run anywhere.
    ///
    /// # Behavior
    /// - Stops taking new activations first (`set_accepting(false)`), so a retried request
    ///   cannot bring a session back here.
    /// - Each step in flight reaches its boundary and is committed before its session passivates.
    /// - Returns once every placement is released.
    pub async fn shutdown(&self) {
        self.inner.accepting.store(false, Ordering::SeqCst);
        loop {
            let (handles, starting) = self.inner.live.snapshot();
            if handles.is_empty() && starting.is_empty() {
                return;
            }
            let waits = handles.into_iter().map(|h| async move {
                let (reply, rx) = oneshot::channel();
                if h.tx.send(Command::Passivate { reply }).await.is_ok() {
                    let _ = rx.await;
                }
            });
            futures::future::join_all(waits).await;
            for mut rx in starting {
                let _ = rx.changed().await;
            }
        }
    }

    /// Aborts a live session's task at once, as a crash would: no cleanup, no release. For fault
    /// tests; a real service wants [`passivate`](Self::passivate).
    pub fn kill(&self, id: &SessionId) -> bool {
        self.inner.live.kill(id)
    }

    /// Stops taking activations and aborts every live actor at once, as a crash would: no
    /// actor takes another step, none releases its placement. Returns how many it aborted.
    ///
    /// This is how a cluster node fences itself when it finds its lease lost: other nodes may
    /// already run its sessions, so nothing of this runtime may commit again. A store call an
    /// actor had already sent may still land; the store's epochs fence whatever comes later.
    pub fn kill_all(&self) -> usize {
        self.inner.accepting.store(false, Ordering::SeqCst);
        self.inner.live.kill_all()
    }
}

/// The error of a call whose every attempt found the actor gone: the last reason an actor gave,
/// or, when passivations alone raced it, that the actor kept stopping.
fn gave_up(id: &SessionId, reason: Option<Error>) -> Error {
    reason.unwrap_or_else(|| Error::Unavailable {
        backend: "session actor",
        message: format!("session {id}: its actor stopped {SEND_ATTEMPTS} times in a row"),
    })
}
