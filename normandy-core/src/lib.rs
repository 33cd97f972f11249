//! Durable, distributed LLM-agent sessions: the core.
//!
//! A *session* is one conversation with one agent. Its *turn engine* — a tokio task per live
//! session — runs each input's turn (model call → tool calls → model call … → answer) and commits
//! at every boundary through a [`SessionStore`], fenced by an epoch, so any node can rebuild the
//! session and continue an interrupted turn.
//!
//! # Layout
//! - [`model`]: ids, the conversation graph ([`Entry`]), messages and content blocks.
//! - [`template`], [`catalog`], [`credentials`]: how a session's configuration is stored without
//!   secrets and rebuilt on any node.
//! - [`llm`], [`tools`], [`hooks`]: the model seam, tools, and hooks around both.
//! - [`store`], [`registry`]: the two backend traits, with [`InMemoryStore`] and [`LocalRegistry`];
//!   [`membership`]: node leases, for clusters.
//! - [`codec`]: the versioned MessagePack of every stored blob.
//! - [`engine`]: turn state, events, outcomes, and the per-session actor.
//! - [`runtime`]: one node's wiring and [`Sessions`], the handle users call.
//! - [`error`]: the one [`Error`] type, with a kind and whether a retry can help.
//!
//! # Example
//! ```
//! use normandy_core::{CatalogEntry, ConfigTemplate, ScriptedClient, Sessions, TemplateCatalog};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> normandy_core::Result<()> {
//! let catalog = TemplateCatalog::new().with(
//!     ConfigTemplate::new("echo", "scripted"),
//!     CatalogEntry::with_client(ScriptedClient::echo()),
//! )?;
//! let sessions = Sessions::builder(catalog).build()?; // tier 0: in-memory store, local registry
//! let id = sessions.start("echo").await?;
//! let outcome = sessions.send(&id, "hello").await?;
//! assert_eq!(outcome.text(), "echo: hello");
//! # Ok(())
//! # }
//! ```

pub mod bounded;
pub mod catalog;
pub mod codec;
pub mod credentials;
pub mod engine;
pub mod error;
pub mod hooks;
pub mod llm;
pub mod membership;
pub mod model;
pub mod registry;
pub mod runtime;
pub mod store;
pub mod template;
pub mod tools;

pub use bounded::{Bounded, BoundedMembership, BoundedRegistry, BoundedStore};
pub use catalog::{CatalogEntry, SessionConfig, TemplateCatalog};
pub use credentials::{
    CredentialProvider, Credentials, EnvCredentials, FromClient, StaticCredentials,
};
pub use engine::{
    ActiveTurn, Attempt, Conversation, PendingCall, Phase, QueuedInput, TurnEvent, TurnOutcome,
    TurnState,
};
pub use error::{Error, ErrorKind, ProviderError, Result};
pub use hooks::{Hook, HookDecision, ToolCall};
pub use llm::{
    LlmClient, ModelDelta, ModelEvent, ModelRequest, ModelResponse, ModelStream, ScriptedClient,
    ToolSpec, collect_response,
};
pub use membership::{JoinOutcome, LeaseStatus, Member, Membership};
pub use model::{
    CallInfo, ContentBlock, DoubtReason, Entry, EntryPayload, Epoch, InDoubt, InputId,
    MAX_INLINE_MEDIA_BYTES, MediaSource, Message, NodeId, Role, Seq, SessionId, StopReason,
    TurnStatus, Usage,
};
pub use registry::{LocalRegistry, Placement, SessionRegistry};
pub use runtime::{CommitGate, EventStream, Input, Sessions, SessionsBuilder, StartOptions};
pub use store::{
    Capabilities, CommitAck, CommitBatch, InMemoryStore, NewSession, OwnerFilter, ResumablePage,
    ResumableSession, SessionRecord, SessionStatus, SessionStore, now_ms,
};
pub use template::{ConfigTemplate, InputMode, ResumePolicy, TurnLimits};
pub use tools::{Tool, ToolContext, ToolOutput, ToolRegistry};

pub use async_trait::async_trait;
