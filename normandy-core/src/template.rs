//! [`ConfigTemplate`]: the non-secret, storable description of a session's configuration.
//!
//! The template is what the store keeps. A node rebuilds a live configuration from it plus its
//! own [`TemplateCatalog`](crate::catalog::TemplateCatalog) entry (tools, hooks, client builder)
//! and its [`CredentialProvider`](crate::credentials::CredentialProvider). It names credentials;
//! it never holds one.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What happens to a session whose owner died mid-turn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResumePolicy {
    /// Rebuilt on the next request (default). Costs nothing while idle.
    #[default]
    Lazy,
    /// Resumed by a reaper (or at start-up) without waiting for a request.
    Eager,
}

/// What a session does with input that arrives while a turn runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputMode {
    /// Accept (commit) it and run it after the current turn, in order (default).
    #[default]
    Queue,
    /// Refuse it with a `Busy` error.
    Reject,
    /// Cancel the running turn at its next boundary, then run the new input.
    Interrupt,
}

/// Limits of a session's turns. Defaults: 1 MiB input, 16 steps, 10-minute turn deadline, 64
/// queued inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TurnLimits {
    /// Largest accepted input, in bytes of text (default 1 MiB).
    pub max_input_bytes: usize,
    /// Most model calls in one turn (default 16).
    pub max_steps: u32,
    /// Deadline of one turn, in milliseconds (model and tool time together; default 600,000:
    /// 10 minutes). It counts the time the turn runs, on the monotonic clock of whichever node
    /// runs it, checkpointed at every commit (`ActiveTurn::ran_ms`): a turn that moves keeps the
    /// rest of its budget whatever the new node's wall clock says. Time while no node ran it
    /// (between a crash and its resume) is not counted, nor the uncommitted part of the step a
    /// crash cut short.
    pub turn_deadline_ms: u64,
    /// Deadline of one model call, in milliseconds (default 120,000: 2 minutes).
    pub model_call_timeout_ms: u64,
    /// Deadline of one tool call, in milliseconds (default 120,000: 2 minutes).
    pub tool_call_timeout_ms: u64,
    /// Most inputs accepted and waiting behind the running turn; more are refused with a
    /// retryable `Overloaded`, so the queue is never unbounded (default 64).
    pub max_queued_inputs: u32,
}

impl Default for TurnLimits {
    fn default() -> Self {
        Self {
            max_input_bytes: 1 << 20,
            max_steps: 16,
            turn_deadline_ms: 600_000,
            model_call_timeout_ms: 120_000,
            tool_call_timeout_ms: 120_000,
            max_queued_inputs: 64,
        }
    }
}

impl TurnLimits {
    /// The turn deadline as a duration.
    pub fn turn_deadline(&self) -> Duration {
        Duration::from_millis(self.turn_deadline_ms)
    }
}

/// The storable, secret-free configuration of a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigTemplate {
    /// The key into each node's [`TemplateCatalog`](crate::catalog::TemplateCatalog).
    pub template_id: String,
    /// The model name passed to the client.
    pub model: String,
    /// The system prompt.
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// Names of the catalog tools the session may call (empty: all of the catalog entry's tools).
    #[serde(default)]
    pub tools: Vec<String>,
    /// Names of the catalog hooks to run, in order (empty: all of the entry's hooks).
    #[serde(default)]
    pub hooks: Vec<String>,
    /// What happens after its owner dies.
    #[serde(default)]
    pub resume_policy: ResumePolicy,
    /// What happens to input during a turn.
    #[serde(default)]
    pub input_mode: InputMode,
    /// Names of the credentials the client needs (resolved by each node's provider).
    #[serde(default)]
    pub credentials: Vec<String>,
    /// Turn limits.
    #[serde(default)]
    pub limits: TurnLimits,
    /// Free-form model parameters (temperature, max tokens, ...).
    #[serde(default)]
    pub params: BTreeMap<String, serde_json::Value>,
}

impl ConfigTemplate {
    /// A template with defaults for everything but its id and model.
    pub fn new(template_id: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            template_id: template_id.into(),
            model: model.into(),
            system_prompt: None,
            tools: Vec::new(),
            hooks: Vec::new(),
            resume_policy: ResumePolicy::Lazy,
            input_mode: InputMode::Queue,
            credentials: Vec::new(),
            limits: TurnLimits::default(),
            params: BTreeMap::new(),
        }
    }

    /// Sets the system prompt.
    pub fn system_prompt(mut self, prompt: impl Into<String>) -> Self {
        self.system_prompt = Some(prompt.into());
        self
    }

    /// Sets the resume policy.
    pub fn resume_policy(mut self, policy: ResumePolicy) -> Self {
        self.resume_policy = policy;
        self
    }

    /// Sets the input mode.
    pub fn input_mode(mut self, mode: InputMode) -> Self {
        self.input_mode = mode;
        self
    }

    /// Names a credential the client needs.
    pub fn credential(mut self, name: impl Into<String>) -> Self {
        self.credentials.push(name.into());
        self
    }

    /// Sets a model parameter (`temperature`, `max_tokens`, a provider's own key), sent with
    /// every model call of the template's sessions.
    pub fn param(mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.params.insert(key.into(), value.into());
        self
    }

    /// Sets the turn limits.
    pub fn limits(mut self, limits: TurnLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Checks the template for values that cannot work.
    pub fn validate(&self) -> Result<()> {
        if self.template_id.is_empty() || self.template_id.len() > 200 {
            return Err(Error::Config(format!(
                "template id {:?} must be 1-200 bytes",
                self.template_id
            )));
        }
        let l = &self.limits;
        if l.turn_deadline_ms == 0 || l.model_call_timeout_ms == 0 || l.tool_call_timeout_ms == 0 {
            return Err(Error::Config(format!(
                "template {}: turn deadline and call timeouts must be greater than zero",
                self.template_id
            )));
        }
        if self.limits.max_steps == 0 {
            return Err(Error::Config(format!(
                "template {}: max_steps must be at least 1",
                self.template_id
            )));
        }
        Ok(())
    }
}
