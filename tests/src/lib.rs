//! The conformance suites (being built): see `harness` for what a backend supplies.

pub mod harness;
pub use harness::{RegistryHarness, StoreHarness};
