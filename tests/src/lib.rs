//! Conformance suite (being built).
