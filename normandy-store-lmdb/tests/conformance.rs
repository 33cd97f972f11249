//! The store conformance suite over an LMDB environment in a fresh temporary directory per case.

use std::sync::Arc;

use normandy_core::{Seq, SessionId, SessionStore, async_trait};
use normandy_store_lmdb::{LmdbConfig, LmdbStore};
use normandy_tests::{StoreHarness, store_conformance};

struct LmdbHarness {
    // Dropped last: the directory outlives every handle on it.
    store: LmdbStore,
    dir: tempfile::TempDir,
}

impl LmdbHarness {
    fn new() -> Option<Self> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = LmdbStore::open(LmdbConfig::new(dir.path())).expect("open LMDB store");
        Some(Self { store, dir })
    }
}

#[async_trait]
impl StoreHarness for LmdbHarness {
    fn store(&self) -> Arc<dyn SessionStore> {
        Arc::new(self.store.clone())
    }

    async fn reopen(&self) -> Arc<dyn SessionStore> {
        // A second open of the directory (in-process it shares the environment, as LMDB
        // requires; other processes open it separately: see tests/crash.rs).
        Arc::new(LmdbStore::open(LmdbConfig::new(self.dir.path())).expect("reopen LMDB store"))
    }

    async fn raw_bytes(&self) -> Vec<u8> {
        self.store.raw_bytes().await.expect("raw bytes")
    }

    async fn overwrite_state(&self, id: &SessionId, bytes: &[u8]) {
        let found = self
            .store
            .overwrite_state_bytes(id, bytes)
            .await
            .expect("overwrite state");
        assert!(found, "no stored state for {id}");
    }

    async fn overwrite_entry(&self, id: &SessionId, seq: Seq, bytes: &[u8]) {
        let found = self
            .store
            .overwrite_entry_bytes(id, seq, bytes)
            .await
            .expect("overwrite entry");
        assert!(found, "no stored entry {seq} for {id}");
    }
}

store_conformance!(lmdb, async { LmdbHarness::new() });
