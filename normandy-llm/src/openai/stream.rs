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
//!
//! # Layout
//! - `chunk`: reading one chunk's JSON (hand-written visitors: the hot path of a stream).
//! - `tests`: the parser's cases, one chunk sequence each.

mod chunk;

use normandy_core::{CallInfo, ContentBlock, ModelDelta, ModelResponse, Result, Usage};
use serde_json::Value;

use self::chunk::{Chunk, ToolDelta};
use super::response::{error_object, stop_reason, tool_input};
use crate::driver::StreamParser;
use crate::error::malformed;
use crate::sse::SseEvent;

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

    /// Takes what `chunk` carries (by reference: it is a few hundred bytes, and this runs for
    /// every event).
    fn chunk(&mut self, chunk: &mut Chunk<'_>, deltas: &mut Vec<ModelDelta>) -> Result<()> {
        // Borrowed from the event, copied only the first time (or when the model changes):
        // every chunk repeats them.
        if let Some(id) = chunk.id.as_deref().filter(|s| !s.is_empty())
            && self.response_id.is_none()
        {
            self.response_id = Some(id.to_owned());
        }
        if let Some(model) = chunk.model.as_deref().filter(|s| !s.is_empty())
            && self.model.as_deref() != Some(model)
        {
            self.model = Some(model.to_owned());
        }
        if let Some(usage) = &chunk.usage {
            self.usage = usage.to_usage();
        }
        // Only the first choice (`n > 1` is not a conversation); all `None` without one.
        let choice = &mut chunk.choice;
        if let Some(reason) = choice.finish_reason.take().filter(|s| !s.is_empty()) {
            self.finish_reason = Some(reason);
        }
        // Both names at once (vLLM in transition sends both): the same text twice; take one.
        if let Some(text) = choice.reasoning_content.take().or(choice.reasoning.take()) {
            self.text(true, text, deltas);
        }
        if let Some(text) = choice.content.take() {
            self.text(false, text, deltas);
        }
        if let Some(text) = choice.refusal.take().filter(|s| !s.is_empty()) {
            self.refused = true;
            self.text(false, text, deltas);
        }
        for piece in choice.tool_calls.take().unwrap_or_default() {
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
        // Every chunk but an error report is read in one pass; the `Value` below is only for
        // errors.
        let mut chunk = Chunk::default();
        let read = chunk.read(data, self.response_id.is_none());
        if read.is_ok() && !chunk.error {
            self.chunk(&mut chunk, deltas)?;
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
        match read {
            Err(e) => Err(malformed(
                self.provider,
                self.request_id(),
                format!("a stream chunk has an unexpected shape: {e}"),
            )),
            // Not reached: a chunk read whole whose `error` is not null has one in `json` too.
            Ok(()) => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests;
