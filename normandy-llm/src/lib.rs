//! Model provider adapters for Normandy: clients implementing
//! [`LlmClient`](normandy_core::LlmClient) over the providers' HTTP APIs.
//!
//! Each adapter is behind a feature: `anthropic` (the Messages API) and `openai` (Chat
//! Completions, which llama.cpp, vLLM, Ollama and many gateways also speak).
//!
//! # Layout
//! - [`http`]: [`HttpConfig`], the timeouts and retry budget every adapter
//!   takes, and the one place the HTTP client is built.
//! - `error`: the mapping of HTTP statuses, transport failures, in-stream error events and
//!   malformed answers into [`normandy_core::ProviderError`], with whether a retry can help.
//! - `retry`: sending one request with retries (backon, honouring `retry-after`).
//! - `sse`: server-sent events over a response body (framing by `sse-stream`).
//! - `driver`: the streaming loop both adapters share: POST, feed events to the adapter's
//!   parser, re-POST a stream cut before its end marker.
//! - `anthropic`, `openai`: the adapters (request mapping, response parsing, stream parser).

// Without an adapter the shared modules have no user.
#![cfg_attr(not(any(feature = "anthropic", feature = "openai")), allow(dead_code))]

pub mod http;

mod driver;
mod error;
mod retry;
mod sse;

#[cfg(feature = "anthropic")]
pub mod anthropic;
#[cfg(feature = "openai")]
pub mod openai;

pub use http::HttpConfig;
