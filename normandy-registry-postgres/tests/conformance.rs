//! The registry conformance suite against a real Postgres (`NORMANDY_TEST_DATABASE_URL`, else a
//! container, else skipped by name). Each harness works in its own schema. The suite runs a
//! second time through a PgBouncer in transaction mode (`NORMANDY_TEST_PGBOUNCER_URL`).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Schema;
use normandy_core::{NodeId, SessionRegistry, async_trait};
use normandy_registry_postgres::PgRegistry;
use normandy_tests::backends::postgres_url;
use normandy_tests::{RegistryHarness, registry_conformance};

struct PgHarness {
    schema: Schema,
    registry: Arc<PgRegistry>,
}

impl PgHarness {
    async fn new() -> Option<Self> {
        let url = postgres_url().await?;
        let schema = Schema::new(&url).await;
        let registry = Arc::new(schema.registry().await);
        Some(Self { schema, registry })
    }

    /// The same, every call through a PgBouncer in transaction mode.
    async fn pooled() -> Option<Self> {
        let url = postgres_url().await?;
        let Some(pooler) = common::pgbouncer_url() else {
            normandy_tests::backends::skip(
                "postgres_pgbouncer",
                &format!("{} is not set", common::PGBOUNCER_URL_VAR),
            );
            return None;
        };
        let schema = Schema::pooled(&url, &pooler).await;
        let registry = Arc::new(schema.registry().await);
        assert!(schema.config().is_transaction_pooled());
        Some(Self { schema, registry })
    }
}

#[async_trait]
impl RegistryHarness for PgHarness {
    fn registry(&self) -> Arc<dyn SessionRegistry> {
        self.registry.clone()
    }

    async fn reopen(&self) -> Arc<dyn SessionRegistry> {
        Arc::new(self.schema.registry().await)
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
        // A TTL far longer than any case: leases lapse here only through `expire_node`.
        self.registry
            .acquire_lease(node, Duration::from_secs(120))
            .await
            .expect("acquire lease");
    }

    async fn cleanup(&self) {
        self.registry.pool().close().await;
        self.schema.drop().await;
    }
}

registry_conformance!(postgres, PgHarness::new());
registry_conformance!(postgres_pgbouncer, PgHarness::pooled());
