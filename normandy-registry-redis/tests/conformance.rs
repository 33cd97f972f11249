//! The registry conformance suite against a real Redis (`NORMANDY_TEST_REDIS_URL`, else a
//! container, else skipped by name), and again against a Redis Cluster
//! (`NORMANDY_TEST_REDIS_CLUSTER_URLS`, else skipped by name). Each harness works under its own
//! key prefix.

use std::sync::Arc;
use std::time::Duration;

use normandy_core::{NodeId, SessionRegistry, async_trait};
use normandy_registry_redis::{RedisRegistry, RedisRegistryConfig};
use normandy_tests::backends::{redis_cluster_url, redis_url, unique_name};
use normandy_tests::{RegistryHarness, registry_conformance};

struct RedisHarness {
    url: String,
    prefix: String,
    registry: Arc<RedisRegistry>,
}

impl RedisHarness {
    async fn new() -> Option<Self> {
        Self::at(redis_url().await?).await
    }

    async fn cluster() -> Option<Self> {
        Self::at(redis_cluster_url().await?).await
    }

    async fn at(url: String) -> Option<Self> {
        let prefix = unique_name("registry");
        let registry = Arc::new(open(&url, &prefix).await);
        Some(Self {
            url,
            prefix,
            registry,
        })
    }
}

async fn open(url: &str, prefix: &str) -> RedisRegistry {
    // A TTL far longer than any case: leases lapse here only through `expire_node`.
    let config = RedisRegistryConfig::new(url)
        .expect("redis url")
        .prefix(prefix)
        .lease_ttl(Duration::from_secs(120));
    RedisRegistry::connect(config)
        .await
        .expect("connect to redis")
}

#[async_trait]
impl RegistryHarness for RedisHarness {
    fn registry(&self) -> Arc<dyn SessionRegistry> {
        self.registry.clone()
    }

    async fn reopen(&self) -> Arc<dyn SessionRegistry> {
        Arc::new(open(&self.url, &self.prefix).await)
    }

    fn has_leases(&self) -> bool {
        true
    }

    async fn expire_node(&self, node: &NodeId) {
        self.registry
            .release_lease(node)
            .await
            .expect("delete lease");
    }

    async fn make_live(&self, node: &NodeId) {
        self.registry
            .acquire_lease(node)
            .await
            .expect("acquire lease");
    }

    async fn cleanup(&self) {
        let _ = self.registry.purge().await;
    }
}

registry_conformance!(redis, RedisHarness::new());
registry_conformance!(redis_cluster, RedisHarness::cluster());
