//! The store conformance suite against a real Redis (`NORMANDY_TEST_REDIS_URL`, else a container,
//! else skipped by name), and again against a Redis Cluster (`NORMANDY_TEST_REDIS_CLUSTER_URLS`,
//! else skipped by name). Each harness works under its own key prefix.

use std::sync::Arc;

use normandy_core::{Seq, SessionId, SessionStore, async_trait};
use normandy_store_redis::{RedisStore, RedisStoreConfig};
use normandy_tests::backends::{redis_cluster_url, redis_url, unique_name};
use normandy_tests::{StoreHarness, store_conformance};

struct RedisHarness {
    url: String,
    prefix: String,
    store: Arc<RedisStore>,
}

impl RedisHarness {
    async fn new() -> Option<Self> {
        let url = redis_url().await?;
        let prefix = unique_name("store");
        let store = Arc::new(open(&url, &prefix).await);
        Some(Self { url, prefix, store })
    }

    /// The same suite on a Redis Cluster (the seed nodes as one `redis+cluster://` URL).
    async fn cluster() -> Option<Self> {
        let url = redis_cluster_url().await?;
        let prefix = unique_name("store_cluster");
        let store = Arc::new(open(&url, &prefix).await);
        Some(Self { url, prefix, store })
    }
}

async fn open(url: &str, prefix: &str) -> RedisStore {
    let config = RedisStoreConfig::new(url)
        .expect("redis url")
        .prefix(prefix);
    RedisStore::connect(config).await.expect("connect to redis")
}

#[async_trait]
impl StoreHarness for RedisHarness {
    fn store(&self) -> Arc<dyn SessionStore> {
        self.store.clone()
    }

    async fn reopen(&self) -> Arc<dyn SessionStore> {
        Arc::new(open(&self.url, &self.prefix).await)
    }

    async fn raw_bytes(&self) -> Vec<u8> {
        self.store.raw_bytes().await.expect("raw bytes")
    }

    async fn overwrite_state(&self, id: &SessionId, bytes: &[u8]) {
        assert!(
            self.store
                .overwrite_state_bytes(id, bytes)
                .await
                .expect("overwrite state"),
            "no state to overwrite for {id}"
        );
    }

    async fn overwrite_entry(&self, id: &SessionId, seq: Seq, bytes: &[u8]) {
        assert!(
            self.store
                .overwrite_entry_bytes(id, seq, bytes)
                .await
                .expect("overwrite entry"),
            "no entry {seq} to overwrite for {id}"
        );
    }

    async fn cleanup(&self) {
        // Best effort: a leftover namespace only costs memory on a test server.
        let _ = self.store.purge().await;
    }
}

store_conformance!(redis, RedisHarness::new());
store_conformance!(redis_cluster, RedisHarness::cluster());
