//! Bounds on every store and registry call: [`BoundedStore`] and [`BoundedRegistry`] wrap a
//! backend so that a call that does not answer within its bound (a paused server, a partition
//! that drops packets without a reset, a row lock held by a stalled node) ends as a retryable
//! [`Error::Timeout`] naming the call, instead of wedging the session — and, through a group
//! commit, its neighbours — for as long as the TCP stack takes to notice.
//!
//! A [`Sessions`](crate::Sessions) runtime wraps its store and registry in these (see
//! [`SessionsBuilder::store_call_timeout`](crate::SessionsBuilder::store_call_timeout)), so the
//! engine's commits and activations, and the release of a placement, are bounded whatever the
//! backend. A bound cuts the wait, not the call: a commit that timed out may still land, which
//! is why the engine treats a timed-out commit as ambiguous and confirms it by reading back
//! before it retries. Backends that can (Postgres) also set server-side timeouts, so that the
//! server gives up too and releases what the call held.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::membership::{JoinOutcome, LeaseStatus, Member, Membership};
use crate::model::{Entry, Epoch, NodeId, Seq, SessionId};
use crate::registry::{Placement, SessionRegistry};
use crate::store::{
    Capabilities, CommitAck, CommitBatch, NewSession, OwnerFilter, ResumablePage, SessionRecord,
    SessionStore,
};

/// The default bound of one store or registry call: longer than any server-side statement
/// timeout we set (Postgres: 30 s) and than a `WAIT` a user would configure, so the server's
/// own, more precise error normally comes first.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(45);

/// Runs `call`, or gives up after `bound` with a retryable `Timeout` naming `what`.
async fn bounded<T>(
    bound: Duration,
    session: Option<&SessionId>,
    what: &'static str,
    call: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(bound, call).await {
        // A backend error about this session that does not say so gets its name.
        Ok(r) => r.map_err(|e| match session {
            Some(s) => e.in_session(s),
            None => e,
        }),
        Err(_) => Err(Error::Timeout {
            session: session.cloned(),
            what: format!("{what} did not answer within {bound:?} (it may still complete)"),
        }),
    }
}

/// A backend `B` (a store, a registry, a membership) whose every call ends within a bound (see
/// the [module docs](self)); built by [`BoundedStore::wrap`], [`BoundedRegistry::wrap`] and
/// [`BoundedMembership::wrap`].
pub struct Bounded<B: ?Sized> {
    inner: Arc<B>,
    bound: Duration,
}

impl<B: ?Sized> std::fmt::Debug for Bounded<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bounded")
            .field("bound", &self.bound)
            .finish_non_exhaustive()
    }
}

impl<B: ?Sized> Bounded<B> {
    fn new(inner: Arc<B>, bound: Duration) -> Self {
        Self {
            inner,
            bound: bound.max(Duration::from_millis(1)),
        }
    }

    /// Runs one call of the inner backend within the bound.
    async fn run<T>(
        &self,
        session: Option<&SessionId>,
        what: &'static str,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        bounded(self.bound, session, what, call).await
    }
}

/// A [`SessionStore`] whose every call ends within a bound.
pub type BoundedStore = Bounded<dyn SessionStore>;
/// A [`SessionRegistry`] whose every call ends within a bound.
pub type BoundedRegistry = Bounded<dyn SessionRegistry>;
/// A [`Membership`] whose every call ends within a bound; a cluster node bounds its lease calls
/// by the lease's TTL, past which their answer is moot.
pub type BoundedMembership = Bounded<dyn Membership>;

impl Bounded<dyn SessionStore> {
    /// Wraps `inner` so that each call gives up after `bound` (at least 1 ms).
    pub fn wrap(inner: Arc<dyn SessionStore>, bound: Duration) -> Arc<dyn SessionStore> {
        Arc::new(Self::new(inner, bound))
    }
}

impl Bounded<dyn SessionRegistry> {
    /// Wraps `inner` so that each call gives up after `bound` (at least 1 ms).
    pub fn wrap(inner: Arc<dyn SessionRegistry>, bound: Duration) -> Arc<dyn SessionRegistry> {
        Arc::new(Self::new(inner, bound))
    }
}

impl Bounded<dyn Membership> {
    /// Wraps `inner` so that each call gives up after `bound` (at least 1 ms).
    pub fn wrap(inner: Arc<dyn Membership>, bound: Duration) -> Arc<dyn Membership> {
        Arc::new(Self::new(inner, bound))
    }
}

#[async_trait]
impl SessionStore for Bounded<dyn SessionStore> {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn create(&self, session: NewSession) -> Result<SessionRecord> {
        let id = session.id.clone();
        self.run(Some(&id), "store create", self.inner.create(session))
            .await
    }

    async fn activate(&self, id: &SessionId, node: &NodeId) -> Result<SessionRecord> {
        self.run(Some(id), "store activate", self.inner.activate(id, node))
            .await
    }

    async fn commit(
        &self,
        id: &SessionId,
        epoch: Epoch,
        expected_seq: Seq,
        batch: &CommitBatch,
    ) -> Result<CommitAck> {
        self.run(
            Some(id),
            "store commit",
            self.inner.commit(id, epoch, expected_seq, batch),
        )
        .await
    }

    async fn load(&self, id: &SessionId) -> Result<Option<SessionRecord>> {
        self.run(Some(id), "store load", self.inner.load(id)).await
    }

    async fn entries(&self, id: &SessionId, after: Seq, limit: usize) -> Result<Vec<Entry>> {
        self.run(
            Some(id),
            "store entries",
            self.inner.entries(id, after, limit),
        )
        .await
    }

    async fn list_resumable(
        &self,
        owner: &OwnerFilter,
        cursor: Option<&SessionId>,
        limit: usize,
    ) -> Result<ResumablePage> {
        self.run(
            None,
            "store list_resumable",
            self.inner.list_resumable(owner, cursor, limit),
        )
        .await
    }

    async fn mark_terminal(&self, id: &SessionId, epoch: Epoch) -> Result<()> {
        self.run(
            Some(id),
            "store mark_terminal",
            self.inner.mark_terminal(id, epoch),
        )
        .await
    }

    async fn delete(&self, id: &SessionId) -> Result<bool> {
        self.run(Some(id), "store delete", self.inner.delete(id))
            .await
    }
}

#[async_trait]
impl SessionRegistry for Bounded<dyn SessionRegistry> {
    async fn register(&self, id: &SessionId, owner: &NodeId) -> Result<Placement> {
        self.run(
            Some(id),
            "registry register",
            self.inner.register(id, owner),
        )
        .await
    }

    async fn lookup(&self, id: &SessionId) -> Result<Option<Placement>> {
        self.run(Some(id), "registry lookup", self.inner.lookup(id))
            .await
    }

    async fn unregister(&self, id: &SessionId, owner: &NodeId) -> Result<bool> {
        self.run(
            Some(id),
            "registry unregister",
            self.inner.unregister(id, owner),
        )
        .await
    }
}

#[async_trait]
impl Membership for Bounded<dyn Membership> {
    async fn join(&self, me: &Member, ttl: Duration) -> Result<JoinOutcome> {
        self.run(None, "membership join", self.inner.join(me, ttl))
            .await
    }

    async fn refresh(&self, me: &Member, ttl: Duration) -> Result<LeaseStatus> {
        self.run(None, "membership refresh", self.inner.refresh(me, ttl))
            .await
    }

    async fn members(&self) -> Result<Vec<Member>> {
        self.run(None, "membership members", self.inner.members())
            .await
    }

    async fn leave(&self, node: &NodeId) -> Result<()> {
        self.run(None, "membership leave", self.inner.leave(node))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::InMemoryStore;

    /// A store whose `load` never answers.
    struct Hanging(InMemoryStore);

    #[async_trait]
    impl SessionStore for Hanging {
        fn capabilities(&self) -> Capabilities {
            self.0.capabilities()
        }
        async fn create(&self, s: NewSession) -> Result<SessionRecord> {
            self.0.create(s).await
        }
        async fn activate(&self, id: &SessionId, node: &NodeId) -> Result<SessionRecord> {
            self.0.activate(id, node).await
        }
        async fn commit(
            &self,
            id: &SessionId,
            epoch: Epoch,
            expected_seq: Seq,
            batch: &CommitBatch,
        ) -> Result<CommitAck> {
            self.0.commit(id, epoch, expected_seq, batch).await
        }
        async fn load(&self, _: &SessionId) -> Result<Option<SessionRecord>> {
            std::future::pending().await
        }
        async fn entries(&self, id: &SessionId, after: Seq, limit: usize) -> Result<Vec<Entry>> {
            self.0.entries(id, after, limit).await
        }
        async fn list_resumable(
            &self,
            owner: &OwnerFilter,
            cursor: Option<&SessionId>,
            limit: usize,
        ) -> Result<ResumablePage> {
            self.0.list_resumable(owner, cursor, limit).await
        }
        async fn mark_terminal(&self, id: &SessionId, epoch: Epoch) -> Result<()> {
            self.0.mark_terminal(id, epoch).await
        }
        async fn delete(&self, id: &SessionId) -> Result<bool> {
            self.0.delete(id).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_never_answers_is_a_retryable_timeout_naming_the_call() {
        let store = BoundedStore::wrap(
            Arc::new(Hanging(InMemoryStore::new())),
            Duration::from_secs(3),
        );
        let id = SessionId::new("s").unwrap();
        let err = store.load(&id).await.unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(matches!(&err, Error::Timeout { session: Some(s), .. } if *s == id));
        assert!(err.to_string().contains("store load"), "{err}");
        assert!(err.to_string().contains("3s"), "{err}");
    }
}
