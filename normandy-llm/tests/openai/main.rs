//! The OpenAI-compatible adapter against local servers: wiremock for request shapes, statuses
//! and retry timing; the raw-TCP script server (`support`) for streams split anywhere, CRLF
//! framing, and connections cut before `[DONE]`.
#![cfg(feature = "openai")]

#[path = "../support/mod.rs"]
mod support;

mod stream;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use normandy_core::{
    ContentBlock, Error, LlmClient, MediaSource, Message, ModelDelta, ModelEvent, ModelRequest,
    ModelResponse, ProviderError, Role, SessionId, StopReason, ToolSpec, Usage,
};
use normandy_llm::HttpConfig;
use normandy_llm::openai::{OpenAiClient, OpenAiConfig};
use serde_json::{Value, json};
use support::{Reply, ScriptServer};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Every test's bound: far above what any takes on a loaded machine, so a hang fails instead.
const BOUND: Duration = Duration::from_secs(60);

/// Retries fast, so tests of retry counts do not wait.
fn fast() -> HttpConfig {
    HttpConfig::default()
        .retry_base(Duration::from_millis(5))
        .max_retries(2)
}

fn client(base: &str, http: HttpConfig) -> OpenAiClient {
    OpenAiClient::new(
        OpenAiConfig::default()
            .base_url(format!("{base}/v1"))
            .http(http),
    )
    .unwrap()
}

/// A client of a llama.cpp server at `base`.
fn llama_client(base: &str, http: HttpConfig) -> OpenAiClient {
    OpenAiClient::new(
        OpenAiConfig::default()
            .base_url(format!("{base}/v1"))
            .provider("llama.cpp")
            .http(http),
    )
    .unwrap()
}

fn request(messages: Vec<Message>) -> ModelRequest {
    ModelRequest {
        session: SessionId::new("s-1").unwrap(),
        model: "gpt-test".into(),
        system: None,
        messages: Arc::new(messages),
        tools: Arc::from(Vec::<ToolSpec>::new()),
        params: Arc::new(BTreeMap::new()),
    }
}

fn hello() -> ModelRequest {
    request(vec![Message::user("hello")])
}

fn completion(text: &str) -> Value {
    json!({
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "gpt-test-2025",
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": text, "refusal": null },
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": { "prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11 },
        "system_fingerprint": "fp_test"
    })
}

fn provider_error(e: &Error) -> &ProviderError {
    match e.inner() {
        Error::Provider(p) => p,
        other => panic!("not a provider error: {other:?}"),
    }
}

async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("test exceeded its bound")
}

// ---------------------------------------------------------------------------------------------
// Request shape (wiremock)
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn request_body_carries_conversation_tools_images_and_params() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(completion("Sunny.")))
        .expect(1)
        .mount(&server)
        .await;
    let client = OpenAiClient::new(
        OpenAiConfig::default()
            .base_url(format!("{}/v1/", server.uri()))
            .api_key("sk-test-key-123456")
            .header("OpenAI-Organization", "org-1")
            .http(fast()),
    )
    .unwrap();

    let mut req = request(vec![
        Message {
            role: Role::User,
            content: vec![
                ContentBlock::text("What is in this picture, and the weather?"),
                ContentBlock::Image {
                    media_type: "image/png".into(),
                    source: MediaSource::Base64 {
                        data: "iVBORw0KGgo=".into(),
                    },
                },
            ],
        },
        Message {
            role: Role::Assistant,
            content: vec![
                ContentBlock::Thinking {
                    thinking: "I should call the tool.".into(),
                    signature: Some("sig".into()),
                },
                ContentBlock::text("Checking."),
                ContentBlock::ToolUse {
                    id: "call_1".into(),
                    name: "weather".into(),
                    input: json!({ "city": "Paris" }),
                },
            ],
        },
        Message {
            role: Role::User,
            content: vec![ContentBlock::ToolResult {
                tool_use_id: "call_1".into(),
                content: "18°C, sunny".into(),
                is_error: false,
                structured: None,
                blocks: vec![ContentBlock::Image {
                    media_type: "image/jpeg".into(),
                    source: MediaSource::Url {
                        url: "https://example.com/radar.jpg".into(),
                    },
                }],
            }],
        },
    ]);
    req.system = Some("You are terse.".into());
    req.tools = Arc::from(vec![ToolSpec {
        name: "weather".into(),
        description: "Weather for a city".into(),
        input_schema: json!({ "type": "object", "properties": { "city": { "type": "string" } } }),
    }]);
    req.params = Arc::new(BTreeMap::from([
        ("max_tokens".to_owned(), json!(256)),
        ("temperature".to_owned(), json!(0.2)),
        ("stop".to_owned(), json!(["\n\n"])),
        ("reasoning_effort".to_owned(), json!("low")),
        ("x_custom".to_owned(), json!({ "a": 1 })),
    ]));

    let response = bounded(client.complete(req)).await.unwrap();
    assert_eq!(response.content, vec![ContentBlock::text("Sunny.")]);
    assert_eq!(response.stop_reason, StopReason::EndTurn);
    assert_eq!(response.usage, Usage::new(9, 2));
    assert_eq!(response.call.model.as_deref(), Some("gpt-test-2025"));
    assert_eq!(response.call.request_id.as_deref(), Some("chatcmpl-abc"));

    let received = server.received_requests().await.unwrap();
    let sent = &received[0];
    assert_eq!(
        sent.headers.get("authorization").unwrap(),
        "Bearer sk-test-key-123456"
    );
    assert_eq!(sent.headers.get("openai-organization").unwrap(), "org-1");
    assert_eq!(
        sent.headers.get("content-type").unwrap(),
        "application/json"
    );
    let body: Value = sent.body_json().unwrap();
    assert_eq!(
        body,
        json!({
            "model": "gpt-test",
            "max_tokens": 256,
            "temperature": 0.2,
            "stop": ["\n\n"],
            "reasoning_effort": "low",
            "x_custom": { "a": 1 },
            "messages": [
                { "role": "system", "content": "You are terse." },
                { "role": "user", "content": [
                    { "type": "text", "text": "What is in this picture, and the weather?" },
                    { "type": "image_url", "image_url": { "url": "data:image/png;base64,iVBORw0KGgo=" } }
                ]},
                { "role": "assistant", "content": "Checking.", "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": { "name": "weather", "arguments": "{\"city\":\"Paris\"}" }
                }]},
                { "role": "tool", "tool_call_id": "call_1", "content": "18°C, sunny" },
                { "role": "user", "content": [
                    { "type": "text", "text": "Attachments of the result of tool call call_1:" },
                    { "type": "image_url", "image_url": { "url": "https://example.com/radar.jpg" } }
                ]}
            ],
            "tools": [{ "type": "function", "function": {
                "name": "weather",
                "description": "Weather for a city",
                "parameters": { "type": "object", "properties": { "city": { "type": "string" } } }
            }}]
        })
    );
}

#[tokio::test]
async fn no_authorization_header_without_a_key_and_request_id_from_header() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("x-request-id", "req_hdr_1")
                .set_body_json(completion("hi")),
        )
        .mount(&server)
        .await;
    let response = complete_hello(&server, fast()).await.unwrap();
    assert_eq!(response.call.request_id.as_deref(), Some("req_hdr_1"));
    let received = server.received_requests().await.unwrap();
    assert!(received[0].headers.get("authorization").is_none());
    let body: Value = received[0].body_json().unwrap();
    assert_eq!(
        body["messages"],
        json!([{ "role": "user", "content": "hello" }])
    );
    assert!(body.get("stream").is_none(), "{body}");
    assert!(body.get("tools").is_none(), "{body}");
}

// ---------------------------------------------------------------------------------------------
// Statuses and retries (wiremock)
// ---------------------------------------------------------------------------------------------

/// A server answering `first` to the first `times` requests, then a completion "after retry".
async fn server_then_ok(first: ResponseTemplate, times: u64) -> MockServer {
    let server = MockServer::start().await;
    let ok = ResponseTemplate::new(200).set_body_json(completion("after retry"));
    support::mount_then(&server, first, times, ok).await;
    server
}

/// `complete(hello())` against `server`, within the test's bound.
async fn complete_hello(server: &MockServer, http: HttpConfig) -> Result<ModelResponse, Error> {
    bounded(client(&server.uri(), http).complete(hello())).await
}

async fn request_count(server: &MockServer) -> usize {
    server.received_requests().await.unwrap().len()
}

#[tokio::test]
async fn overloaded_529_then_200_is_retried() {
    let server = server_then_ok(
        ResponseTemplate::new(529).set_body_json(
            json!({ "error": { "message": "Overloaded", "type": "overloaded_error" } }),
        ),
        1,
    )
    .await;
    let response = complete_hello(&server, fast()).await.unwrap();
    assert_eq!(response.content, vec![ContentBlock::text("after retry")]);
    assert_eq!(request_count(&server).await, 2);
}

#[tokio::test]
async fn retry_after_ms_is_honoured() {
    let server = server_then_ok(
        ResponseTemplate::new(429)
            .insert_header("retry-after-ms", "400")
            .insert_header("retry-after", "30")
            .set_body_json(json!({ "error": { "message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded" } })),
        1,
    )
    .await;
    let started = Instant::now();
    complete_hello(&server, fast()).await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(390),
        "waited only {waited:?}"
    );
    // `retry-after-ms` wins over `retry-after`: nowhere near 30 s.
    assert!(waited < Duration::from_secs(25), "waited {waited:?}");
    assert_eq!(request_count(&server).await, 2);
}

#[tokio::test]
async fn retry_after_seconds_is_honoured() {
    let server = server_then_ok(
        ResponseTemplate::new(503).insert_header("retry-after", "1"),
        1,
    )
    .await;
    let started = Instant::now();
    complete_hello(&server, fast()).await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "waited only {waited:?}"
    );
}

#[tokio::test]
async fn retry_after_is_capped_by_max_retry_wait() {
    let server = server_then_ok(
        ResponseTemplate::new(429).insert_header("retry-after", "3600"),
        1,
    )
    .await;
    let http = fast().max_retry_wait(Duration::from_millis(50));
    let started = Instant::now();
    complete_hello(&server, http).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test]
async fn bad_request_and_bad_key_are_terminal_without_retry() {
    for (status, error_type) in [
        (400, "invalid_request_error"),
        (401, "invalid_request_error"),
        (404, "invalid_request_error"),
    ] {
        let server = server_then_ok(
            ResponseTemplate::new(status)
                .insert_header("x-request-id", "req_bad")
                .set_body_json(
                    json!({ "error": { "message": "nope", "type": error_type, "code": null } }),
                ),
            1,
        )
        .await;
        let e = complete_hello(&server, fast()).await.unwrap_err();
        let p = provider_error(&e);
        assert_eq!(p.status, Some(status));
        assert!(!e.is_retryable(), "{status}: {e}");
        assert_eq!(p.request_id.as_deref(), Some("req_bad"));
        assert_eq!(p.provider, "openai");
        assert_eq!(request_count(&server).await, 1, "{status} was retried");
    }
}

#[tokio::test]
async fn a_quota_429_is_terminal() {
    let server = server_then_ok(
        ResponseTemplate::new(429).set_body_json(json!({ "error": {
            "message": "You exceeded your current quota, please check your plan and billing details.",
            "type": "insufficient_quota", "param": null, "code": "insufficient_quota"
        }})),
        1,
    )
    .await;
    let e = complete_hello(&server, fast()).await.unwrap_err();
    assert!(!e.is_retryable(), "{e}");
    assert_eq!(
        provider_error(&e).code.as_deref(),
        Some("insufficient_quota")
    );
    assert_eq!(request_count(&server).await, 1);
}

#[tokio::test]
async fn x_should_retry_false_is_terminal() {
    let server = server_then_ok(
        ResponseTemplate::new(503).insert_header("x-should-retry", "false"),
        1,
    )
    .await;
    let e = complete_hello(&server, fast()).await.unwrap_err();
    assert!(!e.is_retryable(), "{e}");
    assert_eq!(request_count(&server).await, 1);
}

#[tokio::test]
async fn out_of_retries_returns_the_last_error() {
    let server = server_then_ok(
        ResponseTemplate::new(502).set_body_string("<html>bad gateway</html>"),
        10,
    )
    .await;
    let e = complete_hello(&server, fast()).await.unwrap_err();
    assert!(e.is_retryable());
    let p = provider_error(&e);
    assert_eq!(p.status, Some(502));
    assert_eq!(p.message, "<html>bad gateway</html>");
    assert_eq!(request_count(&server).await, 3, "1 try + max_retries 2");
}

#[tokio::test]
async fn a_key_echoed_in_an_error_never_shows() {
    const CANARY: &str = "sk-canary-7f3a9c1e5b2d4680";
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({ "error": {
            "message": format!("Incorrect API key provided: {CANARY}. You can find your API key at https://platform.openai.com/account/api-keys."),
            "type": "invalid_request_error", "param": null, "code": "invalid_api_key"
        }})))
        .mount(&server)
        .await;
    let client = OpenAiClient::new(
        OpenAiConfig::default()
            .base_url(format!("{}/v1", server.uri()))
            .api_key(CANARY)
            .http(fast()),
    )
    .unwrap();
    assert!(!format!("{client:?}").contains(CANARY));

    let e = bounded(client.complete(hello())).await.unwrap_err();
    assert!(!e.to_string().contains(CANARY), "{e}");
    assert!(!format!("{e:?}").contains(CANARY), "{e:?}");
    assert!(e.to_string().contains("Incorrect API key provided"), "{e}");

    let first = bounded(async { client.stream(hello()).await.unwrap().next().await })
        .await
        .expect("the stream yields the error");
    let e = first.unwrap_err();
    assert!(!e.to_string().contains(CANARY), "{e}");
    assert!(!format!("{e:?}").contains(CANARY), "{e:?}");
    assert_eq!(provider_error(&e).status, Some(401));
}

#[tokio::test]
async fn a_refused_connection_is_retryable_and_names_the_server() {
    // Bind then drop: a port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let client = llama_client(&format!("http://127.0.0.1:{port}"), fast().max_retries(1));
    let e = bounded(client.complete(hello())).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("llama.cpp") && text.contains("could not connect"),
        "{text}"
    );
}
