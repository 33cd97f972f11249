//! Credentials: resolved on each node, never stored, never replicated, never printed.
//!
//! A [`ConfigTemplate`](crate::template::ConfigTemplate) names the credentials its client needs;
//! a node-local [`CredentialProvider`] turns names into secrets when a session is (re)built.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};

use crate::error::{Error, Result};
use crate::model::SessionId;

/// Resolved secrets for one session, by name. `Debug` prints names only.
#[derive(Clone, Default)]
pub struct Credentials {
    secrets: HashMap<String, SecretString>,
}

impl Credentials {
    /// No credentials.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a secret under a name.
    pub fn with(mut self, name: impl Into<String>, secret: impl Into<String>) -> Self {
        self.secrets
            .insert(name.into(), SecretString::from(secret.into()));
        self
    }

    /// The secret under `name`, if present.
    pub fn get(&self, name: &str) -> Option<&SecretString> {
        self.secrets.get(name)
    }

    /// The secret under `name` as a string, or a `Credentials` error naming it.
    pub fn expose(&self, name: &str) -> Result<&str> {
        self.get(name)
            .map(|s| s.expose_secret())
            .ok_or_else(|| Error::Credentials {
                reason: format!("no credential named {name:?}"),
            })
    }

    /// Names present.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.secrets.keys().map(String::as_str)
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.secrets.keys().collect();
        names.sort();
        f.debug_struct("Credentials")
            .field("names", &names)
            .finish_non_exhaustive()
    }
}

/// Turns credential names into secrets on this node.
#[async_trait]
pub trait CredentialProvider: Send + Sync + 'static {
    /// Resolves every name in `names` for `session`.
    ///
    /// # Behavior
    /// - A name it cannot resolve is a `Credentials` error naming it (never the secret).
    async fn resolve(&self, session: &SessionId, names: &[String]) -> Result<Credentials>;

    /// Whether any node can resolve the same names. `false` for [`FromClient`], which only knows
    /// secrets handed to this process; the cluster builder refuses such a provider.
    fn is_portable(&self) -> bool {
        true
    }
}

/// Reads each credential from an environment variable: the name upper-cased, non-alphanumerics
/// turned into `_`, behind an optional prefix (`openai-key` → `NORMANDY_OPENAI_KEY`).
#[derive(Debug, Clone, Default)]
pub struct EnvCredentials {
    prefix: String,
}

impl EnvCredentials {
    /// A provider with no prefix.
    pub fn new() -> Self {
        Self::default()
    }

    /// A provider whose variables start with `prefix`.
    pub fn with_prefix(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The variable a name maps to.
    pub fn var_name(&self, name: &str) -> String {
        let mapped: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        format!("{}{}", self.prefix, mapped)
    }
}

#[async_trait]
impl CredentialProvider for EnvCredentials {
    async fn resolve(&self, _session: &SessionId, names: &[String]) -> Result<Credentials> {
        let mut creds = Credentials::new();
        for name in names {
            let var = self.var_name(name);
            let value = std::env::var(&var).map_err(|_| Error::Credentials {
                reason: format!("credential {name:?}: environment variable {var} is not set"),
            })?;
            creds = creds.with(name.clone(), value);
        }
        Ok(creds)
    }
}

/// Fixed secrets shared by all sessions of this node: handy for tests and single-tenant services.
#[derive(Debug, Clone, Default)]
pub struct StaticCredentials {
    creds: Credentials,
}

impl StaticCredentials {
    /// A provider that serves `creds` to every session.
    pub fn new(creds: Credentials) -> Self {
        Self { creds }
    }
}

#[async_trait]
impl CredentialProvider for StaticCredentials {
    async fn resolve(&self, _session: &SessionId, names: &[String]) -> Result<Credentials> {
        let mut out = Credentials::new();
        for name in names {
            let secret = self.creds.get(name).ok_or_else(|| Error::Credentials {
                reason: format!("no static credential named {name:?}"),
            })?;
            out.secrets.insert(name.clone(), secret.clone());
        }
        Ok(out)
    }
}

/// Secrets handed over by the client at `start`, kept only in this process (tier 0).
///
/// A session started this way can be rebuilt on this node while the process lives, never on
/// another node and never after a restart: the cluster builder refuses this provider.
#[derive(Debug, Clone, Default)]
pub struct FromClient {
    // std Mutex: the critical sections are map lookups that never await.
    by_session: Arc<Mutex<HashMap<SessionId, Credentials>>>,
}

impl FromClient {
    /// An empty provider.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the client's credentials for `session`.
    pub fn insert(&self, session: SessionId, creds: Credentials) {
        self.by_session
            .lock()
            .expect("credential map poisoned")
            .insert(session, creds);
    }

    /// Forgets a session's credentials.
    pub fn remove(&self, session: &SessionId) {
        self.by_session
            .lock()
            .expect("credential map poisoned")
            .remove(session);
    }
}

#[async_trait]
impl CredentialProvider for FromClient {
    async fn resolve(&self, session: &SessionId, names: &[String]) -> Result<Credentials> {
        let map = self.by_session.lock().expect("credential map poisoned");
        let Some(creds) = map.get(session) else {
            if names.is_empty() {
                return Ok(Credentials::new());
            }
            return Err(Error::Credentials {
                reason: format!(
                    "session {session}: its credentials were given by the client to another \
                     process (FromClient); start it again with credentials"
                ),
            });
        };
        for name in names {
            if creds.get(name).is_none() {
                return Err(Error::Credentials {
                    reason: format!("session {session}: client gave no credential {name:?}"),
                });
            }
        }
        Ok(creds.clone())
    }

    fn is_portable(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_secrets() {
        let c = Credentials::new().with("api", "sk-canary-123");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("sk-canary"), "{dbg}");
        assert!(dbg.contains("api"));
    }

    #[test]
    fn env_var_names() {
        let p = EnvCredentials::with_prefix("NORMANDY_");
        assert_eq!(p.var_name("openai-key"), "NORMANDY_OPENAI_KEY");
    }

    #[tokio::test]
    async fn from_client_is_not_portable_and_names_missing() {
        let p = FromClient::new();
        assert!(!p.is_portable());
        let s = SessionId::new("s").unwrap();
        let err = p.resolve(&s, &["k".into()]).await.unwrap_err();
        assert!(err.to_string().contains("FromClient"), "{err}");
        p.insert(s.clone(), Credentials::new().with("k", "v"));
        assert_eq!(
            p.resolve(&s, &["k".into()])
                .await
                .unwrap()
                .expose("k")
                .unwrap(),
            "v"
        );
    }
}
