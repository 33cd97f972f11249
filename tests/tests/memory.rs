//! Both conformance suites on the tier-0 backends: `InMemoryStore` and `LocalRegistry`.
//!
//! Neither has a second process to reopen from, so `reopen` hands back the same instance (the
//! harness contract allows it: a second handle on the same data).

use std::sync::Arc;

use normandy_core::{
    InMemoryStore, LocalRegistry, NodeId, Seq, SessionId, SessionRegistry, SessionStore,
    async_trait,
};
use normandy_tests::{RegistryHarness, StoreHarness, registry_conformance, store_conformance};

/// A fresh `InMemoryStore` per case.
struct MemoryStore {
    store: Arc<InMemoryStore>,
}

#[async_trait]
impl StoreHarness for MemoryStore {
    fn store(&self) -> Arc<dyn SessionStore> {
        self.store.clone()
    }

    async fn reopen(&self) -> Arc<dyn SessionStore> {
        self.store.clone()
    }

    async fn raw_bytes(&self) -> Vec<u8> {
        self.store.raw_bytes()
    }

    async fn overwrite_state(&self, id: &SessionId, bytes: &[u8]) {
        assert!(
            self.store.overwrite_state_bytes(id, bytes.to_vec()),
            "no session {id} to corrupt"
        );
    }

    async fn overwrite_entry(&self, id: &SessionId, seq: Seq, bytes: &[u8]) {
        assert!(
            self.store.overwrite_entry_bytes(id, seq, bytes.to_vec()),
            "no entry {seq} of session {id} to corrupt"
        );
    }
}

/// A fresh `LocalRegistry` per case. Its `expire_node` drops a node's placements, which is what
/// a lapsed lease does in a shared registry, so the lease case runs here too.
struct Local {
    registry: Arc<LocalRegistry>,
}

#[async_trait]
impl RegistryHarness for Local {
    fn registry(&self) -> Arc<dyn SessionRegistry> {
        self.registry.clone()
    }

    async fn reopen(&self) -> Arc<dyn SessionRegistry> {
        self.registry.clone()
    }

    fn has_leases(&self) -> bool {
        true
    }

    async fn expire_node(&self, node: &NodeId) {
        self.registry.expire_node(node);
    }
}

store_conformance!(memory, async {
    Some(MemoryStore {
        store: Arc::new(InMemoryStore::new()),
    })
});

registry_conformance!(local, async {
    Some(Local {
        registry: Arc::new(LocalRegistry::new()),
    })
});
