//! The OpenAI Chat Completions adapter: [`OpenAiClient`], its [`OpenAiConfig`], and
//! [`catalog_entry`], which builds the client from a node's resolved credential.
//!
//! The same protocol is spoken by llama.cpp's `llama-server`, vLLM, Ollama, LM Studio and most
//! gateways: point [`OpenAiConfig::base_url`] at them and name them with
//! [`OpenAiConfig::provider`] so their errors say which server failed. Local servers need no key.
//!
//! ```
//! use normandy_core::{CatalogEntry, ConfigTemplate, TemplateCatalog};
//! use normandy_llm::openai::{self, OpenAiClient, OpenAiConfig};
//!
//! # fn main() -> normandy_core::Result<()> {
//! // The public API, with the key each node resolves for the template.
//! let hosted = openai::catalog_entry("OPENAI_API_KEY", OpenAiConfig::default());
//!
//! // A llama.cpp server on this machine: no key.
//! let local = OpenAiClient::new(
//!     OpenAiConfig::default()
//!         .base_url("http://127.0.0.1:8080/v1")
//!         .provider("llama.cpp"),
//! )?;
//! let catalog = TemplateCatalog::new()
//!     .with(
//!         ConfigTemplate::new("hosted", "gpt-4o-mini").credential("OPENAI_API_KEY"),
//!         hosted,
//!     )?
//!     .with(
//!         ConfigTemplate::new("local", "qwen3"),
//!         CatalogEntry::with_client(local),
//!     )?;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! - `request`: the request body (conversation, tools, parameters).
//! - `response`: reading a whole (non-streamed) response, and what both forms share (usage,
//!   stop reasons, tool arguments, error objects).
//! - `stream`: the stream parser (chunks → deltas → the whole response).

mod request;
mod response;
mod stream;

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use normandy_core::{
    CatalogEntry, Error, LlmClient, ModelRequest, ModelResponse, ModelStream, Result, async_trait,
};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use secrecy::{ExposeSecret, SecretString};

use crate::error::{self, transport_error};
use crate::http::{HttpConfig, SharedClient, build_client};
use crate::retry::provider_error;
use crate::{driver, retry};

/// Where the API is, unless [`OpenAiConfig::base_url`] says otherwise.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// How an [`OpenAiClient`] calls the API. Builder-style; the default is OpenAI's public API,
/// named `openai`, without a key, with the default [`HttpConfig`].
#[derive(Clone)]
pub struct OpenAiConfig {
    /// The API root; requests go to `{base_url}/chat/completions`.
    base_url: String,
    /// The name errors and logs give the server.
    provider: &'static str,
    /// Sent as `Authorization: Bearer …` when set; never logged or shown.
    api_key: Option<SecretString>,
    /// More headers for every request (an organization, a gateway's routing header).
    headers: Vec<(String, String)>,
    /// Timeouts and retries.
    http: HttpConfig,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_BASE_URL.to_owned(),
            provider: "openai",
            api_key: None,
            headers: Vec::new(),
            http: HttpConfig::default(),
        }
    }
}

impl fmt::Debug for OpenAiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiConfig")
            .field("base_url", &self.base_url)
            .field("provider", &self.provider)
            .field("api_key", &self.api_key.as_ref().map(|_| "[redacted]"))
            .field("headers", &self.headers)
            .field("http", &self.http)
            .finish()
    }
}

impl OpenAiConfig {
    /// The API root, up to and including the version (default `https://api.openai.com/v1`;
    /// llama.cpp, vLLM and Ollama serve it at `http://HOST:PORT/v1`). A trailing `/` is ignored.
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = url.into().trim_end_matches('/').to_owned();
        self
    }

    /// The name errors and logs give the server (default `openai`): `llama.cpp`, `vllm`,
    /// `ollama`… A name read at run time can be given as `String::leak(name)`, once per
    /// process.
    pub fn provider(mut self, name: &'static str) -> Self {
        self.provider = name;
        self
    }

    /// The API key, sent as `Authorization: Bearer <key>` (default none: local servers need
    /// none). [`catalog_entry`] sets it from the node's credentials.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(SecretString::from(key.into()));
        self
    }

    /// Adds a header sent with every request (`OpenAI-Organization`, a gateway's own header).
    /// Not for secrets: headers appear in this config's `Debug`.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Timeouts and retries (default [`HttpConfig::default`]).
    pub fn http(mut self, http: HttpConfig) -> Self {
        self.http = http;
        self
    }
}

/// A client of an OpenAI-compatible Chat Completions API. Cheap to clone (clones share the
/// connection pool).
///
/// `complete` sends a non-streaming request; `stream` sends `"stream": true` with
/// `stream_options.include_usage` and yields deltas as the chunks arrive. Both retry overload,
/// 5xx and cut connections within [`HttpConfig::max_retries`]; `stream` also calls again when a
/// stream is cut before its `[DONE]`, after a [`ModelEvent::Restart`](normandy_core::ModelEvent).
#[derive(Clone)]
pub struct OpenAiClient {
    inner: Arc<Inner>,
}

struct Inner {
    provider: &'static str,
    /// `{base_url}/chat/completions`.
    url: reqwest::Url,
    /// Every request's headers, the key's marked sensitive (hidden from `Debug`).
    headers: HeaderMap,
    /// Kept to hide it in error text, should the server echo it.
    api_key: Option<SecretString>,
    http: HttpConfig,
    client: reqwest::Client,
}

impl fmt::Debug for OpenAiClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiClient")
            .field("provider", &self.inner.provider)
            .field("url", &self.inner.url.as_str())
            .field(
                "api_key",
                &self.inner.api_key.as_ref().map(|_| "[redacted]"),
            )
            .finish_non_exhaustive()
    }
}

impl OpenAiClient {
    /// A client for `config`.
    ///
    /// # Errors
    /// [`Error::Config`] if the base URL is not a URL, a header is not a valid HTTP header, or
    /// the HTTP client cannot be built.
    pub fn new(config: OpenAiConfig) -> Result<Self> {
        let client = build_client(&config.http)?;
        Self::with_http_client(config, client)
    }

    /// A client that shares `client` (its connection pool) with others.
    fn with_http_client(config: OpenAiConfig, client: reqwest::Client) -> Result<Self> {
        let provider = config.provider;
        let url =
            reqwest::Url::parse(&format!("{}/chat/completions", config.base_url)).map_err(|e| {
                Error::Config(format!(
                    "{provider}: base URL {:?} is not a URL ({e}); expected e.g. \
                     https://api.openai.com/v1 or http://127.0.0.1:8080/v1",
                    config.base_url
                ))
            })?;
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in &config.headers {
            let bad = || {
                Error::Config(format!(
                    "{provider}: header {name:?} is not a valid HTTP header name and value"
                ))
            };
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad())?;
            let value = HeaderValue::from_str(value).map_err(|_| bad())?;
            headers.append(name, value);
        }
        if let Some(key) = &config.api_key {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose_secret()))
                .map_err(|_| Error::Credentials {
                    reason: format!(
                        "{provider}: the API key has characters an HTTP header cannot carry \
                             (a trailing newline?); check the credential's value"
                    ),
                })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                provider,
                url,
                headers,
                api_key: config.api_key,
                http: config.http,
                client,
            }),
        })
    }

    /// The name errors give the server.
    pub fn provider(&self) -> &'static str {
        self.inner.provider
    }

    /// Hides the key in an error, should the server have echoed it.
    fn redact(&self, e: Error) -> Error {
        match &self.inner.api_key {
            Some(key) => error::redact(e, key.expose_secret()),
            None => e,
        }
    }
}

impl Inner {
    fn post(&self, body: &Bytes, stream: bool) -> reqwest::RequestBuilder {
        let mut request = self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .body(body.clone());
        if stream {
            request = request.header(ACCEPT, "text/event-stream");
        }
        request
    }
}

#[async_trait]
impl LlmClient for OpenAiClient {
    /// Sends a non-streaming request and reads the whole answer.
    async fn complete(&self, request: ModelRequest) -> Result<ModelResponse> {
        let inner = &self.inner;
        let provider = inner.provider;
        let body = request::body(provider, &request, false)?;
        let result = async {
            let response = retry::send(provider, &inner.http, || inner.post(&body, false)).await?;
            let request_id = error::request_id(response.headers());
            let bytes = response
                .bytes()
                .await
                .map_err(|e| provider_error(transport_error(provider, &e, false)))?;
            response::parse(provider, request_id, &bytes)
        }
        .await;
        result.map_err(|e| self.redact(e))
    }

    /// Streams the answer: deltas as the chunks arrive, then the whole response at `[DONE]`.
    async fn stream(&self, request: ModelRequest) -> Result<ModelStream> {
        let provider = self.inner.provider;
        let body = request::body(provider, &request, true)?;
        let inner = self.inner.clone();
        let this = self.clone();
        Ok(driver::stream(
            provider,
            self.inner.http.clone(),
            move || inner.post(&body, true),
            move |request_id| stream::ChunkParser::new(provider, request_id),
            move |e| this.redact(e),
        ))
    }
}

/// A catalog entry whose sessions get an [`OpenAiClient`] for `config` with the API key the
/// node resolves for the credential named `credential` (list it in the template's
/// `credentials`). The clients of all sessions share one connection pool.
///
/// For a server that needs no key, use
/// `CatalogEntry::with_client(OpenAiClient::new(config)?)` instead.
pub fn catalog_entry(credential: &str, config: OpenAiConfig) -> CatalogEntry {
    let credential = credential.to_owned();
    let pool = SharedClient::default();
    CatalogEntry::new(move |_template, creds| {
        let key = creds.expose(&credential)?;
        let client = pool.get(&config.http)?;
        let client = OpenAiClient::with_http_client(config.clone().api_key(key), client)?;
        Ok(Arc::new(client) as Arc<dyn LlmClient>)
    })
}
