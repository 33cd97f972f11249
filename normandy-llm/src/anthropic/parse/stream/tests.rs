//! The stream parser's cases, one event sequence each.

use normandy_core::{StopReason, Usage};
use serde_json::json;

use super::*;

/// Feeds `(event, data)` pairs; returns the deltas and the final response, if any.
fn run(
    parser: &mut AnthropicParser,
    events: &[(&str, Value)],
) -> Result<(Vec<ModelDelta>, Option<ModelResponse>)> {
    let mut deltas = Vec::new();
    for (name, data) in events {
        let fed = parser.feed_collect(&SseEvent {
            event: Some((*name).to_owned()),
            data: data.to_string(),
        })?;
        deltas.extend(fed.deltas);
        if let Some(done) = fed.done {
            return Ok((deltas, Some(done)));
        }
    }
    Ok((deltas, None))
}

fn start(usage: Value) -> (&'static str, Value) {
    (
        "message_start",
        json!({"type": "message_start", "message": {
            "id": "msg_01", "type": "message", "role": "assistant", "content": [],
            "model": "claude-sonnet-4-5", "stop_reason": null, "stop_sequence": null,
            "usage": usage}}),
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

fn block_stop(index: u32) -> (&'static str, Value) {
    (
        "content_block_stop",
        json!({"type": "content_block_stop", "index": index}),
    )
}

fn message_delta(stop: &str, usage: Value) -> (&'static str, Value) {
    (
        "message_delta",
        json!({"type": "message_delta",
               "delta": {"stop_reason": stop, "stop_sequence": null}, "usage": usage}),
    )
}

fn stop() -> (&'static str, Value) {
    ("message_stop", json!({"type": "message_stop"}))
}

fn ping() -> (&'static str, Value) {
    ("ping", json!({"type": "ping"}))
}

fn provider(e: &Error) -> &normandy_core::ProviderError {
    match e {
        Error::Provider(p) => p,
        other => panic!("not a provider error: {other:?}"),
    }
}

#[test]
fn text_stream_with_pings_and_cache_usage() {
    let mut p = AnthropicParser::new(Some("req_header".into()));
    let (deltas, done) = run(
        &mut p,
        &[
            start(json!({"input_tokens": 25, "output_tokens": 1,
                         "cache_creation_input_tokens": 100, "cache_read_input_tokens": 2000})),
            block_start(0, json!({"type": "text", "text": ""})),
            ping(),
            delta(0, json!({"type": "text_delta", "text": "Hello"})),
            ping(),
            delta(0, json!({"type": "text_delta", "text": ", world"})),
            block_stop(0),
            message_delta("end_turn", json!({"output_tokens": 15})),
            stop(),
        ],
    )
    .unwrap();
    assert_eq!(
        deltas,
        [
            ModelDelta::Text {
                index: 0,
                text: "Hello".into()
            },
            ModelDelta::Text {
                index: 0,
                text: ", world".into()
            },
        ]
    );
    let done = done.expect("message_stop ends the response");
    assert_eq!(done.content, [ContentBlock::text("Hello, world")]);
    assert_eq!(done.stop_reason, StopReason::EndTurn);
    assert_eq!(
        done.usage,
        Usage {
            input_tokens: 25,
            output_tokens: 15,
            cache_read_tokens: 2000,
            cache_write_tokens: 100,
            reasoning_tokens: 0,
        }
    );
    assert_eq!(
        done.call,
        CallInfo {
            model: Some("claude-sonnet-4-5".into()),
            request_id: Some("req_header".into()),
            stop: Some("end_turn".into()),
        }
    );
}

#[test]
fn the_message_id_stands_in_for_a_missing_request_id_header() {
    let mut p = AnthropicParser::new(None);
    let (_, done) = run(
        &mut p,
        &[
            start(json!({"input_tokens": 1, "output_tokens": 1})),
            message_delta("max_tokens", json!({"output_tokens": 2})),
            stop(),
        ],
    )
    .unwrap();
    let done = done.unwrap();
    assert_eq!(done.call.request_id.as_deref(), Some("msg_01"));
    assert_eq!(done.stop_reason, StopReason::MaxTokens);
    assert!(done.content.is_empty());
}

#[test]
fn tool_input_fragments_split_anywhere_join_into_the_input() {
    let mut p = AnthropicParser::new(None);
    let fragments = [
        "",
        "{\"loc",
        "ation\": \"San Fra",
        "ncisco, CA\", \"un",
        "it\": \"°",
        "C\"}",
    ];
    let mut events = vec![
        start(json!({"input_tokens": 10, "output_tokens": 1})),
        block_start(0, json!({"type": "text", "text": ""})),
        delta(0, json!({"type": "text_delta", "text": "Checking."})),
        block_stop(0),
        block_start(
            1,
            json!({"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}),
        ),
    ];
    for f in fragments {
        events.push(delta(
            1,
            json!({"type": "input_json_delta", "partial_json": f}),
        ));
    }
    events.extend([
        block_stop(1),
        message_delta("tool_use", json!({"output_tokens": 89})),
        stop(),
    ]);
    let (deltas, done) = run(&mut p, &events).unwrap();
    assert_eq!(
        deltas[1],
        ModelDelta::ToolUseStart {
            index: 1,
            id: "toolu_01".into(),
            name: "get_weather".into()
        }
    );
    let joined: String = deltas
        .iter()
        .filter_map(|d| match d {
            ModelDelta::ToolInput {
                index: 1,
                partial_json,
            } => Some(partial_json.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(joined, fragments.concat());
    let done = done.unwrap();
    assert_eq!(done.stop_reason, StopReason::ToolUse);
    assert_eq!(
        done.content[1],
        ContentBlock::ToolUse {
            id: "toolu_01".into(),
            name: "get_weather".into(),
            input: json!({"location": "San Francisco, CA", "unit": "°C"}),
        }
    );
}

#[test]
fn a_tool_call_without_input_deltas_has_empty_input() {
    let mut p = AnthropicParser::new(None);
    let (_, done) = run(
        &mut p,
        &[
            block_start(
                0,
                json!({"type": "tool_use", "id": "toolu_02", "name": "now", "input": {}}),
            ),
            block_stop(0),
            message_delta("tool_use", json!({"output_tokens": 3})),
            stop(),
        ],
    )
    .unwrap();
    assert_eq!(
        done.unwrap().content,
        [ContentBlock::ToolUse {
            id: "toolu_02".into(),
            name: "now".into(),
            input: json!({})
        }]
    );
}

#[test]
fn bad_tool_json_is_malformed_naming_the_call() {
    let mut p = AnthropicParser::new(Some("req_9".into()));
    let err = run(
        &mut p,
        &[
            block_start(
                0,
                json!({"type": "tool_use", "id": "toolu_03", "name": "search", "input": {}}),
            ),
            delta(
                0,
                json!({"type": "input_json_delta", "partial_json": "{\"q\": "}),
            ),
            block_stop(0),
        ],
    )
    .unwrap_err();
    let e = provider(&err);
    assert_eq!(e.error_type.as_deref(), Some("malformed_response"));
    assert!(
        e.message.contains("toolu_03") && e.message.contains("search"),
        "{e}"
    );
    assert!(err.is_retryable());
    assert_eq!(e.request_id.as_deref(), Some("req_9"));
}

#[test]
fn thinking_with_signature_then_tool_use() {
    let mut p = AnthropicParser::new(None);
    let (deltas, done) = run(
        &mut p,
        &[
            start(json!({"input_tokens": 50, "output_tokens": 1})),
            block_start(0, json!({"type": "thinking", "thinking": ""})),
            delta(0, json!({"type": "thinking_delta", "thinking": "I need "})),
            delta(
                0,
                json!({"type": "thinking_delta", "thinking": "the weather."}),
            ),
            delta(
                0,
                json!({"type": "signature_delta", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3h"}),
            ),
            delta(
                0,
                json!({"type": "signature_delta", "signature": "GgwhEQ=="}),
            ),
            block_stop(0),
            block_start(
                1,
                json!({"type": "tool_use", "id": "toolu_04", "name": "weather", "input": {}}),
            ),
            delta(
                1,
                json!({"type": "input_json_delta", "partial_json": "{\"city\":\"Paris\"}"}),
            ),
            block_stop(1),
            message_delta("tool_use", json!({"output_tokens": 120})),
            stop(),
        ],
    )
    .unwrap();
    assert_eq!(
        deltas[..2],
        [
            ModelDelta::Thinking {
                index: 0,
                text: "I need ".into()
            },
            ModelDelta::Thinking {
                index: 0,
                text: "the weather.".into()
            },
        ]
    );
    assert_eq!(
        done.unwrap().content,
        [
            ContentBlock::Thinking {
                thinking: "I need the weather.".into(),
                signature: Some("EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgwhEQ==".into()),
            },
            ContentBlock::ToolUse {
                id: "toolu_04".into(),
                name: "weather".into(),
                input: json!({"city": "Paris"})
            },
        ]
    );
}

#[test]
fn redacted_thinking_is_kept_whole() {
    let mut p = AnthropicParser::new(None);
    let (deltas, done) = run(
        &mut p,
        &[
            block_start(
                0,
                json!({"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4a"}),
            ),
            block_stop(0),
            block_start(1, json!({"type": "text", "text": ""})),
            delta(1, json!({"type": "text_delta", "text": "ok"})),
            block_stop(1),
            message_delta("end_turn", json!({"output_tokens": 5})),
            stop(),
        ],
    )
    .unwrap();
    assert_eq!(deltas.len(), 1);
    assert_eq!(
        done.unwrap().content,
        [
            ContentBlock::RedactedThinking {
                data: "EmwKAhgBEgy3va3pzix/LafPsn4a".into()
            },
            ContentBlock::text("ok"),
        ]
    );
}

#[test]
fn unknown_events_blocks_and_deltas_are_skipped() {
    let mut p = AnthropicParser::new(None);
    let mut events = vec![
        start(json!({"input_tokens": 1, "output_tokens": 1})),
        (
            "some_future_event",
            json!({"type": "some_future_event", "x": 1}),
        ),
        block_start(
            0,
            json!({"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search"}),
        ),
        delta(
            0,
            json!({"type": "input_json_delta", "partial_json": "{\"query\""}),
        ),
        block_stop(0),
        block_start(1, json!({"type": "text", "text": ""})),
        delta(
            1,
            json!({"type": "citations_delta", "citation": {"type": "char_location"}}),
        ),
        delta(1, json!({"type": "text_delta", "text": "fine"})),
        block_stop(1),
        message_delta("end_turn", json!({"output_tokens": 5})),
    ];
    let (_, done) = run(&mut p, &events).unwrap();
    assert!(done.is_none());
    // A named event that is not JSON at all is skipped unread.
    let fed = p
        .feed_collect(&SseEvent {
            event: Some("future".into()),
            data: "not json".into(),
        })
        .unwrap();
    assert!(fed.deltas.is_empty() && fed.done.is_none());
    // An unnamed event is dispatched on its `type`.
    let fed = p
        .feed_collect(&SseEvent {
            event: None,
            data: json!({"type": "unheard_of"}).to_string(),
        })
        .unwrap();
    assert!(fed.done.is_none());
    events.clear();
    events.push(stop());
    let (_, done) = run(&mut p, &events).unwrap();
    assert_eq!(done.unwrap().content, [ContentBlock::text("fine")]);
}

#[test]
fn error_events_are_retryable_only_when_the_api_says_so() {
    for (kind, retryable) in [
        ("overloaded_error", true),
        ("api_error", true),
        ("invalid_request_error", false),
        ("permission_error", false),
    ] {
        let mut p = AnthropicParser::new(Some("req_e".into()));
        let err = run(
            &mut p,
            &[
                start(json!({"input_tokens": 1, "output_tokens": 1})),
                (
                    "error",
                    json!({"type": "error", "error": {"type": kind, "message": "Overloaded"}}),
                ),
            ],
        )
        .unwrap_err();
        let e = provider(&err);
        assert_eq!(e.retryable, retryable, "{kind}");
        assert_eq!(e.error_type.as_deref(), Some(kind));
        assert_eq!(e.status, None);
        assert_eq!(e.request_id.as_deref(), Some("req_e"));
        assert_eq!(e.message, "Overloaded");
    }
}

#[test]
fn protocol_violations_are_malformed() {
    let cases: Vec<Vec<(&str, Value)>> = vec![
        vec![delta(3, json!({"type": "text_delta", "text": "x"}))],
        vec![
            block_start(0, json!({"type": "text", "text": ""})),
            block_start(0, json!({"type": "text", "text": ""})),
        ],
        vec![
            block_start(0, json!({"type": "text", "text": ""})),
            delta(0, json!({"type": "input_json_delta", "partial_json": "{}"})),
        ],
        vec![
            block_start(0, json!({"type": "text", "text": ""})),
            block_stop(0),
            delta(0, json!({"type": "text_delta", "text": "late"})),
        ],
        vec![(
            "content_block_delta",
            json!({"type": "content_block_delta"}),
        )],
    ];
    for events in cases {
        let err = run(&mut AnthropicParser::new(None), &events).unwrap_err();
        assert_eq!(
            provider(&err).error_type.as_deref(),
            Some("malformed_response"),
            "{err}"
        );
    }
    let Err(err) = AnthropicParser::new(None).feed_collect(&SseEvent {
        event: Some("message_start".into()),
        data: "{not json".into(),
    }) else {
        panic!("bad JSON in a known event must fail")
    };
    assert!(err.to_string().contains("message_start"), "{err}");
}

#[test]
fn stop_reasons_map_and_keep_the_raw_word() {
    for (raw, want) in [
        ("end_turn", StopReason::EndTurn),
        ("tool_use", StopReason::ToolUse),
        ("max_tokens", StopReason::MaxTokens),
        ("stop_sequence", StopReason::StopSequence),
        ("refusal", StopReason::Refusal),
        ("pause_turn", StopReason::PauseTurn),
        ("model_context_window_exceeded", StopReason::Other),
    ] {
        let mut p = AnthropicParser::new(None);
        let (_, done) = run(&mut p, &[message_delta(raw, json!({})), stop()]).unwrap();
        let done = done.unwrap();
        assert_eq!(done.stop_reason, want, "{raw}");
        assert_eq!(done.call.stop.as_deref(), Some(raw));
    }
}
