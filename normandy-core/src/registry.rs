//! [`SessionRegistry`]: where a session is live, and [`LocalRegistry`], the in-process map.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::model::{NodeId, SessionId};

/// Where a session is live.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Placement {
    /// The owning node.
    pub owner: NodeId,
    /// The registry's epoch for this id: greater for every new registration of the id.
    pub epoch: u64,
}

/// Where sessions are live.
///
/// Every method's `# Behavior` list is checked by `normandy-tests`' registry conformance suite.
///
/// Implement it with [`#[normandy_core::async_trait]`](crate::async_trait) on the `impl`, as
/// [`LocalRegistry`] does: `#[async_trait] impl SessionRegistry for MyRegistry { async fn
/// register(&self, id: &SessionId, owner: &NodeId) -> Result<Placement> { … } … }`.
#[async_trait]
pub trait SessionRegistry: Send + Sync + 'static {
    /// Claims `id` for `owner`, atomically.
    ///
    /// # Behavior
    /// - Of concurrent registrations of one id, exactly one wins; every loser gets
    ///   `AlreadyRegistered` naming the winner.
    /// - Registering again by the current owner returns its existing placement.
    /// - Each new registration of an id has a greater epoch than the last.
    async fn register(&self, id: &SessionId, owner: &NodeId) -> Result<Placement>;

    /// The live placement of `id`, if any.
    ///
    /// # Behavior
    /// - A placement whose owner's lease has lapsed does not resolve.
    async fn lookup(&self, id: &SessionId) -> Result<Option<Placement>>;

    /// Releases `id` if `owner` holds it; returns whether it did.
    ///
    /// # Behavior
    /// - A node that is not the owner releases nothing (`Ok(false)`).
    async fn unregister(&self, id: &SessionId, owner: &NodeId) -> Result<bool>;
}

#[derive(Default)]
struct LocalInner {
    live: HashMap<SessionId, Placement>,
    /// Last epoch handed out. One counter for all ids keeps every id's epochs growing without
    /// remembering ids after they unregister.
    last_epoch: u64,
}

/// The tier-0 registry: an in-process map. Nodes in other processes cannot see it.
#[derive(Default)]
pub struct LocalRegistry {
    // std Mutex: lookups and inserts only, never held across an await.
    inner: Mutex<LocalInner>,
}

impl std::fmt::Debug for LocalRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRegistry").finish_non_exhaustive()
    }
}

impl LocalRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops every placement of `node` (what a lapsed lease does in a shared registry).
    pub fn expire_node(&self, node: &NodeId) -> usize {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let before = inner.live.len();
        inner.live.retain(|_, p| &p.owner != node);
        before - inner.live.len()
    }

    /// Number of live placements.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .live
            .len()
    }

    /// Whether no session is placed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl SessionRegistry for LocalRegistry {
    async fn register(&self, id: &SessionId, owner: &NodeId) -> Result<Placement> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = inner.live.get(id) {
            if &p.owner == owner {
                return Ok(p.clone());
            }
            return Err(Error::AlreadyRegistered {
                session: id.clone(),
                owner: p.owner.clone(),
                epoch: p.epoch,
            });
        }
        inner.last_epoch += 1;
        let epoch = inner.last_epoch;
        let placement = Placement {
            owner: owner.clone(),
            epoch,
        };
        inner.live.insert(id.clone(), placement.clone());
        Ok(placement)
    }

    async fn lookup(&self, id: &SessionId) -> Result<Option<Placement>> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Ok(inner.live.get(id).cloned())
    }

    async fn unregister(&self, id: &SessionId, owner: &NodeId) -> Result<bool> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match inner.live.get(id) {
            Some(p) if &p.owner == owner => {
                inner.live.remove(id);
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}
