//! Reading Messages API answers: [`AnthropicParser`] for a stream's events, [`response`] for a
//! whole (non-streaming) response.

use normandy_core::{
    CallInfo, ContentBlock, Error, ModelDelta, ModelResponse, Result, StopReason, Usage,
};
use serde::Deserialize;
use serde_json::Value;

use super::PROVIDER;
use crate::driver::{Fed, StreamParser};
use crate::error;
use crate::sse::SseEvent;

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

// ---------------------------------------------------------------------------------------------
// Streaming

/// A stream event's data, by its `type`.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    MessageStart {
        message: StartMessage,
    },
    ContentBlockStart {
        index: u32,
        content_block: StartBlock,
    },
    ContentBlockDelta {
        index: u32,
        delta: Delta,
    },
    ContentBlockStop {
        index: u32,
    },
    MessageDelta {
        #[serde(default)]
        delta: MessageDelta,
        #[serde(default)]
        usage: Option<WireUsage>,
    },
    MessageStop,
    Ping,
    Error {
        error: WireError,
    },
    /// An event type added to the API after this adapter: ignored, as the API asks clients to.
    #[serde(other)]
    Unknown,
}

#[derive(Deserialize)]
struct StartMessage {
    id: Option<String>,
    model: Option<String>,
    #[serde(default)]
    usage: WireUsage,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StartBlock {
    Text {
        #[serde(default)]
        text: String,
    },
    Thinking {
        #[serde(default)]
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
    },
    #[serde(other)]
    Unknown,
}

/// A `content_block_delta`'s `delta`, by its `type` (`text_delta`, …).
#[derive(Deserialize)]
#[serde(tag = "type")]
enum Delta {
    #[serde(rename = "text_delta")]
    Text { text: String },
    #[serde(rename = "thinking_delta")]
    Thinking { thinking: String },
    #[serde(rename = "signature_delta")]
    Signature { signature: String },
    #[serde(rename = "input_json_delta")]
    InputJson { partial_json: String },
    /// A delta kind added after this adapter (`citations_delta`, …): ignored.
    #[serde(other)]
    Unknown,
}

#[derive(Default, Deserialize)]
struct MessageDelta {
    stop_reason: Option<String>,
    // `stop_sequence` (which sequence matched) has no place in `ModelResponse`: not read.
}

#[derive(Deserialize)]
struct WireError {
    #[serde(rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct FlatBlockDelta<'a> {
    index: u32,
    #[serde(borrow)]
    delta: FlatDelta<'a>,
}

#[derive(Deserialize)]
struct FlatDelta<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    text: Option<String>,
    thinking: Option<String>,
    signature: Option<String>,
    partial_json: Option<String>,
}

/// A content block being streamed.
#[derive(Debug)]
enum Slot {
    Text(String),
    Thinking {
        thinking: String,
        signature: String,
    },
    Redacted(String),
    ToolUse {
        id: String,
        name: String,
        /// The input's JSON text so far.
        json: String,
        /// The parsed input, once the block stopped.
        input: Option<Value>,
    },
    /// A block type this adapter does not know (a server tool's result, a future kind). Its
    /// events are skipped and it is left out of the response: the API adds block types for
    /// features a request turns on, and the rest of the answer is still good; failing the whole
    /// call would make a new kind of block an outage.
    Ignored,
}

/// One streamed response of the Messages API, read event by event.
#[derive(Debug)]
pub(crate) struct AnthropicParser {
    /// The `request-id` response header, if any.
    header_request_id: Option<String>,
    message_id: Option<String>,
    model: Option<String>,
    usage: Usage,
    stop: Option<String>,
    /// Blocks by the API's index, with whether each has stopped, in arrival order (which is
    /// index order).
    blocks: Vec<(u32, Slot, bool)>,
    done: bool,
}

impl AnthropicParser {
    /// A parser for one response; `request_id` is the `request-id` header.
    pub(crate) fn new(request_id: Option<String>) -> Self {
        Self {
            header_request_id: request_id,
            message_id: None,
            model: None,
            usage: Usage::default(),
            stop: None,
            blocks: Vec::new(),
            done: false,
        }
    }

    fn request_id(&self) -> Option<&str> {
        self.header_request_id
            .as_deref()
            .or(self.message_id.as_deref())
    }

    fn malformed(&self, what: String) -> Error {
        error::malformed(PROVIDER, self.request_id(), what)
    }

    /// The open block at `index`.
    fn open(&mut self, index: u32, event: &str) -> Result<&mut Slot> {
        let at = self.blocks.iter().position(|(i, _, _)| *i == index);
        match at {
            Some(at) if !self.blocks[at].2 => Ok(&mut self.blocks[at].1),
            Some(_) => Err(self.malformed(format!("{event} for block {index} after it stopped"))),
            None => Err(self.malformed(format!("{event} for block {index}, which never started"))),
        }
    }

    fn start(&mut self, index: u32, block: StartBlock) -> Result<Vec<ModelDelta>> {
        if self.blocks.iter().any(|(i, _, _)| *i == index) {
            return Err(self.malformed(format!("block {index} started twice")));
        }
        let mut deltas = Vec::new();
        let slot = match block {
            StartBlock::Text { text } => {
                if !text.is_empty() {
                    deltas.push(ModelDelta::Text {
                        index,
                        text: text.clone(),
                    });
                }
                Slot::Text(text)
            }
            StartBlock::Thinking {
                thinking,
                signature,
            } => {
                if !thinking.is_empty() {
                    deltas.push(ModelDelta::Thinking {
                        index,
                        text: thinking.clone(),
                    });
                }
                Slot::Thinking {
                    thinking,
                    signature: signature.unwrap_or_default(),
                }
            }
            StartBlock::RedactedThinking { data } => Slot::Redacted(data),
            StartBlock::ToolUse { id, name } => {
                deltas.push(ModelDelta::ToolUseStart {
                    index,
                    id: id.clone(),
                    name: name.clone(),
                });
                // The start event's `input` is always `{}`; the input arrives as deltas.
                Slot::ToolUse {
                    id,
                    name,
                    json: String::new(),
                    input: None,
                }
            }
            StartBlock::Unknown => Slot::Ignored,
        };
        self.blocks.push((index, slot, false));
        Ok(deltas)
    }

    fn delta(&mut self, index: u32, delta: Delta) -> Result<Vec<ModelDelta>> {
        let slot = self.open(index, "a delta")?;
        let out = match (slot, delta) {
            (Slot::Ignored, _) | (_, Delta::Unknown) => None,
            (Slot::Text(text), Delta::Text { text: more }) => {
                text.push_str(&more);
                Some(ModelDelta::Text { index, text: more })
            }
            (Slot::Thinking { thinking, .. }, Delta::Thinking { thinking: more }) => {
                thinking.push_str(&more);
                Some(ModelDelta::Thinking { index, text: more })
            }
            (Slot::Thinking { signature, .. }, Delta::Signature { signature: more }) => {
                signature.push_str(&more);
                None
            }
            (Slot::ToolUse { json, .. }, Delta::InputJson { partial_json }) => {
                json.push_str(&partial_json);
                Some(ModelDelta::ToolInput {
                    index,
                    partial_json,
                })
            }
            (slot, _) => {
                let what = format!("a delta that does not fit block {index} ({})", kind(slot));
                return Err(self.malformed(what));
            }
        };
        Ok(out.into_iter().collect())
    }

    fn stop_block(&mut self, index: u32) -> Result<()> {
        self.open(index, "content_block_stop")?;
        let request_id = self.request_id().map(str::to_owned);
        let entry = self
            .blocks
            .iter_mut()
            .find(|(i, _, _)| *i == index)
            .expect("open checked it");
        entry.2 = true;
        if let Slot::ToolUse {
            id,
            name,
            json,
            input,
        } = &mut entry.1
        {
            *input = Some(tool_input(json, id, name, request_id.as_deref())?);
        }
        Ok(())
    }

    /// The whole response, at `message_stop`.
    fn finish(&mut self) -> Result<ModelResponse> {
        let request_id = self.request_id().map(str::to_owned);
        let mut blocks = std::mem::take(&mut self.blocks);
        blocks.sort_by_key(|(i, _, _)| *i);
        let mut content = Vec::with_capacity(blocks.len());
        for (_, slot, _) in blocks {
            content.push(match slot {
                Slot::Text(text) => ContentBlock::Text { text },
                Slot::Thinking {
                    thinking,
                    signature,
                } => ContentBlock::Thinking {
                    thinking,
                    signature: Some(signature).filter(|s| !s.is_empty()),
                },
                Slot::Redacted(data) => ContentBlock::RedactedThinking { data },
                // A block the API never stopped is complete at `message_stop` all the same.
                Slot::ToolUse {
                    id,
                    name,
                    json,
                    input,
                } => {
                    let input = match input {
                        Some(input) => input,
                        None => tool_input(&json, &id, &name, request_id.as_deref())?,
                    };
                    ContentBlock::ToolUse { id, name, input }
                }
                Slot::Ignored => continue,
            });
        }
        Ok(ModelResponse {
            content,
            stop_reason: stop_reason(self.stop.as_deref()),
            usage: self.usage,
            call: CallInfo {
                model: self.model.take(),
                request_id,
                stop: self.stop.take(),
            },
        })
    }
}

/// A block's kind, for error messages.
fn kind(slot: &Slot) -> &'static str {
    match slot {
        Slot::Text(_) => "text",
        Slot::Thinking { .. } => "thinking",
        Slot::Redacted(_) => "redacted_thinking",
        Slot::ToolUse { .. } => "tool_use",
        Slot::Ignored => "unknown",
    }
}

/// SSE event names this parser reads; any other named event is skipped unread.
const KNOWN_EVENTS: &[&str] = &[
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
    "ping",
    "error",
];

impl StreamParser for AnthropicParser {
    fn feed(&mut self, sse: &SseEvent) -> Result<Fed> {
        let mut fed = Fed {
            deltas: Vec::new(),
            done: None,
        };
        if self.done {
            return Ok(fed);
        }
        // A named event this adapter does not know is skipped without reading its data, which
        // may not even be JSON; the API may add event types at any time.
        if let Some(name) = sse.event.as_deref()
            && !KNOWN_EVENTS.contains(&name)
        {
            return Ok(fed);
        }
        // Fast path: the SSE event name says the type; no tagged-enum buffering.
        match sse.event.as_deref() {
            Some("ping") => return Ok(fed),
            Some("content_block_delta") => {
                if let Ok(wire) = serde_json::from_str::<FlatBlockDelta<'_>>(&sse.data) {
                    let delta = match &*wire.delta.kind {
                        "text_delta" => wire.delta.text.map(|text| Delta::Text { text }),
                        "thinking_delta" => wire
                            .delta
                            .thinking
                            .map(|thinking| Delta::Thinking { thinking }),
                        "signature_delta" => wire
                            .delta
                            .signature
                            .map(|signature| Delta::Signature { signature }),
                        "input_json_delta" => wire
                            .delta
                            .partial_json
                            .map(|partial_json| Delta::InputJson { partial_json }),
                        _ => Some(Delta::Unknown),
                    };
                    if let Some(delta) = delta {
                        fed.deltas = self.delta(wire.index, delta)?;
                        return Ok(fed);
                    }
                }
            }
            _ => {}
        }
        let event: Event = serde_json::from_str(&sse.data).map_err(|e| {
            let name = sse.event.as_deref().unwrap_or("unnamed");
            self.malformed(format!("a {name} event that cannot be read: {e}"))
        })?;
        match event {
            Event::MessageStart { message } => {
                self.message_id = message.id;
                self.model = message.model;
                message.usage.apply(&mut self.usage);
            }
            Event::ContentBlockStart {
                index,
                content_block,
            } => fed.deltas = self.start(index, content_block)?,
            Event::ContentBlockDelta { index, delta } => fed.deltas = self.delta(index, delta)?,
            Event::ContentBlockStop { index } => self.stop_block(index)?,
            Event::MessageDelta { delta, usage } => {
                if delta.stop_reason.is_some() {
                    self.stop = delta.stop_reason;
                }
                if let Some(usage) = usage {
                    usage.apply(&mut self.usage);
                }
            }
            Event::MessageStop => {
                self.done = true;
                fed.done = Some(self.finish()?);
            }
            Event::Ping | Event::Unknown => {}
            Event::Error { error } => {
                let retryable = error.kind.as_deref().is_some_and(retryable_error_type);
                let message = if error.message.is_empty() {
                    "error event in the stream".to_owned()
                } else {
                    error.message
                };
                return Err(Error::Provider(Box::new(error::stream_error(
                    PROVIDER,
                    self.request_id(),
                    error.kind,
                    message,
                    retryable,
                ))));
            }
        }
        Ok(fed)
    }
}

// ---------------------------------------------------------------------------------------------
// Whole responses

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
    use serde_json::json;

    use super::*;

    /// Feeds `(event, data)` pairs; returns the deltas and the final response, if any.
    fn run(
        parser: &mut AnthropicParser,
        events: &[(&str, Value)],
    ) -> Result<(Vec<ModelDelta>, Option<ModelResponse>)> {
        let mut deltas = Vec::new();
        for (name, data) in events {
            let fed = parser.feed(&SseEvent {
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
            .feed(&SseEvent {
                event: Some("future".into()),
                data: "not json".into(),
            })
            .unwrap();
        assert!(fed.deltas.is_empty() && fed.done.is_none());
        // An unnamed event is dispatched on its `type`.
        let fed = p
            .feed(&SseEvent {
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
        let Err(err) = AnthropicParser::new(None).feed(&SseEvent {
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
