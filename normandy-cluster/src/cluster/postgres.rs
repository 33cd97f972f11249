//! [`PostgresClusterBuilder`]: tier 2p, a cluster on Postgres alone — the Postgres store, the
//! Postgres registry and Postgres membership, each on its own pool, in one schema.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use normandy_core::{CredentialProvider, Result, SessionStore, TemplateCatalog};
use normandy_registry_postgres::{PgMembership, PgRegistry, PgRegistryConfig};
use normandy_store_postgres::{PgStore, PgStoreConfig};

use super::{Cluster, ClusterBuilder};
use crate::config::ClusterConfig;
use crate::tls::ClusterTls;

impl Cluster {
    /// Tier 2p: store, registry and membership on the Postgres database at `url`, so a team
    /// with only Postgres runs one node or N with the same configuration. Each part gets its
    /// own pool (membership a small one of its own, so a lease refresh never waits behind a
    /// commit for a connection).
    pub fn postgres(catalog: TemplateCatalog, url: &str) -> PostgresClusterBuilder {
        PostgresClusterBuilder {
            inner: Self::builder(catalog),
            url: url.to_string(),
            schema: None,
            migrate_on_open: false,
            transaction_pooler: false,
            store_connections: None,
            store: None,
            lease_ttl: ClusterConfig::default().lease_ttl,
        }
    }
}

/// The Postgres-alone builder: see [`Cluster::postgres`].
pub struct PostgresClusterBuilder {
    inner: ClusterBuilder,
    url: String,
    schema: Option<String>,
    migrate_on_open: bool,
    transaction_pooler: bool,
    /// The store's pool size (default: the store's own, 16).
    store_connections: Option<u32>,
    store: Option<Arc<dyn SessionStore>>,
    /// The lease TTL of the node's config: the membership's timeouts follow from it.
    lease_ttl: Duration,
}

impl std::fmt::Debug for PostgresClusterBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: never printed.
        f.debug_struct("PostgresClusterBuilder")
            .field("schema", &self.schema)
            .field("transaction_pooler", &self.transaction_pooler)
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl PostgresClusterBuilder {
    /// Puts every table (store, registry, leases) in `schema` instead of the server's default.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// Applies the store's and the registry's migrations when the node starts (default off:
    /// schema changes are usually an operator's step; see `cargo xtask migrate` and
    /// `normandy_registry_postgres::migrator`).
    pub fn migrate_on_open(mut self, yes: bool) -> Self {
        self.migrate_on_open = yes;
        self
    }

    /// Says a transaction-pooling pooler (PgBouncer, `pool_mode = transaction`) sits in front
    /// of Postgres: the store, the registry and membership then keep no session state on the
    /// server (unnamed statements, `SET LOCAL` in one transaction per call). The URL option
    /// `?pooler=transaction` says the same.
    pub fn transaction_pooler(mut self, yes: bool) -> Self {
        self.transaction_pooler = yes;
        self
    }

    /// The size of the store's connection pool (default 16, the store's own). A node holds
    /// this many plus 4 (registry) and 2 (membership) connections at most: mind the server's
    /// `max_connections` when many nodes share it, or put PgBouncer in front.
    pub fn store_connections(mut self, n: u32) -> Self {
        self.store_connections = Some(n);
        self
    }

    /// Uses another store instead of the Postgres store at the same URL.
    pub fn store(mut self, store: Arc<dyn SessionStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// See [`ClusterBuilder::node_name`].
    pub fn node_name(mut self, name: impl Into<String>) -> Self {
        self.inner = self.inner.node_name(name);
        self
    }

    /// See [`ClusterBuilder::bind`].
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.inner = self.inner.bind(addr);
        self
    }

    /// See [`ClusterBuilder::advertise`].
    pub fn advertise(mut self, address: impl Into<String>) -> Self {
        self.inner = self.inner.advertise(address);
        self
    }

    /// See [`ClusterBuilder::secret`].
    pub fn secret(mut self, secret: impl Into<String>) -> Self {
        self.inner = self.inner.secret(secret);
        self
    }

    /// See [`ClusterBuilder::credentials`].
    pub fn credentials(mut self, provider: Arc<dyn CredentialProvider>) -> Self {
        self.inner = self.inner.credentials(provider);
        self
    }

    /// See [`ClusterBuilder::tls`].
    pub fn tls(mut self, tls: ClusterTls) -> Self {
        self.inner = self.inner.tls(tls);
        self
    }

    /// See [`ClusterBuilder::config`].
    pub fn config(mut self, config: ClusterConfig) -> Self {
        self.lease_ttl = config.lease_ttl;
        self.inner = self.inner.config(config);
        self
    }

    /// See [`ClusterBuilder::reaper`].
    pub fn reaper(mut self, enabled: bool) -> Self {
        self.inner = self.inner.reaper(enabled);
        self
    }

    /// See [`ClusterBuilder::idle_timeout`].
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.inner = self.inner.idle_timeout(timeout);
        self
    }

    /// Connects store, registry and membership (separate pools) and builds the node.
    pub async fn build(self) -> Result<Cluster> {
        let ttl = self.lease_ttl;
        let mut registry_config = PgRegistryConfig::new(&self.url)?
            .migrate_on_open(self.migrate_on_open)
            .transaction_pooler(self.transaction_pooler);
        if let Some(schema) = &self.schema {
            registry_config = registry_config.schema(schema)?;
        }
        let registry = PgRegistry::connect(registry_config.clone()).await?;
        // A refresh answered after a third of the TTL is as good as lost: the lease loop
        // moves on at the next tick.
        let membership = PgMembership::connect(
            registry_config
                .migrate_on_open(false)
                .max_connections(2)
                .statement_timeout(ttl / 3)
                .acquire_timeout(ttl / 3)
                .application_name("normandy-membership"),
        )
        .await?;
        let store: Arc<dyn SessionStore> = match self.store {
            Some(store) => store,
            None => {
                let mut config =
                    PgStoreConfig::new(&self.url)?.migrate_on_open(self.migrate_on_open);
                if let Some(schema) = &self.schema {
                    config = config.schema(schema)?;
                }
                if self.transaction_pooler {
                    config = config.pooler(normandy_store_postgres::PoolerMode::Transaction);
                }
                if let Some(n) = self.store_connections {
                    config = config.max_connections(n);
                }
                Arc::new(PgStore::connect(config).await?)
            }
        };
        self.inner
            .registry(Arc::new(registry))
            .membership(Arc::new(membership))
            .store(store)
            .build()
            .await
    }
}
