//! The Anthropic Messages API adapter: [`AnthropicClient`], its [`AnthropicConfig`], and
//! [`catalog_entry`], which builds the client from a node's resolved credential.
//!
//! ```
//! use normandy_core::{ConfigTemplate, TemplateCatalog};
//! use normandy_llm::anthropic::{self, AnthropicConfig};
//!
//! # fn main() -> normandy_core::Result<()> {
//! let catalog = TemplateCatalog::new().with(
//!     ConfigTemplate::new("support", "claude-sonnet-4-5")
//!         .system_prompt("You answer support questions.")
//!         .credential("ANTHROPIC_API_KEY"),
//!     anthropic::catalog_entry("ANTHROPIC_API_KEY", AnthropicConfig::default()),
//! )?;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! - `wire`: the request body (conversation, tools, parameters, prompt-cache breakpoints).
//! - `parse`: the stream parser and the reading of a whole response.

mod parse;
mod wire;

use std::fmt;
use std::sync::Arc;

use normandy_core::{
    CatalogEntry, Error, LlmClient, ModelRequest, ModelResponse, ModelStream, Result, async_trait,
};
use reqwest::header::{CONTENT_TYPE, HeaderValue};
use secrecy::{ExposeSecret, SecretString};

use crate::error;
use crate::http::{HttpConfig, SharedClient, build_client};
use crate::{driver, retry};

/// The adapter's name in errors and logs.
pub(crate) const PROVIDER: &str = "anthropic";

/// The API version this adapter speaks (the `anthropic-version` header).
const API_VERSION: &str = "2023-06-01";

/// Where the Messages API is, unless [`AnthropicConfig::base_url`] says otherwise.
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";

/// How an [`AnthropicClient`] calls the API. Builder-style; the default is the public API with
/// prompt caching on and the default [`HttpConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnthropicConfig {
    /// Without a trailing slash.
    base_url: String,
    http: HttpConfig,
    /// `anthropic-beta` values, sent comma-separated.
    betas: Vec<String>,
    prompt_caching: bool,
}

impl Default for AnthropicConfig {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_BASE_URL.to_owned(),
            http: HttpConfig::default(),
            betas: Vec::new(),
            prompt_caching: true,
        }
    }
}

impl AnthropicConfig {
    /// The default configuration.
    pub fn new() -> Self {
        Self::default()
    }

    /// The API's base URL, without `/v1/messages` (default [`DEFAULT_BASE_URL`]): a proxy, a
    /// gateway, or a test server.
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        let url = url.into();
        self.base_url = url.trim_end_matches('/').to_owned();
        self
    }

    /// Timeouts and retries (default [`HttpConfig::default`]).
    pub fn http(mut self, http: HttpConfig) -> Self {
        self.http = http;
        self
    }

    /// Adds an `anthropic-beta` value (a beta feature such as `context-1m-2025-08-07`). The
    /// Files API beta is added by itself to a request that refers to an uploaded file.
    pub fn beta(mut self, name: impl Into<String>) -> Self {
        self.betas.push(name.into());
        self
    }

    /// Whether requests mark their stable prefix for the API's prompt cache (default on): the
    /// last tool definition, the system prompt and the end of the conversation, so each call of
    /// a session reads the prefix the previous one wrote, at a tenth of the input price. Cache
    /// writes cost a quarter more than plain input, so a template whose sessions make a single
    /// call may turn it off. A prefix shorter than the model's minimum (1024 tokens for most
    /// models) is not cached and costs nothing extra.
    pub fn prompt_caching(mut self, on: bool) -> Self {
        self.prompt_caching = on;
        self
    }
}

/// A client of the Anthropic Messages API.
///
/// `complete` sends a non-streaming request; `stream` streams the answer as server-sent events,
/// retrying a stream cut before its end (see [`HttpConfig`] for the retry budget). Cloning is
/// cheap and clones share the connection pool.
///
/// The API key is sent in the `x-api-key` header only; it never appears in a URL, an error or
/// this type's `Debug` output.
#[derive(Clone)]
pub struct AnthropicClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    config: AnthropicConfig,
    /// `{base_url}/v1/messages`.
    url: String,
    /// The key as a header value, marked sensitive (hidden from reqwest's and http's `Debug`).
    key_header: HeaderValue,
    /// The key itself, to hide it in provider errors that echo it back.
    key: SecretString,
    /// `anthropic-beta` without and with the Files API beta.
    betas: Option<HeaderValue>,
    betas_with_files: HeaderValue,
}

impl fmt::Debug for AnthropicClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = &self.inner.config;
        f.debug_struct("AnthropicClient")
            .field("url", &self.inner.url)
            .field("betas", &config.betas)
            .field("prompt_caching", &config.prompt_caching)
            .field("http", &config.http)
            .finish_non_exhaustive()
    }
}

impl AnthropicClient {
    /// A client calling the API with `api_key`.
    ///
    /// # Errors
    /// [`Error::Credentials`] for an empty key or one that cannot be a header value;
    /// [`Error::Config`] for a beta name that cannot be a header value, or when the HTTP
    /// client cannot be built.
    pub fn new(api_key: impl Into<String>, config: AnthropicConfig) -> Result<Self> {
        let http = build_client(&config.http)?;
        Self::with_http(api_key.into(), config, http)
    }

    /// A client sharing an HTTP client (and its connection pool) with others.
    fn with_http(api_key: String, config: AnthropicConfig, http: reqwest::Client) -> Result<Self> {
        if api_key.trim().is_empty() {
            return Err(Error::Credentials {
                reason: "the Anthropic API key is empty".into(),
            });
        }
        let mut key_header = HeaderValue::from_str(&api_key).map_err(|_| Error::Credentials {
            // Never the key itself: only what is wrong with it.
            reason: "the Anthropic API key contains characters a header cannot carry \
                     (a newline from the file it was read from?)"
                .into(),
        })?;
        key_header.set_sensitive(true);
        let beta_value = |names: &[&str]| {
            HeaderValue::from_str(&names.join(",")).map_err(|_| {
                Error::Config(format!(
                    "an anthropic-beta value in AnthropicConfig is not a valid header value: \
                     {names:?}"
                ))
            })
        };
        let mut names: Vec<&str> = config.betas.iter().map(String::as_str).collect();
        let betas = if names.is_empty() {
            None
        } else {
            Some(beta_value(&names)?)
        };
        if !names.contains(&wire::FILES_BETA) {
            names.push(wire::FILES_BETA);
        }
        let betas_with_files = beta_value(&names)?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                url: format!("{}/v1/messages", config.base_url),
                config,
                key_header,
                key: SecretString::from(api_key),
                betas,
                betas_with_files,
            }),
        })
    }

    /// The request body's bytes and a maker of the POST carrying them (one per try).
    fn prepare(
        &self,
        request: &ModelRequest,
        stream: bool,
    ) -> Result<impl Fn() -> reqwest::RequestBuilder + Send + Sync + 'static> {
        let body = wire::request_body(request, self.inner.config.prompt_caching, stream)?;
        let bytes = serde_json::to_vec(&body.json)
            .map_err(|e| Error::Internal(format!("serializing an anthropic request: {e}")))?;
        let inner = self.inner.clone();
        let beta = if body.uses_files {
            Some(inner.betas_with_files.clone())
        } else {
            inner.betas.clone()
        };
        Ok(move || {
            let builder = inner
                .http
                .post(&inner.url)
                .header("x-api-key", inner.key_header.clone())
                .header("anthropic-version", API_VERSION)
                .header(CONTENT_TYPE, "application/json")
                .body(bytes.clone());
            match &beta {
                Some(beta) => builder.header("anthropic-beta", beta.clone()),
                None => builder,
            }
        })
    }

    /// Hides the key in an error (a provider may echo the key it was sent).
    fn redact(&self, e: Error) -> Error {
        error::redact(e, self.inner.key.expose_secret())
    }
}

#[async_trait]
impl LlmClient for AnthropicClient {
    async fn complete(&self, request: ModelRequest) -> Result<ModelResponse> {
        let result = async {
            let make = self.prepare(&request, false)?;
            let response = retry::send(PROVIDER, &self.inner.config.http, make).await?;
            let request_id = error::request_id(response.headers());
            let body = response.bytes().await.map_err(|e| {
                let mut e = error::transport_error(PROVIDER, &e, false);
                e.request_id.clone_from(&request_id);
                retry::provider_error(e)
            })?;
            parse::response(&body, request_id)
        }
        .await;
        result.map_err(|e| self.redact(e))
    }

    async fn stream(&self, request: ModelRequest) -> Result<ModelStream> {
        let make = self.prepare(&request, true)?;
        let this = self.clone();
        Ok(driver::stream(
            PROVIDER,
            self.inner.config.http.clone(),
            make,
            parse::AnthropicParser::new,
            move |e| this.redact(e),
        ))
    }
}

/// A catalog entry whose sessions call the Messages API with the credential named
/// `credential`, as each node's credential provider resolves it (name it in the template's
/// [`credential`](normandy_core::ConfigTemplate::credential) list too).
///
/// The sessions of the entry share one HTTP client (one connection pool); each gets a client
/// with the key resolved when it is built, so a rotated key is used by the next session built.
pub fn catalog_entry(credential: &str, config: AnthropicConfig) -> CatalogEntry {
    let credential = credential.to_owned();
    let pool = SharedClient::default();
    CatalogEntry::new(move |_template, creds| {
        let key = creds.expose(&credential)?;
        let http = pool.get(&config.http)?;
        let client = AnthropicClient::with_http(key.to_owned(), config.clone(), http)?;
        Ok(Arc::new(client) as Arc<dyn LlmClient>)
    })
}

#[cfg(test)]
mod tests {
    use normandy_core::{ConfigTemplate, Credentials, ErrorKind, TemplateCatalog};

    use super::*;

    #[test]
    fn debug_never_shows_the_key() {
        let key = "sk-ant-canary-0123456789";
        let client = AnthropicClient::new(key, AnthropicConfig::default()).unwrap();
        let debug = format!("{client:?}");
        assert!(!debug.contains(key), "{debug}");
        assert!(
            debug.contains("https://api.anthropic.com/v1/messages"),
            "{debug}"
        );
    }

    #[test]
    fn bad_keys_are_credential_errors_that_do_not_repeat_the_key() {
        for key in ["", "  ", "sk-ant-canary\n"] {
            let err = AnthropicClient::new(key, AnthropicConfig::default()).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Credentials, "{err}");
            if !key.trim().is_empty() {
                assert!(!err.to_string().contains(key.trim()), "{err}");
            }
        }
    }

    #[test]
    fn base_url_loses_its_trailing_slash_and_betas_join() {
        let config = AnthropicConfig::new()
            .base_url("http://127.0.0.1:9/")
            .beta("a-beta")
            .beta("b-beta");
        let client = AnthropicClient::new("sk-ant-x", config).unwrap();
        assert_eq!(client.inner.url, "http://127.0.0.1:9/v1/messages");
        assert_eq!(client.inner.betas.as_ref().unwrap(), "a-beta,b-beta");
        assert_eq!(
            client.inner.betas_with_files,
            format!("a-beta,b-beta,{}", wire::FILES_BETA)
        );
        let bad = AnthropicClient::new("sk-ant-x", AnthropicConfig::new().beta("a\nb"));
        assert_eq!(bad.unwrap_err().kind(), ErrorKind::Config);
    }

    #[test]
    fn catalog_entry_resolves_the_named_credential() {
        let catalog = TemplateCatalog::new()
            .with(
                ConfigTemplate::new("t", "claude-test").credential("ANTHROPIC_KEY"),
                catalog_entry("ANTHROPIC_KEY", AnthropicConfig::default()),
            )
            .unwrap();
        let template = (*catalog.template("t").unwrap()).clone();
        let creds = Credentials::new().with("ANTHROPIC_KEY", "sk-ant-test-key");
        assert!(catalog.build(template.clone(), &creds).is_ok());
        assert!(catalog.build(template.clone(), &creds).is_ok());
        let err = catalog
            .build(template, &Credentials::new())
            .expect_err("a missing credential fails the build");
        assert_eq!(err.kind(), ErrorKind::Credentials);
    }
}
