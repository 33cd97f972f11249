//! Reading a whole Chat Completions response, and what the stream parser shares with it: usage,
//! stop reasons, tool arguments and in-band error objects.
//!
//! Wire types have every field optional and ignore unknown ones: compatible servers omit fields,
//! send `null` for absent ones, and add their own (`timings`, `system_fingerprint`).

use normandy_core::{CallInfo, ContentBlock, Error, ModelResponse, Result, StopReason, Usage};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{error_fields, malformed, stream_error};

/// A non-streamed response.
#[derive(Debug, Deserialize)]
struct Completion {
    id: Option<String>,
    model: Option<String>,
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<WireUsage>,
    error: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    message: Option<WireMessage>,
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireMessage {
    /// A string, `null`, or (some servers) an array of text parts.
    content: Option<Value>,
    reasoning_content: Option<String>,
    reasoning: Option<String>,
    refusal: Option<String>,
    tool_calls: Option<Vec<WireToolCall>>,
}

#[derive(Debug, Deserialize)]
struct WireToolCall {
    id: Option<String>,
    function: Option<WireFunction>,
}

#[derive(Debug, Deserialize)]
struct WireFunction {
    name: Option<String>,
    /// JSON text (OpenAI), or already an object (some servers).
    arguments: Option<Value>,
}

/// Token usage as the API reports it.
#[derive(Debug, Default, Clone, Deserialize)]
pub(super) struct WireUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    prompt_tokens_details: Option<PromptDetails>,
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Debug, Default, Clone, Deserialize)]
struct PromptDetails {
    cached_tokens: Option<u64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
struct CompletionDetails {
    reasoning_tokens: Option<u64>,
}

impl WireUsage {
    /// `prompt_tokens` counts cached tokens too; [`Usage::input_tokens`] does not.
    pub(super) fn to_usage(&self) -> Usage {
        let prompt = self.prompt_tokens.unwrap_or(0);
        let cached = self
            .prompt_tokens_details
            .as_ref()
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0);
        Usage {
            input_tokens: prompt.saturating_sub(cached),
            output_tokens: self.completion_tokens.unwrap_or(0),
            cache_read_tokens: cached,
            cache_write_tokens: 0,
            reasoning_tokens: self
                .completion_tokens_details
                .as_ref()
                .and_then(|d| d.reasoning_tokens)
                .unwrap_or(0),
        }
    }
}

/// Reads a non-streamed response body.
pub(super) fn parse(
    provider: &str,
    request_id: Option<String>,
    body: &[u8],
) -> Result<ModelResponse> {
    let completion: Completion = serde_json::from_slice(body).map_err(|e| {
        malformed(
            provider,
            request_id.as_deref(),
            format!("the response is not a chat completion: {e}"),
        )
    })?;
    let request_id = request_id.or(completion.id);
    let rid = request_id.as_deref();
    if let Some(error) = completion.error.filter(|e| !e.is_null()) {
        return Err(error_object(
            provider,
            rid,
            &serde_json::json!({ "error": error }),
        ));
    }
    let Some(choice) = completion.choices.into_iter().next() else {
        return Err(malformed(
            provider,
            rid,
            "the response has no choices".to_owned(),
        ));
    };
    let message = choice.message.ok_or_else(|| {
        malformed(
            provider,
            rid,
            "the response's choice has no message".to_owned(),
        )
    })?;

    let mut content = Vec::new();
    if let Some(thinking) = message
        .reasoning_content
        .or(message.reasoning)
        .filter(|t| !t.is_empty())
    {
        content.push(ContentBlock::Thinking {
            thinking,
            signature: None,
        });
    }
    let text = match message.content {
        Some(Value::String(s)) => s,
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    };
    if !text.is_empty() {
        content.push(ContentBlock::text(text));
    }
    let refused = message.refusal.as_ref().is_some_and(|r| !r.is_empty());
    if let Some(refusal) = message.refusal.filter(|r| !r.is_empty()) {
        content.push(ContentBlock::text(refusal));
    }
    for (n, call) in message
        .tool_calls
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let function = call.function.unwrap_or(WireFunction {
            name: None,
            arguments: None,
        });
        let id = call
            .id
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| format!("call_{n}"));
        let name = function.name.filter(|n| !n.is_empty()).ok_or_else(|| {
            malformed(
                provider,
                rid,
                format!("tool call {id} has no function name"),
            )
        })?;
        let input = match function.arguments {
            Some(Value::String(text)) => tool_input(provider, rid, &id, &name, &text)?,
            None | Some(Value::Null) => Value::Object(Default::default()),
            Some(object) => object,
        };
        content.push(ContentBlock::ToolUse { id, name, input });
    }
    Ok(ModelResponse {
        content,
        stop_reason: stop_reason(choice.finish_reason.as_deref(), refused),
        usage: completion.usage.map(|u| u.to_usage()).unwrap_or_default(),
        call: CallInfo {
            model: completion.model.filter(|m| !m.is_empty()),
            request_id,
            stop: choice.finish_reason,
        },
    })
}

/// `stop` → end of turn, `tool_calls` (and the legacy `function_call`) → tool use, `length` →
/// max tokens, `content_filter` → refusal, anything else → other. A `refusal` in the message
/// makes it a refusal whatever the finish reason says.
pub(super) fn stop_reason(finish_reason: Option<&str>, refused: bool) -> StopReason {
    if refused {
        return StopReason::Refusal;
    }
    match finish_reason {
        Some("stop") => StopReason::EndTurn,
        Some("tool_calls" | "function_call") => StopReason::ToolUse,
        Some("length") => StopReason::MaxTokens,
        Some("content_filter") => StopReason::Refusal,
        _ => StopReason::Other,
    }
}

/// A complete call's arguments as JSON. Empty arguments (servers send `""` for a tool without
/// parameters) are `{}`; anything that does not parse is a malformed answer naming the call.
pub(super) fn tool_input(
    provider: &str,
    request_id: Option<&str>,
    id: &str,
    name: &str,
    arguments: &str,
) -> Result<Value> {
    if arguments.trim().is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    serde_json::from_str(arguments).map_err(|e| {
        let shown: String = arguments.chars().take(200).collect();
        malformed(
            provider,
            request_id,
            format!("tool call {id} ({name}) has arguments that are not JSON ({e}): {shown}"),
        )
    })
}

/// An `{"error": …}` object that arrived with a 200 (a chunk mid-stream, or a whole body).
///
/// Retryable unless it says the request itself is at fault (invalid, unauthorized, too long,
/// out of quota): such errors mid-stream are mostly the server failing (overload, a crashed
/// worker), which a new try may not meet.
pub(super) fn error_object(provider: &str, request_id: Option<&str>, json: &Value) -> Error {
    let (error_type, code, message) = error_fields(json);
    let fault = |s: &str| {
        let s = s.to_ascii_lowercase();
        [
            "invalid_request",
            "authentication",
            "permission",
            "not_found",
            "insufficient_quota",
            "billing",
            "context_length",
            "invalid_api_key",
        ]
        .iter()
        .any(|k| s.contains(k))
            || s.parse::<u16>()
                .is_ok_and(|n| (400..500).contains(&n) && !matches!(n, 408 | 409 | 429))
    };
    let retryable =
        !(error_type.as_deref().is_some_and(fault) || code.as_deref().is_some_and(fault));
    let mut e = stream_error(
        provider,
        request_id,
        error_type,
        message.unwrap_or_else(|| format!("the server sent an error without a message: {json}")),
        retryable,
    );
    e.code = code;
    Error::Provider(Box::new(e))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_full_response_with_reasoning_text_and_tools() {
        let body = json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "gpt-4o-2024-08-06",
            "choices": [{
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Let me look.",
                    "reasoning_content": "The user wants weather.",
                    "tool_calls": [{
                        "id": "call_a", "type": "function",
                        "function": { "name": "weather", "arguments": "{\"city\":\"Paris\"}" }
                    }, {
                        "id": "call_b", "type": "function",
                        "function": { "name": "clock", "arguments": "" }
                    }]
                },
                "finish_reason": "tool_calls",
                "logprobs": null
            }],
            "usage": {
                "prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
                "prompt_tokens_details": { "cached_tokens": 64 },
                "completion_tokens_details": { "reasoning_tokens": 5 }
            },
            "system_fingerprint": "fp_x"
        });
        let r = parse("openai", None, body.to_string().as_bytes()).unwrap();
        assert_eq!(
            r.content,
            vec![
                ContentBlock::Thinking {
                    thinking: "The user wants weather.".into(),
                    signature: None
                },
                ContentBlock::text("Let me look."),
                ContentBlock::ToolUse {
                    id: "call_a".into(),
                    name: "weather".into(),
                    input: json!({"city": "Paris"})
                },
                ContentBlock::ToolUse {
                    id: "call_b".into(),
                    name: "clock".into(),
                    input: json!({})
                },
            ]
        );
        assert_eq!(r.stop_reason, StopReason::ToolUse);
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 36,
                output_tokens: 20,
                cache_read_tokens: 64,
                cache_write_tokens: 0,
                reasoning_tokens: 5
            }
        );
        assert_eq!(r.call.model.as_deref(), Some("gpt-4o-2024-08-06"));
        assert_eq!(r.call.request_id.as_deref(), Some("chatcmpl-1"));
        assert_eq!(r.call.stop.as_deref(), Some("tool_calls"));
    }

    #[test]
    fn stop_reasons_map() {
        assert_eq!(stop_reason(Some("stop"), false), StopReason::EndTurn);
        assert_eq!(stop_reason(Some("tool_calls"), false), StopReason::ToolUse);
        assert_eq!(
            stop_reason(Some("function_call"), false),
            StopReason::ToolUse
        );
        assert_eq!(stop_reason(Some("length"), false), StopReason::MaxTokens);
        assert_eq!(
            stop_reason(Some("content_filter"), false),
            StopReason::Refusal
        );
        assert_eq!(stop_reason(Some("eos"), false), StopReason::Other);
        assert_eq!(stop_reason(None, false), StopReason::Other);
        assert_eq!(stop_reason(Some("stop"), true), StopReason::Refusal);
    }

    #[test]
    fn bad_tool_json_is_malformed_naming_the_call() {
        let body = json!({
            "choices": [{ "message": { "tool_calls": [{
                "id": "call_x", "function": { "name": "weather", "arguments": "{\"city\":" }
            }]}, "finish_reason": "tool_calls" }]
        });
        let e = parse("openai", Some("req_9".into()), body.to_string().as_bytes()).unwrap_err();
        let Error::Provider(p) = &e else {
            panic!("{e:?}")
        };
        assert_eq!(p.error_type.as_deref(), Some("malformed_response"));
        assert!(
            p.message.contains("call_x") && p.message.contains("weather"),
            "{e}"
        );
        assert_eq!(p.request_id.as_deref(), Some("req_9"));
        assert!(p.retryable);
    }

    #[test]
    fn an_error_body_with_200_is_an_error() {
        let body = json!({ "error": { "message": "model not loaded", "type": "server_error" } });
        let e = parse("llama.cpp", None, body.to_string().as_bytes()).unwrap_err();
        assert!(e.is_retryable());
        assert!(e.to_string().contains("model not loaded"));
        let body = json!({ "error": { "message": "too long", "type": "invalid_request_error", "code": 400 } });
        let e = parse("vllm", None, body.to_string().as_bytes()).unwrap_err();
        assert!(!e.is_retryable());
    }
}
