//! [`TemplateCatalog`]: the node-local half of a session's configuration.
//!
//! Every node populates the same catalog in code: for each template id, the template itself (used
//! when a session starts) and the parts that cannot be stored — tools, hooks and the function that
//! builds a model client from resolved credentials. A session rebuilt on any node combines the
//! *stored* template with this node's catalog entry and credentials.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::credentials::{Credentials, Redactor};
use crate::error::{Error, Result};
use crate::hooks::Hook;
use crate::llm::{LlmClient, ToolSpec};
use crate::template::ConfigTemplate;
use crate::tools::{Tool, ToolRegistry};

/// Builds a session's model client from its template and resolved credentials.
pub type ClientBuilder =
    Arc<dyn Fn(&ConfigTemplate, &Credentials) -> Result<Arc<dyn LlmClient>> + Send + Sync>;

/// The node-local parts of one template.
#[derive(Clone)]
pub struct CatalogEntry {
    tools: ToolRegistry,
    hooks: Vec<(String, Arc<dyn Hook>)>,
    client: ClientBuilder,
}

impl fmt::Debug for CatalogEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CatalogEntry")
            .field("tools", &self.tools)
            .field(
                "hooks",
                &self.hooks.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl CatalogEntry {
    /// An entry whose clients come from `client`.
    pub fn new(
        client: impl Fn(&ConfigTemplate, &Credentials) -> Result<Arc<dyn LlmClient>>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        Self {
            tools: ToolRegistry::new(),
            hooks: Vec::new(),
            client: Arc::new(client),
        }
    }

    /// An entry that gives every session (a clone of) the same client.
    pub fn with_client(client: impl LlmClient + Clone) -> Self {
        Self::new(move |_, _| Ok(Arc::new(client.clone()) as Arc<dyn LlmClient>))
    }

    /// Adds a tool.
    pub fn tool(mut self, tool: impl Tool) -> Self {
        self.tools.register(tool);
        self
    }

    /// Adds a shared tool.
    pub fn tool_arc(mut self, tool: Arc<dyn Tool>) -> Self {
        self.tools.register_arc(tool);
        self
    }

    /// Adds a named hook (hooks run in the order added).
    pub fn hook(mut self, name: impl Into<String>, hook: impl Hook) -> Self {
        self.hooks.push((name.into(), Arc::new(hook)));
        self
    }
}

/// A live session's configuration, rebuilt on each node from template + catalog + credentials.
///
/// Everything but the client is shared between sessions of one template where the template asks
/// for no subset, so a live idle session costs little memory.
#[derive(Clone)]
pub struct SessionConfig {
    /// The stored template.
    pub template: Arc<ConfigTemplate>,
    /// Tools the session may call.
    pub tools: ToolRegistry,
    /// Their specs, as sent to the model.
    pub tool_specs: Arc<[ToolSpec]>,
    /// Model parameters from the template.
    pub params: Arc<std::collections::BTreeMap<String, serde_json::Value>>,
    /// Hooks with their catalog names (so a failing hook is named), in order.
    pub hooks: Arc<[(String, Arc<dyn Hook>)]>,
    /// The model client.
    pub client: Arc<dyn LlmClient>,
    /// Hides the resolved credentials' values in error text before it is stored or logged: a
    /// provider error may echo the key it was given.
    pub redactor: Redactor,
}

impl fmt::Debug for SessionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionConfig")
            .field("template", &self.template.template_id)
            .field("tools", &self.tools)
            .field("hooks", &self.hooks.len())
            .finish_non_exhaustive()
    }
}

/// One template with its node-local parts and the pieces every session of it can share.
#[derive(Clone)]
struct Registered {
    template: Arc<ConfigTemplate>,
    entry: CatalogEntry,
    all_specs: Arc<[ToolSpec]>,
    all_hooks: Arc<[(String, Arc<dyn Hook>)]>,
    params: Arc<std::collections::BTreeMap<String, serde_json::Value>>,
}

/// Templates and their node-local parts, by template id.
#[derive(Clone, Default)]
pub struct TemplateCatalog {
    entries: HashMap<String, Registered>,
}

impl fmt::Debug for TemplateCatalog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<_> = self.entries.keys().collect();
        ids.sort();
        f.debug_struct("TemplateCatalog")
            .field("templates", &ids)
            .finish()
    }
}

impl TemplateCatalog {
    /// An empty catalog.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a template with its node-local parts.
    pub fn register(&mut self, template: ConfigTemplate, entry: CatalogEntry) -> Result<&mut Self> {
        template.validate()?;
        let registered = Registered {
            all_specs: entry.tools.specs().into(),
            all_hooks: entry.hooks.iter().cloned().collect(),
            params: Arc::new(template.params.clone()),
            template: Arc::new(template),
            entry,
        };
        self.entries
            .insert(registered.template.template_id.clone(), registered);
        Ok(self)
    }

    /// Builder form of [`register`](Self::register).
    pub fn with(mut self, template: ConfigTemplate, entry: CatalogEntry) -> Result<Self> {
        self.register(template, entry)?;
        Ok(self)
    }

    /// The current template for `template_id` (used when starting a session).
    pub fn template(&self, template_id: &str) -> Result<Arc<ConfigTemplate>> {
        self.entries
            .get(template_id)
            .map(|r| r.template.clone())
            .ok_or_else(|| Error::TemplateNotFound {
                template_id: template_id.to_string(),
            })
    }

    /// Builds a live configuration from a (stored) template, this node's entry and credentials.
    ///
    /// A stored template equal to the catalog's shares the catalog's copy.
    pub fn build(&self, template: ConfigTemplate, creds: &Credentials) -> Result<SessionConfig> {
        let reg =
            self.entries
                .get(&template.template_id)
                .ok_or_else(|| Error::TemplateNotFound {
                    template_id: template.template_id.clone(),
                })?;
        let template = if *reg.template == template {
            reg.template.clone()
        } else {
            Arc::new(template)
        };
        let entry = &reg.entry;
        let (tools, tool_specs) = if template.tools.is_empty() {
            (entry.tools.clone(), reg.all_specs.clone())
        } else {
            let tools = entry.tools.subset(&template.tools);
            for name in &template.tools {
                if tools.get(name).is_none() {
                    return Err(Error::Config(format!(
                        "template {} names tool {name:?}, which this node's catalog lacks",
                        template.template_id
                    )));
                }
            }
            let specs = tools.specs().into();
            (tools, specs)
        };
        let hooks = if template.hooks.is_empty() {
            reg.all_hooks.clone()
        } else {
            let mut hooks = Vec::new();
            for name in &template.hooks {
                let hook = entry.hooks.iter().find(|(n, _)| n == name).ok_or_else(|| {
                    Error::Config(format!(
                        "template {} names hook {name:?}, which this node's catalog lacks",
                        template.template_id
                    ))
                })?;
                hooks.push(hook.clone());
            }
            hooks.into()
        };
        let params = if template.params == *reg.params {
            reg.params.clone()
        } else {
            Arc::new(template.params.clone())
        };
        let client = (entry.client)(&template, creds)?;
        Ok(SessionConfig {
            template,
            tools,
            tool_specs,
            params,
            hooks,
            client,
            redactor: creds.redactor(),
        })
    }
}
