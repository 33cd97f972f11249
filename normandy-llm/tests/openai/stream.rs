//! Streams, from the raw-TCP script server: split anywhere, CRLF, cut before `[DONE]`, tool-call
//! pieces with and without `index`, reasoning, errors mid-stream.

use super::*;

/// `data: <chunk>\n\n` for each, then `data: [DONE]\n\n`.
fn sse(chunks: &[Value]) -> String {
    let mut body = String::new();
    for c in chunks {
        body.push_str(&format!("data: {c}\n\n"));
    }
    body.push_str("data: [DONE]\n\n");
    body
}

/// A chunk with this delta, in OpenAI's shape.
fn delta(delta: Value) -> Value {
    json!({
        "id": "chatcmpl-s1", "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": "gpt-test-2025", "system_fingerprint": "fp_t",
        "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": null }]
    })
}

fn finish(reason: &str) -> Value {
    json!({
        "id": "chatcmpl-s1", "object": "chat.completion.chunk", "model": "gpt-test-2025",
        "choices": [{ "index": 0, "delta": {}, "logprobs": null, "finish_reason": reason }]
    })
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({
        "id": "chatcmpl-s1", "object": "chat.completion.chunk", "model": "gpt-test-2025",
        "choices": [],
        "usage": { "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion }
    })
}

/// A text answer streamed in these pieces.
fn text_stream(pieces: &[&str]) -> String {
    let mut chunks = vec![delta(
        json!({ "role": "assistant", "content": "", "refusal": null }),
    )];
    chunks.extend(pieces.iter().map(|p| delta(json!({ "content": p }))));
    chunks.push(finish("stop"));
    chunks.push(usage(12, pieces.len() as u64));
    sse(&chunks)
}

/// Runs a stream to its end: every item.
async fn run(client: &OpenAiClient, req: ModelRequest) -> Vec<Result<ModelEvent, Error>> {
    bounded(async {
        match client.stream(req).await {
            Ok(stream) => stream.collect().await,
            Err(e) => vec![Err(e)],
        }
    })
    .await
}

fn done(events: &[Result<ModelEvent, Error>]) -> &ModelResponse {
    match events.last() {
        Some(Ok(ModelEvent::Done(r))) => r,
        other => panic!("the stream did not end with Done: {other:?}"),
    }
}

/// The error the stream ended with.
fn last_error(events: &[Result<ModelEvent, Error>]) -> &Error {
    match events.last() {
        Some(Err(e)) => e,
        _ => panic!("expected an error last: {events:?}"),
    }
}

fn streamed_text(events: &[Result<ModelEvent, Error>]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            Ok(ModelEvent::Delta(ModelDelta::Text { text, .. })) => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_stream_split_mid_frame_and_mid_utf8_character() {
    let pieces = ["Grüße, ", "wörld ", "🌍 — ", "done."];
    let body = text_stream(&pieces);
    // Every 3 bytes: splits inside `data:`, inside the JSON, inside `\n\n`, and inside the
    // multi-byte characters (ü, ö, 🌍, —).
    let server = ScriptServer::start(vec![Reply::sse().every(&body, 3)]).await;
    let client = client(&server.url(), fast());
    let events = run(&client, hello()).await;
    let response = done(&events);
    assert_eq!(streamed_text(&events), pieces.concat());
    assert_eq!(response.content, vec![ContentBlock::text(pieces.concat())]);
    assert_eq!(response.stop_reason, StopReason::EndTurn);
    assert_eq!(response.usage, Usage::new(12, 4));
    assert_eq!(response.call.model.as_deref(), Some("gpt-test-2025"));
    assert_eq!(response.call.stop.as_deref(), Some("stop"));
    assert_eq!(response.call.request_id.as_deref(), Some("chatcmpl-s1"));

    // The request asked for a stream with usage.
    let sent = server.requests()[0].json();
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["stream_options"], json!({ "include_usage": true }));
    assert_eq!(
        server.requests()[0].header("accept"),
        Some("text/event-stream")
    );
    assert!(
        server.requests()[0]
            .request_line
            .starts_with("POST /v1/chat/completions ")
    );
}

#[tokio::test]
async fn crlf_line_endings_and_multi_line_data() {
    let first = delta(json!({ "content": "Hel" }));
    // One event whose JSON spans two `data:` lines (joined with "\n", which JSON allows).
    let second =
        "data: {\"choices\":[{\"index\":0,\r\ndata: \"delta\":{\"content\":\"lo\"}}]}\r\n\r\n";
    let body = format!(
        "data: {first}\r\n\r\n{second}data: {}\r\n\r\n: a comment line\r\n\r\ndata: [DONE]\r\n\r\n",
        finish("stop")
    );
    let server = ScriptServer::start(vec![Reply::sse().split_at(&body, &[10, 41, 42, 95])]).await;
    let events = run(&client(&server.url(), fast()), hello()).await;
    assert_eq!(done(&events).content, vec![ContentBlock::text("Hello")]);
    assert_eq!(streamed_text(&events), "Hello");
}

#[tokio::test]
async fn a_stream_cut_before_done_is_posted_again_after_a_restart() {
    let partial = sse(&[delta(json!({ "content": "First try" }))]);
    let partial = partial.trim_end_matches("data: [DONE]\n\n").to_owned();
    let server = ScriptServer::start(vec![
        Reply::sse()
            .header("x-request-id", "req_first")
            .chunk(partial)
            .cut(),
        Reply::sse()
            .header("x-request-id", "req_second")
            .chunk(text_stream(&["Second ", "try"])),
    ])
    .await;
    let events = run(&client(&server.url(), fast()), hello()).await;
    let kinds: Vec<String> = events
        .iter()
        .map(|e| match e {
            Ok(ModelEvent::Delta(ModelDelta::Text { text, .. })) => format!("text:{text}"),
            Ok(ModelEvent::Restart { .. }) => "restart".to_owned(),
            Ok(ModelEvent::Done(_)) => "done".to_owned(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "text:First try",
            "restart",
            "text:Second ",
            "text:try",
            "done"
        ]
    );
    let Ok(ModelEvent::Restart { reason }) = &events[1] else {
        unreachable!()
    };
    assert!(reason.contains("stream cut"), "{reason}");
    let response = done(&events);
    assert_eq!(response.content, vec![ContentBlock::text("Second try")]);
    assert_eq!(response.call.request_id.as_deref(), Some("req_second"));
    assert_eq!(server.request_count(), 2);
    assert_eq!(server.requests()[0].body, server.requests()[1].body);
}

#[tokio::test]
async fn an_early_eof_without_done_is_retried_without_restart_when_nothing_was_sent() {
    // Close-delimited: the body just ends, cleanly, before `[DONE]` and before any delta.
    let server = ScriptServer::start(vec![
        Reply::sse().close_delimited().chunk(": keep-alive\n\n"),
        Reply::sse().chunk(text_stream(&["ok"])),
    ])
    .await;
    let events = run(&client(&server.url(), fast()), hello()).await;
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Ok(ModelEvent::Restart { .. }))),
        "{events:?}"
    );
    assert_eq!(done(&events).content, vec![ContentBlock::text("ok")]);
    assert_eq!(server.request_count(), 2);
}

#[tokio::test]
async fn a_truncated_stream_out_of_retries_is_a_retryable_error_naming_server_and_request() {
    let partial = format!("data: {}\n\n", delta(json!({ "content": "partial" })));
    let cut = || {
        Reply::sse()
            .header("x-request-id", "req_cut_1")
            .chunk(partial.clone())
            .close_delimited()
    };
    let server = ScriptServer::start(vec![cut(), cut()]).await;
    let client = llama_client(&server.url(), fast().max_retries(1));
    let events = run(&client, hello()).await;
    let e = last_error(&events);
    assert!(e.is_retryable(), "{e}");
    let p = provider_error(e);
    assert_eq!(p.provider, "llama.cpp");
    assert_eq!(p.request_id.as_deref(), Some("req_cut_1"));
    assert_eq!(p.error_type.as_deref(), Some("malformed_response"));
    let text = e.to_string();
    assert!(
        text.contains("llama.cpp") && text.contains("req_cut_1"),
        "{text}"
    );
    assert_eq!(server.request_count(), 2, "1 try + max_retries 1");
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Ok(ModelEvent::Restart { .. })))
            .count(),
        1
    );
    assert!(!events.iter().any(|e| matches!(e, Ok(ModelEvent::Done(_)))));
}

#[tokio::test]
async fn a_stalled_stream_hits_the_read_timeout() {
    let server = ScriptServer::start(vec![
        Reply::sse()
            .chunk(format!(
                "data: {}\n\n",
                delta(json!({ "content": "thinking…" }))
            ))
            .pause(Duration::from_secs(20))
            .chunk(text_stream(&["never"])),
    ])
    .await;
    let http = fast()
        .max_retries(0)
        .read_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let events = run(&client(&server.url(), http), hello()).await;
    let e = last_error(&events);
    assert!(e.is_retryable(), "{e}");
    assert!(e.to_string().contains("stream cut"), "{e}");
    assert!(e.to_string().contains("read_timeout"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// Tool-call pieces as a chunk.
fn tool_piece(index: Option<u64>, id: Option<&str>, name: Option<&str>, args: &str) -> Value {
    let mut call = json!({ "function": { "arguments": args } });
    if let Some(i) = index {
        call["index"] = json!(i);
    }
    if let Some(id) = id {
        call["id"] = json!(id);
        call["type"] = json!("function");
    }
    if let Some(n) = name {
        call["function"]["name"] = json!(n);
    }
    delta(json!({ "tool_calls": [call] }))
}

fn tool_uses(r: &ModelResponse) -> Vec<(String, String, Value)> {
    r.content
        .iter()
        .filter_map(|b| match b {
            ContentBlock::ToolUse { id, name, input } => {
                Some((id.clone(), name.clone(), input.clone()))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn parallel_tool_calls_streamed_with_indexes() {
    let body = sse(&[
        delta(json!({ "role": "assistant", "content": null })),
        tool_piece(Some(0), Some("call_w"), Some("weather"), ""),
        tool_piece(Some(0), None, None, "{\"city\""),
        tool_piece(Some(1), Some("call_t"), Some("time"), ""),
        tool_piece(Some(0), None, None, ": \"Paris\"}"),
        tool_piece(Some(1), None, None, "{\"tz\": \"CET\"}"),
        finish("tool_calls"),
        usage(40, 30),
    ]);
    let server = ScriptServer::start(vec![Reply::sse().every(&body, 17)]).await;
    let events = run(&client(&server.url(), fast()), hello()).await;
    let response = done(&events);
    assert_eq!(
        tool_uses(response),
        vec![
            (
                "call_w".into(),
                "weather".into(),
                json!({ "city": "Paris" })
            ),
            ("call_t".into(), "time".into(), json!({ "tz": "CET" })),
        ]
    );
    assert_eq!(response.stop_reason, StopReason::ToolUse);
    assert!(response.wants_tools());
    // The streamed pieces of each call join into its arguments.
    let joined = |index: u32| -> String {
        events
            .iter()
            .filter_map(|e| match e {
                Ok(ModelEvent::Delta(ModelDelta::ToolInput {
                    index: i,
                    partial_json,
                })) if *i == index => Some(partial_json.as_str()),
                _ => None,
            })
            .collect()
    };
    assert_eq!(joined(0), "{\"city\": \"Paris\"}");
    assert_eq!(joined(1), "{\"tz\": \"CET\"}");
    assert!(events.iter().any(|e| matches!(
        e,
        Ok(ModelEvent::Delta(ModelDelta::ToolUseStart { index: 1, id, name })) if id == "call_t" && name == "time"
    )));
}

#[tokio::test]
async fn tool_calls_with_missing_or_repeated_index() {
    // Missing `index` throughout (matched by id, then the last call), and a server that
    // numbers every call 0 (a new id opens a new call).
    let body = sse(&[
        tool_piece(None, Some("call_a"), Some("search"), ""),
        tool_piece(None, None, None, "{\"q\":\"rust\"}"),
        tool_piece(Some(0), Some("call_b"), Some("search"), "{\"q\":"),
        tool_piece(Some(0), None, None, "\"sse\"}"),
        tool_piece(Some(0), Some("call_c"), Some("fetch"), ""),
        tool_piece(Some(0), Some("call_c"), None, "{\"url\":\"https://x\"}"),
        finish("tool_calls"),
    ]);
    let server = ScriptServer::start(vec![Reply::sse().chunk(body)]).await;
    let events = run(&client(&server.url(), fast()), hello()).await;
    assert_eq!(
        tool_uses(done(&events)),
        vec![
            ("call_a".into(), "search".into(), json!({ "q": "rust" })),
            ("call_b".into(), "search".into(), json!({ "q": "sse" })),
            (
                "call_c".into(),
                "fetch".into(),
                json!({ "url": "https://x" })
            ),
        ]
    );
}

#[tokio::test]
async fn bad_tool_json_is_a_malformed_error_and_no_tool_call() {
    let body = sse(&[
        tool_piece(
            Some(0),
            Some("call_bad"),
            Some("weather"),
            "{\"city\": Paris",
        ),
        finish("tool_calls"),
    ]);
    let server = ScriptServer::start(vec![Reply::sse().chunk(body)]).await;
    let events = run(&client(&server.url(), fast().max_retries(0)), hello()).await;
    let e = last_error(&events);
    let p = provider_error(e);
    assert_eq!(p.error_type.as_deref(), Some("malformed_response"));
    assert!(
        p.message.contains("call_bad") && p.message.contains("weather"),
        "{e}"
    );
    assert!(e.is_retryable());
    assert!(!events.iter().any(|e| matches!(e, Ok(ModelEvent::Done(_)))));
}

#[tokio::test]
async fn reasoning_content_streams_as_thinking() {
    let body = sse(&[
        delta(json!({ "role": "assistant", "content": null, "reasoning_content": "The user " })),
        delta(json!({ "reasoning_content": "greets me." })),
        delta(json!({ "content": "Hi!" })),
        finish("stop"),
        json!({ "choices": [], "usage": {
            "prompt_tokens": 20, "completion_tokens": 10,
            "prompt_tokens_details": { "cached_tokens": 8 },
            "completion_tokens_details": { "reasoning_tokens": 6 }
        }}),
    ]);
    let server = ScriptServer::start(vec![Reply::sse().chunk(body)]).await;
    let events = run(&client(&server.url(), fast()), hello()).await;
    let response = done(&events);
    assert_eq!(
        response.content,
        vec![
            ContentBlock::Thinking {
                thinking: "The user greets me.".into(),
                signature: None
            },
            ContentBlock::text("Hi!"),
        ]
    );
    assert_eq!(
        response.usage,
        Usage {
            input_tokens: 12,
            output_tokens: 10,
            cache_read_tokens: 8,
            cache_write_tokens: 0,
            reasoning_tokens: 6
        }
    );
    assert!(matches!(
        &events[0],
        Ok(ModelEvent::Delta(ModelDelta::Thinking { index: 0, text })) if text == "The user "
    ));
}

#[tokio::test]
async fn an_error_chunk_mid_stream_is_retried_then_reported() {
    let failing = || {
        Reply::sse().chunk(format!(
            "data: {}\n\ndata: {}\n\n",
            delta(json!({ "content": "Hal" })),
            json!({ "error": { "message": "The server had an error while processing your request.", "type": "server_error", "code": null } })
        ))
    };
    let server = ScriptServer::start(vec![failing(), failing()]).await;
    let events = run(&client(&server.url(), fast().max_retries(1)), hello()).await;
    let e = last_error(&events);
    let p = provider_error(e);
    assert_eq!(p.status, None);
    assert_eq!(p.error_type.as_deref(), Some("server_error"));
    assert!(p.message.contains("server had an error"), "{e}");
    assert!(e.is_retryable());
    assert_eq!(server.request_count(), 2);

    // A client-fault error chunk is not retried.
    let server = ScriptServer::start(vec![Reply::sse().chunk(format!(
        "data: {}\n\n",
        json!({ "error": { "message": "context too long", "type": "invalid_request_error", "code": "context_length_exceeded" } })
    ))])
    .await;
    let events = run(&client(&server.url(), fast()), hello()).await;
    let e = last_error(&events);
    assert!(!e.is_retryable(), "{e}");
    assert_eq!(
        provider_error(e).code.as_deref(),
        Some("context_length_exceeded")
    );
    assert_eq!(server.request_count(), 1);
}

#[tokio::test]
async fn a_status_error_before_the_stream_is_retried_within_the_same_budget() {
    let server = ScriptServer::start(vec![
        Reply::json(
            503,
            r#"{"error":{"message":"Loading model","type":"unavailable_error","code":503}}"#,
        ),
        Reply::sse().chunk(text_stream(&["up"])),
    ])
    .await;
    let events = run(&client(&server.url(), fast()), hello()).await;
    assert_eq!(done(&events).content, vec![ContentBlock::text("up")]);
    assert_eq!(server.request_count(), 2);

    // Cut, then 503, then cut: three requests is the whole budget of max_retries 2.
    let partial = format!("data: {}\n\n", delta(json!({ "content": "x" })));
    let server = ScriptServer::start(vec![
        Reply::sse().chunk(partial.clone()).cut(),
        Reply::json(503, "{}"),
        Reply::sse().chunk(partial).cut(),
        Reply::sse().chunk(text_stream(&["never reached"])),
    ])
    .await;
    let events = run(&client(&server.url(), fast()), hello()).await;
    assert!(matches!(events.last(), Some(Err(_))), "{events:?}");
    assert_eq!(server.request_count(), 3);
}

#[tokio::test]
async fn complete_reads_a_response_from_the_script_server_too() {
    // `complete` is not streamed: a plain JSON body, split across chunks.
    let body = completion("plain").to_string();
    let server = ScriptServer::start(vec![
        Reply::status(200)
            .header("content-type", "application/json")
            .every(&body, 7),
    ])
    .await;
    let response = bounded(client(&server.url(), fast()).complete(hello()))
        .await
        .unwrap();
    assert_eq!(response.content, vec![ContentBlock::text("plain")]);
}

#[tokio::test]
async fn dropping_the_stream_closes_the_connection() {
    let server = ScriptServer::start(vec![
        Reply::sse()
            .chunk(format!(
                "data: {}\n\n",
                delta(json!({ "content": "a long answer…" }))
            ))
            .hold(),
    ])
    .await;
    let client = client(&server.url(), fast());
    let mut stream = bounded(client.stream(hello())).await.unwrap();
    let first = bounded(stream.next()).await;
    assert!(
        matches!(first, Some(Ok(ModelEvent::Delta(ModelDelta::Text { .. })))),
        "{first:?}"
    );
    drop(stream);
    // The server sees the client close the connection: the generation is cancelled.
    bounded(server.wait_closed(1)).await;
    assert_eq!(server.request_count(), 1);
}

#[tokio::test]
async fn no_response_headers_within_the_first_byte_timeout_is_retryable() {
    let server = ScriptServer::start(vec![
        Reply::sse()
            .head_delay(Duration::from_secs(20))
            .chunk(text_stream(&["late"])),
    ])
    .await;
    let http = fast()
        .max_retries(0)
        .first_byte_timeout(Duration::from_millis(300));
    let events = run(&client(&server.url(), http), hello()).await;
    let e = last_error(&events);
    assert!(e.is_retryable(), "{e}");
    assert!(e.to_string().contains("first_byte_timeout"), "{e}");
}

#[tokio::test]
async fn a_llama_cpp_shaped_stream_with_usage_in_the_finish_chunk() {
    // The shape llama-server writes (format_oai_sse): no `x-request-id`, usage and `timings`
    // in the chunk that carries `finish_reason`, ids it makes up itself.
    let meta = |mut v: Value| {
        v["created"] = json!(1_733_000_000);
        v["id"] = json!("chatcmpl-llama42");
        v["model"] = json!("gemma3");
        v["system_fingerprint"] = json!("b5000-abcdef");
        v["object"] = json!("chat.completion.chunk");
        v
    };
    let body = sse(&[
        meta(
            json!({ "choices": [{ "finish_reason": null, "index": 0, "delta": { "role": "assistant", "content": null } }] }),
        ),
        meta(
            json!({ "choices": [{ "finish_reason": null, "index": 0, "delta": { "tool_calls": [{ "index": 0, "id": "Kx3aQ9", "type": "function", "function": { "name": "add", "arguments": "{\"" } }] } }] }),
        ),
        meta(
            json!({ "choices": [{ "finish_reason": null, "index": 0, "delta": { "tool_calls": [{ "index": 0, "function": { "arguments": "a\": 2, \"b\": 3}" } }] } }] }),
        ),
        meta(json!({
            "choices": [{ "finish_reason": "tool_calls", "index": 0, "delta": {} }],
            "usage": { "completion_tokens": 20, "prompt_tokens": 50, "total_tokens": 70 },
            "timings": { "prompt_n": 50, "prompt_ms": 101.5, "predicted_n": 20, "predicted_ms": 400.2 }
        })),
    ]);
    let server = ScriptServer::start(vec![Reply::sse().chunk(body)]).await;
    let client = llama_client(&server.url(), fast());
    let events = run(&client, hello()).await;
    let response = done(&events);
    assert_eq!(
        tool_uses(response),
        vec![("Kx3aQ9".into(), "add".into(), json!({ "a": 2, "b": 3 }))]
    );
    assert_eq!(response.usage, Usage::new(50, 20));
    assert_eq!(
        response.call.request_id.as_deref(),
        Some("chatcmpl-llama42")
    );
    assert_eq!(response.call.model.as_deref(), Some("gemma3"));
}

#[tokio::test]
async fn an_error_line_then_done_is_an_error_not_an_empty_answer() {
    // Older llama-server builds: `error: {…}` (a field SSE ignores), then `[DONE]`.
    let body = "error: {\"code\":500,\"message\":\"the request exceeds the available context size\",\"type\":\"exceed_context_size_error\"}\n\ndata: [DONE]\n\n";
    let server = ScriptServer::start(vec![Reply::sse().chunk(body)]).await;
    let events = run(&client(&server.url(), fast().max_retries(0)), hello()).await;
    let e = last_error(&events);
    assert!(e.to_string().contains("without a finish reason"), "{e}");
    assert!(!events.iter().any(|e| matches!(e, Ok(ModelEvent::Done(_)))));
}
