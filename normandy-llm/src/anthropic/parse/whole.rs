//! A whole (non-streaming) Messages API response.

use normandy_core::{CallInfo, ContentBlock, ModelResponse, Result, Usage};
use serde::Deserialize;
use serde_json::Value;

use super::{PROVIDER, WireUsage, stop_reason};
use crate::error;

/// A whole Messages API response.
#[derive(Deserialize)]
struct WireMessage {
    id: Option<String>,
    model: Option<String>,
    #[serde(default)]
    content: Vec<Value>,
    stop_reason: Option<String>,
    #[serde(default)]
    usage: WireUsage,
}

/// A response content block (one of the kinds this adapter reads).
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireBlock {
    Text {
        text: String,
    },
    Thinking {
        thinking: String,
        #[serde(default)]
        signature: Option<String>,
    },
    RedactedThinking {
        data: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
}

/// Reads a whole (non-streaming) response body. `request_id` is the `request-id` header; the
/// message id stands in without one. An unknown content block type is malformed: unlike a
/// stream, a whole response offers no way to tell the caller what was left out.
pub(crate) fn response(body: &[u8], request_id: Option<String>) -> Result<ModelResponse> {
    let message: WireMessage = serde_json::from_slice(body).map_err(|e| {
        error::malformed(
            PROVIDER,
            request_id.as_deref(),
            format!("a response that cannot be read: {e}"),
        )
    })?;
    let request_id = request_id.or(message.id);
    let malformed = |what: String| error::malformed(PROVIDER, request_id.as_deref(), what);
    let mut content = Vec::with_capacity(message.content.len());
    for (at, block) in message.content.into_iter().enumerate() {
        let kind = block["type"].as_str().unwrap_or("(none)").to_owned();
        if !matches!(
            kind.as_str(),
            "text" | "thinking" | "redacted_thinking" | "tool_use"
        ) {
            return Err(malformed(format!(
                "content block {at} has a type this adapter cannot read: {kind}"
            )));
        }
        let block: WireBlock = serde_json::from_value(block)
            .map_err(|e| malformed(format!("content block {at} ({kind}) cannot be read: {e}")))?;
        content.push(match block {
            WireBlock::Text { text } => ContentBlock::Text { text },
            WireBlock::Thinking {
                thinking,
                signature,
            } => ContentBlock::Thinking {
                thinking,
                signature: signature.filter(|s| !s.is_empty()),
            },
            WireBlock::RedactedThinking { data } => ContentBlock::RedactedThinking { data },
            WireBlock::ToolUse { id, name, input } => {
                if !input.is_object() {
                    return Err(malformed(format!(
                        "the input of tool call {id} ({name}) is not a JSON object"
                    )));
                }
                ContentBlock::ToolUse { id, name, input }
            }
        });
    }
    let mut usage = Usage::default();
    message.usage.apply(&mut usage);
    Ok(ModelResponse {
        content,
        stop_reason: stop_reason(message.stop_reason.as_deref()),
        usage,
        call: CallInfo {
            model: message.model,
            request_id,
            stop: message.stop_reason,
        },
    })
}

#[cfg(test)]
mod tests {
    use normandy_core::{Error, StopReason};
    use serde_json::json;

    use super::*;

    fn provider(e: &Error) -> &normandy_core::ProviderError {
        match e {
            Error::Provider(p) => p,
            other => panic!("not a provider error: {other:?}"),
        }
    }

    #[test]
    fn a_whole_response_parses() {
        let body = json!({
            "id": "msg_02", "type": "message", "role": "assistant", "model": "claude-opus-4-1",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig=="},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "text", "text": "Let me look.", "citations": null},
                {"type": "tool_use", "id": "toolu_05", "name": "search", "input": {"q": "rust"}},
            ],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 10, "output_tokens": 20, "cache_read_input_tokens": 30,
                      "cache_creation_input_tokens": null},
        });
        let r = response(body.to_string().as_bytes(), None).unwrap();
        assert_eq!(
            r.content,
            [
                ContentBlock::Thinking {
                    thinking: "hmm".into(),
                    signature: Some("sig==".into())
                },
                ContentBlock::RedactedThinking {
                    data: "opaque".into()
                },
                ContentBlock::text("Let me look."),
                ContentBlock::ToolUse {
                    id: "toolu_05".into(),
                    name: "search".into(),
                    input: json!({"q": "rust"})
                },
            ]
        );
        assert_eq!(r.stop_reason, StopReason::ToolUse);
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 10,
                output_tokens: 20,
                cache_read_tokens: 30,
                ..Usage::default()
            }
        );
        assert_eq!(r.call.request_id.as_deref(), Some("msg_02"));
        assert_eq!(r.call.model.as_deref(), Some("claude-opus-4-1"));
        assert_eq!(r.call.stop.as_deref(), Some("tool_use"));
        let r = response(body.to_string().as_bytes(), Some("req_h".into())).unwrap();
        assert_eq!(r.call.request_id.as_deref(), Some("req_h"));
    }

    #[test]
    fn an_unknown_block_in_a_whole_response_is_malformed() {
        let body = json!({
            "id": "msg_03", "model": "m", "stop_reason": "end_turn", "usage": {},
            "content": [{"type": "text", "text": "a"}, {"type": "web_search_tool_result", "content": []}],
        });
        let err = response(body.to_string().as_bytes(), None).unwrap_err();
        let e = provider(&err);
        assert_eq!(e.error_type.as_deref(), Some("malformed_response"));
        assert!(e.message.contains("web_search_tool_result"), "{e}");
        assert_eq!(e.request_id.as_deref(), Some("msg_03"));
        for bad in [
            &b"not json"[..],
            br#"{"content": [{"type": "tool_use", "id": "t", "name": "n", "input": 3}]}"#,
        ] {
            let err = response(bad, None).unwrap_err();
            assert_eq!(
                provider(&err).error_type.as_deref(),
                Some("malformed_response")
            );
        }
    }
}
