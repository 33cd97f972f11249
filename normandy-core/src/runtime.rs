//! One node's wiring — store, registry, catalog, credentials, live actors — and [`Sessions`], the
//! handle users call.
//!
//! Sessions are lazy: `start` only writes the session to the store; the first `send` (or
//! `resume`) registers it, activates it in the store (bumping its epoch), rebuilds its
//! configuration and spawns its actor, which continues any interrupted turn. An actor idle for
//! `idle_timeout` passivates: it releases its placement and its task ends.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use std::panic::AssertUnwindSafe;

use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::catalog::TemplateCatalog;
use crate::credentials::{CredentialProvider, Credentials, EnvCredentials, FromClient};
use crate::engine::{
    ActorHandle, ActorParams, Command, InputRequest, TurnEvent, TurnOutcome, read_entries,
    spawn_actor,
};
use crate::error::{Error, Result};
use crate::model::{ContentBlock, Entry, InputId, NodeId, Seq, SessionId};
use crate::registry::{LocalRegistry, SessionRegistry};
use crate::store::{InMemoryStore, NewSession, OwnerFilter, SessionStore};

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

enum Slot {
    Live(ActorHandle),
    /// An activation is under way; waiters watch for it to finish.
    Starting(watch::Receiver<()>),
    /// The actor stopped taking commands and is releasing its placement; a new activation waits
    /// for that, so the old release can never undo the new registration.
    Retiring {
        generation: u64,
        done: watch::Receiver<()>,
    },
}

/// The live actors of one node.
pub(crate) struct LiveSessions {
    // std Mutex: map operations only, never held across an await.
    map: Mutex<HashMap<SessionId, Slot>>,
    next_generation: AtomicU64,
}

impl LiveSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Slot>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops the actor of `generation` taking commands: closes its mailbox under the map's lock
    /// and marks its slot retiring until [`finish`](Self::finish). Unless `force`, refuses
    /// (returns false) while commands wait in the mailbox.
    pub(crate) fn retire<T>(
        &self,
        id: &SessionId,
        generation: u64,
        rx: &mut mpsc::Receiver<T>,
        force: bool,
        done: &mut Option<watch::Sender<()>>,
    ) -> bool {
        let mut map = self.lock();
        if !force && !rx.is_empty() {
            return false;
        }
        if let Some(Slot::Live(h)) = map.get(id)
            && h.generation == generation
        {
            let (tx, rx) = watch::channel(());
            map.insert(
                id.clone(),
                Slot::Retiring {
                    generation,
                    done: rx,
                },
            );
            *done = Some(tx);
        }
        rx.close();
        true
    }

    /// Removes whatever slot the actor of `generation` still holds (called when it has fully
    /// stopped, also on panic or abort).
    pub(crate) fn finish(&self, id: &SessionId, generation: u64) {
        let mut map = self.lock();
        let ours = match map.get(id) {
            Some(Slot::Live(h)) => h.generation == generation,
            Some(Slot::Retiring { generation: g, .. }) => *g == generation,
            _ => false,
        };
        if ours {
            map.remove(id);
        }
    }

    fn remove_stale(&self, id: &SessionId, generation: u64) {
        let mut map = self.lock();
        if let Some(Slot::Live(h)) = map.get(id)
            && h.generation == generation
        {
            map.remove(id);
        }
    }

    fn live_handles(&self) -> Vec<(SessionId, ActorHandle)> {
        self.lock()
            .iter()
            .filter_map(|(id, s)| match s {
                Slot::Live(h) => Some((id.clone(), h.clone())),
                Slot::Starting(_) | Slot::Retiring { .. } => None,
            })
            .collect()
    }
}

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
}

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

    /// Builds the runtime.
    pub fn build(self) -> Result<Sessions> {
        let node = match self.node {
            Some(n) => n,
            None => NodeId::with_fresh_incarnation("local")?,
        };
        Ok(Sessions {
            inner: Arc::new(Inner {
                node,
                store: self.store.unwrap_or_else(|| Arc::new(InMemoryStore::new())),
                registry: self
                    .registry
                    .unwrap_or_else(|| Arc::new(LocalRegistry::new())),
                catalog: self.catalog,
                credentials: self
                    .credentials
                    .unwrap_or_else(|| Arc::new(EnvCredentials::new())),
                from_client: self.from_client,
                live: Arc::new(LiveSessions {
                    map: Mutex::new(HashMap::new()),
                    next_generation: AtomicU64::new(1),
                }),
                idle_timeout: self.idle_timeout,
                mailbox: self.mailbox,
                send_timeout: self.send_timeout,
                accepting: AtomicBool::new(true),
            }),
        })
    }
}

/// Frees a `Starting` slot left by an activation that did not finish (dropped or panicked).
struct StartGuard<'a> {
    live: &'a LiveSessions,
    id: &'a SessionId,
    armed: bool,
}

impl Drop for StartGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut map = self.live.lock();
            if matches!(map.get(self.id), Some(Slot::Starting(_))) {
                map.remove(self.id);
            }
        }
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
        matches!(self.inner.live.lock().get(id), Some(Slot::Live(_)))
    }

    /// Number of live (activated, not passivated) sessions on this node.
    pub fn live_count(&self) -> usize {
        self.inner
            .live
            .lock()
            .values()
            .filter(|s| matches!(s, Slot::Live(_)))
            .count()
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
    pub async fn send(&self, id: &SessionId, input: impl Into<Input>) -> Result<TurnOutcome> {
        let input = input.into();
        let input_id = input.id.unwrap_or_else(InputId::generate);
        let mut content = Some(input.content);
        for _ in 0..SEND_ATTEMPTS {
            let handle = self.live_handle(id).await?;
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
                    self.inner.live.remove_stale(id, handle.generation);
                    tokio::task::yield_now().await;
                }
            }
        }
        Err(Error::Unavailable {
            backend: "session actor",
            message: format!("session {id}: its actor stopped {SEND_ATTEMPTS} times in a row"),
        })
    }

    /// Puts `cmd` in the actor's mailbox. `Ok(false)`: the actor is gone, start over.
    async fn deliver(&self, id: &SessionId, handle: &ActorHandle, cmd: Command) -> Result<bool> {
        use tokio::sync::mpsc::error::{SendTimeoutError, TrySendError};
        let cmd = match handle.tx.try_send(cmd) {
            Ok(()) => return Ok(true),
            Err(TrySendError::Closed(_)) => {
                self.inner.live.remove_stale(id, handle.generation);
                return Ok(false);
            }
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
            Err(SendTimeoutError::Closed(_)) => {
                self.inner.live.remove_stale(id, handle.generation);
                Ok(false)
            }
        }
    }

    /// Sends a command that needs a live actor and a reply, retrying if the actor goes away.
    async fn ask<T>(
        &self,
        id: &SessionId,
        make: impl Fn(oneshot::Sender<T>) -> Command,
    ) -> Result<T> {
        for _ in 0..SEND_ATTEMPTS {
            let handle = self.live_handle(id).await?;
            let (reply, rx) = oneshot::channel();
            if !self.deliver(id, &handle, make(reply)).await? {
                continue;
            }
            match rx.await {
                Ok(v) => return Ok(v),
                Err(_) => self.inner.live.remove_stale(id, handle.generation),
            }
        }
        Err(Error::Unavailable {
            backend: "session actor",
            message: format!("session {id}: its actor stopped {SEND_ATTEMPTS} times in a row"),
        })
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
        let handle = match self.inner.live.lock().get(id) {
            Some(Slot::Live(h)) => h.clone(),
            _ => return Ok(false),
        };
        let (reply, rx) = oneshot::channel();
        if !self.deliver(id, &handle, Command::Cancel { reply }).await? {
            return Ok(false);
        }
        Ok(rx.await.unwrap_or(false))
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
        self.live_handle(id).await.map(|_| ())
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
        let handle = match self.inner.live.lock().get(id) {
            Some(Slot::Live(h)) => h.clone(),
            _ => return false,
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
            let (handles, starting) = {
                let map = self.inner.live.lock();
                let starting: Vec<watch::Receiver<()>> = map
                    .values()
                    .filter_map(|s| match s {
                        Slot::Starting(rx) | Slot::Retiring { done: rx, .. } => Some(rx.clone()),
                        Slot::Live(_) => None,
                    })
                    .collect();
                drop(map);
                (self.inner.live.live_handles(), starting)
            };
            if handles.is_empty() && starting.is_empty() {
                return;
            }
            let waits = handles.into_iter().map(|(_, h)| async move {
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
        let slot = self.inner.live.lock().remove(id);
        match slot {
            Some(Slot::Live(h)) => {
                h.abort.abort();
                true
            }
            Some(other) => {
                self.inner.live.lock().insert(id.clone(), other);
                false
            }
            None => false,
        }
    }

    /// The live actor of `id`, activating the session if there is none.
    async fn live_handle(&self, id: &SessionId) -> Result<ActorHandle> {
        loop {
            let (tx, mut wait) = {
                let mut map = self.inner.live.lock();
                match map.get(id) {
                    Some(Slot::Live(h)) => return Ok(h.clone()),
                    Some(Slot::Starting(rx)) | Some(Slot::Retiring { done: rx, .. }) => {
                        (None, Some(rx.clone()))
                    }
                    None => {
                        let (tx, rx) = watch::channel(());
                        map.insert(id.clone(), Slot::Starting(rx));
                        (Some(tx), None)
                    }
                }
            };
            if let Some(rx) = wait.as_mut() {
                // Woken when the starter finishes, successfully or not, or is dropped; then
                // look again.
                let _ = rx.changed().await;
                continue;
            }
            // If this future is dropped (caller timed out) or activation panics, the guard
            // frees the `Starting` slot, so the session is never wedged.
            let guard = StartGuard {
                live: &self.inner.live,
                id,
                armed: true,
            };
            let result = AssertUnwindSafe(self.activate(id)).catch_unwind().await;
            let mut guard = guard;
            guard.armed = false;
            {
                let mut map = self.inner.live.lock();
                match &result {
                    Ok(Ok(handle)) => {
                        map.insert(id.clone(), Slot::Live(handle.clone()));
                    }
                    _ => {
                        map.remove(id);
                    }
                }
            }
            // Waiters wake now and find the slot settled.
            drop(tx);
            return match result {
                Ok(r) => r,
                Err(_panic) => {
                    let _ = self.inner.registry.unregister(id, &self.inner.node).await;
                    Err(Error::Internal(format!(
                        "session {id}: activation panicked (a client builder, credential \
                         provider or store panicked); see the log"
                    )))
                }
            };
        }
    }

    /// Registers, activates and rebuilds the session, then spawns its actor.
    async fn activate(&self, id: &SessionId) -> Result<ActorHandle> {
        let inner = &self.inner;
        if !inner.accepting.load(Ordering::SeqCst) {
            return Err(Error::Unavailable {
                backend: "node",
                message: format!(
                    "node {} is not taking sessions now (draining or lease in doubt); \
                     session {id} must be served elsewhere",
                    inner.node
                ),
            });
        }
        inner.registry.register(id, &inner.node).await?;
        let result = async {
            // Rebuild the configuration before taking the session over in the store: a node
            // that cannot run it must not bump its epoch (fencing the live owner for nothing) or
            // file it under its own name.
            let loaded = inner.store.load(id).await?.ok_or_else(|| Error::NotFound {
                session: id.clone(),
            })?;
            if loaded.status == crate::store::SessionStatus::Terminal {
                return Err(Error::SessionClosed {
                    session: id.clone(),
                });
            }
            let template = loaded.template.clone().ok_or_else(|| {
                Error::Config(format!(
                    "session {id} was stored without a template, so no node can rebuild it \
                     (its history is still readable); is the template migration applied?"
                ))
            })?;
            // The catalog first: a node without the template should say so, not that a
            // credential is missing.
            inner.catalog.template(&template.template_id)?;
            let creds = inner.credentials.resolve(id, &template.credentials).await?;
            let config = inner.catalog.build(template, &creds)?;
            let record = inner.store.activate(id, &inner.node).await?;
            let entries = read_entries(&*inner.store, id, 0, record.seq).await?;
            if entries.len() as u64 != record.seq {
                return Err(Error::corrupt(
                    Some(id),
                    "history",
                    format!(
                        "record says {} entries, the store returned {}",
                        record.seq,
                        entries.len()
                    ),
                ));
            }
            Ok(spawn_actor(ActorParams {
                node: inner.node.clone(),
                record,
                entries,
                config,
                store: inner.store.clone(),
                registry: inner.registry.clone(),
                live: inner.live.clone(),
                generation: inner.live.next_generation.fetch_add(1, Ordering::Relaxed),
                idle_timeout: inner.idle_timeout,
                mailbox: inner.mailbox,
            }))
        }
        .await;
        if result.is_err() {
            let _ = inner.registry.unregister(id, &inner.node).await;
        }
        result
    }
}
