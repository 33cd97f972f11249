//! The stream parser's cases, one chunk sequence each.

use normandy_core::{Error, StopReason};
use serde_json::json;

use super::*;

fn feed_all(chunks: &[Value]) -> (Vec<ModelDelta>, Result<ModelResponse>) {
    let mut p = ChunkParser::new("openai", None);
    let mut deltas = Vec::new();
    for c in chunks {
        let fed = p
            .feed_collect(&SseEvent {
                event: None,
                data: c.to_string(),
            })
            .unwrap();
        deltas.extend(fed.deltas);
        assert!(fed.done.is_none());
    }
    let done = p
        .feed_collect(&SseEvent {
            event: None,
            data: "[DONE]".into(),
        })
        .map(|f| f.done.expect("done at [DONE]"));
    (deltas, done)
}

fn tool(index: Option<u64>, id: Option<&str>, name: Option<&str>, args: Option<&str>) -> Value {
    let mut t = json!({ "type": "function", "function": {} });
    if let Some(i) = index {
        t["index"] = json!(i);
    }
    if let Some(id) = id {
        t["id"] = json!(id);
    }
    if let Some(n) = name {
        t["function"]["name"] = json!(n);
    }
    if let Some(a) = args {
        t["function"]["arguments"] = json!(a);
    }
    json!({ "id": "chatcmpl-1", "model": "m", "choices": [{ "index": 0, "delta": { "tool_calls": [t] }, "finish_reason": null }] })
}

fn finish(reason: &str) -> Value {
    json!({ "id": "chatcmpl-1", "model": "m", "choices": [{ "index": 0, "delta": {}, "finish_reason": reason }] })
}

fn calls(r: &ModelResponse) -> Vec<(String, String, Value)> {
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

#[test]
fn indexed_calls_with_fragments() {
    let (deltas, r) = feed_all(&[
        tool(Some(0), Some("call_a"), Some("weather"), Some("")),
        tool(Some(1), Some("call_b"), Some("clock"), Some("")),
        tool(Some(0), None, None, Some("{\"city\":")),
        tool(Some(1), None, None, Some("{}")),
        tool(Some(0), None, None, Some("\"Paris\"}")),
        finish("tool_calls"),
    ]);
    let r = r.unwrap();
    assert_eq!(
        calls(&r),
        vec![
            ("call_a".into(), "weather".into(), json!({"city": "Paris"})),
            ("call_b".into(), "clock".into(), json!({})),
        ]
    );
    assert_eq!(r.stop_reason, StopReason::ToolUse);
    assert_eq!(
        deltas[0],
        ModelDelta::ToolUseStart {
            index: 0,
            id: "call_a".into(),
            name: "weather".into()
        }
    );
    assert_eq!(
        deltas[2],
        ModelDelta::ToolInput {
            index: 0,
            partial_json: "{\"city\":".into()
        }
    );
}

#[test]
fn missing_index_continues_the_last_call_and_a_new_id_opens_one() {
    let (_, r) = feed_all(&[
        tool(None, Some("call_a"), Some("weather"), None),
        tool(None, None, None, Some("{\"city\":\"Oslo\"}")),
        tool(None, Some("call_b"), Some("weather"), None),
        tool(None, None, None, Some("{\"city\":\"Rome\"}")),
        finish("tool_calls"),
    ]);
    assert_eq!(
        calls(&r.unwrap()),
        vec![
            ("call_a".into(), "weather".into(), json!({"city": "Oslo"})),
            ("call_b".into(), "weather".into(), json!({"city": "Rome"})),
        ]
    );
}

#[test]
fn repeated_index_zero_with_new_ids_opens_new_calls() {
    let (_, r) = feed_all(&[
        tool(Some(0), Some("call_a"), Some("weather"), Some("{\"city\":")),
        tool(Some(0), None, None, Some("\"Oslo\"}")),
        tool(Some(0), Some("call_b"), Some("clock"), Some("{")),
        tool(Some(0), None, None, Some("}")),
        finish("tool_calls"),
    ]);
    assert_eq!(
        calls(&r.unwrap()),
        vec![
            ("call_a".into(), "weather".into(), json!({"city": "Oslo"})),
            ("call_b".into(), "clock".into(), json!({})),
        ]
    );
}

#[test]
fn an_id_repeated_on_every_piece_continues_its_call() {
    let (deltas, r) = feed_all(&[
        tool(Some(0), Some("call_a"), Some("weather"), Some("{\"ci")),
        tool(
            Some(0),
            Some("call_a"),
            Some("weather"),
            Some("ty\":\"Oslo\"}"),
        ),
        finish("tool_calls"),
    ]);
    assert_eq!(
        calls(&r.unwrap()),
        vec![("call_a".into(), "weather".into(), json!({"city": "Oslo"}))]
    );
    assert_eq!(deltas.len(), 3, "{deltas:?}");
}

#[test]
fn calls_without_ids_get_one() {
    let (_, r) = feed_all(&[
        tool(None, None, Some("clock"), Some("{}")),
        finish("tool_calls"),
    ]);
    assert_eq!(
        calls(&r.unwrap()),
        vec![("call_0".into(), "clock".into(), json!({}))]
    );
}

#[test]
fn reasoning_then_text_are_two_blocks() {
    let c = |delta: Value| json!({ "choices": [{ "index": 0, "delta": delta }] });
    let (deltas, r) = feed_all(&[
        c(json!({ "role": "assistant", "content": "" })),
        c(json!({ "reasoning_content": "Think" })),
        c(json!({ "reasoning_content": "ing." })),
        c(json!({ "content": "Hi" })),
        c(json!({ "content": "!" })),
        finish("stop"),
    ]);
    let r = r.unwrap();
    assert_eq!(
        r.content,
        vec![
            ContentBlock::Thinking {
                thinking: "Thinking.".into(),
                signature: None
            },
            ContentBlock::text("Hi!")
        ]
    );
    assert_eq!(
        deltas,
        vec![
            ModelDelta::Thinking {
                index: 0,
                text: "Think".into()
            },
            ModelDelta::Thinking {
                index: 0,
                text: "ing.".into()
            },
            ModelDelta::Text {
                index: 1,
                text: "Hi".into()
            },
            ModelDelta::Text {
                index: 1,
                text: "!".into()
            },
        ]
    );
    assert_eq!(r.stop_reason, StopReason::EndTurn);
}

#[test]
fn usage_after_finish_and_unknown_fields() {
    let (_, r) = feed_all(&[
        json!({ "id": "chatcmpl-9", "model": "gpt-x", "system_fingerprint": "fp", "choices": [{ "index": 0, "delta": { "content": "ok" }, "logprobs": null, "finish_reason": null }], "usage": null, "obfuscation": "abc" }),
        json!({ "id": "chatcmpl-9", "model": "gpt-x", "choices": [{ "index": 0, "delta": {}, "finish_reason": "length" }] }),
        json!({ "id": "chatcmpl-9", "model": "gpt-x", "choices": [], "usage": { "prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13 }, "timings": { "predicted_ms": 1.5 } }),
    ]);
    let r = r.unwrap();
    assert_eq!(r.usage, Usage::new(10, 3));
    assert_eq!(r.stop_reason, StopReason::MaxTokens);
    assert_eq!(r.call.stop.as_deref(), Some("length"));
    assert_eq!(r.call.model.as_deref(), Some("gpt-x"));
    assert_eq!(r.call.request_id.as_deref(), Some("chatcmpl-9"));
}

#[test]
fn an_error_chunk_is_a_stream_error() {
    let mut p = ChunkParser::new("openai", Some("req_1".into()));
    let e = p
        .feed_collect(&SseEvent {
            event: None,
            data:
                json!({ "error": { "message": "The server had an error", "type": "server_error" } })
                    .to_string(),
        })
        .unwrap_err();
    let Error::Provider(pe) = &e else {
        panic!("{e:?}")
    };
    assert!(pe.retryable);
    assert_eq!(pe.status, None);
    assert_eq!(pe.request_id.as_deref(), Some("req_1"));
    assert_eq!(pe.error_type.as_deref(), Some("server_error"));
}

#[test]
fn bad_tool_json_fails_at_done() {
    let (_, r) = feed_all(&[
        tool(
            Some(0),
            Some("call_a"),
            Some("weather"),
            Some("{\"city\": Oslo}"),
        ),
        finish("tool_calls"),
    ]);
    let e = r.unwrap_err();
    assert!(e.to_string().contains("call_a"), "{e}");
}

#[test]
fn done_without_a_finish_reason_is_malformed() {
    let c = json!({ "choices": [{ "index": 0, "delta": { "content": "par" } }] });
    let (_, r) = feed_all(&[c]);
    let e = r.unwrap_err();
    assert!(e.is_retryable());
    assert!(e.to_string().contains("without a finish reason"), "{e}");
}

#[test]
fn arguments_for_no_call_are_malformed() {
    let mut p = ChunkParser::new("openai", None);
    let e = p
        .feed_collect(&SseEvent {
            event: None,
            data: tool(None, None, None, Some("{}")).to_string(),
        })
        .unwrap_err();
    assert!(e.to_string().contains("before any tool call"), "{e}");
}
