//! The Anthropic adapter against local servers: wiremock for request shapes and status
//! sequences, the raw-TCP script server (`support`) for streams split mid-frame, error events
//! after a 200, and cut connections. No internet; no sleeps to wait for anything.

#![cfg(feature = "anthropic")]

#[path = "../support/mod.rs"]
mod support;

mod stream;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use normandy_core::{
    ContentBlock, Error, LlmClient, Message, ModelDelta, ModelEvent, ModelRequest, ModelStream,
    ProviderError, Role, SessionId, StopReason, ToolSpec, Usage,
};
use normandy_llm::HttpConfig;
use normandy_llm::anthropic::{AnthropicClient, AnthropicConfig};
use serde_json::{Value, json};
use support::{Reply, ScriptServer};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const KEY: &str = "sk-ant-canary-7f3a9c1e5b";

// ---------------------------------------------------------------------------------------------
// Helpers

/// Retries that wait next to nothing, so a retried test is fast.
fn fast() -> HttpConfig {
    HttpConfig::default()
        .retry_base(Duration::from_millis(1))
        .max_retry_wait(Duration::from_millis(20))
}

fn client(url: &str, http: HttpConfig) -> AnthropicClient {
    AnthropicClient::new(KEY, AnthropicConfig::new().base_url(url).http(http)).unwrap()
}

fn request(messages: Vec<Message>) -> ModelRequest {
    ModelRequest {
        session: SessionId::new("s-1").unwrap(),
        model: "claude-test".into(),
        system: Some("You are terse.".into()),
        messages: Arc::new(messages),
        tools: Arc::from(vec![ToolSpec {
            name: "get_weather".into(),
            description: "Current weather in a city".into(),
            input_schema: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
        }]),
        params: Arc::new(BTreeMap::new()),
    }
}

/// An SSE body: `event:` and `data:` lines per event, with this line ending.
fn sse(events: &[(&str, Value)], eol: &str) -> String {
    events
        .iter()
        .map(|(name, data)| format!("event: {name}{eol}data: {data}{eol}{eol}"))
        .collect()
}

fn message_start() -> (&'static str, Value) {
    (
        "message_start",
        json!({"type": "message_start", "message": {
            "id": "msg_01XYZ", "type": "message", "role": "assistant", "content": [],
            "model": "claude-test-20250101", "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 12, "output_tokens": 1,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 340}}}),
    )
}

fn block_start(index: u32, block: Value) -> (&'static str, Value) {
    (
        "content_block_start",
        json!({"type": "content_block_start", "index": index, "content_block": block}),
    )
}

fn delta(index: u32, delta: Value) -> (&'static str, Value) {
    (
        "content_block_delta",
        json!({"type": "content_block_delta", "index": index, "delta": delta}),
    )
}

fn text(index: u32, text: &str) -> (&'static str, Value) {
    delta(index, json!({"type": "text_delta", "text": text}))
}

/// The start of an empty text block.
fn text_start(index: u32) -> (&'static str, Value) {
    block_start(index, json!({"type": "text", "text": ""}))
}

/// The start of a `get_weather` call with this id.
fn tool_use_start(index: u32, id: &str) -> (&'static str, Value) {
    block_start(
        index,
        json!({"type": "tool_use", "id": id, "name": "get_weather", "input": {}}),
    )
}

fn tool_input(index: u32, partial_json: &str) -> (&'static str, Value) {
    delta(
        index,
        json!({"type": "input_json_delta", "partial_json": partial_json}),
    )
}

fn thinking(index: u32, thinking: &str) -> (&'static str, Value) {
    delta(
        index,
        json!({"type": "thinking_delta", "thinking": thinking}),
    )
}

fn signature_delta(index: u32, signature: &str) -> (&'static str, Value) {
    delta(
        index,
        json!({"type": "signature_delta", "signature": signature}),
    )
}

fn block_stop(index: u32) -> (&'static str, Value) {
    (
        "content_block_stop",
        json!({"type": "content_block_stop", "index": index}),
    )
}

fn message_end(stop: &str, output_tokens: u64) -> [(&'static str, Value); 2] {
    [
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
                   "usage": {"output_tokens": output_tokens}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ]
}

fn ping() -> (&'static str, Value) {
    ("ping", json!({"type": "ping"}))
}

/// A whole text answer as a stream.
fn text_stream(answer: &str) -> Vec<(&'static str, Value)> {
    let mut events = vec![
        message_start(),
        text_start(0),
        text(0, answer),
        block_stop(0),
    ];
    events.extend(message_end("end_turn", 7));
    events
}

/// Every event of a stream, or the error it ended with.
async fn drain(mut stream: ModelStream) -> (Vec<ModelEvent>, Option<Error>) {
    let mut events = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => events.push(event),
            Err(e) => return (events, Some(e)),
        }
    }
    (events, None)
}

/// Streams an answer to `user` from `server` with a client using `http`: every event, or the
/// error the stream ended with.
async fn stream_from(
    server: &ScriptServer,
    http: HttpConfig,
    user: &str,
) -> (Vec<ModelEvent>, Option<Error>) {
    let stream = client(&server.url(), http)
        .stream(request(vec![Message::user(user)]))
        .await
        .unwrap();
    drain(stream).await
}

fn provider(e: &Error) -> &ProviderError {
    match e {
        Error::Provider(p) => p,
        other => panic!("not a provider error: {other:?}"),
    }
}

fn texts(events: &[ModelEvent]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            ModelEvent::Delta(ModelDelta::Text { text, .. }) => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

fn done(events: &[ModelEvent]) -> &normandy_core::ModelResponse {
    match events.last() {
        Some(ModelEvent::Done(r)) => r,
        other => panic!("the stream did not end with Done: {other:?}"),
    }
}

fn restarts(events: &[ModelEvent]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, ModelEvent::Restart { .. }))
        .count()
}

// ---------------------------------------------------------------------------------------------
// Request shapes and statuses (wiremock)

fn whole_response() -> Value {
    json!({
        "id": "msg_01W", "type": "message", "role": "assistant", "model": "claude-test-20250101",
        "content": [{"type": "text", "text": "Hi there."}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 20, "output_tokens": 4,
                  "cache_creation_input_tokens": 1500, "cache_read_input_tokens": 0},
    })
}

#[tokio::test]
async fn complete_sends_the_documented_headers_and_body() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .and(header("x-api-key", KEY))
        .and(header("anthropic-version", "2023-06-01"))
        .and(header("content-type", "application/json"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("request-id", "req_w1")
                .set_body_json(whole_response()),
        )
        .expect(1)
        .mount(&server)
        .await;
    let r = request(vec![
        Message::user("earlier"),
        Message::assistant("noted"),
        Message {
            role: Role::User,
            content: vec![
                ContentBlock::text("What is in this picture?"),
                ContentBlock::image_bytes("image/png", b"\x89PNG\r\n").unwrap(),
            ],
        },
    ]);
    let response = client(&server.uri(), fast()).complete(r).await.unwrap();
    assert_eq!(response.content, [ContentBlock::text("Hi there.")]);
    assert_eq!(response.call.request_id.as_deref(), Some("req_w1"));
    assert_eq!(response.usage.cache_write_tokens, 1500);
    assert_eq!(response.usage.input_tokens, 20);

    let received = server.received_requests().await.unwrap();
    assert_eq!(received.len(), 1);
    assert!(received[0].headers.get("anthropic-beta").is_none());
    let body: Value = received[0].body_json().unwrap();
    let ephemeral = json!({"type": "ephemeral"});
    assert_eq!(body["model"], "claude-test");
    assert_eq!(body["max_tokens"], 4096);
    assert!(body.get("stream").is_none());
    assert_eq!(
        body["system"],
        json!([{"type": "text", "text": "You are terse.", "cache_control": ephemeral}])
    );
    assert_eq!(body["tools"][0]["name"], "get_weather");
    assert_eq!(body["tools"][0]["cache_control"], ephemeral);
    assert!(body["tools"][0]["input_schema"].is_object());
    let last = &body["messages"][2]["content"];
    assert_eq!(
        last[1],
        json!({"type": "image", "source": {"type": "base64", "media_type": "image/png",
               "data": "iVBORw0K"}, "cache_control": ephemeral})
    );
    assert!(last[0].get("cache_control").is_none());
    assert!(
        body["messages"][0]["content"][0]
            .get("cache_control")
            .is_none()
    );
    assert_eq!(body.to_string().matches("cache_control").count(), 3);
}

#[tokio::test]
async fn caching_off_betas_and_params_shape_the_request() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(whole_response()))
        .mount(&server)
        .await;
    let config = AnthropicConfig::new()
        .base_url(format!("{}/", server.uri()))
        .http(fast())
        .prompt_caching(false)
        .beta("context-1m-2025-08-07");
    let client = AnthropicClient::new(KEY, config).unwrap();
    let mut params = BTreeMap::new();
    params.insert("max_tokens".to_owned(), json!(256));
    params.insert("temperature".to_owned(), json!(0.2));
    params.insert("stop".to_owned(), json!(["###"]));
    params.insert("tool_choice".to_owned(), json!({"type": "any"}));
    let r = ModelRequest {
        params: Arc::new(params),
        ..request(vec![Message {
            role: Role::User,
            content: vec![ContentBlock::Document {
                media_type: "application/pdf".into(),
                source: normandy_core::MediaSource::File {
                    file_id: "file_011CN".into(),
                },
                title: Some("Report".into()),
            }],
        }])
    };
    client.complete(r).await.unwrap();
    let received = server.received_requests().await.unwrap();
    let beta = received[0].headers.get("anthropic-beta").unwrap();
    assert_eq!(beta, "context-1m-2025-08-07,files-api-2025-04-14");
    let body: Value = received[0].body_json().unwrap();
    assert!(!body.to_string().contains("cache_control"));
    assert_eq!(body["system"], "You are terse.");
    assert_eq!(body["max_tokens"], 256);
    assert_eq!(body["temperature"], 0.2);
    assert_eq!(body["stop_sequences"], json!(["###"]));
    assert_eq!(body["tool_choice"], json!({"type": "any"}));
    assert_eq!(
        body["messages"][0]["content"][0],
        json!({"type": "document", "source": {"type": "file", "file_id": "file_011CN"},
               "title": "Report"})
    );
}

#[tokio::test]
async fn a_529_then_200_is_retried() {
    let server = MockServer::start().await;
    let overloaded = ResponseTemplate::new(529).set_body_json(
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    );
    let ok = ResponseTemplate::new(200).set_body_json(whole_response());
    support::mount_then(&server, overloaded, 1, ok).await;
    let response = client(&server.uri(), fast())
        .complete(request(vec![Message::user("hi")]))
        .await
        .unwrap();
    assert_eq!(response.content, [ContentBlock::text("Hi there.")]);
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_401_is_terminal_and_never_shows_the_key() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(401)
                .insert_header("request-id", "req_401")
                .set_body_json(json!({"type": "error", "error": {
                    "type": "authentication_error",
                    "message": format!("invalid x-api-key: {KEY}")}})),
        )
        .mount(&server)
        .await;
    let client = client(&server.uri(), fast());
    for streaming in [false, true] {
        let r = request(vec![Message::user("hi")]);
        let err = if streaming {
            drain(client.stream(r).await.unwrap())
                .await
                .1
                .expect("a 401 fails the stream")
        } else {
            client.complete(r).await.unwrap_err()
        };
        let p = provider(&err);
        assert_eq!(p.status, Some(401));
        assert!(!p.retryable);
        assert_eq!(p.error_type.as_deref(), Some("authentication_error"));
        assert_eq!(p.request_id.as_deref(), Some("req_401"));
        assert!(!err.to_string().contains(KEY), "{err}");
        assert!(!format!("{err:?}").contains(KEY), "{err:?}");
    }
    assert!(!format!("{client:?}").contains(KEY));
    // One request each: a terminal status is never retried.
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let server = MockServer::start().await;
    let limited = ResponseTemplate::new(429)
        .insert_header("retry-after", "1")
        .set_body_json(json!({"type": "error", "error": {
            "type": "rate_limit_error", "message": "Number of request tokens has exceeded your per-minute rate limit"}}));
    let ok = ResponseTemplate::new(200).set_body_json(whole_response());
    support::mount_then(&server, limited, 1, ok).await;
    // The backoff alone would wait about a millisecond; the provider asks for a second.
    let http = HttpConfig::default().retry_base(Duration::from_millis(1));
    let started = Instant::now();
    client(&server.uri(), http)
        .complete(request(vec![Message::user("hi")]))
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "waited only {waited:?}"
    );
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn an_unknown_block_in_a_whole_response_is_a_malformed_error() {
    let server = MockServer::start().await;
    let mut body = whole_response();
    body["content"] = json!([{"type": "mystery_block", "data": 1}]);
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(body))
        .mount(&server)
        .await;
    let err = client(&server.uri(), fast())
        .complete(request(vec![Message::user("hi")]))
        .await
        .unwrap_err();
    let p = provider(&err);
    assert_eq!(p.error_type.as_deref(), Some("malformed_response"));
    assert!(p.message.contains("mystery_block"), "{p}");
    assert_eq!(p.request_id.as_deref(), Some("msg_01W"));
}
