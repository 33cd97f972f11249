//! The stream parser: `chat.completion.chunk`s in, deltas and the whole response out.
//!
//! What real servers send, and what this handles:
//! - Text in `delta.content`; reasoning in `delta.reasoning_content` (llama.cpp, DeepSeek, older
//!   vLLM) or `delta.reasoning` (newer vLLM, Ollama): a `Thinking` block without signature.
//! - Tool calls in `delta.tool_calls[]`: the first piece of a call carries `id` and
//!   `function.name`, later ones only `function.arguments` fragments. `index` should say which
//!   call a piece belongs to, but servers omit it or send `0` for every call; so a piece with an
//!   `id` not seen yet opens a new call, one with a known `id` continues it, one without `id`
//!   goes by `index`, and one with neither continues the last call.
//! - `finish_reason` in a chunk before the usage chunk; the usage chunk with empty `choices`.
//! - `data: [DONE]` as the end marker: only then is the response whole. A `[DONE]` without a
//!   `finish_reason` before it is a malformed answer, not an empty one (older llama.cpp builds
//!   send a failure as an `error:` line, which SSE drops, then `[DONE]`).
//! - An `{"error": …}` chunk mid-stream: a stream error.
//!
//! Blocks are numbered in the order they open (a delta's `index`), thinking and text each a
//! block, and each tool call a block.

use normandy_core::{CallInfo, ContentBlock, ModelDelta, ModelResponse, Result, Usage};
use serde::Deserialize;
use serde_json::Value;

use super::response::{WireUsage, error_object, stop_reason, tool_input};
use crate::driver::StreamParser;
use crate::error::malformed;
use crate::sse::SseEvent;

/// A chunk, its `id` and `model` as `S`: `&str` borrowed from the event on the fast path, which
/// every chunk takes whose strings have no JSON escapes; `String` on the slow path, which reads
/// the rest. (`Cow<str>` would do both in one, but costs ~370 more instructions a chunk than a
/// `&str` under callgrind, a sixth of what the adapter added over a raw read.)
#[derive(Debug, Deserialize)]
struct Chunk<S> {
    id: Option<S>,
    model: Option<S>,
    error: Option<serde::de::IgnoredAny>,
    choices: Option<FirstChoice>,
    usage: Option<WireUsage>,
}

/// The first choice of index 0 (or without an index) of a chunk's `choices`, read without a
/// `Vec`: a chunk carries one choice, and `n > 1` is not a conversation. The other choices are
/// still read as choices, so a chunk that would not parse as a whole still fails.
#[derive(Debug)]
struct FirstChoice(Option<ChunkChoice>);

impl<'de> Deserialize<'de> for FirstChoice {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = FirstChoice;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a sequence")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<FirstChoice, A::Error> {
                let mut first = None;
                while let Some(choice) = seq.next_element::<ChunkChoice>()? {
                    if first.is_none() && choice.index.unwrap_or(0) == 0 {
                        first = Some(choice);
                    }
                }
                Ok(FirstChoice(first))
            }
        }
        deserializer.deserialize_seq(Visit)
    }
}

#[derive(Debug, Deserialize)]
struct ChunkChoice {
    index: Option<u64>,
    delta: Option<Delta>,
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Delta {
    content: Option<String>,
    reasoning_content: Option<String>,
    reasoning: Option<String>,
    refusal: Option<String>,
    tool_calls: Option<Vec<ToolDelta>>,
}

#[derive(Debug, Deserialize)]
struct ToolDelta {
    index: Option<u64>,
    id: Option<String>,
    function: Option<FunctionDelta>,
}

#[derive(Debug, Deserialize)]
struct FunctionDelta {
    name: Option<String>,
    arguments: Option<String>,
}

#[derive(Debug)]
enum Block {
    Thinking(String),
    Text(String),
    Tool(Call),
}

#[derive(Debug)]
struct Call {
    /// The `index` the server gave the call, if it gave one.
    wire_index: Option<u64>,
    /// The server's id; made up (`call_<block>`) when it sends none.
    id: Option<String>,
    name: String,
    arguments: String,
    /// Whether `ToolUseStart` was yielded (it waits for the name).
    started: bool,
}

/// The state of one streamed response.
pub(super) struct ChunkParser {
    provider: &'static str,
    /// From the `x-request-id` header; else the chunks' `id`.
    header_request_id: Option<String>,
    response_id: Option<String>,
    model: Option<String>,
    blocks: Vec<Block>,
    finish_reason: Option<String>,
    refused: bool,
    usage: Usage,
}

impl ChunkParser {
    pub(super) fn new(provider: &'static str, header_request_id: Option<String>) -> Self {
        Self {
            provider,
            header_request_id,
            response_id: None,
            model: None,
            blocks: Vec::new(),
            finish_reason: None,
            refused: false,
            usage: Usage::default(),
        }
    }

    fn request_id(&self) -> Option<&str> {
        self.header_request_id
            .as_deref()
            .or(self.response_id.as_deref())
    }

    fn chunk<S: AsRef<str>>(
        &mut self,
        chunk: Chunk<S>,
        deltas: &mut Vec<ModelDelta>,
    ) -> Result<()> {
        // Borrowed from the chunk, copied only the first time (or when the model changes):
        // every chunk repeats them.
        if let Some(id) = chunk
            .id
            .as_ref()
            .map(AsRef::as_ref)
            .filter(|s| !s.is_empty())
            && self.response_id.is_none()
        {
            self.response_id = Some(id.to_owned());
        }
        if let Some(model) = chunk
            .model
            .as_ref()
            .map(AsRef::as_ref)
            .filter(|s| !s.is_empty())
            && self.model.as_deref() != Some(model)
        {
            self.model = Some(model.to_owned());
        }
        if let Some(usage) = chunk.usage {
            self.usage = usage.to_usage();
        }
        // Only the first choice: `n > 1` is not a conversation.
        let Some(choice) = chunk.choices.and_then(|c| c.0) else {
            return Ok(());
        };
        if let Some(reason) = choice.finish_reason.filter(|s| !s.is_empty()) {
            self.finish_reason = Some(reason);
        }
        let Some(delta) = choice.delta else {
            return Ok(());
        };
        // Both names at once (vLLM in transition sends both): the same text twice; take one.
        if let Some(text) = delta.reasoning_content.or(delta.reasoning) {
            self.text(true, text, deltas);
        }
        if let Some(text) = delta.content {
            self.text(false, text, deltas);
        }
        if let Some(text) = delta.refusal.filter(|s| !s.is_empty()) {
            self.refused = true;
            self.text(false, text, deltas);
        }
        for piece in delta.tool_calls.unwrap_or_default() {
            self.tool_piece(piece, deltas)?;
        }
        Ok(())
    }

    /// Appends text to the last block if it is of the same kind, else opens a block.
    fn text(&mut self, thinking: bool, text: String, deltas: &mut Vec<ModelDelta>) {
        if text.is_empty() {
            return;
        }
        let index = match self.blocks.last_mut() {
            Some(Block::Thinking(t)) if thinking => {
                t.push_str(&text);
                self.blocks.len() - 1
            }
            Some(Block::Text(t)) if !thinking => {
                t.push_str(&text);
                self.blocks.len() - 1
            }
            _ => {
                self.blocks.push(if thinking {
                    Block::Thinking(text.clone())
                } else {
                    Block::Text(text.clone())
                });
                self.blocks.len() - 1
            }
        };
        let index = index as u32;
        deltas.push(if thinking {
            ModelDelta::Thinking { index, text }
        } else {
            ModelDelta::Text { index, text }
        });
    }

    /// The block a tool-call piece belongs to (see the module doc), opening one if it starts a
    /// call.
    fn call_for(&mut self, piece: &ToolDelta, name: Option<&str>) -> Option<usize> {
        let calls = || {
            self.blocks
                .iter()
                .enumerate()
                .rev()
                .filter_map(|(i, b)| match b {
                    Block::Tool(c) => Some((i, c)),
                    _ => None,
                })
        };
        let id = piece.id.as_deref().filter(|s| !s.is_empty());
        let found = match (id, piece.index) {
            // A known id continues its call, unless the index says it is another one.
            (Some(id), index) => calls()
                .find(|(_, c)| {
                    c.id.as_deref() == Some(id)
                        && (index.is_none() || c.wire_index.is_none() || c.wire_index == index)
                })
                .map(|(i, _)| i),
            (None, Some(index)) => calls()
                .find(|(_, c)| c.wire_index == Some(index))
                .map(|(i, _)| i)
                // An unknown index without a name: a server numbering oddly; the last call.
                .or_else(|| {
                    if name.is_some() {
                        None
                    } else {
                        calls().next().map(|(i, _)| i)
                    }
                }),
            (None, None) => match calls().next() {
                // A name differing from the last call's starts a call (servers without ids).
                Some((_, c)) if name.is_some_and(|n| !c.name.is_empty() && c.name != n) => None,
                last => last.map(|(i, _)| i),
            },
        };
        if found.is_some() {
            return found;
        }
        if id.is_none() && name.is_none() {
            // Arguments for no call at all: nothing to attach them to.
            return None;
        }
        self.blocks.push(Block::Tool(Call {
            wire_index: piece.index,
            id: id.map(str::to_owned),
            name: String::new(),
            arguments: String::new(),
            started: false,
        }));
        Some(self.blocks.len() - 1)
    }

    fn tool_piece(&mut self, piece: ToolDelta, deltas: &mut Vec<ModelDelta>) -> Result<()> {
        let (name, arguments) = match &piece.function {
            Some(f) => (
                f.name.as_deref().filter(|s| !s.is_empty()),
                f.arguments.as_deref().unwrap_or(""),
            ),
            None => (None, ""),
        };
        let Some(at) = self.call_for(&piece, name) else {
            if arguments.is_empty() {
                return Ok(());
            }
            return Err(malformed(
                self.provider,
                self.request_id(),
                "a tool-call fragment arrived before any tool call began".to_owned(),
            ));
        };
        let Block::Tool(call) = &mut self.blocks[at] else {
            unreachable!("call_for returns tool blocks only");
        };
        if call.name.is_empty()
            && let Some(name) = name
        {
            call.name = name.to_owned();
        }
        call.arguments.push_str(arguments);
        let index = at as u32;
        if !call.started {
            if call.name.is_empty() {
                return Ok(());
            }
            call.started = true;
            let id = call.id.get_or_insert_with(|| format!("call_{at}")).clone();
            deltas.push(ModelDelta::ToolUseStart {
                index,
                id,
                name: call.name.clone(),
            });
            // What arrived before the name, if anything, with this piece's own.
            if !call.arguments.is_empty() {
                deltas.push(ModelDelta::ToolInput {
                    index,
                    partial_json: call.arguments.clone(),
                });
            }
        } else if !arguments.is_empty() {
            deltas.push(ModelDelta::ToolInput {
                index,
                partial_json: arguments.to_owned(),
            });
        }
        Ok(())
    }

    /// The whole response, at `[DONE]`.
    fn finish(&mut self) -> Result<ModelResponse> {
        let request_id = self.request_id().map(str::to_owned);
        if self.finish_reason.is_none() {
            // Every server sends one before `[DONE]` when the generation ended well. Older
            // llama.cpp builds report a failure as an `error: {…}` line, which SSE ignores,
            // then `[DONE]`: without this check that would pass as an empty answer.
            return Err(malformed(
                self.provider,
                request_id.as_deref(),
                "the stream ended ([DONE]) without a finish reason: the server may have failed \
                 mid-answer (check its log)"
                    .to_owned(),
            ));
        }
        let mut content = Vec::with_capacity(self.blocks.len());
        for block in std::mem::take(&mut self.blocks) {
            content.push(match block {
                Block::Thinking(thinking) => ContentBlock::Thinking {
                    thinking,
                    signature: None,
                },
                Block::Text(text) => ContentBlock::Text { text },
                Block::Tool(call) => {
                    let id = call.id.unwrap_or_default();
                    if call.name.is_empty() {
                        return Err(malformed(
                            self.provider,
                            request_id.as_deref(),
                            format!("tool call {id:?} never got a function name"),
                        ));
                    }
                    let input = tool_input(
                        self.provider,
                        request_id.as_deref(),
                        &id,
                        &call.name,
                        &call.arguments,
                    )?;
                    ContentBlock::ToolUse {
                        id,
                        name: call.name,
                        input,
                    }
                }
            });
        }
        Ok(ModelResponse {
            content,
            stop_reason: stop_reason(self.finish_reason.as_deref(), self.refused),
            usage: self.usage,
            call: CallInfo {
                model: self.model.take(),
                request_id,
                stop: self.finish_reason.take(),
            },
        })
    }
}

impl StreamParser for ChunkParser {
    fn feed(
        &mut self,
        event: &SseEvent,
        deltas: &mut Vec<ModelDelta>,
    ) -> Result<Option<ModelResponse>> {
        let data = event.data.trim();
        if data == "[DONE]" {
            return self.finish().map(Some);
        }
        if data.is_empty() {
            return Ok(None);
        }
        // Fast path: straight into the struct; the Value path below only for errors.
        if let Ok(chunk) = serde_json::from_str::<Chunk<&str>>(data)
            && chunk.error.is_none()
        {
            self.chunk(chunk, deltas)?;
            return Ok(None);
        }
        let json: Value = match serde_json::from_str(data) {
            Ok(json) => json,
            // `event: error` with a text payload (some proxies).
            Err(_) if event.event.as_deref() == Some("error") => {
                return Err(error_object(
                    self.provider,
                    self.request_id(),
                    &serde_json::json!({ "error": data }),
                ));
            }
            Err(e) => {
                let shown: String = data.chars().take(200).collect();
                return Err(malformed(
                    self.provider,
                    self.request_id(),
                    format!("a stream chunk is not JSON ({e}): {shown}"),
                ));
            }
        };
        if json.get("error").is_some_and(|e| !e.is_null()) {
            return Err(error_object(self.provider, self.request_id(), &json));
        }
        let chunk: Chunk<String> = serde_json::from_str(data).map_err(|e| {
            malformed(
                self.provider,
                self.request_id(),
                format!("a stream chunk has an unexpected shape: {e}"),
            )
        })?;
        self.chunk(chunk, deltas)?;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
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
                data: json!({ "error": { "message": "The server had an error", "type": "server_error" } }).to_string(),
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
}
