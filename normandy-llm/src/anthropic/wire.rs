//! The Messages API request body: what a [`ModelRequest`] becomes on the wire.
//!
//! Pure (no I/O): the client serializes the body once per call and re-sends the same bytes on
//! every retry.

use normandy_core::{ContentBlock, Error, MediaSource, ModelRequest, Result, Role};
use serde_json::{Map, Value, json};

/// `max_tokens` when the template sets none: the Messages API refuses a request without it.
pub(crate) const DEFAULT_MAX_TOKENS: u64 = 4096;

/// The beta a `{"type": "file", "file_id": …}` source needs (the Files API); added to the
/// request's `anthropic-beta` header when the conversation uses one.
pub(crate) const FILES_BETA: &str = "files-api-2025-04-14";

/// Top-level keys the adapter owns: a template parameter of the same name is ignored rather
/// than allowed to replace the conversation, or to turn a non-streaming call into a stream.
const RESERVED: &[&str] = &["model", "messages", "system", "tools", "stream"];

/// A request body and what it needs from the transport.
#[derive(Debug)]
pub(crate) struct Body {
    /// The JSON body.
    pub(crate) json: Value,
    /// Whether a media source refers to an uploaded file (so [`FILES_BETA`] must be sent).
    pub(crate) uses_files: bool,
}

/// Builds the Messages API body for `request`.
///
/// With `caching`, up to three prompt-cache breakpoints mark the request's stable prefix (the
/// API allows four per request): the last tool definition, the system prompt, and the last
/// content block of the last message. The API caches everything up to a breakpoint, and on the
/// next call looks back from each breakpoint for an earlier cached prefix, so marking the end of
/// the conversation every call makes each call read what the previous one wrote.
pub(crate) fn request_body(request: &ModelRequest, caching: bool, stream: bool) -> Result<Body> {
    let mut ctx = Ctx::default();
    let mut body = Map::new();
    body.insert("model".into(), Value::String(request.model.clone()));

    for (key, value) in request.params.iter() {
        match key.as_str() {
            k if RESERVED.contains(&k) => {}
            // The portable name of the stop list; the API calls it `stop_sequences` and wants
            // an array.
            "stop" => {
                let list = match value {
                    Value::String(s) => json!([s]),
                    other => other.clone(),
                };
                body.insert("stop_sequences".into(), list);
            }
            // Everything else (`max_tokens`, `temperature`, `top_p`, `stop_sequences`,
            // `thinking`, `tool_choice`, `metadata`, and keys this adapter has never heard of)
            // goes through as is.
            _ => {
                body.insert(key.clone(), value.clone());
            }
        }
    }
    if body.get("max_tokens").is_none_or(Value::is_null) {
        body.insert("max_tokens".into(), json!(DEFAULT_MAX_TOKENS));
    }

    if let Some(system) = request.system.as_deref().filter(|s| !s.is_empty()) {
        let system = if caching {
            // The cache marker needs the block form of `system`.
            let mut block = json!({"type": "text", "text": system});
            mark(&mut block);
            json!([block])
        } else {
            Value::String(system.to_owned())
        };
        body.insert("system".into(), system);
    }

    let mut messages = messages(request, &mut ctx)?;
    if caching
        && let Some(Value::Array(blocks)) = messages
            .last_mut()
            .and_then(|m| m.get_mut("content"))
        // Thinking blocks cannot carry a marker: the breakpoint goes on the last block that can.
        && let Some(block) = blocks
            .iter_mut()
            .rev()
            .find(|b| !matches!(b["type"].as_str(), Some("thinking" | "redacted_thinking")))
    {
        mark(block);
    }
    body.insert("messages".into(), Value::Array(messages));

    if !request.tools.is_empty() {
        let mut tools: Vec<Value> = request
            .tools
            .iter()
            .map(|t| {
                json!({
                    "name": t.name,
                    "description": t.description,
                    "input_schema": t.input_schema,
                })
            })
            .collect();
        if caching && let Some(last) = tools.last_mut() {
            mark(last);
        }
        body.insert("tools".into(), Value::Array(tools));
    }

    if stream {
        body.insert("stream".into(), Value::Bool(true));
    }
    Ok(Body {
        json: Value::Object(body),
        uses_files: ctx.uses_files,
    })
}

/// What converting the conversation learned on the way.
#[derive(Default)]
struct Ctx {
    uses_files: bool,
}

/// Puts a prompt-cache breakpoint on a block.
fn mark(block: &mut Value) {
    if let Value::Object(map) = block {
        map.insert("cache_control".into(), json!({"type": "ephemeral"}));
    }
}

/// The conversation as API messages. The API wants user and assistant turns to alternate, so
/// consecutive messages of one role are merged into one; a message left with no content (the
/// API refuses empty content) is dropped before merging.
fn messages(request: &ModelRequest, ctx: &mut Ctx) -> Result<Vec<Value>> {
    let mut merged: Vec<(Role, Vec<Value>)> = Vec::new();
    for message in request.messages.iter() {
        let mut blocks = Vec::with_capacity(message.content.len());
        for block in &message.content {
            if let Some(b) = block_json(block, ctx)? {
                blocks.push(b);
            }
        }
        if blocks.is_empty() {
            continue;
        }
        match merged.last_mut() {
            Some((role, prior)) if *role == message.role => prior.extend(blocks),
            _ => merged.push((message.role, blocks)),
        }
    }
    Ok(merged
        .into_iter()
        .map(|(role, mut content)| {
            if role == Role::User {
                // The API wants a user message's tool results before any other block; merging
                // a text message with the results that follow it could break that order.
                content.sort_by_key(|b| b["type"] != "tool_result");
            }
            let role = match role {
                Role::User => "user",
                Role::Assistant => "assistant",
            };
            json!({"role": role, "content": content})
        })
        .collect())
}

/// One content block as the API takes it; `None` for a block it must not be sent.
fn block_json(block: &ContentBlock, ctx: &mut Ctx) -> Result<Option<Value>> {
    Ok(Some(match block {
        // The API refuses empty text blocks (a response may end with one).
        ContentBlock::Text { text } if text.is_empty() => return Ok(None),
        ContentBlock::Text { text } => json!({"type": "text", "text": text}),
        ContentBlock::ToolUse { id, name, input } => {
            json!({"type": "tool_use", "id": id, "name": name, "input": input})
        }
        ContentBlock::ToolResult {
            tool_use_id,
            content,
            is_error,
            // The API has no slot for a machine-readable result; `content` carries the text.
            structured: _,
            blocks,
        } => {
            let mut parts = Vec::with_capacity(1 + blocks.len());
            if !content.is_empty() {
                parts.push(json!({"type": "text", "text": content}));
            }
            for b in blocks {
                // A tool result holds text, images and documents only.
                if matches!(
                    b,
                    ContentBlock::Text { .. }
                        | ContentBlock::Image { .. }
                        | ContentBlock::Document { .. }
                ) && let Some(part) = block_json(b, ctx)?
                {
                    parts.push(part);
                }
            }
            let mut result = json!({"type": "tool_result", "tool_use_id": tool_use_id});
            if !parts.is_empty() {
                result["content"] = Value::Array(parts);
            }
            if *is_error {
                result["is_error"] = Value::Bool(true);
            }
            result
        }
        // Sent back exactly as received: the API checks the signature and refuses a tool-use
        // loop whose earlier thinking was edited or dropped. A block without a signature did
        // not come from this API (the API would refuse it), so it is left out.
        ContentBlock::Thinking {
            thinking,
            signature: Some(signature),
        } => json!({"type": "thinking", "thinking": thinking, "signature": signature}),
        ContentBlock::Thinking {
            signature: None, ..
        } => return Ok(None),
        ContentBlock::RedactedThinking { data } => {
            json!({"type": "redacted_thinking", "data": data})
        }
        ContentBlock::Image { media_type, source } => {
            json!({"type": "image", "source": source_json(media_type, source, false, ctx)?})
        }
        ContentBlock::Document {
            media_type,
            source,
            title,
        } => {
            let mut doc =
                json!({"type": "document", "source": source_json(media_type, source, true, ctx)?});
            if let Some(title) = title {
                doc["title"] = Value::String(title.clone());
            }
            doc
        }
        // A block kind added to core after this adapter: sending it in a form the API does not
        // know would fail the whole call.
        _ => return Ok(None),
    }))
}

/// An image's or a document's `source`.
fn source_json(
    media_type: &str,
    source: &MediaSource,
    document: bool,
    ctx: &mut Ctx,
) -> Result<Value> {
    Ok(match source {
        // A plain-text document travels as text: the API's base64 document source takes PDFs.
        MediaSource::Base64 { .. } if document && media_type.starts_with("text/") => {
            let bytes = source.bytes().transpose()?.unwrap_or_default();
            let text = String::from_utf8(bytes).map_err(|_| {
                Error::invalid_input(
                    None,
                    format!("a {media_type} document is not valid UTF-8 text"),
                )
            })?;
            json!({"type": "text", "media_type": "text/plain", "data": text})
        }
        MediaSource::Base64 { data } => {
            json!({"type": "base64", "media_type": media_type, "data": data})
        }
        MediaSource::Url { url } => json!({"type": "url", "url": url}),
        MediaSource::File { file_id } => {
            ctx.uses_files = true;
            json!({"type": "file", "file_id": file_id})
        }
        // A source kind added to core after this adapter.
        _ => {
            return Err(Error::invalid_input(
                None,
                "the anthropic adapter cannot send this kind of media source",
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use normandy_core::{Message, SessionId, ToolSpec};

    use super::*;

    fn request(messages: Vec<Message>) -> ModelRequest {
        ModelRequest {
            session: SessionId::new("s-1").unwrap(),
            model: "claude-test".into(),
            system: Some("be brief".into()),
            messages: Arc::new(messages),
            tools: Arc::from(vec![
                ToolSpec {
                    name: "search".into(),
                    description: "searches".into(),
                    input_schema: json!({"type": "object"}),
                },
                ToolSpec {
                    name: "fetch".into(),
                    description: "fetches".into(),
                    input_schema: json!({"type": "object", "properties": {"url": {"type": "string"}}}),
                },
            ]),
            params: Arc::new(BTreeMap::new()),
        }
    }

    fn with_params(mut r: ModelRequest, params: Value) -> ModelRequest {
        let Value::Object(map) = params else { panic!() };
        r.params = Arc::new(map.into_iter().collect());
        r
    }

    fn msg(role: Role, content: Vec<ContentBlock>) -> Message {
        Message { role, content }
    }

    const EPHEMERAL: &str = r#"{"type":"ephemeral"}"#;

    #[test]
    fn caching_marks_last_tool_system_and_last_block() {
        let r = request(vec![
            Message::user("hi"),
            Message::assistant("hello"),
            msg(
                Role::User,
                vec![ContentBlock::text("one"), ContentBlock::text("two")],
            ),
        ]);
        let body = request_body(&r, true, false).unwrap().json;
        let marker: Value = serde_json::from_str(EPHEMERAL).unwrap();
        assert_eq!(body["tools"][1]["cache_control"], marker);
        assert!(body["tools"][0].get("cache_control").is_none());
        assert_eq!(
            body["system"],
            json!([{"type": "text", "text": "be brief", "cache_control": marker}])
        );
        let messages = body["messages"].as_array().unwrap();
        assert_eq!(messages[2]["content"][1]["cache_control"], marker);
        assert!(messages[2]["content"][0].get("cache_control").is_none());
        assert!(messages[0]["content"][0].get("cache_control").is_none());
        // Three breakpoints in all: never more than the API's four.
        assert_eq!(body.to_string().matches("cache_control").count(), 3);
    }

    #[test]
    fn without_caching_there_are_no_markers_and_system_is_a_string() {
        let r = request(vec![Message::user("hi")]);
        let body = request_body(&r, false, true).unwrap().json;
        assert!(!body.to_string().contains("cache_control"));
        assert_eq!(body["system"], "be brief");
        assert_eq!(body["stream"], true);
        assert_eq!(body["max_tokens"], 4096);
        assert_eq!(body["model"], "claude-test");
        assert_eq!(
            body["messages"],
            json!([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
        );
    }

    #[test]
    fn the_marker_skips_a_trailing_thinking_block() {
        let r = request(vec![
            Message::user("hi"),
            msg(
                Role::Assistant,
                vec![
                    ContentBlock::text("partial"),
                    ContentBlock::Thinking {
                        thinking: "hm".into(),
                        signature: Some("sig".into()),
                    },
                ],
            ),
        ]);
        let body = request_body(&r, true, false).unwrap().json;
        let last = &body["messages"][1]["content"];
        assert!(last[0].get("cache_control").is_some());
        assert!(last[1].get("cache_control").is_none());
    }

    #[test]
    fn params_pass_through_with_stop_renamed_and_reserved_keys_ignored() {
        let r = with_params(
            request(vec![Message::user("hi")]),
            json!({
                "max_tokens": 100,
                "temperature": 0.5,
                "top_p": 0.9,
                "stop": "END",
                "thinking": {"type": "enabled", "budget_tokens": 2048},
                "tool_choice": {"type": "auto"},
                "some_future_knob": [1, 2],
                "stream": true,
                "model": "other",
            }),
        );
        let body = request_body(&r, false, false).unwrap().json;
        assert_eq!(body["max_tokens"], 100);
        assert_eq!(body["temperature"], 0.5);
        assert_eq!(body["top_p"], 0.9);
        assert_eq!(body["stop_sequences"], json!(["END"]));
        assert!(body.get("stop").is_none());
        assert_eq!(body["thinking"]["budget_tokens"], 2048);
        assert_eq!(body["tool_choice"], json!({"type": "auto"}));
        assert_eq!(body["some_future_knob"], json!([1, 2]));
        assert!(body.get("stream").is_none());
        assert_eq!(body["model"], "claude-test");
    }

    #[test]
    fn consecutive_same_role_messages_merge_with_tool_results_first() {
        let r = request(vec![
            Message::user("first"),
            Message::user("second"),
            msg(
                Role::Assistant,
                vec![ContentBlock::ToolUse {
                    id: "t1".into(),
                    name: "search".into(),
                    input: json!({"q": "x"}),
                }],
            ),
            Message::user("by the way"),
            msg(
                Role::User,
                vec![ContentBlock::tool_result("t1", "found", false)],
            ),
            msg(Role::Assistant, vec![ContentBlock::text("")]),
            Message::user("third"),
        ]);
        let body = request_body(&r, false, false).unwrap().json;
        let messages = body["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 3, "{body:#}");
        assert_eq!(messages[0]["role"], "user");
        assert_eq!(messages[0]["content"].as_array().unwrap().len(), 2);
        assert_eq!(messages[1]["role"], "assistant");
        assert_eq!(
            messages[1]["content"][0],
            json!({"type": "tool_use", "id": "t1", "name": "search", "input": {"q": "x"}})
        );
        let types: Vec<&str> = messages[2]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["tool_result", "text", "text"]);
    }

    #[test]
    fn tool_results_carry_is_error_and_media_blocks() {
        let r = request(vec![msg(
            Role::User,
            vec![
                ContentBlock::ToolResult {
                    tool_use_id: "t1".into(),
                    content: "screenshot attached".into(),
                    is_error: false,
                    structured: Some(json!({"ok": true})),
                    blocks: vec![
                        ContentBlock::image_bytes("image/png", b"\x89PNG").unwrap(),
                        ContentBlock::Document {
                            media_type: "application/pdf".into(),
                            source: MediaSource::Url {
                                url: "https://example.com/a.pdf".into(),
                            },
                            title: Some("A".into()),
                        },
                    ],
                },
                ContentBlock::tool_result("t2", "boom", true),
            ],
        )]);
        let body = request_body(&r, false, false).unwrap().json;
        let content = &body["messages"][0]["content"];
        assert_eq!(
            content[0],
            json!({
                "type": "tool_result",
                "tool_use_id": "t1",
                "content": [
                    {"type": "text", "text": "screenshot attached"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw=="}},
                    {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}, "title": "A"},
                ],
            })
        );
        assert_eq!(
            content[1],
            json!({
                "type": "tool_result",
                "tool_use_id": "t2",
                "content": [{"type": "text", "text": "boom"}],
                "is_error": true,
            })
        );
    }

    #[test]
    fn thinking_is_sent_back_unchanged_and_unsigned_thinking_is_dropped() {
        let r = request(vec![
            Message::user("q"),
            msg(
                Role::Assistant,
                vec![
                    ContentBlock::Thinking {
                        thinking: "let me see\n".into(),
                        signature: Some("EqQBCgIYAhIM==".into()),
                    },
                    ContentBlock::RedactedThinking {
                        data: "EmwKAhgBEgy3va==".into(),
                    },
                    ContentBlock::Thinking {
                        thinking: "from another provider".into(),
                        signature: None,
                    },
                    ContentBlock::text("answer"),
                ],
            ),
        ]);
        let body = request_body(&r, false, false).unwrap().json;
        assert_eq!(
            body["messages"][1]["content"],
            json!([
                {"type": "thinking", "thinking": "let me see\n", "signature": "EqQBCgIYAhIM=="},
                {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va=="},
                {"type": "text", "text": "answer"},
            ])
        );
    }

    #[test]
    fn media_sources_map_to_base64_url_file_and_text() {
        let r = request(vec![msg(
            Role::User,
            vec![
                ContentBlock::image_url("image/jpeg", "https://example.com/cat.jpg"),
                ContentBlock::Image {
                    media_type: "image/png".into(),
                    source: MediaSource::File {
                        file_id: "file_011".into(),
                    },
                },
                ContentBlock::document_bytes("application/pdf", b"%PDF", None).unwrap(),
                ContentBlock::document_bytes("text/plain", "héllo".as_bytes(), Some("T".into()))
                    .unwrap(),
            ],
        )]);
        let body = request_body(&r, false, false).unwrap();
        assert!(body.uses_files);
        assert_eq!(
            body.json["messages"][0]["content"],
            json!([
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                {"type": "image", "source": {"type": "file", "file_id": "file_011"}},
                {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERg=="}},
                {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "héllo"}, "title": "T"},
            ])
        );
        let plain = request_body(&request(vec![Message::user("x")]), false, false).unwrap();
        assert!(!plain.uses_files);
    }

    #[test]
    fn a_text_document_that_is_not_utf8_is_refused() {
        let r = request(vec![msg(
            Role::User,
            vec![ContentBlock::document_bytes("text/plain", &[0xff, 0xfe], None).unwrap()],
        )]);
        let err = request_body(&r, false, false).unwrap_err();
        assert!(err.to_string().contains("UTF-8"), "{err}");
    }

    #[test]
    fn no_tools_and_no_system_leave_the_keys_out() {
        let mut r = request(vec![Message::user("x")]);
        r.tools = Arc::from(Vec::new());
        r.system = None;
        let body = request_body(&r, true, false).unwrap().json;
        assert!(body.get("tools").is_none());
        assert!(body.get("system").is_none());
        assert_eq!(
            body["messages"][0]["content"][0]["cache_control"],
            json!({"type": "ephemeral"})
        );
    }
}
