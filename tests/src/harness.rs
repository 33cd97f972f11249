//! What a backend supplies to run the conformance suites.

use std::sync::Arc;

use normandy_core::{Seq, SessionId, SessionRegistry, SessionStore, async_trait};

/// A store backend under test.
///
/// Each harness is an isolated namespace (own schema, key prefix, directory, ...), so cases never
/// see each other's data and runs never collide.
#[async_trait]
pub trait StoreHarness: Send + Sync + 'static {
    /// The store under test.
    fn store(&self) -> Arc<dyn SessionStore>;

    /// A second, independent handle on the same data (a new connection pool, another open of the
    /// same environment): what a second node or process would hold.
    async fn reopen(&self) -> Arc<dyn SessionStore>;

    /// Every byte the backend holds for this namespace, concatenated (for canary scans).
    async fn raw_bytes(&self) -> Vec<u8>;

    /// Overwrites the stored turn-state bytes of `id` (to plant corruption).
    async fn overwrite_state(&self, id: &SessionId, bytes: &[u8]);

    /// Overwrites the stored bytes of entry `seq` of `id`.
    ///
    /// The suite plants either garbage or a versioned blob from `normandy_core::codec` of the
    /// right kind (`BlobKind::TurnState` for [`overwrite_state`](Self::overwrite_state),
    /// `BlobKind::Entry` here) with its header altered; a backend that stores blobs differently
    /// translates here, so that the next read decodes exactly these bytes.
    async fn overwrite_entry(&self, id: &SessionId, seq: Seq, bytes: &[u8]);

    /// Called once after a case passed: drop the namespace (schema, keys, directory) if the
    /// backend wants to. Not called after a failure, so the data stays for a post-mortem.
    async fn cleanup(&self) {}
}

/// A registry backend under test.
#[async_trait]
pub trait RegistryHarness: Send + Sync + 'static {
    /// The registry under test.
    fn registry(&self) -> Arc<dyn SessionRegistry>;

    /// A second, independent handle on the same placements (what another node would hold).
    async fn reopen(&self) -> Arc<dyn SessionRegistry>;

    /// Whether placements of a dead node stop resolving when its lease lapses (shared registries).
    fn has_leases(&self) -> bool {
        false
    }

    /// Makes `node`'s lease lapse now, as if it died (only called when `has_leases`).
    async fn expire_node(&self, _node: &normandy_core::NodeId) {}

    /// Makes `node` a live member (a current lease), as a running node would be, before a case
    /// registers anything on it. Cases call it for every node they use; a registry whose
    /// placements do not depend on leases keeps the default no-op.
    async fn make_live(&self, _node: &normandy_core::NodeId) {}

    /// Called once after a case passed: drop the namespace if the backend wants to. Not called
    /// after a failure, so the data stays for a post-mortem.
    async fn cleanup(&self) {}
}
