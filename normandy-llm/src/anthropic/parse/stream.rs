//! The stream parser: a Messages API stream's events in, deltas and the whole response out.
//!
//! # Layout
//! - `block_delta`: the fast path's reading of `content_block_delta` (hand-written visitors).
//! - `tests`: the parser's cases, one event sequence each.

mod block_delta;

use normandy_core::{CallInfo, ContentBlock, Error, ModelDelta, ModelResponse, Result, Usage};
use serde::Deserialize;
use serde_json::Value;

use self::block_delta::BlockDelta;
use super::{PROVIDER, WireUsage, retryable_error_type, stop_reason, tool_input};
use crate::driver::StreamParser;
use crate::error;
use crate::sse::SseEvent;

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

    fn start(&mut self, index: u32, block: StartBlock, deltas: &mut Vec<ModelDelta>) -> Result<()> {
        if self.blocks.iter().any(|(i, _, _)| *i == index) {
            return Err(self.malformed(format!("block {index} started twice")));
        }
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
        Ok(())
    }

    fn delta(&mut self, index: u32, delta: Delta, deltas: &mut Vec<ModelDelta>) -> Result<()> {
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
        deltas.extend(out);
        Ok(())
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
    fn feed(
        &mut self,
        sse: &SseEvent,
        deltas: &mut Vec<ModelDelta>,
    ) -> Result<Option<ModelResponse>> {
        if self.done {
            return Ok(None);
        }
        // Fast path: the SSE event name says the type; no tagged-enum buffering. The most
        // frequent name is matched first.
        match sse.event.as_deref() {
            Some("content_block_delta") => {
                let mut wire = BlockDelta::default();
                if wire.read(&sse.data).is_ok()
                    && let (Some(index), Some(kind)) = (wire.index, wire.kind)
                {
                    let delta = match kind {
                        "text_delta" => wire.text.map(|text| Delta::Text { text }),
                        "thinking_delta" => {
                            wire.thinking.map(|thinking| Delta::Thinking { thinking })
                        }
                        "signature_delta" => wire
                            .signature
                            .map(|signature| Delta::Signature { signature }),
                        "input_json_delta" => wire
                            .partial_json
                            .map(|partial_json| Delta::InputJson { partial_json }),
                        _ => Some(Delta::Unknown),
                    };
                    if let Some(delta) = delta {
                        self.delta(index, delta, deltas)?;
                        return Ok(None);
                    }
                }
            }
            Some("ping") => return Ok(None),
            // A named event this adapter does not know is skipped without reading its data,
            // which may not even be JSON; the API may add event types at any time.
            Some(name) if !KNOWN_EVENTS.contains(&name) => return Ok(None),
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
            } => self.start(index, content_block, deltas)?,
            Event::ContentBlockDelta { index, delta } => self.delta(index, delta, deltas)?,
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
                return self.finish().map(Some);
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
        Ok(None)
    }
}

#[cfg(test)]
mod tests;
