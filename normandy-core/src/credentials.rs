//! Credentials: resolved on each node, never stored, never replicated, never printed.
//!
//! A [`ConfigTemplate`](crate::template::ConfigTemplate) names the credentials its client needs;
//! a node-local [`CredentialProvider`] turns names into secrets when a session is (re)built.

use std::borrow::Cow;
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

    /// A [`Redactor`] for these secrets' values.
    pub fn redactor(&self) -> Redactor {
        let mut secrets: Vec<(String, SecretString)> = self
            .secrets
            .iter()
            .filter(|(_, s)| !s.expose_secret().is_empty())
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        // Longest first: where one value contains another, the whole of the longer is hidden.
        // Then by name, so the placeholder chosen for two equal values is stable.
        secrets.sort_by(|(an, a), (bn, b)| {
            (b.expose_secret().len(), an).cmp(&(a.expose_secret().len(), bn))
        });
        Redactor {
            secrets: secrets.into(),
        }
    }
}

/// Values shorter than this are redacted only where they stand alone (not inside a longer
/// alphanumeric word): a short value is likely to occur by chance in ordinary text ("1234" in
/// "port 12345"), and hiding it there would garble errors without protecting anything — a
/// secret that short is guessable anyway. Longer values are redacted wherever they occur.
const SHORT_SECRET_BYTES: usize = 8;

/// Replaces occurrences of a session's resolved credential values in text — error messages a
/// model provider may have built around the key it was sent — with
/// `[redacted credential NAME]`, before that text is stored or logged. `Debug` prints names only.
///
/// It matches the values verbatim: a provider that echoes a key transformed (URL-encoded,
/// truncated, hashed) is not caught, which is why secrets are still never put in errors on
/// purpose.
#[derive(Clone, Default)]
pub struct Redactor {
    /// `(name, value)`, longest value first; no empty values.
    secrets: Arc<[(String, SecretString)]>,
}

impl Redactor {
    /// `text` with every credential value in it replaced by a placeholder naming it. One left-
    /// to-right pass over the original text, so a placeholder is never searched again.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = String::new();
        let mut copied = 0;
        let mut i = 0;
        while i < text.len() {
            let hit = self.secrets.iter().find(|(_, secret)| {
                let value = secret.expose_secret();
                text[i..].starts_with(value)
                    && (value.len() >= SHORT_SECRET_BYTES || stands_alone(text, i, value.len()))
            });
            match hit {
                Some((name, secret)) => {
                    out.push_str(&text[copied..i]);
                    out.push_str("[redacted credential ");
                    out.push_str(name);
                    out.push(']');
                    i += secret.expose_secret().len();
                    copied = i;
                }
                None => i += text[i..].chars().next().map_or(1, char::len_utf8),
            }
        }
        if copied == 0 {
            return Cow::Borrowed(text);
        }
        out.push_str(&text[copied..]);
        Cow::Owned(out)
    }
}

/// Whether `text[at..at + len]` is not flanked by alphanumeric characters.
fn stands_alone(text: &str, at: usize, len: usize) -> bool {
    let before = text[..at].chars().next_back();
    let after = text[at + len..].chars().next();
    !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redactor")
            .field(
                "names",
                &self.secrets.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish()
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
///
/// Implement it with [`#[normandy_core::async_trait]`](crate::async_trait) on the `impl`:
///
/// ```
/// use normandy_core::{CredentialProvider, Credentials, Error, Result, SessionId, async_trait};
///
/// /// Reads each secret from a file of the same name under a directory (a mounted vault).
/// struct SecretDir(std::path::PathBuf);
///
/// #[async_trait]
/// impl CredentialProvider for SecretDir {
///     async fn resolve(&self, _session: &SessionId, names: &[String]) -> Result<Credentials> {
///         let mut creds = Credentials::new();
///         for name in names {
///             let secret = std::fs::read_to_string(self.0.join(name)).map_err(|_| {
///                 Error::Credentials {
///                     reason: format!("credential {name:?}: no such file in the secret directory"),
///                 }
///             })?;
///             creds = creds.with(name.clone(), secret.trim());
///         }
///         Ok(creds)
///     }
/// }
/// ```
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
    fn redactor_hides_every_value_and_names_it() {
        let creds = Credentials::new()
            .with("api", "sk-live-0123456789")
            .with("inner", "sk-live-0123")
            .with("pin", "4711")
            .with("empty", "");
        let r = creds.redactor();
        assert_eq!(
            r.redact("invalid key sk-live-0123456789, retry sk-live-0123456789x"),
            "invalid key [redacted credential api], retry [redacted credential api]x"
        );
        // The longer value wins where both match; the shorter one alone is still hidden.
        assert_eq!(
            r.redact("keys sk-live-0123 and é sk-live-0123456789"),
            "keys [redacted credential inner] and é [redacted credential api]"
        );
        // A short value is hidden where it stands alone, not inside a longer word or number.
        assert_eq!(
            r.redact("pin 4711 rejected; port 47110"),
            "pin [redacted credential pin] rejected; port 47110"
        );
        assert!(matches!(r.redact("nothing here"), Cow::Borrowed(_)));
        assert!(!format!("{r:?}").contains("sk-live"));
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
