//! Reading Messages API answers: [`AnthropicParser`] for a stream's events (`stream`),
//! [`response`] for a whole (non-streaming) response (`whole`), and what the two share here:
//! usage, stop reasons, error types and tool inputs.

mod stream;
mod whole;

use normandy_core::{Result, StopReason, Usage};
use serde::Deserialize;
use serde_json::Value;

use super::PROVIDER;
use crate::error;

pub(crate) use stream::AnthropicParser;
pub(crate) use whole::response;

/// The `usage` object of `message_start`, `message_delta` and a whole response. Each field may
/// be absent or `null`.
#[derive(Debug, Default, Deserialize)]
struct WireUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

impl WireUsage {
    /// Overwrites the counts this object reports. `message_delta` counts are cumulative (they
    /// replace `message_start`'s, never add to them).
    fn apply(&self, usage: &mut Usage) {
        let set = |field: &mut u64, value: Option<u64>| {
            if let Some(v) = value {
                *field = v;
            }
        };
        // `input_tokens` already excludes the cached prompt, as `Usage` wants.
        set(&mut usage.input_tokens, self.input_tokens);
        set(&mut usage.output_tokens, self.output_tokens);
        set(
            &mut usage.cache_write_tokens,
            self.cache_creation_input_tokens,
        );
        set(&mut usage.cache_read_tokens, self.cache_read_input_tokens);
    }
}

/// Maps the API's `stop_reason`.
fn stop_reason(raw: Option<&str>) -> StopReason {
    match raw {
        Some("end_turn") => StopReason::EndTurn,
        Some("tool_use") => StopReason::ToolUse,
        Some("max_tokens") => StopReason::MaxTokens,
        Some("stop_sequence") => StopReason::StopSequence,
        Some("refusal") => StopReason::Refusal,
        Some("pause_turn") => StopReason::PauseTurn,
        _ => StopReason::Other,
    }
}

/// Whether an `error` event (or error body) of this type may pass on a retry: the types the
/// API answers with a retryable status (429, 500, 504, 529).
fn retryable_error_type(error_type: &str) -> bool {
    matches!(
        error_type,
        "overloaded_error" | "api_error" | "rate_limit_error" | "timeout_error"
    )
}

/// Parses a finished tool call's accumulated input. Empty means no input (`{}`); anything that
/// is not a JSON object is malformed, so a half-read call is never returned.
fn tool_input(json: &str, id: &str, name: &str, request_id: Option<&str>) -> Result<Value> {
    if json.trim().is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    match serde_json::from_str::<Value>(json) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(error::malformed(
            PROVIDER,
            request_id,
            format!("the input of tool call {id} ({name}) is not a JSON object"),
        )),
        Err(e) => Err(error::malformed(
            PROVIDER,
            request_id,
            format!("the input of tool call {id} ({name}) is not valid JSON: {e}"),
        )),
    }
}
