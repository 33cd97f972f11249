//! The slot lifecycle of a session on this node, in one place: activation (registry placement,
//! store epoch, rebuilt configuration, the actor's task), the live map's transitions
//! `Starting → Live → Retiring → gone`, and the release when an actor ends — of its slot and,
//! unless another writer fenced it, of its registry placement.
//!
//! The actor only reports why its loop ended ([`Exited`]); the task spawned here runs that loop
//! and then the release, and a guard covers a panic or an abort. The actor used to unregister
//! itself and edit this map from inside its loop; with both halves here, one module decides when
//! a slot may be reused, which is what keeps an old release from undoing a new activation.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use futures::FutureExt;
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, info_span, warn};

use super::{Inner, Sessions};
use crate::engine::{Actor, ActorHandle, ActorParams, Command, Exit, Exited, read_entries};
use crate::error::{Error, Result};
use crate::model::{NodeId, SessionId};
use crate::registry::SessionRegistry;
use crate::store::SessionStatus;
use crate::template::ResumePolicy;

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
    pub(super) fn new() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SessionId, Slot>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live actor of `id`, if it has one (none while it starts or retires).
    pub(super) fn live(&self, id: &SessionId) -> Option<ActorHandle> {
        match self.lock().get(id) {
            Some(Slot::Live(h)) => Some(h.clone()),
            _ => None,
        }
    }

    /// Whether `id` has a live actor.
    pub(super) fn is_live(&self, id: &SessionId) -> bool {
        matches!(self.lock().get(id), Some(Slot::Live(_)))
    }

    /// How many sessions have a live actor.
    pub(super) fn live_count(&self) -> usize {
        self.lock()
            .values()
            .filter(|s| matches!(s, Slot::Live(_)))
            .count()
    }

    /// Every live actor, and a watch on every slot in transition (starting or retiring), which
    /// changes when that transition ends.
    pub(super) fn snapshot(&self) -> (Vec<ActorHandle>, Vec<watch::Receiver<()>>) {
        let map = self.lock();
        let mut live = Vec::new();
        let mut moving = Vec::new();
        for slot in map.values() {
            match slot {
                Slot::Live(h) => live.push(h.clone()),
                Slot::Starting(rx) | Slot::Retiring { done: rx, .. } => moving.push(rx.clone()),
            }
        }
        (live, moving)
    }

    /// Aborts `id`'s live actor as a crash would: its slot goes, its placement stays.
    pub(super) fn kill(&self, id: &SessionId) -> bool {
        let mut map = self.lock();
        match map.get(id) {
            Some(Slot::Live(h)) => {
                h.abort.abort();
                map.remove(id);
                true
            }
            _ => false,
        }
    }

    /// Aborts every live actor at once, as [`kill`](Self::kill) does one; returns how many.
    pub(super) fn kill_all(&self) -> usize {
        let mut map = self.lock();
        let live: Vec<SessionId> = map
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Live(_)))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &live {
            if let Some(Slot::Live(h)) = map.remove(id) {
                h.abort.abort();
            }
        }
        live.len()
    }

    /// Stops the actor of `generation` taking commands: closes its mailbox under the map's lock
    /// and marks its slot retiring until [`finish`](Self::finish). Unless `force`, refuses
    /// (returns false) while commands wait in the mailbox.
    fn retire(
        &self,
        id: &SessionId,
        generation: u64,
        rx: &mut mpsc::Receiver<Command>,
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
    fn finish(&self, id: &SessionId, generation: u64) {
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

    /// Forgets the live slot of an actor a caller found gone.
    pub(super) fn remove_stale(&self, id: &SessionId, generation: u64) {
        let mut map = self.lock();
        if let Some(Slot::Live(h)) = map.get(id)
            && h.generation == generation
        {
            map.remove(id);
        }
    }

    /// Starts the task of an activated session's actor: its loop, then the release of its slot.
    /// An eager session's actor that fails is resumed through `runtime`.
    fn spawn(
        self: &Arc<Self>,
        node: &NodeId,
        registry: &Arc<dyn SessionRegistry>,
        params: ActorParams,
        mailbox: usize,
        runtime: Weak<Inner>,
    ) -> ActorHandle {
        let (tx, mut rx) = mpsc::channel(mailbox.max(1));
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let id = params.record.id.clone();
        let span = info_span!("session", session = %id, epoch = params.record.epoch, node = %node);
        let exit = Arc::new(OnceLock::new());
        let eager = params.record.resume_policy == ResumePolicy::Eager;
        let mut lease = SlotLease {
            restart: eager.then_some(runtime),
            live: Arc::downgrade(self),
            id,
            generation,
            registry: registry.clone(),
            node: node.clone(),
            exit: exit.clone(),
            retiring: None,
            released: false,
        };
        let mut actor = Actor::new(params);
        let task = async move {
            let exited = actor.run(&mut rx, |rx| lease.retire(rx, false)).await;
            Box::pin(lease.release(exited, &mut rx, actor)).await;
        };
        let task = tokio::spawn(task.instrument(span));
        ActorHandle {
            tx,
            generation,
            abort: task.abort_handle(),
            exit,
        }
    }
}

/// One actor's hold on its slot, owned by the actor's task. However the task ends — return,
/// panic or abort — the slot is freed.
struct SlotLease {
    // Weak: the map holds this actor's mailbox sender, so a strong reference here would keep
    // every actor alive after the last `Sessions` handle is dropped.
    live: Weak<LiveSessions>,
    id: SessionId,
    generation: u64,
    registry: Arc<dyn SessionRegistry>,
    node: NodeId,
    /// The handle's exit reason, shared with every clone of it.
    exit: Arc<OnceLock<Error>>,
    /// Held while releasing the placement; dropping it wakes activations waiting on us.
    retiring: Option<watch::Sender<()>>,
    /// Set once `release` ran; a lease dropped before that was aborted or panicked.
    released: bool,
    /// For an eager session: the runtime that resumes it if its actor fails.
    restart: Option<Weak<Inner>>,
}

impl SlotLease {
    fn retire(&mut self, rx: &mut mpsc::Receiver<Command>, force: bool) -> bool {
        match self.live.upgrade() {
            Some(live) => live.retire(&self.id, self.generation, rx, force, &mut self.retiring),
            None => {
                rx.close();
                true
            }
        }
    }

    /// Releases the slot of an actor whose loop ended: keeps its reason on the handle, closes
    /// and empties its mailbox, then drops `actor` (callers waiting on its turn retry only once
    /// they cannot reach it again), releases the placement unless fenced, frees the slot, and
    /// answers passivation requests.
    async fn release(&mut self, exited: Exited, rx: &mut mpsc::Receiver<Command>, actor: Actor) {
        let Exited { why, passivated } = exited;
        // Before the mailbox closes: a caller that finds it closed reads the reason.
        if let Exit::Fenced(e) | Exit::Failed(e) = &why {
            let _ = self.exit.set(e.clone());
        }
        // Stop taking commands first; a new activation of this session waits until the release
        // below is done, so it can never be undone by it.
        self.retire(rx, true);
        // Commands that raced in are dropped unanswered: their callers hear the reason above,
        // or retry on a fresh actor (inputs are idempotent by id).
        while rx.try_recv().is_ok() {}
        drop(actor);
        if !matches!(why, Exit::Fenced(_))
            && let Err(e) = self.registry.unregister(&self.id, &self.node).await
        {
            warn!(error = %e, "could not release registry placement");
        }
        if let Some(live) = self.live.upgrade() {
            live.finish(&self.id, self.generation);
        }
        // "Passivated" means released: answer only now.
        for reply in passivated {
            let _ = reply.send(());
        }
        self.released = true;
        debug!("session actor stopped");
        // An eager session given up on a failure (its commits kept failing, say) would otherwise
        // wait for a request that may never come, or, in a cluster, for a sweep: resume it here
        // after a backoff. A fenced one is someone else's now.
        if let (Exit::Failed(e), Some(runtime)) = (&why, self.restart.take()) {
            warn!(error = %e, "eager session's actor failed; resuming it after a backoff");
            tokio::spawn(super::restart::resume_after_failure(
                runtime,
                self.id.clone(),
            ));
        }
    }
}

impl Drop for SlotLease {
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

impl Sessions {
    /// The live actor of `id`, activating the session if there is none. With `input_size`
    /// (an input about to be sent), an activation refuses the input if the stored template's
    /// limit refuses it, before the store's epoch is bumped: an input that cannot run must not
    /// take the session from a live owner.
    pub(super) async fn live_handle(
        &self,
        id: &SessionId,
        input_size: Option<usize>,
    ) -> Result<ActorHandle> {
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
            let result = AssertUnwindSafe(self.activate(id, input_size))
                .catch_unwind()
                .await;
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

    /// Registers, activates and rebuilds the session, then spawns its actor (see
    /// [`live_handle`](Self::live_handle) for `input_size`).
    async fn activate(&self, id: &SessionId, input_size: Option<usize>) -> Result<ActorHandle> {
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
            if loaded.status == SessionStatus::Terminal {
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
            let limit = template.limits.max_input_bytes;
            if let Some(size) = input_size.filter(|s| *s > limit) {
                return Err(Error::InputTooLarge {
                    session: id.clone(),
                    size,
                    limit,
                });
            }
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
            Ok(inner.live.spawn(
                &inner.node,
                &inner.registry,
                ActorParams {
                    record,
                    entries,
                    config,
                    store: inner.store.clone(),
                    idle_timeout: inner.idle_timeout,
                    gate: inner.gate.clone(),
                },
                inner.mailbox,
                Arc::downgrade(inner),
            ))
        }
        .await;
        if result.is_err() {
            let _ = inner.registry.unregister(id, &inner.node).await;
        }
        result
    }
}
