//! The Chat Completions request body of a [`ModelRequest`].
//!
//! - The system prompt is the first message (`role: system`, which every compatible server takes;
//!   OpenAI maps it to `developer` for the models that want that).
//! - A user message's tool results become `role: tool` messages first (the API wants them right
//!   after the assistant's `tool_calls`), then the rest of it a `role: user` message. Images and
//!   documents of a tool result follow in that user message, since tool messages take text only.
//! - An assistant message's text becomes `content`, its tool calls `tool_calls` (arguments as
//!   JSON text). Thinking blocks are dropped: the API has no such input, and servers that stream
//!   `reasoning_content` refuse it back.
//! - Parameters (`max_tokens`, `temperature`, `top_p`, `stop`, `reasoning_effort`, anything else)
//!   are copied into the body as they are; the keys this adapter sets itself (`model`,
//!   `messages`, `tools`, `stream`, `stream_options`) win over parameters of the same name.

use normandy_core::{
    ContentBlock, Error, MediaSource, Message, ModelRequest, Result, Role, SessionId,
};
use serde_json::{Map, Value, json};

/// The request body, serialized.
pub(super) fn body(provider: &str, request: &ModelRequest, stream: bool) -> Result<bytes::Bytes> {
    let mut body: Map<String, Value> = request
        .params
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    body.insert("model".into(), Value::String(request.model.clone()));
    body.insert(
        "messages".into(),
        Value::Array(messages(provider, request)?),
    );
    if request.tools.is_empty() {
        body.remove("tools");
    } else {
        let tools = request
            .tools
            .iter()
            .map(|t| {
                json!({
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.input_schema,
                    }
                })
            })
            .collect();
        body.insert("tools".into(), Value::Array(tools));
    }
    if stream {
        body.insert("stream".into(), Value::Bool(true));
        // Without it the stream carries no usage at all.
        body.insert("stream_options".into(), json!({ "include_usage": true }));
    } else {
        body.remove("stream");
        body.remove("stream_options");
    }
    let bytes = serde_json::to_vec(&body)
        .map_err(|e| Error::Internal(format!("{provider}: request body did not serialize: {e}")))?;
    Ok(bytes.into())
}

fn messages(provider: &str, request: &ModelRequest) -> Result<Vec<Value>> {
    let mut out = Vec::with_capacity(request.messages.len() + 1);
    if let Some(system) = request.system.as_deref().filter(|s| !s.is_empty()) {
        out.push(json!({ "role": "system", "content": system }));
    }
    for message in request.messages.iter() {
        match message.role {
            Role::User => user(provider, &request.session, message, &mut out)?,
            Role::Assistant => out.extend(assistant(message)),
        }
    }
    Ok(out)
}

fn user(
    provider: &str,
    session: &SessionId,
    message: &Message,
    out: &mut Vec<Value>,
) -> Result<()> {
    let mut parts = Vec::new();
    for block in &message.content {
        match block {
            ContentBlock::ToolResult {
                tool_use_id,
                content,
                blocks,
                ..
            } => {
                let mut text = content.clone();
                let mut media = Vec::new();
                for inner in blocks {
                    match inner {
                        ContentBlock::Text { text: more } => {
                            if !text.is_empty() {
                                text.push('\n');
                            }
                            text.push_str(more);
                        }
                        other => media.extend(part(provider, session, other)?),
                    }
                }
                out.push(json!({ "role": "tool", "tool_call_id": tool_use_id, "content": text }));
                if !media.is_empty() {
                    parts.push(json!({
                        "type": "text",
                        "text": format!("Attachments of the result of tool call {tool_use_id}:"),
                    }));
                    parts.extend(media);
                }
            }
            other => parts.extend(part(provider, session, other)?),
        }
    }
    match parts.as_slice() {
        [] => {}
        // A lone text as a plain string: what every compatible server takes.
        [only] if only["type"] == "text" => {
            out.push(json!({ "role": "user", "content": only["text"] }));
        }
        _ => out.push(json!({ "role": "user", "content": parts })),
    }
    Ok(())
}

/// The content part of a user block; `None` for blocks a user message does not carry.
fn part(provider: &str, session: &SessionId, block: &ContentBlock) -> Result<Option<Value>> {
    Ok(match block {
        ContentBlock::Text { text } => Some(json!({ "type": "text", "text": text })),
        ContentBlock::Image { media_type, source } => Some(match source {
            MediaSource::Base64 { data } => json!({
                "type": "image_url",
                "image_url": { "url": format!("data:{media_type};base64,{data}") },
            }),
            MediaSource::Url { url } => json!({ "type": "image_url", "image_url": { "url": url } }),
            MediaSource::File { file_id } => {
                json!({ "type": "file", "file": { "file_id": file_id } })
            }
            _ => {
                return Err(unsupported(
                    provider,
                    session,
                    "an image from this kind of source",
                ));
            }
        }),
        ContentBlock::Document {
            media_type,
            source,
            title,
        } => Some(match source {
            MediaSource::Base64 { data } => json!({
                "type": "file",
                "file": {
                    // OpenAI requires a file name with inline file data.
                    "filename": title.clone().unwrap_or_else(|| default_filename(media_type)),
                    "file_data": format!("data:{media_type};base64,{data}"),
                },
            }),
            MediaSource::File { file_id } => {
                json!({ "type": "file", "file": { "file_id": file_id } })
            }
            MediaSource::Url { .. } => {
                return Err(unsupported(
                    provider,
                    session,
                    "a document by URL (Chat Completions takes documents inline or by file id: \
                     send it as base64 or upload it to the Files API first)",
                ));
            }
            _ => {
                return Err(unsupported(
                    provider,
                    session,
                    "a document from this kind of source",
                ));
            }
        }),
        // Thinking is the model's own; tool calls belong to assistant messages.
        _ => None,
    })
}

fn assistant(message: &Message) -> Option<Value> {
    let mut text = String::new();
    let mut calls = Vec::new();
    for block in &message.content {
        match block {
            ContentBlock::Text { text: t } => {
                if !text.is_empty() {
                    text.push_str("\n\n");
                }
                text.push_str(t);
            }
            ContentBlock::ToolUse { id, name, input } => calls.push(json!({
                "id": id,
                "type": "function",
                "function": { "name": name, "arguments": input.to_string() },
            })),
            // Thinking and redacted thinking: no such input (see the module doc).
            _ => {}
        }
    }
    if text.is_empty() && calls.is_empty() {
        // Only thinking: nothing the API can take back.
        return None;
    }
    let mut m = json!({ "role": "assistant" });
    m["content"] = if text.is_empty() {
        Value::Null
    } else {
        Value::String(text)
    };
    if !calls.is_empty() {
        m["tool_calls"] = Value::Array(calls);
    }
    Some(m)
}

fn default_filename(media_type: &str) -> String {
    let ext = match media_type {
        "application/pdf" => "pdf",
        "text/plain" => "txt",
        "text/markdown" => "md",
        "text/csv" => "csv",
        "text/html" => "html",
        _ => "bin",
    };
    format!("document.{ext}")
}

fn unsupported(provider: &str, session: &SessionId, what: &str) -> Error {
    Error::invalid_input(
        Some(session),
        format!("{provider}: the request holds {what}, which this adapter cannot send"),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use normandy_core::ToolSpec;

    use super::*;

    fn request(messages: Vec<Message>) -> ModelRequest {
        ModelRequest {
            session: SessionId::new("s-1").unwrap(),
            model: "m".into(),
            system: None,
            messages: Arc::new(messages),
            tools: Arc::from(Vec::<ToolSpec>::new()),
            params: Arc::new(BTreeMap::new()),
        }
    }

    fn parse(request: &ModelRequest, stream: bool) -> Value {
        serde_json::from_slice(&body("openai", request, stream).unwrap()).unwrap()
    }

    #[test]
    fn thinking_only_assistant_messages_are_dropped() {
        let r = request(vec![
            Message::user("hi"),
            Message {
                role: Role::Assistant,
                content: vec![ContentBlock::Thinking {
                    thinking: "hmm".into(),
                    signature: None,
                }],
            },
        ]);
        let b = parse(&r, false);
        assert_eq!(b["messages"].as_array().unwrap().len(), 1);
        assert!(b.get("stream").is_none());
    }

    #[test]
    fn adapter_keys_win_over_params() {
        let mut r = request(vec![Message::user("hi")]);
        r.params = Arc::new(BTreeMap::from([
            ("model".to_owned(), json!("other")),
            ("stream".to_owned(), json!(false)),
            ("seed".to_owned(), json!(7)),
        ]));
        let b = parse(&r, true);
        assert_eq!(b["model"], "m");
        assert_eq!(b["stream"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["seed"], 7);
    }

    #[test]
    fn a_document_by_url_is_refused_with_advice() {
        let r = request(vec![Message {
            role: Role::User,
            content: vec![ContentBlock::Document {
                media_type: "application/pdf".into(),
                source: MediaSource::Url {
                    url: "https://example.com/a.pdf".into(),
                },
                title: None,
            }],
        }]);
        let e = body("openai", &r, false).unwrap_err();
        assert!(e.to_string().contains("Files API"), "{e}");
    }

    #[test]
    fn inline_documents_get_a_filename() {
        let r = request(vec![Message {
            role: Role::User,
            content: vec![ContentBlock::Document {
                media_type: "application/pdf".into(),
                source: MediaSource::Base64 {
                    data: "JVBERi0=".into(),
                },
                title: None,
            }],
        }]);
        let b = parse(&r, false);
        let part = &b["messages"][0]["content"][0];
        assert_eq!(part["type"], "file");
        assert_eq!(part["file"]["filename"], "document.pdf");
        assert_eq!(
            part["file"]["file_data"],
            "data:application/pdf;base64,JVBERi0="
        );
    }
}
