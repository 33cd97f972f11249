//! Test support shared by the `normandy-core` integration tests (`mod support;`).
//!
//! [`FaultStore`] is an [`InMemoryStore`] with fault hooks: a test installs a hook on the call
//! it wants to break, and the hook's [`Fault`] decides what that call does. Every other method,
//! and every call a hook lets [`Pass`](Fault::Pass), goes straight to the inner store.

// Each test binary compiles its own copy of this module and uses only part of it.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of this module"
)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use futures::future::BoxFuture;
use normandy_core::{
    Capabilities, CommitAck, CommitBatch, Entry, Epoch, Error, InMemoryStore, NewSession, NodeId,
    OwnerFilter, Result, ResumablePage, Seq, SessionId, SessionRecord, SessionStore, async_trait,
};
use tokio::sync::Notify;

/// What a hook decides for one call to a [`FaultStore`].
#[derive(Debug)]
pub(crate) enum Fault {
    /// Pass the call through to the inner store.
    Pass,
    /// Fail the call with this error; the inner store never sees it.
    Fail(Error),
    /// Never answer, and never reach the inner store: a stuck database, or a process that died
    /// before its call reached the store.
    Hang,
    /// Apply the call to the inner store, then never answer: a process that died before it
    /// heard the ack. If the inner store fails the call, its error is returned instead.
    ApplyThenHang,
    /// Apply the call to the inner store, then fail it with this error: a reply lost after the
    /// write landed (a connection reset), so the caller cannot tell whether it applied. If the
    /// inner store fails the call, its error is returned instead.
    ApplyThenFail(Error),
}

/// One `commit` call, as a commit hook sees it.
#[derive(Debug)]
pub(crate) struct CommitCall<'a> {
    /// Which `commit` call this is, counting from 1 over the store's life.
    pub(crate) n: usize,
    /// The session committed to.
    pub(crate) id: &'a SessionId,
    /// The batch to write.
    pub(crate) batch: &'a CommitBatch,
}

/// A hook run before every `commit`; it may await (a slow disk, a gate) before deciding.
type CommitHook = Box<dyn Fn(&CommitCall<'_>) -> BoxFuture<'static, Fault> + Send + Sync>;

/// A hook run before every `activate`; it may await before deciding.
type ActivateHook = Box<dyn Fn(&SessionId) -> BoxFuture<'static, Fault> + Send + Sync>;

/// An [`InMemoryStore`] that injects the faults its hooks decide.
///
/// Calls without a hook go straight to the inner store, which a test may share (to rebuild a
/// session on a healthy "node" after this one crashed, say).
#[derive(Default)]
pub(crate) struct FaultStore {
    inner: Arc<InMemoryStore>,
    on_commit: Option<CommitHook>,
    on_activate: Option<ActivateHook>,
    /// `commit` calls so far.
    commits: AtomicUsize,
    /// Signalled (one permit) when a call starts to hang.
    hung: Notify,
    did_hang: AtomicBool,
}

impl FaultStore {
    /// A store with no faults over `inner`.
    pub(crate) fn new(inner: Arc<InMemoryStore>) -> Self {
        Self {
            inner,
            ..Self::default()
        }
    }

    /// Runs `hook` before every `commit`; its [`Fault`] decides what the commit does.
    pub(crate) fn on_commit<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(&CommitCall<'_>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Fault> + Send + 'static,
    {
        self.on_commit = Some(Box::new(move |call: &CommitCall<'_>| Box::pin(hook(call))));
        self
    }

    /// Runs `hook` (given the session id) before every `activate`; its [`Fault`] decides what
    /// the activation does.
    pub(crate) fn on_activate<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(&SessionId) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Fault> + Send + 'static,
    {
        self.on_activate = Some(Box::new(move |id: &SessionId| Box::pin(hook(id))));
        self
    }

    /// Waits until a call hangs; returns at once if one started hanging since the last wait.
    pub(crate) async fn hung(&self) {
        self.hung.notified().await;
    }

    /// Whether any call has hung.
    pub(crate) fn has_hung(&self) -> bool {
        self.did_hang.load(Ordering::SeqCst)
    }

    /// Carries out `fault` for a call whose inner-store half is `call` (not yet polled).
    async fn inject<T>(&self, fault: Fault, call: impl Future<Output = Result<T>>) -> Result<T> {
        match fault {
            Fault::Pass => call.await,
            Fault::Fail(e) => Err(e),
            Fault::Hang => self.hang().await,
            Fault::ApplyThenHang => {
                call.await?;
                self.hang().await
            }
            Fault::ApplyThenFail(e) => {
                call.await?;
                Err(e)
            }
        }
    }

    /// Records and signals the hang, then never returns.
    async fn hang<T>(&self) -> T {
        self.did_hang.store(true, Ordering::SeqCst);
        self.hung.notify_one();
        futures::future::pending().await
    }
}

#[async_trait]
impl SessionStore for FaultStore {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn create(&self, s: NewSession) -> Result<SessionRecord> {
        self.inner.create(s).await
    }
    async fn activate(&self, id: &SessionId, node: &NodeId) -> Result<SessionRecord> {
        let fault = match &self.on_activate {
            Some(hook) => hook(id).await,
            None => Fault::Pass,
        };
        self.inject(fault, self.inner.activate(id, node)).await
    }
    async fn commit(
        &self,
        id: &SessionId,
        epoch: Epoch,
        expected_seq: Seq,
        batch: &CommitBatch,
    ) -> Result<CommitAck> {
        let n = self.commits.fetch_add(1, Ordering::SeqCst) + 1;
        let fault = match &self.on_commit {
            Some(hook) => hook(&CommitCall { n, id, batch }).await,
            None => Fault::Pass,
        };
        self.inject(fault, self.inner.commit(id, epoch, expected_seq, batch))
            .await
    }
    async fn load(&self, id: &SessionId) -> Result<Option<SessionRecord>> {
        self.inner.load(id).await
    }
    async fn entries(&self, id: &SessionId, after: Seq, limit: usize) -> Result<Vec<Entry>> {
        self.inner.entries(id, after, limit).await
    }
    async fn list_resumable(
        &self,
        owner: &OwnerFilter,
        cursor: Option<&SessionId>,
        limit: usize,
    ) -> Result<ResumablePage> {
        self.inner.list_resumable(owner, cursor, limit).await
    }
    async fn mark_terminal(&self, id: &SessionId, epoch: Epoch) -> Result<()> {
        self.inner.mark_terminal(id, epoch).await
    }
    async fn delete(&self, id: &SessionId) -> Result<bool> {
        self.inner.delete(id).await
    }
}
