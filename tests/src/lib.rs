//! The conformance suites every Normandy store and registry must pass — for backends in this
//! repository and out of it.
//!
//! # Layout
//! - [`harness`]: what a backend supplies — a [`StoreHarness`] (the store, a second handle on the
//!   same data, raw bytes for the canary scan, a way to plant corrupt bytes) or a
//!   [`RegistryHarness`] (the registry, a second handle, optional leases).
//! - [`store_cases`], [`registry_cases`]: the cases, plain `pub async fn case(h: Arc<dyn ...>)`
//!   functions, each doc naming its precondition; one per `# Behavior` bullet of the traits and
//!   per invariant of the design (single writer, atomic commits, idempotent input, no secret at
//!   rest, bad data is an error).
//! - [`store_conformance!`] and [`registry_conformance!`]: stamp one test per case per backend,
//!   named `<name>_<case>`.
//! - [`backends`]: finding a server — env URL, else a shared testcontainers container (feature
//!   `containers`), else a skip by name; `NORMANDY_REQUIRE_BACKENDS=1` turns skips into failures;
//!   [`backends::unique_name`] for a fresh namespace per harness.
//! - [`logs`]: the tracing capture the canary case scans.
//! - [`redis_server`]: real `redis-server` processes (a primary and its replica) for tests that
//!   need their own.
//!
//! # Using it from a backend crate
//! Add `normandy-tests` as a dev-dependency (with `features = ["containers"]` for container
//! discovery) and write one file, `tests/conformance.rs`:
//!
//! ```ignore
//! use std::sync::Arc;
//! use normandy_core::{Seq, SessionId, SessionStore, async_trait};
//! use normandy_tests::{StoreHarness, backends, store_conformance};
//!
//! struct Harness { store: Arc<MyStore>, url: String, namespace: String }
//!
//! impl Harness {
//!     async fn new() -> Option<Self> {
//!         let url = backends::postgres_url().await?;         // None: the suite is skipped
//!         let namespace = backends::unique_name("my_store"); // isolated per case
//!         let store = Arc::new(MyStore::connect(&url, &namespace).await.ok()?);
//!         Some(Self { store, url, namespace })
//!     }
//! }
//!
//! #[async_trait]
//! impl StoreHarness for Harness {
//!     fn store(&self) -> Arc<dyn SessionStore> { self.store.clone() }
//!     async fn reopen(&self) -> Arc<dyn SessionStore> {
//!         Arc::new(MyStore::connect(&self.url, &self.namespace).await.unwrap())
//!     }
//!     async fn raw_bytes(&self) -> Vec<u8> { /* every byte of the namespace */ }
//!     async fn overwrite_state(&self, id: &SessionId, bytes: &[u8]) { /* raw write */ }
//!     async fn overwrite_entry(&self, id: &SessionId, seq: Seq, bytes: &[u8]) { /* raw write */ }
//! }
//!
//! store_conformance!(my_store, Harness::new());
//! ```
//!
//! Run it with `cargo nextest run -p my-store` (or `cargo test`). A missing server prints
//! `SKIPPED my_store: <reason>` per test; CI sets `NORMANDY_REQUIRE_BACKENDS=1`. The suites for
//! the in-memory store and the local registry, in this crate's `tests/memory.rs`, are the
//! smallest complete example.
//!
//! Cases only check what the traits promise; none needs a capability a backend may lack (a
//! volatile store's `reopen` may return the same instance). Cases use random ids and node names,
//! so a failed run's leftovers never disturb the next one.

pub mod backends;
pub mod harness;
pub mod logs;
mod macros;
pub mod redis_server;
pub mod registry_cases;
pub mod store_cases;

pub use harness::{RegistryHarness, StoreHarness};

#[doc(hidden)]
pub use paste;

/// Names of the store cases, in the order [`store_conformance!`] stamps them.
pub const STORE_CASES: &[&str] = crate::__store_cases! { __case_names; };

/// Names of the registry cases, in the order [`registry_conformance!`] stamps them.
pub const REGISTRY_CASES: &[&str] = crate::__registry_cases! { __case_names; };

#[doc(hidden)]
pub mod __private {
    //! Support for the macros; not a public API.

    /// Runs one case on a fresh multi-thread runtime with 2 workers — what
    /// `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]` does — so that concurrency
    /// cases truly run in parallel.
    pub fn run<F: std::future::Future<Output = ()>>(case: F) {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("building the test runtime")
            .block_on(case);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// Every `pub async fn` of a cases file, by name.
    fn case_fns(source: &str) -> BTreeSet<String> {
        source
            .lines()
            .filter_map(|l| l.strip_prefix("pub async fn "))
            .map(|rest| rest.split('(').next().unwrap_or_default().to_string())
            .collect()
    }

    /// Every file of the `store_cases/` folder, by name, with its source: case names are
    /// collected from all of them, so a case counts in whichever file it is.
    const STORE_CASE_FILES: &[(&str, &str)] = &[
        ("mod.rs", include_str!("store_cases/mod.rs")),
        ("create.rs", include_str!("store_cases/create.rs")),
        ("activate.rs", include_str!("store_cases/activate.rs")),
        ("commit.rs", include_str!("store_cases/commit.rs")),
        ("atomic.rs", include_str!("store_cases/atomic.rs")),
        ("entries.rs", include_str!("store_cases/entries.rs")),
        ("resumable.rs", include_str!("store_cases/resumable.rs")),
        ("lifecycle.rs", include_str!("store_cases/lifecycle.rs")),
        ("corrupt.rs", include_str!("store_cases/corrupt.rs")),
        ("canary.rs", include_str!("store_cases/canary.rs")),
        (
            "single_writer.rs",
            include_str!("store_cases/single_writer.rs"),
        ),
    ];

    /// The `.rs` files of the `store_cases/` folder on disk, by name.
    fn store_case_files_on_disk() -> BTreeSet<String> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/store_cases");
        std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("reading {dir}: {e}"))
            .map(|entry| entry.expect("a directory entry").file_name())
            .filter_map(|name| name.into_string().ok())
            .filter(|name| name.ends_with(".rs"))
            .collect()
    }

    #[test]
    fn every_case_is_stamped() {
        let scanned: BTreeSet<String> = STORE_CASE_FILES
            .iter()
            .map(|(name, _)| name.to_string())
            .collect();
        assert_eq!(
            scanned.len(),
            STORE_CASE_FILES.len(),
            "a store cases file is listed twice"
        );
        assert_eq!(
            scanned,
            store_case_files_on_disk(),
            "STORE_CASE_FILES must name every file of src/store_cases/"
        );
        let listed: BTreeSet<String> = super::STORE_CASES.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            listed.len(),
            super::STORE_CASES.len(),
            "a store case is listed twice"
        );
        let defined: BTreeSet<String> = STORE_CASE_FILES
            .iter()
            .flat_map(|(_, source)| case_fns(source))
            .collect();
        assert_eq!(listed, defined);
        let listed: BTreeSet<String> = super::REGISTRY_CASES
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(listed.len(), super::REGISTRY_CASES.len());
        assert_eq!(listed, case_fns(include_str!("registry_cases.rs")));
    }
}
